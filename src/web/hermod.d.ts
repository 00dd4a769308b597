// Types of hermod.js, the client library of Hermod (docs/client.md, docs/protocol.md).

/** A message as the server sends it (protocol.md, "Message object"). */
export interface Message {
  conv: string;
  seq: number;
  /** The sender's UUID (client-chosen; dedups retries). */
  id: string;
  from: string;
  dev: string;
  /** Server time of the append, ms since the epoch. */
  ts: number;
  /** Absent for an ordinary message. */
  kind?: "system" | "edit" | "recall";
  /** For edits and recalls: the seq they change. */
  target?: number;
  recalled?: boolean;
  edited?: boolean;
  /** Decrypted here (end-to-end encrypted on the wire and on the server). */
  e2e?: boolean;
  /** An encrypted message this device cannot read, and why. */
  e2e_error?: string;
  /** Decrypted, and the sending device's key is the one the directory lists (false: flag it). */
  e2e_verified?: boolean;
  /** Opaque JSON (null once recalled). */
  body: unknown;
}

/** What the library keeps of one conversation. */
export interface Conversation {
  id: string;
  /** The group's name, or the peer's username. */
  title: string;
  kind: "direct" | "group" | "channel";
  msgs: Map<number, Message>;
  last_seq: number;
  read_seq: number;
  /** In a one-to-one conversation: how far the peer has read. */
  peer_read: number;
  muted: boolean;
  /** Every seq up to this one is held. */
  synced: number;
  /** The lowest seq held (Infinity when none). */
  oldest: number;
  /** `history` found nothing older. */
  complete: boolean;
}

/** A send waiting for the server's ack. */
export interface Outgoing {
  id: string;
  conv: string;
  body: unknown;
  ts: number;
  state: "sending" | "failed";
  error: ProtocolError | null;
  done: Promise<SendAck>;
}

export interface SendAck {
  conv: string;
  seq: number;
  id: string;
  ts: number;
}

/** An error reply (protocol.md, "Errors"), or `{code: "offline"}` when not connected. */
export interface ProtocolError {
  code: string;
  message: string;
  url?: string;
}

export type State = "idle" | "connecting" | "connected" | "online" | "offline";

export interface Events {
  state: { state: State; code?: number; retryMs?: number };
  /** No token, or it was refused: the app should ask for a login. */
  auth: { reason: string };
  /** Logged in and caught up (after every (re)connect). */
  ready: { user: string; convs: Map<string, Conversation> };
  closed: { code: number; reason: string };
  /** A conversation's state changed (messages, cursors, title); `fresh` the first time. */
  conv: { conv: Conversation; fresh?: boolean };
  /** `live`: pushed now (not synced or paged). */
  message: { conv: Conversation; msg: Message; live: boolean };
  edit: { conv: Conversation; msg: Message; target?: Message; live: boolean };
  recall: { conv: Conversation; msg: Message; target?: Message; live: boolean };
  /** A group change (a `system` entry): created, added, joined, left, removed, role, … */
  group: { conv: Conversation; msg: Message; event?: string; live: boolean };
  /** A missing seq range was seen and is being fetched. */
  gap: { conv: Conversation; after: number; upto: number };
  read: { conv: string; user: string; seq: number };
  typing: { conv: string; user: string };
  presence: { user: string; state: "online" | "away" | "offline"; status?: string };
  friend: { push: "friend"; user: string; state: string; message?: string };
  group_request: { push: "group_request"; conv: string; user: string };
  resync: { push: "resync" };
  /** A live room's message (not stored: nothing to sync). */
  room: { room: string; msg: Message };
  /** Joined a live room again after a reconnect: its recent window in `info.recent`. */
  room_joined: { room: string; info: RoomInfo };
  /** A user's device keys changed (`version` moved): a new device, a reinstall, a removal. */
  keys: { push: "keys"; user: string; version: number };
  e2e_error: { user: string; device: string; error: string };
  /** A message to `user` went unencrypted: they have published no keys. */
  e2e_plain: { user: string };
  outbox: { id: string; state: "sending" | "sent" | "failed"; conv: string; error?: ProtocolError };
  /** Any other push, as received. */
  push: Record<string, unknown>;
}

export interface Uploaded {
  media: string;
  /** Absolute, with its capability: readable by whoever has it until `expires`. */
  url: string;
  expires: number;
  type: string;
  size: number;
  name: string;
  sha256: string;
  dedup: boolean;
  /** Set when uploaded with `encrypt`: the key to read it with (`fetchMedia`). Send it only
   * inside an end-to-end encrypted body. `type` and `size` are then the plaintext's. */
  enc?: { alg: "A256GCM"; key: string; iv: string };
}

export interface RoomInfo {
  conv: string;
  name: string;
  rate: number;
  admins: number;
  members: number;
  recent?: Message[];
}

export interface Options {
  /** e.g. "ws://127.0.0.1:7400/ws" */
  url: string;
  device?: string;
  storage?: { getItem(k: string): string | null; setItem(k: string, v: string): void; removeItem(k: string): void };
  WebSocket?: typeof WebSocket;
  ackDelayMs?: number;
  /** Encrypt one-to-one messages end to end (docs/e2e.md). */
  e2e?: boolean;
}

/** The end-to-end layer (`client.e2e`, with `e2e: true`). */
export interface E2E {
  /** This device's published identity (ECDH and ECDSA public keys). */
  readonly identity: string;
  /** A user's devices with their published keys (cached by version). */
  devices(user: string): Promise<Array<{ device: string; identity: string }>>;
  /** A short fingerprint of an identity, to compare out of band. */
  fingerprint(identity: string): Promise<string>;
}

export function uuidv7(now?: number): string;

export class MemoryStorage {
  getItem(k: string): string | null;
  setItem(k: string, v: string): void;
  removeItem(k: string): void;
}

export class Hermod {
  constructor(options: Options);
  readonly me: string | null;
  readonly device: string;
  readonly state: State;
  readonly token: string | null;
  readonly convs: Map<string, Conversation>;
  readonly outbox: Map<string, Outgoing>;
  readonly e2e: E2E | null;
  on<K extends keyof Events>(type: K, fn: (detail: Events[K]) => void): () => void;
  start(): this;
  close(): void;
  request<T = any>(op: string, fields?: Record<string, unknown>): Promise<T>;
  register(username: string, password: string): Promise<{ user: string }>;
  login(username: string, password: string): Promise<{ user: string; device: string; token: string }>;
  resume(): Promise<{ user: string; device: string }>;
  logout(): Promise<void>;
  conv(id: string, title?: string, kind?: "direct" | "group" | "channel"): Conversation;
  /** Uploads media (docs/media.md); resolves with what to put in a message body. */
  upload(
    data: Blob | Uint8Array,
    options?: {
      type?: string;
      name?: string;
      chunk?: number;
      onProgress?: (sent: number, total: number) => void;
      /** Encrypt the bytes under a fresh key first: the server holds only ciphertext. */
      encrypt?: boolean;
    },
  ): Promise<Uploaded>;
  /** Deletes a medium you uploaded, by its URL (docs/media.md, `DELETE /media/{media}`). */
  deleteMedia(url: string | { url: string }): Promise<void>;
  /** A medium's content (from a message body's `media`), decrypted if it carries `enc`. */
  fetchMedia(media: { url: string; type: string; enc?: Uploaded["enc"] }): Promise<Blob>;
  httpBase(): string;
  subscribe(channel: string): Promise<{ conv: string; last_seq: number; read_seq: number }>;
  unsubscribe(channel: string): Promise<{ conv: string }>;
  joinRoom(room: string): Promise<RoomInfo>;
  leaveRoom(room: string): Promise<{ conv: string }>;
  /** Rejects with a ProtocolError of code "shed" when the room shed it. */
  sendRoom(room: string, body: unknown): Promise<SendAck>;
  open(user: string): Promise<Conversation>;
  unread(conv: Conversation): number;
  history(conv: string, limit?: number): Promise<{ conv: string; msgs: Message[]; more: boolean }>;
  read(conv: string, seq?: number): Promise<unknown>;
  send(conv: string, body: unknown, id?: string): Promise<SendAck>;
  retry(id: string): void;
  /** Edits a message of yours (encrypted like a send in a one-to-one conversation with e2e). */
  edit(conv: string, seq: number, body: unknown): Promise<unknown>;
}
