//! In-process protocol tests: a real server on loopback, a hand-written client, a MemBackend.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{be16, be32, be64, go_payload, meta_payload, Client, Reply, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{chunk, cmd, cmd_flags, errno, info, opt, rep, state, tflags};
use cowdisk_nbd::{Backend, BackendErrorKind, Limits};

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

/// Delays reads at offset 0 so later requests overtake them.
struct Slow(MemBackend);

impl Backend for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), cowdisk_nbd::BackendError> {
        if offset == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        self.0.read(offset, buf)
    }
    fn write(&self, o: u64, d: &[u8], f: bool) -> Result<(), cowdisk_nbd::BackendError> {
        self.0.write(o, d, f)
    }
    fn flush(&self) -> Result<(), cowdisk_nbd::BackendError> {
        self.0.flush()
    }
    fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), cowdisk_nbd::BackendError> {
        self.0.trim(o, l, f)
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        f: cowdisk_nbd::ZeroFlags,
    ) -> Result<(), cowdisk_nbd::BackendError> {
        self.0.write_zeroes(o, l, f)
    }
    fn block_status(
        &self,
        o: u64,
        l: u64,
        out: &mut Vec<cowdisk_nbd::Extent>,
    ) -> Result<(), cowdisk_nbd::BackendError> {
        self.0.block_status(o, l, out)
    }
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let srv = TestServer::start(
        vec![("d", Arc::new(Slow(MemBackend::new(SIZE))))],
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
fn connection_cap_handshake_timeout_and_option_limit() {
    let mut limits = Limits::default();
    limits.max_connections = 2;
    limits.handshake_timeout = Duration::from_millis(300);
    limits.max_options = 5;
    let srv = server_with(limits);
    let mut a = Client::connect(srv.addr);
    a.handshake("disk", false, &[]);
    let _b = Client::connect(srv.addr);
    // Third connection: closed without a greeting.
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    assert!(s.read_exact(&mut g).is_err());
    // _b stalls in negotiation and is dropped by the timeout, freeing a slot.
    std::thread::sleep(Duration::from_millis(600));
    let mut c = Client::connect(srv.addr);
    for _ in 0..5 {
        c.opt(0x1234, &[]);
    }
    c.send_opt(0x1234, &[]);
    assert!(c.is_closed(), "option limit");
    assert_eq!(a.read(0, 1), vec![0], "transmission has no timeout");
}

fn server_with(limits: Limits) -> TestServer {
    TestServer::start(vec![("disk", mem() as Arc<dyn Backend>)], limits)
}

#[test]
fn shutdown_answers_in_flight_and_flushes() {
    let inner = MemBackend::new(SIZE);
    let b = Arc::new(Slow(inner));
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
    assert!(b.0.flush_count() >= 1);
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
