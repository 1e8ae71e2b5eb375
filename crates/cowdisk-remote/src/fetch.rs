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

    /// True if every block of unit `u` is in the cache, intact.
    pub fn unit_cached(&self, meta: &LayerMeta, u: usize, scratch: &mut Vec<u8>) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        self.ranks(meta, u).all(|r| {
            let (_, len) = meta.data_range(r);
            scratch.resize(len, 0);
            cache.read(scratch, cache_offset(meta, r), meta.crcs[r])
        })
    }

    fn ranks(&self, meta: &LayerMeta, u: usize) -> std::ops::Range<usize> {
        let first = u * self.per_unit;
        first..(first + self.per_unit).min(meta.data.len())
    }

    /// Unit `u`, fetching it unless another reader already is (then waits for that
    /// fetch, up to `deadline`).
    pub fn unit(&self, meta: &LayerMeta, u: usize, deadline: Instant) -> Outcome {
        if let Some(hit) = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|r| r.0 == u)
        {
            return Ok(hit.1.clone());
        }
        let (pending, leader) = {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&u) {
                Some(p) => (p.clone(), false),
                None => {
                    let p = Arc::new(Pending::default());
                    m.insert(u, p.clone());
                    (p, true)
                }
            }
        };
        if leader {
            let r = self
                .download(meta, u, deadline)
                .map_err(|e| Arc::from(e.to_string()));
            if let Ok(unit) = &r {
                let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back((u, unit.clone()));
            }
            *pending.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
            pending.cv.notify_all();
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&u);
            return r;
        }
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

    /// One range GET for unit `u`; verifies every block, caches the good ones.
    fn download(
        &self,
        meta: &LayerMeta,
        u: usize,
        deadline: Instant,
    ) -> Result<Arc<Unit>, RemoteError> {
        let ranks = self.ranks(meta, u);
        let (start, _) = meta.data_range(ranks.start);
        let (last_off, last_len) = meta.data_range(ranks.end - 1);
        let mut bytes = vec![0u8; (last_off + last_len as u64 - start) as usize];
        self.client
            .get_known(&self.url, start, &mut bytes, deadline)?;
        let mut offsets = Vec::with_capacity(ranks.len());
        let mut bad = Vec::with_capacity(ranks.len());
        for r in ranks.clone() {
            let (off, len) = meta.data_range(r);
            let s = (off - start) as usize;
            let block = &bytes[s..s + len];
            let ok = crc32fast::hash(block) == meta.crcs[r];
            if ok {
                if let Some(c) = &self.cache {
                    c.write(block, cache_offset(meta, r));
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
        Ok(Arc::new(Unit {
            first_rank: ranks.start,
            offsets,
            bytes,
            bad,
        }))
    }
}

/// Where the block of `rank` lives in the cache file.
pub fn cache_offset(meta: &LayerMeta, rank: usize) -> u64 {
    rank as u64 * u64::from(meta.object.geometry.block_size)
}
