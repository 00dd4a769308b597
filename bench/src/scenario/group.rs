//! `group`: members of groups send at a fixed total rate; deliveries per second and
//! end-to-end latency per delivery.

use std::collections::HashMap;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use super::open_loop::{drive, Timing};
use crate::conn::{Conn, Target};
use crate::report::Report;

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
    /// Members of every group who are away with a push token (registered, then
    /// disconnected): each message reaches the offline-notification path for them (the server
    /// needs a `[push]` section for it to run; docs/push.md).
    pub away: usize,
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
    let away = away_with_tokens(&p.target, &format!("{}-away", p.prefix), p.away).await?;
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
        for chunk in away.chunks(BATCH) {
            creator
                .ok("group_invite", json!({ "conv": conv, "users": chunk }))
                .await
                .context("group_invite (away members)")?;
        }
    }
    // The set-up devices leave before the measured devices arrive: no pushes to them.
    drop(setup);
    let users = crate::provision::log_in(&p.target, &p.prefix, p.users, 32).await?;
    let conns = users.into_iter().map(|u| u.conn).zip(convs).collect();
    let fanout = (p.members - 1) as u64;
    drive(conns, p.timing, p.body_bytes, fanout, ("group", &p)).await
}

/// `count` users who register a push token on their device and leave: their names.
async fn away_with_tokens(
    target: &Target,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    crate::provision::register(target, prefix, count, 32).await?;
    let mut users = crate::provision::log_in(target, prefix, count, 32).await?;
    for (i, u) in users.iter_mut().enumerate() {
        u.conn
            .ok(
                "push_register",
                json!({ "platform": "other", "token": format!("bench-{i}") }),
            )
            .await
            .context("push_register")?;
    }
    let names = users.iter().map(|u| u.name.clone()).collect();
    drop(users);
    // The server notices the closes before the first message (they are only sockets closing).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    Ok(names)
}
