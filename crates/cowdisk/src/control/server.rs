//! The control socket inside `serve`: one thread per connection (at most
//! [`MAX_CONNECTIONS`]), lines bounded by [`super::MAX_REQUEST_LINE`], idle and stalled
//! peers timed out, so nothing a control client does costs the server unbounded memory
//! or threads, or disturbs the NBD exports.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::state::Control;
use super::{Failure, MAX_REQUEST_LINE};
use crate::error::{Error, Result};

/// Control connections served at once; more are answered `busy` and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// A control connection with no complete request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A reply the client does not take within this time closes its connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a control socket at `path` with mode 0600. A socket file nobody listens on (a
/// killed server's) is replaced; anything else that exists is refused.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(m) = path.symlink_metadata() {
        if !m.file_type().is_socket() {
            return Err(Error::invalid(path, "exists and is not a socket"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::invalid(
                path,
                "another server already listens on this control socket",
            ));
        }
        std::fs::remove_file(path).map_err(|e| Error::os(path, "remove stale socket", e))?;
    }
    crate::serve::process::bind_unix(path)
}

/// Makes a control socket at `path` (see [`bind`]) answering for `default` unless a
/// request names an export, until that export is removed.
pub fn open_socket(control: &Arc<Control>, path: &Path, default: Option<String>) -> Result<()> {
    let l = bind(path)?;
    spawn(l, control.clone(), default.clone());
    control.add_socket(default, path);
    Ok(())
}

/// Answers requests on `listener` in the background; `default` is the export a request
/// naming none addresses (the image the socket is named after).
pub fn spawn(listener: UnixListener, control: Arc<Control>, default: Option<String>) {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if default.as_deref().is_some_and(|n| !control.has_export(n)) {
                // Its export was removed (and the socket file with it).
                return;
            }
            let Ok(stream) = stream else { continue };
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            if active.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, SeqCst);
                let f = Failure::new("busy", "too many control connections; try again");
                let _ = write_reply(&stream, &reply(&Value::Null, Err(f)));
                continue;
            }
            let (control, mine, default) = (control.clone(), active.clone(), default.clone());
            let spawned = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    serve_connection(stream, &control, default.as_deref());
                    mine.fetch_sub(1, SeqCst);
                });
            if spawned.is_err() {
                // The closure (and its count) was dropped with the failed spawn.
                active.fetch_sub(1, SeqCst);
            }
        }
    });
}

enum Line {
    Request(Vec<u8>),
    TooLong,
    Closed,
}

/// Reads one line of at most `MAX_REQUEST_LINE` bytes without holding more than that.
fn read_line(r: &mut impl BufRead) -> Line {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok([]) => return Line::Closed,
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Line::Closed,
        };
        let (take, done) = match buf.iter().position(|&c| c == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REQUEST_LINE {
            return Line::TooLong;
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            return Line::Request(line);
        }
    }
}

fn serve_connection(stream: UnixStream, control: &Arc<Control>, default: Option<&str>) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(8192, read_half);
    loop {
        let out = match read_line(&mut reader) {
            Line::Closed => return,
            Line::TooLong => {
                let f = Failure::new(
                    "line_too_long",
                    format!("a request line may be at most {MAX_REQUEST_LINE} bytes"),
                );
                // The rest of the line cannot be told from the next request: close.
                let _ = write_reply(&stream, &reply(&Value::Null, Err(f)));
                return;
            }
            Line::Request(bytes) => answer(&bytes, control, default),
        };
        if write_reply(&stream, &out).is_err() {
            return;
        }
    }
}

/// Parses and runs one request line; the reply to send.
pub fn answer(bytes: &[u8], control: &Arc<Control>, default: Option<&str>) -> Value {
    let req: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return reply(&Value::Null, Err(Failure::new("bad_json", e.to_string()))),
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let Some(command) = req.get("command").and_then(Value::as_str) else {
        let f = Failure::new(
            "bad_request",
            "a request is an object with a \"command\" string",
        );
        return reply(&id, Err(f));
    };
    reply(&id, (control.run)(control, default, command, &req))
}

fn reply(id: &Value, res: std::result::Result<Value, Failure>) -> Value {
    match res {
        Ok(result) => json!({ "id": id, "ok": true, "result": result }),
        Err(f) => json!({
            "id": id,
            "ok": false,
            "error": { "code": f.code, "message": f.message },
        }),
    }
}

fn write_reply(mut stream: &UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec());
    line.push(b'\n');
    stream.write_all(&line)
}

/// Where a serve's control sockets go: `--control PATH`, or beside each image (whose
/// export is then the socket's default, given as `(image, export name)`).
pub fn socket_paths(
    images: &[(PathBuf, String)],
    explicit: Option<&Path>,
) -> Vec<(PathBuf, Option<String>)> {
    match explicit {
        Some(p) => vec![(p.to_path_buf(), None)],
        None => images
            .iter()
            .map(|(i, name)| (super::default_socket(i), Some(name.clone())))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded() {
        let mut r = std::io::Cursor::new(b"{\"a\":1}\nrest".to_vec());
        assert!(matches!(read_line(&mut r), Line::Request(l) if l == b"{\"a\":1}\n"));
        assert!(
            matches!(read_line(&mut r), Line::Closed),
            "no newline, then EOF"
        );
        let big = vec![b'x'; MAX_REQUEST_LINE + 10];
        assert!(matches!(
            read_line(&mut std::io::Cursor::new(big)),
            Line::TooLong
        ));
    }
}
