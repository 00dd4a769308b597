//! # hermod: the server binary — the I/O shell around the shard engine
//!
//! | module | owns |
//! | --- | --- |
//! | `config` | flags and the TOML file, resolved into one `Config` |
//! | `server` | start-up: data dir, secret, RocksDB, listeners, one pinned executor per shard, signals |
//! | `shard` | one shard's tasks: start-up of its context, mail pumps, the timer task, accept loops, the drain at shutdown |
//! | `ctx` | the shard's shared context and `dispatch`: the engine's outputs carried out, group commits on the blocking pool |
//! | `conn` | one client socket: HTTP, the WebSocket loop, close linger, hand-off of the fd |
//! | `outbox` | a connection's bounded outbox, filled by `dispatch`, drained by its task |
//! | `admin_http` | the admin API's authentication and its wait for the engine's answer |
//! | `nats` | the NATS side of the cluster transport: a tokio thread with async-nats, bounded channels to the shards (not wired yet) |
//! | `mesh` | the shard↔shard channels and the one envelope type they carry |
//! | `http`, `ws` | sans-IO HTTP routing and WebSocket framing |
//! | `fuzzing` | the fuzz harnesses of `ws` and `http` (run by `fuzz/` and by seeded tests) |
//! | `webhook` | outgoing webhooks (push gateway, bots): bounded queues and worker threads POSTing signed requests |
//! | `metrics` | per-shard counters published every 250 ms; `/metrics`, `/healthz`, `/readyz` |
//!
//! The decisions (what a frame means, who owns what, when to ack) are all in the
//! `hermod-shards` crate; this crate only moves bytes and time in and out of it. Modules
//! depend one way: `shard` → `conn` → `admin_http`, `ctx` → `outbox`, `mesh`, `metrics`.
//!
//! A library as well as a binary so that `fuzz/` and the integration tests reach the framing
//! and HTTP code the server runs, not a copy of it.

pub mod admin_http;
pub mod config;
pub mod conn;
pub mod ctx;
pub mod fuzzing;
pub mod http;
pub mod links;
pub mod media;
pub mod mesh;
pub mod metrics;
pub mod nats;
pub mod outbox;
pub mod server;
pub mod shard;
pub mod webhook;
pub mod ws;
