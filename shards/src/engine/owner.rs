//! Conversations this shard owns. The owner is the single writer of a conversation: it
//! checks membership, deduplicates on the client's message id, assigns the next seq, queues
//! the record for the group commit, and — once durable — acks the sender and fans out one
//! `Deliver` mail per destination shard.
//!
//! A conversation exists once its meta record is durable, which happens only after every
//! member's home shard has durably indexed it (`EnsureMember`, `Index`): no message can be
//! acked in a conversation that some member's conversation list would miss.
//!
//! Recipients of a message are fixed when its seq is assigned, from the membership at that
//! moment: a member removed before a message was assigned never receives it, one removed after
//! receives it (it was theirs to see).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use super::effects::Deferred;
use super::event::{uuid_v7, Event};
use super::fanout::{by_shard, Fanout};
use super::group::Group;
use super::Shard;
use crate::ids::{ConvId, Seq, UserId};
use crate::mail::{Mail, ReplyTo};
use crate::protocol::{message_push, ok_frame, ErrorCode};
use crate::storage::{
    keys, ConvBlocks, ConvMeta, DedupRecord, Flags, MessageKind, MessageRecord, Storage,
    StorageError,
};

#[derive(Default)]
pub(super) struct Owned {
    pub(super) convs: HashMap<ConvId, ConvState>,
    /// Senders' cursors moved by their own sends since the last tick, written once per tick
    /// (a busy conversation costs one write per tick, not one per message).
    pub(super) cursors_dirty: HashSet<(ConvId, UserId)>,
    /// Numbers pending group additions (`Index` → `Indexed`).
    pub(super) next_op: u64,
}

pub(super) struct ConvState {
    /// The meta record is durable: the conversation accepts messages.
    pub(super) exists: bool,
    /// Highest seq assigned (may be in a commit not yet durable).
    pub(super) last_seq: Seq,
    /// Highest seq durable. Everything visible to clients is `<= durable_seq`.
    pub(super) durable_seq: Seq,
    /// Appends assigned a seq but not yet durable, by message id, with every request
    /// waiting for that id (a retry while the original is in flight joins it).
    pending: HashMap<uuid::Uuid, Vec<ReplyTo>>,
    opening: Option<Opening>,
    /// One-to-one: the meta record (read cursors) once it exists.
    direct: Option<ConvMeta>,
    /// One-to-one: where its messages go (fixed for the conversation's life), built once.
    direct_fanout: Option<Fanout>,
    /// One-to-one: who blocks whom, as applied to sends.
    pub(super) blocks: ConvBlocks,
    /// Groups: settings and members, loaded with the state.
    pub(super) group: Option<Box<Group>>,
}

impl ConvState {
    fn empty() -> ConvState {
        ConvState {
            exists: false,
            last_seq: 0,
            durable_seq: 0,
            pending: HashMap::new(),
            opening: None,
            direct: None,
            direct_fanout: None,
            blocks: ConvBlocks::default(),
            group: None,
        }
    }

    /// The owner's copy of `user`'s read cursor: in the meta record one-to-one, on the member
    /// record in a group (`None` for a non-member).
    pub(super) fn own_read(&self, conv: ConvId, user: UserId) -> Option<Seq> {
        match (&self.group, &self.direct, conv.direct_members()) {
            (Some(group), _, _) => group.read_seq(user),
            (None, Some(meta), Some(members)) => {
                let i = members.iter().position(|&m| m == user)?;
                Some(meta.read[i])
            }
            _ => None,
        }
    }

    /// Moves the owner's copy of `user`'s cursor forward to `seq`, in memory; whether it moved.
    pub(super) fn advance_read(&mut self, conv: ConvId, user: UserId, seq: Seq) -> bool {
        match (
            self.group.as_deref_mut(),
            &mut self.direct,
            conv.direct_members(),
        ) {
            (Some(group), _, _) => group.advance_read(user, seq),
            (None, Some(meta), Some(members)) => match members.iter().position(|&m| m == user) {
                Some(i) if meta.read[i] < seq => {
                    meta.read[i] = seq;
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// The record that holds `user`'s cursor, as it is now, to write.
    pub(super) fn read_record(&self, conv: ConvId, user: UserId) -> Option<(Vec<u8>, Vec<u8>)> {
        match (&self.group, &self.direct) {
            (Some(group), _) => group.member_record(conv, user),
            (None, Some(meta)) => Some((keys::conv_meta(conv), meta.encode())),
            _ => None,
        }
    }

    /// The sender `user` may append now, or why not.
    pub(super) fn may_send(&self, conv: ConvId, user: UserId) -> Result<(), ErrorCode> {
        if !self.exists {
            return Err(ErrorCode::NoSuchConversation);
        }
        match (&self.group, conv.direct_members()) {
            (Some(g), _) => g.may_send(user),
            (None, Some(members)) => {
                // The peer's block: member i blocks the other, index by the peer.
                let peer = usize::from(members[0] == user);
                if members[peer] == UserId::SYSTEM {
                    // Operator notices: nobody writes back to the server.
                    Err(ErrorCode::Forbidden)
                } else if self.blocks.blocked[peer] {
                    Err(ErrorCode::Blocked)
                } else {
                    Ok(())
                }
            }
            (None, None) => Ok(()),
        }
    }
}

struct Opening {
    waiters: Vec<(ReplyTo, UserId)>,
    names: [(UserId, String); 2],
    acks_left: u8,
    error: Option<ErrorCode>,
}

impl<S: Storage> Shard<S> {
    /// The state of an owned conversation, loaded from storage on first use.
    pub(super) fn conv_state(&mut self, conv: ConvId) -> Result<&mut ConvState, StorageError> {
        if !self.owned.convs.contains_key(&conv) {
            let meta_key = keys::conv_meta(conv);
            let meta = self.storage.get(&meta_key)?;
            let exists = meta.is_some();
            let (direct, group) = match (conv, meta) {
                (ConvId::Group(_) | ConvId::Channel(_), Some(bytes)) => (
                    None,
                    Some(Box::new(Group::load(&self.storage, conv, &bytes)?)),
                ),
                (ConvId::Direct(..), Some(bytes)) => {
                    (Some(ConvMeta::decode(&meta_key, &bytes)?), None)
                }
                // A live room has no timeline: it is no conversation here (`engine/rooms.rs`).
                (_, None) | (ConvId::Room(_), _) => (None, None),
            };
            let last = self.storage.scan(
                &keys::message(conv, 0),
                &keys::message(conv, Seq::MAX),
                1,
                true,
            )?;
            let last_seq = match last.first() {
                Some((k, v)) => MessageRecord::decode(k, v)?.seq,
                None => 0,
            };
            let blocks = if conv.is_group() {
                ConvBlocks::default()
            } else {
                super::social::load_blocks(&self.storage, conv)?
            };
            let state = ConvState {
                exists,
                last_seq,
                durable_seq: last_seq,
                direct,
                blocks,
                group,
                ..ConvState::empty()
            };
            self.owned.convs.insert(conv, state);
        }
        Ok(self.owned.convs.get_mut(&conv).expect("inserted above"))
    }

    pub(super) fn owner_open(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        requester: UserId,
        names: [(UserId, String); 2],
    ) {
        let _ = now_ms;
        let placement = self.cfg.placement;
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        if state.exists {
            let frame = open_frame(reply.rid, conv, &names, requester);
            return self.reply_to(reply, frame);
        }
        if let Some(opening) = &mut state.opening {
            opening.waiters.push((reply, requester));
            return;
        }
        state.opening = Some(Opening {
            waiters: vec![(reply, requester)],
            names: names.clone(),
            acks_left: 2,
            error: None,
        });
        for (i, (user, _)) in names.iter().enumerate() {
            let (peer, peer_name) = names[1 - i].clone();
            let mail = Mail::EnsureMember {
                conv,
                user: *user,
                peer,
                peer_name,
            };
            self.mail(placement.home(*user), mail);
        }
    }

    pub(super) fn owner_member_ensured(
        &mut self,
        now_ms: u64,
        conv: ConvId,
        _user: UserId,
        result: Result<(), ErrorCode>,
    ) {
        let Some(state) = self.owned.convs.get_mut(&conv) else {
            return;
        };
        let Some(opening) = &mut state.opening else {
            return;
        };
        if let Err(code) = result {
            opening.error.get_or_insert(code);
        }
        opening.acks_left -= 1;
        if opening.acks_left > 0 {
            return;
        }
        if let Some(code) = opening.error {
            return self.owner_opened(conv, Some(code));
        }
        let meta = ConvMeta {
            last_seq: 0,
            created_ms: now_ms,
            read: [0, 0],
        };
        let bytes = meta.encode();
        state.direct = Some(meta);
        self.put(keys::conv_meta(conv), bytes);
        self.defer(Deferred::Opened { conv });
    }

    /// The open finished: durable (`None`) or failed.
    pub(super) fn owner_opened(&mut self, conv: ConvId, error: Option<ErrorCode>) {
        let Some(state) = self.owned.convs.get_mut(&conv) else {
            return;
        };
        let Some(opening) = state.opening.take() else {
            return;
        };
        state.exists = error.is_none();
        for (reply, requester) in opening.waiters {
            match error {
                None => self.reply_to(
                    reply,
                    open_frame(reply.rid, conv, &opening.names, requester),
                ),
                Some(ErrorCode::NoSuchUser) => {
                    self.error_to(reply, ErrorCode::NoSuchUser, "no such user")
                }
                Some(code) => self.error_to(reply, code, "could not open the conversation"),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn owner_append(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        sender: UserId,
        sender_name: String,
        device: String,
        id: uuid::Uuid,
        body: String,
    ) {
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        if !conv.may_have_member(sender) {
            return self.error_to(
                reply,
                ErrorCode::NotMember,
                "you are not in this conversation",
            );
        }
        if let Err(code) = state.may_send(conv, sender) {
            self.forget_if_absent(conv);
            return self.error_to(reply, code, send_refusal(code));
        }
        if let Some(waiters) = state.pending.get_mut(&id) {
            waiters.push(reply);
            self.stats.deduplicated += 1;
            return;
        }
        let dedup_key = keys::dedup(conv, &id);
        match self
            .storage
            .get(&dedup_key)
            .and_then(|v| v.map(|b| DedupRecord::decode(&dedup_key, &b)).transpose())
        {
            Ok(Some(seen)) => {
                self.stats.deduplicated += 1;
                // Again (idempotent): a crash may have lost the cursor move of the original.
                self.sent_is_read(conv, sender, seen.seq);
                return self.reply_to(reply, ack_frame(reply.rid, &id, seen.seq, seen.ts_ms));
            }
            Ok(None) => {}
            Err(e) => return self.storage_error_to(reply, &e),
        }
        let fanout = self.fanout(conv);
        let state = self.owned.convs.get_mut(&conv).expect("loaded above");
        state.last_seq += 1;
        let seq = state.last_seq;
        state.pending.insert(id, vec![reply]);
        let rec = MessageRecord {
            id: *id.as_bytes(),
            seq,
            sender: sender.0,
            sender_name,
            device,
            ts_ms: now_ms,
            body,
            kind: MessageKind::Message,
            target: 0,
            flags: Flags::NONE,
        };
        let msg: Arc<str> = rec.to_json(conv).into();
        self.put_unread(keys::message(conv, seq), rec.encode());
        self.put_unread(dedup_key, DedupRecord { seq, ts_ms: now_ms }.encode());
        self.stats.appended += 1;
        let frame_ok = ack_frame(reply.rid, &id, seq, now_ms);
        self.defer(Deferred::Appended {
            conv,
            id,
            seq,
            ts_ms: now_ms,
            msg,
            frame_ok,
            sender: reply,
            author: sender,
            fanout,
        });
    }

    /// Where a message assigned now goes: both members of a one-to-one conversation, every
    /// member of a group (cached until the membership changes).
    pub(super) fn fanout(&mut self, conv: ConvId) -> Fanout {
        let placement = self.cfg.placement;
        let state = self
            .owned
            .convs
            .get_mut(&conv)
            .expect("a conversation's state is loaded before its fan-out");
        if let Some(members) = conv.direct_members() {
            return state
                .direct_fanout
                .get_or_insert_with(|| by_shard(members.into_iter(), placement))
                .clone();
        }
        state
            .group
            .as_mut()
            .expect("a group has its group state")
            .fanout(placement)
    }

    /// Drops the loaded state of a conversation that does not exist and has nothing under
    /// way, so requests naming made-up ids cost no memory. (What the state holds then is
    /// exactly what loading it again from storage would give.)
    pub(super) fn forget_if_absent(&mut self, conv: ConvId) {
        let absent = self.owned.convs.get(&conv).is_some_and(|s| {
            !s.exists
                && s.last_seq == 0
                && s.opening.is_none()
                && s.group.is_none()
                && s.pending.is_empty()
                && s.blocks == ConvBlocks::default()
        });
        if absent {
            self.owned.convs.remove(&conv);
        }
    }

    /// Marks `seq` durable. Commits complete in order, so seqs do too.
    fn mark_durable(&mut self, conv: ConvId, seq: Seq) -> &mut ConvState {
        let state = self
            .owned
            .convs
            .get_mut(&conv)
            .expect("a conversation with writes in flight stays loaded");
        assert_eq!(
            state.durable_seq + 1,
            seq,
            "seqs become durable in order, without gaps"
        );
        state.durable_seq = seq;
        state
    }

    /// One `Deliver` mail per destination shard, all sharing one push frame; for a channel,
    /// one best-effort `Broadcast` per shard instead (`engine/channels.rs`).
    fn deliver(
        &mut self,
        conv: ConvId,
        (seq, ts_ms): (Seq, u64),
        msg: &str,
        fanout: &Fanout,
        sender: Option<ReplyTo>,
    ) {
        if conv.is_channel() {
            return self.broadcast(conv, ts_ms, msg, sender);
        }
        if fanout.is_empty() {
            return;
        }
        let frame: Arc<str> = message_push(msg).into();
        for (to, recipients) in fanout.iter() {
            let skip = sender.filter(|s| s.shard == *to).map(|s| s.conn);
            self.stats.fanout_mails += 1;
            self.mail(
                *to,
                Mail::Deliver {
                    conv,
                    seq,
                    ts_ms,
                    frame: frame.clone(),
                    recipients: recipients.clone(),
                    skip,
                },
            );
        }
    }

    /// A message became durable: ack every waiting request, then fan out.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn owner_appended(
        &mut self,
        conv: ConvId,
        id: uuid::Uuid,
        (seq, ts_ms): (Seq, u64),
        msg: Arc<str>,
        frame_ok: String,
        (sender, author): (ReplyTo, UserId),
        fanout: Fanout,
    ) {
        let state = self.mark_durable(conv, seq);
        let waiters = state.pending.remove(&id).unwrap_or_default();
        for waiter in waiters {
            // The original request's frame is prebuilt; a retry that joined it needs its own rid.
            let frame = if waiter == sender {
                frame_ok.clone()
            } else {
                retarget(&frame_ok, sender.rid, waiter.rid)
            };
            self.reply_to(waiter, frame);
        }
        self.deliver(conv, (seq, ts_ms), &msg, &fanout, Some(sender));
        self.sent_is_read(conv, author, seq);
    }

    /// Assigns the next seq to an event the owner writes itself and queues it for the commit.
    /// The caller has checked that the conversation exists and the actor may do this.
    pub(super) fn append_event(&mut self, now_ms: u64, conv: ConvId, event: Event) -> Seq {
        let mut fanout = self.fanout(conv);
        if !event.also.is_empty() {
            let placement = self.cfg.placement;
            let extra = fanout
                .iter()
                .flat_map(|(_, users)| users.iter().copied())
                .chain(event.also.iter().copied());
            fanout = by_shard(extra, placement);
        }
        let state = self
            .owned
            .convs
            .get_mut(&conv)
            .expect("loaded by the caller");
        state.last_seq += 1;
        let seq = state.last_seq;
        let id = uuid_v7(now_ms);
        let rec = MessageRecord {
            id: *id.as_bytes(),
            seq,
            sender: event.actor.0 .0,
            sender_name: event.actor.1,
            device: event.device,
            ts_ms: now_ms,
            body: event.body,
            kind: event.kind,
            target: event.target,
            flags: Flags::NONE,
        };
        let msg: Arc<str> = rec.to_json(conv).into();
        self.put_unread(keys::message(conv, seq), rec.encode());
        self.stats.appended += 1;
        let reply = event.reply.map(|(to, build)| (to, build(seq)));
        self.defer(Deferred::Event {
            conv,
            seq,
            ts_ms: now_ms,
            msg,
            fanout,
            reply,
            unindex: event.unindex,
        });
        seq
    }

    /// An owner-written event became durable: answer its request, fan out, clean up lists.
    pub(super) fn owner_event_done(
        &mut self,
        conv: ConvId,
        (seq, ts_ms): (Seq, u64),
        msg: Arc<str>,
        fanout: Fanout,
        reply: Option<(ReplyTo, String)>,
        unindex: Vec<UserId>,
    ) {
        let state = self.mark_durable(conv, seq);
        if state.group.is_some() {
            // A group exists from its first event (its creation) on.
            state.exists = true;
        }
        if let Some((to, frame)) = reply {
            self.reply_to(to, frame);
        }
        self.deliver(conv, (seq, ts_ms), &msg, &fanout, None);
        self.unindex(conv, unindex);
    }

    /// Drops `conv` from the conversation lists of `users`, one mail per home shard, except
    /// for users who are (again) members or being added.
    pub(super) fn unindex(&mut self, conv: ConvId, mut users: Vec<UserId>) {
        // A channel's index entries are subscriptions: a publisher who leaves or is removed
        // stays subscribed until they unsubscribe.
        if users.is_empty() || conv.is_channel() {
            return;
        }
        // The group's state may have been dropped (a failed commit): reload it, so a member
        // (again) never loses their index to a clean-up. If it cannot be read, a stale index
        // is the lesser harm (lists drop entries whose user is no member).
        match self.conv_state(conv) {
            Ok(state) => {
                if let Some(group) = &state.group {
                    users.retain(|u| !group.keeps_index(*u));
                }
            }
            Err(_) => return,
        }
        self.forget_if_absent(conv);
        for (to, users) in by_shard(users.into_iter(), self.cfg.placement).iter() {
            let mail = Mail::Unindex {
                conv,
                users: users.to_vec(),
            };
            self.mail(*to, mail);
        }
    }

    /// An event failed to become durable: its request gets an error.
    pub(super) fn owner_event_failed(&mut self, reply: Option<(ReplyTo, String)>) {
        if let Some((to, _)) = reply {
            self.error_to(to, ErrorCode::Internal, "storage write failed; retry");
        }
    }

    pub(super) fn owner_append_failed(&mut self, conv: ConvId, id: uuid::Uuid) {
        let waiters = self
            .owned
            .convs
            .get_mut(&conv)
            .and_then(|s| s.pending.remove(&id))
            .unwrap_or_default();
        for waiter in waiters {
            self.error_to(
                waiter,
                ErrorCode::Internal,
                "storage write failed; retry with the same id",
            );
        }
    }

    /// After a failed commit: forget seqs that never became durable.
    pub(super) fn owner_rollback(&mut self) {
        // Group settings and membership changed in memory with the failed writes: forget the
        // loaded state so the next use reloads what is durable (answering additions that were
        // waiting for indexes first).
        let groups: Vec<ConvId> = self
            .owned
            .convs
            .iter()
            .filter(|(_, s)| s.group.is_some())
            .map(|(c, _)| *c)
            .collect();
        for conv in &groups {
            self.abort_adds(*conv);
            self.owned.convs.remove(conv);
        }
        for state in self.owned.convs.values_mut() {
            state.last_seq = state.durable_seq;
            state.pending.clear();
        }
    }

    pub(super) fn storage_error_to(&mut self, reply: ReplyTo, err: &StorageError) {
        tracing::error!(shard = %self.cfg.shard, error = %err, "storage read failed");
        self.error_to(reply, ErrorCode::Internal, "storage read failed");
    }
}

fn open_frame(rid: u64, conv: ConvId, names: &[(UserId, String); 2], requester: UserId) -> String {
    let peer = if names[0].0 == requester {
        &names[1].1
    } else {
        &names[0].1
    };
    ok_frame(rid, &json!({ "conv": conv.to_string(), "peer": peer }))
}

/// The one-line reason for a refused send.
pub(super) fn send_refusal(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::NoSuchConversation => "open the conversation first",
        ErrorCode::NotMember => "you are not in this conversation",
        ErrorCode::Muted => "you are muted in this group",
        ErrorCode::GroupDisbanded => "this group was disbanded",
        ErrorCode::Blocked => "this user does not accept your messages",
        _ => "not allowed",
    }
}

fn ack_frame(rid: u64, id: &uuid::Uuid, seq: Seq, ts_ms: u64) -> String {
    ok_frame(
        rid,
        &json!({ "id": id.to_string(), "seq": seq, "ts": ts_ms }),
    )
}

/// The same ack for another request id. Only used for retries that joined an in-flight append.
fn retarget(frame: &str, from_rid: u64, to_rid: u64) -> String {
    let prefix = format!("{{\"rid\":{from_rid},");
    match frame.strip_prefix(&prefix) {
        Some(rest) => format!("{{\"rid\":{to_rid},{rest}"),
        None => frame.to_owned(),
    }
}
