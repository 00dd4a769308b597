//! `crash`: "acked means durable", checked the hard way. The scenario runs `hermod serve`
//! itself on a data dir of its own, loads it with pipelined sends, `kill -9`s it at a random
//! moment, restarts it, resends every send whose ack it never saw (same id: the server's
//! dedup must answer a stored one with its original seq), and so on for N cycles. At the end
//! it restarts once more, resends until everything is acked, and reads every conversation
//! back with `sync`:
//! - every acked id is stored exactly once, at the seq its ack named (else: lost, or moved);
//! - each conversation's seqs are 1, 2, 3… without gap;
//! - nothing is stored that was never sent, nothing twice.
//!
//! Under `wal` and `fsync` every check must hold; under `memory` acked messages are lost on
//! `kill -9` and the report says how many (the instrument catches loss).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{Conn, Target};
use crate::provision::PASSWORD;
use crate::report::Report;

#[derive(Clone, Debug, Serialize)]
pub struct CrashParams {
    /// The `hermod` binary to run.
    pub hermod: PathBuf,
    /// Data dir (created; must not hold another run's data).
    pub data: PathBuf,
    pub durability: String,
    pub shards: usize,
    /// Kill-and-restart cycles before the final check.
    pub cycles: usize,
    /// Sending connections (one conversation each).
    pub senders: usize,
    /// Sends in flight per connection (pipelined, not waiting for acks).
    pub window: usize,
    /// The kill comes this many ms after the load starts, uniformly in [min, max].
    pub kill_after_ms: (u64, u64),
    pub seed: u64,
    pub prefix: String,
}

/// One sender's conversation and what it knows.
#[derive(Default)]
struct Sender {
    name: String,
    token: String,
    conv: String,
    /// Every id ever sent (acked or not).
    sent: HashSet<String>,
    /// Acked id → seq.
    acked: HashMap<String, u64>,
    /// Sent, never acked: resent (same id) after the restart.
    pending: Vec<String>,
    /// An id acked twice with different seqs (a broken dedup).
    reacked_elsewhere: u64,
}

/// The server process.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(p: &CrashParams) -> anyhow::Result<Server> {
        let mut child = Command::new(&p.hermod)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--argon2-memory-kib",
                "64",
            ])
            .args(["--argon2-passes", "1", "--durability", &p.durability])
            .args(["--shards", &p.shards.to_string()])
            .arg("--data")
            .arg(&p.data)
            .env("HERMOD_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", p.hermod.display()))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        lines.read_line(&mut line)?;
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("unexpected first line from hermod: {line:?}"))?
            .to_owned();
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = lines.read_to_string(&mut sink);
        });
        Ok(Server {
            child,
            url: format!("ws://{addr}/ws"),
        })
    }

    /// SIGTERM and wait: a clean stop (even `memory` flushes what it holds).
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }

    fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn crash(p: CrashParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.cycles >= 1 && p.senders >= 1 && p.window >= 1,
        "cycles, senders and window must be positive"
    );
    anyhow::ensure!(
        p.kill_after_ms.0 <= p.kill_after_ms.1,
        "kill window: min above max"
    );
    anyhow::ensure!(
        !p.data.join("db").exists(),
        "{} already holds a data dir: give the crash run a fresh one",
        p.data.display()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let started = Instant::now();
    let mut senders = set_up(&p).await?;
    let mut kills_ms = Vec::new();
    let mut acked_per_cycle = Vec::new();
    for cycle in 0..p.cycles {
        let server = Server::start(&p)?;
        let target = Target::new(&server.url, Vec::new())?;
        let kill_at = rng.gen_range(p.kill_after_ms.0..=p.kill_after_ms.1);
        let before: usize = senders.iter().map(|s| s.acked.len()).sum();
        let tasks: Vec<_> = senders
            .drain(..)
            .map(|s| tokio::spawn(load(target.clone(), s, p.window, None)))
            .collect();
        tokio::time::sleep(Duration::from_millis(kill_at)).await;
        server.kill9()?;
        kills_ms.push(kill_at);
        for task in tasks {
            senders.push(task.await.context("sender task")??);
        }
        let after: usize = senders.iter().map(|s| s.acked.len()).sum();
        acked_per_cycle.push(after - before);
        eprintln!(
            "hermod-bench crash: cycle {}/{}: killed after {kill_at} ms, {} acked in the cycle, {} pending",
            cycle + 1,
            p.cycles,
            after - before,
            senders.iter().map(|s| s.pending.len()).sum::<usize>()
        );
    }
    // The last start: resend what is pending until acked, then read everything back.
    let server = Server::start(&p)?;
    let target = Target::new(&server.url, Vec::new())?;
    let tasks: Vec<_> = senders
        .drain(..)
        .map(|s| tokio::spawn(load(target.clone(), s, p.window, Some(0))))
        .collect();
    for task in tasks {
        senders.push(task.await.context("sender task")??);
    }
    let mut check = Check::default();
    for s in &senders {
        check.conversation(&target, s).await?;
    }
    drop(server);
    let acked: usize = senders.iter().map(|s| s.acked.len()).sum();
    let sent: usize = senders.iter().map(|s| s.sent.len()).sum();
    let figures = json!({
        "cycles": p.cycles,
        "durability": p.durability,
        "sent_ids": sent,
        "acked_ids": acked,
        "acked_before_last_kill": acked_per_cycle.iter().sum::<usize>(),
        "acked_per_cycle_mean": acked_per_cycle.iter().sum::<usize>() as f64 / p.cycles as f64,
        "stored": check.stored,
        "kill_after_ms": kills_ms,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "correctness": {
            "lost": check.lost,
            "duplicated": check.duplicated + senders.iter().map(|s| s.reacked_elsewhere).sum::<u64>(),
            "reordered": check.moved + check.gaps,
            "moved": check.moved,
            "gaps": check.gaps,
            "unknown": check.unknown,
        },
    });
    Report::new("crash", &p, figures, &[])
}

/// Registers each sender and a peer, logs the sender in, opens their conversation.
async fn set_up(p: &CrashParams) -> anyhow::Result<Vec<Sender>> {
    let server = Server::start(p)?;
    let target = Target::new(&server.url, Vec::new())?;
    let mut out = Vec::new();
    for i in 0..p.senders {
        let (name, peer) = (
            format!("{}-{i}", p.prefix),
            format!("{}-peer-{i}", p.prefix),
        );
        let mut c = Conn::connect(&target).await?;
        for user in [&peer, &name] {
            c.ok(
                "register",
                json!({ "username": user, "password": PASSWORD }),
            )
            .await
            .with_context(|| format!("register {user}"))?;
        }
        let login = c
            .ok(
                "login",
                json!({ "username": name, "password": PASSWORD, "device": "crash" }),
            )
            .await?;
        let conv = c.ok("open", json!({ "user": peer })).await?;
        out.push(Sender {
            name,
            token: login["token"].as_str().context("token")?.to_owned(),
            conv: conv["conv"].as_str().context("conv")?.to_owned(),
            ..Sender::default()
        });
    }
    // A clean stop: the accounts must survive even in `memory` mode, where only the messages
    // written between kills are at stake.
    server.stop()?;
    Ok(out)
}

/// Sends with `window` in flight until the connection dies — or, with `until_new = Some(0)`,
/// sends only what is pending and returns once all of it is acked.
async fn load(
    target: Target,
    mut s: Sender,
    window: usize,
    until_new: Option<usize>,
) -> anyhow::Result<Sender> {
    let mut conn = match Conn::connect(&target).await {
        Ok(c) => c,
        Err(_) => return Ok(s), // killed before we connected
    };
    match conn.request("resume", json!({ "token": s.token })).await {
        Ok(r) if r.get("ok").is_some() => {}
        Ok(r) => bail!("resume {}: {}", s.name, r["error"]),
        Err(_) => return Ok(s),
    }
    let first_rid = conn.next_rid() + 1;
    let (mut tx, mut rx) = conn.split();
    // Resend the pending ids first, then fresh ones (unless only finishing).
    let mut queue: std::collections::VecDeque<String> = std::mem::take(&mut s.pending).into();
    let fresh = until_new.is_none();
    let mut in_flight: HashMap<u64, String> = HashMap::new();
    let mut rid = first_rid;
    loop {
        while in_flight.len() < window {
            let id = match queue.pop_front() {
                Some(id) => id,
                None if fresh => uuid::Uuid::now_v7().to_string(),
                None => break,
            };
            let frame = json!({ "op": "send", "rid": rid, "conv": s.conv, "id": id, "body": { "n": s.sent.len() } });
            s.sent.insert(id.clone());
            in_flight.insert(rid, id);
            rid += 1;
            if tx.feed(Message::text(frame.to_string())).await.is_err() {
                break;
            }
        }
        if in_flight.is_empty() {
            break; // finishing and everything is acked
        }
        if tx.flush().await.is_err() {
            break;
        }
        let text = match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(_))) => continue,
            Err(_) => bail!("{}: no reply for 30 s", s.name),
        };
        let v: Value = serde_json::from_str(&text)?;
        let Some(id) = v["rid"].as_u64().and_then(|r| in_flight.remove(&r)) else {
            continue;
        };
        match v["ok"]["seq"].as_u64() {
            Some(seq) => {
                if let Some(old) = s.acked.insert(id, seq) {
                    if old != seq {
                        s.reacked_elsewhere += 1;
                    }
                }
            }
            // Over the connection's request rate (2000/s): pause, then the same id again.
            None if v["error"]["code"] == "rate_limited" => {
                queue.push_front(id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // `internal` (a failed write) or the like: send it again later, same id.
            None => queue.push_back(id),
        }
    }
    // Whatever was in flight when the server died may or may not be stored: resend.
    s.pending = queue.into_iter().chain(in_flight.into_values()).collect();
    if until_new.is_some() && !s.pending.is_empty() {
        bail!(
            "{}: {} sends still unacked after the final restart",
            s.name,
            s.pending.len()
        );
    }
    Ok(s)
}

#[derive(Default)]
struct Check {
    stored: u64,
    lost: u64,
    moved: u64,
    duplicated: u64,
    gaps: u64,
    unknown: u64,
}

impl Check {
    /// Reads `s`'s conversation back with `sync` and compares it with what was acked.
    async fn conversation(&mut self, target: &Target, s: &Sender) -> anyhow::Result<()> {
        let mut conn = Conn::connect(target).await?;
        conn.ok("resume", json!({ "token": s.token })).await?;
        let mut stored: HashMap<String, u64> = HashMap::new();
        let mut after = 0u64;
        loop {
            let ok = conn
                .ok(
                    "sync",
                    json!({ "convs": [{ "conv": s.conv, "after": after }], "limit": 500 }),
                )
                .await?;
            let page = &ok["convs"][0];
            for m in page["msgs"].as_array().context("msgs")? {
                let seq = m["seq"].as_u64().context("seq")?;
                if seq != after + 1 {
                    self.gaps += 1;
                }
                after = seq;
                self.stored += 1;
                let id = m["id"].as_str().context("id")?.to_owned();
                if !s.sent.contains(&id) {
                    self.unknown += 1;
                }
                if stored.insert(id, seq).is_some() {
                    self.duplicated += 1;
                }
            }
            if page["more"] != json!(true) {
                break;
            }
        }
        for (id, seq) in &s.acked {
            match stored.get(id) {
                None => self.lost += 1,
                Some(at) if at != seq => self.moved += 1,
                Some(_) => {}
            }
        }
        Ok(())
    }
}
