//! `connect`: a storm of new connections (TCP, WebSocket handshake, `resume`) at a fixed rate.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use super::open_loop::{client_frame, server_frame, Schedule, OP_TEXT};
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

/// One connection of the storm, by hand on the bare socket: TCP connect, the HTTP upgrade
/// (101 expected), a masked `resume` frame, its reply read and checked. The WebSocket client
/// library cost the load generator's core as much as the server spent on the same connection,
/// so the storm's rate was the generator's; this keeps the generator's side to the syscalls.
async fn resume_raw(target: &Target, token: &str) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let (mut stream, url) = target.dial().await?;
    stream.set_nodelay(true)?;
    let rest = url.strip_prefix("ws://").context("a ws:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    // The key is RFC 6455's sample nonce: the server must accept any; the answer's
    // Sec-WebSocket-Accept is not checked here (the tests' clients check it).
    let upgrade = format!(
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(upgrade.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    let head_end = loop {
        read_more(&mut stream, &mut buf, &mut filled, "the upgrade response").await?;
        if let Some(at) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    anyhow::ensure!(
        buf.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&buf[..head_end.min(80)])
    );
    buf.copy_within(head_end..filled, 0);
    filled -= head_end;
    let resume = json!({ "op": "resume", "rid": 1, "token": token }).to_string();
    stream
        .write_all(&client_frame(OP_TEXT, resume.as_bytes()))
        .await?;
    let reply = loop {
        if let Some((_, payload)) = server_frame(&buf[..filled])? {
            let frame: serde_json::Value = serde_json::from_slice(&buf[payload.clone()])?;
            if frame["rid"] == 1 {
                break frame;
            }
            buf.copy_within(payload.end..filled, 0); // a push before the reply
            filled -= payload.end;
            continue;
        }
        read_more(&mut stream, &mut buf, &mut filled, "the resume reply").await?;
    };
    anyhow::ensure!(reply.get("ok").is_some(), "resume failed: {reply}");
    Ok(stream)
}

/// How long the storm waits for the upgrade response, and then for the resume reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads more of `what` into `buf` after its first `filled` bytes, within `REPLY_TIMEOUT`;
/// an error if the buffer is full, the read times out or the server closed.
async fn read_more(
    stream: &mut tokio::net::TcpStream,
    buf: &mut [u8],
    filled: &mut usize,
    what: &str,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    anyhow::ensure!(*filled < buf.len(), "{what} is too long");
    let n = tokio::time::timeout(REPLY_TIMEOUT, stream.read(&mut buf[*filled..]))
        .await
        .with_context(|| format!("{what} timed out"))??;
    anyhow::ensure!(n > 0, "closed before {what}");
    *filled += n;
    Ok(())
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
            let c = resume_raw(&target, &token).await?;
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
