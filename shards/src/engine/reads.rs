//! What the owner of a conversation answers from its timeline and cursors: pages of messages
//! (`sync`, `history`), last seqs and summaries (`convs`), and read cursors — capped at what
//! exists (`ReadUpTo`), moved by a sender's own sends, written once per tick.

use std::sync::Arc;

use super::owner::ConvState;
use super::Shard;
use crate::ids::{ConvId, Seq, UserId};
use crate::limits::PAGE_MAX;
use crate::mail::{ConvSummary, GatherRef, Mail, Page, ReplyTo};
use crate::protocol::{event_push, ErrorCode};
use crate::storage::{keys, MessageRecord, Storage};

impl<S: Storage> Shard<S> {
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
        self.forget_if_absent(conv);
        self.mail(gather.shard, Mail::RangeDone { gather, page });
    }

    pub(super) fn read_page(
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
        if !conv.may_have_member(user) {
            return Err(ErrorCode::NotMember);
        }
        // Seqs at or below `floor` are not this member's to read, nor any past `durable`
        // (for a former member: the entry that removed them).
        let (floor, durable) = match &state.group {
            None => (0, state.durable_seq),
            Some(_) => {
                let durable = state.durable_seq;
                let (floor, last, member) = self.group_readable(conv, user, durable)?;
                // A former member who has the removal entry is a non-member from then on.
                if !member && after.is_some_and(|a| a >= last) {
                    return Err(ErrorCode::NotMember);
                }
                (floor, last)
            }
        };
        let after = after.map(|a| a.max(floor));
        // [lo, hi] inclusive, within what is durable.
        let (lo, hi, more) = match (after, before) {
            (Some(after), _) => {
                let hi = durable.min(after.saturating_add(limit));
                (after + 1, hi, hi < durable)
            }
            (None, before) => {
                let end = before.unwrap_or(Seq::MAX).min(durable + 1);
                let lo = end.saturating_sub(limit).max(floor + 1);
                (lo, end.saturating_sub(1), lo > floor + 1)
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

    pub(super) fn owner_last_seqs(
        &mut self,
        gather: GatherRef,
        user: UserId,
        convs: Vec<(usize, ConvId)>,
    ) {
        let mut seqs = Vec::with_capacity(convs.len());
        for (index, conv) in convs {
            let summary = match self.conv_state(conv) {
                Ok(state) => summarise(conv, state, user),
                Err(_) => ConvSummary {
                    member: true,
                    ..ConvSummary::default()
                },
            };
            seqs.push((index, summary));
            self.forget_if_absent(conv);
        }
        self.mail(gather.shard, Mail::LastSeqsDone { gather, seqs });
    }

    /// `read`, on the owner: caps the cursor at what `user` may have seen (the durable last
    /// seq; for a former group member, the entry that removed them), records the owner's copy
    /// — one-to-one: in the meta record, pushed to the peer's devices as a read receipt;
    /// groups: on the member record for `receipts` — and answers the home shard with the
    /// cursor to store. The copy is current before the reply leaves, so a `receipts` or
    /// `convs` sent after the reply sees it (read-after-write, on any shard).
    pub(super) fn owner_read_up_to(
        &mut self,
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        name: &str,
        seq: Seq,
    ) {
        let (cap, last) = match self.conv_state(conv) {
            Ok(state) if state.exists && conv.may_have_member(user) => {
                let durable = state.durable_seq;
                let cap = if state.group.is_some() {
                    self.group_readable(conv, user, durable)
                        .map(|(_, last, _)| last)
                } else {
                    Ok(durable)
                };
                (cap, durable)
            }
            Ok(_) => (Err(ErrorCode::NotMember), 0),
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let seq = match cap {
            Ok(cap) => self.move_own_read(conv, user, name, seq.min(cap)),
            Err(code) => {
                self.forget_if_absent(conv);
                return self.error_to(reply, code, "you are not in this conversation");
            }
        };
        self.forget_if_absent(conv);
        let mail = Mail::ReadCapped {
            reply,
            conv,
            user,
            seq,
            last,
        };
        self.mail(reply.shard, mail);
    }

    /// Moves the owner's copy of `user`'s cursor to `seq` if that is forward — written now,
    /// and in a one-to-one conversation pushed to the peer as a read receipt — and returns the
    /// cursor (`seq` itself for a former member, who has no copy). The state is loaded.
    pub(super) fn move_own_read(
        &mut self,
        conv: ConvId,
        user: UserId,
        name: &str,
        seq: Seq,
    ) -> Seq {
        let state = self
            .owned
            .convs
            .get_mut(&conv)
            .expect("loaded by the caller");
        if !state.advance_read(conv, user, seq) {
            return state.own_read(conv, user).unwrap_or(seq);
        }
        if let Some((key, bytes)) = state.read_record(conv, user) {
            self.put(key, bytes);
        }
        let peer = conv
            .direct_members()
            .and_then(|m| m.into_iter().find(|&p| p != user));
        if let Some(peer) = peer {
            let frame: Arc<str> = event_push("read", &conv.to_string(), name, Some(seq)).into();
            let mail = Mail::Ephemeral {
                frame,
                recipients: Arc::from([peer]),
                skip_user: None,
            };
            self.mail(self.cfg.placement.home(peer), mail);
        }
        seq
    }

    /// A sender has read their conversation up to their own message: their own messages never
    /// count as unread, and their cursor (the owner's copy, which `convs` and `receipts` read)
    /// moves to it at once. It is written with the next tick's writes (`flush_cursors`): a crash
    /// before then leaves the stored cursor where it was, and a retry of the send moves it
    /// again. No `read` push: the peer's device sees the message itself.
    pub(super) fn sent_is_read(&mut self, conv: ConvId, author: UserId, seq: Seq) {
        let moved = self
            .owned
            .convs
            .get_mut(&conv)
            .is_some_and(|state| state.advance_read(conv, author, seq));
        if moved {
            self.owned.cursors_dirty.insert((conv, author));
        }
    }

    /// Writes the cursors moved by sends since the last tick (the records of conversations
    /// still loaded; a dropped state was reloaded from storage, which a write would not
    /// improve).
    pub(super) fn flush_cursors(&mut self) {
        for (conv, user) in std::mem::take(&mut self.owned.cursors_dirty) {
            let record = self
                .owned
                .convs
                .get(&conv)
                .and_then(|s| s.read_record(conv, user));
            if let Some((key, bytes)) = record {
                self.put(key, bytes);
            }
        }
    }
}

fn summarise(conv: ConvId, state: &ConvState, user: UserId) -> ConvSummary {
    let mut summary = ConvSummary {
        last_seq: state.durable_seq,
        member: conv.may_have_member(user),
        ..ConvSummary::default()
    };
    if let Some(group) = &state.group {
        summary.title = Some(group.meta.name.clone());
        match group.floor(user) {
            Some(floor) => summary.floor = floor,
            None => summary.member = false,
        }
    }
    summary.own_read = state.own_read(conv, user).unwrap_or(0);
    if let Some(peer) = conv
        .direct_members()
        .and_then(|m| m.into_iter().find(|&p| p != user))
    {
        summary.peer_read = state.own_read(conv, peer);
    }
    summary
}
