//! Requests a home shard answers by gathering parts from owner shards: the conversation
//! list (`convs`), `sync` over many conversations, and `history` of one. Each part is a mail
//! to the owner; the reply goes out when the last part is in. Parts cannot be lost within a
//! node (mail is reliable within the process); a part for an owner on another node that cannot
//! be reached comes back through `gather_part_failed`, and the request fails with
//! `unavailable` (a list missing some conversations would read as having left them). A gather
//! whose connection closed still completes and its reply is dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use super::timers::Timer;
use super::Shard;
use crate::ids::{ConnId, ConvId, Seq, ShardId, UserId};
use crate::limits::{CONV_LIST_MAX, PAGE_BYTES_MAX, PAGE_MAX, SYNC_CONVS_MAX};
use crate::mail::{ConvSummary, GatherRef, Mail, Page, PresenceInfo};
use crate::protocol::{self as p, error_frame, push_json_str, ErrorCode};
use crate::storage::{keys, Storage, UserConv};

#[derive(Default)]
pub(super) struct Gathers {
    map: HashMap<u64, Gather>,
    next_id: u64,
}

struct Gather {
    conn: ConnId,
    rid: u64,
    left: usize,
    /// A part could not reach its owner: the reply is `unavailable`.
    failed: bool,
    kind: Kind,
}

pub(super) enum Kind {
    Convs {
        entries: Vec<(ConvId, UserConv)>,
        last: Vec<ConvSummary>,
        /// The user's own settings, read with the list: muted conversations, and the end of
        /// a do-not-disturb still running.
        muted: HashSet<ConvId>,
        dnd_until: Option<u64>,
    },
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

impl<S: Storage> Shard<S> {
    pub(super) fn gather(&mut self, conn: ConnId, rid: u64, left: usize, kind: Kind) -> u64 {
        self.gathers.next_id += 1;
        let id = self.gathers.next_id;
        self.cross_node_deadline(Timer::Gather(id));
        self.gathers.map.insert(
            id,
            Gather {
                conn,
                rid,
                left,
                failed: false,
                kind,
            },
        );
        id
    }

    pub(super) fn start_convs(&mut self, now_ms: u64, conn: ConnId, rid: u64, user: UserId) {
        let prefix = keys::user_conv_prefix(user);
        let rows =
            match self
                .storage
                .scan(&prefix, &keys::prefix_end(&prefix), CONV_LIST_MAX, false)
            {
                Ok(rows) => rows,
                Err(e) => return self.internal_error(conn, Some(rid), &e),
            };
        let mut entries = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            match (keys::conv_of_user_conv(&k), UserConv::decode(&k, &v)) {
                (Some(conv), Ok(entry)) => entries.push((conv, entry)),
                (_, Err(e)) => return self.internal_error(conn, Some(rid), &e),
                (None, _) => {}
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
        let (muted, dnd_until) = match self.notify_settings(now_ms, user) {
            Ok(settings) => settings,
            Err(e) => return self.internal_error(conn, Some(rid), &e),
        };
        let kind = Kind::Convs {
            entries,
            last,
            muted,
            dnd_until,
        };
        let id = self.gather(conn, rid, by_owner.len(), kind);
        if by_owner.is_empty() {
            return self.finish_gather(id);
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
        if let Kind::Convs { last, .. } = &mut g.kind {
            for (i, seq) in seqs {
                if let Some(slot) = last.get_mut(i) {
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
        if g.failed {
            let why = "a node holding part of this answer is unreachable; retry shortly";
            return self.error(g.conn, Some(g.rid), ErrorCode::Unavailable, why);
        }
        let frame = match g.kind {
            Kind::Convs {
                entries,
                last,
                muted,
                dnd_until,
            } => convs_frame(g.rid, &entries, &last, (&muted, dnd_until)),
            Kind::Pages {
                convs,
                mut pages,
                history: true,
            } => match pages.pop().flatten() {
                Some(Ok((msgs, more))) => page_frame(g.rid, convs[0], &msgs, more),
                Some(Err(code)) => error_frame(Some(g.rid), code, "cannot read this conversation"),
                None => error_frame(Some(g.rid), ErrorCode::Internal, "missing page"),
            },
            Kind::Pages {
                convs,
                pages,
                history: false,
            } => sync_frame(g.rid, &convs, &pages),
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
                p::ok_frame(g.rid, &serde_json::json!({ "users": list }))
            }
        };
        self.send(g.conn, frame);
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
    entries: &[(ConvId, UserConv)],
    last: &[ConvSummary],
    (muted, dnd_until): (&HashSet<ConvId>, Option<u64>),
) -> String {
    let mut out = String::with_capacity(64 + entries.len() * 96);
    let _ = write!(out, "{{\"rid\":{rid},\"ok\":{{\"convs\":[");
    let mut total_unread = 0u64;
    let mut first = true;
    for ((conv, entry), summary) in entries.iter().zip(last) {
        if !summary.member {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        let last_seq: Seq = summary.last_seq;
        // The cursor is the home's or the owner's copy, whichever is ahead (sends move only
        // the owner's), shown as of the same moment as `last_seq`: a `read` answered while
        // this list was being gathered may already be past the `last_seq` gathered.
        let read_seq = entry.read_seq.max(summary.own_read).min(last_seq);
        let unread = last_seq.saturating_sub(read_seq.max(summary.floor));
        total_unread += unread;
        let _ = write!(out, "{{\"conv\":\"{conv}\",");
        match &summary.title {
            Some(title) => {
                out.push_str("\"kind\":\"group\",\"title\":");
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
