//! Every message one shard sends another, in one enum.
//!
//! Mail travels over bounded single-producer single-consumer channels, one per ordered pair of
//! shards, so mail from A to B arrives in the order A sent it. The message path relies on that:
//! an owner shard's `Deliver` mails for one conversation reach each home shard in seq order.
//!
//! Directions: *home → owner* mails carry a [`ReplyTo`] or a [`GatherRef`] naming where the
//! answer goes; *owner → home* mails are those answers, plus `Deliver` (fan-out) and
//! `EnsureMember` (the owner asking a member's home shard to index a new conversation).

use std::sync::Arc;

use crate::ids::{ConnId, ConvId, Seq, ShardId, UserId};
use crate::protocol::ErrorCode;

/// Where the reply to a client request goes: a connection on a shard, and the request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    pub shard: ShardId,
    pub conn: ConnId,
    pub rid: u64,
}

/// One part of a multi-shard request being gathered on the requesting shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherRef {
    pub shard: ShardId,
    pub id: u64,
    pub part: usize,
}

/// A page of messages (their client JSON, ascending seq) and whether more follow.
pub type Page = Result<(Vec<String>, bool), ErrorCode>;

#[derive(Debug)]
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
    /// Last durable seq of each listed conversation (index into the requester's list, id).
    LastSeqs {
        gather: GatherRef,
        convs: Vec<(usize, ConvId)>,
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
        msg: Arc<str>,
        recipients: Vec<UserId>,
        skip: Option<ConnId>,
    },
    RangeDone {
        gather: GatherRef,
        page: Page,
    },
    LastSeqsDone {
        gather: GatherRef,
        seqs: Vec<(usize, Seq)>,
    },
}
