//! # hermod-tools: what an operator runs around Hermod
//!
//! | module | subcommand | owns |
//! | --- | --- | --- |
//! | [`admin`] | `admin` | a client of a running server's admin API: stats, bulk accounts, disable, kick, notices |
//! | [`plan`] | `plan` | the capacity planner: load → cores, hosts, memory, disk, network, with the arithmetic shown |
//! | [`doctor`] | `doctor` | host checks against `tuning.md`: current, recommended, why |
//! | [`inspect`] | `inspect` | what a data dir holds per shard, read-only |
//! | [`provision`] | `provision` | bulk benchmark accounts written offline into a data dir, with signed tokens |

pub mod admin;
pub mod doctor;
pub mod inspect;
pub mod plan;
pub mod provision;
