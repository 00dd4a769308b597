//! Requests the owner runs on one conversation besides appends (`ConvOp`): group operations
//! go on to `group.rs`; recall and edit (`amend`), typing notices and receipts are here.

use std::sync::Arc;

use serde_json::json;

use super::event::Event;
use super::owner::send_refusal;
use super::Shard;
use crate::ids::{ConvId, Seq};
use crate::mail::{ConvOp, Mail, Named, ReplyTo};
use crate::protocol::{event_push, ok_frame, ErrorCode};
use crate::storage::{keys, Flags, MessageKind, MessageRecord, Role, Storage};

impl<S: Storage> Shard<S> {
    /// Requests on one conversation other than `Append`: group ops go to `group.rs`.
    pub(super) fn owner_op(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        op: ConvOp,
    ) {
        let op = match op {
            ConvOp::GroupCreate { .. } => return self.group_create(now_ms, reply, conv, actor, op),
            // The server's own entry: its actor is no member.
            ConvOp::Notice { body } => return self.owner_notice(now_ms, reply, conv, actor, body),
            op => op,
        };
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        if !state.exists || !conv.may_have_member(actor.0) {
            let code = if state.exists {
                ErrorCode::NotMember
            } else {
                ErrorCode::NoSuchConversation
            };
            self.forget_if_absent(conv);
            return self.error_to(reply, code, "no such conversation for you");
        }
        match op {
            ConvOp::Recall { seq, device } => {
                self.amend(now_ms, reply, conv, actor, seq, None, device)
            }
            ConvOp::Edit { seq, body, device } => {
                self.amend(now_ms, reply, conv, actor, seq, Some(body), device)
            }
            ConvOp::Typing => self.typing(reply, conv, actor),
            op => self.group_op(now_ms, reply, conv, actor, op),
        }
    }

    /// Recall (`body: None`) or edit message `seq`: a new timeline entry pointing at it, and
    /// the original marked (its body removed on recall, replaced on edit).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn amend(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        seq: Seq,
        body: Option<String>,
        device: String,
    ) {
        let window = self.cfg.edit_window_ms;
        let state = self.owned.convs.get(&conv).expect("loaded by owner_op");
        if let Err(code) = state.may_send(conv, actor.0) {
            return self.error_to(reply, code, send_refusal(code));
        }
        if seq == 0 || seq > state.durable_seq {
            return self.error_to(reply, ErrorCode::NoSuchMessage, "no such message");
        }
        let is_admin = state
            .group
            .as_ref()
            .is_some_and(|g| g.role_of(actor.0).is_some_and(|r| r >= Role::Admin));
        let key = keys::message(conv, seq);
        let mut target = match self
            .get_latest(&key)
            .and_then(|v| v.map(|b| MessageRecord::decode(&key, &b)).transpose())
        {
            Ok(Some(rec)) => rec,
            Ok(None) => return self.error_to(reply, ErrorCode::NoSuchMessage, "no such message"),
            Err(e) => return self.storage_error_to(reply, &e),
        };
        if target.kind != MessageKind::Message || target.flags.contains(Flags::RECALLED) {
            return self.error_to(
                reply,
                ErrorCode::NoSuchMessage,
                "only a message that is not recalled can be recalled or edited",
            );
        }
        let own = target.sender == actor.0 .0;
        let in_window = now_ms.saturating_sub(target.ts_ms) <= window;
        let editing = body.is_some();
        let allowed = match (editing, own) {
            (true, true) | (false, true) => in_window || (!editing && is_admin),
            (false, false) => is_admin,
            (true, false) => false,
        };
        if !allowed {
            return if own {
                self.error_to(
                    reply,
                    ErrorCode::WindowPassed,
                    "the window to change this message has passed",
                )
            } else {
                self.error_to(
                    reply,
                    ErrorCode::Forbidden,
                    "only its sender (or, to recall, a group admin) may change this message",
                )
            };
        }
        let (event_kind, event_body) = match body {
            Some(body) => {
                target.flags.insert(Flags::EDITED);
                target.body = body.clone();
                (MessageKind::Edit, body)
            }
            None => {
                target.flags.insert(Flags::RECALLED);
                target.body = "null".into();
                (MessageKind::Recall, "null".to_owned())
            }
        };
        self.put(key, target.encode());
        let conv_text = conv.to_string();
        self.append_event(
            now_ms,
            conv,
            Event {
                kind: event_kind,
                target: seq,
                actor,
                device,
                body: event_body,
                reply: Some((
                    reply,
                    Box::new(move |event_seq| {
                        ok_frame(
                            reply.rid,
                            &json!({ "conv": conv_text, "seq": event_seq, "target": seq }),
                        )
                    }),
                )),
                also: Vec::new(),
                unindex: Vec::new(),
            },
        );
    }

    /// Typing notice: ephemeral, to every other member's online devices.
    pub(super) fn typing(&mut self, reply: ReplyTo, conv: ConvId, actor: Named) {
        let state = self.owned.convs.get(&conv).expect("loaded by owner_op");
        if let Err(code) = state.may_send(conv, actor.0) {
            return self.error_to(reply, code, send_refusal(code));
        }
        let fanout = self.fanout(conv);
        let frame: Arc<str> = event_push("typing", &conv.to_string(), &actor.1, None).into();
        for (to, recipients) in fanout.iter() {
            let mail = Mail::Ephemeral {
                frame: frame.clone(),
                recipients: recipients.clone(),
                skip_user: Some(actor.0),
            };
            self.mail(*to, mail);
        }
        self.reply_to(reply, ok_frame(reply.rid, &json!({})));
    }
}
