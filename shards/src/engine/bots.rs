//! Bots: accounts that programs run, created by a user (their owner) or the operator, that
//! never log in with a password. A bot is an ordinary account (a `UserRecord` with no password
//! hash) plus a `BotRecord` (owner, webhook, webhook secret), and its token is a device token
//! for the device `bot`, minted for `BOT_TOKEN_TTL_S`. So a bot joins conversations, holds group
//! roles, sends and reads through exactly the code every client goes through.
//!
//! Two ways to run one:
//! - **WebSocket**: `resume` with the bot token, then the protocol as any client speaks it.
//! - **HTTP**: `POST /bot/api` with the token as a bearer and one request frame as the body
//!   (`handle_bot_http`). The shard that took it checks the token's signature and expiry and
//!   mails the frame to the bot's home shard (`Mail::BotCall`), which checks the nonce (a
//!   rotated or revoked token fails there), counts it against the bot's rate limit, and runs
//!   it as a request of the bot's session on a *relay* pseudo-connection: the answer, an
//!   ordinary reply frame, travels back to the HTTP request (admin.rs's `Request::Relay`).
//!   Messages reach a bot with a webhook as POSTs of their `msg` push frames
//!   (`Output::BotHook`, sent by the driver's bot workers, one at a time per bot).
//!
//! Owner actions (`bot_token`, `bot_revoke`, `bot_webhook`) and creation run on the bot's
//! home shard (`Mail::Bot`), where its records live.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::ops::{Asker, Outcome};
use super::session::Session;
use super::Output;
use super::Shard;
use crate::auth::{self, TokenClaims};
use crate::ids::{ConnId, UserId, SYSTEM_USERNAME};
use crate::limits::{BOTS_LISTED_MAX, BOT_TOKEN_TTL_S, WEBHOOK_URL_BYTES_MAX};
use crate::mail::{BotAction, Mail, Named, ReplyTo};
use crate::protocol::{self as p, close, ok_frame, ErrorCode, Op, Request};
use crate::storage::{keys, BotRecord, DeviceRecord, Storage, StorageError, UserRecord};

/// The device name of every bot token (and of a bot's connections).
pub const BOT_DEVICE: &str = "bot";

/// Ops a bot may run over HTTP: the ones about conversations, not about a connection (acks,
/// typing, presence and push tokens belong to a socket; accounts and bots to a person).
fn http_op(op: Op) -> bool {
    use Op::*;
    matches!(
        op,
        Ping | Open
            | Send
            | Convs
            | Read
            | Sync
            | History
            | Recall
            | Edit
            | Receipts
            | GroupCreate
            | GroupInvite
            | GroupJoin
            | GroupApprove
            | GroupDecline
            | GroupLeave
            | GroupKick
            | GroupRole
            | GroupMute
            | GroupUpdate
            | GroupInfo
            | GroupMembers
            | GroupTransfer
            | Profile
    )
}

/// Where a bot's messages are POSTed, and the key that signs them.
#[derive(Clone)]
pub(super) struct Hook {
    url: Arc<str>,
    secret: Arc<[u8]>,
}

#[derive(Default)]
pub(super) struct Bots {
    /// Bots homed here with a webhook. Loaded at start, kept with every bot write.
    hooks: HashMap<UserId, Hook>,
    /// Each bot's HTTP calls in the current one-second window (its rate limit).
    windows: HashMap<UserId, (u64, u32)>,
    /// Relay pseudo-connections are numbered down from the top of the id space, far from
    /// the driver's connection ids (which count up from 1).
    next_relay: u64,
}

pub(super) fn webhook_ok(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() <= WEBHOOK_URL_BYTES_MAX
        && !url.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<S: Storage> Shard<S> {
    /// Reads the webhooks of the bots homed here (at start).
    pub(super) fn load_bots(&mut self) {
        let rows = self.own_rows(keys::BOT, "bots (their webhooks are silent until changed)");
        for (key, value) in rows {
            if let (Some(user), Ok(rec)) = (keys::user_of(&key), BotRecord::decode(&key, &value)) {
                self.remember_hook(user, &rec);
            }
        }
    }

    fn remember_hook(&mut self, user: UserId, rec: &BotRecord) {
        if rec.webhook.is_empty() {
            self.bots.hooks.remove(&user);
        } else {
            let hook = Hook {
                url: rec.webhook.as_str().into(),
                secret: rec.secret.as_slice().into(),
            };
            self.bots.hooks.insert(user, hook);
        }
    }

    /// Whether `user` (homed here) is a bot.
    pub(super) fn is_bot(&self, user: UserId) -> Result<bool, StorageError> {
        Ok(self.get_latest(&keys::bot(user))?.is_some())
    }

    // ---- owner ops, on the owner's home shard ----

    /// `bot_create`, `bot_token`, `bot_revoke`, `bot_webhook`.
    pub(in crate::engine) fn bot_op(&mut self, by: Asker, req: Request) -> Outcome {
        if self.is_bot(by.session.user).map_err(|_| storage())? {
            return Err((ErrorCode::Forbidden, "bots cannot own bots".into()));
        }
        let (name, action) = match req {
            Request::BotCreate(r) => {
                if r.webhook.as_deref().is_some_and(|u| !webhook_ok(u)) {
                    return Err(bad_webhook());
                }
                let Ok(name) = auth::normalise_username(&r.name) else {
                    return Err((
                        ErrorCode::InvalidUsername,
                        "bot names follow the username rules".into(),
                    ));
                };
                (name, BotAction::Create { webhook: r.webhook })
            }
            Request::BotToken(r) => (r.bot, BotAction::Token),
            Request::BotRevoke(r) => (r.bot, BotAction::Revoke),
            Request::BotWebhook(r) => {
                let Some(webhook) = r.webhook else {
                    return Err((
                        ErrorCode::BadRequest,
                        "webhook is required (null turns it off)".into(),
                    ));
                };
                if webhook.as_deref().is_some_and(|u| !webhook_ok(u)) {
                    return Err(bad_webhook());
                }
                (r.bot, BotAction::Webhook(webhook))
            }
            _ => return Err((ErrorCode::Internal, "not a bot op".into())),
        };
        let name = auth::normalise_username(&name).unwrap_or(name);
        let bot = (UserId::from_username(&name), name);
        self.mail_bot_home(
            by.reply_to(self.cfg.shard),
            Some(by.session.user),
            bot,
            action,
        );
        Ok(())
    }

    /// `bots`: the caller's bots, by name (from its own index: `bot_owned`).
    pub(in crate::engine) fn bots_list(&mut self, by: Asker) -> Result<(), StorageError> {
        let prefix = keys::bot_owned_prefix(by.session.user);
        let names: Vec<String> = self
            .storage
            .scan(&prefix, &keys::prefix_end(&prefix), BOTS_LISTED_MAX, false)?
            .into_iter()
            .filter_map(|(k, _)| String::from_utf8(k.get(prefix.len()..)?.to_vec()).ok())
            .collect();
        self.send(by.conn, ok_frame(by.rid, &json!({ "bots": names })));
        Ok(())
    }

    /// On the owner's home: a bot of theirs is durable.
    pub(super) fn bot_owned(&mut self, owner: UserId, bot: &str) {
        self.put(keys::bot_owned(owner, bot), Vec::new());
    }

    pub(super) fn mail_bot_home(
        &mut self,
        reply: ReplyTo,
        owner: Option<UserId>,
        bot: Named,
        action: BotAction,
    ) {
        let home = self.cfg.placement.home(bot.0);
        let mail = Mail::Bot {
            reply,
            owner,
            bot,
            action,
        };
        self.mail(home, mail);
    }

    // ---- on the bot's home shard ----

    pub(super) fn bot_action(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        owner: Option<UserId>,
        (user, name): Named,
        action: BotAction,
    ) {
        if let BotAction::Create { webhook } = action {
            return self.bot_create(now_ms, reply, owner, (user, name), webhook);
        }
        let rec = match self.latest::<BotRecord>(&keys::bot(user)) {
            Ok(Some(rec)) if owner.is_none_or(|o| o.0 == rec.owner) => rec,
            // Someone else's bot reads as no bot at all: names are not probed this way.
            Ok(_) => return self.error_to(reply, ErrorCode::NoSuchUser, "you have no such bot"),
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let answer = match action {
            BotAction::Create { .. } => return,
            BotAction::Token => {
                let rec = BotRecord {
                    secret: self.new_secret(),
                    ..rec
                };
                let token = self.issue_bot_token(now_ms, user);
                self.put(keys::bot(user), rec.encode());
                self.remember_hook(user, &rec);
                self.close_bot(user, "bot token replaced");
                json!({ "bot": name, "token": token, "secret": String::from_utf8_lossy(&rec.secret) })
            }
            BotAction::Revoke => {
                self.delete(keys::device(user, BOT_DEVICE));
                self.close_bot(user, "bot token revoked");
                json!({ "bot": name })
            }
            BotAction::Webhook(webhook) => {
                let rec = BotRecord {
                    webhook: webhook.clone().unwrap_or_default(),
                    ..rec
                };
                self.put(keys::bot(user), rec.encode());
                self.remember_hook(user, &rec);
                json!({ "bot": name, "webhook": webhook })
            }
        };
        self.reply_when_durable(reply, ok_frame(reply.rid, &answer));
    }

    fn bot_create(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        owner: Option<UserId>,
        (user, name): Named,
        webhook: Option<String>,
    ) {
        let taken = name == SYSTEM_USERNAME || self.sessions.registering.contains(&user);
        match self.get_latest(&keys::user(user)) {
            Ok(None) if !taken => {}
            Ok(_) => return self.error_to(reply, ErrorCode::UsernameTaken, "that name is taken"),
            Err(e) => return self.storage_error_to(reply, &e),
        }
        let account = UserRecord {
            name: name.clone(),
            // No hash: a password login of a bot is refused before any hashing (`login`).
            phc: String::new(),
            created_ms: now_ms,
        };
        let rec = BotRecord {
            owner: owner.map_or(0, |o| o.0),
            webhook: webhook.clone().unwrap_or_default(),
            secret: self.new_secret(),
            created_ms: now_ms,
        };
        let token = self.issue_bot_token(now_ms, user);
        self.put(keys::user(user), account.encode());
        self.put(keys::bot(user), rec.encode());
        self.remember_hook(user, &rec);
        if let Some(owner) = owner {
            let to = self.cfg.placement.home(owner);
            let mail = Mail::BotOwned {
                owner,
                bot: name.clone(),
            };
            self.defer(super::effects::Deferred::Mail { to, mail });
        }
        let answer = json!({
            "bot": name,
            "token": token,
            "secret": String::from_utf8_lossy(&rec.secret),
            "webhook": webhook,
        });
        self.reply_when_durable(reply, ok_frame(reply.rid, &answer));
    }

    /// A webhook key: 32 random bytes as 64 hex digits. The key *is* that text (what the bot
    /// is given), so a receiver uses the string as it came, like the push webhook's secret.
    fn new_secret(&mut self) -> Vec<u8> {
        use rand::RngCore;
        let mut secret = [0u8; 32];
        self.rng.fill_bytes(&mut secret);
        hex(&secret).into_bytes()
    }

    /// A fresh nonce for the device `bot` (older tokens stop verifying) and its token.
    fn issue_bot_token(&mut self, now_ms: u64, user: UserId) -> String {
        use rand::Rng;
        let nonce: u64 = self.rng.gen();
        let issued_s = now_ms / 1000;
        self.put(
            keys::device(user, BOT_DEVICE),
            DeviceRecord {
                nonce,
                created_ms: now_ms,
            }
            .encode(),
        );
        self.tokens.mint(&TokenClaims {
            user,
            nonce,
            issued_s,
            expires_s: issued_s + BOT_TOKEN_TTL_S,
            device: BOT_DEVICE.into(),
        })
    }

    fn close_bot(&mut self, user: UserId, why: &'static str) {
        for conn in self.device_conns(user, BOT_DEVICE) {
            self.close(conn, close::SESSION_REPLACED, why);
        }
    }

    // ---- HTTP calls ----

    /// A bot's HTTP request arrived on this shard as pseudo-connection `conn`.
    pub(super) fn bot_http(&mut self, now_ms: u64, conn: ConnId, token: &str, frame: String) {
        let claims = match self.tokens.verify(token, now_ms / 1000) {
            Ok(claims) if claims.device == BOT_DEVICE => claims,
            Ok(_) => return self.relay_refused(conn, ErrorCode::BadCredentials, "not a bot token"),
            Err(code) => return self.relay_refused(conn, code, "the bot token does not verify"),
        };
        if !self.admin_relay(conn, None) {
            return;
        }
        let home = self.cfg.placement.home(claims.user);
        let mail = Mail::BotCall {
            reply: ReplyTo {
                shard: self.cfg.shard,
                conn,
                rid: 0,
            },
            user: claims.user,
            nonce: claims.nonce,
            frame,
        };
        self.mail(home, mail);
    }

    /// On the bot's home: check the token's nonce, the account and the rate limit, then run
    /// the frame as the bot's request; the reply goes back to `reply`.
    pub(super) fn bot_call(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        user: UserId,
        nonce: u64,
        frame: String,
    ) {
        let device = self.latest::<DeviceRecord>(&keys::device(user, BOT_DEVICE));
        let account = self.latest::<UserRecord>(&keys::user(user));
        let account = match (device, account) {
            (Ok(Some(d)), Ok(Some(account))) if d.nonce == nonce => account,
            (Ok(_), Ok(_)) => {
                return self.error_to(
                    reply,
                    ErrorCode::DeviceRevoked,
                    "this bot token was revoked or replaced",
                )
            }
            (Err(e), _) | (_, Err(e)) => return self.storage_error_to(reply, &e),
        };
        if self.is_disabled(user) {
            return self.error_to(reply, ErrorCode::AccountDisabled, "this bot is disabled");
        }
        let window = self.bots.windows.entry(user).or_insert((now_ms, 0));
        if now_ms.saturating_sub(window.0) >= 1_000 {
            *window = (now_ms, 0);
        }
        window.1 += 1;
        if window.1 > self.cfg.requests_per_sec_max {
            return self.error_to(
                reply,
                ErrorCode::RateLimited,
                "too many requests per second for this bot",
            );
        }
        self.stats.bot_calls += 1;
        let head: p::Head = match serde_json::from_str(&frame) {
            Ok(head) => head,
            Err(e) => return self.error_to(reply, ErrorCode::BadJson, &e.to_string()),
        };
        let rid = head.rid.unwrap_or(0);
        let reply = ReplyTo { rid, ..reply };
        let op = match Op::from_name(&head.op) {
            Some(op) if http_op(op) => op,
            Some(_) => {
                return self.error_to(
                    reply,
                    ErrorCode::BadRequest,
                    "this op is not available over HTTP; use the WebSocket",
                )
            }
            None => {
                return self.error_to(
                    reply,
                    ErrorCode::UnknownOp,
                    &format!("unknown op {:?}", head.op.as_ref()),
                )
            }
        };
        let req = match Request::parse(op, &frame) {
            Ok(req) => req,
            Err(e) => return self.error_to(reply, ErrorCode::BadRequest, &e),
        };
        // The request runs on a relay pseudo-connection here, whose one reply goes to `reply`.
        let relay = if reply.shard == self.cfg.shard {
            reply.conn
        } else {
            self.bots.next_relay += 1;
            let relay = ConnId(u64::MAX - self.bots.next_relay);
            if !self.admin_relay(relay, Some(reply)) {
                return self.error_to(
                    reply,
                    ErrorCode::Overloaded,
                    "too many requests in flight; retry",
                );
            }
            relay
        };
        let session = Session {
            user,
            name: account.name,
            device: BOT_DEVICE.into(),
        };
        if let Err((code, message)) = self.request(now_ms, relay, rid, Some(&session), req, &frame)
        {
            self.error(relay, Some(rid), code, &message);
        }
    }

    // ---- delivery ----

    /// A message reached this home shard: bots among `recipients` with a webhook get it
    /// POSTed (not their own: a bot answering itself would loop).
    pub(super) fn bot_deliver(&mut self, frame: &Arc<str>, recipients: &[UserId]) {
        if self.bots.hooks.is_empty() {
            return;
        }
        let mut from: Option<Option<UserId>> = None;
        for user in recipients {
            let Some(hook) = self.bots.hooks.get(user) else {
                continue;
            };
            let sender = *from.get_or_insert_with(|| super::notify::sender_of(frame));
            if sender == Some(*user) {
                continue;
            }
            self.stats.bot_hooks += 1;
            self.out.push_back(Output::BotHook {
                bot: user.0,
                url: hook.url.clone(),
                secret: hook.secret.clone(),
                body: frame.clone(),
            });
        }
    }
}

fn storage() -> (ErrorCode, String) {
    (ErrorCode::Internal, "storage read failed".into())
}

pub(super) fn bad_webhook() -> (ErrorCode, String) {
    (
        ErrorCode::BadRequest,
        format!(
            "webhook must be an http:// or https:// URL of at most {WEBHOOK_URL_BYTES_MAX} bytes"
        ),
    )
}
