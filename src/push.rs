//! The push webhook: offline notifications (`Output::Notify`, decided by the engine's
//! `notify.rs`) POSTed to the operator's gateway (a Gorush-style service, or their own, that
//! talks to APNs, FCM and Web Push), entirely off the shards' reactors.
//!
//! Shards `offer` each body to one bounded queue without waiting (a crossbeam channel: a
//! failed `try_send` is the only cost a shard ever pays). `workers` threads take from it and
//! POST with ureq, each request under a deadline (`timeout_ms`, connect included), retried
//! with exponential backoff (`RETRY_BASE_MS` doubling, at most `attempts` tries) on a transport
//! error, a 5xx, a 408 or a 429; any other 4xx is the gateway refusing that notification, and
//! is not retried.
//!
//! Policy when the queue is full (the gateway down or slower than the notification rate): the
//! new notification is dropped and counted (`hermod_push_notifications_total{outcome="dropped"}`);
//! message delivery never waits on it. A restart loses the queue and what workers hold, as it
//! loses the shards' pending windows: notifications are best effort by design (the messages
//! themselves are durable, and a device syncs when it connects).
//!
//! Each request is signed: `X-Hermod-Timestamp` (Unix seconds) and `X-Hermod-Signature:
//! v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`, so a gateway can refuse forgeries and
//! replays (docs/protocol.md, "Offline notifications").

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::metrics::Board;

/// First retry delay; each further one doubles.
const RETRY_BASE_MS: u64 = 200;

/// The `[push]` section, resolved.
#[derive(Clone, Debug)]
pub struct PushConfig {
    pub url: String,
    pub secret: Arc<[u8]>,
    pub coalesce_ms: u64,
    pub preview: bool,
    pub queue: usize,
    pub workers: usize,
    pub timeout: Duration,
    pub attempts: u32,
}

/// What `/metrics` shows of the webhook: written by workers and shards, read by any shard.
#[derive(Default)]
pub struct PushStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub retries: AtomicU64,
    /// Bodies in the queue or in a worker's hands.
    pub pending: AtomicU64,
}

/// A shard's handle on the queue (cheap to clone: one per shard).
#[derive(Clone)]
pub struct Pusher {
    tx: Sender<Arc<str>>,
    board: Arc<Board>,
}

impl Pusher {
    /// Starts the workers. They stop once every `Pusher` is dropped and the queue is empty.
    pub fn start(cfg: &PushConfig, board: Arc<Board>) -> std::io::Result<Pusher> {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue);
        let agent = ureq::AgentBuilder::new()
            .timeout(cfg.timeout)
            .max_idle_connections_per_host(cfg.workers)
            .build();
        for i in 0..cfg.workers {
            let worker = Worker {
                rx: rx.clone(),
                agent: agent.clone(),
                cfg: cfg.clone(),
                board: board.clone(),
            };
            std::thread::Builder::new()
                .name(format!("hermod-push-{i}"))
                .spawn(move || worker.run())?;
        }
        Ok(Pusher { tx, board })
    }

    /// Queues a notification, or drops it if the queue is full. Never blocks.
    pub fn offer(&self, body: Arc<str>) {
        let stats = &self.board.push;
        match self.tx.try_send(body) {
            Ok(()) => {
                stats.pending.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct Worker {
    rx: Receiver<Arc<str>>,
    agent: ureq::Agent,
    cfg: PushConfig,
    board: Arc<Board>,
}

/// How one POST ended.
enum Attempt {
    Delivered,
    /// Worth another try: the gateway is down, slow, overloaded or failing.
    Retry(String),
    /// The gateway refused this notification: another try gets the same answer.
    Refused(u16),
}

impl Worker {
    fn run(self) {
        for body in self.rx.iter() {
            self.deliver(&body);
            self.board.push.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn deliver(&self, body: &str) {
        let stats = &self.board.push;
        for attempt in 0..self.cfg.attempts {
            if attempt > 0 {
                stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(RETRY_BASE_MS << (attempt - 1).min(6)));
            }
            let started = Instant::now();
            let outcome = self.post(body);
            self.board
                .observe_gateway(started.elapsed().as_millis() as u64);
            match outcome {
                Attempt::Delivered => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Attempt::Refused(status) => {
                    tracing::warn!(status, "push gateway refused a notification");
                    break;
                }
                Attempt::Retry(why) => {
                    tracing::debug!(attempt, %why, "push gateway attempt failed");
                }
            }
        }
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn post(&self, body: &str) -> Attempt {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = sign(&self.cfg.secret, ts, body);
        let result = self
            .agent
            .post(&self.cfg.url)
            .set("Content-Type", "application/json")
            .set("X-Hermod-Timestamp", &ts.to_string())
            .set("X-Hermod-Signature", &signature)
            .send_string(body);
        match result {
            Ok(_) => Attempt::Delivered,
            Err(ureq::Error::Status(code @ (408 | 429 | 500..), _)) => {
                Attempt::Retry(format!("status {code}"))
            }
            Err(ureq::Error::Status(code, _)) => Attempt::Refused(code),
            Err(ureq::Error::Transport(t)) => Attempt::Retry(t.to_string()),
        }
    }
}

/// `v1=` and the hex HMAC-SHA256 of `"{ts}.{body}"` under `secret`.
pub fn sign(secret: &[u8], ts: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for byte in mac.finalize().into_bytes() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against Python's `hmac.new(secret, b"1764540000." + body, sha256).hexdigest()`: what a
    /// gateway written in another language computes.
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        assert_eq!(
            sign(b"secret-of-16-bytes", 1_764_540_000, r#"{"user":"bob"}"#),
            "v1=032fd45332485b2e06f63e94b4c6ddb77d8ae95fff4614fcabaa1da888531379"
        );
    }
}
