//! Bad input on the control socket: malformed JSON, unknown commands and arguments, huge
//! lines, a client that never reads its replies, too many connections and concurrent
//! commands each get a clear error (or are closed); the server and its export go on.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{have_tool, run_ok, TempDir};
use live_common::*;
use serde_json::json;

fn code(r: &serde_json::Value) -> &str {
    assert_eq!(r["ok"], false, "{r}");
    r["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code: {r}"))
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let sock = control_socket(&vm1);
    let uri = srv.uri("vm1.cow");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 256k", &uri],
        60,
    );
    assert_eq!(code(&control_raw(&sock, b"{not json\n")), "bad_json");
    assert_eq!(code(&control_raw(&sock, b"\xff\xfe\n")), "bad_json");
    assert_eq!(code(&control_raw(&sock, b"[1,2]\n")), "bad_request");
    assert_eq!(
        code(&control_raw(&sock, b"{\"command\": 7}\n")),
        "bad_request"
    );
    let r = control(&sock, &json!({"id": "x1", "command": "format_everything"}));
    assert_eq!(code(&r), "unknown_command");
    assert_eq!(r["id"], "x1", "the id is echoed");
    let r = control(&sock, &json!({"command": "info", "export": "nope"}));
    assert_eq!(code(&r), "unknown_export");
    let r = control(&sock, &json!({"command": "info", "export": 3}));
    assert_eq!(code(&r), "bad_request");
    let r = control(&sock, &json!({"command": "snapshot"}));
    assert_eq!(code(&r), "bad_request");
    let r = control(
        &sock,
        &json!({"command": "snapshot", "snapshot": "rel.cow"}),
    );
    assert_eq!(code(&r), "bad_request");
    let r = control(
        &sock,
        &json!({"command": "stats", "image": "/nonexistent/x.cow"}),
    );
    assert_eq!(code(&r), "unknown_export");
    // A snapshot onto an existing file fails like offline, and nothing changes.
    let exists = t.0.join("base.cow");
    let r = control(
        &sock,
        &json!({"command": "snapshot", "snapshot": s(&exists)}),
    );
    assert_eq!(code(&r), "failed");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already exists"),
        "{r}"
    );
    let o = cowdisk(&["snapshot", s(&vm1), s(&exists)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    // A huge line: an error, then the connection is closed.
    let mut huge = vec![b'{'; 200 * 1024];
    huge.push(b'\n');
    assert_eq!(code(&control_raw(&sock, &huge)), "line_too_long");
    // Several requests on one connection are answered in order.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"{\"id\":1,\"command\":\"exports\"}\n{\"id\":2,\"command\":\"nope\"}\n")
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(&c));
    let r1: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let r2: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (r1["id"].clone(), r1["ok"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!((r2["id"].clone(), code(&r2)), (json!(2), "unknown_command"));
    // The export is unaffected.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 0 256k", &uri],
        60,
    );
    assert_eq!(cowdisk_json(&["info", s(&vm1)])["depth"], 2);
    assert!(srv.stop().success());
}

#[test]
fn clients_that_never_read_or_crowd_the_socket_do_not_disturb_the_server() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "64M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let sock = control_socket(&vm1);
    let uri = srv.uri("vm1.cow");
    // Fragment the disk so that `map` replies are long.
    let mut ops = vec!["-f".to_string(), "raw".to_string()];
    for i in 0..256u64 {
        ops.push("-c".into());
        ops.push(format!("write -P 1 {} 4k", i * 128 * 1024));
    }
    ops.push(uri.clone());
    let refs: Vec<&str> = ops.iter().map(String::as_str).collect();
    run_ok("qemu-io", &refs, 120);
    // A client that sends requests and never reads: its replies fill the socket, it is
    // cut off after a while; nobody else waits for it.
    let mut deaf = UnixStream::connect(&sock).unwrap();
    deaf.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let req = b"{\"command\":\"map\"}\n".repeat(2000);
    let _ = deaf.write_all(&req);
    // Crowding: connections that say nothing, beyond the cap.
    let idle: Vec<UnixStream> = (0..15)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    let r = control_raw(&sock, b"{\"command\":\"exports\"}\n");
    assert_eq!(code(&r), "busy");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    // Concurrent commands: every one gets its answer; two snapshots at once are taken
    // one after the other or refused clearly, never interleaved.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (vm1, dir) = (vm1.clone(), t.0.clone());
            std::thread::spawn(move || {
                if i < 2 {
                    let snap = dir.join(format!("c{i}.cow"));
                    let o = cowdisk(&["snapshot", s(&vm1), s(&snap), "-q"]);
                    let err = String::from_utf8_lossy(&o.stderr).into_owned();
                    assert!(
                        o.status.success() || err.contains("another snapshot"),
                        "{err}"
                    );
                    o.status.success()
                } else {
                    let v = cowdisk_json(&["map", s(&vm1)]);
                    assert!(v.as_array().unwrap().len() > 256);
                    true
                }
            })
        })
        .collect();
    let results: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let snaps = results[..2].iter().filter(|&&ok| ok).count() as u64;
    assert!(snaps >= 1);
    assert_eq!(cowdisk_json(&["info", s(&vm1)])["depth"], 2 + snaps);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 1 0 4k",
            "-c",
            "write -P 2 8k 4k",
            &uri,
        ],
        60,
    );
    drop(deaf);
    assert!(srv.stop().success());
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
}
