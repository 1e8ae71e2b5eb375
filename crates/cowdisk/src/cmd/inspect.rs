//! `info` and `map`: read-only views of a chain.

use std::path::{Path, PathBuf};

use cowdisk_core::format::FLAG_NEEDS_CHECK;
use cowdisk_core::{Access, Disk, Extent};
use serde_json::json;

use crate::error::{Error, Result};
use crate::output::{extent_name, human_size, layer_json, report, state_name};

/// Extents are gathered this many blocks at a time (bounds memory on huge disks).
const MAP_WINDOW_BLOCKS: u64 = 1 << 16;

/// Opens an image read-only (with `force_share`, without taking locks).
pub(crate) fn open_ro(image: &Path, force_share: bool) -> Result<Disk> {
    let mut opts = crate::open_options().access(Access::ReadOnly);
    if force_share {
        opts = opts.force_share();
    }
    Ok(Disk::open(image, &opts)?)
}

/// `info`: every layer, top first.
pub fn info(image: &Path, json_out: bool, force_share: bool) -> Result<()> {
    let disk = open_ro(image, force_share)?;
    let (json, lines) = info_report(&disk, &image.display().to_string());
    report(json_out, || json, &lines);
    Ok(())
}

/// What `info` prints about `disk` (opened from `image`): the JSON document and the
/// human lines. Also answers `info` on a served image through its control socket.
pub fn info_report(disk: &Disk, image: &str) -> (serde_json::Value, Vec<String>) {
    let layers = disk.layers();
    let ls: Vec<_> = layers
        .iter()
        .map(|l| {
            let mut v = layer_json(&l.path, &l.header);
            // The counts come from the open chain; allocated_bytes from its handle.
            v["data_blocks"] = json!(l.data_blocks);
            v["partial_blocks"] = json!(l.partial_blocks);
            v["whiteout_blocks"] = json!(l.zero_blocks);
            v["allocated_bytes"] = json!(l.allocated_bytes);
            v["needs_check"] = json!(l.header.flags & FLAG_NEEDS_CHECK != 0);
            // Remote layers are objects (their data is fetched on demand).
            v["remote"] = json!(cowdisk_remote::is_remote(&l.path.to_string_lossy()));
            v
        })
        .collect();
    let doc = json!({
        "image": image,
        "virtual_size": disk.size(),
        "block_size": disk.block_size(),
        "depth": layers.len(),
        "layers": ls,
    });
    let mut out = vec![
        format!("image: {image}"),
        format!(
            "virtual size: {} ({} bytes)",
            human_size(disk.size()),
            disk.size()
        ),
        format!("block size: {}", human_size(u64::from(disk.block_size()))),
        format!("layers: {}", layers.len()),
    ];
    for (i, l) in layers.iter().enumerate() {
        let h = &l.header;
        let bs = u64::from(h.geometry.block_size);
        let mut state = state_name(h.state).to_string();
        if h.flags & FLAG_NEEDS_CHECK != 0 {
            state.push_str(", needs check");
        }
        out.push(String::new());
        out.push(format!("[{i}] {}", l.path.display()));
        out.push(format!("    uuid:            {}", h.uuid));
        out.push(format!("    state:           {state}"));
        out.push(format!(
            "    virtual size:    {}",
            human_size(h.geometry.virtual_size)
        ));
        out.push(format!("    block size:      {}", human_size(bs)));
        let size = human_size(l.data_blocks * bs);
        out.push(match l.partial_blocks {
            0 => format!("    data blocks:     {} ({size})", l.data_blocks),
            // A partial block holds only the sub-blocks written since its first write.
            p => format!(
                "    data blocks:     {} ({p} partial; at most {size})",
                l.data_blocks
            ),
        });
        out.push(format!("    whiteout blocks: {}", l.zero_blocks));
        if cowdisk_remote::is_remote(&l.path.to_string_lossy()) {
            // Its blocks are fetched on demand into the host cache, not stored here.
            out.push("    disk usage:      remote object".to_string());
        } else {
            out.push(format!(
                "    disk usage:      {}",
                human_size(l.allocated_bytes)
            ));
        }
        let parent = match &h.parent {
            Some(p) => format!("{} (uuid {})", p.path, p.uuid),
            None => "none".into(),
        };
        out.push(format!("    parent:          {parent}"));
    }
    (doc, out)
}

/// Calls `f` with the disk's extents, merged, a window at a time.
pub fn for_each_extent(
    disk: &Disk,
    image: &Path,
    mut f: impl FnMut(&Extent) -> Result<()>,
) -> Result<()> {
    let window = MAP_WINDOW_BLOCKS * u64::from(disk.block_size());
    let mut pending: Option<Extent> = None;
    let mut pos = 0;
    let mut buf = Vec::new();
    while pos < disk.size() {
        let len = window.min(disk.size() - pos);
        buf.clear();
        disk.block_status(pos, len, &mut buf)
            .map_err(|e| Error::disk(image, e))?;
        for e in buf.drain(..) {
            match &mut pending {
                Some(p)
                    if p.state == e.state
                        && p.depth == e.depth
                        && p.offset + p.length == e.offset =>
                {
                    p.length += e.length
                }
                _ => {
                    if let Some(p) = pending.replace(e) {
                        f(&p)?;
                    }
                }
            }
        }
        pos += len;
    }
    if let Some(p) = pending {
        f(&p)?;
    }
    Ok(())
}

/// `map`: extents of the virtual disk.
pub fn map(image: &Path, json_out: bool, force_share: bool) -> Result<()> {
    let disk = open_ro(image, force_share)?;
    let (json, lines) = map_report(&disk, image)?;
    report(json_out, || json, &lines);
    Ok(())
}

/// What `map` prints about `disk` (opened from `image`): the JSON document and the
/// human lines. Also answers `map` on a served image through its control socket.
pub fn map_report(disk: &Disk, image: &Path) -> Result<(serde_json::Value, Vec<String>)> {
    let files: Vec<PathBuf> = disk.layers().into_iter().map(|l| l.path).collect();
    let file_of = |e: &Extent| {
        e.depth
            .and_then(|d| files.get(d as usize))
            .map(|p| p.display().to_string())
    };
    let mut rows = Vec::new();
    for_each_extent(disk, image, |e| {
        rows.push((*e, file_of(e)));
        Ok(())
    })?;
    let v: Vec<_> = rows
        .iter()
        .map(|(e, file)| {
            json!({
                "start": e.offset,
                "length": e.length,
                "state": extent_name(e.state),
                "depth": e.depth,
                "file": file,
            })
        })
        .collect();
    let mut out = vec![format!(
        "{:<18} {:<18} {:<5} {:>5}  {}",
        "Offset", "Length", "State", "Depth", "File"
    )];
    for (e, file) in &rows {
        out.push(format!(
            "{:<#18x} {:<#18x} {:<5} {:>5}  {}",
            e.offset,
            e.length,
            extent_name(e.state),
            e.depth.map_or("-".to_string(), |d| d.to_string()),
            file.as_deref().unwrap_or("-"),
        ));
    }
    Ok((serde_json::Value::Array(v), out))
}
