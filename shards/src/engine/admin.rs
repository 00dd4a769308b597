//! Operator requests (the admin API, parsed in [`crate::admin`]) as the engine runs them.
//!
//! An admin request is a pseudo-connection on the shard whose HTTP listener took it: it never
//! speaks WebSocket and gets exactly one answer, [`Output::AdminReply`]. The steps it takes on
//! other shards answer it the way client requests are answered — reply frames addressed to a
//! [`ReplyTo`] naming that pseudo-connection — and this module reads those frames as the
//! results of its steps. So the admin API reuses the message path instead of copying it.
//!
//! | request | where it runs |
//! | --- | --- |
//! | create users | each user's home shard: hash (off the reactor), write, answer once durable |
//! | disable, enable, kick | the user's home shard: write, close sockets (4003), answer once durable |
//! | notice to a group | the group's owner: a `system` entry with event `notice` |
//! | notice to a user | the owner of (`hermod`, user): open it (indexed for the user), then append |
//!
//! State: `requests` lives on the shard that took the HTTP request; `batches` on home shards.
//! Both are bounded: at most `ADMIN_REQUESTS_MAX` requests per shard, each naming at most
//! `ADMIN_CREATE_MAX` users.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::effects::Deferred;
use super::event::{uuid_v7, Event};
use super::ops::PendingJob;
use super::timers::Timer;
use super::{Output, Shard};
use crate::admin::{status_of, AdminOp, NoticeTo};
use crate::auth::{self, Job};
use crate::ids::{ConnId, ConvId, ShardId, UserId, SYSTEM_USERNAME};
use crate::limits::{ADMIN_REQUESTS_MAX, BOT_CALLS_IN_FLIGHT_MAX, BOT_CALL_WAIT_MS};
use crate::mail::{AccountAction, BotAction, ConvOp, Mail, Named, ReplyTo};
use crate::protocol::{close, ok_frame, ErrorCode};
use crate::storage::{keys, MessageKind, Storage, UserRecord};

/// The device name the server's own entries carry.
const ADMIN_DEVICE: &str = "admin";

#[derive(Default)]
pub(super) struct Admin {
    /// Operator requests taken on this shard, by pseudo-connection.
    requests: HashMap<ConnId, Request>,
    /// Bots' HTTP requests (bots.rs), by pseudo-connection: the next reply frame is the
    /// answer, as is. `None`: this shard took the HTTP request and answers it; `Some(to)`: a
    /// relay on the bot's home shard that forwards the frame there. Bounded by
    /// `BOT_CALLS_IN_FLIGHT_MAX`, each dropped at its `Timer::Relay` if never answered.
    relays: HashMap<ConnId, Option<ReplyTo>>,
    /// Account creations running on this shard as the users' home, by batch id.
    batches: HashMap<u64, Batch>,
    next_batch: u64,
}

enum Request {
    /// The next reply frame is the answer; `conv` is added to an `ok` answer.
    Waiting { conv: Option<ConvId> },
    /// A notice to a user: the conversation is being opened; the append follows.
    Opening {
        conv: ConvId,
        body: String,
        id: uuid::Uuid,
    },
    /// Users being created on their home shards.
    Creating {
        names: Vec<String>,
        results: Vec<Option<Result<(), ErrorCode>>>,
        parts_left: usize,
    },
}

/// One home shard's part of a bulk creation.
struct Batch {
    reply: ReplyTo,
    left: usize,
    results: Vec<(usize, Result<(), ErrorCode>)>,
}

impl Admin {
    pub(super) fn is_request(&self, conn: ConnId) -> bool {
        self.requests.contains_key(&conn) || self.relays.contains_key(&conn)
    }
}

impl<S: Storage> Shard<S> {
    /// Registers a relay pseudo-connection for a bot's HTTP request (false: too many in
    /// flight on this shard; the caller answers `overloaded`).
    pub(super) fn admin_relay(&mut self, conn: ConnId, to: Option<ReplyTo>) -> bool {
        if self.admin.relays.len() >= BOT_CALLS_IN_FLIGHT_MAX {
            if to.is_none() {
                self.admin_error(
                    conn,
                    ErrorCode::Overloaded,
                    "too many bot requests in flight on this shard; retry",
                );
            }
            return false;
        }
        self.admin.relays.insert(conn, to);
        self.timers
            .at(self.now_ms + BOT_CALL_WAIT_MS, Timer::Relay(conn));
        true
    }

    /// `Timer::Relay`: a bot's request still unanswered (its home's node died with it, say).
    /// The HTTP side answers `unavailable`; a relay is forgotten.
    pub(super) fn relay_expired(&mut self, conn: ConnId) {
        if let Some(None) = self.admin.relays.remove(&conn) {
            self.admin_error(conn, ErrorCode::Unavailable, "no answer in time; retry");
        }
    }

    /// A bot's HTTP request refused before it ran (its token did not verify).
    pub(super) fn relay_refused(&mut self, conn: ConnId, code: ErrorCode, message: &str) {
        self.admin_error(conn, code, message);
    }
}

impl<S: Storage> Shard<S> {
    // ---- on the shard that took the request ----

    pub(super) fn admin_request(&mut self, now_ms: u64, conn: ConnId, op: AdminOp) {
        if self.admin.requests.len() >= ADMIN_REQUESTS_MAX {
            return self.admin_error(
                conn,
                ErrorCode::Overloaded,
                "too many admin requests in flight on this shard; retry",
            );
        }
        let reply = ReplyTo {
            shard: self.cfg.shard,
            conn,
            rid: 0,
        };
        match op {
            AdminOp::Stats => self.admin_error(
                conn,
                ErrorCode::BadRequest,
                "stats are answered by the server, not a shard",
            ),
            AdminOp::CreateUsers { users } => self.admin_create(conn, reply, users),
            AdminOp::ViewUser { user } => {
                self.admin_account(conn, reply, &user, AccountAction::View)
            }
            AdminOp::SetDisabled { user, disabled } => {
                self.admin_account(conn, reply, &user, AccountAction::Disable(disabled))
            }
            AdminOp::Kick { user, device } => {
                self.admin_account(conn, reply, &user, AccountAction::Kick { device })
            }
            AdminOp::Bot { name, action } => {
                let webhook = match &action {
                    BotAction::Create { webhook } | BotAction::Webhook(webhook) => {
                        webhook.as_deref()
                    }
                    BotAction::Token | BotAction::Revoke => None,
                };
                if webhook.is_some_and(|url| !super::bots::webhook_ok(url)) {
                    let (code, message) = super::bots::bad_webhook();
                    return self.admin_error(conn, code, &message);
                }
                let Some(bot) = named(&name) else {
                    return self.admin_error(
                        conn,
                        ErrorCode::InvalidUsername,
                        "bot names follow the username rules",
                    );
                };
                self.admin
                    .requests
                    .insert(conn, Request::Waiting { conv: None });
                self.mail_bot_home(reply, None, bot, action);
            }
            AdminOp::Notice {
                to: NoticeTo::Group(conv),
                body,
            } => {
                self.admin
                    .requests
                    .insert(conn, Request::Waiting { conv: Some(conv) });
                let mail = Mail::Op {
                    reply,
                    conv,
                    actor: UserId::SYSTEM,
                    actor_name: SYSTEM_USERNAME.into(),
                    op: ConvOp::Notice { body },
                };
                self.mail(self.cfg.placement.owner(conv), mail);
            }
            AdminOp::Notice {
                to: NoticeTo::User { name, id },
                body,
            } => {
                let Some((user, name)) = named(&name) else {
                    return self.admin_error(conn, ErrorCode::NoSuchUser, "no such user");
                };
                let conv = ConvId::direct(UserId::SYSTEM, user);
                let id = id.unwrap_or_else(|| uuid_v7(now_ms));
                self.admin
                    .requests
                    .insert(conn, Request::Opening { conv, body, id });
                let mail = Mail::Open {
                    reply,
                    conv,
                    requester: UserId::SYSTEM,
                    names: [(UserId::SYSTEM, SYSTEM_USERNAME.into()), (user, name)],
                };
                self.mail(self.cfg.placement.owner(conv), mail);
            }
        }
    }

    fn admin_create(&mut self, conn: ConnId, reply: ReplyTo, users: Vec<(String, String)>) {
        let mut results = vec![None; users.len()];
        let mut names = Vec::with_capacity(users.len());
        let mut by_home: BTreeMap<ShardId, Vec<(usize, String, String)>> = BTreeMap::new();
        for (i, (raw, password)) in users.into_iter().enumerate() {
            match (
                auth::normalise_username(&raw),
                auth::check_password(&password),
            ) {
                (Ok(name), Ok(())) => {
                    let home = self.home_of(UserId::from_username(&name));
                    names.push(name.clone());
                    by_home.entry(home).or_default().push((i, name, password));
                }
                (Err(code), _) | (_, Err(code)) => {
                    names.push(raw);
                    results[i] = Some(Err(code));
                }
            }
        }
        let parts_left = by_home.len();
        self.admin.requests.insert(
            conn,
            Request::Creating {
                names,
                results,
                parts_left,
            },
        );
        if parts_left == 0 {
            return self.finish_create(conn);
        }
        for (home, users) in by_home {
            self.mail(home, Mail::CreateAccounts { reply, users });
        }
    }

    fn admin_account(&mut self, conn: ConnId, reply: ReplyTo, user: &str, action: AccountAction) {
        let Some(user) = named(user) else {
            return self.admin_error(conn, ErrorCode::NoSuchUser, "no such user");
        };
        self.admin
            .requests
            .insert(conn, Request::Waiting { conv: None });
        let home = self.home_of(user.0);
        self.mail(
            home,
            Mail::Account {
                reply,
                user,
                action,
            },
        );
    }

    /// A reply frame addressed to admin pseudo-connection `conn`: the result of its step.
    pub(super) fn admin_frame(&mut self, conn: ConnId, frame: String) {
        if let Some(to) = self.admin.relays.remove(&conn) {
            return match to {
                Some(to) => self.reply_to(to, frame),
                None => {
                    let code = serde_json::from_str::<Value>(&frame)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().and_then(ErrorCode::parse));
                    self.admin_reply(conn, status_of(code), frame)
                }
            };
        }
        let Some(request) = self.admin.requests.remove(&conn) else {
            return;
        };
        let Ok(mut answer) = serde_json::from_str::<Value>(&frame) else {
            // Frames are the engine's own JSON: a parse failure is a bug, but the operator
            // still gets an answer.
            tracing::error!(frame, "an admin step's reply is not JSON");
            return self.admin_error(conn, ErrorCode::Internal, "unreadable step reply");
        };
        match request {
            Request::Opening { conv, body, id } if answer.get("ok").is_some() => {
                self.admin
                    .requests
                    .insert(conn, Request::Waiting { conv: Some(conv) });
                let mail = Mail::Append {
                    reply: ReplyTo {
                        shard: self.cfg.shard,
                        conn,
                        rid: 0,
                    },
                    conv,
                    sender: UserId::SYSTEM,
                    sender_name: SYSTEM_USERNAME.into(),
                    device: ADMIN_DEVICE.into(),
                    id,
                    body,
                };
                self.mail(self.cfg.placement.owner(conv), mail);
            }
            Request::Opening { .. } | Request::Waiting { .. } => {
                if let (Request::Waiting { conv: Some(conv) }, Some(ok)) = (
                    &request,
                    answer.get_mut("ok").and_then(Value::as_object_mut),
                ) {
                    ok.insert("conv".into(), json!(conv.to_string()));
                }
                if let Some(obj) = answer.as_object_mut() {
                    obj.remove("rid");
                }
                let code = answer["error"]["code"].as_str().and_then(ErrorCode::parse);
                self.admin_reply(conn, status_of(code), answer.to_string());
            }
            Request::Creating { .. } => {
                // Creations answer with `AccountsCreated`, never a frame.
                self.admin.requests.insert(conn, request);
            }
        }
    }

    /// One home shard's part of a bulk creation is done.
    pub(super) fn admin_accounts_created(
        &mut self,
        conn: ConnId,
        got: Vec<(usize, Result<(), ErrorCode>)>,
    ) {
        let Some(Request::Creating {
            results,
            parts_left,
            ..
        }) = self.admin.requests.get_mut(&conn)
        else {
            return;
        };
        for (i, result) in got {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(result);
            }
        }
        *parts_left -= 1;
        if *parts_left == 0 {
            self.finish_create(conn);
        }
    }

    fn finish_create(&mut self, conn: ConnId) {
        let Some(Request::Creating { names, results, .. }) = self.admin.requests.remove(&conn)
        else {
            return;
        };
        let mut created = Vec::new();
        let mut failed = Vec::new();
        for (name, result) in names.into_iter().zip(results) {
            match result {
                Some(Ok(())) => created.push(json!(name)),
                Some(Err(code)) => failed.push(json!({ "username": name, "code": code.as_str() })),
                None => failed.push(json!({ "username": name, "code": "internal" })),
            }
        }
        let body = json!({ "ok": { "created": created, "failed": failed } });
        self.admin_reply(conn, 200, body.to_string());
    }

    fn admin_error(&mut self, conn: ConnId, code: ErrorCode, message: &str) {
        self.admin.requests.remove(&conn);
        self.count_error(code);
        let body = json!({ "error": { "code": code.as_str(), "message": message } });
        self.admin_reply(conn, status_of(Some(code)), body.to_string());
    }

    fn admin_reply(&mut self, conn: ConnId, status: u16, body: String) {
        self.out
            .push_back(Output::AdminReply { conn, status, body });
    }

    /// The driver is done with an admin pseudo-connection (answered, or its client left).
    pub(super) fn forget_admin(&mut self, conn: ConnId) {
        self.admin.requests.remove(&conn);
        self.admin.relays.remove(&conn);
    }

    // ---- on the users' home shards ----

    /// Creates accounts homed here, each like `register` (hash off the reactor, then write).
    pub(super) fn create_accounts(&mut self, reply: ReplyTo, users: Vec<(usize, String, String)>) {
        self.admin.next_batch += 1;
        let batch = self.admin.next_batch;
        self.admin.batches.insert(
            batch,
            Batch {
                reply,
                left: users.len(),
                results: Vec::with_capacity(users.len()),
            },
        );
        for (index, name, password) in users {
            let user = UserId::from_username(&name);
            let refusal = match self.get_latest(&keys::user(user)) {
                _ if name == SYSTEM_USERNAME || self.sessions.registering.contains(&user) => {
                    Some(ErrorCode::UsernameTaken)
                }
                Ok(None) => None,
                Ok(Some(_)) => Some(ErrorCode::UsernameTaken),
                Err(e) => {
                    tracing::error!(shard = %self.cfg.shard, error = %e, "storage read failed");
                    Some(ErrorCode::Internal)
                }
            };
            if let Some(code) = refusal {
                self.account_created(batch, index, Err(code));
                continue;
            }
            self.sessions.registering.insert(user);
            self.job(
                Job::Hash { password },
                PendingJob::Account {
                    batch,
                    index,
                    user,
                    name,
                },
            );
        }
    }

    /// The password of a bulk-created account was hashed (`phc`, or `None` on failure).
    pub(super) fn account_hashed(
        &mut self,
        now_ms: u64,
        (batch, index): (u64, usize),
        (user, name): Named,
        phc: Option<String>,
    ) {
        let Some(phc) = phc else {
            self.sessions.registering.remove(&user);
            return self.account_created(batch, index, Err(ErrorCode::Internal));
        };
        let rec = UserRecord {
            name,
            phc,
            created_ms: now_ms,
        };
        self.put(keys::user(user), rec.encode());
        self.defer(Deferred::AccountCreated { batch, index, user });
    }

    /// One account of a batch is durable (`Ok`) or refused.
    pub(super) fn account_created(
        &mut self,
        batch: u64,
        index: usize,
        result: Result<(), ErrorCode>,
    ) {
        let Some(b) = self.admin.batches.get_mut(&batch) else {
            return;
        };
        b.results.push((index, result));
        b.left -= 1;
        if b.left > 0 {
            return;
        }
        let b = self.admin.batches.remove(&batch).expect("present above");
        let mail = Mail::AccountsCreated {
            conn: b.reply.conn,
            results: b.results,
        };
        self.mail(b.reply.shard, mail);
    }

    /// View, disable, enable or kick an account homed here.
    pub(super) fn account_action(&mut self, reply: ReplyTo, user: Named, action: AccountAction) {
        let (id, name) = user;
        let account = match self.latest::<UserRecord>(&keys::user(id)) {
            Ok(Some(account)) => account,
            Ok(None) => return self.error_to(reply, ErrorCode::NoSuchUser, "no such user"),
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let (conns, answer) = match action {
            AccountAction::View => {
                let answer = match self.devices_json(id) {
                    Ok(devices) => json!({
                        "user": name,
                        "created": account.created_ms,
                        "disabled": self.is_disabled(id),
                        "devices": devices,
                    }),
                    Err(e) => return self.storage_error_to(reply, &e),
                };
                return self.reply_to(reply, ok_frame(reply.rid, &answer));
            }
            AccountAction::Disable(true) => {
                if let Err(e) = self.drop_push_tokens(id) {
                    return self.storage_error_to(reply, &e);
                }
                self.put(keys::disabled(id), Vec::new());
                let conns = self.sessions.online.get(&id).cloned().unwrap_or_default();
                let answer = json!({ "user": name, "disabled": true, "closed": conns.len() });
                (conns, answer)
            }
            AccountAction::Disable(false) => {
                self.delete(keys::disabled(id));
                (
                    Vec::new(),
                    json!({ "user": name, "disabled": false, "closed": 0 }),
                )
            }
            AccountAction::Kick { device } => {
                let devices = match device {
                    Some(device) => vec![device],
                    None => match self.device_records(id) {
                        Ok(rows) => rows.into_iter().map(|(name, _)| name).collect(),
                        Err(e) => return self.storage_error_to(reply, &e),
                    },
                };
                let mut conns = Vec::new();
                let mut known = Vec::new();
                for device in devices {
                    let online = self.device_conns(id, &device);
                    let stored = matches!(self.get_latest(&keys::device(id, &device)), Ok(Some(_)));
                    if stored || !online.is_empty() {
                        self.forget_device(id, &device);
                        conns.extend(online);
                        known.push(device);
                    }
                }
                if known.is_empty() {
                    return self.error_to(reply, ErrorCode::NoSuchDevice, "no such device");
                }
                let answer = json!({ "user": name, "devices": known, "closed": conns.len() });
                (conns, answer)
            }
        };
        // Closed now, not once durable: the sockets go at once, and a login racing this reads
        // the pending write (`get_latest`) and is refused.
        for conn in conns {
            self.close(conn, close::KICKED, "closed by an operator");
        }
        self.reply_when_durable(reply, ok_frame(reply.rid, &answer));
    }

    /// An operator disabled this account (including writes not yet durable).
    pub(super) fn is_disabled(&self, user: UserId) -> bool {
        matches!(self.get_latest(&keys::disabled(user)), Ok(Some(_)))
    }

    /// Answers a `login` or `resume` of a disabled account.
    pub(super) fn refuse_disabled(&mut self, conn: ConnId, rid: u64) {
        self.error(
            conn,
            Some(rid),
            ErrorCode::AccountDisabled,
            "this account was disabled by an operator",
        );
    }

    // ---- on the group's owner ----

    /// An operator's notice into group `conv`: a `system` entry, event `notice`.
    pub(super) fn owner_notice(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        body: String,
    ) {
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let refusal = match &state.group {
            _ if !state.exists => Some(ErrorCode::NoSuchConversation),
            None => Some(ErrorCode::NoSuchConversation),
            Some(g) if g.meta.disbanded => Some(ErrorCode::GroupDisbanded),
            Some(_) => None,
        };
        if let Some(code) = refusal {
            self.forget_if_absent(conv);
            let message = match code {
                ErrorCode::GroupDisbanded => "this group was disbanded",
                _ => "no such group",
            };
            return self.error_to(reply, code, message);
        }
        let rid = reply.rid;
        self.append_event(
            now_ms,
            conv,
            Event {
                kind: MessageKind::System,
                target: 0,
                actor,
                device: ADMIN_DEVICE.into(),
                body: format!(r#"{{"event":"notice","body":{body}}}"#),
                reply: Some((
                    reply,
                    Box::new(move |seq| ok_frame(rid, &json!({ "seq": seq }))),
                )),
                also: Vec::new(),
                unindex: Vec::new(),
            },
        );
    }
}

/// A username from an operator request, normalised, with its id; `None` if it cannot name an
/// account (invalid, or the server's own name).
fn named(raw: &str) -> Option<Named> {
    let name = auth::normalise_username(raw).ok()?;
    (name != SYSTEM_USERNAME).then(|| (UserId::from_username(&name), name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Config;
    use crate::storage::MemStorage;

    fn answers(shard: &mut Shard<MemStorage>) -> Vec<(ConnId, u16, String)> {
        let mut out = Vec::new();
        while let Some(o) = shard.poll_output() {
            if let Output::AdminReply { conn, status, body } = o {
                out.push((conn, status, body));
            }
        }
        out
    }

    #[test]
    fn admin_requests_in_flight_are_bounded_and_forgettable() {
        let mut shard = Shard::new(Config::new(ShardId(0), 1, [1; 32]), MemStorage::default());
        let create = |i: usize| AdminOp::CreateUsers {
            users: vec![(format!("user{i}"), "password123".into())],
        };
        // Each creation waits for its hash job, which this test never runs.
        for i in 0..ADMIN_REQUESTS_MAX {
            shard.handle_admin(0, ConnId(i as u64), create(i));
        }
        assert!(answers(&mut shard).is_empty());
        shard.handle_admin(0, ConnId(999), create(999));
        let got = answers(&mut shard);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (ConnId(999), 503));
        assert!(got[0].2.contains("overloaded"), "{}", got[0].2);
        // A request whose client left frees its slot; nothing is answered for it later.
        shard.handle_disconnect(0, ConnId(0));
        shard.handle_admin(0, ConnId(1000), create(1000));
        assert!(
            answers(&mut shard).is_empty(),
            "admitted, waiting for its hash"
        );
    }

    #[test]
    fn invalid_names_are_answered_without_touching_a_shard() {
        let mut shard = Shard::new(Config::new(ShardId(0), 1, [1; 32]), MemStorage::default());
        let op = AdminOp::CreateUsers {
            users: vec![
                ("-bad".into(), "password123".into()),
                ("good1".into(), "short".into()),
            ],
        };
        shard.handle_admin(0, ConnId(1), op);
        let got = answers(&mut shard);
        assert_eq!(got.len(), 1);
        let body: Value = serde_json::from_str(&got[0].2).unwrap();
        assert_eq!(body["ok"]["created"], json!([]));
        assert_eq!(body["ok"]["failed"][0]["code"], "invalid_username");
        assert_eq!(body["ok"]["failed"][1]["code"], "weak_password");
        shard.handle_admin(
            0,
            ConnId(2),
            AdminOp::SetDisabled {
                user: "hermod".into(),
                disabled: true,
            },
        );
        let got = answers(&mut shard);
        assert_eq!(got[0].1, 404, "the server's own name is no account");
    }
}
