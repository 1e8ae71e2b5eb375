//! `serve --metrics HOST:PORT`: the export counters in Prometheus text format over a
//! minimal HTTP/1.1 endpoint (`GET /metrics`). One request at a time, bounded and timed
//! out, so a scraper (or anything else connecting) cannot cost the server memory or
//! threads; off unless asked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::control::state::Control;
use crate::error::{Error, Result};

/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and answers scrapes in the background; returns the bound address.
pub fn start(addr: &str, control: Arc<Control>) -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind(addr).map_err(|e| Error::os(Path::new(addr), "bind metrics", e))?;
    let local = l
        .local_addr()
        .map_err(|e| Error::os(Path::new(addr), "local address", e))?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let _ = answer(s, &control);
        }
    });
    Ok(local)
}

fn answer(mut s: TcpStream, control: &Control) -> std::io::Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&c| c == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
        ("200 OK", render(control))
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes())
}

/// Every export's counters, Prometheus text format.
pub fn render(control: &Control) -> String {
    let list = control.list();
    let exports: Vec<(&str, &super::stats::Stats)> = list
        .iter()
        .map(|t| (t.name.as_str(), &t.live.stats))
        .collect();
    let copy_ups = list.iter().map(|t| t.live.copy_ups()).collect();
    let journaled = list.iter().map(|t| t.live.journal_flushes()).collect();
    super::stats::prometheus(
        &exports,
        &[
            ("copy_ups", "blocks copied up from lower layers", copy_ups),
            (
                "journal_flushes",
                "flushes made durable in the flush journal",
                journaled,
            ),
        ],
    )
}
