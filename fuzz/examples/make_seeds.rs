//! Writes the seed corpora into `fuzz/seeds/<target>/`: small layer files made by the
//! engine itself, and client sessions built from the NBD crate's wire codec. Run with
//! `cargo run --release --example make_seeds` (from `fuzz/`) after a format change.

use std::path::{Path, PathBuf};

use cowdisk_core::{create_child, create_image, Disk, OpenOptions, WriteFlags};
use cowdisk_fuzz::image::{encode, FIX_ALL};
use cowdisk_nbd::wire::{self, cmd, cmd_flags, opt, Request};

fn main() {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let tmp = std::env::temp_dir().join(format!("cowdisk-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp folder");
    let (base, mid, top) = layers(&tmp);
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("seed folder");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    for (name, img) in [("sealed", &base), ("child", &mid), ("writable", &top)] {
        // Slot A without its trailing zeros; flag 1 re-seals the CRC after padding.
        let slot = &img[..4096];
        let end = slot[..4092]
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        put("header", name, &[&[1u8][..], &slot[..end]].concat());
    }
    // F2 opens one layer alone: a parentless sealed and a parentless writable one.
    let alone = standalone(&tmp);
    put("layer", "sealed", &encode(FIX_ALL, &base));
    put("layer", "writable", &encode(FIX_ALL | 0x80, &alone));
    put("layer", "raw", &encode(0, &alone));
    let chain2 = [
        &[1u8][..],
        &encode(FIX_ALL, &base),
        &encode(FIX_ALL | 0x80, &mid),
    ]
    .concat();
    put("chain", "two", &chain2);
    let chain3 = [
        &[2u8][..],
        &encode(FIX_ALL, &base),
        &encode(FIX_ALL, &mid),
        &encode(FIX_ALL | 0x80, &top),
    ]
    .concat();
    put("chain", "three", &chain3);
    put(
        "chain",
        "one",
        &[&[0u8][..], &encode(FIX_ALL, &base)].concat(),
    );
    put("nbd", "go_structured", &session(true));
    put("nbd", "export_name", &session(false));
    put("nbd", "list_info_abort", &list_info_abort());
    for (name, bytes) in model_seeds() {
        put("model", name, &bytes);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A three-layer chain of 4 blocks of 4 KiB: a sealed base with two short writes, a
/// sealed middle with a copy-up and a whiteout, a writable top with one write.
fn layers(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (b, m, t) = (dir.join("b.cow"), dir.join("m.cow"), dir.join("t.cow"));
    let w = WriteFlags::default();
    create_image(&b, 16384, 4096).expect("create");
    let d = Disk::open(&b, &OpenOptions::new()).expect("open");
    d.write(0, b"base block zero", w).expect("write");
    d.write(8192 + 100, b"base block two", w).expect("write");
    drop(d);
    create_child(&m, &b).expect("child");
    let d = Disk::open(&m, &OpenOptions::new()).expect("open");
    d.write(8, b"middle", w).expect("write");
    d.discard(8192, 4096, w).expect("discard");
    drop(d);
    create_child(&t, &m).expect("child");
    let d = Disk::open(&t, &OpenOptions::new()).expect("open");
    d.write(12288, b"top", w).expect("write");
    drop(d);
    let r = |p: &Path| std::fs::read(p).expect("read");
    (r(&b), r(&m), r(&t))
}

/// A writable layer of 5 blocks (the last one short) with one write.
fn standalone(dir: &Path) -> Vec<u8> {
    let p = dir.join("s.cow");
    create_image(&p, 4 * 4096 + 512, 4096).expect("create");
    let d = Disk::open(&p, &OpenOptions::new()).expect("open");
    d.write(4096 * 4, b"short tail", WriteFlags::default())
        .expect("write");
    drop(d);
    std::fs::read(&p).expect("read")
}

fn option(out: &mut Vec<u8>, code: u32, payload: &[u8]) {
    wire::put_u64(out, wire::IHAVEOPT);
    wire::put_u32(out, code);
    wire::put_u32(out, payload.len() as u32);
    out.extend_from_slice(payload);
}

fn request(out: &mut Vec<u8>, kind: u16, flags: u16, offset: u64, length: u32) {
    let cookie = out.len() as u64;
    let r = Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    };
    out.extend_from_slice(&r.encode());
}

/// A client session: handshake, then one request of each kind, then DISC.
fn session(go: bool) -> Vec<u8> {
    let mut s = Vec::new();
    wire::put_u32(&mut s, 3); // FIXED_NEWSTYLE | NO_ZEROES
    if go {
        option(&mut s, opt::STRUCTURED_REPLY, &[]);
        let mut meta = Vec::new();
        wire::put_u32(&mut meta, 4);
        meta.extend_from_slice(b"disk");
        wire::put_u32(&mut meta, 1);
        wire::put_u32(&mut meta, 15);
        meta.extend_from_slice(b"base:allocation");
        option(&mut s, opt::SET_META_CONTEXT, &meta);
        let mut g = Vec::new();
        wire::put_u32(&mut g, 4);
        g.extend_from_slice(b"disk");
        wire::put_u16(&mut g, 1);
        wire::put_u16(&mut g, 3); // INFO_BLOCK_SIZE
        option(&mut s, opt::GO, &g);
    } else {
        option(&mut s, opt::EXPORT_NAME, b"disk");
    }
    request(&mut s, cmd::WRITE, cmd_flags::FUA, 512, 16);
    s.extend_from_slice(b"sixteen bytes!!!");
    request(&mut s, cmd::READ, 0, 0, 4096);
    request(&mut s, cmd::BLOCK_STATUS, 0, 0, 1 << 16);
    request(&mut s, cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 4096, 4096);
    request(&mut s, cmd::TRIM, 0, 8192, 8192);
    request(&mut s, cmd::CACHE, 0, 0, 4096);
    request(&mut s, cmd::FLUSH, 0, 0, 0);
    request(&mut s, cmd::DISC, 0, 0, 0);
    s
}

fn list_info_abort() -> Vec<u8> {
    let mut s = Vec::new();
    wire::put_u32(&mut s, 1);
    option(&mut s, opt::LIST, &[]);
    let mut i = Vec::new();
    wire::put_u32(&mut i, 2);
    i.extend_from_slice(b"ro");
    wire::put_u16(&mut i, 0);
    option(&mut s, opt::INFO, &i);
    option(&mut s, opt::LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    option(&mut s, opt::ABORT, &[]);
    s
}

/// Request sequences for the model target (see its module doc for the layout).
fn model_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let op = |v: &mut Vec<u8>, code: u8, off: u32, len: u16| {
        v.push(code);
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.push(7);
    };
    let head = |config: u8, crash: u8, mode: u8| {
        let mut v = vec![config, crash, mode];
        v.extend_from_slice(&42u64.to_le_bytes());
        v
    };
    // Base under top, 4 blocks: partial write (copy-up), flush, whole-block write,
    // zeroes, discard, read, FUA write, reopen, then power loss dropping the rest.
    let mut a = head(0x83, 0, 0);
    op(&mut a, 0, 100, 300);
    op(&mut a, 4, 0, 0);
    op(&mut a, 8, 4096, 4096);
    op(&mut a, 2, 9000, 5000);
    op(&mut a, 3, 0, 2000);
    op(&mut a, 5, 0, 16383);
    op(&mut a, 16, 12000, 100);
    op(&mut a, 7, 0, 0);
    op(&mut a, 1, 5, 5);
    // Same on a single short-tailed layer, crashing before the 3rd sync, reordered.
    let mut b = head(0x63, 3, 2);
    b.extend_from_slice(&a[11..]);
    // The same requests with the 6th I/O call failing (EIO), and with the 2nd sync
    // and every later one failing (ENOSPC).
    let mut c = head(0x83, 0x85, 0);
    c.extend_from_slice(&a[11..]);
    let mut d = head(0x83, 0xc1, 0xc0);
    d.extend_from_slice(&a[11..]);
    vec![
        ("copy_up_flush", a),
        ("crash_reorder", b),
        ("fault_eio", c),
        ("fault_sync_sticky", d),
    ]
}
