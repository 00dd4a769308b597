//! Status awareness on a user's home shard: friends and requests, blocks, presence, devices.
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
//!
//! Presence is derived, never stored: a user is `online` if any device is connected and not
//! away, `away` if all connected devices are, `offline` otherwise. A change marks the user
//! dirty; the tick pushes the state to friends' online devices if it differs from what was
//! pushed last — so a flapping connection costs its friends at most one push per tick.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value};

use super::commit::Deferred;
use super::gather::Kind;
use super::owner::by_shard;
use super::Shard;
use crate::ids::{ConnId, ConvId, UserId};
use crate::limits::FRIENDS_MAX;
use crate::mail::{FriendOp, GatherRef, Mail, Named, PresenceInfo, ReplyTo};
use crate::protocol::{ok_frame, push_json_str, ErrorCode};
use crate::storage::{
    keys, scan_records, BlockRecord, ConvBlocks, DeviceRecord, FriendRecord, FriendState,
    ProfileRecord, SocialMeta, Storage, StorageError,
};

/// Two friend operations on one pair can cross, each deciding the other user's side first:
/// - both ask at once: each side first records the other's request (`incoming`), or already
///   the friendship, then its own answer arrives — both asked, so both are friends;
/// - B declines A's request before A's side has recorded it (`requested`): the decline finds
///   nothing to undo on A's side, and A's request, still on its way back, must not record it
///   afterwards. The requester's home counts its requests in flight; a decline arriving while
///   one is marks it, and that request then records nothing.
///
/// In memory only: a crash between the two sides can still leave a relation on one side (the
/// cross-process retries of issue 13 close that), and other crossings (a decline racing a new
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

    fn friend_record(
        &self,
        user: UserId,
        other: UserId,
    ) -> Result<Option<FriendRecord>, StorageError> {
        let key = keys::user_pair(keys::FRIEND, user, other);
        self.get_latest(&key)?
            .map(|b| FriendRecord::decode(&key, &b))
            .transpose()
    }

    fn social_meta(&self, user: UserId) -> Result<SocialMeta, StorageError> {
        let key = keys::social_meta(user);
        Ok(self
            .get_latest(&key)?
            .map(|b| SocialMeta::decode(&key, &b))
            .transpose()?
            .unwrap_or_default())
    }

    fn blocks(&self, user: UserId, other: UserId) -> Result<bool, StorageError> {
        Ok(self
            .get_latest(&keys::user_pair(keys::BLOCK, user, other))?
            .is_some())
    }

    /// Writes `user`'s record about `other` (`state` 0 deletes it), moves the friend list
    /// version, and tells `user`'s devices. Returns the new version.
    fn set_friend(
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
        let conv = ConvId::direct(blocker, other.0);
        let mail = Mail::SetBlock {
            reply,
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
        reply: ReplyTo,
        conv: ConvId,
        blocker: UserId,
        blocked: bool,
    ) {
        let Some(members) = conv.direct_members() else {
            return;
        };
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let i = usize::from(members[1] == blocker);
        state.blocks.blocked[i] = blocked;
        let bytes = state.blocks.encode();
        self.put(keys::conv_blocks(conv), bytes);
        let frame = ok_frame(reply.rid, &json!({ "blocked": blocked }));
        self.reply_when_durable(reply, frame);
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

    // ---- presence ----

    /// A user homed here, as the protocol names it.
    pub(super) fn presence_of(&self, user: UserId) -> &'static str {
        let conns = self.sessions.online.get(&user);
        let mut any = false;
        for conn in conns.into_iter().flatten() {
            any = true;
            if self.sessions.conns.get(conn).is_some_and(|c| !c.away) {
                return "online";
            }
        }
        if any {
            "away"
        } else {
            "offline"
        }
    }

    /// `presence_set`: this device away or not, and the user's status text.
    pub(super) fn presence_set(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
        away: Option<bool>,
        status: Option<String>,
    ) -> Result<(), StorageError> {
        if let (Some(away), Some(c)) = (away, self.sessions.conns.get_mut(&conn)) {
            c.away = away;
        }
        self.sessions.presence_dirty.insert(user);
        let state = self.presence_of(user);
        match status {
            Some(status) => {
                let mut meta = self.social_meta(user)?;
                meta.status = status.clone();
                self.put(keys::social_meta(user), meta.encode());
                let frame = ok_frame(rid, &json!({ "state": state, "status": status }));
                self.defer(Deferred::Reply { conn, rid, frame });
            }
            None => {
                let status = self.social_meta(user)?.status;
                self.send(
                    conn,
                    ok_frame(rid, &json!({ "state": state, "status": status })),
                );
            }
        }
        Ok(())
    }

    /// Pushes presence changes to friends: at most one push per user per tick, and only when
    /// the state or status differs from the last one pushed.
    pub(super) fn flush_presence(&mut self) {
        let dirty = std::mem::take(&mut self.sessions.presence_dirty);
        for user in dirty {
            let state = self.presence_of(user);
            let Ok(meta) = self.social_meta(user) else {
                continue;
            };
            let now = (state, meta.status);
            if self.sessions.presence_sent.get(&user) == Some(&now) {
                continue;
            }
            let Ok(friends) = self.friends_of(user) else {
                continue;
            };
            if self.push_presence(user, &friends).is_err() {
                continue;
            }
            if now.0 == "offline" && now.1.is_empty() {
                self.sessions.presence_sent.remove(&user);
            } else {
                self.sessions.presence_sent.insert(user, now);
            }
        }
    }

    /// Pushes `user`'s current presence (a user homed here) to the online devices of `to`:
    /// one mail per destination shard.
    fn push_presence(&mut self, user: UserId, to: &[UserId]) -> Result<(), StorageError> {
        if to.is_empty() {
            return Ok(());
        }
        let state = self.presence_of(user);
        let status = self.social_meta(user)?.status;
        let name = self.user_name(user)?;
        let mut frame = String::from("{\"push\":\"presence\",\"user\":");
        push_json_str(&mut frame, &name);
        frame.push_str(&format!(",\"state\":\"{state}\",\"status\":"));
        push_json_str(&mut frame, &status);
        frame.push('}');
        let frame: Arc<str> = frame.into();
        for (home, recipients) in by_shard(to.iter().copied(), self.cfg.placement).iter() {
            self.stats.presence_pushes += recipients.len() as u64;
            let mail = Mail::Ephemeral {
                frame: frame.clone(),
                recipients: recipients.clone(),
                skip_user: None,
            };
            self.mail(*home, mail);
        }
        Ok(())
    }

    fn user_name(&self, user: UserId) -> Result<String, StorageError> {
        let key = keys::user(user);
        match self.get_latest(&key)? {
            Some(b) => Ok(crate::storage::UserRecord::decode(&key, &b)?.name),
            None => Ok(String::new()),
        }
    }

    fn friends_of(&self, user: UserId) -> Result<Vec<UserId>, StorageError> {
        let rows: Vec<(_, FriendRecord)> = scan_records(
            &self.storage,
            &keys::user_prefix(keys::FRIEND, user),
            FRIENDS_MAX,
        )?;
        Ok(rows
            .into_iter()
            .filter(|(_, rec)| rec.state == FriendState::Friends)
            .filter_map(|(k, _)| keys::other_of_user_pair(&k))
            .collect())
    }

    /// `presence` pull: one query per home shard of the named users.
    pub(super) fn start_presence(
        &mut self,
        conn: ConnId,
        rid: u64,
        requester: UserId,
        users: Vec<Named>,
    ) {
        let names: Vec<String> = users.iter().map(|(_, n)| n.clone()).collect();
        let mut by_home: BTreeMap<_, Vec<(usize, UserId)>> = BTreeMap::new();
        for (i, (user, _)) in users.iter().enumerate() {
            by_home
                .entry(self.home_of(*user))
                .or_default()
                .push((i, *user));
        }
        let id = self.gather(
            conn,
            rid,
            by_home.len(),
            Kind::Presence {
                names,
                states: vec![None; users.len()],
            },
        );
        if by_home.is_empty() {
            return self.finish_gather(id);
        }
        let me = self.cfg.shard;
        for (home, users) in by_home {
            let gather = GatherRef {
                shard: me,
                id,
                part: 0,
            };
            self.mail(
                home,
                Mail::PresenceQuery {
                    gather,
                    requester,
                    users,
                },
            );
        }
    }

    /// On the users' home shard: presence for those that `requester` may see (themselves, a
    /// friend of theirs, or anyone with `presence_public`).
    pub(super) fn presence_query(
        &mut self,
        gather: GatherRef,
        requester: UserId,
        users: Vec<(usize, UserId)>,
    ) {
        let mut states = Vec::with_capacity(users.len());
        for (i, user) in users {
            let visible = user == requester
                || self.cfg.presence_public
                || self
                    .friend_record(user, requester)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.state == FriendState::Friends);
            let info: Option<PresenceInfo> = visible.then(|| {
                let status = self.social_meta(user).map(|m| m.status).unwrap_or_default();
                (self.presence_of(user), status)
            });
            states.push((i, info));
        }
        self.mail(gather.shard, Mail::PresenceDone { gather, states });
    }

    // ---- profiles ----

    fn profile(&self, user: UserId) -> Result<ProfileRecord, StorageError> {
        Ok(self.latest(&keys::profile(user))?.unwrap_or_default())
    }

    /// `profile_set`: a new version; friends' sides learn it by `ProfileBumped`, not by push.
    pub(super) fn profile_set(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
        req: crate::protocol::ProfileSet,
    ) -> Result<(), StorageError> {
        let mut profile = self.profile(user)?;
        if let Some(v) = req.display_name {
            profile.display_name = v;
        }
        if let Some(v) = req.avatar_url {
            profile.avatar_url = v;
        }
        if let Some(v) = req.bio {
            profile.bio = v;
        }
        profile.version += 1;
        let version = profile.version;
        self.put(keys::profile(user), profile.encode());
        let friends = self.friends_of(user)?;
        for (home, friends) in by_shard(friends.into_iter(), self.cfg.placement).iter() {
            let mail = Mail::ProfileBumped {
                user,
                version,
                friends: friends.to_vec(),
            };
            self.defer(Deferred::Mail { to: *home, mail });
        }
        let frame = ok_frame(rid, &json!({ "version": version }));
        self.defer(Deferred::Reply { conn, rid, frame });
        Ok(())
    }

    /// On `user`'s home shard: the profile, answered to the requester wherever it is.
    pub(super) fn profile_query(
        &mut self,
        reply: ReplyTo,
        user: UserId,
        name: &str,
        version: Option<u64>,
    ) {
        let frame = match (self.get_latest(&keys::user(user)), self.profile(user)) {
            (Ok(None), _) => {
                return self.error_to(reply, ErrorCode::NoSuchUser, "no such user");
            }
            (Err(e), _) | (_, Err(e)) => return self.storage_error_to(reply, &e),
            (Ok(Some(_)), Ok(p)) if version == Some(p.version) => ok_frame(
                reply.rid,
                &json!({ "user": name, "not_modified": true, "version": p.version }),
            ),
            (Ok(Some(_)), Ok(p)) => ok_frame(
                reply.rid,
                &json!({
                    "user": name,
                    "display_name": p.display_name,
                    "avatar_url": p.avatar_url,
                    "bio": p.bio,
                    "version": p.version,
                }),
            ),
        };
        self.reply_to(reply, frame);
    }

    /// On the friends' home shard: note `user`'s new profile version on each friend's side.
    pub(super) fn profile_bumped(&mut self, user: UserId, version: u64, friends: Vec<UserId>) {
        for f in friends {
            let Ok(Some(mut rec)) = self.friend_record(f, user) else {
                continue;
            };
            if rec.state != FriendState::Friends || rec.profile_version >= version {
                continue;
            }
            rec.profile_version = version;
            self.put(keys::user_pair(keys::FRIEND, f, user), rec.encode());
            if let Ok(mut meta) = self.social_meta(f) {
                meta.friends_version += 1;
                self.put(keys::social_meta(f), meta.encode());
            }
        }
    }

    // ---- devices ----

    /// `devices`: this user's devices, which are online, and when each was last seen here.
    pub(super) fn devices_list(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
    ) -> Result<(), StorageError> {
        let list = self.devices_json(user)?;
        self.send(conn, ok_frame(rid, &json!({ "devices": list })));
        Ok(())
    }

    /// A user's durable device records, by device name (at most 1,000).
    pub(super) fn device_records(
        &self,
        user: UserId,
    ) -> Result<Vec<(String, DeviceRecord)>, StorageError> {
        let prefix = keys::device_prefix(user);
        Ok(scan_records::<DeviceRecord>(&self.storage, &prefix, 1_000)?
            .into_iter()
            .filter_map(|(k, rec)| Some((keys::device_of_key(&k)?, rec)))
            .collect())
    }

    /// A user's devices as `devices` lists them (also the admin API's account view).
    pub(super) fn devices_json(&self, user: UserId) -> Result<Vec<Value>, StorageError> {
        let rows = self.device_records(user)?;
        // Connected devices with whether each said it is away.
        let online: Vec<(String, bool)> = self
            .sessions
            .online
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|c| self.sessions.conns.get(c))
            .filter_map(|c| c.session.as_ref().map(|s| (s.device.clone(), c.away)))
            .collect();
        let mut list = Vec::with_capacity(rows.len());
        for (name, rec) in rows {
            let last_seen = self.sessions.last_seen.get(&(user, name.clone())).copied();
            let here = online.iter().filter(|(d, _)| *d == name);
            let state = match here.map(|(_, away)| *away).min() {
                Some(false) => "online",
                Some(true) => "away",
                None => "offline",
            };
            list.push(json!({
                "device": name,
                "online": state != "offline",
                "state": state,
                "created": rec.created_ms,
                "last_seen": last_seen,
            }));
        }
        Ok(list)
    }

    /// `device_logout`: revokes another device's token and closes its connections.
    pub(super) fn device_logout(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
        device: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let key = keys::device(user, device);
        match self.get_latest(&key) {
            Ok(Some(_)) => {}
            Ok(None) => return Err((ErrorCode::NoSuchDevice, "no such device".into())),
            Err(_) => return Err((ErrorCode::Internal, "storage read failed".into())),
        }
        self.delete(key);
        for victim in self.device_conns(user, device) {
            self.close(
                victim,
                crate::protocol::close::SESSION_REPLACED,
                "logged out from another device",
            );
        }
        let frame = ok_frame(rid, &json!({ "device": device }));
        self.defer(Deferred::Reply { conn, rid, frame });
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
