//! `pull` (a remote chain as local layer files, for hosts that must run offline) and
//! `create --backing s3://…` (a local writable top over a remote chain).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cowdisk_core::create::{rename_noreplace, write_temp_layer};
use cowdisk_core::format::{Header, ParentRef};
use cowdisk_core::layer::{read_header, NewLayer};
use cowdisk_core::{open_layer_file, Access, FileStorage, ReadStorage, Storage, MAX_DEPTH};

use crate::error::{RemoteError, Result};
use crate::layer::RemoteLayer;
use crate::object::{object_name, SUFFIX};
use crate::source::RemoteSource;
use crate::url::S3Url;

/// Bytes copied per read while pulling metadata.
const CHUNK: u64 = 1 << 20;

/// Creates an empty writable layer at `top` whose parent is the layer object at `url`.
pub fn create_over_remote(source: &RemoteSource, top: &Path, url: &S3Url) -> Result<Header> {
    if top.symlink_metadata().is_ok() {
        return Err(RemoteError::io(
            top,
            "create",
            std::io::Error::other("already exists"),
        ));
    }
    let layer = source.open_object(url)?;
    let p = &layer.meta().header;
    let header = NewLayer {
        virtual_size: p.geometry.virtual_size,
        block_size: p.geometry.block_size,
        parent: Some(ParentRef {
            path: url.to_string(),
            uuid: p.uuid,
            digest: p.seal_digest,
        }),
    }
    .header(top)?;
    let tmp = write_temp_layer(top, &header, "create")?;
    rename_noreplace(&tmp, top).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(header)
}

/// The chain of layer objects from `url` down to its base (top first), bounded in
/// depth and checked for loops by UUID.
pub fn remote_chain(source: &RemoteSource, url: &S3Url) -> Result<Vec<Arc<RemoteLayer>>> {
    let mut out: Vec<Arc<RemoteLayer>> = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some(url.clone());
    while let Some(u) = next.take() {
        if out.len() >= MAX_DEPTH {
            return Err(RemoteError::bad_object(
                &u,
                format!("chain deeper than {MAX_DEPTH} layers"),
            ));
        }
        let l = source.open_object(&u)?;
        let h = &l.meta().header;
        if !seen.insert(h.uuid) {
            return Err(RemoteError::bad_object(
                &u,
                "chain loop: the same layer appears twice",
            ));
        }
        if let Some(child) = out.last() {
            let want = child.meta().header.parent.as_ref().expect("has a parent");
            if (want.uuid, want.digest) != (h.uuid, h.seal_digest) {
                return Err(RemoteError::bad_object(
                    &u,
                    format!("is not the layer {} expects (replaced?)", child.url()),
                ));
            }
        }
        if let Some(p) = &h.parent {
            next = Some(u.resolve(&p.path)?);
        }
        out.push(l);
    }
    Ok(out)
}

/// Downloads the chain at `url` into `dir` as sealed local layer files named
/// `<uuid>-<digest>.cow` (files already there with the right identity are kept); returns
/// the top's path.
pub fn pull(source: &RemoteSource, url: &S3Url, dir: &Path) -> Result<PathBuf> {
    let chain = remote_chain(source, url)?;
    let mut parent_name: Option<String> = None;
    let mut top = PathBuf::new();
    for l in chain.iter().rev() {
        let h = &l.meta().header;
        let name = format!(
            "{}.cow",
            object_name(&h.uuid, h.seal_digest).trim_end_matches(SUFFIX)
        );
        let path = dir.join(&name);
        if !same_layer(&path, h)? {
            pull_layer(l, &path, parent_name.as_deref())?;
        }
        parent_name = Some(name);
        top = path;
    }
    Ok(top)
}

/// True if `path` exists and holds the layer `h` (a previous pull).
fn same_layer(path: &Path, h: &Header) -> Result<bool> {
    if path.symlink_metadata().is_err() {
        return Ok(false);
    }
    let (file, _) = open_layer_file(path, Access::ReadOnly, false)?;
    let found = read_header(&FileStorage::new(file), path)?.header;
    if (found.uuid, found.seal_digest) == (h.uuid, h.seal_digest) {
        Ok(true)
    } else {
        Err(RemoteError::io(
            path,
            "pull",
            std::io::Error::other("exists and holds another layer"),
        ))
    }
}

/// Writes one layer file: the synthesized metadata with the parent reference made
/// local, then every data block (fetched, verified), synced, renamed into place.
fn pull_layer(l: &RemoteLayer, path: &Path, parent: Option<&str>) -> Result<()> {
    let meta = l.meta();
    let mut header = meta.header.clone();
    if let (Some(p), Some(name)) = (header.parent.as_mut(), parent) {
        p.path = name.to_string();
    }
    let g = header.geometry;
    let tmp = write_temp_layer(path, &header, "pull")?;
    let r = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&tmp)
            .map_err(|e| RemoteError::io(&tmp, "open", e))?;
        let st = FileStorage::new(file);
        let t: &Path = &tmp;
        let io = |op: &'static str| move |e| RemoteError::io(t, op, e);
        // Everything after header slot A up to the data: map pages, CRC area.
        let mut buf = vec![0u8; CHUNK as usize];
        let mut off = 8192;
        while off < g.data_offset {
            let n = (g.data_offset - off).min(CHUNK) as usize;
            l.read_at(&mut buf[..n], off).map_err(io("read object"))?;
            if buf[..n].iter().any(|&b| b != 0) {
                st.write_at(&buf[..n], off).map_err(io("write"))?;
            }
            off += n as u64;
        }
        let mut block = vec![0u8; g.block_size as usize];
        for &b in &meta.data {
            let b = u64::from(b);
            let blk = &mut block[..g.block_len(b)];
            l.read_at(blk, g.block_offset(b))
                .map_err(io("fetch block"))?;
            st.write_at(blk, g.block_offset(b)).map_err(io("write"))?;
        }
        st.sync().map_err(io("sync"))?;
        rename_noreplace(&tmp, path).map_err(RemoteError::from)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
