//! # hermod: the server binary — the I/O shell around the shard engine
//!
//! | module | owns |
//! | --- | --- |
//! | `config` | flags and the TOML file, resolved into one `Config` |
//! | `server` | start-up: data dir, secret, RocksDB, listeners, one pinned executor per shard, signals |
//! | `shard` | the loop around one `hermod_shards::Shard`: routes its outputs, group commits, timers |
//! | `mesh` | the shard↔shard channels and the one envelope type they carry |
//! | `conn` | one client socket: HTTP, WebSocket frames, its bounded outbox, hand-off |
//! | `http`, `ws` | sans-IO HTTP routing and WebSocket framing |
//! | `fuzzing` | the fuzz harnesses of `ws` and `http` (run by `fuzz/` and by seeded tests) |
//! | `metrics` | per-shard counters published each tick; `/metrics`, `/healthz`, `/readyz` |
//!
//! The decisions (what a frame means, who owns what, when to ack) are all in the
//! `hermod-shards` crate; this crate only moves bytes and time in and out of it.

//!
//! A library as well as a binary so that `fuzz/` and the integration tests reach the framing
//! and HTTP code the server runs, not a copy of it.

pub mod config;
pub mod conn;
pub mod fuzzing;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod server;
pub mod shard;
pub mod ws;
