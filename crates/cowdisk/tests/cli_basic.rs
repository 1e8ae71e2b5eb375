//! create, info, map: output, JSON schemas, errors and exit codes.

mod cli_common;

use cli_common::*;
use cowdisk_core::WriteFlags;

#[test]
fn help_has_examples_for_every_command() {
    for cmd in [
        "create", "info", "map", "check", "snapshot", "reset", "squash", "flatten", "import",
        "export", "rebase", "serve",
    ] {
        let out = ok(&[cmd, "--help"]);
        assert!(
            out.contains("Example"),
            "{cmd} --help lacks an example:\n{out}"
        );
    }
    assert!(ok(&["ublk-remove", "--help"]).contains("Example"));
    assert!(ok(&["--help"]).contains("Exit codes"));
}

#[test]
fn usage_errors_exit_1() {
    let o = run(&["create", "x.cow"]);
    assert_eq!(code(&o), 1);
    let o = run(&["frobnicate"]);
    assert_eq!(code(&o), 1);
    let o = run(&["serve", "x.cow", "--threads", "0"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("--threads"), "{}", stderr(&o));
}

#[test]
fn create_info_json_schema() {
    let t = Tmp::new("info");
    let base = t.s("base.cow");
    ok(&["create", &base, "--size", "10M", "--block-size", "4K"]);
    let v = json(&["info", &base, "--json"]);
    assert_eq!(v["virtual_size"], 10 << 20);
    assert_eq!(v["block_size"], 4096);
    assert_eq!(v["depth"], 1);
    let l = &v["layers"][0];
    assert_eq!(l["state"], "writable");
    assert_eq!(l["data_blocks"], 0);
    assert_eq!(l["whiteout_blocks"], 0);
    assert!(l["parent"].is_null());
    assert!(l["seal_digest"].is_null());
    assert_eq!(l["needs_check"], false);
    assert!(l["allocated_bytes"].is_u64());
    assert_eq!(l["uuid"].as_str().unwrap().len(), 36);
    {
        let d = open_rw(&t.p("base.cow"));
        d.write(0, &[1; 8192], WriteFlags::default()).unwrap();
        d.flush().unwrap();
    }
    let top = t.s("top.cow");
    let out = ok(&["create", &top, "--backing", &base]);
    assert!(out.contains("Created"), "{out}");
    let v = json(&["info", &top, "--json"]);
    assert_eq!(v["depth"], 2);
    assert_eq!(v["layers"][0]["parent"]["reference"], "base.cow");
    assert_eq!(v["layers"][0]["parent"]["uuid"], v["layers"][1]["uuid"]);
    assert_eq!(
        v["layers"][0]["parent"]["seal_digest"],
        v["layers"][1]["seal_digest"]
    );
    assert_eq!(v["layers"][1]["state"], "sealed");
    assert_eq!(v["layers"][1]["data_blocks"], 2);
    let text = ok(&["info", &top]);
    for want in [
        "10 MiB",
        "4 KiB",
        "sealed",
        "writable",
        "whiteout blocks",
        "disk usage",
        "parent:          base.cow",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[test]
fn create_errors() {
    let t = Tmp::new("create-err");
    let a = t.s("a.cow");
    ok(&["create", &a, "--size", "1M"]);
    let before = hash(&t.p("a.cow"));
    fails(&["create", &a, "--size", "1M"], "already exists");
    assert_eq!(hash(&t.p("a.cow")), before);
    fails(&["create", &t.s("b.cow"), "--size", "1000"], "virtual_size");
    fails(
        &[
            "create",
            &t.s("b.cow"),
            "--size",
            "1M",
            "--block-size",
            "3K",
        ],
        "block_size",
    );
    // Usage errors come from the argument parser: exit 1, message on stderr.
    let b = t.s("b.cow");
    for (args, needle) in [
        (vec!["create", b.as_str(), "--size", "12Q"], "unknown unit"),
        (
            vec![
                "create",
                b.as_str(),
                "--size",
                "1M",
                "--backing",
                a.as_str(),
            ],
            "cannot be used with",
        ),
    ] {
        let o = run(&args);
        assert_eq!(code(&o), 1);
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    fails(
        &["create", &t.s("b.cow"), "--backing", &t.s("missing.cow")],
        "missing.cow",
    );
    fails(&["info", &t.s("nope.cow")], "nope.cow");
    std::fs::write(t.p("junk"), vec![7u8; 20000]).unwrap();
    fails(&["info", &t.s("junk")], "bad magic");
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn parent_outside_folder_is_referenced_relatively() {
    let t = Tmp::new("outside");
    std::fs::create_dir(t.p("sub")).unwrap();
    let base = t.s("base.cow");
    ok(&["create", &base, "--size", "1M"]);
    ok(&["create", &t.s("sub/top.cow"), "--backing", &base]);
    let v = json(&["info", &t.s("sub/top.cow"), "--json"]);
    assert_eq!(v["layers"][0]["parent"]["reference"], "../base.cow");
}

#[test]
fn big_images_metadata_is_fast() {
    let t = Tmp::new("big");
    let a = t.s("a.cow");
    let start = std::time::Instant::now();
    ok(&["create", &a, "--size", "1T"]);
    ok(&["info", &a]);
    ok(&["snapshot", &a, &t.s("s.cow")]);
    ok(&["info", &a]);
    let took = start.elapsed();
    // Generous for a debug build on a shared 2-core machine.
    assert!(took.as_secs() < 20, "1 TiB metadata ops took {took:?}");
    let v = json(&["info", &a, "--json"]);
    assert_eq!(v["virtual_size"], 1u64 << 40);
    // Sealing an empty layer writes only its header, not 64 MiB of block CRCs.
    assert!(
        v["layers"][1]["allocated_bytes"].as_u64().unwrap() < 1 << 20,
        "{v}"
    );
}

#[test]
fn map_json_schema_and_text() {
    let t = Tmp::new("map");
    let base = t.s("base.cow");
    ok(&["create", &base, "--size", "1M", "--block-size", "64K"]);
    {
        let d = open_rw(&t.p("base.cow"));
        d.write(0, &[1; 131072], WriteFlags::default()).unwrap();
        d.write(5 * 65536, &[2; 10], WriteFlags::default()).unwrap();
        d.flush().unwrap();
    }
    let top = t.s("top.cow");
    ok(&["create", &top, "--backing", &base]);
    {
        let d = open_rw(&t.p("top.cow"));
        d.write(65536, &[3; 100], WriteFlags::default()).unwrap();
        d.discard(5 * 65536, 65536, WriteFlags::default()).unwrap();
        d.flush().unwrap();
    }
    let v = json(&["map", &top, "--json"]);
    let ext = v.as_array().unwrap();
    let want = [
        (0, 65536, "data", Some(1)),
        // A partial block: the 4 KiB sub-block written, the rest from the base.
        (65536, 4096, "data", Some(0)),
        (69632, 61440, "data", Some(1)),
        (131072, 3 * 65536, "hole", None),
        (5 * 65536, 65536, "zero", Some(0)),
        (6 * 65536, 10 * 65536, "hole", None),
    ];
    assert_eq!(ext.len(), want.len(), "{v}");
    for (e, (start, len, state, depth)) in ext.iter().zip(want) {
        assert_eq!(e["start"], start);
        assert_eq!(e["length"], len);
        assert_eq!(e["state"], state);
        assert_eq!(e["depth"].as_u64(), depth);
        match depth {
            Some(0) => assert!(e["file"].as_str().unwrap().ends_with("top.cow")),
            Some(_) => assert!(e["file"].as_str().unwrap().ends_with("base.cow")),
            None => assert!(e["file"].is_null()),
        }
    }
    let text = ok(&["map", &top]);
    assert!(text.lines().next().unwrap().contains("Offset"));
    assert_eq!(text.lines().count(), 7, "{text}");
}

#[test]
fn writer_lock_reports_in_use() {
    let t = Tmp::new("lock");
    let a = t.s("a.cow");
    ok(&["create", &a, "--size", "1M"]);
    let _held = open_rw(&t.p("a.cow"));
    let before = hash(&t.p("a.cow"));
    fails(&["snapshot", &a, &t.s("s.cow")], "in use");
    fails(&["reset", &a], "in use");
    fails(&["info", &a], "in use");
    assert_eq!(hash(&t.p("a.cow")), before);
    assert!(!t.p("s.cow").exists());
}

#[test]
fn serve_errors_name_their_file() {
    let t = Tmp::new("serve-err");
    let missing = t.s("nope.cow");
    let e = fails(&["serve", &missing, "--socket", &t.s("s.sock")], "nope.cow");
    assert!(e.starts_with(&format!("cowdisk: {missing}")), "{e}");
    ok(&["create", &t.s("a.cow"), "--size", "1M"]);
    std::fs::write(t.p("taken.sock"), b"").unwrap();
    let e = fails(
        &["serve", &t.s("a.cow"), "--socket", &t.s("taken.sock")],
        "already exists",
    );
    assert!(
        e.starts_with(&format!("cowdisk: {}", t.s("taken.sock"))),
        "{e}"
    );
}

#[test]
fn import_refuses_a_fifo_without_waiting_for_a_writer() {
    let t = Tmp::new("import-fifo");
    let fifo = t.s("raw.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo must be installed");
    assert!(st.success());
    let image = t.s("x.cow");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run(&["import", &fifo, &image]));
    });
    let o = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("import of a FIFO hangs");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    assert!(!t.p("x.cow").exists());
}
