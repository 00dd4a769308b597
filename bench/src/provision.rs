//! Benchmark users. Each run creates its own users (`<prefix>-<n>`) through the public protocol
//! — `register` then `login` — so the server under test needs no special mode. Registration
//! costs one argon2id hash per user at the server's configured cost: for thousands of users,
//! run the server with a lower `--argon2-memory-kib` (the hash cost is not what a message
//! benchmark measures). For thousands of users without argon2 logins, `hermod-tools provision` mints tokens
//! offline from the server secret (see `connect --tokens`).

use anyhow::Context;
use serde_json::{json, Value};

use crate::conn::{Conn, Target};

pub const PASSWORD: &str = "hermod-bench-password";

/// A logged-in user: its name and its connection.
pub struct User {
    pub name: String,
    pub conn: Conn,
    /// The device token from `login` (empty for registration-only users).
    pub token: String,
}

/// Registers and logs in `count` users, `parallel` at a time.
pub async fn users(
    target: &Target,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> anyhow::Result<Vec<User>> {
    batched(target, prefix, 0..count, parallel, Step::RegisterAndLogin).await
}

/// Registers and logs in users `<prefix>-<i>` for each `i` in `range`, `parallel` at a time.
pub async fn users_range(
    target: &Target,
    prefix: &str,
    range: std::ops::Range<usize>,
    parallel: usize,
) -> anyhow::Result<Vec<User>> {
    batched(target, prefix, range, parallel, Step::RegisterAndLogin).await
}

/// Registers `count` users and closes their connections: for scenarios that set up state
/// (groups) before their users come online, so nothing is pushed to idle connections.
pub async fn register(
    target: &Target,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> anyhow::Result<()> {
    batched(target, prefix, 0..count, parallel, Step::Register)
        .await
        .map(drop)
}

/// Logs in `count` already registered users (device `bench`).
pub async fn log_in(
    target: &Target,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> anyhow::Result<Vec<User>> {
    batched(target, prefix, 0..count, parallel, Step::Login).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Register,
    Login,
    RegisterAndLogin,
}

async fn batched(
    target: &Target,
    prefix: &str,
    range: std::ops::Range<usize>,
    parallel: usize,
    step: Step,
) -> anyhow::Result<Vec<User>> {
    let count = range.end;
    let mut out = Vec::with_capacity(if step == Step::Register {
        0
    } else {
        range.len()
    });
    let mut next = range.start;
    while next < count {
        let batch: Vec<_> = (next..count.min(next + parallel.max(1)))
            .map(|i| {
                let target = target.clone();
                let name = format!("{prefix}-{i}");
                tokio::spawn(async move { login(&target, name, step).await })
            })
            .collect();
        next += batch.len();
        for task in batch {
            let user = task.await.context("provisioning task")??;
            if step != Step::Register {
                out.push(user); // registration-only connections close here
            }
        }
    }
    Ok(out)
}

async fn login(target: &Target, name: String, step: Step) -> anyhow::Result<User> {
    let mut conn = Conn::connect(target).await?;
    // On a cluster, a user who lives on another node is answered `moved` with that node's
    // URL: connect there and ask again (at most once per step: the URL is the user's home).
    let mut home: Option<Target> = None;
    if step != Step::Login {
        let args = json!({ "username": name, "password": PASSWORD });
        let mut r = conn.request("register", args.clone()).await?;
        if let Some(url) = moved(&r) {
            let there = target.redirect(url)?;
            conn = Conn::connect(&there).await?;
            home = Some(there);
            r = conn.request("register", args).await?;
        }
        if r.get("ok").is_none() && r["error"]["code"] != "username_taken" {
            anyhow::bail!("register {name}: {}", r["error"]);
        }
    }
    if step == Step::Register {
        return Ok(User {
            name,
            conn,
            token: String::new(),
        });
    }
    let args = json!({ "username": name, "password": PASSWORD, "device": "bench" });
    let mut r = conn.request("login", args.clone()).await?;
    if let (Some(url), None) = (moved(&r), &home) {
        conn = Conn::connect(&target.redirect(url)?).await?;
        r = conn.request("login", args).await?;
    }
    let ok = r
        .get("ok")
        .with_context(|| format!("login {name}: {}", r["error"]))?;
    let token = ok["token"].as_str().unwrap_or_default().to_owned();
    Ok(User { name, conn, token })
}

/// The node to go to, if `reply` is a cluster's `moved` error.
fn moved(reply: &Value) -> Option<&str> {
    (reply["error"]["code"] == "moved")
        .then(|| reply["error"]["url"].as_str())
        .flatten()
}
