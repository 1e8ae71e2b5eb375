//! Smoke fuzzing (N15, until a cargo-fuzz target exists): random and mutated byte streams
//! against a live server must never panic a server thread and never stop it serving.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client::{go_payload, Client, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{self, cmd, opt};
use cowdisk_nbd::Limits;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn opt_bytes(rng: &mut StdRng, out: &mut Vec<u8>) {
    let option = *[
        opt::GO,
        opt::INFO,
        opt::LIST,
        opt::STRUCTURED_REPLY,
        opt::LIST_META_CONTEXT,
        opt::SET_META_CONTEXT,
        opt::STARTTLS,
        rng.gen(),
    ]
    .get(rng.gen_range(0..8))
    .unwrap_or(&0);
    let payload: Vec<u8> = match rng.gen_range(0..3) {
        0 => go_payload(b"", &[rng.gen(), 3]),
        1 => (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
        _ => client::meta_payload(b"", &["base:allocation", "qemu:"]),
    };
    out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    let len = if rng.gen_ratio(1, 10) {
        rng.gen()
    } else {
        payload.len() as u32
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
}

fn request_bytes(rng: &mut StdRng, out: &mut Vec<u8>) {
    let size = 8u64 << 20;
    let offset = *[
        0,
        size - 512,
        size,
        u64::MAX - 511,
        rng.gen_range(0..size),
        rng.gen(),
    ]
    .get(rng.gen_range(0..6))
    .unwrap_or(&0);
    let length = *[
        0,
        1,
        512,
        65536,
        33 << 20,
        rng.gen_range(0..1 << 20),
        rng.gen(),
    ]
    .get(rng.gen_range(0..7))
    .unwrap_or(&0);
    let kind = if rng.gen_ratio(1, 8) {
        rng.gen()
    } else {
        rng.gen_range(0..8)
    };
    let r = wire::Request {
        flags: if rng.gen_ratio(1, 4) { rng.gen() } else { 0 },
        kind,
        cookie: rng.gen(),
        offset,
        length,
    };
    out.extend_from_slice(&r.encode());
    if kind == cmd::WRITE && length <= 1 << 20 {
        out.extend((0..length).map(|i| i as u8));
    }
}

#[test]
fn random_streams_do_not_break_the_server() {
    std::panic::set_hook(Box::new(|_| {
        PANICS.fetch_add(1, Ordering::SeqCst);
    }));
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut limits = Limits::default();
    limits.handshake_timeout = Duration::from_secs(2);
    let srv = TestServer::start(vec![("d", Arc::new(MemBackend::new(8 << 20)))], limits);
    for _ in 0..150 {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        for _ in 0..rng.gen_range(0..4) {
            opt_bytes(&mut rng, &mut bytes);
        }
        if rng.gen_ratio(3, 4) {
            let go = if rng.gen() { opt::GO } else { opt::EXPORT_NAME };
            let payload = if go == opt::GO {
                go_payload(b"", &[])
            } else {
                vec![]
            };
            bytes.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
            bytes.extend_from_slice(&go.to_be_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&payload);
        }
        for _ in 0..rng.gen_range(0..20) {
            request_bytes(&mut rng, &mut bytes);
        }
        // Flip a few bytes anywhere.
        for _ in 0..rng.gen_range(0..3) {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] ^= rng.gen::<u8>();
        }
        let mut s = TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        let reader = {
            let mut s = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            })
        };
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        reader.join().unwrap();
    }
    let mut c = Client::connect(srv.addr);
    c.handshake("d", true, &[]);
    c.write(0, b"still here");
    assert_eq!(c.read(0, 10), b"still here");
    drop(c);
    srv.stop().unwrap();
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a server thread panicked (seed {seed})"
    );
}
