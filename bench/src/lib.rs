//! # hermod-bench: the measuring instrument
//!
//! Scenarios drive real WebSocket connections against a running Hermod at a **fixed arrival
//! rate** (open loop): each send has an intended time, fixed before the run, and latency is
//! measured from that intended time — so a stalled server shows up as latency rather than
//! as a politely slower client (coordinated omission). Latencies go into hdrhistograms;
//! sends whose intended time falls in the warm-up are excluded from them.
//!
//! Correctness is accounted while loading: every sent message is followed to its ack and its
//! delivery; lost, duplicated and reordered counts are in every report, and a non-zero count
//! makes the run fail.
//!
//! | module | owns |
//! | --- | --- |
//! | [`conn`] | one client connection: handshake, requests with rids, pushes, acks |
//! | [`provision`] | creating and logging in the benchmark's users |
//! | [`stats`] | histograms, summaries and correctness counters |
//! | [`report`] | the versioned JSON report and `compare` |
//! | [`scenario`] | `direct`, `group`, `echo`, `idle`, `connect`, `sync` |
//! | [`presence`] | `presence`: a login storm seen by online friends |
//! | [`crash`] | `crash`: kill -9 under pipelined load, restart, resend, check every ack held |

pub mod conn;
pub mod crash;
pub mod presence;
pub mod provision;
pub mod report;
pub mod scenario;
pub mod stats;
