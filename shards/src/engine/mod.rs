//! The shard state machine. One `Shard` is the whole state of one core.
//!
//! Inputs (`handle_*`, each with the current wall time in ms) and outputs (`poll_output`,
//! `poll_commit`) only; no sockets, no clock, no threads. The driver in `src/shard.rs` is a
//! loop around it; the simulation in `tests/sim.rs` drives several of them on one thread.
//!
//! | file | owns |
//! | --- | --- |
//! | `session.rs` | connections: frames in (rate limits, envelope), hand-off, heartbeats, pushes and their retries |
//! | `ops/` | client requests: the one dispatch on `protocol::Request`, a handler file per op family |
//! | `owner.rs` | conversations this shard owns: state, open, append (seq, dedup), events, rollback |
//! | `reads.rs` | the owner's answers from its timeline: pages, last seqs, summaries, read cursors |
//! | `amend.rs` | the owner's other per-conversation ops: recall, edit, typing, receipts |
//! | `group.rs` | groups this shard owns: settings, roles, the permission checks of every group op |
//! | `members.rs` | group membership changes (two-step adds, removals) and their home side |
//! | `social.rs` | friends and requests, blocks (on each user's home shard) |
//! | `presence.rs` | presence, profiles, devices (on each user's home shard) |
//! | `bots.rs` | bots: creation and owner actions, their HTTP requests, their webhooks' deliveries |
//! | `admin.rs` | operator requests: bulk accounts, disable, kick, notices (the admin API) |
//! | `gather.rs` | requests that need several shards' answers: `convs`, `sync`, `history`, a notification's badge |
//! | `keys.rs` | the device key directory for end-to-end encryption: publish, claim (each one-time prekey once), versions and the `keys` push |
//! | `notify.rs` | offline notifications: who gets one, coalescing, mute and do-not-disturb, the webhook's body |
//! | `effects.rs` | what runs once a batch is durable, or fails with it: one `Deferred` per post-commit step |
//! | `commit.rs` | group commit mechanics: the open batch, the one in flight, reads through both |
//! | `fanout.rs`, `event.rs` | leaves: recipients by home shard; a timeline entry the owner writes itself |
//! | `timers.rs`, `stats.rs` | leaves: the deadline heap; counters and histograms for `/metrics` |
//! | `tests.rs` | seeded random frames through one engine; deadlines |
//!
//! Module dependencies run one way: features use `effects`, `fanout`, `event` and `commit`,
//! never the reverse; `effects` names features' steps only as methods of `Shard`.
//!
//! Invariants (asserted where cheap, tested by the simulation):
//! - A conversation's seqs are assigned here only by its owner, contiguously, and a seq is
//!   visible (acked, pushed, listed, paged) only once the commit holding it is durable.
//! - At most one commit is in flight; effects of a commit run in commit order.
//! - A connection id in `conns` is open on this shard; the engine never emits output for
//!   a connection it has forgotten.

mod admin;
mod amend;
mod bots;
mod channels;
mod commit;
mod effects;
mod event;
mod fanout;
mod gather;
mod group;
mod keys;
mod links;
mod media;
mod members;
mod notify;
mod ops;
mod owner;
mod presence;
mod reads;
mod rooms;
mod session;
mod social;
mod stats;
mod timers;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::auth::{HashCost, Job, JobResult, TokenKey, SECRET_BYTES};
use crate::cluster::ClusterMap;
use crate::ids::{ConnId, Placement, ShardId, UserId};
use crate::limits;
use crate::mail::{Mail, ReplyTo};
use crate::protocol::{error_frame, ErrorCode};
pub use crate::storage::Durability;
use crate::storage::{Commit, Storage};

use crate::admin::AdminOp;
pub use bots::BOT_DEVICE;
pub use notify::NotifyConfig;
pub use session::Handoff;
pub use stats::{Histogram, Stats, ERROR_CODES, LATENCY_BOUNDS_MS};
use timers::Timer;

/// A shard's configuration. `Config::new` gives the defaults.
#[derive(Clone, Debug)]
pub struct Config {
    pub shard: ShardId,
    /// Where every user and conversation lives (this shard is one of its shards).
    pub placement: Placement,
    pub secret: [u8; SECRET_BYTES],
    /// A connection silent for this long is closed (4000) and its pushes stop.
    pub heartbeat_timeout_ms: u64,
    /// A connection silent for this long gets a WebSocket ping (browsers answer automatically).
    pub heartbeat_interval_ms: u64,
    /// An unacked push is sent again after this long.
    pub push_retry_ms: u64,
    pub body_bytes_max: usize,
    /// Requests per connection per second; beyond: `rate_limited`; ten times beyond: close 1008.
    pub requests_per_sec_max: u32,
    pub token_ttl_s: u64,
    /// Anyone may see anyone's presence (otherwise only oneself and friends).
    pub presence_public: bool,
    /// Largest group; `group_full` beyond it.
    pub group_members_max: usize,
    /// A sender may recall or edit a message this long after sending it (admins recall any
    /// group message at any time).
    pub edit_window_ms: u64,
    pub hash_cost: HashCost,
    /// Seed for the engine's PRNG (device nonces). The driver seeds from the OS.
    pub seed: u64,
    /// The cluster this shard is part of, and the index of its node in it: a user homed on
    /// another node is told to connect there (`moved`). One node by default.
    pub cluster: Arc<ClusterMap>,
    pub node: usize,
    /// Offline notifications for the push webhook (`Output::Notify`); `None`: off.
    pub notify: Option<NotifyConfig>,
    /// Largest medium one `media_upload` may announce, in bytes.
    pub media_bytes_max: u64,
    /// Bytes of media one user may have uploaded or be uploading (docs/media.md).
    pub media_quota_bytes: u64,
}

impl Config {
    pub fn new(shard: ShardId, shards: u16, secret: [u8; SECRET_BYTES]) -> Config {
        Config {
            shard,
            placement: Placement::new(shards),
            secret,
            heartbeat_timeout_ms: 60_000,
            heartbeat_interval_ms: 20_000,
            push_retry_ms: 5_000,
            body_bytes_max: limits::BODY_BYTES_MAX,
            requests_per_sec_max: limits::REQUESTS_PER_SEC_MAX,
            token_ttl_s: 30 * 24 * 3600,
            presence_public: false,
            group_members_max: limits::GROUP_MEMBERS_MAX,
            edit_window_ms: limits::EDIT_WINDOW_MS,
            hash_cost: HashCost::default(),
            seed: 0,
            cluster: Arc::new(ClusterMap::single(shards)),
            node: 0,
            notify: None,
            media_bytes_max: limits::MEDIA_BYTES_MAX,
            media_quota_bytes: limits::MEDIA_QUOTA_BYTES,
        }
    }

    /// The cluster has nodes other than this one: waits on them need deadlines.
    pub fn is_clustered(&self) -> bool {
        self.cluster.nodes.len() > 1
    }

    /// The node running `shard`, if that is not this node.
    pub fn other_node(&self, shard: ShardId) -> Option<usize> {
        self.cluster
            .locate(shard)
            .map(|at| at.node)
            .filter(|&node| node != self.node)
    }

    /// The configuration of cluster-wide shard `shard`, on node `node` of `cluster`.
    pub fn in_cluster(
        shard: ShardId,
        cluster: Arc<ClusterMap>,
        node: usize,
        secret: [u8; SECRET_BYTES],
    ) -> Config {
        let mut cfg = Config::new(shard, cluster.placement().shards(), secret);
        cfg.cluster = cluster;
        cfg.node = node;
        cfg
    }
}

/// A text frame to send: a reply or notice built for one connection, or a `msg` push built
/// once per message and shared by every connection it goes to (fan-out copies no text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Owned(String),
    Shared(Arc<str>),
}

impl std::ops::Deref for Frame {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Frame::Owned(s) => s,
            Frame::Shared(s) => s,
        }
    }
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl From<String> for Frame {
    fn from(s: String) -> Frame {
        Frame::Owned(s)
    }
}

impl From<Arc<str>> for Frame {
    fn from(s: Arc<str>) -> Frame {
        Frame::Shared(s)
    }
}

/// What the engine asks the driver to do.
#[derive(Debug)]
pub enum Output {
    /// Send a text frame.
    Send { conn: ConnId, frame: Frame },
    /// Send a text frame if the connection's outbox holds at most `limits::OFFER_BYTES_MAX`
    /// bytes; otherwise drop it (counted by the driver) and keep the connection. Best-effort
    /// pushes (channels, live rooms): what a device misses it reads by seq.
    Offer { conn: ConnId, frame: Frame },
    /// Send a WebSocket ping (liveness probe).
    Ping { conn: ConnId },
    /// Close the connection with this code after flushing what is queued. The engine has
    /// already forgotten it.
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
    /// Deliver mail to another shard (never to this one: local mail is handled inline).
    Mail { to: ShardId, mail: Mail },
    /// Move this connection's socket to shard `to`, which will `handle_adopt` it.
    Handoff {
        conn: ConnId,
        to: ShardId,
        handoff: Handoff,
    },
    /// Run a CPU-heavy job off the reactor and report with `handle_job_done`. `bulk` jobs (an
    /// operator's account creation) should not delay users' logins: run them apart.
    Job { id: u64, job: Job, bulk: bool },
    /// The one answer to admin request `conn` (see `handle_admin`): an HTTP status and a
    /// JSON body.
    AdminReply {
        conn: ConnId,
        status: u16,
        body: String,
    },
    /// A message for a bot's webhook: POST `body` (a `msg` push frame) to `url`, signed with
    /// `secret`. `bot` (a user id) keys the driver's per-bot queue.
    BotHook {
        bot: u64,
        url: Arc<str>,
        secret: Arc<[u8]>,
        body: Arc<str>,
    },
    /// A notification for the push webhook (a JSON body: docs/protocol.md, "Offline
    /// notifications"). Only with `Config::notify`.
    Notify { body: Arc<str> },
}

pub struct Shard<S: Storage> {
    cfg: Config,
    storage: S,
    tokens: TokenKey,
    rng: StdRng,
    out: VecDeque<Output>,
    /// Mail this shard sent itself; drained before a `handle_*` returns.
    local_mail: VecDeque<Mail>,
    sessions: session::Sessions,
    owned: owner::Owned,
    gathers: gather::Gathers,
    admin: admin::Admin,
    commits: commit::Commits<effects::Deferred>,
    timers: timers::Timers,
    /// When presence and cursors were last flushed (`handle_timeout`).
    last_flush_ms: u64,
    /// The latest input's time: deadlines set deep inside a handler are counted from it.
    now_ms: u64,
    /// Client requests forwarded to another node's shard and not yet answered, by (connection,
    /// rid); `true` once answered `unavailable` at the deadline (a late answer is then
    /// dropped). See `links.rs`.
    remote_waits: HashMap<(ConnId, u64), bool>,
    jobs: HashMap<u64, ops::PendingJob>,
    next_job: u64,
    stats: Stats,
    /// Friend requests this shard's users sent whose second side is not yet written, and
    /// those the other user declined meanwhile: see `social::friend_answer`.
    friend_races: social::FriendRaces,
    notifier: notify::Notifier,
    channels: channels::Channels,
    rooms: rooms::Rooms,
    bots: bots::Bots,
    /// Blocks whose owner's copy is not yet confirmed: see `social::BlockSyncs`.
    block_syncs: social::BlockSyncs,
}

impl<S: Storage> Shard<S> {
    pub fn new(cfg: Config, storage: S) -> Shard<S> {
        assert!(
            cfg.shard.0 < cfg.placement.shards(),
            "shard id out of range"
        );
        assert!((cfg.placement.shards() as usize) <= limits::SHARDS_MAX);
        assert!(
            cfg.heartbeat_interval_ms < cfg.heartbeat_timeout_ms,
            "ping before timing out"
        );
        assert!(
            (2..=limits::GROUP_MEMBERS_LIMIT).contains(&cfg.group_members_max),
            "group size limit out of range"
        );
        let mut shard = Shard {
            tokens: TokenKey::new(&cfg.secret),
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            storage,
            out: VecDeque::new(),
            local_mail: VecDeque::new(),
            sessions: session::Sessions::default(),
            friend_races: social::FriendRaces::default(),
            notifier: notify::Notifier::default(),
            channels: channels::Channels::default(),
            rooms: rooms::Rooms::default(),
            bots: bots::Bots::default(),
            block_syncs: social::BlockSyncs::default(),
            owned: owner::Owned::default(),
            gathers: gather::Gathers::default(),
            admin: admin::Admin::default(),
            commits: commit::Commits::default(),
            timers: timers::Timers::default(),
            last_flush_ms: 0,
            now_ms: 0,
            remote_waits: HashMap::new(),
            jobs: HashMap::new(),
            next_job: 1,
            stats: Stats::default(),
        };
        // A block written here whose owner's copy was never confirmed (a crash, or a node
        // lost between the two) is sent again now, and again whenever a link comes back.
        shard.load_block_syncs();
        shard.resend_block_syncs(None);
        shard.load_push_tokens();
        shard.load_bots();
        shard
    }

    // ---- getters ----

    pub fn id(&self) -> ShardId {
        self.cfg.shard
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Users homed here with at least one authenticated connection.
    pub fn users_online(&self) -> usize {
        self.sessions.online.len()
    }

    /// Authenticated connections (devices) homed here.
    pub fn devices_online(&self) -> usize {
        self.sessions.devices_online
    }

    /// Conversations whose state this shard holds in memory (as their owner).
    pub fn loaded_conversations(&self) -> usize {
        self.owned.convs.len()
    }

    pub fn connections(&self) -> usize {
        self.sessions.conns.len()
    }

    /// True when nothing waits to be written: used to finish a drain at shutdown.
    pub fn is_write_idle(&self) -> bool {
        self.commits.is_idle()
    }

    pub fn home_of(&self, user: UserId) -> ShardId {
        self.cfg.placement.home(user)
    }

    // ---- inputs: every one takes the current time ----

    /// A new connection completed its WebSocket handshake on this shard.
    pub fn handle_connect(&mut self, now_ms: u64, conn: ConnId) {
        self.now_ms = self.now_ms.max(now_ms);
        self.connect(now_ms, conn);
    }

    /// A connection handed off by another shard arrived; run the request that moved it.
    pub fn handle_adopt(&mut self, now_ms: u64, conn: ConnId, handoff: Handoff) {
        self.now_ms = self.now_ms.max(now_ms);
        self.adopt(now_ms, conn, handoff);
        self.drain_local(now_ms);
    }

    /// A text frame from a client.
    pub fn handle_frame(&mut self, now_ms: u64, conn: ConnId, text: &str) {
        self.now_ms = self.now_ms.max(now_ms);
        self.frame(now_ms, conn, text);
        self.drain_local(now_ms);
    }

    /// Any sign of life that is not a text frame (a pong, a ping).
    pub fn handle_activity(&mut self, now_ms: u64, conn: ConnId) {
        self.now_ms = self.now_ms.max(now_ms);
        self.activity(now_ms, conn);
    }

    /// The socket closed (by the peer, an error, or after our own `Close`).
    pub fn handle_disconnect(&mut self, _now_ms: u64, conn: ConnId) {
        self.disconnect(conn);
    }

    /// An authenticated operator request arrived on pseudo-connection `conn`. Exactly one
    /// `Output::AdminReply` for `conn` follows, now or later; `handle_disconnect(conn)` when
    /// the driver is done with it.
    pub fn handle_admin(&mut self, now_ms: u64, conn: ConnId, op: AdminOp) {
        self.now_ms = self.now_ms.max(now_ms);
        self.admin_request(now_ms, conn, op);
        self.drain_local(now_ms);
    }

    /// A bot's HTTP request (`POST /bot/api`) arrived on pseudo-connection `conn`: `token` from
    /// its Authorization header, `frame` its body (one request frame). Exactly one
    /// `Output::AdminReply` for `conn` follows, now or later, carrying the reply frame;
    /// `handle_disconnect(conn)` when the driver is done with it.
    pub fn handle_bot_http(&mut self, now_ms: u64, conn: ConnId, token: &str, frame: String) {
        self.now_ms = self.now_ms.max(now_ms);
        self.bot_http(now_ms, conn, token, frame);
        self.drain_local(now_ms);
    }

    /// The media store collected an upload of `user` that was never completed: `bytes` go back
    /// to their quota (on their home shard).
    pub fn handle_media_released(&mut self, now_ms: u64, user: UserId, bytes: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let home = self.cfg.placement.home(user);
        self.mail(home, Mail::MediaReleased { user, bytes });
        self.drain_local(now_ms);
    }

    /// A mail from another shard.
    pub fn handle_mail(&mut self, now_ms: u64, mail: Mail) {
        self.now_ms = self.now_ms.max(now_ms);
        self.dispatch_mail(now_ms, mail);
        self.drain_local(now_ms);
    }

    /// Mail this shard sent to a shard of another node that cannot have arrived: the link is
    /// down, or was reset with the mail unacked. Requests among it fail with `unavailable`;
    /// see `links.rs`.
    pub fn handle_undeliverable(&mut self, now_ms: u64, mail: Mail) {
        self.now_ms = self.now_ms.max(now_ms);
        self.undeliverable(mail);
        self.drain_local(now_ms);
    }

    /// The link to `shard` (another node's) carries mail again after being down or reset:
    /// pushes from it may have been lost, so every device here is told to resync.
    pub fn handle_link_up(&mut self, now_ms: u64, shard: ShardId) {
        self.now_ms = self.now_ms.max(now_ms);
        self.link_up(now_ms, shard);
        self.resend_block_syncs(Some(shard));
        self.drain_local(now_ms);
    }

    /// A job (password hash) finished.
    pub fn handle_job_done(&mut self, now_ms: u64, id: u64, result: JobResult) {
        self.now_ms = self.now_ms.max(now_ms);
        if let Some(job) = self.jobs.remove(&id) {
            self.finish_job(now_ms, job, result);
        }
        self.drain_local(now_ms);
    }

    /// The commit `id` (from `poll_commit`) finished: its effects run now, in order.
    pub fn handle_commit_done(&mut self, now_ms: u64, id: u64, result: Result<(), String>) {
        self.now_ms = self.now_ms.max(now_ms);
        self.commit_done(now_ms, id, result);
        self.drain_local(now_ms);
    }

    /// Time passed `poll_timeout()`: runs what is due — heartbeats, push retries, and the
    /// flush of presence changes and senders' cursors (at most one per `PRESENCE_TICK_MS`).
    /// Calling it early, or often, is harmless: only what is due runs.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        while let Some(timer) = self.timers.pop_due(now_ms) {
            match timer {
                Timer::Heartbeat(conn) => self.heartbeat(now_ms, conn),
                Timer::Retry(conn) => self.retry_pushes(now_ms, conn),
                Timer::Gather(id) => self.gather_expired(id),
                Timer::Add(conv, op) => self.add_expired(now_ms, conv, op),
                Timer::Reply(conn, rid) => self.reply_expired(conn, rid),
                Timer::Notify(user) => self.notify_flush(now_ms, user),
                Timer::Relay(conn) => self.relay_expired(conn),
            }
        }
        if self.flush_at().is_some_and(|at| at <= now_ms) {
            self.last_flush_ms = now_ms;
            self.flush_presence();
            self.flush_cursors();
            self.flush_channel_counts();
        }
        self.drain_local(now_ms);
    }

    /// The server is stopping: close every connection with 1001 (going away).
    pub fn handle_shutdown(&mut self) {
        self.shutdown();
    }

    // ---- outputs ----

    /// When `handle_timeout` next has work: the earliest deadline, in the clock of the inputs'
    /// `now_ms`. `None`: nothing is scheduled. Any input may move it earlier, so a driver asks
    /// again after each one.
    pub fn poll_timeout(&self) -> Option<u64> {
        match (self.timers.next(), self.flush_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the dirty presence and cursors go out: `PRESENCE_TICK_MS` after the last flush,
    /// which coalesces a user's flapping into at most one push per window.
    fn flush_at(&self) -> Option<u64> {
        let dirty = !self.sessions.presence_dirty.is_empty()
            || !self.owned.cursors_dirty.is_empty()
            || !self.channels.counts_dirty.is_empty();
        dirty.then_some(self.last_flush_ms + limits::PRESENCE_TICK_MS)
    }

    /// Write operations waiting for the next commit; the driver stops admitting client frames
    /// above `limits::COMMIT_OPS_MAX`.
    pub fn pending_ops(&self) -> usize {
        self.commits.open_ops()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.out.pop_front();
        if let Some(Output::Send { .. } | Output::Offer { .. }) = out {
            self.stats.frames_out += 1;
        }
        out
    }

    /// The next batch to write, if none is in flight and writes are pending.
    pub fn poll_commit(&mut self) -> Option<Commit> {
        let commit = self.commits.start()?;
        self.stats.commits += 1;
        self.stats.commit_ops += commit.ops.len() as u64;
        Some(commit)
    }

    // ---- internals shared by the handler files ----

    fn dispatch_mail(&mut self, now_ms: u64, mail: Mail) {
        match mail {
            Mail::Open {
                reply,
                conv,
                requester,
                names,
            } => self.owner_open(now_ms, reply, conv, requester, names),
            Mail::Append {
                reply,
                conv,
                sender,
                sender_name,
                device,
                id,
                body,
            } => self.owner_append(now_ms, reply, conv, sender, sender_name, device, id, body),
            Mail::Range {
                gather,
                user,
                conv,
                after,
                before,
                limit,
                bytes_max,
            } => self.owner_range(gather, user, conv, (after, before), limit, bytes_max),
            Mail::LastSeqs {
                gather,
                user,
                convs,
            } => self.owner_last_seqs(gather, user, convs),
            Mail::Op {
                reply,
                conv,
                actor,
                actor_name,
                op,
            } => self.owner_op(now_ms, reply, conv, (actor, actor_name), op),
            Mail::FriendAsk {
                reply,
                from,
                to,
                op,
            } => self.friend_ask(now_ms, reply, from, to, op),
            Mail::FriendAnswer {
                reply,
                from,
                to,
                op,
                result,
            } => self.friend_answer(now_ms, reply, from, to, op, result),
            Mail::SetBlock {
                reply,
                conv,
                blocker,
                blocked,
            } => self.owner_set_block(reply, conv, blocker, blocked),
            Mail::BlockSynced {
                conv,
                blocker,
                blocked,
            } => self.block_synced(conv, blocker, blocked),
            Mail::ProfileQuery {
                reply,
                user,
                name,
                version,
            } => self.profile_query(reply, user, &name, version),
            Mail::ProfileBumped {
                user,
                version,
                friends,
            } => self.profile_bumped(user, version, friends),
            Mail::PresenceQuery {
                gather,
                requester,
                users,
            } => self.presence_query(gather, requester, users),
            Mail::PresenceDone { gather, states } => self.gather_presence_done(gather, states),
            Mail::ReadUpTo {
                reply,
                conv,
                user,
                user_name,
                seq,
            } => self.owner_read_up_to(reply, conv, user, &user_name, seq),
            Mail::ReadCapped {
                reply,
                conv,
                user,
                seq,
                last,
            } => self.home_read_capped(reply, conv, user, (seq, last)),
            Mail::Index {
                conv,
                op,
                users,
                title,
            } => self.home_index(conv, op, users, title),
            Mail::Indexed {
                conv,
                op,
                ok,
                missing,
            } => self.group_indexed(now_ms, conv, op, ok, missing),
            Mail::Unindex { conv, users } => self.home_unindex(conv, &users),
            Mail::Ephemeral {
                frame,
                recipients,
                skip_user,
            } => self.home_ephemeral(&frame, &recipients, skip_user),
            Mail::EnsureMember {
                conv,
                user,
                peer,
                peer_name,
            } => self.home_ensure_member(conv, user, peer, peer_name),
            Mail::Bot {
                reply,
                owner,
                bot,
                action,
            } => self.bot_action(now_ms, reply, owner, bot, action),
            Mail::BotOwned { owner, bot } => self.bot_owned(owner, &bot),
            Mail::KeysQuery {
                reply,
                user,
                version,
                claim,
            } => self.keys_query(reply, user, version, claim),
            Mail::BotCall {
                reply,
                user,
                nonce,
                frame,
            } => self.bot_call(now_ms, reply, user, nonce, frame),
            Mail::MemberEnsured { conv, user, result } => {
                self.owner_member_ensured(now_ms, conv, user, result)
            }
            Mail::Reply { conn, frame } => self.send(conn, frame),
            Mail::CreateAccounts { reply, users } => self.create_accounts(reply, users),
            Mail::AccountsCreated { conn, results } => self.admin_accounts_created(conn, results),
            Mail::Account {
                reply,
                user,
                action,
            } => self.account_action(reply, user, action),
            Mail::Deliver {
                conv,
                seq,
                ts_ms,
                frame,
                recipients,
                skip,
            } => {
                self.stats.delivery_ms.observe(now_ms.saturating_sub(ts_ms));
                self.home_deliver(now_ms, (conv, seq), &frame, &recipients, skip)
            }
            Mail::Subscribe { reply, conv, user } => self.owner_subscribe(reply, conv, user),
            Mail::MediaReleased { user, bytes } => self.media_released(user, bytes),
            Mail::SubscribeOk {
                reply,
                conv,
                user,
                last_seq,
                title,
            } => self.home_subscribe(reply, conv, user, (last_seq, title)),
            Mail::Subscribers { conv, delta } => self.owner_subscribers(conv, delta),
            Mail::Broadcast {
                conv,
                ts_ms,
                frame,
                skip,
            } => {
                self.stats.delivery_ms.observe(now_ms.saturating_sub(ts_ms));
                self.home_broadcast(conv, &frame, skip)
            }
            Mail::Room {
                reply,
                room,
                actor,
                op,
            } => self.owner_room(now_ms, reply, room, actor, op),
            Mail::RoomJoined { reply, room, frame } => self.home_room_joined(reply, room, frame),
            Mail::RoomLeft { room, shard } => self.owner_room_left(room, shard),
            Mail::RoomPush { room, frame, skip } => self.home_room_push(room, &frame, skip),
            Mail::RangeDone { gather, page } => self.gather_range_done(gather, page),
            Mail::LastSeqsDone { gather, seqs } => self.gather_last_seqs_done(gather, seqs),
        }
    }

    fn drain_local(&mut self, now_ms: u64) {
        // Bounded: each local mail is a reply to or the effect of work already admitted.
        while let Some(mail) = self.local_mail.pop_front() {
            self.dispatch_mail(now_ms, mail);
        }
    }

    fn mail(&mut self, to: ShardId, mail: Mail) {
        if to == self.cfg.shard {
            self.local_mail.push_back(mail);
        } else {
            self.await_remote(to, &mail);
            self.out.push_back(Output::Mail { to, mail });
        }
    }

    fn send(&mut self, conn: ConnId, frame: String) {
        if !self.remote_waits.is_empty() && !self.reply_settles(conn, &frame) {
            return; // a late answer: the client was told `unavailable` already
        }
        if self.sessions.conns.contains_key(&conn) {
            self.out.push_back(Output::Send {
                conn,
                frame: frame.into(),
            });
        } else if self.admin.is_request(conn) {
            self.admin_frame(conn, frame);
        }
    }

    fn reply_to(&mut self, to: ReplyTo, frame: String) {
        if to.shard == self.cfg.shard {
            self.send(to.conn, frame);
        } else {
            self.mail(
                to.shard,
                Mail::Reply {
                    conn: to.conn,
                    frame,
                },
            );
        }
    }

    fn count_error(&mut self, code: ErrorCode) {
        self.stats.errors += 1;
        self.stats.errors_by_code[code as usize] += 1;
    }

    fn error_to(&mut self, to: ReplyTo, code: ErrorCode, message: &str) {
        self.count_error(code);
        self.reply_to(to, error_frame(Some(to.rid), code, message));
    }

    fn error(&mut self, conn: ConnId, rid: Option<u64>, code: ErrorCode, message: &str) {
        self.count_error(code);
        self.send(conn, error_frame(rid, code, message));
    }

    fn job(&mut self, job: Job, pending: ops::PendingJob) {
        let id = self.next_job;
        self.next_job += 1;
        let bulk = matches!(pending, ops::PendingJob::Account { .. });
        self.jobs.insert(id, pending);
        self.out.push_back(Output::Job { id, job, bulk });
    }
}

#[cfg(test)]
mod tests;
