//! Resource limits; every client-controlled length is checked against one of these.

use std::ops::Range;
use std::time::Duration;

const MIB: u32 = 1 << 20;

/// Bounds on what a client may make the server read, allocate or keep open.
///
/// Construct with [`Limits::default`] and adjust fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Largest READ/WRITE payload (advertised as the `INFO_BLOCK_SIZE` maximum). Default 32 MiB.
    pub max_payload: u32,
    /// WRITE payloads above `max_payload` but at most this are read and discarded before an
    /// `EINVAL` reply; larger ones drop the connection. Default 64 MiB.
    pub max_drain: u32,
    /// Largest option payload during negotiation; larger claims drop the connection. Default 64 KiB.
    pub max_option_len: usize,
    /// Longest export name accepted. Default 4096 (the protocol's own limit).
    pub max_export_name: usize,
    /// Options allowed per connection before it is dropped. Default 64.
    pub max_options: usize,
    /// Connections served at once. When the table is full, a new client takes the place of
    /// the connection idle the longest (waiting for its next request, or still negotiating),
    /// which is closed: that loses nothing, all its requests were answered. One with a request
    /// in flight is never closed to make room; if all are busy, the new client is closed at
    /// once. Default 128.
    pub max_connections: usize,
    /// Time allowed for the whole negotiation phase. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time a connection may stay idle (no request in flight, none arriving) in the
    /// transmission phase before it is closed; `None` keeps idle connections open (a full
    /// table still closes the longest-idle one). Default `None`.
    pub idle_timeout: Option<Duration>,
    /// Time allowed for a WRITE payload to arrive once its request header has; a connection
    /// whose payload takes longer is closed and the write left unanswered (it may have been
    /// applied in part, as if the client had crashed). Default 30 s.
    pub payload_timeout: Duration,
    /// Longest one write of a reply may block (the socket's send timeout, per call: a
    /// client that stops reading is dropped). Default 60 s.
    pub reply_timeout: Duration,
    /// Requests in flight per connection (accepted, not yet answered); at most
    /// `workers_per_connection` run at once anyway. Default 64.
    pub max_in_flight: usize,
    /// READ and WRITE bytes in flight per connection (read lengths, zero-copy or not, and
    /// write payloads). A single larger request still runs, alone. Default 64 MiB.
    pub max_in_flight_bytes: usize,
    /// Read-buffer bytes in flight across all connections, BLOCK_STATUS replies being built
    /// included (at most 4096 blocks each, 128 bytes per block); a connection may take more
    /// than half only for a single read larger than that, alone. Zero-copy reads
    /// ([`crate::Backend::read_pieces`]) need no buffer and take none. Default 4 MiB per
    /// CPU, at least 8 MiB: read memory follows the CPUs that process requests, not the
    /// number of clients.
    pub max_total_in_flight_bytes: usize,
    /// WRITE payload bytes staged in memory across all connections; a connection may stage
    /// at most half. A payload is staged whole, and applied once it has all arrived (one cut
    /// short is never applied), when it fits; otherwise it is written to the backend as it
    /// arrives, in 64 KiB pieces through one buffer. So stalled payloads cannot hold more than
    /// this, nor make other writers wait. Default 64 MiB (twice the default `max_payload`), or
    /// `max_total_in_flight_bytes` if larger.
    pub max_total_write_bytes: usize,
    /// Threads per connection, the connection's own included, that take turns reading the
    /// next request and each run the request they read. Default 4.
    pub workers_per_connection: usize,
    /// A READ or WRITE alone in flight, with nothing else sent, runs on the thread that
    /// read it without first waking another to read the next request, if the request
    /// before it ran this long: long enough to have waited on a device (where the wake-up
    /// costs more than it gains), short enough that a request sent meanwhile does not
    /// wait long for it. Default 25 µs to 1 ms.
    pub keep_input_after: Range<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        let per_cpu = std::thread::available_parallelism()
            .map_or(2, |p| p.get())
            .saturating_mul(4 * MIB as usize)
            .max(8 * MIB as usize);
        Self {
            max_payload: 32 * MIB,
            max_drain: 64 * MIB,
            max_option_len: 64 * 1024,
            max_export_name: 4096,
            max_options: 64,
            max_connections: 128,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            payload_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(60),
            max_in_flight: 64,
            max_in_flight_bytes: 64 * MIB as usize,
            max_total_in_flight_bytes: per_cpu,
            max_total_write_bytes: per_cpu.max(64 * MIB as usize),
            workers_per_connection: 4,
            keep_input_after: Duration::from_micros(25)..Duration::from_millis(1),
        }
    }
}
