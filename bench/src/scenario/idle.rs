//! `idle`: N authenticated connections held open; the server's memory per connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::connect::{login_devices, register_one};
use crate::conn::Target;
use crate::report::Report;
use crate::stats::{histogram, record, Summary};

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
