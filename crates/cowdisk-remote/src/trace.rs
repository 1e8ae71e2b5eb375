//! Trace prefetch (as overlaybd does it): record which remote blocks a workload fetched
//! on demand (`serve --record-trace FILE`), and at the next cold start fetch those blocks
//! in the background before they are asked for (`serve --prefetch FILE`).
//!
//! A trace is text: a first line `cowdisk-trace 1`, then one line per block,
//! `<layer uuid>-<seal digest> <block number>`. Layers are named by content, so a trace
//! recorded on one host prefetches on any host with the same base, whatever the bucket.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{RemoteError, Result};

const MAGIC_LINE: &str = "cowdisk-trace 1";
/// Most lines a trace may have (bounds memory; far more blocks than a cold start needs).
const MAX_LINES: usize = 1 << 22;

/// Appends demand-fetched blocks to a trace file.
#[derive(Debug)]
pub struct TraceRecorder {
    path: PathBuf,
    inner: Mutex<(File, HashSet<(String, u64)>)>,
}

impl TraceRecorder {
    /// Creates (or replaces) the trace file `path`.
    pub fn create(path: &Path) -> Result<TraceRecorder> {
        let mut f = File::create(path).map_err(|e| RemoteError::io(path, "create trace", e))?;
        writeln!(f, "{MAGIC_LINE}").map_err(|e| RemoteError::io(path, "write trace", e))?;
        Ok(TraceRecorder {
            path: path.to_path_buf(),
            inner: Mutex::new((f, HashSet::new())),
        })
    }

    /// Records that `block` of the layer named `layer` was fetched on demand. A failed
    /// write only loses the trace line (logged once by the caller's log sink).
    pub fn record(&self, layer: &str, block: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.1.len() < MAX_LINES && g.1.insert((layer.to_string(), block)) {
            if let Err(e) = writeln!(g.0, "{layer} {block}") {
                crate::log::log(&format!("{}: write trace: {e}", self.path.display()));
            }
        }
    }
}

/// A loaded trace: blocks to prefetch, by layer name.
#[derive(Debug, Default)]
pub struct Trace {
    by_layer: HashMap<String, Vec<u64>>,
}

impl Trace {
    /// Reads and validates a trace file.
    pub fn load(path: &Path) -> Result<Trace> {
        let f = File::open(path).map_err(|e| RemoteError::io(path, "open trace", e))?;
        let bad = |n: usize, why: &str| {
            RemoteError::io(
                path,
                "read trace",
                std::io::Error::other(format!("line {n}: {why}")),
            )
        };
        let mut t = Trace::default();
        let mut r = BufReader::new(f);
        // The first line is checked as bytes, so a binary file is "not a trace".
        let mut first = Vec::new();
        (&mut r)
            .take(MAGIC_LINE.len() as u64 + 1)
            .read_until(b'\n', &mut first)
            .map_err(|e| RemoteError::io(path, "read trace", e))?;
        if first.strip_suffix(b"\n") != Some(MAGIC_LINE.as_bytes()) {
            return Err(bad(1, "not a cowdisk trace (first line)"));
        }
        for (i, line) in r.lines().enumerate() {
            let n = i + 2;
            let line = line.map_err(|_| bad(n, "not text"))?;
            if n > MAX_LINES {
                return Err(bad(n, "trace too long"));
            }
            let (layer, block) = line
                .split_once(' ')
                .ok_or_else(|| bad(n, "expected `LAYER BLOCK`"))?;
            let block = block.parse().map_err(|_| bad(n, "block is not a number"))?;
            if layer.is_empty() || layer.len() > 64 {
                return Err(bad(n, "bad layer name"));
            }
            t.by_layer.entry(layer.to_string()).or_default().push(block);
        }
        Ok(t)
    }

    /// The blocks recorded for the layer named `layer`.
    pub fn blocks(&self, layer: &str) -> Option<&[u64]> {
        self.by_layer.get(layer).map(Vec::as_slice)
    }
}
