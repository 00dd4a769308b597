//! Live rooms (docs/channels.md, "Live rooms") against the real server binary (2 shards):
//! membership per connection, the recent window, no storage of messages, and the shedding
//! policy — admins never shed, ordinary senders capped at the room's rate, the sender told.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{metric_sum, no_msg_within, Client, Server};
use serde_json::{json, Value};

/// The next `msg` push, skipping others (room pushes are not acked).
fn next_room_msg(c: &mut Client) -> Value {
    loop {
        let p = c.push();
        if p["push"] == "msg" {
            return p["msg"].clone();
        }
    }
}

fn join(c: &mut Client, room: &str) -> Value {
    c.ok("room_join", json!({ "conv": room }))
}

#[test]
fn a_live_room_delivers_sheds_by_policy_and_keeps_only_a_window() {
    let mut server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "desk"); // the room's owner
    let (mut moderator, _) = server.user("mod", "desk");
    let (mut bob, _) = server.user("bob", "phone");
    let (mut carol, _) = server.user("carol", "phone");

    let room = alice.ok(
        "room_create",
        json!({ "name": "Keynote", "rate": 5, "admins": ["mod"] }),
    );
    assert_eq!(
        (room["rate"].as_u64(), room["admins"].as_u64()),
        (Some(5), Some(1))
    );
    let room = room["conv"].as_str().unwrap().to_owned();
    assert!(room.starts_with("r."), "{room}");

    for c in [&mut alice, &mut moderator, &mut bob] {
        join(c, &room);
    }
    let joined = join(&mut carol, &room);
    assert_eq!(joined["members"], 4);
    assert_eq!(joined["recent"], json!([]));

    // A message reaches every other connection in the room, not the sender's.
    let ack = bob.ok(
        "send",
        json!({ "conv": room, "body": { "text": "hello room" } }),
    );
    assert_eq!(ack["seq"], 1);
    for c in [&mut alice, &mut moderator, &mut carol] {
        let m = next_room_msg(c);
        assert_eq!(
            (m["from"].as_str(), m["seq"].as_u64()),
            (Some("bob"), Some(1))
        );
        assert_eq!(m["body"]["text"], "hello room");
    }
    no_msg_within(&mut bob, Duration::from_millis(200));

    // A latecomer gets the recent window, nothing older is kept anywhere.
    let (mut dave, _) = server.user("dave", "phone");
    let late = join(&mut dave, &room);
    assert_eq!(late["recent"][0]["body"]["text"], "hello room");
    assert_eq!(
        dave.err("history", json!({ "conv": room })),
        "no_such_conversation",
        "a room has no history"
    );

    // A flood: bob sends 60 at once (12 times the rate of 5/s), the moderator 20. Every one
    // of the moderator's arrives; bob's are cut to about the rate, and bob is told which.
    let mut bob_ok = BTreeSet::new();
    let mut bob_shed = 0;
    let mut mod_ok = BTreeSet::new();
    for i in 0..60 {
        let r = bob.request(
            "send",
            json!({ "conv": room, "body": { "text": format!("bob {i}") } }),
        );
        match r.get("ok") {
            Some(ok) => {
                bob_ok.insert(ok["seq"].as_u64().unwrap());
            }
            None => {
                assert_eq!(r["error"]["code"], "shed", "{r}");
                bob_shed += 1;
            }
        }
        if i % 3 == 0 {
            let ok = moderator.ok(
                "send",
                json!({ "conv": room, "body": { "text": format!("mod {i}") } }),
            );
            mod_ok.insert(ok["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(mod_ok.len(), 20, "admins are never shed");
    assert_eq!(bob_ok.len() + bob_shed, 60);
    assert!(
        (1..=12).contains(&bob_ok.len()),
        "bob's admitted messages stay near the rate: {}",
        bob_ok.len()
    );
    // Carol gets exactly what was admitted, in order.
    let want: Vec<u64> = bob_ok.union(&mod_ok).copied().collect();
    let got: Vec<u64> = (0..want.len())
        .map(|_| next_room_msg(&mut carol)["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    no_msg_within(&mut carol, Duration::from_millis(200));
    let page = common::http_get(server.addr, "/metrics");
    let shed = metric_sum(&page, "hermod_room_shed_sampled_total", "")
        + metric_sum(&page, "hermod_room_shed_rate_total", "");
    assert_eq!(shed, bob_shed as u64);

    // Leaving, and closing the connection, leave the room.
    carol.ok("room_leave", json!({ "conv": room }));
    drop(dave);
    std::thread::sleep(Duration::from_millis(200));
    let (mut erin, _) = server.user("erin", "phone");
    assert_eq!(
        join(&mut erin, &room)["members"],
        4,
        "alice, mod, bob, erin"
    );
    moderator.ok("send", json!({ "conv": room, "body": { "text": "bye" } }));
    assert_eq!(next_room_msg(&mut erin)["body"]["text"], "bye");
    no_msg_within(&mut carol, Duration::from_millis(200));

    // Refusals.
    assert_eq!(
        carol.err("send", json!({ "conv": room, "body": { "text": "left" } })),
        "not_member",
        "only connections in the room post"
    );
    assert_eq!(
        bob.err("room_join", json!({ "conv": "r.123" })),
        "no_such_conversation"
    );
    assert_eq!(
        bob.err("room_join", json!({ "conv": "c.123" })),
        "bad_request"
    );
    assert_eq!(
        bob.err("room_update", json!({ "conv": room, "rate": 100 })),
        "forbidden"
    );
    assert_eq!(
        alice.err("room_update", json!({ "conv": room, "rate": 0 })),
        "bad_request"
    );
    let updated = alice.ok("room_update", json!({ "conv": room, "rate": 100 }));
    assert_eq!(updated["rate"], 100);

    // The room survives a restart; its messages do not.
    drop((alice, moderator, bob, carol, erin));
    server.stop();
    let server = Server::start_on(&server.data.clone(), &[]);
    let (mut bob, _) = server.user("bob", "phone");
    let again = join(&mut bob, &room);
    assert_eq!(
        (again["rate"].as_u64(), again["recent"].clone()),
        (Some(100), json!([]))
    );
}
