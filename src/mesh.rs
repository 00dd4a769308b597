//! The shard↔shard channels: one bounded SPSC channel per ordered pair of shards (so mail
//! from A to B keeps its order), carrying the one envelope type below. Engine mail is declared
//! in `hermod_shards::mail`; the envelope adds the only thing the engine must not see: a socket
//! moving between cores.
//!
//! Full channel policy: the sending shard's pump task waits; mails queue behind it in a local
//! FIFO whose depth (`ShardCtx::backlog`) gates admission of new client frames.

use std::os::fd::OwnedFd;

use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use hermod_shards::engine::Handoff;
use hermod_shards::limits::MAIL_CHANNEL_CAPACITY;
use hermod_shards::mail::Mail;

pub enum Envelope {
    Mail(Mail),
    /// A connection moving to its user's home shard: the socket, the bytes read past the
    /// request that moved it, and that request.
    Adopt {
        fd: OwnedFd,
        buffered: Vec<u8>,
        handoff: Handoff,
    },
}

/// One shard's ends of the mesh, indexed by peer shard (`None` for itself).
pub struct Ends {
    pub to: Vec<Option<SharedSender<Envelope>>>,
    pub from: Vec<Option<SharedReceiver<Envelope>>>,
}

pub fn build(shards: usize) -> Vec<Ends> {
    let mut ends: Vec<Ends> = (0..shards)
        .map(|_| Ends {
            to: (0..shards).map(|_| None).collect(),
            from: (0..shards).map(|_| None).collect(),
        })
        .collect();
    for a in 0..shards {
        for b in 0..shards {
            if a != b {
                let (tx, rx) = shared_channel::new_bounded(MAIL_CHANNEL_CAPACITY);
                ends[a].to[b] = Some(tx);
                ends[b].from[a] = Some(rx);
            }
        }
    }
    ends
}
