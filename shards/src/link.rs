//! The link layer between a shard and a shard on another node (issue 13's transport): what
//! keeps mail between nodes FIFO, bounded and not lost while both processes live, over a
//! transport that may lose, duplicate, reorder and delay frames (core NATS delivers at most
//! once and drops silently for slow consumers). Sans-IO: frames in, frames out, with the time.
//!
//! One [`Link`] per ordered pair of shards (local `a`, remote `b`) carries both directions:
//! mail `a → b` (sequence numbers, a window of unacked mail, resend after `rto_ms`) and mail
//! `b → a` (delivery in sequence order, cumulative acks). A receiver keeps mail that arrives
//! ahead of a gap (at most `window` of it) and delivers in order once the gap fills; it acks
//! the last mail delivered. A sender whose oldest unacked mail has waited `rto_ms` sends every
//! unacked mail again (NATS keeps one connection's order, so a gap means a loss), and doubles
//! the wait for the next resend (up to `RTO_BACKOFF_MAX` times `rto_ms`) until an ack moves.
//! The wait is never below twice the measured round trip (smoothed, from mails sent once):
//! a slow receiver is not buried under copies of a window it is still working through.
//!
//! **Incarnations.** Every node process has an incarnation that grows from one life to the next
//! (the driver uses its start time in microseconds). Data frames name both the sender's
//! incarnation and the receiver's (as the sender knows it); acks likewise. A frame addressed
//! to an earlier life of its receiver, or sent by an earlier life of its sender, is dropped, so
//! nothing from before a restart is mistaken for current mail. When a link learns that its
//! peer is a later process (a `Hello`, a frame or an ack with a larger incarnation) it resets
//! both directions: the mail still unacked is handed back as [`LinkEvent::PeerRestarted`] (the
//! dead peer may or may not have delivered it: the engine's end-to-end retries and dedup
//! decide), numbering restarts at 1, and the inbound side expects 1 again.
//!
//! Invariants (tested below over a lossy, duplicating, reordering network):
//! - while neither side restarts, every mail sent is delivered exactly once, in send order;
//! - at most `window` mails are unacked; beyond, `send` refuses ([`Full`]) and the caller
//!   applies backpressure, as a full shard channel does today;
//! - after a peer restart, no mail of an old life is delivered, and every mail sent was
//!   delivered or handed back (possibly both: delivered, then the peer died before acking).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// One frame between two shards on different nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Mail number `seq` from `from_inc` to `to_inc`.
    Data {
        from_inc: u64,
        to_inc: u64,
        seq: u64,
        /// Shared with the sender's window: a resend copies no mail.
        payload: Arc<[u8]>,
    },
    /// Everything up to `ack` from `to_inc` was delivered by `from_inc`.
    Ack {
        from_inc: u64,
        to_inc: u64,
        ack: u64,
    },
    /// A node's heartbeat, naming its incarnation: how a link learns its peer's, and that the
    /// peer restarted.
    Hello { from_inc: u64 },
}

/// Bytes of a frame before its payload: version, kind, three integers.
const FRAME_HEADER: usize = 26;

/// The longest resend wait, in multiples of `rto_ms` (200 ms × 16 = 3.2 s by default).
pub const RTO_BACKOFF_MAX: u64 = 16;

/// The version of the frame encoding; a frame of another version is refused, never guessed at.
/// 2: batches travel inside length-prefixed NATS messages per node (`remote::pack`).
/// 3: `Mail::Deliver` carries the whole `msg` push frame (no per-device push id).
pub const WIRE_VERSION: u8 = 4;

/// Why bytes from the transport are not a frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of wire version {0}, this build speaks {WIRE_VERSION}")]
    Version(u8),
    #[error("frame truncated or of an unknown kind")]
    Malformed,
}

impl Frame {
    /// The length of `encode()`'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Data { payload, .. } => FRAME_HEADER + payload.len(),
            Frame::Ack { .. } | Frame::Hello { .. } => FRAME_HEADER,
        }
    }

    /// `version, kind, from_inc, to_inc, seq|ack, payload…`, integers big-endian: fixed
    /// offsets, so decoding is bounds checks and no allocation but the payload's.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// `encode`, appended to `out` (a batch being built: no buffer per frame).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, from_inc, to_inc, n, payload): (u8, u64, u64, u64, &[u8]) = match self {
            Frame::Data {
                from_inc,
                to_inc,
                seq,
                payload,
            } => (b'D', *from_inc, *to_inc, *seq, payload),
            Frame::Ack {
                from_inc,
                to_inc,
                ack,
            } => (b'A', *from_inc, *to_inc, *ack, &[]),
            Frame::Hello { from_inc } => (b'H', *from_inc, 0, 0, &[]),
        };
        out.push(WIRE_VERSION);
        out.push(kind);
        for v in [from_inc, to_inc, n] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(payload);
    }

    /// The sender's incarnation, which every frame names.
    pub fn from_inc(&self) -> u64 {
        match self {
            Frame::Data { from_inc, .. }
            | Frame::Ack { from_inc, .. }
            | Frame::Hello { from_inc } => *from_inc,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
        let (&version, rest) = bytes.split_first().ok_or(WireError::Malformed)?;
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        if rest.len() < 25 {
            return Err(WireError::Malformed);
        }
        let int = |at: usize| {
            u64::from_be_bytes(rest[at..at + 8].try_into().expect("length checked above"))
        };
        let (from_inc, to_inc, n, payload) = (int(1), int(9), int(17), &rest[25..]);
        match rest[0] {
            b'D' => Ok(Frame::Data {
                from_inc,
                to_inc,
                seq: n,
                payload: payload.into(),
            }),
            b'A' if payload.is_empty() => Ok(Frame::Ack {
                from_inc,
                to_inc,
                ack: n,
            }),
            b'H' if payload.is_empty() => Ok(Frame::Hello { from_inc }),
            _ => Err(WireError::Malformed),
        }
    }
}

/// What a link tells the engine.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The next mail from the peer, in order.
    Deliver(Arc<[u8]>),
    /// The peer is a new process: these mails (sent to its earlier life, unacked) may be lost.
    PeerRestarted { unacked: Vec<Arc<[u8]>> },
}

/// The window is full: the caller holds the mail back until acks make room.
#[derive(Debug, PartialEq, Eq)]
pub struct Full(pub Arc<[u8]>);

struct Unacked {
    seq: u64,
    payload: Arc<[u8]>,
    sent_ms: Option<u64>,
    /// Sent more than once: its ack says nothing of the round trip (Karn's rule).
    resent: bool,
}

pub struct Link {
    my_inc: u64,
    /// The peer's incarnation once known (from a hello or a frame).
    peer_inc: Option<u64>,
    window: usize,
    rto_ms: u64,
    /// The wait before the next resend: the base (`rto_base`), doubled by each resend without
    /// progress.
    rto_now: u64,
    /// Smoothed round trip from a mail's send to its ack (ms), once measured.
    srtt_ms: Option<u64>,
    // Outbound.
    next_seq: u64,
    unacked: VecDeque<Unacked>,
    // Inbound: the next sequence number to deliver, and mail that arrived ahead of it.
    expected: u64,
    ahead: BTreeMap<u64, Arc<[u8]>>,
    /// Inbound mail arrived since the last ack sent: an ack is due.
    ack_due: bool,
}

impl Link {
    /// `my_inc` is this process's incarnation (non-zero); `window` the most unacked mails;
    /// `rto_ms` how long a mail waits for its ack before it is sent again.
    pub fn new(my_inc: u64, window: usize, rto_ms: u64) -> Link {
        assert!(my_inc != 0 && window > 0 && rto_ms > 0);
        Link {
            my_inc,
            peer_inc: None,
            window,
            rto_ms,
            rto_now: rto_ms,
            srtt_ms: None,
            next_seq: 1,
            unacked: VecDeque::new(),
            expected: 1,
            ahead: BTreeMap::new(),
            ack_due: false,
        }
    }

    /// The peer's incarnation, once known: until then mail waits in the window unsent.
    pub fn peer(&self) -> Option<u64> {
        self.peer_inc
    }

    /// This side's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.my_inc
    }

    /// The heartbeat naming this side's incarnation.
    pub fn hello(&self) -> Frame {
        Frame::Hello {
            from_inc: self.my_inc,
        }
    }

    /// Ends the link, returning the mail never acked (the peer may or may not have had it).
    pub fn into_unacked(self) -> Vec<Arc<[u8]>> {
        self.unacked.into_iter().map(|u| u.payload).collect()
    }

    /// The smoothed round trip from a mail's send to its ack (ms), once measured.
    pub fn srtt_ms(&self) -> Option<u64> {
        self.srtt_ms
    }

    /// Mails sent and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// Queues `payload` for the peer. Returns the frame to transmit now (none while the peer's
    /// incarnation is unknown: it goes with the first `poll_transmit` after the hello).
    pub fn send(&mut self, now_ms: u64, payload: Arc<[u8]>) -> Result<Option<Frame>, Full> {
        if self.unacked.len() >= self.window {
            return Err(Full(payload));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = self.peer_inc.map(|to_inc| Frame::Data {
            from_inc: self.my_inc,
            to_inc,
            seq,
            payload: payload.clone(),
        });
        self.unacked.push_back(Unacked {
            seq,
            payload,
            sent_ms: frame.as_ref().map(|_| now_ms),
            resent: false,
        });
        Ok(frame)
    }

    /// A frame from the peer, at `now_ms`. Returns what to tell the engine; an ack may then be
    /// due (`poll_transmit`).
    pub fn receive(&mut self, now_ms: u64, frame: Frame) -> Vec<LinkEvent> {
        let mut events = Vec::new();
        match frame {
            Frame::Hello { from_inc } => {
                self.learn(from_inc, &mut events);
            }
            Frame::Data {
                from_inc,
                to_inc,
                seq,
                payload,
            } => {
                if to_inc != self.my_inc || !self.learn(from_inc, &mut events) {
                    return events; // between earlier lives of this process or the peer
                }
                self.ack_due = true;
                // Below `expected`: a duplicate. Beyond the window: the sender cannot have sent
                // it yet in this life; dropped. Otherwise kept until the gap before it fills.
                if seq >= self.expected && seq < self.expected + self.window as u64 {
                    self.ahead.insert(seq, payload);
                }
                while let Some(payload) = self.ahead.remove(&self.expected) {
                    self.expected += 1;
                    events.push(LinkEvent::Deliver(payload));
                }
            }
            Frame::Ack {
                from_inc,
                to_inc,
                ack,
            } => {
                if to_inc != self.my_inc || !self.learn(from_inc, &mut events) {
                    return events;
                }
                let mut newest = None;
                while self.unacked.front().is_some_and(|u| u.seq <= ack) {
                    newest = self.unacked.pop_front();
                }
                if let Some(u) = newest {
                    if let (false, Some(sent)) = (u.resent, u.sent_ms) {
                        let sample = now_ms.saturating_sub(sent);
                        self.srtt_ms = Some(self.srtt_ms.map_or(sample, |s| (7 * s + sample) / 8));
                    }
                    self.rto_now = self.rto_base(); // progress: back to the measured pace
                }
            }
        }
        events
    }

    /// Frames due now: an ack if mail arrived since the last one, mail never sent (the peer was
    /// unknown), and — go-back-N — every unacked mail once the oldest has waited `rto_ms`.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Vec<Frame> {
        let mut out = Vec::new();
        let Some(to_inc) = self.peer_inc else {
            return out;
        };
        if self.ack_due {
            self.ack_due = false;
            out.push(Frame::Ack {
                from_inc: self.my_inc,
                to_inc,
                ack: self.expected - 1,
            });
        }
        let resend = self
            .unacked
            .front()
            .and_then(|u| u.sent_ms)
            .is_some_and(|sent| now_ms >= sent + self.rto_now);
        if resend {
            let cap = (self.rto_ms * RTO_BACKOFF_MAX).max(4 * self.rto_base());
            self.rto_now = (self.rto_now * 2).min(cap);
        }
        for u in &mut self.unacked {
            if u.sent_ms.is_none() || resend {
                u.resent |= u.sent_ms.is_some();
                u.sent_ms = Some(now_ms);
                out.push(Frame::Data {
                    from_inc: self.my_inc,
                    to_inc,
                    seq: u.seq,
                    payload: u.payload.clone(),
                });
            }
        }
        out
    }

    /// When `poll_transmit` next has work, if nothing else happens first.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.unacked
            .front()
            .and_then(|u| u.sent_ms)
            .map(|sent| sent + self.rto_now)
    }

    /// The resend wait when acks flow: `rto_ms`, or twice the measured round trip if longer
    /// (a receiver queueing under load is slow, not lossy: resending to it only adds load).
    fn rto_base(&self) -> u64 {
        self.rto_ms.max(2 * self.srtt_ms.unwrap_or(0))
    }

    /// The peer's incarnation, seen in a frame: a larger one means a new process. False for a
    /// frame from an earlier life of the peer (to be dropped).
    fn learn(&mut self, inc: u64, events: &mut Vec<LinkEvent>) -> bool {
        match self.peer_inc {
            Some(known) if inc < known => return false,
            Some(known) if inc == known => {}
            Some(_) => {
                // A new life: nothing of the old one is delivered or acked from now on.
                let unacked = self.unacked.drain(..).map(|u| u.payload).collect();
                events.push(LinkEvent::PeerRestarted { unacked });
                self.peer_inc = Some(inc);
                self.rto_now = self.rto_ms;
                self.next_seq = 1;
                self.expected = 1;
                self.ahead.clear();
                self.ack_due = false;
            }
            None => self.peer_inc = Some(inc),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Frames in flight between two links, each delivered after a random delay, some dropped,
    /// some duplicated (so also reordered).
    struct Net {
        rng: StdRng,
        /// (deliver at, to side, frame)
        flight: Vec<(u64, usize, Frame)>,
        loss: f64,
        dup: f64,
    }

    impl Net {
        fn carry(&mut self, now: u64, to: usize, frame: Frame) {
            if self.rng.gen_bool(self.loss) {
                return;
            }
            let copies = if self.rng.gen_bool(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                let at = now + self.rng.gen_range(1..40);
                self.flight.push((at, to, frame.clone()));
            }
        }
    }

    fn mail(i: u64) -> Arc<[u8]> {
        Arc::from(&i.to_be_bytes()[..])
    }

    fn number(p: &[u8]) -> u64 {
        u64::from_be_bytes(p.try_into().unwrap())
    }

    /// Runs `steps` ms of two links exchanging mail both ways over `net`; `restart_b_at`
    /// replaces side 1 with a new process at that time. Returns, per direction, what was sent,
    /// delivered, and handed back as possibly lost.
    fn run(
        seed: u64,
        loss: f64,
        dup: f64,
        restart_b_at: Option<u64>,
    ) -> [(Vec<u64>, Vec<u64>, Vec<u64>); 2] {
        let mut net = Net {
            rng: StdRng::seed_from_u64(seed),
            flight: Vec::new(),
            loss,
            dup,
        };
        let mut incs = [11, 22];
        let mut links = [Link::new(11, 64, 50), Link::new(22, 64, 50)];
        let mut sent: [Vec<u64>; 2] = Default::default();
        let mut held: [VecDeque<u64>; 2] = Default::default();
        let mut delivered: [Vec<u64>; 2] = Default::default();
        let mut lost: [Vec<u64>; 2] = Default::default();
        let mut next = 0u64;
        // Mail until 5 s, then 5 s to drain (resends back off to 16 × 50 ms).
        for now in 0..10_000u64 {
            if Some(now) == restart_b_at {
                incs[1] = 33;
                links[1] = Link::new(33, 64, 50);
                held[1].clear();
            }
            if now % 100 == 0 {
                for (side, &from_inc) in incs.iter().enumerate() {
                    net.carry(now, 1 - side, Frame::Hello { from_inc });
                }
            }
            // Each side offers mail now and then (until 5 s), held back while its window is full.
            for side in 0..2 {
                if now < 5_000 && net.rng.gen_bool(0.3) {
                    next += 1;
                    sent[side].push(next);
                    held[side].push_back(next);
                }
                while let Some(&m) = held[side].front() {
                    match links[side].send(now, mail(m)) {
                        Ok(frame) => {
                            held[side].pop_front();
                            if let Some(f) = frame {
                                net.carry(now, 1 - side, f);
                            }
                        }
                        Err(Full(_)) => break,
                    }
                }
            }
            let (due, later): (Vec<_>, Vec<_>) =
                net.flight.drain(..).partition(|(at, _, _)| *at <= now);
            net.flight = later;
            for (_, to, frame) in due {
                for event in links[to].receive(now, frame) {
                    // Mail of side `to`'s peer (direction 1 - to → to).
                    match event {
                        LinkEvent::Deliver(p) => delivered[1 - to].push(number(&p)),
                        LinkEvent::PeerRestarted { unacked } => {
                            lost[to].extend(unacked.into_iter().map(|p| number(&p)))
                        }
                    }
                }
            }
            for (side, link) in links.iter_mut().enumerate() {
                for f in link.poll_transmit(now) {
                    net.carry(now, 1 - side, f);
                }
            }
        }
        let [s0, s1] = sent;
        let [d0, d1] = delivered;
        let [l0, l1] = lost;
        [(s0, d0, l0), (s1, d1, l1)]
    }

    #[test]
    fn lossy_duplicating_reordering_network_delivers_each_mail_once_in_order() {
        for seed in 0..20 {
            for (sent, delivered, lost) in run(seed, 0.2, 0.1, None) {
                assert!(
                    lost.is_empty(),
                    "seed {seed}: no restart, nothing handed back"
                );
                assert_eq!(delivered, sent, "seed {seed}: every mail once, in order");
                assert!(sent.len() > 1_000);
            }
        }
    }

    #[test]
    fn a_peer_restart_hands_back_what_it_may_have_missed_and_never_replays_the_old_life() {
        for seed in 0..20 {
            let [(sent_a, deliv_a, lost_a), (sent_b, deliv_b, _)] =
                run(seed, 0.1, 0.05, Some(2_500));
            // a → b: everything a sent is delivered to some life of b or handed back to a, and
            // what b delivered is in a's order (each life a contiguous run of it).
            let mut accounted: Vec<u64> = deliv_a.iter().chain(&lost_a).copied().collect();
            accounted.sort_unstable();
            accounted.dedup();
            let mut all = sent_a.clone();
            all.sort_unstable();
            assert!(
                all.iter().all(|m| accounted.binary_search(m).is_ok()),
                "seed {seed}: a mail neither delivered nor handed back"
            );
            let mut last = 0;
            for m in &deliv_a {
                assert!(
                    *m > last,
                    "seed {seed}: delivered twice or out of order: {m} after {last}"
                );
                last = *m;
            }
            // b → a: the new b's mail arrives once, in order.
            let mut last = 0;
            for m in &deliv_b {
                assert!(*m > last, "seed {seed}: b's mail out of order");
                last = *m;
            }
            assert!(!sent_b.is_empty());
        }
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let frames = [
            Frame::Data {
                from_inc: 1,
                to_inc: u64::MAX,
                seq: 7,
                payload: Arc::from(&b"mail"[..]),
            },
            Frame::Data {
                from_inc: 1,
                to_inc: 2,
                seq: 8,
                payload: Arc::from(&[][..]),
            },
            Frame::Ack {
                from_inc: 2,
                to_inc: 1,
                ack: 8,
            },
            Frame::Hello { from_inc: 3 },
        ];
        for f in &frames {
            let bytes = f.encode();
            assert_eq!(Frame::decode(&bytes).as_ref(), Ok(f));
            for cut in 0..bytes.len().min(26) {
                assert!(Frame::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        let mut other = frames[0].encode();
        other[0] = WIRE_VERSION + 1;
        assert_eq!(
            Frame::decode(&other),
            Err(WireError::Version(WIRE_VERSION + 1))
        );
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..10_000 {
            let len = rng.gen_range(0..40);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = Frame::decode(&bytes); // never panics
        }
    }

    #[test]
    fn the_window_bounds_unacked_mail_and_frames_for_an_old_life_are_dropped() {
        let mut a = Link::new(1, 2, 10);
        assert_eq!(
            a.send(0, Arc::from(&[1][..])),
            Ok(None),
            "peer unknown: held"
        );
        a.receive(0, Frame::Hello { from_inc: 9 });
        assert!(a.send(0, Arc::from(&[2][..])).unwrap().is_some());
        let three: Arc<[u8]> = Arc::from(&[3][..]);
        assert_eq!(a.send(0, three.clone()), Err(Full(three)));
        let first = a.poll_transmit(0);
        assert_eq!(
            first.len(),
            1,
            "the held mail goes out once the peer is known"
        );
        // An ack addressed to an earlier life of `a` is ignored.
        a.receive(
            0,
            Frame::Ack {
                from_inc: 9,
                to_inc: 7,
                ack: 2,
            },
        );
        assert_eq!(a.in_flight(), 2);
        a.receive(
            0,
            Frame::Ack {
                from_inc: 9,
                to_inc: 1,
                ack: 2,
            },
        );
        assert_eq!(a.in_flight(), 0);
        // Mail for an earlier life of `a` is not delivered.
        let events = a.receive(
            0,
            Frame::Data {
                from_inc: 9,
                to_inc: 5,
                seq: 1,
                payload: Arc::from(&[7][..]),
            },
        );
        assert!(events.is_empty());
        assert_eq!(a.poll_timeout(), None);
    }
}
