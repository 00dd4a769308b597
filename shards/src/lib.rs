//! # hermod-shards: the sans-IO shard engine
//!
//! Everything Hermod decides lives here; everything it *does* (sockets, timers, disk, threads)
//! lives in the `hermod` binary around it. A [`Shard`] takes inputs with the current time —
//! a client frame, a mail from another shard, a finished storage commit, a finished password
//! hash, a timer tick — and emits outputs that the driver carries out: frames to send, mails
//! to other shards, a batch to commit, a hash to compute, a socket to hand off.
//!
//! | module | owns |
//! | --- | --- |
//! | [`limits`] | every size, count and time bound, with the relations between them asserted |
//! | [`cluster`] | a cluster's placement map: nodes, cluster-wide shard ids, where a slot lives, the map's hash |
//! | [`ids`] | id newtypes (`UserId`, `ConvId`, `ShardId`, `Seq`, `ConnId`) and slot → shard placement |
//! | [`protocol`] | the client protocol: request, reply, push and error shapes (see `docs/protocol.md`) |
//! | [`model`] | roles, friend states, message kinds and flags: names on the wire, one byte on disk |
//! | [`link`] | the link layer between shards on different nodes: sequence numbers, window, acks, resend, incarnations |
//! | [`mail`] | every message one shard sends another: one enum, one file |
//! | [`admin`] | the operator's API: requests parsed from HTTP, answers mapped to statuses |
//! | [`auth`] | signed device tokens, username/password rules, password hashing jobs |
//! | [`storage`] | the storage trait and its contract, key layout, stored record encodings, the in-memory store (RocksDB's lives in crate `hermod-store`) |
//! | [`engine`] | the shard state machine: sessions, accounts, conversation ownership, fan-out, sync |
//! | [`fuzzing`] | the fuzz harness of request handling (run by `fuzz/` and by seeded tests) |
//!
//! State ownership: a `Shard` value is the whole state of one core, created on and only ever
//! touched by its own executor thread (the driver keeps it in that thread's context). Nothing
//! in it is shared with another thread, so nothing in it takes a lock; other shards reach it
//! only by mail.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod engine;
pub mod fuzzing;
pub mod ids;
pub mod limits;
pub mod link;
pub mod mail;
pub mod media;
pub mod model;
pub mod protocol;
pub mod remote;
pub mod storage;

pub use engine::{Config, Frame, Output, Shard};
pub use ids::{ConnId, ConvId, Seq, ShardId, UserId};
pub use storage::Durability;
