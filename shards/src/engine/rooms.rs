//! Live rooms (docs/channels.md, "Live rooms"): a chat for an event, where keeping up matters
//! more than keeping everything.
//!
//! Only a room's settings are stored (`RoomRecord`). Its owner shard holds the rest in memory:
//! how many joined connections each shard has, the last `ROOM_RECENT_MAX` messages (the
//! window `room_join` answers with), a per-room seq, and the shedding state. Each shard holds
//! which of its connections are in which room. Membership is per connection: joining binds
//! this connection, closing it leaves.
//!
//! A message is decided on by the owner and never written: admitted or **shed**, by this
//! policy, in order:
//! 1. the room's owner and admins are never shed (priority);
//! 2. sampling: while ordinary messages are offered faster than the room's `rate`, each is
//!    admitted with probability `rate / offered` (offered: the greater of the last whole
//!    second's count and the current second's), so under a flood every sender keeps an equal
//!    chance instead of the first ones of each second taking it all;
//! 3. the rate cap: a token bucket of `rate` tokens per second, burst `rate`; no token, shed.
//!
//! The sender of a shed message gets the error `shed` (it was not delivered); an admitted one
//! gets `seq` and `ts`. Admitted messages go out as one `RoomPush` mail per shard that has
//! joined connections — never per member — and each shard offers the frame to its connections
//! (`Output::Offer`: dropped for a connection whose outbox is full, which stays open), so a
//! slow reader never slows the room. No acks, no retries, no storage.
//!
//! Invariants: `Room::shards[s]` is the number of (connection, room) joins shard `s` reported
//! and has not left; a home shard reports a leave exactly once for each join it kept
//! (`RoomLeft`), including for joins whose connection went away before the answer came.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use rand::Rng;
use serde_json::{json, Value};

use super::effects::Deferred;
use super::event::uuid_v7;
use super::ops::{conv_arg, group_name, resolve, Asker, Outcome};
use super::{Frame, Output, Shard};
use crate::ids::{ConnId, ConvId, GroupId, ShardId, UserId};
use crate::limits::{
    ROOM_ADMINS_MAX, ROOM_JOINS_MAX, ROOM_RATE_DEFAULT, ROOM_RATE_MAX, ROOM_RECENT_MAX,
};
use crate::mail::{Mail, Named, ReplyTo, RoomOp};
use crate::model::{Flags, MessageKind};
use crate::protocol::{self as p, ok_frame, ErrorCode};
use crate::storage::{keys, RoomRecord, Storage};

#[derive(Default)]
pub(super) struct Rooms {
    /// Owner side: rooms loaded (only rooms that exist).
    owned: HashMap<ConvId, Room>,
    /// Home side: the connections of this shard in each room.
    joined: HashMap<ConvId, Vec<ConnId>>,
    /// Home side: the rooms each connection is in.
    by_conn: HashMap<ConnId, Vec<ConvId>>,
}

struct Room {
    record: RoomRecord,
    /// Joined connections per shard.
    shards: BTreeMap<ShardId, u32>,
    /// The last admitted message's seq (from 1 since the owner started).
    seq: u64,
    /// The last messages admitted: id, seq, ts, and the message JSON.
    recent: VecDeque<(uuid::Uuid, u64, u64, Arc<str>)>,
    /// The rate cap's bucket (tokens, when last refilled).
    tokens: f64,
    refilled_ms: u64,
    /// Ordinary messages offered in the current second (from `window_ms`) and the last one.
    window_ms: u64,
    window: u32,
    last_window: u32,
}

/// Why a message was shed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shed {
    Sampled,
    Rate,
}

impl Room {
    fn new(record: RoomRecord, now_ms: u64) -> Room {
        Room {
            tokens: f64::from(record.rate),
            record,
            shards: BTreeMap::new(),
            seq: 0,
            recent: VecDeque::new(),
            refilled_ms: now_ms,
            window_ms: now_ms,
            window: 0,
            last_window: 0,
        }
    }

    fn is_admin(&self, user: UserId) -> bool {
        user.0 == self.record.owner || self.record.admins.contains(&user.0)
    }

    /// The shedding policy for one ordinary message (module docs); `draw` is uniform in [0, 1).
    fn admit(&mut self, now_ms: u64, draw: f64) -> Result<(), Shed> {
        let rate = f64::from(self.record.rate);
        let elapsed = now_ms.saturating_sub(self.window_ms);
        if elapsed >= 1_000 {
            self.last_window = if elapsed >= 2_000 { 0 } else { self.window };
            self.window_ms = now_ms;
            self.window = 0;
        }
        self.window += 1;
        let offered = f64::from(self.last_window.max(self.window));
        let since = now_ms.saturating_sub(self.refilled_ms) as f64;
        self.tokens = (self.tokens + since * rate / 1_000.0).min(rate);
        self.refilled_ms = now_ms;
        if offered > rate && draw * offered >= rate {
            return Err(Shed::Sampled);
        }
        if self.tokens < 1.0 {
            return Err(Shed::Rate);
        }
        self.tokens -= 1.0;
        Ok(())
    }

    fn members(&self) -> u64 {
        self.shards.values().map(|&n| u64::from(n)).sum()
    }

    fn info(&self, room: ConvId) -> Value {
        json!({
            "conv": room.to_string(),
            "name": self.record.name,
            "rate": self.record.rate,
            "admins": self.record.admins.len(),
            "members": self.members(),
        })
    }
}

fn room_arg(text: &str) -> Result<ConvId, (ErrorCode, String)> {
    match conv_arg(text)? {
        room if room.is_room() => Ok(room),
        _ => Err((ErrorCode::BadRequest, "conv is not a live room".into())),
    }
}

fn room_rate(rate: Option<u32>) -> Result<Option<u32>, (ErrorCode, String)> {
    match rate {
        Some(r) if !(1..=ROOM_RATE_MAX).contains(&r) => Err((
            ErrorCode::BadRequest,
            format!("rate must be 1 to {ROOM_RATE_MAX} messages per second"),
        )),
        r => Ok(r),
    }
}

fn room_admins(names: Option<&[String]>) -> Result<Option<Vec<UserId>>, (ErrorCode, String)> {
    let Some(names) = names else {
        return Ok(None);
    };
    if names.len() > ROOM_ADMINS_MAX {
        return Err((
            ErrorCode::BadRequest,
            format!("at most {ROOM_ADMINS_MAX} admins"),
        ));
    }
    Ok(Some(resolve(names)?.into_iter().map(|(u, _)| u).collect()))
}

impl<S: Storage> Shard<S> {
    // ---- requests, on the member's shard ----

    pub(super) fn room_create(&mut self, by: Asker, req: p::RoomCreate) -> Outcome {
        let op = RoomOp::Create {
            name: group_name(&req.name)?,
            rate: room_rate(req.rate)?.unwrap_or(ROOM_RATE_DEFAULT),
            admins: room_admins(Some(&req.admins))?.unwrap_or_default(),
        };
        let room = ConvId::Room(GroupId(self.rng.gen_range(1..=u64::MAX)));
        self.mail_room(by, room, op);
        Ok(())
    }

    pub(super) fn room_update(&mut self, by: Asker, req: p::RoomUpdate) -> Outcome {
        let op = RoomOp::Update {
            name: req.name.as_deref().map(group_name).transpose()?,
            rate: room_rate(req.rate)?,
            admins: room_admins(req.admins.as_deref())?,
        };
        self.mail_room(by, room_arg(&req.conv)?, op);
        Ok(())
    }

    pub(super) fn room_join(&mut self, by: Asker, req: p::ConvOnly) -> Outcome {
        let room = room_arg(&req.conv)?;
        let rooms = self
            .rooms
            .by_conn
            .get(&by.conn)
            .map_or(&[][..], Vec::as_slice);
        if !rooms.contains(&room) && rooms.len() >= ROOM_JOINS_MAX {
            return Err((
                ErrorCode::LimitReached,
                format!("at most {ROOM_JOINS_MAX} live rooms per connection"),
            ));
        }
        self.mail_room(by, room, RoomOp::Join);
        Ok(())
    }

    pub(super) fn room_leave(&mut self, by: Asker, req: p::ConvOnly) -> Outcome {
        let room = room_arg(&req.conv)?;
        self.leave_room(by.conn, room);
        self.send(
            by.conn,
            ok_frame(by.rid, &json!({ "conv": room.to_string() })),
        );
        Ok(())
    }

    /// `send` to a live room, from a connection in it: the owner decides (module docs).
    pub(super) fn room_post(
        &mut self,
        now_ms: u64,
        by: Asker,
        room: ConvId,
        req: p::Send,
    ) -> Outcome {
        let joined = self.rooms.by_conn.get(&by.conn);
        if !joined.is_some_and(|rooms| rooms.contains(&room)) {
            return Err((
                ErrorCode::NotMember,
                "join the room first (room_join)".into(),
            ));
        }
        let body = req.body.get();
        p::check_body(body, self.cfg.body_bytes_max)?;
        let op = RoomOp::Post {
            device: by.session.device.clone(),
            id: req.id.unwrap_or_else(|| uuid_v7(now_ms)),
            body: body.to_owned(),
        };
        self.mail_room(by, room, op);
        Ok(())
    }

    fn mail_room(&mut self, by: Asker, room: ConvId, op: RoomOp) {
        let mail = Mail::Room {
            reply: by.reply_to(self.cfg.shard),
            room,
            actor: (by.session.user, by.session.name.clone()),
            op,
        };
        self.mail(self.cfg.placement.owner(room), mail);
    }

    // ---- the member's shard: joins, leaves, pushes ----

    /// The owner counted this join: bind the connection, unless it left or went away meanwhile
    /// (then the count is given back).
    pub(super) fn home_room_joined(&mut self, reply: ReplyTo, room: ConvId, frame: String) {
        let gone = !self.sessions.conns.contains_key(&reply.conn);
        let rooms = self.rooms.by_conn.entry(reply.conn).or_default();
        if gone || rooms.contains(&room) {
            if rooms.is_empty() {
                self.rooms.by_conn.remove(&reply.conn);
            }
            let mail = Mail::RoomLeft {
                room,
                shard: self.cfg.shard,
            };
            self.mail(self.cfg.placement.owner(room), mail);
        } else {
            rooms.push(room);
            self.rooms.joined.entry(room).or_default().push(reply.conn);
        }
        if !gone {
            self.send(reply.conn, frame);
        }
    }

    fn leave_room(&mut self, conn: ConnId, room: ConvId) {
        let Some(rooms) = self.rooms.by_conn.get_mut(&conn) else {
            return;
        };
        let before = rooms.len();
        rooms.retain(|&r| r != room);
        if rooms.len() == before {
            return;
        }
        if rooms.is_empty() {
            self.rooms.by_conn.remove(&conn);
        }
        if let Some(conns) = self.rooms.joined.get_mut(&room) {
            conns.retain(|&c| c != conn);
            if conns.is_empty() {
                self.rooms.joined.remove(&room);
            }
        }
        let mail = Mail::RoomLeft {
            room,
            shard: self.cfg.shard,
        };
        self.mail(self.cfg.placement.owner(room), mail);
    }

    /// A connection went away: it leaves every room it was in.
    pub(super) fn rooms_gone(&mut self, conn: ConnId) {
        for room in self.rooms.by_conn.get(&conn).cloned().unwrap_or_default() {
            self.leave_room(conn, room);
        }
    }

    /// An admitted message for this shard's connections in `room` (not the sender's).
    pub(super) fn home_room_push(&mut self, room: ConvId, frame: &Arc<str>, skip: Option<ConnId>) {
        for &conn in self.rooms.joined.get(&room).into_iter().flatten() {
            if Some(conn) != skip {
                self.stats.offers += 1;
                self.out.push_back(Output::Offer {
                    conn,
                    frame: Frame::Shared(frame.clone()),
                });
            }
        }
    }

    // ---- the owner ----

    /// A loaded room, or `None` if it does not exist.
    fn owned_room(&mut self, now_ms: u64, room: ConvId) -> Result<Option<&mut Room>, ErrorCode> {
        if !self.rooms.owned.contains_key(&room) {
            let key = keys::room(room);
            let record = match self.get_latest(&key) {
                Ok(Some(bytes)) => {
                    RoomRecord::decode(&key, &bytes).map_err(|_| ErrorCode::Internal)?
                }
                Ok(None) => return Ok(None),
                Err(_) => return Err(ErrorCode::Internal),
            };
            self.rooms.owned.insert(room, Room::new(record, now_ms));
        }
        Ok(self.rooms.owned.get_mut(&room))
    }

    pub(super) fn owner_room(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        room: ConvId,
        actor: Named,
        op: RoomOp,
    ) {
        if let Err((code, message)) = self.try_owner_room(now_ms, reply, room, actor, op) {
            self.error_to(reply, code, message);
        }
    }

    fn try_owner_room(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        room: ConvId,
        actor: Named,
        op: RoomOp,
    ) -> Result<(), (ErrorCode, &'static str)> {
        const NO_ROOM: (ErrorCode, &str) = (ErrorCode::NoSuchConversation, "no such live room");
        let internal = |_| (ErrorCode::Internal, "storage read failed");
        if let RoomOp::Create { name, rate, admins } = op {
            if self.owned_room(now_ms, room).map_err(internal)?.is_some() {
                return Err((ErrorCode::Internal, "room id taken; retry"));
            }
            let record = RoomRecord {
                name,
                owner: actor.0 .0,
                admins: admins.into_iter().map(|u| u.0).collect(),
                rate,
                created_ms: now_ms,
            };
            self.put(keys::room(room), record.encode());
            let r = Room::new(record, now_ms);
            let frame = ok_frame(reply.rid, &r.info(room));
            self.rooms.owned.insert(room, r);
            self.defer(Deferred::ReplyTo { to: reply, frame });
            return Ok(());
        }
        let r = self
            .owned_room(now_ms, room)
            .map_err(internal)?
            .ok_or(NO_ROOM)?;
        match op {
            RoomOp::Create { .. } => unreachable!("handled above"),
            RoomOp::Update { name, rate, admins } => {
                if actor.0 .0 != r.record.owner {
                    return Err((ErrorCode::Forbidden, "only the room's owner may do this"));
                }
                if let Some(name) = name {
                    r.record.name = name;
                }
                if let Some(rate) = rate {
                    r.record.rate = rate;
                    r.tokens = r.tokens.min(f64::from(rate));
                }
                if let Some(admins) = admins {
                    r.record.admins = admins.into_iter().map(|u| u.0).collect();
                }
                let (bytes, frame) = (r.record.encode(), ok_frame(reply.rid, &r.info(room)));
                self.put(keys::room(room), bytes);
                self.defer(Deferred::ReplyTo { to: reply, frame });
            }
            RoomOp::Join => {
                *r.shards.entry(reply.shard).or_default() += 1;
                let mut info = r.info(room);
                info["recent"] = r
                    .recent
                    .iter()
                    .filter_map(|(_, _, _, msg)| serde_json::from_str::<Value>(msg).ok())
                    .collect();
                let frame = ok_frame(reply.rid, &info);
                self.mail(reply.shard, Mail::RoomJoined { reply, room, frame });
            }
            RoomOp::Post { device, id, body } => {
                // A retry of a message still in the window answers as the original did.
                if let Some(&(_, seq, ts, _)) = r.recent.iter().find(|(i, ..)| *i == id) {
                    let frame = ok_frame(
                        reply.rid,
                        &json!({ "id": id.to_string(), "seq": seq, "ts": ts }),
                    );
                    self.reply_to(reply, frame);
                    return Ok(());
                }
                if !r.is_admin(actor.0) {
                    let draw = self.rng.gen::<f64>();
                    let r = self.rooms.owned.get_mut(&room).expect("loaded above");
                    if let Err(why) = r.admit(now_ms, draw) {
                        return Err(self.shed(why));
                    }
                }
                self.stats.room_posts += 1;
                let r = self.rooms.owned.get_mut(&room).expect("loaded above");
                r.seq += 1;
                let seq = r.seq;
                let msg: Arc<str> = p::message_json(
                    &room.to_string(),
                    seq,
                    &id,
                    &actor.1,
                    &device,
                    now_ms,
                    &body,
                    (MessageKind::Message, 0, Flags::NONE),
                )
                .into();
                if r.recent.len() == ROOM_RECENT_MAX {
                    r.recent.pop_front();
                }
                r.recent.push_back((id, seq, now_ms, msg.clone()));
                let shards: Vec<ShardId> = r.shards.keys().copied().collect();
                let frame = ok_frame(
                    reply.rid,
                    &json!({ "id": id.to_string(), "seq": seq, "ts": now_ms }),
                );
                self.reply_to(reply, frame);
                let push: Arc<str> = p::message_push(&msg).into();
                for to in shards {
                    self.stats.fanout_mails += 1;
                    let mail = Mail::RoomPush {
                        room,
                        frame: push.clone(),
                        skip: (to == reply.shard).then_some(reply.conn),
                    };
                    self.mail(to, mail);
                }
            }
        }
        Ok(())
    }

    fn shed(&mut self, why: Shed) -> (ErrorCode, &'static str) {
        match why {
            Shed::Sampled => {
                self.stats.room_shed_sampled += 1;
                (
                    ErrorCode::Shed,
                    "sampled out: the room is over its rate; not delivered",
                )
            }
            Shed::Rate => {
                self.stats.room_shed_rate += 1;
                (
                    ErrorCode::Shed,
                    "the room is at its rate cap; not delivered",
                )
            }
        }
    }

    /// A shard's connection left `room` (or went away, or its join came too late).
    pub(super) fn owner_room_left(&mut self, room: ConvId, shard: ShardId) {
        if let Some(r) = self.rooms.owned.get_mut(&room) {
            if let Some(n) = r.shards.get_mut(&shard) {
                *n -= 1;
                if *n == 0 {
                    r.shards.remove(&shard);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(rate: u32) -> Room {
        let record = RoomRecord {
            name: "r".into(),
            owner: 1,
            admins: vec![2],
            rate,
            created_ms: 0,
        };
        Room::new(record, 0)
    }

    #[test]
    fn under_its_rate_a_room_admits_everything() {
        let mut r = room(10);
        for i in 0..100u64 {
            assert_eq!(r.admit(i * 100, 0.99), Ok(()), "message {i} at 10/s");
        }
    }

    #[test]
    fn a_flood_is_sampled_and_capped_at_the_rate() {
        let mut r = room(10);
        // 100 messages per second for 10 seconds (10x the rate), with a spread of draws.
        let mut admitted = 0;
        let mut sampled = 0;
        for i in 0..1_000u64 {
            let draw = (i * 37 % 100) as f64 / 100.0;
            match r.admit(i * 10, draw) {
                Ok(()) => admitted += 1,
                Err(Shed::Sampled) => sampled += 1,
                Err(Shed::Rate) => {}
            }
        }
        // The bucket bounds the admitted to rate x seconds + the initial burst.
        assert!((90..=110).contains(&admitted), "admitted {admitted}");
        assert!(
            sampled > 800,
            "most are sampled out, not cut at the cap: {sampled}"
        );
        assert!(r.is_admin(UserId(1)) && r.is_admin(UserId(2)) && !r.is_admin(UserId(3)));
    }
}
