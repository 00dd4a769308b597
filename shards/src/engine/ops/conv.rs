//! The member's side of conversations: `open`, `send`, `read`, and the ops on one
//! conversation that its owner runs (`recall`, `edit`, `receipts`, `typing`); plus the home
//! side of the two-step ones (`open` indexes the conversation on each member's home shard
//! first; `read` is capped by the owner, then stored here).

use serde_json::json;

use super::super::effects::Deferred;
use super::super::event::uuid_v7;
use super::super::Shard;
use super::{bad, conv_arg, Asker, Outcome};
use crate::auth;
use crate::ids::{ConvId, Seq, UserId};
use crate::limits::TYPING_INTERVAL_MS;
use crate::mail::{ConvOp, Mail, ReplyTo};
use crate::protocol::{self as p, ok_frame, ErrorCode};
use crate::storage::{keys, Storage, UserConv};

impl<S: Storage> Shard<S> {
    pub(in crate::engine) fn open(&mut self, by: Asker, req: p::Open) -> Outcome {
        let s = by.session;
        let peer_name = auth::normalise_username(&req.user)
            .map_err(|_| (ErrorCode::NoSuchUser, "no such user".to_owned()))?;
        if peer_name == s.name {
            return Err(bad("a conversation needs another user".into()));
        }
        let peer = UserId::from_username(&peer_name);
        let conv = ConvId::direct(s.user, peer);
        let mail = Mail::Open {
            reply: by.reply_to(self.cfg.shard),
            conv,
            requester: s.user,
            names: [(s.user, s.name.clone()), (peer, peer_name)],
        };
        self.mail(self.cfg.placement.owner(conv), mail);
        Ok(())
    }

    pub(in crate::engine) fn send_message(
        &mut self,
        now_ms: u64,
        by: Asker,
        req: p::Send,
    ) -> Outcome {
        let s = by.session;
        let conv = conv_arg(&req.conv)?;
        if conv.is_room() {
            return self.room_post(now_ms, by, conv, req);
        }
        if !conv.may_have_member(s.user) {
            return Err((
                ErrorCode::NotMember,
                "you are not in this conversation".into(),
            ));
        }
        let body = req.body.get();
        p::check_body(body, self.cfg.body_bytes_max)?;
        let mail = Mail::Append {
            reply: by.reply_to(self.cfg.shard),
            conv,
            sender: s.user,
            sender_name: s.name.clone(),
            device: s.device.clone(),
            id: req.id.unwrap_or_else(|| uuid_v7(now_ms)),
            body: body.to_owned(),
        };
        self.mail(self.cfg.placement.owner(conv), mail);
        Ok(())
    }

    /// `read`: the owner caps the cursor first (`ReadUpTo`), so a cursor never passes what
    /// exists and the owner's copy (receipts, the peer's ticks) is current before the reply;
    /// the home shard then stores it (`home_read_capped`) and answers once durable.
    pub(in crate::engine) fn read(&mut self, by: Asker, req: p::Read) -> Outcome {
        let s = by.session;
        let conv = conv_arg(&req.conv)?;
        match self.get_latest(&keys::user_conv(s.user, conv)) {
            Ok(Some(_)) => {
                let mail = Mail::ReadUpTo {
                    reply: by.reply_to(self.cfg.shard),
                    conv,
                    user: s.user,
                    user_name: s.name.clone(),
                    seq: req.seq,
                };
                self.mail(self.cfg.placement.owner(conv), mail);
                Ok(())
            }
            Ok(None) => Err((ErrorCode::NoSuchConversation, "no such conversation".into())),
            Err(e) => {
                self.internal_error(by.conn, Some(by.rid), &e);
                Ok(())
            }
        }
    }

    /// The owner's answer to `read`: store the cursor (it never moves back) and reply. A
    /// stored cursor past the conversation's last seq (`last` only grows) is one written
    /// before reads were capped: it is replaced, so its later messages count as unread again.
    pub(in crate::engine) fn home_read_capped(
        &mut self,
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        (seq, last): (Seq, Seq),
    ) {
        let key = keys::user_conv(user, conv);
        match self
            .get_latest(&key)
            .and_then(|v| v.map(|b| UserConv::decode(&key, &b)).transpose())
        {
            Ok(Some(mut entry)) => {
                entry.read_seq = if entry.read_seq > last {
                    seq
                } else {
                    entry.read_seq.max(seq)
                };
                let frame = ok_frame(
                    reply.rid,
                    &json!({ "conv": conv.to_string(), "read_seq": entry.read_seq }),
                );
                self.put(key, entry.encode());
                self.defer(Deferred::Reply {
                    conn: reply.conn,
                    rid: reply.rid,
                    frame,
                });
            }
            // Removed from the group while the request travelled.
            Ok(None) => self.error_to(
                reply,
                ErrorCode::NotMember,
                "you are not in this conversation",
            ),
            Err(e) => self.storage_error_to(reply, &e),
        }
    }

    /// On a member's home shard: index a new conversation for `user` before the owner lets
    /// anyone send to it, so a conversation list never misses a conversation with messages.
    pub(in crate::engine) fn home_ensure_member(
        &mut self,
        conv: ConvId,
        user: UserId,
        peer: UserId,
        peer_name: String,
    ) {
        let owner = self.cfg.placement.owner(conv);
        let result = match self.get_latest(&keys::user(user)) {
            // The server's side of a notice conversation: it lists nothing.
            _ if user == UserId::SYSTEM => Ok(()),
            Ok(None) => Err(ErrorCode::NoSuchUser),
            Ok(Some(_)) => match self.get_latest(&keys::user_conv(user, conv)) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => {
                    let entry = UserConv {
                        peer: peer.0,
                        peer_name,
                        read_seq: 0,
                    };
                    self.put(keys::user_conv(user, conv), entry.encode());
                    return self.defer(Deferred::Ensured { owner, conv, user });
                }
                Err(_) => Err(ErrorCode::Internal),
            },
            Err(_) => Err(ErrorCode::Internal),
        };
        self.mail(owner, Mail::MemberEnsured { conv, user, result });
    }

    pub(in crate::engine) fn recall(&mut self, by: Asker, req: p::Amend) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        let op = ConvOp::Recall {
            seq: req.seq,
            device: by.session.device.clone(),
        };
        self.mail_owner(by, conv, op)
    }

    pub(in crate::engine) fn edit(&mut self, by: Asker, req: p::Amend) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        let Some(body) = req.body else {
            return Err(bad("edit needs a body".into()));
        };
        p::check_body(body.get(), self.cfg.body_bytes_max)?;
        let op = ConvOp::Edit {
            seq: req.seq,
            body: body.get().to_owned(),
            device: by.session.device.clone(),
        };
        self.mail_owner(by, conv, op)
    }

    pub(in crate::engine) fn receipts(&mut self, by: Asker, req: p::Receipts) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        self.mail_owner(by, conv, ConvOp::Receipts { seq: req.seq })
    }

    /// At most one notice per connection per `TYPING_INTERVAL_MS` goes out; the owner fans it
    /// out to the other members, never stored.
    pub(in crate::engine) fn typing_notice(
        &mut self,
        now_ms: u64,
        by: Asker,
        req: p::ConvOnly,
    ) -> Outcome {
        let c = self.sessions.conns.get_mut(&by.conn).expect("frame's conn");
        if c.last_typing_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < TYPING_INTERVAL_MS)
        {
            return Err((
                ErrorCode::RateLimited,
                format!("one typing notice per {TYPING_INTERVAL_MS} ms"),
            ));
        }
        c.last_typing_ms = Some(now_ms);
        let conv = conv_arg(&req.conv)?;
        self.mail_owner(by, conv, ConvOp::Typing)
    }
}
