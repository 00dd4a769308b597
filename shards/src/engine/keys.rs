//! The device key directory for end-to-end encryption (docs/e2e.md), on each user's home
//! shard: every device's identity key and signed prekey (`keys_publish`), a supply of
//! one-time prekeys each handed out once (`keys_claim`), and a per-user version that moves
//! whenever a device's identity key appears, changes or goes. Then a `keys` push tells the
//! user's own devices and every peer of their one-to-one conversations, so a client can warn
//! that someone's keys changed and encrypt for the new set of devices.
//!
//! The server stores public keys only, as opaque text, and never sees a private key. A claim
//! deletes the prekeys it hands out and answers only once that delete is durable, so a crash
//! can never hand the same prekey to two senders.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::effects::Deferred;
use super::ops::{Asker, Outcome};
use super::Shard;
use crate::ids::{ShardId, UserId};
use crate::limits::{
    CONV_LIST_MAX, KEY_TEXT_BYTES_MAX, PREKEYS_PER_DEVICE_MAX, PREKEYS_PER_PUBLISH_MAX,
};
use crate::mail::{Mail, Named, ReplyTo};
use crate::protocol::{self as p, ok_frame, push_json_str, ErrorCode};
use crate::storage::{
    keys, scan_records, DeviceKeysRecord, KeysVersionRecord, PrekeyRecord, Storage, StorageError,
    UserRecord,
};

fn key_ok(text: &str) -> bool {
    !text.is_empty() && text.len() <= KEY_TEXT_BYTES_MAX && !text.chars().any(char::is_control)
}

fn bad(message: String) -> (ErrorCode, String) {
    (ErrorCode::BadRequest, message)
}

impl<S: Storage> Shard<S> {
    /// `keys_publish`: this device's keys, and more one-time prekeys.
    pub(in crate::engine) fn keys_publish(
        &mut self,
        now_ms: u64,
        by: Asker,
        req: p::KeysPublish,
    ) -> Outcome {
        let spk = &req.signed_prekey;
        if ![&req.identity, &spk.key, &spk.signature]
            .iter()
            .all(|t| key_ok(t))
            || !req.prekeys.iter().all(|k| key_ok(&k.key))
        {
            return Err(bad(format!(
                "keys and signatures are 1-{KEY_TEXT_BYTES_MAX} bytes without control characters"
            )));
        }
        if req.prekeys.len() > PREKEYS_PER_PUBLISH_MAX {
            return Err(bad(format!(
                "at most {PREKEYS_PER_PUBLISH_MAX} prekeys per publish"
            )));
        }
        let s = by.session;
        let stored = self.prekey_count(s.user, &s.device).map_err(storage)?;
        let fresh = req
            .prekeys
            .iter()
            .filter(|k| {
                !matches!(
                    self.get_latest(&keys::prekey(s.user, &s.device, k.id)),
                    Ok(Some(_))
                )
            })
            .count();
        if stored + fresh > PREKEYS_PER_DEVICE_MAX {
            return Err(bad(format!(
                "a device holds at most {PREKEYS_PER_DEVICE_MAX} one-time prekeys ({stored} stored)"
            )));
        }
        let key = keys::device_keys(s.user, &s.device);
        let before = self.latest::<DeviceKeysRecord>(&key).map_err(storage)?;
        let rec = DeviceKeysRecord {
            identity: req.identity,
            signed_prekey_id: spk.id,
            signed_prekey: spk.key.clone(),
            signature: spk.signature.clone(),
            published_ms: now_ms,
        };
        self.put(key, rec.encode());
        for k in &req.prekeys {
            let prekey = PrekeyRecord { key: k.key.clone() };
            self.put(keys::prekey(s.user, &s.device, k.id), prekey.encode());
        }
        let changed = before.is_none_or(|b| b.identity != rec.identity);
        let version = if changed {
            self.keys_changed(s.user, &s.name).map_err(storage)?
        } else {
            self.keys_version(s.user).map_err(storage)?
        };
        let frame = ok_frame(
            by.rid,
            &json!({ "version": version, "prekeys": stored + fresh }),
        );
        self.reply_when_durable(by.reply_to(self.cfg.shard), frame);
        Ok(())
    }

    /// `keys_count`: the one-time prekeys this device has left (replenish when low).
    pub(in crate::engine) fn keys_count(&mut self, by: Asker) -> Outcome {
        let n = self
            .prekey_count(by.session.user, &by.session.device)
            .map_err(storage)?;
        self.send(by.conn, ok_frame(by.rid, &json!({ "prekeys": n })));
        Ok(())
    }

    fn prekey_count(&self, user: UserId, device: &str) -> Result<usize, StorageError> {
        let prefix = keys::prekey_prefix(user, device);
        Ok(self
            .storage
            .scan(
                &prefix,
                &keys::prefix_end(&prefix),
                PREKEYS_PER_DEVICE_MAX + 1,
                false,
            )?
            .len())
    }

    fn keys_version(&self, user: UserId) -> Result<u64, StorageError> {
        Ok(self
            .latest::<KeysVersionRecord>(&keys::keys_version(user))?
            .map_or(0, |v| v.version))
    }

    /// `user`'s set of identity keys changed: bump the version and push `keys` to their own
    /// devices and to the peers of their one-to-one conversations. Returns the new version.
    pub(super) fn keys_changed(&mut self, user: UserId, name: &str) -> Result<u64, StorageError> {
        let version = self.keys_version(user)? + 1;
        self.put(
            keys::keys_version(user),
            KeysVersionRecord { version }.encode(),
        );
        let mut frame = String::from("{\"push\":\"keys\",\"user\":");
        push_json_str(&mut frame, name);
        frame.push_str(&format!(",\"version\":{version}}}"));
        let prefix = keys::user_conv_prefix(user);
        let mut to: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        to.entry(self.cfg.placement.home(user))
            .or_default()
            .push(user);
        for (k, _) in
            self.storage
                .scan(&prefix, &keys::prefix_end(&prefix), CONV_LIST_MAX, false)?
        {
            let peer = keys::conv_of_user_conv(&k)
                .and_then(|c| c.direct_members())
                .and_then(|[a, b]| [a, b].into_iter().find(|&m| m != user));
            if let Some(peer) = peer {
                to.entry(self.cfg.placement.home(peer))
                    .or_default()
                    .push(peer);
            }
        }
        // Told once the change is durable: a crash never leaves peers expecting keys that are
        // not there.
        let frame: Arc<str> = frame.into();
        for (shard, recipients) in to {
            let mail = Mail::Ephemeral {
                frame: frame.clone(),
                recipients: recipients.into(),
                skip_user: None,
            };
            self.defer(Deferred::Mail { to: shard, mail });
        }
        Ok(version)
    }

    /// A device ended (logout, kick, a new login under its name): its keys go with it.
    pub(super) fn forget_device_keys(&mut self, user: UserId, device: &str) {
        let had = matches!(
            self.get_latest(&keys::device_keys(user, device)),
            Ok(Some(_))
        );
        self.delete(keys::device_keys(user, device));
        let prefix = keys::prekey_prefix(user, device);
        match self
            .storage
            .scan(&prefix, &keys::prefix_end(&prefix), usize::MAX, false)
        {
            Ok(rows) => rows.into_iter().for_each(|(k, _)| self.delete(k)),
            Err(e) => tracing::warn!(error = %e, "a removed device's prekeys were not read"),
        }
        if had {
            let name = self.latest::<UserRecord>(&keys::user(user)).ok().flatten();
            if let Some(account) = name {
                if let Err(e) = self.keys_changed(user, &account.name) {
                    tracing::warn!(error = %e, "a removed device's key change was not announced");
                }
            }
        }
    }

    /// `keys_devices`, `keys_claim`: mailed to the user's home.
    pub(in crate::engine) fn keys_ask(
        &mut self,
        by: Asker,
        req: p::KeysUser,
        claim: bool,
    ) -> Outcome {
        let Ok(name) = crate::auth::normalise_username(&req.user) else {
            return Err((ErrorCode::NoSuchUser, "no such user".into()));
        };
        let user = (UserId::from_username(&name), name);
        let home = self.cfg.placement.home(user.0);
        let mail = Mail::KeysQuery {
            reply: by.reply_to(self.cfg.shard),
            user,
            version: req.version.filter(|_| !claim),
            claim: claim.then(|| req.devices.unwrap_or_default()),
        };
        self.mail(home, mail);
        Ok(())
    }

    /// On `user`'s home: their devices' keys; with `claim`, one one-time prekey per device
    /// taken (deleted, and answered once that is durable: never handed out twice).
    pub(super) fn keys_query(
        &mut self,
        reply: ReplyTo,
        (user, name): Named,
        version: Option<u64>,
        claim: Option<Vec<String>>,
    ) {
        match self.get_latest(&keys::user(user)) {
            Ok(Some(_)) => {}
            Ok(None) => return self.error_to(reply, ErrorCode::NoSuchUser, "no such user"),
            Err(e) => return self.storage_error_to(reply, &e),
        }
        let current = match self.keys_version(user) {
            Ok(v) => v,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        if version == Some(current) {
            let answer = json!({ "user": name, "not_modified": true, "version": current });
            return self.reply_to(reply, ok_frame(reply.rid, &answer));
        }
        let devices = match scan_records::<DeviceKeysRecord>(
            &self.storage,
            &keys::device_keys_prefix(user),
            1_000,
        ) {
            Ok(rows) => rows,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let mut list = Vec::with_capacity(devices.len());
        for (k, rec) in devices {
            let Some(device) = keys::device_of_key(&k) else {
                continue;
            };
            if claim
                .as_ref()
                .is_some_and(|only| !only.is_empty() && !only.contains(&device))
            {
                continue;
            }
            let mut entry = json!({
                "device": device,
                "identity": rec.identity,
                "signed_prekey": {
                    "id": rec.signed_prekey_id,
                    "key": rec.signed_prekey,
                    "signature": rec.signature,
                },
            });
            if claim.is_some() {
                entry["prekey"] = match self.take_prekey(user, &device) {
                    Ok(prekey) => prekey,
                    Err(e) => return self.storage_error_to(reply, &e),
                };
            }
            list.push(entry);
        }
        let answer = json!({ "user": name, "version": current, "devices": list });
        let frame = ok_frame(reply.rid, &answer);
        if claim.is_some() {
            self.reply_when_durable(reply, frame);
        } else {
            self.reply_to(reply, frame);
        }
    }

    /// The device's lowest-numbered one-time prekey, deleted; `null` when none is left.
    fn take_prekey(&mut self, user: UserId, device: &str) -> Result<Value, StorageError> {
        let prefix = keys::prekey_prefix(user, device);
        // A prekey taken earlier in this batch reads as deleted (`get_latest`), so a second
        // claim before the commit takes the next one.
        for (k, _) in self.storage.scan(
            &prefix,
            &keys::prefix_end(&prefix),
            PREKEYS_PER_DEVICE_MAX + 1,
            false,
        )? {
            let Some(rec) = self.latest::<PrekeyRecord>(&k)? else {
                continue;
            };
            let Some(id) = k
                .get(prefix.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
            else {
                continue;
            };
            self.delete(k);
            return Ok(json!({ "id": id, "key": rec.key }));
        }
        Ok(Value::Null)
    }
}

fn storage(_: StorageError) -> (ErrorCode, String) {
    (ErrorCode::Internal, "storage read failed".into())
}
