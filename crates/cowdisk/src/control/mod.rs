//! The control interface of `cowdisk serve`: a unix socket speaking JSON lines, one
//! request and one reply per line (protocol: `docs/control.md`). [`server`] answers it
//! inside `serve`; [`request`] is the client the CLI uses to route commands on a served
//! image through its server.

pub mod exports;
pub mod handlers;
pub mod server;
pub mod state;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use cowdisk_core::folder_of;

/// Longest request or reply line accepted (bytes, newline included). Replies with a
/// `map` of a very fragmented disk can be long, requests never are.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Longest reply the client reads.
const MAX_REPLY_LINE: u64 = 1 << 30;

/// The control socket `serve` creates for `image` unless told otherwise: beside it,
/// hidden, so that any command given the image's path finds its server.
pub fn default_socket(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    folder_of(image).join(format!(".{name}.control"))
}

/// An error reply: a stable machine-readable `code` and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// One of the codes listed in `docs/control.md`.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// Connects to the server behind `socket`; `None` if nothing listens there (no socket,
/// or one left by a killed server).
pub fn connect(socket: &Path) -> Option<UnixStream> {
    let s = UnixStream::connect(socket).ok()?;
    // A server that stops answering must not hang the CLI for ever; a snapshot of a
    // large top can take a while, hence the generous limit.
    let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    Some(s)
}

/// Sends one request and returns its `result`, or the server's error as an [`Error`]
/// about `subject`.
pub fn request(stream: &UnixStream, subject: &Path, req: &Value) -> Result<Value> {
    let io = |e| Error::os(subject, "control socket", e);
    let mut line = serde_json::to_string(req).unwrap_or_else(|_| "null".into());
    line.push('\n');
    (&*stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_REPLY_LINE))
        .read_line(&mut reply)
        .map_err(io)?;
    let v: Value = serde_json::from_str(&reply)
        .map_err(|e| Error::invalid(subject, format!("bad reply from the server: {e}")))?;
    if v["ok"] == json!(true) {
        return Ok(v["result"].clone());
    }
    let msg = v["error"]["message"].as_str().unwrap_or("request failed");
    Err(Error::invalid(subject, format!("server: {msg}")))
}
