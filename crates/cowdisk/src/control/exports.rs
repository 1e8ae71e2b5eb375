//! `add_export` and `remove_export`: changing what a running server exports.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cowdisk_core::{Access, Disk};
use cowdisk_nbd::RemoveClients;
use serde_json::{json, Value};

use super::server::open_socket;
use super::state::{Control, Target};
use super::Failure;
use crate::serve::adapter::DiskBackend;
use crate::serve::live::LiveDisk;

/// Longest wait for an export's clients to leave (`"clients": "wait"`).
const MAX_WAIT_SECS: u64 = 3600;

/// `add_export`: `image` (absolute path), optional `name` (default: its file name) and
/// `read_only` (default false; a sealed snapshot must be read-only).
pub fn add(control: &Arc<Control>, req: &Value) -> Result<Value, Failure> {
    nbd_exports(control)?;
    let image = req
        .get("image")
        .and_then(Value::as_str)
        .map(Path::new)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| Failure::new("bad_request", "\"image\" (an absolute path) is required"))?;
    let read_only = match req.get("read_only") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Failure::new("bad_request", "\"read_only\" must be true or false"))?,
    };
    let name = match req.get("name") {
        None => image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| Failure::new("bad_request", "\"name\" must be a string"))?
            .to_string(),
    };
    let access = if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let opts = crate::open_options()
        .access(access)
        .cache(control.cache.clone());
    let disk = Disk::open(image, &opts)
        .map_err(|e| Failure::new("failed", format!("{}: {e}", image.display())))?;
    // As for the images serve was started with: the journal is written out now, not by
    // the first flush that would use it.
    disk.prepare_journal();
    let live = Arc::new(LiveDisk::new(
        disk,
        image.to_path_buf(),
        control.cache.clone(),
    ));
    nbd_exports(control)?
        .add(&name, Arc::new(DiskBackend::live(live.clone())))
        .map_err(|e| Failure::new("failed", e.to_string()))?;
    control.push(Target {
        name: name.clone(),
        live,
    });
    // Like the images `serve` was given, the image gets its control socket beside it
    // (unless --control chose one socket for all), so commands on it find this server.
    if !control.single_socket() {
        let sock = super::default_socket(image);
        if let Err(e) = open_socket(control, &sock, Some(name.clone())) {
            eprintln!("cowdisk: warning: no control socket: {e}");
        }
    }
    Ok(json!({ "name": name, "read_only": read_only }))
}

/// The NBD server's export table, which a ublk device's server does not have.
fn nbd_exports(control: &Control) -> Result<&cowdisk_nbd::ExportsHandle, Failure> {
    control.handle.as_ref().ok_or_else(|| {
        Failure::new(
            "failed",
            "this server attaches a ublk device (serve --ublk): it has no NBD exports to add or remove",
        )
    })
}

/// `remove_export`: `export` (its name); `clients`: `"wait"` (default, up to
/// `timeout_secs`, default 30) or `"close"`.
pub fn remove(control: &Control, req: &Value) -> Result<Value, Failure> {
    let name = req
        .get("export")
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::new("bad_request", "\"export\" (a name) is required"))?;
    let timeout = match req.get("timeout_secs") {
        None => 30,
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= MAX_WAIT_SECS)
            .ok_or_else(|| Failure::new("bad_request", "\"timeout_secs\" must be 0 to 3600"))?,
    };
    let clients = match req.get("clients").map(|v| v.as_str()) {
        None | Some(Some("wait")) => RemoveClients::Wait(Duration::from_secs(timeout)),
        Some(Some("close")) => RemoveClients::Close,
        Some(_) => {
            return Err(Failure::new(
                "bad_request",
                "\"clients\" must be \"wait\" or \"close\"",
            ))
        }
    };
    let target = control
        .list()
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Failure::new("unknown_export", format!("no export named {name:?}")))?;
    let res = nbd_exports(control)?.remove(name, clients);
    // Gone for new clients either way: the control interface follows the server.
    control.drop_export(name);
    let (_, closed) = res.map_err(|e| Failure::new("failed", e.to_string()))?;
    // Its clients are gone and it is flushed; its journal goes too, so the image alone
    // holds its writes wherever it is taken next.
    target
        .live
        .retire_journal()
        .map_err(|e| Failure::new("failed", e.to_string()))?;
    Ok(json!({ "name": name, "closed_connections": closed }))
}
