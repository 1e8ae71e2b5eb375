//! `squash IMAGE [--layers N]`: merges the N sealed layers just below the top into one
//! new sealed layer `IMAGE.squash-XXXXXXXX` (first 8 hex digits of its UUID), then
//! repoints the top at it.
//!
//! The new layer is fully written, synced, sealed and renamed into place before the
//! top's header is replaced (atomic A/B write): a crash before that replace leaves the
//! old chain (plus an unused file), after it the new chain; both read the same. Old
//! layer files are never written.

use std::path::{Path, PathBuf};

use cowdisk_core::create::reference_for;
use cowdisk_core::layer::NewLayer;
use cowdisk_core::{Disk, Header, Lower, LowerOwner, ParentRef, ReferenceStyle};

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

/// The name of the merged layer for `image` and the new layer's UUID text.
pub fn squash_path(image: &Path, uuid_hex8: &str) -> PathBuf {
    let mut s = image.as_os_str().to_os_string();
    s.push(format!(".squash-{uuid_hex8}"));
    PathBuf::from(s)
}

/// Merges `layers` (default all) sealed layers below the top of `image`.
pub fn squash(image: &Path, layers: Option<u32>, show_progress: bool) -> Result<Squashed> {
    squash_at_rate(image, layers, show_progress, None)
}

/// As [`squash`], copying at most `rate` bytes of block data per second if given.
pub fn squash_at_rate(
    image: &Path,
    layers: Option<u32>,
    show_progress: bool,
    rate: Option<u64>,
) -> Result<Squashed> {
    let disk = Disk::open(image, &crate::open_options())?;
    let built = build(&disk, image, layers, show_progress, rate)?;
    let s = commit(&disk, image, built)?;
    drop(disk);
    Ok(s)
}

/// A merged layer written, sealed and in place, not yet used by the top.
pub(crate) struct Built {
    target: PathBuf,
    merged: usize,
    header: Header,
    written: Written,
}

/// Writes the merged layer of `disk` (open from `image`). Reads only the sealed layers,
/// which never change, so the top may take writes meanwhile (a live squash), at most
/// `rate` bytes per second of block data if given.
pub(crate) fn build(
    disk: &Disk,
    image: &Path,
    layers: Option<u32>,
    show_progress: bool,
    rate: Option<u64>,
) -> Result<Built> {
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
    let lower = disk.lower();
    let first = &lower.layers()[0].header().geometry;
    let bs = first.block_size;
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
            path: reference_for(&target, &r.path, ReferenceStyle::Relative)?,
            uuid: r.header.uuid,
            digest: r.header.seal_digest,
        });
    }
    let mut builder = LayerBuilder::create(&target, header, "squash")?;
    let held = chain[1..=n].iter().map(|l| l.data_blocks).sum::<u64>() * u64::from(bs);
    copy_blocks(
        &mut builder,
        lower,
        (n, held),
        rest.is_some(),
        (show_progress, rate),
    )?;
    let written = builder.written();
    let header = builder.finish(true)?;
    Ok(Built {
        target,
        merged: n,
        header,
        written,
    })
}

/// Repoints the top at the merged layer: the commit point.
pub(crate) fn commit(disk: &Disk, image: &Path, built: Built) -> Result<Squashed> {
    let top = disk.set_parent(ParentRef {
        path: reference_for(image, &built.target, ReferenceStyle::Relative)?,
        uuid: built.header.uuid,
        digest: built.header.seal_digest,
    })?;
    failpoint::hit("squash.after_repoint");
    Ok(Squashed {
        path: built.target,
        merged: built.merged,
        header: built.header,
        top,
        written: built.written,
    })
}

/// Copies what the `n` merged layers hold, top-most owner first (the chain's one owner
/// lookup), each data block verified against its stored CRC as every read is: the new
/// layer gets fresh CRCs, so damage copied into it would no longer be detectable.
fn copy_blocks(
    b: &mut LayerBuilder,
    lower: &Lower,
    (n, held_bytes): (usize, u64),
    has_rest: bool,
    (show, rate): (bool, Option<u64>),
) -> Result<()> {
    let g = b.header().geometry;
    let start = std::time::Instant::now();
    let mut copied = 0u64;
    let mut buf = vec![0u8; g.block_size as usize];
    let mut progress = Progress::new("squash", held_bytes, show);
    lower.for_each_owned(|blk, owner| {
        match owner {
            LowerOwner::Data(i) if i < n => {
                let layer = &lower.layers()[i];
                // A smaller layer's last block is short: the rest of the block reads zeros.
                buf.fill(0);
                layer
                    .read_block(blk, &mut buf)
                    .map_err(|e| Error::disk(layer.path(), e))?;
                let data = &buf[..g.block_len(blk)];
                if data.iter().all(|&x| x == 0) {
                    if has_rest {
                        b.whiteout(blk);
                    }
                } else {
                    b.write_block(blk, data)?;
                }
                progress.add(data.len() as u64);
                copied += data.len() as u64;
                pace(start, copied, rate);
            }
            LowerOwner::Zero(i) if i < n && has_rest => b.whiteout(blk),
            _ => {}
        }
        Ok::<(), Error>(())
    })?;
    progress.finish();
    Ok(())
}

/// Sleeps as long as `copied` bytes since `start` are ahead of `rate` bytes per second, so a
/// live squash leaves the disk's bandwidth to the clients.
fn pace(start: std::time::Instant, copied: u64, rate: Option<u64>) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = std::time::Duration::from_secs_f64(copied as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
}
