//! Server-wide counters for `GET /metrics` (Prometheus text format), `/healthz` and `/readyz`.
//!
//! Each shard owns one slot of atomics and is its only writer: it publishes its engine's
//! counters there on every tick (at most 250 ms apart), with relaxed stores. Any shard answering
//! an HTTP request reads every slot. No lock and nothing on the message path: the figures are
//! at most one tick old.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hermod_shards::engine::{Histogram, Stats, LATENCY_BOUNDS_MS};
use hermod_shards::protocol::ErrorCode;
use hermod_shards::remote::LinkStats;
use hermod_shards::ShardId;
use hermod_store::StoreStats;

/// How many per-shard families `FAMILIES` lists; `publish` fills exactly this many values, in
/// the same order (a fixed-size array, so the compiler holds the two in step).
const FAMILY_COUNT: usize = 30;

/// One value per shard, by name, with its help text and Prometheus type.
const FAMILIES: [(&str, &str, &str); FAMILY_COUNT] = [
    (
        "hermod_connections",
        "gauge",
        "Open client connections (WebSocket phase).",
    ),
    (
        "hermod_users_online",
        "gauge",
        "Users homed on the shard with an authenticated connection.",
    ),
    (
        "hermod_devices_online",
        "gauge",
        "Authenticated connections (devices) of users homed on the shard.",
    ),
    (
        "hermod_pending_writes",
        "gauge",
        "Writes waiting for the next group commit.",
    ),
    (
        "hermod_loaded_conversations",
        "gauge",
        "Conversations whose state the shard holds as owner.",
    ),
    (
        "hermod_mail_backlog",
        "gauge",
        "Mails waiting behind a full shard-to-shard channel.",
    ),
    (
        "hermod_frames_in_total",
        "counter",
        "Client text frames received.",
    ),
    (
        "hermod_frames_out_total",
        "counter",
        "Text frames queued to clients (replies and pushes).",
    ),
    (
        "hermod_messages_appended_total",
        "counter",
        "Timeline entries written (messages, system messages, edits, recalls).",
    ),
    (
        "hermod_messages_deduplicated_total",
        "counter",
        "Sends answered from an earlier identical id.",
    ),
    (
        "hermod_pushes_total",
        "counter",
        "Message pushes sent to devices.",
    ),
    (
        "hermod_push_retries_total",
        "counter",
        "Message pushes sent again for want of an ack.",
    ),
    (
        "hermod_fanout_mails_total",
        "counter",
        "Deliver and Broadcast mails sent by owners (one per destination shard per message).",
    ),
    (
        "hermod_offers_total",
        "counter",
        "Best-effort pushes offered to devices: channel posts, live room messages (before the outbox check).",
    ),
    (
        "hermod_room_messages_total",
        "counter",
        "Live room messages admitted (on the rooms' owner shards).",
    ),
    (
        "hermod_room_shed_sampled_total",
        "counter",
        "Live room messages shed by sampling while the room was offered more than its rate.",
    ),
    (
        "hermod_room_shed_rate_total",
        "counter",
        "Live room messages shed at the room's rate cap.",
    ),
    (
        "hermod_presence_pushes_total",
        "counter",
        "Presence pushes addressed to friends.",
    ),
    ("hermod_commits_total", "counter", "Group commits written."),
    (
        "hermod_commit_ops_total",
        "counter",
        "Writes in those commits (ops / commits is the mean batch size).",
    ),
    ("hermod_errors_total", "counter", "Error replies sent."),
    (
        "hermod_notify_out_total",
        "counter",
        "Offline notifications decided and handed to the push webhook's queue.",
    ),
    (
        "hermod_notify_coalesced_total",
        "counter",
        "Messages folded into an offline notification already pending for their recipient.",
    ),
    (
        "hermod_notify_suppressed_total",
        "counter",
        "Messages that notified no one: a muted conversation or a do-not-disturb.",
    ),
    (
        "hermod_bot_calls_total",
        "counter",
        "Requests bots made over HTTP that passed the token and rate checks (on the bots' home shards).",
    ),
    (
        "hermod_bot_hooks_total",
        "counter",
        "Messages handed over for POSTing to bots' webhooks.",
    ),
    (
        "hermod_store_keys_estimate",
        "gauge",
        "RocksDB's estimate of live keys in the shard's column family.",
    ),
    (
        "hermod_store_live_data_bytes",
        "gauge",
        "RocksDB's estimate of live data in the shard's column family.",
    ),
    (
        "hermod_store_sst_bytes",
        "gauge",
        "Size of the shard's SST files on disk.",
    ),
    (
        "hermod_store_memtable_bytes",
        "gauge",
        "Size of the shard's memtables.",
    ),
];

/// Upper bounds of the commit latency buckets, in microseconds (Prometheus `le`, in seconds).
const COMMIT_US: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];
/// Upper bounds of the commit size buckets, in writes.
const COMMIT_OPS: [u64; 10] = [1, 4, 16, 64, 256, 1_024, 4_096, 8_192, 16_384, 65_536];

/// Close codes the server sends, as `/metrics` lists them (`code="other"` for any else).
const CLOSE_CODES: [u16; 12] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4000, 4001, 4002, 4003,
];

/// Why a client was refused or cut off: the `reason` label of `hermod_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 1008: ten times the request rate in one second.
    RequestFlood,
    /// 1008: the failed-login limit.
    FailedLogins,
    /// 1008: too many frames held during authentication.
    AuthBacklog,
    /// 4001: too many unacked pushes.
    UnackedPushes,
    /// 4001: too many bytes queued to the socket.
    OutboxFull,
    /// 4000: nothing received within the heartbeat timeout.
    Heartbeat,
    /// 1009: a message over the frame limit.
    MessageTooBig,
    /// 1003: a binary message.
    Binary,
    /// 1007: text (or a close reason) that is not UTF-8.
    BadUtf8,
    /// 1002: any other framing violation.
    WsProtocol,
    /// HTTP 4xx answered to a request (bad request, unknown path, method, length, size).
    HttpBadRequest,
    HttpNotFound,
    HttpMethod,
    HttpBodyLength,
    /// 431: a request head over 8 KiB or 32 header lines.
    HttpHeadTooLarge,
    /// The request head did not arrive in full within its deadline.
    HttpHeadTimeout,
}

impl Refusal {
    const ALL: [Refusal; 16] = [
        Refusal::RequestFlood,
        Refusal::FailedLogins,
        Refusal::AuthBacklog,
        Refusal::UnackedPushes,
        Refusal::OutboxFull,
        Refusal::Heartbeat,
        Refusal::MessageTooBig,
        Refusal::Binary,
        Refusal::BadUtf8,
        Refusal::WsProtocol,
        Refusal::HttpBadRequest,
        Refusal::HttpNotFound,
        Refusal::HttpMethod,
        Refusal::HttpBodyLength,
        Refusal::HttpHeadTooLarge,
        Refusal::HttpHeadTimeout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::RequestFlood => "request_flood",
            Refusal::FailedLogins => "failed_logins",
            Refusal::AuthBacklog => "auth_backlog",
            Refusal::UnackedPushes => "unacked_pushes",
            Refusal::OutboxFull => "outbox_full",
            Refusal::Heartbeat => "heartbeat",
            Refusal::MessageTooBig => "message_too_big",
            Refusal::Binary => "binary",
            Refusal::BadUtf8 => "bad_utf8",
            Refusal::WsProtocol => "ws_protocol",
            Refusal::HttpBadRequest => "http_bad_request",
            Refusal::HttpNotFound => "http_not_found",
            Refusal::HttpMethod => "http_method",
            Refusal::HttpBodyLength => "http_body_length",
            Refusal::HttpHeadTooLarge => "http_head_too_large",
            Refusal::HttpHeadTimeout => "http_head_timeout",
        }
    }

    /// The refusal a server-sent close stands for; `None` for closes that refuse nothing
    /// (normal, shutdown, replaced session, operator's kick).
    pub fn of_close(code: u16, reason: &str) -> Option<Refusal> {
        use hermod_shards::protocol::close::{self, reason as why};
        Some(match code {
            close::POLICY_VIOLATION if reason == why::REQUEST_FLOOD => Refusal::RequestFlood,
            close::POLICY_VIOLATION if reason == why::FAILED_LOGINS => Refusal::FailedLogins,
            close::POLICY_VIOLATION => Refusal::AuthBacklog,
            close::SLOW_CONSUMER if reason == why::OUTBOX_FULL => Refusal::OutboxFull,
            close::SLOW_CONSUMER => Refusal::UnackedPushes,
            close::HEARTBEAT_TIMEOUT => Refusal::Heartbeat,
            close::MESSAGE_TOO_BIG => Refusal::MessageTooBig,
            close::UNSUPPORTED_DATA => Refusal::Binary,
            close::INVALID_PAYLOAD => Refusal::BadUtf8,
            close::PROTOCOL_ERROR => Refusal::WsProtocol,
            _ => return None,
        })
    }

    /// The refusal an HTTP response status stands for, if it is one.
    pub fn of_status(status: u16) -> Option<Refusal> {
        Some(match status {
            400 => Refusal::HttpBadRequest,
            404 => Refusal::HttpNotFound,
            405 => Refusal::HttpMethod,
            411 | 413 => Refusal::HttpBodyLength,
            431 => Refusal::HttpHeadTooLarge,
            _ => return None,
        })
    }
}

/// A Prometheus histogram with fixed buckets; one writer (its shard), any readers.
#[derive(Default)]
struct Hist {
    /// Per-bucket counts (not cumulative), the last one for +Inf.
    buckets: [AtomicU64; 11],
    sum: AtomicU64,
    count: AtomicU64,
}

impl Hist {
    fn observe(&self, bounds: &[u64; 10], v: u64) {
        let i = bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The samples of one series: cumulative buckets, sum and count, each with `labels`
    /// (`""`: none) and values scaled by `scale` (ms to seconds, say).
    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[u64; 10], scale: f64) {
        let (open, sep, close) = if labels.is_empty() {
            ("", "", "")
        } else {
            ("{", ",", "}")
        };
        let mut cumulative = 0;
        for (i, cell) in self.buckets.iter().enumerate() {
            cumulative += cell.load(Ordering::Relaxed);
            let le = bounds
                .get(i)
                .map_or("+Inf".to_owned(), |b| format!("{}", *b as f64 * scale));
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 * scale;
        let _ = writeln!(out, "{name}_sum{open}{labels}{close} {sum}");
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_count{open}{labels}{close} {count}");
    }

    /// Takes over an engine histogram's running totals (published each tick).
    fn store(&self, h: &Histogram) {
        for (cell, v) in self.buckets.iter().zip(h.buckets) {
            cell.store(v, Ordering::Relaxed);
        }
        self.sum.store(h.sum, Ordering::Relaxed);
        self.count.store(h.count, Ordering::Relaxed);
    }
}

/// `N` counters: `Default` for any `N` (arrays derive it only up to 32).
struct Counters<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> std::ops::Deref for Counters<N> {
    type Target = [AtomicU64; N];
    fn deref(&self) -> &[AtomicU64; N] {
        &self.0
    }
}

#[derive(Default)]
struct Slot {
    ready: AtomicBool,
    values: [AtomicU64; FAMILY_COUNT],
    errors_by_code: Counters<{ hermod_shards::engine::ERROR_CODES }>,
    commit_us: Hist,
    commit_ops: Hist,
    delivery_ms: Hist,
    push_ack_ms: Hist,
    /// Close frames the server sent, by `CLOSE_CODES` index (the last one: any other code).
    closes: [AtomicU64; CLOSE_CODES.len() + 1],
    /// Close frames clients sent first (answered with their own code).
    peer_closes: AtomicU64,
    /// Best-effort pushes dropped because the connection's outbox was above the offer limit.
    offers_dropped: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
}

/// One link's figures (`hermod_shards::remote::LinkStats`), written by its local shard.
#[derive(Default)]
struct LinkSlot {
    peer: u16,
    up: AtomicBool,
    values: [AtomicU64; LINK_FAMILIES.len()],
}

/// Link families: name, type, help; values in `link_values` order.
const LINK_FAMILIES: [(&str, &str, &str); 9] = [
    (
        "hermod_link_in_flight",
        "gauge",
        "Mails sent to the peer shard and not yet acked.",
    ),
    (
        "hermod_link_waiting",
        "gauge",
        "Mails waiting for room in the link's window.",
    ),
    (
        "hermod_link_mails_sent_total",
        "counter",
        "Mails queued for the peer shard.",
    ),
    (
        "hermod_link_mails_received_total",
        "counter",
        "Mails delivered from the peer shard, in order.",
    ),
    (
        "hermod_link_resent_total",
        "counter",
        "Data frames sent again (a lost frame or a late ack).",
    ),
    (
        "hermod_link_resets_total",
        "counter",
        "Times the link was reset (peer silent or restarted).",
    ),
    (
        "hermod_link_lost_total",
        "counter",
        "Mails handed back by a reset (requests among them failed with unavailable).",
    ),
    (
        "hermod_link_invalid_total",
        "counter",
        "Batches or mails from the peer that failed validation.",
    ),
    (
        "hermod_link_ack_rtt_seconds",
        "gauge",
        "The link's smoothed round trip from a mail's send to its ack.",
    ),
];

fn link_values(s: &LinkStats) -> [u64; LINK_FAMILIES.len()] {
    [
        s.in_flight as u64,
        s.waiting as u64,
        s.mails_sent,
        s.mails_received,
        s.resent,
        s.resets,
        s.lost,
        s.invalid,
        s.ack_rtt_us,
    ]
}

/// Everything `/metrics`, `/healthz` and `/readyz` read.
pub struct Board {
    slots: Vec<Slot>,
    /// Per local shard, its links to the other nodes' shards (empty on a single node).
    links: Vec<Vec<LinkSlot>>,
    /// Set when a shutdown starts: `/readyz` answers 503 so balancers stop sending.
    pub stopping: AtomicBool,
    /// The push webhook's figures (process-wide: its workers serve every shard).
    pub push: crate::webhook::HookStats,
    /// The bots' webhooks' figures (process-wide, like the push webhook's).
    pub bot_hooks: crate::webhook::HookStats,
    /// Each POST to the push gateway, in ms.
    push_gateway_ms: Hist,
    /// The media path's figures (process-wide: the store is the node's).
    pub media: Arc<crate::media::MediaStats>,
}

/// What a shard publishes each tick.
pub struct Sample {
    pub stats: Stats,
    pub connections: usize,
    pub users_online: usize,
    pub devices_online: usize,
    pub pending_writes: usize,
    pub loaded_conversations: usize,
    pub mail_backlog: usize,
    /// The column family's figures as last read (about once a second, off the reactor).
    pub store: StoreStats,
}

impl Board {
    pub fn new(shards: usize) -> Arc<Board> {
        Board::with_peers(shards, &[])
    }

    /// A board for `shards` local shards, each linked to every shard in `peers` (the other
    /// nodes' cluster-wide shard ids).
    pub fn with_peers(shards: usize, peers: &[u16]) -> Arc<Board> {
        Arc::new(Board {
            slots: (0..shards).map(|_| Slot::default()).collect(),
            links: (0..shards)
                .map(|_| {
                    peers
                        .iter()
                        .map(|&peer| LinkSlot {
                            peer,
                            ..LinkSlot::default()
                        })
                        .collect()
                })
                .collect(),
            stopping: AtomicBool::new(false),
            push: Default::default(),
            bot_hooks: Default::default(),
            push_gateway_ms: Hist::default(),
            media: Arc::default(),
        })
    }

    /// Called by shard `shard` only, with its links' figures.
    pub fn publish_links(&self, shard: usize, links: impl Iterator<Item = (ShardId, LinkStats)>) {
        let Some(slots) = self.links.get(shard) else {
            return;
        };
        for (peer, stats) in links {
            if let Some(slot) = slots.iter().find(|l| l.peer == peer.0) {
                slot.up.store(stats.up, Ordering::Relaxed);
                for (cell, v) in slot.values.iter().zip(link_values(&stats)) {
                    cell.store(v, Ordering::Relaxed);
                }
            }
        }
    }

    /// Links up and links in all, over this node's shards (`(0, 0)` on a single node).
    pub fn links_up(&self) -> (usize, usize) {
        let all = self.links.iter().flatten();
        let up = all.clone().filter(|l| l.up.load(Ordering::Relaxed)).count();
        (up, all.count())
    }

    fn render_links(&self, out: &mut String) {
        if self.links.iter().all(Vec::is_empty) {
            return;
        }
        let _ = writeln!(out, "# HELP hermod_link_up Whether the link to the peer shard carries mail (1) or is down (0).");
        let _ = writeln!(out, "# TYPE hermod_link_up gauge");
        for (shard, links) in self.links.iter().enumerate() {
            for l in links {
                let up = u8::from(l.up.load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "hermod_link_up{{shard=\"{shard}\",peer=\"{}\"}} {up}",
                    l.peer
                );
            }
        }
        for (i, (name, kind, help)) in LINK_FAMILIES.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (shard, links) in self.links.iter().enumerate() {
                for l in links {
                    let v = l.values[i].load(Ordering::Relaxed);
                    let peer = l.peer;
                    // The one time family is kept in µs and shown in seconds.
                    let _ = if name.ends_with("_seconds") {
                        writeln!(
                            out,
                            "{name}{{shard=\"{shard}\",peer=\"{peer}\"}} {}",
                            v as f64 * 1e-6
                        )
                    } else {
                        writeln!(out, "{name}{{shard=\"{shard}\",peer=\"{peer}\"}} {v}")
                    };
                }
            }
        }
    }

    pub fn set_ready(&self, shard: usize) {
        self.slots[shard].ready.store(true, Ordering::Release);
    }

    /// Every shard is serving and no shutdown has begun.
    pub fn ready(&self) -> bool {
        !self.stopping.load(Ordering::Acquire)
            && self.slots.iter().all(|s| s.ready.load(Ordering::Acquire))
    }

    /// Called by shard `shard` only (single writer per slot).
    pub fn publish(&self, shard: usize, s: &Sample) {
        let st = &s.stats;
        let values: [u64; FAMILY_COUNT] = [
            s.connections as u64,
            s.users_online as u64,
            s.devices_online as u64,
            s.pending_writes as u64,
            s.loaded_conversations as u64,
            s.mail_backlog as u64,
            st.frames_in,
            st.frames_out,
            st.appended,
            st.deduplicated,
            st.pushes,
            st.push_retries,
            st.fanout_mails,
            st.offers,
            st.room_posts,
            st.room_shed_sampled,
            st.room_shed_rate,
            st.presence_pushes,
            st.commits,
            st.commit_ops,
            st.errors,
            st.notify_out,
            st.notify_coalesced,
            st.notify_suppressed,
            st.bot_calls,
            st.bot_hooks,
            s.store.keys_estimate,
            s.store.live_data_bytes,
            s.store.sst_bytes,
            s.store.memtable_bytes,
        ];
        let slot = &self.slots[shard];
        for (cell, v) in slot.values.iter().zip(values) {
            cell.store(v, Ordering::Relaxed);
        }
        for (cell, v) in slot.errors_by_code.iter().zip(st.errors_by_code) {
            cell.store(v, Ordering::Relaxed);
        }
        slot.delivery_ms.store(&st.delivery_ms);
        slot.push_ack_ms.store(&st.push_ack_ms);
    }

    /// One POST to the push gateway took `ms` (called by the webhook's workers).
    pub fn observe_gateway(&self, ms: u64) {
        self.push_gateway_ms.observe(&LATENCY_BOUNDS_MS, ms);
    }

    /// The webhooks' counters and queues, and the push gateway's latency (process-wide, no
    /// shard label).
    fn render_push(&self, out: &mut String) {
        for ((total, retries, queue), what, stats) in [
            (
                (
                    "hermod_push_notifications_total",
                    "hermod_push_gateway_retries_total",
                    "hermod_push_queue",
                ),
                "Offline notifications",
                &self.push,
            ),
            (
                (
                    "hermod_bot_webhook_total",
                    "hermod_bot_webhook_retries_total",
                    "hermod_bot_webhook_queue",
                ),
                "Messages POSTed to bots",
                &self.bot_hooks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {total} {what} by outcome: sent (2xx), failed (refused, or every attempt failed), dropped (queue full).");
            let _ = writeln!(out, "# TYPE {total} counter");
            for (outcome, cell) in [
                ("sent", &stats.sent),
                ("failed", &stats.failed),
                ("dropped", &stats.dropped),
            ] {
                let v = cell.load(Ordering::Relaxed);
                let _ = writeln!(out, "{total}{{outcome=\"{outcome}\"}} {v}");
            }
            let _ = writeln!(out, "# HELP {retries} POSTs that were retries.");
            let _ = writeln!(out, "# TYPE {retries} counter");
            let _ = writeln!(out, "{retries} {}", stats.retries.load(Ordering::Relaxed));
            let _ = writeln!(out, "# HELP {queue} Queued or being sent.");
            let _ = writeln!(out, "# TYPE {queue} gauge");
            let _ = writeln!(out, "{queue} {}", stats.pending.load(Ordering::Relaxed));
        }
        let name = "hermod_push_gateway_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Each POST to the push gateway, answered or not."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        self.push_gateway_ms
            .write(out, name, "", &LATENCY_BOUNDS_MS, 1e-3);
    }

    /// One group commit of `ops` writes took `micros` (called by its shard only).
    pub fn observe_commit(&self, shard: usize, ops: usize, micros: u64) {
        let slot = &self.slots[shard];
        slot.commit_us.observe(&COMMIT_US, micros);
        slot.commit_ops.observe(&COMMIT_OPS, ops as u64);
    }

    /// Shard `shard` sent a close frame (called by that shard only).
    pub fn count_close(&self, shard: usize, code: u16, reason: &str) {
        let slot = &self.slots[shard];
        let i = CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len());
        slot.closes[i].fetch_add(1, Ordering::Relaxed);
        if let Some(refusal) = Refusal::of_close(code, reason) {
            self.count_refusal(shard, refusal);
        }
    }

    /// A client of shard `shard` started a close.
    pub fn count_peer_close(&self, shard: usize) {
        self.slots[shard]
            .peer_closes
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A best-effort push (`Output::Offer`) of shard `shard` found its outbox too full.
    pub fn count_offer_dropped(&self, shard: usize) {
        self.slots[shard]
            .offers_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_refusal(&self, shard: usize, refusal: Refusal) {
        self.slots[shard].refusals[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every family, one sample per shard.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(FAMILIES.len() * (120 + 40 * self.slots.len()));
        for (i, (name, kind, help)) in FAMILIES.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (shard, slot) in self.slots.iter().enumerate() {
                let v = slot.values[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP hermod_errors_by_code_total Error replies sent, by protocol error code."
        );
        let _ = writeln!(out, "# TYPE hermod_errors_by_code_total counter");
        for (shard, slot) in self.slots.iter().enumerate() {
            for code in ErrorCode::ALL {
                let v = slot.errors_by_code[code as usize].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "hermod_errors_by_code_total{{shard=\"{shard}\",code=\"{}\"}} {v}",
                        code.as_str()
                    );
                }
            }
        }
        self.render_closes(&mut out);
        self.render_hist(
            &mut out,
            (
                "hermod_commit_seconds",
                "Time to write one group commit (RocksDB batch, incl. sync).",
            ),
            &COMMIT_US,
            1e-6,
            |s| &s.commit_us,
        );
        self.render_hist(
            &mut out,
            (
                "hermod_commit_writes",
                "Writes per group commit (the batch size).",
            ),
            &COMMIT_OPS,
            1.0,
            |s| &s.commit_ops,
        );
        self.render_hist(
            &mut out,
            (
                "hermod_delivery_seconds",
                "From a message's seq assignment to its fan-out reaching a home shard (commit included), per destination shard.",
            ),
            &LATENCY_BOUNDS_MS,
            1e-3,
            |s| &s.delivery_ms,
        );
        self.render_hist(
            &mut out,
            (
                "hermod_push_ack_seconds",
                "From a push's send to the device's ack (the client's round trip; ms resolution).",
            ),
            &LATENCY_BOUNDS_MS,
            1e-3,
            |s| &s.push_ack_ms,
        );
        self.render_links(&mut out);
        self.render_push(&mut out);
        self.media.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP hermod_ready Whether every shard is serving (1) or not (0)."
        );
        let _ = writeln!(out, "# TYPE hermod_ready gauge");
        let _ = writeln!(out, "hermod_ready {}", u8::from(self.ready()));
        out
    }
}

impl Board {
    /// The admin API's `GET /admin/stats`: every per-shard family by short name (without
    /// `hermod_` and `_total`), per shard and summed, plus errors by code and readiness.
    pub fn stats_json(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let short = |name: &str| {
            let name = name.strip_prefix("hermod_").unwrap_or(name);
            name.strip_suffix("_total").unwrap_or(name).to_owned()
        };
        let mut totals = Map::new();
        let mut shards = Vec::with_capacity(self.slots.len());
        for (shard, slot) in self.slots.iter().enumerate() {
            let mut one = Map::new();
            one.insert("shard".into(), json!(shard));
            for (i, (name, _, _)) in FAMILIES.iter().enumerate() {
                let v = slot.values[i].load(Ordering::Relaxed);
                let name = short(name);
                let sum = totals.entry(name.clone()).or_insert(json!(0u64));
                *sum = json!(sum.as_u64().unwrap_or(0) + v);
                one.insert(name, json!(v));
            }
            let mut errors = Map::new();
            for code in ErrorCode::ALL {
                let v = slot.errors_by_code[code as usize].load(Ordering::Relaxed);
                if v > 0 {
                    errors.insert(code.as_str().into(), json!(v));
                }
            }
            one.insert("errors_by_code".into(), Value::Object(errors));
            shards.push(Value::Object(one));
        }
        json!({ "ok": { "ready": self.ready(), "totals": totals, "shards": shards } })
    }

    /// Closes by code, closes started by clients, refusals by reason: every label value
    /// listed for every shard (zeros included), so a dashboard's series exist before the
    /// first event.
    fn render_closes(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP hermod_closes_total WebSocket close frames sent by the server, by close code."
        );
        let _ = writeln!(out, "# TYPE hermod_closes_total counter");
        for (shard, slot) in self.slots.iter().enumerate() {
            for (i, cell) in slot.closes.iter().enumerate() {
                let code = CLOSE_CODES
                    .get(i)
                    .map_or("other".to_owned(), |c| c.to_string());
                let v = cell.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "hermod_closes_total{{shard=\"{shard}\",code=\"{code}\"}} {v}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP hermod_peer_closes_total WebSocket closes started by the client (answered with its code)."
        );
        let _ = writeln!(out, "# TYPE hermod_peer_closes_total counter");
        for (shard, slot) in self.slots.iter().enumerate() {
            let v = slot.peer_closes.load(Ordering::Relaxed);
            let _ = writeln!(out, "hermod_peer_closes_total{{shard=\"{shard}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP hermod_offers_dropped_total Best-effort pushes (channel posts) not queued because the connection's outbox was above the offer limit or the shard's offer queue was full; the connection stays open."
        );
        let _ = writeln!(out, "# TYPE hermod_offers_dropped_total counter");
        for (shard, slot) in self.slots.iter().enumerate() {
            let v = slot.offers_dropped.load(Ordering::Relaxed);
            let _ = writeln!(out, "hermod_offers_dropped_total{{shard=\"{shard}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP hermod_refusals_total Clients refused or cut off, by reason (HTTP refusals, policy and protocol closes)."
        );
        let _ = writeln!(out, "# TYPE hermod_refusals_total counter");
        for (shard, slot) in self.slots.iter().enumerate() {
            for refusal in Refusal::ALL {
                let v = slot.refusals[refusal as usize].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "hermod_refusals_total{{shard=\"{shard}\",reason=\"{}\"}} {v}",
                    refusal.name()
                );
            }
        }
    }

    fn render_hist(
        &self,
        out: &mut String,
        (name, help): (&str, &str),
        bounds: &[u64; 10],
        scale: f64,
        pick: impl Fn(&Slot) -> &Hist,
    ) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (shard, slot) in self.slots.iter().enumerate() {
            pick(slot).write(out, name, &format!("shard=\"{shard}\""), bounds, scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hermod_shards::protocol::close;

    #[test]
    fn every_refusal_is_listed_once_in_order() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn renders_every_family_per_shard_and_readiness() {
        let board = Board::new(2);
        assert!(!board.ready(), "not ready before the shards are");
        board.set_ready(0);
        board.set_ready(1);
        assert!(board.ready());
        let stats = Stats {
            appended: 7,
            ..Stats::default()
        };
        board.publish(
            1,
            &Sample {
                stats,
                connections: 3,
                users_online: 2,
                devices_online: 2,
                pending_writes: 0,
                loaded_conversations: 1,
                mail_backlog: 0,
                store: StoreStats {
                    keys_estimate: 11,
                    ..StoreStats::default()
                },
            },
        );
        let text = board.render();
        assert!(
            text.contains("hermod_messages_appended_total{shard=\"1\"} 7"),
            "{text}"
        );
        assert!(text.contains("hermod_connections{shard=\"1\"} 3"));
        assert!(text.contains("hermod_connections{shard=\"0\"} 0"));
        assert!(text.contains("hermod_store_keys_estimate{shard=\"1\"} 11"));
        // + errors by code, closes, peer closes, offers dropped, refusals, 4 histograms,
        // readiness, the webhooks' 7 (notifications, retries and queue of each; the
        // gateway's latency), and the media path's 9.
        assert_eq!(text.matches("# TYPE").count(), FAMILIES.len() + 26);
        assert!(text.contains("hermod_push_notifications_total{outcome=\"dropped\"} 0"));
        assert!(text.contains("hermod_push_gateway_seconds_bucket{le=\"+Inf\"} 0"));
        board.count_close(1, 1008, close::reason::REQUEST_FLOOD);
        board.count_close(1, 4001, close::reason::OUTBOX_FULL);
        board.count_close(1, 1001, "server shutting down");
        board.count_close(1, 4444, "whatever");
        board.count_peer_close(0);
        board.count_offer_dropped(1);
        board.count_refusal(0, Refusal::HttpHeadTooLarge);
        let text = board.render();
        for line in [
            "hermod_closes_total{shard=\"1\",code=\"1008\"} 1",
            "hermod_closes_total{shard=\"1\",code=\"1001\"} 1",
            "hermod_closes_total{shard=\"1\",code=\"other\"} 1",
            "hermod_closes_total{shard=\"0\",code=\"1009\"} 0",
            "hermod_peer_closes_total{shard=\"0\"} 1",
            "hermod_offers_dropped_total{shard=\"1\"} 1",
            "hermod_refusals_total{shard=\"1\",reason=\"request_flood\"} 1",
            "hermod_refusals_total{shard=\"1\",reason=\"outbox_full\"} 1",
            "hermod_refusals_total{shard=\"0\",reason=\"http_head_too_large\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let stats = board.stats_json();
        assert_eq!(stats["ok"]["totals"]["messages_appended"], 7);
        assert_eq!(stats["ok"]["shards"][1]["connections"], 3);
        board.observe_commit(0, 3, 700);
        let text = board.render();
        assert!(
            text.contains("hermod_commit_seconds_bucket{shard=\"0\",le=\"0.0005\"} 0"),
            "{text}"
        );
        assert!(text.contains("hermod_commit_seconds_bucket{shard=\"0\",le=\"0.001\"} 1"));
        assert!(text.contains("hermod_commit_seconds_bucket{shard=\"0\",le=\"+Inf\"} 1"));
        assert!(text.contains("hermod_commit_writes_bucket{shard=\"0\",le=\"4\"} 1"));
        assert!(text.contains("hermod_commit_writes_count{shard=\"0\"} 1"));
        board.stopping.store(true, Ordering::Release);
        assert!(!board.ready());
        assert!(board.render().contains("hermod_ready 0"));
    }
}
