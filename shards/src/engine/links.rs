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

use super::Shard;
use crate::ids::ShardId;
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
