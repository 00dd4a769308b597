//! Bots against the real server binary (2 shards) with a real HTTP receiver as the bot's
//! endpoint (`common::gateway`): created by a user, added to a group and made admin, a message
//! reaches the bot by webhook, the bot answers and moderates over HTTP with the same ids and
//! dedup as the WebSocket path; tokens rotate and revoke; the rate limit; a hanging endpoint
//! delays no other bot.

mod common;

use std::time::{Duration, Instant};

use common::gateway::{Gateway, Hit, Mode};
use common::{create, http_json, metric_sum, next_msg, send, Server, TIMEOUT};
use serde_json::{json, Value};

/// `bot_create` by `owner`; (token, secret).
fn make_bot(owner: &mut common::Client, name: &str, webhook: Option<&str>) -> (String, String) {
    let ok = owner.ok("bot_create", json!({ "name": name, "webhook": webhook }));
    assert_eq!(ok["bot"], name);
    (
        ok["token"].as_str().unwrap().to_owned(),
        ok["secret"].as_str().unwrap().to_owned(),
    )
}

fn call(server: &Server, token: &str, frame: Value) -> (u16, Value) {
    http_json(server.addr, "POST", "/bot/api", Some(token), Some(&frame))
}

/// The next webhook request with an ordinary message from `from`, skipping others (system
/// entries, other senders).
fn hit_from(gw: &Gateway, from: &str) -> Hit {
    let end = Instant::now() + TIMEOUT;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let hit = gw
            .next_hit(left)
            .unwrap_or_else(|| panic!("no message from {from}"));
        if hit.body["msg"]["from"] == from && hit.body["msg"].get("kind").is_none() {
            return hit;
        }
    }
}

#[test]
fn a_bot_in_a_group_hears_by_webhook_and_answers_and_moderates_over_http() {
    let gw = Gateway::start("unknown yet", Mode::Ok);
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let (_carol, _) = server.user("carol", "pc");
    let (token, secret) = make_bot(&mut alice, "helperbot", Some(&gw.url("/hook")));
    gw.set_secret(secret.as_bytes());
    assert_eq!(secret.len(), 64);

    // Bots join like members and hold roles.
    let group = create(
        &mut alice,
        "team",
        &["bob", "carol", "helperbot"],
        json!({}),
    )["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    alice.ok(
        "group_role",
        json!({ "conv": group, "user": "helperbot", "role": "admin" }),
    );

    send(&mut bob, &group, "hello bot");
    let hit = hit_from(&gw, "bob");
    assert!(hit.signed, "signed with the bot's secret");
    assert_eq!(hit.path, "/hook");
    assert_eq!(hit.body["push"], "msg");
    assert_eq!(hit.body["msg"]["body"], json!({ "text": "hello bot" }));
    assert_eq!(hit.body["msg"]["conv"], group.as_str());

    // The answer over HTTP: the same op, ids and dedup as on the WebSocket.
    let id = "0193a2b4-0000-7000-8000-000000000001";
    let frame =
        json!({ "op": "send", "rid": 7, "conv": group, "id": id, "body": { "text": "hi bob" } });
    let (status, reply) = call(&server, &token, frame.clone());
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["rid"], 7);
    let seq = reply["ok"]["seq"].as_u64().expect("a seq");
    let (status, again) = call(&server, &token, frame);
    assert_eq!(
        (status, again["ok"]["seq"].as_u64()),
        (200, Some(seq)),
        "a retry is deduplicated: {again}"
    );
    loop {
        let m = next_msg(&mut bob);
        if m["from"] == "helperbot" {
            assert_eq!(
                (m["seq"].as_u64(), &m["body"]),
                (Some(seq), &json!({ "text": "hi bob" }))
            );
            break;
        }
    }
    // Its own message is not POSTed back to it.
    let echoes: Vec<Hit> = gw
        .hits_within(Duration::from_millis(500))
        .into_iter()
        .filter(|h| h.body["msg"]["from"] == "helperbot")
        .collect();
    assert!(echoes.is_empty(), "{echoes:?}");

    // An admin bot moderates.
    let (status, kicked) = call(
        &server,
        &token,
        json!({ "op": "group_kick", "rid": 8, "conv": group, "user": "carol" }),
    );
    assert_eq!(status, 200, "{kicked}");
    // Ops about a connection are not for HTTP; unknown ops and bad frames get their codes.
    let (status, r) = call(
        &server,
        &token,
        json!({ "op": "typing", "rid": 9, "conv": group }),
    );
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, r) = call(&server, &token, json!({ "op": "fly", "rid": 10 }));
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (404, Some("unknown_op"))
    );
    let (status, r) = call(
        &server,
        &token,
        json!({ "op": "send", "rid": 11, "conv": "d.1.2" }),
    );
    assert_eq!(status, 400, "{r}");

    // A bot never logs in with a password; over the WebSocket it resumes with its token.
    let mut c = server.client();
    let r = c.request(
        "login",
        json!({ "username": "helperbot", "password": "", "device": "bot" }),
    );
    assert_eq!(r["error"]["code"], "bad_credentials", "{r}");
    let mut ws = server.client();
    let ok = ws.ok("resume", json!({ "token": token }));
    assert_eq!(
        (ok["user"].as_str(), ok["device"].as_str()),
        (Some("helperbot"), Some("bot"))
    );
    // A bot owns no bots.
    assert_eq!(
        ws.err("bot_create", json!({ "name": "subbot" })),
        "forbidden"
    );

    std::thread::sleep(Duration::from_millis(400)); // one metrics tick
    let page = common::http_get(server.addr, "/metrics");
    assert!(
        metric_sum(&page, "hermod_bot_calls_total", "") >= 5,
        "{page}"
    );
    assert!(metric_sum(&page, "hermod_bot_hooks_total", "") >= 1);
}

#[test]
fn bot_tokens_rotate_and_revoke_and_only_owners_manage_them() {
    let server = Server::start(&["--admin-token", "an-admin-token-of-length"]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let (old, _) = make_bot(&mut alice, "echobot", None);
    let ping = json!({ "op": "ping", "rid": 1 });
    assert_eq!(call(&server, &old, ping.clone()).0, 200);
    let mut ws = server.client();
    ws.ok("resume", json!({ "token": old }));

    // Someone else's bot reads as no bot.
    assert_eq!(
        bob.err("bot_token", json!({ "bot": "echobot" })),
        "no_such_user"
    );
    assert_eq!(
        bob.err("bot_create", json!({ "name": "echobot" })),
        "username_taken"
    );
    assert_eq!(
        bob.err(
            "bot_create",
            json!({ "name": "x1bot", "webhook": "ftp://nope" })
        ),
        "bad_request"
    );

    // The owner's list (written on the owner's home once the bot is durable).
    let end = Instant::now() + TIMEOUT;
    while alice.ok("bots", json!({}))["bots"] != json!(["echobot"]) {
        assert!(Instant::now() < end, "echobot never listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bob.ok("bots", json!({}))["bots"], json!([]));

    let rotated = alice.ok("bot_token", json!({ "bot": "echobot" }));
    let new = rotated["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    let (status, r) = call(&server, &old, ping.clone());
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (401, Some("device_revoked")),
        "{r}"
    );
    assert_eq!(call(&server, &new, ping.clone()).0, 200);
    assert_eq!(
        ws.close_code(),
        Some(4002),
        "the old token's connection is closed"
    );

    alice.ok("bot_revoke", json!({ "bot": "echobot" }));
    let (status, r) = call(&server, &new, ping.clone());
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (401, Some("device_revoked"))
    );
    // Garbage and missing tokens.
    assert_eq!(call(&server, "not-a-token", ping.clone()).0, 401);
    let (status, _) = http_json(server.addr, "POST", "/bot/api", None, Some(&ping));
    assert_eq!(status, 401);

    // The operator creates bots too, and rotates anyone's.
    let admin = Some("an-admin-token-of-length");
    let (status, made) = http_json(
        server.addr,
        "POST",
        "/admin/bots",
        admin,
        Some(&json!({ "name": "opsbot" })),
    );
    assert_eq!(status, 200, "{made}");
    let token = made["ok"]["token"].as_str().unwrap();
    assert_eq!(call(&server, token, ping.clone()).0, 200);
    let (status, again) = http_json(
        server.addr,
        "POST",
        "/admin/bots/echobot/token",
        admin,
        None,
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        call(&server, again["ok"]["token"].as_str().unwrap(), ping).0,
        200
    );
}

#[test]
fn a_bot_over_its_rate_is_refused_with_429() {
    let server = Server::start(&["--rate-limit", "5"]);
    let (mut alice, _) = server.user("alice", "pc");
    let (token, _) = make_bot(&mut alice, "fastbot", None);
    let statuses: Vec<u16> = (0..12)
        .map(|i| call(&server, &token, json!({ "op": "ping", "rid": i })).0)
        .collect();
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
}

#[test]
fn a_hanging_bot_endpoint_delays_no_other_bot() {
    let hanging = Gateway::start("x", Mode::Hang);
    let healthy = Gateway::start("x", Mode::Ok);
    let server = Server::start(&[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (_, _) = make_bot(&mut alice, "stuckbot", Some(&hanging.url("/")));
    let (_, secret) = make_bot(&mut alice, "finebot", Some(&healthy.url("/")));
    healthy.set_secret(secret.as_bytes());
    let group = create(&mut alice, "both", &["stuckbot", "finebot"], json!({}))["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..20 {
        send(&mut alice, &group, &format!("m{i}"));
    }
    let started = Instant::now();
    let mut texts = Vec::new();
    while texts.len() < 20 {
        let hit = hit_from(&healthy, "alice");
        assert!(hit.signed);
        texts.push(hit.body["msg"]["body"]["text"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected, "every message, in order");
    eprintln!(
        "finebot got 20 messages {:?} after the sends, stuckbot hanging",
        started.elapsed()
    );
    assert!(
        hanging.next_hit(Duration::from_secs(1)).is_some(),
        "stuckbot was tried"
    );
}
