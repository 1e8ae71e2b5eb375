//! A small synchronous S3 client: rusty-s3 signs (SigV4, presigned URLs), ureq moves the
//! bytes. The engine is synchronous, so a blocking client fits it; parallelism comes from
//! threads in the fetcher, bounded there.
//!
//! Signed URLs carry the access key id in their query, so no URL is ever formatted into
//! an error: failures are described by object, operation, status and S3 error code only.
//! Redirects are not followed (a signed request must not be replayed to another host).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusty_s3::actions::{CompleteMultipartUpload, CreateMultipartUpload, S3Action};
use rusty_s3::Bucket;
use url::Url;

use crate::config::StoreConfig;
use crate::error::{RemoteError, Result};
use crate::url::S3Url;

/// How long a signed URL stays valid; each attempt signs afresh, so this only has to
/// outlive one request.
const SIGN_FOR: Duration = Duration::from_secs(600);
/// Longest single attempt of a metadata request or upload.
const ATTEMPT: Duration = Duration::from_secs(60);
/// First retry delay; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Error bodies are read up to this many bytes, for the S3 error code.
const MAX_ERROR_BODY: u64 = 4096;

/// Requests made, for reports and tests (each is one HTTP request that got an answer).
#[derive(Debug, Default)]
pub struct Stats {
    /// Range GETs answered with data.
    pub gets: AtomicU64,
    /// Bytes those GETs returned.
    pub get_bytes: AtomicU64,
    /// PUTs (whole objects and parts).
    pub puts: AtomicU64,
    /// Bytes uploaded.
    pub put_bytes: AtomicU64,
}

/// One store: its configuration, an HTTP agent with pooled connections, counters.
pub struct Client {
    cfg: StoreConfig,
    agent: ureq::Agent,
    /// Request counters.
    pub stats: Stats,
}

impl Client {
    /// A client for `cfg`; connects lazily.
    pub fn new(cfg: StoreConfig) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .redirects(0)
            .max_idle_connections_per_host(32)
            .build();
        Client {
            cfg,
            agent,
            stats: Stats::default(),
        }
    }

    fn bucket(&self, url: &S3Url) -> Result<Bucket> {
        Bucket::new(
            self.cfg.endpoint.clone(),
            self.cfg.style,
            url.bucket.clone(),
            self.cfg.region.clone(),
        )
        .map_err(|_| RemoteError::BadUrl {
            url: url.to_string(),
            reason: "the bucket cannot be addressed at this endpoint".into(),
        })
    }

    /// The object's length, or `None` if it does not exist.
    pub fn head(&self, url: &S3Url, deadline: Instant) -> Result<Option<u64>> {
        let b = self.bucket(url)?;
        let r = retry(url, "HEAD", deadline, || {
            let signed = b
                .head_object(self.cfg.credentials.as_ref(), &url.key)
                .sign(SIGN_FOR);
            match self.send(url, "HEAD", "HEAD", &signed, &[], None, deadline) {
                Ok(resp) => Ok(Some(content_length(url, "HEAD", &resp)?)),
                Err(RemoteError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        Ok(r)
    }

    /// [`Client::get_range`] for an object known to exist (opened already): a missing
    /// object is retried like a transient failure until `deadline`.
    pub fn get_known(
        &self,
        url: &S3Url,
        offset: u64,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.get(url, offset, buf, deadline, true)
    }

    /// Fills `buf` from the object's bytes at `offset` (one range GET per attempt),
    /// retrying transient failures until `deadline`.
    pub fn get_range(
        &self,
        url: &S3Url,
        offset: u64,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.get(url, offset, buf, deadline, false)
    }

    fn get(
        &self,
        url: &S3Url,
        offset: u64,
        buf: &mut [u8],
        deadline: Instant,
        known: bool,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let b = self.bucket(url)?;
        let last = offset + buf.len() as u64 - 1;
        let range = format!("bytes={offset}-{last}");
        retry(url, "GET", deadline, || {
            let signed = b
                .get_object(self.cfg.credentials.as_ref(), &url.key)
                .sign(SIGN_FOR);
            let resp = match self.send(
                url,
                "GET",
                "GET",
                &signed,
                &[("Range", &range)],
                None,
                deadline,
            ) {
                Err(RemoteError::NotFound { object }) if known => {
                    return Err(RemoteError::Vanished { object })
                }
                r => r?,
            };
            let partial = resp.status() == 206;
            let len = content_length(url, "GET", &resp)?;
            if len != buf.len() as u64 || !(partial || offset == 0) {
                return Err(RemoteError::bad_object(
                    url,
                    format!("range {offset}+{} answered with {len} bytes (object shorter than expected?)", buf.len()),
                ));
            }
            resp.into_reader()
                .take(len)
                .read_exact(buf)
                .map_err(|e| transport(url, "GET", &e.to_string()))?;
            self.stats.gets.fetch_add(1, Ordering::Relaxed);
            self.stats.get_bytes.fetch_add(len, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Writes a whole object in one PUT (it appears only once complete).
    pub fn put(&self, url: &S3Url, body: &[u8], deadline: Instant) -> Result<()> {
        let b = self.bucket(url)?;
        retry(url, "PUT", deadline, || {
            let signed = b
                .put_object(self.cfg.credentials.as_ref(), &url.key)
                .sign(SIGN_FOR);
            self.send(url, "PUT", "PUT", &signed, &[], Some(body), deadline)?;
            self.count_put(body.len());
            Ok(())
        })
    }

    fn count_put(&self, n: usize) {
        self.stats.puts.fetch_add(1, Ordering::Relaxed);
        self.stats.put_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Starts a multipart upload; returns its id.
    pub fn multipart_start(&self, url: &S3Url, deadline: Instant) -> Result<String> {
        let b = self.bucket(url)?;
        retry(url, "start upload", deadline, || {
            let signed = b
                .create_multipart_upload(self.cfg.credentials.as_ref(), &url.key)
                .sign(SIGN_FOR);
            let resp = self.send(
                url,
                "start upload",
                "POST",
                &signed,
                &[],
                Some(&[]),
                deadline,
            )?;
            let text = read_text(url, resp)?;
            let parsed = CreateMultipartUpload::parse_response(&text)
                .map_err(|_| transport(url, "start upload", "unparsable answer"))?;
            Ok(parsed.upload_id().to_string())
        })
    }

    /// Uploads part `n` (1-based); returns its ETag.
    pub fn multipart_part(
        &self,
        url: &S3Url,
        id: &str,
        n: u16,
        body: &[u8],
        deadline: Instant,
    ) -> Result<String> {
        let b = self.bucket(url)?;
        retry(url, "upload part", deadline, || {
            let signed = b
                .upload_part(self.cfg.credentials.as_ref(), &url.key, n, id)
                .sign(SIGN_FOR);
            let resp = self.send(
                url,
                "upload part",
                "PUT",
                &signed,
                &[],
                Some(body),
                deadline,
            )?;
            let etag = resp
                .header("ETag")
                .ok_or_else(|| transport(url, "upload part", "answer has no ETag"))?
                .to_string();
            self.count_put(body.len());
            Ok(etag)
        })
    }

    /// Completes a multipart upload: only now does the object appear under its name.
    pub fn multipart_finish(
        &self,
        url: &S3Url,
        id: &str,
        etags: &[String],
        deadline: Instant,
    ) -> Result<()> {
        let b = self.bucket(url)?;
        retry(url, "complete upload", deadline, || {
            let action: CompleteMultipartUpload<'_, _> = b.complete_multipart_upload(
                self.cfg.credentials.as_ref(),
                &url.key,
                id,
                etags.iter().map(String::as_str),
            );
            let signed = action.sign(SIGN_FOR);
            let body = b
                .complete_multipart_upload(
                    self.cfg.credentials.as_ref(),
                    &url.key,
                    id,
                    etags.iter().map(String::as_str),
                )
                .body();
            let resp = self.send(
                url,
                "complete upload",
                "POST",
                &signed,
                &[],
                Some(body.as_bytes()),
                deadline,
            )?;
            // S3 may answer 200 with an error document when completion fails late.
            let text = read_text(url, resp)?;
            if text.contains("<Error>") {
                return Err(transport(
                    url,
                    "complete upload",
                    "the store reported an error",
                ));
            }
            Ok(())
        })
    }

    /// Abandons a multipart upload (best effort: its parts never form an object).
    pub fn multipart_abort(&self, url: &S3Url, id: &str) {
        if let Ok(b) = self.bucket(url) {
            let signed = b
                .abort_multipart_upload(self.cfg.credentials.as_ref(), &url.key, id)
                .sign(SIGN_FOR);
            let deadline = Instant::now() + Duration::from_secs(10);
            let _ = self.send(url, "abort upload", "DELETE", &signed, &[], None, deadline);
        }
    }

    /// One request. Errors name `url` (the object) and `op`, never the signed URL.
    #[allow(clippy::too_many_arguments)] // one internal call shape for every verb
    fn send(
        &self,
        url: &S3Url,
        op: &'static str,
        method: &str,
        signed: &Url,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<ureq::Response> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(transport(url, op, "deadline reached"));
        }
        let mut req = self
            .agent
            .request_url(method, signed)
            .timeout(left.min(ATTEMPT));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let r = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(404, _)) => Err(RemoteError::NotFound {
                object: url.to_string(),
            }),
            Err(ureq::Error::Status(status, resp)) => Err(RemoteError::Status {
                object: url.to_string(),
                op,
                status,
                code: error_code(resp),
            }),
            Err(ureq::Error::Transport(t)) => match tls_refusal(&t) {
                // Retrying cannot make an untrusted certificate trusted.
                Some(why) => Err(RemoteError::Tls {
                    object: url.to_string(),
                    reason: why,
                }),
                None => Err(transport(url, op, &describe(&t))),
            },
        }
    }
}

/// The transport failure without its URL (ureq's own message includes it).
fn describe(t: &ureq::Transport) -> String {
    use ureq::ErrorKind as K;
    let what = match t.kind() {
        K::Dns => "cannot resolve the endpoint's host",
        K::ConnectionFailed => "cannot connect to the store",
        K::Io => "connection failed mid-request (timeout, reset or TLS)",
        K::TooManyRedirects => "the store redirected (not followed)",
        K::BadStatus | K::BadHeader => "the store's answer is not valid HTTP",
        _ => "request failed",
    };
    what.to_string()
}

/// The TLS verification failure behind `t`, if that is what it is: the innermost cause
/// (a rustls message such as "invalid peer certificate: UnknownIssuer"), which carries
/// no URL; anything that looks like one is not repeated.
fn tls_refusal(t: &ureq::Transport) -> Option<String> {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(t);
    let mut last = None;
    while let Some(c) = cause {
        last = Some(c.to_string());
        cause = c.source();
    }
    let msg = last?;
    let tls = msg.contains("certificate") || msg.contains("Certificate") || msg.contains("TLS");
    if !tls {
        return None;
    }
    let msg: String = msg.chars().filter(|c| !c.is_control()).take(200).collect();
    Some(if msg.contains("://") {
        "certificate not trusted".into()
    } else {
        msg
    })
}

fn transport(url: &S3Url, op: &'static str, reason: &str) -> RemoteError {
    RemoteError::Transport {
        object: url.to_string(),
        op,
        reason: reason.to_string(),
    }
}

fn content_length(url: &S3Url, op: &'static str, resp: &ureq::Response) -> Result<u64> {
    resp.header("Content-Length")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| transport(url, op, "answer has no Content-Length"))
}

fn read_text(url: &S3Url, resp: ureq::Response) -> Result<String> {
    let mut s = String::new();
    resp.into_reader()
        .take(1 << 20)
        .read_to_string(&mut s)
        .map_err(|_| transport(url, "read answer", "answer is not readable text"))?;
    Ok(s)
}

/// The `<Code>` of an S3 error document, bounded and printable.
fn error_code(resp: ureq::Response) -> Option<String> {
    let mut s = String::new();
    resp.into_reader()
        .take(MAX_ERROR_BODY)
        .read_to_string(&mut s)
        .ok()?;
    let start = s.find("<Code>")? + 6;
    let end = start + s[start..].find("</Code>")?;
    let code: String = s[start..end]
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(64)
        .collect();
    (!code.is_empty()).then_some(code)
}

/// Runs `f` until it succeeds, fails permanently, or `deadline` passes; transient
/// failures are retried with exponential backoff.
fn retry<T>(
    url: &S3Url,
    op: &'static str,
    deadline: Instant,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut wait = FIRST_BACKOFF;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                let now = Instant::now();
                if now + wait >= deadline {
                    return Err(RemoteError::Deadline {
                        object: url.to_string(),
                        op,
                        secs: deadline.saturating_duration_since(start).as_secs().max(1),
                        last: e.to_string(),
                    });
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
}
