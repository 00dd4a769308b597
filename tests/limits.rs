//! Bad input and limits, against the real server binary: malformed and oversized requests,
//! floods, trickling and silent clients, slow readers, failed logins. Each gets a clear error
//! or an observable close, and costs the server nothing else.

mod common;

use std::time::Duration;

use common::{http_get, open, send, seqs, Client, Server};
use serde_json::{json, Value};
use tungstenite::Message;

/// A request head that trickles in (each piece well within the per-read timeout) is dropped
/// once the whole request is 10 s late, so slow clients cannot hold sockets forever.
#[test]
fn a_trickling_request_is_dropped_at_its_deadline() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still open after 20 s"
        );
        let mut byte = [0u8; 1];
        match s.read(&mut byte) {
            Ok(0) => break started.elapsed(),
            Ok(_) => panic!("the server answered an incomplete request"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break started.elapsed(), // reset
        }
        std::thread::sleep(Duration::from_millis(800));
        let _ = s.write_all(b"X-Slow: 1\r\n");
    };
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(13)).contains(&closed_after),
        "closed after {closed_after:?}"
    );
}

#[test]
fn failed_logins_are_limited_per_connection() {
    let server = Server::start(&[]);
    server.user("carol", "pc");
    let mut c = server.client();
    for _ in 0..5 {
        assert_eq!(
            c.err(
                "login",
                json!({ "username": "carol", "password": "not-the-password", "device": "pc" })
            ),
            "bad_credentials"
        );
    }
    assert_eq!(c.close_code(), Some(1008));
}

#[test]
fn bad_input_gets_errors_not_crashes() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    server.user("carol", "pc");
    let conv = open(&mut alice, "bob");
    let text = |c: &mut Client, raw: &str| -> Value {
        c.ws.send(Message::text(raw.to_owned())).unwrap();
        c.next_frame().expect("an error frame, not a close")
    };
    assert_eq!(text(&mut alice, "{not json")["error"]["code"], "bad_json");
    assert_eq!(
        text(&mut alice, r#"{"op":"fly","rid":1}"#)["error"]["code"],
        "unknown_op"
    );
    assert_eq!(text(&mut alice, r#"{"op":"fly","rid":1}"#)["rid"], 1);
    assert_eq!(
        text(&mut alice, r#"{"op":"send","rid":2,"conv":5,"body":1}"#)["error"]["code"],
        "bad_request"
    );
    assert_eq!(
        text(&mut alice, r#"{"op":"send","rid":"x"}"#)["error"]["code"],
        "bad_request"
    );
    assert_eq!(
        text(&mut alice, r#"{"op":"ping"}"#)["error"]["code"],
        "bad_request",
        "rid is required"
    );
    assert_eq!(
        text(&mut alice, r#"[1,2,3]"#)["error"]["code"],
        "bad_request"
    );
    assert_eq!(
        alice.err("send", json!({ "conv": "not-a-conv", "body": 1 })),
        "bad_request"
    );
    assert_eq!(
        alice.err(
            "send",
            json!({ "conv": conv, "id": "not-a-uuid", "body": 1 })
        ),
        "bad_request"
    );
    assert_eq!(
        alice.err("send", json!({ "conv": conv, "body": "x".repeat(20_000) })),
        "body_too_large"
    );
    // A conversation alice is not in, and one that was never opened.
    let carol = hermod_conv("bob", "carol");
    assert_eq!(
        alice.err("send", json!({ "conv": carol, "body": 1 })),
        "not_member"
    );
    assert_eq!(
        bob.err("send", json!({ "conv": carol, "body": 1 })),
        "no_such_conversation"
    );
    assert_eq!(
        alice.err("read", json!({ "conv": carol, "seq": 1 })),
        "no_such_conversation"
    );
    assert_eq!(
        send(&mut alice, &conv, "still fine")["seq"],
        1,
        "errors cost nothing else"
    );

    // Binary frames, oversized frames and broken framing close the connection with a code.
    let (mut c, _) = server.user("dave", "pc");
    c.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(c.close_code(), Some(1003));
    let (mut c, _) = server.user("erin", "pc");
    c.ws.send(Message::text("x".repeat(70_000))).unwrap();
    assert_eq!(c.close_code(), Some(1009));
    // Unmasked client frame, written raw after the handshake.
    let mut raw = server.client();
    use std::io::Write;
    raw.ws
        .get_mut()
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .unwrap();
    assert_eq!(raw.close_code(), Some(1002));

    // Everyone else is unaffected.
    assert_eq!(bob.push()["msg"]["seq"], 1);
    assert_eq!(send(&mut bob, &conv, "still here")["seq"], 2);
}

/// The id the server gives the conversation of two users.
fn hermod_conv(a: &str, b: &str) -> String {
    hermod_shards::ConvId::direct(
        hermod_shards::UserId::from_username(a),
        hermod_shards::UserId::from_username(b),
    )
    .to_string()
}

#[test]
fn flood_is_rate_limited() {
    let server = Server::start(&[]);
    let (mut c, _) = server.user("flood", "pc");
    for rid in 0..2_500u64 {
        c.send_json(&json!({ "op": "ping", "rid": rid }));
    }
    let mut limited = 0;
    for _ in 0..2_500 {
        let f = c.next_frame().expect("a reply to every request");
        if f["error"]["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(
        limited >= 400,
        "requests over 2000/s are refused ({limited} were)"
    );
}

#[test]
fn silent_connection_times_out() {
    let server = Server::start(&[
        "--heartbeat-timeout-ms",
        "1500",
        "--heartbeat-interval-ms",
        "500",
    ]);
    let (mut c, _) = server.user("quiet", "pc");
    // Stay silent: no frame, not even a pong (the bytes are read raw afterwards).
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(c.raw_close_code(), Some(4000));
    // A client that reads (and so answers pings) stays connected.
    let (mut live, _) = server.user("lively", "pc");
    for _ in 0..4 {
        assert!(live.push_within(Duration::from_millis(800)).is_none());
    }
    live.ok("ping", json!({}));
}

#[test]
fn slow_reader_is_cut_off_without_hurting_others_or_losing_messages() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    // Bob logs in on a socket with a tiny receive buffer and then stops reading.
    let mut bob = Client::slow(server.addr, "bob", "slow");

    // ~10 MB of pushes: far beyond the socket buffers and the 1 MiB outbox.
    let body = "x".repeat(15_000);
    let started = std::time::Instant::now();
    for _ in 0..700 {
        send(&mut alice, &conv, &body);
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a slow reader does not slow the sender down"
    );

    // The server gives up on bob (outbox full, then the write times out): reading what was
    // buffered ends in a close, not in 700 pushes.
    let mut pushed = 0;
    while bob.next_frame().is_some() {
        pushed += 1;
    }
    assert!(pushed < 700, "bob was cut off ({pushed} pushes read)");

    // Nothing is lost: a new connection syncs everything.
    let (mut bob, _) = server.user("bob", "pc2");
    let mut after = 0;
    loop {
        let r = bob.ok(
            "sync",
            json!({ "convs": [{ "conv": conv, "after": after }] }),
        );
        let page = &r["convs"][0];
        for seq in seqs(&page["msgs"]) {
            assert_eq!(seq, after + 1);
            after = seq;
        }
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(after, 700);
}

/// Bodies nested deeper than 32 levels are refused (their recipients' parsers may recurse).
#[test]
fn deeply_nested_bodies_are_refused() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    let nested = |n: usize| -> Value {
        serde_json::from_str(&format!("{}{}", "[".repeat(n), "]".repeat(n))).unwrap()
    };
    alice.ok("send", json!({ "conv": conv, "body": nested(32) }));
    assert_eq!(
        alice.err("send", json!({ "conv": conv, "body": nested(33) })),
        "bad_request"
    );
    // Deeper than serde_json's own recursion limit: still a clean refusal.
    let deep = format!(
        r#"{{"op":"send","rid":9,"conv":"{conv}","body":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    alice.ws.send(Message::text(deep)).unwrap();
    let reply = alice.next_frame().unwrap();
    assert_eq!(reply["rid"], 9, "{reply}");
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
}

/// The HTTP head limits hold however the head arrives: over 8 KiB in one write, or more than
/// 32 header lines, get 431.
#[test]
fn http_head_limits_hold_in_one_read() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let ask = |head: String| -> String {
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9_000));
    assert!(ask(big).starts_with("HTTP/1.1 431"));
    let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(33));
    assert!(ask(many).starts_with("HTTP/1.1 431"));
    let fine = format!("GET /healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(31));
    assert!(ask(fine).starts_with("HTTP/1.1 200"));
    // Counted, on whichever shards accepted the two refused connections.
    let metrics = http_get(server.addr, "/metrics");
    let refused = common::metric_sum(&metrics, "hermod_refusals_total", "http_head_too_large");
    assert_eq!(refused, 2, "{metrics}");
}
