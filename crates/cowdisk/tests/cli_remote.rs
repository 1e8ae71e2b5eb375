//! Chains with remote base layers through the tool, against a real S3 server
//! (SeaweedFS on 127.0.0.1): push, create --backing s3://, info/check/export/serve/pull,
//! a shared host cache across processes, serve killed mid-fetch, errors and image roots.

mod cli_common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use cli_common::*;
use serde_json::Value;
use test_support::have_tool;
use test_support::s3server::{S3Server, BUCKET};

const MIB: u64 = 1 << 20;

/// The server's environment plus a cache folder.
struct Env(Vec<(String, String)>);

impl Env {
    fn new(s: &S3Server, cache: &Path) -> Env {
        let mut v = s.env();
        v.push(("COWDISK_CACHE_DIR".into(), cache.display().to_string()));
        Env(v)
    }
    fn pairs(&self) -> Vec<(&str, &str)> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
    fn run(&self, args: &[&str]) -> Output {
        run_env(args, &self.pairs())
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "cowdisk {args:?}: {}", stderr(&o));
        stdout(&o)
    }
    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON")
    }
    /// Expects exit 1 and one `cowdisk: ` line containing `needle`.
    fn fails(&self, args: &[&str], needle: &str) -> String {
        let o = self.run(args);
        let e = stderr(&o);
        assert_eq!(code(&o), 1, "cowdisk {args:?}: {e}");
        assert!(
            e.starts_with("cowdisk: ") && e.trim_end().lines().count() == 1,
            "{e:?}"
        );
        assert!(
            e.contains(needle) && !e.contains("panicked"),
            "{e:?} lacks {needle:?}"
        );
        e
    }
    fn serve(&self, images: &[&Path], socket: &Path, extra: &[&str]) -> Child {
        let mut c = Command::new(BIN);
        c.arg("serve")
            .args(images)
            .arg("--socket")
            .arg(socket)
            .args(extra);
        for (k, v) in &self.0 {
            c.env(k, v);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..300 {
            if socket.exists() {
                return child;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("serve exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop(child);
        panic!("serve did not start");
    }
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// qemu-img compare of a raw file and an NBD export.
fn compare(raw: &Path, nbd: &str) -> bool {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(raw)
        .arg(nbd)
        .output()
        .unwrap();
    o.status.success()
}

/// l1 ← l2 ← l3 (sealed) ← top.cow (writable, empty), 512 MiB virtual; exports the
/// content to local.raw.
fn chain(t: &Tmp) {
    let big = |n: u64, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    ok(&["create", &t.s("l1.cow"), "--size", "512M"]);
    write(
        &t.p("l1.cow"),
        &[(0, big(4 * MIB, 1)), (300 * MIB, big(MIB, 2))],
    );
    ok(&["create", &t.s("l2.cow"), "--backing", &t.s("l1.cow")]);
    write(&t.p("l2.cow"), &[(MIB + 512, big(100_000, 3))]);
    ok(&["create", &t.s("l3.cow"), "--backing", &t.s("l2.cow")]);
    write(&t.p("l3.cow"), &[(400 * MIB, big(2 * MIB, 4))]);
    ok(&["create", &t.s("top.cow"), "--backing", &t.s("l3.cow")]);
    ok(&["export", &t.s("top.cow"), &t.s("local.raw")]);
}

fn write(image: &Path, w: &[(u64, Vec<u8>)]) {
    let d = cowdisk_core::Disk::open(image, &cowdisk_core::OpenOptions::new()).unwrap();
    for (off, data) in w {
        d.write(*off, data, cowdisk_core::WriteFlags::default())
            .unwrap();
    }
    d.flush().unwrap();
}

fn push(env: &Env, t: &Tmp, prefix: &str) -> (String, Value) {
    let v = env.json(&[
        "push",
        &t.s("top.cow"),
        &format!("s3://{BUCKET}/{prefix}"),
        "--json",
    ]);
    (v["url"].as_str().unwrap().to_string(), v)
}

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
    let s = env.serve(&[&t.p("r1.cow"), &t.p("r2.cow")], &sock, &[]);
    assert!(compare(&local, &uri(&sock, "r1.cow")));
    assert!(compare(&local, &uri(&sock, "r2.cow")));
    let map = Command::new("nbdinfo")
        .arg("--map")
        .arg(uri(&sock, "r1.cow"))
        .output()
        .unwrap();
    let map = String::from_utf8_lossy(&map.stdout).to_string();
    assert!(map.lines().next().unwrap_or("").contains("data"), "{map}");
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
        std::fs::read_dir(t.p("cache2/v1")).unwrap().count(),
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
fn store_outage_under_serve() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = Tmp::new("remote-outage");
    let Some(mut server) = S3Server::start(&t.0) else {
        return;
    };
    let env = Env::new(&server, &t.p("cache"));
    chain(&t);
    let (url, _) = push(&env, &t, "out");
    env.ok(&["create", &t.s("r.cow"), "--backing", &url]);
    let sock = t.p("s");
    let s = env.serve(&[&t.p("r.cow")], &sock, &["--remote-deadline", "3"]);
    let u = uri(&sock, "r.cow");
    let io = |cmd: &str| {
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &u])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    };
    assert!(io("read 0 64k").contains("read 65536/65536"));
    server.stop();
    assert!(
        io("read 0 64k").contains("read 65536/65536"),
        "cached block still reads"
    );
    let started = std::time::Instant::now();
    let r = io(&format!("read {} 64k", 300 * MIB));
    assert!(r.contains("Input/output error"), "{r}");
    // A bound against hanging (deadline 3 s), not a performance assertion.
    assert!(started.elapsed() < Duration::from_secs(40));
    let w = io(&format!("write -P 7 {} 512", 300 * MIB + 4096));
    assert!(w.contains("Input/output error"), "copy-up fails: {w}");
    server.restart();
    let r = io(&format!("read -P 0 {} 512", 0x1234_5678u64 & !511));
    assert!(!r.contains("error"), "{r}");
    let r = io(&format!("read {} 64k", 300 * MIB));
    assert!(
        r.contains("read 65536/65536"),
        "works again without restart: {r}"
    );
    stop(s);
}

#[test]
fn bad_urls_missing_objects_credentials_and_image_roots() {
    let t = Tmp::new("remote-errors");
    let Some(server) = S3Server::start(&t.0) else {
        return;
    };
    let env = Env::new(&server, &t.p("cache"));
    env.fails(
        &["create", &t.s("a.cow"), "--backing", "s3://Bad_Bucket/x"],
        "bad s3 URL",
    );
    env.fails(
        &[
            "create",
            &t.s("a.cow"),
            "--backing",
            &format!("s3://{BUCKET}/nope.cdlayer"),
        ],
        "no such object",
    );
    env.fails(&["push", &t.s("a.cow"), "s3://x"], "bad s3 URL");
    // Half-configured credentials: named, never echoed.
    let mut half = Env::new(&server, &t.p("cache"));
    half.0
        .push(("AWS_ACCESS_KEY_ID".into(), "AKIAEXAMPLEKEY".into()));
    let e = half.fails(
        &[
            "create",
            &t.s("a.cow"),
            "--backing",
            &format!("s3://{BUCKET}/x.cdlayer"),
        ],
        "AWS_SECRET_ACCESS_KEY",
    );
    assert!(!e.contains("AKIAEXAMPLEKEY"), "{e}");
    // A non-layer object.
    server.put("junk/plain.txt", b"hello, not a layer");
    env.fails(
        &[
            "create",
            &t.s("a.cow"),
            "--backing",
            &format!("s3://{BUCKET}/junk/plain.txt"),
        ],
        "not a cowdisk layer object",
    );

    chain(&t);
    let (url, _) = push(&env, &t, "roots/a");
    env.ok(&["create", &t.s("r.cow"), "--backing", &url]);
    env.fails(
        &[
            "info",
            &t.s("r.cow"),
            "--image-root",
            &format!("s3://{BUCKET}/roots/b"),
        ],
        "outside every image root",
    );
    env.fails(
        &[
            "info",
            &t.s("r.cow"),
            "--image-root",
            &t.0.display().to_string(),
        ],
        "outside every image root",
    );
    env.ok(&[
        "info",
        &t.s("r.cow"),
        "--image-root",
        &format!("s3://{BUCKET}/roots/a"),
    ]);
}

/// Allocated bytes of the cache files under `dir`.
fn cached_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.join("v1"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.metadata().unwrap().blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
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

#[test]
fn signed_writes_profiles_and_anonymous_reads_of_a_public_bucket() {
    let t = Tmp::new("remote-signed");
    let (key, secret) = ("AKIDCOWDISKTEST", "cowdiskSecretValue123");
    let Some(server) = S3Server::start_signed(&t.0, key, secret) else {
        return;
    };
    let anon = Env::new(&server, &t.p("cache"));
    chain(&t);
    let top = t.s("top.cow");
    let dest = format!("s3://{BUCKET}/signed");
    let e = anon.fails(&["push", &top, &dest], "HTTP 403");
    assert!(!e.contains("X-Amz") && !e.contains("http://"), "{e}");

    // Wrong secret: refused, and neither the key id nor the secret is printed.
    let mut wrong = Env::new(&server, &t.p("cache"));
    wrong.0.push(("AWS_ACCESS_KEY_ID".into(), key.into()));
    wrong
        .0
        .push(("AWS_SECRET_ACCESS_KEY".into(), "notTheSecret".into()));
    let e = wrong.fails(&["push", &top, &dest], "403");
    assert!(!e.contains(key) && !e.contains("notTheSecret"), "{e}");

    // Right credentials from the environment.
    let mut env = Env::new(&server, &t.p("cache"));
    env.0.push(("AWS_ACCESS_KEY_ID".into(), key.into()));
    env.0.push(("AWS_SECRET_ACCESS_KEY".into(), secret.into()));
    let url = env.ok(&["push", &top, &dest]).trim().to_string();

    // Right credentials from a profile in the shared credentials file.
    std::fs::write(
        t.p("credentials"),
        format!("[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n\n[ci]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let mut prof = Env::new(&server, &t.p("cache"));
    prof.0.retain(|(k, _)| k != "AWS_SHARED_CREDENTIALS_FILE");
    prof.0
        .push(("AWS_SHARED_CREDENTIALS_FILE".into(), t.s("credentials")));
    prof.0.push(("AWS_PROFILE".into(), "ci".into()));
    let url2 = prof
        .ok(&["push", &top, &format!("s3://{BUCKET}/profile")])
        .trim()
        .to_string();
    assert!(
        url2.ends_with(url.rsplit('/').next().unwrap()),
        "same content name: {url2}"
    );

    // Anyone may read: an anonymous client builds on the pushed chain.
    anon.ok(&["create", &t.s("r.cow"), "--backing", &url]);
    anon.ok(&["export", &t.s("r.cow"), &t.s("r.raw")]);
    assert_eq!(hash(&t.p("r.raw")), hash(&t.p("local.raw")));
}

#[test]
fn https_certificates_are_verified() {
    let t = Tmp::new("remote-tls");
    let Some(server) = S3Server::start_tls(&t.0) else {
        return;
    };
    let mut env = Env::new(&server, &t.p("cache"));
    env.0.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.0
        .push(("AWS_ENDPOINT_URL".into(), server.https_endpoint()));
    chain(&t);
    let dest = format!("s3://{BUCKET}/tls");
    // Not trusted: refused at once (not retried until the deadline), one line.
    env.fails(
        &["push", &t.s("top.cow"), &dest],
        "TLS: invalid peer certificate",
    );
    env.0.push((
        "SSL_CERT_FILE".into(),
        server.ca_file().display().to_string(),
    ));
    let url = env.ok(&["push", &t.s("top.cow"), &dest]).trim().to_string();
    env.ok(&["create", &t.s("r.cow"), "--backing", &url]);
    env.ok(&["export", &t.s("r.cow"), &t.s("r.raw")]);
    assert_eq!(hash(&t.p("r.raw")), hash(&t.p("local.raw")));
}

#[test]
fn a_push_killed_mid_upload_leaves_no_partial_object() {
    let t = Tmp::new("remote-killpush");
    let Some(server) = S3Server::start(&t.0) else {
        return;
    };
    let env = Env::new(&server, &t.p("cache"));
    // 40 MiB of data: a multipart upload of five 8 MiB parts.
    ok(&["create", &t.s("big.cow"), "--size", "256M"]);
    let data: Vec<u8> = (0..40 * MIB)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    write(&t.p("big.cow"), &[(8 * MIB, data)]);
    ok(&["create", &t.s("top.cow"), "--backing", &t.s("big.cow")]);
    ok(&["export", &t.s("top.cow"), &t.s("local.raw")]);
    for delay_ms in [50, 200, 600] {
        let dest = format!("s3://{BUCKET}/kill{delay_ms}");
        let mut c = Command::new(BIN);
        c.args(["push", &t.s("top.cow"), &dest]);
        for (k, v) in &env.0 {
            c.env(k, v);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        stop(child);
        // Whatever the moment of the kill: no object (the next push uploads it), or a
        // whole one (the next push finds it); a partial object would fail its length
        // check here, or its CRCs on export.
        let v = env.json(&["push", &t.s("top.cow"), &dest, "--json"]);
        let url = v["url"].as_str().unwrap().to_string();
        let r = t.p(&format!("r{delay_ms}.cow"));
        let raw = t.p(&format!("r{delay_ms}.raw"));
        env.ok(&["create", &r.display().to_string(), "--backing", &url]);
        env.ok(&[
            "export",
            &r.display().to_string(),
            &raw.display().to_string(),
        ]);
        assert_eq!(
            hash(&raw),
            hash(&t.p("local.raw")),
            "after a kill at {delay_ms} ms: {v}"
        );
    }
    // Something else under the layer's name is never taken for it.
    let v = env.json(&[
        "push",
        &t.s("top.cow"),
        &format!("s3://{BUCKET}/kill50"),
        "--json",
    ]);
    let url = v["url"].as_str().unwrap();
    let key = url
        .strip_prefix(&format!("s3://{BUCKET}/"))
        .unwrap()
        .replace("kill50", "junk");
    server.put(&key, b"not a layer");
    let e = env.fails(
        &["push", &t.s("top.cow"), &format!("s3://{BUCKET}/junk")],
        "exists with 11 bytes",
    );
    assert!(e.contains(&key), "{e}");
}
