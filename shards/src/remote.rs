//! One shard's links to the shards of other nodes (issue 13), sans-IO: the driver hands it the
//! engine's mail for remote shards and the batches NATS brought, and publishes what it returns.
//!
//! Owns, per remote shard: a [`Link`] (order, window, acks, resends, incarnations), the mail
//! waiting for room in the window, the frames due out, and the peer's liveness. Frames for one
//! remote shard leave in one batch per [`Remotes::poll_transmit`] (a driver calls it once per
//! turn of its reactor), and a turn's batches for the shards of one node leave as one NATS
//! message ([`pack`]), so a burst of mail — and a round of hellos — is one message per node,
//! not one per mail or per remote shard.
//!
//! **Liveness.** Each link sends a hello every `hello_ms`. A link is *up* from the first current
//! frame its peer sends until nothing has come from the peer for `silent_ms`; then it is reset:
//! a fresh incarnation (so the peer, if it lives, resets its side too and nothing of the old
//! numbering is delivered), and the mail never acked is handed back as
//! [`RemoteEvent::Lost`] — the engine fails the requests among it with `unavailable` and drops
//! the rest (pushes are recovered by the devices' resync). While a link is down, [`Remotes::send`]
//! refuses mail at once: nothing waits on a dead node, and the other nodes keep working.
//! A peer's restart (a larger incarnation) reads the same way: `Lost`, then `Up`.
//!
//! **Batch wire format**: `version u8, map hash u64, from shard u16, to shard u16`, then
//! frames, each `length u32` and a [`Frame`] encoding; integers big-endian. A NATS message is
//! one or more batches for shards of one node, each `length u32` and the batch
//! ([`message_batches`] splits it, validating only the lengths and headers).
//! The version is [`WIRE_VERSION`], which also covers the rkyv encoding of the mail inside
//! (`mail::wire`). A batch from a node running another placement map (another hash) is
//! refused whole, so such a peer never links: its shard ids would not mean the same shards.
//!
//! Bounds: at most `window` mails unacked per link, then mail waits in the link's FIFO, which
//! [`Remotes::waiting`] reports so the driver can stop admitting client frames (the same gate a
//! full shard channel closes today).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::cluster::ClusterMap;
use crate::ids::ShardId;
use crate::link::{Frame, Link, LinkEvent, WireError, WIRE_VERSION};
use crate::mail::{wire, Mail};

/// Timings and bounds of the links (`[cluster]` in the config file may set them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Unacked mails per link (as a shard channel's capacity within a node).
    pub window: usize,
    /// How long a mail waits for its ack before the window is sent again.
    pub rto_ms: u64,
    /// How often each link says hello.
    pub hello_ms: u64,
    /// Silence after which a link is reset and its peer treated as down.
    pub silent_ms: u64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            window: crate::limits::MAIL_CHANNEL_CAPACITY,
            rto_ms: 200,
            hello_ms: 500,
            silent_ms: 3_000,
        }
    }
}

/// What the links tell the engine.
#[derive(Debug)]
pub enum RemoteEvent {
    /// Mail from a shard of another node, in the order that shard sent it.
    Mail(Mail),
    /// The link to `shard` carries mail (again): devices here may have missed its pushes.
    Up(ShardId),
    /// The link to `shard` was reset (silent, or its process restarted): these mails may never
    /// have arrived.
    Lost { shard: ShardId, mails: Vec<Mail> },
}

/// One link's figures, for `/metrics` and `/readyz`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub up: bool,
    /// Mails unacked, and mails waiting for room in the window.
    pub in_flight: usize,
    pub waiting: usize,
    pub mails_sent: u64,
    pub mails_received: u64,
    /// Data frames sent again (a lost frame, or a late ack).
    pub resent: u64,
    /// Times the link was reset (peer silent or restarted).
    pub resets: u64,
    /// Mail handed back by a reset.
    pub lost: u64,
    /// Batches refused (wrong version, truncated, not for this shard) and mails that failed
    /// validation.
    pub invalid: u64,
    /// The link's smoothed round trip from a mail's send to its ack (ms resolution, in µs):
    /// NATS plus the peer's queueing.
    pub ack_rtt_us: u64,
}

struct Peer {
    /// Index of the peer's node in the map: where its batches are published.
    node: usize,
    link: Link,
    /// Mail refused by a full window, in send order.
    waiting: VecDeque<Arc<[u8]>>,
    /// Frames due out with the next batch.
    frames: Vec<Frame>,
    up: bool,
    heard_ms: u64,
    hello_at: u64,
    stats: LinkStats,
}

/// Why a batch was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("batch from shard {from} to shard {to}, which is not a link of this shard")]
    Misrouted { from: u16, to: u16 },
    #[error(
        "batch from a node with cluster map {theirs:016x}, this node's is {ours:016x}: not linked"
    )]
    OtherMap { ours: u64, theirs: u64 },
}

pub struct Remotes {
    me: ShardId,
    /// The placement map's hash, in every batch both ways.
    map_hash: u64,
    tuning: Tuning,
    /// The incarnation the next reset link takes: grows, so a peer reads a reset as a restart.
    next_inc: u64,
    /// By cluster-wide shard id; `None` for this node's shards.
    peers: Vec<Option<Peer>>,
    /// The sum of the peers' waiting FIFOs' lengths, kept as they change: the driver reads it
    /// for every client frame (its admission gate).
    waiting: usize,
}

impl Remotes {
    /// Links from shard `me` (on node `node` of `map`) to every shard of the other nodes.
    /// `incarnation` must grow from one process to the next (the start time in µs).
    pub fn new(
        map: &ClusterMap,
        node: usize,
        me: ShardId,
        incarnation: u64,
        tuning: Tuning,
    ) -> Remotes {
        let mut next_inc = incarnation.max(1);
        let total = map.placement().shards();
        let peers = (0..total)
            .map(|s| {
                let at = map.locate(ShardId(s))?;
                (at.node != node).then(|| {
                    let link = Link::new(next_inc, tuning.window, tuning.rto_ms);
                    next_inc += 1;
                    Peer {
                        node: at.node,
                        link,
                        waiting: VecDeque::new(),
                        frames: Vec::new(),
                        up: false,
                        heard_ms: 0,
                        hello_at: 0,
                        stats: LinkStats::default(),
                    }
                })
            })
            .collect();
        Remotes {
            me,
            map_hash: map.hash().0,
            tuning,
            next_inc,
            peers,
            waiting: 0,
        }
    }

    pub fn is_remote(&self, shard: ShardId) -> bool {
        matches!(self.peers.get(shard.0 as usize), Some(Some(_)))
    }

    pub fn is_up(&self, shard: ShardId) -> bool {
        matches!(self.peers.get(shard.0 as usize), Some(Some(p)) if p.up)
    }

    /// Queues `mail` for remote shard `to`. Refused (handed back) while the link is down, or
    /// if `to` is not a remote shard.
    pub fn send(&mut self, now_ms: u64, to: ShardId, mail: Mail) -> Result<(), Box<Mail>> {
        let Some(Some(peer)) = self.peers.get_mut(to.0 as usize) else {
            return Err(Box::new(mail));
        };
        if !peer.up {
            return Err(Box::new(mail));
        }
        let payload = wire::encode(&mail);
        peer.stats.mails_sent += 1;
        let before = peer.waiting.len();
        if before > 0 {
            peer.waiting.push_back(payload);
        } else {
            peer.send(now_ms, payload);
        }
        self.waiting += peer.waiting.len() - before;
        Ok(())
    }

    /// A batch NATS delivered. Frames of an earlier life of either side are dropped by the
    /// link; a batch that is not valid is refused whole.
    pub fn receive(&mut self, now_ms: u64, batch: &[u8]) -> Result<Vec<RemoteEvent>, BatchError> {
        let (hash, from, to, mut rest) = split_header(batch)?;
        if hash != self.map_hash {
            return Err(BatchError::OtherMap {
                ours: self.map_hash,
                theirs: hash,
            });
        }
        let Some(Some(peer)) = self
            .peers
            .get_mut(from as usize)
            .filter(|_| to == self.me.0)
        else {
            return Err(BatchError::Misrouted { from, to });
        };
        let shard = ShardId(from);
        let mut events = Vec::new();
        while !rest.is_empty() {
            let Some((frame, tail)) = next_frame(rest) else {
                peer.stats.invalid += 1;
                return Err(BatchError::Wire(WireError::Malformed));
            };
            rest = tail;
            let frame = match Frame::decode(frame) {
                Ok(frame) => frame,
                Err(e) => {
                    peer.stats.invalid += 1;
                    return Err(e.into());
                }
            };
            let from_inc = frame.from_inc();
            for event in peer.link.receive(now_ms, frame) {
                match event {
                    LinkEvent::Deliver(payload) => match wire::decode(&payload) {
                        Ok(mail) => {
                            peer.stats.mails_received += 1;
                            events.push(RemoteEvent::Mail(mail));
                        }
                        Err(e) => {
                            peer.stats.invalid += 1;
                            tracing::warn!(from = %shard, error = %e, "invalid mail dropped");
                        }
                    },
                    LinkEvent::PeerRestarted { unacked } => {
                        peer.stats.resets += 1;
                        peer.stats.lost += unacked.len() as u64;
                        events.push(RemoteEvent::Lost {
                            shard,
                            mails: decode_own(unacked),
                        });
                        if peer.up {
                            events.push(RemoteEvent::Up(shard));
                        }
                    }
                }
            }
            // A frame of the peer's current life: it is alive.
            if peer.link.peer() == Some(from_inc) {
                peer.heard_ms = now_ms;
                if !peer.up {
                    peer.up = true;
                    events.push(RemoteEvent::Up(shard));
                }
            }
        }
        let before = peer.waiting.len();
        peer.refill(now_ms);
        self.waiting -= before - peer.waiting.len();
        Ok(events)
    }

    /// Hellos due, silent peers reset. Call when [`Remotes::poll_timeout`] is due.
    /// `behind`: batches from NATS are waiting to be read by this shard — then no peer is
    /// judged silent (what they sent may be in that queue: the slow one is this shard).
    pub fn handle_timeout(&mut self, now_ms: u64, behind: bool) -> Vec<RemoteEvent> {
        let mut events = Vec::new();
        for (s, peer) in self.peers.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            if behind && peer.up {
                peer.heard_ms = peer
                    .heard_ms
                    .max(now_ms.saturating_sub(self.tuning.silent_ms / 2));
            }
            if peer.up && now_ms >= peer.heard_ms + self.tuning.silent_ms {
                let fresh = Link::new(self.next_inc, self.tuning.window, self.tuning.rto_ms);
                self.next_inc += 1;
                let old = std::mem::replace(&mut peer.link, fresh);
                let mut lost = old.into_unacked();
                self.waiting -= peer.waiting.len();
                lost.extend(peer.waiting.drain(..));
                peer.frames.clear();
                peer.up = false;
                peer.stats.resets += 1;
                peer.stats.lost += lost.len() as u64;
                tracing::warn!(
                    shard = %self.me, peer = s, lost = lost.len(),
                    "link reset: nothing heard from the peer for {} ms", self.tuning.silent_ms
                );
                events.push(RemoteEvent::Lost {
                    shard: ShardId(s as u16),
                    mails: decode_own(lost),
                });
            }
            if now_ms >= peer.hello_at {
                peer.hello_at = now_ms + self.tuning.hello_ms;
                let hello = peer.link.hello();
                peer.frames.push(hello);
            }
        }
        events
    }

    /// When `handle_timeout` or `poll_transmit` next has work, if no input comes first.
    pub fn poll_timeout(&self) -> Option<u64> {
        let silent = self.tuning.silent_ms;
        self.peers
            .iter()
            .flatten()
            .flat_map(|p| {
                [
                    Some(p.hello_at),
                    p.up.then_some(p.heard_ms + silent),
                    p.link.poll_timeout(),
                ]
            })
            .flatten()
            .min()
    }

    /// Batches due out: `(node index, batch)`, at most one per remote shard.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Vec<(usize, Vec<u8>)> {
        let (me, hash) = (self.me.0, self.map_hash);
        let mut out = Vec::new();
        for (s, peer) in self.peers.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            for frame in peer.link.poll_transmit(now_ms) {
                // Data here is a go-back-N resend (or, rarely, the first transmission of mail
                // queued before the peer's incarnation was known).
                if matches!(frame, Frame::Data { .. }) {
                    peer.stats.resent += 1;
                }
                peer.frames.push(frame);
            }
            if peer.frames.is_empty() {
                continue;
            }
            // Several batches when the frames outgrow one NATS message (a resend of a full
            // window can be ~1 MB; NATS refuses a message over its max_payload, 1 MiB by
            // default, and a refused batch resent whole would be refused forever).
            let frames = std::mem::take(&mut peer.frames);
            let mut start = 0;
            let mut bytes = 0;
            for (end, frame) in frames.iter().enumerate() {
                let size = frame.encoded_len() + 4;
                if end > start && bytes + size > BATCH_BYTES_MAX {
                    out.push((
                        peer.node,
                        encode_batch(hash, me, s as u16, &frames[start..end]),
                    ));
                    (start, bytes) = (end, 0);
                }
                bytes += size;
            }
            out.push((
                peer.node,
                encode_batch(hash, me, s as u16, &frames[start..]),
            ));
        }
        out
    }

    /// Mails waiting for room in a window, over all links.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Each link's figures, by remote shard.
    pub fn stats(&self) -> impl Iterator<Item = (ShardId, LinkStats)> + '_ {
        self.peers.iter().enumerate().filter_map(|(s, p)| {
            p.as_ref().map(|p| {
                let mut stats = p.stats;
                stats.up = p.up;
                stats.in_flight = p.link.in_flight();
                stats.waiting = p.waiting.len();
                stats.ack_rtt_us = p.link.srtt_ms().unwrap_or(0) * 1000;
                (ShardId(s as u16), stats)
            })
        })
    }
}

impl Peer {
    fn send(&mut self, now_ms: u64, payload: Arc<[u8]>) {
        match self.link.send(now_ms, payload) {
            Ok(Some(frame)) => self.frames.push(frame),
            Ok(None) => {}
            Err(full) => self.waiting.push_back(full.0),
        }
    }

    /// Moves waiting mail into the window while it has room.
    fn refill(&mut self, now_ms: u64) {
        while let Some(payload) = self.waiting.pop_front() {
            match self.link.send(now_ms, payload) {
                Ok(Some(frame)) => self.frames.push(frame),
                Ok(None) => {}
                Err(full) => {
                    self.waiting.push_front(full.0);
                    break;
                }
            }
        }
    }
}

/// Mail this shard encoded, handed back by a reset.
fn decode_own(payloads: Vec<Arc<[u8]>>) -> Vec<Mail> {
    payloads
        .iter()
        .filter_map(|p| wire::decode(p).ok())
        .collect()
}

const HEADER: usize = 13;

/// A batch's frames stop growing past this many bytes: well under NATS's default max_payload
/// (1 MiB), which must exceed the largest single mail (a `Deliver` to 10,000 members of one
/// shard is ~80 KB).
pub const BATCH_BYTES_MAX: usize = 256 * 1024;

pub fn encode_batch(map_hash: u64, from: u16, to: u16, frames: &[Frame]) -> Vec<u8> {
    let bytes: usize = frames.iter().map(|f| 4 + f.encoded_len()).sum();
    let mut out = Vec::with_capacity(HEADER + bytes);
    out.push(WIRE_VERSION);
    out.extend_from_slice(&map_hash.to_be_bytes());
    out.extend_from_slice(&from.to_be_bytes());
    out.extend_from_slice(&to.to_be_bytes());
    for frame in frames {
        out.extend_from_slice(&(frame.encoded_len() as u32).to_be_bytes());
        frame.encode_into(&mut out);
    }
    out
}

/// `(map hash, from shard, to shard, frames)` of a batch, or why it is not one.
fn split_header(batch: &[u8]) -> Result<(u64, u16, u16, &[u8]), WireError> {
    let Some(header) = batch.get(..HEADER) else {
        return Err(WireError::Malformed);
    };
    if header[0] != WIRE_VERSION {
        return Err(WireError::Version(header[0]));
    }
    let mut hash = [0; 8];
    hash.copy_from_slice(&header[1..9]);
    let from = u16::from_be_bytes([header[9], header[10]]);
    let to = u16::from_be_bytes([header[11], header[12]]);
    Ok((u64::from_be_bytes(hash), from, to, &batch[HEADER..]))
}

/// A NATS message stops growing past this many bytes (a batch larger on its own still goes,
/// alone): room for two full batches, under NATS's default max_payload (1 MiB).
pub const MESSAGE_BYTES_MAX: usize = 2 * BATCH_BYTES_MAX;

/// Packs batches `(node, batch)` into NATS messages `(node, message)`: the batches for one
/// node, in their order, share messages of at most `MESSAGE_BYTES_MAX` bytes.
pub fn pack(batches: Vec<(usize, Vec<u8>)>) -> Vec<(usize, Vec<u8>)> {
    let mut out: Vec<(usize, Vec<u8>)> = Vec::new();
    // Index in `out` of each node's message still open.
    let mut open: Vec<(usize, usize)> = Vec::new();
    for (node, batch) in batches {
        let i = match open.iter().find(|(n, _)| *n == node) {
            Some(&(_, i)) if out[i].1.len() + 4 + batch.len() <= MESSAGE_BYTES_MAX => i,
            _ => {
                out.push((node, Vec::with_capacity(4 + batch.len())));
                let i = out.len() - 1;
                open.retain(|(n, _)| *n != node);
                open.push((node, i));
                i
            }
        };
        let message = &mut out[i].1;
        message.extend_from_slice(&(batch.len() as u32).to_be_bytes());
        message.extend_from_slice(&batch);
    }
    out
}

/// The batches of a NATS message: each one's destination shard and byte range. A message
/// whose lengths or headers do not hold is refused whole (the links resend what it carried).
pub fn message_batches(
    message: &[u8],
) -> Result<Vec<(ShardId, std::ops::Range<usize>)>, WireError> {
    let mut batches = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let (batch, _) = next_frame(&message[at..]).ok_or(WireError::Malformed)?;
        let (_, _, to, _) = split_header(batch)?;
        batches.push((ShardId(to), at + 4..at + 4 + batch.len()));
        at += 4 + batch.len();
    }
    if batches.is_empty() {
        return Err(WireError::Malformed);
    }
    Ok(batches)
}

fn next_frame(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    Some((bytes.get(4..end)?, &bytes[end..]))
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::cluster::NodeSpec;
    use crate::ids::ConnId;

    fn map(version: u64) -> ClusterMap {
        let node = |id: &str| NodeSpec {
            id: id.into(),
            url: format!("ws://{id}/ws"),
            shards: 1,
        };
        ClusterMap {
            version,
            nodes: vec![node("a"), node("b")],
        }
    }

    const TUNING: Tuning = Tuning {
        window: 8,
        rto_ms: 50,
        hello_ms: 20,
        silent_ms: 200,
    };

    fn side(node: usize, inc: u64) -> Remotes {
        Remotes::new(&map(1), node, ShardId(node as u16), inc, TUNING)
    }

    fn mail(i: u64) -> Mail {
        Mail::Reply {
            conn: ConnId(i),
            frame: format!("mail {i}"),
        }
    }

    fn number(event: &RemoteEvent) -> Option<u64> {
        match event {
            RemoteEvent::Mail(Mail::Reply { conn, .. }) => Some(conn.0),
            _ => None,
        }
    }

    /// Batches in flight: (due, to side, batch).
    type Flight = Vec<(u64, usize, Vec<u8>)>;

    /// Runs both sides for `ms` over a network that drops, duplicates and delays batches;
    /// returns the numbers each side delivered, in order.
    fn run(
        sides: &mut [Remotes; 2],
        (now, flight): (&mut u64, &mut Flight),
        ms: u64,
        rng: &mut StdRng,
        loss: f64,
    ) -> [Vec<u64>; 2] {
        let mut got = [Vec::new(), Vec::new()];
        let end = *now + ms;
        while *now < end {
            for (i, side) in sides.iter_mut().enumerate() {
                side.handle_timeout(*now, false);
                for (node, batch) in side.poll_transmit(*now) {
                    assert_eq!(node, 1 - i);
                    for _ in 0..(1 + usize::from(rng.gen_bool(0.1))) {
                        if !rng.gen_bool(loss) {
                            flight.push((*now + rng.gen_range(1..10), node, batch.clone()));
                        }
                    }
                }
            }
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(flight)
                .into_iter()
                .partition(|f| f.0 <= *now);
            *flight = later;
            for (_, to, batch) in due {
                let events = sides[to].receive(*now, &batch).expect("valid batch");
                got[to].extend(events.iter().filter_map(number));
            }
            for side in sides.iter() {
                let sum: usize = side.stats().map(|(_, l)| l.waiting).sum();
                assert_eq!(side.waiting(), sum, "the running total is the peers' sum");
            }
            *now += 1;
        }
        got
    }

    #[test]
    fn mail_crosses_once_and_in_order_over_a_lossy_network() {
        for seed in 0..10 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sides = [side(0, 100), side(1, 200)];
            let (mut now, mut flight) = (1, Flight::new());
            run(&mut sides, (&mut now, &mut flight), 100, &mut rng, 0.0);
            assert!(sides[0].is_up(ShardId(1)) && sides[1].is_up(ShardId(0)));
            let mut next = 0;
            let mut got = Vec::new();
            for _ in 0..50 {
                for _ in 0..rng.gen_range(0..6) {
                    sides[0].send(now, ShardId(1), mail(next)).unwrap();
                    next += 1;
                }
                got.extend(run(&mut sides, (&mut now, &mut flight), 10, &mut rng, 0.2)[1].clone());
            }
            // Then a lossless network drains what is left (window 8, so a few round trips).
            for _ in 0..100 {
                if got.len() as u64 == next {
                    break;
                }
                got.extend(run(&mut sides, (&mut now, &mut flight), 10, &mut rng, 0.0)[1].clone());
            }
            assert_eq!(got, (0..next).collect::<Vec<_>>(), "seed {seed}");
            let stats: Vec<_> = sides[0].stats().collect();
            assert_eq!(stats[0].1.mails_sent, next);
            assert_eq!(stats[0].1.resets, 0, "lossy, never silent for 200 ms");
        }
    }

    #[test]
    fn a_silent_peer_is_reset_and_its_unacked_mail_handed_back() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut sides = [side(0, 100), side(1, 200)];
        let (mut now, mut flight) = (1, Flight::new());
        run(&mut sides, (&mut now, &mut flight), 100, &mut rng, 0.0);
        for i in 0..3 {
            sides[0].send(now, ShardId(1), mail(i)).unwrap();
        }
        // The peer goes silent: nothing reaches it or comes back.
        let mut lost = Vec::new();
        for _ in 0..=TUNING.silent_ms {
            now += 1;
            for event in sides[0].handle_timeout(now, false) {
                if let RemoteEvent::Lost { shard, mails } = event {
                    assert_eq!(shard, ShardId(1));
                    lost.extend(mails.iter().map(|m| match m {
                        Mail::Reply { conn, .. } => conn.0,
                        _ => unreachable!(),
                    }));
                }
            }
            sides[0].poll_transmit(now);
        }
        assert_eq!(lost, vec![0, 1, 2]);
        assert!(!sides[0].is_up(ShardId(1)));
        assert!(
            sides[0].send(now, ShardId(1), mail(9)).is_err(),
            "refused while down"
        );
        // Heard again: up, and mail flows on fresh numbering (the peer reset its side too).
        let got = run(&mut sides, (&mut now, &mut flight), 100, &mut rng, 0.0);
        assert!(sides[0].is_up(ShardId(1)));
        assert!(got[1].is_empty());
        sides[0].send(now, ShardId(1), mail(10)).unwrap();
        assert_eq!(
            run(&mut sides, (&mut now, &mut flight), 50, &mut rng, 0.0)[1],
            vec![10]
        );
    }

    #[test]
    fn a_restarted_peer_reads_as_lost_then_up() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut sides = [side(0, 100), side(1, 200)];
        let (mut now, mut flight) = (1, Flight::new());
        run(&mut sides, (&mut now, &mut flight), 100, &mut rng, 0.0);
        sides[0].send(now, ShardId(1), mail(1)).unwrap();
        sides[0].poll_transmit(now); // sent, never acked: the peer dies now
        sides[1] = side(1, 300);
        let mut events = Vec::new();
        for _ in 0..50 {
            now += 1;
            for i in 0..2 {
                sides[i].handle_timeout(now, false);
                for (node, batch) in sides[i].poll_transmit(now) {
                    events.extend(
                        sides[node]
                            .receive(now, &batch)
                            .unwrap()
                            .into_iter()
                            .map(|e| (node, e)),
                    );
                }
            }
        }
        let on_a: Vec<_> = events
            .iter()
            .filter(|(n, _)| *n == 0)
            .map(|(_, e)| e)
            .collect();
        assert!(
            matches!(on_a[0], RemoteEvent::Lost { mails, .. } if mails.len() == 1),
            "{on_a:?}"
        );
        assert!(matches!(on_a[1], RemoteEvent::Up(ShardId(1))), "{on_a:?}");
    }

    #[test]
    fn a_full_window_resent_leaves_in_batches_nats_accepts() {
        let tuning = Tuning {
            window: 4096,
            ..TUNING
        };
        let mut a = Remotes::new(&map(1), 0, ShardId(0), 100, tuning);
        let mut b = Remotes::new(&map(1), 1, ShardId(1), 200, tuning);
        a.handle_timeout(1, false);
        b.handle_timeout(1, false);
        for (_, batch) in b.poll_transmit(1) {
            a.receive(1, &batch).unwrap();
        }
        let body = "x".repeat(300);
        for i in 0..4096 {
            let mail = Mail::Reply {
                conn: ConnId(i),
                frame: body.clone(),
            };
            a.send(1, ShardId(1), mail).unwrap();
        }
        let first = a.poll_transmit(1);
        let resent = a.poll_transmit(1 + 10 * TUNING.rto_ms);
        for batches in [first, resent] {
            assert!(batches.len() > 1, "more than 1 MB of mail: several batches");
            assert!(batches
                .iter()
                .all(|(_, b)| b.len() <= BATCH_BYTES_MAX + 1024));
            let mut got = 0;
            let mut b = Remotes::new(&map(1), 1, ShardId(1), 200, tuning);
            for (_, batch) in &batches {
                got += b
                    .receive(2, batch)
                    .unwrap()
                    .iter()
                    .filter_map(number)
                    .count();
            }
            assert_eq!(got, 4096, "every frame in some batch, in order");
        }
    }

    #[test]
    fn batches_of_another_map_or_malformed_are_refused() {
        let mut a = side(0, 100);
        let mut stranger = Remotes::new(&map(2), 1, ShardId(1), 5, TUNING);
        stranger.handle_timeout(1, false);
        let (_, batch) = stranger.poll_transmit(1).pop().unwrap();
        assert!(matches!(
            a.receive(1, &batch),
            Err(BatchError::OtherMap { .. })
        ));
        assert!(!a.is_up(ShardId(1)));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2000 {
            let len = rng.gen_range(0..64);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) && junk.len() > HEADER {
                // A valid header with a garbage body: refused, never a panic.
                junk[..HEADER].copy_from_slice(&batch[..HEADER]);
                junk[1..9].copy_from_slice(&map(1).hash().0.to_be_bytes());
                junk[11..13].copy_from_slice(&0u16.to_be_bytes());
            }
            let _ = a.receive(1, &junk);
        }
        assert!(wire::decode(b"not an archive").is_err());
    }

    /// A turn's batches for the shards of one node share NATS messages, cut near
    /// `MESSAGE_BYTES_MAX`; split back, each is the batch it was, in order, at its shard.
    #[test]
    fn batches_for_one_node_share_a_message_and_split_back_whole() {
        let batch = |to: u16, extra: usize| {
            let mut b = encode_batch(7, 0, to, &[]);
            b.resize(b.len() + extra, 0xAB);
            b
        };
        let batches = vec![
            (1, batch(2, 10)),
            (2, batch(5, 0)),
            (1, batch(3, 200 * 1024)),
            (1, batch(2, 200 * 1024)),
            (1, batch(4, 200 * 1024)),
        ];
        let messages = pack(batches.clone());
        let nodes: Vec<usize> = messages.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            nodes,
            [1, 2, 1],
            "node 1's third large batch opens a second message"
        );
        assert!(messages.iter().all(|(_, m)| m.len() <= MESSAGE_BYTES_MAX));
        let mut split = Vec::new();
        for (node, message) in &messages {
            for (to, range) in message_batches(message).unwrap() {
                let part = message[range].to_vec();
                assert_eq!(split_header(&part).unwrap().2, to.0);
                split.push((*node, part));
            }
        }
        let mut expected = batches;
        expected.swap(1, 2); // node 1's first message, then node 2's, then node 1's second
        expected.swap(2, 3);
        assert_eq!(split, expected);

        // A message cut short, or carrying a batch of another version, is refused whole.
        let (_, message) = &messages[0];
        for cut in [0, 3, 4, 20, message.len() - 1] {
            assert!(message_batches(&message[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = message.clone();
        other[4] = WIRE_VERSION + 1;
        assert!(matches!(
            message_batches(&other),
            Err(WireError::Version(_))
        ));
    }
}
