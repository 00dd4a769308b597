//! Membership changes of groups this shard owns, and their home side. Adding is two steps:
//! each new member's home shard durably indexes the group (`Index` → `Indexed`, one mail per
//! home shard), then the owner re-checks against the membership as it is then and writes the
//! members with the system message. Removing is one step; the removed members' conversation
//! lists are cleaned up once it is durable (`Unindex`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value};

use super::event::Event;
use super::fanout::by_shard;
use super::group::{AddHow, Adding, Moves, Refusal, DISBANDED, NOT_MEMBER};
use super::timers::Timer;
use super::Shard;
use crate::ids::{ConvId, Seq, ShardId, UserId};
use crate::mail::{Mail, Named, ReplyTo};
use crate::protocol::{event_push, ok_frame, ErrorCode};
use crate::storage::{
    keys, FormerMember, GroupMember, JoinRequest, MessageKind, Role, Storage, UserConv,
};

impl<S: Storage> Shard<S> {
    // ---- additions: index on the members' home shards, then commit ----

    pub(super) fn start_add(
        &mut self,
        conv: ConvId,
        reply: ReplyTo,
        actor: Named,
        users: Vec<Named>,
        how: AddHow,
    ) {
        self.owned.next_op += 1;
        let op = self.owned.next_op;
        let placement = self.cfg.placement;
        let group = self.group_mut(conv).expect("caller checked");
        let title = group.meta.name.clone();
        let mut by_home: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for (user, _) in &users {
            by_home
                .entry(placement.home(*user))
                .or_default()
                .push(*user);
        }
        group.adds.insert(
            op,
            Adding {
                reply,
                actor,
                users,
                how,
                left: by_home.len(),
                ok: HashSet::new(),
                missing: HashSet::new(),
            },
        );
        self.cross_node_deadline(Timer::Add(conv, op));
        for (home, users) in by_home {
            let mail = Mail::Index {
                conv,
                op,
                users,
                title: title.clone(),
            };
            self.mail(home, mail);
        }
    }

    /// A home shard indexed (`ok`) or could not find (`missing`) some of an addition's users;
    /// users in neither failed to index.
    pub(super) fn group_indexed(
        &mut self,
        now_ms: u64,
        conv: ConvId,
        op: u64,
        ok: Vec<UserId>,
        missing: Vec<UserId>,
    ) {
        let Some(group) = self.group_mut(conv) else {
            // The state was dropped (a failed commit); its requests were answered then.
            return self.unindex(conv, ok);
        };
        let Some(adding) = group.adds.get_mut(&op) else {
            return self.unindex(conv, ok);
        };
        adding.ok.extend(ok);
        adding.missing.extend(missing);
        adding.left -= 1;
        if adding.left > 0 {
            return;
        }
        let adding = group.adds.remove(&op).expect("present above");
        self.finish_add(now_ms, conv, adding);
    }

    /// An addition's deadline passed (`CROSS_NODE_WAIT_MS`): if a home shard has still not
    /// answered (its node died with the mail), finish with what was answered; the others'
    /// users are listed as `failed`.
    pub(super) fn add_expired(&mut self, now_ms: u64, conv: ConvId, op: u64) {
        let Some(adding) = self.group_mut(conv).and_then(|g| g.adds.remove(&op)) else {
            return; // finished in time
        };
        self.finish_add(now_ms, conv, adding);
    }

    pub(super) fn finish_add(&mut self, now_ms: u64, conv: ConvId, adding: Adding) {
        let max = self.cfg.group_members_max;
        let Adding {
            reply,
            actor,
            users,
            how,
            ok,
            missing,
            ..
        } = adding;
        let group = self.group_mut(conv).expect("caller holds it");
        let names = |pick: &dyn Fn(&UserId) -> bool| -> Vec<String> {
            users
                .iter()
                .filter(|(u, _)| pick(u))
                .map(|(_, n)| n.clone())
                .collect()
        };
        let missing_names = names(&|u| missing.contains(u));
        let failed_names = names(&|u| !ok.contains(u) && !missing.contains(u));
        // Re-check against the group as it is now: it may have changed while indexing.
        let refusal: Option<Refusal> = if how == AddHow::Create {
            (!ok.contains(&actor.0)).then_some((
                ErrorCode::Internal,
                "could not index the group for its creator; retry",
            ))
        } else if group.meta.disbanded {
            Some(DISBANDED)
        } else if how != AddHow::Join && !group.members.contains_key(&actor.0) {
            Some(NOT_MEMBER)
        } else {
            None
        };
        let new: Vec<Named> = users
            .into_iter()
            .filter(|(u, _)| ok.contains(u) && !group.members.contains_key(u))
            .collect();
        let refusal = refusal.or_else(|| {
            (group.members.len() + new.len() > max).then_some((
                ErrorCode::GroupFull,
                "the group would exceed its size limit",
            ))
        });
        if let Some((code, message)) = refusal {
            let stale: Vec<UserId> = new
                .iter()
                .map(|(u, _)| *u)
                .filter(|u| !group.keeps_index(*u))
                .collect();
            if how == AddHow::Create {
                if let Some(state) = self.owned.convs.get_mut(&conv) {
                    state.group = None;
                }
            }
            self.unindex(conv, stale);
            return self.error_to(reply, code, message);
        }
        if new.is_empty() {
            // Everyone was missing, failed, or joined meanwhile: nothing to write (`seq` null).
            let version = self.group_mut(conv).map_or(0, |g| g.meta.members_version);
            let answer = json!({ "conv": conv.to_string(), "seq": null, "version": version,
                                 "added": [], "missing": missing_names, "failed": failed_names });
            let frame = ok_frame(reply.rid, &answer);
            return self.reply_to(reply, frame);
        }
        let next_seq = self.owned.convs[&conv].last_seq + 1;
        let group = self.group_mut(conv).expect("present");
        for (user, name) in &new {
            let member = GroupMember {
                name: name.clone(),
                role: if how == AddHow::Create && *user == actor.0 {
                    Role::Owner
                } else {
                    Role::Member
                },
                joined_seq: next_seq,
                muted: false,
                read_seq: 0,
            };
            group.members.insert(*user, member);
            group.requests.remove(user);
        }
        let added: Vec<String> = new.iter().map(|(_, n)| n.clone()).collect();
        let event = match how {
            AddHow::Create => "created",
            AddHow::Invite => "added",
            AddHow::Join | AddHow::Approve => "joined",
        };
        let mut body = json!({ "event": event, "users": added });
        if how == AddHow::Create {
            body["name"] = json!(group.meta.name);
        }
        for (user, _) in &new {
            self.put_member(conv, *user);
            self.delete(keys::join_request(conv, *user));
            self.delete(keys::group_former(conv, *user));
        }
        let mut answer = json!({
            "conv": conv.to_string(),
            "added": added,
            "missing": missing_names,
            "failed": failed_names,
        });
        if how == AddHow::Create {
            answer["name"] = body["name"].clone();
        }
        let build = move |seq: Seq, version: u64| {
            answer["seq"] = json!(seq);
            answer["version"] = json!(version);
            ok_frame(reply.rid, &answer)
        };
        let seq = self.record_change(
            now_ms,
            reply,
            conv,
            actor,
            body,
            Vec::new(),
            Moves::Members,
            Box::new(build),
        );
        debug_assert_eq!(seq, next_seq, "members joined at the seq of their event");
    }

    /// Join requests for `users` (an approval group); admins' devices hear of them live.
    pub(super) fn request_join(&mut self, now_ms: u64, conv: ConvId, users: Vec<Named>) {
        let group = self.group_mut(conv).expect("caller checked");
        let mut writes = Vec::new();
        for (user, name) in &users {
            if group.requests.contains_key(user) {
                continue;
            }
            let request = JoinRequest {
                name: name.clone(),
                ts_ms: now_ms,
            };
            writes.push((keys::join_request(conv, *user), request.encode()));
            group.requests.insert(*user, request);
        }
        let admins: Vec<UserId> = group.admins().collect();
        for (k, v) in writes {
            self.put(k, v);
        }
        let conv_text = conv.to_string();
        for (to, recipients) in by_shard(admins.into_iter(), self.cfg.placement).iter() {
            for (_, name) in &users {
                let frame: Arc<str> = event_push("group_request", &conv_text, name, None).into();
                let mail = Mail::Ephemeral {
                    frame,
                    recipients: recipients.clone(),
                    skip_user: None,
                };
                self.mail(*to, mail);
            }
        }
    }

    // ---- changes that take effect at once ----

    pub(super) fn remove_member(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        user: UserId,
        event: &str,
    ) {
        let removed_seq = self.owned.convs[&conv].last_seq + 1;
        let group = self.group_mut(conv).expect("caller checked");
        let floor = group.floor(user);
        let Some(member) = group.members.remove(&user) else {
            return;
        };
        let body = json!({ "event": event, "users": [member.name] });
        self.delete(keys::group_member(conv, user));
        // The removed member still reads up to the entry that removes them, also if they were
        // away when it was written (sync, history).
        let former = FormerMember {
            floor: floor.unwrap_or(0),
            removed_seq,
        };
        self.put(keys::group_former(conv, user), former.encode());
        let seq = self.changed(now_ms, reply, conv, actor, body, vec![user], Moves::Members);
        debug_assert_eq!(seq, removed_seq, "the removal entry takes the next seq");
    }

    pub(super) fn put_member(&mut self, conv: ConvId, user: UserId) {
        let Some(member) = self.group_mut(conv).and_then(|g| g.members.get(&user)) else {
            return;
        };
        let bytes = member.encode();
        self.put(keys::group_member(conv, user), bytes);
    }

    /// A change answered with the event's seq and the version it moved: membership and roles
    /// move the members version, settings the info version. `removed` still receive the
    /// event, then lose the conversation from their lists.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn changed(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        body: Value,
        removed: Vec<UserId>,
        moves: Moves,
    ) -> Seq {
        let conv_text = conv.to_string();
        let build = move |seq: Seq, version: u64| {
            ok_frame(
                reply.rid,
                &json!({ "conv": conv_text, "seq": seq, "version": version }),
            )
        };
        self.record_change(
            now_ms,
            reply,
            conv,
            actor,
            body,
            removed,
            moves,
            Box::new(build),
        )
    }

    /// Writes the group's meta record and a system message describing the change; the reply
    /// (built from the message's seq and the new version) goes out once both are durable.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_change(
        &mut self,
        now_ms: u64,
        reply: ReplyTo,
        conv: ConvId,
        actor: Named,
        body: Value,
        removed: Vec<UserId>,
        moves: Moves,
        build: Box<dyn FnOnce(Seq, u64) -> String>,
    ) -> Seq {
        let group = self.group_mut(conv).expect("caller checked");
        let version = if moves == Moves::Members {
            group.fanout = None;
            group.meta.members_version += 1;
            group.meta.members_version
        } else {
            group.meta.info_version
        };
        let meta = group.meta.encode();
        self.put(keys::conv_meta(conv), meta);
        self.append_event(
            now_ms,
            conv,
            Event {
                kind: MessageKind::System,
                target: 0,
                actor,
                device: String::new(),
                body: body.to_string(),
                reply: Some((reply, Box::new(move |seq| build(seq, version)))),
                also: removed.clone(),
                unindex: removed,
            },
        )
    }

    /// Answers every addition still waiting for indexes (the group's state is being dropped).
    pub(super) fn abort_adds(&mut self, conv: ConvId) {
        let Some(group) = self.group_mut(conv) else {
            return;
        };
        let replies: Vec<ReplyTo> = group.adds.drain().map(|(_, a)| a.reply).collect();
        for reply in replies {
            self.error_to(reply, ErrorCode::Internal, "storage write failed; retry");
        }
    }

    // ---- on a member's home shard ----

    /// Index group `conv` for each listed user that exists; answer once durable.
    pub(super) fn home_index(&mut self, conv: ConvId, op: u64, users: Vec<UserId>, title: String) {
        let owner = self.cfg.placement.owner(conv);
        let (mut ok, mut missing) = (Vec::new(), Vec::new());
        for user in users {
            match self.get_latest(&keys::user(user)) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    missing.push(user);
                    continue;
                }
                Err(_) => continue,
            }
            match self.get_latest(&keys::user_conv(user, conv)) {
                Ok(Some(_)) => ok.push(user),
                Ok(None) => {
                    let entry = UserConv {
                        peer: 0,
                        peer_name: title.clone(),
                        read_seq: 0,
                    };
                    self.put(keys::user_conv(user, conv), entry.encode());
                    if conv.is_channel() {
                        // A channel's publishers are subscribed from the start.
                        self.subscribed(user, conv, true);
                    }
                    ok.push(user);
                }
                Err(_) => {}
            }
        }
        let mail = Mail::Indexed {
            conv,
            op,
            ok,
            missing,
        };
        self.defer(super::effects::Deferred::Mail { to: owner, mail });
    }

    /// What `user` may read of group `conv` (loaded): the floor, the last readable seq and
    /// whether they are a member — up to `durable` for a member, up to the entry that removed
    /// them for a former member.
    pub(super) fn group_readable(
        &self,
        conv: ConvId,
        user: UserId,
        durable: Seq,
    ) -> Result<(Seq, Seq, bool), ErrorCode> {
        let state = &self.owned.convs[&conv];
        let group = state.group.as_ref().expect("a group");
        if let Some(floor) = group.floor(user) {
            return Ok((floor, durable, true));
        }
        let key = keys::group_former(conv, user);
        match self
            .get_latest(&key)
            .and_then(|v| v.map(|b| FormerMember::decode(&key, &b)).transpose())
        {
            Ok(Some(f)) => Ok((f.floor, f.removed_seq.min(durable), false)),
            Ok(None) => Err(ErrorCode::NotMember),
            Err(_) => Err(ErrorCode::Internal),
        }
    }

    pub(super) fn home_unindex(&mut self, conv: ConvId, users: &[UserId]) {
        for &user in users {
            self.delete(keys::user_conv(user, conv));
        }
    }
}
