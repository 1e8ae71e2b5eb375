//! In-process transmission tests: a real server on loopback, a hand-written client, a MemBackend.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, HookedReads, Reply, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{chunk, cmd, cmd_flags, errno, state, tflags};
use cowdisk_nbd::{Backend, BackendErrorKind, Limits};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn mem() -> Arc<MemBackend> {
    Arc::new(MemBackend::new(SIZE))
}

fn server(b: Arc<MemBackend>) -> TestServer {
    TestServer::start(vec![("disk", b)], Limits::default())
}

fn commands_round_trip(structured: bool) {
    let b = mem();
    let srv = server(b.clone());
    let mut c = Client::connect(srv.addr);
    let ctx: &[&str] = if structured {
        &["base:allocation", "qemu:allocation-depth"]
    } else {
        &[]
    };
    c.handshake("disk", structured, ctx);
    let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
    c.write(1000, &data);
    assert_eq!(c.read(1000, data.len() as u32), data);
    assert_eq!(c.errno(cmd_flags::FUA, cmd::WRITE, 0, 3, b"abc"), 0);
    let before = b.flush_count();
    assert_eq!(c.errno(0, cmd::FLUSH, 0, 0, &[]), 0);
    assert_eq!(b.flush_count(), before + 1);
    assert_eq!(c.errno(0, cmd::CACHE, 0, 4096, &[]), 0);
    assert_eq!(
        c.errno(cmd_flags::FUA, cmd::READ, 0, 3, &[]),
        0,
        "FUA tolerated on READ"
    );
    // Zeroes: partial bytes are zeroed; whole blocks become holes unless NO_HOLE.
    assert_eq!(c.errno(0, cmd::WRITE_ZEROES, 1001, 2, &[]), 0);
    assert_eq!(&c.read(1000, 4)[..], &[data[0], 0, 0, data[3]]);
    assert_eq!(
        c.errno(cmd_flags::NO_HOLE, cmd::WRITE_ZEROES, 4096, 4096, &[]),
        0
    );
    assert_eq!(c.read(4096, 4096), vec![0u8; 4096]);
    let r = c.errno(cmd_flags::FAST_ZERO, cmd::WRITE_ZEROES, 8192 + 1, 10, &[]);
    assert_eq!(r, errno::ENOTSUP, "partial zero over data is not fast");
    assert_ne!(c.read(8193, 10), vec![0u8; 10], "nothing changed");
    assert_eq!(
        c.errno(cmd_flags::FAST_ZERO, cmd::WRITE_ZEROES, 8192, 4096, &[]),
        0
    );
    assert_eq!(c.errno(cmd_flags::FUA, cmd::TRIM, 12288, 4096, &[]), 0);
    if structured {
        // Layout now: [0,4K) data, [4K,8K) allocated zero, [8K,16K) hole, rest hole.
        let st = c.block_status(0, 0, 20480);
        assert_eq!(st[0].0, 1);
        let z = state::ZERO;
        let hz = state::HOLE | state::ZERO;
        assert_eq!(st[0].1, vec![(4096, 0), (4096, z), (12288, hz)]);
        assert_eq!(st[1].1, vec![(8192, 1), (12288, 0)]);
        let one = c.block_status(cmd_flags::REQ_ONE, 100, 20000);
        assert_eq!(one[0].1, vec![(3996, 0)]);
        assert_eq!(one[1].1, vec![(8092, 1)]);
        // DF read: one data chunk.
        let r = c.call(cmd_flags::DF, cmd::READ, 0, 3, &[]);
        assert!(matches!(
            &r[..],
            [Reply::Chunk {
                chunk_type: chunk::OFFSET_DATA,
                flags: 1,
                ..
            }]
        ));
    } else {
        assert_eq!(c.errno(0, cmd::BLOCK_STATUS, 0, 512, &[]), errno::EINVAL);
        assert_eq!(
            c.errno(cmd_flags::DF, cmd::READ, 0, 512, &[]),
            errno::EINVAL
        );
    }
    // DISC: the server closes after answering.
    c.send_request(0, cmd::DISC, 0, 0, &[]);
    assert!(c.is_closed());
}

#[test]
fn commands_simple_replies() {
    commands_round_trip(false);
}

#[test]
fn commands_structured_replies() {
    commands_round_trip(true);
}

fn error_codes(structured: bool) {
    let b = mem();
    let srv = server(b.clone());
    let mut c = Client::connect(srv.addr);
    c.handshake(
        "disk",
        structured,
        if structured {
            &["base:allocation"]
        } else {
            &[]
        },
    );
    let big = 33 * MIB as u32;
    let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
        (cmd::READ, 0, SIZE, 1, errno::EINVAL),
        (cmd::READ, 0, SIZE - 1, 2, errno::EINVAL),
        (cmd::READ, 0, u64::MAX, 2, errno::EINVAL),
        (cmd::READ, 0, 0, 0, errno::EINVAL),
        (cmd::READ, 0, 0, big, errno::EINVAL),
        (cmd::READ, 0x40, 0, 1, errno::EINVAL),
        (cmd::WRITE_ZEROES, 0, SIZE, 1, errno::ENOSPC),
        (cmd::WRITE_ZEROES, 0, u64::MAX - 10, 20, errno::ENOSPC),
        (cmd::WRITE_ZEROES, 0, 0, 0, errno::EINVAL),
        (cmd::WRITE_ZEROES, cmd_flags::DF, 0, 1, errno::EINVAL),
        (cmd::TRIM, 0, SIZE, 1, errno::EINVAL),
        (cmd::TRIM, 0, u64::MAX, 1, errno::EINVAL),
        (cmd::TRIM, 0, 0, 0, errno::EINVAL),
        (cmd::TRIM, cmd_flags::NO_HOLE, 0, 1, errno::EINVAL),
        (cmd::CACHE, 0, SIZE, 1, errno::EINVAL),
        (cmd::CACHE, 0, 0, 0, errno::EINVAL),
        (cmd::FLUSH, 0, 1, 0, errno::EINVAL),
        (cmd::FLUSH, 0, 0, 1, errno::EINVAL),
        (cmd::FLUSH, cmd_flags::REQ_ONE, 0, 0, errno::EINVAL),
        (cmd::BLOCK_STATUS, 0, SIZE, 1, errno::EINVAL),
        (cmd::BLOCK_STATUS, 0, 0, 0, errno::EINVAL),
        (8, 0, 0, 1, errno::EINVAL),
        (0xffff, 0, 0, 0, errno::EINVAL),
    ];
    for (kind, flags, offset, len, want) in cases {
        let got = c.errno(flags, kind, offset, len, &[]);
        assert_eq!(
            got, want,
            "cmd {kind} flags {flags:#x} off {offset} len {len}"
        );
    }
    // Writes: the payload is drained before the error, so framing survives.
    let payload = vec![0xaa; 4096];
    assert_eq!(
        c.errno(0, cmd::WRITE, SIZE - 100, 4096, &payload),
        errno::ENOSPC
    );
    assert_eq!(
        c.errno(0x8000, cmd::WRITE, 0, 4096, &payload),
        errno::EINVAL
    );
    assert_eq!(
        c.errno(0, cmd::WRITE, u64::MAX - 1, 4096, &payload),
        errno::ENOSPC
    );
    assert_eq!(c.errno(0, cmd::WRITE, 0, 0, &[]), errno::EINVAL);
    let huge = vec![0xbb; big as usize];
    assert_eq!(c.errno(0, cmd::WRITE, 0, big, &huge), errno::EINVAL);
    assert_eq!(
        c.read(0, 4096),
        vec![0u8; 4096],
        "rejected writes changed nothing"
    );
    // Backend failures map to their errno.
    for (kind, want) in [
        (BackendErrorKind::Io, errno::EIO),
        (BackendErrorKind::NoSpace, errno::ENOSPC),
        (BackendErrorKind::ReadOnly, errno::EPERM),
        (BackendErrorKind::Invalid, errno::EINVAL),
        (BackendErrorKind::NotSupported, errno::ENOTSUP),
    ] {
        b.fail_next(kind);
        assert_eq!(c.errno(0, cmd::READ, 0, 512, &[]), want);
        b.fail_next(kind);
        assert_eq!(c.errno(0, cmd::WRITE, 0, 3, b"xyz"), want);
        b.fail_next(kind);
        assert_eq!(c.errno(0, cmd::FLUSH, 0, 0, &[]), want);
        if structured {
            b.fail_next(kind);
            assert_eq!(c.errno(0, cmd::BLOCK_STATUS, 0, 512, &[]), want);
        }
    }
    // Read errors under SR are ERROR chunks, never simple replies.
    let r = c.call(0, cmd::READ, SIZE, 1, &[]);
    if structured {
        assert!(matches!(
            &r[..],
            [Reply::Chunk {
                chunk_type: chunk::ERROR,
                flags: 1,
                ..
            }]
        ));
    } else {
        assert!(matches!(
            &r[..],
            [Reply::Simple {
                error: errno::EINVAL,
                ..
            }]
        ));
    }
    c.write(0, b"alive");
    assert_eq!(c.read(0, 5), b"alive");
    // A write payload above the drain limit cannot be skipped: hang up.
    c.send_request(0, cmd::WRITE, 0, 65 * MIB as u32, &[]);
    assert!(c.is_closed());
    // The server still serves new connections.
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", false, &[]);
    assert_eq!(c.read(0, 5), b"alive");
}

#[test]
fn error_codes_simple() {
    error_codes(false);
}

#[test]
fn error_codes_structured() {
    error_codes(true);
}

#[test]
fn read_only_export() {
    let b = Arc::new(MemBackend::new(SIZE).read_only(true));
    b.fill(0, b"orig").unwrap();
    let srv = TestServer::start(
        vec![("ro", b.clone() as Arc<dyn Backend>)],
        Limits::default(),
    );
    let mut c = Client::connect(srv.addr);
    let (_, flags) = c.handshake("ro", true, &[]);
    assert_ne!(flags & tflags::READ_ONLY, 0);
    for f in [
        tflags::SEND_FUA,
        tflags::SEND_TRIM,
        tflags::SEND_WRITE_ZEROES,
        tflags::SEND_FAST_ZERO,
    ] {
        assert_eq!(flags & f, 0);
    }
    assert_eq!(c.errno(0, cmd::WRITE, 0, 4, b"evil"), errno::EPERM);
    assert_eq!(
        c.errno(cmd_flags::FUA, cmd::WRITE, SIZE, 4, b"evil"),
        errno::EPERM
    );
    assert_eq!(c.errno(0, cmd::TRIM, 0, 4096, &[]), errno::EPERM);
    assert_eq!(c.errno(0, cmd::WRITE_ZEROES, 0, 4096, &[]), errno::EPERM);
    assert_eq!(c.errno(0, cmd::FLUSH, 0, 0, &[]), 0);
    assert_eq!(c.read(0, 4), b"orig");
    drop(srv);
    assert_eq!(b.flush_count(), 0, "read-only exports are not flushed");
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let srv = TestServer::start(
        vec![(
            "d",
            Arc::new(HookedReads {
                inner: MemBackend::new(SIZE),
                hook: Box::new(|| std::thread::sleep(Duration::from_millis(300))),
                network: false,
            }),
        )],
        Limits::default(),
    );
    let mut c = Client::connect(srv.addr);
    c.handshake("d", true, &[]);
    let slow = c.send_request(0, cmd::READ, 0, 4096, &[]);
    let mut fast = Vec::new();
    for i in 1..20u64 {
        fast.push(c.send_request(0, cmd::WRITE, i * 4096, 4, b"fast"));
    }
    let order: Vec<u64> = (0..20).map(|_| c.read_reply().cookie()).collect();
    assert_eq!(
        *order.last().unwrap(),
        slow,
        "slow read answered last: {order:?}"
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=20).collect::<Vec<_>>());
    // DISC with a request in flight: it is still answered before the close.
    let slow = c.send_request(0, cmd::READ, 0, 4096, &[]);
    c.send_request(0, cmd::DISC, 0, 0, &[]);
    assert_eq!(c.read_reply().cookie(), slow);
    assert!(c.is_closed());
}

#[test]
fn bad_request_magic_disconnects_and_half_payload_is_not_applied() {
    let b = mem();
    let srv = server(b.clone());
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", false, &[]);
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.is_closed());
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", false, &[]);
    c.send_request(0, cmd::WRITE, 0, 8192, &[0xcc; 4096]);
    c.s.shutdown(std::net::Shutdown::Both).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", false, &[]);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
    assert_eq!(b.allocated_blocks(), 0);
}

#[test]
fn shutdown_answers_in_flight_and_flushes() {
    let b = Arc::new(HookedReads {
        inner: MemBackend::new(SIZE),
        hook: Box::new(|| std::thread::sleep(Duration::from_millis(300))),
        network: false,
    });
    let srv = TestServer::start(
        vec![("d", b.clone() as Arc<dyn Backend>)],
        Limits::default(),
    );
    let mut c = Client::connect(srv.addr);
    c.handshake("d", false, &[]);
    let mut idle = Client::connect(srv.addr);
    idle.handshake("d", false, &[]);
    c.write(4096, b"data");
    let slow = c.send_request(0, cmd::READ, 0, 4096, &[]);
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    srv.stop().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "waited for the slow read"
    );
    assert_eq!(c.read_reply().cookie(), slow);
    assert!(c.is_closed());
    assert!(idle.is_closed());
    assert!(b.inner.flush_count() >= 1);
}

#[test]
fn random_io_matches_shadow_across_connections() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = 4 * MIB;
    let srv = TestServer::start(
        vec![("d", Arc::new(MemBackend::new(size)))],
        Limits::default(),
    );
    let mut conns: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(srv.addr);
            c.handshake("d", true, &[]);
            c
        })
        .collect();
    let mut shadow = vec![0u8; size as usize];
    for _ in 0..300 {
        let c = &mut conns[rng.gen_range(0..3)];
        let off = rng.gen_range(0..size - 1);
        let len = rng.gen_range(1..=(size - off).min(70_000)) as u32;
        let (o, l) = (off as usize, len as usize);
        match rng.gen_range(0..4) {
            0 => {
                let d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                c.write(off, &d);
                shadow[o..o + l].copy_from_slice(&d);
            }
            1 => {
                assert_eq!(c.errno(0, cmd::WRITE_ZEROES, off, len, &[]), 0);
                shadow[o..o + l].fill(0);
            }
            _ => assert_eq!(c.read(off, len), &shadow[o..o + l], "seed {seed}"),
        }
    }
}

#[test]
fn writes_staged_or_passed_through_land_whole() {
    // No write budget (every byte passed through), too little to stage 5 MiB, plenty.
    for budget in [0, 3 * MIB as usize, 64 * MIB as usize] {
        let b = mem();
        let mut limits = Limits::default();
        limits.max_total_write_bytes = budget;
        let srv = TestServer::start(vec![("disk", b.clone())], limits);
        let mut c = Client::connect(srv.addr);
        c.handshake("disk", false, &[]);
        let data: Vec<u8> = (0..5 * MIB + 12345).map(|i| (i % 253) as u8).collect();
        c.write(777, &data);
        assert_eq!(c.read(777, data.len() as u32), data, "budget {budget}");
        // A piece that fails fails the request; the rest is read, so the stream stays in sync.
        b.fail_next(BackendErrorKind::NoSpace);
        let len = data.len() as u32;
        assert_eq!(c.errno(0, cmd::WRITE, 0, len, &data), errno::ENOSPC);
        c.write(0, &[1u8; 4096]);
        assert_eq!(c.read(0, 4096), vec![1u8; 4096]);
        drop(c);
        if budget == 64 * MIB as usize {
            // Staged whole: a large payload cut short is not applied either.
            let mut c = Client::connect(srv.addr);
            c.handshake("disk", false, &[]);
            c.send_request(0, cmd::WRITE, 32 * MIB, 8 * MIB as u32, &data[..4 << 20]);
            c.s.shutdown(std::net::Shutdown::Both).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let mut c = Client::connect(srv.addr);
            c.handshake("disk", false, &[]);
            assert_eq!(c.read(32 * MIB, 4096), vec![0u8; 4096]);
        }
        srv.stop().expect("clean stop");
    }
}

#[test]
fn block_status_of_a_fragmented_range_covers_a_bounded_part() {
    // Every other 4 KiB block allocated over 48 MiB: one extent per block.
    let b = mem();
    for i in (0..48 * MIB / 4096).step_by(2) {
        b.fill(i * 4096, &[1u8; 4096]).unwrap();
    }
    let srv = server(b);
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", true, &["base:allocation"]);
    let mut offset = 0u64;
    let mut replies = 0;
    while offset < 48 * MIB {
        let st = c.block_status(0, offset, (48 * MIB - offset) as u32);
        let covered: u64 = st[0].1.iter().map(|&(l, _)| u64::from(l)).sum();
        // Bounded: at most 4096 blocks per reply, then the client asks again.
        assert!(covered > 0 && covered <= 4096 * 4096, "covered {covered}");
        assert_eq!(
            st[0].1[0].1,
            if (offset / 4096).is_multiple_of(2) {
                0
            } else {
                state::HOLE | state::ZERO
            }
        );
        offset += covered;
        replies += 1;
    }
    assert_eq!((offset, replies), (48 * MIB, 3));
}
