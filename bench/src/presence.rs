//! `presence`: a login storm of users who have friends online. Half the users (even indices)
//! stay connected and watch; the other half log out, then come back at a fixed rate (token
//! resume). Measured: how long until each online friend sees the returning user `online`
//! (from the login's intended time), and how many presence pushes each login costs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{Conn, Target};
use crate::report::Report;
use crate::stats::{histogram, record, Summary};

#[derive(Clone, Debug, Serialize)]
pub struct PresenceParams {
    pub target: Target,
    /// Users; even ones watch, odd ones storm back in.
    pub users: usize,
    /// Friends per user (even): the nearest `friends / 2` on each side in a ring.
    pub friends: usize,
    /// Logins per second during the storm.
    pub rate: f64,
    /// Seconds to wait after the last login for presence to arrive.
    pub drain_s: f64,
    pub prefix: String,
}

/// What a watcher saw: for each user that came online, when (first time only).
type Seen = HashMap<String, Instant>;

pub async fn presence(p: PresenceParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.users >= 4 && p.users.is_multiple_of(2),
        "users must be even and >= 4"
    );
    anyhow::ensure!(
        p.friends >= 2 && p.friends.is_multiple_of(2) && p.friends < p.users,
        "friends must be even, >= 2 and < users"
    );
    let n = p.users;
    let half = p.friends / 2;
    let mut users = crate::provision::users(&p.target, &p.prefix, n, 32).await?;
    let names: Arc<Vec<String>> = Arc::new(users.iter().map(|u| u.name.clone()).collect());

    // Friendships in a ring: i asks i+1..=i+half; then everyone accepts what they were asked.
    let t0 = Instant::now();
    for phase in ["friend_request", "friend_accept"] {
        let mut tasks = Vec::with_capacity(n);
        for (i, mut user) in users.drain(..).enumerate() {
            let names = names.clone();
            tasks.push(tokio::spawn(async move {
                for d in 1..=half {
                    let other = if phase == "friend_request" {
                        (i + d) % n
                    } else {
                        (i + n - d) % n
                    };
                    user.conn
                        .ok(phase, json!({ "user": names[other] }))
                        .await
                        .with_context(|| format!("{phase} {} → {}", names[i], names[other]))?;
                }
                Ok::<_, anyhow::Error>(user)
            }));
        }
        for t in tasks {
            users.push(t.await.context("friendship task")??);
        }
    }
    let setup_s = t0.elapsed().as_secs_f64();

    // Stormers leave; watchers start listening; offline pushes settle before the storm.
    let mut stormers = Vec::new();
    let mut watchers = Vec::new();
    for (i, user) in users.into_iter().enumerate() {
        if i % 2 == 1 {
            stormers.push((user.name, user.token));
        } else {
            watchers.push(user.conn);
        }
    }
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::with_capacity(watchers.len());
    for conn in watchers {
        readers.push(tokio::spawn(watch(conn, counting.clone(), stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    counting.store(true, std::sync::atomic::Ordering::SeqCst);

    // The storm: resume at fixed intended times, connections kept open.
    let start = Instant::now() + Duration::from_millis(100);
    let interval = Duration::from_secs_f64(1.0 / p.rate);
    let mut intended: HashMap<String, Instant> = HashMap::new();
    let mut logins = Vec::with_capacity(stormers.len());
    for (k, (name, token)) in stormers.iter().enumerate() {
        let at = start + interval.mul_f64(k as f64);
        intended.insert(name.clone(), at);
        tokio::time::sleep_until(at.into()).await;
        let (target, token) = (p.target.clone(), token.clone());
        logins.push(tokio::spawn(async move {
            let mut c = Conn::connect(&target).await?;
            c.ok("resume", json!({ "token": token })).await?;
            Ok::<_, anyhow::Error>((c, Instant::now()))
        }));
    }
    let mut held = Vec::with_capacity(logins.len());
    let mut login_hist = histogram();
    let mut last_login = start;
    for (t, (name, _)) in logins.into_iter().zip(&stormers) {
        let (c, done) = t.await.context("login task")??;
        record(
            &mut login_hist,
            done.saturating_duration_since(intended[name]),
        );
        last_login = last_login.max(done);
        held.push(c);
    }
    tokio::time::sleep_until((last_login + Duration::from_secs_f64(p.drain_s)).into()).await;
    stop.notify_waiters();

    let mut seen_hist = histogram();
    let (mut pushes, mut pairs_seen) = (0u64, 0u64);
    let mut pairs_expected = 0u64;
    for (w, r) in readers.into_iter().enumerate() {
        let (count, seen) = r.await.context("watcher task")??;
        pushes += count;
        let watcher = 2 * w;
        for d in 1..=half {
            for friend in [(watcher + d) % n, (watcher + n - d) % n] {
                if friend % 2 == 1 {
                    pairs_expected += 1;
                    if let Some(at) = seen.get(&names[friend]) {
                        pairs_seen += 1;
                        record(
                            &mut seen_hist,
                            at.saturating_duration_since(intended[&names[friend]]),
                        );
                    }
                }
            }
        }
    }
    drop(held);
    let logins_n = stormers.len() as u64;
    let storm_s = last_login
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);
    let figures = json!({
        "logins": logins_n,
        "logins_per_s": logins_n as f64 / storm_s,
        "friend_setup_s": setup_s,
        "login_latency": Summary::of(&login_hist),
        "friend_sees_login": Summary::of(&seen_hist),
        "presence_pushes_received": pushes,
        "presence_pushes_per_login": pushes as f64 / logins_n as f64,
        "online_friends_per_login": pairs_expected as f64 / logins_n as f64,
        "friend_pairs_expected": pairs_expected,
        "friend_pairs_missed": pairs_expected - pairs_seen,
    });
    Report::new(
        "presence",
        &p,
        figures,
        &[
            ("login_latency", &login_hist),
            ("friend_sees_login", &seen_hist),
        ],
    )
}

/// A watcher: counts presence pushes while `counting`, notes when each user first showed up
/// `online`, until `stop`.
async fn watch(
    conn: Conn,
    counting: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<(u64, Seen)> {
    let (_tx, mut rx) = conn.split();
    let mut seen = Seen::new();
    let mut count = 0u64;
    loop {
        let next = tokio::select! {
            _ = stop.notified() => break,
            next = rx.next() => next,
        };
        let text = match next {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => break,
        };
        let v: Value = serde_json::from_str(&text)?;
        if v["push"] != "presence" {
            continue;
        }
        let user = v["user"].as_str().unwrap_or_default().to_owned();
        if !counting.load(std::sync::atomic::Ordering::SeqCst) {
            continue; // the stormers leaving, before the storm
        }
        count += 1;
        if v["state"] == "online" {
            seen.entry(user).or_insert_with(Instant::now);
        }
    }
    Ok((count, seen))
}
