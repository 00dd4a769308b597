//! Every client request: its name on the wire, its fields, and the one typed [`Request`] the
//! engine dispatches on (`engine/ops/mod.rs`).
//!
//! Parsing is two-step on purpose: first the envelope ([`Head`]: `op`, `rid`), then the op's own
//! struct from the same text. serde's internally tagged enums buffer every field and cannot hold
//! a borrowed [`RawValue`], which is how a message `body` passes through without being parsed
//! into a tree. Unknown fields are ignored, so clients may add fields without breaking.
//!
//! Adding an op: one line in [`requests!`] below (its name and field struct), one arm in the
//! engine's dispatch, its handler, its section in `docs/protocol.md` and a test.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The envelope common to all requests.
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(default)]
    pub rid: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct Register {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
pub struct Login {
    pub username: String,
    pub password: String,
    pub device: String,
}

#[derive(Debug, Deserialize)]
pub struct Resume {
    pub token: String,
}

#[derive(Debug, Deserialize)]
pub struct Open {
    pub user: String,
}

#[derive(Debug, Deserialize)]
pub struct Send<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub id: Option<uuid::Uuid>,
    #[serde(borrow)]
    pub body: &'a RawValue,
}

#[derive(Debug, Deserialize)]
pub struct Ack<'a> {
    /// Per conversation, the highest seq acked: every push of it up to there.
    #[serde(borrow)]
    pub seqs: BTreeMap<Cow<'a, str>, u64>,
}

#[derive(Debug, Deserialize)]
pub struct Read<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    pub seq: u64,
}

#[derive(Debug, Deserialize)]
pub struct SyncConv<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub after: u64,
}

#[derive(Debug, Deserialize)]
pub struct Sync<'a> {
    #[serde(borrow)]
    pub convs: Vec<SyncConv<'a>>,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct History<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub before: Option<u64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `group_create`: a name and the initial members (usernames; the creator is added).
#[derive(Debug, Deserialize)]
pub struct GroupCreate {
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub approval: bool,
    #[serde(default)]
    pub history_visible: bool,
}

/// `channel_create`: a name and the first publishers besides the creator (usernames).
#[derive(Debug, Deserialize)]
pub struct ChannelCreate {
    pub name: String,
    #[serde(default)]
    pub publishers: Vec<String>,
}

/// `media_upload`: what the client is about to upload (docs/media.md).
#[derive(Debug, Deserialize)]
pub struct MediaUpload {
    pub size: u64,
    #[serde(rename = "type")]
    pub mime: String,
    /// Lower-case hex, 64 digits.
    pub sha256: String,
}

/// `media_delete`: the medium (its id, 32 hex digits) the uploader wants gone.
#[derive(Debug, Deserialize)]
pub struct MediaDelete {
    pub media: String,
}

/// `room_create`: a live room's name, its rate of ordinary messages per second, its admins.
#[derive(Debug, Deserialize)]
pub struct RoomCreate {
    pub name: String,
    #[serde(default)]
    pub rate: Option<u32>,
    #[serde(default)]
    pub admins: Vec<String>,
}

/// `room_update`: what to change (the owner's).
#[derive(Debug, Deserialize)]
pub struct RoomUpdate<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub rate: Option<u32>,
    #[serde(default)]
    pub admins: Option<Vec<String>>,
}

/// Ops on one conversation that name nothing else (`group_join`, `group_leave`,
/// `group_disband`, `typing`).
#[derive(Debug, Deserialize)]
pub struct ConvOnly<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
}

/// `group_invite`: usernames to add (or, for a plain member of an approval group, to propose).
#[derive(Debug, Deserialize)]
pub struct GroupUsers<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    pub users: Vec<String>,
}

/// Ops naming one member: `group_kick`, `group_approve`, `group_decline`, `group_transfer`,
/// `group_role` (with `role`), `group_mute` (with `muted`; no `user`: the whole group).
#[derive(Debug, Deserialize)]
pub struct GroupUser<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub muted: Option<bool>,
}

/// `group_update`: settings to change; absent fields stay.
#[derive(Debug, Deserialize)]
pub struct GroupUpdate<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub approval: Option<bool>,
    #[serde(default)]
    pub history_visible: Option<bool>,
}

/// `group_info`, `group_members`: `version` is the one the client holds.
#[derive(Debug, Deserialize)]
pub struct Versioned<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    #[serde(default)]
    pub version: Option<u64>,
}

/// `recall` (no body) and `edit` (new body) of message `seq`.
#[derive(Debug, Deserialize)]
pub struct Amend<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    pub seq: u64,
    #[serde(borrow, default)]
    pub body: Option<&'a RawValue>,
}

/// `receipts`: how many members have read up to `seq`.
#[derive(Debug, Deserialize)]
pub struct Receipts<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    pub seq: u64,
}

/// Ops naming one user: `friend_request` (with `message`), `friend_accept`, `friend_decline`,
/// `friend_cancel`, `friend_remove`, `block`, `unblock`.
#[derive(Debug, Deserialize)]
pub struct UserArg {
    pub user: String,
    #[serde(default)]
    pub message: Option<String>,
}

/// `friends`: the version the client holds.
#[derive(Debug, Deserialize)]
pub struct VersionOnly {
    #[serde(default)]
    pub version: Option<u64>,
}

/// `presence`: users to look up.
#[derive(Debug, Deserialize)]
pub struct Users {
    pub users: Vec<String>,
}

/// `presence_set`: this device's state and the user's status text.
#[derive(Debug, Deserialize)]
pub struct PresenceSet {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

/// `conv_mute`: stop (or resume) notifications of one conversation for this user.
#[derive(Debug, Deserialize)]
pub struct ConvMute<'a> {
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    pub muted: bool,
}

/// `dnd_set`: no notifications until `until` (ms since the epoch); `null` turns it off.
/// `until` must be present: a frame without it is a mistake, not a request to turn it off.
#[derive(Debug, Deserialize)]
pub struct DndSet {
    #[serde(default, deserialize_with = "present")]
    pub until: Option<Option<u64>>,
}

/// A field that may be `null` but must be there: absent reads as `None`, `null` as
/// `Some(None)`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `bot_create`: a bot owned by the caller, with an optional webhook for its messages.
#[derive(Debug, Deserialize)]
pub struct BotCreate {
    pub name: String,
    #[serde(default)]
    pub webhook: Option<String>,
}

/// `bot_token`, `bot_revoke`: one of the caller's bots.
#[derive(Debug, Deserialize)]
pub struct BotArg {
    pub bot: String,
}

/// `bot_webhook`: where the bot's messages go; `null` turns the webhook off. Required.
#[derive(Debug, Deserialize)]
pub struct BotWebhook {
    pub bot: String,
    #[serde(default, deserialize_with = "present")]
    pub webhook: Option<Option<String>>,
}

/// `keys_publish`: this device's identity key, its signed prekey, and one-time prekeys to
/// add. Keys are the client's own encoding (base64 of the raw public key, say).
#[derive(Debug, Deserialize)]
pub struct KeysPublish {
    pub identity: String,
    pub signed_prekey: SignedPrekey,
    #[serde(default)]
    pub prekeys: Vec<Prekey>,
}

#[derive(Debug, Deserialize)]
pub struct SignedPrekey {
    pub id: u32,
    pub key: String,
    pub signature: String,
}

#[derive(Debug, Deserialize)]
pub struct Prekey {
    pub id: u32,
    pub key: String,
}

/// `keys_devices`, `keys_claim`: one user's devices' keys; `version` (devices only) answers
/// `not_modified` when current.
#[derive(Debug, Deserialize)]
pub struct KeysUser {
    pub user: String,
    #[serde(default)]
    pub version: Option<u64>,
    /// `keys_claim` only: claim for these devices (default: all of them).
    #[serde(default)]
    pub devices: Option<Vec<String>>,
}

/// `push_register`: this device's push token.
#[derive(Debug, Deserialize)]
pub struct PushRegister {
    pub platform: String,
    pub token: String,
}

/// `profile_set`: fields to change; absent ones stay.
#[derive(Debug, Deserialize)]
pub struct ProfileSet {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
    #[serde(default)]
    pub bio: Option<String>,
}

/// `profile`: whose, and the version the client holds.
#[derive(Debug, Deserialize)]
pub struct ProfileGet {
    pub user: String,
    #[serde(default)]
    pub version: Option<u64>,
}

/// `device_logout`: another device of the same user.
#[derive(Debug, Deserialize)]
pub struct DeviceArg {
    pub device: String,
}

/// Declares [`Op`] (every op by name, fieldless: what an envelope names before its fields are
/// read) and [`Request`] (the op with its fields), from one list: name on the wire, variant,
/// and the field struct, if the op has fields.
macro_rules! requests {
    ($( $(#[$doc:meta])* $name:literal => $variant:ident $(($fields:ty))?, )*) => {
        /// An op, by name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Op {
            $( $(#[$doc])* $variant, )*
        }

        impl Op {
            /// Every op, in the order of `docs/protocol.md`'s index.
            pub const ALL: &'static [Op] = &[$(Op::$variant,)*];

            /// The op named `name` on the wire.
            pub fn from_name(name: &str) -> Option<Op> {
                match name {
                    $( $name => Some(Op::$variant), )*
                    _ => None,
                }
            }

            /// Its name on the wire.
            pub fn name(self) -> &'static str {
                match self {
                    $( Op::$variant => $name, )*
                }
            }
        }

        /// A request with its fields, borrowed from the frame's text where they can be.
        #[derive(Debug)]
        pub enum Request<'a> {
            $( $(#[$doc])* $variant $(($fields))?, )*
        }

        impl<'a> Request<'a> {
            /// Reads `op`'s fields from the frame `text` (whose envelope named `op`). The error
            /// is serde's message, for a `bad_request` reply.
            pub fn parse(op: Op, text: &'a str) -> Result<Request<'a>, String> {
                Ok(match op {
                    $( Op::$variant => Request::$variant $( (fields::<$fields>(text)?) )?, )*
                })
            }
        }
    };
}

fn fields<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

requests! {
    /// A liveness check; the reply carries the server's clock.
    "ping" => Ping,
    "register" => Register(Register),
    "login" => Login(Login),
    "resume" => Resume(Resume),
    /// Forget this device (its token stops working) and close.
    "logout" => Logout,
    /// The one notification: no `rid`, no reply.
    "ack" => Ack(Ack<'a>),
    "open" => Open(Open),
    "send" => Send(Send<'a>),
    "convs" => Convs,
    "read" => Read(Read<'a>),
    "sync" => Sync(Sync<'a>),
    "history" => History(History<'a>),
    "recall" => Recall(Amend<'a>),
    "edit" => Edit(Amend<'a>),
    "receipts" => Receipts(Receipts<'a>),
    "typing" => Typing(ConvOnly<'a>),
    "group_create" => GroupCreate(GroupCreate),
    "group_invite" => GroupInvite(GroupUsers<'a>),
    "group_join" => GroupJoin(ConvOnly<'a>),
    "group_approve" => GroupApprove(GroupUser<'a>),
    "group_decline" => GroupDecline(GroupUser<'a>),
    "group_leave" => GroupLeave(ConvOnly<'a>),
    "group_kick" => GroupKick(GroupUser<'a>),
    "group_role" => GroupRole(GroupUser<'a>),
    "group_transfer" => GroupTransfer(GroupUser<'a>),
    "group_mute" => GroupMute(GroupUser<'a>),
    "group_update" => GroupUpdate(GroupUpdate<'a>),
    "group_disband" => GroupDisband(ConvOnly<'a>),
    "group_info" => GroupInfo(Versioned<'a>),
    "group_members" => GroupMembers(Versioned<'a>),
    "channel_create" => ChannelCreate(ChannelCreate),
    "subscribe" => Subscribe(ConvOnly<'a>),
    "unsubscribe" => Unsubscribe(ConvOnly<'a>),
    "media_upload" => MediaUpload(MediaUpload),
    "media_delete" => MediaDelete(MediaDelete),
    "room_create" => RoomCreate(RoomCreate),
    "room_update" => RoomUpdate(RoomUpdate<'a>),
    "room_join" => RoomJoin(ConvOnly<'a>),
    "room_leave" => RoomLeave(ConvOnly<'a>),
    "friend_request" => FriendRequest(UserArg),
    "friend_accept" => FriendAccept(UserArg),
    "friend_decline" => FriendDecline(UserArg),
    "friend_cancel" => FriendCancel(UserArg),
    "friend_remove" => FriendRemove(UserArg),
    "friends" => Friends(VersionOnly),
    "block" => Block(UserArg),
    "unblock" => Unblock(UserArg),
    "blocks" => Blocks,
    "presence" => Presence(Users),
    "presence_set" => PresenceSet(PresenceSet),
    "profile" => Profile(ProfileGet),
    "profile_set" => ProfileSet(ProfileSet),
    "devices" => Devices,
    "device_logout" => DeviceLogout(DeviceArg),
    "push_register" => PushRegister(PushRegister),
    "push_unregister" => PushUnregister,
    "conv_mute" => ConvMute(ConvMute<'a>),
    "dnd_set" => DndSet(DndSet),
    "bot_create" => BotCreate(BotCreate),
    "bot_token" => BotToken(BotArg),
    "bot_revoke" => BotRevoke(BotArg),
    "bot_webhook" => BotWebhook(BotWebhook),
    /// The caller's bots.
    "bots" => Bots,
    "keys_publish" => KeysPublish(KeysPublish),
    /// How many one-time prekeys this device has left.
    "keys_count" => KeysCount,
    "keys_devices" => KeysDevices(KeysUser),
    "keys_claim" => KeysClaim(KeysUser),
}

impl Op {
    /// Ops a connection may send before it is logged in; every other op answers
    /// `not_authenticated` there (before its fields are read).
    pub fn is_anonymous(self) -> bool {
        matches!(self, Op::Ping | Op::Register | Op::Login | Op::Resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for &op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
        }
        let names: std::collections::HashSet<_> = Op::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), Op::ALL.len());
        assert_eq!(Op::from_name("Send"), None, "names are case-sensitive");
    }

    /// The docs are the contract: every op the server parses is documented, by name in
    /// backquotes or in an example frame.
    #[test]
    fn every_op_is_in_the_protocol_document() {
        let doc = include_str!("../../../docs/protocol.md");
        for &op in Op::ALL {
            let name = op.name();
            assert!(
                doc.contains(&format!("`{name}`")) || doc.contains(&format!("\"op\": \"{name}\"")),
                "{name} is not in docs/protocol.md"
            );
        }
    }

    #[test]
    fn fields_parse_into_their_variant() {
        let text = r#"{"op":"send","rid":1,"conv":"d.1.2","body":{"t":"hi"}}"#;
        match Request::parse(Op::Send, text) {
            Ok(Request::Send(s)) => {
                assert_eq!(s.conv, "d.1.2");
                assert_eq!(s.body.get(), r#"{"t":"hi"}"#, "the body stays raw");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Request::parse(Op::Convs, "{}"),
            Ok(Request::Convs)
        ));
        assert!(
            Request::parse(Op::Read, r#"{"conv":"d.1.2"}"#).is_err(),
            "seq is required"
        );
    }
}
