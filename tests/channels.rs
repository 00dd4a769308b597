//! Channels (docs/channels.md) against the real server binary (2 shards): publishers post,
//! subscribers get best-effort pushes and read by seq, subscriptions are counted and survive a
//! restart, a slow subscriber loses pushes but not its connection nor anyone else's posts.

mod common;

use std::time::{Duration, Instant};

use common::{metric_sum, next_msg, no_msg_within, seqs, Client, Server};
use serde_json::{json, Value};

fn post(c: &mut Client, conv: &str, text: &str) -> u64 {
    c.ok("send", json!({ "conv": conv, "body": { "text": text } }))["seq"]
        .as_u64()
        .expect("a seq")
}

/// `group_info`'s subscriber count once it reads `want` (the owner counts what subscribers'
/// home shards report once durable, so it may trail a reply briefly).
fn wait_subscribers(c: &mut Client, conv: &str, want: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = c.ok("group_info", json!({ "conv": conv }));
        if info["subscribers"] == want || Instant::now() > deadline {
            assert_eq!(info["subscribers"], want, "{info}");
            return info;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `convs` entry of `conv`, if listed.
fn entry(c: &mut Client, conv: &str) -> Option<Value> {
    let list = c.ok("convs", json!({}));
    list["convs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["conv"] == conv)
        .cloned()
}

#[test]
fn publishers_post_subscribers_receive_count_and_read_by_seq() {
    let mut server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "desk");
    let (mut carol, _) = server.user("carol", "phone");
    let (mut dave, _) = server.user("dave", "phone");
    let (mut dave2, _) = server.user("dave", "tablet");
    let (mut erin, _) = server.user("erin", "phone");

    let created = alice.ok("channel_create", json!({ "name": "News" }));
    let conv = created["conv"].as_str().unwrap().to_owned();
    assert!(conv.starts_with("c."), "{created}");
    assert_eq!(created["added"], json!(["alice"]));
    // Its publishers are subscribed from the start: the creation entry reaches alice.
    assert_eq!(next_msg(&mut alice)["body"]["event"], "created");

    // Subscribing: the cursor starts at the last seq (the creation entry is not unread).
    let sub = carol.ok("subscribe", json!({ "conv": conv }));
    assert_eq!(
        (sub["last_seq"].as_u64(), sub["read_seq"].as_u64()),
        (Some(1), Some(1))
    );
    let again = carol.ok("subscribe", json!({ "conv": conv }));
    assert_eq!(
        again["read_seq"], 1,
        "subscribing twice is one subscription"
    );
    dave.ok("subscribe", json!({ "conv": conv }));
    let info = wait_subscribers(&mut alice, &conv, 3); // alice, carol, dave
    assert_eq!(
        (info["channel"].as_bool(), info["publishers"].as_u64()),
        (Some(true), Some(1))
    );

    // Only publishers post.
    let refused = carol.err(
        "send",
        json!({ "conv": conv, "body": { "text": "me too" } }),
    );
    assert_eq!(refused, "forbidden");

    // A post reaches every online device of every subscriber, not the posting connection.
    let seq = post(&mut alice, &conv, "first");
    assert_eq!(seq, 2);
    for c in [&mut carol, &mut dave, &mut dave2] {
        let m = next_msg(c);
        assert_eq!(
            (m["conv"].as_str(), m["seq"].as_u64()),
            (Some(conv.as_str()), Some(2))
        );
        assert_eq!(m["body"]["text"], "first");
    }
    no_msg_within(&mut alice, Duration::from_millis(200));
    no_msg_within(&mut erin, Duration::from_millis(50));

    // Unread counts are O(1) cursors like any conversation's.
    assert_eq!(entry(&mut carol, &conv).expect("listed")["unread"], 1);
    carol.ok("read", json!({ "conv": conv, "seq": 2 }));
    assert_eq!(entry(&mut carol, &conv).expect("listed")["unread"], 0);

    // Channels are public: a non-subscriber reads the history, but gets no pushes.
    let history = erin.ok("history", json!({ "conv": conv }));
    assert_eq!(seqs(&history["msgs"]), vec![1, 2]);

    // Unsubscribing stops the pushes and the listing; the count follows.
    carol.ok("unsubscribe", json!({ "conv": conv }));
    assert!(entry(&mut carol, &conv).is_none());
    wait_subscribers(&mut alice, &conv, 2);
    post(&mut alice, &conv, "second");
    no_msg_within(&mut carol, Duration::from_millis(300));
    assert_eq!(next_msg(&mut dave)["seq"], 3);

    // An away subscriber catches up by seq.
    drop(dave2);
    drop(dave);
    for i in 0..3 {
        post(&mut alice, &conv, &format!("while away {i}"));
    }
    let mut dave = server.user("dave", "phone").0;
    let listed = entry(&mut dave, &conv).expect("still subscribed");
    assert_eq!(
        (listed["last_seq"].as_u64(), listed["unread"].as_u64()),
        (Some(6), Some(6 - 1))
    );
    let synced = dave.ok("sync", json!({ "convs": [{ "conv": conv, "after": 2 }] }));
    assert_eq!(seqs(&synced["convs"][0]["msgs"]), vec![3, 4, 5, 6]);

    // What is not a channel is refused as one; an unknown channel does not exist.
    let group = alice.ok("group_create", json!({ "name": "g", "members": [] }))["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        carol.err("subscribe", json!({ "conv": group })),
        "bad_request"
    );
    assert_eq!(
        carol.err("subscribe", json!({ "conv": "c.123" })),
        "no_such_conversation"
    );
    assert_eq!(
        carol.err("group_join", json!({ "conv": conv })),
        "bad_request"
    );

    // A second publisher, added by the owner, posts; a subscriber cannot add publishers.
    assert_eq!(
        erin.err("group_invite", json!({ "conv": conv, "users": ["erin"] })),
        "forbidden"
    );
    alice.ok("group_invite", json!({ "conv": conv, "users": ["erin"] }));
    let seq = post(&mut erin, &conv, "from erin");
    assert!(seq > 6);
    wait_subscribers(&mut alice, &conv, 3); // a publisher is subscribed from the start

    // Subscriptions and the count survive a restart; a subscriber's devices get pushes again
    // once logged in.
    drop((alice, carol, dave, erin));
    server.stop();
    let server = Server::start_on(&server.data.clone(), &[]);
    let mut alice = server.user("alice", "desk").0;
    let mut dave = server.user("dave", "phone").0;
    wait_subscribers(&mut alice, &conv, 3);
    let seq = post(&mut alice, &conv, "after restart");
    let m = next_msg(&mut dave);
    assert_eq!(
        (m["seq"].as_u64(), m["body"]["text"].as_str()),
        (Some(seq), Some("after restart"))
    );
}

#[test]
fn a_slow_subscriber_misses_posts_but_keeps_its_connection_and_slows_no_one() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "desk");
    let conv = alice.ok("channel_create", json!({ "name": "Firehose" }))["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut fast, _) = server.user("fast", "phone");
    fast.ok("subscribe", json!({ "conv": conv }));
    server
        .user("slow", "phone")
        .0
        .ok("subscribe", json!({ "conv": conv }));
    // Logged in on a socket with a tiny receive buffer that the test does not read.
    let mut slow = Client::slow(server.addr, "slow", "phone");

    // 400 posts of ~8 KiB: 3.2 MB for each subscriber, well past the slow one's outbox.
    let padding = "x".repeat(8 * 1024);
    let posts = 400;
    for i in 0..posts {
        alice.ok(
            "send",
            json!({ "conv": conv, "body": { "text": format!("{i}"), "pad": padding } }),
        );
    }
    let mut got = Vec::new();
    while got.len() < posts {
        got.push(next_msg(&mut fast)["seq"].as_u64().unwrap());
    }
    let want: Vec<u64> = (2..2 + posts as u64).collect();
    assert_eq!(got, want, "the fast subscriber gets every post, in order");

    let page = common::http_get(server.addr, "/metrics");
    let dropped = metric_sum(&page, "hermod_offers_dropped_total", "");
    assert!(
        dropped > 0,
        "the slow subscriber's outbox filled: {dropped}"
    );
    assert_eq!(
        metric_sum(&page, "hermod_closes_total", "code=\"4001\""),
        0,
        "nobody was closed as a slow consumer"
    );

    // The slow subscriber's connection is still open: it reads what was queued, sees a gap,
    // and reads the rest by seq.
    let mut pushed = Vec::new();
    while let Some(p) = slow.push_within(Duration::from_millis(500)) {
        if p["push"] == "msg" {
            pushed.push(p["msg"]["seq"].as_u64().unwrap());
        }
    }
    assert!(
        !pushed.is_empty() && pushed.len() < posts,
        "some posts pushed, some dropped: {}",
        pushed.len()
    );
    let mut after = 1;
    let mut read = 0;
    loop {
        let page = slow.ok(
            "sync",
            json!({ "convs": [{ "conv": conv, "after": after }] }),
        );
        let got = seqs(&page["convs"][0]["msgs"]);
        read += got.len();
        match got.last() {
            Some(&last) => after = last,
            None => break,
        }
    }
    assert_eq!(read, posts, "everything is there by seq");
}
