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
const toHex = (buf) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const SYNC_BATCH = 32; // conversations per `sync` request (the server takes up to 100)


// ---- end-to-end encryption (opt-in: `new Hermod({ e2e: true })`; docs/e2e.md) ----
//
// One-to-one conversations only. Each device holds an identity (an ECDH P-256 key for
// agreement and an ECDSA P-256 key that signs its prekeys), a signed prekey and one-time
// prekeys, all published to the server's key directory. A sender's device agrees a session
// key with each device of the peer and with its own other devices, X3DH-style (four ECDHs with
// the peer's signed and one-time prekeys, through HKDF-SHA-256), once per pair of devices, and
// keeps it. Each message has a fresh AES-GCM key that encrypts the body, wrapped for every
// device with that device's session key (and for the sending device itself with a local key,
// so its own history stays readable). The header that lets a receiver derive the session rides
// along in every wrap. What this does not give: forward secrecy or post-compromise security
// within a session (no ratchet): see docs/e2e.md.

const b64 = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)));
/** An AES-GCM key from its raw bytes: message keys (`E2E`) and media keys (`upload`). */
const aesKey = (raw) => crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt", "decrypt"]);
const unb64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
const ECDH = { name: "ECDH", namedCurve: "P-256" };
const ECDSA = { name: "ECDSA", namedCurve: "P-256" };
const PREKEY_BATCH = 20;
const PREKEY_LOW = 10;

class E2E {
  constructor(client) {
    this.client = client;
    this.state = null;       // persisted: private keys, sessions
    this.identity = null;    // this device's published identity text
    this.bundles = new Map(); // user -> {version, devices}
  }

  get subtle() { return globalThis.crypto.subtle; }
  slot() { return `hermodE2E:${this.client.me}:${this.client.device}`; }
  save() { this.client.storage.setItem(this.slot(), JSON.stringify(this.state)); }

  async genEcdh() {
    const k = await this.subtle.generateKey(ECDH, true, ["deriveBits"]);
    return { pub: b64(await this.subtle.exportKey("raw", k.publicKey)), priv: await this.subtle.exportKey("jwk", k.privateKey) };
  }
  ecdhPriv(jwk) { return this.subtle.importKey("jwk", jwk, ECDH, false, ["deriveBits"]); }
  ecdhPub(text) { return this.subtle.importKey("raw", unb64(text), ECDH, false, []); }
  async dh(privJwk, pubText) {
    return new Uint8Array(await this.subtle.deriveBits({ name: "ECDH", public: await this.ecdhPub(pubText) }, await this.ecdhPriv(privJwk), 256));
  }
  async seal(raw, plain) {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const ct = await this.subtle.encrypt({ name: "AES-GCM", iv }, await aesKey(raw), plain);
    return { iv: b64(iv), ct: b64(ct) };
  }
  async open(raw, { iv, ct }) {
    return new Uint8Array(await this.subtle.decrypt({ name: "AES-GCM", iv: unb64(iv) }, await aesKey(raw), unb64(ct)));
  }
  async kdf(parts) {
    const ikm = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { ikm.set(p, at); at += p.length; }
    const key = await this.subtle.importKey("raw", ikm, "HKDF", false, ["deriveBits"]);
    const info = new TextEncoder().encode("hermod x3dh v1");
    return new Uint8Array(await this.subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt: new Uint8Array(32), info }, key, 256));
  }

  /** Loads or makes this device's keys and publishes them (again: same identity keeps the
   * version), with more one-time prekeys when the directory runs low. */
  async init() {
    const saved = this.client.storage.getItem(this.slot());
    this.state = saved ? JSON.parse(saved) : null;
    if (this.state && this.state.version !== 2) this.state = null; // an older layout: start over
    if (!this.state) {
      const sign = await this.subtle.generateKey(ECDSA, true, ["sign", "verify"]);
      this.state = {
        ik: await this.genEcdh(),
        sk: { pub: b64(await this.subtle.exportKey("raw", sign.publicKey)), priv: await this.subtle.exportKey("jwk", sign.privateKey) },
        spk: { id: 1, ...(await this.genEcdh()) },
        opk: {}, nextOpk: 1,
        self: b64(crypto.getRandomValues(new Uint8Array(32))),
        out: {}, // "user/device" -> {identity, key, h}
        in: {},  // ik|ek -> {key, verified}
        version: 2,
      };
    }
    this.identity = `${this.state.ik.pub}.${this.state.sk.pub}`;
    const signKey = await this.subtle.importKey("jwk", this.state.sk.priv, ECDSA, false, ["sign"]);
    const signature = b64(await this.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, signKey, unb64(this.state.spk.pub)));
    const left = saved ? (await this.client.request("keys_count")).prekeys : 0;
    const prekeys = [];
    if (left < PREKEY_LOW) {
      for (let i = 0; i < PREKEY_BATCH; i++) {
        const id = this.state.nextOpk++;
        const k = await this.genEcdh();
        this.state.opk[id] = k.priv;
        prekeys.push({ id, key: k.pub });
      }
    }
    this.save();
    await this.client.request("keys_publish", {
      identity: this.identity,
      signed_prekey: { id: this.state.spk.id, key: this.state.spk.pub, signature },
      prekeys,
    });
  }

  /** A short fingerprint of an identity, to compare out of band. */
  async fingerprint(identity) {
    const h = new Uint8Array(await this.subtle.digest("SHA-256", new TextEncoder().encode(identity)));
    return [...h.slice(0, 16)].map((x) => x.toString(16).padStart(2, "0")).join("").match(/.{4}/g).join(" ");
  }

  /** `user`'s devices and identities (cached by version). */
  async devices(user) {
    const have = this.bundles.get(user);
    const r = await this.client.request("keys_devices", { user, version: have ? have.version : undefined });
    if (r.not_modified) return have.devices;
    this.bundles.set(user, { version: r.version, devices: r.devices });
    return r.devices;
  }

  /** A user's keys changed: forget the sessions with devices whose identity is gone. */
  forget(user) { this.bundles.delete(user); }

  /** Sessions with every device of `user` (but this one), made where missing; `listed`:
   * the user's devices, when the caller has just read them. */
  async sessions(user, listed) {
    const devices = listed || await this.devices(user);
    const me = `${this.client.me}/${this.client.device}`;
    const wanted = devices.filter((d) => `${user}/${d.device}` !== me);
    const missing = wanted.filter((d) => {
      const s = this.state.out[`${user}/${d.device}`];
      return !s || s.identity !== d.identity;
    });
    if (missing.length) {
      const claimed = await this.client.request("keys_claim", { user, devices: missing.map((d) => d.device) });
      for (const d of claimed.devices) await this.start(user, d);
      this.save();
    }
    return wanted.map((d) => [`${user}/${d.device}`, this.state.out[`${user}/${d.device}`]]).filter(([, s]) => s);
  }

  /** X3DH from this device to a claimed bundle: the session key, and the header that lets
   * the other side derive it. A signed prekey whose signature fails is refused. */
  async start(user, d) {
    const [ikPub, skPub] = d.identity.split(".");
    const verify = await this.subtle.importKey("raw", unb64(skPub), ECDSA, false, ["verify"]);
    const ok = await this.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, verify, unb64(d.signed_prekey.signature), unb64(d.signed_prekey.key));
    if (!ok) { this.client.emit("e2e_error", { user, device: d.device, error: "bad signed prekey signature" }); return; }
    const ek = await this.genEcdh();
    const parts = [
      await this.dh(this.state.ik.priv, d.signed_prekey.key),
      await this.dh(ek.priv, ikPub),
      await this.dh(ek.priv, d.signed_prekey.key),
    ];
    if (d.prekey) parts.push(await this.dh(ek.priv, d.prekey.key));
    const key = b64(await this.kdf(parts));
    // `to` names the recipient's identity: a device that has since changed keys (a new
    // install under the same name) knows at once the message is not for its keys.
    const h = { ik: this.identity, ek: ek.pub, spk: d.signed_prekey.id, opk: d.prekey ? d.prekey.id : null, to: d.identity.slice(0, 24) };
    this.state.out[`${user}/${d.device}`] = { identity: d.identity, key, h };
  }

  /** The encrypted body of `body` for conversation peer `peer`: for each of the peer's
   * devices, each of the sender's other devices, and this device (the local key). */
  async encrypt(peer, body) {
    // A peer with no published keys (a bot, a client without encryption, the server's own
    // name) could read nothing: the message goes as it is, and `plainTo` says so.
    const theirs = await this.devices(peer).catch((e) => { if (e.code === "no_such_user") return []; throw e; });
    if (!theirs.length) { this.client.emit("e2e_plain", { user: peer }); return null; }
    const msgKey = crypto.getRandomValues(new Uint8Array(32));
    const sealed = await this.seal(msgKey, new TextEncoder().encode(JSON.stringify(body)));
    const keys = {};
    const targets = [...await this.sessions(peer, theirs)];
    if (peer !== this.client.me) targets.push(...await this.sessions(this.client.me));
    for (const [to, s] of targets) keys[to] = { h: s.h, ...(await this.seal(unb64(s.key), msgKey)) };
    keys[`${this.client.me}/${this.client.device}`] = await this.seal(unb64(this.state.self), msgKey);
    return { e2e: 1, ...sealed, keys };
  }

  /** The plaintext body of an encrypted message; throws if it holds nothing for this device. */
  /** Also sets `msg.e2e_verified`: whether the sending device's identity in the header is
   * the one the directory lists for it (false: a key the directory does not know for that
   * device — a device since removed or reinstalled, or a forgery). */
  async decrypt(msg) {
    const entry = msg.body.keys && msg.body.keys[`${this.client.me}/${this.client.device}`];
    if (!entry) throw new Error("not encrypted for this device");
    if (!entry.h) {
      msg.e2e_verified = true; // this device's own message, under its local key
      return this.unwrap(unb64(this.state.self), entry, msg);
    }
    const tag = entry.h.ik + "|" + entry.h.ek;
    const known = this.state.in[tag];
    if (known) {
      msg.e2e_verified = known.verified;
      return this.unwrap(unb64(known.key), entry, msg);
    }
    const { ik, ek, spk, opk, to } = entry.h;
    if (to !== this.identity.slice(0, 24)) throw new Error("encrypted for an earlier key of this device");
    if (spk !== this.state.spk.id) throw new Error("unknown signed prekey " + spk);
    const parts = [
      await this.dh(this.state.spk.priv, ik.split(".")[0]),
      await this.dh(this.state.ik.priv, ek),
      await this.dh(this.state.spk.priv, ek),
    ];
    if (opk !== null) {
      const priv = this.state.opk[opk];
      if (!priv) throw new Error("one-time prekey " + opk + " is gone");
      parts.push(await this.dh(priv, ek));
    }
    const key = await this.kdf(parts);
    const body = await this.unwrap(key, entry, msg); // throws, consuming nothing, if wrong
    const listed = (await this.devices(msg.from).catch(() => [])).find((d) => d.device === msg.dev);
    const verified = !!listed && listed.identity === ik;
    msg.e2e_verified = verified;
    // The session holds: keep its key, and the one-time prekey's private half goes.
    this.state.in[tag] = { key: b64(key), verified };
    if (opk !== null) delete this.state.opk[opk];
    this.save();
    return body;
  }

  async unwrap(key, entry, msg) {
    const msgKey = await this.open(key, entry);
    return JSON.parse(new TextDecoder().decode(await this.open(msgKey, msg.body)));
  }
}

export class Hermod {
  /**
   * @param {object} options
   * @param {string} options.url       WebSocket URL, e.g. ws://127.0.0.1:7400/ws
   * @param {string} [options.device]  this device's name (default: stored, or "web-" + random)
   * @param {object} [options.storage] getItem/setItem/removeItem (default: localStorage, or memory)
   * @param {Function} [options.WebSocket] the WebSocket class (default: globalThis.WebSocket)
   * @param {number} [options.ackDelayMs] how long acks wait to leave together (default 250)
   * @param {boolean} [options.e2e] encrypt one-to-one messages end to end (docs/e2e.md)
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
    /** Live rooms this client is in: joined again on every (re)connect (membership is per
     * connection on the server). */
    this.rooms = new Set();
    this.moving = false;
    /** End-to-end encryption of one-to-one messages (see `E2E`), when asked for. */
    this.e2e = options.e2e ? new E2E(this) : null;
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
    if (this.e2e) await this.e2e.init();
    const list = await this.request("convs");
    for (const c of list.convs) {
      const conv = this.conv(c.conv, c.kind === "direct" ? c.peer : c.title, c.kind);
      if (c.kind !== "direct") conv.title = c.title;
      conv.last_seq = Math.max(conv.last_seq, c.last_seq);
      conv.read_seq = Math.max(conv.read_seq, c.read_seq, c.last_seq - c.unread);
      conv.peer_read = Math.max(conv.peer_read, c.peer_read_seq || 0);
      conv.muted = !!c.muted;
    }
    const wanted = [...this.convs.values()].filter((c) => c.synced < c.last_seq).map((c) => ({ conv: c.id, after: c.synced }));
    for (let i = 0; i < wanted.length; i += SYNC_BATCH) await this.syncMany(wanted.slice(i, i + SYNC_BATCH));
    for (const [id, o] of this.outbox) if (o.state === "sending") this.transmit(id, o);
    this.rejoinRooms(false);
    this.emit("ready", { user, convs: this.convs });
  }

  /** Joins this connection's rooms again: after a reconnect (a new connection is in none), or
   * with `leaveFirst` on `resync`, when a room's owner node may have restarted and forgotten
   * this connection while its own shard still counts it in (a plain join is then undone). */
  rejoinRooms(leaveFirst) {
    for (const room of this.rooms) {
      const leave = leaveFirst ? this.request("room_leave", { conv: room }).catch(() => {}) : Promise.resolve();
      leave.then(() => this.request("room_join", { conv: room })).then(
        (info) => this.emit("room_joined", { room, info }),
        () => this.rooms.delete(room), // gone or refused: no longer in it
      );
    }
  }

  // ---- media (docs/media.md) ----

  /** The HTTP origin of the node this client talks to (`ws://h:p/ws` → `http://h:p`). */
  httpBase() {
    const u = new URL(this.url);
    return (u.protocol === "wss:" ? "https://" : "http://") + u.host;
  }

  /** Uploads `data` (a Blob or File, or bytes) and resolves with `{media, url, type, size,
   * name, sha256, dedup, expires}` (`url` absolute: put it in a message body). Chunks that fail
   * on the network are retried from where the server says it is (`HEAD`), so an upload
   * survives dropped connections; content the server holds already is not sent again (a
   * proof of possession replaces it). Rejects with `{code, message}` when refused.
   *
   * With `encrypt`, the bytes are encrypted first under a fresh AES-256-GCM key, so the server
   * stores and serves only ciphertext (announced as application/octet-stream; deduplication
   * then never applies, every upload being different bytes). The answer carries
   * `enc: {alg: "A256GCM", key, iv}` (base64) and the plaintext's `type` and `size`: put them in
   * an end-to-end encrypted message body beside `url`; `fetchMedia` reads it back. */
  async upload(data, { type, name, onProgress, chunk, encrypt } = {}) {
    let bytes = data instanceof Uint8Array ? data : new Uint8Array(await data.arrayBuffer());
    type = type || data.type || "application/octet-stream";
    name = name || data.name || "file";
    const plainSize = bytes.length;
    let enc = null;
    if (encrypt) {
      const key = crypto.getRandomValues(new Uint8Array(32));
      const iv = crypto.getRandomValues(new Uint8Array(12));
      bytes = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv }, await aesKey(key), bytes));
      enc = { alg: "A256GCM", key: b64(key), iv: b64(iv) };
    }
    const sha256 = toHex(await crypto.subtle.digest("SHA-256", bytes));
    const wireType = enc ? "application/octet-stream" : type;
    const grant = await this.request("media_upload", { size: bytes.length, type: wireType, sha256 });
    const base = this.httpBase();
    const call = async (method, path, body, headers = {}) => {
      const r = await fetch(base + path, { method, headers, body });
      const text = method === "HEAD" ? "" : await r.text();
      const json = text ? JSON.parse(text) : {};
      if (!r.ok && r.status !== 409) throw json.error || { code: "http_" + r.status, message: r.statusText };
      return { r, json };
    };
    const { json: up } = await call("POST", "/media/uploads", JSON.stringify({ grant: grant.grant }));
    let proof;
    if (up.dedup) {
      const nonce = new TextEncoder().encode(up.nonce);
      const all = new Uint8Array(nonce.length + bytes.length);
      all.set(nonce);
      all.set(bytes, nonce.length);
      proof = toHex(await crypto.subtle.digest("SHA-256", all));
    } else {
      const size = Math.min(chunk || up.chunk_max, up.chunk_max);
      let offset = 0, failures = 0;
      while (offset < bytes.length) {
        try {
          const { r } = await call("PATCH", `/media/uploads/${up.upload}`, bytes.subarray(offset, offset + size), { "Upload-Offset": String(offset) });
          offset = Number(r.headers.get("Upload-Offset"));
          failures = 0;
          if (onProgress) onProgress(offset, bytes.length);
        } catch (e) {
          if (e && e.code) throw e; // the server refused: no retry helps
          if (++failures > 30) throw { code: "offline", message: String(e) };
          await pause(Math.min(250 * failures, 5000));
          const h = await fetch(`${base}/media/uploads/${up.upload}`, { method: "HEAD" }).catch(() => null);
          if (h && h.status === 204) offset = Number(h.headers.get("Upload-Offset"));
        }
      }
    }
    const { json: done } = await call("POST", `/media/uploads/${up.upload}/complete`, proof ? JSON.stringify({ proof }) : undefined);
    const url = base + done.url;
    return enc ? { ...done, url, name, type, size: plainSize, enc } : { ...done, url, name };
  }

  /** Deletes a medium you uploaded (`url`: its URL, or an object with `url`): a grant from
   * `media_delete`, then `DELETE` on the node that stores it (the URL's origin). Its URLs read
   * nothing from then on. Rejects with `{code, message}` (`forbidden`: not yours; `not_found`:
   * gone already). */
  async deleteMedia(url) {
    const u = new URL(typeof url === "string" ? url : url.url, this.httpBase());
    const media = u.pathname.split("/").pop();
    const { grant } = await this.request("media_delete", { media });
    const r = await fetch(`${u.origin}/media/${media}`, { method: "DELETE", body: JSON.stringify({ grant }) });
    if (!r.ok) {
      const json = await r.json().catch(() => ({}));
      throw json.error || { code: "http_" + r.status, message: r.statusText };
    }
  }

  /** The content of `media` (a message body's `{url, type, enc?}`) as a Blob of its type,
   * decrypted if it carries `enc`. Rejects with `{code, message}`: `http_<status>` (an expired
   * URL is `http_403`), `unsupported` (an unknown `enc.alg`) or `bad_media` (the bytes do not
   * decrypt under the key: altered, or not this medium). */
  async fetchMedia(media) {
    const r = await fetch(media.url);
    if (!r.ok) throw { code: "http_" + r.status, message: r.statusText };
    const bytes = await r.arrayBuffer();
    if (!media.enc) return new Blob([bytes], { type: media.type });
    if (media.enc.alg !== "A256GCM") throw { code: "unsupported", message: "media encryption " + media.enc.alg };
    try {
      const key = await aesKey(unb64(media.enc.key));
      const plain = await crypto.subtle.decrypt({ name: "AES-GCM", iv: unb64(media.enc.iv) }, key, bytes);
      return new Blob([plain], { type: media.type });
    } catch (e) {
      throw { code: "bad_media", message: "the medium does not decrypt: " + (e.message || e) };
    }
  }

  // ---- channels and live rooms (docs/channels.md) ----

  /** Subscribes to channel `id` (`c.…`): it joins `convs`, its posts arrive as messages. */
  async subscribe(id) {
    const r = await this.request("subscribe", { conv: id });
    const c = this.conv(id, undefined, "channel");
    c.last_seq = Math.max(c.last_seq, r.last_seq);
    c.read_seq = Math.max(c.read_seq, r.read_seq);
    c.synced = Math.max(c.synced, r.read_seq); // history before the subscription is paged, not synced
    this.emit("conv", { conv: c, fresh: true });
    return r;
  }

  async unsubscribe(id) {
    const r = await this.request("unsubscribe", { conv: id });
    this.convs.delete(id);
    return r;
  }

  /** Joins live room `id` (`r.…`) on this connection and again after every reconnect; the
   * answer carries the recent window. Its messages arrive as `room` events. */
  async joinRoom(id) {
    const r = await this.request("room_join", { conv: id });
    this.rooms.add(id);
    return r;
  }

  async leaveRoom(id) {
    this.rooms.delete(id);
    return this.request("room_leave", { conv: id });
  }

  /** Posts to a live room: not queued or resent (a room keeps nothing); rejects with the
   * code `shed` when the room dropped it under load. */
  sendRoom(id, body) {
    return this.request("send", { conv: id, id: uuidv7(), body });
  }

  // ---- conversations ----

  /** The state kept of conversation `id` (created empty if new). */
  conv(id, title, kind) {
    if (!this.convs.has(id)) {
      this.convs.set(id, {
        id, title: title ?? "?", kind: kind || (id.startsWith("g.") ? "group" : id.startsWith("c.") ? "channel" : "direct"),
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
          if (m.body && m.body.e2e && this.e2e) {
            this.e2e.decrypt(m).then((body) => { m.body = body; }, (e) => { m.e2e_error = e.message; })
              .finally(() => {
                if (target) { target.body = m.body; target.edited = true; }
                this.emit("edit", { conv: c, msg: m, target, live });
                this.emit("conv", { conv: c });
              });
            break;
          }
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
          if (m.body && m.body.e2e) this.decryptInto(c, m, live);
          else this.emit("message", { conv: c, msg: m, live });
      }
    }
    if (live && c.synced < c.last_seq) this.fillGap(c);
    this.emit("conv", { conv: c });
  }

  /** Replaces an encrypted body by its plaintext (`msg.e2e` true), then emits the message;
   * one that cannot be read keeps its ciphertext with `msg.e2e_error` set. */
  decryptInto(c, m, live) {
    if (!this.e2e) { m.e2e_error = "encrypted (this client does not decrypt)"; return this.emit("message", { conv: c, msg: m, live }); }
    this.e2e.decrypt(m).then(
      (body) => { if (!m.edited) m.body = body; m.e2e = true; }, // an edit that came first wins
      (e) => { m.e2e_error = e.message || String(e); },
    ).finally(() => { this.emit("message", { conv: c, msg: m, live }); this.emit("conv", { conv: c }); });
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
      const c = this.conv(o.conv);
      if (this.e2e && c.kind === "direct" && o.wire === undefined) o.wire = await this.e2e.encrypt(c.title, o.body);
      const r = await this.request("send", { conv: o.conv, id, body: o.wire || o.body });
      this.outbox.delete(id);
      this.add(o.conv, [{ conv: o.conv, seq: r.seq, id: r.id, from: this.me, dev: this.device, ts: r.ts, body: o.body, e2e: !!o.wire }]);
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

  /** Edits a message of yours: with end-to-end encryption on, the new body is encrypted like
   * a send (an edit is a timeline entry of its own). Resolves with the server's answer. */
  async edit(convId, seq, body) {
    const c = this.conv(convId);
    const wire = this.e2e && c.kind === "direct" ? await this.e2e.encrypt(c.title, body) : null;
    return this.request("edit", { conv: convId, seq, body: wire || body });
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
        // Live room messages are not stored, acked or synced; channel pushes are not acked.
        if (f.msg.conv.startsWith("r.")) return this.emit("room", { room: f.msg.conv, msg: f.msg });
        if (!f.msg.conv.startsWith("c.")) this.ackLater(f.msg);
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
      case "keys":
        if (this.e2e) this.e2e.forget(f.user);
        return this.emit("keys", f);
      case "resync": {
        // Pushes may have been lost (a link to another node was down): catch up everything.
        const all = [...this.convs.values()].map((c) => ({ conv: c.id, after: c.synced }));
        for (let i = 0; i < all.length; i += SYNC_BATCH) this.syncMany(all.slice(i, i + SYNC_BATCH)).catch(() => {});
        this.rejoinRooms(true);
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
