//! Where a message goes: its recipients grouped by home shard, one `Deliver` mail per
//! destination shard carrying the message JSON built once. A leaf: the owner, groups and the
//! social code build fan-outs with it; it knows none of them.

use std::sync::Arc;

use crate::ids::{Placement, ShardId, UserId};

/// Where one message goes: per destination shard, the recipients homed there. Shared by every
/// message of a conversation until its membership changes (groups cache it).
pub(super) type Fanout = Arc<[(ShardId, Arc<[UserId]>)]>;

/// Users grouped by home shard, each user once.
pub(super) fn by_shard(users: impl Iterator<Item = UserId>, placement: Placement) -> Fanout {
    let mut groups: Vec<(ShardId, Vec<UserId>)> =
        Vec::with_capacity(placement.shards().min(8) as usize);
    let mut seen = std::collections::HashSet::new();
    for user in users {
        if !seen.insert(user) {
            continue;
        }
        let home = placement.home(user);
        match groups.iter_mut().find(|(s, _)| *s == home) {
            Some((_, list)) => list.push(user),
            None => groups.push((home, vec![user])),
        }
    }
    groups
        .into_iter()
        .map(|(shard, users)| (shard, Arc::from(users)))
        .collect()
}
