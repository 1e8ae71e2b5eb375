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

/// A second flush of `vm.cow` (block 5), so map page 0's slot B holds sequence 2 and
/// slot A the older sequence 1; then damages slot A's entries (its sequence stays
/// readable, so it is provably the older copy).
fn damage_older_map_slot(vm: &Path) {
    apply_image(vm, &[Op::Write(5 * BS, BS, 0x55)]);
    poke(vm, 8192 + 100, b"garbage");
}

#[test]
fn damaged_older_map_slot_is_a_leak_and_repairable() {
    let t = Tmp::new("check-map");
    small_chain(&t, 5, 6);
    damage_older_map_slot(&t.p("vm.cow"));
    let before = content(&t.p("vm.cow"));
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 4, "{v}");
    assert_eq!(kinds(&v), ["map_slot"]);
    assert_eq!(check(&t.s("vm.cow"), true).0, 3);
    assert_eq!(check(&t.s("vm.cow"), false).0, 0);
    assert_eq!(content(&t.p("vm.cow")), before);

    // Garbage in slot B next to slot A's sequence 1: B was never legitimately written
    // before A, so it can only be a newer (torn or damaged) flush: not a leak.
    let t = Tmp::new("check-map-b");
    small_chain(&t, 5, 6);
    poke(&t.p("vm.cow"), 8192 + 4096, b"CDMPxxxxxxxxxxxxxxxxxxxx");
    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 2, "{v}");
    assert_eq!(kinds(&v), ["map_slot_newer"]);
    let msg = v["findings"][0]["message"].as_str().unwrap();
    assert!(msg.contains("sequence is unreadable"), "{msg}");
}

#[test]
fn leaked_blocks_and_trailing_bytes() {
    let t = Tmp::new("check-leak");
    small_chain(&t, 5, 6);
    let before = content(&t.p("vm.cow"));
    let g = Geometry::new(SIZE, BS as u32).unwrap().with_sub_blocks();
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
    let g = Geometry::new(SIZE, BS as u32).unwrap().with_sub_blocks();
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
    let g = Geometry::new(SIZE, BS as u32).unwrap().with_sub_blocks();
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

/// How a `check` exit code ranks: clean < leaks < corrupt.
fn rank(code: i32) -> u8 {
    match code {
        0 => 0,
        4 => 1,
        _ => 2,
    }
}

/// A stale temp file of a killed `flatten` beside the image (nobody holds its lock).
fn stale_temp(t: &Tmp) -> std::path::PathBuf {
    let p = t.p(".out.cow.flatten-0123abcd-0123-4567-89ab-0123456789ab.tmp");
    std::fs::write(&p, b"partial layer").unwrap();
    p
}

/// The scenarios of [`repair_killed_at_every_step_converges`]: extra `check` flags, the
/// failpoints they reach, and whether the image stays flagged (data kept).
const SCENARIOS: [(&str, &[&str], &[&str]); 3] = [
    (
        "every-leak",
        &[],
        &[
            "check.repair.after_header",
            "check.repair.after_map",
            "check.repair.after_truncate",
            "check.repair.after_first_punch",
            "check.repair.after_temp",
            "check.repair.after_flag",
        ],
    ),
    ("newer-kept", &[], &["check.repair.after_keep_flag"]),
    (
        "newer-discarded",
        &["--discard-unreferenced"],
        &[
            "check.repair.after_discard_slot",
            "check.repair.after_first_punch",
        ],
    ),
];

/// Builds scenario `name` in `t`.
fn damage_for(t: &Tmp, name: &str) {
    small_chain(t, 5, 6);
    let vm = t.p("vm.cow");
    if name == "every-leak" {
        // Every repairable finding at once: needs-check flag, a damaged inactive header
        // slot, a damaged older map slot, an unreferenced block, trailing bytes, a stale
        // temp file.
        damage_older_map_slot(&vm);
        let active = set_needs_check(&vm);
        poke(&vm, (1 - active) * 4096 + 100, b"garbage");
        let g = Geometry::new(SIZE, BS as u32).unwrap().with_sub_blocks();
        poke(&vm, g.block_offset(9), &[0xee; 4096]);
        poke(&vm, g.file_len() + 100, b"tail");
        stale_temp(t);
    } else {
        // Defect 5's image: slot B (seq 2, data in block 7, a whiteout in block 0) damaged.
        apply_image(&vm, &[Op::Write(7 * BS, BS, 0x77), Op::Discard(0, BS)]);
        flip_bit(&vm, 8192 + 4096 + 16);
    }
}

/// The `check.repair.*` failpoints in the check sources.
fn repair_failpoints_in_source() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cmd/check");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for part in text.split("failpoint::hit(\"").skip(1) {
            out.push(part.split('"').next().unwrap().to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// docs/reliability.md P10: `check --repair` killed after each of its writes, in every
/// scenario that reaches it. After the kill the image opens with the same content, a
/// check finds nothing worse than before (exit code and finding kinds), the base is never
/// written, and running the repair again converges.
#[test]
fn repair_killed_at_every_step_converges() {
    let mut covered: Vec<String> = SCENARIOS
        .iter()
        .flat_map(|s| s.2.iter().map(|f| f.to_string()))
        .collect();
    covered.sort();
    covered.dedup();
    assert_eq!(
        covered,
        repair_failpoints_in_source(),
        "a failpoint is untested"
    );
    for (name, flags, points) in SCENARIOS {
        let kept = name == "newer-kept";
        for fp in points {
            let t = Tmp::new(&format!("check-kill-{name}-{fp}"));
            damage_for(&t, name);
            let vm = t.p("vm.cow");
            let before = content(&vm);
            let base = hash(&t.p("base.cow"));
            let (c0, v) = check(&t.s("vm.cow"), false);
            assert!(c0 != 0, "{fp}: nothing to repair: {v}");
            let k0 = kinds(&v);

            let mut args = vec!["check", t.s("vm.cow").leak() as &str, "--repair"];
            args.extend_from_slice(flags);
            let o = run_env(&args, &[("COWDISK_FAILPOINT", fp)]);
            assert_eq!(code(&o), 137, "{name} {fp}: the failpoint did not fire");
            assert_eq!(content(&vm), before, "{name} {fp}: content changed");
            let (c, v) = check(&t.s("vm.cow"), false);
            assert!(
                rank(c) <= rank(c0),
                "{name} {fp}: exit {c} after, {c0} before: {v}"
            );
            // No new kind of finding, except the flag that keeping the data sets, and the
            // plain leak that data becomes once the operator gave it up.
            let new: Vec<_> = kinds(&v).into_iter().filter(|x| !k0.contains(x)).collect();
            let allowed: &[&str] = match name {
                "newer-kept" => &["needs_check"],
                "newer-discarded" => &["unreferenced_blocks"],
                _ => &[],
            };
            assert!(
                new.iter().all(|x| allowed.contains(&x.as_str())),
                "{name} {fp}: {v}"
            );

            let o = run(&args);
            let c = code(&o);
            if kept {
                assert_eq!(c, 2, "{name} {fp}: {}", stdout(&o));
                assert_eq!(check(&t.s("vm.cow"), false).0, 2, "{name} {fp}");
            } else {
                assert!(
                    c == 3 || c == 0,
                    "{name} {fp}: rerun exit {c}: {}",
                    stdout(&o)
                );
                let (c, v) = check(&t.s("vm.cow"), false);
                assert_eq!(c, 0, "{name} {fp}: not clean after the rerun: {v}");
            }
            assert_eq!(content(&vm), before, "{name} {fp}: content changed");
            assert_eq!(hash(&t.p("base.cow")), base, "{name} {fp}: base written");
        }
    }
}

#[test]
fn repair_is_suggested_only_for_leaks_it_can_reclaim() {
    let t = Tmp::new("check-hint");
    small_chain(&t, 5, 6);
    let g = Geometry::new(SIZE, BS as u32).unwrap().with_sub_blocks();
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

/// Reads `len` bytes of `p` at `off`.
fn peek(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Flips bit 0 of the byte at `off`.
fn flip_bit(p: &Path, off: u64) {
    let b = peek(p, off, 1)[0];
    poke(p, off, &[b ^ 1]);
}

/// Defect 5: the newest slot of a map page (sequence 2, slot B) is damaged after its flush
/// completed. The image opens from slot A (sequence 1), so a flushed whiteout and a flushed
/// data block vanish. `check` must call that an error naming what may be lost, and
/// `--repair` must keep the data (and the damaged slot) unless told to discard them.
#[test]
fn damaged_newest_map_slot_is_an_error_and_repair_keeps_its_data() {
    let t = Tmp::new("check-newest-slot");
    small_chain(&t, 5, 6);
    let vm = t.p("vm.cow");
    let g = Geometry::new(SIZE, BS as u32).unwrap().with_sub_blocks();
    // Second flush: data in block 7, a whiteout over the base's block 0 (page 0, slot B, seq 2).
    apply_image(&vm, &[Op::Write(7 * BS, BS, 0x77), Op::Discard(0, BS)]);
    let slot_b = 8192 + 4096;
    assert_eq!(
        peek(&vm, slot_b + 8, 8),
        2u64.to_le_bytes(),
        "slot B holds seq 2"
    );
    let base = hash(&t.p("base.cow"));
    // One flipped bit in slot B's CRC field: the entries and the sequence stay readable.
    flip_bit(&vm, slot_b + 16);
    let damaged = peek(&vm, slot_b, 4096);

    let (c, v) = check(&t.s("vm.cow"), false);
    assert_eq!(c, 2, "a possibly lost flush is not a leak: {v}");
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "map_slot_newer")
        .unwrap_or_else(|| panic!("no map_slot_newer finding: {v}"));
    assert_eq!(f["severity"], "error", "{v}");
    let msg = f["message"].as_str().unwrap();
    for needle in [
        "map page 0",
        "blocks 0-255",
        "sequence 2",
        "block 7",
        "whiteout",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from {msg:?}");
    }
    // Block 7's data is named there, not as a harmless leak.
    assert!(
        !kinds(&v).contains(&"unreferenced_blocks".to_string()),
        "{v}"
    );

    // Plain --repair keeps the data and the damaged slot, and flags the image so that
    // serving it cannot overwrite them.
    let (c, v) = check(&t.s("vm.cow"), true);
    assert_eq!(c, 2, "{v}");
    assert_eq!(
        peek(&vm, g.block_offset(7), 4096),
        vec![0x77; 4096],
        "data punched"
    );
    assert_eq!(peek(&vm, slot_b, 4096), damaged, "damaged slot overwritten");
    assert_eq!(
        json(&["info", &t.s("vm.cow"), "--json"])["layers"][0]["needs_check"],
        true
    );
    let o = run(&["check", &t.s("vm.cow")]);
    assert!(
        stdout(&o).contains("--discard-unreferenced"),
        "{}",
        stdout(&o)
    );
    assert_eq!(hash(&t.p("base.cow")), base);

    // The operator accepts the loss: the older view becomes the clean state.
    let older = content(&vm);
    let o = run(&[
        "check",
        &t.s("vm.cow"),
        "--repair",
        "--discard-unreferenced",
    ]);
    assert_eq!(code(&o), 3, "{}", stdout(&o));
    assert_eq!(check(&t.s("vm.cow"), false).0, 0);
    assert_eq!(content(&vm), older);
    assert_eq!(peek(&vm, g.block_offset(7), 4096), vec![0; 4096]);
    assert_eq!(hash(&t.p("base.cow")), base);

    // Garbage in slot B of a page never flushed (slot A empty): discarding must overwrite
    // slot B itself, not only fill slot A.
    let t = Tmp::new("check-newest-slot-b");
    ok(&[
        "create",
        &t.s("new.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    poke(&t.p("new.cow"), 8192 + 4096, b"CDMPxxxxxxxxxxxxxxxxxxxx");
    let (c, v) = check(&t.s("new.cow"), false);
    assert_eq!((c, kinds(&v)), (2, vec!["map_slot_newer".to_string()]));
    let o = run(&[
        "check",
        &t.s("new.cow"),
        "--repair",
        "--discard-unreferenced",
    ]);
    assert_eq!(code(&o), 3, "{}", stdout(&o));
    let (c, v) = check(&t.s("new.cow"), false);
    assert_eq!(c, 0, "{v}");
}

/// A top's partial-block bitmap page damaged in both slots: `check` names it, and the
/// image refuses to open rather than guess which sub-blocks the top holds.
#[test]
fn damaged_partial_bitmap_page() {
    let t = Tmp::new("check-partial");
    ok(&[
        "create",
        &t.s("b.cow"),
        "--size",
        "1M",
        "--block-size",
        "64K",
    ]);
    apply_image(&t.p("b.cow"), &[Op::Write(0, 1 << 20, 7)]);
    ok(&["create", &t.s("t.cow"), "--backing", &t.s("b.cow")]);
    apply_image(&t.p("t.cow"), &[Op::Write(65536 + 4096, 4096, 9)]);
    let (c, v) = check(&t.s("t.cow"), false);
    assert_eq!(c, 0, "{v}");
    // `info` tells the partial block from a whole one.
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["info", &t.s("t.cow"), "--json"])).unwrap();
    assert_eq!(j["layers"][0]["data_blocks"], 1, "{j}");
    assert_eq!(j["layers"][0]["partial_blocks"], 1, "{j}");
    assert_eq!(j["layers"][1]["partial_blocks"], 0, "{j}");
    let o = ok(&["info", &t.s("t.cow")]);
    assert!(
        o.contains("data blocks:     1 (1 partial; at most 64 KiB)"),
        "{o}"
    );
    let g = Geometry::new(SIZE, 65536).unwrap().with_sub_blocks();
    for slot in 0..2 {
        poke(&t.p("t.cow"), g.sub_page_offset(0, slot) + 40, &[0xff; 8]);
    }
    let (c, v) = check(&t.s("t.cow"), false);
    assert_ne!(c, 0, "{v}");
    assert!(kinds(&v).contains(&"partial_bitmap".to_string()), "{v}");
    let o = run(&["info", &t.s("t.cow")]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("bitmap page"), "{}", stderr(&o));
}
