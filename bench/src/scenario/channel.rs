//! `channel` and `room`: the audience kinds of docs/channels.md.
//!
//! `channel`: one publisher posts at a fixed rate to a channel with `subscribers` subscribers,
//! `online` of them connected (the rest subscribed and gone): posts per second, deliveries per
//! second, end-to-end latency per delivery, and how fast subscriptions are taken.
//!
//! `room`: `members` connections in one live room, `senders` of them sending at a fixed total
//! rate, typically well over the room's `room_rate`: what was shed (answered `shed`, reported
//! as `unacked`), and the latency of what was delivered.

use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use super::open_loop::{drive, Timing};
use crate::conn::{Conn, Target};
use crate::provision::{users, users_range};
use crate::report::Report;

#[derive(Clone, Debug, Serialize)]
pub struct ChannelParams {
    pub target: Target,
    #[serde(flatten)]
    pub timing: Timing,
    pub subscribers: usize,
    /// Subscribers that stay connected and receive (at most `subscribers`).
    pub online: usize,
    pub body_bytes: usize,
    pub prefix: String,
    /// Registrations, logins and subscriptions in flight at once while setting up.
    pub parallel: usize,
}

/// Subscribers are set up in batches of this many: register and log in, subscribe, keep the
/// ones that stay online, close the rest.
const SETUP_BATCH: usize = 1_000;

pub async fn channel(p: ChannelParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.online >= 1 && p.online <= p.subscribers,
        "online must be 1..=subscribers"
    );
    p.timing.check()?;
    // Channel pushes are not acked: the subscribers never send `ack`.
    let timing = Timing {
        ack_delay_ms: 0,
        ..p.timing
    };
    let mut publisher = users(&p.target, &format!("{}-pub", p.prefix), 1, 1)
        .await?
        .pop()
        .context("the publisher")?
        .conn;
    let created = publisher
        .ok(
            "channel_create",
            json!({ "name": format!("{}-channel", p.prefix) }),
        )
        .await
        .context("channel_create")?;
    let conv = created["conv"].as_str().context("channel id")?.to_owned();

    let mut online: Vec<Conn> = Vec::with_capacity(p.online);
    let mut subscribing = std::time::Duration::ZERO;
    let mut next = 0;
    while next < p.subscribers {
        let end = p.subscribers.min(next + SETUP_BATCH);
        let batch = users_range(&p.target, &p.prefix, next..end, p.parallel).await?;
        // Timed alone: `parallel` subscriptions in flight at once, as many clients would.
        let began = Instant::now();
        let mut conns = Vec::with_capacity(batch.len());
        let mut batch = batch.into_iter().map(|u| u.conn);
        loop {
            let chunk: Vec<Conn> = batch.by_ref().take(p.parallel.max(1)).collect();
            if chunk.is_empty() {
                break;
            }
            let tasks: Vec<_> = chunk
                .into_iter()
                .map(|mut conn| {
                    let conv = conv.clone();
                    tokio::spawn(async move {
                        conn.ok("subscribe", json!({ "conv": conv })).await?;
                        Ok::<_, anyhow::Error>(conn)
                    })
                })
                .collect();
            for task in tasks {
                conns.push(task.await.context("subscribe task")??);
            }
        }
        subscribing += began.elapsed();
        // The online subscribers are the last ones set up: a connection idle for the server's
        // heartbeat timeout (60 s) before the run would be closed (nothing reads it yet).
        let offline_left = (p.subscribers - p.online).saturating_sub(next);
        let keep = conns.len().saturating_sub(offline_left);
        online.extend(conns.drain(conns.len() - keep..));
        drop(conns); // subscribed and gone
        next = end;
    }
    let subscribe_per_s = p.subscribers as f64 / subscribing.as_secs_f64().max(1e-9);
    let fanout = online.len() as u64;
    let conns = std::iter::once((publisher, vec![conv]))
        .chain(online.into_iter().map(|c| (c, Vec::new())))
        .collect();
    let mut report = drive(conns, timing, p.body_bytes, fanout, ("channel", &p)).await?;
    report.figures["subscribe_per_s"] = json!(subscribe_per_s);
    report.figures["subscribers"] = json!(p.subscribers);
    report.figures["online"] = json!(fanout);
    Ok(report)
}

#[derive(Clone, Debug, Serialize)]
pub struct RoomParams {
    pub target: Target,
    #[serde(flatten)]
    pub timing: Timing,
    /// Connections in the room, senders included.
    pub members: usize,
    pub senders: usize,
    /// The room's rate of ordinary messages per second (`room_create`'s `rate`).
    pub room_rate: u32,
    pub body_bytes: usize,
    pub prefix: String,
}

pub async fn room(p: RoomParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.members >= 2 && (1..=p.members).contains(&p.senders),
        "members must be at least 2 and senders 1..=members"
    );
    p.timing.check()?;
    // Live room pushes are not acked.
    let timing = Timing {
        ack_delay_ms: 0,
        ..p.timing
    };
    let mut owner = users(&p.target, &format!("{}-owner", p.prefix), 1, 1)
        .await?
        .pop()
        .context("the room's owner")?
        .conn;
    let created = owner
        .ok(
            "room_create",
            json!({ "name": format!("{}-room", p.prefix), "rate": p.room_rate }),
        )
        .await
        .context("room_create")?;
    let room = created["conv"].as_str().context("room id")?.to_owned();
    drop(owner);
    let mut members = users(&p.target, &p.prefix, p.members, 32).await?;
    for u in &mut members {
        u.conn
            .ok("room_join", json!({ "conv": room }))
            .await
            .context("room_join")?;
    }
    let conns = members
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let convs = if i < p.senders {
                vec![room.clone()]
            } else {
                Vec::new()
            };
            (u.conn, convs)
        })
        .collect();
    // Every admitted message reaches every connection in the room but its sender's.
    let fanout = (p.members - 1) as u64;
    let mut report = drive(conns, timing, p.body_bytes, fanout, ("room", &p)).await?;
    let c = &report.figures["correctness"];
    let (sent, shed) = (
        c["sent"].as_u64().unwrap_or(0),
        c["unacked"].as_u64().unwrap_or(0),
    );
    report.figures["shed"] = json!(shed);
    report.figures["shed_share"] = json!(shed as f64 / sent.max(1) as f64);
    Ok(report)
}
