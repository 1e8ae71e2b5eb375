//! The control commands (`docs/control.md`): each takes the request object and returns
//! its `result` or a [`Failure`] with a stable code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::state::{Control, Reply, Target};
use super::Failure;
use crate::cmd::diff::diff_report;
use crate::cmd::inspect::{info_report, map_report};
use crate::output::layer_json;

/// Runs `command` with the arguments in `req`.
pub fn run(control: &Arc<Control>, default: Option<&str>, command: &str, req: &Value) -> Reply {
    match command {
        "exports" => Ok(exports(control)),
        "stats" => stats(control, default, req),
        "info" => {
            let t = target(control, default, req)?;
            let display = display(req, &t);
            let (doc, text) = info_report(t.live.current(), &display);
            Ok(json!({ "document": doc, "text": text }))
        }
        "map" => {
            let t = target(control, default, req)?;
            let display = PathBuf::from(display(req, &t));
            let (doc, text) = map_report(t.live.current(), &display).map_err(failed)?;
            Ok(json!({ "document": doc, "text": text }))
        }
        "diff" => {
            let t = target(control, default, req)?;
            let display = PathBuf::from(display(req, &t));
            let since = req
                .get("since")
                .and_then(Value::as_str)
                .ok_or_else(|| Failure::new("bad_request", "\"since\" (a path) is required"))?;
            let (doc, text) =
                diff_report(t.live.current(), &display, Path::new(since)).map_err(failed)?;
            Ok(json!({ "document": doc, "text": text }))
        }
        "snapshot" => snapshot(control, default, req),
        "squash" => squash(control, default, req),
        "reset" => reset(control, default, req),
        "check" => {
            let t = target(control, default, req)?;
            let (mut doc, text, code) = t.live.check().map_err(failed)?;
            doc["image"] = json!(display(req, &t));
            Ok(json!({ "document": doc, "text": text, "exit_code": code }))
        }
        "add_export" => super::exports::add(control, req),
        "remove_export" => super::exports::remove(control, req),
        _ => Err(Failure::new(
            "unknown_command",
            format!(
                "unknown command {command:?} (known: exports, stats, info, map, diff, check, snapshot, squash, reset, \
                 add_export, remove_export)"
            ),
        )),
    }
}

fn failed(e: crate::error::Error) -> Failure {
    Failure::new("failed", e.to_string())
}

/// The export a request addresses: `"export"` by name, else `"image"` by path (the
/// same file), else the socket's own image.
fn target(control: &Control, default: Option<&str>, req: &Value) -> Result<Arc<Target>, Failure> {
    let list = control.list();
    if let Some(v) = req.get("export") {
        let name = v
            .as_str()
            .ok_or_else(|| Failure::new("bad_request", "\"export\" must be a string"))?;
        return list
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Failure::new("unknown_export", format!("no export named {name:?}")));
    }
    if let Some(v) = req.get("image") {
        let path = v
            .as_str()
            .ok_or_else(|| Failure::new("bad_request", "\"image\" must be a string"))?;
        let want = Path::new(path).canonicalize().ok();
        return list
            .into_iter()
            .find(|t| want.is_some() && t.live.image().canonicalize().ok() == want)
            .ok_or_else(|| Failure::new("unknown_export", format!("{path} is not served here")));
    }
    let only = (list.len() == 1).then(|| list[0].name.clone());
    let name = default.map(str::to_string).or(only);
    name.and_then(|n| list.into_iter().find(|t| t.name == n))
        .ok_or_else(|| Failure::new("bad_request", "name the export (\"export\")"))
}

/// How the reply names the image: as the client wrote it, if it said.
fn display(req: &Value, t: &Target) -> String {
    req.get("display")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| t.live.image().display().to_string())
}

fn exports(control: &Control) -> Value {
    let list: Vec<Value> = control
        .list()
        .iter()
        .map(|t| {
            let d = t.live.current();
            json!({
                "name": t.name,
                "image": t.live.image().display().to_string(),
                "read_only": d.is_read_only(),
                "virtual_size": d.size(),
                "block_size": d.block_size(),
                "depth": d.depth(),
            })
        })
        .collect();
    json!({ "exports": list })
}

/// Counters of the export the request names (`export` or `image`), else of all.
fn stats(control: &Control, default: Option<&str>, req: &Value) -> Reply {
    let one = |t: &Target| {
        let mut v = t.live.stats.to_json();
        v["copy_ups"] = json!(t.live.copy_ups());
        v["journal_flushes"] = json!(t.live.journal_flushes());
        v["name"] = json!(t.name);
        v["image"] = json!(t.live.image().display().to_string());
        v
    };
    let list: Vec<Value> = if req.get("export").is_some() || req.get("image").is_some() {
        vec![one(&*target(control, default, req)?)]
    } else {
        control.list().iter().map(|t| one(t)).collect()
    };
    Ok(json!({ "exports": list }))
}

fn snapshot(control: &Control, default: Option<&str>, req: &Value) -> Reply {
    let t = target(control, default, req)?;
    let snap = req
        .get("snapshot")
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::new("bad_request", "\"snapshot\" (a path) is required"))?;
    let snap = Path::new(snap);
    if !snap.is_absolute() {
        // The server's working folder means nothing to the client.
        return Err(Failure::new(
            "bad_request",
            "\"snapshot\" must be an absolute path",
        ));
    }
    if t.live.current().is_read_only() {
        return Err(Failure::new("read_only", "the export is read-only"));
    }
    let s = t.live.exclusive(|| t.live.snapshot(snap)).map_err(failed)?;
    let image = PathBuf::from(display(req, &t));
    let snap_display = req
        .get("snapshot_display")
        .and_then(Value::as_str)
        .map_or_else(|| snap.to_path_buf(), PathBuf::from);
    let text = vec![format!(
        "Snapshot {} taken; {} continues over it",
        snap_display.display(),
        image.display()
    )];
    // layer_json reads the file's disk usage: by the real path, named as the client did.
    let mut img = layer_json(t.live.image(), &s.top);
    img["path"] = json!(image.display().to_string());
    let mut sn = layer_json(snap, &s.sealed);
    sn["path"] = json!(snap_display.display().to_string());
    Ok(json!({ "document": { "image": img, "snapshot": sn }, "text": text }))
}

fn squash(control: &Control, default: Option<&str>, req: &Value) -> Reply {
    let t = target(control, default, req)?;
    let layers = match req.get("layers") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n >= 1)
                .ok_or_else(|| Failure::new("bad_request", "\"layers\" must be 1 or more"))?,
        ),
    };
    let rate = match req.get("rate") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|&r| r > 0).ok_or_else(|| {
            Failure::new(
                "bad_request",
                "\"rate\" must be a number of bytes per second",
            )
        })?),
    };
    if t.live.current().is_read_only() {
        return Err(Failure::new("read_only", "the export is read-only"));
    }
    let s = t
        .live
        .exclusive(|| t.live.squash(layers, rate))
        .map_err(failed)?;
    let image = display(req, &t);
    // The merged layer is named after the image: name it as the client named the image.
    let served = t.live.image().display().to_string();
    let merged = s.path.display().to_string();
    let merged_display = match merged.strip_prefix(&served) {
        Some(suffix) => format!("{image}{suffix}"),
        None => merged,
    };
    let mut img = layer_json(t.live.image(), &s.top);
    img["path"] = json!(image);
    let mut sq = layer_json(&s.path, &s.header);
    sq["path"] = json!(merged_display);
    let text = vec![format!(
        "Squashed {} layer(s) below {image} into {merged_display}; the old layer files were not changed",
        s.merged
    )];
    let doc = json!({
        "image": img,
        "squashed": sq,
        "layers_merged": s.merged,
        "data_blocks": s.written.data_blocks,
        "bytes_written": s.written.bytes,
    });
    Ok(json!({ "document": doc, "text": text }))
}

fn reset(control: &Control, default: Option<&str>, req: &Value) -> Reply {
    let t = target(control, default, req)?;
    if t.live.current().is_read_only() {
        return Err(Failure::new("read_only", "the export is read-only"));
    }
    let top = t.live.exclusive(|| t.live.reset()).map_err(failed)?;
    let image = display(req, &t);
    let mut img = layer_json(t.live.image(), &top);
    img["path"] = json!(image);
    let text = vec![format!("Reset {image}: its changes were discarded")];
    Ok(json!({ "document": { "image": img }, "text": text }))
}
