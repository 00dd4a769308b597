//! `direct`: users send one-to-one messages to peers at a fixed total rate.

use std::collections::HashSet;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use hermod_shards::ids::{Placement, UserId};

use super::open_loop::{drive, Timing};
use crate::conn::Target;
use crate::report::Report;

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
    /// Pair only users homed on different shards of a placement over this many shards (the
    /// cluster's total): every conversation then crosses shards — and nodes, on a cluster of
    /// one-shard nodes. The same users pair the same way on one node with as many shards, so
    /// the two runs differ only in how mail crosses (in-process channels or NATS).
    pub split_shards: Option<u16>,
}

/// `direct`: users send one-to-one messages to random peers at a fixed total rate.
pub async fn direct(p: DirectParams) -> anyhow::Result<Report> {
    anyhow::ensure!(p.users >= 2, "direct needs at least 2 users");
    p.timing.check()?;
    let peers = p.peers.clamp(1, p.users - 1);
    let mut users = crate::provision::users(&p.target, &p.prefix, p.users, 32).await?;

    // Conversations: i with the next `peers` users (mod users) — homed on another shard than
    // i's, with `split_shards` — each opened once.
    let home = |name: &str| {
        p.split_shards
            .map(|n| Placement::new(n).home(UserId::from_username(name)))
    };
    let homes: Vec<_> = users.iter().map(|u| home(&u.name)).collect();
    let mut convs: Vec<Vec<String>> = vec![Vec::new(); p.users];
    let mut opened = HashSet::new();
    for i in 0..p.users {
        let others = (1..p.users)
            .map(|d| (i + d) % p.users)
            .filter(|&j| homes[j].is_none() || homes[j] != homes[i]);
        for j in others.take(peers) {
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
