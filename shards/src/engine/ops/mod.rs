//! Client requests: the one dispatch from a typed [`Request`] to its handler.
//!
//! `session.rs` reads a frame's envelope and refuses what it can without the op's fields
//! (unknown op, not logged in, rate limits); [`Request::parse`] reads the fields once; then
//! [`Shard::request`] matches on the request — the only place an op is routed. A handler
//! checks the request's shape, then runs it here or mails the shard that owns what it touches.
//!
//! | file | requests |
//! | --- | --- |
//! | `account.rs` | `register`, `login`, `resume`, `logout`, and the password jobs they wait on |
//! | `conv.rs` | `open`, `send`, `read`, `recall`, `edit`, `receipts`, `typing` |
//! | `group.rs` | `group_*` |
//! | `social.rs` | friends, blocks, presence, profiles, devices, push tokens, mutes, DND |
//!
//! The `bot_*` ops are handled in `engine/bots.rs`.
//!
//! `convs`, `sync` and `history` go straight to `gather.rs`; `ping` and `ack` are answered here
//! and in `session.rs`.

mod account;
mod conv;
mod group;
mod social;

use serde_json::json;

pub(in crate::engine) use account::PendingJob;
pub(in crate::engine) use group::group_name;

use super::session::{already_authenticated, Session};
use super::Shard;
use crate::auth;
use crate::ids::{ConnId, ConvId, ShardId, UserId};
use crate::limits::GROUP_INVITE_MAX;
use crate::mail::{ConvOp, FriendOp, Mail, Named, ReplyTo};
use crate::protocol::{ok_frame, ErrorCode, Request};
use crate::storage::{Storage, StorageError};

/// Who asked: the connection, the request's id, and the session it runs as. What every
/// handler of a logged-in request takes first.
#[derive(Clone, Copy)]
pub(in crate::engine) struct Asker<'a> {
    pub conn: ConnId,
    pub rid: u64,
    pub session: &'a Session,
}

impl Asker<'_> {
    /// Where the answer goes: this connection on `shard` (the asker's home shard).
    pub(in crate::engine) fn reply_to(&self, shard: ShardId) -> ReplyTo {
        ReplyTo {
            shard,
            conn: self.conn,
            rid: self.rid,
        }
    }
}

/// What a handler returns: `Err` is answered to the request as an error reply (the handler
/// answers everything else itself, now or once durable).
pub(super) type Outcome = Result<(), (ErrorCode, String)>;

impl<S: Storage> Shard<S> {
    /// Runs one request of `conn` (logged in as `session`, if it is). `text` is the frame, for
    /// the requests that may move to another shard with the connection.
    pub(in crate::engine) fn request(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        rid: u64,
        session: Option<&Session>,
        req: Request<'_>,
        text: &str,
    ) -> Outcome {
        let Some(s) = session else {
            return match req {
                Request::Ping => self.pong(now_ms, conn, rid),
                Request::Register(r) => {
                    self.register(conn, rid, r);
                    Ok(())
                }
                Request::Login(r) => {
                    self.login(now_ms, conn, rid, r, text);
                    Ok(())
                }
                Request::Resume(r) => {
                    self.resume(now_ms, conn, rid, r, text);
                    Ok(())
                }
                _ => Err((ErrorCode::NotAuthenticated, "log in first".into())),
            };
        };
        let by = Asker {
            conn,
            rid,
            session: s,
        };
        match req {
            Request::Ping => self.pong(now_ms, conn, rid),
            Request::Register(_) | Request::Login(_) | Request::Resume(_) => {
                Err(already_authenticated())
            }
            Request::Logout => {
                self.logout(conn, rid, s);
                Ok(())
            }
            Request::Ack(ack) => {
                self.ack(now_ms, conn, &ack);
                Ok(())
            }

            Request::Open(r) => self.open(by, r),
            Request::Send(r) => self.send_message(now_ms, by, r),
            Request::Read(r) => self.read(by, r),
            Request::Recall(r) => self.recall(by, r),
            Request::Edit(r) => self.edit(by, r),
            Request::Receipts(r) => self.receipts(by, r),
            Request::Typing(r) => self.typing_notice(now_ms, by, r),

            Request::Convs => {
                self.start_convs(now_ms, conn, rid, s.user);
                Ok(())
            }
            Request::Sync(r) => {
                self.start_sync(conn, rid, s.user, r);
                Ok(())
            }
            Request::History(r) => {
                let conv = conv_arg(&r.conv)?;
                self.start_history(conn, rid, s.user, conv, (r.before, r.limit));
                Ok(())
            }

            Request::GroupCreate(r) => self.create_group(by, r),
            Request::ChannelCreate(r) => self.create_channel(by, r),
            Request::Subscribe(r) => self.subscribe(by, r),
            Request::Unsubscribe(r) => self.unsubscribe(by, r),
            Request::MediaUpload(r) => self.media_upload(now_ms, by, r),
            Request::MediaDelete(r) => self.media_delete(now_ms, by, r),
            Request::RoomCreate(r) => self.room_create(by, r),
            Request::RoomUpdate(r) => self.room_update(by, r),
            Request::RoomJoin(r) => self.room_join(by, r),
            Request::RoomLeave(r) => self.room_leave(by, r),
            Request::GroupInvite(r) => self.group_invite(by, r),
            Request::GroupJoin(r) => self.group_plain(by, r, ConvOp::Join),
            Request::GroupLeave(r) => self.group_plain(by, r, ConvOp::Leave),
            Request::GroupDisband(r) => self.group_plain(by, r, ConvOp::Disband),
            Request::GroupKick(r) => self.group_on_member(by, r, |user| ConvOp::Kick { user }),
            Request::GroupApprove(r) => {
                self.group_on_member(by, r, |user| ConvOp::Approve { user })
            }
            Request::GroupDecline(r) => {
                self.group_on_member(by, r, |user| ConvOp::Decline { user })
            }
            Request::GroupTransfer(r) => {
                self.group_on_member(by, r, |user| ConvOp::Transfer { user })
            }
            Request::GroupRole(r) => self.group_role(by, r),
            Request::GroupMute(r) => self.group_mute(by, r),
            Request::GroupUpdate(r) => self.group_update(by, r),
            Request::GroupInfo(r) => self.group_query(by, r, |version| ConvOp::Info { version }),
            Request::GroupMembers(r) => {
                self.group_query(by, r, |version| ConvOp::Members { version })
            }

            Request::FriendRequest(r) => self.friend(by, r, None),
            Request::FriendAccept(r) => self.friend(by, r, Some(FriendOp::Accept)),
            Request::FriendDecline(r) => self.friend(by, r, Some(FriendOp::Decline)),
            Request::FriendCancel(r) => self.friend(by, r, Some(FriendOp::Cancel)),
            Request::FriendRemove(r) => self.friend(by, r, Some(FriendOp::Remove)),
            Request::Friends(r) => self
                .friends_list(conn, rid, s.user, r.version)
                .map_err(storage_failed),
            Request::Block(r) => self.block(now_ms, by, r, true),
            Request::Unblock(r) => self.block(now_ms, by, r, false),
            Request::Blocks => self.blocks_list(conn, rid, s.user).map_err(storage_failed),
            Request::Presence(r) => self.presence_pull(by, r),
            Request::PresenceSet(r) => self.presence_change(by, r),
            Request::Profile(r) => self.profile_get(by, r),
            Request::ProfileSet(r) => self.profile_change(by, r),
            Request::Devices => self.devices_list(conn, rid, s.user).map_err(storage_failed),
            Request::DeviceLogout(r) => self.device_logout_other(by, r),
            Request::PushRegister(r) => self.push_register(now_ms, by, r),
            Request::PushUnregister => self.push_unregister(by),
            Request::ConvMute(r) => self.conv_mute(by, r),
            Request::DndSet(r) => self.dnd_set(now_ms, by, r),
            req @ (Request::BotCreate(_)
            | Request::BotToken(_)
            | Request::BotRevoke(_)
            | Request::BotWebhook(_)) => self.bot_op(by, req),
            Request::Bots => self.bots_list(by).map_err(storage_failed),
            Request::KeysPublish(r) => self.keys_publish(now_ms, by, r),
            Request::KeysCount => self.keys_count(by),
            Request::KeysDevices(r) => self.keys_ask(by, r, false),
            Request::KeysClaim(r) => self.keys_ask(by, r, true),
        }
    }

    /// Mails `op` on `conv` to the conversation's owner shard, which runs it (membership and
    /// roles live there) and answers the request.
    fn mail_owner(&mut self, by: Asker, conv: ConvId, op: ConvOp) -> Outcome {
        if !conv.may_have_member(by.session.user) {
            return Err((
                ErrorCode::NotMember,
                "you are not in this conversation".into(),
            ));
        }
        let mail = Mail::Op {
            reply: by.reply_to(self.cfg.shard),
            conv,
            actor: by.session.user,
            actor_name: by.session.name.clone(),
            op,
        };
        self.mail(self.cfg.placement.owner(conv), mail);
        Ok(())
    }

    fn pong(&mut self, now_ms: u64, conn: ConnId, rid: u64) -> Outcome {
        self.send(conn, ok_frame(rid, &json!({ "time": now_ms })));
        Ok(())
    }
}

fn bad(message: String) -> (ErrorCode, String) {
    (ErrorCode::BadRequest, message)
}

fn storage_failed(_: StorageError) -> (ErrorCode, String) {
    (ErrorCode::Internal, "storage read failed".to_owned())
}

pub(super) fn conv_arg(text: &str) -> Result<ConvId, (ErrorCode, String)> {
    ConvId::parse(text).ok_or_else(|| bad("conv is not a conversation id".into()))
}

/// Usernames from a request, normalised, with their ids; the first invalid one is an error.
pub(super) fn resolve(names: &[String]) -> Result<Vec<Named>, (ErrorCode, String)> {
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
    Ok(resolve(std::slice::from_ref(name))?[0].0)
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
