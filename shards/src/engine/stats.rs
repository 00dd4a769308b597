//! What a shard counts for `/metrics`: counters and latency histograms, copied out each
//! time the driver publishes.

use crate::protocol::ErrorCode;

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub frames_in: u64,
    /// Text frames handed to the driver to send (replies and pushes).
    pub frames_out: u64,
    pub appended: u64,
    pub deduplicated: u64,
    pub pushes: u64,
    pub push_retries: u64,
    /// `Deliver` mails sent by owners (one per destination shard per message).
    pub fanout_mails: u64,
    /// Presence pushes addressed (recipients, before the per-device fan-out).
    pub presence_pushes: u64,
    pub commits: u64,
    pub commit_ops: u64,
    pub errors: u64,
    /// Error replies by code, indexed by `ErrorCode as usize` (see `ErrorCode::ALL`).
    pub errors_by_code: [u64; 32],
    /// From a seq's assignment by its owner to its `Deliver` mail reaching a home shard
    /// (commit wait, commit, mail hop), once per destination shard per message.
    pub delivery_ms: Histogram,
    /// From a push's (latest) send to the device's ack: the client's round trip.
    pub push_ack_ms: Histogram,
}

/// Upper bounds, in ms, of the engine's latency histograms (the last bucket is unbounded).
pub const LATENCY_BOUNDS_MS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000];

/// A fixed-bucket latency histogram in ms, cheap to copy into each tick's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative) for `LATENCY_BOUNDS_MS`, then the overflow bucket.
    pub buckets: [u64; 11],
    pub sum: u64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, ms: u64) {
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.buckets[i] += 1;
        self.sum += ms;
        self.count += 1;
    }
}

const _: () = assert!(
    ErrorCode::ALL.len() <= 32,
    "errors_by_code has a slot per code"
);
