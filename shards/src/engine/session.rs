//! Connections and sessions on this shard: authentication, hand-off to the home shard,
//! heartbeats, pushes and their retries, and the client ops a home shard answers itself.
//!
//! A connection starts unauthenticated on whichever shard accepted it. The first request that
//! names an identity (`register`, `login`: a username; `resume`: a token, verified here first)
//! moves the connection to that user's home shard, which runs the request. So every device of
//! a user lives on one core and delivery to a user is local.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use serde_json::json;

use super::commit::Deferred;
use super::{Output, Shard};
use crate::auth::{self, Job, JobResult, TokenClaims};
use crate::ids::{ConnId, ConvId, GroupId, Seq, UserId, SYSTEM_USERNAME};
use crate::limits::{
    AVATAR_URL_BYTES_MAX, BIO_BYTES_MAX, DISPLAY_NAME_BYTES_MAX, FAILED_LOGINS_MAX,
    GROUP_INVITE_MAX, GROUP_NAME_BYTES_MAX, HELD_FRAMES_MAX, PRESENCE_PULL_MAX, STATUS_BYTES_MAX,
    TYPING_INTERVAL_MS, UNACKED_PUSHES_MAX,
};
use crate::mail::{ConvOp, FriendOp, Mail, Named, ReplyTo};
use crate::protocol::{self as p, close, message_push, ok_frame, ErrorCode};
use crate::storage::{keys, DeviceRecord, Storage, UserConv, UserRecord};

/// What moves with a connection from the accepting shard to the home shard (the driver adds
/// the socket and any unread bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The request that named the identity, to be run on the home shard.
    pub frame: String,
    pub failed_logins: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub user: UserId,
    pub name: String,
    pub device: String,
}

/// A push awaiting its ack. Holds the message JSON shared by every recipient (one allocation
/// per message, not per push); a retry rebuilds the small push envelope around it.
struct Unacked {
    msg: Arc<str>,
    sent_ms: u64,
}

pub(super) struct Conn {
    pub(super) session: Option<Session>,
    /// A `register` or `login` is running (password hash, then commit). Frames arriving
    /// meanwhile wait in `held` and run in order when it ends, so a client may pipeline.
    busy: bool,
    held: VecDeque<String>,
    failed_logins: u32,
    last_in_ms: u64,
    last_ping_ms: u64,
    /// When this connection last sent a `typing` notice that went out.
    last_typing_ms: Option<u64>,
    /// This device said it is away (`presence_set`).
    pub(super) away: bool,
    window_start_ms: u64,
    window_requests: u32,
    unacked: BTreeMap<u64, Unacked>,
}

#[derive(Default)]
pub(super) struct Sessions {
    /// Ordered so iteration (ticks, shutdown) is deterministic: the simulation replays exactly.
    pub conns: BTreeMap<ConnId, Conn>,
    /// Online connections per user homed here.
    pub online: HashMap<UserId, Vec<ConnId>>,
    /// Connections in `online`, all users together.
    pub devices_online: usize,
    /// Users whose registration is hashing or committing: a second registration is refused.
    pub registering: HashSet<UserId>,
    /// Users homed here whose presence may have changed since the last tick.
    pub presence_dirty: BTreeSet<UserId>,
    /// The presence last pushed for each user (absent: offline with no status).
    pub presence_sent: HashMap<UserId, (&'static str, String)>,
    /// When each device last sent a frame, for devices that disconnected since start-up.
    pub last_seen: HashMap<(UserId, String), u64>,
    next_pid: u64,
}

pub(super) enum PendingJob {
    Register {
        conn: ConnId,
        rid: u64,
        user: UserId,
        name: String,
    },
    Login {
        conn: ConnId,
        rid: u64,
        user: UserId,
        name: String,
        device: String,
    },
    /// An account of an operator's bulk creation (`admin.rs`).
    Account {
        batch: u64,
        index: usize,
        user: UserId,
        name: String,
    },
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// The `rid` of a frame that failed to parse as a whole, for its error reply.
fn rid_of(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Rid {
        rid: Option<u64>,
    }
    serde_json::from_str::<Rid>(text).ok().and_then(|r| r.rid)
}

impl<S: Storage> Shard<S> {
    // ---- connection lifecycle ----

    /// A new connection completed its WebSocket handshake on this shard.
    pub fn handle_connect(&mut self, now_ms: u64, conn: ConnId) {
        let fresh = Conn {
            session: None,
            busy: false,
            held: VecDeque::new(),
            failed_logins: 0,
            last_in_ms: now_ms,
            last_ping_ms: now_ms,
            last_typing_ms: None,
            away: false,
            window_start_ms: now_ms,
            window_requests: 0,
            unacked: BTreeMap::new(),
        };
        let previous = self.sessions.conns.insert(conn, fresh);
        assert!(previous.is_none(), "connection ids are never reused");
    }

    /// A connection handed off by another shard arrived; run the request that moved it.
    pub fn handle_adopt(&mut self, now_ms: u64, conn: ConnId, handoff: Handoff) {
        self.handle_connect(now_ms, conn);
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.failed_logins = handoff.failed_logins;
        }
        self.handle_frame(now_ms, conn, &handoff.frame);
    }

    /// The socket closed (by the peer, an error, or after our own `Close`).
    pub fn handle_disconnect(&mut self, _now_ms: u64, conn: ConnId) {
        self.forget(conn);
        self.forget_admin(conn);
    }

    /// Any sign of life that is not a text frame (a pong, a ping).
    pub fn handle_activity(&mut self, now_ms: u64, conn: ConnId) {
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.last_in_ms = now_ms;
        }
    }

    fn forget(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.sessions.conns.remove(&conn)?;
        if let Some(s) = &c.session {
            self.sessions.presence_dirty.insert(s.user);
            self.sessions
                .last_seen
                .insert((s.user, s.device.clone()), c.last_in_ms);
            if let Some(list) = self.sessions.online.get_mut(&s.user) {
                let before = list.len();
                list.retain(|&other| other != conn);
                self.sessions.devices_online -= before - list.len();
                if list.is_empty() {
                    self.sessions.online.remove(&s.user);
                }
            }
        }
        Some(c)
    }

    pub(super) fn close(&mut self, conn: ConnId, code: u16, reason: &'static str) {
        if self.forget(conn).is_some() {
            tracing::debug!(shard = %self.cfg.shard, conn = conn.0, code, reason, "closing a connection");
            self.out.push_back(Output::Close { conn, code, reason });
        }
    }

    // ---- frames ----

    /// A text frame from a client.
    pub fn handle_frame(&mut self, now_ms: u64, conn: ConnId, text: &str) {
        self.frame(now_ms, conn, text);
        self.drain_local(now_ms);
    }

    fn frame(&mut self, now_ms: u64, conn: ConnId, text: &str) {
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        self.stats.frames_in += 1;
        c.last_in_ms = now_ms;
        if now_ms.saturating_sub(c.window_start_ms) >= 1_000 {
            c.window_start_ms = now_ms;
            c.window_requests = 0;
        }
        c.window_requests += 1;
        if c.window_requests > self.cfg.requests_per_sec_max.saturating_mul(10) {
            return self.close(conn, close::POLICY_VIOLATION, close::reason::REQUEST_FLOOD);
        }
        if c.busy {
            if c.held.len() >= HELD_FRAMES_MAX {
                return self.close(conn, close::POLICY_VIOLATION, close::reason::AUTH_BACKLOG);
            }
            c.held.push_back(text.to_owned());
            return;
        }
        let flooding = c.window_requests > self.cfg.requests_per_sec_max;
        let session = c.session.clone();

        let head: p::Head = match serde_json::from_str(text) {
            Ok(head) => head,
            Err(e) => {
                let code = if e.is_syntax() || e.is_eof() {
                    ErrorCode::BadJson
                } else {
                    ErrorCode::BadRequest
                };
                return self.error(conn, rid_of(text), code, &e.to_string());
            }
        };
        let op = head.op.as_ref();
        if op == "ack" {
            return match (parse::<p::Ack>(text), session) {
                (Ok(ack), Some(_)) => self.ack(now_ms, conn, &ack.pids),
                (Err(e), _) => self.error(conn, None, ErrorCode::BadRequest, &e),
                (_, None) => self.error(conn, None, ErrorCode::NotAuthenticated, "log in first"),
            };
        }
        let Some(rid) = head.rid else {
            return self.error(
                conn,
                None,
                ErrorCode::BadRequest,
                "every request but ack needs a numeric rid",
            );
        };
        if flooding {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::RateLimited,
                "too many requests per second",
            );
        }
        let result = match (op, &session) {
            ("ping", _) => {
                self.send(conn, ok_frame(rid, &json!({ "time": now_ms })));
                Ok(())
            }
            ("register" | "login" | "resume", Some(_)) => Err((
                ErrorCode::AlreadyAuthenticated,
                "this connection is logged in".into(),
            )),
            ("register", None) => parse(text)
                .map(|r| self.register(conn, rid, r))
                .map_err(bad),
            ("login", None) => parse(text)
                .map(|r| self.login(now_ms, conn, rid, r, text))
                .map_err(bad),
            ("resume", None) => parse(text)
                .map(|r| self.resume(now_ms, conn, rid, r, text))
                .map_err(bad),
            (op, None) if !matches!(op, "ping" | "register" | "login" | "resume") && is_op(op) => {
                Err((ErrorCode::NotAuthenticated, "log in first".into()))
            }
            ("logout", Some(s)) => {
                self.logout(conn, rid, s);
                Ok(())
            }
            ("open", Some(s)) => parse(text).map(|r| self.open(conn, rid, s, r)).map_err(bad),
            ("send", Some(s)) => parse(text)
                .map(|r| self.send_message(now_ms, conn, rid, s, r))
                .map_err(bad),
            ("convs", Some(s)) => {
                self.start_convs(conn, rid, s.user);
                Ok(())
            }
            ("read", Some(s)) => parse(text).map(|r| self.read(conn, rid, s, r)).map_err(bad),
            ("sync", Some(s)) => parse(text)
                .map(|r| self.start_sync(conn, rid, s.user, r))
                .map_err(bad),
            ("history", Some(s)) => parse(text)
                .map(|r| self.start_history(conn, rid, s.user, r))
                .map_err(bad),
            (op, Some(s)) if op.starts_with("group_") || CONV_OPS.contains(&op) => {
                self.conv_request(now_ms, conn, rid, s, op, text)
            }
            (op, Some(s)) if SOCIAL_OPS.contains(&op) => {
                self.social_request(now_ms, conn, rid, s, op, text)
            }
            (other, _) => Err((ErrorCode::UnknownOp, format!("unknown op {other:?}"))),
        };
        if let Err((code, message)) = result {
            self.error(conn, Some(rid), code, &message);
        }
    }

    // ---- accounts ----

    /// Moves the connection to `user`'s home shard if that is not this one. Returns true if moved.
    fn hand_off_if_remote(&mut self, conn: ConnId, user: UserId, text: &str) -> bool {
        let home = self.home_of(user);
        if home == self.cfg.shard {
            return false;
        }
        if let Some(c) = self.forget(conn) {
            let handoff = Handoff {
                frame: text.to_owned(),
                failed_logins: c.failed_logins,
            };
            self.out.push_back(Output::Handoff {
                conn,
                to: home,
                handoff,
            });
        }
        true
    }

    fn register(&mut self, conn: ConnId, rid: u64, req: p::Register) {
        let name = match auth::normalise_username(&req.username) {
            Ok(name) => name,
            Err(code) => {
                return self.error(
                    conn,
                    Some(rid),
                    code,
                    "usernames are 3-32 of a-z 0-9 _ . - starting with a letter or digit",
                )
            }
        };
        if let Err(code) = auth::check_password(&req.password) {
            return self.error(conn, Some(rid), code, "passwords are 8-256 bytes");
        }
        if name == SYSTEM_USERNAME {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::UsernameTaken,
                "that username is reserved for the server",
            );
        }
        let user = UserId::from_username(&name);
        if self.hand_off_if_remote(conn, user, &registration_frame(rid, &name, &req.password)) {
            return;
        }
        if self.sessions.registering.contains(&user) {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::UsernameTaken,
                "that username is taken",
            );
        }
        match self.get_latest(&keys::user(user)) {
            Ok(Some(_)) => self.error(
                conn,
                Some(rid),
                ErrorCode::UsernameTaken,
                "that username is taken",
            ),
            Ok(None) => {
                self.sessions.registering.insert(user);
                self.set_busy(conn);
                self.job(
                    Job::Hash {
                        password: req.password,
                    },
                    PendingJob::Register {
                        conn,
                        rid,
                        user,
                        name,
                    },
                );
            }
            Err(e) => self.internal_error(conn, Some(rid), &e),
        }
    }

    fn login(&mut self, now_ms: u64, conn: ConnId, rid: u64, req: p::Login, text: &str) {
        let _ = now_ms;
        let Ok(name) = auth::normalise_username(&req.username) else {
            return self.login_failed(conn, rid, ErrorCode::BadCredentials);
        };
        if auth::check_device(&req.device).is_err() {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::BadRequest,
                "device names are 1-64 printable characters",
            );
        }
        let user = UserId::from_username(&name);
        if self.hand_off_if_remote(conn, user, text) || !self.auth_gate(conn, rid) {
            return;
        }
        match self.get_latest(&keys::user(user)) {
            Ok(Some(_)) if self.is_disabled(user) => self.refuse_disabled(conn, rid),
            Ok(Some(bytes)) => match UserRecord::decode(&keys::user(user), &bytes) {
                Ok(rec) if rec.name == name => {
                    self.set_busy(conn);
                    let pending = PendingJob::Login {
                        conn,
                        rid,
                        user,
                        name,
                        device: req.device,
                    };
                    self.job(
                        Job::Verify {
                            password: req.password,
                            phc: rec.phc,
                        },
                        pending,
                    );
                }
                Ok(_) => self.login_failed(conn, rid, ErrorCode::BadCredentials),
                Err(e) => self.internal_error(conn, Some(rid), &e),
            },
            Ok(None) => self.login_failed(conn, rid, ErrorCode::BadCredentials),
            Err(e) => self.internal_error(conn, Some(rid), &e),
        }
    }

    fn resume(&mut self, now_ms: u64, conn: ConnId, rid: u64, req: p::Resume, text: &str) {
        // Verified on the accepting shard before the hand-off, and again here: an HMAC is
        // cheaper than trusting the path the frame took.
        let claims = match self.tokens.verify(&req.token, now_ms / 1000) {
            Ok(claims) => claims,
            Err(code) => return self.login_failed(conn, rid, code),
        };
        if self.hand_off_if_remote(conn, claims.user, text) || !self.auth_gate(conn, rid) {
            return;
        }
        let device_key = keys::device(claims.user, &claims.device);
        let device = match self
            .get_latest(&device_key)
            .and_then(|v| v.map(|b| DeviceRecord::decode(&device_key, &b)).transpose())
        {
            Ok(device) => device,
            Err(e) => return self.internal_error(conn, Some(rid), &e),
        };
        if device.is_none_or(|d| d.nonce != claims.nonce) {
            return self.login_failed(conn, rid, ErrorCode::DeviceRevoked);
        }
        if self.is_disabled(claims.user) {
            return self.refuse_disabled(conn, rid);
        }
        let user_key = keys::user(claims.user);
        match self
            .get_latest(&user_key)
            .and_then(|v| v.map(|b| UserRecord::decode(&user_key, &b)).transpose())
        {
            Ok(Some(rec)) => {
                let frame = ok_frame(rid, &json!({ "user": rec.name, "device": claims.device }));
                let session = Session {
                    user: claims.user,
                    name: rec.name,
                    device: claims.device,
                };
                self.activate(now_ms, conn, session, frame);
            }
            Ok(None) => self.login_failed(conn, rid, ErrorCode::DeviceRevoked),
            Err(e) => self.internal_error(conn, Some(rid), &e),
        }
    }

    /// Refuses authentication after too many failures on this connection.
    fn auth_gate(&mut self, conn: ConnId, rid: u64) -> bool {
        let Some(c) = self.sessions.conns.get(&conn) else {
            return false;
        };
        if c.failed_logins >= FAILED_LOGINS_MAX {
            self.error(
                conn,
                Some(rid),
                ErrorCode::TooManyAttempts,
                "too many failed attempts on this connection",
            );
            self.close(conn, close::POLICY_VIOLATION, close::reason::FAILED_LOGINS);
            return false;
        }
        true
    }

    fn set_busy(&mut self, conn: ConnId) {
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.busy = true;
        }
    }

    /// The running `register`/`login` answered: run the frames held meanwhile, in order,
    /// until one of them makes the connection busy again.
    pub(super) fn end_busy(&mut self, now_ms: u64, conn: ConnId) {
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        c.busy = false;
        loop {
            let Some(c) = self.sessions.conns.get_mut(&conn) else {
                return;
            };
            if c.busy {
                return;
            }
            let Some(text) = c.held.pop_front() else {
                return;
            };
            self.frame(now_ms, conn, &text);
        }
    }

    fn login_failed(&mut self, conn: ConnId, rid: u64, code: ErrorCode) {
        let message = match code {
            ErrorCode::BadCredentials => "wrong username or password",
            ErrorCode::TokenExpired => "the token has expired; log in again",
            ErrorCode::DeviceRevoked => "this device was logged out; log in again",
            _ => "the token is not valid",
        };
        self.error(conn, Some(rid), code, message);
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        c.failed_logins += 1;
        if c.failed_logins >= FAILED_LOGINS_MAX {
            self.close(conn, close::POLICY_VIOLATION, close::reason::FAILED_LOGINS);
        }
    }

    pub(super) fn finish_job(&mut self, now_ms: u64, job: PendingJob, result: JobResult) {
        match (job, result) {
            (
                PendingJob::Register {
                    conn,
                    rid,
                    user,
                    name,
                },
                JobResult::Hashed(Some(phc)),
            ) => {
                let rec = UserRecord {
                    name: name.clone(),
                    phc,
                    created_ms: now_ms,
                };
                self.put(keys::user(user), rec.encode());
                let frame = ok_frame(rid, &json!({ "user": name }));
                self.defer(Deferred::Registered {
                    conn,
                    rid,
                    user,
                    frame,
                });
            }
            (
                PendingJob::Register {
                    conn, rid, user, ..
                },
                _,
            ) => {
                self.sessions.registering.remove(&user);
                self.error(
                    conn,
                    Some(rid),
                    ErrorCode::Internal,
                    "password hashing failed",
                );
                self.end_busy(now_ms, conn);
            }
            (
                PendingJob::Login {
                    conn,
                    rid,
                    user,
                    name,
                    device,
                },
                JobResult::Verified(true),
            ) => {
                if !self.sessions.conns.contains_key(&conn) {
                    return; // gone while hashing: no device record, no token
                }
                if self.is_disabled(user) {
                    self.refuse_disabled(conn, rid);
                    return self.end_busy(now_ms, conn);
                }
                let nonce: u64 = self.rng.gen();
                let issued_s = now_ms / 1000;
                let claims = TokenClaims {
                    user,
                    nonce,
                    issued_s,
                    expires_s: issued_s + self.cfg.token_ttl_s,
                    device: device.clone(),
                };
                let token = self.tokens.mint(&claims);
                self.put(
                    keys::device(user, &device),
                    DeviceRecord {
                        nonce,
                        created_ms: now_ms,
                    }
                    .encode(),
                );
                let frame = ok_frame(
                    rid,
                    &json!({ "token": token, "user": name, "device": device, "expires": claims.expires_s }),
                );
                self.defer(Deferred::LoggedIn {
                    conn,
                    rid,
                    session: Session { user, name, device },
                    frame,
                });
            }
            (PendingJob::Login { conn, rid, .. }, _) => {
                self.login_failed(conn, rid, ErrorCode::BadCredentials);
                self.end_busy(now_ms, conn);
            }
            (
                PendingJob::Account {
                    batch,
                    index,
                    user,
                    name,
                },
                result,
            ) => {
                let phc = match result {
                    JobResult::Hashed(phc) => phc,
                    JobResult::Verified(_) => None,
                };
                self.account_hashed(now_ms, (batch, index), (user, name), phc);
            }
        }
    }

    /// Makes `conn` the session of `session.device`, replacing an older connection of the same
    /// device, and sends `frame` (the successful reply).
    pub(super) fn activate(&mut self, now_ms: u64, conn: ConnId, session: Session, frame: String) {
        if !self.sessions.conns.contains_key(&conn) {
            return;
        }
        for other in self.device_conns(session.user, &session.device) {
            self.close(
                other,
                close::SESSION_REPLACED,
                "this device logged in again elsewhere",
            );
        }
        self.sessions
            .online
            .entry(session.user)
            .or_default()
            .push(conn);
        self.sessions.devices_online += 1;
        self.sessions.presence_dirty.insert(session.user);
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.session = Some(session);
            c.failed_logins = 0;
            c.last_in_ms = now_ms;
        }
        self.send(conn, frame);
    }

    /// The open connections of one device of a user homed here.
    pub(super) fn device_conns(&self, user: UserId, device: &str) -> Vec<ConnId> {
        self.sessions
            .online
            .get(&user)
            .into_iter()
            .flatten()
            .copied()
            .filter(|c| {
                self.sessions
                    .conns
                    .get(c)
                    .and_then(|c| c.session.as_ref())
                    .is_some_and(|s| s.device == device)
            })
            .collect()
    }

    fn logout(&mut self, conn: ConnId, rid: u64, s: &Session) {
        self.delete(keys::device(s.user, &s.device));
        self.defer(Deferred::LoggedOut { conn, rid });
    }

    pub(super) fn logged_out(&mut self, conn: ConnId, rid: u64) {
        self.send(conn, ok_frame(rid, &json!({})));
        self.close(conn, close::NORMAL, "logged out");
    }

    // ---- conversations, from the member's side ----

    /// A conversation id from a request, or `None` after answering `bad_request`.
    pub(super) fn parse_conv(&mut self, conn: ConnId, rid: u64, text: &str) -> Option<ConvId> {
        let conv = ConvId::parse(text);
        if conv.is_none() {
            self.error(
                conn,
                Some(rid),
                ErrorCode::BadRequest,
                "conv is not a conversation id",
            );
        }
        conv
    }

    fn open(&mut self, conn: ConnId, rid: u64, s: &Session, req: p::Open) {
        let peer_name = match auth::normalise_username(&req.user) {
            Ok(name) => name,
            Err(_) => return self.error(conn, Some(rid), ErrorCode::NoSuchUser, "no such user"),
        };
        if peer_name == s.name {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::BadRequest,
                "a conversation needs another user",
            );
        }
        let peer = UserId::from_username(&peer_name);
        let conv = ConvId::direct(s.user, peer);
        let reply = ReplyTo {
            shard: self.cfg.shard,
            conn,
            rid,
        };
        let names = [(s.user, s.name.clone()), (peer, peer_name)];
        self.mail(
            self.cfg.placement.owner(conv),
            Mail::Open {
                reply,
                conv,
                requester: s.user,
                names,
            },
        );
    }

    /// Usernames from a request, normalised, with their ids; the first invalid one is an error.
    fn resolve(names: &[String]) -> Result<Vec<Named>, (ErrorCode, String)> {
        if names.len() > GROUP_INVITE_MAX {
            return Err(bad(format!("at most {GROUP_INVITE_MAX} users per request")));
        }
        names
            .iter()
            .map(|n| match auth::normalise_username(n) {
                Ok(name) => Ok((UserId::from_username(&name), name)),
                Err(_) => Err((ErrorCode::NoSuchUser, format!("no such user {n:?}"))),
            })
            .collect()
    }

    fn resolve_one(name: Option<&String>) -> Result<UserId, (ErrorCode, String)> {
        let name = name.ok_or_else(|| bad("user is required".into()))?;
        Ok(Self::resolve(std::slice::from_ref(name))?[0].0)
    }

    fn conv_arg(text: &str) -> Result<ConvId, (ErrorCode, String)> {
        ConvId::parse(text).ok_or_else(|| bad("conv is not a conversation id".into()))
    }

    /// Friends, blocks, presence and devices: the requester's home shard runs them (with one
    /// hop to the other user's home or the conversation's owner where needed).
    fn social_request(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        rid: u64,
        s: &Session,
        op: &str,
        text: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let storage_failed = |_| (ErrorCode::Internal, "storage read failed".to_owned());
        let reply = ReplyTo {
            shard: self.cfg.shard,
            conn,
            rid,
        };
        let me: Named = (s.user, s.name.clone());
        match op {
            "friends" => {
                let req: p::VersionOnly = parse(text).map_err(bad)?;
                self.friends_list(conn, rid, s.user, req.version)
                    .map_err(storage_failed)
            }
            "blocks" => self.blocks_list(conn, rid, s.user).map_err(storage_failed),
            "profile_set" => {
                let req: p::ProfileSet = parse(text).map_err(bad)?;
                for (field, value, max) in [
                    ("display_name", &req.display_name, DISPLAY_NAME_BYTES_MAX),
                    ("avatar_url", &req.avatar_url, AVATAR_URL_BYTES_MAX),
                    ("bio", &req.bio, BIO_BYTES_MAX),
                ] {
                    if value.as_ref().is_some_and(|v| v.len() > max) {
                        return Err(bad(format!("{field} is at most {max} bytes")));
                    }
                }
                self.profile_set(conn, rid, s.user, req)
                    .map_err(storage_failed)
            }
            "profile" => {
                let req: p::ProfileGet = parse(text).map_err(bad)?;
                let (user, name) = Self::resolve(std::slice::from_ref(&req.user))?.remove(0);
                let mail = Mail::ProfileQuery {
                    reply,
                    user,
                    name,
                    version: req.version,
                };
                self.mail(self.home_of(user), mail);
                Ok(())
            }
            "devices" => self.devices_list(conn, rid, s.user).map_err(storage_failed),
            "device_logout" => {
                let req: p::DeviceArg = parse(text).map_err(bad)?;
                if req.device == s.device {
                    return Err(bad("use logout for this device".into()));
                }
                self.device_logout(conn, rid, s.user, &req.device)
            }
            "presence" => {
                let req: p::Users = parse(text).map_err(bad)?;
                if req.users.len() > PRESENCE_PULL_MAX {
                    return Err(bad(format!("at most {PRESENCE_PULL_MAX} users")));
                }
                let users = Self::resolve_lenient(&req.users);
                self.start_presence(conn, rid, s.user, users);
                Ok(())
            }
            "presence_set" => {
                let req: p::PresenceSet = parse(text).map_err(bad)?;
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
                self.presence_set(conn, rid, s.user, away, req.status)
                    .map_err(storage_failed)
            }
            _ => {
                let req: p::UserArg = parse(text).map_err(bad)?;
                let other = Self::resolve(std::slice::from_ref(&req.user))?.remove(0);
                match op {
                    "block" | "unblock" => {
                        self.set_block(now_ms, reply, s.user, other, op == "block")
                    }
                    _ => {
                        let op = match op {
                            "friend_request" => {
                                let message = req.message.unwrap_or_default();
                                if message.len() > STATUS_BYTES_MAX {
                                    return Err(bad(format!(
                                        "message is at most {STATUS_BYTES_MAX} bytes"
                                    )));
                                }
                                FriendOp::Request { message }
                            }
                            "friend_accept" => FriendOp::Accept,
                            "friend_decline" => FriendOp::Decline,
                            "friend_cancel" => FriendOp::Cancel,
                            _ => FriendOp::Remove,
                        };
                        self.friend_request(reply, me, other, op)
                    }
                }
            }
        }
    }

    /// Like `resolve`, but a name that cannot be a username stays (with an id nobody has),
    /// so a pull answers for every name it was given.
    fn resolve_lenient(names: &[String]) -> Vec<Named> {
        names
            .iter()
            .map(|n| match auth::normalise_username(n) {
                Ok(name) => (UserId::from_username(&name), name),
                Err(_) => (UserId(0), n.clone()),
            })
            .collect()
    }

    /// Group ops, recall and edit, receipts and typing: checked for shape here, run by the
    /// conversation's owner shard (membership and roles live there).
    fn conv_request(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        rid: u64,
        s: &Session,
        op: &str,
        text: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let (conv, op) = match op {
            "group_create" => {
                let req: p::GroupCreate = parse(text).map_err(bad)?;
                let name = req.name.trim().to_owned();
                if name.is_empty() || name.len() > GROUP_NAME_BYTES_MAX {
                    return Err(bad(format!(
                        "name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
                    )));
                }
                let members = Self::resolve(&req.members)?;
                let conv = ConvId::Group(GroupId(self.rng.gen_range(1..=u64::MAX)));
                let op = ConvOp::GroupCreate {
                    name,
                    members,
                    approval: req.approval,
                    history_visible: req.history_visible,
                };
                (conv, op)
            }
            "group_invite" => {
                let req: p::GroupUsers = parse(text).map_err(bad)?;
                let users = Self::resolve(&req.users)?;
                (Self::conv_arg(&req.conv)?, ConvOp::Invite { users })
            }
            "group_join" | "group_leave" | "group_disband" | "typing" => {
                let req: p::ConvOnly = parse(text).map_err(bad)?;
                let op = match op {
                    "group_join" => ConvOp::Join,
                    "group_leave" => ConvOp::Leave,
                    "group_disband" => ConvOp::Disband,
                    _ => {
                        let c = self.sessions.conns.get_mut(&conn).expect("frame's conn");
                        if c.last_typing_ms
                            .is_some_and(|t| now_ms.saturating_sub(t) < TYPING_INTERVAL_MS)
                        {
                            return Err((
                                ErrorCode::RateLimited,
                                format!("one typing notice per {TYPING_INTERVAL_MS} ms"),
                            ));
                        }
                        c.last_typing_ms = Some(now_ms);
                        ConvOp::Typing
                    }
                };
                (Self::conv_arg(&req.conv)?, op)
            }
            "group_kick" | "group_approve" | "group_decline" | "group_transfer" | "group_role"
            | "group_mute" => {
                let req: p::GroupUser = parse(text).map_err(bad)?;
                let conv = Self::conv_arg(&req.conv)?;
                let op = match op {
                    "group_mute" => ConvOp::Mute {
                        user: match &req.user {
                            Some(_) => Some(Self::resolve_one(req.user.as_ref())?),
                            None => None,
                        },
                        muted: req.muted.unwrap_or(true),
                    },
                    "group_role" => ConvOp::Role {
                        user: Self::resolve_one(req.user.as_ref())?,
                        admin: match req.role.as_deref() {
                            Some("admin") => true,
                            Some("member") => false,
                            _ => return Err(bad("role is \"admin\" or \"member\"".into())),
                        },
                    },
                    _ => {
                        let user = Self::resolve_one(req.user.as_ref())?;
                        match op {
                            "group_kick" => ConvOp::Kick { user },
                            "group_approve" => ConvOp::Approve { user },
                            "group_decline" => ConvOp::Decline { user },
                            _ => ConvOp::Transfer { user },
                        }
                    }
                };
                (conv, op)
            }
            "group_update" => {
                let req: p::GroupUpdate = parse(text).map_err(bad)?;
                let name = match req.name {
                    Some(n) => {
                        let n = n.trim().to_owned();
                        if n.is_empty() || n.len() > GROUP_NAME_BYTES_MAX {
                            return Err(bad(format!(
                                "name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
                            )));
                        }
                        Some(n)
                    }
                    None => None,
                };
                let op = ConvOp::Update {
                    name,
                    approval: req.approval,
                    history_visible: req.history_visible,
                };
                (Self::conv_arg(&req.conv)?, op)
            }
            "group_info" | "group_members" => {
                let req: p::Versioned = parse(text).map_err(bad)?;
                let version = req.version;
                let op = if op == "group_info" {
                    ConvOp::Info { version }
                } else {
                    ConvOp::Members { version }
                };
                (Self::conv_arg(&req.conv)?, op)
            }
            "receipts" => {
                let req: p::Receipts = parse(text).map_err(bad)?;
                (
                    Self::conv_arg(&req.conv)?,
                    ConvOp::Receipts { seq: req.seq },
                )
            }
            "recall" | "edit" => {
                let req: p::Amend = parse(text).map_err(bad)?;
                let conv = Self::conv_arg(&req.conv)?;
                let device = s.device.clone();
                let op = match (op, req.body) {
                    ("recall", _) => ConvOp::Recall {
                        seq: req.seq,
                        device,
                    },
                    (_, Some(body)) => {
                        p::check_body(body.get(), self.cfg.body_bytes_max)?;
                        ConvOp::Edit {
                            seq: req.seq,
                            body: body.get().to_owned(),
                            device,
                        }
                    }
                    (_, None) => return Err(bad("edit needs a body".into())),
                };
                (conv, op)
            }
            other => return Err((ErrorCode::UnknownOp, format!("unknown op {other:?}"))),
        };
        if !conv.may_have_member(s.user) {
            return Err((
                ErrorCode::NotMember,
                "you are not in this conversation".into(),
            ));
        }
        let mail = Mail::Op {
            reply: ReplyTo {
                shard: self.cfg.shard,
                conn,
                rid,
            },
            conv,
            actor: s.user,
            actor_name: s.name.clone(),
            op,
        };
        self.mail(self.cfg.placement.owner(conv), mail);
        Ok(())
    }

    fn send_message(&mut self, now_ms: u64, conn: ConnId, rid: u64, s: &Session, req: p::Send) {
        let Some(conv) = self.parse_conv(conn, rid, &req.conv) else {
            return;
        };
        if !conv.may_have_member(s.user) {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::NotMember,
                "you are not in this conversation",
            );
        }
        let body = req.body.get();
        if let Err((code, message)) = p::check_body(body, self.cfg.body_bytes_max) {
            return self.error(conn, Some(rid), code, &message);
        }
        let id = req.id.unwrap_or_else(|| super::owner::uuid_v7(now_ms));
        let mail = Mail::Append {
            reply: ReplyTo {
                shard: self.cfg.shard,
                conn,
                rid,
            },
            conv,
            sender: s.user,
            sender_name: s.name.clone(),
            device: s.device.clone(),
            id,
            body: body.to_owned(),
        };
        self.mail(self.cfg.placement.owner(conv), mail);
    }

    /// `read`: the owner caps the cursor first (`ReadUpTo`), so a cursor never passes what
    /// exists and the owner's copy (receipts, the peer's ticks) is current before the reply;
    /// the home shard then stores it (`home_read_capped`) and answers once durable.
    fn read(&mut self, conn: ConnId, rid: u64, s: &Session, req: p::Read) {
        let Some(conv) = self.parse_conv(conn, rid, &req.conv) else {
            return;
        };
        match self.get_latest(&keys::user_conv(s.user, conv)) {
            Ok(Some(_)) => {
                let mail = Mail::ReadUpTo {
                    reply: ReplyTo {
                        shard: self.cfg.shard,
                        conn,
                        rid,
                    },
                    conv,
                    user: s.user,
                    user_name: s.name.clone(),
                    seq: req.seq,
                };
                let owner = self.cfg.placement.owner(conv);
                self.mail(owner, mail);
            }
            Ok(None) => self.error(
                conn,
                Some(rid),
                ErrorCode::NoSuchConversation,
                "no such conversation",
            ),
            Err(e) => self.internal_error(conn, Some(rid), &e),
        }
    }

    /// The owner's answer to `read`: store the cursor (it never moves back) and reply. A
    /// stored cursor past the conversation's last seq (`last` only grows) is one written
    /// before reads were capped: it is replaced, so its later messages count as unread again.
    pub(super) fn home_read_capped(
        &mut self,
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        (seq, last): (Seq, Seq),
    ) {
        let key = keys::user_conv(user, conv);
        match self
            .get_latest(&key)
            .and_then(|v| v.map(|b| UserConv::decode(&key, &b)).transpose())
        {
            Ok(Some(mut entry)) => {
                entry.read_seq = if entry.read_seq > last {
                    seq
                } else {
                    entry.read_seq.max(seq)
                };
                let frame = ok_frame(
                    reply.rid,
                    &json!({ "conv": conv.to_string(), "read_seq": entry.read_seq }),
                );
                self.put(key, entry.encode());
                self.defer(Deferred::Reply {
                    conn: reply.conn,
                    rid: reply.rid,
                    frame,
                });
            }
            // Removed from the group while the request travelled.
            Ok(None) => self.error_to(
                reply,
                ErrorCode::NotMember,
                "you are not in this conversation",
            ),
            Err(e) => self.storage_error_to(reply, &e),
        }
    }

    /// On a member's home shard: index a new conversation for `user` before the owner lets
    /// anyone send to it, so a conversation list never misses a conversation with messages.
    pub(super) fn home_ensure_member(
        &mut self,
        conv: ConvId,
        user: UserId,
        peer: UserId,
        peer_name: String,
    ) {
        let owner = self.cfg.placement.owner(conv);
        let result = match self.get_latest(&keys::user(user)) {
            // The server's side of a notice conversation: it lists nothing.
            _ if user == UserId::SYSTEM => Ok(()),
            Ok(None) => Err(ErrorCode::NoSuchUser),
            Ok(Some(_)) => match self.get_latest(&keys::user_conv(user, conv)) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => {
                    let entry = UserConv {
                        peer: peer.0,
                        peer_name,
                        read_seq: 0,
                    };
                    self.put(keys::user_conv(user, conv), entry.encode());
                    return self.defer(Deferred::Ensured { owner, conv, user });
                }
                Err(_) => Err(ErrorCode::Internal),
            },
            Err(_) => Err(ErrorCode::Internal),
        };
        self.mail(owner, Mail::MemberEnsured { conv, user, result });
    }

    // ---- pushes ----

    /// Fan-out arriving at a home shard: push to every online device of each recipient.
    pub(super) fn home_deliver(
        &mut self,
        now_ms: u64,
        msg: &Arc<str>,
        recipients: &[UserId],
        skip: Option<ConnId>,
    ) {
        for user in recipients {
            let Some(conns) = self.sessions.online.get(user) else {
                continue;
            };
            let targets: Vec<ConnId> = conns.iter().copied().filter(|&c| Some(c) != skip).collect();
            for conn in targets {
                self.push(now_ms, conn, msg);
            }
        }
    }

    /// An ephemeral push (typing, read receipt) to the online devices of `recipients`.
    /// Not acked, not retried, dropped for a device whose outbox is full.
    pub(super) fn home_ephemeral(
        &mut self,
        frame: &Arc<str>,
        recipients: &[UserId],
        skip_user: Option<UserId>,
    ) {
        for user in recipients {
            if Some(*user) == skip_user {
                continue;
            }
            let Some(conns) = self.sessions.online.get(user) else {
                continue;
            };
            for &conn in conns {
                self.out.push_back(Output::Send {
                    conn,
                    frame: frame.to_string(),
                });
            }
        }
    }

    fn push(&mut self, now_ms: u64, conn: ConnId, msg: &Arc<str>) {
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        if c.unacked.len() >= UNACKED_PUSHES_MAX {
            // The device is not keeping up. Everything is stored: it will sync on reconnect.
            return self.close(conn, close::SLOW_CONSUMER, close::reason::UNACKED_PUSHES);
        }
        self.sessions.next_pid += 1;
        let pid = self.sessions.next_pid;
        let frame = message_push(pid, msg);
        c.unacked.insert(
            pid,
            Unacked {
                msg: msg.clone(),
                sent_ms: now_ms,
            },
        );
        self.stats.pushes += 1;
        self.out.push_back(Output::Send { conn, frame });
    }

    fn ack(&mut self, now_ms: u64, conn: ConnId, pids: &[u64]) {
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        for pid in pids.iter().take(UNACKED_PUSHES_MAX) {
            if let Some(acked) = c.unacked.remove(pid) {
                self.stats
                    .push_ack_ms
                    .observe(now_ms.saturating_sub(acked.sent_ms));
            }
        }
    }

    // ---- time ----

    pub(super) fn tick_sessions(&mut self, now_ms: u64) {
        let timeout = self.cfg.heartbeat_timeout_ms;
        let interval = self.cfg.heartbeat_interval_ms;
        let retry = self.cfg.push_retry_ms;
        let mut dead = Vec::new();
        for (&conn, c) in self.sessions.conns.iter_mut() {
            let silent_ms = now_ms.saturating_sub(c.last_in_ms);
            if silent_ms >= timeout {
                dead.push(conn);
                continue;
            }
            if silent_ms >= interval && now_ms.saturating_sub(c.last_ping_ms) >= interval {
                c.last_ping_ms = now_ms;
                self.out.push_back(Output::Ping { conn });
            }
            for (&pid, unacked) in c.unacked.iter_mut() {
                if now_ms.saturating_sub(unacked.sent_ms) >= retry {
                    unacked.sent_ms = now_ms;
                    self.stats.push_retries += 1;
                    self.out.push_back(Output::Send {
                        conn,
                        frame: message_push(pid, &unacked.msg),
                    });
                }
            }
        }
        for conn in dead {
            self.close(conn, close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
        }
        self.flush_presence();
    }
}

fn bad(message: String) -> (ErrorCode, String) {
    (ErrorCode::BadRequest, message)
}

/// Ops on one conversation that its owner runs (besides `send`), other than the `group_*` ones.
const CONV_OPS: &[&str] = &["recall", "edit", "receipts", "typing"];

/// Friends, blocks, presence and devices (`social.rs`).
const SOCIAL_OPS: &[&str] = &[
    "friend_request",
    "friend_accept",
    "friend_decline",
    "friend_cancel",
    "friend_remove",
    "friends",
    "block",
    "unblock",
    "blocks",
    "presence",
    "presence_set",
    "devices",
    "device_logout",
    "profile",
    "profile_set",
];

/// Ops after `group_` in their name.
const GROUP_OPS: &[&str] = &[
    "create", "invite", "join", "approve", "decline", "leave", "kick", "role", "transfer", "mute",
    "update", "disband", "info", "members",
];

/// Every op this server knows (to tell "log in first" from "unknown op").
fn is_op(op: &str) -> bool {
    const OTHERS: &[&str] = &[
        "ping", "register", "login", "resume", "logout", "open", "send", "convs", "read", "sync",
        "history", "ack",
    ];
    OTHERS.contains(&op)
        || CONV_OPS.contains(&op)
        || SOCIAL_OPS.contains(&op)
        || op
            .strip_prefix("group_")
            .is_some_and(|g| GROUP_OPS.contains(&g))
}

/// The normalised form of a register request, as handed to the home shard.
fn registration_frame(rid: u64, name: &str, password: &str) -> String {
    json!({ "op": "register", "rid": rid, "username": name, "password": password }).to_string()
}

impl<S: Storage> Shard<S> {
    /// The server is stopping: close every connection with 1001 (going away).
    pub fn handle_shutdown(&mut self) {
        let conns: Vec<ConnId> = self.sessions.conns.keys().copied().collect();
        for conn in conns {
            self.close(conn, close::GOING_AWAY, "server shutting down");
        }
    }
}
