// End-to-end test of the web client (src/web/index.html) in Debian's Chromium, driven by
// playwright-core. Run by tests/browser.rs against a real server:
//
//   node tests/browser/chat.mjs http://127.0.0.1:PORT SCREENSHOT_DIR
//
// Two browser contexts are two users. Bob's page goes through a TCP proxy in this process, so
// the test can cut his network for real (sockets reset, new connections refused) and restore it.
// On failure both pages are saved as screenshots in SCREENSHOT_DIR and the exit code is 1.

import assert from "node:assert/strict";
import fs from "node:fs";
import net from "node:net";
import { chromium } from "playwright-core";

const [serverUrl, shotsDir = "."] = process.argv.slice(2);
if (!serverUrl) {
  console.error("usage: node chat.mjs http://HOST:PORT [SCREENSHOT_DIR]");
  process.exit(2);
}
const WAIT = 15_000;

/** A TCP proxy to the server whose connections can be cut and refused, and then allowed again. */
function startProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) return client.destroy();
    const upstream = net.connect(Number(port), hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        url: `http://127.0.0.1:${server.address().port}/`,
        cut() {
          down = true;
          for (const s of sockets) s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
        },
        restore() {
          down = false;
        },
        close: () => server.close(),
      }),
    ),
  );
}

/** Answers the page's prompt() dialogs with these texts, in order. */
function answerPrompts(page, answers) {
  const queue = [...answers];
  const handler = (dialog) => {
    const answer = queue.shift();
    if (queue.length === 0) page.off("dialog", handler);
    return answer === undefined ? dialog.dismiss() : dialog.accept(answer);
  };
  page.on("dialog", handler);
}

async function register(page, url, name) {
  await page.goto(url);
  await page.fill("#username", name);
  await page.fill("#password", "password123");
  await page.click("#register");
  await page.locator("#app").waitFor({ state: "visible", timeout: WAIT });
  assert.equal(await page.textContent("#who"), "@" + name);
}

const msg = (page, text) => page.locator("#msgs .msg", { hasText: text });
const conv = (page, name) => page.locator("#convs li", { has: page.locator(".name", { hasText: name }) });

async function send(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
  await msg(page, text).locator(".state", { hasText: /sent|read/ }).waitFor({ timeout: WAIT });
}

async function run(browser, pages) {
  const proxy = await startProxy(serverUrl);
  const alice = await (await browser.newContext()).newPage();
  const bob = await (await browser.newContext()).newPage();
  pages.push(["alice", alice], ["bob", bob]);
  try {
    await register(alice, serverUrl, "alice");
    await register(bob, proxy.url, "bob");

    // One-to-one, both ways, with unread badges and read ticks.
    await alice.fill("#peer", "bob");
    await alice.press("#peer", "Enter");
    await alice.locator("#chattitle", { hasText: "bob" }).waitFor({ timeout: WAIT });
    await send(alice, "hello bob");
    await conv(bob, "alice").locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
    await conv(bob, "alice").click();
    await msg(bob, "hello bob").waitFor({ timeout: WAIT });
    await msg(alice, "hello bob").locator(".state.read").waitFor({ timeout: WAIT });
    await send(bob, "hi alice");
    await msg(alice, "hi alice").waitFor({ timeout: WAIT });
    console.log("ok: chat both ways, unread badge, read tick");

    // Encrypted end to end: both show the lock with the other's key fingerprint, and they match.
    await alice.locator("#lock", { hasText: "🔒" }).waitFor({ timeout: WAIT });
    await bob.locator("#lock", { hasText: "🔒" }).waitFor({ timeout: WAIT });
    const fpOfBob = await alice.evaluate(async () => {
      const d = await window.hermod.request("keys_devices", { user: "bob" });
      return window.hermod.e2e.fingerprint(d.devices[0].identity);
    });
    const bobsOwn = await bob.evaluate(() => window.hermod.e2e.fingerprint(window.hermod.e2e.identity));
    assert.equal(fpOfBob, bobsOwn, "alice sees bob's real key");
    assert.ok((await alice.textContent("#lock")).includes(fpOfBob.slice(0, 19)));
    console.log("ok: end-to-end encrypted, fingerprints shown");

    // A picture: alice attaches it (uploaded over HTTP, its URL sent inside the encrypted
    // message), bob's page shows it inline, loaded.
    const png = Buffer.from(
      "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==",
      "base64",
    );
    await alice.setInputFiles("#attach", { name: "dot.png", mimeType: "image/png", buffer: png });
    const pic = bob.locator("#msgs .msg img.media");
    await pic.waitFor({ timeout: WAIT });
    await bob.waitForFunction(() => {
      const img = document.querySelector("#msgs .msg img.media");
      return img && img.complete && img.naturalWidth === 1;
    }, null, { timeout: WAIT });
    await alice.locator("#msgs .msg img.media").waitFor({ timeout: WAIT });
    console.log("ok: a picture sent and shown");

    // Alice recalls it: bob's page drops it, and the medium itself is deleted (its URL, which
    // bob's copy of the message carried, reads 404 from then on).
    const picUrl = await alice.evaluate(() => {
      for (const c of window.hermod.convs.values()) for (const m of c.msgs.values()) if (m.body && m.body.media) return m.body.media.url;
    });
    assert.equal((await fetch(picUrl)).status, 200);
    await alice.locator("#msgs .msg", { has: alice.locator("img.media") }).locator("button.recall").click();
    await bob.locator("#msgs .msg img.media").waitFor({ state: "detached", timeout: WAIT });
    const gone = Date.now() + WAIT;
    while ((await fetch(picUrl)).status !== 404) {
      assert.ok(Date.now() < gone, "the recalled picture's medium is deleted");
      await new Promise((r) => setTimeout(r, 100));
    }
    console.log("ok: a recalled picture deleted");

    // A reload keeps the history (resume with the stored token, then history).
    await alice.reload();
    await conv(alice, "bob").click({ timeout: WAIT });
    await msg(alice, "hello bob").waitFor({ timeout: WAIT });
    await msg(alice, "hi alice").waitFor({ timeout: WAIT });
    console.log("ok: history after reload");

    // Bob's network goes down: what alice sends meanwhile, and what bob typed offline, arrive
    // once it is back — each exactly once.
    proxy.cut();
    await bob.locator("#status.offline").waitFor({ timeout: WAIT });
    for (const t of ["missed one", "missed two", "missed three"]) await send(alice, t);
    await bob.fill("#text", "written offline");
    await bob.press("#text", "Enter");
    await msg(bob, "written offline").locator(".state", { hasText: "sending" }).waitFor({ timeout: WAIT });
    await bob.waitForTimeout(500);
    proxy.restore();
    for (const t of ["missed one", "missed two", "missed three"]) {
      await msg(bob, t).waitFor({ timeout: 3 * WAIT });
    }
    await msg(bob, "written offline").locator(".state", { hasText: /sent|read/ }).waitFor({ timeout: WAIT });
    await msg(alice, "written offline").waitFor({ timeout: WAIT });
    assert.equal(await msg(alice, "written offline").count(), 1, "the resent message is not doubled");
    const texts = await bob.locator("#msgs .msg .text").allTextContents();
    assert.deepEqual(
      texts.filter((t) => t.startsWith("missed")),
      ["missed one", "missed two", "missed three"],
      "missed messages arrive once, in order",
    );
    console.log("ok: missed messages after the connection came back");

    // Bob attaches a 2.5 MiB file (three 1 MiB chunks). When the second chunk starts, his
    // network goes down for 1.5 s: the chunk and the WebSocket fail, the page keeps retrying
    // from where the server says the upload stands (HEAD), and once the network is back the
    // upload finishes and the message carrying it goes out. Alice gets exactly the bytes. In
    // this one-to-one chat the bytes are encrypted end to end: tests/browser.rs checks that the
    // server stored the file's ciphertext only (its marker is nowhere in the data dir).
    const file = Buffer.alloc(2.5 * 1024 * 1024);
    for (let i = 0; i < file.length; i += 4) file.writeUInt32LE((i * 2654435761) >>> 0, i);
    file.write("notes-plaintext-marker", 0);
    const patches = [];
    await bob.route("**/media/uploads/**", async (route) => {
      if (route.request().method() === "PATCH") {
        patches.push(route.request().headers()["upload-offset"]);
        if (patches.length === 2) {
          proxy.cut();
          setTimeout(() => proxy.restore(), 1500);
        }
      }
      await route.continue().catch(() => {}); // refused while the network is down
    });
    await bob.setInputFiles("#attach", { name: "notes.bin", mimeType: "application/octet-stream", buffer: file });
    await bob.locator("#status.offline").waitFor({ timeout: WAIT });
    const link = alice.locator("#msgs .msg a.file", { hasText: "🔒 notes.bin" });
    await link.waitFor({ timeout: 3 * WAIT });
    const raw = Buffer.from(await (await fetch(await link.getAttribute("href"))).arrayBuffer());
    assert.equal(raw.length, file.length + 16, "the server holds the ciphertext and its tag");
    assert.ok(!raw.includes("notes-plaintext-marker"), "the server holds no plaintext of it");
    const [saved] = await Promise.all([alice.waitForEvent("download", { timeout: WAIT }), link.click()]);
    const got = fs.readFileSync(await saved.path());
    assert.ok(got.equals(file), `alice saved ${got.length} bytes, not the file`);
    assert.equal(saved.suggestedFilename(), "notes.bin");
    assert.ok(patches.length >= 4, `a chunk was sent again after the cut (PATCHes at ${patches})`);
    assert.equal(patches[0], "0");
    assert.ok(patches.includes(String(1024 * 1024)) && patches.includes(String(2 * 1024 * 1024)), `resumed at the stored offsets: ${patches}`);
    await bob.locator("#progress.hidden").waitFor({ state: "attached", timeout: WAIT });
    await bob.unroute("**/media/uploads/**");
    console.log("ok: an upload resumed after the network came back");

    // Edit and recall one's own messages.
    answerPrompts(alice, ["missed one (fixed)"]);
    await msg(alice, "missed one").locator("button.edit").click();
    await msg(bob, "missed one (fixed)").locator(".edited").waitFor({ timeout: WAIT });
    await msg(alice, "missed two").locator("button.recall").click();
    await msg(bob, "missed two").waitFor({ state: "detached", timeout: WAIT });
    assert.equal(
      await bob.locator("#msgs .msg.recalled", { hasText: "message recalled" }).count(),
      2,
      "the recalled text shows as recalled (as does the picture recalled before)",
    );
    console.log("ok: edit and recall");

    // Friends, then presence dots.
    await bob.click("#befriend");
    await alice.locator("#requests button", { hasText: "accept" }).click({ timeout: WAIT });
    await conv(alice, "bob").locator(".dot.online").waitFor({ timeout: WAIT });
    await conv(bob, "alice").locator(".dot.online").waitFor({ timeout: WAIT });
    // Alice's tab goes to the background: bob sees her away, then back online.
    const setHidden = (hidden) =>
      alice.evaluate((h) => {
        Object.defineProperty(document, "hidden", { value: h, configurable: true });
        document.dispatchEvent(new Event("visibilitychange"));
      }, hidden);
    await setHidden(true);
    await conv(bob, "alice").locator(".dot.away").waitFor({ timeout: WAIT });
    await setHidden(false);
    await conv(bob, "alice").locator(".dot.online").waitFor({ timeout: WAIT });
    console.log("ok: friends and presence dots");

    // A group with a member added at creation.
    answerPrompts(alice, ["Team", "bob"]);
    await alice.click("#newgroup");
    await alice.locator("#chattitle", { hasText: "Team (group)" }).waitFor({ timeout: WAIT });
    await send(alice, "hello team");
    await conv(bob, "Team").click({ timeout: WAIT });
    await msg(bob, "hello team").waitFor({ timeout: WAIT });
    await bob.locator("#msgs .sys", { hasText: 'alice created "Team"' }).waitFor({ timeout: WAIT });
    console.log("ok: group");

    // The owner sees the members and removes bob; bob's sends there are refused from then on.
    await alice.click("#showmembers");
    await alice.locator('#members .member[data-user="alice"]', { hasText: "owner" }).waitFor({ timeout: WAIT });
    const bobEntry = alice.locator('#members .member[data-user="bob"]', { hasText: "member" });
    await bobEntry.locator("button.remove").click({ timeout: WAIT });
    await bob.locator("#msgs .sys", { hasText: "alice removed bob" }).waitFor({ timeout: WAIT });
    await alice.locator('#members .member[data-user="bob"]').waitFor({ state: "detached", timeout: WAIT });
    await bob.fill("#text", "after removal");
    await bob.press("#text", "Enter");
    await msg(bob, "after removal").locator(".state", { hasText: "failed: not_member" }).waitFor({ timeout: WAIT });
    console.log("ok: members and removal");

    // A channel: alice creates it (its id is in her title), bob subscribes with that id and
    // reads her posts; his own post there is refused (only publishers post).
    answerPrompts(alice, ["Release notes"]);
    await alice.click("#newchannel");
    const title = alice.locator("#chattitle", { hasText: "Release notes (channel c." });
    await title.waitFor({ timeout: WAIT });
    const channel = (await title.textContent()).match(/c\.[0-9a-f]+/)[0];
    await send(alice, "v1.0 is out");
    await bob.fill("#peer", channel);
    await bob.press("#peer", "Enter");
    await bob.locator("#chattitle", { hasText: "Release notes (channel" }).waitFor({ timeout: WAIT });
    await msg(bob, "v1.0 is out").waitFor({ timeout: WAIT });
    await send(alice, "v1.1 is out");
    await msg(bob, "v1.1 is out").waitFor({ timeout: WAIT });
    await bob.fill("#text", "can I post?");
    await bob.press("#text", "Enter");
    await msg(bob, "can I post?").locator(".state", { hasText: "failed: forbidden" }).waitFor({ timeout: WAIT });
    await bob.click("#leave");
    await conv(bob, "Release notes").waitFor({ state: "detached", timeout: WAIT });
    console.log("ok: a channel created, subscribed to and left");

    // A live room: alice creates it, bob joins with its id and gets the recent window; both
    // talk live; nothing of it is kept as a conversation.
    answerPrompts(alice, ["Keynote"]);
    await alice.click("#newroom");
    const roomTitle = alice.locator("#chattitle", { hasText: "Keynote (live room r." });
    await roomTitle.waitFor({ timeout: WAIT });
    const room = (await roomTitle.textContent()).match(/r\.[0-9a-f]+/)[0];
    await alice.fill("#text", "welcome");
    await alice.press("#text", "Enter");
    await msg(alice, "welcome").waitFor({ timeout: WAIT });
    await bob.fill("#peer", room);
    await bob.press("#peer", "Enter");
    await msg(bob, "welcome").waitFor({ timeout: WAIT }); // from the window
    await bob.fill("#text", "hello from the floor");
    await bob.press("#text", "Enter");
    await msg(alice, "hello from the floor").waitFor({ timeout: WAIT });
    await msg(bob, "hello from the floor").waitFor({ timeout: WAIT });
    await alice.fill("#text", "thanks bob");
    await alice.press("#text", "Enter");
    await msg(bob, "thanks bob").waitFor({ timeout: WAIT });
    assert.equal(await msg(bob, "welcome").count(), 1, "each message once");
    console.log("ok: a live room joined by id");

    // An operator kicks bob's device (admin API): his page drops the revoked token and asks
    // him to log in again, saying why.
    const token = process.env.HERMOD_ADMIN_TOKEN;
    assert.ok(token, "HERMOD_ADMIN_TOKEN is set by tests/browser.rs");
    const kicked = await fetch(new URL("admin/users/bob/kick", serverUrl), {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    });
    assert.equal(kicked.status, 200, await kicked.text());
    await bob.locator("#auth").waitFor({ state: "visible", timeout: WAIT });
    await bob.locator("#error", { hasText: "operator" }).waitFor({ timeout: WAIT });
    assert.equal(await bob.evaluate(() => localStorage.hermodToken), undefined);
    console.log("ok: kicked by an operator");
  } finally {
    proxy.close();
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const pages = [];
let failed = false;
try {
  await run(browser, pages);
} catch (err) {
  failed = true;
  console.error("browser test failed:", err);
  for (const [name, page] of pages) {
    const path = `${shotsDir}/browser-${name}.png`;
    try {
      await page.screenshot({ path, fullPage: true });
      console.error("screenshot:", path);
    } catch (e) {
      console.error(`no screenshot of ${name}:`, e.message);
    }
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
