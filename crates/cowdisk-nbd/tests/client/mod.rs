//! A tiny hand-written NBD client for in-process protocol tests, plus a test server fixture.
#![allow(dead_code, clippy::big_endian_bytes)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cowdisk_nbd::wire::{self, cmd, rep};
use cowdisk_nbd::{Backend, Limits, Server, ShutdownHandle};

/// An in-process server on 127.0.0.1:0, shut down and joined on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), cowdisk_nbd::ServerError>>>,
}

impl TestServer {
    pub fn start(exports: Vec<(&str, Arc<dyn Backend>)>, limits: Limits) -> Self {
        Self::start_with(exports, limits, |b| b)
    }

    pub fn start_with(
        exports: Vec<(&str, Arc<dyn Backend>)>,
        limits: Limits,
        f: impl FnOnce(cowdisk_nbd::ServerBuilder) -> cowdisk_nbd::ServerBuilder,
    ) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut b = Server::builder().limits(limits).tcp_listener(l);
        for (n, be) in exports {
            b = b.export(n, be);
        }
        let server = f(b).build().unwrap();
        let stop = server.shutdown_handle();
        let thread = Some(std::thread::spawn(move || server.serve()));
        Self { addr, stop, thread }
    }

    /// Shuts down and returns serve()'s result.
    pub fn stop(mut self) -> Result<(), cowdisk_nbd::ServerError> {
        self.stop.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.shutdown();
            let _ = t.join();
        }
    }
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub payload: Vec<u8>,
}

/// One transmission reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
    /// Errno carried by the reply (0 for success), for simple replies and ERROR chunks.
    pub fn errno(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk {
                chunk_type,
                payload,
                ..
            } if *chunk_type & 0x8000 != 0 => u32::from_be_bytes(payload[..4].try_into().unwrap()),
            Reply::Chunk { .. } => 0,
        }
    }
}

pub struct Client {
    pub s: TcpStream,
    /// cookie → (command, length) of requests awaiting a reply.
    pending: HashMap<u64, (u16, u32)>,
    pub structured: bool,
    next_cookie: u64,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// `u32 namelen, name, u16 n, n × u16` (INFO/GO payload).
pub fn go_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name);
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.to_be_bytes());
    }
    p
}

/// `u32 namelen, name, u32 nq, nq × (u32 len, query)` (meta context payload).
pub fn meta_payload(name: &[u8], queries: &[&str]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name);
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

impl Client {
    /// Connects and reads the greeting; client flags are not sent yet.
    pub fn connect_raw(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Self {
            s,
            pending: HashMap::new(),
            structured: false,
            next_cookie: 1,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(be16(&g[16..]), 3, "fixed newstyle + no zeroes");
        c
    }

    /// Connects and sends client flags `FIXED_NEWSTYLE | NO_ZEROES`.
    /// The socket, for tests that read what the server sends raw.
    #[allow(dead_code)]
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    pub fn connect(addr: SocketAddr) -> Self {
        let mut c = Self::connect_raw(addr);
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    pub fn send_opt(&mut self, option: u32, payload: &[u8]) {
        let mut m = wire::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), wire::OPT_REPLY_MAGIC);
        let len = be32(&h[16..]) as usize;
        assert!(len < 1 << 20);
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        OptReply {
            option: be32(&h[8..]),
            reply_type: be32(&h[12..]),
            payload,
        }
    }

    /// Sends an option and collects replies up to the ACK or an error reply (included).
    pub fn opt(&mut self, option: u32, payload: &[u8]) -> Vec<OptReply> {
        self.send_opt(option, payload);
        let mut out = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.option, option);
            let last = r.reply_type == rep::ACK || r.reply_type & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Negotiates SR (optional), meta contexts (optional) and GO; returns (size, flags).
    pub fn handshake(&mut self, name: &str, structured: bool, contexts: &[&str]) -> (u64, u16) {
        if structured {
            let r = self.opt(wire::opt::STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].reply_type, rep::ACK);
            self.structured = true;
        }
        if !contexts.is_empty() {
            let r = self.opt(
                wire::opt::SET_META_CONTEXT,
                &meta_payload(name.as_bytes(), contexts),
            );
            assert_eq!(r.last().unwrap().reply_type, rep::ACK);
        }
        let r = self.opt(wire::opt::GO, &go_payload(name.as_bytes(), &[]));
        assert_eq!(r.last().unwrap().reply_type, rep::ACK, "{r:?}");
        let info = &r[0].payload;
        assert_eq!(be16(info), wire::info::EXPORT);
        (be64(&info[2..]), be16(&info[10..]))
    }

    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> u64 {
        let mut m = Vec::new();
        let cookie = self.encode_request(&mut m, flags, kind, offset, len, data);
        self.s.write_all(&m).unwrap();
        cookie
    }

    /// Sends requests `(flags, kind, offset, len, data)` with one write, so the server
    /// finds them together; returns their cookies.
    pub fn send_requests(&mut self, reqs: &[(u16, u16, u64, u32, &[u8])]) -> Vec<u64> {
        let mut m = Vec::new();
        let cookies = reqs
            .iter()
            .map(|&(f, k, o, l, d)| self.encode_request(&mut m, f, k, o, l, d))
            .collect();
        self.s.write_all(&m).unwrap();
        cookies
    }

    /// Appends a request to `m` and notes it as pending; returns its cookie.
    fn encode_request(
        &mut self,
        m: &mut Vec<u8>,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let r = wire::Request {
            flags,
            kind,
            cookie,
            offset,
            length: len,
        };
        m.extend_from_slice(&r.encode());
        m.extend_from_slice(data);
        self.pending.insert(cookie, (kind, len));
        cookie
    }

    pub fn read_reply(&mut self) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match be32(&m) {
            wire::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let (error, cookie) = (be32(&h), be64(&h[4..]));
                let (kind, len) = self.pending.remove(&cookie).expect("unknown cookie");
                let mut data = Vec::new();
                if kind == cmd::READ && error == 0 {
                    assert!(!self.structured, "simple READ reply after SR");
                    data = vec![0u8; len as usize];
                    self.s.read_exact(&mut data).unwrap();
                }
                Reply::Simple {
                    error,
                    cookie,
                    data,
                }
            }
            wire::STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let (flags, chunk_type, cookie) = (be16(&h), be16(&h[2..]), be64(&h[4..]));
                let mut payload = vec![0u8; be32(&h[12..]) as usize];
                self.s.read_exact(&mut payload).unwrap();
                if flags & wire::chunk::FLAG_DONE != 0 {
                    self.pending.remove(&cookie).expect("unknown cookie");
                } else {
                    assert!(self.pending.contains_key(&cookie));
                }
                Reply::Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    payload,
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// Sends one request and returns its reply (all chunks for structured replies).
    pub fn call(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Vec<Reply> {
        let cookie = self.send_request(flags, kind, offset, len, data);
        let mut out = Vec::new();
        loop {
            let r = self.read_reply();
            assert_eq!(r.cookie(), cookie);
            let done = match &r {
                Reply::Simple { .. } => true,
                Reply::Chunk { flags, .. } => flags & wire::chunk::FLAG_DONE != 0,
            };
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// errno of a single-reply command.
    pub fn errno(&mut self, flags: u16, kind: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        let r = self.call(flags, kind, offset, len, data);
        r.last().unwrap().errno()
    }

    /// Reads and returns data, panicking on error.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(0, cmd::READ, offset, len, &[]);
        match &r[..] {
            [Reply::Simple { error: 0, data, .. }] => data.clone(),
            [Reply::Chunk {
                chunk_type: wire::chunk::OFFSET_DATA,
                payload,
                ..
            }] => {
                assert_eq!(be64(payload), offset);
                payload[8..].to_vec()
            }
            other => panic!("read failed: {other:?}"),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert_eq!(
            self.errno(0, cmd::WRITE, offset, data.len() as u32, data),
            0
        );
    }

    /// True once the server has closed the connection (EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// BLOCK_STATUS; returns (context id, [(len, flags)]) per chunk.
    pub fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Vec<(u32, Vec<(u32, u32)>)> {
        let r = self.call(flags, cmd::BLOCK_STATUS, offset, len, &[]);
        r.into_iter()
            .map(|c| match c {
                Reply::Chunk {
                    chunk_type: wire::chunk::BLOCK_STATUS,
                    payload,
                    ..
                } => {
                    let id = be32(&payload);
                    let ext = payload[4..]
                        .chunks_exact(8)
                        .map(|p| (be32(p), be32(&p[4..])))
                        .collect();
                    (id, ext)
                }
                other => panic!("not a block status chunk: {other:?}"),
            })
            .collect()
    }
}

/// A MemBackend whose reads at offset 0 first run `hook` (a sleep, a panic): for tests of
/// what the server does around a slow or failing backend call.
#[allow(dead_code)]
pub struct HookedReads {
    pub inner: cowdisk_nbd::mem::MemBackend,
    pub hook: Box<dyn Fn() + Send + Sync>,
    /// What [`Backend::may_wait_on_network`] answers.
    pub network: bool,
}

impl Backend for HookedReads {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.inner.preferred_block_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn may_wait_on_network(&self) -> bool {
        self.network
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), cowdisk_nbd::BackendError> {
        if offset == 0 {
            (self.hook)();
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, o: u64, d: &[u8], f: bool) -> Result<(), cowdisk_nbd::BackendError> {
        self.inner.write(o, d, f)
    }
    fn flush(&self) -> Result<(), cowdisk_nbd::BackendError> {
        self.inner.flush()
    }
    fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), cowdisk_nbd::BackendError> {
        self.inner.trim(o, l, f)
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        f: cowdisk_nbd::ZeroFlags,
    ) -> Result<(), cowdisk_nbd::BackendError> {
        self.inner.write_zeroes(o, l, f)
    }
    fn block_status(
        &self,
        o: u64,
        l: u64,
        out: &mut Vec<cowdisk_nbd::Extent>,
    ) -> Result<(), cowdisk_nbd::BackendError> {
        self.inner.block_status(o, l, out)
    }
}
