//! Request validation as a pure function: one place decides every errno and every hang-up.

use crate::export::MetaContexts;
use crate::wire::{cmd, cmd_flags, errno, Request};
use crate::ZeroFlags;

/// What this connection allows: its export's size and mode, what the handshake agreed and
/// the server's payload limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnPolicy {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub contexts: MetaContexts,
    /// Largest READ/WRITE payload accepted.
    pub max_payload: u32,
    /// Largest WRITE payload drained before an error reply; above it the connection is dropped.
    pub max_drain: u32,
}

/// The transmission commands this server knows. Matches on it are exhaustive, so a command
/// added here must be handled everywhere rather than falling into another's arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    /// The command a request's type field names, if known.
    pub fn from_wire(kind: u16) -> Option<Command> {
        Some(match kind {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disc,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    /// Flags the command may carry. `FUA` is tolerated on non-writes, as the spec allows.
    fn allowed_flags(self, p: &ConnPolicy) -> u16 {
        use cmd_flags::*;
        match self {
            Command::Read if p.structured => FUA | DF,
            Command::Read | Command::Flush | Command::Cache | Command::Trim | Command::Write => FUA,
            Command::WriteZeroes => FUA | NO_HOLE | FAST_ZERO,
            Command::BlockStatus => FUA | REQ_ONE,
            Command::Disc => 0,
        }
    }

    /// Whether the command changes the disk (refused on a read-only export).
    fn writes(self) -> bool {
        match self {
            Command::Write | Command::Trim | Command::WriteZeroes => true,
            Command::Read
            | Command::Disc
            | Command::Flush
            | Command::Cache
            | Command::BlockStatus => false,
        }
    }
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

/// Decides what to do with `r`. Checks run in a fixed order: framing (payload size), command,
/// flags, read-only, zero length, payload limits, range (`checked_add`), command specifics.
pub(crate) fn validate(r: &Request, p: &ConnPolicy) -> Verdict {
    use Verdict::Error;
    if r.kind == cmd::WRITE && r.length > p.max_drain {
        // Cannot stay in sync without reading that much; hang up instead.
        return Verdict::Disconnect;
    }
    let Some(command) = Command::from_wire(r.kind) else {
        return Error(errno::EINVAL);
    };
    if command == Command::Disc {
        return Verdict::Run(Op::Disc);
    }
    if r.flags & !command.allowed_flags(p) != 0 {
        return Error(errno::EINVAL);
    }
    let fua = r.flags & cmd_flags::FUA != 0;
    if command.writes() && p.read_only {
        return Error(errno::EPERM);
    }
    if command == Command::Flush {
        if r.offset != 0 || r.length != 0 {
            return Error(errno::EINVAL);
        }
        return Verdict::Run(Op::Flush);
    }
    if r.length == 0 {
        return Error(errno::EINVAL);
    }
    if matches!(command, Command::Read | Command::Write) && r.length > p.max_payload {
        let df = r.flags & cmd_flags::DF != 0;
        return Error(if df { errno::EOVERFLOW } else { errno::EINVAL });
    }
    let in_range = r
        .offset
        .checked_add(u64::from(r.length))
        .is_some_and(|end| end <= p.size);
    if !in_range {
        let e = match command {
            Command::Write | Command::WriteZeroes => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        return Error(e);
    }
    let (offset, len) = (r.offset, r.length);
    let op = match command {
        Command::Read => Op::Read { offset, len },
        Command::Write => Op::Write { offset, len, fua },
        Command::Trim => Op::Trim { offset, len, fua },
        Command::Cache => Op::Cache,
        Command::WriteZeroes => Op::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                fua,
                no_hole: r.flags & cmd_flags::NO_HOLE != 0,
                fast: r.flags & cmd_flags::FAST_ZERO != 0,
            },
        },
        Command::BlockStatus => {
            if !p.structured || !p.contexts.any() {
                return Error(errno::EINVAL);
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: r.flags & cmd_flags::REQ_ONE != 0,
            }
        }
        // Answered before the range checks.
        Command::Disc => Op::Disc,
        Command::Flush => Op::Flush,
    };
    Verdict::Run(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    fn policy() -> ConnPolicy {
        ConnPolicy {
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

    fn check(r: Request, g: ConnPolicy) -> Verdict {
        validate(&r, &g)
    }

    #[test]
    fn ranges_and_errnos() {
        let g = policy();
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
        let g = policy();
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
        let ro = ConnPolicy {
            read_only: true,
            ..g
        };
        for k in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(check(req(k, 0, 0, 512), ro), Error(errno::EPERM));
        }
        let simple = ConnPolicy {
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
