//! Fetching data blocks of one remote layer: in units of adjacent blocks of the object
//! (at least 256 KiB), one GET per unit however many readers want it, every block checked
//! against its CRC before it is used or cached.
//!
//! Units are fixed runs of ranks (positions among the layer's data blocks), and data
//! blocks are packed in rank order, so a unit is one contiguous range of the object:
//! adjacent missing blocks are coalesced for free, and the unit number is the key that
//! makes concurrent readers of one block share one fetch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cache::CacheFile;
use crate::client::Client;
use crate::error::RemoteError;
use crate::log::log;
use crate::object::LayerMeta;
use crate::url::S3Url;

/// How reads fetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchOptions {
    /// A read that cannot get its blocks within this fails with EIO.
    pub deadline: Duration,
    /// Smallest fetch unit in bytes (rounded to whole blocks).
    pub unit_bytes: u64,
    /// Range GETs one read may have in flight.
    pub parallel: usize,
    /// Units fetched ahead of a sequential reader.
    pub readahead: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            deadline: Duration::from_secs(30),
            unit_bytes: 256 << 10,
            parallel: 8,
            readahead: 8,
        }
    }
}

/// One fetched unit: its bytes, and which of its blocks failed their CRC.
pub struct Unit {
    first_rank: usize,
    offsets: Vec<(usize, usize)>,
    bytes: Vec<u8>,
    bad: Vec<bool>,
    /// The blocks (ranks) written to the cache with no eviction from before the first
    /// write until after the last, and that eviction generation: the cache file holds
    /// exactly their verified bytes then, as if they had been read back and checked.
    pub cached: Option<(u64, Vec<usize>)>,
}

impl Unit {
    /// The verified bytes of the block of `rank`, or `None` if it failed its CRC.
    pub fn block(&self, rank: usize) -> Option<&[u8]> {
        let i = rank - self.first_rank;
        let (s, l) = self.offsets[i];
        (!self.bad[i]).then(|| &self.bytes[s..s + l])
    }
}

type Outcome = Result<Arc<Unit>, Arc<str>>;

/// A fetch in progress that later readers of the same unit wait for.
#[derive(Default)]
struct Pending {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

/// The fetching half of a remote layer.
pub struct Fetcher {
    url: S3Url,
    client: Arc<Client>,
    /// The cache file, if the cache is usable.
    pub cache: Option<CacheFile>,
    /// How to fetch.
    pub opts: FetchOptions,
    per_unit: usize,
    inflight: Mutex<HashMap<usize, Arc<Pending>>>,
    /// The last few units fetched, so that reads of one unit's blocks in a row (and the
    /// engine's verify-then-read of one block) cost one GET even when the cache cannot
    /// hold them (full or unusable). At most [`RECENT`] units per layer in memory.
    recent: Mutex<VecDeque<(usize, Arc<Unit>)>>,
    reported: AtomicBool,
}

/// Units kept in memory per layer (each at most max(256 KiB, one block)).
const RECENT: usize = 4;

impl Fetcher {
    /// A fetcher for the layer object at `url`.
    pub fn new(
        url: S3Url,
        client: Arc<Client>,
        cache: Option<CacheFile>,
        opts: FetchOptions,
        bs: u32,
    ) -> Fetcher {
        Fetcher {
            url,
            client,
            cache,
            opts,
            per_unit: (opts.unit_bytes / u64::from(bs)).max(1) as usize,
            inflight: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            reported: AtomicBool::new(false),
        }
    }

    /// The unit holding `rank`.
    pub fn unit_of(&self, rank: usize) -> usize {
        rank / self.per_unit
    }

    /// Number of units of the layer.
    pub fn units(&self, meta: &LayerMeta) -> usize {
        meta.data.len().div_ceil(self.per_unit)
    }

    /// True if unit `u` looks cached (its first and last blocks, by
    /// [`CacheFile::probably_holds`]): for readahead and prefetch, which only need to
    /// skip what is there; reads check every block anyway.
    pub fn unit_cached(&self, meta: &LayerMeta, u: usize) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let r = self.ranks(meta, u);
        [r.start, r.end - 1].iter().all(|&k| {
            let len = meta.data_range(k).1;
            cache.probably_holds(cache_offset(meta, k), len)
        })
    }

    fn ranks(&self, meta: &LayerMeta, u: usize) -> std::ops::Range<usize> {
        let first = u * self.per_unit;
        first..(first + self.per_unit).min(meta.data.len())
    }

    /// The units `want` (ascending), fetching those no reader is fetching yet with one
    /// GET per stretch of at most `per_get` adjacent units, `parallel` GETs at a time,
    /// and waiting (up to `deadline`) for those another reader is fetching. Fewer, larger
    /// requests cost the store less than many unit-sized ones; a unit is still fetched
    /// once however many readers want it.
    pub fn get_units(
        &self,
        meta: &LayerMeta,
        want: &[usize],
        per_get: usize,
        parallel: usize,
        deadline: Instant,
    ) -> Vec<(usize, Outcome)> {
        let mut out = Vec::with_capacity(want.len());
        let mut waits = Vec::new();
        let mut stretches: Vec<Vec<(usize, Arc<Pending>)>> = Vec::new();
        {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            let mut cur: Vec<(usize, Arc<Pending>)> = Vec::new();
            for &u in want {
                let adjacent = cur.last().is_some_and(|l| l.0 + 1 == u);
                if !cur.is_empty() && (!adjacent || cur.len() == per_get.max(1)) {
                    stretches.push(std::mem::take(&mut cur));
                }
                if let Some(hit) = recent.iter().find(|r| r.0 == u) {
                    out.push((u, Ok(hit.1.clone())));
                } else if let Some(p) = m.get(&u) {
                    waits.push((u, p.clone()));
                } else {
                    let p = Arc::new(Pending::default());
                    m.insert(u, p.clone());
                    cur.push((u, p));
                }
            }
            stretches.extend((!cur.is_empty()).then_some(cur));
        }
        for group in stretches.chunks(parallel.max(1)) {
            if let [one] = group {
                out.extend(self.lead(meta, one, deadline));
                continue;
            }
            std::thread::scope(|s| {
                let hs: Vec<_> = group
                    .iter()
                    .map(|st| s.spawn(move || self.lead(meta, st, deadline)))
                    .collect();
                for h in hs {
                    out.extend(h.join().expect("fetch thread"));
                }
            });
        }
        for (u, p) in waits {
            out.push((u, self.wait(&p, deadline)));
        }
        out
    }

    /// Fetches a stretch of adjacent units this reader claimed, and hands the outcome to
    /// every reader waiting for one of them.
    fn lead(
        &self,
        meta: &LayerMeta,
        stretch: &[(usize, Arc<Pending>)],
        deadline: Instant,
    ) -> Vec<(usize, Outcome)> {
        let first = stretch[0].0;
        let r = self.download(meta, first..first + stretch.len(), deadline);
        let mut out = Vec::with_capacity(stretch.len());
        for (i, (u, p)) in stretch.iter().enumerate() {
            let outcome: Outcome = match &r {
                Ok(units) => Ok(units[i].clone()),
                Err(e) => Err(Arc::from(e.to_string())),
            };
            if let Ok(unit) = &outcome {
                let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back((*u, unit.clone()));
            }
            *p.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome.clone());
            p.cv.notify_all();
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(u);
            out.push((*u, outcome));
        }
        out
    }

    /// Waits for another reader's fetch, up to `deadline`.
    fn wait(&self, pending: &Pending, deadline: Instant) -> Outcome {
        let mut done = pending.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = done.as_ref() {
                return r.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = RemoteError::Deadline {
                    object: self.url.to_string(),
                    op: "GET",
                    secs: self.opts.deadline.as_secs(),
                    last: "waiting for another reader's fetch".into(),
                };
                return Err(Arc::from(e.to_string()));
            }
            done = pending
                .cv
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// One range GET for the adjacent units `units`; verifies every block, caches the
    /// good ones.
    fn download(
        &self,
        meta: &LayerMeta,
        units: std::ops::Range<usize>,
        deadline: Instant,
    ) -> Result<Vec<Arc<Unit>>, RemoteError> {
        let first_rank = units.start * self.per_unit;
        let end_rank = (units.end * self.per_unit).min(meta.data.len());
        let (start, _) = meta.data_range(first_rank);
        let (last_off, last_len) = meta.data_range(end_rank - 1);
        let mut bytes = vec![0u8; (last_off + last_len as u64 - start) as usize];
        self.client
            .get_known(&self.url, start, &mut bytes, deadline)?;
        if units.len() == 1 {
            // One unit (every cold random read): its bytes as they came, no copy.
            let ranks = self.ranks(meta, units.start);
            return Ok(vec![Arc::new(self.check_unit(meta, ranks, start, bytes))]);
        }
        let mut out = Vec::with_capacity(units.len());
        for u in units {
            let ranks = self.ranks(meta, u);
            let (ustart, _) = meta.data_range(ranks.start);
            let (uoff, ulen) = meta.data_range(ranks.end - 1);
            let base = (ustart - start) as usize;
            let ubytes = bytes[base..base + (uoff + ulen as u64 - ustart) as usize].to_vec();
            out.push(Arc::new(self.check_unit(meta, ranks, ustart, ubytes)));
        }
        Ok(out)
    }

    /// Checks every block of a fetched unit against its CRC and caches the good ones.
    fn check_unit(
        &self,
        meta: &LayerMeta,
        ranks: std::ops::Range<usize>,
        start: u64,
        bytes: Vec<u8>,
    ) -> Unit {
        let mut offsets = Vec::with_capacity(ranks.len());
        let mut bad = Vec::with_capacity(ranks.len());
        let before = self.cache.as_ref().and_then(|c| c.generation());
        let mut written = Vec::new();
        for r in ranks.clone() {
            let (off, len) = meta.data_range(r);
            let s = (off - start) as usize;
            let block = &bytes[s..s + len];
            let ok = crc32fast::hash(block) == meta.crcs[r];
            if ok {
                if let Some(c) = &self.cache {
                    if c.write(block, cache_offset(meta, r)) {
                        written.push(r);
                    }
                }
            } else if !self.reported.swap(true, Ordering::Relaxed) {
                log(&format!(
                    "{}: block {} fails its CRC (damaged object); its reads fail with EIO",
                    self.url, meta.data[r]
                ));
            }
            offsets.push((s, len));
            bad.push(!ok);
        }
        let after = self.cache.as_ref().and_then(|c| c.generation());
        let cached = before.filter(|_| after == before && !written.is_empty());
        Unit {
            first_rank: ranks.start,
            offsets,
            bytes,
            bad,
            cached: cached.map(|g| (g, written)),
        }
    }
}

/// Where the block of `rank` lives in the cache file.
pub fn cache_offset(meta: &LayerMeta, rank: usize) -> u64 {
    rank as u64 * u64::from(meta.object.geometry.block_size)
}
