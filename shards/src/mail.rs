//! Every message one shard sends another, in one enum.
//!
//! Mail travels over bounded single-producer single-consumer channels, one per ordered pair of
//! shards, so mail from A to B arrives in the order A sent it. The message path relies on that:
//! an owner shard's `Deliver` mails for one conversation reach each home shard in seq order.
//!
//! Directions: *home → owner* mails carry a [`ReplyTo`] or a [`GatherRef`] naming where the
//! answer goes; *owner → home* mails are those answers, plus `Deliver` (fan-out), `Ephemeral`
//! (typing, receipts) and `EnsureMember`/`Index`/`Unindex` (the owner keeping members'
//! conversation lists in step with membership).

use std::sync::Arc;

use crate::ids::{ConnId, ConvId, Seq, ShardId, UserId};
use crate::model::{FriendState, Presence};
use crate::protocol::ErrorCode;

/// Where the reply to a client request goes: a connection on a shard, and the request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ReplyTo {
    pub shard: ShardId,
    pub conn: ConnId,
    pub rid: u64,
}

/// One part of a multi-shard request being gathered on the requesting shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GatherRef {
    pub shard: ShardId,
    pub id: u64,
    pub part: usize,
}

/// A page of messages (their client JSON, ascending seq) and whether more follow.
pub type Page = Result<(Vec<String>, bool), ErrorCode>;

/// What the owner tells a member's conversation list about one conversation.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct ConvSummary {
    pub last_seq: Seq,
    /// Messages at or below this seq are not the member's to read (a group joined later that
    /// hides earlier history): unread counts start above it.
    pub floor: Seq,
    /// The group's current name; `None` for one-to-one conversations.
    pub title: Option<String>,
    /// False when the member's index outlived their membership (a crash between a removal and
    /// the index clean-up): the list drops the entry.
    pub member: bool,
    /// One-to-one: the peer's read cursor (for "read" ticks).
    pub peer_read: Option<Seq>,
    /// The owner's copy of the member's own cursor: moved by `read` and by their own sends
    /// (a sender has read up to their message), so it may be ahead of the home's.
    pub own_read: Seq,
}

/// What a live room's owner is asked to do (`Mail::Room`).
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum RoomOp {
    Create {
        name: String,
        rate: u32,
        admins: Vec<UserId>,
    },
    /// The owner's: any of name, rate, admins (the whole list).
    Update {
        name: Option<String>,
        rate: Option<u32>,
        admins: Option<Vec<UserId>>,
    },
    Join,
    Post {
        device: String,
        id: uuid::Uuid,
        body: String,
    },
}

/// A user named in a request, resolved by the requester's shard: id and normalised name.
pub type Named = (UserId, String);

/// A change to a friendship, requested by one side.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum FriendOp {
    Request { message: String },
    Accept,
    Decline,
    Cancel,
    Remove,
}

/// What a user's home shard says of their presence: `state` and status text.
pub type PresenceInfo = (Presence, String);

/// Requests on one conversation that its owner runs, other than the hot `Append`.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ConvOp {
    GroupCreate {
        name: String,
        members: Vec<Named>,
        approval: bool,
        history_visible: bool,
    },
    Invite {
        users: Vec<Named>,
    },
    Join,
    Approve {
        user: UserId,
    },
    Decline {
        user: UserId,
    },
    Leave,
    Kick {
        user: UserId,
    },
    Role {
        user: UserId,
        admin: bool,
    },
    Transfer {
        user: UserId,
    },
    /// `user: None` mutes or unmutes the whole group.
    Mute {
        user: Option<UserId>,
        muted: bool,
    },
    Update {
        name: Option<String>,
        approval: Option<bool>,
        history_visible: Option<bool>,
    },
    Disband,
    Info {
        version: Option<u64>,
    },
    Members {
        version: Option<u64>,
    },
    Receipts {
        seq: Seq,
    },
    Recall {
        seq: Seq,
        device: String,
    },
    Edit {
        seq: Seq,
        body: String,
        device: String,
    },
    Typing,
    /// An operator's notice into a group (admin API): a `system` entry with event `notice`,
    /// written by the server itself (the actor is the system user, not a member).
    Notice {
        body: String,
    },
}

/// An action on a bot, run on the bot's home shard: by its owner (a client op) or the
/// operator (admin API).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum BotAction {
    Create {
        webhook: Option<String>,
    },
    /// A new token and webhook secret; the old ones stop working.
    Token,
    /// The token stops working (and the bot's connections close) until the next `Token`.
    Revoke,
    Webhook(Option<String>),
}

/// An operator's action on one account, run on its home shard (admin API).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AccountAction {
    /// Read the account: created, disabled, devices (as `devices` lists them).
    View,
    Disable(bool),
    /// Close one device's connections (every device's when `None`) and revoke its token.
    Kick {
        device: Option<String>,
    },
}

impl Mail {
    /// Where the request this mail carries is answered, for mails that carry one.
    pub fn reply(&self) -> Option<ReplyTo> {
        match self {
            Mail::Open { reply, .. }
            | Mail::Append { reply, .. }
            | Mail::Op { reply, .. }
            | Mail::FriendAsk { reply, .. }
            | Mail::FriendAnswer { reply, .. }
            | Mail::ProfileQuery { reply, .. }
            | Mail::CreateAccounts { reply, .. }
            | Mail::ReadUpTo { reply, .. }
            | Mail::Bot { reply, .. }
            | Mail::BotCall { reply, .. }
            | Mail::KeysQuery { reply, .. }
            | Mail::Subscribe { reply, .. }
            | Mail::Room { reply, .. }
            | Mail::Account { reply, .. } => Some(*reply),
            Mail::SetBlock { reply, .. } => *reply,
            // Parts of gathers (answered by the gather), answers, and effects without a
            // requester. Listed, not wildcarded: a new mail must say which it is.
            Mail::Range { .. }
            | Mail::LastSeqs { .. }
            | Mail::ProfileBumped { .. }
            | Mail::PresenceQuery { .. }
            | Mail::PresenceDone { .. }
            | Mail::ReadCapped { .. }
            | Mail::AccountsCreated { .. }
            | Mail::EnsureMember { .. }
            | Mail::MemberEnsured { .. }
            | Mail::Index { .. }
            | Mail::Indexed { .. }
            | Mail::Unindex { .. }
            | Mail::Ephemeral { .. }
            | Mail::Reply { .. }
            | Mail::Deliver { .. }
            | Mail::RangeDone { .. }
            | Mail::LastSeqsDone { .. }
            | Mail::BotOwned { .. }
            | Mail::SubscribeOk { .. }
            | Mail::Subscribers { .. }
            | Mail::Broadcast { .. }
            | Mail::RoomJoined { .. }
            | Mail::MediaReleased { .. }
            | Mail::RoomLeft { .. }
            | Mail::RoomPush { .. }
            | Mail::BlockSynced { .. } => None,
        }
    }
}

#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Mail {
    // ---- home → owner ----
    /// Open (create if new) the one-to-one conversation `conv`; `names` are both members' names.
    Open {
        reply: ReplyTo,
        conv: ConvId,
        requester: UserId,
        names: [(UserId, String); 2],
    },
    /// Append a message (DESIGN.md message path, step 2→3).
    Append {
        reply: ReplyTo,
        conv: ConvId,
        sender: UserId,
        sender_name: String,
        device: String,
        id: uuid::Uuid,
        body: String,
    },
    /// Read a page: `after` for forward sync, `before` for backward history; at most `limit`
    /// messages and about `bytes_max` bytes (always at least one message).
    Range {
        gather: GatherRef,
        user: UserId,
        conv: ConvId,
        after: Option<Seq>,
        before: Option<Seq>,
        limit: usize,
        bytes_max: usize,
    },
    /// Summary of each listed conversation for `user` (index into the requester's list, id).
    LastSeqs {
        gather: GatherRef,
        user: UserId,
        convs: Vec<(usize, ConvId)>,
    },
    /// Any other request on one conversation (groups, recall and edit, receipts, typing).
    Op {
        reply: ReplyTo,
        conv: ConvId,
        actor: UserId,
        actor_name: String,
        op: ConvOp,
    },
    /// To the bot's home: create it, or act on it for `owner` (`None`: the operator).
    Bot {
        reply: ReplyTo,
        owner: Option<UserId>,
        bot: Named,
        action: BotAction,
    },
    /// To `user`'s home: their devices' public keys (`keys_devices`), or the same with one
    /// one-time prekey per device taken (`keys_claim`), answered straight to the requester.
    KeysQuery {
        reply: ReplyTo,
        user: Named,
        version: Option<u64>,
        /// `None`: list. `Some(devices)`: claim, for these devices (empty: all).
        claim: Option<Vec<String>>,
    },
    /// Bot home → owner's home, once the bot is durable: add it to the owner's list.
    BotOwned {
        owner: UserId,
        bot: String,
    },
    /// To the bot's home: a request frame a bot sent over HTTP with a token that verified
    /// (signature, expiry) where it arrived; the home checks the nonce and runs it.
    BotCall {
        reply: ReplyTo,
        user: UserId,
        nonce: u64,
        frame: String,
    },
    /// A friend operation from `from` (home of `from`) to the home of `to`, which applies its
    /// side first and answers with `FriendAnswer`.
    FriendAsk {
        reply: ReplyTo,
        from: Named,
        to: Named,
        op: FriendOp,
    },
    /// Home of `to` → home of `from`: `to`'s new state.
    FriendAnswer {
        reply: ReplyTo,
        from: Named,
        to: Named,
        op: FriendOp,
        result: Result<FriendState, ErrorCode>,
    },
    /// `blocker` blocks (or unblocks) the other member of one-to-one `conv`: applied by the
    /// owner to sends; the owner answers the client once durable (when there is one: `None`
    /// for a resend of the blocker's current state, see `social::BlockSyncs`), and confirms
    /// with `BlockSynced` to the blocker's home.
    SetBlock {
        reply: Option<ReplyTo>,
        conv: ConvId,
        blocker: UserId,
        blocked: bool,
    },
    /// Owner → blocker's home: the owner's copy of the block is durable with this state.
    BlockSynced {
        conv: ConvId,
        blocker: UserId,
        blocked: bool,
    },
    /// `user`'s profile (homed on the receiving shard), answered straight to the requester:
    /// `not_modified` when `version` is current.
    ProfileQuery {
        reply: ReplyTo,
        user: UserId,
        name: String,
        version: Option<u64>,
    },
    /// `user`'s profile is now at `version`: record it on these friends' side (no push; their
    /// friend list version moves).
    ProfileBumped {
        user: UserId,
        version: u64,
        friends: Vec<UserId>,
    },
    /// Presence of users homed on the receiving shard, as `requester` may see it.
    PresenceQuery {
        gather: GatherRef,
        requester: UserId,
        users: Vec<(usize, UserId)>,
    },
    PresenceDone {
        gather: GatherRef,
        states: Vec<(usize, Option<PresenceInfo>)>,
    },
    /// `user` read `conv` up to `seq`. The owner caps it at what the user may have seen (the
    /// durable last seq; a former member's removal entry), records its copy (receipts,
    /// `peer_read_seq`), and answers with `ReadCapped` for the home shard to store.
    ReadUpTo {
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        user_name: String,
        seq: Seq,
    },

    /// `user` subscribes to channel `conv`: the owner checks that it exists and answers the
    /// home with `SubscribeOk`, which stores the subscription.
    Subscribe {
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
    },
    /// A request about live room `room`, for its owner (`engine/rooms.rs`).
    Room {
        reply: ReplyTo,
        room: ConvId,
        actor: Named,
        op: RoomOp,
    },
    /// To `user`'s home: an upload of theirs was collected unfinished; `bytes` return to their
    /// media quota.
    MediaReleased {
        user: UserId,
        bytes: u64,
    },
    /// A connection of `shard` left `room` (or went away).
    RoomLeft {
        room: ConvId,
        shard: ShardId,
    },
    /// A home shard stored (`+1`) or dropped (`-1`) a subscription to channel `conv`, durably.
    Subscribers {
        conv: ConvId,
        delta: i64,
    },

    // ---- owner → home ----
    /// The answer to `Subscribe`: the channel exists; its durable last seq and name.
    SubscribeOk {
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        last_seq: Seq,
        title: String,
    },
    /// A channel's post or event, once durable: one mail per shard of the cluster, offered to
    /// the online devices of the subscribers homed there. `skip`: the posting connection, when
    /// it lives on the receiving shard (it got the ack).
    Broadcast {
        conv: ConvId,
        /// When the owner assigned the seq: the home shard measures delivery latency from it.
        ts_ms: u64,
        /// The whole `msg` push frame, built once by the owner.
        frame: Arc<str>,
        skip: Option<ConnId>,
    },
    /// The owner counted a `room_join`: bind the connection and send it `frame` (the reply).
    RoomJoined {
        reply: ReplyTo,
        room: ConvId,
        frame: String,
    },
    /// An admitted live room message for this shard's connections in `room`; `skip`: the
    /// sending connection, when it lives here (it got the reply).
    RoomPush {
        room: ConvId,
        frame: Arc<str>,
        skip: Option<ConnId>,
    },
    /// The answer to `ReadUpTo`: the cursor as the owner holds it (never beyond what exists).
    ReadCapped {
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        seq: Seq,
        /// The conversation's durable last seq: a stored cursor beyond it can only be one
        /// written before `read` was capped, and is replaced.
        last: Seq,
    },

    // ---- admin → home ----
    /// Create these accounts (index in the operator's request, username, password), all homed
    /// on the receiving shard; answered with one `AccountsCreated` once each is durable or
    /// refused.
    CreateAccounts {
        reply: ReplyTo,
        users: Vec<(usize, String, String)>,
    },
    AccountsCreated {
        conn: ConnId,
        results: Vec<(usize, Result<(), ErrorCode>)>,
    },
    /// An operator's action on `user`, homed on the receiving shard; the reply says what was done.
    Account {
        reply: ReplyTo,
        user: Named,
        action: AccountAction,
    },

    // ---- owner → home ----
    /// Index `conv` for `user` (durably) and answer with `MemberEnsured`.
    EnsureMember {
        conv: ConvId,
        user: UserId,
        peer: UserId,
        peer_name: String,
    },
    MemberEnsured {
        conv: ConvId,
        user: UserId,
        result: Result<(), ErrorCode>,
    },
    /// Index group `conv` for each listed user that exists, durably, under `title`; answer with
    /// `Indexed`. `op` names the owner's pending membership change.
    Index {
        conv: ConvId,
        op: u64,
        users: Vec<UserId>,
        title: String,
    },
    Indexed {
        conv: ConvId,
        op: u64,
        ok: Vec<UserId>,
        missing: Vec<UserId>,
    },
    /// Drop `conv` from these users' conversation lists (they left or were removed).
    Unindex {
        conv: ConvId,
        users: Vec<UserId>,
    },
    /// An ephemeral push (typing, read receipt) for the online devices of `recipients`
    /// homed on the receiving shard, except those of `skip_user`.
    Ephemeral {
        frame: Arc<str>,
        recipients: Arc<[UserId]>,
        skip_user: Option<UserId>,
    },
    /// A finished reply frame for a connection on the receiving shard.
    Reply {
        conn: ConnId,
        frame: String,
    },
    /// Fan-out: one mail per destination shard carrying every recipient homed there.
    /// `skip` is the sending connection when it lives on the receiving shard: it got an ack.
    Deliver {
        conv: ConvId,
        seq: Seq,
        /// When the owner assigned `seq`: the home shard measures delivery latency from it.
        ts_ms: u64,
        /// The whole `msg` push frame, built once by the owner and sent as is to every device.
        frame: Arc<str>,
        recipients: Arc<[UserId]>,
        skip: Option<ConnId>,
    },
    RangeDone {
        gather: GatherRef,
        page: Page,
    },
    LastSeqsDone {
        gather: GatherRef,
        seqs: Vec<(usize, ConvSummary)>,
    },
}

/// Mail between nodes: its rkyv archive, checked on receipt (bytecheck) before anything reads
/// it. The link frame around it carries the wire version (`link::WIRE_VERSION`), which moves
/// whenever this encoding does: rkyv archives are not self-describing.
pub mod wire {
    use super::Mail;

    #[derive(Debug, thiserror::Error)]
    #[error("mail from another node failed validation: {0}")]
    pub struct Invalid(String);

    /// The archive, shared by the link's window and every (re)send: one copy out of rkyv's
    /// aligned buffer.
    pub fn encode(mail: &Mail) -> std::sync::Arc<[u8]> {
        match rkyv::to_bytes::<rkyv::rancor::Error>(mail) {
            Ok(bytes) => std::sync::Arc::from(bytes.as_slice()),
            // Serialising into memory fails only on allocation failure.
            Err(e) => panic!("serialising mail: {e}"),
        }
    }

    /// Bytes from another node, as they came: copied once into an aligned buffer (a frame's
    /// payload sits at any offset of a batch), validated, then deserialised.
    pub fn decode(bytes: &[u8]) -> Result<Mail, Invalid> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Mail, rkyv::rancor::Error>(&aligned).map_err(|e| Invalid(e.to_string()))
    }
}
