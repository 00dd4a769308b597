//! The device key directory (docs/e2e.md) against the real server binary (2 shards): publish,
//! list with versions, claim each one-time prekey exactly once (also across a restart), the
//! `keys` push to peers when a device's identity key changes, appears or goes.

mod common;

use std::collections::HashSet;

use common::{open, Client, Server};
use serde_json::{json, Value};

fn publish(c: &mut Client, identity: &str, prekeys: std::ops::Range<u32>) -> Value {
    let prekeys: Vec<Value> = prekeys
        .map(|id| json!({ "id": id, "key": format!("{identity}-pk{id}") }))
        .collect();
    c.ok(
        "keys_publish",
        json!({
            "identity": identity,
            "signed_prekey": { "id": 1, "key": format!("{identity}-spk"), "signature": "sig" },
            "prekeys": prekeys,
        }),
    )
}

/// The next `keys` push, skipping others.
fn keys_push(c: &mut Client) -> Value {
    c.next_push_of("keys")
}

#[test]
fn prekeys_are_handed_out_once_and_versions_follow_identity_keys() {
    let mut server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "phone");
    let (mut bob, _) = server.user("bob", "pc");
    open(&mut bob, "alice"); // bob is alice's peer: he hears of her key changes

    let r = publish(&mut alice, "alice-id-1", 0..3);
    assert_eq!(
        (r["version"].as_u64(), r["prekeys"].as_u64()),
        (Some(1), Some(3))
    );
    let push = keys_push(&mut bob);
    assert_eq!(
        (push["user"].as_str(), push["version"].as_u64()),
        (Some("alice"), Some(1))
    );
    assert_eq!(
        keys_push(&mut alice)["version"],
        1,
        "her own devices hear too"
    );

    let list = bob.ok("keys_devices", json!({ "user": "alice" }));
    assert_eq!(list["version"], 1);
    assert_eq!(list["devices"][0]["device"], "phone");
    assert_eq!(list["devices"][0]["identity"], "alice-id-1");
    assert_eq!(list["devices"][0]["signed_prekey"]["key"], "alice-id-1-spk");
    assert!(
        list["devices"][0].get("prekey").is_none(),
        "listing takes nothing"
    );
    let same = bob.ok("keys_devices", json!({ "user": "alice", "version": 1 }));
    assert_eq!(same["not_modified"], true);

    // Each claim takes one prekey; three claims take all three, the fourth gets none.
    let mut seen = HashSet::new();
    for _ in 0..3 {
        let c = bob.ok("keys_claim", json!({ "user": "alice" }));
        let id = c["devices"][0]["prekey"]["id"].as_u64().expect("a prekey");
        assert!(seen.insert(id), "prekey {id} handed out twice");
    }
    let dry = bob.ok("keys_claim", json!({ "user": "alice" }));
    assert_eq!(dry["devices"][0]["prekey"], Value::Null, "exhausted: {dry}");
    assert_eq!(
        dry["devices"][0]["identity"], "alice-id-1",
        "the rest still comes"
    );
    assert_eq!(alice.ok("keys_count", json!({}))["prekeys"], 0);

    // Replenishing does not move the version (same identity); a new identity does.
    let r = publish(&mut alice, "alice-id-1", 10..12);
    assert_eq!(
        (r["version"].as_u64(), r["prekeys"].as_u64()),
        (Some(1), Some(2))
    );
    let r = publish(&mut alice, "alice-id-2", 0..0);
    assert_eq!(r["version"], 2);
    assert_eq!(keys_push(&mut bob)["version"], 2);

    // A claim is durable before it is answered: after a restart the claimed prekey stays gone.
    let c = bob.ok("keys_claim", json!({ "user": "alice" }));
    let taken = c["devices"][0]["prekey"]["id"].as_u64().unwrap();
    drop((alice, bob));
    assert!(server.stop().success());
    let server = Server::start_on(&server.data.clone(), &[]);
    let mut bob = server.client();
    bob.ok(
        "login",
        json!({ "username": "bob", "password": "password123", "device": "pc" }),
    );
    let c = bob.ok("keys_claim", json!({ "user": "alice" }));
    let next = c["devices"][0]["prekey"]["id"].as_u64().unwrap();
    assert_ne!(next, taken, "a claimed prekey never comes back");
    let none = bob.ok("keys_claim", json!({ "user": "alice" }));
    assert_eq!(none["devices"][0]["prekey"], Value::Null);
}

#[test]
fn a_new_device_and_a_removed_one_change_the_version_and_bad_keys_are_refused() {
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "phone");
    let (mut bob, _) = server.user("bob", "pc");
    open(&mut bob, "alice");
    publish(&mut alice, "phone-id", 0..2);
    assert_eq!(keys_push(&mut bob)["version"], 1);

    let (mut laptop, _) = server.user("alice", "laptop");
    assert_eq!(publish(&mut laptop, "laptop-id", 0..1)["version"], 2);
    assert_eq!(keys_push(&mut bob)["version"], 2);
    let list = bob.ok("keys_devices", json!({ "user": "alice" }));
    let devices: Vec<&str> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["laptop", "phone"]);
    let claim = bob.ok("keys_claim", json!({ "user": "alice" }));
    assert!(
        claim["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["prekey"].is_object()),
        "one per device: {claim}"
    );

    let only = bob.ok(
        "keys_claim",
        json!({ "user": "alice", "devices": ["phone"] }),
    );
    assert_eq!(only["devices"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(only["devices"][0]["device"], "phone");

    // Logging a device out removes its keys, and peers are told.
    laptop.ok("logout", json!({}));
    assert_eq!(keys_push(&mut bob)["version"], 3);
    let list = bob.ok("keys_devices", json!({ "user": "alice" }));
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);

    // Refusals.
    for bad in [
        json!({ "identity": "", "signed_prekey": { "id": 1, "key": "k", "signature": "s" } }),
        json!({ "identity": "x".repeat(2049), "signed_prekey": { "id": 1, "key": "k", "signature": "s" } }),
        json!({ "identity": "i", "signed_prekey": { "id": 1, "key": "k\n", "signature": "s" } }),
        json!({ "identity": "i" }),
    ] {
        assert_eq!(
            alice.err("keys_publish", bad.clone()),
            "bad_request",
            "{bad}"
        );
    }
    let many: Vec<Value> = (0..101).map(|id| json!({ "id": id, "key": "k" })).collect();
    let too_many = json!({ "identity": "phone-id", "signed_prekey": { "id": 1, "key": "k", "signature": "s" }, "prekeys": many });
    assert_eq!(alice.err("keys_publish", too_many), "bad_request");
    for round in 0..3 {
        let batch: Vec<Value> = (0..100)
            .map(|id| json!({ "id": 1000 * (round + 1) + id, "key": "k" }))
            .collect();
        let req = json!({ "identity": "phone-id", "signed_prekey": { "id": 1, "key": "k", "signature": "s" }, "prekeys": batch });
        if round < 2 {
            alice.ok("keys_publish", req);
        } else {
            assert_eq!(
                alice.err("keys_publish", req),
                "bad_request",
                "past 200 stored"
            );
        }
    }
    assert_eq!(
        bob.err("keys_devices", json!({ "user": "nobody" })),
        "no_such_user"
    );
}
