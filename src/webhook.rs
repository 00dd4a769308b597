//! Outgoing webhooks, entirely off the shards' reactors: offline notifications to the
//! operator's push gateway (`Pusher`; `Output::Notify`, decided by the engine's `notify.rs`),
//! and messages to bots (`BotHooks`; `Output::BotHook`, from the engine's `bots.rs`).
//!
//! Shards `offer` each job to a bounded queue without waiting (a crossbeam channel: a failed
//! `try_send` is the only cost a shard ever pays). Worker threads take from it and POST with
//! ureq, each request under a deadline (`timeout`, connect included), retried with exponential
//! backoff (`RETRY_BASE_MS` doubling, at most `attempts` tries) on a transport error, a 5xx, a
//! 408 or a 429; any other 4xx is the receiver refusing that job, and is not retried.
//!
//! Policy when a queue is full (the receiver down or slower than the job rate): the new job is
//! dropped and counted (`outcome="dropped"`); message delivery never waits on it. A restart
//! loses what is queued and in flight: both are best effort by design (the messages are
//! durable; devices and bots sync).
//!
//! Bots are isolated from each other: each bot has one *lane*, at most one POST in flight and
//! at most `BOT_BACKLOG_MAX` more waiting in order behind it (beyond: dropped). So a bot whose
//! endpoint hangs holds one worker and its own backlog, never the other bots' deliveries, and
//! a bot gets its messages in the order its home shard handed them over: one dispatcher thread
//! takes the queue in order and either opens a bot's lane (handing its first message to a
//! worker) or queues the message in the open lane; the worker holding a lane posts it to the
//! end. (Workers taking the queue themselves let two of them race between taking and queueing,
//! and a later message could overtake an earlier one.) The lanes sit behind a mutex shared by
//! the dispatcher and the bot workers only: no shard touches it.
//!
//! Every request is signed: `X-Hermod-Timestamp` (Unix seconds) and `X-Hermod-Signature:
//! v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`, so a receiver can refuse forgeries and
//! replays (docs/push.md, docs/bots.md).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::metrics::Board;

/// First retry delay; each further one doubles.
const RETRY_BASE_MS: u64 = 200;
/// Messages waiting behind a bot's POST in flight; beyond, new ones are dropped.
pub const BOT_BACKLOG_MAX: usize = 1_000;
/// The bot workers' shared queue.
const BOT_QUEUE: usize = 10_000;
/// Bot worker threads: as many bots can hang at once before healthy ones wait on them.
const BOT_WORKERS: usize = 8;
/// One POST to a bot's endpoint, and tries per message.
const BOT_TIMEOUT: Duration = Duration::from_secs(5);
const BOT_ATTEMPTS: u32 = 3;

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

/// What `/metrics` shows of one kind of webhook: written by its workers and by the shards
/// that offer to it, read by any shard.
#[derive(Default)]
pub struct HookStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub retries: AtomicU64,
    /// Jobs in the queue, in a lane, or in a worker's hands.
    pub pending: AtomicU64,
}

impl HookStats {
    /// Queues `job` on `tx`, or counts it dropped. Never blocks.
    fn offer<T>(&self, tx: &Sender<T>, job: T) {
        match tx.try_send(job) {
            Ok(()) => {
                self.pending.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// How one POST ended.
enum Attempt {
    Delivered,
    /// Worth another try: the receiver is down, slow, overloaded or failing.
    Retry(String),
    /// The receiver refused this job: another try gets the same answer.
    Refused(u16),
}

/// One signed POST with its retries, shared by both kinds of webhook.
struct Poster {
    agent: ureq::Agent,
    attempts: u32,
}

impl Poster {
    fn new(timeout: Duration, attempts: u32, idle: usize) -> Poster {
        let agent = ureq::AgentBuilder::new()
            .timeout(timeout)
            .max_idle_connections_per_host(idle)
            .build();
        Poster { agent, attempts }
    }

    /// POSTs `body` until delivered, refused, or out of tries; counts the outcome in `stats`
    /// and each try's duration with `observe`.
    fn deliver(
        &self,
        (url, secret, body): (&str, &[u8], &str),
        headers: &[(&str, &str)],
        stats: &HookStats,
        observe: impl Fn(u64),
    ) {
        for attempt in 0..self.attempts {
            if attempt > 0 {
                stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(RETRY_BASE_MS << (attempt - 1).min(6)));
            }
            let started = Instant::now();
            let outcome = self.post((url, secret, body), headers);
            observe(started.elapsed().as_millis() as u64);
            match outcome {
                Attempt::Delivered => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Attempt::Refused(status) => {
                    tracing::warn!(status, url, "a webhook receiver refused a request");
                    break;
                }
                Attempt::Retry(why) => {
                    tracing::debug!(attempt, %why, url, "webhook attempt failed")
                }
            }
        }
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn post(&self, (url, secret, body): (&str, &[u8], &str), headers: &[(&str, &str)]) -> Attempt {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut request = self
            .agent
            .post(url)
            .set("Content-Type", "application/json")
            .set("X-Hermod-Timestamp", &ts.to_string())
            .set("X-Hermod-Signature", &sign(secret, ts, body));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        match request.send_string(body) {
            Ok(_) => Attempt::Delivered,
            Err(ureq::Error::Status(code @ (408 | 429 | 500..), _)) => {
                Attempt::Retry(format!("status {code}"))
            }
            Err(ureq::Error::Status(code, _)) => Attempt::Refused(code),
            Err(ureq::Error::Transport(t)) => Attempt::Retry(t.to_string()),
        }
    }
}

// ---- the push gateway ----

/// A shard's handle on the push webhook's queue (cheap to clone: one per shard).
#[derive(Clone)]
pub struct Pusher {
    tx: Sender<Arc<str>>,
    board: Arc<Board>,
}

impl Pusher {
    /// Starts the workers. They stop once every `Pusher` is dropped and the queue is empty.
    pub fn start(cfg: &PushConfig, board: Arc<Board>) -> std::io::Result<Pusher> {
        let (tx, rx) = crossbeam_channel::bounded::<Arc<str>>(cfg.queue);
        let poster = Arc::new(Poster::new(cfg.timeout, cfg.attempts, cfg.workers));
        for i in 0..cfg.workers {
            let (rx, poster, board, cfg) = (rx.clone(), poster.clone(), board.clone(), cfg.clone());
            std::thread::Builder::new()
                .name(format!("hermod-push-{i}"))
                .spawn(move || {
                    for body in rx.iter() {
                        poster.deliver((&cfg.url, &cfg.secret, &body), &[], &board.push, |ms| {
                            board.observe_gateway(ms)
                        });
                        board.push.pending.fetch_sub(1, Ordering::Relaxed);
                    }
                })?;
        }
        Ok(Pusher { tx, board })
    }

    /// Queues a notification, or drops it if the queue is full. Never blocks.
    pub fn offer(&self, body: Arc<str>) {
        self.board.push.offer(&self.tx, body);
    }
}

// ---- bots ----

/// One message for one bot.
pub struct BotJob {
    pub bot: u64,
    pub url: Arc<str>,
    pub secret: Arc<[u8]>,
    pub body: Arc<str>,
}

/// A shard's handle on the bot workers' queue (cheap to clone: one per shard).
#[derive(Clone)]
pub struct BotHooks {
    tx: Sender<BotJob>,
    board: Arc<Board>,
}

/// Per bot with a POST in flight: the messages waiting behind it, in order.
type Lanes = Mutex<HashMap<u64, VecDeque<BotJob>>>;

impl BotHooks {
    pub fn start(board: Arc<Board>) -> std::io::Result<BotHooks> {
        let (tx, rx) = crossbeam_channel::bounded::<BotJob>(BOT_QUEUE);
        let poster = Arc::new(Poster::new(BOT_TIMEOUT, BOT_ATTEMPTS, 1));
        let lanes: Arc<Lanes> = Arc::default();
        // One lane head per bot at most: bounded by the bots with messages under way.
        let (work_tx, work_rx) = crossbeam_channel::unbounded::<BotJob>();
        for i in 0..BOT_WORKERS {
            let (rx, poster, board, lanes) = (
                work_rx.clone(),
                poster.clone(),
                board.clone(),
                lanes.clone(),
            );
            std::thread::Builder::new()
                .name(format!("hermod-bots-{i}"))
                .spawn(move || bot_worker(&rx, &poster, &board, &lanes))?;
        }
        let (dispatch_board, dispatch_lanes) = (board.clone(), lanes.clone());
        std::thread::Builder::new()
            .name("hermod-bots-lanes".into())
            .spawn(move || bot_dispatcher(&rx, &work_tx, &dispatch_board, &dispatch_lanes))?;
        Ok(BotHooks { tx, board })
    }

    /// Queues a message for a bot, or drops it if the queue is full. Never blocks.
    pub fn offer(&self, job: BotJob) {
        self.board.bot_hooks.offer(&self.tx, job);
    }
}

fn lock_lanes(lanes: &Lanes) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<BotJob>>> {
    lanes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes the queue in order: a message opens its bot's lane and goes to a worker, or waits in
/// the open lane behind the POST in flight (or is dropped past `BOT_BACKLOG_MAX`).
fn bot_dispatcher(rx: &Receiver<BotJob>, work: &Sender<BotJob>, board: &Board, lanes: &Lanes) {
    let stats = &board.bot_hooks;
    for job in rx.iter() {
        let mut lanes = lock_lanes(lanes);
        if let Some(waiting) = lanes.get_mut(&job.bot) {
            if waiting.len() >= BOT_BACKLOG_MAX {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                stats.pending.fetch_sub(1, Ordering::Relaxed);
            } else {
                waiting.push_back(job);
            }
            continue;
        }
        lanes.insert(job.bot, VecDeque::new());
        drop(lanes);
        if work.send(job).is_err() {
            return; // the workers are gone: the process is stopping
        }
    }
}

/// Posts a lane's messages, from the one the dispatcher handed over to the lane's end.
fn bot_worker(rx: &Receiver<BotJob>, poster: &Poster, board: &Board, lanes: &Lanes) {
    let stats = &board.bot_hooks;
    for job in rx.iter() {
        let bot = job.bot;
        let mut next = Some(job);
        while let Some(job) = next {
            poster.deliver((&job.url, &job.secret, &job.body), &[], stats, |_| {});
            stats.pending.fetch_sub(1, Ordering::Relaxed);
            let mut lanes = lock_lanes(lanes);
            next = lanes.get_mut(&bot).and_then(VecDeque::pop_front);
            if next.is_none() {
                lanes.remove(&bot);
            }
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
