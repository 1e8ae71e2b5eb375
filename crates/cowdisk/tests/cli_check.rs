//! `check` and `check --repair`: every finding class and exit code (0 clean, 1 could
//! not run, 2 corruption, 3 repaired, 4 leaks only); repair never writes a lower
//! layer and never changes content.

mod cli_common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use cli_common::*;
use cowdisk_core::format::FLAG_NEEDS_CHECK;
use cowdisk_core::layer::{read_header, write_header};
use cowdisk_core::{FileStorage, Geometry};

const BS: u64 = 4096;
const SIZE: u64 = 1 << 20;

fn check(image: &str, repair: bool) -> (i32, serde_json::Value) {
    let mut args = vec!["check", image, "--json"];
    if repair {
        args.push("--repair");
    }
    let o = run(&args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (code(&o), v)
}

fn kinds(v: &serde_json::Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect()
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Sets the top's needs-check flag (a new header in the inactive slot); returns the slot now
/// active.
fn set_needs_check(p: &Path) -> u64 {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let st = FileStorage::new(f);
    let loaded = read_header(&st, p).unwrap();
    let mut h = loaded.header.clone();
    h.flags |= FLAG_NEEDS_CHECK;
    write_header(&st, p, &loaded, &h).unwrap();
    read_header(&st, p).unwrap().slot as u64
}

fn content(p: &Path) -> Vec<u8> {
    let d = open_ro(p);
    let mut b = vec![0u8; SIZE as usize];
    d.read(0, &mut b).unwrap();
    b
}

#[test]
fn clean_chain_and_schema() {
    let t = Tmp::new("check-clean");
    small_chain(&t, 5, 6);
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["result"], "clean");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["layers_checked"], 2);
    assert_eq!(v["blocks_verified"], 2);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["leaks"], 0);
    assert_eq!(v["repaired"], 0);
    assert!(v["findings"].as_array().unwrap().is_empty());
    assert!(ok(&["check", &t.s("vm.cow")]).contains("No errors found"));
}

#[test]
fn could_not_run_exit_1() {
    let t = Tmp::new("check-1");
    fails(&["check", &t.s("missing.cow")], "missing.cow");
    small_chain(&t, 5, 6);
    let _held = open_rw(&t.p("vm.cow"));
    fails(&["check", &t.s("vm.cow"), "--repair"], "in use");
}

#[test]
fn damaged_inactive_header_slot_is_a_leak_and_repairable() {
    let t = Tmp::new("check-hdr");
    small_chain(&t, 5, 6);
    let before = content(&t.p("vm.cow"));
    let base = hash(&t.p("base.cow"));
    poke(&t.p("vm.cow"), 4096 + 100, b"garbage");
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 4, "{v}");
    assert_eq!(v["result"], "leaks");
    assert_eq!(kinds(&v), ["header_slot"]);
    assert_eq!(v["findings"][0]["severity"], "leak");
    assert_eq!(v["findings"][0]["depth"], 0);
    let (c, v) = check(&t.s("vm.cow"), true);
    assert_eq!(c, 3, "{v}");
    assert_eq!(v["findings"][0]["repaired"], true);
    assert_eq!(check(&t.s("vm.cow"), false).0, 0);
    assert_eq!(content(&t.p("vm.cow")), before);
    assert_eq!(hash(&t.p("base.cow")), base);
}

#[test]
fn damaged_inactive_map_slot_is_repairable() {
    let t = Tmp::new("check-map");
    small_chain(&t, 5, 6);
    let before = content(&t.p("vm.cow"));
    // Page 0's slot B (slot A holds the one flushed version).
    poke(&t.p("vm.cow"), 8192 + 4096, b"CDMPxxxxxxxxxxxxxxxxxxxx");
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 4, "{v}");
    assert_eq!(kinds(&v), ["map_slot"]);
    assert_eq!(check(&t.s("vm.cow"), true).0, 3);
    assert_eq!(check(&t.s("vm.cow"), false).0, 0);
    assert_eq!(content(&t.p("vm.cow")), before);
}

#[test]
fn leaked_blocks_and_trailing_bytes() {
    let t = Tmp::new("check-leak");
    small_chain(&t, 5, 6);
    let before = content(&t.p("vm.cow"));
    let g = Geometry::new(SIZE, BS as u32).unwrap();
    // Data written for block 9 but never referenced (crash before the map update).
    poke(&t.p("vm.cow"), g.block_offset(9), &[0xee; 4096]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.p("vm.cow"))
        .unwrap();
    f.set_len(g.file_len() + 12345).unwrap();
    drop(f);
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 4, "{v}");
    let mut k = kinds(&v);
    k.sort();
    assert_eq!(k, ["trailing_bytes", "unreferenced_blocks"]);
    assert_eq!(check(&t.s("vm.cow"), true).0, 3);
    assert_eq!(check(&t.s("vm.cow"), false).0, 0);
    assert_eq!(
        std::fs::metadata(t.p("vm.cow")).unwrap().len(),
        g.file_len()
    );
    assert_eq!(content(&t.p("vm.cow")), before);
}

#[test]
fn squash_refuses_to_copy_corrupt_lower_data() {
    let t = Tmp::new("squash-crc");
    small_chain(&t, 5, 6);
    let g = Geometry::new(SIZE, BS as u32).unwrap();
    poke(&t.p("base.cow"), g.block_offset(1) + 10, &[0x77]);
    let (vm, base) = (hash(&t.p("vm.cow")), hash(&t.p("base.cow")));
    fails(&["squash", &t.s("vm.cow")], "block 1 fails its checksum");
    assert_eq!(hash(&t.p("vm.cow")), vm, "the top was repointed");
    assert_eq!(hash(&t.p("base.cow")), base);
    let left: Vec<_> = std::fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("squash"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn corrupt_lower_data_is_reported_never_repaired() {
    let t = Tmp::new("check-crc");
    small_chain(&t, 5, 6);
    let g = Geometry::new(SIZE, BS as u32).unwrap();
    poke(&t.p("base.cow"), g.block_offset(1) + 10, &[0x77]);
    let base = hash(&t.p("base.cow"));
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 2, "{v}");
    assert_eq!(v["result"], "corrupt");
    assert_eq!(kinds(&v), ["block_crc"]);
    assert_eq!(v["findings"][0]["depth"], 1);
    assert!(v["findings"][0]["message"]
        .as_str()
        .unwrap()
        .contains("block 1"));
    let (c, _) = check(&t.s("vm.cow"), true);
    assert_eq!(c, 2);
    assert_eq!(hash(&t.p("base.cow")), base, "repair wrote a lower layer");
    let o = run(&["check", &t.s("vm.cow")]);
    assert!(stdout(&o).contains("ERROR"), "{}", stdout(&o));
}

#[test]
fn broken_chain_and_headers_exit_2() {
    let t = Tmp::new("check-chain");
    small_chain(&t, 5, 6);
    std::fs::rename(t.p("base.cow"), t.p("moved.cow")).unwrap();
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 2, "{v}");
    assert_eq!(kinds(&v), ["parent_missing"]);
    // A different layer under the parent's name: identity mismatch.
    ok(&[
        "create",
        &t.s("base.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    ok(&["create", &t.s("other.cow"), "--backing", &t.s("base.cow")]);
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 2, "{v}");
    assert!(kinds(&v).contains(&"parent_identity".to_string()), "{v}");
    // Truncated top.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.p("other.cow"))
        .unwrap();
    f.set_len(5000).unwrap();
    let (c, v) = check(&t.s("other.cow"), true);
    assert_eq!(c, 2, "{v}");
    assert_eq!(kinds(&v), ["header"]);
}

#[test]
fn needs_check_flag_cleared_by_repair() {
    let t = Tmp::new("check-flag");
    small_chain(&t, 5, 6);
    set_needs_check(&t.p("vm.cow"));
    fails(
        &["snapshot", &t.s("vm.cow"), &t.s("s.cow")],
        "check --repair",
    );
    // Nor may it be sealed under a new child.
    let before = hash(&t.p("vm.cow"));
    fails(
        &["create", &t.s("c.cow"), "--backing", &t.s("vm.cow")],
        "check --repair",
    );
    assert_eq!(hash(&t.p("vm.cow")), before);
    assert!(!t.p("c.cow").exists());
    assert_eq!(
        json(&["info", &t.s("vm.cow"), "--json"])["layers"][0]["needs_check"],
        true
    );
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 2, "{v}");
    assert_eq!(kinds(&v), ["needs_check"]);
    assert_eq!(check(&t.s("vm.cow"), true).0, 3);
    assert_eq!(check(&t.s("vm.cow"), false).0, 0);
    ok(&["snapshot", &t.s("vm.cow"), &t.s("s.cow")]);
}

/// docs/reliability.md P10: `check --repair` killed after each of its writes. Content
/// never changes, the base is never written, and running it again converges to a clean
/// image.
#[test]
fn repair_killed_at_every_step_converges() {
    for fp in [
        "check.repair.after_header",
        "check.repair.after_map",
        "check.repair.after_truncate",
        "check.repair.after_first_punch",
        "check.repair.after_flag",
    ] {
        let t = Tmp::new(&format!("check-kill-{fp}"));
        small_chain(&t, 5, 6);
        let vm = t.p("vm.cow");
        let before = content(&vm);
        let base = hash(&t.p("base.cow"));
        // Every repairable finding at once: needs-check flag, a damaged inactive header slot,
        // a damaged inactive map slot, an unreferenced block and trailing bytes.
        let active = set_needs_check(&vm);
        poke(&vm, (1 - active) * 4096 + 100, b"garbage");
        poke(&vm, 8192 + 4096, b"CDMPxxxxxxxxxxxxxxxxxxxx");
        let g = Geometry::new(SIZE, BS as u32).unwrap();
        poke(&vm, g.block_offset(9), &[0xee; 4096]);
        poke(&vm, g.file_len() + 100, b"tail");
        let (c, v) = check(&t.s("vm.cow"), false);
        assert_eq!(c, 2, "{fp}: {v}");
        let mut k = kinds(&v);
        k.sort();
        assert_eq!(
            k,
            [
                "header_slot",
                "map_slot",
                "needs_check",
                "trailing_bytes",
                "unreferenced_blocks"
            ],
            "{fp}"
        );

        let o = run_env(
            &["check", &t.s("vm.cow"), "--repair"],
            &[("COWDISK_FAILPOINT", fp)],
        );
        assert_eq!(code(&o), 137, "{fp}: the failpoint did not fire");
        assert_eq!(content(&vm), before, "{fp}: content changed");
        // No new kind of finding: what is left is a subset of what was there.
        let (_, v) = check(&t.s("vm.cow"), false);
        assert!(kinds(&v).iter().all(|x| k.contains(x)), "{fp}: {v}");
        let (c, v) = check(&t.s("vm.cow"), true);
        assert!(c == 3 || c == 0, "{fp}: rerun exit {c}: {v}");
        let (c, v) = check(&t.s("vm.cow"), false);
        assert_eq!(c, 0, "{fp}: not clean after the rerun: {v}");
        assert_eq!(content(&vm), before, "{fp}: content changed");
        assert_eq!(hash(&t.p("base.cow")), base, "{fp}: base written");
    }
}

#[test]
fn repair_is_suggested_only_for_leaks_it_can_reclaim() {
    let t = Tmp::new("check-hint");
    small_chain(&t, 5, 6);
    let g = Geometry::new(SIZE, BS as u32).unwrap();
    // An unreferenced block in the sealed base: a leak no repair may touch.
    poke(&t.p("base.cow"), g.block_offset(9), &[0xee; 4096]);
    let o = run(&["check", &t.s("vm.cow")]);
    assert_eq!(code(&o), 4, "{}", stdout(&o));
    assert!(!stdout(&o).contains("run with --repair"), "{}", stdout(&o));
    // One in the writable top: repair can reclaim it, and says so.
    poke(&t.p("vm.cow"), g.block_offset(9), &[0xee; 4096]);
    let o = run(&["check", &t.s("vm.cow")]);
    assert_eq!(code(&o), 4, "{}", stdout(&o));
    assert!(stdout(&o).contains("run with --repair"), "{}", stdout(&o));
}
