//! Damaged map slots. A slot provably *older* than the one in use is a harmless leak
//! (repair rewrites it). One that may be *newer* (`map_slot_newer`) may have held
//! flushed writes the image no longer shows: an error naming what may be lost, whose
//! data `--repair` keeps unless `--discard-unreferenced` is given. A torn flush after a
//! power loss looks the same on disk, so this is conservative (FORMAT.md).

use cowdisk_core::format::ENTRIES_PER_PAGE;
use cowdisk_core::{AllocMap, BlockState, FileStorage, Geometry, SlotFinding, Storage};

use super::ctx::Ctx;
use super::{Severity, MAP_SLOT_NEWER};
use crate::error::{Error, Result};
use crate::failpoint;

/// Most block numbers listed in one message.
const MAX_LISTED: usize = 16;

/// Reports `slots` and repairs what `fixer` may. `leaked` are the blocks holding space
/// the map does not reference; returns those not already reported with a newer slot.
pub(super) fn check_slots(
    ctx: &mut Ctx<'_>,
    fixer: Option<&FileStorage>,
    discard: bool,
    g: &Geometry,
    map: &AllocMap,
    slots: &[SlotFinding],
    leaked: Vec<u64>,
) -> Result<Vec<u64>> {
    let (newer, older): (Vec<_>, Vec<_>) = slots.iter().partition(|s| s.maybe_newer);
    if !older.is_empty() {
        let idx: Vec<_> = older
            .iter()
            .map(|s| {
                ctx.add(
                    Severity::Leak,
                    "map_slot",
                    format!(
                        "older slot {} of map page {} is damaged ({})",
                        s.slot, s.page, s.reason
                    ),
                )
            })
            .collect();
        if let Some(w) = fixer {
            rewrite_pages(ctx, w, g, map, older.iter().map(|s| s.page))?;
            failpoint::hit("check.repair.after_map");
            idx.into_iter().for_each(|i| ctx.repaired(i));
        }
    }
    let mut rest = leaked;
    for s in newer {
        let range = page_blocks(g, s.page);
        let at_risk: Vec<u64> = rest.iter().copied().filter(|b| range.contains(b)).collect();
        rest.retain(|b| !range.contains(b));
        let i = ctx.add(
            Severity::Error,
            MAP_SLOT_NEWER,
            message(s, &range, &at_risk),
        );
        if let (Some(w), true) = (fixer, discard) {
            // The operator accepts the loss: the older slot's view becomes final first,
            // so a crash from here on leaves only plain leaks.
            rewrite_pages(ctx, w, g, map, [s.page].into_iter())?;
            if s.current_sequence.is_none() && s.slot == 1 {
                // A never-written page's first write goes to slot A; slot B needs a second.
                rewrite_pages(ctx, w, g, map, [s.page].into_iter())?;
            }
            failpoint::hit("check.repair.after_discard_slot");
            punch(ctx, w, g, &at_risk)?;
            ctx.repaired(i);
        }
    }
    Ok(rest)
}

/// Rewrites `pages` into their inactive slots from the slots in use.
fn rewrite_pages(
    ctx: &Ctx<'_>,
    w: &FileStorage,
    g: &Geometry,
    map: &AllocMap,
    pages: impl Iterator<Item = u64>,
) -> Result<()> {
    pages.for_each(|p| map.mark_page_dirty(p));
    let pending = map.take_dirty();
    map.write_back(w, g, &pending)
        .map_err(|(_, e)| Error::os(&ctx.file, "rewrite map slots", e))
}

/// Punches `blocks` out of the data area and syncs.
pub(super) fn punch(ctx: &Ctx<'_>, w: &FileStorage, g: &Geometry, blocks: &[u64]) -> Result<()> {
    let bs = u64::from(g.block_size);
    for b in blocks {
        w.punch_hole(g.block_offset(*b), bs)
            .map_err(|e| Error::os(&ctx.file, "punch hole", e))?;
        failpoint::hit("check.repair.after_first_punch");
    }
    w.sync().map_err(|e| Error::os(&ctx.file, "sync", e))
}

/// The blocks map page `p` covers.
fn page_blocks(g: &Geometry, p: u64) -> std::ops::Range<u64> {
    let first = p.saturating_mul(ENTRIES_PER_PAGE).min(g.blocks);
    first..first.saturating_add(ENTRIES_PER_PAGE).min(g.blocks)
}

/// "block 7" or "blocks 7, 9 and 3 more".
fn blocks_list(blocks: impl Iterator<Item = u64>, total: u64) -> String {
    let shown: Vec<String> = blocks.take(MAX_LISTED).map(|b| b.to_string()).collect();
    let word = if total == 1 { "block" } else { "blocks" };
    if shown.is_empty() {
        return format!("{total} {word}");
    }
    let more = total.saturating_sub(shown.len() as u64);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("{word} {}{tail}", shown.join(", "))
}

/// What may be lost behind a damaged, possibly newer slot.
fn message(s: &SlotFinding, range: &std::ops::Range<u64>, at_risk: &[u64]) -> String {
    let in_use = match s.current_sequence {
        Some(q) => format!("slot {} in use has sequence {q}", 1 - s.slot),
        None => "no valid slot, the page reads as all absent".into(),
    };
    let claims = match s.claimed_sequence {
        Some(c) => format!("it claims sequence {c}"),
        None => "its sequence is unreadable".into(),
    };
    let mut m = format!(
        "map page {} (blocks {}-{}): slot {} is damaged ({}) and may hold a newer flush \
than the one in use ({claims}; {in_use}): writes flushed there may be lost",
        s.page,
        range.start,
        range.end.saturating_sub(1),
        s.slot,
        s.reason,
    );
    if !at_risk.is_empty() {
        m += &format!(
            "; {} hold data the slot in use does not reference",
            blocks_list(at_risk.iter().copied(), at_risk.len() as u64)
        );
    }
    if let Some(e) = s.beyond_current.as_ref().filter(|e| e.data + e.zero > 0) {
        let of = |st: BlockState| e.examples.iter().filter(move |x| x.1 == st).map(|x| x.0);
        let mut parts = Vec::new();
        if e.data > 0 {
            parts.push(format!(
                "data in {}",
                blocks_list(of(BlockState::Data), e.data)
            ));
        }
        if e.zero > 0 {
            let word = if e.zero == 1 {
                "a whiteout"
            } else {
                "whiteouts"
            };
            parts.push(format!(
                "{word} in {}",
                blocks_list(of(BlockState::Zero), e.zero)
            ));
        }
        m += &format!("; the damaged slot records {}", parts.join(" and "));
    }
    m
}
