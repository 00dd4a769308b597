//! Offline notifications: what the operator's push webhook is told, decided on each user's
//! home shard (where their devices, push tokens and notification settings live).
//!
//! A message reaching a home shard (`home_deliver`) concerns a device that is not connected,
//! or one connected that left a push unacked for `push_retry_ms` (an app asleep with its socket
//! still open). Such a message opens, or joins, the user's *pending* notification; the first
//! one schedules its flush `coalesce_ms` later, so a burst of 50 messages is one notification.
//! At the flush the user's settings are read (muted conversations drop out, a do-not-disturb
//! drops all), the devices to reach are those with a push token that are still offline (or
//! asleep), and the badge — the user's total unread count, exactly what `convs` would report
//! as `total_unread` — is gathered from the conversations' owners like `convs` gathers it.
//! Then one `Output::Notify` carries the JSON body; the driver queues it for the webhook
//! (bounded, off the reactor, its own drop policy: src/webhook.rs).
//!
//! Cost on the message path: nothing unless the recipient has a push token
//! (`token_devices`, held in memory, loaded at start and kept with every token write) on a
//! device that is not connected. Then one parse of the push frame per `Deliver` mail (not per
//! recipient) and a map update per recipient; reads happen at the flush, once per window.
//!
//! Invariants: at most one pending notification and one `Timer::Notify` per user; a flush
//! happens for every pending entry; nothing here delays or changes a delivery. What is pending
//! lives in memory only: a restart loses at most one window's notifications (the messages are
//! durable, and the devices sync when they next connect).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;

use super::gather::Kind;
use super::timers::Timer;
use super::{Output, Shard};
use crate::ids::{ConvId, Seq, UserId};
use crate::limits::NOTIFY_CONVS_MAX;
use crate::protocol::push_json_str;
use crate::storage::{keys, scan_records, PushTokenRecord, Storage, StorageError, UserRecord};

/// Offline notifications are on (a webhook is configured).
#[derive(Clone, Debug)]
pub struct NotifyConfig {
    /// How long the first message for a user waits for more before the notification goes.
    pub coalesce_ms: u64,
    /// Include the latest message's body (`preview`). Off by default: bodies may be
    /// ciphertext, and a gateway is one more party that would read them.
    pub preview: bool,
}

#[derive(Default)]
pub(super) struct Notifier {
    /// Users homed here with a push token, and the devices holding one. Exact: loaded at
    /// start, changed with every token write and delete (`set_push_token`, `forget_push_token`).
    token_devices: HashMap<UserId, Vec<Box<str>>>,
    /// The notification being coalesced for each user, flushed at its `Timer::Notify`.
    pending: HashMap<UserId, Pending>,
}

#[derive(Default)]
struct Pending {
    /// The latest message of each conversation with messages in this window, least recent
    /// first; at most `NOTIFY_CONVS_MAX` conversations (more are counted in `overflow`).
    convs: Vec<Latest>,
    overflow: u32,
    /// Devices that left a push unacked for `push_retry_ms`: reached even though connected.
    asleep: Vec<Box<str>>,
}

struct Latest {
    conv: ConvId,
    seq: Seq,
    id: Box<str>,
    from: Box<str>,
    /// The body's JSON text, with `preview` on.
    body: Option<Box<str>>,
    /// Messages of this conversation in the window.
    count: u32,
}

/// What a flush found to send, waiting for its badge (`Kind::Badge`).
pub(super) struct Note {
    user: UserId,
    name: String,
    devices: Vec<(String, PushTokenRecord)>,
    latest: Latest,
    count: u32,
    convs: Vec<ConvId>,
}

/// The fields of a `msg` push frame a notification needs (borrowed from the frame).
#[derive(Deserialize)]
struct PushFrame<'a> {
    #[serde(borrow)]
    msg: MsgMeta<'a>,
}

#[derive(Deserialize)]
struct MsgMeta<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    from: Cow<'a, str>,
    /// Absent for an ordinary message; recalls, edits and system entries notify no one.
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

/// The sender of the message in a `msg` push frame, if it is one.
pub(super) fn sender_of(frame: &str) -> Option<UserId> {
    let push: PushFrame = serde_json::from_str(frame).ok()?;
    Some(UserId::from_username(&push.msg.from))
}

impl<S: Storage> Shard<S> {
    /// Reads which users homed here hold push tokens (at start, when notifications are on).
    pub(super) fn load_push_tokens(&mut self) {
        if self.cfg.notify.is_none() {
            return;
        }
        let rows = self.own_rows(
            keys::PUSH_TOKEN,
            "push tokens (their devices get no notifications until they register again)",
        );
        for (key, _) in rows {
            if let (Some(user), Some(device)) = (keys::user_of(&key), keys::device_of_key(&key)) {
                self.notifier
                    .token_devices
                    .entry(user)
                    .or_default()
                    .push(device.into());
            }
        }
    }

    /// Stores `device`'s push token (replacing any).
    pub(super) fn set_push_token(&mut self, user: UserId, device: &str, rec: &PushTokenRecord) {
        self.put(keys::push_token(user, device), rec.encode());
        let devices = self.notifier.token_devices.entry(user).or_default();
        if !devices.iter().any(|d| &**d == device) {
            devices.push(device.into());
        }
    }

    /// Deletes `device`'s push token, if it has one.
    pub(super) fn forget_push_token(&mut self, user: UserId, device: &str) {
        self.delete(keys::push_token(user, device));
        if let Some(devices) = self.notifier.token_devices.get_mut(&user) {
            devices.retain(|d| &**d != device);
            if devices.is_empty() {
                self.notifier.token_devices.remove(&user);
            }
        }
    }

    /// A message reached this home shard for `recipients`: open or join the pending
    /// notification of each who has a token on a device that is not connected.
    pub(super) fn notify_offline(&mut self, at: (ConvId, Seq), frame: &str, recipients: &[UserId]) {
        if self.cfg.notify.is_none() || self.notifier.token_devices.is_empty() {
            return;
        }
        let mut meta: Option<Option<PushFrame>> = None;
        for &user in recipients {
            let Some(devices) = self.notifier.token_devices.get(&user) else {
                continue;
            };
            // Per recipient with a token: a look at its few connections, no allocation.
            if devices.iter().all(|d| self.device_connected(user, d)) {
                continue;
            }
            let parsed = meta.get_or_insert_with(|| {
                serde_json::from_str::<PushFrame>(frame)
                    .ok()
                    .filter(|push| push.msg.kind.is_none())
            });
            let Some(push) = parsed else {
                return; // a recall, an edit, a system entry: they notify no one
            };
            if UserId::from_username(&push.msg.from) == user {
                continue; // the sender's own other devices
            }
            let latest = self.latest_of(at, &push.msg);
            self.pend(user, latest, None);
        }
    }

    /// A connected device left the push of `at` (frame `frame`) unacked for `push_retry_ms`.
    pub(super) fn notify_asleep(
        &mut self,
        user: UserId,
        device: &str,
        at: (ConvId, Seq),
        frame: &str,
    ) {
        if self.cfg.notify.is_none()
            || !self
                .notifier
                .token_devices
                .get(&user)
                .is_some_and(|d| d.iter().any(|d| &**d == device))
        {
            return;
        }
        let Ok(push) = serde_json::from_str::<PushFrame>(frame) else {
            return;
        };
        if push.msg.kind.is_some() || UserId::from_username(&push.msg.from) == user {
            return;
        }
        let latest = self.latest_of(at, &push.msg);
        self.pend(user, latest, Some(device));
    }

    fn latest_of(&self, (conv, seq): (ConvId, Seq), msg: &MsgMeta) -> Latest {
        let preview = self.cfg.notify.as_ref().is_some_and(|n| n.preview);
        Latest {
            conv,
            seq,
            id: (*msg.id).into(),
            from: (*msg.from).into(),
            body: preview.then(|| msg.body.get().into()),
            count: 1,
        }
    }

    fn pend(&mut self, user: UserId, latest: Latest, asleep: Option<&str>) {
        let coalesce_ms = self.cfg.notify.as_ref().map_or(0, |n| n.coalesce_ms);
        let pending = match self.notifier.pending.get_mut(&user) {
            Some(p) => {
                self.stats.notify_coalesced += 1;
                p
            }
            None => {
                // Spread over a quarter of the window, by user: one group message opens the
                // windows of all its away members at once, and their flushes (reads and a
                // gather each) would otherwise land on the reactor in one burst.
                let spread = user.0 % (coalesce_ms / 4 + 1);
                self.timers
                    .at(self.now_ms + coalesce_ms + spread, Timer::Notify(user));
                self.notifier.pending.entry(user).or_default()
            }
        };
        if let Some(device) = asleep {
            if !pending.asleep.iter().any(|d| &**d == device) {
                pending.asleep.push(device.into());
            }
        }
        match pending.convs.iter().position(|l| l.conv == latest.conv) {
            Some(i) => {
                let mut old = pending.convs.remove(i);
                // Pushes of one conversation arrive in seq order; a retry's may be older.
                if latest.seq > old.seq {
                    old = Latest {
                        count: old.count + 1,
                        ..latest
                    };
                } else {
                    old.count += 1;
                }
                pending.convs.push(old);
            }
            None if pending.convs.len() < NOTIFY_CONVS_MAX => pending.convs.push(latest),
            None => pending.overflow += 1,
        }
    }

    /// `Timer::Notify`: the window closed. Decide what to send, then gather the badge.
    pub(super) fn notify_flush(&mut self, now_ms: u64, user: UserId) {
        let Some(pending) = self.notifier.pending.remove(&user) else {
            return;
        };
        match self.note(now_ms, user, pending) {
            Ok(Some(note)) => self.start_badge(note),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "notification not sent: storage read failed"),
        }
    }

    /// What to notify `user` of, if anything: muted conversations and a running
    /// do-not-disturb suppress; devices connected and acking need nothing.
    fn note(
        &mut self,
        now_ms: u64,
        user: UserId,
        pending: Pending,
    ) -> Result<Option<Note>, StorageError> {
        let total: u32 = pending.convs.iter().map(|l| l.count).sum::<u32>() + pending.overflow;
        let (muted, dnd_until) = self.notify_settings(now_ms, user)?;
        if dnd_until.is_some() {
            self.stats.notify_suppressed += u64::from(total);
            return Ok(None);
        }
        let (quiet, mut loud): (Vec<Latest>, Vec<Latest>) = pending
            .convs
            .into_iter()
            .partition(|l| muted.contains(&l.conv));
        self.stats.notify_suppressed += quiet.iter().map(|l| u64::from(l.count)).sum::<u64>();
        let Some(latest) = loud.pop() else {
            return Ok(None);
        };
        let online = self.online_devices(user);
        let devices: Vec<(String, PushTokenRecord)> =
            scan_records::<PushTokenRecord>(&self.storage, &keys::push_token_prefix(user), 1_000)?
                .into_iter()
                .filter_map(|(k, rec)| Some((keys::device_of_key(&k)?, rec)))
                .filter(|(device, _)| {
                    !online.contains(device.as_str())
                        || pending.asleep.iter().any(|d| **d == **device)
                })
                .collect();
        if devices.is_empty() {
            return Ok(None); // back online meanwhile
        }
        let Some(account) = self.latest::<UserRecord>(&keys::user(user))? else {
            return Ok(None);
        };
        let mut convs: Vec<ConvId> = loud.iter().map(|l| l.conv).collect();
        convs.push(latest.conv);
        let count = latest.count + loud.iter().map(|l| l.count).sum::<u32>() + pending.overflow;
        Ok(Some(Note {
            user,
            name: account.name,
            devices,
            latest,
            count,
            convs,
        }))
    }

    /// Whether `device` of `user` has a connection here.
    fn device_connected(&self, user: UserId, device: &str) -> bool {
        self.sessions.online.get(&user).is_some_and(|conns| {
            conns.iter().any(|c| {
                self.sessions
                    .conns
                    .get(c)
                    .and_then(|c| c.session.as_ref())
                    .is_some_and(|s| s.device == device)
            })
        })
    }

    /// The names of `user`'s connected devices.
    pub(super) fn online_devices(&self, user: UserId) -> HashSet<&str> {
        self.sessions
            .online
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|c| self.sessions.conns.get(c))
            .filter_map(|c| c.session.as_ref().map(|s| s.device.as_str()))
            .collect()
    }

    /// The badge is gathered like `convs`: every conversation's last seq from its owner.
    fn start_badge(&mut self, note: Note) {
        let user = note.user;
        let note = Box::new(note);
        if let Err(e) = self.start_unread(None, user, |unread| Kind::Badge { unread, note }) {
            tracing::warn!(error = %e, "notification not sent: storage read failed");
        }
    }

    /// The badge is in (`None`: a part could not be reached): hand the notification over.
    pub(super) fn notify_send(&mut self, note: Note, badge: Option<u64>) {
        let mut body = String::with_capacity(256);
        body.push_str("{\"user\":");
        push_json_str(&mut body, &note.name);
        let l = &note.latest;
        let _ = write!(
            body,
            ",\"conv\":\"{}\",\"seq\":{},\"id\":\"{}\",\"from\":",
            l.conv, l.seq, l.id
        );
        push_json_str(&mut body, &l.from);
        let _ = write!(body, ",\"count\":{},\"convs\":[", note.count);
        for (i, conv) in note.convs.iter().enumerate() {
            let _ = write!(body, "{}\"{conv}\"", if i > 0 { "," } else { "" });
        }
        body.push_str("],\"badge\":");
        match badge {
            Some(b) => {
                let _ = write!(body, "{b}");
            }
            None => body.push_str("null"),
        }
        if let Some(preview) = &l.body {
            body.push_str(",\"preview\":");
            body.push_str(preview);
        }
        body.push_str(",\"devices\":[");
        for (i, (device, rec)) in note.devices.iter().enumerate() {
            body.push_str(if i > 0 {
                ",{\"device\":"
            } else {
                "{\"device\":"
            });
            push_json_str(&mut body, device);
            let _ = write!(body, ",\"platform\":\"{}\",\"token\":", rec.platform);
            push_json_str(&mut body, &rec.token);
            body.push('}');
        }
        let _ = write!(body, "],\"ts\":{}}}", self.now_ms);
        self.stats.notify_out += 1;
        self.out.push_back(Output::Notify {
            body: Arc::from(body),
        });
    }
}
