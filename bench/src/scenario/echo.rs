//! `echo`: `ping` round trips at a fixed rate, the ceiling the other scenarios are compared with.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::open_loop::{progress_line, Progress, Schedule, Timing, RID_BASE};
use crate::conn::Target;
use crate::report::Report;
use crate::stats::{histogram, record, Summary};

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
