// End-to-end encryption in hermod.js (`new Hermod({ e2e: true })`), in Node against a real
// server: run by tests/client.rs. Prints "ok: <step>" per step; exits non-zero on failure.
import assert from "node:assert/strict";

const base = process.argv[2];
const src = await (await fetch(new URL("/hermod.js", base))).text();
const { Hermod, MemoryStorage } = await import("data:text/javascript," + encodeURIComponent(src));
const url = base.replace(/^http/, "ws").replace(/\/$/, "") + "/ws";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, test, ms = 10_000) {
  const end = Date.now() + ms;
  while (!(await test())) {
    if (Date.now() > end) throw new Error("timed out waiting for " + what);
    await sleep(20);
  }
}
async function device(name, dev, storage = new MemoryStorage(), e2e = true) {
  const c = new Hermod({ url, device: dev, storage, e2e, ackDelayMs: 50 }).start();
  await until(name + " connected", () => c.state === "connected" || c.state === "online");
  if (c.state !== "online") {
    await c.register(name, "password123").catch(() => {});
    await c.login(name, "password123");
  }
  await until(name + " ready", () => c.state === "online" && c.me === name);
  await sleep(50);
  return c;
}
const last = (c, conv) => { const k = c.convs.get(conv); return k && k.msgs.get(k.last_seq); };
const bodyOf = (c, conv, text) => [...(c.convs.get(conv)?.msgs.values() ?? [])].find((m) => m.body && m.body.text === text);

const carol = await device("carol", "c1");
const daveStore = new MemoryStorage();
const dave = await device("dave", "d1", daveStore);
const conv = (await dave.open("carol")).id;

// A message is encrypted on the wire and in storage, and the peer reads it.
await dave.send(conv, { text: "secret hello" });
await until("carol to read it", () => bodyOf(carol, conv, "secret hello"));
assert.equal(bodyOf(carol, conv, "secret hello").e2e, true);
assert.equal(bodyOf(carol, conv, "secret hello").e2e_verified, true, "the sender's key is the listed one");
const stored = await dave.request("history", { conv, limit: 10 });
const raw = JSON.stringify(stored.msgs);
assert.ok(!raw.includes("secret hello"), "the server holds no plaintext: " + raw.slice(0, 200));
assert.equal(stored.msgs.at(-1).body.e2e, 1);
await carol.send(conv, { text: "secret reply" });
await until("dave to read the reply", () => bodyOf(dave, conv, "secret reply"));
console.log("ok: e2e both ways, ciphertext stored");

// A plain client (no e2e) sees ciphertext only, marked.
const eve = await device("carol", "plain", new MemoryStorage(), false);
await until("the plain device to sync", () => last(eve, conv));
assert.ok(last(eve, conv).e2e_error, "unreadable without keys");
eve.close();
console.log("ok: a device without keys cannot read");

// After a reload (same storage) the device reads its own sent messages and the replies.
dave.close();
const again = await device("dave", "d1", daveStore);
await until("history after reload", async () => { await again.history(conv, 50).catch(() => {}); return bodyOf(again, conv, "secret hello") && bodyOf(again, conv, "secret reply"); });
console.log("ok: history after reload");

// A new device of the sender: later messages are encrypted for it too; the peer hears of it.
let keysPushes = 0;
carol.on("keys", () => keysPushes++);
const d2 = await device("dave", "d2");
await until("carol to hear of dave's new device", () => keysPushes > 0);
await sleep(100);
await again.send(conv, { text: "for every device" });
await until("d2 to read it", () => bodyOf(d2, conv, "for every device"));
await until("carol to read it", () => bodyOf(carol, conv, "for every device"));
console.log("ok: a new device");

// Prekeys exhausted: sessions still start (on the signed prekey alone).
for (let i = 0; i < 25; i++) await again.request("keys_claim", { user: "carol", devices: ["c1"] });
const left = await carol.request("keys_count");
assert.equal(left.prekeys, 0);
const d3 = await device("dave", "d3");
await d3.send(conv, { text: "no prekey left" });
await until("carol to read it without a one-time prekey", () => bodyOf(carol, conv, "no prekey left"));
console.log("ok: prekeys exhausted");

// A changed key: carol's device starts over with new keys; dave's next message uses them.
const before = await again.e2e.fingerprint((await again.request("keys_devices", { user: "carol" })).devices[0].identity);
let changes = 0;
again.on("keys", (k) => { if (k.user === "carol") changes++; });
carol.close();
const carolAgain = await device("carol", "c1"); // fresh storage: a new identity, a new login
await until("dave to hear of the change", () => changes >= 2); // old keys gone, new ones up
const after = await again.e2e.fingerprint((await again.request("keys_devices", { user: "carol" })).devices[0].identity);
assert.notEqual(before, after, "the fingerprint shows the change");
await again.send(conv, { text: "after the change" });
await until("the new carol reads it", () => bodyOf(carolAgain, conv, "after the change"));
// What was encrypted for her old keys stays unreadable, and says why.
assert.match(bodyOf(carolAgain, conv, "after the change") && carolAgain.convs.get(conv).msgs.get(1).e2e_error, /earlier key/);
console.log("ok: changed key");

// A header naming a key the directory does not list for that device is flagged: here a
// message from d1 whose header claims another identity (d2's, as a server could substitute).
{
  const real = again.e2e.state;
  const realIdentity = again.e2e.identity;
  again.e2e.state = { ...structuredClone(real), ik: d2.e2e.state.ik, sk: d2.e2e.state.sk, out: {} };
  again.e2e.identity = d2.e2e.identity;
  await again.send(conv, { text: "forged identity" });
  again.e2e.state = real;
  again.e2e.identity = realIdentity;
  await until("the forged one to arrive", () => bodyOf(carolAgain, conv, "forged identity"));
  assert.equal(bodyOf(carolAgain, conv, "forged identity").e2e_verified, false, "flagged");
}
console.log("ok: a key the directory does not list is flagged");

// A peer without keys (a bot, a client without encryption) gets plaintext, and it is said.
const frank = await device("frank", "f1", new MemoryStorage(), false);
let plain = null;
again.on("e2e_plain", (d) => { plain = d; });
const toFrank = (await again.open("frank")).id;
await again.send(toFrank, { text: "frank has no keys" });
await until("frank to read it", () => bodyOf(frank, toFrank, "frank has no keys"));
assert.deepEqual(plain, { user: "frank" });
console.log("ok: a peer without keys");

for (const c of [carolAgain, again, d2, d3, frank]) c.close();
process.exit(0);
