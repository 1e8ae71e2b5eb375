//! `squash IMAGE [--layers N]`: merges the N sealed layers just below the top into one
//! new sealed layer `IMAGE.squash-XXXXXXXX` (first 8 hex digits of its UUID), then
//! repoints the top at it.
//!
//! The new layer is fully written, synced, sealed and renamed into place before the
//! top's header is replaced (atomic A/B write): a crash before that replace leaves the
//! old chain (plus an unused file), after it the new chain; both read the same. Old
//! layer files are never written.

use std::path::{Path, PathBuf};

use cowdisk_core::chain::open_layer_file;
use cowdisk_core::create::reference_for;
use cowdisk_core::format::COMPAT_BLOCK_CRCS;
use cowdisk_core::layer::{load_map, read_header, stored_block_crc, write_header, NewLayer};
use cowdisk_core::map::AllocMap;
use cowdisk_core::{
    Access, BlockState, Disk, FileStorage, Header, OpenOptions, ParentRef, Storage,
};

use super::builder::{LayerBuilder, Written};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::progress::Progress;

/// What a squash produced.
#[derive(Debug)]
pub struct Squashed {
    /// The new sealed layer.
    pub path: PathBuf,
    /// Layers merged.
    pub merged: usize,
    /// The new sealed layer's header.
    pub header: Header,
    /// The top's header, now pointing at the new layer.
    pub top: Header,
    /// Data stored in the new layer.
    pub written: Written,
}

struct Source {
    path: PathBuf,
    storage: FileStorage,
    header: Header,
    map: AllocMap,
}

/// The name of the merged layer for `image` and the new layer's UUID text.
pub fn squash_path(image: &Path, uuid_hex8: &str) -> PathBuf {
    let mut s = image.as_os_str().to_os_string();
    s.push(format!(".squash-{uuid_hex8}"));
    PathBuf::from(s)
}

/// Merges `layers` (default all) sealed layers below the top of `image`.
pub fn squash(image: &Path, layers: Option<u32>, show_progress: bool) -> Result<Squashed> {
    let disk = Disk::open(image, &OpenOptions::new())?;
    let chain = disk.layers();
    let below = chain.len() - 1;
    if below == 0 {
        return Err(Error::invalid(image, "has no layers below it to squash"));
    }
    let n = layers.map_or(below, |n| n as usize);
    if n > below {
        return Err(Error::invalid(
            image,
            format!("--layers {n}: only {below} layer(s) below the top"),
        ));
    }
    let mut sources = Vec::with_capacity(n);
    for l in &chain[1..=n] {
        let (file, _) = open_layer_file(&l.path, Access::ReadOnly)?;
        let storage = FileStorage::new(file);
        let header = read_header(&storage, &l.path)?.header;
        if header.uuid != l.header.uuid {
            return Err(Error::invalid(&l.path, "changed while being opened"));
        }
        let (map, _) = load_map(&storage, &l.path, &header.geometry)?;
        sources.push(Source {
            path: l.path.clone(),
            storage,
            header,
            map,
        });
    }
    let first = &sources[0].header.geometry;
    let mut header = NewLayer {
        virtual_size: first.virtual_size,
        block_size: first.block_size,
        parent: None,
    }
    .header(image)?;
    let hex: String = header.uuid.to_string().chars().take(8).collect();
    let target = squash_path(image, &hex);
    let rest = chain.get(n + 1);
    if let Some(r) = rest {
        header.parent = Some(ParentRef {
            path: reference_for(&target, &r.path)?,
            uuid: r.header.uuid,
            digest: r.header.seal_digest,
        });
    }
    let mut builder = LayerBuilder::create(&target, header, "squash")?;
    copy_blocks(&mut builder, &sources, rest.is_some(), show_progress)?;
    let written = builder.written();
    let new = builder.finish(true)?;
    // Repoint the top: the commit point.
    let st = &**disk.top_storage();
    let loaded = read_header(st, image)?;
    let mut top = loaded.header.clone();
    top.parent = Some(ParentRef {
        path: reference_for(image, &target)?,
        uuid: new.uuid,
        digest: new.seal_digest,
    });
    write_header(st, image, &loaded, &top)?;
    failpoint::hit("squash.after_repoint");
    drop(disk);
    Ok(Squashed {
        path: target,
        merged: n,
        header: new,
        top,
        written,
    })
}

fn copy_blocks(b: &mut LayerBuilder, sources: &[Source], has_rest: bool, show: bool) -> Result<()> {
    let g = b.header().geometry;
    let bs = u64::from(g.block_size);
    let mut buf = vec![0u8; g.block_size as usize];
    let mut progress = Progress::new("squash", g.virtual_size, show);
    let words = g.blocks.div_ceil(32);
    for w in 0..words {
        // Skip 32 blocks at once where no merged layer holds any of them.
        if sources.iter().all(|s| s.map.word(w as usize) == 0) {
            progress.add(32 * bs);
            continue;
        }
        for blk in w * 32..((w + 1) * 32).min(g.blocks) {
            let owner = sources.iter().find_map(|s| {
                (blk < s.map.blocks() && s.map.get(blk) != BlockState::Absent)
                    .then_some((s, s.map.get(blk)))
            });
            match owner {
                Some((s, BlockState::Data)) => {
                    let n = g.block_len(blk);
                    let off = s.header.geometry.block_offset(blk);
                    s.storage
                        .read_at(&mut buf[..n], off)
                        .map_err(|e| Error::os(&s.path, "read block", e))?;
                    verify(s, blk, &buf[..n])?;
                    if buf[..n].iter().all(|&x| x == 0) {
                        if has_rest {
                            b.whiteout(blk);
                        }
                    } else {
                        b.write_block(blk, &buf[..n])?;
                    }
                }
                Some((_, BlockState::Zero)) if has_rest => b.whiteout(blk),
                _ => {}
            }
        }
        progress.add(32 * bs);
    }
    progress.finish();
    Ok(())
}

/// Checks a merged block against its stored CRC, as every read does: the new layer gets fresh
/// CRCs, so damage copied into it would no longer be detectable.
fn verify(s: &Source, blk: u64, data: &[u8]) -> Result<()> {
    let g = &s.header.geometry;
    if s.header.compat & COMPAT_BLOCK_CRCS == 0 {
        return Ok(());
    }
    // The block's bytes within this layer's own size (a parent may be smaller).
    let n = g.block_len(blk).min(data.len());
    let stored = stored_block_crc(&s.storage, g, blk)
        .map_err(|e| Error::os(&s.path, "read block CRC", e))?;
    let actual = crc32fast::hash(&data[..n]);
    if stored != actual {
        return Err(Error::invalid(
            &s.path,
            format!(
                "block {blk} fails its checksum (stored {stored:08x}, computed {actual:08x}); \
                 nothing was squashed"
            ),
        ));
    }
    Ok(())
}
