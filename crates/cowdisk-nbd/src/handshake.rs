//! Fixed-newstyle negotiation: greeting, client flags, then options until `GO`/`EXPORT_NAME`.
//!
//! Generic over the stream so it can be driven by sockets or in-memory pipes. Every
//! client-supplied length is bounded by [`Limits`] before anything is allocated or read.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::export::{Exports, MetaContexts, DIRTY_BITMAP_ID, DIRTY_BITMAP_PREFIX};
use crate::wire::{self, client_flags, info, opt, rep, Cursor, OptionHeader};
use crate::Limits;

/// State handed to transmission once negotiation succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Session {
    /// Index of the chosen export in [`Exports`].
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Selected metadata contexts (only with `structured`).
    pub contexts: MetaContexts,
}

/// How negotiation ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Enter transmission.
    Transmission(Session),
    /// The client left (`ABORT`, EOF) or broke the protocol; close quietly.
    Closed,
}

/// What negotiation needs from the server.
pub(crate) struct Context<'a> {
    pub exports: &'a Exports,
    pub limits: &'a Limits,
    pub shutting_down: &'a AtomicBool,
}

/// Runs the handshake. I/O errors (EOF included, which is normal after `LIST`) end negotiation.
pub(crate) fn negotiate<S: Read + Write>(s: &mut S, cx: &Context<'_>) -> io::Result<Outcome> {
    s.write_all(&wire::greeting())?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let flags = wire::u32_from(flags);
    let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
    // Only fixed newstyle is spoken; unknown bits mean a client we do not understand.
    if flags & !known != 0 || flags & client_flags::FIXED_NEWSTYLE == 0 {
        return Ok(Outcome::Closed);
    }
    let no_zeroes = flags & client_flags::NO_ZEROES != 0;

    let mut st = State {
        structured: false,
        contexts: MetaContexts::default(),
        contexts_export: None,
    };
    let mut count = 0usize;
    loop {
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr)?;
        let h = OptionHeader::parse(&hdr);
        count += 1;
        if h.magic != wire::IHAVEOPT || count > cx.limits.max_options {
            return Ok(Outcome::Closed);
        }
        let len = h.length as usize;
        if h.option == opt::EXPORT_NAME && len > cx.limits.max_export_name {
            // EXPORT_NAME has no error reply: the only answer is to hang up.
            return Ok(Outcome::Closed);
        }
        if len > cx.limits.max_option_len {
            // Never read or skip a client-claimed multi-GiB payload.
            return Ok(Outcome::Closed);
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;

        if cx.shutting_down.load(Ordering::SeqCst) {
            // EXPORT_NAME has no option reply (the client would read one as the export
            // size): just close.
            if h.option != opt::EXPORT_NAME {
                reply(s, h.option, rep::ERR_SHUTDOWN, b"server shutting down")?;
            }
            return Ok(Outcome::Closed);
        }
        match h.option {
            opt::EXPORT_NAME => {
                let Some(export) = cx.exports.find(&payload) else {
                    return Ok(Outcome::Closed);
                };
                let e = cx.exports.get(export);
                let mut out = Vec::with_capacity(10 + 124);
                wire::put_u64(&mut out, e.backend.size());
                wire::put_u16(&mut out, e.transmission_flags(st.structured));
                if !no_zeroes {
                    out.resize(out.len() + 124, 0);
                }
                s.write_all(&out)?;
                return Ok(Outcome::Transmission(st.session(export)));
            }
            opt::ABORT => {
                // The client may already have closed; a failed ACK is not an error.
                let _ = reply(s, h.option, rep::ACK, &[]);
                return Ok(Outcome::Closed);
            }
            opt::LIST => list(s, cx, &payload)?,
            opt::INFO | opt::GO => {
                if let Some(export) = info_go(s, cx, &st, h.option, &payload)? {
                    if h.option == opt::GO {
                        return Ok(Outcome::Transmission(st.session(export)));
                    }
                }
            }
            opt::STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    reply(s, h.option, rep::ERR_INVALID, b"payload must be empty")?;
                } else if st.structured {
                    reply(s, h.option, rep::ERR_INVALID, b"already negotiated")?;
                } else {
                    st.structured = true;
                    reply(s, h.option, rep::ACK, &[])?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(s, cx, &mut st, h.option, &payload)?
            }
            // No TLS support; STARTTLS is "unsupported", never TLS_REQD.
            _ => reply(s, h.option, rep::ERR_UNSUP, b"option not supported")?,
        }
    }
}

struct State {
    structured: bool,
    contexts: MetaContexts,
    /// Export the selected contexts were negotiated for.
    contexts_export: Option<usize>,
}

impl State {
    fn session(&self, export: usize) -> Session {
        let contexts = if self.structured && self.contexts_export == Some(export) {
            self.contexts
        } else {
            MetaContexts::default()
        };
        Session {
            export,
            structured: self.structured,
            contexts,
        }
    }
}

fn reply<W: Write>(s: &mut W, option: u32, reply_type: u32, payload: &[u8]) -> io::Result<()> {
    s.write_all(&wire::option_reply(option, reply_type, payload))
}

fn list<W: Write>(s: &mut W, cx: &Context<'_>, payload: &[u8]) -> io::Result<()> {
    if !payload.is_empty() {
        return reply(s, opt::LIST, rep::ERR_INVALID, b"LIST takes no payload");
    }
    let mut out = Vec::new();
    for e in cx.exports.iter() {
        let mut p = Vec::with_capacity(4 + e.name.len());
        // Names are bounded by the builder (≤ the export-name limit), so this fits in u32.
        wire::put_u32(&mut p, u32::try_from(e.name.len()).unwrap_or(0));
        p.extend_from_slice(e.name.as_bytes());
        if let Some(d) = &e.description {
            p.extend_from_slice(d.as_bytes());
        }
        out.extend_from_slice(&wire::option_reply(opt::LIST, rep::SERVER, &p));
    }
    out.extend_from_slice(&wire::option_reply(opt::LIST, rep::ACK, &[]));
    s.write_all(&out)
}

/// Handles `INFO`/`GO`; returns the export index when the reply was a success.
fn info_go<W: Write>(
    s: &mut W,
    cx: &Context<'_>,
    st: &State,
    option: u32,
    payload: &[u8],
) -> io::Result<Option<usize>> {
    let mut c = Cursor::new(payload);
    let parsed = (|| {
        let name_len = c.u32()? as usize;
        let name = c.bytes(name_len)?;
        let n = c.u16()? as usize;
        let reqs = c.bytes(n * 2)?;
        (c.remaining() == 0).then_some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        reply(s, option, rep::ERR_INVALID, b"malformed request")?;
        return Ok(None);
    };
    if name.len() > cx.limits.max_export_name {
        reply(s, option, rep::ERR_TOO_BIG, b"export name too long")?;
        return Ok(None);
    }
    let Some(export) = cx.exports.find(name) else {
        reply(s, option, rep::ERR_UNKNOWN, b"unknown export")?;
        return Ok(None);
    };
    let e = cx.exports.get(export);
    let mut out = Vec::new();
    // INFO_EXPORT is always sent: qemu relies on it even when it asked for nothing.
    let mut p = Vec::with_capacity(12);
    wire::put_u16(&mut p, info::EXPORT);
    wire::put_u64(&mut p, e.backend.size());
    wire::put_u16(&mut p, e.transmission_flags(st.structured));
    out.extend_from_slice(&wire::option_reply(option, rep::INFO, &p));
    let mut sent = [false; 4];
    let mut types = Cursor::new(reqs);
    while let Some(ty) = types.u16() {
        let mut p = Vec::new();
        match ty {
            info::NAME if !sent[1] => {
                sent[1] = true;
                wire::put_u16(&mut p, info::NAME);
                p.extend_from_slice(e.name.as_bytes());
            }
            info::DESCRIPTION if !sent[2] => {
                sent[2] = true;
                let Some(d) = &e.description else { continue };
                wire::put_u16(&mut p, info::DESCRIPTION);
                p.extend_from_slice(d.as_bytes());
            }
            info::BLOCK_SIZE if !sent[3] => {
                sent[3] = true;
                let (min, pref, max) = e.block_sizes(cx.limits.max_payload);
                wire::put_u16(&mut p, info::BLOCK_SIZE);
                wire::put_u32(&mut p, min);
                wire::put_u32(&mut p, pref);
                wire::put_u32(&mut p, max);
            }
            // INFO_EXPORT was already sent; unknown types are ignored per the spec.
            _ => continue,
        }
        out.extend_from_slice(&wire::option_reply(option, rep::INFO, &p));
    }
    out.extend_from_slice(&wire::option_reply(option, rep::ACK, &[]));
    s.write_all(&out)?;
    Ok(Some(export))
}

fn meta_context<W: Write>(
    s: &mut W,
    cx: &Context<'_>,
    st: &mut State,
    option: u32,
    payload: &[u8],
) -> io::Result<()> {
    let set = option == opt::SET_META_CONTEXT;
    if set {
        // SET replaces the selection even when it fails.
        st.contexts = MetaContexts::default();
        st.contexts_export = None;
        if !st.structured {
            return reply(s, option, rep::ERR_INVALID, b"structured replies first");
        }
    }
    let mut c = Cursor::new(payload);
    let parsed = (|| {
        let name_len = c.u32()? as usize;
        let name = c.bytes(name_len)?;
        let nq = c.u32()?;
        // Each query takes at least its 4-byte length, so the option length bounds this.
        let mut queries = Vec::new();
        for _ in 0..nq {
            let qlen = c.u32()? as usize;
            queries.push(c.bytes(qlen)?);
        }
        (c.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply(s, option, rep::ERR_INVALID, b"malformed request");
    };
    let Some(export) = cx.exports.find(name) else {
        return reply(s, option, rep::ERR_UNKNOWN, b"unknown export");
    };
    let backend = &cx.exports.get(export).backend;
    let mut found = MetaContexts::default();
    // Each bitmap at most once, however many queries name it: the reply stays bounded by
    // the export's bitmaps.
    let mut all_bitmaps = queries.is_empty() && !set;
    let mut named: Vec<String> = Vec::new();
    for q in &queries {
        found.add_query(q, set);
        match bitmap_query(&**backend, q, set) {
            BitmapQuery::All => all_bitmaps = true,
            BitmapQuery::One(n) if !named.contains(&n) => named.push(n),
            BitmapQuery::One(_) | BitmapQuery::None => {}
        }
    }
    if queries.is_empty() && !set {
        found = MetaContexts::ALL;
    }
    let mut bitmaps = if all_bitmaps {
        backend.dirty_bitmaps()
    } else {
        named
    };
    if set {
        // One bitmap per connection (qemu and libnbd ask for one at a time).
        bitmaps.truncate(1);
        found.dirty_bitmap = bitmaps.first().and_then(|n| backend.dirty_bitmap_key(n));
    }
    let mut out = Vec::new();
    let bitmap_entries = bitmaps
        .iter()
        .map(|n| (DIRTY_BITMAP_ID, format!("qemu:dirty-bitmap:{n}")));
    let fixed = found.entries().map(|(id, n)| (id, n.to_string()));
    for (id, ctx_name) in fixed.chain(bitmap_entries) {
        let mut p = Vec::with_capacity(4 + ctx_name.len());
        wire::put_u32(&mut p, if set { id } else { 0 });
        p.extend_from_slice(ctx_name.as_bytes());
        out.extend_from_slice(&wire::option_reply(option, rep::META_CONTEXT, &p));
    }
    out.extend_from_slice(&wire::option_reply(option, rep::ACK, &[]));
    if set {
        st.contexts = found;
        st.contexts_export = Some(export);
    }
    s.write_all(&out)
}

enum BitmapQuery {
    None,
    All,
    One(String),
}

/// The dirty bitmaps one query names: `qemu:dirty-bitmap:NAME` that exists; for LIST
/// also `qemu:dirty-bitmap:` and `qemu:` (every bitmap).
fn bitmap_query(backend: &dyn crate::Backend, q: &[u8], set: bool) -> BitmapQuery {
    match q.strip_prefix(DIRTY_BITMAP_PREFIX) {
        Some([]) if !set => BitmapQuery::All,
        Some(name) => std::str::from_utf8(name)
            .ok()
            .filter(|n| backend.dirty_bitmap_key(n).is_some())
            .map_or(BitmapQuery::None, |n| BitmapQuery::One(n.to_string())),
        None if q == b"qemu:" && !set => BitmapQuery::All,
        None => BitmapQuery::None,
    }
}
