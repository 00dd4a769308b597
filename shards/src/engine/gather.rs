//! Requests a home shard answers by gathering parts from owner shards: the conversation
//! list (`convs`), `sync` over many conversations, and `history` of one; and the one gather no
//! client waits for, a notification's badge (the user's unread total, counted as `convs`
//! counts it: `notify.rs`). Each part is a mail
//! to the owner; the reply goes out when the last part is in. Parts cannot be lost within a
//! node (mail is reliable within the process); a part for an owner on another node that cannot
//! be reached comes back through `gather_part_failed`, and the request fails with
//! `unavailable` (a list missing some conversations would read as having left them). A gather
//! whose connection closed still completes and its reply is dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use super::notify::Note;
use super::timers::Timer;
use super::Shard;
use crate::ids::{ConnId, ConvId, Seq, ShardId, UserId};
use crate::limits::{CONV_LIST_MAX, PAGE_BYTES_MAX, PAGE_MAX, SYNC_CONVS_MAX};
use crate::mail::{ConvSummary, GatherRef, Mail, Page, PresenceInfo};
use crate::protocol::{self as p, error_frame, push_json_str, ErrorCode};
use crate::storage::{keys, Storage, StorageError, UserConv};

#[derive(Default)]
pub(super) struct Gathers {
    map: HashMap<u64, Gather>,
    next_id: u64,
}

struct Gather {
    /// The connection and request waiting for the answer; `None` for a badge.
    client: Option<(ConnId, u64)>,
    left: usize,
    /// A part could not reach its owner: the reply is `unavailable`.
    failed: bool,
    kind: Kind,
}

pub(super) enum Kind {
    Convs {
        unread: Unread,
        /// The user's own settings, read with the list: muted conversations, and the end of
        /// a do-not-disturb still running.
        muted: HashSet<ConvId>,
        dnd_until: Option<u64>,
    },
    /// A notification waiting for its badge: `unread.total()`.
    Badge { unread: Unread, note: Box<Note> },
    Pages {
        convs: Vec<ConvId>,
        pages: Vec<Option<Page>>,
        history: bool,
    },
    Presence {
        names: Vec<String>,
        states: Vec<Option<PresenceInfo>>,
    },
}

/// A user's conversations and, once gathered, each one's summary from its owner.
pub(super) struct Unread {
    entries: Vec<(ConvId, UserConv)>,
    last: Vec<ConvSummary>,
}

impl Unread {
    /// The conversations the user is (still) a member of, each with its summary, its read
    /// seq and its unread count as of the gather.
    fn counts(&self) -> impl Iterator<Item = (&(ConvId, UserConv), &ConvSummary, Seq, u64)> {
        self.entries
            .iter()
            .zip(&self.last)
            .filter(|(_, summary)| summary.member)
            .map(|(entry, summary)| {
                // The cursor is the home's or the owner's copy, whichever is ahead (sends move
                // only the owner's), shown as of the same moment as `last_seq`: a `read`
                // answered while this list was being gathered may already be past it.
                let read_seq = entry.1.read_seq.max(summary.own_read).min(summary.last_seq);
                let unread = summary.last_seq.saturating_sub(read_seq.max(summary.floor));
                (entry, summary, read_seq, unread)
            })
    }

    /// The sum of the unread counts: `convs`' `total_unread`, a notification's badge.
    pub(super) fn total(&self) -> u64 {
        self.counts().map(|(_, _, _, unread)| unread).sum()
    }
}

impl<S: Storage> Shard<S> {
    pub(super) fn gather(&mut self, conn: ConnId, rid: u64, left: usize, kind: Kind) -> u64 {
        self.gather_for(Some((conn, rid)), left, kind)
    }

    fn gather_for(&mut self, client: Option<(ConnId, u64)>, left: usize, kind: Kind) -> u64 {
        self.gathers.next_id += 1;
        let id = self.gathers.next_id;
        self.cross_node_deadline(Timer::Gather(id));
        self.gathers.map.insert(
            id,
            Gather {
                client,
                left,
                failed: false,
                kind,
            },
        );
        id
    }

    pub(super) fn start_convs(&mut self, now_ms: u64, conn: ConnId, rid: u64, user: UserId) {
        let started = self
            .notify_settings(now_ms, user)
            .and_then(|(muted, dnd_until)| {
                self.start_unread(Some((conn, rid)), user, |unread| Kind::Convs {
                    unread,
                    muted,
                    dnd_until,
                })
            });
        if let Err(e) = started {
            self.internal_error(conn, Some(rid), &e);
        }
    }

    /// Gathers the summary of each of `user`'s conversations from its owner, for `client`'s
    /// `convs` or (no client) a notification's badge.
    pub(super) fn start_unread(
        &mut self,
        client: Option<(ConnId, u64)>,
        user: UserId,
        kind: impl FnOnce(Unread) -> Kind,
    ) -> Result<(), StorageError> {
        let prefix = keys::user_conv_prefix(user);
        let rows = self
            .storage
            .scan(&prefix, &keys::prefix_end(&prefix), CONV_LIST_MAX, false)?;
        let mut entries = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let entry = UserConv::decode(&k, &v)?;
            if let Some(conv) = keys::conv_of_user_conv(&k) {
                entries.push((conv, entry));
            }
        }
        let mut by_owner: BTreeMap<ShardId, Vec<(usize, ConvId)>> = BTreeMap::new();
        for (i, (conv, _)) in entries.iter().enumerate() {
            by_owner
                .entry(self.cfg.placement.owner(*conv))
                .or_default()
                .push((i, *conv));
        }
        let last = vec![ConvSummary::default(); entries.len()];
        let id = self.gather_for(client, by_owner.len(), kind(Unread { entries, last }));
        if by_owner.is_empty() {
            self.finish_gather(id);
            return Ok(());
        }
        let me = self.cfg.shard;
        for (owner, convs) in by_owner {
            self.mail(
                owner,
                Mail::LastSeqs {
                    gather: GatherRef {
                        shard: me,
                        id,
                        part: 0,
                    },
                    user,
                    convs,
                },
            );
        }
        Ok(())
    }

    pub(super) fn start_sync(&mut self, conn: ConnId, rid: u64, user: UserId, req: p::Sync) {
        if req.convs.is_empty() || req.convs.len() > SYNC_CONVS_MAX {
            return self.error(
                conn,
                Some(rid),
                ErrorCode::BadRequest,
                &format!("sync names 1 to {SYNC_CONVS_MAX} conversations"),
            );
        }
        let mut convs = Vec::with_capacity(req.convs.len());
        for c in &req.convs {
            match ConvId::parse(&c.conv) {
                Some(conv) => convs.push((conv, c.after)),
                None => {
                    return self.error(
                        conn,
                        Some(rid),
                        ErrorCode::BadRequest,
                        "conv is not a conversation id",
                    )
                }
            }
        }
        let limit = req
            .limit
            .map_or(PAGE_MAX, |l| l as usize)
            .clamp(1, PAGE_MAX);
        let n = convs.len();
        let kind = Kind::Pages {
            convs: convs.iter().map(|c| c.0).collect(),
            pages: vec![None; n],
            history: false,
        };
        let id = self.gather(conn, rid, n, kind);
        for (part, (conv, after)) in convs.into_iter().enumerate() {
            let gather = GatherRef {
                shard: self.cfg.shard,
                id,
                part,
            };
            let mail = Mail::Range {
                gather,
                user,
                conv,
                after: Some(after),
                before: None,
                limit,
                bytes_max: PAGE_BYTES_MAX / n,
            };
            self.mail(self.cfg.placement.owner(conv), mail);
        }
    }

    /// `history` of `conv` (parsed by the dispatch): up to `limit` messages before `before`.
    pub(super) fn start_history(
        &mut self,
        conn: ConnId,
        rid: u64,
        user: UserId,
        conv: ConvId,
        (before, limit): (Option<Seq>, Option<u32>),
    ) {
        let limit = limit.map_or(50, |l| l as usize).clamp(1, PAGE_MAX);
        let id = self.gather(
            conn,
            rid,
            1,
            Kind::Pages {
                convs: vec![conv],
                pages: vec![None],
                history: true,
            },
        );
        let gather = GatherRef {
            shard: self.cfg.shard,
            id,
            part: 0,
        };
        let mail = Mail::Range {
            gather,
            user,
            conv,
            after: None,
            before,
            limit,
            bytes_max: PAGE_BYTES_MAX,
        };
        self.mail(self.cfg.placement.owner(conv), mail);
    }

    pub(super) fn gather_range_done(&mut self, gather: GatherRef, page: Page) {
        let Some(g) = self.gathers.map.get_mut(&gather.id) else {
            return;
        };
        if let Kind::Pages { pages, .. } = &mut g.kind {
            if let Some(slot) = pages.get_mut(gather.part) {
                *slot = Some(page);
            }
        }
        g.left -= 1;
        if g.left == 0 {
            self.finish_gather(gather.id);
        }
    }

    pub(super) fn gather_last_seqs_done(
        &mut self,
        gather: GatherRef,
        seqs: Vec<(usize, ConvSummary)>,
    ) {
        let Some(g) = self.gathers.map.get_mut(&gather.id) else {
            return;
        };
        if let Kind::Convs { unread, .. } | Kind::Badge { unread, .. } = &mut g.kind {
            for (i, seq) in seqs {
                if let Some(slot) = unread.last.get_mut(i) {
                    *slot = seq;
                }
            }
        }
        g.left -= 1;
        if g.left == 0 {
            self.finish_gather(gather.id);
        }
    }

    pub(super) fn gather_presence_done(
        &mut self,
        gather: GatherRef,
        got: Vec<(usize, Option<PresenceInfo>)>,
    ) {
        let Some(g) = self.gathers.map.get_mut(&gather.id) else {
            return;
        };
        if let Kind::Presence { states, .. } = &mut g.kind {
            for (i, info) in got {
                if let Some(slot) = states.get_mut(i) {
                    *slot = info;
                }
            }
        }
        g.left -= 1;
        if g.left == 0 {
            self.finish_gather(gather.id);
        }
    }

    /// The gather's deadline passed (`CROSS_NODE_WAIT_MS`): if still incomplete, a part went
    /// to a node that died with it; the request fails with `unavailable`.
    pub(super) fn gather_expired(&mut self, id: u64) {
        let Some(g) = self.gathers.map.get_mut(&id) else {
            return; // answered in time
        };
        g.failed = true;
        g.left = 0;
        self.finish_gather(id);
    }

    /// A part whose owner is on a node that cannot be reached.
    pub(super) fn gather_part_failed(&mut self, gather: GatherRef) {
        let Some(g) = self.gathers.map.get_mut(&gather.id) else {
            return;
        };
        g.failed = true;
        g.left -= 1;
        if g.left == 0 {
            self.finish_gather(gather.id);
        }
    }

    pub(super) fn finish_gather(&mut self, id: u64) {
        let Some(g) = self.gathers.map.remove(&id) else {
            return;
        };
        if let Kind::Badge { unread, note } = g.kind {
            // A part lost on another node: the notification goes without a badge.
            return self.notify_send(*note, (!g.failed).then(|| unread.total()));
        }
        let Some((conn, rid)) = g.client else {
            return; // only badges have no client
        };
        if g.failed {
            let why = "a node holding part of this answer is unreachable; retry shortly";
            return self.error(conn, Some(rid), ErrorCode::Unavailable, why);
        }
        let frame = match g.kind {
            Kind::Convs {
                unread,
                muted,
                dnd_until,
            } => convs_frame(rid, &unread, (&muted, dnd_until)),
            Kind::Badge { .. } => return,
            Kind::Pages {
                convs,
                mut pages,
                history: true,
            } => match pages.pop().flatten() {
                Some(Ok((msgs, more))) => page_frame(rid, convs[0], &msgs, more),
                Some(Err(code)) => error_frame(Some(rid), code, "cannot read this conversation"),
                None => error_frame(Some(rid), ErrorCode::Internal, "missing page"),
            },
            Kind::Pages {
                convs,
                pages,
                history: false,
            } => sync_frame(rid, &convs, &pages),
            Kind::Presence { names, states } => {
                // Users one may not see (not friends) read as "hidden", never as offline.
                let list: Vec<serde_json::Value> = names
                    .iter()
                    .zip(states)
                    .map(|(name, info)| match info {
                        Some((state, status)) => {
                            serde_json::json!({ "user": name, "state": state.name(), "status": status })
                        }
                        None => serde_json::json!({ "user": name, "state": "hidden" }),
                    })
                    .collect();
                p::ok_frame(rid, &serde_json::json!({ "users": list }))
            }
        };
        self.send(conn, frame);
    }
}

// Replies holding pages are assembled by hand: each message is already client JSON.

fn push_msgs(out: &mut String, msgs: &[String]) {
    out.push('[');
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(m);
    }
    out.push(']');
}

fn page_frame(rid: u64, conv: ConvId, msgs: &[String], more: bool) -> String {
    let mut out = String::with_capacity(64 + msgs.iter().map(|m| m.len() + 1).sum::<usize>());
    let _ = write!(
        out,
        "{{\"rid\":{rid},\"ok\":{{\"conv\":\"{conv}\",\"msgs\":"
    );
    push_msgs(&mut out, msgs);
    let _ = write!(out, ",\"more\":{more}}}}}");
    out
}

fn sync_frame(rid: u64, convs: &[ConvId], pages: &[Option<Page>]) -> String {
    let mut out = String::with_capacity(64);
    let _ = write!(out, "{{\"rid\":{rid},\"ok\":{{\"convs\":[");
    for (i, (conv, page)) in convs.iter().zip(pages).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"conv\":\"{conv}\",");
        match page {
            Some(Ok((msgs, more))) => {
                out.push_str("\"msgs\":");
                push_msgs(&mut out, msgs);
                let _ = write!(out, ",\"more\":{more}}}");
            }
            Some(Err(code)) => {
                let _ = write!(out, "\"error\":\"{}\"}}", code.as_str());
            }
            None => out.push_str("\"error\":\"internal\"}"),
        }
    }
    out.push_str("]}}");
    out
}

fn convs_frame(
    rid: u64,
    all: &Unread,
    (muted, dnd_until): (&HashSet<ConvId>, Option<u64>),
) -> String {
    let mut out = String::with_capacity(64 + all.entries.len() * 96);
    let _ = write!(out, "{{\"rid\":{rid},\"ok\":{{\"convs\":[");
    let mut total_unread = 0u64;
    let mut first = true;
    for ((conv, entry), summary, read_seq, unread) in all.counts() {
        if !first {
            out.push(',');
        }
        first = false;
        let last_seq: Seq = summary.last_seq;
        total_unread += unread;
        let _ = write!(out, "{{\"conv\":\"{conv}\",");
        match &summary.title {
            Some(title) => {
                let kind = if conv.is_channel() {
                    "channel"
                } else {
                    "group"
                };
                let _ = write!(out, "\"kind\":\"{kind}\",\"title\":");
                push_json_str(&mut out, title);
            }
            None => {
                out.push_str("\"kind\":\"direct\",\"peer\":");
                push_json_str(&mut out, &entry.peer_name);
            }
        }
        if let Some(peer_read) = summary.peer_read {
            let _ = write!(out, ",\"peer_read_seq\":{peer_read}");
        }
        let _ = write!(
            out,
            ",\"last_seq\":{last_seq},\"read_seq\":{read_seq},\"unread\":{unread},\"muted\":{}}}",
            muted.contains(conv)
        );
    }
    let _ = write!(out, "],\"total_unread\":{total_unread},\"dnd_until\":");
    match dnd_until {
        Some(until) => {
            let _ = write!(out, "{until}}}}}");
        }
        None => out.push_str("null}}"),
    }
    out
}
