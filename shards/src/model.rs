//! Values that are names on the wire and one byte on disk: group roles, friend states, message
//! kinds and message flags. A leaf module: storage records hold them (as `#[repr(u8)]` enums,
//! whose rkyv archive is the same single byte the records held before they were typed, so data
//! dirs written then still load) and the protocol prints their names.

/// A group member's role. Ordered: a role may act on members strictly below it.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[repr(u8)]
pub enum Role {
    Member = 0,
    Admin = 1,
    Owner = 2,
}

impl Role {
    /// Its name in `group_members`, `group_info` and system messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }
}

/// One user's side of a relation with another (`F` records; `None` is never stored: the
/// record is deleted instead).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[repr(u8)]
pub enum FriendState {
    None = 0,
    /// This user asked the other.
    Requested = 1,
    /// The other asked this user.
    Incoming = 2,
    Friends = 3,
}

impl FriendState {
    /// Its name in `friends` replies and `friend` pushes.
    pub fn name(self) -> &'static str {
        match self {
            FriendState::None => "none",
            FriendState::Requested => "requested",
            FriendState::Incoming => "incoming",
            FriendState::Friends => "friends",
        }
    }
}

/// What a timeline entry is.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[repr(u8)]
pub enum MessageKind {
    /// A client's message.
    Message = 0,
    /// A membership or settings change, written by the owner; `body` describes it.
    System = 1,
    /// Recalls message `target`.
    Recall = 2,
    /// Replaces the body of message `target` with this entry's body.
    Edit = 3,
}

impl MessageKind {
    /// Its name in message JSON (`kind`).
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Message => "msg",
            MessageKind::System => "system",
            MessageKind::Recall => "recall",
            MessageKind::Edit => "edit",
        }
    }
}

/// What later entries did to a message: set when a recall or edit targets it.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Flags(u8);

impl Flags {
    pub const NONE: Flags = Flags(0);
    pub const RECALLED: Flags = Flags(1);
    pub const EDITED: Flags = Flags(2);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }
}

/// A user's presence as their home shard sees it: online while any device is connected and not
/// away, away while every connected device is, offline otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[repr(u8)]
pub enum Presence {
    Online = 0,
    Away = 1,
    Offline = 2,
}

impl Presence {
    /// Its name in `presence` replies and pushes.
    pub fn name(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Away => "away",
            Presence::Offline => "offline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records were written with plain `u8` fields before these types: the archives must be
    /// byte for byte the same, both ways.
    #[test]
    fn typed_fields_archive_as_the_bytes_they_replaced() {
        #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        struct Before {
            name: String,
            role: u8,
            seq: u64,
            kind: u8,
            flags: u8,
            state: u8,
        }
        #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
        struct After {
            name: String,
            role: Role,
            seq: u64,
            kind: MessageKind,
            flags: Flags,
            state: FriendState,
        }
        let before = Before {
            name: "bob".into(),
            role: 2,
            seq: 9,
            kind: 3,
            flags: 3,
            state: 2,
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&before).unwrap();
        let after = rkyv::from_bytes::<After, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(
            after,
            After {
                name: "bob".into(),
                role: Role::Owner,
                seq: 9,
                kind: MessageKind::Edit,
                flags: Flags(3),
                state: FriendState::Incoming,
            }
        );
        assert!(after.flags.contains(Flags::RECALLED) && after.flags.contains(Flags::EDITED));
        let again = rkyv::to_bytes::<rkyv::rancor::Error>(&after).unwrap();
        assert_eq!(again.as_slice(), bytes.as_slice());
        assert!(Role::Owner > Role::Admin && Role::Admin > Role::Member);
    }
}
