//! The open-loop machinery `direct`, `group` and `echo` share: per-connection send schedules
//! fixed before the run, the reader/writer tasks of one connection, and `drive`, which runs the
//! load phase and accounts for every message (acked, delivered once, in order).
//!
//! Open loop: connection `i` of `n` sends its `k`-th message at `start + (i/n + k) * n/rate`
//! seconds, whatever happened before; latencies are measured from that intended time.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::Conn;
use crate::report::Report;
use crate::stats::{histogram, record, Correctness, Summary};

/// Request ids of the measured phase start here, so `rid - RID_BASE` is the send's index.
pub(super) const RID_BASE: u64 = 1 << 32;

/// Pushes are acked in batches of this many, or after `Timing::ack_delay_ms`.
pub(super) const ACK_BATCH: usize = 64;

/// How often an idle reader re-checks whether the run has drained.
pub(super) const IDLE_TICK: Duration = Duration::from_millis(250);

/// The fixed send times of one connection.
#[derive(Clone, Copy)]
pub(super) struct Schedule {
    start: Instant,
    interval: Duration,
    offset: Duration,
}

impl Schedule {
    pub(super) fn new(start: Instant, rate: f64, conns: usize, index: usize) -> Schedule {
        let interval = Duration::from_secs_f64(conns as f64 / rate);
        Schedule {
            start,
            interval,
            offset: interval.mul_f64(index as f64 / conns as f64),
        }
    }

    pub(super) fn at(&self, k: u64) -> Instant {
        self.start + self.offset + self.interval.mul_f64(k as f64)
    }
}

/// Counters shared by all connections, for the progress line and the end of the drain.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) sent: AtomicU64,
    acked: AtomicU64,
    pub(super) answered: AtomicU64,
    delivered: AtomicU64,
}

impl Progress {
    /// Every one of `conns` connections has sent everything (`all_sent` counts them), every
    /// send is answered, and every acked message has reached its `fanout` connections: nothing
    /// is in flight any more.
    fn drained(&self, all_sent: &AtomicU64, conns: u64, fanout: u64) -> bool {
        all_sent.load(Ordering::Relaxed) == conns
            && self.answered.load(Ordering::Relaxed) == self.sent.load(Ordering::Relaxed)
            && self.delivered.load(Ordering::Relaxed) >= self.acked.load(Ordering::Relaxed) * fanout
    }
}

pub(super) fn progress_line(
    progress: Arc<Progress>,
    start: Instant,
    label: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let mut last = (0, 0);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sent = progress.sent.load(Ordering::Relaxed);
            let done = progress
                .delivered
                .load(Ordering::Relaxed)
                .max(progress.answered.load(Ordering::Relaxed));
            eprint!(
                "\r{label}: {:>5.1}s sent {sent} ({}/s), {} {done} ({}/s)      ",
                start.elapsed().as_secs_f64(),
                sent - last.0,
                if label == "echo" {
                    "answered"
                } else {
                    "delivered"
                },
                done - last.1
            );
            last = (sent, done);
        }
    })
}

pub(super) struct DirectConn {
    // Latency samples, not histograms: a histogram at these bounds is ~440 KB, and a run with
    // 10,000 receiving connections would zero gigabytes of them. Merged at the end.
    ack: Vec<Duration>,
    e2e: Vec<Duration>,
    /// From the actual send (not the intended one): what the server and network cost alone.
    e2e_service: Vec<Duration>,
    pub(super) sent: u64,
    unacked: u64,
    acked_ids: Vec<u128>,
    delivered_ids: HashSet<u128>,
    delivered_in_window: u64,
    /// Deliveries that *arrived* during the measured window (whenever they were sent).
    arrived_in_window: u64,
    duplicated: u64,
    reordered: u64,
}

impl DirectConn {
    pub(super) fn new() -> DirectConn {
        DirectConn {
            ack: Vec::new(),
            e2e: Vec::new(),
            e2e_service: Vec::new(),
            sent: 0,
            unacked: 0,
            acked_ids: Vec::new(),
            delivered_ids: HashSet::new(),
            delivered_in_window: 0,
            arrived_in_window: 0,
            duplicated: 0,
            reordered: 0,
        }
    }
}

/// The open-loop load phase of `direct`, `group` and `echo` (flattened into their reported
/// parameters).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    /// Sends (or requests) per second, all sending connections together.
    pub rate: f64,
    /// Seconds of load before measuring (excluded from latencies and throughput).
    pub warmup_s: f64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Longest wait after the last send for acks and deliveries.
    pub drain_s: f64,
    /// How long a connection holds its pushes' acks to send them together (or until
    /// `ACK_BATCH` wait): how often a client acks. Under the server's push retry interval
    /// (5 s), so batching never causes a resend.
    pub ack_delay_ms: u64,
}

impl Timing {
    pub(super) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.rate > 0.0 && self.duration_s > 0.0,
            "rate and duration must be positive"
        );
        anyhow::ensure!(
            (1..=2_500).contains(&self.ack_delay_ms),
            "the ack delay must be 1-2500 ms: under half the server's push retry interval"
        );
        Ok(())
    }
}

/// Runs the open-loop phase over `conns` (each with the conversations it sends to; an empty
/// list only receives) and accounts for every message: each acked one must reach `fanout`
/// connections exactly once, in seq order per conversation. Reports the figures with the ack,
/// end-to-end and service-time histograms under the scenario's name and parameters.
pub(super) async fn drive<P: Serialize>(
    conns: Vec<(Conn, Vec<String>)>,
    t: Timing,
    body_bytes: usize,
    fanout: u64,
    (label, params): (&'static str, &P),
) -> anyhow::Result<Report> {
    let start = Instant::now() + Duration::from_millis(500);
    let warm_end = start + Duration::from_secs_f64(t.warmup_s);
    let sends_end = warm_end + Duration::from_secs_f64(t.duration_s);
    let deadline = sends_end + Duration::from_secs_f64(t.drain_s);
    // The measured window in wall-clock time, to line up with server-side samples (CPU,
    // metrics) taken during the run.
    let unix_ms = |at: Instant| {
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let now = Instant::now();
        if at >= now {
            now_unix + (at - now).as_millis() as u64
        } else {
            now_unix.saturating_sub((now - at).as_millis() as u64)
        }
    };
    let window_unix_ms = [unix_ms(warm_end), unix_ms(sends_end)];
    let progress = Arc::new(Progress::default());
    let all_sent = Arc::new(AtomicU64::new(0)); // connections finished sending
    let printer = progress_line(progress.clone(), start, label);
    let pad = "x".repeat(body_bytes);
    let n = conns.len();
    let senders = conns.iter().filter(|(_, c)| !c.is_empty()).count().max(1);
    let mut tasks = Vec::with_capacity(n);
    let mut sender_index = 0;
    for (conn, convs) in conns {
        let schedule = Schedule::new(start, t.rate, senders, sender_index);
        let (progress, all_sent, pad) = (progress.clone(), all_sent.clone(), pad.clone());
        if convs.is_empty() {
            let stream = conn.into_tcp()?;
            tasks.push(tokio::spawn(receiver_conn(
                stream,
                (start, warm_end, sends_end, deadline),
                (progress, all_sent, n as u64, fanout),
                Duration::from_millis(t.ack_delay_ms),
            )));
            continue;
        }
        sender_index += 1;
        tasks.push(tokio::spawn(async move {
            direct_conn(
                conn,
                convs,
                schedule,
                (warm_end, sends_end, deadline),
                pad,
                (progress, all_sent, n as u64, fanout),
                Duration::from_millis(t.ack_delay_ms),
            )
            .await
        }));
    }
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.context("connection task")??);
    }
    printer.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }

    let (mut ack, mut e2e, mut e2e_service) = (histogram(), histogram(), histogram());
    let mut c = Correctness::default();
    let mut deliveries: HashMap<u128, u64> = HashMap::new();
    let mut acked_all = Vec::new();
    let (mut in_window, mut arrived) = (0, 0);
    for r in &mut results {
        arrived += r.arrived_in_window;
        for (h, samples) in [
            (&mut ack, &r.ack),
            (&mut e2e, &r.e2e),
            (&mut e2e_service, &r.e2e_service),
        ] {
            for &d in samples {
                record(h, d);
            }
        }
        c.sent += r.sent;
        c.unacked += r.unacked;
        c.duplicated += r.duplicated;
        c.reordered += r.reordered;
        in_window += r.delivered_in_window;
        acked_all.append(&mut r.acked_ids);
        for id in r.delivered_ids.drain() {
            *deliveries.entry(id).or_insert(0) += 1;
        }
    }
    c.acked = acked_all.len() as u64;
    c.delivered = deliveries.values().sum();
    c.lost = acked_all
        .iter()
        .map(|id| fanout.saturating_sub(deliveries.get(id).copied().unwrap_or(0)))
        .sum();
    // `throughput_per_s` counts messages *sent* in the window that were delivered (by the
    // drain's end); `arrived_per_s` counts deliveries *arriving* in the window. They agree
    // while the server keeps up; under overload the second is the rate actually achieved.
    let mut figures = json!({
        "throughput_per_s": in_window as f64 / t.duration_s / fanout as f64,
        "arrived_per_s": arrived as f64 / t.duration_s,
        "window_unix_ms": window_unix_ms,
        "offered_per_s": t.rate,
        "ack_latency": Summary::of(&ack),
        "e2e_latency": Summary::of(&e2e),
        "e2e_service_latency": Summary::of(&e2e_service),
        "correctness": c,
    });
    if fanout > 1 {
        figures["deliveries_per_s"] = json!(in_window as f64 / t.duration_s);
        figures["recipients_per_message"] = json!(fanout);
    }
    Report::new(
        label,
        params,
        figures,
        &[
            ("ack_latency", &ack),
            ("e2e_latency", &e2e),
            ("e2e_service_latency", &e2e_service),
        ],
    )
}

/// The fields of a server frame the reader needs; replies fall through to a `Value` parse.
#[derive(serde::Deserialize)]
pub(super) struct Incoming<'a> {
    #[serde(borrow, default)]
    push: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    msg: Option<PushedMsg<'a>>,
}

#[derive(serde::Deserialize)]
pub(super) struct PushedMsg<'a> {
    #[serde(borrow)]
    conv: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

/// A benchmark message's body: intended and actual send times (µs from the run's start).
#[derive(serde::Deserialize)]
pub(super) struct BenchBody {
    #[serde(default)]
    t: Option<u64>,
    #[serde(default)]
    a: Option<u64>,
}

/// A connection's `msg` pushes: the acks owed and the accounting of each delivery.
#[derive(Default)]
pub(super) struct Pushes {
    /// Per conversation, the highest seq received since the last ack (an ack covers every
    /// earlier push of that conversation on this connection).
    acks: HashMap<String, u64>,
    /// Pushes received since the last ack.
    unacked: usize,
    last_seq: HashMap<String, u64>,
}

impl Pushes {
    /// Accounts for one `msg` push that arrived at `now` (the run's clock: `start`, and the
    /// measured window from `warm_end` to `sends_end`).
    fn on_msg(
        &mut self,
        msg: &PushedMsg,
        now: Instant,
        out: &mut DirectConn,
        progress: &Progress,
        (start, warm_end, sends_end): (Instant, Instant, Instant),
    ) {
        let seq = msg.seq;
        self.unacked += 1;
        match self.acks.get_mut(msg.conv.as_ref()) {
            Some(acked) => *acked = (*acked).max(seq),
            None => {
                self.acks.insert(msg.conv.to_string(), seq);
            }
        }
        let Some(body) = serde_json::from_str::<BenchBody>(msg.body.get())
            .ok()
            .filter(|b| b.t.is_some())
        else {
            return; // not a benchmark message (a set-up system message): acked only
        };
        let id = uuid::Uuid::parse_str(&msg.id).map_or(0, |u| u.as_u128());
        let last = match self.last_seq.get_mut(msg.conv.as_ref()) {
            Some(last) => last,
            None => self.last_seq.entry(msg.conv.to_string()).or_insert(0),
        };
        if seq <= *last {
            if out.delivered_ids.contains(&id) {
                return; // a retry of a push already counted (same conversation and seq)
            }
            out.reordered += 1;
        }
        *last = (*last).max(seq);
        if !out.delivered_ids.insert(id) {
            out.duplicated += 1;
            return;
        }
        progress.delivered.fetch_add(1, Ordering::Relaxed);
        if now >= warm_end && now <= sends_end {
            out.arrived_in_window += 1;
        }
        let intended = start + Duration::from_micros(body.t.unwrap_or(0));
        if intended >= warm_end && intended <= sends_end {
            out.delivered_in_window += 1;
            out.e2e.push(now.saturating_duration_since(intended));
            let actual = start + Duration::from_micros(body.a.unwrap_or(0));
            out.e2e_service.push(now.saturating_duration_since(actual));
        }
    }

    /// The acks to send now, if `ACK_BATCH` pushes or `ack_delay` have passed since the last.
    /// A zero `ack_delay` never acks (channels and live rooms: their pushes are not acked).
    fn ack_due(
        &mut self,
        last_ack: &mut Instant,
        ack_delay: Duration,
    ) -> Option<HashMap<String, u64>> {
        if ack_delay.is_zero() {
            self.unacked = 0;
            self.acks.clear();
            return None;
        }
        if self.unacked == 0 || (self.unacked < ACK_BATCH && last_ack.elapsed() < ack_delay) {
            return None;
        }
        self.unacked = 0;
        *last_ack = Instant::now();
        Some(std::mem::take(&mut self.acks))
    }

    /// How long a reader may wait for bytes: until the ack batch is due when pushes wait to be
    /// acked; otherwise only now and then, to notice the end of the drain (with 10,000 idle
    /// receivers, a 20 ms tick each would be half a million timer wake-ups a second on the
    /// load generator's core).
    fn wait(&self, ack_delay: Duration) -> Duration {
        if self.unacked == 0 || ack_delay.is_zero() {
            IDLE_TICK
        } else {
            ack_delay
        }
    }
}

/// A connection that only receives (a group member that does not send). The WebSocket
/// client's framing is replaced by a hand-written reader of the server's frames (unmasked,
/// unfragmented: docs/protocol.md) on the bare socket, one task, no split halves and many
/// frames per read: the load generator spends its core on the accounting, so in a fan-out
/// run it is not what limits the figures (the client library cost ~25–34 µs a delivery).
async fn receiver_conn(
    mut stream: tokio::net::TcpStream,
    (start, warm_end, sends_end, deadline): (Instant, Instant, Instant, Instant),
    (progress, all_sent, conns, fanout): (Arc<Progress>, Arc<AtomicU64>, u64, u64),
    ack_delay: Duration,
) -> anyhow::Result<DirectConn> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    all_sent.fetch_add(1, Ordering::Relaxed); // it has nothing to send
    let mut out = DirectConn::new();
    let mut pushes = Pushes::default();
    let mut last_ack = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    'run: loop {
        if progress.drained(&all_sent, conns, fanout) || Instant::now() >= deadline {
            break;
        }
        if let Some(seqs) = pushes.ack_due(&mut last_ack, ack_delay) {
            let text = json!({ "op": "ack", "seqs": seqs }).to_string();
            stream
                .write_all(&client_frame(OP_TEXT, text.as_bytes()))
                .await?;
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0); // a frame larger than the buffer
        }
        let n = match tokio::time::timeout(pushes.wait(ack_delay), stream.read(&mut buf[filled..]))
            .await
        {
            Err(_) => continue, // nothing for a while: re-check acks and the drain
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.into()),
        };
        filled += n;
        let now = Instant::now();
        let mut at = 0;
        while let Some((opcode, payload)) = server_frame(&buf[at..filled])? {
            let frame = &buf[at + payload.start..at + payload.end];
            at += payload.end;
            match opcode {
                OP_TEXT => {
                    let incoming: Incoming = serde_json::from_slice(frame)?;
                    if let (Some("msg"), Some(msg)) = (incoming.push.as_deref(), &incoming.msg) {
                        pushes.on_msg(msg, now, &mut out, &progress, (start, warm_end, sends_end));
                    } // other pushes are ephemeral; a receiver sends no requests
                }
                OP_PING => {
                    let pong = client_frame(OP_PONG, frame);
                    stream.write_all(&pong).await?;
                }
                OP_CLOSE => break 'run,
                _ => {}
            }
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
    }
    Ok(out)
}

pub(super) const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The whole server frame at the start of `buf`: its opcode and where its payload lies, or
/// `None` while incomplete. Server frames are never masked; Hermod never fragments them.
pub(super) fn server_frame(buf: &[u8]) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    anyhow::ensure!(b0 & 0x80 != 0, "a fragmented frame from the server");
    anyhow::ensure!(b1 & 0x80 == 0, "a masked frame from the server");
    let (len, head) = match b1 & 0x7f {
        126 if rest.len() >= 2 => (u16::from_be_bytes([rest[0], rest[1]]) as usize, 4),
        127 if rest.len() >= 8 => {
            let mut n = [0; 8];
            n.copy_from_slice(&rest[..8]);
            (usize::try_from(u64::from_be_bytes(n))?, 10)
        }
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    Ok((buf.len() >= head + len).then(|| (b0 & 0x0f, head..head + len)))
}

/// A client frame (masked, as RFC 6455 requires of clients) of one whole message.
pub(super) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key: [u8; 4] = rand::random();
    out.extend_from_slice(&key);
    out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    out
}

/// One user's connection: a writer task follows the send schedule (and sends the acks the
/// reader asks for); a reader task sorts replies and pushes. Two tasks, so a read is never
/// cancelled by a timer firing in the same `select!`.
pub(super) async fn direct_conn(
    conn: Conn,
    convs: Vec<String>,
    schedule: Schedule,
    (warm_end, sends_end, deadline): (Instant, Instant, Instant),
    pad: String,
    (progress, all_sent, conns, fanout): (Arc<Progress>, Arc<AtomicU64>, u64, u64),
    ack_delay: Duration,
) -> anyhow::Result<DirectConn> {
    let (mut tx, mut rx) = conn.split();
    // Per conversation, the highest seq to ack (an ack covers every earlier push of it).
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<HashMap<String, u64>>();
    let sent_here = Arc::new(AtomicU64::new(0));
    let done_sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = schedule.start;

    let writer = {
        let (progress, all_sent, sent_here, done_sending) = (
            progress.clone(),
            all_sent.clone(),
            sent_here.clone(),
            done_sending.clone(),
        );
        tokio::spawn(async move {
            let mut k = 0u64;
            let mut sending = !convs.is_empty();
            loop {
                if sending && schedule.at(k) > sends_end {
                    sending = false;
                }
                if !sending && !done_sending.swap(true, Ordering::Relaxed) {
                    all_sent.fetch_add(1, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(schedule.at(k).into()), if sending => {
                        // Everything due now, each with its own intended time.
                        while schedule.at(k) <= Instant::now() && schedule.at(k) <= sends_end {
                            let intended = schedule.at(k);
                            let id = uuid::Uuid::now_v7();
                            let conv = &convs[rand::thread_rng().gen_range(0..convs.len())];
                            let t_us = intended.duration_since(start).as_micros() as u64;
                            // `a`: when it actually left, for the service-time histogram.
                            let a_us = Instant::now().saturating_duration_since(start).as_micros() as u64;
                            let frame = json!({ "op": "send", "rid": RID_BASE + k, "conv": conv, "id": id.to_string(), "body": { "t": t_us, "a": a_us, "pad": pad } });
                            tx.feed(Message::text(frame.to_string())).await?;
                            sent_here.fetch_add(1, Ordering::Relaxed);
                            progress.sent.fetch_add(1, Ordering::Relaxed);
                            k += 1;
                        }
                        tx.flush().await?;
                    }
                    acks = ack_rx.recv() => match acks {
                        Some(seqs) => {
                            tx.send(Message::text(json!({ "op": "ack", "seqs": seqs }).to_string())).await?;
                        }
                        None => break, // the reader finished
                    },
                }
            }
            let _ = tx.close().await;
            Ok::<_, anyhow::Error>(())
        })
    };

    let mut out = DirectConn::new();
    let mut answered_here = 0u64;
    let mut pushes = Pushes::default();
    let mut last_ack = Instant::now();
    loop {
        // Done when every connection has sent everything, every send is answered, and every
        // acked message has been delivered somewhere: then nothing is in flight to this one.
        let drained = done_sending.load(Ordering::Relaxed)
            && answered_here == sent_here.load(Ordering::Relaxed)
            && progress.drained(&all_sent, conns, fanout);
        if drained || Instant::now() >= deadline {
            break;
        }
        if let Some(seqs) = pushes.ack_due(&mut last_ack, ack_delay) {
            let _ = ack_tx.send(seqs);
        }
        let wait = pushes.wait(ack_delay);
        let text = match tokio::time::timeout(wait, rx.next()).await {
            Err(_) => continue, // nothing for a while: re-check acks and the drain
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
        };
        let now = Instant::now();
        let frame: Incoming = serde_json::from_str(&text)?;
        if let (Some("msg"), Some(msg)) = (frame.push.as_deref(), &frame.msg) {
            pushes.on_msg(msg, now, &mut out, &progress, (start, warm_end, sends_end));
            continue;
        }
        let v: Value = serde_json::from_str(&text)?;
        if v.get("push").is_some() {
            continue; // ephemeral pushes
        } else if let Some(rid) = v["rid"].as_u64().filter(|r| *r >= RID_BASE) {
            answered_here += 1;
            progress.answered.fetch_add(1, Ordering::Relaxed);
            let id = v["ok"]["id"]
                .as_str()
                .and_then(|s| uuid::Uuid::parse_str(s).ok());
            match id {
                Some(id) => {
                    out.acked_ids.push(id.as_u128());
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                    let intended = schedule.at(rid - RID_BASE);
                    if intended >= warm_end {
                        out.ack.push(now.saturating_duration_since(intended));
                    }
                }
                None => out.unacked += 1,
            }
        }
    }
    drop(ack_tx);
    writer.await.context("writer task")??;
    out.sent = sent_here.load(Ordering::Relaxed);
    out.unacked += out.sent - answered_here;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_are_cut_whole_or_not_at_all() {
        let small = [&[0x81, 3][..], b"abc"].concat();
        assert_eq!(server_frame(&small).unwrap(), Some((OP_TEXT, 2..5)));
        assert_eq!(
            server_frame(&small[..4]).unwrap(),
            None,
            "payload incomplete"
        );
        let mut large = vec![0x81, 126, 0x01, 0x00];
        large.resize(4 + 256, b'x');
        assert_eq!(server_frame(&large).unwrap(), Some((OP_TEXT, 4..260)));
        assert_eq!(
            server_frame(&large[..3]).unwrap(),
            None,
            "length incomplete"
        );
        assert!(server_frame(&[0x01, 1, b'a']).is_err(), "fragment");
        assert!(
            server_frame(&[0x81, 0x81, 0, 0, 0, 0, b'a']).is_err(),
            "masked"
        );
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        let payload = vec![b'y'; 300];
        let frame = client_frame(OP_TEXT, &payload);
        assert_eq!(frame[..4], [0x81, 0x80 | 126, 0x01, 0x2c]);
        let key = &frame[4..8];
        let unmasked: Vec<u8> = frame[8..]
            .iter()
            .zip(key.iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect();
        assert_eq!(unmasked, payload);
    }
}
