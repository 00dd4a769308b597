//! Group commit. Writes accumulate in the *open* batch; when no batch is in flight the driver
//! takes the open batch (`poll_commit`) and writes it as one atomic RocksDB batch. While it is in
//! flight the next batch fills, so the batch size adapts to load with no timer: one message
//! when idle, thousands under load. Effects that must wait for durability (acks, fan-out,
//! replies) ride with the batch as [`Deferred`] and run, in order, when it completes.
//!
//! Reads that must see this shard's own pending writes (accounts, membership index) go
//! through `get_latest`, which looks at the open and in-flight batches before storage. Reads
//! of messages never do: a message is visible only once durable.

use std::collections::HashMap;
use std::sync::Arc;

use super::owner::Fanout;
use super::session::Session;
use super::Shard;
use crate::ids::{ConnId, ConvId, Seq, ShardId, UserId};
use crate::mail::{Mail, ReplyTo};
use crate::protocol::{error_frame, ErrorCode};
use crate::storage::{Commit, Record, Storage, StorageError, WriteOp};

/// An effect that runs once the batch it rides with is durable (or fails with it).
pub(super) enum Deferred {
    Reply {
        conn: ConnId,
        rid: u64,
        frame: String,
    },
    /// A reply to a request that may have come from another shard.
    ReplyTo {
        to: ReplyTo,
        frame: String,
    },
    /// A friend operation's second side: answered once durable; if the write fails, `retry`
    /// (the `FriendAnswer` that made it) runs again, since the first side is already durable.
    FriendAnswered {
        reply: ReplyTo,
        frame: String,
        retry: Mail,
    },
    Appended {
        conv: ConvId,
        id: uuid::Uuid,
        seq: Seq,
        /// When the owner assigned the seq (the message's `ts`): delivery latency starts here.
        ts_ms: u64,
        msg: Arc<str>,
        frame_ok: String,
        sender: ReplyTo,
        /// Who sent it (their cursor moves to it).
        author: UserId,
        fanout: Fanout,
    },
    /// An event the owner wrote itself (system message, recall, edit).
    Event {
        conv: ConvId,
        seq: Seq,
        ts_ms: u64,
        msg: Arc<str>,
        fanout: Fanout,
        reply: Option<(ReplyTo, String)>,
        unindex: Vec<UserId>,
    },
    /// Mail that may only leave once this batch is durable (the answer to an `Index`, a read
    /// cursor for the owner). On failure an `Indexed` reports no user indexed; others drop.
    Mail {
        to: ShardId,
        mail: Mail,
    },
    Ensured {
        owner: ShardId,
        conv: ConvId,
        user: UserId,
    },
    Opened {
        conv: ConvId,
    },
    LoggedIn {
        conn: ConnId,
        rid: u64,
        session: Session,
        frame: String,
    },
    Registered {
        conn: ConnId,
        rid: u64,
        user: UserId,
        frame: String,
    },
    LoggedOut {
        conn: ConnId,
        rid: u64,
    },
    /// An account of an operator's bulk creation (`admin.rs`).
    AccountCreated {
        batch: u64,
        index: usize,
        user: UserId,
    },
}

#[derive(Default)]
struct Batch {
    ops: Vec<WriteOp>,
    /// Latest value per key written in this batch (`None`: deleted).
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    deferred: Vec<Deferred>,
}

#[derive(Default)]
pub(super) struct Commits {
    open: Batch,
    inflight: Option<(u64, Batch)>,
    next_id: u64,
}

impl Commits {
    pub(super) fn is_idle(&self) -> bool {
        self.inflight.is_none() && self.open.ops.is_empty() && self.open.deferred.is_empty()
    }

    /// Write operations waiting for a commit (the driver's admission gate reads this).
    pub(super) fn open_ops(&self) -> usize {
        self.open.ops.len()
    }

    pub(super) fn start(&mut self) -> Option<Commit> {
        if self.inflight.is_some() || (self.open.ops.is_empty() && self.open.deferred.is_empty()) {
            return None;
        }
        let mut batch = std::mem::take(&mut self.open);
        self.next_id += 1;
        let ops = std::mem::take(&mut batch.ops);
        self.inflight = Some((self.next_id, batch));
        Some(Commit {
            id: self.next_id,
            ops,
        })
    }
}

impl<S: Storage> Shard<S> {
    pub(super) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let open = &mut self.commits.open;
        open.overlay.insert(key.clone(), Some(value.clone()));
        open.ops.push(WriteOp::Put(key, value));
    }

    /// A write that `get_latest` need not see: message records and dedup keys, which are only
    /// read once durable. Skips the overlay copy on the hottest path.
    pub(super) fn put_unread(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.commits.open.ops.push(WriteOp::Put(key, value));
    }

    pub(super) fn delete(&mut self, key: Vec<u8>) {
        let open = &mut self.commits.open;
        open.overlay.insert(key.clone(), None);
        open.ops.push(WriteOp::Delete(key));
    }

    pub(super) fn defer(&mut self, effect: Deferred) {
        self.commits.open.deferred.push(effect);
    }

    /// Sends `frame` to the requester once the open batch is durable, wherever it lives; if
    /// the batch fails, the requester gets `internal` instead (every request is answered).
    pub(super) fn reply_when_durable(&mut self, to: ReplyTo, frame: String) {
        self.defer(Deferred::ReplyTo { to, frame });
    }

    /// The record under `key` including this shard's own writes not yet durable.
    pub(super) fn latest<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StorageError> {
        self.get_latest(key)?
            .map(|b| R::decode(key, &b))
            .transpose()
    }

    /// The value of `key` including this shard's own writes not yet durable.
    pub(super) fn get_latest(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.commits.open.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some((_, batch)) = &self.commits.inflight {
            if let Some(v) = batch.overlay.get(key) {
                return Ok(v.clone());
            }
        }
        self.storage.get(key)
    }

    /// Write operations waiting for the next commit; the driver stops admitting client frames
    /// above `limits::COMMIT_OPS_MAX`.
    pub fn pending_ops(&self) -> usize {
        self.commits.open_ops()
    }

    /// The commit `id` finished. On failure every waiting effect — of this batch and of the open
    /// one, which was built on top of it — answers with an error, and the owned conversations
    /// roll back to their durable seqs, so no seq is skipped.
    pub fn handle_commit_done(&mut self, now_ms: u64, id: u64, result: Result<(), String>) {
        let Some((inflight_id, batch)) = self.commits.inflight.take() else {
            panic!("commit {id} completed but none is in flight");
        };
        assert_eq!(inflight_id, id, "commits complete in order, one at a time");
        match result {
            Ok(()) => {
                for effect in batch.deferred {
                    self.apply_deferred(now_ms, effect);
                }
            }
            Err(reason) => {
                tracing::error!(shard = %self.cfg.shard, %reason, "storage write failed; failing its requests");
                let open = std::mem::take(&mut self.commits.open);
                for effect in batch.deferred.into_iter().chain(open.deferred) {
                    self.fail_deferred(now_ms, effect);
                }
                self.owner_rollback();
            }
        }
        self.drain_local(now_ms);
    }

    fn apply_deferred(&mut self, now_ms: u64, effect: Deferred) {
        match effect {
            Deferred::Reply { conn, frame, .. } => self.send(conn, frame),
            Deferred::ReplyTo { to, frame } => self.reply_to(to, frame),
            Deferred::FriendAnswered { reply, frame, .. } => self.reply_to(reply, frame),
            Deferred::Appended {
                conv,
                id,
                seq,
                ts_ms,
                msg,
                frame_ok,
                sender,
                author,
                fanout,
            } => self.owner_appended(
                conv,
                id,
                (seq, ts_ms),
                msg,
                frame_ok,
                (sender, author),
                fanout,
            ),
            Deferred::Event {
                conv,
                seq,
                ts_ms,
                msg,
                fanout,
                reply,
                unindex,
            } => self.owner_event_done(conv, (seq, ts_ms), msg, fanout, reply, unindex),
            Deferred::Mail { to, mail } => self.mail(to, mail),
            Deferred::Ensured { owner, conv, user } => self.mail(
                owner,
                Mail::MemberEnsured {
                    conv,
                    user,
                    result: Ok(()),
                },
            ),
            Deferred::Opened { conv } => self.owner_opened(conv, None),
            Deferred::LoggedIn {
                conn,
                rid,
                session,
                frame,
            } => {
                // Disabled while this login was being written: the connection was not online
                // yet, so the disable could not close it. Refuse it now (its token never left).
                if self.is_disabled(session.user) {
                    self.refuse_disabled(conn, rid);
                } else {
                    self.activate(now_ms, conn, session, frame);
                }
                self.end_busy(now_ms, conn);
            }
            Deferred::Registered {
                conn, user, frame, ..
            } => {
                self.sessions.registering.remove(&user);
                self.send(conn, frame);
                self.end_busy(now_ms, conn);
            }
            Deferred::LoggedOut { conn, rid } => self.logged_out(conn, rid),
            Deferred::AccountCreated { batch, index, user } => {
                self.sessions.registering.remove(&user);
                self.account_created(batch, index, Ok(()));
            }
        }
    }

    fn fail_deferred(&mut self, now_ms: u64, effect: Deferred) {
        const WHY: &str = "storage write failed; retry";
        match effect {
            Deferred::Reply { conn, rid, .. } | Deferred::LoggedOut { conn, rid } => {
                self.error(conn, Some(rid), ErrorCode::Internal, WHY)
            }
            Deferred::ReplyTo { to, .. } => self.error_to(to, ErrorCode::Internal, WHY),
            Deferred::FriendAnswered { retry, .. } => self.local_mail.push_back(retry),
            Deferred::LoggedIn { conn, rid, .. } => {
                self.error(conn, Some(rid), ErrorCode::Internal, WHY);
                self.end_busy(now_ms, conn);
            }
            Deferred::Registered {
                conn, rid, user, ..
            } => {
                self.sessions.registering.remove(&user);
                self.error(conn, Some(rid), ErrorCode::Internal, WHY);
                self.end_busy(now_ms, conn);
            }
            Deferred::Appended { conv, id, .. } => self.owner_append_failed(conv, id),
            Deferred::Event { reply, .. } => self.owner_event_failed(reply),
            Deferred::Mail {
                to,
                mail: Mail::Indexed { conv, op, .. },
            } => self.mail(
                to,
                Mail::Indexed {
                    conv,
                    op,
                    ok: Vec::new(),
                    missing: Vec::new(),
                },
            ),
            // A mail carrying a client's request: the request fails instead of going unanswered.
            Deferred::Mail { mail, .. } => {
                if let Some(to) = mail.reply() {
                    self.error_to(to, ErrorCode::Internal, WHY);
                }
            }
            Deferred::Ensured { owner, conv, user } => self.mail(
                owner,
                Mail::MemberEnsured {
                    conv,
                    user,
                    result: Err(ErrorCode::Internal),
                },
            ),
            Deferred::Opened { conv } => self.owner_opened(conv, Some(ErrorCode::Internal)),
            Deferred::AccountCreated { batch, index, user } => {
                self.sessions.registering.remove(&user);
                self.account_created(batch, index, Err(ErrorCode::Internal));
            }
        }
    }

    pub(super) fn internal_error(&mut self, conn: ConnId, rid: Option<u64>, err: &StorageError) {
        tracing::error!(shard = %self.cfg.shard, error = %err, "storage read failed");
        self.count_error(ErrorCode::Internal);
        self.send(
            conn,
            error_frame(rid, ErrorCode::Internal, "storage read failed"),
        );
    }
}
