//! The client protocol, version 1: JSON text frames over WebSocket. `docs/protocol.md` is the
//! reference with an example of every frame; this module is its implementation.
//!
//! - Requests: `{"op": "...", "rid": <u64>, ...fields}`. Every request with a `rid` gets exactly
//!   one reply, `{"rid": N, "ok": {...}}` or `{"rid": N, "error": {"code", "message"}}`.
//!   `ack` is the one notification: it carries no `rid` and gets no reply.
//! - Pushes: `{"push": "<kind>", ...}`; never carry `rid`.
//!
//! Requests are parsed once, into a [`Request`] (see `request.rs`); this file holds the frames
//! the server writes: replies, pushes, error codes, close codes.

use std::fmt::Write as _;

use serde::Serialize;

use crate::model::{Flags, MessageKind};

pub const PROTOCOL_VERSION: u32 = 1;

mod request;

pub use request::*;

/// Stable, machine-readable error codes. The string forms are part of the protocol: never
/// rename one, only add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnknownOp,
    BodyTooLarge,
    RateLimited,
    NotAuthenticated,
    AlreadyAuthenticated,
    InvalidUsername,
    WeakPassword,
    UsernameTaken,
    BadCredentials,
    TooManyAttempts,
    BadToken,
    TokenExpired,
    DeviceRevoked,
    NoSuchUser,
    NoSuchConversation,
    NotMember,
    /// The requester's role does not allow this.
    Forbidden,
    /// The sender (or the whole group) is muted.
    Muted,
    GroupFull,
    GroupDisbanded,
    AlreadyMember,
    /// The owner must hand over ownership before leaving.
    OwnerCannotLeave,
    NoSuchMessage,
    /// The recall or edit window of this message has passed.
    WindowPassed,
    /// The recipient blocks the sender (one-to-one sends, friend requests).
    Blocked,
    /// No such friend request (or friendship) to act on.
    NoSuchRequest,
    NoSuchDevice,
    Overloaded,
    Internal,
    /// An operator disabled this account (admin API): no login, no resume.
    AccountDisabled,
    /// The node holding what the request needs cannot be reached (cluster): retry later; a
    /// `send` retried with the same `id` is applied at most once.
    Unavailable,
    /// The user lives on another node of the cluster: connect to the URL in the error's `url`.
    Moved,
    /// A per-user bound was reached (channel subscriptions, live rooms per connection).
    LimitReached,
    /// A live room shed the message under load: it was not delivered.
    Shed,
}

impl ErrorCode {
    /// Every code, in declaration order (`code as usize` indexes it).
    pub const ALL: [ErrorCode; 36] = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::BodyTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotAuthenticated,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::InvalidUsername,
        ErrorCode::WeakPassword,
        ErrorCode::UsernameTaken,
        ErrorCode::BadCredentials,
        ErrorCode::TooManyAttempts,
        ErrorCode::BadToken,
        ErrorCode::TokenExpired,
        ErrorCode::DeviceRevoked,
        ErrorCode::NoSuchUser,
        ErrorCode::NoSuchConversation,
        ErrorCode::NotMember,
        ErrorCode::Forbidden,
        ErrorCode::Muted,
        ErrorCode::GroupFull,
        ErrorCode::GroupDisbanded,
        ErrorCode::AlreadyMember,
        ErrorCode::OwnerCannotLeave,
        ErrorCode::NoSuchMessage,
        ErrorCode::WindowPassed,
        ErrorCode::Blocked,
        ErrorCode::NoSuchRequest,
        ErrorCode::NoSuchDevice,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
        ErrorCode::AccountDisabled,
        ErrorCode::Unavailable,
        ErrorCode::Moved,
        ErrorCode::LimitReached,
        ErrorCode::Shed,
    ];

    /// The code whose string form is `text`.
    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::InvalidUsername => "invalid_username",
            ErrorCode::WeakPassword => "weak_password",
            ErrorCode::UsernameTaken => "username_taken",
            ErrorCode::BadCredentials => "bad_credentials",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::DeviceRevoked => "device_revoked",
            ErrorCode::NoSuchUser => "no_such_user",
            ErrorCode::NoSuchConversation => "no_such_conversation",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Muted => "muted",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::GroupDisbanded => "group_disbanded",
            ErrorCode::AlreadyMember => "already_member",
            ErrorCode::OwnerCannotLeave => "owner_cannot_leave",
            ErrorCode::NoSuchMessage => "no_such_message",
            ErrorCode::WindowPassed => "window_passed",
            ErrorCode::Blocked => "blocked",
            ErrorCode::NoSuchRequest => "no_such_request",
            ErrorCode::NoSuchDevice => "no_such_device",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
            ErrorCode::AccountDisabled => "account_disabled",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Moved => "moved",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::Shed => "shed",
        }
    }
}

/// WebSocket close codes the server uses (RFC 6455 §7.4 plus the 4000–4999 private range).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// No frame from the client within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// The client did not read or ack fast enough; bounded queues filled.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// Another login took this device name, or the device was logged out.
    pub const SESSION_REPLACED: u16 = 4002;
    /// An operator kicked this device or disabled the account (admin API).
    pub const KICKED: u16 = 4003;

    /// Reason texts of closes that share a code, so `/metrics` can tell them apart by reason.
    pub mod reason {
        pub const REQUEST_FLOOD: &str = "request flood";
        pub const FAILED_LOGINS: &str = "too many failed logins";
        pub const AUTH_BACKLOG: &str = "too many frames during authentication";
        pub const OUTBOX_FULL: &str = "outbox full";
        pub const UNACKED_PUSHES: &str = "too many unacknowledged pushes";
    }
}

#[derive(Serialize)]
struct OkReply<'a, T: Serialize> {
    rid: u64,
    ok: &'a T,
}

#[derive(Serialize)]
struct ErrReply<'a> {
    rid: Option<u64>,
    error: ErrBody<'a>,
}

#[derive(Serialize)]
struct ErrBody<'a> {
    code: &'static str,
    message: &'a str,
}

/// Checks a message body (raw JSON, already known to be valid) against the limits: at most
/// `bytes_max` bytes (`body_too_large`) and `BODY_DEPTH_MAX` levels of arrays and objects
/// (`bad_request`). Bodies are forwarded byte for byte, so the depth bound protects clients
/// whose JSON parser recurses, not the server (it never parses a body).
pub fn check_body(raw: &str, bytes_max: usize) -> Result<(), (ErrorCode, String)> {
    if raw.len() > bytes_max {
        return Err((
            ErrorCode::BodyTooLarge,
            format!("body is over {bytes_max} bytes"),
        ));
    }
    if json_depth(raw) > crate::limits::BODY_DEPTH_MAX {
        return Err((
            ErrorCode::BadRequest,
            format!(
                "body is nested deeper than {} levels",
                crate::limits::BODY_DEPTH_MAX
            ),
        ));
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in valid JSON text (a scalar: 0).
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

pub fn ok_frame<T: Serialize>(rid: u64, value: &T) -> String {
    serde_json::to_string(&OkReply { rid, ok: value }).expect("reply types serialise infallibly")
}

pub fn error_frame(rid: Option<u64>, code: ErrorCode, message: &str) -> String {
    serde_json::to_string(&ErrReply {
        rid,
        error: ErrBody {
            code: code.as_str(),
            message,
        },
    })
    .expect("error replies serialise infallibly")
}

/// `moved`: the user lives on another node, whose client URL is `url`.
pub fn moved_frame(rid: u64, url: &str) -> String {
    serde_json::json!({
        "rid": rid,
        "error": {
            "code": ErrorCode::Moved.as_str(),
            "message": "this user lives on another node: connect there",
            "url": url,
        }
    })
    .to_string()
}

/// Appends a JSON string literal (quoted, escaped) to `out`.
pub fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping is the reference; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).expect("strings serialise infallibly"));
}

/// The JSON of one message as clients see it (in pushes, sync and history). Assembled by hand
/// because `body` is raw JSON text that must be copied verbatim, and this runs once per stored
/// message read or appended. `(kind, target, flags)` are the record's; a plain message
/// (0, 0, 0) carries none of those fields, so the common frame stays small.
#[allow(clippy::too_many_arguments)]
pub fn message_json(
    conv: &str,
    seq: u64,
    id: &uuid::Uuid,
    from: &str,
    device: &str,
    ts_ms: u64,
    body: &str,
    (kind, target, flags): (MessageKind, u64, Flags),
) -> String {
    let mut out = String::with_capacity(body.len() + conv.len() + from.len() + device.len() + 96);
    out.push_str("{\"conv\":\"");
    out.push_str(conv);
    let _ = write!(out, "\",\"seq\":{seq},\"id\":\"{id}\",\"from\":");
    push_json_str(&mut out, from);
    out.push_str(",\"dev\":");
    push_json_str(&mut out, device);
    let _ = write!(out, ",\"ts\":{ts_ms},");
    if kind != MessageKind::Message {
        let _ = write!(out, "\"kind\":\"{}\",", kind.name());
    }
    if target != 0 {
        let _ = write!(out, "\"target\":{target},");
    }
    if flags.contains(Flags::RECALLED) {
        out.push_str("\"recalled\":true,");
    }
    if flags.contains(Flags::EDITED) {
        out.push_str("\"edited\":true,");
    }
    out.push_str("\"body\":");
    out.push_str(body);
    out.push('}');
    out
}

/// An ephemeral push (typing, read receipt): never stored, never acked or retried.
pub fn event_push(kind: &str, conv: &str, user: &str, seq: Option<u64>) -> String {
    let mut out = String::with_capacity(64 + conv.len() + user.len());
    let _ = write!(out, "{{\"push\":\"{kind}\",\"conv\":\"{conv}\",\"user\":");
    push_json_str(&mut out, user);
    if let Some(seq) = seq {
        let _ = write!(out, ",\"seq\":{seq}");
    }
    out.push('}');
    out
}

/// The push of one message, the same frame for every device it goes to: a device acks it by
/// its conversation and seq (inside `message_json`), so nothing in it is per device.
pub fn message_push(message_json: &str) -> String {
    const HEAD: &str = "{\"push\":\"msg\",\"msg\":";
    let mut out = String::with_capacity(HEAD.len() + message_json.len() + 1);
    out.push_str(HEAD);
    out.push_str(message_json);
    out.push('}');
    out
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    #[test]
    fn depth_counts_containers_not_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth(r#""[[[{""#), 0);
        assert_eq!(json_depth(r#"{"a":[1,{"b":"]]\"[["}]}"#), 3);
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        assert_eq!(
            check_body(&deep, 1 << 20).unwrap_err().0,
            ErrorCode::BadRequest
        );
        let ok = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(check_body(&ok, 1 << 20).is_ok());
        assert_eq!(
            check_body("\"xx\"", 3).unwrap_err().0,
            ErrorCode::BodyTooLarge
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_json_is_valid_json_with_raw_body() {
        let id = uuid::Uuid::now_v7();
        let text = message_json(
            "d.1.2",
            7,
            &id,
            "al\"ice",
            "pc",
            99,
            r#"{"t":"hi\n","n":[1,2]}"#,
            (MessageKind::Message, 0, Flags::NONE),
        );
        assert!(!text.contains("kind"), "plain messages carry no kind");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["from"], "al\"ice");
        assert_eq!(v["body"]["n"][1], 2);
        assert_eq!(v["id"], id.to_string());
        let push: serde_json::Value = serde_json::from_str(&message_push(&text)).unwrap();
        assert_eq!(push["push"], "msg");
        assert!(push.get("pid").is_none(), "one frame for every device");
        assert_eq!(push["msg"]["conv"], "d.1.2");
        let edit = message_json(
            "g.1",
            9,
            &id,
            "bob",
            "pc",
            1,
            "\"new\"",
            (MessageKind::Edit, 7, Flags::NONE),
        );
        let v: serde_json::Value = serde_json::from_str(&edit).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["target"].as_u64()),
            (Some("edit"), Some(7))
        );
        let recalled = message_json(
            "g.1",
            7,
            &id,
            "bob",
            "pc",
            1,
            "null",
            (MessageKind::Message, 0, Flags::RECALLED),
        );
        let v: serde_json::Value = serde_json::from_str(&recalled).unwrap();
        assert_eq!(
            (v["recalled"].as_bool(), v["body"].is_null()),
            (Some(true), true)
        );
        let typing: serde_json::Value =
            serde_json::from_str(&event_push("typing", "g.1", "a\"b", None)).unwrap();
        assert_eq!(typing["user"], "a\"b");
    }

    #[test]
    fn error_codes_index_and_name_uniquely() {
        let mut names = std::collections::HashSet::new();
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "ALL is in declaration order");
            assert!(names.insert(code.as_str()), "{} twice", code.as_str());
        }
    }

    #[test]
    fn send_keeps_body_raw() {
        let text = r#"{"op":"send","rid":4,"conv":"d.1.2","body":{ "a" : 1 },"extra":true}"#;
        let head: Head = serde_json::from_str(text).unwrap();
        assert_eq!((head.op.as_ref(), head.rid), ("send", Some(4)));
        let send: Send = serde_json::from_str(text).unwrap();
        assert_eq!(send.body.get(), r#"{ "a" : 1 }"#);
    }
}
