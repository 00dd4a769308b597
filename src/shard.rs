//! One shard's driver: the glommio tasks around its `hermod_shards::Shard`.
//!
//! Lives entirely on the shard's own core. Tasks: the acceptor, one task per connection
//! (`conn.rs`), one receiver and one pump per peer shard, the timer task (engine deadlines,
//! metrics), and short-lived tasks for commits and password jobs (`ctx.rs`). They share
//! `ShardCtx` through an `Rc`.
//!
//! Off-reactor work: commits (`RocksStorage::write`, which may fsync) and argon2 run on the
//! executor's blocking pool. At most `HASH_JOBS_MAX` users' hashes and `BULK_HASH_JOBS_MAX`
//! bulk-creation hashes run at once per shard, so commits always find a free blocking thread
//! and logins never queue behind an operator's bulk creation.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::local_channel::{self};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use hermod_shards::auth::HashCost;
use hermod_shards::remote::Remotes;
use hermod_shards::storage::Durability;
use hermod_shards::Shard;
use hermod_store::{RocksStorage, StoreStats};

use crate::conn::{self, Surface};
use crate::ctx::{dispatch, now_ms, Ctx, Peer, ShardCtx};
use crate::mesh::{Ends, Envelope};
use crate::metrics::Board;

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

/// A shard's ends of the NATS bridge (cluster of several nodes only).
pub struct LinkIo {
    /// Batches for this shard, from the NATS thread.
    pub inbox: async_channel::Receiver<Vec<u8>>,
    /// Batches to publish.
    pub out: async_channel::Sender<crate::nats::Outgoing>,
    /// Each node's subject, by node index.
    pub subjects: Vec<String>,
}

pub struct Params {
    pub engine: Shard<RocksStorage>,
    /// This shard's index on its node (the engine's id is cluster-wide).
    pub local: usize,
    pub remotes: Remotes,
    pub link_io: Option<LinkIo>,
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
    /// The push webhook's queue, if one is configured.
    pub pusher: Option<crate::webhook::Pusher>,
    pub bot_hooks: crate::webhook::BotHooks,
    pub media: Option<Arc<crate::media::Media>>,
}

/// The shard's main future: runs until shutdown is requested and drained.
pub async fn run(p: Params) {
    let Params {
        engine,
        local,
        remotes,
        link_io,
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
        pusher,
        bot_hooks,
        media,
    } = p;
    let bind =
        |addr| listen_on(addr).map_err(|e| format!("shard {}: binding {addr}: {e}", engine.id().0));
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
    let (transmit, transmit_woken) = local_channel::new_bounded(1);
    let (offering, offering_woken) = local_channel::new_bounded(1);
    let ctx: Ctx = Rc::new(ShardCtx {
        id,
        local,
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
        remotes: RefCell::new(remotes),
        transmit,
        pusher,
        bot_hooks,
        media,
        media_bodies: Cell::new(0),
        offers: RefCell::new(VecDeque::new()),
        offering,
    });
    glommio::spawn_local(crate::ctx::offerer(ctx.clone(), offering_woken)).detach();
    if local == 0 {
        // One collector per node: the store is the node's.
        glommio::spawn_local(crate::media::collector(ctx.clone())).detach();
    }
    let link_tasks =
        link_io.map(|io| crate::links::spawn(&ctx, io.inbox, io.out, io.subjects, transmit_woken));

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

    // Reads RocksDB's figures about once a second, until told to stop. Stopped and awaited at
    // shutdown rather than dropped: a read still running on the blocking pool when the
    // executor ends makes glommio's pool thread panic ("failed to send response").
    let (stop_stats, stats_stopped) = local_channel::new_bounded::<()>(1);
    let store_stats = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                let store = ctx.store.clone();
                let stats = glommio::executor()
                    .spawn_blocking(move || store.stats())
                    .await;
                ctx.store_stats.set(stats);
                let stop = futures_lite::future::or(
                    async {
                        glommio::timer::sleep(STORE_STATS_INTERVAL).await;
                        false
                    },
                    async { stats_stopped.recv().await.is_some() },
                )
                .await;
                if stop {
                    break;
                }
            }
        })
    };

    ctx.board.set_ready(ctx.local);
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
    let _ = stop_stats.try_send(());
    store_stats.await;
    ctx.board.stopping.store(true, Ordering::Release);
    // Peers see this node go silent and fail its conversations' requests; a restart is a new
    // incarnation, so nothing of this life is mistaken for the next one's.
    drop(link_tasks);

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

/// Connections the kernel queues for one shard's listener before `accept` takes them; past
/// it, SYNs are dropped and the client retries after a second (RFC 6298's initial RTO). The
/// kernel caps it at `net.core.somaxconn` (4096 on current kernels; tuning.md). glommio's
/// own `bind` asks for 1024, which a storm of 20,000 connections/s overflowed on one shard
/// (`TcpExtListenOverflows` in `nstat`; set-up p99 1.1 s).
const LISTEN_BACKLOG: i32 = 65_535;

/// A listener on `addr` shared by every shard (SO_REUSEPORT: the kernel spreads new
/// connections over them) with a `LISTEN_BACKLOG`-deep accept queue.
fn listen_on(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    // SAFETY: a bound, listening socket whose fd nothing else owns (released just above).
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}
