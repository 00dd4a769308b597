//! Conversations this shard owns. The owner is the single writer of a conversation: it
//! checks membership, deduplicates on the client's message id, assigns the next seq, queues
//! the record for the group commit, and — once durable — acks the sender and fans out one
//! `Deliver` mail per destination shard.
//!
//! A conversation exists once its meta record is durable, which happens only after every
//! member's home shard has durably indexed it (`EnsureMember`): no message can be acked in a
//! conversation that some member's conversation list would miss.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::commit::Deferred;
use super::Shard;
use crate::ids::{ConvId, Seq, ShardId, UserId};
use crate::limits::PAGE_MAX;
use crate::mail::{GatherRef, Mail, Page, ReplyTo};
use crate::protocol::{ok_frame, ErrorCode};
use crate::storage::{keys, ConvMeta, DedupRecord, MessageRecord, Storage, StorageError};

#[derive(Default)]
pub(super) struct Owned {
    convs: HashMap<ConvId, ConvState>,
}

struct ConvState {
    /// The meta record is durable: the conversation accepts messages.
    exists: bool,
    /// Highest seq assigned (may be in a commit not yet durable).
    last_seq: Seq,
    /// Highest seq durable. Everything visible to clients is `<= durable_seq`.
    durable_seq: Seq,
    /// Appends assigned a seq but not yet durable, by message id, with every request
    /// waiting for that id (a retry while the original is in flight joins it).
    pending: HashMap<uuid::Uuid, Vec<ReplyTo>>,
    opening: Option<Opening>,
}

struct Opening {
    waiters: Vec<(ReplyTo, UserId)>,
    names: [(UserId, String); 2],
    acks_left: u8,
    error: Option<ErrorCode>,
}

impl<S: Storage> Shard<S> {
    /// The state of an owned conversation, loaded from storage on first use.
    fn conv_state(&mut self, conv: ConvId) -> Result<&mut ConvState, StorageError> {
        if !self.owned.convs.contains_key(&conv) {
            let exists = self.storage.get(&keys::conv_meta(conv))?.is_some();
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
            let state = ConvState {
                exists,
                last_seq,
                durable_seq: last_seq,
                pending: HashMap::new(),
                opening: None,
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
        let shards = self.cfg.shards;
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
            self.mail(user.slot().shard(shards), mail);
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
        self.put(
            keys::conv_meta(conv),
            ConvMeta {
                last_seq: 0,
                created_ms: now_ms,
            }
            .encode(),
        );
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
        if !state.exists {
            return self.error_to(
                reply,
                ErrorCode::NoSuchConversation,
                "open the conversation first",
            );
        }
        if !conv.has_member(sender) {
            return self.error_to(
                reply,
                ErrorCode::NotMember,
                "you are not in this conversation",
            );
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
                return self.reply_to(reply, ack_frame(reply.rid, &id, seen.seq, seen.ts_ms));
            }
            Ok(None) => {}
            Err(e) => return self.storage_error_to(reply, &e),
        }
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
            msg,
            frame_ok,
            sender: reply,
        });
    }

    /// A message became durable: ack every waiting request, then fan out.
    pub(super) fn owner_appended(
        &mut self,
        conv: ConvId,
        id: uuid::Uuid,
        seq: Seq,
        msg: Arc<str>,
        frame_ok: String,
        sender: ReplyTo,
    ) {
        let shards = self.cfg.shards;
        let state = self
            .owned
            .convs
            .get_mut(&conv)
            .expect("an appended conversation stays loaded");
        assert_eq!(
            state.durable_seq + 1,
            seq,
            "seqs become durable in order, without gaps"
        );
        state.durable_seq = seq;
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
        let mut by_shard: Vec<(ShardId, Vec<UserId>)> = Vec::with_capacity(2);
        for user in conv.members() {
            let home = user.slot().shard(shards);
            match by_shard.iter_mut().find(|(s, _)| *s == home) {
                Some((_, users)) => {
                    if !users.contains(&user) {
                        users.push(user)
                    }
                }
                None => by_shard.push((home, vec![user])),
            }
        }
        for (to, recipients) in by_shard {
            let skip = (to == sender.shard).then_some(sender.conn);
            self.mail(
                to,
                Mail::Deliver {
                    conv,
                    seq,
                    msg: msg.clone(),
                    recipients,
                    skip,
                },
            );
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
        for state in self.owned.convs.values_mut() {
            state.last_seq = state.durable_seq;
            state.pending.clear();
        }
    }

    pub(super) fn owner_range(
        &mut self,
        gather: GatherRef,
        user: UserId,
        conv: ConvId,
        (after, before): (Option<Seq>, Option<Seq>),
        limit: usize,
        bytes_max: usize,
    ) {
        let page = self.read_page(user, conv, after, before, limit, bytes_max);
        self.mail(gather.shard, Mail::RangeDone { gather, page });
    }

    fn read_page(
        &mut self,
        user: UserId,
        conv: ConvId,
        after: Option<Seq>,
        before: Option<Seq>,
        limit: usize,
        bytes_max: usize,
    ) -> Page {
        let limit = limit.clamp(1, PAGE_MAX) as u64;
        let state = self.conv_state(conv).map_err(|_| ErrorCode::Internal)?;
        if !state.exists {
            return Err(ErrorCode::NoSuchConversation);
        }
        if !conv.has_member(user) {
            return Err(ErrorCode::NotMember);
        }
        let durable = state.durable_seq;
        // [lo, hi] inclusive, within what is durable.
        let (lo, hi, more) = match (after, before) {
            (Some(after), _) => {
                let hi = durable.min(after.saturating_add(limit));
                (after + 1, hi, hi < durable)
            }
            (None, before) => {
                let end = before.unwrap_or(Seq::MAX).min(durable + 1);
                let lo = end.saturating_sub(limit).max(1);
                (lo, end.saturating_sub(1), lo > 1)
            }
        };
        if lo > hi {
            return Ok((Vec::new(), false));
        }
        let rows = self
            .storage
            .scan(
                &keys::message(conv, lo),
                &keys::message(conv, hi + 1),
                limit as usize,
                false,
            )
            .map_err(|_| ErrorCode::Internal)?;
        debug_assert_eq!(
            rows.len() as u64,
            hi - lo + 1,
            "durable seqs are contiguous in storage"
        );
        // Keep the messages nearest the cursor within the byte budget (always one): the first
        // ones going forward, the last ones going backward.
        let forward = after.is_some();
        let mut msgs = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        let mut truncated = false;
        let ordered: Box<dyn Iterator<Item = _>> = if forward {
            Box::new(rows.into_iter())
        } else {
            Box::new(rows.into_iter().rev())
        };
        for (k, v) in ordered {
            let json = MessageRecord::decode(&k, &v)
                .map_err(|_| ErrorCode::Internal)?
                .to_json(conv);
            if !msgs.is_empty() && bytes + json.len() > bytes_max {
                truncated = true;
                break;
            }
            bytes += json.len();
            msgs.push(json);
        }
        if !forward {
            msgs.reverse();
        }
        Ok((msgs, more || truncated))
    }

    pub(super) fn owner_last_seqs(&mut self, gather: GatherRef, convs: Vec<(usize, ConvId)>) {
        let mut seqs = Vec::with_capacity(convs.len());
        for (index, conv) in convs {
            let seq = self.conv_state(conv).map(|s| s.durable_seq).unwrap_or(0);
            seqs.push((index, seq));
        }
        self.mail(gather.shard, Mail::LastSeqsDone { gather, seqs });
    }

    fn storage_error_to(&mut self, reply: ReplyTo, err: &StorageError) {
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
