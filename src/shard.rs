//! One shard's driver: the glommio tasks around its `hermod_shards::Shard`.
//!
//! Lives entirely on the shard's own core. Tasks: the acceptor, one task per connection
//! (`conn.rs`), one receiver and one pump per peer shard, the timer task (engine deadlines, metrics), and short-lived tasks
//! for commits and password jobs. They share `ShardCtx` through an `Rc`; the engine sits in a
//! `RefCell` that is never held across an `.await`, so no borrow can conflict.
//!
//! Off-reactor work: commits (`RocksStorage::write`, which may fsync) and argon2 run on the
//! executor's blocking pool. At most `HASH_JOBS_MAX` users' hashes and `BULK_HASH_JOBS_MAX`
//! bulk-creation hashes run at once per shard, so commits always find a free blocking thread
//! and logins never queue behind an operator's bulk creation.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::channels::local_channel::{self, LocalSender};
use glommio::channels::shared_channel::ConnectedSender;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use glommio::{GlommioError, ResourceType};
use hermod_shards::auth::HashCost;
use hermod_shards::limits::{COMMIT_OPS_MAX, MAIL_BACKLOG_MAX};
use hermod_shards::storage::Durability;
use hermod_shards::{ConnId, Output, Shard, ShardId};
use hermod_store::{RocksStorage, StoreStats};

use crate::conn::{self, Outbox, Surface};
use crate::mesh::{Ends, Envelope};
use crate::metrics::{Board, Sample};

/// Blocking-pool threads per shard, and how many of them argon2 may occupy: for users'
/// register/login, and apart for the admin API's bulk creation.
pub const BLOCKING_THREADS: usize = 4;
const HASH_JOBS_MAX: u64 = 2;
const BULK_HASH_JOBS_MAX: u64 = 1;
const _: () = assert!(
    (HASH_JOBS_MAX + BULK_HASH_JOBS_MAX) < BLOCKING_THREADS as u64,
    "a commit always finds a blocking thread"
);
/// Longest a shutdown waits for pending writes, then for sockets to flush.
const DRAIN_WRITES_MAX: Duration = Duration::from_secs(10);
const DRAIN_SOCKETS_MAX: Duration = Duration::from_secs(2);
/// How often RocksDB's figures for `/metrics` are read.
const STORE_STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Longest sleep of the timer task with no engine deadline due: how often metrics are
/// published and the shutdown flag is checked.
const IDLE_WAKE_MS: u64 = 250;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct ShardCtx {
    pub id: ShardId,
    pub engine: RefCell<Shard<RocksStorage>>,
    store: RocksStorage,
    durability: Durability,
    hash_cost: HashCost,
    hash_slots: Rc<Semaphore>,
    bulk_hash_slots: Rc<Semaphore>,
    pub conns: RefCell<HashMap<ConnId, Rc<Outbox>>>,
    next_conn: Cell<u64>,
    peers: Vec<Option<Peer>>,
    /// Mails queued locally because a peer channel was full.
    backlog: Cell<usize>,
    committing: Cell<bool>,
    /// Shared read buffer: a socket read lands here (one 64 KiB buffer per shard, not per
    /// connection) and is then appended to the connection's own buffer, which holds only bytes
    /// not yet decoded and is released once drained if it grew past 4 KiB. Decoding straight
    /// from here would save that copy; not done yet.
    pub scratch: RefCell<Vec<u8>>,
    pub frame_bytes_max: usize,
    /// Server-wide metrics; this shard writes only its own slot.
    pub board: Arc<Board>,
    /// RocksDB's figures for this shard's column family, refreshed off the reactor (reading
    /// them may wait on RocksDB's mutex) about once a second.
    store_stats: Cell<StoreStats>,
    /// The operator's bearer token for `/admin/…`; `None` turns the admin API off.
    pub admin_token: Option<Arc<str>>,
    /// Admin requests in flight on this shard: where each one's answer goes.
    pub admin_waiters: RefCell<HashMap<ConnId, LocalSender<(u16, String)>>>,
    /// When the timer task wakes next (ms, the engine's clock).
    wake_at: Cell<u64>,
    /// Wakes the timer task sooner, when an input moved the engine's next deadline earlier
    /// than `wake_at`. One slot: a wake already pending is enough.
    wake: LocalSender<()>,
}

struct Peer {
    direct: Rc<ConnectedSender<Envelope>>,
    queue: LocalSender<Envelope>,
}

pub type Ctx = Rc<ShardCtx>;

pub struct Params {
    pub engine: Shard<RocksStorage>,
    pub store: RocksStorage,
    pub durability: Durability,
    pub hash_cost: HashCost,
    pub listen: std::net::SocketAddr,
    /// Where `/admin/…` (and the status pages) are served instead of `listen`, if set.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Told once the listener is bound (or failed to bind), so start-up can report it.
    pub bound: std::sync::mpsc::Sender<Result<(), String>>,
    pub mesh: Ends,
    pub shutdown: Arc<AtomicBool>,
    pub board: Arc<Board>,
    pub admin_token: Option<Arc<str>>,
}

/// The shard's main future: runs until shutdown is requested and drained.
pub async fn run(p: Params) {
    let Params {
        engine,
        store,
        durability,
        hash_cost,
        listen,
        admin_listen,
        bound,
        mesh,
        shutdown,
        board,
        admin_token,
    } = p;
    // glommio's bind sets SO_REUSEPORT: every shard listens on the same address(es).
    let bind = |addr| {
        TcpListener::bind(addr).map_err(|e| format!("shard {}: binding {addr}: {e}", engine.id().0))
    };
    let listeners = bind(listen).and_then(|public| {
        let admin = admin_listen.map(bind).transpose()?;
        Ok((public, admin))
    });
    let (listener, admin_listener) = match listeners {
        Ok(listeners) => {
            let _ = bound.send(Ok(()));
            listeners
        }
        Err(e) => {
            let _ = bound.send(Err(e));
            return;
        }
    };
    let public_surface = if admin_listener.is_some() {
        Surface::Public
    } else {
        Surface::All
    };
    let id = engine.id();
    // Connecting a channel end waits for the other end, so receivers connect in their own tasks
    // first; otherwise two shards would each wait on the other's sender.
    let receivers: Vec<_> = mesh
        .from
        .into_iter()
        .flatten()
        .map(|r| glommio::spawn_local(r.connect()))
        .collect();
    let mut peers = Vec::new();
    let mut pumps = Vec::new();
    for sender in mesh.to {
        match sender {
            Some(sender) => {
                let direct = Rc::new(sender.connect().await);
                let (queue, rx) = local_channel::new_unbounded();
                pumps.push((direct.clone(), rx));
                peers.push(Some(Peer { direct, queue }));
            }
            None => peers.push(None),
        }
    }
    let (wake, woken) = local_channel::new_bounded(1);
    let ctx: Ctx = Rc::new(ShardCtx {
        id,
        engine: RefCell::new(engine),
        store,
        durability,
        hash_cost,
        hash_slots: Rc::new(Semaphore::new(HASH_JOBS_MAX)),
        bulk_hash_slots: Rc::new(Semaphore::new(BULK_HASH_JOBS_MAX)),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(1),
        peers,
        backlog: Cell::new(0),
        committing: Cell::new(false),
        scratch: RefCell::new(vec![0; 64 * 1024]),
        frame_bytes_max: hermod_shards::limits::FRAME_BYTES_MAX,
        board,
        store_stats: Cell::new(StoreStats::default()),
        admin_token,
        admin_waiters: RefCell::new(HashMap::new()),
        wake_at: Cell::new(0),
        wake,
    });

    for (direct, rx) in pumps {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            // Mail order is kept: the pump drains the local FIFO into the channel in order,
            // and `send_mail` bypasses the FIFO only while it is empty.
            while let Some(envelope) = rx.recv().await {
                let sent = direct.send(envelope).await;
                ctx.backlog.set(ctx.backlog.get() - 1);
                if sent.is_err() {
                    break; // the peer is gone: only at shutdown
                }
            }
        })
        .detach();
    }
    for receiver in receivers {
        let receiver = receiver.await;
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(envelope) = receiver.recv().await {
                match envelope {
                    Envelope::Mail(mail) => {
                        ctx.engine.borrow_mut().handle_mail(now_ms(), mail);
                        dispatch(&ctx);
                    }
                    Envelope::Adopt {
                        fd,
                        buffered,
                        handoff,
                    } => {
                        // SAFETY: `fd` is an open socket whose only owner is this OwnedFd.
                        let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                        conn::spawn_adopted(&ctx, stream, buffered, handoff);
                    }
                }
            }
        })
        .detach();
    }

    let acceptor = accept(&ctx, listener, public_surface);
    let admin_acceptor = admin_listener.map(|l| accept(&ctx, l, Surface::Admin));

    let store_stats = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                let store = ctx.store.clone();
                let stats = glommio::executor()
                    .spawn_blocking(move || store.stats())
                    .await;
                ctx.store_stats.set(stats);
                glommio::timer::sleep(STORE_STATS_INTERVAL).await;
            }
        })
    };

    ctx.board.set_ready(ctx.id.0 as usize);
    // The timer task: sleeps until the engine's next deadline (heartbeats, push retries, the
    // presence flush), or sooner when an input brings one closer, or at most IDLE_WAKE_MS.
    let mut published = 0;
    while !shutdown.load(Ordering::Relaxed) {
        let now = now_ms();
        let deadline = ctx.engine.borrow().poll_timeout().unwrap_or(u64::MAX);
        let wake_at = deadline.min(now + IDLE_WAKE_MS);
        ctx.wake_at.set(wake_at);
        let sleep = glommio::timer::sleep(Duration::from_millis(wake_at.saturating_sub(now)));
        futures_lite::future::or(sleep, async {
            let _ = woken.recv().await;
        })
        .await;
        // Awake: it recomputes the next deadline before sleeping again, so no wake is needed
        // until then (0 is before every deadline).
        ctx.wake_at.set(0);
        let now = now_ms();
        ctx.engine.borrow_mut().handle_timeout(now);
        dispatch(&ctx);
        if now >= published + IDLE_WAKE_MS {
            published = now;
            ctx.publish_metrics();
        }
    }
    drop(store_stats);
    ctx.board.stopping.store(true, Ordering::Release);

    // Drain: stop accepting, let pending writes finish (their acks go out), then close every
    // client with 1001 and give the sockets a moment to flush.
    drop(acceptor);
    drop(admin_acceptor);
    let started = std::time::Instant::now();
    while !ctx.engine.borrow().is_write_idle() && started.elapsed() < DRAIN_WRITES_MAX {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    ctx.engine.borrow_mut().handle_shutdown();
    dispatch(&ctx);
    let started = std::time::Instant::now();
    while !ctx.conns.borrow().is_empty() && started.elapsed() < DRAIN_SOCKETS_MAX {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if durability == Durability::Memory {
        if let Err(e) = ctx.store.flush() {
            tracing::error!(shard = %ctx.id, error = %e, "flush at shutdown failed");
        }
    }
    tracing::info!(shard = %ctx.id, "shard stopped");
}

/// The accept loop of one listener; its connections serve `surface`. Dropping the task stops
/// accepting (the drain at shutdown).
fn accept(ctx: &Ctx, listener: TcpListener, surface: Surface) -> glommio::Task<()> {
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    tracing::trace!(shard = %ctx.id, ?surface, "accepted");
                    conn::spawn_accepted(&ctx, stream, surface)
                }
                Err(e) => {
                    tracing::warn!(shard = %ctx.id, error = %e, "accept failed");
                    // Out of fds or memory: back off instead of spinning.
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

impl ShardCtx {
    fn publish_metrics(&self) {
        let engine = self.engine.borrow();
        let sample = Sample {
            stats: engine.stats(),
            connections: engine.connections(),
            users_online: engine.users_online(),
            devices_online: engine.devices_online(),
            pending_writes: engine.pending_ops(),
            loaded_conversations: engine.loaded_conversations(),
            mail_backlog: self.backlog.get(),
            store: self.store_stats.get(),
        };
        self.board.publish(self.id.0 as usize, &sample);
    }

    pub fn new_conn_id(&self) -> ConnId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        ConnId(n)
    }

    /// True while new client frames should wait: mail or writes are piling up.
    pub fn overloaded(&self) -> bool {
        self.backlog.get() > MAIL_BACKLOG_MAX || self.engine.borrow().pending_ops() > COMMIT_OPS_MAX
    }

    pub fn send_envelope(&self, to: ShardId, envelope: Envelope) {
        let Some(Some(peer)) = self.peers.get(to.0 as usize) else {
            tracing::error!(shard = %self.id, to = %to, "mail to an unknown shard dropped");
            return;
        };
        let envelope = if self.backlog.get() == 0 {
            match peer.direct.try_send(envelope) {
                Ok(()) => return,
                Err(GlommioError::WouldBlock(ResourceType::Channel(envelope))) => envelope,
                Err(_) => return, // closed: the peer stopped, only at shutdown
            }
        } else {
            envelope
        };
        self.backlog.set(self.backlog.get() + 1);
        if peer.queue.try_send(envelope).is_err() {
            // Unbounded local queue: fails only if the pump ended, i.e. the peer is gone.
            self.backlog.set(self.backlog.get() - 1);
        }
    }
}

/// Carries out everything the engine asked for, then starts a commit if one is due.
pub fn dispatch(ctx: &Ctx) {
    loop {
        let Some(output) = ctx.engine.borrow_mut().poll_output() else {
            break;
        };
        match output {
            Output::Send { conn, frame } => {
                let outbox = ctx.conns.borrow().get(&conn).cloned();
                if let Some(outbox) = outbox {
                    if !outbox.push_text(&frame) {
                        // Slow reader: the outbox is full. Policy: close it; it will sync.
                        ctx.engine.borrow_mut().handle_disconnect(now_ms(), conn);
                    }
                }
            }
            Output::Ping { conn } => {
                if let Some(outbox) = ctx.conns.borrow().get(&conn) {
                    outbox.push_ping();
                }
            }
            Output::Close { conn, code, reason } => {
                if let Some(outbox) = ctx.conns.borrow().get(&conn) {
                    outbox.close(code, reason);
                }
            }
            Output::Mail { to, mail } => ctx.send_envelope(to, Envelope::Mail(mail)),
            Output::AdminReply { conn, status, body } => {
                if let Some(waiter) = ctx.admin_waiters.borrow_mut().remove(&conn) {
                    // One slot, one answer per request: cannot be full.
                    let _ = waiter.try_send((status, body));
                }
            }
            Output::Handoff { conn, to, handoff } => {
                if let Some(outbox) = ctx.conns.borrow().get(&conn) {
                    outbox.hand_off(to, handoff);
                }
            }
            Output::Job { id, job, bulk } => {
                let ctx = ctx.clone();
                glommio::spawn_local(async move {
                    let slots = if bulk {
                        &ctx.bulk_hash_slots
                    } else {
                        &ctx.hash_slots
                    };
                    let Ok(_permit) = slots.acquire_permit(1).await else {
                        return;
                    };
                    let cost = ctx.hash_cost;
                    let result = glommio::executor()
                        .spawn_blocking(move || job.run(cost))
                        .await;
                    ctx.engine
                        .borrow_mut()
                        .handle_job_done(now_ms(), id, result);
                    dispatch(&ctx);
                })
                .detach();
            }
        }
    }
    kick_commit(ctx);
    // An input may have brought the engine's next deadline closer than the timer task's sleep.
    if let Some(at) = ctx.engine.borrow().poll_timeout() {
        if at < ctx.wake_at.get() {
            ctx.wake_at.set(at);
            let _ = ctx.wake.try_send(());
        }
    }
}

/// Starts the next group commit if none is in flight. The commit runs on the blocking pool;
/// its completion feeds the engine, whose effects (acks, fan-out) go out in `dispatch`,
/// which starts the next commit: batches form while the previous one is being written.
fn kick_commit(ctx: &Ctx) {
    if ctx.committing.get() {
        return;
    }
    let Some(commit) = ctx.engine.borrow_mut().poll_commit() else {
        return;
    };
    ctx.committing.set(true);
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        let store = ctx.store.clone();
        let durability = ctx.durability;
        let ops = commit.ops;
        let (writes, started) = (ops.len(), std::time::Instant::now());
        // On the blocking pool in every mode: with `fsync` the write blocks for the sync, and
        // without it, measured with hermod-bench `direct`, writing inline made the reactor wait
        // on each WAL write and gave worse tails (docs/benchmarks.md) than letting the next
        // batch fill while a pool thread writes.
        let result = glommio::executor()
            .spawn_blocking(move || store.write(&ops, durability).map_err(|e| e.to_string()))
            .await;
        let micros = started.elapsed().as_micros() as u64;
        ctx.board.observe_commit(ctx.id.0 as usize, writes, micros);
        ctx.committing.set(false);
        ctx.engine
            .borrow_mut()
            .handle_commit_done(now_ms(), commit.id, result);
        dispatch(&ctx);
    })
    .detach();
}
