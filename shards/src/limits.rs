//! Every bound in one place. A value here is a hard limit the code relies on; the
//! configurable ones (in `engine::Config`) default to these and are checked against them.
//!
//! Policy when a bounded thing is full is stated next to its bound.

/// Fixed number of placement slots. Users and conversations hash onto slots; slots map onto
/// shards (`ids::Placement`). Storage keys carry the slot, so data can be found again after a
/// change of shard count (Hermod refuses to start on a changed count until a migration exists).
pub const SLOTS: u16 = 4096;

/// Largest number of shards one process runs.
pub const SHARDS_MAX: usize = 256;

/// Largest WebSocket message (after reassembly of fragments) the server accepts, in bytes.
/// Beyond it the connection is closed with 1009 (message too big).
pub const FRAME_BYTES_MAX: usize = 64 * 1024;

/// Default largest message `body` (its raw JSON text), in bytes. Beyond it: `body_too_large`.
pub const BODY_BYTES_MAX: usize = 16 * 1024;

/// Bytes queued for one connection's socket before the connection counts as a slow reader
/// and is closed with 4001. Nothing is lost: everything pushed is in storage and the device
/// syncs on reconnect.
pub const OUTBOX_BYTES_MAX: usize = 2 * 1024 * 1024;

/// Pushes awaiting a device ack. Beyond it the connection is closed with 4001 (slow consumer);
/// the device syncs on reconnect.
pub const UNACKED_PUSHES_MAX: usize = 4096;

/// Largest page of messages in one `sync` or `history` reply, per conversation.
pub const PAGE_MAX: usize = 500;

/// Bytes of messages in one `sync` or `history` reply (soft: a page always holds at least one
/// message per conversation, so a reply can exceed it by `SYNC_CONVS_MAX` messages).
pub const PAGE_BYTES_MAX: usize = 512 * 1024;

/// Conversations named in one `sync` request.
pub const SYNC_CONVS_MAX: usize = 32;

/// Deepest nesting of arrays and objects in a message body; deeper: `bad_request`. Bodies are
/// forwarded verbatim, and a client whose JSON parser recurses must not be crashable by a peer.
pub const BODY_DEPTH_MAX: usize = 32;

/// Upper bound of one message's client JSON beyond its body (ids, names, numbers).
pub const MESSAGE_OVERHEAD_BYTES_MAX: usize = 512;

/// Conversations listed by one `convs` request.
pub const CONV_LIST_MAX: usize = 10_000;

/// Frames a connection may send while its `register` or `login` is hashing; they are held and
/// run in order afterwards. One more closes the connection with 1008.
pub const HELD_FRAMES_MAX: usize = 64;

/// Failed logins allowed on one connection; the next failure closes it with 1008.
pub const FAILED_LOGINS_MAX: u32 = 5;

/// Default requests a connection may send per second (fixed one-second window; configurable). Beyond it the
/// request is answered `rate_limited` without being executed; ten times beyond it, closed 1008.
pub const REQUESTS_PER_SEC_MAX: u32 = 2_000;

/// Capacity of each shard→shard mail channel. Sending never blocks the reactor: when the
/// channel is full (or mail already waits behind it), the mail joins a per-peer local FIFO
/// that a pump task feeds into the channel as it drains — never dropped, never reordered. The
/// FIFOs' total depth gates admission of new client frames (`MAIL_BACKLOG_MAX`), so a full
/// channel ends as senders waiting in TCP, not as memory.
pub const MAIL_CHANNEL_CAPACITY: usize = 4096;

/// Mails waiting in a shard's per-peer overflow queues before the shard stops reading new client
/// frames until the backlog drains.
pub const MAIL_BACKLOG_MAX: usize = 16 * 1024;

/// Write operations waiting in the open batch beyond which the driver stops reading new client
/// frames until a commit takes them. Not a cap on a commit: the next commit takes the whole
/// open batch, since effects already decided commit together or not at all.
pub const COMMIT_OPS_MAX: usize = 8 * 1024;

/// Channels one user may subscribe to; beyond it `subscribe` answers `limit_reached`. Each
/// online subscriber's channels are held in memory by their home shard (loaded by one bounded
/// scan when their first device connects).
pub const CHANNEL_SUBSCRIPTIONS_MAX: usize = 1_000;

/// Bytes a connection's outbox may already hold for a best-effort push (a channel's message,
/// a live room's) to still be queued; above it the push is dropped for that connection and
/// counted (`hermod_offers_dropped_total`), and the connection stays open. Below
/// `OUTBOX_BYTES_MAX`, so best-effort traffic alone never closes a slow reader: what it
/// skipped it reads by seq.
pub const OFFER_BYTES_MAX: usize = OUTBOX_BYTES_MAX / 4;

/// Default largest medium (`media_upload`'s `size`; configurable): past it `bad_request`.
pub const MEDIA_BYTES_MAX: u64 = 100 * 1024 * 1024;

/// Default media quota per user (configurable): the sizes of their uploads, finished or
/// under way; past it `media_upload` answers `limit_reached`.
pub const MEDIA_QUOTA_BYTES: u64 = 1024 * 1024 * 1024;

/// Live rooms (`engine/rooms.rs`): messages kept for `room_join`'s recent window.
pub const ROOM_RECENT_MAX: usize = 50;

/// A live room's default and largest rate of ordinary messages per second (`room_create`'s
/// `rate`); past the rate ordinary messages are shed (`shed`). Admins' messages are not
/// counted against it.
pub const ROOM_RATE_DEFAULT: u32 = 20;
pub const ROOM_RATE_MAX: u32 = 1_000;

/// Admins of one live room (besides its owner).
pub const ROOM_ADMINS_MAX: usize = 100;

/// Live rooms one connection may be in at once; past it `room_join` answers `limit_reached`.
pub const ROOM_JOINS_MAX: usize = 16;

/// Default largest group (configurable up to `GROUP_MEMBERS_LIMIT`). Beyond it: `group_full`.
pub const GROUP_MEMBERS_MAX: usize = 10_000;

/// Hard ceiling on the configurable group size: the owner keeps every member of a loaded group
/// in memory, and one fan-out carries every member id once.
pub const GROUP_MEMBERS_LIMIT: usize = 100_000;

/// Users named in one `group_create` or `group_invite`.
pub const GROUP_INVITE_MAX: usize = 1_000;

pub const GROUP_NAME_BYTES_MAX: usize = 64;

/// Default window in which a sender may recall or edit their message (configurable).
pub const EDIT_WINDOW_MS: u64 = 15 * 60 * 1000;

/// Typing notices a connection may send per conversation-agnostic interval: one per this many
/// ms; more are answered `rate_limited` (they are ephemeral, dropping them loses nothing).
pub const TYPING_INTERVAL_MS: u64 = 1_000;

/// Friends (and pending requests) per user; beyond it: `bad_request` on new requests. Bounds
/// the presence fan-out of one user and the `friends` reply.
pub const FRIENDS_MAX: usize = 5_000;

/// The presence flush window: dirty presence (and senders' cursors) go out at most once per
/// window, so a user's changes coalesce into at most one push per window, and it is also the
/// worst delay before friends see one.
pub const PRESENCE_TICK_MS: u64 = 250;

/// In a cluster of several nodes, the longest a request waits on answers from other shards
/// (`convs`, `sync`, `history`, `presence` gathers; a group addition's indexing) before it
/// fails with `unavailable` (or lists the users not indexed as `failed`): mail taken by a node
/// that then died is never answered, and links only hand back mail never acked.
pub const CROSS_NODE_WAIT_MS: u64 = 10_000;

/// Users named in one `presence` pull.
pub const PRESENCE_PULL_MAX: usize = 500;

/// Status text and friend request message, in bytes.
pub const STATUS_BYTES_MAX: usize = 140;

/// Profile fields, in bytes.
pub const DISPLAY_NAME_BYTES_MAX: usize = 64;
pub const AVATAR_URL_BYTES_MAX: usize = 512;
pub const BIO_BYTES_MAX: usize = 1_024;
/// A device's push token (`push_register`): APNs tokens are 32 bytes (64 hex), FCM
/// registration tokens ~160–250 characters, a Web Push subscription (JSON with its endpoint
/// and keys) up to ~1 KB; 4 KiB leaves room for all three and refuses abuse.
pub const PUSH_TOKEN_BYTES_MAX: usize = 4_096;
/// How far ahead `dnd_set` may reach: a year (a longer silence is muting, not a pause).
pub const DND_MS_MAX: u64 = 366 * 24 * 3600 * 1000;
/// A bot token's lifetime: bots renew by rotation (`bot_token`), not by expiry.
pub const BOT_TOKEN_TTL_S: u64 = 10 * 366 * 24 * 3600;
/// A public key, signature or prekey as a client encodes it (base64 of a P-256 point is 88
/// characters; room for larger post-quantum keys later).
pub const KEY_TEXT_BYTES_MAX: usize = 2_048;
/// One-time prekeys stored per device; a publish that would pass it is refused.
pub const PREKEYS_PER_DEVICE_MAX: usize = 200;
/// One-time prekeys per `keys_publish`.
pub const PREKEYS_PER_PUBLISH_MAX: usize = 100;
/// Bots' HTTP requests in flight per shard (those it took, and those it relays as a bot's
/// home); beyond: `overloaded` (503).
pub const BOT_CALLS_IN_FLIGHT_MAX: usize = 4_096;
/// How long a bot's HTTP request may wait for its answer in the engine (the driver's own wait
/// is the same): then `unavailable`, and the relay is forgotten.
pub const BOT_CALL_WAIT_MS: u64 = 30_000;
/// Bots `bots` lists (the first, by name).
pub const BOTS_LISTED_MAX: usize = 1_000;
/// Longest bot webhook URL.
pub const WEBHOOK_URL_BYTES_MAX: usize = 2_048;
/// Conversations an offline notification names (`convs`); messages of further ones in the
/// same window still count in its `count`.
pub const NOTIFY_CONVS_MAX: usize = 16;

/// Usernames: length bounds, in bytes (ASCII only).
pub const USERNAME_BYTES_MIN: usize = 3;
pub const USERNAME_BYTES_MAX: usize = 32;
pub const PASSWORD_BYTES_MIN: usize = 8;
pub const PASSWORD_BYTES_MAX: usize = 256;
pub const DEVICE_BYTES_MAX: usize = 64;

/// Accounts created by one admin `POST /admin/users`. Each costs a password hash on its home
/// shard (at most two at a time per shard), so this bounds how long one request holds them.
pub const ADMIN_CREATE_MAX: usize = 1_000;

/// Largest admin request body, in bytes (a full bulk creation with long passwords fits).
pub const ADMIN_BODY_BYTES_MAX: usize = 512 * 1024;

/// Admin requests in flight on one shard; beyond it the request gets 503 at once.
pub const ADMIN_REQUESTS_MAX: usize = 16;

const _: () = assert!(
    ADMIN_CREATE_MAX * (USERNAME_BYTES_MAX + PASSWORD_BYTES_MAX + 40) < ADMIN_BODY_BYTES_MAX,
    "a full bulk creation fits in one admin body"
);
const _: () = assert!(
    SLOTS as usize >= SHARDS_MAX,
    "every shard needs at least one slot"
);
const _: () = assert!(
    BODY_BYTES_MAX < FRAME_BYTES_MAX,
    "a body must fit in a frame"
);
const _: () = assert!(
    OUTBOX_BYTES_MAX >= 4 * FRAME_BYTES_MAX,
    "an outbox holds several frames"
);
const _: () = assert!(MAIL_BACKLOG_MAX >= MAIL_CHANNEL_CAPACITY);
const _: () = assert!(
    OFFER_BYTES_MAX + FRAME_BYTES_MAX < OUTBOX_BYTES_MAX,
    "best-effort pushes leave room for replies and acked pushes"
);
const _: () = assert!(CHANNEL_SUBSCRIPTIONS_MAX < CONV_LIST_MAX);
const _: () = assert!(GROUP_MEMBERS_MAX <= GROUP_MEMBERS_LIMIT);
const _: () = assert!(
    GROUP_INVITE_MAX * (USERNAME_BYTES_MAX + 3) < FRAME_BYTES_MAX,
    "a full invite fits in one frame"
);
const _: () = assert!(
    PAGE_MAX * 100 < OUTBOX_BYTES_MAX * 4,
    "a page of small messages fits"
);
