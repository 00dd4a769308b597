//! `connect`: a storm of new connections (TCP, WebSocket handshake, `resume`) at a fixed rate.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use super::open_loop::Schedule;
use crate::conn::{Conn, Target};
use crate::report::Report;
use crate::stats::{histogram, record, Summary};

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
pub(super) async fn mint_by_login(p: &ConnectParams) -> anyhow::Result<Vec<String>> {
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
pub(super) async fn register_one(target: &Target, user: &str) -> anyhow::Result<()> {
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
pub(super) async fn login_devices(
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
