//! Channels (docs/channels.md): one-to-many broadcast with a subscription instead of a
//! membership.
//!
//! A channel is a conversation (`ConvId::Channel`) whose owner holds group state for its
//! *publishers* only (the members of `engine/group.rs`, who alone may post) plus a subscriber
//! count. A subscription is nothing but the subscriber's conversation-index entry on their
//! home shard (`'C' user conv`, read cursor included), so subscribing writes one record there
//! and tells the owner `+1`: no per-subscriber state on the owner, and unread counts stay
//! `last_seq - read_seq` as for any conversation.
//!
//! Delivery is best effort: the owner sends one `Broadcast` mail per shard of the cluster —
//! never per subscriber — and each shard offers the frame (`Output::Offer`) to the online
//! devices of the subscribers homed there, from an in-memory index of online subscribers kept
//! up to date as users come and go. No unacked record, no retry, no offline notification: a
//! device that missed a post (offline, a full outbox, a dropped connection) sees a gap in the
//! seqs and reads it by `sync` or `history`, like everything else stored.
//!
//! Invariants: `online[conv]` holds exactly the users homed here who are online and whose
//! `subs` list names `conv`; `subs` holds an entry for every online user homed here (possibly
//! empty) and for no one else.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use super::effects::Deferred;
use super::ops::{conv_arg, Asker, Outcome};
use super::{Frame, Output, Shard};
use crate::ids::{ConnId, ConvId, Seq, UserId};
use crate::limits::CHANNEL_SUBSCRIPTIONS_MAX;
use crate::mail::{Mail, ReplyTo};
use crate::protocol::{self as p, ok_frame, ErrorCode};
use crate::storage::{keys, ChannelStats, Storage, StorageError, UserConv};

#[derive(Default)]
pub(super) struct Channels {
    /// Home side: the channels each online user homed here subscribes to.
    subs: HashMap<UserId, Vec<ConvId>>,
    /// Home side: online subscribers homed here, per channel.
    online: HashMap<ConvId, HashSet<UserId>>,
    /// Owner side: channels whose subscriber count moved since the last tick.
    pub(super) counts_dirty: HashSet<ConvId>,
}

impl<S: Storage> Shard<S> {
    // ---- home side: subscriptions ----

    /// `subscribe`: ask the owner whether the channel exists (and its last seq), then store the
    /// subscription (`home_subscribe`). Subscribing again answers the current subscription.
    pub(super) fn subscribe(&mut self, by: Asker, req: p::ConvOnly) -> Outcome {
        let conv = channel_arg(&req.conv)?;
        let user = by.session.user;
        if self.subscription(user, conv)?.is_none()
            && self.channels.subs.get(&user).map_or(0, Vec::len) >= CHANNEL_SUBSCRIPTIONS_MAX
        {
            return Err((
                ErrorCode::LimitReached,
                format!("at most {CHANNEL_SUBSCRIPTIONS_MAX} channel subscriptions"),
            ));
        }
        let mail = Mail::Subscribe {
            reply: by.reply_to(self.cfg.shard),
            conv,
            user,
        };
        self.mail(self.cfg.placement.owner(conv), mail);
        Ok(())
    }

    /// The owner's answer to `Subscribe`: store the subscription with its cursor at the
    /// channel's last seq (what was posted before counts as read; `history` still reads it)
    /// and answer once durable. Checked again here: a second `subscribe` may have landed since.
    pub(super) fn home_subscribe(
        &mut self,
        reply: ReplyTo,
        conv: ConvId,
        user: UserId,
        (last_seq, title): (Seq, String),
    ) {
        let entry = match self.subscription(user, conv) {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                let entry = UserConv {
                    peer: 0,
                    peer_name: title,
                    read_seq: last_seq,
                };
                self.put(keys::user_conv(user, conv), entry.encode());
                self.subscribed(user, conv, true);
                entry
            }
            Err((code, message)) => return self.error_to(reply, code, &message),
        };
        let frame = ok_frame(
            reply.rid,
            &json!({ "conv": conv.to_string(), "last_seq": last_seq, "read_seq": entry.read_seq }),
        );
        self.defer(Deferred::ReplyTo { to: reply, frame });
    }

    /// `unsubscribe`: drop the subscription (a publisher stays a publisher). Answered once
    /// durable; unsubscribing from a channel one is not subscribed to is not an error.
    pub(super) fn unsubscribe(&mut self, by: Asker, req: p::ConvOnly) -> Outcome {
        let conv = channel_arg(&req.conv)?;
        let user = by.session.user;
        if self.subscription(user, conv)?.is_some() {
            self.delete(keys::user_conv(user, conv));
            self.subscribed(user, conv, false);
        }
        let frame = ok_frame(by.rid, &json!({ "conv": conv.to_string() }));
        self.defer(Deferred::Reply {
            conn: by.conn,
            rid: by.rid,
            frame,
        });
        Ok(())
    }

    fn subscription(
        &self,
        user: UserId,
        conv: ConvId,
    ) -> Result<Option<UserConv>, (ErrorCode, String)> {
        let key = keys::user_conv(user, conv);
        self.get_latest(&key)
            .and_then(|v| v.map(|b| UserConv::decode(&key, &b)).transpose())
            .map_err(|e| (ErrorCode::Internal, e.to_string()))
    }

    /// A channel subscription of `user` was just written (`on`) or deleted, in the open batch:
    /// the in-memory index follows now, the owner's count once the batch is durable. Also
    /// called for publishers, whose index entry (`Index`, `Unindex`) is their subscription.
    pub(super) fn subscribed(&mut self, user: UserId, conv: ConvId, on: bool) {
        if let Some(list) = self.channels.subs.get_mut(&user) {
            list.retain(|&c| c != conv);
            if on {
                list.push(conv);
                self.channels.online.entry(conv).or_default().insert(user);
            } else {
                drop_online(&mut self.channels.online, conv, user);
            }
        }
        let mail = Mail::Subscribers {
            conv,
            delta: if on { 1 } else { -1 },
        };
        let owner = self.cfg.placement.owner(conv);
        self.defer(Deferred::Mail { to: owner, mail });
    }

    /// `user`'s first device came online: load their subscriptions (one bounded prefix scan)
    /// into the online index.
    pub(super) fn channels_online(&mut self, user: UserId) {
        let prefix = keys::user_channel_prefix(user);
        let end = keys::prefix_end(&prefix);
        let convs: Vec<ConvId> =
            match self
                .storage
                .scan(&prefix, &end, CHANNEL_SUBSCRIPTIONS_MAX, false)
            {
                Ok(rows) => rows
                    .iter()
                    .filter_map(|(k, _)| keys::conv_of_user_conv(k))
                    .collect(),
                Err(e) => {
                    // Pushes for this session are lost; the channels still read by seq.
                    tracing::error!(shard = %self.cfg.shard, error = %e, "reading subscriptions");
                    Vec::new()
                }
            };
        for &conv in &convs {
            self.channels.online.entry(conv).or_default().insert(user);
        }
        self.channels.subs.insert(user, convs);
    }

    /// `user`'s last device went away.
    pub(super) fn channels_offline(&mut self, user: UserId) {
        for conv in self.channels.subs.remove(&user).unwrap_or_default() {
            drop_online(&mut self.channels.online, conv, user);
        }
    }

    /// A channel's post for the online subscribers homed here: offered to each of their
    /// devices, except the posting connection (it got the ack).
    pub(super) fn home_broadcast(&mut self, conv: ConvId, frame: &Arc<str>, skip: Option<ConnId>) {
        let Some(users) = self.channels.online.get(&conv) else {
            return;
        };
        for user in users {
            for &conn in self.sessions.online.get(user).into_iter().flatten() {
                if Some(conn) != skip {
                    self.stats.offers += 1;
                    self.out.push_back(Output::Offer {
                        conn,
                        frame: Frame::Shared(frame.clone()),
                    });
                }
            }
        }
    }

    // ---- owner side ----

    /// `Subscribe` on the owner: the channel must exist and not be disbanded.
    pub(super) fn owner_subscribe(&mut self, reply: ReplyTo, conv: ConvId, user: UserId) {
        let state = match self.conv_state(conv) {
            Ok(state) => state,
            Err(e) => return self.storage_error_to(reply, &e),
        };
        let answer = match &state.group {
            Some(group) if state.exists && group.meta.disbanded => Err(ErrorCode::GroupDisbanded),
            Some(group) if state.exists => Ok((state.durable_seq, group.meta.name.clone())),
            _ => Err(ErrorCode::NoSuchConversation),
        };
        match answer {
            Ok(last) => {
                let mail = Mail::SubscribeOk {
                    reply,
                    conv,
                    user,
                    last_seq: last.0,
                    title: last.1,
                };
                self.mail(reply.shard, mail);
            }
            Err(code) => {
                self.forget_if_absent(conv);
                let message = if code == ErrorCode::GroupDisbanded {
                    "this channel was closed"
                } else {
                    "no such channel"
                };
                self.error_to(reply, code, message);
            }
        }
    }

    /// A home shard stored (`+1`) or dropped (`-1`) a subscription: the count moves now and is
    /// written with the next tick.
    pub(super) fn owner_subscribers(&mut self, conv: ConvId, delta: i64) {
        if let Ok(state) = self.conv_state(conv) {
            if let Some(group) = state.group.as_deref_mut() {
                group.subscribers = group.subscribers.saturating_add_signed(delta);
                self.channels.counts_dirty.insert(conv);
            }
        }
        self.forget_if_absent(conv);
    }

    /// Writes the subscriber counts moved since the last tick (of channels still loaded).
    pub(super) fn flush_channel_counts(&mut self) {
        for conv in std::mem::take(&mut self.channels.counts_dirty) {
            let count = self
                .owned
                .convs
                .get(&conv)
                .and_then(|s| s.group.as_ref())
                .map(|g| g.subscribers);
            if let Some(subscribers) = count {
                self.put(
                    keys::channel_stats(conv),
                    ChannelStats { subscribers }.encode(),
                );
            }
        }
    }

    /// A channel's message or event is durable: one `Broadcast` per shard of the cluster.
    pub(super) fn broadcast(&mut self, conv: ConvId, ts_ms: u64, msg: &str, skip: Option<ReplyTo>) {
        let frame: Arc<str> = p::message_push(msg).into();
        for to in self.cfg.placement.all().collect::<Vec<_>>() {
            self.stats.fanout_mails += 1;
            let mail = Mail::Broadcast {
                conv,
                ts_ms,
                frame: frame.clone(),
                skip: skip.filter(|s| s.shard == to).map(|s| s.conn),
            };
            self.mail(to, mail);
        }
    }
}

/// A channel's stored subscriber count (0 before the first is written).
pub(super) fn load_subscribers<S: Storage>(storage: &S, conv: ConvId) -> Result<u64, StorageError> {
    let key = keys::channel_stats(conv);
    Ok(match storage.get(&key)? {
        Some(bytes) => ChannelStats::decode(&key, &bytes)?.subscribers,
        None => 0,
    })
}

fn drop_online(online: &mut HashMap<ConvId, HashSet<UserId>>, conv: ConvId, user: UserId) {
    if let Some(users) = online.get_mut(&conv) {
        users.remove(&user);
        if users.is_empty() {
            online.remove(&conv);
        }
    }
}

fn channel_arg(text: &str) -> Result<ConvId, (ErrorCode, String)> {
    match conv_arg(text)? {
        conv if conv.is_channel() => Ok(conv),
        _ => Err((ErrorCode::BadRequest, "conv is not a channel".into())),
    }
}
