//! Chains with remote base layers through the tool, against a real S3 server
//! (SeaweedFS on 127.0.0.1): push, create --backing s3://, info/check/map/flatten/
//! snapshot/squash/export/pull, serving two tops (one process; two processes sharing a
//! cache), serve killed mid-fetch, trace record and prefetch, warm reads while another
//! process evicts the cache.

mod cli_common;
mod remote_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use cli_common::*;
use remote_common::*;
use test_support::have_tool;
use test_support::s3server::{S3Server, BUCKET};

#[test]
fn push_create_inspect_export_pull() {
    let t = Tmp::new("remote-push");
    let Some(server) = S3Server::start(&t.0) else {
        return;
    };
    let env = Env::new(&server, &t.p("cache"));
    chain(&t);
    let (url, v) = push(&env, &t, "imgs");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{v}");
    for (l, held) in layers.iter().zip([5 * MIB, 2 * 64 * 1024, 2 * MIB]) {
        let (up, len) = (
            l["uploaded_bytes"].as_u64().unwrap(),
            l["object_bytes"].as_u64().unwrap(),
        );
        assert_eq!(up, len);
        assert!(
            len >= held && len < held + 64 * 1024,
            "object of {len} bytes for {held} bytes of data"
        );
    }
    let (url2, v2) = push(&env, &t, "imgs");
    assert_eq!(url, url2);
    assert!(
        v2["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["uploaded_bytes"] == 0),
        "{v2}"
    );

    env.ok(&["create", &t.s("r1.cow"), "--backing", &url]);
    let info = env.json(&["info", &t.s("r1.cow"), "--json"]);
    let remote: Vec<bool> = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["remote"].as_bool().unwrap())
        .collect();
    assert_eq!(remote, [false, true, true, true]);
    let out = env.ok(&["check", &t.s("r1.cow")]);
    assert!(out.contains("No errors"), "{out}");
    let c = env.json(&["check", &t.s("r1.cow"), "--json"]);
    assert_eq!(c["remote_layers"].as_array().unwrap().len(), 3, "{c}");
    assert_eq!(
        c["blocks_verified"],
        info["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["data_blocks"].as_u64().unwrap())
            .sum::<u64>()
    );
    env.ok(&["export", &t.s("r1.cow"), &t.s("r1.raw")]);
    assert_eq!(hash(&t.p("r1.raw")), hash(&t.p("local.raw")));

    // map names the remote layers; flatten, snapshot and squash work over them.
    let map = env.ok(&["map", &t.s("r1.cow")]);
    assert!(map.contains(&format!("s3://{BUCKET}/imgs/")), "{map}");
    env.ok(&["flatten", &t.s("r1.cow"), &t.s("flat.cow")]);
    ok(&["export", &t.s("flat.cow"), &t.s("flat.raw")]);
    assert_eq!(hash(&t.p("flat.raw")), hash(&t.p("local.raw")));
    env.ok(&["snapshot", &t.s("r1.cow"), &t.s("r1-snap.cow")]);
    // A local sealed layer over the remote chain pushes alone, naming its parent object
    // by full URL (another prefix).
    let v = env.json(&[
        "push",
        &t.s("r1.cow"),
        &format!("s3://{BUCKET}/second"),
        "--json",
    ]);
    let ls = v["layers"].as_array().unwrap();
    let uploaded: Vec<bool> = ls.iter().map(|l| l["uploaded_bytes"] != 0).collect();
    assert_eq!(uploaded, [false, false, false, true], "{v}");
    env.ok(&[
        "create",
        &t.s("second.cow"),
        "--backing",
        v["url"].as_str().unwrap(),
    ]);
    env.ok(&["export", &t.s("second.cow"), &t.s("second.raw")]);
    assert_eq!(hash(&t.p("second.raw")), hash(&t.p("local.raw")));
    env.ok(&["squash", &t.s("r1.cow")]);
    let info = env.json(&["info", &t.s("r1.cow"), "--json"]);
    assert_eq!(info["depth"], 2, "squashed into one local layer: {info}");
    assert!(info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["remote"] == false));
    env.ok(&["export", &t.s("r1.cow"), &t.s("sq.raw")]);
    assert_eq!(hash(&t.p("sq.raw")), hash(&t.p("local.raw")));

    let dir = t.p("pulled");
    let top = env.ok(&["pull", &url, &dir.display().to_string()]);
    let top = top.trim();
    ok(&["create", &t.s("p.cow"), "--backing", top]);
    ok(&["export", &t.s("p.cow"), &t.s("p.raw")]);
    assert_eq!(hash(&t.p("p.raw")), hash(&t.p("local.raw")));
}

#[test]
fn serve_two_tops_shared_cache_and_kill_9_mid_fetch() {
    if !have_tool("qemu-img") || !have_tool("nbdinfo") {
        return;
    }
    let t = Tmp::new("remote-serve");
    let Some(server) = S3Server::start(&t.0) else {
        return;
    };
    let env = Env::new(&server, &t.p("cache"));
    chain(&t);
    let (url, _) = push(&env, &t, "srv");
    for n in ["r1.cow", "r2.cow", "r3.cow"] {
        env.ok(&["create", &t.s(n), "--backing", &url]);
    }
    let local = t.p("local.raw");

    // Two tops on one base in one process.
    let sock = t.p("s1");
    let s = env.serve(
        &[&t.p("r1.cow"), &t.p("r2.cow"), &t.p("top.cow")],
        &sock,
        &[],
    );
    assert!(compare(&local, &uri(&sock, "r1.cow")));
    assert!(compare(&local, &uri(&sock, "r2.cow")));
    // Block status over the remote chain is the local chain's (same layers, same depths).
    let map = |export: &str| {
        let o = Command::new("nbdinfo")
            .arg("--map")
            .arg(uri(&sock, export))
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let (remote, local_map) = (map("r1.cow"), map("top.cow"));
    assert!(
        remote.lines().next().unwrap_or("").contains("data"),
        "{remote}"
    );
    assert_eq!(remote, local_map);
    stop(s);

    // Two processes sharing one (fresh) cache folder; one cache file per layer.
    let env2 = Env::new(&server, &t.p("cache2"));
    let (sa, sb) = (t.p("sa"), t.p("sb"));
    let a = env2.serve(&[&t.p("r1.cow")], &sa, &[]);
    let b = env2.serve(&[&t.p("r2.cow")], &sb, &[]);
    let (ua, ub) = (uri(&sa, "r1.cow"), uri(&sb, "r2.cow"));
    let ja = std::thread::spawn({
        let l = local.clone();
        move || compare(&l, &ua)
    });
    assert!(compare(&local, &ub));
    assert!(ja.join().unwrap());
    stop(a);
    stop(b);
    assert_eq!(
        std::fs::read_dir(t.p("cache2/v2")).unwrap().count(),
        3,
        "one cache file per layer"
    );

    // kill -9 of serve while it fetches, then a clean start on the same cache.
    let env3 = Env::new(&server, &t.p("cache3"));
    let sk = t.p("sk");
    let k = env3.serve(&[&t.p("r3.cow")], &sk, &[]);
    let mut reader = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&sk, "r3.cow"),
            &t.s("partial.raw"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop(k);
    let _ = reader.wait();
    let _ = std::fs::remove_file(&sk);
    let k = env3.serve(&[&t.p("r3.cow")], &sk, &[]);
    assert!(
        compare(&local, &uri(&sk, "r3.cow")),
        "consistent after kill -9"
    );
    stop(k);
    let out = env3.ok(&["check", &t.s("r3.cow")]);
    assert!(out.contains("No errors"), "{out}");
}

#[test]
fn serve_record_trace_then_prefetch_on_a_cold_cache() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = Tmp::new("remote-trace");
    let Some(server) = S3Server::start(&t.0) else {
        return;
    };
    let env = Env::new(&server, &t.p("cache-a"));
    chain(&t);
    let (url, _) = push(&env, &t, "tr");
    env.ok(&["create", &t.s("r1.cow"), "--backing", &url]);
    env.ok(&["create", &t.s("r2.cow"), "--backing", &url]);
    let trace = t.s("boot.trace");
    let sock = t.p("s1");
    let s = env.serve(&[&t.p("r1.cow")], &sock, &["--record-trace", &trace]);
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read 0 512k",
            "-c",
            "read 400M 64k",
            &uri(&sock, "r1.cow"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    stop(s);
    let text = std::fs::read_to_string(&trace).unwrap();
    // Blocks that missed the cache: the first of each 256 KiB unit read (its fetch
    // brings the rest of the unit), in both layers read.
    assert!(text.lines().count() >= 4, "{text}");

    // A cold cache: the traced blocks arrive without any client reading them.
    let env_b = Env::new(&server, &t.p("cache-b"));
    let sock = t.p("s2");
    let s = env_b.serve(&[&t.p("r2.cow")], &sock, &["--prefetch", &trace]);
    let want = 512 * 1024 + 64 * 1024;
    let mut got = 0;
    for _ in 0..600 {
        got = cached_bytes(&t.p("cache-b"));
        if got >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(s);
    assert!(got >= want, "prefetched {got} bytes of {want}");
    env.fails(
        &["info", &t.s("r1.cow"), "--prefetch", &t.s("l1.cow")],
        "not a cowdisk trace",
    );
}

/// The eviction generation of a cache folder (`v2.evictions`: bumped by every eviction of
/// any process).
fn evictions(cache: &std::path::Path) -> u64 {
    let b = std::fs::read(cache.join("v2.evictions")).unwrap_or_default();
    b.get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
}

/// Warm reads go out of the host cache by descriptor (spliced, then checked against the
/// eviction generation): they stay exact while another process keeps emptying the cache
/// folder under them (this test's own, with a bound of zero).
#[test]
fn warm_reads_stay_exact_while_another_process_evicts() {
    if !have_tool("qemu-img") {
        return;
    }
    let t = Tmp::new("remote-evict");
    let Some(server) = S3Server::start(&t.0) else {
        return;
    };
    let cache = t.p("cache");
    let env = Env::new(&server, &cache);
    chain(&t);
    let (url, _) = push(&env, &t, "ev");
    env.ok(&["create", &t.s("e1.cow"), "--backing", &url]);
    let local = t.p("local.raw");
    let s1 = t.p("s1");
    let a = env.serve(&[&t.p("e1.cow")], &s1, &[]);
    assert!(compare(&local, &uri(&s1, "e1.cow")), "cold");
    assert!(compare(&local, &uri(&s1, "e1.cow")), "warm");
    let before = evictions(&cache);
    let stop_evicting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let evictor = std::thread::spawn({
        let (cache, stop) = (cache.clone(), stop_evicting.clone());
        move || {
            let dir = cowdisk_remote::cache::CacheDir::new(&cache, 0).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                dir.enforce();
                std::thread::sleep(Duration::from_millis(15));
            }
        }
    });
    for i in 0..6 {
        assert!(
            compare(&local, &uri(&s1, "e1.cow")),
            "read {i} while evicting"
        );
    }
    stop_evicting.store(true, std::sync::atomic::Ordering::Relaxed);
    evictor.join().unwrap();
    stop(a);
    assert!(
        evictions(&cache) > before + 2,
        "evicted more than once meanwhile"
    );
}
