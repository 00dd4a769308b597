//! The client library, `hermod.js`, driven directly in Node against the real server:
//! `tests/client/hermod.test.mjs` loads it from the server's `/hermod.js` and checks typed
//! events, reconnecting with unsent messages (sent once each), a seq gap filled by `sync`,
//! catch-up after a reconnect, edits, recalls, reads, typing, group events, a refused send.
//!
//! Needs Node.js 20 or later (`--experimental-websocket`; `scripts/browser-deps.sh` installs
//! it with the browser test's dependencies).

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

#[test]
fn hermod_js_in_node() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/client/hermod.test.mjs");
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
        "hermod.js test failed ({})\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "messages",
        "reconnect with unsent messages",
        "gap then sync",
        "catch-up after reconnect",
        "edit, recall, read, typing, group",
        "failed send",
    ] {
        assert!(
            stdout.contains(&format!("ok: {step}")),
            "step {step:?} did not report:\n{stdout}"
        );
    }
}
