//! Groups this shard owns: settings, members and roles, join requests, versions.
//!
//! The owner is the single writer of a group's membership as of its timeline: every change is
//! a system message in the timeline, written in the same batch as the member records, so
//! "who was a member at seq N" has one answer. Adding members takes two steps, like opening a
//! one-to-one conversation: first every new member's home shard durably indexes the group
//! (`Index` → `Indexed`, one mail per home shard), then the owner re-checks the request
//! against the membership as it is *then*, writes the members and the system message, and
//! answers. Removal is one step (member records deleted with the system message); the removed
//! members' conversation lists are cleaned up after it is durable (`Unindex`), and until then
//! the owner's summary marks the entry stale.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{json, Value};

use super::fanout::{by_shard, Fanout};
use super::Shard;
use crate::ids::{ConvId, Placement, Seq, UserId};
use crate::limits::GROUP_MEMBERS_LIMIT;
use crate::mail::{ConvOp, Named, ReplyTo};
use crate::protocol::{ok_frame, ErrorCode};
use crate::storage::{
    keys, scan_records, GroupMember, GroupMeta, JoinRequest, Role, Storage, StorageError,
};

pub(super) struct Group {
    pub(super) meta: GroupMeta,
    pub(super) members: HashMap<UserId, GroupMember>,
    pub(super) requests: BTreeMap<UserId, JoinRequest>,
    /// Recipients by home shard; rebuilt after a membership change.
    pub(super) fanout: Option<Fanout>,
    /// Additions waiting for the new members' home shards to index the group.
    pub(super) adds: HashMap<u64, Adding>,
    /// A channel (`ConvId::Channel`): the members are its publishers; anyone reads it.
    pub(super) channel: bool,
    /// A channel's subscribers as its subscribers' home shards reported them (0 for a group).
    pub(super) subscribers: u64,
}

pub(super) struct Adding {
    pub(super) reply: ReplyTo,
    pub(super) actor: Named,
    pub(super) users: Vec<Named>,
    pub(super) how: AddHow,
    /// `Indexed` answers still to come (one per home shard asked).
    pub(super) left: usize,
    pub(super) ok: HashSet<UserId>,
    pub(super) missing: HashSet<UserId>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum AddHow {
    Create,
    Invite,
    Join,
    Approve,
}

impl Group {
    pub(super) fn load<S: Storage>(
        storage: &S,
        conv: ConvId,
        meta: &[u8],
    ) -> Result<Group, StorageError> {
        let meta = GroupMeta::decode(&keys::conv_meta(conv), meta)?;
        let members = by_user(scan_records(
            storage,
            &keys::group_member_prefix(conv),
            GROUP_MEMBERS_LIMIT,
        )?);
        let requests = by_user(scan_records(
            storage,
            &keys::join_request_prefix(conv),
            GROUP_MEMBERS_LIMIT,
        )?);
        let subscribers = if conv.is_channel() {
            super::channels::load_subscribers(storage, conv)?
        } else {
            0
        };
        Ok(Group {
            meta,
            members,
            requests,
            fanout: None,
            adds: HashMap::new(),
            channel: conv.is_channel(),
            subscribers,
        })
    }

    pub(super) fn role_of(&self, user: UserId) -> Option<Role> {
        self.members.get(&user).map(|m| m.role)
    }

    pub(super) fn may_send(&self, user: UserId) -> Result<(), ErrorCode> {
        let member = match self.members.get(&user) {
            Some(member) => member,
            // A subscriber: only publishers post in a channel.
            None if self.channel => return Err(ErrorCode::Forbidden),
            None => return Err(ErrorCode::NotMember),
        };
        if self.meta.disbanded {
            return Err(ErrorCode::GroupDisbanded);
        }
        if member.muted || (self.meta.muted_all && member.role < Role::Admin) {
            return Err(ErrorCode::Muted);
        }
        Ok(())
    }

    /// Moves a member's cursor forward in memory only; whether it moved.
    pub(super) fn advance_read(&mut self, user: UserId, seq: Seq) -> bool {
        match self.members.get_mut(&user) {
            Some(member) if member.read_seq < seq => {
                member.read_seq = seq;
                true
            }
            _ => false,
        }
    }

    /// A member's record as it is now, to write.
    pub(super) fn member_record(&self, conv: ConvId, user: UserId) -> Option<(Vec<u8>, Vec<u8>)> {
        let member = self.members.get(&user)?;
        Some((keys::group_member(conv, user), member.encode()))
    }

    /// The owner's copy of a member's read cursor.
    pub(super) fn read_seq(&self, user: UserId) -> Option<Seq> {
        self.members.get(&user).map(|m| m.read_seq)
    }

    /// The highest seq `user` may not read (0: all history), or `None` for a non-member.
    /// Anyone reads all of a channel: channels are public.
    pub(super) fn floor(&self, user: UserId) -> Option<Seq> {
        if self.channel {
            return Some(0);
        }
        let member = self.members.get(&user)?;
        Some(if self.meta.history_visible {
            0
        } else {
            member.joined_seq.saturating_sub(1)
        })
    }

    pub(super) fn fanout(&mut self, placement: Placement) -> Fanout {
        if let Some(f) = &self.fanout {
            return f.clone();
        }
        let f = by_shard(self.members.keys().copied(), placement);
        self.fanout = Some(f.clone());
        f
    }

    /// Whether `user`'s conversation-list entry must stay: a member, or being added. Clean-ups
    /// (`Unindex`) skip such users, so a removal racing with a re-join never strands a member
    /// without the entry (mail to a home shard is FIFO, so the check at send time suffices).
    pub(super) fn keeps_index(&self, user: UserId) -> bool {
        self.members.contains_key(&user)
            || self
                .adds
                .values()
                .any(|a| a.users.iter().any(|(u, _)| *u == user))
    }

    pub(super) fn name_of(&self, user: UserId) -> String {
        self.members
            .get(&user)
            .map(|m| m.name.clone())
            .or_else(|| self.requests.get(&user).map(|r| r.name.clone()))
            .unwrap_or_default()
    }

    pub(super) fn admins(&self) -> impl Iterator<Item = UserId> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| m.role >= Role::Admin)
            .map(|(&u, _)| u)
    }

    pub(super) fn info_json(&self, conv: ConvId) -> Value {
        if self.channel {
            return json!({
                "conv": conv.to_string(),
                "name": self.meta.name,
                "owner": self.name_of(UserId(self.meta.owner)),
                "channel": true,
                "disbanded": self.meta.disbanded,
                "publishers": self.members.len(),
                "subscribers": self.subscribers,
                "version": self.meta.info_version,
            });
        }
        json!({
            "conv": conv.to_string(),
            "name": self.meta.name,
            "owner": self.name_of(UserId(self.meta.owner)),
            "approval": self.meta.approval,
            "history_visible": self.meta.history_visible,
            "muted_all": self.meta.muted_all,
            "disbanded": self.meta.disbanded,
            "members": self.members.len(),
            "version": self.meta.info_version,
        })
    }

    pub(super) fn members_json(&self, conv: ConvId, with_requests: bool) -> Value {
        let mut members: Vec<&GroupMember> = self.members.values().collect();
        members.sort_by(|a, b| b.role.cmp(&a.role).then_with(|| a.name.cmp(&b.name)));
        let list: Vec<Value> = members
            .iter()
            .map(|m| json!({ "user": m.name, "role": m.role.name(), "muted": m.muted }))
            .collect();
        let mut out = json!({
            "conv": conv.to_string(),
            "version": self.meta.members_version,
            "members": list,
        });
        if with_requests {
            out["requests"] = self
                .requests
                .values()
                .map(|r| json!({ "user": r.name, "ts": r.ts_ms }))
                .collect();
        }
        out
    }
}

/// Records under a group's per-user keys, by user. A key without a user id at its end is
/// skipped, not fatal.
fn by_user<R, C: FromIterator<(UserId, R)>>(rows: Vec<(Vec<u8>, R)>) -> C {
    rows.into_iter()
        .filter_map(|(k, r)| Some((keys::user_of_group_key(&k)?, r)))
        .collect()
}

/// Which version a change moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Moves {
    /// Membership, roles, member mutes: `group_members` pulls see it.
    Members,
    /// Settings, owner, disbanding: `group_info` pulls see it.
    Info,
}

/// Why a request was refused: the code and its message.
pub(super) type Refusal = (ErrorCode, &'static str);

pub(super) const NOT_MEMBER: Refusal = (ErrorCode::NotMember, "you are not in this group");
pub(super) const NOT_ADMIN: Refusal = (ErrorCode::Forbidden, "only the group's admins may do this");
pub(super) const NOT_OWNER: Refusal = (ErrorCode::Forbidden, "only the group's owner may do this");
pub(super) const DISBANDED: Refusal = (ErrorCode::GroupDisbanded, "this group was disbanded");
pub(super) const NOT_A_GROUP: Refusal = (ErrorCode::BadRequest, "this is not a group");

impl<S: Storage> Shard<S> {
    pub(super) fn group_mut(&mut self, conv: ConvId) -> Option<&mut Group> {
        self.owned.convs.get_mut(&conv)?.group.as_deref_mut()
    }

    /// `group_create`: a fresh id drawn by the requester's shard; the creator becomes owner.
    pub(super) fn group_create(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        op: ConvOp,
    ) {
        let ConvOp::GroupCreate {
            name,
            members,
            approval,
            history_visible,
        } = op
        else {
            unreachable!("called for group_create only");
        };
        let max = self.cfg.group_members_max;
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.error_to(reply, ErrorCode::Internal, &e.to_string()),
        };
        if state.exists || state.group.is_some() {
            // Two random 64-bit ids met: vanishingly rare, and the client may simply retry.
            return self.error_to(reply, ErrorCode::Internal, "group id taken; retry");
        }
        let mut users: Vec<Named> = vec![actor.clone()];
        for m in members {
            if !users.iter().any(|(u, _)| *u == m.0) {
                users.push(m);
            }
        }
        if users.len() > max {
            return self.error_to(
                reply,
                ErrorCode::GroupFull,
                "more members than a group may have",
            );
        }
        state.group = Some(Box::new(Group {
            meta: GroupMeta {
                name,
                owner: actor.0 .0,
                created_ms: now_ms,
                info_version: 1,
                members_version: 0,
                approval,
                history_visible,
                muted_all: false,
                disbanded: false,
            },
            members: HashMap::new(),
            requests: BTreeMap::new(),
            fanout: None,
            adds: HashMap::new(),
            channel: conv.is_channel(),
            subscribers: 0,
        }));
        self.start_add(conv, reply, actor, users, AddHow::Create);
    }

    /// Every other group request, with the group's state loaded and existing.
    pub(super) fn group_op(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        op: ConvOp,
    ) {
        if let Err((code, message)) = self.try_group_op(now_ms, reply, conv, actor, op) {
            self.error_to(reply, code, message);
        }
    }

    fn try_group_op(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        op: ConvOp,
    ) -> Result<(), Refusal> {
        let max = self.cfg.group_members_max;
        let group = self.group_mut(conv).ok_or(NOT_A_GROUP)?;
        let me = group.members.get(&actor.0).cloned();
        let my_role = me.as_ref().map(|m| m.role);
        let is_admin = my_role.is_some_and(|r| r >= Role::Admin);
        let is_owner = my_role == Some(Role::Owner);
        let rid = reply.rid;
        // Reads first: allowed after disbanding.
        match op {
            ConvOp::Info { version } => {
                let frame = if version == Some(group.meta.info_version) {
                    not_modified(rid, conv, group.meta.info_version)
                } else {
                    ok_frame(rid, &group.info_json(conv))
                };
                self.reply_to(reply, frame);
                return Ok(());
            }
            ConvOp::Members { version } => {
                me.as_ref().ok_or(NOT_MEMBER)?;
                let frame = if version == Some(group.meta.members_version) {
                    not_modified(rid, conv, group.meta.members_version)
                } else {
                    ok_frame(rid, &group.members_json(conv, is_admin))
                };
                self.reply_to(reply, frame);
                return Ok(());
            }
            ConvOp::Receipts { seq } => {
                me.as_ref().ok_or(NOT_MEMBER)?;
                let read = group.members.values().filter(|m| m.read_seq >= seq).count();
                let total = group.members.len();
                let frame = ok_frame(
                    rid,
                    &json!({ "conv": conv.to_string(), "seq": seq, "read": read, "members": total }),
                );
                self.reply_to(reply, frame);
                return Ok(());
            }
            _ => {}
        }
        if group.meta.disbanded {
            return Err(DISBANDED);
        }
        if group.channel {
            match op {
                ConvOp::Join | ConvOp::Approve { .. } | ConvOp::Decline { .. } => {
                    return Err((ErrorCode::BadRequest, "a channel is joined by `subscribe`"))
                }
                ConvOp::Invite { .. } if !is_admin => return Err(NOT_ADMIN),
                _ => {}
            }
        }
        match op {
            ConvOp::Join => {
                if me.is_some() {
                    return Err((ErrorCode::AlreadyMember, "you are in this group"));
                }
                if group.members.len() >= max {
                    return Err((ErrorCode::GroupFull, "this group is full"));
                }
                if group.meta.approval {
                    self.request_join(now_ms, conv, vec![actor.clone()]);
                    let frame = ok_frame(
                        rid,
                        &json!({ "conv": conv.to_string(), "requested": [actor.1] }),
                    );
                    self.reply_to(reply, frame);
                } else {
                    self.start_add(conv, reply, actor.clone(), vec![actor], AddHow::Join);
                }
            }
            ConvOp::Invite { users } => {
                me.as_ref().ok_or(NOT_MEMBER)?;
                let new: Vec<Named> = users
                    .into_iter()
                    .filter(|(u, _)| !group.members.contains_key(u))
                    .collect();
                if group.members.len() + new.len() > max {
                    return Err((
                        ErrorCode::GroupFull,
                        "the group would exceed its size limit",
                    ));
                }
                if !is_admin && group.meta.approval {
                    let names: Vec<String> = new.iter().map(|(_, n)| n.clone()).collect();
                    self.request_join(now_ms, conv, new);
                    let frame = ok_frame(
                        rid,
                        &json!({ "conv": conv.to_string(), "requested": names }),
                    );
                    self.reply_to(reply, frame);
                } else if new.is_empty() {
                    // Everyone named is a member already: nothing is written (`seq` null).
                    let frame = ok_frame(
                        rid,
                        &json!({ "conv": conv.to_string(), "seq": null,
                                 "version": group.meta.members_version,
                                 "added": [], "missing": [], "failed": [] }),
                    );
                    self.reply_to(reply, frame);
                } else {
                    self.start_add(conv, reply, actor, new, AddHow::Invite);
                }
            }
            ConvOp::Approve { user } => {
                if !is_admin {
                    return Err(NOT_ADMIN);
                }
                let request = group
                    .requests
                    .get(&user)
                    .ok_or((ErrorCode::NoSuchUser, "no such join request"))?;
                let named = (user, request.name.clone());
                if group.members.len() >= max {
                    return Err((ErrorCode::GroupFull, "this group is full"));
                }
                self.start_add(conv, reply, actor, vec![named], AddHow::Approve);
            }
            ConvOp::Decline { user } => {
                if !is_admin {
                    return Err(NOT_ADMIN);
                }
                if group.requests.remove(&user).is_none() {
                    return Err((ErrorCode::NoSuchUser, "no such join request"));
                }
                self.delete(keys::join_request(conv, user));
                let frame = ok_frame(rid, &json!({ "conv": conv.to_string() }));
                self.reply_when_durable(reply, frame);
            }
            ConvOp::Leave => {
                let me = me.ok_or(NOT_MEMBER)?;
                if me.role == Role::Owner {
                    return Err((
                        ErrorCode::OwnerCannotLeave,
                        "hand the group to another member (group_transfer) or disband it",
                    ));
                }
                self.remove_member(now_ms, reply, conv, actor.clone(), actor.0, "left");
            }
            ConvOp::Kick { user } => {
                let target = group.members.get(&user).ok_or(NOT_MEMBER_TARGET)?;
                if user == actor.0 {
                    return Err((ErrorCode::BadRequest, "use group_leave to leave"));
                }
                if !is_admin || target.role >= my_role.unwrap_or(Role::Member) {
                    return Err((
                        ErrorCode::Forbidden,
                        "admins remove members; only the owner removes admins",
                    ));
                }
                self.remove_member(now_ms, reply, conv, actor, user, "removed");
            }
            ConvOp::Role { user, admin } => {
                if !is_owner {
                    return Err(NOT_OWNER);
                }
                let target = group.members.get_mut(&user).ok_or(NOT_MEMBER_TARGET)?;
                if target.role == Role::Owner {
                    return Err((
                        ErrorCode::BadRequest,
                        "the owner's role changes by transfer",
                    ));
                }
                target.role = if admin { Role::Admin } else { Role::Member };
                let body =
                    json!({ "event": "role", "users": [target.name], "role": target.role.name() });
                self.put_member(conv, user);
                self.changed(now_ms, reply, conv, actor, body, Vec::new(), Moves::Members);
            }
            ConvOp::Transfer { user } => {
                if !is_owner {
                    return Err(NOT_OWNER);
                }
                if user == actor.0 {
                    return Err((ErrorCode::BadRequest, "you own this group already"));
                }
                let target = group.members.get_mut(&user).ok_or(NOT_MEMBER_TARGET)?;
                target.role = Role::Owner;
                let body = json!({ "event": "owner", "users": [target.name] });
                if let Some(old) = group.members.get_mut(&actor.0) {
                    old.role = Role::Admin;
                }
                group.meta.owner = user.0;
                group.meta.info_version += 1;
                self.put_member(conv, user);
                self.put_member(conv, actor.0);
                self.changed(now_ms, reply, conv, actor, body, Vec::new(), Moves::Members);
            }
            ConvOp::Mute { user: None, muted } => {
                if !is_admin {
                    return Err(NOT_ADMIN);
                }
                group.meta.muted_all = muted;
                group.meta.info_version += 1;
                let body = json!({ "event": "muted", "all": true, "muted": muted });
                self.changed(now_ms, reply, conv, actor, body, Vec::new(), Moves::Info);
            }
            ConvOp::Mute {
                user: Some(user),
                muted,
            } => {
                let target = group.members.get_mut(&user).ok_or(NOT_MEMBER_TARGET)?;
                if !is_admin || target.role >= my_role.unwrap_or(Role::Member) {
                    return Err((
                        ErrorCode::Forbidden,
                        "admins mute members; only the owner mutes admins",
                    ));
                }
                target.muted = muted;
                let body = json!({ "event": "muted", "users": [target.name], "muted": muted });
                self.put_member(conv, user);
                self.changed(now_ms, reply, conv, actor, body, Vec::new(), Moves::Members);
            }
            ConvOp::Update {
                name,
                approval,
                history_visible,
            } => {
                if !is_admin {
                    return Err(NOT_ADMIN);
                }
                let mut body = json!({ "event": "updated" });
                if let Some(name) = name {
                    body["name"] = json!(name);
                    group.meta.name = name;
                }
                if let Some(approval) = approval {
                    body["approval"] = json!(approval);
                    group.meta.approval = approval;
                }
                if let Some(visible) = history_visible {
                    body["history_visible"] = json!(visible);
                    group.meta.history_visible = visible;
                }
                group.meta.info_version += 1;
                self.changed(now_ms, reply, conv, actor, body, Vec::new(), Moves::Info);
            }
            ConvOp::Disband => {
                if !is_owner {
                    return Err(NOT_OWNER);
                }
                group.meta.disbanded = true;
                group.meta.info_version += 1;
                let body = json!({ "event": "disbanded" });
                self.changed(now_ms, reply, conv, actor, body, Vec::new(), Moves::Info);
            }
            ConvOp::GroupCreate { .. }
            | ConvOp::Info { .. }
            | ConvOp::Members { .. }
            | ConvOp::Receipts { .. }
            | ConvOp::Recall { .. }
            | ConvOp::Edit { .. }
            | ConvOp::Notice { .. }
            | ConvOp::Typing => unreachable!("routed elsewhere"),
        }
        Ok(())
    }
}

const NOT_MEMBER_TARGET: Refusal = (ErrorCode::NotMember, "that user is not in this group");

fn not_modified(rid: u64, conv: ConvId, version: u64) -> String {
    ok_frame(
        rid,
        &json!({ "conv": conv.to_string(), "not_modified": true, "version": version }),
    )
}
