//! Per-export counters for `cowdisk stats` and `serve --metrics`: fixed-size atomics, so
//! what clients do never grows them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde_json::{json, Value};

/// Latency buckets: bucket `i` holds requests that took less than 2^i microseconds
/// (the last one everything slower), enough for percentiles within a factor of two.
const BUCKETS: usize = 32;

/// What a request was, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// READ.
    Read,
    /// WRITE.
    Write,
    /// FLUSH.
    Flush,
    /// TRIM or WRITE_ZEROES: both become whiteouts in the top.
    Whiteout,
    /// BLOCK_STATUS.
    BlockStatus,
}

/// Counters of one export.
#[derive(Default)]
pub struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    whiteouts: AtomicU64,
    whiteout_bytes: AtomicU64,
    block_status: AtomicU64,
    errors: AtomicU64,
    snapshots: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Stats {
    /// Counts one finished request of `bytes` that started at `start`.
    pub fn record(&self, op: Op, bytes: u64, start: Instant, ok: bool) {
        let (count, total) = match op {
            Op::Read => (&self.reads, Some(&self.bytes_read)),
            Op::Write => (&self.writes, Some(&self.bytes_written)),
            Op::Flush => (&self.flushes, None),
            Op::Whiteout => (&self.whiteouts, Some(&self.whiteout_bytes)),
            Op::BlockStatus => (&self.block_status, None),
        };
        count.fetch_add(1, Relaxed);
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        } else if let Some(t) = total {
            t.fetch_add(bytes, Relaxed);
        }
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    /// Counts a live snapshot taken of this export.
    pub fn snapshot_taken(&self) {
        self.snapshots.fetch_add(1, Relaxed);
    }

    /// The `q`-quantile of request latency in microseconds (the upper bound of its
    /// bucket), or 0 before any request.
    fn percentile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.latency.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return 1u64 << i;
            }
        }
        1u64 << (BUCKETS - 1)
    }

    fn counters(&self) -> [(&'static str, &'static str, u64); 10] {
        let g = |c: &AtomicU64| c.load(Relaxed);
        [
            ("reads", "READ requests", g(&self.reads)),
            ("writes", "WRITE requests", g(&self.writes)),
            ("bytes_read", "bytes read", g(&self.bytes_read)),
            ("bytes_written", "bytes written", g(&self.bytes_written)),
            ("flushes", "FLUSH requests", g(&self.flushes)),
            (
                "whiteouts",
                "TRIM and WRITE_ZEROES requests",
                g(&self.whiteouts),
            ),
            (
                "whiteout_bytes",
                "bytes trimmed or zeroed",
                g(&self.whiteout_bytes),
            ),
            (
                "block_status",
                "BLOCK_STATUS requests",
                g(&self.block_status),
            ),
            ("errors", "requests answered with an error", g(&self.errors)),
            ("snapshots", "live snapshots taken", g(&self.snapshots)),
        ]
    }

    /// The counters as a JSON object (latencies in microseconds).
    pub fn to_json(&self) -> Value {
        let mut v = json!({});
        for (name, _, n) in self.counters() {
            v[name] = json!(n);
        }
        v["latency_us"] = json!({
            "p50": self.percentile(0.50),
            "p90": self.percentile(0.90),
            "p99": self.percentile(0.99),
        });
        v
    }

    /// `(quantile label, microseconds)` of the latency percentiles reported.
    pub fn quantiles(&self) -> [(&'static str, u64); 3] {
        [
            ("0.5", self.percentile(0.50)),
            ("0.9", self.percentile(0.90)),
            ("0.99", self.percentile(0.99)),
        ]
    }
}

/// Exports' counters in Prometheus text format: one family per counter (HELP and TYPE
/// once), a sample per export labelled with its name; `extra` adds counters kept
/// elsewhere, as `(name, help, value per export)`.
pub fn prometheus(exports: &[(&str, &Stats)], extra: &[(&str, &str, Vec<u64>)]) -> String {
    let mut out = String::new();
    let label = |n: &str| {
        n.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let rows: Vec<_> = exports
        .iter()
        .map(|(n, s)| (label(n), s.counters()))
        .collect();
    let families = exports.first().map_or(0, |(_, s)| s.counters().len());
    for f in 0..families {
        let (name, help, _) = rows[0].1[f];
        let _ = writeln!(out, "# HELP cowdisk_{name}_total {help}");
        let _ = writeln!(out, "# TYPE cowdisk_{name}_total counter");
        for (l, c) in &rows {
            let _ = writeln!(out, "cowdisk_{name}_total{{export=\"{l}\"}} {}", c[f].2);
        }
    }
    for (name, help, values) in extra {
        let _ = writeln!(out, "# HELP cowdisk_{name}_total {help}");
        let _ = writeln!(out, "# TYPE cowdisk_{name}_total counter");
        for ((l, _), v) in rows.iter().zip(values) {
            let _ = writeln!(out, "cowdisk_{name}_total{{export=\"{l}\"}} {v}");
        }
    }
    if !exports.is_empty() {
        let _ = writeln!(
            out,
            "# HELP cowdisk_latency_us request latency percentiles (microseconds, upper bound)"
        );
        let _ = writeln!(out, "# TYPE cowdisk_latency_us gauge");
    }
    for ((l, _), (_, s)) in rows.iter().zip(exports) {
        for (q, p) in s.quantiles() {
            let _ = writeln!(
                out,
                "cowdisk_latency_us{{export=\"{l}\",quantile=\"{q}\"}} {p}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let s = Stats::default();
        assert_eq!(s.percentile(0.5), 0);
        let t = Instant::now();
        s.record(Op::Write, 4096, t, true);
        s.record(Op::Read, 512, t, false);
        let v = s.to_json();
        assert_eq!(v["writes"], 1);
        assert_eq!(v["bytes_written"], 4096);
        assert_eq!(v["reads"], 1);
        assert_eq!(v["bytes_read"], 0, "failed reads move no bytes");
        assert_eq!(v["errors"], 1);
        assert!(v["latency_us"]["p99"].as_u64().unwrap() >= 1);
        let other = Stats::default();
        let text = prometheus(
            &[("a\"b", &s), ("c", &other)],
            &[("x", "x things", vec![7, 8])],
        );
        assert!(
            text.contains("cowdisk_writes_total{export=\"a\\\"b\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cowdisk_writes_total{export=\"c\"} 0"),
            "{text}"
        );
        assert!(text.contains("cowdisk_x_total{export=\"c\"} 8"), "{text}");
        let families = text.matches("# TYPE cowdisk_writes_total").count();
        assert_eq!(families, 1, "{text}");
    }
}
