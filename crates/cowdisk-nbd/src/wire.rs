//! Pure NBD wire codec: constants, big-endian field access, request parsing, reply headers.
//!
//! Normative source: `doc/proto.md` of the NBD project. No I/O happens here.

// The NBD protocol is big-endian by definition; this module is the one place that encodes it.
#![allow(clippy::big_endian_bytes)]

/// Initial server greeting magic (`NBDMAGIC`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Option magic (`IHAVEOPT`), sent by the server in the greeting and by the client per option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic opening every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic opening every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic opening a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic opening a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flags (u16).
pub mod server_flags {
    /// Fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u16 = 1;
    /// The client may skip the 124 zero bytes after `EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 2;
}

/// Client handshake flags (u32).
pub mod client_flags {
    /// Client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1;
    /// Client wants no zero padding after `EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 2;
}

/// Option numbers.
pub mod opt {
    #![allow(missing_docs)]
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    #![allow(missing_docs)]
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_PLATFORM: u32 = ERR | 4;
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub mod info {
    #![allow(missing_docs)]
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (u16) advertised per export.
pub mod tflags {
    #![allow(missing_docs)]
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    #![allow(missing_docs)]
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flags {
    #![allow(missing_docs)]
    pub const FUA: u16 = 1;
    pub const NO_HOLE: u16 = 2;
    pub const DF: u16 = 4;
    pub const REQ_ONE: u16 = 8;
    pub const FAST_ZERO: u16 = 16;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    #![allow(missing_docs)]
    pub const FLAG_DONE: u16 = 1;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = 0x8001;
    pub const ERROR_OFFSET: u16 = 0x8002;
}

/// `base:allocation` extent flags.
pub mod state {
    #![allow(missing_docs)]
    pub const HOLE: u32 = 1;
    pub const ZERO: u32 = 2;
}

/// NBD error numbers (fixed by the protocol, not the host's errno values).
pub mod errno {
    #![allow(missing_docs)]
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of an option reply header.
pub const OPT_REPLY_HEADER_LEN: usize = 20;

/// Bounds-checked big-endian reader over a byte slice; every accessor returns `None` when short.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    /// Reads a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Appends a big-endian u16.
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Appends a big-endian u32.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Appends a big-endian u64.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Decodes a big-endian u32 from a fixed array (for headers read with `read_exact`).
pub fn u32_from(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// The server's initial greeting (fixed newstyle, `NO_ZEROES` offered).
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..]
        .copy_from_slice(&(server_flags::FIXED_NEWSTYLE | server_flags::NO_ZEROES).to_be_bytes());
    out
}

/// A client option header: `IHAVEOPT | u32 option | u32 length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Magic as received; must equal [`IHAVEOPT`].
    pub magic: u64,
    /// Option number.
    pub option: u32,
    /// Payload length claimed by the client (untrusted).
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte option header.
    pub fn parse(b: &[u8; 16]) -> Self {
        let mut c = Cursor::new(b);
        Self {
            magic: c.u64().unwrap_or(0),
            option: c.u32().unwrap_or(0),
            length: c.u32().unwrap_or(0),
        }
    }
}

/// Encodes an option reply: header followed by `payload`.
pub fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPT_REPLY_HEADER_LEN + payload.len());
    put_u64(&mut out, OPT_REPLY_MAGIC);
    put_u32(&mut out, option);
    put_u32(&mut out, reply_type);
    // Option replies built here are small (names ≤ the export-name limit), so this cannot truncate.
    put_u32(&mut out, u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(payload);
    out
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque client cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (untrusted).
    pub length: u32,
}

impl Request {
    /// Decodes a 28-byte request header; `None` on a bad magic (the connection must then close).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        let mut c = Cursor::new(b);
        if c.u32()? != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u32()?,
        })
    }

    /// Encodes the header (used by test clients and fuzz seeds).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = Vec::with_capacity(REQUEST_LEN);
        put_u32(&mut out, REQUEST_MAGIC);
        put_u16(&mut out, self.flags);
        put_u16(&mut out, self.kind);
        put_u64(&mut out, self.cookie);
        put_u64(&mut out, self.offset);
        put_u32(&mut out, self.length);
        let mut arr = [0u8; REQUEST_LEN];
        arr.copy_from_slice(&out);
        arr
    }
}

/// Writes a simple reply header into `out`.
pub fn simple_reply(out: &mut [u8; SIMPLE_REPLY_LEN], error: u32, cookie: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured chunk header into `out`.
pub fn chunk_header(
    out: &mut [u8; CHUNK_HEADER_LEN],
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) {
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&length.to_be_bytes());
}

/// Writes a big-endian u64 into the first 8 bytes of `out` (for `OFFSET_DATA` offsets).
pub fn write_u64(out: &mut [u8; 8], v: u64) {
    *out = v.to_be_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: 3,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn cursor_is_bounds_checked() {
        let mut c = Cursor::new(&[0, 1, 2]);
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.u16(), None);
        assert_eq!(c.bytes(1), Some(&[2u8][..]));
        assert_eq!(c.bytes(1), None);
    }

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }
}
