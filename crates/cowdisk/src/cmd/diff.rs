//! `diff IMAGE --since SNAPSHOT`: the extents whose content may differ from SNAPSHOT's,
//! i.e. those some layer above SNAPSHOT holds (data or whiteout). The same rule answers
//! the NBD context `qemu:dirty-bitmap:SNAPSHOT` (`serve::adapter`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cowdisk_core::{Disk, Extent, LayerState, Uuid};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// `diff IMAGE --since SNAPSHOT`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The image (top layer of a chain).
    pub image: PathBuf,
    /// A sealed layer of IMAGE's chain (a snapshot taken earlier).
    #[arg(long, value_name = "SNAPSHOT")]
    pub since: PathBuf,
    /// Machine-readable output: `[{"start", "length"}]`, changed extents only.
    #[arg(long)]
    pub json: bool,
}

/// True if the extent (as `Disk::block_status` reports it) may differ from the layer at
/// `since` (its depth): a layer above it answers the block.
pub fn changed(e: &Extent, since: usize) -> bool {
    e.depth.is_some_and(|d| (d as usize) < since)
}

/// A sealed layer of a chain: a checkpoint a changed-blocks query can start from.
pub struct Checkpoint {
    /// Its depth in the chain (0 = the top).
    pub depth: usize,
    /// Its file name: the bitmap's name.
    pub name: String,
    /// Its identity, which survives changes of the chain around it.
    pub uuid: Uuid,
}

/// Sealed layers of `disk`, top first.
pub fn sealed_layers(disk: &Disk) -> Vec<Checkpoint> {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let h = disk.top_header();
    let top = (h.state == LayerState::Sealed).then(|| Checkpoint {
        depth: 0,
        name: name(disk.top_path()),
        uuid: h.uuid,
    });
    let lower = disk
        .lower()
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| Checkpoint {
            depth: i + 1,
            name: name(l.path()),
            uuid: l.header().uuid,
        });
    top.into_iter().chain(lower).collect()
}

/// The depth of `since` in `disk`'s chain, by file identity.
pub fn depth_of(disk: &Disk, since: &Path) -> Result<usize> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let want = id(since).ok_or_else(|| Error::invalid(since, "cannot be opened"))?;
    let paths = std::iter::once(disk.top_path().to_path_buf())
        .chain(disk.lower().layers().iter().map(|l| l.path().to_path_buf()));
    for (depth, p) in paths.enumerate() {
        if id(&p) == Some(want) {
            if depth == 0 && disk.top_header().state != LayerState::Sealed {
                return Err(Error::invalid(since, "is the writable top, not a snapshot"));
            }
            return Ok(depth);
        }
    }
    Err(Error::invalid(
        since,
        format!("is not a layer of {}'s chain", disk.top_path().display()),
    ))
}

/// What `diff` prints: the JSON document and the human lines.
pub fn diff_report(disk: &Disk, image: &Path, since: &Path) -> Result<(Value, Vec<String>)> {
    let depth = depth_of(disk, since)?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    super::inspect::for_each_extent(disk, image, |e| {
        if changed(e, depth) {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == e.offset => r.1 += e.length,
                _ => runs.push((e.offset, e.length)),
            }
        }
        Ok(())
    })?;
    let doc: Vec<Value> = runs
        .iter()
        .map(|(s, l)| json!({ "start": s, "length": l }))
        .collect();
    let mut lines = vec![format!("{:<18} {:<18}", "Offset", "Length")];
    lines.extend(runs.iter().map(|(s, l)| format!("{:<#18x} {:<#18x}", s, l)));
    Ok((Value::Array(doc), lines))
}

/// `diff IMAGE --since SNAPSHOT` on an image nobody serves.
pub fn run(a: &DiffArgs) -> Result<()> {
    let disk = super::inspect::open_ro(&a.image, false)?;
    let (doc, lines) = diff_report(&disk, &a.image, &a.since)?;
    crate::output::report(a.json, || doc, &lines);
    Ok(())
}
