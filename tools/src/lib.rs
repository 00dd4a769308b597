//! # hermod-tools: what an operator runs around Hermod
//!
//! | module | subcommand | owns |
//! | --- | --- | --- |
//! | [`plan`] | `plan` | the capacity planner: load → cores, hosts, memory, disk, network, with the arithmetic shown |
//! | [`doctor`] | `doctor` | host checks against `tuning.md`: current, recommended, why |
//! | [`inspect`] | `inspect` | what a data dir holds per shard, read-only |
//! | [`provision`] | `provision` | bulk benchmark accounts written offline into a data dir, with signed tokens |

pub mod doctor;
pub mod inspect;
pub mod plan;
pub mod provision;
