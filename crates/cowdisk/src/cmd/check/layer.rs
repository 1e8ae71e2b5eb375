//! The chain walk behind `check`: each layer's headers, map, length, allocation,
//! seal digest and block CRCs, and each link's identity.

use std::path::Path;

use cowdisk_core::format::{FLAG_NEEDS_CHECK, INCOMPAT_FLUSH_JOURNAL};
use cowdisk_core::layer::{
    check_partial_bitmaps, load_map, read_header, read_verified_block, verify_seal_digest,
};
use cowdisk_core::layer::{write_header, LoadedHeader};
use cowdisk_core::{
    open_layer_file, Access, AllocMap, BlockState, ChainWalk, FileStorage, FormatError, Geometry,
    Header, IoError, LayerState, LinkError, OpenError, ReadStorage, Storage, WalkStop,
};
use rustix::fs::SeekFrom;

use super::ctx::Ctx;
use super::{Options, Report, Severity, MAP_SLOT_NEWER};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::progress::Progress;

/// Most CRC mismatches reported one by one per layer; the rest are summarised.
const MAX_BLOCK_REPORTS: usize = 100;

/// Walks and checks the chain whose top is `image`, through the engine's chain walk.
pub fn check_chain(image: &Path, opts: &Options) -> Result<Report> {
    check_chain_with(image, opts, true)
}

/// As `check_chain`; `lock_top` false when this process already holds the top's lock
/// through another open file and keeps it still while the check runs (a served image,
/// its writes held at the gate).
pub fn check_chain_with(image: &Path, opts: &Options, lock_top: bool) -> Result<Report> {
    let repair = opts.repair;
    let mut report = Report::default();
    let top_access = if repair {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let (top_file, top_id) = open_layer_file(image, top_access, lock_top)?;
    let top = FileStorage::new(top_file);
    let mut ctx = Ctx {
        report: &mut report,
        file: image.to_path_buf(),
        depth: 0,
        repairable: false,
    };
    ctx.report.layers_checked += 1;
    let loaded = match read_header(&top, image) {
        Ok(l) => l,
        Err(e) => {
            ctx.add(Severity::Error, "header", e.to_string());
            return Ok(report);
        }
    };
    ctx.repairable = repair && loaded.header.state == LayerState::Writable;
    if loaded.header.incompat & INCOMPAT_FLUSH_JOURNAL != 0 {
        // What recovery replays before every command, unless another process holds it.
        ctx.add(
            Severity::Error,
            "flush_journal",
            format!(
                "flushed writes are in its flush journal {} until a writable open replays them",
                cowdisk_core::journal_path(image).display()
            ),
        );
    }
    let top_repairable = ctx.repairable;
    let header = loaded.header.clone();
    check_layer(&mut ctx, &top, Some(&top), opts, loaded)?;
    let mut top_needs_check = None;
    if header.flags & FLAG_NEEDS_CHECK != 0 {
        let i = ctx.add(
            Severity::Error,
            "needs_check",
            "flagged as needing a check".into(),
        );
        top_needs_check = Some((i, ctx.repairable));
    }
    let source = crate::layer_source();
    // Every layer stays open (and locked) until the check ends.
    let mut held = Vec::new();
    for step in ChainWalk::new(&*source, image, &header, top_id, true) {
        let l = match step {
            Ok(l) => l,
            Err((stop, e)) => {
                ctx.add(Severity::Error, stop_kind(stop), e.to_string());
                break;
            }
        };
        ctx.file = l.path.clone();
        ctx.depth = l.depth;
        ctx.repairable = false;
        ctx.report.layers_checked += 1;
        let name = l.path.to_string_lossy();
        if cowdisk_remote::is_remote(&name) {
            ctx.report.remote_layers.push(name.into_owned());
        }
        for p in &l.link {
            ctx.add(Severity::Error, link_kind(p), p.to_string());
        }
        let lower = Options {
            repair: false,
            ..*opts
        };
        check_layer(&mut ctx, &*l.storage, None, &lower, l.loaded)?;
        held.push(l.storage);
    }
    super::temps::check_temps(&mut report, image, repair)?;
    if let Some((i, true)) = top_needs_check {
        let others = report
            .findings
            .iter()
            .enumerate()
            .any(|(j, f)| j != i && f.severity == Severity::Error && !f.repaired);
        if !others {
            let loaded = read_header(&top, image)?;
            let mut h = loaded.header.clone();
            h.flags &= !FLAG_NEEDS_CHECK;
            write_header(&top, image, &loaded, &h)?;
            failpoint::hit("check.repair.after_flag");
            report.findings[i].repaired = true;
        }
    }
    if top_repairable {
        keep_for_operator(&mut report, &top, image)?;
    }
    Ok(report)
}

/// A possibly newer map slot was kept (no `--discard-unreferenced`): sets the top's
/// needs-check flag, so it opens read-only and no flush overwrites the damaged slot or
/// the data it may reference until the operator decides.
fn keep_for_operator(report: &mut Report, top: &FileStorage, image: &Path) -> Result<()> {
    let kept: Vec<usize> = (0..report.findings.len())
        .filter(|&i| {
            let f = &report.findings[i];
            f.kind == MAP_SLOT_NEWER && f.depth == 0 && !f.repaired
        })
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    let loaded = read_header(top, image)?;
    if loaded.header.flags & FLAG_NEEDS_CHECK == 0 {
        let mut h = loaded.header.clone();
        h.flags |= FLAG_NEEDS_CHECK;
        write_header(top, image, &loaded, &h)?;
        failpoint::hit("check.repair.after_keep_flag");
    }
    for i in kept {
        report.findings[i].message +=
            " (kept: the image stays flagged needs-check, so it opens read-only)";
    }
    Ok(())
}

fn stop_kind(stop: WalkStop) -> &'static str {
    match stop {
        WalkStop::Missing => "parent_missing",
        WalkStop::NotRegular => "parent_not_regular",
        WalkStop::Loop => "chain_loop",
        WalkStop::TooDeep => "chain_too_deep",
        WalkStop::Header => "header",
    }
}

fn link_kind(e: &LinkError) -> &'static str {
    match e {
        LinkError::Uuid { .. } | LinkError::Digest { .. } => "parent_identity",
        LinkError::NotSealed { .. } => "parent_not_sealed",
        LinkError::BlockSize { .. } | LinkError::Larger { .. } => "geometry",
    }
}

/// Checks one layer whose header was read; `writable` is the top's storage when
/// `--repair` may write it.
fn check_layer(
    ctx: &mut Ctx<'_>,
    st: &dyn ReadStorage,
    writable: Option<&FileStorage>,
    opts: &Options,
    loaded: LoadedHeader,
) -> Result<()> {
    let path = ctx.file.clone();
    let h = loaded.header.clone();
    let fixer = writable.filter(|_| ctx.repairable && opts.repair);
    if let Some(e) = loaded.other_slot_damaged.clone() {
        let i = ctx.add(
            Severity::Leak,
            "header_slot",
            format!("inactive header slot {} is damaged: {e}", 1 - loaded.slot),
        );
        if let Some(w) = fixer {
            write_header(w, &path, &loaded, &h)?;
            failpoint::hit("check.repair.after_header");
            ctx.repaired(i);
        }
    }
    let g = h.geometry;
    let (map, slots) = match load_map(st, &path, &g) {
        Ok(x) => x,
        Err(e) => {
            ctx.add(Severity::Error, "map", e.to_string());
            return Ok(());
        }
    };
    let leaked = unreferenced_blocks(st, &g, &map);
    let discard = opts.discard_unreferenced;
    let leaked = super::slots::check_slots(ctx, fixer, discard, &g, &map, &slots, leaked)?;
    let len = st.len().map_err(|e| Error::os(&path, "stat", e))?;
    if len > g.file_len() {
        let i = ctx.add(
            Severity::Leak,
            "trailing_bytes",
            format!("{} bytes past the end of the layout", len - g.file_len()),
        );
        if let Some(w) = fixer {
            w.set_len(g.file_len())
                .and_then(|()| w.sync())
                .map_err(|e| Error::os(&path, "truncate", e))?;
            failpoint::hit("check.repair.after_truncate");
            ctx.repaired(i);
        }
    }
    report_leaked(ctx, fixer, &g, &leaked)?;
    if h.state == LayerState::Writable {
        if let Err(e) = check_partial_bitmaps(st, &path, &g, &map) {
            ctx.add(Severity::Error, "partial_bitmap", e.to_string());
        }
    }
    if h.state == LayerState::Sealed {
        check_sealed(ctx, st, &h, &map, opts.show)?;
    }
    Ok(())
}

/// Blocks with space allocated in the data area that the map does not reference: left
/// by a crash between a data write and its map update, or referenced only by a damaged
/// newer map slot.
fn unreferenced_blocks(st: &dyn ReadStorage, g: &Geometry, map: &AllocMap) -> Vec<u64> {
    let mut leaked = Vec::new();
    let Some(fd) = st.fd() else { return leaked };
    let bs = u64::from(g.block_size);
    let mut pos = g.data_offset;
    let end = g.data_end();
    while pos < end {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(_) => break, // ENXIO: no more data (or SEEK_DATA unsupported).
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(fd, SeekFrom::Hole(data))
            .unwrap_or(end)
            .min(end);
        let first = (data - g.data_offset) / bs;
        let last = (hole - g.data_offset).div_ceil(bs);
        for b in first..last.min(g.blocks) {
            if !matches!(map.get(b), BlockState::Data | BlockState::Partial) {
                leaked.push(b);
            }
        }
        pos = hole.max(data + 1);
    }
    leaked
}

/// Unreferenced blocks outside any possibly newer map slot's page: harmless; repair
/// punches them out.
fn report_leaked(
    ctx: &mut Ctx<'_>,
    fixer: Option<&FileStorage>,
    g: &Geometry,
    leaked: &[u64],
) -> Result<()> {
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
    if let Some(w) = fixer {
        super::slots::punch(ctx, w, g, leaked)?;
        ctx.repaired(i);
    }
    Ok(())
}

/// A sealed layer: the digest over map + stored CRCs, and each data block's CRC.
fn check_sealed(
    ctx: &mut Ctx<'_>,
    st: &dyn ReadStorage,
    h: &Header,
    map: &AllocMap,
    show: bool,
) -> Result<()> {
    let path = ctx.file.clone();
    match verify_seal_digest(st, &path, h, map) {
        Ok(()) => {}
        Err(OpenError::Format {
            source: FormatError::SealDigest { stored, actual },
            ..
        }) => {
            ctx.add(
                Severity::Error,
                "seal_digest",
                format!(
                    "seal digest {stored:#010x} does not match the map and block CRCs ({actual:#010x})"
                ),
            );
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(b) = map.first_partial() {
        ctx.add(
            Severity::Error,
            "partial_block",
            format!("block {b} is partial, which a sealed layer must not hold"),
        );
    }
    let g = h.geometry;
    let data_blocks = map.counts().data;
    let mut progress = Progress::new("check", data_blocks * u64::from(g.block_size), show);
    let mut buf = vec![0u8; g.block_size as usize];
    let mut bad = Vec::new();
    for b in map.blocks_in(BlockState::Data) {
        match read_verified_block(st, &path, &g, b, &mut buf) {
            Ok(_) => {}
            Err(IoError::Checksum { .. }) => bad.push(b),
            Err(e) => return Err(Error::disk(&path, e)),
        }
        ctx.report.blocks_verified += 1;
        progress.add(g.block_len(b) as u64);
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
