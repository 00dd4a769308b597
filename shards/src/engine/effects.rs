//! What runs once a batch is durable — or fails with it. Every request's post-commit step is
//! one [`Deferred`] variant: on success `apply` carries it out (acks, fan-out, replies,
//! sessions going live), on failure `fail` answers the request with an error instead, so every
//! request is answered either way. The batch mechanics (`commit.rs`) never see these.

use std::sync::Arc;

use super::fanout::Fanout;
use super::session::Session;
use super::Shard;
use crate::ids::{ConnId, ConvId, Seq, ShardId, UserId};
use crate::mail::{Mail, ReplyTo};
use crate::protocol::ErrorCode;
use crate::storage::Storage;

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

impl<S: Storage> Shard<S> {
    pub(super) fn defer(&mut self, effect: Deferred) {
        self.commits.defer(effect);
    }

    /// Sends `frame` to the requester once the open batch is durable, wherever it lives; if
    /// the batch fails, the requester gets `internal` instead (every request is answered).
    pub(super) fn reply_when_durable(&mut self, to: ReplyTo, frame: String) {
        self.defer(Deferred::ReplyTo { to, frame });
    }

    /// On failure every waiting effect — of this batch and of the open one, which was built on
    /// top of it — answers with an error, and the owned conversations roll back to their
    /// durable seqs, so no seq is skipped.
    pub(super) fn commit_done(&mut self, now_ms: u64, id: u64, result: Result<(), String>) {
        let batch = self.commits.finish(id);
        match result {
            Ok(()) => {
                for effect in batch.deferred {
                    self.apply_deferred(now_ms, effect);
                }
            }
            Err(reason) => {
                tracing::error!(shard = %self.cfg.shard, %reason, "storage write failed; failing its requests");
                let open = self.commits.abandon_open();
                for effect in batch.deferred.into_iter().chain(open) {
                    self.fail_deferred(now_ms, effect);
                }
                self.owner_rollback();
            }
        }
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
}
