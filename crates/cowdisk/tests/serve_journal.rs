//! `cowdisk serve --flush-journal` with real clients: flushes of writes into partial
//! blocks go to `IMAGE.journal` (the header says so while it holds them); a server
//! killed with `kill -9` leaves them there and the next command replays them; a clean
//! stop retires the journal and removes its file; fio `verify=crc32c` through it, then
//! again from the replayed image; live snapshot, squash and reset retire it. Without the
//! flag (`auto`) a disk file system gets a 64M journal and tmpfs none; `off` makes none;
//! an export added live gets one too, retired when it is removed or the server stops.
//! Power loss
//! itself is the crash simulator's (cowdisk-core/tests/crash_journal.rs): a killed
//! process keeps its page cache.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::path::{Path, PathBuf};

use common::{have_tool, pattern_file, run, run_ok, TempDir};
use cowdisk_core::format::INCOMPAT_FLUSH_JOURNAL;
use cowdisk_core::layer::read_header;
use cowdisk_core::FileStorage;
use live_common::*;

const SIZE: usize = 8 << 20;

/// A sealed base of data (every third 64 KiB block zero: 1, 4, ...) and a top over it;
/// first small writes into its data blocks make partial blocks.
fn base_and_top(dir: &Path) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("base.raw");
    pattern_file(&raw, SIZE, 7);
    let base = dir.join("base.cow");
    let top = dir.join("vm1.cow");
    cowdisk_ok(&["import", s(&raw), s(&base), "-q"]);
    cowdisk_ok(&["create", s(&top), "--backing", s(&base), "-q"]);
    let content = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    (top, content)
}

fn journal_live(image: &Path) -> bool {
    let f = std::fs::File::open(image).unwrap();
    let h = read_header(&FileStorage::new(f), image).unwrap().header;
    h.incompat & INCOMPAT_FLUSH_JOURNAL != 0
}

/// `kill -9`: the server leaves its page cache, and no full flush.
fn kill9(mut srv: Serve) {
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
}

/// [`base_and_top`] served with a flush journal of `size`, then [`write_partial`]
/// through it: the image, its server and the content it should read.
fn served_after_partial_writes(dir: &Path, size: &str) -> (PathBuf, Serve, Vec<u8>) {
    let (top, base) = base_and_top(dir);
    let srv = Serve::start(&top, &["--flush-journal", size], &[]);
    let expect = write_partial(&srv.uri("vm1.cow"), base);
    (top, srv, expect)
}

/// `check` finds `image` clean, and it reads `want` (`what` names the moment).
fn clean_with(image: &Path, dir: &Path, want: &[u8], what: &str) {
    let c = cowdisk_json(&["check", s(image)]);
    assert_eq!(c["result"], "clean", "{what}: {c}");
    assert!(content(image, dir) == want, "content {what}");
}

fn journal_of(image: &Path) -> PathBuf {
    cowdisk_core::journal_path(image)
}

/// First 4 KiB writes into two blocks held below (full flushes: the map changes), then
/// writes into their other sub-blocks (journal flushes). Returns the expected content.
fn write_partial(uri: &str, expect: Vec<u8>) -> Vec<u8> {
    write_partial_with(uri, expect, 0)
}

/// [`write_partial`] with `k` added to every pattern byte.
fn write_partial_with(uri: &str, mut expect: Vec<u8>, k: u8) -> Vec<u8> {
    let writes = [
        (0x11, 4096usize),
        (0x12, 2 * 65536 + 4096),
        (0x21, 8192),
        (0x22, 2 * 65536 + 32768),
        (0x23, 12288),
    ];
    let mut args = vec!["-f".to_string(), "raw".into()];
    for (i, (p, off)) in writes.iter().enumerate() {
        let p = p + k;
        args.push("-c".into());
        args.push(format!("write -P {p:#x} {off} 4096"));
        if i != 0 {
            args.push("-c".into());
            args.push("flush".into());
        }
        expect[*off..off + 4096].fill(p);
    }
    args.push(uri.into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-io", &a, 60);
    expect
}

#[test]
fn a_killed_server_leaves_flushes_in_the_journal_and_the_next_command_replays_them() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let (top, srv, expect) = served_after_partial_writes(&t.0, "4M");
    assert!(journal_live(&top), "no flush went to the journal");
    assert_eq!(std::fs::metadata(journal_of(&top)).unwrap().len(), 4 << 20);
    // Of the four flushes, the three after the first writes into each block.
    let st = cowdisk_json(&["stats", s(&top)]);
    assert_eq!(st["exports"][0]["journal_flushes"], 3, "{st}");
    kill9(srv);
    // Any command replays first (here `check`, which then finds the image clean).
    let o = cowdisk(&["check", s(&top), "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("replayed the flushed writes"), "{err}");
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["result"], "clean", "{c}");
    assert!(!journal_live(&top));
    assert!(!journal_of(&top).exists());
    assert!(content(&top, &t.0) == expect, "content after replay");
}

#[test]
fn a_clean_stop_retires_the_journal() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let (top, mut srv, expect) = served_after_partial_writes(&t.0, "1M");
    assert!(journal_live(&top));
    assert!(srv.stop().success());
    assert!(!journal_live(&top));
    assert!(!journal_of(&top).exists(), "the journal file stayed");
    clean_with(&top, &t.0, &expect, "after a clean stop");
}

fn fio(uri: &str, verify_only: bool) {
    let mut args = vec![
        "--name=v".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=8".into(),
        "--size=6M".into(),
        "--offset=1M".into(),
        "--fsync=8".into(),
        "--verify=crc32c".into(),
        "--verify_state_save=0".into(),
        "--randseed=42".into(),
    ];
    args.push(if verify_only {
        "--verify_only".into()
    } else {
        "--do_verify=1".into()
    });
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("fio", &a, 300);
    assert!(
        o.status.success(),
        "fio (verify_only={verify_only}): {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn fio_verifies_through_the_journal_and_after_its_replay() {
    if !have_tool("fio") || !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let (top, _) = base_and_top(&t.0);
    let srv = Serve::start(&top, &["--flush-journal", "64M"], &[]);
    fio(&srv.uri("vm1.cow"), false);
    // fio's last FLUSH may overtake its last writes (iodepth 8; NBD lets the server
    // answer it first): one more from another connection covers them all (multi-conn).
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "flush", &srv.uri("vm1.cow")],
        60,
    );
    kill9(srv);
    // `serve` recovers its images first too: the replayed image verifies.
    let mut srv = Serve::start(&top, &[], &[]);
    fio(&srv.uri("vm1.cow"), true);
    assert!(srv.stop().success());
    let c = cowdisk_json(&["check", s(&top)]);
    assert_eq!(c["result"], "clean", "{c}");
}

#[test]
fn a_live_snapshot_retires_the_journal_and_the_new_top_journals_again() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let (top, srv, before) = served_after_partial_writes(&t.0, "4M");
    let uri = srv.uri("vm1.cow");
    assert!(journal_live(&top));
    // The seal's full flush retires the journal; the new top starts without one.
    let snap = t.0.join("snap1.cow");
    cowdisk_ok(&["snapshot", s(&top), s(&snap)]);
    assert!(!journal_live(&top));
    let after = write_partial_with(&uri, before.clone(), 0x40);
    assert!(
        journal_live(&top),
        "the new top's flushes did not use the journal"
    );
    kill9(srv);
    clean_with(&top, &t.0, &after, "of the new top after replay");
    clean_with(&snap, &t.0, &before, "of the snapshot");
}

/// A live squash and a live reset while the journal is in use: squash rewrites the top's
/// parent reference, so it flushes the top in full first; reset throws the top away. The
/// top journals again after each, and a `kill -9` then replays only the current top's
/// records.
#[test]
fn a_live_squash_and_a_live_reset_retire_the_journal_and_it_is_used_again() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let (top, srv, first) = served_after_partial_writes(&t.0, "4M");
    let uri = srv.uri("vm1.cow");
    cowdisk_ok(&["snapshot", s(&top), s(&t.0.join("snap1.cow"))]);
    let second = write_partial_with(&uri, first.clone(), 0x40);
    assert!(journal_live(&top));
    cowdisk_ok(&["squash", s(&top)]);
    assert!(!journal_live(&top), "the squash left the journal live");
    let info = cowdisk_json(&["info", s(&top)]);
    assert_eq!(info["layers"].as_array().unwrap().len(), 2, "{info}");
    write_partial_with(&uri, second, 0x50);
    assert!(
        journal_live(&top),
        "no flush used the journal after the squash"
    );
    // Back to the snapshot's content: the journal's records belong to the old top.
    cowdisk_ok(&["reset", s(&top)]);
    assert!(!journal_live(&top), "the reset left the journal live");
    let fourth = write_partial_with(&uri, first, 0x60);
    assert!(
        journal_live(&top),
        "no flush used the journal after the reset"
    );
    kill9(srv);
    clean_with(&top, &t.0, &fourth, "after replay");
}

/// [`write_partial`] through `serve IMAGE extra…` with the top in `dir`: whether the
/// server made a journal file (and its size), and the flushes it took.
fn journal_by_flag(dir: &Path, extra: &[&str]) -> (Option<u64>, u64) {
    let (top, base) = base_and_top(dir);
    let mut srv = Serve::start(&top, extra, &[]);
    let size = std::fs::metadata(journal_of(&top)).ok().map(|m| m.len());
    let expect = write_partial(&srv.uri("vm1.cow"), base);
    let st = cowdisk_json(&["stats", s(&top)]);
    let flushes = st["exports"][0]["journal_flushes"].as_u64().unwrap();
    assert!(srv.stop().success());
    assert!(
        !journal_of(&top).exists(),
        "{extra:?}: the journal file stayed"
    );
    clean_with(&top, dir, &expect, &format!("{extra:?} after a clean stop"));
    (size, flushes)
}

/// A folder on the build's own disk, where serve's default makes a journal: a disk file
/// system with room (CI runs on a fresh machine), unlike /tmp on some hosts.
fn disk_dir(name: &str) -> TempDir {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("journal-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn fs_type(dir: &Path) -> String {
    run_ok("stat", &["-f", "-c", "%T", s(dir)], 10)
        .trim()
        .to_string()
}

#[test]
fn without_the_flag_a_disk_file_system_gets_a_journal_and_tmpfs_none() {
    if !have_tool("qemu-io") {
        return;
    }
    let disk = disk_dir("default");
    assert_ne!(fs_type(&disk.0), "tmpfs", "{}", disk.0.display());
    assert_eq!(journal_by_flag(&disk.0, &[]), (Some(64 << 20), 3));
    std::fs::remove_dir_all(&disk.0).unwrap();
    std::fs::create_dir_all(&disk.0).unwrap();
    assert_eq!(
        journal_by_flag(&disk.0, &["--flush-journal", "off"]),
        (None, 0)
    );
    // tmpfs syncs nothing: auto makes no journal there, a size asked for does.
    let shm = Path::new("/dev/shm").join(format!("cowdisk-journal-{}", std::process::id()));
    std::fs::create_dir_all(&shm).unwrap();
    let shm = TempDir(shm);
    assert_eq!(fs_type(&shm.0), "tmpfs");
    assert_eq!(journal_by_flag(&shm.0, &[]), (None, 0));
    std::fs::remove_dir_all(&shm.0).unwrap();
    std::fs::create_dir_all(&shm.0).unwrap();
    assert_eq!(
        journal_by_flag(&shm.0, &["--flush-journal", "4M"]),
        (Some(4 << 20), 3)
    );
}

#[test]
fn an_export_added_live_journals_and_its_removal_or_the_exit_retires_it() {
    if !have_tool("qemu-io") {
        return;
    }
    let d = disk_dir("exports");
    let (vm1, base) = base_and_top(&d.0);
    let vm2 = d.0.join("vm2.cow");
    cowdisk_ok(&[
        "create",
        s(&vm2),
        "--backing",
        s(&d.0.join("base.cow")),
        "-q",
    ]);
    let mut srv = Serve::start(&vm1, &[], &[]);
    let sock = control_socket(&vm1);
    cowdisk_ok(&["exports", s(&sock), "--add", s(&vm2)]);
    // Written out when added, as at server start.
    assert_eq!(std::fs::metadata(journal_of(&vm2)).unwrap().len(), 64 << 20);
    let expect = write_partial(&srv.uri("vm2.cow"), base);
    assert!(journal_live(&vm2), "no flush went to the journal");
    cowdisk_ok(&["exports", s(&sock), "--remove", "vm2.cow"]);
    assert!(
        !journal_live(&vm2),
        "removed with its writes in the journal"
    );
    assert!(!journal_of(&vm2).exists());
    clean_with(&vm2, &d.0, &expect, "after its removal");
    // Added again and still served when the server stops.
    cowdisk_ok(&["exports", s(&sock), "--add", s(&vm2)]);
    let expect = write_partial_with(&srv.uri("vm2.cow"), expect, 0x40);
    assert!(journal_live(&vm2));
    assert!(srv.stop().success());
    assert!(
        !journal_live(&vm2),
        "an added export's journal outlived the server"
    );
    assert!(!journal_of(&vm2).exists());
    clean_with(&vm2, &d.0, &expect, "after the server stopped");
    assert!(!journal_of(&vm1).exists());
}
