//! The scenarios. Each provisions its users, runs an open-loop schedule per connection, and
//! returns a [`Report`].
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

use crate::conn::{Conn, Target};
use crate::report::Report;
use crate::stats::{histogram, record, Correctness, Summary};

/// Request ids of the measured phase start here, so `rid - RID_BASE` is the send's index.
const RID_BASE: u64 = 1 << 32;
/// Pushes are acked in batches of this many, or after `ACK_DELAY`.
const ACK_BATCH: usize = 64;
/// How often an idle reader re-checks whether the run has drained.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Well under the server's push retry interval (5 s), so batching never causes a resend.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// The fixed send times of one connection.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    interval: Duration,
    offset: Duration,
}

impl Schedule {
    fn new(start: Instant, rate: f64, conns: usize, index: usize) -> Schedule {
        let interval = Duration::from_secs_f64(conns as f64 / rate);
        Schedule {
            start,
            interval,
            offset: interval.mul_f64(index as f64 / conns as f64),
        }
    }

    fn at(&self, k: u64) -> Instant {
        self.start + self.offset + self.interval.mul_f64(k as f64)
    }
}

/// Counters shared by all connections, for the progress line and the end of the drain.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    acked: AtomicU64,
    answered: AtomicU64,
    delivered: AtomicU64,
}

fn progress_line(
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

// ---------------------------------------------------------------- direct

#[derive(Clone, Debug, Serialize)]
pub struct DirectParams {
    pub target: Target,
    #[serde(flatten)]
    pub timing: Timing,
    /// Online users, one connection each.
    pub users: usize,
    /// Conversations per user: with the next `peers` users (wrapping).
    pub peers: usize,
    /// Padding added to each body, in bytes.
    pub body_bytes: usize,
    pub prefix: String,
}

struct DirectConn {
    // Latency samples, not histograms: a histogram at these bounds is ~440 KB, and a run with
    // 10,000 receiving connections would zero gigabytes of them. Merged at the end.
    ack: Vec<Duration>,
    e2e: Vec<Duration>,
    /// From the actual send (not the intended one): what the server and network cost alone.
    e2e_service: Vec<Duration>,
    sent: u64,
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
    fn new() -> DirectConn {
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

/// `direct`: users send one-to-one messages to random peers at a fixed total rate.
pub async fn direct(p: DirectParams) -> anyhow::Result<Report> {
    anyhow::ensure!(p.users >= 2, "direct needs at least 2 users");
    p.timing.check()?;
    let peers = p.peers.clamp(1, p.users - 1);
    let mut users = crate::provision::users(&p.target, &p.prefix, p.users, 32).await?;

    // Conversations: i with i+1..=i+peers (mod users), each opened once.
    let mut convs: Vec<Vec<String>> = vec![Vec::new(); p.users];
    let mut opened = HashSet::new();
    for i in 0..p.users {
        for d in 1..=peers {
            let j = (i + d) % p.users;
            if !opened.insert((i.min(j), i.max(j))) {
                continue;
            }
            let peer = users[j].name.clone();
            let ok = users[i]
                .conn
                .ok("open", json!({ "user": peer }))
                .await
                .context("open")?;
            let conv = ok["conv"].as_str().context("conv id")?.to_owned();
            convs[i].push(conv.clone());
            convs[j].push(conv);
        }
    }

    let conns = users.into_iter().map(|u| u.conn).zip(convs).collect();
    drive(conns, p.timing, p.body_bytes, 1, ("direct", &p)).await
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
}

impl Timing {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.rate > 0.0 && self.duration_s > 0.0,
            "rate and duration must be positive"
        );
        Ok(())
    }
}

/// Runs the open-loop phase over `conns` (each with the conversations it sends to; an empty
/// list only receives) and accounts for every message: each acked one must reach `fanout`
/// connections exactly once, in seq order per conversation. Reports the figures with the ack,
/// end-to-end and service-time histograms under the scenario's name and parameters.
async fn drive<P: Serialize>(
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
        if !convs.is_empty() {
            sender_index += 1;
        }
        let (progress, all_sent, pad) = (progress.clone(), all_sent.clone(), pad.clone());
        tasks.push(tokio::spawn(async move {
            direct_conn(
                conn,
                convs,
                schedule,
                (warm_end, sends_end, deadline),
                pad,
                (progress, all_sent, n as u64, fanout),
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
struct Incoming<'a> {
    #[serde(borrow, default)]
    push: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pid: Option<u64>,
    #[serde(borrow, default)]
    msg: Option<PushedMsg<'a>>,
}

#[derive(serde::Deserialize)]
struct PushedMsg<'a> {
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
struct BenchBody {
    #[serde(default)]
    t: Option<u64>,
    #[serde(default)]
    a: Option<u64>,
}

// ---------------------------------------------------------------- group

#[derive(Clone, Debug, Serialize)]
pub struct GroupParams {
    pub target: Target,
    #[serde(flatten)]
    pub timing: Timing,
    /// Online users, one connection each; groups draw their members from them.
    pub users: usize,
    pub groups: usize,
    /// Members per group (at most `users`).
    pub members: usize,
    /// Members of each group that send to it (the rest only receive).
    pub senders: usize,
    pub body_bytes: usize,
    pub prefix: String,
}

/// `group`: `groups` groups of `members` online members, `senders` of each sending at a fixed
/// total rate: deliveries per second and end-to-end latency per delivery.
pub async fn group(p: GroupParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.members >= 2 && p.members <= p.users,
        "members must be 2..=users"
    );
    anyhow::ensure!(p.groups >= 1 && p.senders >= 1, "need a group and a sender");
    p.timing.check()?;
    let senders = p.senders.min(p.members);
    // Users come online only once their groups exist: set-up writes a system message per
    // change, which would otherwise be pushed to connections nobody reads yet.
    crate::provision::register(&p.target, &p.prefix, p.users, 32).await?;
    let names: Vec<String> = (0..p.users).map(|i| format!("{}-{i}", p.prefix)).collect();
    let mut setup: HashMap<usize, Conn> = HashMap::new();
    let mut convs: Vec<Vec<String>> = vec![Vec::new(); p.users];
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    // The invite limit per request; the creator names the first batch, then invites the rest.
    const BATCH: usize = 1000;
    for g in 0..p.groups {
        let members: Vec<usize> = if p.members == p.users {
            (0..p.users).collect()
        } else {
            rand::seq::index::sample(&mut rng, p.users, p.members).into_vec()
        };
        let member_names: Vec<String> = members.iter().map(|&i| names[i].clone()).collect();
        let creator = match setup.entry(members[0]) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut c = Conn::connect(&p.target).await?;
                let login = json!({ "username": names[members[0]], "password": crate::provision::PASSWORD, "device": "setup" });
                c.ok("login", login).await.context("set-up login")?;
                e.insert(c)
            }
        };
        let names_here = &member_names;
        let first = &names_here[1..names_here.len().min(BATCH)];
        let ok = creator
            .ok(
                "group_create",
                json!({ "name": format!("{}-g{g}", p.prefix), "members": first }),
            )
            .await
            .context("group_create")?;
        let conv = ok["conv"].as_str().context("group id")?.to_owned();
        for chunk in names_here[names_here.len().min(BATCH)..].chunks(BATCH) {
            creator
                .ok("group_invite", json!({ "conv": conv, "users": chunk }))
                .await
                .context("group_invite")?;
        }
        for &i in &members[..senders] {
            convs[i].push(conv.clone());
        }
    }
    // The set-up devices leave before the measured devices arrive: no pushes to them.
    drop(setup);
    let users = crate::provision::log_in(&p.target, &p.prefix, p.users, 32).await?;
    let conns = users.into_iter().map(|u| u.conn).zip(convs).collect();
    let fanout = (p.members - 1) as u64;
    drive(conns, p.timing, p.body_bytes, fanout, ("group", &p)).await
}

/// One user's connection: a writer task follows the send schedule (and sends the acks the
/// reader asks for); a reader task sorts replies and pushes. Two tasks, so a read is never
/// cancelled by a timer firing in the same `select!`.
async fn direct_conn(
    conn: Conn,
    convs: Vec<String>,
    schedule: Schedule,
    (warm_end, sends_end, deadline): (Instant, Instant, Instant),
    pad: String,
    (progress, all_sent, conns, fanout): (Arc<Progress>, Arc<AtomicU64>, u64, u64),
) -> anyhow::Result<DirectConn> {
    let (mut tx, mut rx) = conn.split();
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
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
                    pids = ack_rx.recv() => match pids {
                        Some(pids) => {
                            tx.send(Message::text(json!({ "op": "ack", "pids": pids }).to_string())).await?;
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
    let mut pids: Vec<u64> = Vec::new();
    let mut last_ack = Instant::now();
    let mut seen_pids: HashSet<u64> = HashSet::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    loop {
        // Done when every connection has sent everything, every send is answered, and every
        // acked message has been delivered somewhere: then nothing is in flight to this one.
        let drained = done_sending.load(Ordering::Relaxed)
            && answered_here == sent_here.load(Ordering::Relaxed)
            && all_sent.load(Ordering::Relaxed) == conns
            && progress.answered.load(Ordering::Relaxed) == progress.sent.load(Ordering::Relaxed)
            && progress.delivered.load(Ordering::Relaxed)
                >= progress.acked.load(Ordering::Relaxed) * fanout;
        if drained || Instant::now() >= deadline {
            break;
        }
        if !pids.is_empty() && (pids.len() >= ACK_BATCH || last_ack.elapsed() >= ACK_DELAY) {
            let _ = ack_tx.send(std::mem::take(&mut pids));
            last_ack = Instant::now();
        }
        // Wake for the ack batch when pushes wait to be acked; otherwise only now and then, to
        // notice the end of the drain: with 10,000 idle receivers, a 20 ms tick each would
        // be half a million timer wake-ups a second on the load generator's core.
        let wait = if pids.is_empty() {
            IDLE_TICK
        } else {
            ACK_DELAY
        };
        let text = match tokio::time::timeout(wait, rx.next()).await {
            Err(_) => continue, // nothing for a while: re-check acks and the drain
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
        };
        let now = Instant::now();
        // Typed and borrowed: this runs once per delivery, the load generator's hottest path
        // (a `Value` tree per frame cost a third of the bench's core in the group scenario).
        let frame: Incoming = serde_json::from_str(&text)?;
        if let (Some("msg"), Some(pid), Some(msg)) = (frame.push.as_deref(), frame.pid, &frame.msg)
        {
            pids.push(pid);
            if !seen_pids.insert(pid) {
                continue; // a retry of a push already counted
            }
            let Some(body) = serde_json::from_str::<BenchBody>(msg.body.get())
                .ok()
                .filter(|b| b.t.is_some())
            else {
                continue; // not a benchmark message (a set-up system message): acked only
            };
            let id = uuid::Uuid::parse_str(&msg.id).map_or(0, |u| u.as_u128());
            let seq = msg.seq;
            let last = match last_seq.get_mut(msg.conv.as_ref()) {
                Some(last) => last,
                None => last_seq.entry(msg.conv.to_string()).or_insert(0),
            };
            if seq <= *last {
                out.reordered += 1;
            }
            *last = (*last).max(seq);
            if !out.delivered_ids.insert(id) {
                out.duplicated += 1;
                continue;
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

// ---------------------------------------------------------------- echo

#[derive(Clone, Debug, Serialize)]
pub struct EchoParams {
    pub target: Target,
    #[serde(flatten)]
    pub timing: Timing,
    pub conns: usize,
    pub prefix: String,
}

/// `echo`: the cheapest round trip Hermod offers (`ping` on an authenticated connection), at a
/// fixed rate: the ceiling the other scenarios are compared with.
pub async fn echo(p: EchoParams) -> anyhow::Result<Report> {
    anyhow::ensure!(p.conns >= 1, "conns must be positive");
    p.timing.check()?;
    let users = crate::provision::users(&p.target, &p.prefix, p.conns, 32).await?;
    let start = Instant::now() + Duration::from_millis(500);
    let warm_end = start + Duration::from_secs_f64(p.timing.warmup_s);
    let sends_end = warm_end + Duration::from_secs_f64(p.timing.duration_s);
    let deadline = sends_end + Duration::from_secs_f64(p.timing.drain_s);
    let progress = Arc::new(Progress::default());
    let printer = progress_line(progress.clone(), start, "echo");
    let n = users.len();
    let mut tasks = Vec::new();
    for (i, user) in users.into_iter().enumerate() {
        let schedule = Schedule::new(start, p.timing.rate, n, i);
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = user.conn.split();
            let mut h = histogram();
            let (mut sent, mut answered, mut errors, mut in_window) = (0u64, 0u64, 0u64, 0u64);
            let mut k = 0u64;
            loop {
                let sending = schedule.at(k) <= sends_end;
                if (!sending && answered + errors == sent) || Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(schedule.at(k).into()), if sending => {
                        while schedule.at(k) <= Instant::now() && schedule.at(k) <= sends_end {
                            tx.feed(Message::text(format!("{{\"op\":\"ping\",\"rid\":{}}}", RID_BASE + k))).await?;
                            sent += 1;
                            progress.sent.fetch_add(1, Ordering::Relaxed);
                            k += 1;
                        }
                        tx.flush().await?;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    msg = rx.next() => {
                        let text = match msg {
                            Some(Ok(Message::Text(t))) => t,
                            Some(Ok(Message::Close(_))) | None => break,
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => return Err(anyhow::Error::from(e)),
                        };
                        let now = Instant::now();
                        let v: Value = serde_json::from_str(&text)?;
                        let Some(rid) = v["rid"].as_u64().filter(|r| *r >= RID_BASE) else { continue };
                        if v.get("ok").is_none() {
                            errors += 1;
                            continue;
                        }
                        answered += 1;
                        progress.answered.fetch_add(1, Ordering::Relaxed);
                        let intended = schedule.at(rid - RID_BASE);
                        if intended >= warm_end {
                            in_window += 1;
                            record(&mut h, now.saturating_duration_since(intended));
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>((h, sent, answered, errors, in_window))
        }));
    }
    let mut all = histogram();
    let (mut sent, mut answered, mut errors, mut in_window) = (0, 0, 0, 0);
    for t in tasks {
        let (h, s, a, e, w) = t.await.context("connection task")??;
        all.add(&h).expect("same bounds");
        sent += s;
        answered += a;
        errors += e;
        in_window += w;
    }
    printer.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let figures = json!({
        "throughput_per_s": in_window as f64 / p.timing.duration_s,
        "offered_per_s": p.timing.rate,
        "latency": Summary::of(&all),
        "sent": sent,
        "answered": answered,
        "errors": errors,
        "unanswered": sent - answered - errors,
    });
    Report::new("echo", &p, figures, &[("latency", &all)])
}

// ---------------------------------------------------------------- idle

#[derive(Clone, Debug, Serialize)]
pub struct IdleParams {
    pub target: Target,
    /// Authenticated connections to hold (one user, one device each).
    pub conns: usize,
    /// Seconds to hold them once all are up.
    pub hold_s: f64,
    /// Logins in flight at once while connecting.
    pub parallel: usize,
    /// The server's pid, to sample its resident memory (same host only).
    pub server_pid: Option<u32>,
    pub prefix: String,
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `idle`: hold N authenticated connections (answering the server's pings) and report the
/// server's memory per connection. Each connection logs in as its own device of one user.
pub async fn idle(p: IdleParams) -> anyhow::Result<Report> {
    anyhow::ensure!(p.conns >= 1, "conns must be at least 1");
    let user = format!("{}-idle", p.prefix);
    register_one(&p.target, &user).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = p.server_pid.and_then(rss_bytes);

    let started = Instant::now();
    let mut held = Vec::with_capacity(p.conns);
    let mut setup = histogram();
    let mut failures = 0u64;
    for result in login_devices(&p.target, &user, p.conns, p.parallel).await? {
        match result {
            Ok((c, _token, took)) => {
                record(&mut setup, took);
                held.push(c);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    eprintln!("hermod-bench: a connection failed: {e:#} (fd limit: `ulimit -n`)");
                }
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    // Keep every connection read, so pings are answered and closes are noticed.
    let closed = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = held
        .into_iter()
        .map(|c| {
            let closed = closed.clone();
            tokio::spawn(async move {
                let (_tx, mut rx) = c.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
                drop(_tx);
            })
        })
        .collect();
    let up = readers.len() as u64;
    tokio::time::sleep(Duration::from_secs_f64(p.hold_s)).await;
    let rss_after = p.server_pid.and_then(rss_bytes);
    let dropped = closed.load(Ordering::Relaxed);
    for r in &readers {
        r.abort();
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(a), Some(b)) if up > 0 => Some(b.saturating_sub(a) as f64 / up as f64),
        _ => None,
    };
    let figures = json!({
        "connections_held": up,
        "connection_failures": failures,
        "dropped_while_holding": dropped,
        "connect_per_s": up as f64 / connect_s,
        "setup_latency": Summary::of(&setup),
        "server_rss_before_bytes": rss_before,
        "server_rss_after_bytes": rss_after,
        "server_bytes_per_connection": per_conn,
    });
    Report::new("idle", &p, figures, &[("setup_latency", &setup)])
}

// ---------------------------------------------------------------- connect

#[derive(Clone, Debug, Serialize)]
pub struct ConnectParams {
    pub target: Target,
    /// New authenticated connections in the storm.
    pub conns: usize,
    /// Connections per second (open loop).
    pub rate: f64,
    /// Logins in flight while minting the tokens the storm resumes with.
    pub parallel: usize,
    pub prefix: String,
    /// Tokens from `hermod-tools provision` (`user<TAB>token` lines): no logins needed.
    pub tokens_file: Option<std::path::PathBuf>,
}

/// `connect`: a storm of new connections at a fixed rate, each a TCP connect, a WebSocket
/// handshake and a `resume` with a device token (minted beforehand by logging each device in
/// once). Reports the set-up latency from the intended start, the achieved rate and failures.
/// Connections stay open until the storm ends, so `conns` is bounded by the fd limit.
pub async fn connect(p: ConnectParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.conns >= 1 && p.rate > 0.0,
        "conns and rate must be positive"
    );
    let tokens = match &p.tokens_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let tokens: Vec<String> = text
                .lines()
                .filter_map(|l| l.split('\t').nth(1))
                .map(str::to_owned)
                .take(p.conns)
                .collect();
            anyhow::ensure!(
                tokens.len() == p.conns,
                "{} holds {} tokens, {} needed",
                path.display(),
                tokens.len(),
                p.conns
            );
            tokens
        }
        None => mint_by_login(&p).await?,
    };
    storm(&p, tokens).await
}

/// One login per device (`<prefix>-conn`, devices d0…): their tokens, for a storm of resumes.
async fn mint_by_login(p: &ConnectParams) -> anyhow::Result<Vec<String>> {
    let user = format!("{}-conn", p.prefix);
    register_one(&p.target, &user).await?;
    // The connections close here; the storm resumes their devices.
    login_devices(&p.target, &user, p.conns, p.parallel)
        .await?
        .into_iter()
        .map(|r| r.map(|(_, token, _)| token))
        .collect()
}

/// Registers `user` with the benchmark password (an existing account is fine).
async fn register_one(target: &Target, user: &str) -> anyhow::Result<()> {
    let mut c = Conn::connect(target).await?;
    let r = c
        .request(
            "register",
            json!({ "username": user, "password": crate::provision::PASSWORD }),
        )
        .await?;
    anyhow::ensure!(
        r.get("ok").is_some() || r["error"]["code"] == "username_taken",
        "register {user}: {}",
        r["error"]
    );
    Ok(())
}

/// Logs `user` in as devices `d0…d{n-1}`, `parallel` at a time: for each, its connection, its
/// token and how long connect + handshake + login took (or why it failed).
async fn login_devices(
    target: &Target,
    user: &str,
    n: usize,
    parallel: usize,
) -> anyhow::Result<Vec<anyhow::Result<(Conn, String, Duration)>>> {
    let mut out = Vec::with_capacity(n);
    let mut next = 0;
    while next < n {
        let batch: Vec<_> = (next..n.min(next + parallel.max(1)))
            .map(|i| {
                let (target, user) = (target.clone(), user.to_owned());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let mut c = Conn::connect(&target).await?;
                    let login = json!({ "username": user, "password": crate::provision::PASSWORD, "device": format!("d{i}") });
                    let ok = c.ok("login", login).await?;
                    let token = ok["token"].as_str().context("token")?.to_owned();
                    Ok((c, token, t.elapsed()))
                })
            })
            .collect();
        next += batch.len();
        for t in batch {
            out.push(t.await.context("login task")?);
        }
    }
    Ok(out)
}

async fn storm(p: &ConnectParams, tokens: Vec<String>) -> anyhow::Result<Report> {
    let start = Instant::now() + Duration::from_millis(200);
    let schedule = Schedule::new(start, p.rate, 1, 0);
    let mut tasks = Vec::with_capacity(p.conns);
    for (k, token) in tokens.into_iter().enumerate() {
        let intended = schedule.at(k as u64);
        tokio::time::sleep_until(intended.into()).await;
        let target = p.target.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(&target).await?;
            c.ok("resume", json!({ "token": token })).await?;
            Ok::<_, anyhow::Error>((c, Instant::now().saturating_duration_since(intended)))
        }));
    }
    let mut setup = histogram();
    let (mut ok, mut failures) = (0u64, 0u64);
    let mut held = Vec::with_capacity(p.conns);
    let mut last_done = start;
    for t in tasks {
        match t.await.context("connect task")? {
            Ok((c, took)) => {
                ok += 1;
                record(&mut setup, took);
                last_done = last_done.max(Instant::now());
                held.push(c);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    eprintln!("hermod-bench: a connection failed: {e:#} (fd limit: `ulimit -n`)");
                }
            }
        }
    }
    let achieved = ok as f64 / last_done.duration_since(start).as_secs_f64().max(1e-9);
    drop(held);
    let figures = json!({
        "offered_per_s": p.rate,
        "achieved_per_s": achieved,
        "connections": ok,
        "failures": failures,
        "setup_latency": Summary::of(&setup),
    });
    Report::new("connect", &p, figures, &[("setup_latency", &setup)])
}

// ---------------------------------------------------------------- sync

#[derive(Clone, Debug, Serialize)]
pub struct SyncParams {
    pub target: Target,
    /// Sender/recipient pairs, one conversation each.
    pub pairs: usize,
    /// Messages waiting in each conversation when its recipient comes back.
    pub backlog: usize,
    /// Messages per `sync` page.
    pub page: usize,
    pub body_bytes: usize,
    pub prefix: String,
}

/// `sync`: recipients come back to a backlog and pull it page by page. Reports messages pulled
/// per second (all recipients together), page latency, and checks every page is contiguous.
pub async fn sync(p: SyncParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.pairs >= 1 && p.backlog >= 1,
        "pairs and backlog must be positive"
    );
    let users = crate::provision::users(&p.target, &p.prefix, 2 * p.pairs, 32).await?;
    let pad = "x".repeat(p.body_bytes);
    // Fill: each sender pipelines its backlog (windows of 256) while its recipient is away.
    let mut fills = Vec::new();
    let mut recipients = Vec::new();
    let mut users = users.into_iter();
    while let (Some(mut sender), Some(recipient)) = (users.next(), users.next()) {
        let conv = sender
            .conn
            .ok("open", json!({ "user": recipient.name }))
            .await?["conv"]
            .as_str()
            .context("conv id")?
            .to_owned();
        recipients.push((recipient.name, conv.clone()));
        drop(recipient.conn);
        let (backlog, pad) = (p.backlog, pad.clone());
        fills.push(tokio::spawn(async move {
            let (mut tx, mut rx) = sender.conn.split();
            let mut sent = 0;
            while sent < backlog {
                let window = 256.min(backlog - sent);
                for i in 0..window {
                    let frame = json!({ "op": "send", "rid": RID_BASE + (sent + i) as u64, "conv": conv, "body": { "pad": pad } });
                    tx.feed(Message::text(frame.to_string())).await?;
                }
                tx.flush().await?;
                let mut acked = 0;
                while acked < window {
                    match rx.next().await {
                        Some(Ok(Message::Text(t))) if t.contains("\"rid\"") => {
                            anyhow::ensure!(t.contains("\"ok\""), "send refused: {t}");
                            acked += 1;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => anyhow::bail!("connection closed while filling"),
                    }
                }
                sent += window;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for f in fills {
        f.await.context("fill task")??;
    }

    // Pull: each recipient logs in again (not timed), then syncs from 0 until `more` is false.
    let mut logged_in = Vec::new();
    for (name, conv) in recipients {
        let mut c = Conn::connect(&p.target).await?;
        c.ok(
            "login",
            json!({ "username": name, "password": crate::provision::PASSWORD, "device": "sync" }),
        )
        .await?;
        logged_in.push((c, conv));
    }
    let start = Instant::now();
    let page = p.page;
    let pulls: Vec<_> = logged_in
        .into_iter()
        .map(|(mut c, conv)| {
            tokio::spawn(async move {
                let mut h = histogram();
                let (mut after, mut pulled) = (0u64, 0u64);
                loop {
                    let t = Instant::now();
                    let ok = c
                        .ok(
                            "sync",
                            json!({ "convs": [{ "conv": conv, "after": after }], "limit": page }),
                        )
                        .await?;
                    record(&mut h, t.elapsed());
                    let part = &ok["convs"][0];
                    for m in part["msgs"].as_array().into_iter().flatten() {
                        let seq = m["seq"].as_u64().unwrap_or(0);
                        anyhow::ensure!(
                            seq == after + 1,
                            "sync page not contiguous: {seq} after {after}"
                        );
                        after = seq;
                        pulled += 1;
                    }
                    if part["more"] != true {
                        break;
                    }
                }
                Ok::<_, anyhow::Error>((h, pulled, Instant::now()))
            })
        })
        .collect();
    let mut pages = histogram();
    let mut pulled = 0u64;
    let mut end = start;
    for t in pulls {
        let (h, n, done) = t.await.context("pull task")??;
        pages.add(&h).expect("same bounds");
        pulled += n;
        end = end.max(done);
    }
    let secs = end.duration_since(start).as_secs_f64().max(1e-9);
    let expected = (p.pairs * p.backlog) as u64;
    let figures = json!({
        "pulled_per_s": pulled as f64 / secs,
        "pulled": pulled,
        "expected": expected,
        "missing": expected.saturating_sub(pulled),
        "seconds": secs,
        "page_latency": Summary::of(&pages),
    });
    anyhow::ensure!(pulled == expected, "pulled {pulled} of {expected} messages");
    Report::new("sync", &p, figures, &[("page_latency", &pages)])
}
