//! `sync`: devices coming back after messages piled up, paging them in with `sync`.

use std::time::Instant;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::open_loop::RID_BASE;
use crate::conn::{Conn, Target};
use crate::report::Report;
use crate::stats::{histogram, record, Summary};

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
