//! Friends and requests, and blocks, on each user's home shard (presence, profiles and
//! devices are in `presence.rs`).
//!
//! Each user's side of a relation lives on that user's home shard and is written only there.
//! A friend operation runs on the *target's* side first (`FriendAsk`): that is where a block
//! or a crossing request is decided. The requester's side follows on the answer
//! (`FriendAnswer`), and the requester is answered once both are durable.
//!
//! Blocks stop one-to-one sends where sends are decided, at the conversation's owner: the
//! blocker's home writes the block, then (once durable) tells the owner (`SetBlock`), which
//! writes its copy and only then answers the client. So when `block` returns, every later
//! send from the blocked user is refused: the delay to apply is the request itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use super::effects::Deferred;
use super::Shard;
use crate::ids::{ConnId, ConvId, ShardId, UserId};
use crate::limits::FRIENDS_MAX;
use crate::mail::{FriendOp, Mail, Named, ReplyTo};
use crate::protocol::{ok_frame, push_json_str, ErrorCode};
use crate::storage::{
    keys, scan_records, BlockRecord, ConvBlocks, FriendRecord, FriendState, SocialMeta, Storage,
    StorageError,
};

/// Blocks (and unblocks) recorded on the blocker's home whose copy at the conversation's
/// owner — the one that refuses sends — is not yet confirmed. Each is also a `BLOCK_SYNC`
/// key, so a crash or a lost node between the two writes cannot leave the block shown to its
/// user but not enforced: the pair is sent again at start and when a link is back, until the
/// owner confirms (`Mail::BlockSynced`).
#[derive(Default)]
pub(super) struct BlockSyncs(HashSet<(UserId, UserId)>);

/// Two friend operations on one pair can cross, each deciding the other user's side first:
/// - both ask at once: each side first records the other's request (`incoming`), or already
///   the friendship, then its own answer arrives — both asked, so both are friends;
/// - B declines A's request before A's side has recorded it (`requested`): the decline finds
///   nothing to undo on A's side, and A's request, still on its way back, must not record it
///   afterwards. The requester's home counts its requests in flight; a decline arriving while
///   one is marks it, and that request then records nothing.
///
/// In memory only. A crash (or a node lost) between the two sides leaves the relation on the
/// first side only, and the requester gets `unavailable` or no answer; retrying the same
/// operation completes it (every operation is idempotent on a side already applied: a request
/// re-asks, an accept of an existing friendship answers `friends`, a decline/cancel/remove
/// finds nothing to undo), and so does the other user's next operation on the pair (an accept
/// of a request the asker's side lost stands). Other crossings (a decline racing a new
/// request) can still disagree: see docs/protocol.md, Friends.
#[derive(Default)]
pub(super) struct FriendRaces {
    /// (requester, other) → requests sent, second side not yet written.
    pending: HashMap<(UserId, UserId), u32>,
    /// (requester, decliner): declined while a request was pending.
    declined: HashSet<(UserId, UserId)>,
}

impl<S: Storage> Shard<S> {
    // ---- friends ----

    pub(super) fn friend_record(
        &self,
        user: UserId,
        other: UserId,
    ) -> Result<Option<FriendRecord>, StorageError> {
        let key = keys::user_pair(keys::FRIEND, user, other);
        self.get_latest(&key)?
            .map(|b| FriendRecord::decode(&key, &b))
            .transpose()
    }

    pub(super) fn social_meta(&self, user: UserId) -> Result<SocialMeta, StorageError> {
        let key = keys::social_meta(user);
        Ok(self
            .get_latest(&key)?
            .map(|b| SocialMeta::decode(&key, &b))
            .transpose()?
            .unwrap_or_default())
    }

    pub(super) fn blocks(&self, user: UserId, other: UserId) -> Result<bool, StorageError> {
        Ok(self
            .get_latest(&keys::user_pair(keys::BLOCK, user, other))?
            .is_some())
    }

    /// Writes `user`'s record about `other` (`state` 0 deletes it), moves the friend list
    /// version, and tells `user`'s devices. Returns the new version.
    pub(super) fn set_friend(
        &mut self,
        now_ms: u64,
        user: UserId,
        other: &Named,
        state: FriendState,
        message: &str,
    ) -> Result<u64, StorageError> {
        let key = keys::user_pair(keys::FRIEND, user, other.0);
        if state == FriendState::None {
            self.delete(key);
        } else {
            let rec = FriendRecord {
                name: other.1.clone(),
                state,
                message: message.to_owned(),
                ts_ms: now_ms,
                profile_version: 0,
            };
            self.put(key, rec.encode());
        }
        let mut meta = self.social_meta(user)?;
        meta.friends_version += 1;
        let version = meta.friends_version;
        self.put(keys::social_meta(user), meta.encode());
        let mut frame = String::from("{\"push\":\"friend\",\"user\":");
        push_json_str(&mut frame, &other.1);
        frame.push_str(&format!(
            ",\"state\":\"{}\",\"version\":{version}",
            state.name()
        ));
        if state == FriendState::Incoming {
            frame.push_str(",\"message\":");
            push_json_str(&mut frame, message);
        }
        frame.push('}');
        let frame: Arc<str> = frame.into();
        self.home_ephemeral(&frame, &[user], None);
        if state == FriendState::Friends {
            // A new friend learns this user's presence now (later changes follow by push).
            self.push_presence(user, &[other.0])?;
        }
        Ok(version)
    }

    /// `friend_*` on the requester's home shard: check this side, then ask the other side.
    pub(super) fn friend_request(
        &mut self,
        reply: ReplyTo,
        from: Named,
        to: Named,
        op: FriendOp,
    ) -> Result<(), (ErrorCode, String)> {
        if from.0 == to.0 {
            return Err((ErrorCode::BadRequest, "that is you".into()));
        }
        let mine = self
            .friend_record(from.0, to.0)
            .map_err(|_| (ErrorCode::Internal, "storage read failed".to_owned()))?
            .map_or(FriendState::None, |r| r.state);
        let need = match &op {
            FriendOp::Request { .. } => None,
            FriendOp::Accept | FriendOp::Decline => Some(FriendState::Incoming),
            FriendOp::Cancel => Some(FriendState::Requested),
            FriendOp::Remove => Some(FriendState::Friends),
        };
        if need.is_some_and(|n| n != mine) {
            return Err((
                ErrorCode::NoSuchRequest,
                "no such request or friendship".into(),
            ));
        }
        if let FriendOp::Request { .. } = op {
            let count = self
                .storage
                .scan(
                    &keys::user_prefix(keys::FRIEND, from.0),
                    &keys::prefix_end(&keys::user_prefix(keys::FRIEND, from.0)),
                    FRIENDS_MAX,
                    false,
                )
                .map_err(|_| (ErrorCode::Internal, "storage read failed".to_owned()))?
                .len();
            if mine == FriendState::None && count >= FRIENDS_MAX {
                return Err((
                    ErrorCode::BadRequest,
                    format!("at most {FRIENDS_MAX} friends and requests"),
                ));
            }
        }
        if let FriendOp::Request { .. } = op {
            *self.friend_races.pending.entry((from.0, to.0)).or_insert(0) += 1;
        }
        let home = self.home_of(to.0);
        self.mail(
            home,
            Mail::FriendAsk {
                reply,
                from,
                to,
                op,
            },
        );
        Ok(())
    }

    /// The target's side of a friend operation.
    pub(super) fn friend_ask(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        from: Named,
        to: Named,
        op: FriendOp,
    ) {
        let result = self.friend_target_side(now_ms, &from, &to, &op);
        let mail = Mail::FriendAnswer {
            reply,
            from: from.clone(),
            to,
            op,
            result: result.map_err(|e| e.unwrap_or(ErrorCode::Internal)),
        };
        let home = self.home_of(from.0);
        // The answer leaves once this side is durable (or at once, if nothing was written).
        self.defer(Deferred::Mail { to: home, mail });
    }

    /// `Err(None)`: a storage failure.
    fn friend_target_side(
        &mut self,
        now_ms: u64,
        from: &Named,
        to: &Named,
        op: &FriendOp,
    ) -> Result<FriendState, Option<ErrorCode>> {
        match self.get_latest(&keys::user(to.0)) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(Some(ErrorCode::NoSuchUser)),
            Err(_) => return Err(None),
        }
        let theirs = self
            .friend_record(to.0, from.0)
            .map_err(|_| None)?
            .map_or(FriendState::None, |r| r.state);
        let new = match op {
            FriendOp::Request { message } => {
                if self.blocks(to.0, from.0).map_err(|_| None)? {
                    return Err(Some(ErrorCode::Blocked));
                }
                match theirs {
                    FriendState::Friends => return Ok(FriendState::Friends),
                    // Both asked: that is a friendship.
                    FriendState::Requested => FriendState::Friends,
                    _ => {
                        self.set_friend(now_ms, to.0, from, FriendState::Incoming, message)
                            .map_err(|_| None)?;
                        return Ok(FriendState::Incoming);
                    }
                }
            }
            FriendOp::Accept if theirs == FriendState::Requested => FriendState::Friends,
            // A retried accept whose first try was applied here (its answer lost with a node
            // or a crash): the same answer again, so the retry completes the other side.
            FriendOp::Accept if theirs == FriendState::Friends => return Ok(FriendState::Friends),
            // The accepter's side holds this user's request (checked on its home), but this
            // side never recorded it: the request's answer was lost (a crash or a node lost
            // between its two sides), or is still on its way, and will then find the
            // friendship and keep it. The request happened, so the accept stands.
            FriendOp::Accept if theirs == FriendState::None => FriendState::Friends,
            FriendOp::Accept => return Err(Some(ErrorCode::NoSuchRequest)),
            FriendOp::Decline | FriendOp::Cancel | FriendOp::Remove
                if theirs == FriendState::None =>
            {
                // A decline of a request whose second side (here) is still on its way.
                let key = (to.0, from.0);
                if matches!(op, FriendOp::Decline)
                    && self.friend_races.pending.get(&key).is_some_and(|&n| n > 0)
                {
                    self.friend_races.declined.insert(key);
                }
                return Ok(FriendState::None);
            }
            FriendOp::Decline | FriendOp::Cancel | FriendOp::Remove => FriendState::None,
        };
        self.set_friend(now_ms, to.0, from, new, "")
            .map_err(|_| None)?;
        Ok(new)
    }

    /// Back on the requester's home shard: apply this side, answer once durable.
    pub(super) fn friend_answer(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        from: Named,
        to: Named,
        op: FriendOp,
        result: Result<FriendState, ErrorCode>,
    ) {
        let mut declined = false;
        if let FriendOp::Request { .. } = op {
            let key = (from.0, to.0);
            if let Some(n) = self.friend_races.pending.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.friend_races.pending.remove(&key);
                }
            }
            declined = self.friend_races.declined.remove(&key);
        }
        let theirs = match result {
            Ok(state) => state,
            Err(code) => {
                let message = match code {
                    ErrorCode::Blocked => "this user does not accept your requests",
                    ErrorCode::NoSuchUser => "no such user",
                    ErrorCode::NoSuchRequest => "no such request or friendship",
                    _ => "could not change the friendship; retry",
                };
                return self.error_to(reply, code, message);
            }
        };
        // What this side holds now: the other user may have asked meanwhile (see FriendRaces).
        let mine_now = match self.friend_record(from.0, to.0) {
            Ok(record) => record.map_or(FriendState::None, |r| r.state),
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let (mine, message) = match (&op, theirs) {
            (_, FriendState::Friends) => (FriendState::Friends, ""),
            (FriendOp::Request { .. }, FriendState::Incoming) if declined => {
                (FriendState::None, "")
            }
            // They asked meanwhile, or their request already made us friends: never downgrade.
            (FriendOp::Request { .. }, FriendState::Incoming)
                if mine_now == FriendState::Incoming || mine_now == FriendState::Friends =>
            {
                (FriendState::Friends, "")
            }
            (FriendOp::Request { message }, FriendState::Incoming) => {
                (FriendState::Requested, message.as_str())
            }
            _ => (FriendState::None, ""),
        };
        match self.set_friend(now_ms, from.0, &to, mine, message) {
            Ok(version) => {
                let frame = ok_frame(
                    reply.rid,
                    &json!({ "user": to.1, "state": mine.name(), "version": version }),
                );
                // The other side is durable already: should this side's write fail, it is
                // applied again (the same answer) rather than answered `internal`, which would
                // leave the relation recorded on one side only.
                // The retry carries this decision (not the original answer), so it writes the
                // same state even though the race bookkeeping above is spent.
                let decided = match mine {
                    FriendState::Requested => FriendState::Incoming,
                    state => state,
                };
                let retry = Mail::FriendAnswer {
                    reply,
                    from,
                    to,
                    op,
                    result: Ok(decided),
                };
                self.defer(Deferred::FriendAnswered {
                    reply,
                    frame,
                    retry,
                });
            }
            Err(e) => self.storage_error_to(reply, &e),
        }
    }

    /// `friends`: the list (requests included) with its version, or `not_modified`.
    pub(super) fn friends_list(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
        version: Option<u64>,
    ) -> Result<(), StorageError> {
        let meta = self.social_meta(user)?;
        if version == Some(meta.friends_version) {
            let frame = ok_frame(
                rid,
                &json!({ "not_modified": true, "version": meta.friends_version }),
            );
            self.send(conn, frame);
            return Ok(());
        }
        let rows: Vec<(_, FriendRecord)> = scan_records(
            &self.storage,
            &keys::user_prefix(keys::FRIEND, user),
            FRIENDS_MAX,
        )?;
        let mut list = Vec::with_capacity(rows.len());
        for (_, rec) in rows {
            let mut entry = json!({
                "user": rec.name,
                "state": rec.state.name(),
                "ts": rec.ts_ms,
                "profile_version": rec.profile_version,
            });
            if rec.state == FriendState::Incoming {
                entry["message"] = json!(rec.message);
            }
            list.push(entry);
        }
        let frame = ok_frame(
            rid,
            &json!({ "friends": list, "version": meta.friends_version }),
        );
        self.send(conn, frame);
        Ok(())
    }

    // ---- blocks ----

    /// `block`/`unblock` on the blocker's home shard: the record here, then the owner's copy.
    pub(super) fn set_block(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        blocker: UserId,
        other: Named,
        blocked: bool,
    ) -> Result<(), (ErrorCode, String)> {
        if blocker == other.0 {
            return Err((ErrorCode::BadRequest, "that is you".into()));
        }
        let key = keys::user_pair(keys::BLOCK, blocker, other.0);
        if blocked {
            let rec = BlockRecord {
                name: other.1,
                ts_ms: now_ms,
            };
            self.put(key, rec.encode());
        } else {
            self.delete(key);
        }
        // Durable with the record: until the owner confirms its copy, this pair is resent.
        self.put(
            keys::user_pair(keys::BLOCK_SYNC, blocker, other.0),
            Vec::new(),
        );
        self.block_syncs.0.insert((blocker, other.0));
        let conv = ConvId::direct(blocker, other.0);
        let mail = Mail::SetBlock {
            reply: Some(reply),
            conv,
            blocker,
            blocked,
        };
        let owner = self.cfg.placement.owner(conv);
        self.defer(Deferred::Mail { to: owner, mail });
        Ok(())
    }

    /// The owner's copy of a block, consulted by every one-to-one append.
    pub(super) fn owner_set_block(
        &mut self,
        reply: Option<ReplyTo>,
        conv: ConvId,
        blocker: UserId,
        blocked: bool,
    ) {
        let Some(members) = conv.direct_members() else {
            return;
        };
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => {
                // Unconfirmed, so the blocker's home sends it again after its next restart
                // or link reset; the client (if any) learns the write failed.
                if let Some(reply) = reply {
                    self.storage_error_to(reply, &e);
                }
                return;
            }
        };
        let i = usize::from(members[1] == blocker);
        state.blocks.blocked[i] = blocked;
        let bytes = state.blocks.encode();
        self.put(keys::conv_blocks(conv), bytes);
        if let Some(reply) = reply {
            let frame = ok_frame(reply.rid, &json!({ "blocked": blocked }));
            self.reply_when_durable(reply, frame);
        }
        let mail = Mail::BlockSynced {
            conv,
            blocker,
            blocked,
        };
        let home = self.home_of(blocker);
        self.defer(Deferred::Mail { to: home, mail });
    }

    /// The owner's copy is durable with `blocked`: done, unless the blocker changed it since
    /// (then that change's own confirmation, or resend, follows on the same FIFO path).
    pub(super) fn block_synced(&mut self, conv: ConvId, blocker: UserId, blocked: bool) {
        let Some(other) = conv
            .direct_members()
            .and_then(|m| m.into_iter().find(|&u| u != blocker))
        else {
            return;
        };
        if !self.block_syncs.0.contains(&(blocker, other)) {
            return; // confirmed already (a resend's second confirmation)
        }
        match self.blocks(blocker, other) {
            Ok(now) if now == blocked => {
                self.delete(keys::user_pair(keys::BLOCK_SYNC, blocker, other));
                self.block_syncs.0.remove(&(blocker, other));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "block confirmation not recorded; resent later"),
        }
    }

    /// Reads every unconfirmed block of this shard's users (a handful: each lives for one
    /// round trip to the owner unless a crash or a lost node cut it).
    pub(super) fn load_block_syncs(&mut self) {
        let rows = self.own_rows(keys::BLOCK_SYNC, "unconfirmed blocks (not resent)");
        for (key, _) in rows {
            if let Some(pair) = keys::users_of_user_pair(&key) {
                self.block_syncs.0.insert(pair);
            }
        }
    }

    /// Sends the blocker's current state to the owner again, for every unconfirmed block
    /// (whose owner is `owner`, or all): after a restart, and when a link to another node is
    /// back (mail on the lost one may never have arrived). Idempotent at the owner, and
    /// correct in any order: this shard is the only writer of the state it mirrors, and the
    /// resend leaves after anything it wrote before (FIFO per shard pair).
    pub(super) fn resend_block_syncs(&mut self, owner: Option<ShardId>) {
        let pairs: Vec<_> = self.block_syncs.0.iter().copied().collect();
        for (blocker, other) in pairs {
            let conv = ConvId::direct(blocker, other);
            let to = self.cfg.placement.owner(conv);
            if owner.is_some_and(|o| o != to) {
                continue;
            }
            let blocked = match self.blocks(blocker, other) {
                Ok(blocked) => blocked,
                Err(e) => {
                    tracing::warn!(error = %e, "block state not read: not resent");
                    continue;
                }
            };
            let mail = Mail::SetBlock {
                reply: None,
                conv,
                blocker,
                blocked,
            };
            // After whatever this shard has not yet made durable (never ahead of it).
            self.defer(Deferred::Mail { to, mail });
        }
    }

    /// `blocks`: the users this user blocks.
    pub(super) fn blocks_list(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
    ) -> Result<(), StorageError> {
        let rows: Vec<(_, BlockRecord)> = scan_records(
            &self.storage,
            &keys::user_prefix(keys::BLOCK, user),
            FRIENDS_MAX,
        )?;
        let list: Vec<_> = rows
            .into_iter()
            .map(|(_, rec)| json!({ "user": rec.name, "ts": rec.ts_ms }))
            .collect();
        self.send(conn, ok_frame(rid, &json!({ "blocks": list })));
        Ok(())
    }
}

/// Fills in `ConvBlocks` for a loaded one-to-one conversation.
pub(super) fn load_blocks<S: Storage>(
    storage: &S,
    conv: ConvId,
) -> Result<ConvBlocks, StorageError> {
    let key = keys::conv_blocks(conv);
    Ok(storage
        .get(&key)?
        .map(|b| ConvBlocks::decode(&key, &b))
        .transpose()?
        .unwrap_or_default())
}
