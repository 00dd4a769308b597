//! Connections and sessions on this shard: frames in (rate limits, the envelope, the refusals
//! that come before an op's fields are read), hand-off to the home shard, heartbeats, pushes
//! and their retries. What each request does is in `ops/`.
//!
//! A connection starts unauthenticated on whichever shard accepted it. The first request that
//! names an identity (`register`, `login`: a username; `resume`: a token, verified here first)
//! moves the connection to that user's home shard, which runs the request. So every device of
//! a user lives on one core and delivery to a user is local.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use serde::Deserialize;

use super::timers::Timer;
use super::{Output, Shard};
use crate::ids::{ConnId, ConvId, Seq, UserId};
use crate::limits::{HELD_FRAMES_MAX, UNACKED_PUSHES_MAX};
use crate::protocol::{self as p, close, moved_frame, ErrorCode, Op, Request};
use crate::storage::Storage;

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

/// A push awaiting its ack: the frame shared by every recipient of the message (one
/// allocation per message, not per push), resent as is by a retry.
struct Unacked {
    frame: Arc<str>,
    sent_ms: u64,
    /// Retried at least once: the device is treated as asleep for it (`notify_asleep`).
    retried: bool,
}

pub(super) struct Conn {
    /// Shared with the request being run (`Rc`): reading a frame copies no strings.
    pub(super) session: Option<Rc<Session>>,
    /// A `register` or `login` is running (password hash, then commit). Frames arriving
    /// meanwhile wait in `held` and run in order when it ends, so a client may pipeline.
    pub(super) busy: bool,
    pub(super) held: VecDeque<String>,
    pub(super) failed_logins: u32,
    pub(super) last_in_ms: u64,
    last_ping_ms: u64,
    /// When this connection last sent a `typing` notice that went out.
    pub(super) last_typing_ms: Option<u64>,
    /// This device said it is away (`presence_set`).
    pub(super) away: bool,
    window_start_ms: u64,
    window_requests: u32,
    /// By conversation and seq: an ack names a conversation and the highest seq it covers,
    /// which is one range of this map. Bounded by `UNACKED_PUSHES_MAX`.
    unacked: BTreeMap<(ConvId, Seq), Unacked>,
    /// A `Retry` deadline is scheduled for this connection (at most one is).
    retry_armed: bool,
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

    pub(super) fn connect(&mut self, now_ms: u64, conn: ConnId) {
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
            retry_armed: false,
        };
        let previous = self.sessions.conns.insert(conn, fresh);
        assert!(previous.is_none(), "connection ids are never reused");
        let interval = self.cfg.heartbeat_interval_ms;
        self.timers.at(now_ms + interval, Timer::Heartbeat(conn));
    }

    pub(super) fn adopt(&mut self, now_ms: u64, conn: ConnId, handoff: Handoff) {
        self.connect(now_ms, conn);
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.failed_logins = handoff.failed_logins;
        }
        self.frame(now_ms, conn, &handoff.frame);
    }

    pub(super) fn disconnect(&mut self, conn: ConnId) {
        self.forget(conn);
        self.forget_admin(conn);
    }

    pub(super) fn activity(&mut self, now_ms: u64, conn: ConnId) {
        if let Some(c) = self.sessions.conns.get_mut(&conn) {
            c.last_in_ms = now_ms;
        }
    }

    fn forget(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.sessions.conns.remove(&conn)?;
        self.rooms_gone(conn);
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
                    self.channels_offline(s.user);
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

    pub(super) fn frame(&mut self, now_ms: u64, conn: ConnId, text: &str) {
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
        let op = Op::from_name(&head.op);
        if op == Some(Op::Ack) {
            return match (Request::parse(Op::Ack, text), session) {
                (Ok(Request::Ack(ack)), Some(_)) => self.ack(now_ms, conn, &ack),
                (Err(e), _) => self.error(conn, None, ErrorCode::BadRequest, &e),
                _ => self.error(conn, None, ErrorCode::NotAuthenticated, "log in first"),
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
        // Refusals that do not depend on the fields come before reading them.
        let result = match (op, &session) {
            (None, _) => Err((
                ErrorCode::UnknownOp,
                format!("unknown op {:?}", head.op.as_ref()),
            )),
            (Some(op), None) if !op.is_anonymous() => {
                Err((ErrorCode::NotAuthenticated, "log in first".into()))
            }
            (Some(Op::Register | Op::Login | Op::Resume), Some(_)) => Err(already_authenticated()),
            (Some(op), session) => match Request::parse(op, text) {
                Ok(req) => self.request(now_ms, conn, rid, session.as_deref(), req, text),
                Err(e) => Err((ErrorCode::BadRequest, e)),
            },
        };
        if let Err((code, message)) = result {
            self.error(conn, Some(rid), code, &message);
        }
    }

    /// Moves the connection to `user`'s home shard if that is not this one, or tells the client
    /// to connect to the home's node (`moved`) if that is another node. Returns true if either.
    pub(super) fn hand_off_if_remote(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
        text: &str,
    ) -> bool {
        let home = self.home_of(user);
        if home == self.cfg.shard {
            return false;
        }
        if let Some(node) = self.cfg.other_node(home) {
            let frame = moved_frame(rid, &self.cfg.cluster.nodes[node].url);
            self.count_error(ErrorCode::Moved);
            self.send(conn, frame);
            return true;
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

    // ---- pushes ----

    /// Fan-out arriving at a home shard: push `frame` (message `at`) to every online device of
    /// each recipient.
    pub(super) fn home_deliver(
        &mut self,
        now_ms: u64,
        at: (ConvId, Seq),
        frame: &Arc<str>,
        recipients: &[UserId],
        skip: Option<ConnId>,
    ) {
        let mut targets = Vec::new();
        for user in recipients {
            if let Some(conns) = self.sessions.online.get(user) {
                targets.extend(conns.iter().copied().filter(|&c| Some(c) != skip));
            }
        }
        for conn in targets {
            self.push(now_ms, conn, at, frame);
        }
        self.notify_offline(at, frame, recipients);
        self.bot_deliver(frame, recipients);
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
                    frame: frame.clone().into(),
                });
            }
        }
    }

    fn push(&mut self, now_ms: u64, conn: ConnId, at: (ConvId, Seq), frame: &Arc<str>) {
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        if c.unacked.len() >= UNACKED_PUSHES_MAX {
            // The device is not keeping up. Everything is stored: it will sync on reconnect.
            return self.close(conn, close::SLOW_CONSUMER, close::reason::UNACKED_PUSHES);
        }
        c.unacked.insert(
            at,
            Unacked {
                frame: frame.clone(),
                sent_ms: now_ms,
                retried: false,
            },
        );
        if !c.retry_armed {
            c.retry_armed = true;
            self.timers
                .at(now_ms + self.cfg.push_retry_ms, Timer::Retry(conn));
        }
        self.stats.pushes += 1;
        self.out.push_back(Output::Send {
            conn,
            frame: frame.clone().into(),
        });
    }

    /// Every push of each named conversation up to the named seq is acked. Cumulative is
    /// exact: a connection gets a conversation's first pushes in seq order over one TCP stream,
    /// so a device that has seq `n` has every earlier push sent to it. Conversations that are
    /// malformed or have nothing unacked are skipped: the ack is a notification, and a stale
    /// one (after a retry crossed it) is normal.
    pub(super) fn ack(&mut self, now_ms: u64, conn: ConnId, ack: &p::Ack) {
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        for (conv, &upto) in ack.seqs.iter().take(UNACKED_PUSHES_MAX) {
            let Some(conv) = ConvId::parse(conv) else {
                continue;
            };
            while let Some((&at, _)) = c.unacked.range((conv, 0)..=(conv, upto)).next() {
                if let Some(acked) = c.unacked.remove(&at) {
                    self.stats
                        .push_ack_ms
                        .observe(now_ms.saturating_sub(acked.sent_ms));
                }
            }
        }
    }

    // ---- time ----

    /// A connection's heartbeat deadline passed: close it if silent for the timeout, ping it if
    /// silent for the interval (and not pinged within it), then schedule the next check.
    pub(super) fn heartbeat(&mut self, now_ms: u64, conn: ConnId) {
        let (timeout, interval) = (
            self.cfg.heartbeat_timeout_ms,
            self.cfg.heartbeat_interval_ms,
        );
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return; // closed since: its entry just expires
        };
        let silent_ms = now_ms.saturating_sub(c.last_in_ms);
        if silent_ms >= timeout {
            return self.close(conn, close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
        }
        if silent_ms >= interval && now_ms.saturating_sub(c.last_ping_ms) >= interval {
            c.last_ping_ms = now_ms;
            self.out.push_back(Output::Ping { conn });
        }
        let ping_at = c.last_in_ms.max(c.last_ping_ms) + interval;
        let close_at = c.last_in_ms + timeout;
        self.timers
            .at(ping_at.min(close_at), Timer::Heartbeat(conn));
    }

    /// A connection's retry deadline passed: resend every push that has waited
    /// `push_retry_ms` for its ack, then schedule the next retry, if anything is unacked.
    pub(super) fn retry_pushes(&mut self, now_ms: u64, conn: ConnId) {
        let retry = self.cfg.push_retry_ms;
        let Some(c) = self.sessions.conns.get_mut(&conn) else {
            return;
        };
        let mut next: Option<u64> = None;
        // Pushes unacked for a whole retry interval for the first time: an app asleep with
        // its socket open may need waking by a notification.
        let mut asleep = Vec::new();
        for (at, unacked) in c.unacked.iter_mut() {
            if now_ms.saturating_sub(unacked.sent_ms) >= retry {
                if !unacked.retried {
                    unacked.retried = true;
                    asleep.push((*at, unacked.frame.clone()));
                }
                unacked.sent_ms = now_ms;
                self.stats.push_retries += 1;
                self.out.push_back(Output::Send {
                    conn,
                    frame: unacked.frame.clone().into(),
                });
            }
            let due = unacked.sent_ms + retry;
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        c.retry_armed = next.is_some();
        if let Some(at) = next {
            self.timers.at(at, Timer::Retry(conn));
        }
        if let Some(session) = c.session.clone().filter(|_| !asleep.is_empty()) {
            for (at, frame) in asleep {
                self.notify_asleep(session.user, &session.device, at, &frame);
            }
        }
    }
}

pub(super) fn already_authenticated() -> (ErrorCode, String) {
    (
        ErrorCode::AlreadyAuthenticated,
        "this connection is logged in".into(),
    )
}

impl<S: Storage> Shard<S> {
    pub(super) fn shutdown(&mut self) {
        let conns: Vec<ConnId> = self.sessions.conns.keys().copied().collect();
        for conn in conns {
            self.close(conn, close::GOING_AWAY, "server shutting down");
        }
    }
}
