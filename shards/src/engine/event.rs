//! A timeline entry the owner writes itself — a system message (membership, settings), a
//! recall or an edit — as the features that cause one describe it to `append_event`. A leaf.

use crate::ids::{Seq, UserId};
use crate::mail::{Named, ReplyTo};
use crate::storage::MessageKind;

/// Builds a reply frame from the seq an event was given.
pub(super) type ReplyBuilder = Box<dyn FnOnce(Seq) -> String>;

/// A timeline entry the owner writes itself (system messages, recall and edit events) and
/// what happens once it is durable.
pub(super) struct Event {
    pub kind: MessageKind,
    pub target: Seq,
    pub actor: Named,
    pub device: String,
    pub body: String,
    /// The reply to the request that caused it: built from the event's seq.
    pub reply: Option<(ReplyTo, ReplyBuilder)>,
    /// Who receives it beyond the members (e.g. a member just removed).
    pub also: Vec<UserId>,
    /// Conversation lists to clean up once durable.
    pub unindex: Vec<UserId>,
}

/// A UUIDv7 for `now_ms` (server-made message ids).
pub(super) fn uuid_v7(now_ms: u64) -> uuid::Uuid {
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        now_ms / 1000,
        (now_ms % 1000) as u32 * 1_000_000,
    );
    uuid::Uuid::new_v7(ts)
}
