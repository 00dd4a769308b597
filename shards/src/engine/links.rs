//! What the engine does when mail cannot cross to another node (issue 13): the driver hands
//! back mail for a shard whose link is down (refused at once) or was reset with the mail
//! unacked (the peer went silent or restarted), and says when a link comes back up.
//!
//! Policy, per kind of mail (docs/cluster.md, "When a node is unreachable"):
//! - a client's request (it carries a [`ReplyTo`](crate::mail::ReplyTo)) fails with
//!   `unavailable`; a `send` retried with the same `id` is applied at most once, so a client
//!   may retry whether or not the first attempt was applied;
//! - a part of a gather (`convs`, `sync`, `history`, `presence`) fails the whole request with
//!   `unavailable`;
//! - an owner's membership steps fail as a refused write would: `EnsureMember` answers itself
//!   `unavailable` (the `open` fails), `Index` answers itself with no user indexed (those users
//!   are listed as `failed`);
//! - everything else — fan-out, ephemeral pushes, answers to the unreachable node — is
//!   dropped: its devices get a `resync` push when the link is back, and fetch what they
//!   missed with `sync`.
//!
//! Mail the other node acked and then died with is never handed back, so a client request
//! forwarded to another node's shard also waits at most `CROSS_NODE_WAIT_MS`: then the client
//! gets `unavailable`, and the real answer, if it comes later, is dropped — every request still
//! gets exactly one reply.

use super::timers::Timer;
use super::Shard;
use crate::ids::{ConnId, ShardId};
use crate::limits::CROSS_NODE_WAIT_MS;
use crate::mail::Mail;
use crate::protocol::ErrorCode;
use crate::storage::Storage;

const WHY: &str = "the node holding this conversation or user is unreachable; retry shortly";

/// The push telling a device that pushes may have been lost: run `sync`.
pub(super) const RESYNC_FRAME: &str = r#"{"push":"resync"}"#;

impl<S: Storage> Shard<S> {
    pub(super) fn undeliverable(&mut self, mail: Mail) {
        self.stats.mail_undeliverable += 1;
        match mail {
            Mail::Range { gather, .. }
            | Mail::LastSeqs { gather, .. }
            | Mail::PresenceQuery { gather, .. } => self.gather_part_failed(gather),
            Mail::EnsureMember { conv, user, .. } => {
                self.local_mail.push_back(Mail::MemberEnsured {
                    conv,
                    user,
                    result: Err(ErrorCode::Unavailable),
                })
            }
            Mail::Index { conv, op, .. } => self.local_mail.push_back(Mail::Indexed {
                conv,
                op,
                ok: Vec::new(),
                missing: Vec::new(),
            }),
            mail => {
                if let Some(reply) = mail.reply() {
                    self.error_to(reply, ErrorCode::Unavailable, WHY);
                }
            }
        }
    }

    /// Arms `timer` `CROSS_NODE_WAIT_MS` from now, in a cluster of several nodes: the wait it
    /// ends may be on mail another node took and died with. Within one node nothing is lost,
    /// so no deadline is armed.
    pub(super) fn cross_node_deadline(&mut self, timer: Timer) {
        if self.cfg.is_clustered() {
            self.timers.at(self.now_ms + CROSS_NODE_WAIT_MS, timer);
        }
    }

    /// `mail` leaves for shard `to`: if `to` is another node's and the mail carries a client
    /// request made here, its answer is awaited with a deadline.
    pub(super) fn await_remote(&mut self, to: ShardId, mail: &Mail) {
        let Some(reply) = mail.reply().filter(|r| r.shard == self.cfg.shard) else {
            return;
        };
        if self.cfg.other_node(to).is_some()
            && self
                .remote_waits
                .insert((reply.conn, reply.rid), false)
                .is_none()
        {
            self.cross_node_deadline(Timer::Reply(reply.conn, reply.rid));
        }
    }

    /// A frame for `conn`: if it answers an awaited request, the wait ends. False if that
    /// request was already answered `unavailable` (drop the frame).
    pub(super) fn reply_settles(&mut self, conn: ConnId, frame: &str) -> bool {
        let Some(rid) = reply_rid(frame) else {
            return true; // a push
        };
        match self.remote_waits.get(&(conn, rid)) {
            Some(true) => {
                // Forgotten when its second timer fires; answered once only.
                false
            }
            Some(false) => {
                self.remote_waits.remove(&(conn, rid));
                true
            }
            None => true,
        }
    }

    pub(super) fn reply_expired(&mut self, conn: ConnId, rid: u64) {
        match self.remote_waits.get(&(conn, rid)) {
            Some(false) => {
                // Removed first, so this answer is not taken for a late one and dropped.
                self.remote_waits.remove(&(conn, rid));
                let why = "no answer from the node holding this conversation or user; the \
                           request may or may not have taken effect: retry";
                self.error(conn, Some(rid), ErrorCode::Unavailable, why);
                // Remember it a while longer, so a late answer is dropped, not sent twice.
                self.remote_waits.insert((conn, rid), true);
                self.cross_node_deadline(Timer::Reply(conn, rid));
            }
            Some(true) => {
                self.remote_waits.remove(&(conn, rid));
            }
            None => {}
        }
    }

    pub(super) fn link_up(&mut self, _now_ms: u64, shard: ShardId) {
        tracing::info!(shard = %self.cfg.shard, peer = %shard, "link up: devices told to resync");
        let conns: Vec<_> = self
            .sessions
            .online
            .values()
            .flat_map(|conns| conns.iter().copied())
            .collect();
        for conn in conns {
            self.send(conn, RESYNC_FRAME.to_owned());
        }
    }
}

/// The `rid` of a reply frame (`{"rid":N,…}`, as `ok_frame` and `error_frame` write them);
/// `None` for pushes and error replies without a rid.
fn reply_rid(frame: &str) -> Option<u64> {
    let digits = frame.strip_prefix(r#"{"rid":"#)?;
    let end = digits.find(|c: char| !c.is_ascii_digit())?;
    digits[..end].parse().ok()
}
