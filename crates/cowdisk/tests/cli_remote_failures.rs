//! Remote layers when things go wrong, against a real S3 server (SeaweedFS on
//! 127.0.0.1): the store stopping under serve, bad URLs and objects, credentials,
//! TLS verification, image roots, a push killed mid-upload.

mod cli_common;
#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod remote_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use cli_common::*;
use common::have_python_nbd;
use remote_common::*;
use test_support::have_tool;
use test_support::s3server::{S3Server, BUCKET};

/// Reads offset 0 (cached) a few times, then a cold block (argv 2) and, 50 ms later, offset
/// 0 again; prints the order in which they completed.
const BEHIND_A_FETCH_PY: &str = r#"
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for _ in range(3):
    h.pread(4096, 0)
order = []
def done(name):
    def cb(err):
        order.append(name)
        return 1
    return cb
h.aio_pread(nbd.Buffer(65536), int(sys.argv[2]), completion=done("cold"))
time.sleep(0.05)
h.aio_pread(nbd.Buffer(4096), 0, completion=done("warm"))
while len(order) < 2:
    h.poll(-1)
print(" ".join(order))
"#;

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
    if have_python_nbd() {
        // A read waiting on the stopped store does not hold back one sent after it, even
        // alone in flight: a remote layer's requests never keep the connection's input.
        let o = Command::new("/usr/bin/python3")
            .args(["-c", BEHIND_A_FETCH_PY, &u, &(300 * MIB).to_string()])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            out.trim(),
            "warm cold",
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
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

    ok(&["create", &t.s("alone.cow"), "--size", "1M"]);
    env.fails(
        &["push", &t.s("alone.cow"), &format!("s3://{BUCKET}/p")],
        "snapshot the image first",
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
        stop(Running(child));
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
