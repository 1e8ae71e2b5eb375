//! Serves a sparse in-memory disk over NBD, for interoperability tests with real clients.
//!
//! ```text
//! memserve SIZE [--listen ADDR | --socket PATH] [--name NAME] [--read-only] [--block-size N]
//! ```
//! SIZE accepts K/M/G suffixes. Prints `listening on ADDR` (or `listening on unix:PATH`) once
//! ready; SIGTERM/SIGINT stop it cleanly (exit 0).

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::Server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut size = None;
    let mut listen = None;
    let mut socket: Option<PathBuf> = None;
    let mut name = String::from("mem");
    let mut read_only = false;
    let mut block_size = 4096;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--socket" => socket = args.next().map(PathBuf::from),
            "--name" => name = args.next().ok_or("--name needs a value")?,
            "--read-only" => read_only = true,
            "--block-size" => block_size = args.next().ok_or("missing value")?.parse()?,
            s => size = Some(parse_size(s).ok_or_else(|| format!("bad size {s:?}"))?),
        }
    }
    let size = size.ok_or("usage: memserve SIZE [--listen ADDR | --socket PATH]")?;
    let backend = MemBackend::new(size)
        .with_block_size(block_size)
        .read_only(read_only);
    let mut b = Server::builder().export(name, Arc::new(backend));
    let shown = if let Some(path) = &socket {
        b = b.unix_listener(UnixListener::bind(path)?);
        format!("unix:{}", path.display())
    } else {
        let l = TcpListener::bind(listen.as_deref().unwrap_or("127.0.0.1:0"))?;
        let addr = l.local_addr()?;
        b = b.tcp_listener(l);
        addr.to_string()
    };
    let server = b.build()?;
    let stop = server.shutdown_handle();
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.request();
        }
    });
    println!("listening on {shown}");
    server.serve()?;
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
