//! Storage: the trait the engine reads through, the key layout, and the stored records.
//!
//! One RocksDB column family per shard; a shard only ever reads and writes its own. Every key
//! starts with the big-endian slot of the user or conversation it belongs to, then a tag byte:
//!
//! | key | value | owner |
//! | --- | --- | --- |
//! | `slot 'U' user` | [`UserRecord`] | user's home shard |
//! | `slot 'D' user device` | [`DeviceRecord`] | user's home shard |
//! | `slot 'T' user device` | [`PushTokenRecord`] (the device's push token) | user's home shard |
//! | `slot 'N' user conv` | empty: the user muted the conversation's notifications | user's home shard |
//! | `slot 'Z' user` | [`DndRecord`] (do-not-disturb until) | user's home shard |
//! | `slot 'F' user other` | [`FriendRecord`] (this user's side of a friendship or request) | user's home shard |
//! | `slot 'B' user other` | [`BlockRecord`] (this user blocks `other`) | user's home shard |
//! | `slot 'P' user` | [`ProfileRecord`] (display name, avatar URL, bio, version) | user's home shard |
//! | `slot 'V' user` | [`SocialMeta`] (friend list version, status text) | user's home shard |
//! | `slot 'K' conv` | [`ConvBlocks`] (one-to-one: who blocks whom, as applied to sends) | conversation's owner shard |
//! | `slot 'C' user conv` | [`UserConv`] (membership index + read cursor; for a channel: the subscription) | user's home shard |
//! | `slot 'M' conv` | [`ConvMeta`] (one-to-one) or [`GroupMeta`] (group) | conversation's owner shard |
//! | `slot 'G' conv user` | [`GroupMember`] (a channel's: its publishers) | group's owner shard |
//! | `slot 'S' conv` | [`ChannelStats`] (a channel's subscriber count) | channel's owner shard |
//! | `slot 'Q' user` | [`MediaUsage`] (bytes of media granted, less uploads collected unfinished) | user's home shard |
//! | `slot 'W' room` | [`RoomRecord`] (a live room's settings) | room's owner shard |
//! | `slot 'J' conv user` | [`JoinRequest`] (awaiting approval) | group's owner shard |
//! | `slot 'R' conv seq` | [`MessageRecord`] | conversation's owner shard |
//! | `slot 'I' conv msg-id` | [`DedupRecord`] | conversation's owner shard |
//!
//! Reads are synchronous point gets and bounded range scans (memtable and block cache in the
//! common case). Writes never happen here: the engine hands a [`Commit`] to the driver, which
//! writes it off the reactor as one atomic batch (group commit).
//!
//! Values are rkyv archives: no schema parsing on read, validated before use.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::ids::{ConvId, Seq, UserId};
pub use crate::model::{Flags, FriendState, MessageKind, Role};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store underneath failed (RocksDB in the server: see the `hermod-store` crate).
    #[error("store: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error("corrupt record under key {key:02x?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    #[error("storage is closed")]
    Closed,
}

/// Key-value pairs from a scan, in scan order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Read access to one shard's column family.
pub trait Storage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Up to `limit` entries with `start <= key < end`, ascending, or descending if `reverse`.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Rows, StorageError>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// When an ack may be sent, relative to the write of the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the WAL is fsynced: survives power loss.
    Fsync,
    /// After the WAL write reached the OS: survives a process crash. The default.
    Wal,
    /// No WAL: benchmarks only; a crash loses recent writes.
    Memory,
}

/// One atomic group commit.
#[derive(Debug)]
pub struct Commit {
    pub id: u64,
    pub ops: Vec<WriteOp>,
}

pub mod keys {
    //! Key encodings. Big-endian everywhere so byte order is numeric order.
    use super::*;

    fn head(slot: u16, tag: u8, cap: usize) -> Vec<u8> {
        let mut k = Vec::with_capacity(3 + cap);
        k.extend_from_slice(&slot.to_be_bytes());
        k.push(tag);
        k
    }

    pub fn user(user: UserId) -> Vec<u8> {
        let mut k = head(user.slot().0, b'U', 8);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    pub fn device(user: UserId, device: &str) -> Vec<u8> {
        let mut k = device_prefix(user);
        k.extend_from_slice(device.as_bytes());
        k
    }

    /// Every device key of `user` starts with this.
    pub fn device_prefix(user: UserId) -> Vec<u8> {
        user_prefix(b'D', user)
    }

    /// A device's push token (`push_register`), dropped with the device.
    pub fn push_token(user: UserId, device: &str) -> Vec<u8> {
        let mut k = push_token_prefix(user);
        k.extend_from_slice(device.as_bytes());
        k
    }

    /// Every push-token key of `user` starts with this.
    pub fn push_token_prefix(user: UserId) -> Vec<u8> {
        user_prefix(PUSH_TOKEN, user)
    }

    pub const PUSH_TOKEN: u8 = b'T';

    /// The device name at the end of a `device` (or `push_token`) key.
    pub fn device_of_key(key: &[u8]) -> Option<String> {
        String::from_utf8(key.get(3 + 8..)?.to_vec()).ok()
    }

    pub fn user_conv(user: UserId, conv: ConvId) -> Vec<u8> {
        let mut k = user_conv_prefix(user);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    pub fn user_conv_prefix(user: UserId) -> Vec<u8> {
        let mut k = head(user.slot().0, b'C', 8 + 17);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    /// `user` muted `conv` (`conv_mute`): present means muted; the value is empty.
    pub fn conv_mute(user: UserId, conv: ConvId) -> Vec<u8> {
        let mut k = conv_mute_prefix(user);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    /// Every `conv_mute` key of `user` starts with this.
    pub fn conv_mute_prefix(user: UserId) -> Vec<u8> {
        let mut k = head(user.slot().0, b'N', 8 + 17);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    /// A device's public keys (`DeviceKeysRecord`).
    pub fn device_keys(user: UserId, device: &str) -> Vec<u8> {
        let mut k = device_keys_prefix(user);
        k.extend_from_slice(device.as_bytes());
        k
    }

    /// Every `device_keys` key of `user` starts with this.
    pub fn device_keys_prefix(user: UserId) -> Vec<u8> {
        user_prefix(b'E', user)
    }

    /// One one-time prekey of a device (`PrekeyRecord`): the device name is length-prefixed
    /// so one device's prekeys are one range, in id order.
    pub fn prekey(user: UserId, device: &str, id: u32) -> Vec<u8> {
        let mut k = prekey_prefix(user, device);
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    /// Every `prekey` key of one device starts with this.
    pub fn prekey_prefix(user: UserId, device: &str) -> Vec<u8> {
        let mut k = user_prefix(b'H', user);
        k.push(device.len() as u8);
        k.extend_from_slice(device.as_bytes());
        k
    }

    /// The version of `user`'s key directory entry (`KeysVersionRecord`).
    pub fn keys_version(user: UserId) -> Vec<u8> {
        user_prefix(b'A', user)
    }

    /// `user`'s do-not-disturb (`dnd_set`).
    pub fn dnd(user: UserId) -> Vec<u8> {
        user_prefix(b'Z', user)
    }

    /// Where `user`'s channel subscriptions are: their index entries for channels, which
    /// sort together because a channel's key encoding starts with [`CHANNEL_KIND`].
    pub fn user_channel_prefix(user: UserId) -> Vec<u8> {
        let mut k = user_conv_prefix(user);
        k.push(crate::ids::CHANNEL_KIND);
        k
    }

    pub fn media_usage(user: UserId) -> Vec<u8> {
        let mut k = head(user.slot().0, b'Q', 8);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    pub fn room(room: ConvId) -> Vec<u8> {
        let mut k = head(room.slot().0, b'W', 17);
        k.extend_from_slice(&room.to_bytes());
        k
    }

    pub fn channel_stats(conv: ConvId) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'S', 17);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    /// The conversation id at the end of a `user_conv` (or `conv_mute`) key.
    pub fn conv_of_user_conv(key: &[u8]) -> Option<ConvId> {
        ConvId::from_bytes(key.get(3 + 8..)?)
    }

    pub fn conv_meta(conv: ConvId) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'M', 17);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    pub fn group_member(conv: ConvId, user: UserId) -> Vec<u8> {
        let mut k = group_member_prefix(conv);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    pub fn group_member_prefix(conv: ConvId) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'G', 17 + 8);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    pub fn join_request(conv: ConvId, user: UserId) -> Vec<u8> {
        let mut k = join_request_prefix(conv);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    pub fn join_request_prefix(conv: ConvId) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'J', 17 + 8);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    /// A former member of a group: what they may still read (up to the entry that removed
    /// them). Replaced on a later removal, deleted when they are added again.
    pub fn group_former(conv: ConvId, user: UserId) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'L', 17 + 8);
        k.extend_from_slice(&conv.to_bytes());
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    /// The user id at the end of a `group_member` or `join_request` key.
    pub fn user_of_group_key(key: &[u8]) -> Option<UserId> {
        let tail: [u8; 8] = key.get(3 + 17..)?.try_into().ok()?;
        Some(UserId(u64::from_be_bytes(tail)))
    }

    /// A per-user key with another user after it (`F` friends, `B` blocks).
    pub fn user_pair(tag: u8, user: UserId, other: UserId) -> Vec<u8> {
        let mut k = user_prefix(tag, user);
        k.extend_from_slice(&other.0.to_be_bytes());
        k
    }

    /// All keys of `tag` for `user` start with this.
    pub fn user_prefix(tag: u8, user: UserId) -> Vec<u8> {
        let mut k = head(user.slot().0, tag, 16);
        k.extend_from_slice(&user.0.to_be_bytes());
        k
    }

    /// The other user at the end of a `user_pair` key.
    pub fn other_of_user_pair(key: &[u8]) -> Option<UserId> {
        let tail: [u8; 8] = key.get(3 + 8..)?.try_into().ok()?;
        Some(UserId(u64::from_be_bytes(tail)))
    }

    /// Both users of a `user_pair` key: (user, other).
    pub fn users_of_user_pair(key: &[u8]) -> Option<(UserId, UserId)> {
        Some((user_of(key)?, other_of_user_pair(key)?))
    }

    pub const FRIEND: u8 = b'F';
    pub const BLOCK: u8 = b'B';
    /// A block (or unblock) whose copy at the conversation's owner is not yet confirmed: an
    /// empty value beside the `BLOCK` key, deleted when the owner confirms.
    pub const BLOCK_SYNC: u8 = b'Q';

    /// The start of every `tag` key in `slot` (for scans over all of a shard's slots).
    pub fn slot_tag(slot: u16, tag: u8) -> Vec<u8> {
        head(slot, tag, 0)
    }

    /// Present while an operator has disabled the account (the value is empty).
    pub fn disabled(user: UserId) -> Vec<u8> {
        user_prefix(b'X', user)
    }

    /// The bot record of a bot account (`BotRecord`).
    pub fn bot(user: UserId) -> Vec<u8> {
        user_prefix(BOT, user)
    }

    pub const BOT: u8 = b'O';

    /// `owner` owns the bot `name` (its index of its bots, for `bots`); the value is empty.
    pub fn bot_owned(owner: UserId, name: &str) -> Vec<u8> {
        let mut k = bot_owned_prefix(owner);
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Every `bot_owned` key of `owner` starts with this.
    pub fn bot_owned_prefix(owner: UserId) -> Vec<u8> {
        user_prefix(b'Y', owner)
    }

    /// The user of a key made by `user_prefix` (or any slot, tag, user key).
    pub fn user_of(key: &[u8]) -> Option<UserId> {
        let user: [u8; 8] = key.get(3..3 + 8)?.try_into().ok()?;
        Some(UserId(u64::from_be_bytes(user)))
    }

    pub fn profile(user: UserId) -> Vec<u8> {
        user_prefix(b'P', user)
    }

    pub fn social_meta(user: UserId) -> Vec<u8> {
        user_prefix(b'V', user)
    }

    pub fn conv_blocks(conv: ConvId) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'K', 17);
        k.extend_from_slice(&conv.to_bytes());
        k
    }

    pub fn message(conv: ConvId, seq: Seq) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'R', 17 + 8);
        k.extend_from_slice(&conv.to_bytes());
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    pub fn dedup(conv: ConvId, id: &uuid::Uuid) -> Vec<u8> {
        let mut k = head(conv.slot().0, b'I', 17 + 16);
        k.extend_from_slice(&conv.to_bytes());
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// Upper bound (exclusive) for a prefix scan: the prefix followed by 0xff bytes.
    pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
        let mut k = prefix.to_vec();
        k.extend_from_slice(&[0xff; 32]);
        k
    }
}

/// Implements rkyv encode/decode for a record type. Decoding copies into an aligned buffer
/// first: RocksDB hands back plain byte vectors, and rkyv validates alignment.
/// A stored value type: what `record!` gives each of them.
pub trait Record: Sized {
    fn decode(key: &[u8], bytes: &[u8]) -> Result<Self, StorageError>;
}

/// Every record under `prefix` (at most `limit`), decoded, with its key.
pub fn scan_records<R: Record>(
    storage: &impl Storage,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, R)>, StorageError> {
    storage
        .scan(prefix, &keys::prefix_end(prefix), limit, false)?
        .into_iter()
        .map(|(k, v)| {
            let rec = R::decode(&k, &v)?;
            Ok((k, rec))
        })
        .collect()
}

macro_rules! record {
    ($ty:ident) => {
        impl Record for $ty {
            fn decode(key: &[u8], bytes: &[u8]) -> Result<$ty, StorageError> {
                $ty::decode(key, bytes)
            }
        }

        impl $ty {
            pub fn encode(&self) -> Vec<u8> {
                rkyv::to_bytes::<rkyv::rancor::Error>(self)
                    .expect("serialising a record into memory cannot fail")
                    .into_vec()
            }

            pub fn decode(key: &[u8], bytes: &[u8]) -> Result<$ty, StorageError> {
                let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
                aligned.extend_from_slice(bytes);
                rkyv::from_bytes::<$ty, rkyv::rancor::Error>(&aligned).map_err(|e| {
                    StorageError::Corrupt {
                        key: key.to_vec(),
                        reason: e.to_string(),
                    }
                })
            }
        }
    };
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub phc: String,
    pub created_ms: u64,
}
record!(UserRecord);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeviceRecord {
    /// Tokens carry this; a new login or a logout changes or removes it, revoking old tokens.
    pub nonce: u64,
    pub created_ms: u64,
}
record!(DeviceRecord);

/// A device's push token: where the operator's push gateway reaches the app when the device
/// is not connected. One per device; replaced by a new `push_register`.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PushTokenRecord {
    /// `apns`, `fcm`, `webpush` or `other`.
    pub platform: String,
    pub token: String,
    pub registered_ms: u64,
}
record!(PushTokenRecord);

/// A bot (`bot_create`): its owner, its webhook, the key that signs what is POSTed to it.
/// The account itself is an ordinary `UserRecord` without a password hash.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BotRecord {
    /// The creating user's id; 0 when the operator created it.
    pub owner: u64,
    /// Where messages to the bot are POSTed; empty: nowhere (it connects or polls).
    pub webhook: String,
    pub secret: Vec<u8>,
    pub created_ms: u64,
}
record!(BotRecord);

/// A device's public keys for end-to-end encryption (`keys_publish`): its identity key and
/// its current signed prekey, as the client encoded them (opaque to the server).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeviceKeysRecord {
    pub identity: String,
    pub signed_prekey_id: u32,
    pub signed_prekey: String,
    pub signature: String,
    pub published_ms: u64,
}
record!(DeviceKeysRecord);

/// One one-time prekey of a device, handed out once (`keys_claim`).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PrekeyRecord {
    pub key: String,
}
record!(PrekeyRecord);

/// The version of a user's key directory entry: moves whenever a device's identity key
/// appears, changes or goes (`keys_devices` answers `not_modified` at the same version).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct KeysVersionRecord {
    pub version: u64,
}
record!(KeysVersionRecord);

/// A user's do-not-disturb: no push notification until `until_ms` (messages still arrive).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DndRecord {
    pub until_ms: u64,
}
record!(DndRecord);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct UserConv {
    pub peer: u64,
    pub peer_name: String,
    pub read_seq: u64,
}
record!(UserConv);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ConvMeta {
    pub last_seq: u64,
    pub created_ms: u64,
    /// Each member's read cursor as last reported to the owner (members in id order): the
    /// source of read receipts and of `peer_read_seq` in the conversation list.
    pub read: [u64; 2],
}
record!(ConvMeta);

/// A channel's subscriber count, kept by its owner from the subscribers' home shards' reports
/// and written at most once per tick.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ChannelStats {
    pub subscribers: u64,
}
record!(ChannelStats);

/// A user's media quota use: the sizes granted by `media_upload`, less those of uploads
/// collected unfinished.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct MediaUsage {
    pub bytes: u64,
}
record!(MediaUsage);

/// A live room's settings (`room_create`, `room_update`). Its members, messages and counters
/// live in its owner's memory only.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RoomRecord {
    pub name: String,
    pub owner: u64,
    /// Users whose messages are never shed (with the owner), by id.
    pub admins: Vec<u64>,
    /// Ordinary messages delivered per second, at most.
    pub rate: u32,
    pub created_ms: u64,
}
record!(RoomRecord);

/// A group's settings. `info_version` moves on every change to these fields, `members_version`
/// on every membership or role change: clients pull with the version they hold.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GroupMeta {
    pub name: String,
    pub owner: u64,
    pub created_ms: u64,
    pub info_version: u64,
    pub members_version: u64,
    /// Joining needs an admin's approval (otherwise any user may join).
    pub approval: bool,
    /// Members added later see the history from before they joined.
    pub history_visible: bool,
    /// Only admins and the owner may send.
    pub muted_all: bool,
    pub disbanded: bool,
}
record!(GroupMeta);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GroupMember {
    pub name: String,
    pub role: Role,
    /// The seq of the system message that added this member.
    pub joined_seq: u64,
    pub muted: bool,
    /// Read cursor as last reported to the owner (for read counts).
    pub read_seq: u64,
}
record!(GroupMember);

/// What a removed member may still read: seqs in `floor + 1 ..= removed_seq`.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FormerMember {
    /// As [`GroupMember`]'s floor was: the highest seq they could not read.
    pub floor: u64,
    /// The seq of the system message that removed them.
    pub removed_seq: u64,
}
record!(FormerMember);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub ts_ms: u64,
}
record!(JoinRequest);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FriendRecord {
    /// The other user's name.
    pub name: String,
    pub state: FriendState,
    /// The request's message.
    pub message: String,
    pub ts_ms: u64,
    /// The other user's profile version as last announced to this side (friends only): a
    /// change moves this user's friend list version, so clients learn of it by pulling.
    pub profile_version: u64,
}
record!(FriendRecord);

#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct ProfileRecord {
    pub display_name: String,
    pub avatar_url: String,
    pub bio: String,
    pub version: u64,
}
record!(ProfileRecord);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BlockRecord {
    pub name: String,
    pub ts_ms: u64,
}
record!(BlockRecord);

#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct SocialMeta {
    /// Moves on every change to the friend list (requests included).
    pub friends_version: u64,
    /// Free text shown with presence.
    pub status: String,
}
record!(SocialMeta);

/// One-to-one: `blocked[i]` means member `i` (ids in order) blocks the other's sends.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct ConvBlocks {
    pub blocked: [bool; 2],
}
record!(ConvBlocks);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MessageRecord {
    pub id: [u8; 16],
    pub seq: u64,
    pub sender: u64,
    pub sender_name: String,
    pub device: String,
    pub ts_ms: u64,
    /// The raw JSON text of the body, exactly as the client sent it (`null` once recalled).
    pub body: String,
    pub kind: MessageKind,
    /// For recall and edit: the seq they target. 0 otherwise.
    pub target: u64,
    pub flags: Flags,
}
record!(MessageRecord);

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DedupRecord {
    pub seq: u64,
    pub ts_ms: u64,
}
record!(DedupRecord);

impl MessageRecord {
    pub fn to_json(&self, conv: ConvId) -> String {
        crate::protocol::message_json(
            &conv.to_string(),
            self.seq,
            &uuid::Uuid::from_bytes(self.id),
            &self.sender_name,
            &self.device,
            self.ts_ms,
            &self.body,
            (self.kind, self.target, self.flags),
        )
    }
}

/// An in-memory store for tests and the simulation. Shares its map between clones so a test
/// can keep a handle while the engine owns another. Writes arrive only through `apply`, as
/// with RocksDB.
#[derive(Clone, Default)]
pub struct MemStorage {
    map: Rc<RefCell<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemStorage {
    pub fn apply(&self, ops: &[WriteOp]) {
        let mut map = self.map.borrow_mut();
        for op in ops {
            match op {
                WriteOp::Put(k, v) => {
                    map.insert(k.clone(), v.clone());
                }
                WriteOp::Delete(k) => {
                    map.remove(k);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

impl Storage for MemStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.map.borrow().get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Rows, StorageError> {
        let map = self.map.borrow();
        let range = map.range(start.to_vec()..end.to_vec());
        let pick = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        Ok(if reverse {
            range.rev().take(limit).map(pick).collect()
        } else {
            range.take(limit).map(pick).collect()
        })
    }
}

pub mod contract {
    //! The contract every [`Storage`] keeps: half-open bounds, limits, descending scans. The
    //! in-memory store's tests and the RocksDB store's (crate `hermod-store`) both run it, so
    //! the simulation's store and the server's cannot drift apart. Panics on a breach.
    use super::*;

    /// The contract every store keeps: half-open bounds, limits, descending scans. Used by the
    /// tests of each implementation.
    pub fn check_scans(store: &dyn Storage, write: &dyn Fn(&[WriteOp])) {
        let c = ConvId::direct(UserId(1), UserId(2));
        let ops: Vec<_> = (1..=5)
            .map(|i| WriteOp::Put(keys::message(c, i), vec![i as u8]))
            .collect();
        write(&ops);
        let values = |start: u64, end: u64, limit: usize, reverse: bool| -> Vec<u8> {
            let rows = store.scan(
                &keys::message(c, start),
                &keys::message(c, end),
                limit,
                reverse,
            );
            rows.unwrap().iter().map(|(_, v)| v[0]).collect()
        };
        assert_eq!(values(2, 5, 10, false), vec![2, 3, 4]);
        assert_eq!(values(1, 5, 10, true), vec![4, 3, 2, 1]);
        assert_eq!(values(1, 5, 2, true), vec![4, 3]);
        assert_eq!(values(0, 3, 1, false), vec![1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let rec = MessageRecord {
            id: [7; 16],
            seq: 3,
            sender: 9,
            sender_name: "bob".into(),
            device: "pc".into(),
            ts_ms: 5,
            body: "\"hi\"".into(),
            kind: MessageKind::Edit,
            target: 2,
            flags: Flags::EDITED,
        };
        let bytes = rec.encode();
        assert_eq!(MessageRecord::decode(b"k", &bytes).unwrap(), rec);
        assert!(MessageRecord::decode(b"k", &bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn message_keys_sort_by_seq() {
        let c = ConvId::direct(UserId(1), UserId(2));
        assert!(keys::message(c, 255) < keys::message(c, 256));
        assert!(keys::message(c, 1).starts_with(&c.slot().0.to_be_bytes()));
    }

    #[test]
    fn mem_scan_bounds_and_reverse() {
        let s = MemStorage::default();
        contract::check_scans(&s, &|ops| s.apply(ops));
    }
}
