//! Presence, profiles and devices, on each user's home shard.
//!
//! Presence is derived, never stored: a user is `online` if any device is connected and not
//! away, `away` if all connected devices are, `offline` otherwise. A change marks the user
//! dirty; the next flush pushes the state to friends' online devices if it differs from what
//! was pushed last — so a flapping connection costs its friends at most one push per flush.
//! Profiles change without pushes: friends' home shards record the new version, and friends
//! learn of it by pulling with versions.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value};

use super::effects::Deferred;
use super::fanout::by_shard;
use super::gather::Kind;
use super::Shard;
use crate::ids::{ConnId, ConvId, UserId};
use crate::limits::{CONV_LIST_MAX, FRIENDS_MAX};
use crate::mail::{GatherRef, Mail, Named, PresenceInfo, ReplyTo};
use crate::model::Presence;
use crate::protocol::{ok_frame, push_json_str, ErrorCode};
use crate::storage::{
    keys, scan_records, DeviceRecord, DndRecord, FriendRecord, FriendState, ProfileRecord,
    PushTokenRecord, Storage, StorageError,
};

impl<S: Storage> Shard<S> {
    // ---- presence ----

    /// A user homed here, as the protocol names it.
    pub(super) fn presence_of(&self, user: UserId) -> Presence {
        let conns = self.sessions.online.get(&user);
        let mut any = false;
        for conn in conns.into_iter().flatten() {
            any = true;
            if self.sessions.conns.get(conn).is_some_and(|c| !c.away) {
                return Presence::Online;
            }
        }
        if any {
            Presence::Away
        } else {
            Presence::Offline
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
        let state = self.presence_of(user).name();
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
            let state = self.presence_of(user).name();
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
    pub(super) fn push_presence(
        &mut self,
        user: UserId,
        to: &[UserId],
    ) -> Result<(), StorageError> {
        if to.is_empty() {
            return Ok(());
        }
        let state = self.presence_of(user).name();
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

    pub(super) fn user_name(&self, user: UserId) -> Result<String, StorageError> {
        let key = keys::user(user);
        match self.get_latest(&key)? {
            Some(b) => Ok(crate::storage::UserRecord::decode(&key, &b)?.name),
            None => Ok(String::new()),
        }
    }

    pub(super) fn friends_of(&self, user: UserId) -> Result<Vec<UserId>, StorageError> {
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

    pub(super) fn profile(&self, user: UserId) -> Result<ProfileRecord, StorageError> {
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

    /// Deletes a device's records: its token stops working (the nonce is gone), and its push
    /// token and encryption keys go with it. Every way a device ends (`logout`, `device_logout`, a kick) comes here.
    pub(super) fn forget_device(&mut self, user: UserId, device: &str) {
        self.delete(keys::device(user, device));
        self.forget_push_token(user, device);
        self.forget_device_keys(user, device);
    }

    /// Deletes every push token of `user`: those stored, and those of its connected devices (a
    /// `push_register` not yet durable is one of theirs). A disabled account gets no pushes.
    pub(super) fn drop_push_tokens(&mut self, user: UserId) -> Result<(), StorageError> {
        let prefix = keys::push_token_prefix(user);
        let mut devices: Vec<String> =
            scan_records::<PushTokenRecord>(&self.storage, &prefix, 1_000)?
                .into_iter()
                .filter_map(|(k, _)| keys::device_of_key(&k))
                .collect();
        devices.extend(self.online_devices(user).into_iter().map(str::to_owned));
        for device in devices {
            self.forget_push_token(user, &device);
        }
        Ok(())
    }

    /// `user`'s notification settings: the conversations they muted (`conv_mute`, durable
    /// ones) and the end of a do-not-disturb still running at `now_ms` (`dnd_set`).
    pub(super) fn notify_settings(
        &self,
        now_ms: u64,
        user: UserId,
    ) -> Result<(HashSet<ConvId>, Option<u64>), StorageError> {
        let prefix = keys::conv_mute_prefix(user);
        let muted = self
            .storage
            .scan(&prefix, &keys::prefix_end(&prefix), CONV_LIST_MAX, false)?
            .into_iter()
            .filter_map(|(k, _)| keys::conv_of_user_conv(&k))
            .collect();
        let dnd = self
            .latest::<DndRecord>(&keys::dnd(user))?
            .map(|d| d.until_ms)
            .filter(|&until| until > now_ms);
        Ok((muted, dnd))
    }

    /// A user's devices as `devices` lists them (also the admin API's account view).
    pub(super) fn devices_json(&self, user: UserId) -> Result<Vec<Value>, StorageError> {
        let rows = self.device_records(user)?;
        // Devices with a push token, and its platform.
        let push: BTreeMap<String, String> =
            scan_records::<PushTokenRecord>(&self.storage, &keys::push_token_prefix(user), 1_000)?
                .into_iter()
                .filter_map(|(k, rec)| Some((keys::device_of_key(&k)?, rec.platform)))
                .collect();
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
                "push": push.get(&name),
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
        self.forget_device(user, device);
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
