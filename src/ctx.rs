//! The driver's context of one shard: the engine, the store, the connections' outboxes, the
//! peers' mail channels — shared by the shard's tasks through an `Rc` — and `dispatch`, which
//! carries out the engine's outputs (frames to outboxes, mail to peers, jobs and commits to
//! the blocking pool). The engine sits in a `RefCell` that is never held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use glommio::channels::shared_channel::ConnectedSender;
use glommio::sync::Semaphore;
use glommio::{GlommioError, ResourceType};
use hermod_shards::auth::HashCost;
use hermod_shards::limits::{COMMIT_OPS_MAX, MAIL_BACKLOG_MAX};
use hermod_shards::remote::Remotes;
use hermod_shards::storage::Durability;
use hermod_shards::{ConnId, Frame, Output, Shard, ShardId};
use hermod_store::{RocksStorage, StoreStats};

use crate::mesh::Envelope;
use crate::metrics::{Board, Sample};
use crate::outbox::Outbox;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct ShardCtx {
    /// The engine's shard id: cluster-wide.
    pub id: ShardId,
    /// This shard's index on its node: its core, its column family, its metrics slot, its
    /// place in the mesh. `id - local` is the node's first shard id.
    pub local: usize,
    pub engine: RefCell<Shard<RocksStorage>>,
    pub(crate) store: RocksStorage,
    pub(crate) durability: Durability,
    pub(crate) hash_cost: HashCost,
    pub(crate) hash_slots: Rc<Semaphore>,
    pub(crate) bulk_hash_slots: Rc<Semaphore>,
    pub conns: RefCell<HashMap<ConnId, Rc<Outbox>>>,
    pub(crate) next_conn: Cell<u64>,
    pub(crate) peers: Vec<Option<Peer>>,
    /// Mails queued locally because a peer channel was full.
    pub(crate) backlog: Cell<usize>,
    pub(crate) committing: Cell<bool>,
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
    pub(crate) store_stats: Cell<StoreStats>,
    /// The operator's bearer token for `/admin/…`; `None` turns the admin API off.
    pub admin_token: Option<Arc<str>>,
    /// Admin requests in flight on this shard: where each one's answer goes.
    pub admin_waiters: RefCell<HashMap<ConnId, LocalSender<(u16, String)>>>,
    /// When the timer task wakes next (ms, the engine's clock).
    pub(crate) wake_at: Cell<u64>,
    /// Wakes the timer task sooner, when an input moved the engine's next deadline earlier
    /// than `wake_at`. One slot: a wake already pending is enough.
    pub(crate) wake: LocalSender<()>,
    /// The links to the other nodes' shards (none on a single node); see `links.rs`.
    pub(crate) remotes: RefCell<Remotes>,
    /// Wakes the link task: frames are due out. One slot.
    pub(crate) transmit: LocalSender<()>,
    /// Where offline notifications go (`Output::Notify`); `None` when no webhook is set.
    pub(crate) pusher: Option<crate::webhook::Pusher>,
    /// Where messages for bots' webhooks go (`Output::BotHook`).
    pub(crate) bot_hooks: crate::webhook::BotHooks,
    /// The media path (docs/media.md); `None` when the store could not be opened.
    pub(crate) media: Option<Arc<crate::media::Media>>,
    /// Media request bodies being read on this shard (`media::BODIES_IN_FLIGHT_MAX`).
    pub(crate) media_bodies: Cell<usize>,
    /// Channel posts and room pushes (`Output::Offer`) waiting for [`offerer`], in order; at
    /// most `OFFERS_QUEUED_MAX`.
    pub(crate) offers: RefCell<VecDeque<(ConnId, Frame)>>,
    /// Wakes [`offerer`]. One slot: a wake already pending is enough.
    pub(crate) offering: LocalSender<()>,
}

/// Offers queued for [`offerer`] at most (32 bytes each: 8 MiB). Policy when full: the offer is
/// dropped and counted like one a slow connection refused (`hermod_offers_dropped_total`) —
/// an offer is best effort by definition, and the device reads what it missed by seq.
pub const OFFERS_QUEUED_MAX: usize = 256 * 1024;

/// Hands queued offers to their connections' outboxes, all that are queued at each wake. Why a
/// task of its own: one channel post is an offer to every online subscriber on the shard
/// (18,000 in docs/benchmarks.md, ~1 µs each), and done inside `dispatch` they held up every
/// frame queued with them — the poster's own ack waited ~20 ms for the round. Now `dispatch`
/// only queues them and wakes this task, which the executor runs after the connection tasks
/// woken before it (the ack's among them). It does not yield between offers: interleaving
/// the connections' writes with the round (tried: a yield every 256 offers) wrote one frame
/// per write where the round's writes used to coalesce, and cut the deliveries a saturated
/// core carries by 40%. Offers keep their order (one FIFO), so a connection gets a channel's
/// posts in seq order as before.
pub(crate) async fn offerer(ctx: Ctx, woken: LocalReceiver<()>) {
    while woken.recv().await.is_some() {
        loop {
            let Some((conn, frame)) = ctx.offers.borrow_mut().pop_front() else {
                break;
            };
            let outbox = ctx.conns.borrow().get(&conn).cloned();
            if let Some(outbox) = outbox {
                if !outbox.offer_text(&frame) {
                    ctx.board.count_offer_dropped(ctx.local);
                }
            }
        }
    }
}

pub(crate) struct Peer {
    pub(crate) direct: Rc<ConnectedSender<Envelope>>,
    pub(crate) queue: LocalSender<Envelope>,
}

pub type Ctx = Rc<ShardCtx>;

impl ShardCtx {
    /// The cluster-wide id of this node's first shard.
    fn first(&self) -> u16 {
        self.id.0 - self.local as u16
    }

    pub(crate) fn publish_metrics(&self) {
        let engine = self.engine.borrow();
        let sample = Sample {
            stats: engine.stats(),
            connections: engine.connections(),
            users_online: engine.users_online(),
            devices_online: engine.devices_online(),
            pending_writes: engine.pending_ops(),
            loaded_conversations: engine.loaded_conversations(),
            mail_backlog: self.backlog.get() + self.remotes.borrow().waiting(),
            store: self.store_stats.get(),
        };
        self.board.publish(self.local, &sample);
        self.board
            .publish_links(self.local, self.remotes.borrow().stats());
    }

    pub fn new_conn_id(&self) -> ConnId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        ConnId(n)
    }

    /// True while new client frames should wait: mail or writes are piling up.
    pub fn overloaded(&self) -> bool {
        self.backlog.get() + self.remotes.borrow().waiting() > MAIL_BACKLOG_MAX
            || self.engine.borrow().pending_ops() > COMMIT_OPS_MAX
    }

    /// Sends to a shard of this node (`to` is cluster-wide).
    pub fn send_envelope(&self, to: ShardId, envelope: Envelope) {
        let index = to.0.checked_sub(self.first()).map(usize::from);
        let Some(Some(peer)) = index.and_then(|i| self.peers.get(i)) else {
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
            Output::Offer { conn, frame } => {
                let mut offers = ctx.offers.borrow_mut();
                if offers.len() < OFFERS_QUEUED_MAX {
                    // The offerer drains the queue to empty before it waits again, and never
                    // while this runs: only the first offer of a batch needs to wake it.
                    if offers.is_empty() {
                        let _ = ctx.offering.try_send(());
                    }
                    offers.push_back((conn, frame));
                } else {
                    ctx.board.count_offer_dropped(ctx.local);
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
            Output::Mail { to, mail } => {
                if ctx.remotes.borrow().is_remote(to) {
                    crate::links::send(ctx, to, mail);
                } else {
                    ctx.send_envelope(to, Envelope::Mail(mail));
                }
            }
            Output::AdminReply { conn, status, body } => {
                if let Some(waiter) = ctx.admin_waiters.borrow_mut().remove(&conn) {
                    // One slot, one answer per request: cannot be full.
                    let _ = waiter.try_send((status, body));
                }
            }
            Output::Notify { body } => {
                if let Some(pusher) = &ctx.pusher {
                    pusher.offer(body);
                }
            }
            Output::BotHook {
                bot,
                url,
                secret,
                body,
            } => ctx.bot_hooks.offer(crate::webhook::BotJob {
                bot,
                url,
                secret,
                body,
            }),
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
        ctx.board.observe_commit(ctx.local, writes, micros);
        ctx.committing.set(false);
        ctx.engine
            .borrow_mut()
            .handle_commit_done(now_ms(), commit.id, result);
        dispatch(&ctx);
    })
    .detach();
}
