//! Layer files for the image targets: a compact sparse encoding the fuzzer mutates, and
//! fix-ups that re-seal checksums afterwards.
//!
//! A real layer is mostly zeros (two 4 KiB header slots, map pages, a CRC area, data), so
//! the input lists only the non-zero runs. Without the fix-ups nearly every mutation
//! would stop at a CRC check; with them, mutated fields reach the validation and the code
//! behind it (thin-provisioning-tools' damage generator does the same for its checker).

use cowdisk_core::format::{
    decode_page, BlockState, DigestBuilder, Geometry, Header, PageSlot, Uuid, COMPAT_BLOCK_CRCS,
    HEADER_SLOT, MAGIC, PAGE_HEADER, PAGE_MAGIC, PAGE_SIZE,
};

use crate::input::Input;

/// Largest layer file the harness builds. Every buffer the engine allocates for a layer
/// is bounded by the file's length (the header's geometry must fit in the file), so this
/// also bounds the engine's memory per input. A real sparse file could claim up to 2^32
/// blocks in a few KiB, and the engine allocates its maps per block (a known defect,
/// being fixed separately): simulated files hold every byte, so that case cannot arise
/// here and fuzzing stays on parsing and I/O paths. 1 MiB still fits block sizes up to
/// 512 KiB (data starts block-aligned).
pub const MAX_FILE: usize = 1 << 20;

// Header field offsets from FORMAT.md: format.rs keeps its own constants private.
const H_COMPAT: usize = 32;
const H_UUID: usize = 48;
const H_VIRTUAL_SIZE: usize = 64;
const H_BLOCK_SIZE: usize = 72;
const H_STATE: usize = 76;
const H_SEAL_DIGEST: usize = 120;
const H_PARENT_UUID: usize = 128;
const H_PARENT_DIGEST: usize = 144;
const H_PARENT_LEN: usize = 148;
const H_PARENT_PATH: usize = 152;
const H_CRC: usize = HEADER_SLOT as usize - 4;
const SLOT: usize = HEADER_SLOT as usize;
const PAGE: usize = PAGE_SIZE as usize;

/// Fix-up: recompute the CRC of every header slot that has the magic.
pub const FIX_HEADER_CRC: u8 = 1;
/// Fix-up: recompute the CRC of every map page slot that has the page magic.
pub const FIX_PAGE_CRC: u8 = 2;
/// Fix-up: for a sealed layer, recompute the block CRC area and the seal digest.
pub const FIX_SEAL: u8 = 4;
/// Fix-up: point the parent reference at the layer below (its UUID and digest).
pub const FIX_LINK: u8 = 8;
/// Every fix-up.
pub const FIX_ALL: u8 = 15;

/// One decoded layer: which fix-ups to apply and the file's bytes.
pub struct Sparse {
    /// `FIX_*` bits (the other bits are free for the target).
    pub flags: u8,
    /// The file.
    pub image: Vec<u8>,
}

/// Decodes `flags:u8 len:u16 records:u16 {offset:u32 len:u16 bytes}*`. `len` is the
/// file length in 512-byte units, 0 meaning "what slot A's geometry implies".
pub fn decode(inp: &mut Input) -> Sparse {
    let flags = inp.u8();
    let len_code = usize::from(inp.u16());
    let records = inp.u16();
    let mut image = Vec::new();
    for _ in 0..records {
        if inp.is_empty() {
            break;
        }
        let off = inp.u32() as usize % MAX_FILE;
        let n = usize::from(inp.u16()).min(MAX_FILE - off);
        let bytes = inp.bytes(n);
        if image.len() < off + bytes.len() {
            image.resize(off + bytes.len(), 0);
        }
        image[off..off + bytes.len()].copy_from_slice(bytes);
    }
    let len = if len_code == 0 {
        geometry(&image).map_or(image.len(), |g| g.file_len() as usize)
    } else {
        len_code * 512
    };
    image.resize(len.min(MAX_FILE), 0);
    Sparse { flags, image }
}

/// Encodes a file as [`decode`] reads it: its non-zero runs (gaps under 32 bytes are
/// kept inside a run, so a header is one record, not dozens).
pub fn encode(flags: u8, image: &[u8]) -> Vec<u8> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < image.len() {
        if image[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i + 1;
        // Extend while a non-zero byte lies within the next 32.
        while end < image.len()
            && end - start < u16::MAX as usize
            && image[end..(end + 32).min(image.len())]
                .iter()
                .any(|&b| b != 0)
        {
            end += 1;
        }
        runs.push((start, end));
        i = end;
    }
    let implied = geometry(image).is_some_and(|g| g.file_len() as usize == image.len());
    let len_code = if implied {
        0
    } else {
        image.len().div_ceil(512)
    };
    let mut out = vec![flags];
    out.extend_from_slice(&(len_code as u16).to_le_bytes());
    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    for (s, e) in runs {
        out.extend_from_slice(&(s as u32).to_le_bytes());
        out.extend_from_slice(&((e - s) as u16).to_le_bytes());
        out.extend_from_slice(&image[s..e]);
    }
    out
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Header slots (0 = A, 1 = B) present in the file and carrying the magic.
fn slots(image: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (0..2).filter(move |s| image.len() >= (s + 1) * SLOT && image[s * SLOT..s * SLOT + 8] == MAGIC)
}

/// The geometry the first slot with the magic declares, if valid.
pub fn geometry(image: &[u8]) -> Option<Geometry> {
    let s = slots(image).next()? * SLOT;
    let size = u64_at(image, s + H_VIRTUAL_SIZE);
    Geometry::new(size, u32_at(image, s + H_BLOCK_SIZE)).ok()
}

/// The identity a child records for this layer: UUID and seal digest of the header
/// the engine will pick (the valid slot with the higher generation, A on a tie), else
/// of the first slot with the magic.
pub fn identity(image: &[u8]) -> Option<(Uuid, u32)> {
    let valid = (0..2)
        .filter_map(|s| image.get(s * SLOT..(s + 1) * SLOT))
        .filter_map(|b| Header::decode(b).ok())
        .reduce(|a, b| if b.generation > a.generation { b } else { a });
    if let Some(h) = valid {
        return Some((h.uuid, h.seal_digest));
    }
    let s = slots(image).next()? * SLOT;
    let mut uuid = Uuid::default();
    uuid.0.copy_from_slice(&image[s + H_UUID..s + H_UUID + 16]);
    Some((uuid, u32_at(image, s + H_SEAL_DIGEST)))
}

/// Applies the fix-ups `flags` asks for; `below` is the identity of the layer under
/// this one, for [`FIX_LINK`].
pub fn fix(image: &mut [u8], flags: u8, below: Option<(Uuid, u32)>) {
    let g = geometry(image);
    if flags & FIX_PAGE_CRC != 0 {
        if let Some(g) = &g {
            fix_pages(image, g);
        }
    }
    if flags & FIX_SEAL != 0 {
        if let Some(g) = &g {
            reseal(image, g);
        }
    }
    if flags & FIX_LINK != 0 {
        if let Some((uuid, digest)) = below {
            link(image, uuid, digest);
        }
    }
    if flags & FIX_HEADER_CRC != 0 {
        for s in slots(image).collect::<Vec<_>>() {
            let b = &mut image[s * SLOT..(s + 1) * SLOT];
            let crc = crc32fast::hash(&b[..H_CRC]);
            b[H_CRC..].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Page slots of the map region that lie inside the file: (file offset, page index).
fn page_slots(image: &[u8], g: &Geometry) -> Vec<(usize, u64)> {
    (0..g.map_pages)
        .flat_map(|p| [(g.page_offset(p, 0), p), (g.page_offset(p, 1), p)])
        .map(|(o, p)| (o as usize, p))
        .filter(|&(o, _)| o + PAGE <= image.len())
        .collect()
}

fn fix_pages(image: &mut [u8], g: &Geometry) {
    for (o, _) in page_slots(image, g) {
        let b = &mut image[o..o + PAGE];
        if b[0..4] == PAGE_MAGIC {
            // FORMAT.md: CRC-32 over the page with its CRC field (bytes 16..20) as zero.
            b[16..20].fill(0);
            let crc = crc32fast::hash(b);
            b[16..20].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Block states as the engine will load them: per page, the valid slot with the
/// highest sequence; entries are 2 bits per block, low bits first.
fn states(image: &[u8], g: &Geometry) -> Vec<BlockState> {
    let mut out = vec![BlockState::Absent; g.blocks as usize];
    let per_page = (PAGE - PAGE_HEADER) * 4;
    for p in 0..g.map_pages {
        let mut best: Option<(u64, usize)> = None;
        for s in 0..2 {
            let o = g.page_offset(p, s) as usize;
            if o + PAGE > image.len() {
                continue;
            }
            if let PageSlot::Valid { sequence } = decode_page(&image[o..o + PAGE], p) {
                if best.is_none_or(|(q, _)| sequence > q) {
                    best = Some((sequence, o));
                }
            }
        }
        let Some((_, o)) = best else { continue };
        let entries = &image[o + PAGE_HEADER..o + PAGE];
        for (i, st) in out
            .iter_mut()
            .enumerate()
            .skip(p as usize * per_page)
            .take(per_page)
        {
            let j = i - p as usize * per_page;
            *st = match (entries[j / 4] >> (2 * (j % 4))) & 3 {
                1 => BlockState::Data,
                2 => BlockState::Zero,
                _ => BlockState::Absent,
            };
        }
    }
    out
}

/// Recomputes the per-block CRCs and seal digest of a layer whose state is sealed, and
/// sets the block-CRC feature bit, as sealing does.
fn reseal(image: &mut [u8], g: &Geometry) {
    let Some(s) = slots(image).next() else { return };
    let h = s * SLOT;
    if u32_at(image, h + H_STATE) != 1 || image.len() < g.file_len() as usize {
        return;
    }
    let (uuid, _) = identity(image).expect("slot has the magic");
    let mut digest = DigestBuilder::new(&uuid, g);
    for (b, st) in states(image, g).into_iter().enumerate() {
        let b = b as u64;
        let crc = if st == BlockState::Data {
            let off = g.block_offset(b) as usize;
            let crc = crc32fast::hash(&image[off..off + g.block_len(b)]);
            let at = (g.crc_offset + b * 4) as usize;
            image[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            crc
        } else {
            0
        };
        digest.block(st, crc);
    }
    let digest = digest.finish();
    for s in slots(image).collect::<Vec<_>>() {
        let h = s * SLOT;
        image[h + H_SEAL_DIGEST..h + H_SEAL_DIGEST + 4].copy_from_slice(&digest.to_le_bytes());
        let compat = u64_at(image, h + H_COMPAT) | COMPAT_BLOCK_CRCS;
        image[h + H_COMPAT..h + H_COMPAT + 8].copy_from_slice(&compat.to_le_bytes());
    }
}

/// Records `uuid`/`digest` as the parent; gives a layer without a parent path one
/// (`open_storages` takes the parent by position, the path only has to be valid).
fn link(image: &mut [u8], uuid: Uuid, digest: u32) {
    for s in slots(image).collect::<Vec<_>>() {
        let h = s * SLOT;
        image[h + H_PARENT_UUID..h + H_PARENT_UUID + 16].copy_from_slice(&uuid.0);
        image[h + H_PARENT_DIGEST..h + H_PARENT_DIGEST + 4].copy_from_slice(&digest.to_le_bytes());
        if image[h + H_PARENT_LEN..h + H_PARENT_LEN + 2] == [0, 0] {
            image[h + H_PARENT_LEN..h + H_PARENT_LEN + 2].copy_from_slice(&1u16.to_le_bytes());
            image[h + H_PARENT_PATH] = b'p';
        }
    }
}
