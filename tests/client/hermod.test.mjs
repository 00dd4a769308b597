// Drives hermod.js (the client library served at /hermod.js) directly in Node against a real
// server: run by tests/client.rs as `node --experimental-websocket hermod.test.mjs <http url>`.
// Each step prints "ok: <step>"; any failure exits non-zero with the reason.
import assert from "node:assert/strict";

const base = process.argv[2];
// The library exactly as the server serves it, not a copy from the source tree.
const src = await (await fetch(new URL("/hermod.js", base))).text();
const { Hermod, MemoryStorage, uuidv7 } = await import("data:text/javascript," + encodeURIComponent(src));
const url = base.replace(/^http/, "ws").replace(/\/$/, "") + "/ws";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, test, ms = 10_000) {
  const end = Date.now() + ms;
  while (!test()) {
    if (Date.now() > end) throw new Error("timed out waiting for " + what);
    await sleep(20);
  }
}
function client(device) {
  return new Hermod({ url, device, storage: new MemoryStorage(), ackDelayMs: 50 });
}
async function user(name) {
  const c = client("node-" + name).start();
  await until(name + " connected", () => c.state === "connected");
  await c.register(name, "password123");
  await c.login(name, "password123");
  assert.equal(c.me, name);
  return c;
}
const texts = (conv) => [...conv.msgs.keys()].sort((a, b) => a - b)
  .map((s) => conv.msgs.get(s)).filter((m) => !m.kind).map((m) => m.body.text);

const alice = await user("alice");
const bob = await user("bob");
const events = { message: [], edit: [], recall: [], group: [], read: [], typing: [], gap: [] };
for (const type of Object.keys(events)) alice.on(type, (d) => events[type].push(d));

// Messages arrive as typed events, in seq order.
const { id } = await bob.open("alice");
assert.equal(bob.convs.get(id).title, "alice");
for (const t of ["one", "two", "three"]) await bob.send(id, { text: t });
await until("three messages", () => events.message.length >= 3);
assert.deepEqual(events.message.map((e) => e.msg.body.text), ["one", "two", "three"]);
assert.ok(events.message.every((e) => e.live));
const a = alice.convs.get(id);
assert.equal(a.synced, 3);
assert.equal(alice.unread(a), 3);
console.log("ok: messages");

// Sends made while offline wait in the outbox and go, once each, when the connection returns;
// a send whose ack was lost with the socket goes again with the same id and is not doubled.
bob.send(id, { text: "lost ack" });
bob.ws.close(); // the frame is out, its answer will not come back on this socket
const offline = ["while", "offline"].map((t) => bob.send(id, { text: t }));
assert.ok([...bob.outbox.values()].every((o) => o.state === "sending"));
await until("bob back online", () => bob.state === "online");
await Promise.all(offline);
await until("the outbox to empty", () => bob.outbox.size === 0);
await until("alice to get them", () => texts(a).includes("offline"));
await sleep(300);
assert.deepEqual(texts(a), ["one", "two", "three", "lost ack", "while", "offline"]);
assert.equal(a.synced, a.last_seq, "no hole");
console.log("ok: reconnect with unsent messages");

// A hole in the seqs (pushes lost) is seen on the next push and filled by `sync`.
const before = a.last_seq;
for (const s of [before - 1, before]) a.msgs.delete(s);
a.synced = before - 2;
await bob.send(id, { text: "after the gap" });
await until("the gap to fill", () => a.synced === before + 1);
assert.equal(events.gap.length, 1);
assert.deepEqual(texts(a).slice(-3), ["while", "offline", "after the gap"]);
console.log("ok: gap then sync");

// Reconnecting syncs what was missed while away, and nothing twice.
alice.close();
await until("alice offline", () => alice.state === "offline");
for (const t of ["x", "y"]) await bob.send(id, { text: t });
alice.start();
await until("alice caught up", () => texts(a).includes("y"));
const seqs = [...a.msgs.keys()].sort((p, q) => p - q);
assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => i + 1), "every seq once");
console.log("ok: catch-up after reconnect");

// Edits, recalls, reads, typing, group changes.
const target = [...a.msgs.values()].find((m) => m.body && m.body.text === "one");
await bob.request("edit", { conv: id, seq: target.seq, body: { text: "uno" } });
await bob.request("recall", { conv: id, seq: target.seq + 1 });
await until("edit and recall", () => events.edit.length === 1 && events.recall.length === 1);
assert.deepEqual(a.msgs.get(target.seq).body, { text: "uno" });
assert.equal(a.msgs.get(target.seq + 1).recalled, true);
let peerRead = null;
bob.on("read", (d) => { peerRead = d; });
await alice.read(id);
await until("bob to see the read", () => peerRead !== null);
assert.equal(peerRead.seq, a.synced);
assert.equal(bob.convs.get(id).peer_read, a.synced);
await bob.request("typing", { conv: id });
await until("typing", () => events.typing.length === 1);
const g = await bob.request("group_create", { name: "node", members: ["alice"] });
await until("the group event", () => events.group.some((e) => e.conv.id === g.conv && e.event === "created"));
console.log("ok: edit, recall, read, typing, group");

// A refused send stays in the outbox as failed, with the error.
await assert.rejects(bob.send("d.0.0", { text: "nowhere" }), (e) => e.code !== "offline");
const failed = [...bob.outbox.values()].find((o) => o.state === "failed");
assert.ok(failed && failed.error.code, "kept with its error");
assert.match(uuidv7(), /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
console.log("ok: failed send");

// A channel: subscribing lists it, posts arrive as messages (not acked), gaps fill by sync.
const ch = await bob.request("channel_create", { name: "news" });
const sub = await alice.subscribe(ch.conv);
assert.equal(alice.convs.get(ch.conv).kind, "channel");
await bob.send(ch.conv, { text: "extra" });
await until("the channel post", () => events.message.some((e) => e.conv.id === ch.conv && e.msg.body.text === "extra"));
assert.equal(alice.unread(alice.convs.get(ch.conv)), 1);
assert.equal(sub.read_seq, 1);
console.log("ok: channel");

// A live room: joined again after a reconnect; messages arrive as `room` events.
const room = await alice.request("room_create", { name: "live", rate: 1 }); // bob is no admin: he can be shed
const roomMsgs = [];
alice.on("room", (e) => roomMsgs.push(e));
await alice.joinRoom(room.conv);
await bob.joinRoom(room.conv);
await bob.sendRoom(room.conv, { text: "first" });
await until("the room message", () => roomMsgs.length === 1);
assert.equal(roomMsgs[0].msg.body.text, "first");
await assert.rejects(bob.sendRoom(room.conv, { text: "over" }), (e) => e.code === "shed");
let rejoined = null;
alice.on("room_joined", (e) => { rejoined = e; });
alice.ws.close(); // the connection drops: the library reconnects and joins the room again
await until("rejoined", () => rejoined !== null);
assert.equal(rejoined.info.recent[0].body.text, "first", "the window comes with the join");
await sleep(1200); // the room's rate of 1/s refills
await until("the room message after a reconnect", async () => {
  await bob.sendRoom(room.conv, { text: "again" }).catch(() => {});
  await sleep(100);
  return roomMsgs.some((e) => e.msg.body.text === "again");
});
console.log("ok: live room");

// Media: a chunked upload with progress, read back by its URL; the same bytes again are a
// deduplication (no bytes sent, a proof instead).
const bytes = new Uint8Array(300_000).map((_, i) => (i * 7) & 255);
const progress = [];
const up = await alice.upload(bytes, { type: "image/png", name: "p.png", chunk: 64 * 1024, onProgress: (n) => progress.push(n) });
assert.equal(up.size, 300_000);
assert.deepEqual(progress, [65536, 131072, 196608, 262144, 300000]);
const back = new Uint8Array(await (await fetch(up.url)).arrayBuffer());
assert.deepEqual(back, bytes);
const again = await bob.upload(new Blob([bytes], { type: "image/png" }));
assert.equal(again.dedup, true);
assert.notEqual(again.media, up.media);
console.log("ok: media upload");

// Encrypted before upload: the server stores and serves ciphertext (and cannot deduplicate it);
// the receiver reads the plaintext with the key from the message body, and a wrong key fails.
const secret = new TextEncoder().encode("a secret picture ".repeat(4000));
const sealed = await alice.upload(secret, { type: "image/jpeg", name: "s.jpg", encrypt: true });
assert.equal(sealed.type, "image/jpeg");
assert.equal(sealed.size, secret.length);
assert.equal(sealed.enc.alg, "A256GCM");
const stored = Buffer.from(await (await fetch(sealed.url)).arrayBuffer());
assert.equal(stored.length, secret.length + 16, "ciphertext and its tag");
assert.ok(!stored.includes("a secret picture"), "the server holds no plaintext");
const opened = await bob.fetchMedia(sealed);
assert.equal(opened.type, "image/jpeg");
assert.deepEqual(new Uint8Array(await opened.arrayBuffer()), secret);
const twice = await alice.upload(secret, { type: "image/jpeg", encrypt: true });
assert.equal(twice.dedup, false, "fresh key, fresh ciphertext");
await assert.rejects(bob.fetchMedia({ ...sealed, enc: twice.enc }), (e) => e.code === "bad_media");
console.log("ok: media encrypted end to end");

// Deleting: only the uploader may, with a grant for that very medium; the URL then reads
// nothing and the size goes back to the quota (read by reserving one more byte, before and after).
await assert.rejects(bob.deleteMedia(sealed), (e) => e.code === "forbidden");
assert.equal((await fetch(sealed.url)).status, 200, "still there after bob's attempt");
const other_grant = (await alice.request("media_delete", { media: up.media })).grant;
const misused = await fetch(`${alice.httpBase()}/media/${sealed.media}`, { method: "DELETE", body: JSON.stringify({ grant: other_grant }) });
assert.equal(misused.status, 403, "a grant for another medium");
await assert.rejects(alice.request("media_delete", { media: "../etc" }), (e) => e.code === "bad_request");
const probe = async () => (await alice.request("media_upload", { size: 1, type: "text/plain", sha256: "0".repeat(64) })).quota_used;
const q1 = await probe();
await alice.deleteMedia(sealed);
assert.equal((await fetch(sealed.url)).status, 404, "gone");
assert.equal(await probe(), q1 + 1 - stored.length, "its size is back in the quota");
await assert.rejects(alice.deleteMedia(sealed.url), (e) => e.code === "not_found");
console.log("ok: media deleted by its uploader");

// The network fails twice mid-upload: once before a chunk leaves, once after the server stored
// one but before its answer arrived. The library resumes from the server's offset both times.
const realFetch = globalThis.fetch;
let patches = 0;
globalThis.fetch = async (url, init = {}) => {
  if (init.method === "PATCH") {
    patches += 1;
    if (patches === 2) throw new TypeError("network down (before sending)");
    if (patches === 4) { await realFetch(url, init); throw new TypeError("network down (answer lost)"); }
  }
  return realFetch(url, init);
};
const other = new Uint8Array(300_000).map((_, i) => (i * 13) & 255);
const resumed = await alice.upload(other, { type: "video/mp4", chunk: 64 * 1024 });
globalThis.fetch = realFetch;
// 5 chunks + the one that never left; the one whose answer was lost is not sent again (HEAD
// says the server has it).
assert.equal(patches, 6);
assert.deepEqual(new Uint8Array(await (await fetch(resumed.url)).arrayBuffer()), other);
console.log("ok: media upload resumed after network failures");

alice.close();
bob.close();
process.exit(0);
