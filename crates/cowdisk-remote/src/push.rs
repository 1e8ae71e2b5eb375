//! `push`: uploads the sealed layers of a local chain as layer objects.
//!
//! Each object is streamed from its layer file (bounded memory: one part buffer) and
//! appears under its final, content-derived name only when whole: a single PUT for small
//! objects, a multipart upload completed last for large ones; an interrupted upload
//! leaves no object (and its parts are aborted when we still can).
//! Every block is checked against its stored CRC as it is read: corrupt data is never
//! uploaded.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cowdisk_core::format::{BlockState, Header, LayerState};
use cowdisk_core::layer::{load_map, read_header, verify_seal_digest};
use cowdisk_core::{open_layer_file, Access, ChainWalk, FileStorage, LayerSource, ReadStorage};

use crate::client::Client;
use crate::error::{RemoteError, Result};
use crate::object::{object_name, LayerMeta, ObjectHeader};
use crate::source::RemoteSource;
use crate::url::{is_remote, S3Url};

/// Upload part size (also the largest object sent in one PUT). S3 needs ≥ 5 MiB parts.
const PART: usize = 8 << 20;
/// Deadline of each request during a push (uploads are retried within it).
const PUSH_DEADLINE: Duration = Duration::from_secs(60);

/// What push did with one layer.
#[derive(Debug, Clone)]
pub struct PushedLayer {
    /// The local file, or the object it already was.
    pub source: PathBuf,
    /// Its object.
    pub url: S3Url,
    /// Bytes uploaded (0 if the store held it already or it was remote).
    pub uploaded: u64,
    /// The object's length.
    pub object_len: u64,
}

/// A sealed layer of the chain being pushed, top first after the walk.
struct ChainLayer {
    path: PathBuf,
    storage: std::sync::Arc<dyn ReadStorage>,
    header: Header,
}

/// Pushes every sealed layer of `image`'s chain to `dest` (a prefix); returns them base
/// first. A writable top is not pushed.
pub fn push(source: &RemoteSource, image: &Path, dest: &S3Url) -> Result<Vec<PushedLayer>> {
    let layers = sealed_chain(source, image)?;
    if layers.is_empty() {
        return Err(RemoteError::io(
            image,
            "push",
            std::io::Error::other("no sealed layer to push (snapshot the image first)"),
        ));
    }
    let client = source.remote()?.client.clone();
    let mut parent: Option<S3Url> = None;
    let mut out = Vec::new();
    for l in layers.into_iter().rev() {
        let done = if is_remote(&l.path.to_string_lossy()) {
            let url = S3Url::parse(&l.path.to_string_lossy(), false)?;
            let len = client
                .head(&url, Instant::now() + PUSH_DEADLINE)?
                .unwrap_or(0);
            PushedLayer {
                source: l.path.clone(),
                url,
                uploaded: 0,
                object_len: len,
            }
        } else {
            push_layer(&client, &l, parent.as_ref(), dest)?
        };
        parent = Some(done.url.clone());
        out.push(done);
    }
    Ok(out)
}

/// The sealed layers of the chain, top first (the top only if it is sealed).
fn sealed_chain(source: &dyn LayerSource, image: &Path) -> Result<Vec<ChainLayer>> {
    let (file, id) = open_layer_file(image, Access::ReadOnly, true)?;
    let storage: std::sync::Arc<dyn ReadStorage> = std::sync::Arc::new(FileStorage::new(file));
    let top = read_header(&*storage, image)?.header;
    let mut out = Vec::new();
    for step in ChainWalk::new(source, image, &top, id, true) {
        let l = step.map_err(|(_, e)| e)?;
        if let Some(e) = l.link.first() {
            return Err(RemoteError::io(
                &l.path,
                "push",
                std::io::Error::other(e.to_string()),
            ));
        }
        out.push(ChainLayer {
            path: l.path,
            storage: l.storage,
            header: l.loaded.header,
        });
    }
    if top.state == LayerState::Sealed {
        out.insert(
            0,
            ChainLayer {
                path: image.to_path_buf(),
                storage,
                header: top,
            },
        );
    }
    Ok(out)
}

/// How an object names its parent: by bare name when both share a prefix.
fn parent_reference(parent: &S3Url, dest: &S3Url) -> String {
    let here = dest.child("x").dir();
    if parent.dir() == here {
        parent.name().to_string()
    } else {
        parent.to_string()
    }
}

/// Uploads one local sealed layer unless the store holds its object already.
fn push_layer(
    client: &Client,
    l: &ChainLayer,
    parent: Option<&S3Url>,
    dest: &S3Url,
) -> Result<PushedLayer> {
    let (meta, oh, data) = build_meta(l, parent, dest)?;
    let url = dest.child(&object_name(&l.header.uuid, l.header.seal_digest));
    let deadline = || Instant::now() + PUSH_DEADLINE;
    let done = |uploaded| PushedLayer {
        source: l.path.clone(),
        url: url.clone(),
        uploaded,
        object_len: oh.object_len,
    };
    match client.head(&url, deadline())? {
        Some(len) if len == oh.object_len => return Ok(done(0)),
        Some(len) => {
            return Err(RemoteError::bad_object(
                &url,
                format!(
                "exists with {len} bytes, but this layer's object has {} (not a cowdisk object?)",
                oh.object_len
            ),
            ))
        }
        None => {}
    }
    let mut up = Upload::new(client, &url, oh.object_len);
    let r = (|| {
        up.write(&oh.encode())?;
        up.write(&meta)?;
        up.write(&vec![0u8; (oh.data_offset - 4096 - oh.meta_len) as usize])?;
        let g = l.header.geometry;
        let mut buf = vec![0u8; g.block_size as usize];
        for (b, crc) in data {
            let block = &mut buf[..g.block_len(b)];
            l.storage
                .read_at(block, g.block_offset(b))
                .map_err(|e| RemoteError::io(&l.path, "read block", e))?;
            if crc32fast::hash(block) != crc {
                return Err(RemoteError::io(
                    &l.path,
                    "push",
                    std::io::Error::other(format!(
                        "block {b} fails its CRC; run `cowdisk check` (nothing pushed)"
                    )),
                ));
            }
            up.write(block)?;
        }
        up.finish()
    })();
    if r.is_err() {
        up.abort();
    }
    r.map(|()| done(oh.object_len))
}

/// The metadata section, object header, and (block, CRC) of every data block.
type Built = (Vec<u8>, ObjectHeader, Vec<(u64, u32)>);

/// Builds a layer's object metadata from its file, after checking its seal digest.
fn build_meta(l: &ChainLayer, parent: Option<&S3Url>, dest: &S3Url) -> Result<Built> {
    let h = &l.header;
    let g = h.geometry;
    let (map, _) = load_map(&*l.storage, &l.path, &g)?;
    if let Some(b) = map.first_partial() {
        return Err(RemoteError::io(
            &l.path,
            "read allocation map",
            std::io::Error::other(format!("block {b}: partial block in a sealed layer")),
        ));
    }
    verify_seal_digest(&*l.storage, &l.path, h, &map)?;
    let mut entries = vec![0u8; crate::object::entries_len(g.blocks) as usize];
    let mut data = Vec::new();
    for b in 0..g.blocks {
        let v = match map.get(b) {
            BlockState::Absent => 0u8,
            BlockState::Data => 1,
            BlockState::Zero => 2,
            // Refused above: a sealed layer holds none.
            BlockState::Partial => 1,
        };
        entries[(b / 4) as usize] |= v << (2 * (b % 4));
        if v == 1 {
            data.push((b, 0u32));
        }
    }
    // Stored block CRCs, read in runs of 1024 entries.
    let mut crcbuf = vec![0u8; 4096];
    let mut run = u64::MAX;
    for d in data.iter_mut() {
        if d.0 / 1024 != run {
            run = d.0 / 1024;
            let n = ((g.blocks - run * 1024).min(1024) * 4) as usize;
            l.storage
                .read_at(&mut crcbuf[..n], g.crc_offset + run * 4096)
                .map_err(|e| RemoteError::io(&l.path, "read block CRCs", e))?;
        }
        let i = ((d.0 % 1024) * 4) as usize;
        d.1 = u32::from_le_bytes(crcbuf[i..i + 4].try_into().expect("4 bytes"));
    }
    let mut header = h.clone();
    // An object has no partial-block bitmap area (a sealed layer holds no partial block).
    header.geometry = header.geometry.without_sub_blocks();
    if let (Some(p), Some(parent)) = (header.parent.as_mut(), parent) {
        p.path = parent_reference(parent, dest);
    }
    let crcs: Vec<u32> = data.iter().map(|d| d.1).collect();
    let meta = LayerMeta::encode(&header.encode(), &entries, &crcs);
    let last_is_data = data.last().is_some_and(|d| d.0 == g.blocks - 1);
    let oh = ObjectHeader::new(
        &header,
        data.len() as u64,
        last_is_data,
        crc32fast::hash(&meta),
    );
    Ok((meta, oh, data))
}

/// A streamed upload: one PUT when the object fits one part, else multipart.
struct Upload<'a> {
    client: &'a Client,
    url: &'a S3Url,
    single: bool,
    buf: Vec<u8>,
    id: Option<String>,
    etags: Vec<String>,
}

impl<'a> Upload<'a> {
    fn new(client: &'a Client, url: &'a S3Url, len: u64) -> Upload<'a> {
        Upload {
            client,
            url,
            single: len <= PART as u64,
            buf: Vec::with_capacity(PART.min(len as usize)),
            id: None,
            etags: Vec::new(),
        }
    }

    fn write(&mut self, mut b: &[u8]) -> Result<()> {
        while !b.is_empty() {
            let n = (PART - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.buf.len() == PART && !self.single {
                self.send_part()?;
            }
        }
        Ok(())
    }

    fn send_part(&mut self) -> Result<()> {
        let deadline = Instant::now() + PUSH_DEADLINE;
        if self.id.is_none() {
            self.id = Some(self.client.multipart_start(self.url, deadline)?);
        }
        let id = self.id.as_deref().expect("started");
        let n = u16::try_from(self.etags.len() + 1)
            .ok()
            .filter(|&n| n <= 10_000)
            .ok_or_else(|| {
                RemoteError::bad_object(self.url, "object needs more than 10000 parts")
            })?;
        let etag = self
            .client
            .multipart_part(self.url, id, n, &self.buf, deadline)?;
        self.etags.push(etag);
        self.buf.clear();
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let deadline = Instant::now() + PUSH_DEADLINE;
        if self.single {
            return self.client.put(self.url, &self.buf, deadline);
        }
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        let id = self.id.clone().expect("a multipart object has parts");
        self.client
            .multipart_finish(self.url, &id, &self.etags, deadline)
    }

    fn abort(&self) {
        if let Some(id) = &self.id {
            self.client.multipart_abort(self.url, id);
        }
    }
}
