//! A real S3-compatible server for tests: SeaweedFS (`weed mini`, installed by
//! `tools/install-deps.sh`) on 127.0.0.1 only, telemetry off, data in a temp folder,
//! every port chosen free so test processes can run side by side.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket every server starts with.
pub const BUCKET: &str = "cowdisk-test";

/// A running (or stopped, restartable) SeaweedFS.
pub struct S3Server {
    weed: PathBuf,
    dir: PathBuf,
    ports: [u16; 6],
    child: Option<Child>,
    signed: bool,
    tls: bool,
}

/// Six free ports whose gRPC twins (+10000) are free too.
fn free_ports() -> [u16; 6] {
    let mut out = Vec::new();
    let mut held = Vec::new();
    while out.len() < 6 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        held.push(l);
        if p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            out.push(p);
        }
    }
    out.try_into().expect("six")
}

impl S3Server {
    /// Starts a server with data in `dir`; `None` (after the CI rule: a failure under
    /// `CI=true`) if `weed` is not installed.
    pub fn start(dir: &Path) -> Option<S3Server> {
        S3Server::start_with(dir, None)
    }

    /// A server where writing needs a signature by `key`/`secret` and anyone may read
    /// (a public bucket), for tests of signing and of anonymous access.
    pub fn start_signed(dir: &Path, key: &str, secret: &str) -> Option<S3Server> {
        S3Server::start_with(dir, Some((key, secret)))
    }

    /// A server that also serves HTTPS, with a certificate for 127.0.0.1 issued by a
    /// test CA ([`S3Server::ca_file`]); `None` (after the CI rule) without openssl.
    pub fn start_tls(dir: &Path) -> Option<S3Server> {
        if !crate::have_tool("openssl") {
            return None;
        }
        let mut s = S3Server::start_with(dir, None)?;
        s.stop();
        make_certs(&s.dir);
        s.tls = true;
        s.restart();
        Some(s)
    }

    /// The test CA's certificate (PEM), for `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `https://127.0.0.1:PORT` (servers from [`S3Server::start_tls`]).
    pub fn https_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports[5])
    }

    fn start_with(dir: &Path, creds: Option<(&str, &str)>) -> Option<S3Server> {
        let weed = crate::find_tool("weed");
        if !crate::require(
            weed.is_some(),
            "tool weed (SeaweedFS; tools/install-deps.sh)",
        ) {
            return None;
        }
        let mut s = S3Server {
            weed: weed.expect("checked"),
            dir: dir.join("weed"),
            ports: free_ports(),
            child: None,
            signed: creds.is_some(),
            tls: false,
        };
        std::fs::create_dir_all(&s.dir).expect("weed folder");
        if let Some((key, secret)) = creds {
            let cfg = format!(
                r#"{{"identities":[{{"name":"anonymous","actions":["Read","List"]}},{{"name":"writer","credentials":[{{"accessKey":"{key}","secretKey":"{secret}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#
            );
            std::fs::write(s.dir.join("s3.json"), cfg).expect("s3 config");
        }
        // A port taken by another process between `free_ports` and the server's bind
        // is the usual reason it does not come up: fresh ports once more, then fail.
        for attempt in 0.. {
            match s.launch() {
                Ok(()) => break,
                Err(e) if attempt < 2 => {
                    eprintln!("SeaweedFS did not come up ({e}); trying other ports");
                    s.ports = free_ports();
                    // Its data, which may name the old ports; the config stays.
                    for f in std::fs::read_dir(&s.dir).expect("weed folder").flatten() {
                        if f.file_name() != "s3.json" {
                            let p = f.path();
                            let _ =
                                std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                        }
                    }
                }
                Err(e) => panic!("SeaweedFS did not come up: {e}"),
            }
        }
        Some(s)
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }

    /// Environment for a client of this server: endpoint, region, and no credentials
    /// or profile from the machine running the tests (anonymous access).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()),
            ("AWS_CONFIG_FILE".into(), "/nonexistent".into()),
        ]
    }

    /// Kills the server (as a crash would) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data, and waits until it serves.
    pub fn restart(&mut self) {
        if let Err(e) = self.launch() {
            panic!("SeaweedFS did not come up again: {e}");
        }
    }

    /// Starts the server and waits until it serves; else stops it and says why, with the
    /// end of its log (the log file goes with the test's temporary folder).
    fn launch(&mut self) -> Result<(), String> {
        self.stop();
        let p = self.ports;
        let log = std::fs::File::create(self.dir.join("weed.log")).expect("log");
        let d = &self.dir;
        let tls: Vec<String> = if self.tls {
            vec![
                format!("-s3.cert.file={}", d.join("cert.pem").display()),
                format!("-s3.key.file={}", d.join("key.pem").display()),
                format!("-s3.port.https={}", p[5]),
            ]
        } else {
            Vec::new()
        };
        let child = Command::new(&self.weed)
            .arg("mini")
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
            ])
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-dir={}", self.dir.display()))
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-volume.port={}", p[1]))
            .arg(format!("-filer.port={}", p[2]))
            .arg(format!("-s3.port={}", p[3]))
            .arg(format!("-admin.port={}", p[4]))
            .args(
                self.signed
                    .then(|| format!("-s3.config={}", self.dir.join("s3.json").display())),
            )
            .args(&tls)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start weed");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(60);
        let mut why = "not serving after 60 s".to_string();
        while Instant::now() < until {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                why = format!("weed exited ({st})");
                break;
            }
            // Ready when an object can be written and read back (the bucket listing
            // answers before the data servers do).
            if self.status(&format!("/{BUCKET}/")) == Some(200)
                && (self.signed
                    || (self.try_put(".ready", b"ok") == Some(200)
                        && self.status(&format!("/{BUCKET}/.ready")) == Some(200)))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.stop();
        let log = std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{why}, ports {:?}; last lines of weed.log:\n{}",
            self.ports,
            tail.join("\n")
        ))
    }

    /// HTTP status of an anonymous GET of `path` on the S3 port.
    pub fn status(&self, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.ports[3])).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// Overwrites object `key` with `body` (anonymous PUT): for damage tests.
    pub fn put(&self, key: &str, body: &[u8]) {
        assert_eq!(self.try_put(key, body), Some(200), "PUT {key}");
    }

    /// HTTP status of an anonymous PUT of `body` as `key`.
    fn try_put(&self, key: &str, body: &[u8]) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.ports[3])).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let len = body.len();
        write!(
            s,
            "PUT /{BUCKET}/{key} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n\r\n"
        )
        .ok()?;
        s.write_all(body).ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// The whole object `key` (anonymous GET).
    pub fn get(&self, key: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.ports[3])).expect("connect");
        write!(s, "GET /{BUCKET}/{key} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("write");
        let mut all = Vec::new();
        s.read_to_end(&mut all).expect("read");
        let at = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("headers")
            + 4;
        assert_eq!(&all[9..12], b"200", "GET {key}");
        all.split_off(at)
    }
}

/// A test CA and a leaf certificate for 127.0.0.1 signed by it (rustls refuses a
/// self-signed CA certificate used as the server's own).
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let rsa = ["-newkey", "rsa:2048", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &rsa,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cowdisk-test-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &rsa,
        &[
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
