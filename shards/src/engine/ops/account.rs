//! Accounts on the user's home shard: `register`, `login`, `resume`, `logout`, and the
//! password jobs (argon2id on the blocking pool) they wait on. A connection that names an
//! identity moves to that identity's home shard first (`hand_off_if_remote`), so these run
//! where the account's records live.

use std::rc::Rc;

use rand::Rng;
use serde_json::json;

use super::super::effects::Deferred;
use super::super::session::Session;
use super::super::Shard;
use crate::auth::{self, Job, JobResult, TokenClaims};
use crate::ids::{ConnId, UserId, SYSTEM_USERNAME};
use crate::limits::FAILED_LOGINS_MAX;
use crate::protocol::{self as p, close, ok_frame, ErrorCode};
use crate::storage::{keys, DeviceRecord, Storage, UserRecord};

pub(in crate::engine) enum PendingJob {
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

impl<S: Storage> Shard<S> {
    pub(in crate::engine) fn register(&mut self, conn: ConnId, rid: u64, req: p::Register) {
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
        if self.hand_off_if_remote(
            conn,
            rid,
            user,
            &registration_frame(rid, &name, &req.password),
        ) {
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

    pub(in crate::engine) fn login(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        rid: u64,
        req: p::Login,
        text: &str,
    ) {
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
        if self.hand_off_if_remote(conn, rid, user, text) || !self.auth_gate(conn, rid) {
            return;
        }
        match self.get_latest(&keys::user(user)) {
            Ok(Some(_)) if self.is_disabled(user) => self.refuse_disabled(conn, rid),
            Ok(Some(bytes)) => match UserRecord::decode(&keys::user(user), &bytes) {
                // A bot has no password: it authenticates with its token (`resume`).
                Ok(rec) if rec.name == name && rec.phc.is_empty() => {
                    self.login_failed(conn, rid, ErrorCode::BadCredentials)
                }
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

    pub(in crate::engine) fn resume(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        rid: u64,
        req: p::Resume,
        text: &str,
    ) {
        // Verified on the accepting shard before the hand-off, and again here: an HMAC is
        // cheaper than trusting the path the frame took.
        let claims = match self.tokens.verify(&req.token, now_ms / 1000) {
            Ok(claims) => claims,
            Err(code) => return self.login_failed(conn, rid, code),
        };
        if self.hand_off_if_remote(conn, rid, claims.user, text) || !self.auth_gate(conn, rid) {
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
    pub(in crate::engine) fn auth_gate(&mut self, conn: ConnId, rid: u64) -> bool {
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

    pub(in crate::engine) fn login_failed(&mut self, conn: ConnId, rid: u64, code: ErrorCode) {
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

    pub(in crate::engine) fn set_busy(&mut self, conn: ConnId) {
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.busy = true;
        }
    }

    /// The running `register`/`login` answered: run the frames held meanwhile, in order,
    /// until one of them makes the connection busy again.
    pub(in crate::engine) fn end_busy(&mut self, now_ms: u64, conn: ConnId) {
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

    pub(in crate::engine) fn finish_job(
        &mut self,
        now_ms: u64,
        job: PendingJob,
        result: JobResult,
    ) {
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
                // A new session on this device name: whatever app registered a push token
                // under the old one registers again (apps do so at every start).
                self.forget_push_token(user, &device);
                // So do its encryption keys: their private halves stayed with the old session.
                self.forget_device_keys(user, &device);
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
    pub(in crate::engine) fn activate(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        session: Session,
        frame: String,
    ) {
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
        let first = !self.sessions.online.contains_key(&session.user);
        self.sessions
            .online
            .entry(session.user)
            .or_default()
            .push(conn);
        self.sessions.devices_online += 1;
        if first {
            self.channels_online(session.user);
        }
        self.sessions.presence_dirty.insert(session.user);
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.session = Some(Rc::new(session));
            c.failed_logins = 0;
            c.last_in_ms = now_ms;
        }
        self.send(conn, frame);
    }

    /// The open connections of one device of a user homed here.
    pub(in crate::engine) fn device_conns(&self, user: UserId, device: &str) -> Vec<ConnId> {
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

    pub(in crate::engine) fn logout(&mut self, conn: ConnId, rid: u64, s: &Session) {
        self.forget_device(s.user, &s.device);
        self.defer(Deferred::LoggedOut { conn, rid });
    }

    pub(in crate::engine) fn logged_out(&mut self, conn: ConnId, rid: u64) {
        self.send(conn, ok_frame(rid, &json!({})));
        self.close(conn, close::NORMAL, "logged out");
    }
}

/// The normalised form of a register request, as handed to the home shard.
fn registration_frame(rid: u64, name: &str, password: &str) -> String {
    json!({ "op": "register", "rid": rid, "username": name, "password": password }).to_string()
}
