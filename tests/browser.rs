//! The web client in a real browser: starts the server and runs `tests/browser/chat.mjs`
//! (playwright-core driving Debian's Chromium, two contexts as two users: register, chat both
//! ways encrypted end to end (fingerprints shown; the data dir then holds no plaintext of it),
//! a picture, reload, lose and regain the network (an upload resuming across it), edit and
//! recall, friends and presence, a group, a channel, a live room, an operator's kick).
//!
//! Needs node, `/usr/bin/chromium` and `tests/browser/node_modules`; `scripts/test.sh`
//! installs them (`scripts/browser-deps.sh`). Without them this test fails and says so.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

#[test]
fn web_client_in_chromium() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        dir.join("node_modules/playwright-core").is_dir() && Path::new(&chromium).exists(),
        "browser test dependencies missing: run `bash scripts/browser-deps.sh` \
         (scripts/test.sh does) to install Chromium and playwright-core"
    );
    const ADMIN: &str = "browser-test-admin-token-0123";
    let server = Server::start(&["--admin-token", ADMIN]);
    let shots = std::env::temp_dir().join("hermod-browser-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let out = Command::new("node")
        .arg(dir.join("chat.mjs"))
        .arg(format!("http://{}/", server.addr))
        .arg(&shots)
        .env("CHROMIUM", &chromium)
        .env("HERMOD_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("run node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser test failed ({}); screenshots in {}\n{stdout}\n{stderr}",
        out.status,
        shots.display()
    );
    // What the server stored of the one-to-one chat holds no plaintext (the group's does: groups
    // are not encrypted). RocksDB's WAL and tables keep record bytes as written.
    let mut stored = Vec::new();
    for entry in walk(&server.data) {
        stored.extend(std::fs::read(entry).unwrap_or_default());
    }
    let stored = String::from_utf8_lossy(&stored);
    // Nor of the file bob sent alice (encrypted before upload), whose ciphertext is stored.
    let cipher_len = 5 * 1024 * 1024 / 2 + 16;
    assert!(
        walk(&server.data.join("media"))
            .iter()
            .any(|f| f.metadata().is_ok_and(|m| m.len() == cipher_len)),
        "the uploaded file's ciphertext is stored"
    );
    for plain in [
        "hello bob",
        "hi alice",
        "missed three",
        "written offline",
        "notes-plaintext-marker",
    ] {
        assert!(!stored.contains(plain), "{plain:?} is stored in plaintext");
    }
    // The check can see a stored body: the group's message is there in clear.
    assert!(stored.contains("hello team"), "the data dir was not read");
    for step in [
        "end-to-end encrypted",
        "a picture sent and shown",
        "a recalled picture deleted",
        "chat both ways",
        "history after reload",
        "missed messages",
        "an upload resumed",
        "edit and recall",
        "presence dots",
        "group",
        "members and removal",
        "a channel created",
        "a live room joined",
        "kicked by an operator",
    ] {
        assert!(
            stdout.contains(step),
            "step {step:?} did not report:\n{stdout}"
        );
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
