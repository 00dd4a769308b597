//! Integration tests: the real server binary, real sockets, a real WebSocket client.
//! Every test runs its own server (2 shards, port 0, temp data dir), so they run in parallel.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{http_get, open, send, seqs, Server};
use serde_json::{json, Value};
use tungstenite::Message;

#[test]
fn http_routes() {
    let server = Server::start(&[]);
    let page = http_get(server.addr, "/");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>Hermod</title>") && page.contains("/ws"));
    assert!(http_get(server.addr, "/nope").starts_with("HTTP/1.1 404"));
    assert!(
        http_get(server.addr, "/ws").starts_with("HTTP/1.1 400"),
        "GET /ws without an upgrade"
    );
}

/// `metrics{shard=...}` summed over shards.
fn metric(text: &str, name: &str) -> u64 {
    common::metric_sum(text, name, "")
}

#[test]
fn health_readiness_and_metrics() {
    let mut server = Server::start(&[]);
    assert!(http_get(server.addr, "/healthz").starts_with("HTTP/1.1 200"));
    // Shards mark themselves ready once serving; start-up returns just before.
    let mut ready = String::new();
    for _ in 0..50 {
        ready = http_get(server.addr, "/readyz");
        if ready.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let page = http_get(server.addr, "/metrics");
    assert!(page.contains("text/plain; version=0.0.4"), "{page}");
    for family in [
        "hermod_connections",
        "hermod_users_online",
        "hermod_devices_online",
        "hermod_pending_writes",
        "hermod_loaded_conversations",
        "hermod_mail_backlog",
        "hermod_frames_in_total",
        "hermod_frames_out_total",
        "hermod_messages_appended_total",
        "hermod_messages_deduplicated_total",
        "hermod_pushes_total",
        "hermod_push_retries_total",
        "hermod_fanout_mails_total",
        "hermod_presence_pushes_total",
        "hermod_commits_total",
        "hermod_commit_ops_total",
        "hermod_errors_total",
        "hermod_store_keys_estimate",
        "hermod_store_live_data_bytes",
        "hermod_store_sst_bytes",
        "hermod_store_memtable_bytes",
    ] {
        assert!(
            page.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
        assert!(
            page.contains(&format!("{family}{{shard=\"1\"}}")),
            "{family} per shard"
        );
    }
    assert_eq!(metric(&page, "hermod_messages_appended_total"), 0);

    // Counters move (published every tick, at most 250 ms apart).
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    for i in 0..3 {
        send(&mut alice, &conv, &format!("m{i}"));
        let push = bob.push();
        bob.ack(&push);
    }
    assert_eq!(
        alice.err("send", json!({ "conv": "d.1.2", "body": 1 })),
        "not_member"
    );
    let mut appended = 0;
    let mut page = String::new();
    for _ in 0..50 {
        page = http_get(server.addr, "/metrics");
        appended = metric(&page, "hermod_messages_appended_total");
        if appended >= 3
            && page.contains("code=\"not_member\"")
            && metric(&page, "hermod_push_ack_seconds_count") >= 3
            && metric(&page, "hermod_store_memtable_bytes") > 0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(appended, 3, "{page}");
    assert!(page.contains("code=\"not_member\"} 1"), "{page}");
    assert!(metric(&page, "hermod_commit_seconds_count") >= 1, "{page}");
    assert!(
        metric(&page, "hermod_commit_writes_sum") >= 6,
        "two keys per message"
    );
    assert!(metric(&page, "hermod_commits_total") >= 1);
    // Each message reached bob's home once (alice's home too when it differs), was pushed to
    // bob and acked by him.
    assert!(
        metric(&page, "hermod_delivery_seconds_count") >= 3,
        "{page}"
    );
    assert_eq!(metric(&page, "hermod_push_ack_seconds_count"), 3, "{page}");
    assert!(
        page.contains("hermod_push_ack_seconds_bucket{shard="),
        "{page}"
    );
    // RocksDB's figures are read about once a second; accounts and messages are in memtables.
    assert!(metric(&page, "hermod_store_memtable_bytes") > 0, "{page}");
    assert!(metric(&page, "hermod_connections") >= 1);
    assert_eq!(metric(&page, "hermod_users_online"), 2, "alice and bob");
    assert_eq!(metric(&page, "hermod_devices_online"), 2);
    assert!(
        metric(&page, "hermod_frames_out_total") >= 8,
        "replies and pushes"
    );

    assert!(server.stop().success());
}

#[test]
fn register_login_resume_logout() {
    let server = Server::start(&[]);
    let mut c = server.client();
    assert_eq!(
        c.ok(
            "register",
            json!({ "username": "Alice", "password": "password123" })
        )["user"],
        "alice"
    );
    assert_eq!(
        c.err(
            "register",
            json!({ "username": "alice", "password": "password123" })
        ),
        "username_taken"
    );
    assert_eq!(
        c.err(
            "register",
            json!({ "username": "a!", "password": "password123" })
        ),
        "invalid_username"
    );
    assert_eq!(
        c.err(
            "register",
            json!({ "username": "bobby", "password": "short" })
        ),
        "weak_password"
    );
    assert_eq!(
        c.err("send", json!({ "conv": "d.1.2", "body": 1 })),
        "not_authenticated"
    );
    assert_eq!(
        c.err(
            "login",
            json!({ "username": "alice", "password": "wrong-password", "device": "pc" })
        ),
        "bad_credentials"
    );
    assert_eq!(
        c.err(
            "login",
            json!({ "username": "nobody", "password": "password123", "device": "pc" })
        ),
        "bad_credentials"
    );
    let ok = c.ok(
        "login",
        json!({ "username": "alice", "password": "password123", "device": "pc" }),
    );
    let token = ok["token"].as_str().unwrap().to_owned();
    assert_eq!(ok["user"], "alice");
    assert_eq!(
        c.err(
            "login",
            json!({ "username": "alice", "password": "password123", "device": "pc" })
        ),
        "already_authenticated"
    );

    // Resume on fresh connections, whichever shard accepts them.
    for _ in 0..4 {
        let mut r = server.client();
        let ok = r.ok("resume", json!({ "token": token }));
        assert_eq!(
            (ok["user"].as_str(), ok["device"].as_str()),
            (Some("alice"), Some("pc"))
        );
        r.ok("ping", json!({}));
    }
    let mut bad = server.client();
    assert_eq!(
        bad.err("resume", json!({ "token": "nope.nope" })),
        "bad_token"
    );
    let mut tampered = token.clone();
    tampered.insert(3, 'x');
    assert_eq!(bad.err("resume", json!({ "token": tampered })), "bad_token");

    // Logging out revokes this device's token and closes the connection normally.
    let mut r = server.client();
    r.ok("resume", json!({ "token": token }));
    r.ok("logout", json!({}));
    assert_eq!(r.close_code(), Some(1000));
    let mut again = server.client();
    assert_eq!(
        again.err("resume", json!({ "token": token })),
        "device_revoked"
    );
}

#[test]
fn new_login_on_same_device_replaces_old_session() {
    let server = Server::start(&[]);
    let (mut old, _) = server.user("dave", "phone");
    let (_new, _) = server.user("dave", "phone");
    assert_eq!(old.close_code(), Some(4002));
}

#[test]
fn one_to_one_send_ack_push_ack_and_retry() {
    let server = Server::start(&["--push-retry-ms", "300"]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    assert_eq!(
        alice.err("open", json!({ "user": "nobody" })),
        "no_such_user"
    );
    assert_eq!(alice.err("open", json!({ "user": "alice" })), "bad_request");
    let conv = open(&mut alice, "bob");
    assert_eq!(
        open(&mut bob, "alice"),
        conv,
        "both sides name the conversation alike"
    );

    let ack = send(&mut alice, &conv, "hello bob");
    assert_eq!(ack["seq"], 1);
    assert!(ack["id"].as_str().unwrap().len() == 36 && ack["ts"].as_u64().unwrap() > 0);
    let push = bob.push();
    assert_eq!(push["push"], "msg");
    assert_eq!(push["msg"]["seq"], 1);
    assert_eq!(push["msg"]["from"], "alice");
    assert_eq!(
        push["msg"]["body"],
        json!({ "text": "hello bob" }),
        "body forwarded as given"
    );
    assert_eq!(push["msg"]["id"], ack["id"]);

    // Not acked: the same push, byte for byte, comes again.
    let again = bob
        .push_within(Duration::from_secs(3))
        .expect("an unacked push is retried");
    assert_eq!(again, push, "a retry is the same frame");
    bob.ack(&again);
    // Acked: no more retries (drain any retry that raced the ack).
    std::thread::sleep(Duration::from_millis(800));
    while let Some(extra) = bob.push_within(Duration::from_millis(100)) {
        assert_eq!(extra, push, "only the acked push may still be in flight");
    }
    assert!(
        bob.push_within(Duration::from_millis(1200)).is_none(),
        "acked pushes are not retried"
    );

    // Bodies are opaque JSON of any shape, and come back byte for byte in history.
    let raw = r#"{"op":"send","rid":99,"conv":"CONV","body":{"ct":"AAEC/w==","n":[1,2.5,null]}}"#
        .replace("CONV", &conv);
    alice.ws.send(Message::text(raw)).unwrap();
    assert_eq!(alice.reply(99)["ok"]["seq"], 2);
    let hist = bob.ok("history", json!({ "conv": conv }));
    assert_eq!(seqs(&hist["msgs"]), vec![1, 2]);
    assert_eq!(
        hist["msgs"][1]["body"],
        json!({ "ct": "AAEC/w==", "n": [1, 2.5, null] })
    );
}

#[test]
fn acks_are_cumulative_per_conversation() {
    let server = Server::start(&["--push-retry-ms", "300"]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    // An ack is cumulative per conversation: acking seq 3 acks 2 as well; seq 4, not acked,
    // is retried alone. A malformed conversation in an ack is skipped, not an error.
    for text in ["one", "two", "three", "four"] {
        send(&mut alice, &conv, text);
    }
    let first = bob.push();
    assert_eq!(first["msg"]["seq"], 1);
    bob.ack(&first);
    // The first arrival of each of 2, 3, 4 (a retry repeats an earlier frame; 300 ms retries
    // may interleave on a slow machine).
    let mut pushes: Vec<Value> = Vec::new();
    while pushes.len() < 3 {
        let p = bob.push();
        if p["msg"]["seq"] != 1 && !pushes.contains(&p) {
            pushes.push(p);
        }
    }
    let pushed: Vec<u64> = pushes
        .iter()
        .map(|p| p["msg"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(pushed, [2, 3, 4]);
    bob.send_json(&json!({ "op": "ack", "seqs": { conv.as_str(): 3, "not-a-conv": 9 } }));
    // Retries of 2 and 3 that raced the ack may still arrive; then only 4's (300 ms apart).
    std::thread::sleep(Duration::from_millis(700));
    while let Some(extra) = bob.push_within(Duration::from_millis(100)) {
        assert!(pushes.contains(&extra), "{extra}");
    }
    let started = Instant::now();
    let mut retried = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        if let Some(p) = bob.push_within(Duration::from_millis(200)) {
            assert_eq!(p, pushes[2], "only seq 4 was left unacked");
            retried += 1;
        }
    }
    assert!(retried >= 2, "seq 4 keeps being retried ({retried})");
    bob.ack(&pushes[2]);
    std::thread::sleep(Duration::from_millis(800));
    while let Some(extra) = bob.push_within(Duration::from_millis(100)) {
        assert_eq!(extra, pushes[2], "only seq 4 may still be in flight");
    }
    assert!(
        bob.push_within(Duration::from_millis(1200)).is_none(),
        "a cumulative ack stops every retry it covers"
    );
}

#[test]
fn multi_device_fan_out() {
    let server = Server::start(&[]);
    let (mut a1, token) = server.user("alice", "laptop");
    let (mut a2, _) = server.user("alice", "phone");
    let (mut b, _) = server.user("bob", "pc");
    let conv = open(&mut a1, "bob");
    send(&mut a1, &conv, "from laptop");
    for c in [&mut a2, &mut b] {
        let p = c.push();
        assert_eq!(
            (p["msg"]["seq"].as_u64(), p["msg"]["dev"].as_str()),
            (Some(1), Some("laptop"))
        );
        c.ack(&p);
    }
    assert!(
        a1.push_within(Duration::from_millis(500)).is_none(),
        "the sending device gets an ack, not a push"
    );
    send(&mut b, &conv, "to both devices");
    for c in [&mut a1, &mut a2] {
        assert_eq!(c.push()["msg"]["seq"], 2);
    }
    // A resumed connection of the laptop replaces the old one and gets later pushes.
    let mut a1b = server.client();
    a1b.ok("resume", json!({ "token": token }));
    assert_eq!(a1.close_code(), Some(4002));
    send(&mut b, &conv, "third");
    assert_eq!(a1b.push()["msg"]["seq"], 3);
}

#[test]
fn offline_then_sync_in_pages_without_gaps_or_duplicates() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, bob_token) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    send(&mut alice, &conv, "before");
    let p = bob.push();
    bob.ack(&p);
    drop(bob);
    for i in 0..30 {
        send(&mut alice, &conv, &format!("m{i}"));
    }
    let mut bob = server.client();
    bob.ok("resume", json!({ "token": bob_token }));
    let list = bob.ok("convs", json!({}));
    assert_eq!(list["convs"][0]["conv"], conv.as_str());
    assert_eq!(list["convs"][0]["peer"], "alice");
    assert_eq!(list["convs"][0]["last_seq"], 31);
    assert_eq!(list["convs"][0]["unread"], 31);
    assert_eq!(list["total_unread"], 31);

    let mut seen = BTreeSet::new();
    seen.insert(1u64);
    let mut after = 1;
    let mut pages = 0;
    loop {
        let r = bob.ok(
            "sync",
            json!({ "convs": [{ "conv": conv, "after": after }], "limit": 7 }),
        );
        let page = &r["convs"][0];
        for seq in seqs(&page["msgs"]) {
            assert_eq!(seq, after + 1, "sync pages are contiguous");
            assert!(seen.insert(seq), "no duplicates");
            after = seq;
        }
        pages += 1;
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(seen, (1..=31).collect(), "nothing missed");
    assert_eq!(pages, 5);

    let read = bob.ok("read", json!({ "conv": conv, "seq": 31 }));
    assert_eq!(read["read_seq"], 31);
    bob.ok("read", json!({ "conv": conv, "seq": 5 }));
    let list = bob.ok("convs", json!({}));
    assert_eq!(
        (
            list["convs"][0]["unread"].as_u64(),
            list["convs"][0]["read_seq"].as_u64()
        ),
        (Some(0), Some(31)),
        "read cursors never move back"
    );

    // Backward history from any seq.
    let h = bob.ok("history", json!({ "conv": conv, "limit": 10 }));
    assert_eq!(seqs(&h["msgs"]), (22..=31).collect::<Vec<_>>());
    assert_eq!(h["more"], true);
    let h = bob.ok("history", json!({ "conv": conv, "before": 5, "limit": 10 }));
    assert_eq!(seqs(&h["msgs"]), vec![1, 2, 3, 4]);
    assert_eq!(h["more"], false);

    // Sync names conversations the user is not in: per-conversation errors.
    let (mut carol, _) = server.user("carol", "pc");
    let r = carol.ok("sync", json!({ "convs": [{ "conv": conv, "after": 0 }] }));
    assert_eq!(r["convs"][0]["error"], "not_member");
    assert_eq!(carol.err("history", json!({ "conv": conv })), "not_member");
}

#[test]
fn same_id_twice_is_stored_once() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    let id = "0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b";
    let first = alice.ok("send", json!({ "conv": conv, "id": id, "body": "x" }));
    let second = alice.ok("send", json!({ "conv": conv, "id": id, "body": "x" }));
    assert_eq!(first, second, "a retried send gets the original answer");
    // Also when retried from another connection of the same user, pipelined.
    let third = alice.ok(
        "send",
        json!({ "conv": conv, "id": id, "body": "different" }),
    );
    assert_eq!(third["seq"], 1);
    assert_eq!(
        seqs(&bob.ok("history", json!({ "conv": conv }))["msgs"]),
        vec![1]
    );
    assert_eq!(bob.push()["msg"]["seq"], 1);
    assert!(
        bob.push_within(Duration::from_millis(500))
            .map(|p| p["msg"]["seq"] == 1)
            .unwrap_or(true),
        "no second copy pushed"
    );
}

#[test]
fn restart_keeps_history_and_tokens() {
    let mut server = Server::start(&[]);
    let (mut alice, token) = server.user("alice", "pc");
    server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    for i in 0..5 {
        send(&mut alice, &conv, &format!("m{i}"));
    }
    let status = server.stop();
    assert!(
        status.success(),
        "SIGTERM drains and exits 0, got {status:?}"
    );
    assert_eq!(
        alice.close_code(),
        Some(1001),
        "clients are told the server is going away"
    );

    let data = server.data.clone();
    let server = Server::start_on(&data, &[]);
    let mut alice = server.client();
    alice.ok("resume", json!({ "token": token }));
    let h = alice.ok("history", json!({ "conv": conv }));
    assert_eq!(seqs(&h["msgs"]), vec![1, 2, 3, 4, 5]);
    assert_eq!(h["msgs"][4]["body"]["text"], "m4");
    assert_eq!(send(&mut alice, &conv, "after restart")["seq"], 6);
}

#[test]
fn kill_9_in_wal_mode_loses_no_acked_message() {
    let mut server = Server::start(&["--durability", "wal"]);
    let (mut alice, token) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    drop(bob.ws.close(None));

    // Pipeline sends from a thread and record every ack; kill -9 while they fly.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let writer = {
        let acked = acked.clone();
        let conv = conv.clone();
        std::thread::spawn(move || {
            for i in 0..100_000u64 {
                let rid = i + 1000;
                let id = format!("0190b2a4-8c6e-7d3e-9b1a-{:012x}", i);
                let frame = json!({ "op": "send", "rid": rid, "conv": conv, "id": id, "body": i });
                if alice.ws.send(Message::text(frame.to_string())).is_err() {
                    break;
                }
                match alice.next_frame() {
                    Some(r) if r["ok"]["seq"].is_u64() => acked
                        .lock()
                        .unwrap()
                        .push((id, r["ok"]["seq"].as_u64().unwrap())),
                    _ => break,
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "the load ran before the kill ({} acks)",
        acked.len()
    );

    let data = server.data.clone();
    let server = Server::start_on(&data, &["--durability", "wal"]);
    let mut alice = server.client();
    alice.ok("resume", json!({ "token": token }));
    let mut stored = std::collections::HashMap::new();
    let mut after = 0;
    loop {
        let r = alice.ok(
            "sync",
            json!({ "convs": [{ "conv": conv, "after": after }], "limit": 500 }),
        );
        let page = &r["convs"][0];
        for m in page["msgs"].as_array().unwrap() {
            let seq = m["seq"].as_u64().unwrap();
            assert_eq!(seq, after + 1, "no gap after a crash");
            after = seq;
            stored.insert(m["id"].as_str().unwrap().to_owned(), seq);
        }
        if page["more"] == false {
            break;
        }
    }
    for (id, seq) in &acked {
        assert_eq!(
            stored.get(id),
            Some(seq),
            "acked message {id} (seq {seq}) lost by kill -9"
        );
    }
    assert!(stored.len() >= acked.len());
}

#[test]
fn frames_pipelined_behind_login_survive_the_hand_off() {
    // The login moves the socket to the user's home shard with the bytes read past it. Over
    // several users, connections land on both shards, so both the local and the hand-off
    // paths run; every pipelined request must get its reply, in order.
    let server = Server::start(&[]);
    for i in 0..8 {
        let name = format!("pipe{i}");
        server.user(&name, "setup");
        let mut c = server.client();
        let frames = [
            json!({ "op": "login", "rid": 1, "username": name, "password": "password123", "device": "pc" }),
            json!({ "op": "ping", "rid": 2 }),
            json!({ "op": "convs", "rid": 3 }),
        ];
        for f in &frames {
            c.ws.write(Message::text(f.to_string())).unwrap();
        }
        c.ws.flush().unwrap(); // one write: the three frames travel together
        for rid in 1..=3 {
            let r = c.next_frame().expect("a reply");
            assert_eq!(r["rid"], rid, "{r}");
            assert!(r.get("ok").is_some(), "{r}");
        }
    }
    // Register, log in and use the session in one write: frames behind a password hash wait
    // for it and run in order.
    let mut c = server.client();
    let frames = [
        json!({ "op": "register", "rid": 1, "username": "eager", "password": "password123" }),
        json!({ "op": "login", "rid": 2, "username": "eager", "password": "password123", "device": "pc" }),
        json!({ "op": "convs", "rid": 3 }),
    ];
    for f in &frames {
        c.ws.write(Message::text(f.to_string())).unwrap();
    }
    c.ws.flush().unwrap();
    for rid in 1..=3 {
        let r = c.next_frame().expect("a reply");
        assert_eq!(r["rid"], rid, "{r}");
        assert!(r.get("ok").is_some(), "{r}");
    }
}

/// `read` past the last seq stops at it, so later messages count as unread again; a
/// sender's own messages are never unread for them (sending moves their cursor).
#[test]
fn read_cursors_stop_at_the_last_message_and_sending_marks_read() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    for i in 0..3 {
        send(&mut alice, &conv, &format!("m{i}"));
    }
    let r = bob.ok("read", json!({ "conv": conv, "seq": 1_000_000 }));
    assert_eq!(r["read_seq"], 3, "capped at the last seq");
    send(&mut alice, &conv, "later");
    let list = bob.ok("convs", json!({}));
    assert_eq!(
        (
            list["convs"][0]["read_seq"].as_u64(),
            list["convs"][0]["unread"].as_u64()
        ),
        (Some(3), Some(1)),
        "{list}"
    );
    // Alice wrote all four: none is unread for her, on any device.
    let (mut alice2, _) = server.user("alice", "phone");
    for c in [&mut alice, &mut alice2] {
        let list = c.ok("convs", json!({}));
        assert_eq!(
            (
                list["convs"][0]["read_seq"].as_u64(),
                list["convs"][0]["unread"].as_u64()
            ),
            (Some(4), Some(0)),
            "{list}"
        );
    }
    // Bob replies: his cursor moves to his message, which alice sees as peer_read_seq.
    let reply = send(&mut bob, &conv, "reply")["seq"].as_u64().unwrap();
    let list = alice.ok("convs", json!({}));
    assert_eq!(
        list["convs"][0]["peer_read_seq"].as_u64(),
        Some(reply),
        "{list}"
    );
    assert_eq!(list["convs"][0]["unread"], 1);
    // A read behind the cursor answers the cursor.
    assert_eq!(
        bob.ok("read", json!({ "conv": conv, "seq": 1 }))["read_seq"],
        reply
    );
}
