//! BLOCK_STATUS replies: the backend's extents per selected metadata context, clamped to
//! the request and merged.

use std::io::Write;

use super::{Conn, MAX_EXTENTS};
use crate::export::{ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID, DIRTY_BITMAP_ID};
use crate::reply::ContextExtents;
use crate::wire::state;
use crate::{BackendError, BackendErrorKind, Extent};

/// Extents per selected context, as `(context id, [(length, flags)])`: one backend query
/// for the allocation contexts, one for the dirty bitmap.
pub(super) fn block_status<W: Write>(
    conn: &Conn<'_, W>,
    offset: u64,
    len: u64,
    req_one: bool,
) -> Result<Vec<ContextExtents>, BackendError> {
    let no_extents = || BackendError::new(BackendErrorKind::Io, "backend returned no extents");
    let selected = conn.session.contexts;
    let mut out = Vec::new();
    if selected.base_allocation || selected.allocation_depth {
        let mut raw = Vec::new();
        conn.export.backend.block_status(offset, len, &mut raw)?;
        let extents = clamp_extents(&raw, len);
        if extents.is_empty() {
            return Err(no_extents());
        }
        for (id, _) in selected.entries() {
            let value = |e: &Extent| match id {
                BASE_ALLOCATION_ID => {
                    // HOLE without ZERO would mean "undefined contents": only report it with ZERO.
                    let zero = if e.zero { state::ZERO } else { 0 };
                    let hole = if e.zero && e.hole { state::HOLE } else { 0 };
                    zero | hole
                }
                ALLOCATION_DEPTH_ID => e.depth,
                _ => 0,
            };
            let runs = extents.iter().map(|e| (e.length, value(e)));
            out.push((id, merged_pairs(runs, req_one)));
        }
    }
    if let Some(key) = selected.dirty_bitmap {
        let mut raw = Vec::new();
        conn.export
            .backend
            .dirty_status(key, offset, len, &mut raw)?;
        let as_extents: Vec<Extent> = raw
            .iter()
            .map(|d| Extent {
                length: d.length,
                zero: d.dirty,
                hole: false,
                depth: 0,
            })
            .collect();
        let extents = clamp_extents(&as_extents, len);
        if extents.is_empty() {
            return Err(no_extents());
        }
        // qemu's dirty-bitmap context: flag 1 = dirty.
        let runs = extents.iter().map(|e| (e.length, u32::from(e.zero)));
        out.push((DIRTY_BITMAP_ID, merged_pairs(runs, req_one)));
    }
    Ok(out)
}

/// `(length, flags)` pairs from clamped runs: equal neighbours merged, at most
/// `MAX_EXTENTS`, one with `REQ_ONE`.
fn merged_pairs(runs: impl Iterator<Item = (u64, u32)>, req_one: bool) -> Vec<(u32, u32)> {
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for (length, v) in runs {
        // Lengths are clamped to the request length, a u32, so the sum still fits.
        let l = u32::try_from(length).unwrap_or(u32::MAX);
        let full = pairs.len() >= MAX_EXTENTS;
        match pairs.last_mut() {
            Some(last) if last.1 == v => last.0 = last.0.saturating_add(l),
            _ if full => break,
            _ => pairs.push((l, v)),
        }
    }
    if req_one {
        pairs.truncate(1);
    }
    pairs
}

/// Drops empty extents and cuts the list at `len` bytes, so a misbehaving backend cannot make
/// the server send an invalid reply.
fn clamp_extents(raw: &[Extent], len: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(raw.len().min(MAX_EXTENTS));
    let mut total = 0u64;
    for e in raw {
        if total >= len {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let l = e.length.min(len - total);
        total += l;
        out.push(Extent { length: l, ..*e });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64) -> Extent {
        Extent {
            length,
            zero: false,
            hole: false,
            depth: 1,
        }
    }

    #[test]
    fn extents_are_clamped() {
        let got = clamp_extents(&[ext(0), ext(100), ext(1000)], 500);
        assert_eq!(got, vec![ext(100), ext(400)]);
        assert!(clamp_extents(&[ext(0)], 10).is_empty());
    }
}
