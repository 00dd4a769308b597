//! Friends, blocks, presence, profiles, devices and push tokens, from the requester's side:
//! checked for shape here, run by `engine/social.rs` on the requester's home shard (with one
//! hop to the other user's home shard or the conversation's owner where needed). Push tokens
//! are this device's own record, written here.

use serde_json::json;

use super::super::Shard;
use super::{bad, resolve, resolve_lenient, storage_failed, Asker, Outcome};
use crate::ids::ConvId;
use crate::limits::{
    AVATAR_URL_BYTES_MAX, BIO_BYTES_MAX, DISPLAY_NAME_BYTES_MAX, DND_MS_MAX, PRESENCE_PULL_MAX,
    PUSH_TOKEN_BYTES_MAX, STATUS_BYTES_MAX,
};
use crate::mail::{FriendOp, Mail, Named};
use crate::protocol::{self as p, ok_frame};
use crate::storage::{keys, DndRecord, PushTokenRecord, Storage};

/// The push services a token may be for (`push_register`'s `platform`).
const PUSH_PLATFORMS: [&str; 4] = ["apns", "fcm", "webpush", "other"];

impl<S: Storage> Shard<S> {
    /// The `friend_*` ops; `op` is `None` for `friend_request`, whose message is checked here.
    pub(in crate::engine) fn friend(
        &mut self,
        by: Asker,
        req: p::UserArg,
        op: Option<FriendOp>,
    ) -> Outcome {
        let other = resolve(std::slice::from_ref(&req.user))?.remove(0);
        let op = match op {
            Some(op) => op,
            None => {
                let message = req.message.unwrap_or_default();
                if message.len() > STATUS_BYTES_MAX {
                    return Err(bad(format!("message is at most {STATUS_BYTES_MAX} bytes")));
                }
                FriendOp::Request { message }
            }
        };
        let me: Named = (by.session.user, by.session.name.clone());
        self.friend_request(by.reply_to(self.cfg.shard), me, other, op)
    }

    /// `block` and `unblock`.
    pub(in crate::engine) fn block(
        &mut self,
        now_ms: u64,
        by: Asker,
        req: p::UserArg,
        blocking: bool,
    ) -> Outcome {
        let other = resolve(std::slice::from_ref(&req.user))?.remove(0);
        self.set_block(
            now_ms,
            by.reply_to(self.cfg.shard),
            by.session.user,
            other,
            blocking,
        )
    }

    pub(in crate::engine) fn presence_pull(&mut self, by: Asker, req: p::Users) -> Outcome {
        if req.users.len() > PRESENCE_PULL_MAX {
            return Err(bad(format!("at most {PRESENCE_PULL_MAX} users")));
        }
        let users = resolve_lenient(&req.users);
        self.start_presence(by.conn, by.rid, by.session.user, users);
        Ok(())
    }

    pub(in crate::engine) fn presence_change(&mut self, by: Asker, req: p::PresenceSet) -> Outcome {
        let away = match req.state.as_deref() {
            None => None,
            Some("online") => Some(false),
            Some("away") => Some(true),
            Some(_) => return Err(bad("state is \"online\" or \"away\"".into())),
        };
        if req
            .status
            .as_ref()
            .is_some_and(|t| t.len() > STATUS_BYTES_MAX)
        {
            return Err(bad(format!("status is at most {STATUS_BYTES_MAX} bytes")));
        }
        self.presence_set(by.conn, by.rid, by.session.user, away, req.status)
            .map_err(storage_failed)
    }

    /// Asked of the user's home shard, which holds the profile.
    pub(in crate::engine) fn profile_get(&mut self, by: Asker, req: p::ProfileGet) -> Outcome {
        let (user, name) = resolve(std::slice::from_ref(&req.user))?.remove(0);
        let mail = Mail::ProfileQuery {
            reply: by.reply_to(self.cfg.shard),
            user,
            name,
            version: req.version,
        };
        self.mail(self.home_of(user), mail);
        Ok(())
    }

    pub(in crate::engine) fn profile_change(&mut self, by: Asker, req: p::ProfileSet) -> Outcome {
        for (field, value, max) in [
            ("display_name", &req.display_name, DISPLAY_NAME_BYTES_MAX),
            ("avatar_url", &req.avatar_url, AVATAR_URL_BYTES_MAX),
            ("bio", &req.bio, BIO_BYTES_MAX),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > max) {
                return Err(bad(format!("{field} is at most {max} bytes")));
            }
        }
        self.profile_set(by.conn, by.rid, by.session.user, req)
            .map_err(storage_failed)
    }

    /// `push_register`: stores (or replaces) this device's push token; answered once durable.
    pub(in crate::engine) fn push_register(
        &mut self,
        now_ms: u64,
        by: Asker,
        req: p::PushRegister,
    ) -> Outcome {
        if !PUSH_PLATFORMS.contains(&req.platform.as_str()) {
            return Err(bad(format!(
                "platform must be one of {}",
                PUSH_PLATFORMS.join(", ")
            )));
        }
        if req.token.is_empty()
            || req.token.len() > PUSH_TOKEN_BYTES_MAX
            || req.token.chars().any(char::is_control)
        {
            return Err(bad(format!(
                "token must be 1-{PUSH_TOKEN_BYTES_MAX} bytes without control characters"
            )));
        }
        let s = by.session;
        let record = PushTokenRecord {
            platform: req.platform,
            token: req.token,
            registered_ms: now_ms,
        };
        self.set_push_token(s.user, &s.device, &record);
        let frame = ok_frame(by.rid, &json!({ "platform": record.platform }));
        self.reply_when_durable(by.reply_to(self.cfg.shard), frame);
        Ok(())
    }

    /// `push_unregister`: forgets this device's push token (none is fine: idempotent).
    pub(in crate::engine) fn push_unregister(&mut self, by: Asker) -> Outcome {
        self.forget_push_token(by.session.user, &by.session.device);
        let frame = ok_frame(by.rid, &json!({}));
        self.reply_when_durable(by.reply_to(self.cfg.shard), frame);
        Ok(())
    }

    /// `conv_mute`: this user's own notification setting for one conversation, stored on
    /// their home shard (where notifications for them are decided). Membership is not
    /// checked: it is a preference about yourself, shown only for conversations you are in.
    pub(in crate::engine) fn conv_mute(&mut self, by: Asker, req: p::ConvMute) -> Outcome {
        let Some(conv) = ConvId::parse(&req.conv) else {
            return Err(bad(format!("malformed conversation id {:?}", req.conv)));
        };
        let key = keys::conv_mute(by.session.user, conv);
        if req.muted {
            self.put(key, Vec::new());
        } else {
            self.delete(key);
        }
        let frame = ok_frame(
            by.rid,
            &json!({ "conv": conv.to_string(), "muted": req.muted }),
        );
        self.reply_when_durable(by.reply_to(self.cfg.shard), frame);
        Ok(())
    }

    /// `dnd_set`: no notifications for this user until `until`; `null` ends it now.
    pub(in crate::engine) fn dnd_set(&mut self, now_ms: u64, by: Asker, req: p::DndSet) -> Outcome {
        let key = keys::dnd(by.session.user);
        let Some(until) = req.until else {
            return Err(bad(
                "until is required: a time, or null to turn it off".into()
            ));
        };
        match until {
            None => self.delete(key),
            Some(until) if until <= now_ms || until - now_ms > DND_MS_MAX => {
                return Err(bad(format!(
                    "until must be in the future and within {} days; null turns it off",
                    DND_MS_MAX / 86_400_000
                )));
            }
            Some(until) => self.put(key, DndRecord { until_ms: until }.encode()),
        }
        let frame = ok_frame(by.rid, &json!({ "until": until }));
        self.reply_when_durable(by.reply_to(self.cfg.shard), frame);
        Ok(())
    }

    /// Another device of the same user; this one uses `logout`.
    pub(in crate::engine) fn device_logout_other(
        &mut self,
        by: Asker,
        req: p::DeviceArg,
    ) -> Outcome {
        if req.device == by.session.device {
            return Err(bad("use logout for this device".into()));
        }
        self.device_logout(by.conn, by.rid, by.session.user, &req.device)
    }
}
