//! A remote layer as the engine sees it: read-only storage that presents the layer
//! object as the canonical layer *file* of FORMAT.md (header slot A, map pages in slot
//! A, the block-CRC area, data blocks at their fixed offsets), synthesized from the
//! object's compact metadata, with data blocks fetched lazily.
//!
//! So the engine's own checks run unchanged on remote layers: the walk compares UUID and
//! seal digest with the child's record, the opener recomputes the seal digest from the
//! map and CRCs, and the first read of each block is checked against its CRC again.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use cowdisk_core::format::{encode_page, HEADER_SLOT, PAGE_HEADER, PAGE_SIZE};
use cowdisk_core::ReadStorage;

use crate::cache::CacheDir;
use crate::client::Client;
use crate::error::{RemoteError, Result};
use crate::fetch::{cache_offset, FetchOptions, Fetcher, Unit};
use crate::object::{object_name, LayerMeta, ObjectHeader, META_OFFSET, OBJECT_HEADER, SUFFIX};
use crate::trace::TraceRecorder;
use crate::url::S3Url;
use crate::verified::Verified;

/// Range GETs a trace prefetch keeps in flight (overlaybd replays with 16).
const PREFETCH_PARALLEL: usize = 16;

/// Map entries in one page.
const PAGE_ENTRY_BYTES: u64 = PAGE_SIZE - PAGE_HEADER as u64;

/// Adjacent units one GET fetches at most (1 MiB with the default 256 KiB unit): a
/// sequential reader's or readahead's run costs the store a quarter of the requests.
const PER_GET: usize = 4;

/// Reads of cached blocks at least this long may be sent from the cache file by
/// descriptor ([`ReadStorage::staged`]); shorter ones cost less copied than the extra
/// system calls (measured: random 4 KiB reads copied beat `sendfile` from a local layer).
const STAGE_MIN: u64 = 64 * 1024;

/// Readahead fetches running in the background in this process, at most.
const MAX_BACKGROUND: usize = 4;
static BACKGROUND: AtomicUsize = AtomicUsize::new(0);

/// A piece of a read to check or fetch: rank, offset in the block, start in the buffer,
/// length.
type Piece = (usize, usize, usize, usize);

/// How one read is served: `trusted` runs of the cache file (file offset, start in the
/// buffer, length), `checked` pieces.
#[derive(Default)]
struct Plan {
    trusted: Vec<(u64, usize, usize)>,
    checked: Vec<Piece>,
    generation: Option<u64>,
}

/// One open layer object.
pub struct RemoteLayer {
    url: S3Url,
    meta: LayerMeta,
    fetcher: Fetcher,
    last_unit: AtomicUsize,
    verified: Verified,
    me: Weak<RemoteLayer>,
    record: Option<Arc<TraceRecorder>>,
}

/// Fetches and validates an object's header and metadata (the only bytes read at open).
pub fn load_meta(client: &Client, url: &S3Url, deadline: Instant) -> Result<LayerMeta> {
    let obj = url.to_string();
    let len = client
        .head(url, deadline)?
        .ok_or_else(|| RemoteError::NotFound {
            object: obj.clone(),
        })?;
    if len < OBJECT_HEADER {
        return Err(RemoteError::bad_object(
            &obj,
            "not a cowdisk layer object (too short)",
        ));
    }
    let mut b = vec![0u8; OBJECT_HEADER as usize];
    client.get_range(url, 0, &mut b, deadline)?;
    let oh = ObjectHeader::decode(&b, len, &obj)?;
    let mut m = vec![0u8; oh.meta_len as usize];
    client.get_range(url, META_OFFSET, &mut m, deadline)?;
    let meta = LayerMeta::decode(oh, &m, &obj)?;
    let name = object_name(&meta.header.uuid, meta.header.seal_digest);
    if url.name().ends_with(SUFFIX) && url.name() != name {
        return Err(RemoteError::bad_object(
            &obj,
            format!("holds layer {name}, not the one its name says (replaced?)"),
        ));
    }
    Ok(meta)
}

impl RemoteLayer {
    /// Opens the layer object at `url`: reads its metadata, opens its cache file.
    pub fn open(
        client: Arc<Client>,
        url: &S3Url,
        cache: Option<&Arc<CacheDir>>,
        opts: FetchOptions,
        record: Option<Arc<TraceRecorder>>,
    ) -> Result<Arc<RemoteLayer>> {
        let meta = load_meta(&client, url, Instant::now() + opts.deadline)?;
        let bs = meta.object.geometry.block_size;
        let name = object_name(&meta.header.uuid, meta.header.seal_digest);
        let ranks = meta.data.len();
        let cache_len = ranks as u64 * u64::from(bs);
        let cache = cache.and_then(|c| c.open(name.trim_end_matches(SUFFIX), cache_len));
        let fetcher = Fetcher::new(url.clone(), client, cache, opts, bs);
        Ok(Arc::new_cyclic(|me| RemoteLayer {
            url: url.clone(),
            meta,
            fetcher,
            last_unit: AtomicUsize::new(usize::MAX - 1),
            verified: Verified::new(ranks),
            me: me.clone(),
            record,
        }))
    }

    /// The object's location.
    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// The layer's content name (`<uuid>-<seal digest>`), as traces and the cache name it.
    pub fn name(&self) -> String {
        let h = &self.meta.header;
        object_name(&h.uuid, h.seal_digest)
            .trim_end_matches(SUFFIX)
            .to_string()
    }

    /// The layer's metadata.
    pub fn meta(&self) -> &LayerMeta {
        &self.meta
    }

    /// Fetches the units holding `blocks` (virtual block numbers) that the cache lacks,
    /// in parallel: the trace prefetch.
    pub fn prefetch_blocks(&self, blocks: impl Iterator<Item = u64>) -> Result<(), io::Error> {
        let units: BTreeSet<usize> = blocks
            .filter_map(|b| self.meta.rank(b))
            .map(|r| self.fetcher.unit_of(r))
            .collect();
        let missing: Vec<usize> = units
            .into_iter()
            .filter(|&u| !self.fetcher.unit_cached(&self.meta, u))
            .collect();
        let deadline = Instant::now() + self.fetcher.opts.deadline;
        self.fetch_units(&missing, deadline, PREFETCH_PARALLEL)
            .map(|_| ())
    }

    /// Fetches `units` (ascending) with at most `parallel` GETs in flight, adjacent ones
    /// [`PER_GET`] to a GET.
    fn fetch_units(
        &self,
        units: &[usize],
        deadline: Instant,
        parallel: usize,
    ) -> io::Result<Vec<(usize, Arc<Unit>)>> {
        self.fetcher
            .get_units(&self.meta, units, PER_GET, parallel, deadline)
            .into_iter()
            .map(|(u, r)| {
                let unit = r.map_err(|e| io::Error::other(e.to_string()))?;
                // Cached as fetched: later reads may take them from the cache file as
                // they are (by descriptor, too), as after a checked read.
                if let Some((g, ranks)) = &unit.cached {
                    self.verified.mark(*g, ranks);
                }
                Ok((u, unit))
            })
            .collect()
    }

    /// After a read of units `first..=last`: if the reader moves forward unit by unit,
    /// fetch the next units in the background (only with a cache to keep them in).
    fn readahead(&self, first: usize, last: usize) {
        let prev = self.last_unit.swap(last, Ordering::Relaxed);
        let sequential = first == prev || first == prev.wrapping_add(1);
        let cache_ok = self.fetcher.cache.as_ref().is_some_and(|c| c.healthy());
        if !sequential || !cache_ok || self.fetcher.opts.readahead == 0 {
            return;
        }
        let end = (last + 1 + self.fetcher.opts.readahead).min(self.fetcher.units(&self.meta));
        if last + 1 >= end || BACKGROUND.fetch_add(1, Ordering::Relaxed) >= MAX_BACKGROUND {
            BACKGROUND.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let Some(me) = self.me.upgrade() else {
            BACKGROUND.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        std::thread::spawn(move || {
            let deadline = Instant::now() + me.fetcher.opts.deadline;
            let missing: Vec<usize> = (last + 1..end)
                .filter(|&u| !me.fetcher.unit_cached(&me.meta, u))
                .collect();
            // In parallel, like a foreground read. Errors are the foreground reader's to
            // report when it gets there.
            let _ = me.fetch_units(&missing, deadline, me.fetcher.opts.parallel);
            BACKGROUND.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Fills `buf` from the data region at virtual file offset `off`: blocks this process
    /// verified straight from the cache file, others from the cache checked against their
    /// CRC, the rest fetched.
    fn read_data(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut plan = self.plan(buf, off, true);
        if !plan.trusted.is_empty() && !self.read_trusted(buf, &plan) {
            // Evicted since verified, or a read error: every piece the CRC way.
            plan = self.plan(buf, off, false);
        }
        let missing = self.read_checked(buf, &plan.checked);
        self.fill_missing(buf, &missing)?;
        Ok(())
    }

    /// Splits a read into runs of the cache file to read as they are (verified blocks,
    /// adjacent ones merged into one read) and pieces to check; fills holes with zeros.
    fn plan(&self, buf: &mut [u8], off: u64, trust: bool) -> Plan {
        let g = self.meta.object.geometry;
        let bs = u64::from(g.block_size);
        let mut plan = Plan::default();
        let verified = self.verified.read();
        let trust = trust && self.fetcher.cache.is_some();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64 - g.data_offset;
            let (b, inb) = (pos / bs, (pos % bs) as usize);
            let n = (bs as usize - inb).min(buf.len() - done);
            let blen = g.block_len(b);
            match self.meta.rank(b) {
                Some(r) if inb < blen => {
                    let k = n.min(blen - inb);
                    buf[done + k..done + n].fill(0);
                    if trust && verified.has(r) {
                        let at = cache_offset(&self.meta, r) + inb as u64;
                        match plan.trusted.last_mut() {
                            Some(t) if t.0 + t.2 as u64 == at && t.1 + t.2 == done => t.2 += k,
                            _ => plan.trusted.push((at, done, k)),
                        }
                    } else {
                        plan.checked.push((r, inb, done, n));
                    }
                }
                _ => buf[done..done + n].fill(0),
            }
            done += n;
        }
        plan.generation = verified.generation();
        plan
    }

    /// Reads verified runs from the cache file; false (and the verified set forgotten) if
    /// an eviction may have touched them or a read failed.
    fn read_trusted(&self, buf: &mut [u8], plan: &Plan) -> bool {
        let Some(cache) = &self.fetcher.cache else {
            return false;
        };
        // The generation the set had when the plan consulted it, not whatever it has now.
        let before = plan.generation;
        let ok = plan
            .trusted
            .iter()
            .all(|&(at, s, n)| cache.read_trusted(&mut buf[s..s + n], at));
        let now = cache.generation();
        if ok && now.is_some() && now == before {
            return true;
        }
        self.verified.reset(now);
        false
    }

    /// Reads `pieces` from the cache, each block checked against its CRC; remembers the
    /// blocks that pass while no eviction ran. Returns the pieces the cache lacks.
    fn read_checked(&self, buf: &mut [u8], pieces: &[Piece]) -> Vec<Piece> {
        let Some(cache) = &self.fetcher.cache else {
            return pieces.to_vec();
        };
        if pieces.is_empty() {
            // A read served whole from verified blocks: no generation to read again.
            return Vec::new();
        }
        let before = cache.generation();
        let mut missing = Vec::new();
        let mut good = Vec::new();
        let mut scratch = Vec::new();
        for &(r, inb, at, n) in pieces {
            let blen = self.meta.data_range(r).1;
            let at_cache = cache_offset(&self.meta, r);
            scratch.resize(blen, 0);
            // A cold block is a hole: no need to read and check a whole block of zeros.
            if cache.probably_holds(at_cache, blen)
                && cache.read(&mut scratch, at_cache, self.meta.crcs[r])
            {
                let k = n.min(blen - inb);
                buf[at..at + k].copy_from_slice(&scratch[inb..inb + k]);
                good.push(r);
            } else {
                missing.push((r, inb, at, n));
            }
        }
        if let Some(g) = before.filter(|&g| cache.generation() == Some(g)) {
            self.verified.mark(g, &good);
        }
        missing
    }

    fn fill_missing(&self, buf: &mut [u8], missing: &[Piece]) -> io::Result<()> {
        let units: Vec<usize> = missing
            .iter()
            .map(|m| self.fetcher.unit_of(m.0))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if let (Some(&first), Some(&last)) = (units.first(), units.last()) {
            self.readahead(first, last);
        }
        let deadline = Instant::now() + self.fetcher.opts.deadline;
        if let Some(rec) = &self.record {
            let name = self.name();
            for m in missing {
                rec.record(&name, u64::from(self.meta.data[m.0]));
            }
        }
        let fetched = self.fetch_units(&units, deadline, self.fetcher.opts.parallel)?;
        for &(r, inb, at, n) in missing {
            let u = self.fetcher.unit_of(r);
            let unit = &fetched.iter().find(|f| f.0 == u).expect("fetched above").1;
            let block = unit.block(r).ok_or_else(|| {
                io::Error::other(format!(
                    "{}: block {} fails its CRC (damaged object)",
                    self.url, self.meta.data[r]
                ))
            })?;
            let k = n.min(block.len() - inb);
            buf[at..at + k].copy_from_slice(&block[inb..inb + k]);
            buf[at + k..at + n].fill(0);
        }
        Ok(())
    }

    /// Fills `piece` with the synthesized metadata bytes at virtual offset `off`
    /// (everything before the data region).
    fn read_meta(&self, piece: &mut [u8], off: u64) {
        let g = self.meta.object.geometry;
        let mut done = 0usize;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        while done < piece.len() {
            let o = off + done as u64;
            let out = &mut piece[done..];
            let n = if o < HEADER_SLOT {
                let n = out.len().min((HEADER_SLOT - o) as usize);
                out[..n].copy_from_slice(&self.meta.header_slot[o as usize..o as usize + n]);
                n
            } else if o < g.crc_offset {
                // Map pages: slot A holds the page, slot B is empty (like a fresh file);
                // header slot B is empty too.
                let slot_start = o / PAGE_SIZE * PAGE_SIZE;
                let n = out.len().min((slot_start + PAGE_SIZE - o) as usize);
                let rel = slot_start.saturating_sub(2 * HEADER_SLOT) / PAGE_SIZE;
                if o >= 2 * HEADER_SLOT && rel.is_multiple_of(2) {
                    self.page(rel / 2, &mut page);
                    let s = (o - slot_start) as usize;
                    out[..n].copy_from_slice(&page[s..s + n]);
                } else {
                    out[..n].fill(0);
                }
                n
            } else {
                let n = out.len().min((g.data_offset - o) as usize);
                self.crc_area(&mut out[..n], o - g.crc_offset);
                n
            };
            done += n;
        }
    }

    /// Map page `p` as the engine would have written it.
    fn page(&self, p: u64, out: &mut [u8]) {
        let e = &self.meta.entries;
        let s = (p * PAGE_ENTRY_BYTES) as usize;
        let end = (s + PAGE_ENTRY_BYTES as usize).min(e.len());
        encode_page(out, p, 1, &e[s.min(end)..end]);
    }

    /// Bytes of the block-CRC area from `rel`: data blocks' CRCs, zero elsewhere.
    fn crc_area(&self, out: &mut [u8], rel: u64) {
        out.fill(0);
        let first = rel / 4;
        let last = (rel + out.len() as u64).div_ceil(4);
        let start = self.meta.data.partition_point(|&b| u64::from(b) < first);
        for r in start..self.meta.data.len() {
            let b = u64::from(self.meta.data[r]);
            if b >= last {
                break;
            }
            let bytes = self.meta.crcs[r].to_le_bytes();
            for (i, x) in bytes.iter().enumerate() {
                let at = b * 4 + i as u64;
                if at >= rel && at < rel + out.len() as u64 {
                    out[(at - rel) as usize] = *x;
                }
            }
        }
    }
}

impl ReadStorage for RemoteLayer {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let g = self.meta.object.geometry;
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= g.file_len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let split = g.data_offset.clamp(off, end);
        let (meta, data) = buf.split_at_mut((split - off) as usize);
        self.read_meta(meta, off);
        if !data.is_empty() {
            self.read_data(data, split)?;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.meta.object.geometry.file_len())
    }

    /// Every data block is checked against the CRC in the object's metadata (the CRC
    /// area this storage presents, bound to the seal digest the engine checks at open)
    /// on arrival or on its first read from the cache.
    fn verifies_reads(&self) -> bool {
        true
    }

    /// A block not in the cache is fetched from the bucket.
    fn may_wait_on_network(&self) -> bool {
        true
    }

    /// Runs of the cache file when every block of the range is cached and was verified
    /// by this process, with the eviction generation they were verified under: as for
    /// `RemoteLayer::read_trusted`, the bytes hold if no eviction ran until after they
    /// were read. Reads under `STAGE_MIN` are copied instead.
    fn staged(
        &self,
        off: u64,
        len: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Option<(BorrowedFd<'_>, u64)> {
        let cache = self.fetcher.cache.as_ref().filter(|_| len >= STAGE_MIN)?;
        let g = self.meta.object.geometry;
        let bs = u64::from(g.block_size);
        let (mut pos, end) = (off.checked_sub(g.data_offset)?, off.checked_add(len)?);
        let end = end.checked_sub(g.data_offset)?;
        let verified = self.verified.read();
        let token = verified.generation()?;
        let start = out.len();
        while pos < end {
            let (b, inb) = (pos / bs, pos % bs);
            let n = (bs - inb).min(end - pos);
            let held = self
                .meta
                .rank(b)
                .filter(|&r| inb + n <= g.block_len(b) as u64 && verified.has(r));
            let Some(r) = held else {
                out.truncate(start);
                return None;
            };
            let at = cache_offset(&self.meta, r) + inb;
            let ours = out.len() > start;
            match out.last_mut() {
                Some(l) if ours && l.0 + l.1 == at => l.1 += n,
                _ => out.push((at, n)),
            }
            pos += n;
        }
        Some((cache.fd(), token))
    }

    fn staged_valid(&self, token: u64) -> bool {
        let Some(cache) = &self.fetcher.cache else {
            return false;
        };
        let now = cache.generation();
        if now == Some(token) {
            return true;
        }
        // Evicted from since: what this process verified may be gone.
        self.verified.reset(now);
        false
    }
}
