//! Crash safety of snapshot, squash and reset: the binary is killed (failpoint,
//! exit 137) after each step; the next command must recover, the chain must open
//! with the old or the new content, `check` must be clean, and lower layers must be
//! unchanged.

mod cli_common;

use std::path::Path;

use cli_common::*;
use test_support::have_tool;
use Op::{Discard, Write};

const K: u64 = 1024;
const M: u64 = 1 << 20;

/// base (sealed, with data) <- vm (writable, with data); reference raw alongside.
fn setup(t: &Tmp) {
    make_ref(&t.p("ref.raw"), 4 * M);
    ok(&[
        "create",
        &t.s("base.cow"),
        "--size",
        "4M",
        "--block-size",
        "64K",
    ]);
    apply_both(
        &t.p("base.cow"),
        &t.p("ref.raw"),
        &[Write(0, 200 * K, 0x11), Write(2 * M, 64 * K, 0x12)],
    );
    ok(&["create", &t.s("vm.cow"), "--backing", &t.s("base.cow")]);
    apply_both(
        &t.p("vm.cow"),
        &t.p("ref.raw"),
        &[
            Write(100 * K, 10, 0x21),
            Discard(2 * M, 64 * K),
            Write(3 * M, 64 * K, 0x22),
        ],
    );
}

fn depth(t: &Tmp) -> u64 {
    json(&["info", &t.s("vm.cow"), "--json"])["depth"]
        .as_u64()
        .unwrap()
}

fn no_temps(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with('.'), "stray temp file {n}");
    }
}

fn still_writable(t: &Tmp) {
    apply_both(
        &t.p("vm.cow"),
        &t.p("ref.raw"),
        &[Write(M + 5, 70 * K, 0x99)],
    );
    assert_same(t, &t.p("vm.cow"), &t.p("ref.raw"), "after-write");
    let o = run(&["check", &t.s("vm.cow")]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

#[test]
fn snapshot_killed_at_every_step() {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    for (fp, forward) in [
        ("snapshot.after_pending", false),
        ("snapshot.after_seal", true),
        ("snapshot.after_link", true),
        ("snapshot.after_rename", true),
    ] {
        let t = Tmp::new(&format!("crash-{fp}"));
        setup(&t);
        let base = hash(&t.p("base.cow"));
        let o = run_env(
            &["snapshot", &t.s("vm.cow"), &t.s("snap.cow")],
            &[("COWDISK_FAILPOINT", fp)],
        );
        assert_eq!(code(&o), 137, "{fp}: {}", stderr(&o));
        // The next command recovers.
        let o = run(&["info", &t.s("vm.cow")]);
        assert!(o.status.success(), "{fp}: {}", stderr(&o));
        if fp != "snapshot.after_rename" {
            assert!(
                stderr(&o).contains(if forward { "completed" } else { "undid" }),
                "{fp}: {}",
                stderr(&o)
            );
        }
        assert_eq!(depth(&t), if forward { 3 } else { 2 }, "{fp}");
        assert_eq!(t.p("snap.cow").exists(), forward, "{fp}");
        no_temps(&t.0);
        assert_same(&t, &t.p("vm.cow"), &t.p("ref.raw"), fp);
        let o = run(&["check", &t.s("vm.cow")]);
        assert_eq!(code(&o), 0, "{fp}: {}", stdout(&o));
        assert_eq!(hash(&t.p("base.cow")), base, "{fp}: base changed");
        if !forward {
            ok(&["snapshot", &t.s("vm.cow"), &t.s("snap.cow")]);
            assert_eq!(depth(&t), 3);
        }
        let snap = hash(&t.p("snap.cow"));
        still_writable(&t);
        assert_eq!(hash(&t.p("snap.cow")), snap, "{fp}: snapshot changed");
    }
}

#[test]
fn squash_killed_at_every_step() {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    for fp in [
        "squash.after_temp",
        "squash.after_seal",
        "squash.after_rename",
        "squash.after_repoint",
    ] {
        let t = Tmp::new(&format!("crash-{fp}"));
        setup(&t);
        ok(&["snapshot", &t.s("vm.cow"), &t.s("s1.cow")]);
        apply_both(
            &t.p("vm.cow"),
            &t.p("ref.raw"),
            &[Write(64 * K, 64 * K, 0x31)],
        );
        let lowers = [hash(&t.p("base.cow")), hash(&t.p("s1.cow"))];
        let o = run_env(&["squash", &t.s("vm.cow")], &[("COWDISK_FAILPOINT", fp)]);
        assert_eq!(code(&o), 137, "{fp}: {}", stderr(&o));
        let d = depth(&t);
        assert_eq!(d, if fp == "squash.after_repoint" { 2 } else { 3 }, "{fp}");
        if fp != "squash.after_rename" && fp != "squash.after_repoint" {
            no_temps(&t.0);
        }
        assert_same(&t, &t.p("vm.cow"), &t.p("ref.raw"), fp);
        let o = run(&["check", &t.s("vm.cow")]);
        assert_eq!(code(&o), 0, "{fp}: {}", stdout(&o));
        assert_eq!(
            [hash(&t.p("base.cow")), hash(&t.p("s1.cow"))],
            lowers,
            "{fp}: lower layer changed"
        );
        // Squash again converges.
        if d == 3 {
            ok(&["squash", &t.s("vm.cow")]);
            assert_eq!(depth(&t), 2);
            assert_same(&t, &t.p("vm.cow"), &t.p("ref.raw"), "again");
        }
        still_writable(&t);
    }
}

#[test]
fn reset_killed_before_rename() {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    let t = Tmp::new("crash-reset");
    setup(&t);
    let o = run_env(
        &["reset", &t.s("vm.cow")],
        &[("COWDISK_FAILPOINT", "reset.after_temp")],
    );
    assert_eq!(code(&o), 137);
    assert_same(&t, &t.p("vm.cow"), &t.p("ref.raw"), "old");
    no_temps(&t.0);
    ok(&["reset", &t.s("vm.cow")]);
    ok(&["export", &t.s("base.cow"), &t.s("base.raw")]);
    assert_same(&t, &t.p("vm.cow"), &t.p("base.raw"), "reset");
}

/// Every command that opens an existing image finishes an interrupted snapshot first,
/// exactly once per invocation, with its message on stderr only (stdout stays JSON).
#[test]
fn every_command_recovers_once_before_running() {
    let commands: [&[&str]; 9] = [
        &["info", "vm.cow", "--json"],
        &["map", "vm.cow", "--json"],
        &["check", "vm.cow", "--json"],
        &["reset", "vm.cow", "--json"],
        &["squash", "vm.cow", "--json"],
        &["flatten", "vm.cow", "flat.cow", "--json"],
        &["export", "vm.cow", "out.raw", "--json"],
        &["snapshot", "vm.cow", "snap2.cow", "--json"],
        &["create", "child.cow", "--backing", "vm.cow", "--json"],
    ];
    for args in commands {
        let t = Tmp::new(&format!("recover-once-{}", args[0]));
        small_chain(&t, 0x11, 0x22);
        let o = run_env(
            &["snapshot", &t.s("vm.cow"), &t.s("snap.cow")],
            &[("COWDISK_FAILPOINT", "snapshot.after_seal")],
        );
        assert_eq!(code(&o), 137, "{}", stderr(&o));
        let full: Vec<String> = args
            .iter()
            .map(|a| {
                if a.ends_with(".cow") || a.ends_with(".raw") {
                    t.s(a)
                } else {
                    a.to_string()
                }
            })
            .collect();
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        let o = run(&full);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(
            e.matches("completed an interrupted snapshot").count(),
            1,
            "{args:?}: {e}"
        );
        serde_json::from_str::<serde_json::Value>(&stdout(&o))
            .unwrap_or_else(|err| panic!("{args:?}: stdout is not JSON ({err})"));
        // The interrupted snapshot is complete: snap.cow is the sealed old top.
        let info = json(&["info", &t.s("snap.cow"), "--json"]);
        assert_eq!(info["layers"][0]["state"], "sealed", "{args:?}");
        no_temps(&t.0);
    }
}

/// Hidden files in `dir` whose name starts with `prefix`, sorted.
fn hidden(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// `import`, `flatten` and `export` killed mid-write leave their temp file behind (up to
/// the full data size). `check` lists it as a `stale_temp_file` leak; the next run of the
/// same command to the same target removes it; a temp file a live process holds (locked,
/// same name pattern) is neither listed nor removed.
#[test]
fn killed_transfers_leave_temps_that_the_next_run_removes() {
    for cmd in ["import", "flatten", "export"] {
        let t = Tmp::new(&format!("stale-{cmd}"));
        small_chain(&t, 0x11, 0x22);
        ok(&["export", &t.s("vm.cow"), &t.s("src.raw")]);
        let target = if cmd == "export" {
            "out.raw"
        } else {
            "out.cow"
        };
        let source = if cmd == "import" { "src.raw" } else { "vm.cow" };
        let args = [cmd, &t.s(source), &t.s(target)];
        let live = t.p(&format!(
            ".{target}.{cmd}-0123abcd-0123-4567-89ab-0123456789ab.tmp"
        ));
        let held = std::fs::File::create(&live).unwrap();
        held.lock().unwrap();

        let fp = format!("{cmd}.after_first_block");
        let o = run_env(&args, &[("COWDISK_FAILPOINT", &fp)]);
        assert_eq!(code(&o), 137, "{cmd}: {}", stderr(&o));
        assert!(!t.p(target).exists(), "{cmd}");
        let prefix = format!(".{target}.{cmd}-");
        let left = hidden(&t.0, &prefix);
        assert_eq!(left.len(), 2, "{cmd}: {left:?}");
        let stale = left.iter().find(|p| **p != live).unwrap().clone();
        assert!(std::fs::metadata(&stale).unwrap().len() > 0, "{cmd}");

        let o = run(&["check", &t.s("vm.cow"), "--json"]);
        assert_eq!(code(&o), 4, "{cmd}: {}", stdout(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let f = &v["findings"];
        assert_eq!(f.as_array().unwrap().len(), 1, "{cmd}: {v}");
        assert_eq!(f[0]["kind"], "stale_temp_file", "{cmd}: {v}");
        assert_eq!(f[0]["severity"], "leak", "{cmd}: {v}");
        assert_eq!(f[0]["file"], stale.display().to_string(), "{cmd}: {v}");

        // The next run of the same command cleans up after the killed one, not the live one.
        ok(&args);
        assert_eq!(hidden(&t.0, &prefix), std::slice::from_ref(&live), "{cmd}");
        let out_raw = if cmd == "export" {
            t.p(target)
        } else {
            ok(&["export", &t.s(target), &t.s("check.raw")]);
            t.p("check.raw")
        };
        assert_eq!(
            std::fs::read(&out_raw).unwrap(),
            std::fs::read(t.p("src.raw")).unwrap(),
            "{cmd}: content"
        );
        let o = run(&["check", &t.s("vm.cow"), "--repair"]);
        assert_eq!(code(&o), 0, "{cmd}: {}", stdout(&o));
        assert!(live.exists(), "{cmd}: a held temp file was removed");
        drop(held);
    }
}
