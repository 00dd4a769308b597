//! A cluster's placement map (issue 13): the nodes, each with its shard count, and from them
//! slot → (node, shard) for every slot. Shard ids are cluster-wide: node `n` holds the
//! contiguous range of shard ids after those of the nodes listed before it, and the engine's
//! [`Placement`] (slot → shard) spans all of them, so the engine keeps emitting "mail to shard
//! X" without knowing where X runs; the driver asks [`ClusterMap::locate`].
//!
//! A map is versioned and hashed: a node records its id and the map's hash in its data dir at
//! first start and refuses to start on another (a changed map would move slots, so lookups
//! would miss data), as a changed shard count is refused today. A single node with no
//! `[cluster]` configuration is the one-node map [`ClusterMap::single`].

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::ids::{Placement, ShardId, Slot};
use crate::limits::{SHARDS_MAX, SLOTS};

/// One node of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Unique within the cluster: 1-32 of `a-z 0-9 - _`.
    pub id: String,
    /// Where its clients connect (`ws://host:port/ws`): what a client of another node is told.
    pub url: String,
    /// Its shard count (one core each).
    pub shards: u16,
}

/// The placement map: every node, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Moves with every change an operator makes; part of the hash.
    pub version: u64,
    pub nodes: Vec<NodeSpec>,
}

/// Where a shard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index into `nodes`.
    pub node: usize,
    /// The shard's index on that node (its core and column family there).
    pub local: u16,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("a cluster needs at least one node")]
    NoNodes,
    #[error("node id {0:?} is not 1-32 of a-z 0-9 - _")]
    BadId(String),
    #[error("node id {0:?} appears twice")]
    DuplicateId(String),
    #[error("node {0:?} has no shards")]
    NoShards(String),
    #[error("the cluster has {0} shards; at most {max} (and at most {SLOTS} slots)", max = SHARDS_MAX)]
    TooManyShards(usize),
    #[error("node {0:?} is not in the cluster map")]
    UnknownNode(String),
}

impl ClusterMap {
    /// The map of one node alone (no `[cluster]` configured).
    pub fn single(shards: u16) -> ClusterMap {
        ClusterMap {
            version: 1,
            nodes: vec![NodeSpec {
                id: "local".into(),
                url: String::new(),
                shards,
            }],
        }
    }

    pub fn validate(&self) -> Result<(), MapError> {
        if self.nodes.is_empty() {
            return Err(MapError::NoNodes);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let ok_id = (1..=32).contains(&node.id.len())
                && node.id.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_'
                });
            if !ok_id {
                return Err(MapError::BadId(node.id.clone()));
            }
            if self.nodes[..i].iter().any(|n| n.id == node.id) {
                return Err(MapError::DuplicateId(node.id.clone()));
            }
            if node.shards == 0 {
                return Err(MapError::NoShards(node.id.clone()));
            }
        }
        let total = self.total_shards();
        if total > SHARDS_MAX || total > SLOTS as usize {
            return Err(MapError::TooManyShards(total));
        }
        Ok(())
    }

    fn total_shards(&self) -> usize {
        self.nodes.iter().map(|n| n.shards as usize).sum()
    }

    /// The engine's placement: slot → cluster-wide shard id. Call on a validated map.
    pub fn placement(&self) -> Placement {
        Placement::new(self.total_shards() as u16)
    }

    /// The index of node `id`.
    pub fn node(&self, id: &str) -> Result<usize, MapError> {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| MapError::UnknownNode(id.to_owned()))
    }

    /// The cluster-wide ids of node `node`'s shards.
    pub fn shards_of(&self, node: usize) -> std::ops::Range<u16> {
        let first: u16 = self.nodes[..node].iter().map(|n| n.shards).sum();
        first..first + self.nodes[node].shards
    }

    /// Where cluster-wide shard `shard` runs; `None` past the last node's shards.
    pub fn locate(&self, shard: ShardId) -> Option<Location> {
        let mut first = 0u16;
        for (node, spec) in self.nodes.iter().enumerate() {
            if shard.0 < first + spec.shards {
                return Some(Location {
                    node,
                    local: shard.0 - first,
                });
            }
            first += spec.shards;
        }
        None
    }

    /// Where slot `slot` lives.
    pub fn slot(&self, slot: Slot) -> Option<Location> {
        self.locate(self.placement().shard_of(slot))
    }

    /// A hash of everything that decides placement (version, node ids, shard counts, order):
    /// what a data dir records and a peer compares. URLs are left out: a node may move.
    pub fn hash(&self) -> MapHash {
        let mut text = format!("hermod-cluster-map/1 v{}", self.version);
        for node in &self.nodes {
            text.push_str(&format!(" {}:{}", node.id, node.shards));
        }
        MapHash(xxh3_64(text.as_bytes()))
    }
}

/// A map's hash, shown as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHash(pub u64);

impl fmt::Display for MapHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConvId, UserId};

    fn three() -> ClusterMap {
        let node = |id: &str, shards| NodeSpec {
            id: id.into(),
            url: format!("ws://{id}:7400/ws"),
            shards,
        };
        ClusterMap {
            version: 3,
            nodes: vec![node("a", 2), node("b", 1), node("c", 3)],
        }
    }

    #[test]
    fn shards_are_cluster_wide_and_every_slot_has_one_home() {
        let map = three();
        map.validate().unwrap();
        assert_eq!(map.placement().shards(), 6);
        assert_eq!(map.shards_of(1), 2..3);
        assert_eq!(map.shards_of(2), 3..6);
        assert_eq!(map.locate(ShardId(4)), Some(Location { node: 2, local: 1 }));
        assert_eq!(map.locate(ShardId(6)), None);
        let mut per_node = [0usize; 3];
        for s in 0..SLOTS {
            let at = map.slot(Slot(s)).expect("every slot is placed");
            assert!(at.local < map.nodes[at.node].shards);
            per_node[at.node] += 1;
        }
        assert_eq!(per_node.iter().sum::<usize>(), SLOTS as usize);
        // Slots spread by shard: a node with 3 of 6 shards holds about half of them.
        assert!((1_900..=2_200).contains(&per_node[2]), "{per_node:?}");
        // The engine and the map agree on a user's and a conversation's shard.
        let u = UserId::from_username("alice");
        let c = ConvId::direct(u, UserId::from_username("bob"));
        assert_eq!(map.locate(map.placement().home(u)), map.slot(u.slot()));
        assert_eq!(map.locate(map.placement().owner(c)), map.slot(c.slot()));
    }

    #[test]
    fn one_node_is_todays_placement() {
        let map = ClusterMap::single(4);
        map.validate().unwrap();
        for s in 0..SLOTS {
            let at = map.slot(Slot(s)).unwrap();
            assert_eq!((at.node, at.local), (0, s % 4));
        }
    }

    #[test]
    fn the_hash_moves_with_what_decides_placement_only() {
        let map = three();
        let mut moved = map.clone();
        moved.nodes[0].url = "ws://elsewhere/ws".into();
        assert_eq!(moved.hash(), map.hash(), "a node's URL is not placement");
        for change in [
            |m: &mut ClusterMap| m.version += 1,
            |m: &mut ClusterMap| m.nodes[1].shards = 2,
            |m: &mut ClusterMap| m.nodes.swap(0, 1),
            |m: &mut ClusterMap| m.nodes[2].id = "d".into(),
        ] {
            let mut other = map.clone();
            change(&mut other);
            assert_ne!(other.hash(), map.hash());
        }
        assert_eq!(map.hash().to_string().len(), 16);
    }

    #[test]
    fn bad_maps_are_refused() {
        let mut m = three();
        m.nodes[1].id = "B".into();
        assert_eq!(m.validate(), Err(MapError::BadId("B".into())));
        let mut m = three();
        m.nodes[2].id = "a".into();
        assert_eq!(m.validate(), Err(MapError::DuplicateId("a".into())));
        let mut m = three();
        m.nodes[0].shards = 0;
        assert_eq!(m.validate(), Err(MapError::NoShards("a".into())));
        let mut m = three();
        m.nodes[0].shards = 300;
        assert!(matches!(m.validate(), Err(MapError::TooManyShards(304))));
        assert_eq!(
            ClusterMap {
                version: 1,
                nodes: vec![]
            }
            .validate(),
            Err(MapError::NoNodes)
        );
        assert_eq!(three().node("z"), Err(MapError::UnknownNode("z".into())));
    }
}
