//! `snapshot`, `reset`, `rebase`, `squash`: thin wrappers over [`crate::ops`] that
//! report what was done (JSON shapes in README "JSON output").

use std::path::Path;

use serde_json::json;

use crate::error::Result;
use crate::ops;
use crate::output::{layer_json, report};

/// `snapshot IMAGE SNAPSHOT`.
pub fn snapshot(image: &Path, snap: &Path, json_out: bool) -> Result<()> {
    let s = ops::snapshot::snapshot(image, snap)?;
    report(
        json_out,
        || {
            json!({
                "image": layer_json(image, &s.top),
                "snapshot": layer_json(snap, &s.sealed),
            })
        },
        &[format!(
            "Snapshot {} taken; {} continues over it",
            snap.display(),
            image.display()
        )],
    );
    Ok(())
}

/// `reset IMAGE`.
pub fn reset(image: &Path, json_out: bool) -> Result<()> {
    let top = ops::reset::reset(image)?;
    report(
        json_out,
        || json!({ "image": layer_json(image, &top) }),
        &[format!(
            "Reset {}: its changes were discarded",
            image.display()
        )],
    );
    Ok(())
}

/// `rebase IMAGE --backing NEWPATH`.
pub fn rebase(image: &Path, backing: &Path, json_out: bool) -> Result<()> {
    let top = ops::rebase::rebase(image, backing)?;
    report(
        json_out,
        || json!({ "image": layer_json(image, &top) }),
        &[format!(
            "Rebased {} onto {}",
            image.display(),
            backing.display()
        )],
    );
    Ok(())
}

/// `squash IMAGE [--layers N]`.
pub fn squash(
    image: &Path,
    (layers, rate): (Option<u32>, Option<u64>),
    show: bool,
    json_out: bool,
) -> Result<()> {
    let s = ops::squash::squash_at_rate(image, layers, show, rate)?;
    report(
        json_out,
        || {
            json!({
                "image": layer_json(image, &s.top),
                "squashed": layer_json(&s.path, &s.header),
                "layers_merged": s.merged,
                "data_blocks": s.written.data_blocks,
                "bytes_written": s.written.bytes,
            })
        },
        &[format!(
            "Squashed {} layer(s) below {} into {}; the old layer files were not changed",
            s.merged,
            image.display(),
            s.path.display()
        )],
    );
    Ok(())
}
