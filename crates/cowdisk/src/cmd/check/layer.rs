//! The chain walk behind `check`: each layer's headers, map, length, allocation,
//! seal digest and block CRCs, and each link's identity.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cowdisk_core::chain::{lock_shared, open_layer_file, ParentWalker};
use cowdisk_core::format::{ENTRIES_PER_PAGE, FLAG_NEEDS_CHECK};
use cowdisk_core::layer::{load_map, read_header, stored_block_crc, stored_digest, write_header};
use cowdisk_core::map::AllocMap;
use cowdisk_core::{
    Access, BlockState, FileStorage, Header, LayerState, OpenError, Storage, MAX_DEPTH,
};
use rustix::fs::SeekFrom;

use super::{Finding, Report, Severity};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::progress::Progress;

/// Most CRC mismatches reported one by one per layer; the rest are summarised.
const MAX_BLOCK_REPORTS: usize = 100;

struct Ctx<'a> {
    report: &'a mut Report,
    file: PathBuf,
    depth: usize,
    repairable: bool,
}

impl Ctx<'_> {
    fn add(&mut self, severity: Severity, kind: &'static str, message: String) -> usize {
        self.report.findings.push(Finding {
            file: self.file.clone(),
            depth: self.depth,
            severity,
            kind,
            message,
            repaired: false,
        });
        self.report.findings.len() - 1
    }
    fn repaired(&mut self, i: usize) {
        self.report.findings[i].repaired = true;
    }
}

/// Walks and checks the chain whose top is `image`.
pub fn check_chain(image: &Path, repair: bool, show: bool) -> Result<Report> {
    let mut report = Report::default();
    let top_access = if repair {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let (top_file, top_id) = open_layer_file(image, top_access)?;
    let mut walker = ParentWalker::new(image)?;
    let mut seen_ids = HashSet::from([top_id]);
    let mut seen_uuids = HashSet::new();
    let mut file = top_file;
    let mut path = image.to_path_buf();
    let mut child: Option<(Header, PathBuf)> = None;
    let mut top_needs_check = None;
    let mut held: Vec<FileStorage> = Vec::new();
    for depth in 0.. {
        // Every layer stays open (and locked) until the check ends.
        held.push(FileStorage::new(file));
        let st = &held[held.len() - 1];
        let mut ctx = Ctx {
            report: &mut report,
            file: path.clone(),
            depth,
            repairable: false,
        };
        ctx.report.layers_checked += 1;
        let Some(header) = check_layer(&mut ctx, st, repair, show, child.as_ref())? else {
            break;
        };
        if !seen_uuids.insert(header.uuid) {
            ctx.add(
                Severity::Error,
                "chain_loop",
                format!("layer {} appears twice in the chain", header.uuid),
            );
            break;
        }
        if depth == 0 && header.flags & FLAG_NEEDS_CHECK != 0 {
            let i = ctx.add(
                Severity::Error,
                "needs_check",
                "flagged as needing a check".into(),
            );
            top_needs_check = Some((i, ctx.repairable));
        }
        let Some(pref) = header.parent.clone() else {
            break;
        };
        if depth + 2 > MAX_DEPTH {
            ctx.add(
                Severity::Error,
                "chain_too_deep",
                format!("chain has more than {MAX_DEPTH} layers"),
            );
            break;
        }
        let opened = match walker.open_parent(&path, &pref.path) {
            Ok(o) => o,
            Err(OpenError::NotRegular { path: ppath }) => {
                ctx.add(
                    Severity::Error,
                    "parent_not_regular",
                    format!("parent {} is not a regular file", ppath.display()),
                );
                break;
            }
            Err(e) => {
                ctx.add(Severity::Error, "parent_missing", e.to_string());
                break;
            }
        };
        let ppath = opened.path;
        let f = opened.file;
        if !seen_ids.insert(opened.id) {
            ctx.add(
                Severity::Error,
                "chain_loop",
                format!("parent {} is already in the chain", ppath.display()),
            );
            break;
        }
        lock_shared(&f, &ppath)?;
        child = Some((header, path));
        file = f;
        path = ppath;
    }
    if let Some((i, true)) = top_needs_check {
        let others = report
            .findings
            .iter()
            .enumerate()
            .any(|(j, f)| j != i && f.severity == Severity::Error && !f.repaired);
        if !others {
            let Some(st) = held.first() else {
                return Ok(report);
            };
            let loaded = read_header(st, image)?;
            let mut h = loaded.header.clone();
            h.flags &= !FLAG_NEEDS_CHECK;
            write_header(st, image, &loaded, &h)?;
            failpoint::hit("check.repair.after_flag");
            report.findings[i].repaired = true;
        }
    }
    Ok(report)
}

/// Checks one layer; `None` if its header is unusable (the walk stops there).
fn check_layer(
    ctx: &mut Ctx<'_>,
    st: &FileStorage,
    repair: bool,
    show: bool,
    child: Option<&(Header, PathBuf)>,
) -> Result<Option<Header>> {
    let path = ctx.file.clone();
    let loaded = match read_header(st, &path) {
        Ok(l) => l,
        Err(e) => {
            ctx.add(Severity::Error, "header", e.to_string());
            return Ok(None);
        }
    };
    let h = loaded.header.clone();
    ctx.repairable = repair && ctx.depth == 0 && h.state == LayerState::Writable;
    if let Some((ch, cpath)) = child {
        check_link(ctx, &h, ch, cpath);
    }
    if ctx.depth > 0 && h.state != LayerState::Sealed {
        ctx.add(
            Severity::Error,
            "parent_not_sealed",
            "a lower layer is not sealed".into(),
        );
    }
    if let Some(e) = loaded.other_slot_damaged.clone() {
        let i = ctx.add(
            Severity::Leak,
            "header_slot",
            format!("inactive header slot {} is damaged: {e}", 1 - loaded.slot),
        );
        if ctx.repairable {
            write_header(st, &path, &loaded, &h)?;
            failpoint::hit("check.repair.after_header");
            ctx.repaired(i);
        }
    }
    let g = h.geometry;
    let (map, slots) = match load_map(st, &path, &g) {
        Ok(x) => x,
        Err(e) => {
            ctx.add(Severity::Error, "map", e.to_string());
            return Ok(Some(h));
        }
    };
    if !slots.is_empty() {
        let mut idx = Vec::new();
        for s in &slots {
            idx.push(ctx.add(
                Severity::Leak,
                "map_slot",
                format!(
                    "inactive slot {} of map page {} is damaged ({})",
                    s.slot, s.page, s.reason
                ),
            ));
        }
        if ctx.repairable {
            for s in &slots {
                redirty_page(&map, s.page);
            }
            let pending = map.take_dirty();
            map.write_back(st, &g, &pending)
                .map_err(|e| Error::os(&path, "rewrite map slots", e))?;
            failpoint::hit("check.repair.after_map");
            idx.into_iter().for_each(|i| ctx.repaired(i));
        }
    }
    let len = st.len().map_err(|e| Error::os(&path, "stat", e))?;
    if len > g.file_len() {
        let i = ctx.add(
            Severity::Leak,
            "trailing_bytes",
            format!("{} bytes past the end of the layout", len - g.file_len()),
        );
        if ctx.repairable {
            st.set_len(g.file_len())
                .and_then(|()| st.sync())
                .map_err(|e| Error::os(&path, "truncate", e))?;
            failpoint::hit("check.repair.after_truncate");
            ctx.repaired(i);
        }
    }
    check_allocation(ctx, st, &h, &map)?;
    if h.state == LayerState::Sealed {
        check_sealed(ctx, st, &h, &map, show)?;
    }
    Ok(Some(h))
}

fn check_link(ctx: &mut Ctx<'_>, h: &Header, child: &Header, cpath: &Path) {
    let Some(pref) = &child.parent else { return };
    let who = cpath.display();
    if h.uuid != pref.uuid {
        ctx.add(
            Severity::Error,
            "parent_identity",
            format!("has UUID {}, but {who} expects {}", h.uuid, pref.uuid),
        );
    } else if h.seal_digest != pref.digest {
        ctx.add(
            Severity::Error,
            "parent_identity",
            format!(
                "seal digest {:#010x} differs from the {:#010x} recorded by {who}",
                h.seal_digest, pref.digest
            ),
        );
    }
    if h.geometry.block_size != child.geometry.block_size {
        ctx.add(
            Severity::Error,
            "geometry",
            format!("block size differs from {who}'s"),
        );
    }
    if h.geometry.virtual_size > child.geometry.virtual_size {
        ctx.add(
            Severity::Error,
            "geometry",
            format!("larger than its child {who}"),
        );
    }
}

/// Marks a map page dirty without changing it (set a block away and back).
fn redirty_page(map: &AllocMap, page: u64) {
    let b = page * ENTRIES_PER_PAGE;
    if b >= map.blocks() {
        return;
    }
    let cur = map.get(b);
    let other = if cur == BlockState::Absent {
        BlockState::Data
    } else {
        BlockState::Absent
    };
    map.set(b, other);
    map.set(b, cur);
}

/// Space allocated in the data area for blocks the map does not reference: left by a
/// crash between a data write and its map update. Harmless; repair punches it out.
fn check_allocation(ctx: &mut Ctx<'_>, st: &FileStorage, h: &Header, map: &AllocMap) -> Result<()> {
    let g = h.geometry;
    let bs = u64::from(g.block_size);
    let mut leaked = Vec::new();
    let mut pos = g.data_offset;
    let end = g.file_len();
    while pos < end {
        let data = match rustix::fs::seek(st.file(), SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(_) => break, // ENXIO: no more data (or SEEK_DATA unsupported).
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(st.file(), SeekFrom::Hole(data))
            .unwrap_or(end)
            .min(end);
        let first = (data - g.data_offset) / bs;
        let last = (hole - g.data_offset).div_ceil(bs);
        for b in first..last.min(g.blocks) {
            if map.get(b) != BlockState::Data {
                leaked.push(b);
            }
        }
        pos = hole.max(data + 1);
    }
    if leaked.is_empty() {
        return Ok(());
    }
    let i = ctx.add(
        Severity::Leak,
        "unreferenced_blocks",
        format!(
            "{} block(s) hold space but are not referenced by the map (first: block {})",
            leaked.len(),
            leaked[0]
        ),
    );
    if ctx.repairable {
        for b in &leaked {
            st.punch_hole(g.block_offset(*b), bs)
                .map_err(|e| Error::os(&ctx.file, "punch hole", e))?;
            failpoint::hit("check.repair.after_first_punch");
        }
        st.sync().map_err(|e| Error::os(&ctx.file, "sync", e))?;
        ctx.repaired(i);
    }
    Ok(())
}

/// A sealed layer: the digest over map + stored CRCs, and each data block's CRC.
fn check_sealed(
    ctx: &mut Ctx<'_>,
    st: &FileStorage,
    h: &Header,
    map: &AllocMap,
    show: bool,
) -> Result<()> {
    let path = ctx.file.clone();
    let actual = stored_digest(st, &path, h, map)?;
    if actual != h.seal_digest {
        ctx.add(
            Severity::Error,
            "seal_digest",
            format!(
                "seal digest {:#010x} does not match the map and block CRCs ({actual:#010x})",
                h.seal_digest
            ),
        );
    }
    let g = h.geometry;
    let (data_blocks, _) = map.counts();
    let mut progress = Progress::new("check", data_blocks * u64::from(g.block_size), show);
    let mut buf = vec![0u8; g.block_size as usize];
    let mut bad = Vec::new();
    for w in 0..map.word_count() {
        if map.word(w) == 0 {
            continue;
        }
        for b in (w as u64 * 32)..((w as u64 + 1) * 32).min(g.blocks) {
            if map.get(b) != BlockState::Data {
                continue;
            }
            let n = g.block_len(b);
            st.read_at(&mut buf[..n], g.block_offset(b))
                .map_err(|e| Error::os(&path, "read block", e))?;
            let stored =
                stored_block_crc(st, &g, b).map_err(|e| Error::os(&path, "read block CRC", e))?;
            if crc32fast::hash(&buf[..n]) != stored {
                bad.push(b);
            }
            ctx.report.blocks_verified += 1;
            progress.add(n as u64);
        }
    }
    progress.finish();
    for b in bad.iter().take(MAX_BLOCK_REPORTS) {
        ctx.add(
            Severity::Error,
            "block_crc",
            format!("data block {b} does not match its stored CRC"),
        );
    }
    if bad.len() > MAX_BLOCK_REPORTS {
        ctx.add(
            Severity::Error,
            "block_crc",
            format!(
                "and {} more damaged data block(s)",
                bad.len() - MAX_BLOCK_REPORTS
            ),
        );
    }
    Ok(())
}
