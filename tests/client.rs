//! The client library, `hermod.js`, driven directly in Node against the real server:
//! `tests/client/hermod.test.mjs` loads it from the server's `/hermod.js` and checks typed
//! events, reconnecting with unsent messages (sent once each), a seq gap filled by `sync`,
//! catch-up after a reconnect, edits, recalls, reads, typing, group events, a refused send,
//! channels and rooms, uploads (encrypted too, and resumed across network failures);
//! and `tests/client/e2e.test.mjs` its end-to-end encryption (docs/e2e.md): ciphertext on the
//! server, both ways, history after a reload, a new device, exhausted prekeys, a changed key.
//!
//! Needs Node.js 20 or later (`--experimental-websocket`; `scripts/browser-deps.sh` installs
//! it with the browser test's dependencies).

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

#[test]
fn hermod_js_encrypts_end_to_end_in_node() {
    run(
        "e2e.test.mjs",
        &[
            "e2e both ways, ciphertext stored",
            "a device without keys cannot read",
            "history after reload",
            "a new device",
            "prekeys exhausted",
            "changed key",
            "a key the directory does not list is flagged",
            "a peer without keys",
        ],
    );
}

#[test]
fn hermod_js_in_node() {
    run(
        "hermod.test.mjs",
        &[
            "messages",
            "reconnect with unsent messages",
            "gap then sync",
            "catch-up after reconnect",
            "edit, recall, read, typing, group",
            "failed send",
            "channel",
            "live room",
            "media upload",
            "media encrypted end to end",
            "media deleted by its uploader",
            "media upload resumed after network failures",
        ],
    );
}

/// Runs `tests/client/<script>` against a fresh server; every step must report `ok: <step>`.
fn run(script: &str, steps: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/client")
        .join(script);
    let server = Server::start(&[]);
    let out = Command::new("node")
        .arg("--experimental-websocket")
        .arg(&script)
        .arg(format!("http://{}/", server.addr))
        .output()
        .expect("run node (is Node.js installed? scripts/browser-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({})\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    for step in steps {
        assert!(
            stdout.contains(&format!("ok: {step}")),
            "step {step:?} did not report:\n{stdout}"
        );
    }
}
