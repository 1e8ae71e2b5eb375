//! Request validation as a pure function: one place decides every errno and every hang-up.

use crate::export::MetaContexts;
use crate::wire::{cmd, cmd_flags, errno, Request};
use crate::ZeroFlags;

/// What the validator needs to know about the connection and its export.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub contexts: MetaContexts,
    /// Largest READ/WRITE payload accepted.
    pub max_payload: u32,
    /// Largest WRITE payload drained before an error reply; above it the connection is dropped.
    pub max_drain: u32,
}

/// A validated command, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache,
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disc,
}

/// The validator's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Run(Op),
    /// Reply with this errno (after draining a WRITE payload); the connection stays usable.
    Error(u32),
    /// Close the connection without a reply.
    Disconnect,
}

/// Flags each command may carry. `FUA` is tolerated on non-writes, as the spec allows.
fn allowed_flags(kind: u16, g: &Geometry) -> u16 {
    use cmd_flags::*;
    match kind {
        cmd::READ if g.structured => FUA | DF,
        cmd::READ | cmd::FLUSH | cmd::CACHE | cmd::TRIM | cmd::WRITE => FUA,
        cmd::WRITE_ZEROES => FUA | NO_HOLE | FAST_ZERO,
        cmd::BLOCK_STATUS => FUA | REQ_ONE,
        _ => 0,
    }
}

/// Decides what to do with `r`. Checks run in a fixed order: framing (payload size), command,
/// flags, read-only, zero length, payload limits, range (`checked_add`), command specifics.
pub(crate) fn validate(r: &Request, g: &Geometry) -> Verdict {
    use Verdict::Error;
    if r.kind == cmd::WRITE && r.length > g.max_drain {
        // Cannot stay in sync without reading that much; hang up instead.
        return Verdict::Disconnect;
    }
    let known = matches!(
        r.kind,
        cmd::READ
            | cmd::WRITE
            | cmd::DISC
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    );
    if !known {
        return Error(errno::EINVAL);
    }
    if r.kind == cmd::DISC {
        return Verdict::Run(Op::Disc);
    }
    if r.flags & !allowed_flags(r.kind, g) != 0 {
        return Error(errno::EINVAL);
    }
    let fua = r.flags & cmd_flags::FUA != 0;
    let writes = matches!(r.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && g.read_only {
        return Error(errno::EPERM);
    }
    if r.kind == cmd::FLUSH {
        if r.offset != 0 || r.length != 0 {
            return Error(errno::EINVAL);
        }
        return Verdict::Run(Op::Flush);
    }
    if r.length == 0 {
        return Error(errno::EINVAL);
    }
    if matches!(r.kind, cmd::READ | cmd::WRITE) && r.length > g.max_payload {
        let df = r.flags & cmd_flags::DF != 0;
        return Error(if df { errno::EOVERFLOW } else { errno::EINVAL });
    }
    let in_range = r
        .offset
        .checked_add(u64::from(r.length))
        .is_some_and(|end| end <= g.size);
    if !in_range {
        let e = match r.kind {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        return Error(e);
    }
    let (offset, len) = (r.offset, r.length);
    let op = match r.kind {
        cmd::READ => Op::Read { offset, len },
        cmd::WRITE => Op::Write { offset, len, fua },
        cmd::TRIM => Op::Trim { offset, len, fua },
        cmd::CACHE => Op::Cache,
        cmd::WRITE_ZEROES => Op::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                fua,
                no_hole: r.flags & cmd_flags::NO_HOLE != 0,
                fast: r.flags & cmd_flags::FAST_ZERO != 0,
            },
        },
        _ => {
            if !g.structured || !g.contexts.any() {
                return Error(errno::EINVAL);
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: r.flags & cmd_flags::REQ_ONE != 0,
            }
        }
    };
    Verdict::Run(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    fn geo() -> Geometry {
        Geometry {
            size: 1 << 30,
            read_only: false,
            structured: true,
            contexts: MetaContexts::ALL,
            max_payload: 32 * MIB,
            max_drain: 64 * MIB,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    fn check(r: Request, g: Geometry) -> Verdict {
        validate(&r, &g)
    }

    #[test]
    fn ranges_and_errnos() {
        let g = geo();
        let size = g.size;
        assert_eq!(
            check(req(cmd::READ, 0, size - 1, 1), g),
            Verdict::Run(Op::Read {
                offset: size - 1,
                len: 1
            })
        );
        assert_eq!(check(req(cmd::READ, 0, size, 1), g), Error(errno::EINVAL));
        assert_eq!(check(req(cmd::WRITE, 0, size, 1), g), Error(errno::ENOSPC));
        assert_eq!(
            check(req(cmd::WRITE_ZEROES, 0, size, 1), g),
            Error(errno::ENOSPC)
        );
        assert_eq!(check(req(cmd::TRIM, 0, size, 1), g), Error(errno::EINVAL));
        assert_eq!(check(req(cmd::CACHE, 0, size, 1), g), Error(errno::EINVAL));
        assert_eq!(
            check(req(cmd::BLOCK_STATUS, 0, size, 1), g),
            Error(errno::EINVAL)
        );
        // u64 overflow counts as beyond the end.
        assert_eq!(
            check(req(cmd::READ, 0, u64::MAX, 2), g),
            Error(errno::EINVAL)
        );
        assert_eq!(
            check(req(cmd::WRITE, 0, u64::MAX, 2), g),
            Error(errno::ENOSPC)
        );
    }

    use Verdict::Error;

    #[test]
    fn flags_lengths_and_read_only() {
        let g = geo();
        assert_eq!(check(req(cmd::READ, 0, 0, 0), g), Error(errno::EINVAL));
        assert_eq!(check(req(9, 0, 0, 1), g), Error(errno::EINVAL));
        assert_eq!(check(req(cmd::WRITE, 0x100, 0, 1), g), Error(errno::EINVAL));
        assert_eq!(
            check(req(cmd::WRITE, cmd_flags::DF, 0, 1), g),
            Error(errno::EINVAL)
        );
        assert!(matches!(
            check(req(cmd::READ, cmd_flags::FUA, 0, 1), g),
            Verdict::Run(_)
        ));
        assert_eq!(check(req(cmd::FLUSH, 0, 1, 0), g), Error(errno::EINVAL));
        assert_eq!(
            check(req(cmd::READ, 0, 0, 33 * MIB), g),
            Error(errno::EINVAL)
        );
        assert_eq!(
            check(req(cmd::READ, cmd_flags::DF, 0, 33 * MIB), g),
            Error(errno::EOVERFLOW)
        );
        assert_eq!(
            check(req(cmd::WRITE, 0, 0, 33 * MIB), g),
            Error(errno::EINVAL)
        );
        assert_eq!(
            check(req(cmd::WRITE, 0, 0, 65 * MIB), g),
            Verdict::Disconnect
        );
        let ro = Geometry {
            read_only: true,
            ..g
        };
        for k in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(check(req(k, 0, 0, 512), ro), Error(errno::EPERM));
        }
        let simple = Geometry {
            structured: false,
            contexts: MetaContexts::default(),
            ..g
        };
        assert_eq!(
            check(req(cmd::READ, cmd_flags::DF, 0, 1), simple),
            Error(errno::EINVAL)
        );
        assert_eq!(
            check(req(cmd::BLOCK_STATUS, 0, 0, 1), simple),
            Error(errno::EINVAL)
        );
        assert_eq!(
            check(req(cmd::DISC, 0, 0, 0), simple),
            Verdict::Run(Op::Disc)
        );
    }
}
