//! What a shard counts for `/metrics`: counters and latency histograms, copied out each
//! time the driver publishes.

use crate::protocol::ErrorCode;

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub frames_in: u64,
    /// Text frames handed to the driver to send (replies and pushes).
    pub frames_out: u64,
    pub appended: u64,
    pub deduplicated: u64,
    pub pushes: u64,
    pub push_retries: u64,
    /// Best-effort pushes offered to devices (`Output::Offer`: channel posts, live room
    /// messages), before the driver's outbox check.
    pub offers: u64,
    /// Live room messages admitted, and shed by sampling or by the rate cap.
    pub room_posts: u64,
    pub room_shed_sampled: u64,
    pub room_shed_rate: u64,
    /// `Deliver` and `Broadcast` mails sent by owners (one per destination shard per message).
    pub fanout_mails: u64,
    /// Presence pushes addressed (recipients, before the per-device fan-out).
    pub presence_pushes: u64,
    pub commits: u64,
    pub commit_ops: u64,
    pub errors: u64,
    /// Error replies by code, indexed by `ErrorCode as usize` (see `ErrorCode::ALL`).
    pub errors_by_code: [u64; ERROR_CODES],
    /// Offline notifications handed to the webhook's queue (`Output::Notify`).
    pub notify_out: u64,
    /// Messages folded into a notification already pending for their recipient.
    pub notify_coalesced: u64,
    /// Messages that notified no one: muted conversation, or do-not-disturb.
    pub notify_suppressed: u64,
    /// Requests bots sent over HTTP that passed the token and rate checks.
    pub bot_calls: u64,
    /// Messages handed to the driver for POSTing to a bot's webhook.
    pub bot_hooks: u64,
    /// Mails for another node's shard handed back by its link (down or reset).
    pub mail_undeliverable: u64,
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

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            frames_in: 0,
            frames_out: 0,
            appended: 0,
            deduplicated: 0,
            pushes: 0,
            push_retries: 0,
            fanout_mails: 0,
            offers: 0,
            room_posts: 0,
            room_shed_sampled: 0,
            room_shed_rate: 0,
            presence_pushes: 0,
            commits: 0,
            commit_ops: 0,
            errors: 0,
            errors_by_code: [0; ERROR_CODES],
            notify_out: 0,
            notify_coalesced: 0,
            notify_suppressed: 0,
            bot_calls: 0,
            bot_hooks: 0,
            mail_undeliverable: 0,
            delivery_ms: Histogram::default(),
            push_ack_ms: Histogram::default(),
        }
    }
}

/// Slots of `errors_by_code`: one per error code.
pub const ERROR_CODES: usize = ErrorCode::ALL.len();
