// hermod.js — the client library of Hermod's WebSocket + JSON protocol (docs/protocol.md).
// An ES module with no build step and no dependencies; types in hermod.d.ts beside it; served
// by every Hermod server at /hermod.js. The web page at / is built on it. Guide: docs/client.md.
//
// What it does for an app, so that no app re-derives it from the protocol document:
// - connects, resumes with the stored token, follows `moved` to the user's node, reconnects
//   with backoff (0.5 s doubling to 5 s) when the socket drops;
// - sends with client UUIDv7 ids and keeps each send in an outbox until the server acks it:
//   after a reconnect it sends again with the same id, which the server deduplicates, so a
//   message is never lost and never doubled;
// - acks pushes (batched for `ackDelayMs`, per conversation the highest seq: cumulative);
// - keeps every conversation it has seen (messages by seq, read cursors, unread counts), syncs
//   each from the highest contiguous seq it holds on every (re)connect, and fills a gap the
//   moment one shows (a push whose seq is not the next one);
// - drops duplicates (a push that crossed a sync, a retried push) by (conv, seq);
// - turns pushes into typed events: message, edit, recall, group, read, typing, presence,
//   friend; and its own: state, auth, ready, conv, outbox, closed.

/** A UUIDv7: 48 bits of ms time, then random bits; sorts by creation time. */
export function uuidv7(now = Date.now()) {
  const b = crypto.getRandomValues(new Uint8Array(16));
  for (let i = 0; i < 6; i++) b[i] = Math.floor(now / 2 ** (8 * (5 - i))) & 255;
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Storage that forgets on exit (the default outside a browser). */
export class MemoryStorage {
  constructor() { this.map = new Map(); }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
  removeItem(k) { this.map.delete(k); }
}

const OFFLINE = { code: "offline", message: "not connected" };
const SYNC_BATCH = 32; // conversations per `sync` request (the server takes up to 100)

export class Hermod {
  /**
   * @param {object} options
   * @param {string} options.url       WebSocket URL, e.g. ws://127.0.0.1:7400/ws
   * @param {string} [options.device]  this device's name (default: stored, or "web-" + random)
   * @param {object} [options.storage] getItem/setItem/removeItem (default: localStorage, or memory)
   * @param {Function} [options.WebSocket] the WebSocket class (default: globalThis.WebSocket)
   * @param {number} [options.ackDelayMs] how long acks wait to leave together (default 250)
   */
  constructor(options) {
    this.storage = options.storage || (globalThis.localStorage ?? new MemoryStorage());
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("no WebSocket: pass options.WebSocket (Node < 22: --experimental-websocket)");
    this.url = this.storage.getItem("hermodNode") || options.url;
    this.device = options.device || this.storage.getItem("hermodDevice")
      || "web-" + Math.random().toString(36).slice(2, 8);
    this.storage.setItem("hermodDevice", this.device);
    this.ackDelayMs = options.ackDelayMs ?? 250;
    /** @type {string|null} the logged-in username */
    this.me = null;
    /** "idle" | "connecting" | "connected" | "online" (authenticated) | "offline" */
    this.state = "idle";
    /** @type {Map<string, object>} every conversation seen, by id (see `conv`) */
    this.convs = new Map();
    /** @type {Map<string, object>} sends not yet acked, by message id */
    this.outbox = new Map();
    this.ws = null;
    this.rid = 0;
    this.pending = new Map();
    this.handlers = new Map();
    this.backoff = 500;
    this.stopped = false;
    this.toAck = {};
    this.ackTimer = null;
    this.syncing = new Set();
    this.moving = false;
  }

  // ---- events ----

  /** Calls `fn(detail)` on every event of `type`; returns a function that stops it. */
  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, new Set());
    this.handlers.get(type).add(fn);
    return () => this.handlers.get(type).delete(fn);
  }

  emit(type, detail) {
    for (const fn of this.handlers.get(type) || []) {
      try { fn(detail); } catch (e) { console.error("hermod.js: a", type, "handler threw", e); }
    }
  }

  // ---- connection ----

  /** Opens the socket (and keeps it open). With a stored token the session resumes by itself. */
  start() {
    this.stopped = false;
    this.connect();
    return this;
  }

  /** Closes for good (no reconnect). */
  close() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
  }

  get token() { return this.storage.getItem("hermodToken"); }

  setState(state, extra) {
    this.state = state;
    this.emit("state", { state, ...extra });
  }

  connect() {
    this.setState("connecting");
    const ws = new this.WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.backoff = 500;
      this.setState("connected");
      if (this.moving) return; // `withMoves` asks again itself
      if (this.token) this.resume().catch(() => {});
      else this.emit("auth", { reason: "no token" });
    };
    ws.onmessage = (ev) => this.onFrame(JSON.parse(ev.data));
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // replaced (moved to another node)
      this.toAck = {}; // this connection's pushes: the next connection's sync covers them
      this.failPending({ code: "offline", message: "connection closed" });
      this.emit("closed", { code: ev.code, reason: ev.reason });
      if (ev.code === 4003 || ev.code === 4002) {
        // Kicked by an operator, or this device's session replaced: the token is dead.
        this.storage.removeItem("hermodToken");
      }
      if (this.stopped) return this.setState("offline", { code: ev.code });
      this.setState("offline", { code: ev.code, retryMs: this.backoff });
      setTimeout(() => { if (!this.stopped) this.connect(); }, this.backoff);
      this.backoff = Math.min(this.backoff * 2, 5000);
    };
  }

  failPending(error) {
    for (const p of this.pending.values()) p.reject(error);
    this.pending.clear();
  }

  /** The user lives on another node of the cluster: reconnect there. */
  moveTo(url) {
    this.url = url;
    this.storage.setItem("hermodNode", url);
    const old = this.ws;
    this.ws = null;
    if (old) old.close();
    this.failPending({ code: "offline", message: "moving to " + url });
    this.moving = true;
    return new Promise((resolve) => {
      const off = this.on("state", ({ state }) => {
        if (state === "connected") { off(); this.moving = false; resolve(); }
      });
      this.connect();
    });
  }

  /** One request; resolves with its `ok`, rejects with its `error` ({code, message}). */
  request(op, fields = {}) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== 1) return reject(OFFLINE);
      const rid = ++this.rid;
      this.pending.set(rid, { resolve, reject });
      this.ws.send(JSON.stringify({ op, rid, ...fields }));
    });
  }

  onFrame(f) {
    if (f.push) return this.onPush(f);
    const p = this.pending.get(f.rid);
    if (!p) return;
    this.pending.delete(f.rid);
    f.error ? p.reject(f.error) : p.resolve(f.ok);
  }

  // ---- session ----

  async register(username, password) {
    return this.withMoves(() => this.request("register", { username, password }));
  }

  /** Logs in as this device; the token is stored, so later starts resume by themselves. */
  async login(username, password) {
    const r = await this.withMoves(() => this.request("login", { username, password, device: this.device }));
    this.storage.setItem("hermodToken", r.token);
    await this.ready(r.user);
    return r;
  }

  async resume() {
    try {
      const r = await this.withMoves(() => this.request("resume", { token: this.token }));
      await this.ready(r.user);
      return r;
    } catch (e) {
      if (e.code !== "offline") {
        this.storage.removeItem("hermodToken");
        this.emit("auth", { reason: e.code });
      }
      throw e;
    }
  }

  /** Forgets this device on the server and here. */
  async logout() {
    try { await this.request("logout"); } catch (e) { /* gone already */ }
    this.storage.removeItem("hermodToken");
    this.me = null;
    this.close();
  }

  /** Runs `attempt`; if the user lives on another node, moves there and runs it once more. */
  async withMoves(attempt) {
    try {
      return await attempt();
    } catch (e) {
      if (e.code !== "moved") throw e;
      await this.moveTo(e.url);
      return attempt();
    }
  }

  /** Authenticated: catch up (the list, every conversation's missed messages), resend. */
  async ready(user) {
    this.me = user;
    this.setState("online");
    const list = await this.request("convs");
    for (const c of list.convs) {
      const conv = this.conv(c.conv, c.kind === "group" ? c.title : c.peer, c.kind);
      if (c.kind === "group") conv.title = c.title;
      conv.last_seq = Math.max(conv.last_seq, c.last_seq);
      conv.read_seq = Math.max(conv.read_seq, c.read_seq, c.last_seq - c.unread);
      conv.peer_read = Math.max(conv.peer_read, c.peer_read_seq || 0);
      conv.muted = !!c.muted;
    }
    const wanted = [...this.convs.values()].filter((c) => c.synced < c.last_seq).map((c) => ({ conv: c.id, after: c.synced }));
    for (let i = 0; i < wanted.length; i += SYNC_BATCH) await this.syncMany(wanted.slice(i, i + SYNC_BATCH));
    for (const [id, o] of this.outbox) if (o.state === "sending") this.transmit(id, o);
    this.emit("ready", { user, convs: this.convs });
  }

  // ---- conversations ----

  /** The state kept of conversation `id` (created empty if new). */
  conv(id, title, kind) {
    if (!this.convs.has(id)) {
      this.convs.set(id, {
        id, title: title ?? "?", kind: kind || (id.startsWith("g.") ? "group" : "direct"),
        /** @type {Map<number, object>} messages by seq */
        msgs: new Map(),
        last_seq: 0, read_seq: 0, peer_read: 0, muted: false,
        /** every seq up to this one is held */
        synced: 0,
        oldest: Infinity,
        /** `history` found nothing older */
        complete: false,
      });
    }
    return this.convs.get(id);
  }

  /** Opens (creating if needed) the one-to-one conversation with `user`; its state. */
  async open(user) {
    const r = await this.request("open", { user });
    const c = this.conv(r.conv, r.peer, "direct");
    c.title = r.peer;
    this.emit("conv", { conv: c });
    return c;
  }

  /** Unread messages of a conversation, as far as this client knows. */
  unread(c) { return Math.max(0, c.last_seq - c.read_seq); }

  /** Takes in messages (pushed, synced or paged): dedup by seq, apply edits and recalls,
   * emit the typed events, and fill a gap if one shows. */
  add(convId, msgs, { live = false } = {}) {
    if (!msgs.length) return;
    const fresh = !this.convs.has(convId);
    const first = msgs[0];
    const c = this.conv(convId, first.from !== this.me ? first.from : undefined);
    if (fresh) this.emit("conv", { conv: c, fresh: true });
    if (c.title === "?" && c.kind === "direct") {
      const other = msgs.find((m) => m.from !== this.me);
      if (other) c.title = other.from;
    }
    for (const m of msgs) {
      if (c.msgs.has(m.seq)) continue; // a duplicate: crossed a sync, or a retried push
      c.msgs.set(m.seq, m);
      c.last_seq = Math.max(c.last_seq, m.seq);
      c.oldest = Math.min(c.oldest, m.seq);
      while (c.msgs.has(c.synced + 1)) c.synced++;
      if (m.from === this.me && m.id && this.outbox.delete(m.id)) this.emit("outbox", { id: m.id, state: "sent", conv: convId });
      const target = m.target && c.msgs.get(m.target);
      switch (m.kind) {
        case "edit":
          if (target) { target.body = m.body; target.edited = true; }
          this.emit("edit", { conv: c, msg: m, target, live });
          break;
        case "recall":
          if (target) { target.body = null; target.recalled = true; }
          this.emit("recall", { conv: c, msg: m, target, live });
          break;
        case "system":
          if (m.body && m.body.name && (m.body.event === "created" || m.body.event === "updated")) c.title = m.body.name;
          this.emit("group", { conv: c, msg: m, event: m.body && m.body.event, live });
          break;
        default:
          this.emit("message", { conv: c, msg: m, live });
      }
    }
    if (live && c.synced < c.last_seq) this.fillGap(c);
    this.emit("conv", { conv: c });
  }

  /** Seqs are contiguous per conversation: a hole is fetched at once (`sync` from the last
   * contiguous seq). One fill per conversation at a time. */
  fillGap(c) {
    if (this.syncing.has(c.id)) return;
    this.syncing.add(c.id);
    this.emit("gap", { conv: c, after: c.synced, upto: c.last_seq });
    this.syncMany([{ conv: c.id, after: c.synced }])
      .catch(() => {}) // offline: the next connection's catch-up covers it
      .finally(() => this.syncing.delete(c.id));
  }

  async syncMany(list) {
    while (list.length) {
      const r = await this.request("sync", { convs: list, limit: 200 });
      list = [];
      for (const c of r.convs) {
        if (c.msgs) this.add(c.conv, c.msgs);
        if (c.more) list.push({ conv: c.conv, after: this.conv(c.conv).synced });
      }
    }
  }

  /** Older messages of `conv` (before the oldest held), into the conversation's state. */
  async history(convId, limit = 50) {
    const c = this.conv(convId);
    const before = c.oldest === Infinity ? undefined : c.oldest;
    const r = await this.request("history", { conv: convId, before, limit });
    c.complete = !r.more;
    this.add(convId, r.msgs);
    return r;
  }

  /** Moves the read cursor to `seq` (default: everything held); peers see ✓✓. */
  read(convId, seq) {
    const c = this.conv(convId);
    const upto = seq ?? c.synced;
    if (upto <= c.read_seq) return Promise.resolve(null);
    c.read_seq = upto;
    this.emit("conv", { conv: c });
    return this.request("read", { conv: convId, seq: upto });
  }

  // ---- sending ----

  /** Sends `body` to `conv`. The message keeps its id in the outbox until acked and goes again
   * on every reconnect meanwhile (deduplicated by the server). Resolves with the ack
   * (`{conv, seq, id, ts}`); rejects only when the server refuses it (the entry stays in the
   * outbox with state "failed" and the error). */
  send(convId, body, id = uuidv7()) {
    const o = { id, conv: convId, body, ts: Date.now(), state: "sending", error: null };
    o.done = new Promise((resolve, reject) => { o.resolve = resolve; o.reject = reject; });
    o.done.catch(() => {}); // callers that do not await still see it in the outbox
    this.outbox.set(id, o);
    this.emit("outbox", { id, state: "sending", conv: convId });
    if (this.state === "online") this.transmit(id, o);
    return o.done;
  }

  async transmit(id, o) {
    try {
      const r = await this.request("send", { conv: o.conv, id, body: o.body });
      this.outbox.delete(id);
      this.add(o.conv, [{ conv: o.conv, seq: r.seq, id: r.id, from: this.me, dev: this.device, ts: r.ts, body: o.body }]);
      this.emit("outbox", { id, state: "sent", conv: o.conv });
      o.resolve(r);
    } catch (e) {
      if (e.code === "offline") return; // still "sending": goes again once back online
      o.state = "failed";
      o.error = e;
      this.emit("outbox", { id, state: "failed", conv: o.conv, error: e });
      o.reject(e);
    }
  }

  /** Tries a failed send again (same id). */
  retry(id) {
    const o = this.outbox.get(id);
    if (!o || o.state !== "failed") return;
    o.state = "sending";
    o.error = null;
    this.emit("outbox", { id, state: "sending", conv: o.conv });
    if (this.state === "online") this.transmit(id, o);
  }

  // ---- pushes ----

  onPush(f) {
    switch (f.push) {
      case "msg":
        this.ackLater(f.msg);
        return this.add(f.msg.conv, [f.msg], { live: true });
      case "read": {
        const c = this.convs.get(f.conv);
        if (c && f.user !== this.me) {
          c.peer_read = Math.max(c.peer_read, f.seq);
          this.emit("conv", { conv: c });
        }
        return this.emit("read", { conv: f.conv, user: f.user, seq: f.seq });
      }
      case "typing": return this.emit("typing", { conv: f.conv, user: f.user });
      case "presence": return this.emit("presence", { user: f.user, state: f.state, status: f.status });
      case "friend": return this.emit("friend", f);
      case "group_request": return this.emit("group_request", f);
      case "resync": {
        // Pushes may have been lost (a link to another node was down): catch up everything.
        const all = [...this.convs.values()].map((c) => ({ conv: c.id, after: c.synced }));
        for (let i = 0; i < all.length; i += SYNC_BATCH) this.syncMany(all.slice(i, i + SYNC_BATCH)).catch(() => {});
        return this.emit("resync", f);
      }
      default: return this.emit("push", f);
    }
  }

  /** Acks leave together after `ackDelayMs`: per conversation the highest seq received. */
  ackLater(m) {
    this.toAck[m.conv] = Math.max(this.toAck[m.conv] || 0, m.seq);
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      if (this.ws && this.ws.readyState === 1 && Object.keys(this.toAck).length) {
        this.ws.send(JSON.stringify({ op: "ack", seqs: this.toAck }));
      }
      this.toAck = {};
    }, this.ackDelayMs);
  }
}
