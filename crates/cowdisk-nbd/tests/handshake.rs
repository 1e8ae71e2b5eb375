//! In-process negotiation tests: a real server on loopback, a hand-written client, a MemBackend.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{be16, be32, be64, go_payload, meta_payload, Client, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{cmd, errno, info, opt, rep, tflags};
use cowdisk_nbd::{Backend, Limits};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn mem() -> Arc<MemBackend> {
    Arc::new(MemBackend::new(SIZE))
}

fn server(b: Arc<MemBackend>) -> TestServer {
    TestServer::start(vec![("disk", b)], Limits::default())
}

#[test]
fn go_with_info_requests() {
    let srv = TestServer::start_with(vec![], Limits::default(), |b| {
        b.export_with_description("disk", Some("a test disk"), mem())
    });
    let mut c = Client::connect(srv.addr);
    let r = c.opt(
        opt::INFO,
        &go_payload(
            b"disk",
            &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION, 77],
        ),
    );
    assert_eq!(r.len(), 5, "{r:?}");
    assert_eq!(r[0].reply_type, rep::INFO);
    assert_eq!(be16(&r[0].payload), info::EXPORT);
    assert_eq!(be64(&r[0].payload[2..]), SIZE);
    let flags = be16(&r[0].payload[10..]);
    assert_eq!(flags & tflags::READ_ONLY, 0);
    for f in [
        tflags::HAS_FLAGS,
        tflags::SEND_FLUSH,
        tflags::SEND_FUA,
        tflags::SEND_TRIM,
        tflags::SEND_WRITE_ZEROES,
        tflags::SEND_CACHE,
        tflags::SEND_FAST_ZERO,
        tflags::CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }
    assert_eq!(
        flags & tflags::SEND_DF,
        0,
        "DF only with structured replies"
    );
    let bs = &r[1].payload;
    assert_eq!(be16(bs), info::BLOCK_SIZE);
    assert_eq!(
        (be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])),
        (512, 4096, 32 << 20)
    );
    assert_eq!(&r[2].payload[2..], b"disk");
    assert_eq!(&r[3].payload[2..], b"a test disk");
    assert_eq!(r[4].reply_type, rep::ACK);
    // INFO leaves negotiation open: GO still works and transmission starts.
    let (size, flags) = c.handshake("disk", true, &[]);
    assert_eq!(size, SIZE);
    assert_ne!(flags & tflags::SEND_DF, 0);
    assert_eq!(c.read(0, 512), vec![0u8; 512]);
}

#[test]
fn block_size_minimum_is_one_for_odd_sizes() {
    let srv = TestServer::start(
        vec![("odd", Arc::new(MemBackend::new(1000)))],
        Limits::default(),
    );
    let mut c = Client::connect(srv.addr);
    let r = c.opt(opt::GO, &go_payload(b"", &[info::BLOCK_SIZE]));
    assert_eq!(be32(&r[1].payload[2..]), 1);
    assert_eq!(c.read(999, 1), vec![0]);
}

#[test]
fn export_name_with_and_without_zeroes() {
    let b = mem();
    b.fill(0, b"hello").unwrap();
    let srv = server(b);
    for no_zeroes in [true, false] {
        let mut c = Client::connect_raw(srv.addr);
        c.s.write_all(&(if no_zeroes { 3u32 } else { 1 }).to_be_bytes())
            .unwrap();
        c.send_opt(opt::EXPORT_NAME, b"disk");
        let mut h = [0u8; 10];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), SIZE);
        assert_ne!(be16(&h[8..]) & tflags::HAS_FLAGS, 0);
        if !no_zeroes {
            let mut z = [1u8; 124];
            c.s.read_exact(&mut z).unwrap();
            assert_eq!(z, [0u8; 124]);
        }
        assert_eq!(c.read(0, 5), b"hello");
    }
    // Unknown export with EXPORT_NAME: the only possible answer is a hang-up.
    let mut c = Client::connect(srv.addr);
    c.send_opt(opt::EXPORT_NAME, b"nope");
    assert!(c.is_closed());
}

#[test]
fn list_abort_and_default_export() {
    let srv = TestServer::start(vec![("a", mem()), ("b", mem())], Limits::default());
    let mut c = Client::connect(srv.addr);
    let r = c.opt(opt::LIST, &[]);
    let names: Vec<&[u8]> = r
        .iter()
        .filter(|r| r.reply_type == rep::SERVER)
        .map(|r| &r.payload[4..4 + be32(&r.payload) as usize])
        .collect();
    assert_eq!(names, vec![&b"a"[..], b"b"]);
    assert_eq!(r.last().unwrap().reply_type, rep::ACK);
    assert_eq!(c.opt(opt::LIST, b"x")[0].reply_type, rep::ERR_INVALID);
    // Two exports, no designated default: the empty name is unknown.
    assert_eq!(
        c.opt(opt::GO, &go_payload(b"", &[]))[0].reply_type,
        rep::ERR_UNKNOWN
    );
    assert_eq!(c.opt(opt::ABORT, &[])[0].reply_type, rep::ACK);
    assert!(c.is_closed());
    drop(srv);

    let srv = TestServer::start_with(vec![("a", mem()), ("b", mem())], Limits::default(), |b| {
        b.default_export("b")
    });
    let mut c = Client::connect(srv.addr);
    assert_eq!(c.handshake("", false, &[]).0, SIZE);
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let srv = server(mem());
    let mut c = Client::connect(srv.addr);
    for o in [0x0765_4321, opt::STARTTLS, opt::EXTENDED_HEADERS, 4] {
        let r = c.opt(o, &[9u8; 100]);
        assert_eq!(r[0].reply_type, rep::ERR_UNSUP, "option {o}");
    }
    // Unknown export and malformed GO: errors, still negotiating.
    assert_eq!(
        c.opt(opt::GO, &go_payload(b"nope", &[]))[0].reply_type,
        rep::ERR_UNKNOWN
    );
    let mut bad = go_payload(b"disk", &[]);
    bad.push(0);
    assert_eq!(c.opt(opt::GO, &bad)[0].reply_type, rep::ERR_INVALID);
    assert_eq!(c.opt(opt::GO, &[0, 0])[0].reply_type, rep::ERR_INVALID);
    c.handshake("disk", true, &[]);
    c.write(4096, b"still works");
    assert_eq!(c.read(4096, 11), b"still works");
}

#[test]
fn bad_client_flags_and_bad_option_magic_close() {
    let srv = server(mem());
    for flags in [0u32, 1 | 4, 0xffff_ffff] {
        let mut c = Client::connect_raw(srv.addr);
        c.s.write_all(&flags.to_be_bytes()).unwrap();
        assert!(c.is_closed(), "flags {flags:#x}");
    }
    let mut c = Client::connect(srv.addr);
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.is_closed());
}

#[test]
fn huge_option_length_disconnects_at_once() {
    let srv = server(mem());
    let mut c = Client::connect(srv.addr);
    let mut m = cowdisk_nbd::wire::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    // The client stalls; the server must not wait for (or allocate) 4 GiB.
    let t = Instant::now();
    assert!(c.is_closed());
    assert!(t.elapsed() < Duration::from_secs(2));
    // Same through EXPORT_NAME, whose bound is the export-name limit.
    let mut c = Client::connect(srv.addr);
    c.send_opt(opt::EXPORT_NAME, &vec![b'a'; 4097]);
    assert!(c.is_closed());
}

#[test]
fn over_long_export_name_in_go() {
    let srv = server(mem());
    let mut c = Client::connect(srv.addr);
    let r = c.opt(opt::GO, &go_payload(&[b'a'; 4097], &[]));
    assert_eq!(r[0].reply_type, rep::ERR_TOO_BIG);
    c.handshake("disk", false, &[]);
    assert_eq!(c.read(0, 1), vec![0]);
}

#[test]
fn structured_reply_and_meta_context_negotiation() {
    let srv = server(mem());
    let mut c = Client::connect(srv.addr);
    let r = c.opt(
        opt::SET_META_CONTEXT,
        &meta_payload(b"disk", &["base:allocation"]),
    );
    assert_eq!(r[0].reply_type, rep::ERR_INVALID, "SET needs SR first");
    assert_eq!(
        c.opt(opt::STRUCTURED_REPLY, &[1])[0].reply_type,
        rep::ERR_INVALID
    );
    assert_eq!(c.opt(opt::STRUCTURED_REPLY, &[])[0].reply_type, rep::ACK);
    assert_eq!(
        c.opt(opt::STRUCTURED_REPLY, &[])[0].reply_type,
        rep::ERR_INVALID
    );
    let names = |r: &[client::OptReply]| -> Vec<(u32, String)> {
        r.iter()
            .filter(|r| r.reply_type == rep::META_CONTEXT)
            .map(|r| {
                (
                    be32(&r.payload),
                    String::from_utf8_lossy(&r.payload[4..]).into(),
                )
            })
            .collect()
    };
    let all = names(&c.opt(opt::LIST_META_CONTEXT, &meta_payload(b"disk", &[])));
    assert_eq!(
        all,
        vec![
            (0, "base:allocation".into()),
            (0, "qemu:allocation-depth".into())
        ]
    );
    let base = names(&c.opt(
        opt::LIST_META_CONTEXT,
        &meta_payload(b"disk", &["base:", "x:y"]),
    ));
    assert_eq!(base, vec![(0, "base:allocation".into())]);
    let r = c.opt(opt::LIST_META_CONTEXT, &meta_payload(b"nope", &[]));
    assert_eq!(r[0].reply_type, rep::ERR_UNKNOWN);
    let mut bad = meta_payload(b"disk", &["base:allocation"]);
    bad.pop();
    assert_eq!(
        c.opt(opt::SET_META_CONTEXT, &bad)[0].reply_type,
        rep::ERR_INVALID
    );
    // SET ignores namespace-only and unknown queries.
    let set = names(&c.opt(
        opt::SET_META_CONTEXT,
        &meta_payload(
            b"disk",
            &[
                "base:",
                "qemu:allocation-depth",
                "base:allocation",
                "foo:bar",
            ],
        ),
    ));
    assert_eq!(set.len(), 2);
    assert!(set.iter().all(|(id, _)| *id != 0));
    let r = c.opt(opt::GO, &go_payload(b"disk", &[]));
    assert_eq!(r.last().unwrap().reply_type, rep::ACK);
    c.structured = true;
    let st = c.block_status(0, 0, 8192);
    assert_eq!(st.len(), 2);
    let ids: Vec<u32> = st.iter().map(|s| s.0).collect();
    let expect: Vec<u32> = set.iter().map(|s| s.0).collect();
    assert_eq!(ids, expect);
}

#[test]
fn contexts_are_dropped_when_go_names_another_export() {
    let srv = TestServer::start(vec![("a", mem()), ("b", mem())], Limits::default());
    let mut c = Client::connect(srv.addr);
    c.opt(opt::STRUCTURED_REPLY, &[]);
    c.opt(
        opt::SET_META_CONTEXT,
        &meta_payload(b"a", &["base:allocation"]),
    );
    c.structured = true;
    c.handshake("b", false, &[]);
    assert_eq!(c.errno(0, cmd::BLOCK_STATUS, 0, 512, &[]), errno::EINVAL);
}

#[test]
fn connection_cap_handshake_timeout_and_option_limit() {
    let mut limits = Limits::default();
    limits.max_connections = 2;
    limits.handshake_timeout = Duration::from_millis(300);
    limits.max_options = 5;
    let srv = server_with(limits);
    let mut a = Client::connect(srv.addr);
    a.handshake("disk", false, &[]);
    let mut b = Client::connect(srv.addr);
    // Third connection: the table is full, so the connection idle the longest (a) is closed
    // to make room; the cap holds.
    let mut third = Client::connect(srv.addr);
    third.handshake("disk", false, &[]);
    assert!(a.is_closed(), "the longest-idle connection was not closed");
    // b stalls in negotiation and is dropped by the timeout, freeing a slot.
    std::thread::sleep(Duration::from_millis(600));
    assert!(b.is_closed(), "handshake timeout");
    let mut c = Client::connect(srv.addr);
    for _ in 0..5 {
        c.opt(0x1234, &[]);
    }
    c.send_opt(0x1234, &[]);
    assert!(c.is_closed(), "option limit");
    assert_eq!(third.read(0, 1), vec![0], "transmission has no timeout");
}

fn server_with(limits: Limits) -> TestServer {
    TestServer::start(vec![("disk", mem() as Arc<dyn Backend>)], limits)
}

#[test]
fn unix_socket_listener() {
    let dir = std::env::temp_dir().join(format!("cowdisk-nbd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = cowdisk_nbd::Server::builder()
        .export("u", mem())
        .unix_listener(l)
        .build()
        .unwrap();
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve());
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut m = cowdisk_nbd::wire::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&1u32.to_be_bytes());
    m.push(b'u');
    s.write_all(&m).unwrap();
    let mut h = [0u8; 10];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h), SIZE);
    stop.shutdown();
    t.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn builder_rejects_bad_configs() {
    assert!(cowdisk_nbd::Server::builder().build().is_err());
    let dup = cowdisk_nbd::Server::builder()
        .export("a", mem())
        .export("a", mem())
        .build();
    assert!(dup.is_err());
    let long = cowdisk_nbd::Server::builder()
        .export("x".repeat(4097), mem())
        .build();
    assert!(long.is_err());
    let def = cowdisk_nbd::Server::builder()
        .export("a", mem())
        .default_export("b")
        .build();
    assert!(def.is_err());
}
