//! Friends, blocking, presence and devices against the real server binary (2 shards, so the
//! two sides of a friendship are often on different cores), with real WebSocket clients.

mod common;

use std::time::{Duration, Instant};

use common::{open, Client, Server};
use serde_json::{json, Value};

/// Every push of `kind` arriving within `wait`.
fn pushes_within(c: &mut Client, kind: &str, wait: Duration) -> Vec<Value> {
    let end = Instant::now() + wait;
    let mut out = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match c.push_within(left) {
            Some(p) if p["push"] == kind => out.push(p),
            Some(_) => {}
            None => break,
        }
    }
    out
}

fn states(list: &Value) -> Vec<(String, String)> {
    list["friends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["user"].as_str().unwrap().into(),
                f["state"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[test]
fn friend_requests_accept_decline_cancel_remove() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let (mut carol, _) = server.user("carol", "pc");

    let r = alice.ok(
        "friend_request",
        json!({ "user": "bob", "message": "hi, it's alice" }),
    );
    assert_eq!(r["state"], "requested");
    // Every device of both users hears of the change, the requester's own included.
    assert_eq!(alice.next_push_of("friend")["state"], "requested");
    let push = bob.next_push_of("friend");
    assert_eq!(
        (push["user"].as_str(), push["state"].as_str()),
        (Some("alice"), Some("incoming"))
    );
    assert_eq!(push["message"], "hi, it's alice");
    let list = bob.ok("friends", json!({}));
    assert_eq!(states(&list), [("alice".to_owned(), "incoming".to_owned())]);
    assert_eq!(list["friends"][0]["message"], "hi, it's alice");
    let v = list["version"].as_u64().unwrap();
    assert_eq!(
        bob.ok("friends", json!({ "version": v }))["not_modified"],
        true
    );

    // Errors: nothing to accept, nobody there, oneself.
    assert_eq!(
        alice.err("friend_accept", json!({ "user": "bob" })),
        "no_such_request"
    );
    assert_eq!(
        alice.err("friend_request", json!({ "user": "nobody" })),
        "no_such_user"
    );
    assert_eq!(
        alice.err("friend_request", json!({ "user": "alice" })),
        "bad_request"
    );

    let r = bob.ok("friend_accept", json!({ "user": "alice" }));
    assert_eq!(r["state"], "friends");
    assert_eq!(alice.next_push_of("friend")["state"], "friends");
    assert_eq!(
        states(&alice.ok("friends", json!({}))),
        [("bob".to_owned(), "friends".to_owned())]
    );
    assert!(bob
        .ok("friends", json!({ "version": v }))
        .get("not_modified")
        .is_none());

    // Decline and cancel leave nothing on either side.
    carol.ok("friend_request", json!({ "user": "alice" }));
    alice.ok("friend_decline", json!({ "user": "carol" }));
    assert_eq!(states(&carol.ok("friends", json!({}))), []);
    carol.ok("friend_request", json!({ "user": "bob" }));
    carol.ok("friend_cancel", json!({ "user": "bob" }));
    let bob_list = bob.ok("friends", json!({}));
    assert_eq!(
        states(&bob_list),
        [("alice".to_owned(), "friends".to_owned())]
    );

    // Crossing requests make a friendship.
    carol.ok("friend_request", json!({ "user": "bob" }));
    let r = bob.ok("friend_request", json!({ "user": "carol" }));
    assert_eq!(r["state"], "friends");

    alice.ok("friend_remove", json!({ "user": "bob" }));
    assert_eq!(states(&alice.ok("friends", json!({}))), []);
    let bob_list = bob.ok("friends", json!({}));
    assert_eq!(
        states(&bob_list),
        [("carol".to_owned(), "friends".to_owned())]
    );
}

#[test]
fn a_block_applies_before_its_reply() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    alice.ok("send", json!({ "conv": conv, "body": "before" }));

    // Alice sends as fast as she can while bob blocks her: every send acked after the block's
    // reply would break the bound.
    bob.ok("block", json!({ "user": "alice" }));
    assert_eq!(
        alice.err("send", json!({ "conv": conv, "body": "after" })),
        "blocked"
    );
    assert_eq!(
        alice.err("friend_request", json!({ "user": "bob" })),
        "blocked"
    );
    // The blocker may still write; the block is one-way.
    bob.ok("send", json!({ "conv": conv, "body": "one way" }));
    let blocks = bob.ok("blocks", json!({}));
    assert_eq!(blocks["blocks"][0]["user"], "alice");

    bob.ok("unblock", json!({ "user": "alice" }));
    alice.ok("send", json!({ "conv": conv, "body": "again" }));
    assert_eq!(bob.ok("blocks", json!({}))["blocks"], json!([]));
    alice.ok("friend_request", json!({ "user": "bob" }));
}

#[test]
fn blocks_race_with_sends_and_survive_a_restart() {
    let mut server = Server::start(&[]);
    let (mut alice, token) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    // Pipelined sends, then the block: whatever was acked stays, nothing after the block's
    // reply is acked.
    for i in 0..50 {
        alice.send_json(&json!({ "op": "send", "rid": 1000 + i, "conv": conv, "body": i }));
    }
    let block = bob.ok("block", json!({ "user": "alice" }));
    assert_eq!(block["blocked"], true);
    // Replies may come out of order (a refusal does not wait for earlier writes).
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < 50 {
        let r = alice.next_frame().expect("connection open");
        if r.get("push").is_some() {
            continue;
        }
        assert!(
            r.get("ok").is_some() || r["error"]["code"] == "blocked",
            "{r}"
        );
        assert!(
            answered.insert(r["rid"].as_u64().unwrap()),
            "one reply per request"
        );
    }
    assert_eq!(
        alice.err("send", json!({ "conv": conv, "body": "late" })),
        "blocked"
    );

    let data = server.data.clone();
    assert!(server.stop().success());
    let server = Server::start_on(&data, &[]);
    let mut alice = server.client();
    alice.ok("resume", json!({ "token": token }));
    assert_eq!(
        alice.err("send", json!({ "conv": conv, "body": "still" })),
        "blocked"
    );
}

#[test]
fn presence_reaches_friends_coalesced_and_hides_from_strangers() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, bob_token) = server.user("bob", "pc");
    let (mut carol, _) = server.user("carol", "pc");
    alice.ok("friend_request", json!({ "user": "bob" }));
    bob.ok("friend_accept", json!({ "user": "alice" }));
    // Becoming friends tells each the other's presence.
    let p = alice.next_push_of("presence");
    assert_eq!(
        (p["user"].as_str(), p["state"].as_str()),
        (Some("bob"), Some("online"))
    );

    bob.ok(
        "presence_set",
        json!({ "state": "away", "status": "lunch" }),
    );
    let p = alice.next_push_of("presence");
    assert_eq!(
        (p["state"].as_str(), p["status"].as_str()),
        (Some("away"), Some("lunch"))
    );

    // Pull: friends see it, strangers do not.
    let seen = alice.ok("presence", json!({ "users": ["bob", "carol", "no body"] }));
    assert_eq!(seen["users"][0]["state"], "away");
    assert_eq!(seen["users"][0]["status"], "lunch");
    assert_eq!(seen["users"][1]["state"], "hidden");
    assert_eq!(seen["users"][2]["state"], "hidden");
    assert_eq!(
        carol.ok("presence", json!({ "users": ["bob"] }))["users"][0]["state"],
        "hidden"
    );

    // Bob's only device leaves: offline (status kept).
    drop(bob);
    let p = alice.next_push_of("presence");
    assert_eq!(p["state"], "offline");

    // A flapping connection: ten reconnects in quick succession cost alice at most a few
    // pushes (one per tick at most), and she ends knowing bob is online.
    let mut last = None;
    for _ in 0..10 {
        let mut c = server.client();
        c.ok("resume", json!({ "token": bob_token }));
        last = Some(c);
    }
    let got = pushes_within(&mut alice, "presence", Duration::from_millis(2_500));
    assert!(
        !got.is_empty() && got.len() <= 4,
        "{} pushes: {got:?}",
        got.len()
    );
    assert_eq!(got.last().unwrap()["state"], "online");

    // Unfriending races with presence: once the removal is answered, no more presence.
    let mut bob = last.unwrap();
    alice.ok("friend_remove", json!({ "user": "bob" }));
    bob.ok("presence_set", json!({ "state": "away", "status": "gone" }));
    let after = pushes_within(&mut alice, "presence", Duration::from_millis(2_500));
    assert!(after.is_empty(), "presence after unfriending: {after:?}");
    assert_eq!(
        alice.ok("presence", json!({ "users": ["bob"] }))["users"][0]["state"],
        "hidden"
    );
}

#[test]
fn devices_list_and_remote_logout() {
    let server = Server::start(&[]);
    let (mut pc, _) = server.user("alice", "pc");
    let (mut phone, phone_token) = server.user("alice", "phone");
    let list = pc.ok("devices", json!({}));
    let mut names: Vec<(String, bool)> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().into(),
                d["online"].as_bool().unwrap(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(names, [("pc".to_owned(), true), ("phone".to_owned(), true)]);
    // Per-device presence: one device away, the user still online.
    phone.ok("presence_set", json!({ "state": "away" }));
    let list = pc.ok("devices", json!({}));
    let phone_entry = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "phone")
        .cloned()
        .unwrap();
    assert_eq!(phone_entry["state"], "away");
    let me = pc.ok("presence", json!({ "users": ["alice"] }));
    assert_eq!(me["users"][0]["state"], "online");

    assert_eq!(
        pc.err("device_logout", json!({ "device": "tablet" })),
        "no_such_device"
    );
    assert_eq!(
        pc.err("device_logout", json!({ "device": "pc" })),
        "bad_request"
    );
    pc.ok("device_logout", json!({ "device": "phone" }));
    assert_eq!(phone.close_code(), Some(4002));
    let mut again = server.client();
    assert_eq!(
        again.err("resume", json!({ "token": phone_token })),
        "device_revoked"
    );
    let list = pc.ok("devices", json!({}));
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
}

#[test]
fn profiles_are_versioned_and_friends_learn_by_version() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    alice.ok("friend_request", json!({ "user": "bob" }));
    bob.ok("friend_accept", json!({ "user": "alice" }));
    let before = bob.ok("friends", json!({}));
    assert_eq!(before["friends"][0]["profile_version"], 0);

    let set = alice.ok(
        "profile_set",
        json!({ "display_name": "Alice A.", "avatar_url": "https://example.org/a.png", "bio": "hi" }),
    );
    assert_eq!(set["version"], 1);
    let got = bob.ok("profile", json!({ "user": "alice" }));
    assert_eq!(
        (
            got["display_name"].as_str(),
            got["bio"].as_str(),
            got["version"].as_u64()
        ),
        (Some("Alice A."), Some("hi"), Some(1))
    );
    assert_eq!(
        bob.ok("profile", json!({ "user": "alice", "version": 1 }))["not_modified"],
        true
    );
    assert_eq!(
        bob.err("profile", json!({ "user": "nobody" })),
        "no_such_user"
    );
    assert_eq!(
        alice.err("profile_set", json!({ "bio": "x".repeat(2000) })),
        "bad_request"
    );

    // Bob's friend list moved (no push needed): the entry carries alice's new profile version.
    let mut seen = 0;
    for _ in 0..50 {
        let list = bob.ok("friends", json!({ "version": before["version"] }));
        if list.get("not_modified").is_none() {
            seen = list["friends"][0]["profile_version"].as_u64().unwrap();
            if seen == 1 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(seen, 1);
    // A partial update keeps the other fields.
    alice.ok("profile_set", json!({ "bio": "new bio" }));
    let got = bob.ok("profile", json!({ "user": "alice" }));
    assert_eq!(
        (got["display_name"].as_str(), got["bio"].as_str()),
        (Some("Alice A."), Some("new bio"))
    );
}

#[test]
fn presence_of_strangers_when_configured_public() {
    let server = Server::start(&["--presence-public"]);
    let (mut alice, _) = server.user("alice", "pc");
    let (_bob, _) = server.user("bob", "pc");
    let seen = alice.ok("presence", json!({ "users": ["bob", "carol"] }));
    assert_eq!(seen["users"][0]["state"], "online");
    assert_eq!(
        seen["users"][1]["state"], "offline",
        "unknown users read as offline"
    );
}

/// `conv_mute` and `dnd_set` (docs/protocol.md, "Notification settings"): the user's own
/// settings, shown by `convs`, validated, and kept across a restart.
#[test]
fn mutes_and_do_not_disturb_are_the_users_own_and_listed_by_convs() {
    let mut server = Server::start(&[]);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let (mut alice, token) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let with_bob = open(&mut alice, "bob");
    let team = alice.ok(
        "group_create",
        json!({ "name": "team", "members": ["bob"] }),
    )["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    let list = alice.ok("convs", json!({}));
    assert_eq!(list["dnd_until"], Value::Null);
    assert!(
        list["convs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["muted"] == false),
        "{list}"
    );

    let ok = alice.ok("conv_mute", json!({ "conv": team, "muted": true }));
    assert_eq!(ok, json!({ "conv": team, "muted": true }));
    let until = now_ms() + 3_600_000;
    assert_eq!(
        alice.ok("dnd_set", json!({ "until": until })),
        json!({ "until": until })
    );
    for (fields, why) in [
        (
            json!({ "conv": "x.1", "muted": true }),
            "malformed conversation",
        ),
        (json!({ "conv": team }), "muted missing"),
    ] {
        let r = alice.request("conv_mute", fields);
        assert_eq!(r["error"]["code"], "bad_request", "{why}: {r}");
    }
    for (fields, why) in [
        (json!({ "until": 1 }), "in the past"),
        (
            json!({ "until": now_ms() + 400 * 86_400_000 }),
            "over a year ahead",
        ),
        (json!({}), "until missing"),
    ] {
        let r = alice.request("dnd_set", fields);
        assert_eq!(r["error"]["code"], "bad_request", "{why}: {r}");
    }

    let muted = |c: &mut Client| -> Vec<(String, bool)> {
        let list = c.ok("convs", json!({}));
        let mut rows: Vec<(String, bool)> = list["convs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["conv"].as_str().unwrap().to_owned(),
                    c["muted"].as_bool().unwrap(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let mut want = vec![(with_bob.clone(), false), (team.clone(), true)];
    want.sort();
    assert_eq!(muted(&mut alice), want);
    assert!(
        muted(&mut bob).iter().all(|(_, m)| !m),
        "alice's mute is hers alone"
    );
    assert_eq!(bob.ok("convs", json!({}))["dnd_until"], Value::Null);

    // Durable: still there after a restart.
    drop(alice);
    drop(bob);
    assert!(server.stop().success());
    let data = server.data.clone();
    let server = Server::start_on(&data, &[]);
    let mut alice = server.client();
    alice.ok("resume", json!({ "token": token }));
    assert_eq!(muted(&mut alice), want);
    assert_eq!(alice.ok("convs", json!({}))["dnd_until"], until);

    alice.ok("conv_mute", json!({ "conv": team, "muted": false }));
    assert_eq!(
        alice.ok("dnd_set", json!({ "until": null })),
        json!({ "until": null })
    );
    assert!(muted(&mut alice).iter().all(|(_, m)| !m));
    assert_eq!(alice.ok("convs", json!({}))["dnd_until"], Value::Null);
}
