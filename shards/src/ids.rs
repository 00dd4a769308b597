//! Identifier newtypes and placement (id → slot → shard, through [`Placement`]).
//!
//! Ids are hashes, so placement needs no lookup: any shard can compute the home shard of a
//! user from the username alone and the owner shard of a conversation from its id.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::limits::SLOTS;

/// A shard: one core, one executor, one column family. `0..shards`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct ShardId(pub u16);

/// A user: the xxh3 hash of the normalised username. Stable across restarts and shard counts.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct UserId(pub u64);

/// A placement slot, `0..SLOTS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot(pub u16);

/// A per-conversation sequence number: 1, 2, 3… with no gaps. 0 means "nothing yet".
pub type Seq = u64;

/// A connection, unique within its shard for the life of the process.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct ConnId(pub u64);

/// A group: a random id drawn by the creator's home shard. Membership lives with the group's
/// owner shard, never in the id.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct GroupId(pub u64);

/// A conversation. One-to-one conversations are named by their two members (lower id first),
/// so membership is checked without a lookup and both sides derive the same id. Groups are
/// named by their id; their owner shard holds the member list. Channels are named by an id
/// like groups; their owner holds the publishers, and each subscriber's home shard holds the
/// subscription (docs/channels.md).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum ConvId {
    Direct(UserId, UserId),
    Group(GroupId),
    Channel(GroupId),
    /// A live room (`engine/rooms.rs`): nothing of it is a stored conversation but its
    /// settings; the id only places it.
    Room(GroupId),
}

/// The server's own name: the sender of operator notices (admin API). `register` refuses it,
/// so it never has an account, devices or state on its home shard; its one-to-one
/// conversations with users carry notices only (users cannot send in them).
pub const SYSTEM_USERNAME: &str = "hermod";

impl UserId {
    pub fn from_username(normalised: &str) -> UserId {
        UserId(xxh3_64(normalised.as_bytes()))
    }

    /// The id of [`SYSTEM_USERNAME`] (computed at compile time: it is checked on every send).
    pub const SYSTEM: UserId = UserId(xxhash_rust::const_xxh3::xxh3_64(SYSTEM_USERNAME.as_bytes()));

    pub fn slot(self) -> Slot {
        Slot((self.0 % SLOTS as u64) as u16)
    }
}

/// Where every slot lives: the one function from an id to the shard that holds it. Every
/// call site asks this value — nothing else computes a shard from a slot — so when placement
/// grows a node (several hosts) or a slot table (handover), it changes here only.
///
/// Today: slot `s` lives on shard `s % shards` of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    shards: u16,
}

impl Placement {
    /// `shards` must be at least 1.
    pub fn new(shards: u16) -> Placement {
        assert!(shards > 0, "a placement needs at least one shard");
        Placement { shards }
    }

    /// How many shards slots are spread over.
    pub fn shards(self) -> u16 {
        self.shards
    }

    pub fn shard_of(self, slot: Slot) -> ShardId {
        ShardId(slot.0 % self.shards)
    }

    /// The user's home shard: account, devices, conversation index, connections.
    pub fn home(self, user: UserId) -> ShardId {
        self.shard_of(user.slot())
    }

    /// The conversation's owner shard: its messages, membership and single writer.
    pub fn owner(self, conv: ConvId) -> ShardId {
        self.shard_of(conv.slot())
    }

    /// Every shard, in order.
    pub fn all(self) -> impl Iterator<Item = ShardId> {
        (0..self.shards).map(ShardId)
    }
}

/// The first byte of a channel's key encoding: a user's channel subscriptions are the entries
/// of their conversation index whose conversation key starts with it (one prefix scan).
pub const CHANNEL_KIND: u8 = b'c';

impl ConvId {
    /// The one-to-one conversation of `a` and `b`, in either order.
    pub fn direct(a: UserId, b: UserId) -> ConvId {
        if a <= b {
            ConvId::Direct(a, b)
        } else {
            ConvId::Direct(b, a)
        }
    }

    pub fn slot(self) -> Slot {
        Slot((xxh3_64(&self.to_bytes()) % SLOTS as u64) as u16)
    }

    /// The two members of a one-to-one conversation; `None` for a group.
    pub fn direct_members(self) -> Option<[UserId; 2]> {
        match self {
            ConvId::Direct(a, b) => Some([a, b]),
            ConvId::Group(_) | ConvId::Channel(_) | ConvId::Room(_) => None,
        }
    }

    /// Whether `user` may be in this conversation as far as the id alone tells: always true
    /// for groups (their owner checks), the two members for a one-to-one conversation.
    pub fn may_have_member(self, user: UserId) -> bool {
        self.direct_members().is_none_or(|m| m.contains(&user))
    }

    /// Whether the owner holds group state for it (a member list, roles, settings): groups
    /// and channels (whose members are its publishers).
    pub fn is_group(self) -> bool {
        matches!(self, ConvId::Group(_) | ConvId::Channel(_))
    }

    pub fn is_channel(self) -> bool {
        matches!(self, ConvId::Channel(_))
    }

    pub fn is_room(self) -> bool {
        matches!(self, ConvId::Room(_))
    }

    /// Fixed-width key encoding: kind byte, then the ids big-endian (so keys sort by id).
    pub fn to_bytes(self) -> [u8; 17] {
        let mut out = [0u8; 17];
        match self {
            ConvId::Direct(a, b) => {
                out[0] = b'd';
                out[1..9].copy_from_slice(&a.0.to_be_bytes());
                out[9..17].copy_from_slice(&b.0.to_be_bytes());
            }
            ConvId::Group(g) => {
                out[0] = b'g';
                out[1..9].copy_from_slice(&g.0.to_be_bytes());
            }
            ConvId::Channel(c) => {
                out[0] = CHANNEL_KIND;
                out[1..9].copy_from_slice(&c.0.to_be_bytes());
            }
            ConvId::Room(r) => {
                out[0] = b'r';
                out[1..9].copy_from_slice(&r.0.to_be_bytes());
            }
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<ConvId> {
        if bytes.len() != 17 {
            return None;
        }
        let a = u64::from_be_bytes(bytes[1..9].try_into().ok()?);
        let b = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
        match bytes[0] {
            b'd' => (a <= b).then_some(ConvId::Direct(UserId(a), UserId(b))),
            b'g' => (b == 0).then_some(ConvId::Group(GroupId(a))),
            CHANNEL_KIND => (b == 0).then_some(ConvId::Channel(GroupId(a))),
            b'r' => (b == 0).then_some(ConvId::Room(GroupId(a))),
            _ => None,
        }
    }

    /// Parses the protocol forms `d.<hex>.<hex>`, `g.<hex>`, `c.<hex>` and `r.<hex>`. Rejects
    /// non-canonical forms (wrong order, upper case, leading zeros) so one conversation has
    /// exactly one name.
    pub fn parse(text: &str) -> Option<ConvId> {
        if let Some(rest) = text.strip_prefix("g.") {
            return parse_hex(rest).map(|g| ConvId::Group(GroupId(g)));
        }
        if let Some(rest) = text.strip_prefix("c.") {
            return parse_hex(rest).map(|c| ConvId::Channel(GroupId(c)));
        }
        if let Some(rest) = text.strip_prefix("r.") {
            return parse_hex(rest).map(|r| ConvId::Room(GroupId(r)));
        }
        let rest = text.strip_prefix("d.")?;
        let (a, b) = rest.split_once('.')?;
        let a = parse_hex(a)?;
        let b = parse_hex(b)?;
        (a <= b).then_some(ConvId::Direct(UserId(a), UserId(b)))
    }
}

fn parse_hex(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 16 || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    if !text
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvId::Direct(a, b) => write!(f, "d.{:x}.{:x}", a.0, b.0),
            ConvId::Group(g) => write!(f, "g.{:x}", g.0),
            ConvId::Channel(c) => write!(f, "c.{:x}", c.0),
            ConvId::Room(r) => write!(f, "r.{:x}", r.0),
        }
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_id_round_trips_and_is_canonical() {
        let c = ConvId::direct(UserId(0xfeed), UserId(0x12));
        assert_eq!(c, ConvId::Direct(UserId(0x12), UserId(0xfeed)));
        let text = c.to_string();
        assert_eq!(text, "d.12.feed");
        assert_eq!(ConvId::parse(&text), Some(c));
        assert_eq!(ConvId::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(ConvId::parse("d.feed.12"), None, "wrong order");
        assert_eq!(ConvId::parse("d.012.feed"), None, "leading zero");
        assert_eq!(ConvId::parse("d.12.FEED"), None, "upper case");
        assert_eq!(ConvId::parse("g.1.2"), None);
        let g = ConvId::Group(GroupId(0xabc));
        assert_eq!(g.to_string(), "g.abc");
        assert_eq!(ConvId::parse("g.abc"), Some(g));
        assert_eq!(ConvId::from_bytes(&g.to_bytes()), Some(g));
        assert_eq!(ConvId::parse("g.0abc"), None, "leading zero");
        assert!(g.may_have_member(UserId(5)) && !c.may_have_member(UserId(5)));
        assert_eq!(ConvId::parse("d.1"), None);
        let ch = ConvId::Channel(GroupId(0xabc));
        assert_eq!(ch.to_string(), "c.abc");
        assert_eq!(ConvId::parse("c.abc"), Some(ch));
        assert_eq!(ConvId::from_bytes(&ch.to_bytes()), Some(ch));
        assert_ne!(
            ch.slot(),
            g.slot(),
            "a channel and a group of one id are apart"
        );
        assert!(ch.is_group() && ch.is_channel() && !g.is_channel());
        let r = ConvId::Room(GroupId(0xabc));
        assert_eq!(ConvId::parse("r.abc"), Some(r));
        assert_eq!(ConvId::from_bytes(&r.to_bytes()), Some(r));
        assert!(r.is_room() && !r.is_group());
    }

    #[test]
    fn the_system_id_is_its_names_id() {
        assert_eq!(UserId::SYSTEM, UserId::from_username(SYSTEM_USERNAME));
    }

    #[test]
    fn placement_is_stable_and_in_range() {
        let u = UserId::from_username("alice");
        assert_eq!(u, UserId::from_username("alice"));
        assert!(u.slot().0 < SLOTS);
        for shards in 1..8 {
            let p = Placement::new(shards);
            assert!(p.home(u).0 < shards);
            assert_eq!(p.home(u), p.shard_of(u.slot()));
        }
        let c = ConvId::direct(u, UserId(7));
        assert_eq!(Placement::new(3).owner(c), ShardId(c.slot().0 % 3));
    }
}
