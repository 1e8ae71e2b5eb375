//! One ublk request decoded and run against a [`Target`]: pure, so it is tested without
//! the kernel.

use libublk::sys;

use crate::{Failure, Target};

/// A request as the driver describes it (`ublksrv_io_desc`), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the request's buffer.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: usize,
    },
    /// Write `len` bytes of the request's buffer at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: usize,
        /// Forced unit access: durable before completion.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// `REQ_NOUNMAP` was not set: the space may be released.
        may_unmap: bool,
    },
    /// Anything else (zoned operations, WRITE_SAME): refused.
    Unsupported(u32),
}

impl Request {
    /// Decodes the driver's descriptor fields.
    pub fn decode(op_flags: u32, start_sector: u64, nr_sectors: u32) -> Request {
        // Sector numbers come from the block layer, bounded by the device size we set,
        // so the shifts cannot overflow for any device the driver accepts; saturate anyway.
        let offset = start_sector.saturating_mul(512);
        let len = u64::from(nr_sectors) * 512;
        let flag = |f: u32| op_flags & f != 0;
        match op_flags & 0xff {
            sys::UBLK_IO_OP_READ => Request::Read {
                offset,
                len: len as usize,
            },
            sys::UBLK_IO_OP_WRITE => Request::Write {
                offset,
                len: len as usize,
                fua: flag(sys::UBLK_IO_F_FUA),
            },
            sys::UBLK_IO_OP_FLUSH => Request::Flush,
            sys::UBLK_IO_OP_DISCARD => Request::Discard { offset, len },
            sys::UBLK_IO_OP_WRITE_ZEROES => Request::WriteZeroes {
                offset,
                len,
                may_unmap: !flag(sys::UBLK_IO_F_NOUNMAP),
            },
            op => Request::Unsupported(op),
        }
    }

    /// A plain read or write: quick unless the storage waits (no FUA, no flush).
    pub fn is_data(self) -> bool {
        matches!(
            self,
            Request::Read { .. } | Request::Write { fua: false, .. }
        )
    }

    /// Runs the request with `buf` as its data buffer; returns what the request
    /// completes with: the bytes moved for reads and writes, 0 for the others, or a
    /// negative errno.
    pub fn run(self, target: &dyn Target, buf: &mut [u8]) -> i32 {
        let done = |r: Result<(), Failure>, n: usize| match r {
            // n <= the buffer size, which fits i32 (checked in `Options`).
            Ok(()) => i32::try_from(n).unwrap_or(i32::MAX),
            Err(f) => f.errno(),
        };
        match self {
            Request::Read { offset, len } => match buf.get_mut(..len) {
                Some(b) => done(target.read(offset, b), len),
                None => Failure::Invalid.errno(),
            },
            Request::Write { offset, len, fua } => match buf.get(..len) {
                Some(b) => done(target.write(offset, b, fua), len),
                None => Failure::Invalid.errno(),
            },
            Request::Flush => done(target.flush(), 0),
            Request::Discard { offset, len } => done(target.discard(offset, len), 0),
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => done(target.write_zeroes(offset, len, may_unmap), 0),
            Request::Unsupported(_) => Failure::NotSupported.errno(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A 64 KiB memory disk that logs the calls it gets.
    struct Mem {
        data: Mutex<Vec<u8>>,
        log: Mutex<Vec<String>>,
        fail: Option<Failure>,
    }

    impl Mem {
        fn new(fail: Option<Failure>) -> Mem {
            Mem {
                data: Mutex::new(vec![0; 65536]),
                log: Mutex::new(Vec::new()),
                fail,
            }
        }
        fn call(&self, s: String) -> Result<(), Failure> {
            self.log.lock().unwrap().push(s);
            self.fail.map_or(Ok(()), Err)
        }
        fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, Failure> {
            let end = offset.checked_add(len).ok_or(Failure::Invalid)?;
            if end > 65536 {
                return Err(Failure::Invalid);
            }
            Ok(offset as usize..end as usize)
        }
    }

    impl Target for Mem {
        fn size(&self) -> u64 {
            65536
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Failure> {
            self.call(format!("read {offset} {}", buf.len()))?;
            let r = self.range(offset, buf.len() as u64)?;
            buf.copy_from_slice(&self.data.lock().unwrap()[r]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Failure> {
            self.call(format!("write {offset} {} {fua}", data.len()))?;
            let r = self.range(offset, data.len() as u64)?;
            self.data.lock().unwrap()[r].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), Failure> {
            self.call("flush".into())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), Failure> {
            self.call(format!("discard {offset} {len}"))
        }
        fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Failure> {
            self.call(format!("zeroes {offset} {len} {may_unmap}"))
        }
    }

    const FUA: u32 = sys::UBLK_IO_F_FUA;
    const NOUNMAP: u32 = sys::UBLK_IO_F_NOUNMAP;

    #[test]
    fn requests_decode_with_their_flags() {
        use Request::*;
        let d = Request::decode;
        assert_eq!(
            d(0, 8, 2),
            Read {
                offset: 4096,
                len: 1024
            }
        );
        assert_eq!(
            d(1 | FUA, 1, 8),
            Write {
                offset: 512,
                len: 4096,
                fua: true
            }
        );
        assert_eq!(
            d(1, 0, 1),
            Write {
                offset: 0,
                len: 512,
                fua: false
            }
        );
        assert_eq!(d(2, 0, 0), Flush);
        assert_eq!(
            d(3, 16, 128),
            Discard {
                offset: 8192,
                len: 65536
            }
        );
        assert_eq!(
            d(5 | NOUNMAP, 0, 8),
            WriteZeroes {
                offset: 0,
                len: 4096,
                may_unmap: false
            }
        );
        assert_eq!(
            d(5, 0, 8),
            WriteZeroes {
                offset: 0,
                len: 4096,
                may_unmap: true
            }
        );
        assert_eq!(d(4, 0, 8), Unsupported(4));
        assert_eq!(d(13, 0, 8), Unsupported(13));
    }

    #[test]
    fn data_moves_through_the_buffer_and_results_count_bytes() {
        let m = Mem::new(None);
        let mut buf = vec![7u8; 8192];
        assert_eq!(Request::decode(1 | FUA, 2, 8).run(&m, &mut buf), 4096);
        let mut out = vec![0u8; 8192];
        assert_eq!(Request::decode(0, 2, 8).run(&m, &mut out), 4096);
        assert_eq!(&out[..4096], &buf[..4096]);
        assert_eq!(out[4096], 0, "only the request's bytes are filled");
        assert_eq!(Request::decode(2, 0, 0).run(&m, &mut out), 0);
        assert_eq!(Request::decode(3, 0, 8).run(&m, &mut out), 0);
        assert_eq!(Request::decode(5 | NOUNMAP, 0, 8).run(&m, &mut out), 0);
        assert_eq!(
            *m.log.lock().unwrap(),
            [
                "write 1024 4096 true",
                "read 1024 4096",
                "flush",
                "discard 0 4096",
                "zeroes 0 4096 false"
            ]
        );
    }

    #[test]
    fn failures_become_errnos_never_panics() {
        let mut buf = vec![0u8; 4096];
        for (f, errno) in [(Failure::Io, libc::EIO), (Failure::NoSpace, libc::ENOSPC)] {
            let m = Mem::new(Some(f));
            for op in [0, 1, 2, 3, 5] {
                assert_eq!(
                    Request::decode(op, 0, 8).run(&m, &mut buf),
                    -errno,
                    "op {op}"
                );
            }
        }
        let m = Mem::new(None);
        // Longer than the buffer: refused before the target sees it.
        assert_eq!(Request::decode(0, 0, 16).run(&m, &mut buf), -libc::EINVAL);
        assert_eq!(Request::decode(1, 0, 16).run(&m, &mut buf), -libc::EINVAL);
        // Out of range: the target's own check.
        assert_eq!(Request::decode(0, 200, 8).run(&m, &mut buf), -libc::EINVAL);
        assert_eq!(
            Request::decode(4, 0, 8).run(&m, &mut buf),
            -libc::EOPNOTSUPP
        );
        assert_eq!(m.log.lock().unwrap().len(), 1);
    }
}
