//! The load scenarios, one file each. Each provisions its users, runs its load, and returns a
//! [`Report`](crate::report::Report).
//!
//! | file | scenario |
//! | --- | --- |
//! | `direct.rs` | `direct`: one-to-one messages at a fixed total rate |
//! | `group.rs` | `group`: group messages at a fixed total rate, deliveries per second |
//! | `media.rs` | `media`: uploads and downloads over the media path, MB/s, optionally paced |
//! | `channel.rs` | `channel`: posts to a channel with many subscribers; `room`: a live room over its rate |
//! | `echo.rs` | `echo`: `ping` round trips, Hermod's cheapest request |
//! | `ceiling.rs` | `ceiling`: the kernel's fan-out and request/response ceilings, no Hermod |
//! | `idle.rs` | `idle`: held connections, server memory per connection |
//! | `connect.rs` | `connect`: a storm of new connections resuming with tokens |
//! | `sync.rs` | `sync`: devices paging in what piled up while they were away |
//! | `open_loop.rs` | what `direct`, `group` and `echo` share: schedules, the connection tasks, `drive` |
//!
//! `presence` and `crash` are scenarios too, in their own modules of the crate.

mod ceiling;
mod channel;
mod connect;
mod direct;
mod echo;
mod group;
mod idle;
mod media;
mod open_loop;
mod sync;

pub use ceiling::{ceiling, CeilingMode, CeilingParams};
pub use channel::{channel, room, ChannelParams, RoomParams};
pub use connect::{connect, ConnectParams};
pub use direct::{direct, DirectParams};
pub use echo::{echo, EchoParams};
pub use group::{group, GroupParams};
pub use idle::{idle, IdleParams};
pub use media::{media, MediaParams};
pub use open_loop::Timing;
pub use sync::{sync, SyncParams};
