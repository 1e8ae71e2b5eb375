//! Changed-block tracking end to end: an incremental backup of a served image through
//! live snapshots, read-only snapshot exports and the NBD context
//! `qemu:dirty-bitmap:NAME` (nbdinfo, qemu-img, nbdcopy), checked with `qemu-img compare`;
//! `cowdisk diff --since` reports the same extents.

#[path = "../../cowdisk-nbd/tests/client/mod.rs"]
mod client;
#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::os::unix::fs::FileExt;

use common::{have_tool, run, run_ok, TempDir};
use live_common::*;

/// `(start, length)` of the extents `nbdinfo --map=CONTEXT` reports with flag 1.
fn flagged(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let out = run_ok("nbdinfo", &[&format!("--map={context}"), uri], 60);
    let mut v: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len, flags): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if flags & 1 != 0 {
            match v.last_mut() {
                Some(l) if l.0 + l.1 == start => l.1 += len,
                _ => v.push((start, len)),
            }
        }
    }
    v
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run_ok("qemu-io", &args, 60);
}

#[test]
fn incremental_backup_through_dirty_bitmaps() {
    let tools = ["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"];
    if !tools.iter().all(|t| have_tool(t)) {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "16M");
    let (snap1, snap2) = (t.0.join("snap1.cow"), t.0.join("snap2.cow"));
    let full = t.0.join("full.raw");
    let mut a = Serve::start(&vm1, &[], &[]);
    let uri = a.uri("vm1.cow");
    qemu_io(&uri, &["write -P 0xab 0 2M", "write -P 0x11 6M 1M"]);
    cowdisk_ok(&["snapshot", s(&vm1), s(&snap1), "-q"]);
    // Full backup from a read-only export of the snapshot.
    {
        let mut b = Serve::start(&snap1, &["--read-only"], &[]);
        run_ok("nbdcopy", &[&b.uri("snap1.cow"), s(&full)], 120);
        assert!(b.stop().success());
    }
    qemu_io(
        &uri,
        &[
            "write -P 0xcd 1M 512k",
            "write -z -u 6M 64k",
            "write -P 0xee 10M 64k",
            "discard 0 64k",
        ],
    );
    cowdisk_ok(&["snapshot", s(&vm1), s(&snap2), "-q"]);
    let mut c = Serve::start(&snap2, &["--read-only"], &[]);
    let curi = c.uri("snap2.cow");
    let contexts = run_ok("nbdinfo", &["--json", &curi], 60);
    for name in ["snap1.cow", "snap2.cow", "base.cow"] {
        assert!(
            contexts.contains(&format!("qemu:dirty-bitmap:{name}")),
            "{contexts}"
        );
    }
    let dirty = flagged(&curi, "qemu:dirty-bitmap:snap1.cow");
    let expect = vec![
        (0, 64 * KIB),
        (MIB, 512 * KIB),
        (6 * MIB, 64 * KIB),
        (10 * MIB, 64 * KIB),
    ];
    assert_eq!(dirty, expect, "exactly the blocks written since snap1");
    assert!(flagged(&curi, "qemu:dirty-bitmap:snap2.cow").is_empty());
    // qemu-img sees the bitmap too (dirty = "data": false, as in qemu-iotests 223).
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=snap2.cow,\
         x-dirty-bitmap=qemu:dirty-bitmap:snap1.cow",
        c.addr.port()
    );
    let map = run_ok(
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts],
        60,
    );
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let not_data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(not_data, expect);
    // `cowdisk diff` through vm1's server says the same (nothing written since snap2).
    let diff = cowdisk_json(&["diff", s(&vm1), "--since", s(&snap1)]);
    let diff: Vec<(u64, u64)> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(diff, expect);
    // Incremental: copy only the dirty extents onto the full copy.
    let mut cl = client::Client::connect(c.addr);
    cl.handshake("snap2.cow", true, &[]);
    let out = std::fs::OpenOptions::new().write(true).open(&full).unwrap();
    for (start, len) in &dirty {
        let data = cl.read(*start, *len as u32);
        out.write_all_at(&data, *start).unwrap();
    }
    drop(out);
    let o = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&full), &curi],
        120,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(c.stop().success());
    assert!(a.stop().success());
    // Offline, diff reads the files and agrees.
    let off = cowdisk_json(&["diff", s(&vm1), "--since", s(&snap1)]);
    assert_eq!(off.as_array().unwrap().len(), expect.len());
    let o = cowdisk(&["diff", s(&vm1), "--since", s(&full)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a layer"));
}
