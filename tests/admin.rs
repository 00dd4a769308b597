//! The admin API against the real server: authorisation (the admin token only; a user's token
//! is refused), each action, and the `hermod-tools admin` client.

mod common;

use std::io::{Read, Write};

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-tests-0123456789";

fn admin_server() -> Server {
    Server::start(&["--admin-token", ADMIN])
}

fn admin(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    http_json(server.addr, method, path, Some(ADMIN), body.as_ref())
}

fn login(server: &Server, user: &str, device: &str) -> Value {
    server.client().request(
        "login",
        json!({ "username": user, "password": "password123", "device": device }),
    )
}

#[test]
fn only_the_admin_token_opens_the_admin_api() {
    let off = Server::start(&[]);
    let (status, body) = http_json(off.addr, "GET", "/admin/stats", Some(ADMIN), None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("admin_disabled"))
    );

    let server = admin_server();
    let (_alice, user_token) = server.user("alice", "pc");
    for bearer in [
        None,
        Some("wrong-token-wrong-token"),
        Some(user_token.as_str()),
    ] {
        let (status, body) = http_json(server.addr, "GET", "/admin/stats", bearer, None);
        assert_eq!(status, 401, "{bearer:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = http_json(
            server.addr,
            "POST",
            "/admin/users/alice/disable",
            bearer,
            None,
        );
        assert_eq!(status, 401, "a refused token changes nothing");
    }
    assert!(login(&server, "alice", "phone").get("ok").is_some());

    // Refused on the head alone: the announced body is never waited for.
    let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    raw.write_all(b"POST /admin/users HTTP/1.1\r\nContent-Length: 400000\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");

    let (status, body) = admin(&server, "GET", "/admin/stats", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"]["ready"], true);
    assert_eq!(body["ok"]["shards"].as_array().map(Vec::len), Some(2));
    assert!(
        body["ok"]["totals"]["connections"].as_u64().is_some(),
        "{body}"
    );

    let (status, body) = admin(&server, "GET", "/admin/nothing", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_op"))
    );
    let (status, _) = admin(&server, "GET", "/admin/users", None);
    assert_eq!(status, 400, "wrong method");
    let (status, body) = http_json(
        server.addr,
        "POST",
        "/admin/users",
        Some(ADMIN),
        Some(&json!("not an object")),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
}

#[test]
fn a_separate_admin_address_takes_the_admin_api_off_the_client_port() {
    let server = Server::start(&["--admin-token", ADMIN, "--admin-listen", "127.0.0.1:0"]);
    let admin_addr = server
        .admin_addr
        .expect("the admin address is printed at start");
    assert_ne!(admin_addr, server.addr);
    let (status, body) = http_json(server.addr, "GET", "/admin/stats", Some(ADMIN), None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("admin_elsewhere"))
    );
    let (status, body) = http_json(admin_addr, "GET", "/admin/stats", Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_json(admin_addr, "GET", "/admin/stats", None, None);
    assert_eq!(status, 401, "the token is still required there");
    assert!(http_get(admin_addr, "/metrics").starts_with("HTTP/1.1 200"));
    assert!(
        http_get(admin_addr, "/").starts_with("HTTP/1.1 404"),
        "no web page there"
    );
    assert!(http_get(server.addr, "/readyz").starts_with("HTTP/1.1 "));
    assert!(http_get(server.addr, "/").starts_with("HTTP/1.1 200"));
    let (mut alice, _) = server.user("alice", "pc");
    alice.ok("ping", json!({}));
}

#[test]
fn bulk_creation_makes_accounts_on_their_home_shards() {
    let server = admin_server();
    let _taken = server.user("taken1", "pc");
    let mut users: Vec<Value> = (0..40)
        .map(|i| json!({ "username": format!("Bulk{i}"), "password": "password123" }))
        .collect();
    users.push(json!({ "username": "taken1", "password": "password123" }));
    users.push(json!({ "username": "hermod", "password": "password123" }));
    users.push(json!({ "username": "x", "password": "password123" }));
    users.push(json!({ "username": "weakling", "password": "short" }));
    let (status, body) = admin(
        &server,
        "POST",
        "/admin/users",
        Some(json!({ "users": users })),
    );
    assert_eq!(status, 200, "{body}");
    let created = body["ok"]["created"].as_array().unwrap();
    assert_eq!(created.len(), 40, "{body}");
    assert!(created.contains(&json!("bulk7")), "names are normalised");
    let failed: Vec<(String, String)> = body["ok"]["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["username"].as_str().unwrap().into(),
                f["code"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            ("taken1", "username_taken"),
            ("hermod", "username_taken"),
            ("x", "invalid_username"),
            ("weakling", "weak_password"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    for name in ["bulk0", "bulk7", "bulk39"] {
        let r = login(&server, name, "pc");
        assert!(r.get("ok").is_some(), "{name}: {r}");
    }
    let (status, body) = admin(
        &server,
        "POST",
        "/admin/users",
        Some(json!({ "users": [{ "username": "bulk3", "password": "password123" }] })),
    );
    assert_eq!(status, 200);
    assert_eq!(body["ok"]["failed"][0]["code"], "username_taken", "{body}");
}

#[test]
fn disabled_accounts_lose_their_sockets_and_cannot_log_in() {
    let server = admin_server();
    let (mut pc, token) = server.user("alice", "pc");
    let (mut phone, _) = server.user("alice", "phone");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = bob.ok("open", json!({ "user": "alice" }))["conv"].clone();

    let (status, body) = admin(&server, "POST", "/admin/users/Alice/disable", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["ok"],
        json!({ "user": "alice", "disabled": true, "closed": 2 })
    );
    assert_eq!(pc.close_code(), Some(4003));
    assert_eq!(phone.close_code(), Some(4003));
    assert_eq!(
        login(&server, "alice", "pc")["error"]["code"],
        "account_disabled"
    );
    let resumed = server.client().request("resume", json!({ "token": token }));
    assert_eq!(resumed["error"]["code"], "account_disabled");

    // Others are unaffected, and messages to the disabled account are still kept.
    let sent = bob.ok(
        "send",
        json!({ "conv": conv, "body": { "text": "are you there?" } }),
    );
    assert_eq!(sent["seq"], 1);

    let (status, body) = admin(&server, "POST", "/admin/users/alice/enable", None);
    assert_eq!((status, &body["ok"]["disabled"]), (200, &json!(false)));
    let mut back = server.client();
    back.ok("resume", json!({ "token": token }));
    let sync = back.ok("sync", json!({ "convs": [{ "conv": conv, "after": 0 }] }));
    assert_eq!(
        sync["convs"][0]["msgs"][0]["body"]["text"],
        "are you there?"
    );

    let (status, body) = admin(&server, "POST", "/admin/users/nobody/disable", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("no_such_user"))
    );
    let (status, _) = admin(&server, "GET", "/admin/users/nobody", None);
    assert_eq!(status, 404);
}

#[test]
fn kick_closes_a_device_and_revokes_its_token() {
    let server = admin_server();
    let (mut pc, pc_token) = server.user("alice", "pc");
    let (mut phone, phone_token) = server.user("alice", "phone");
    let (status, body) = admin(&server, "GET", "/admin/users/Alice", None);
    assert_eq!(status, 200, "{body}");
    let devices: Vec<(&str, bool)> = body["ok"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap(),
                d["online"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(devices, [("pc", true), ("phone", true)], "{body}");
    assert_eq!(body["ok"]["disabled"], false);

    let (status, body) = admin(
        &server,
        "POST",
        "/admin/users/alice/kick",
        Some(json!({ "device": "phone" })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"]["devices"], json!(["phone"]));
    assert_eq!(body["ok"]["closed"], 1);
    assert_eq!(phone.close_code(), Some(4003));
    let resumed = server
        .client()
        .request("resume", json!({ "token": phone_token }));
    assert_eq!(resumed["error"]["code"], "device_revoked");
    pc.ok("ping", json!({}));

    let (status, body) = admin(
        &server,
        "POST",
        "/admin/users/alice/kick",
        Some(json!({ "device": "tablet" })),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("no_such_device"))
    );

    // Without a device: every device.
    let (status, body) = admin(&server, "POST", "/admin/users/alice/kick", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"]["devices"], json!(["pc"]));
    assert_eq!(pc.close_code(), Some(4003));
    let resumed = server
        .client()
        .request("resume", json!({ "token": pc_token }));
    assert_eq!(resumed["error"]["code"], "device_revoked");
    // The account itself is fine: a new login works.
    assert!(login(&server, "alice", "pc").get("ok").is_some());
}

#[test]
fn notices_reach_users_online_and_offline_and_groups() {
    let server = admin_server();
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    drop(server.user("carol", "pc")); // registered, then offline

    let (status, body) = admin(
        &server,
        "POST",
        "/admin/notice",
        Some(json!({ "user": "alice", "body": { "text": "maintenance at 02:00" } })),
    );
    assert_eq!(status, 200, "{body}");
    let conv = body["ok"]["conv"].as_str().unwrap().to_owned();
    assert_eq!(body["ok"]["seq"], 1);
    let push = alice.next_push_of("msg");
    assert_eq!(push["msg"]["from"], "hermod");
    assert_eq!(push["msg"]["conv"], conv.as_str());
    assert_eq!(
        push["msg"]["body"],
        json!({ "text": "maintenance at 02:00" })
    );
    let convs = alice.ok("convs", json!({}));
    let entry = convs["convs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["conv"] == conv.as_str())
        .cloned()
        .expect("the notice conversation is listed");
    assert_eq!(
        (entry["peer"].as_str(), entry["unread"].as_u64()),
        (Some("hermod"), Some(1))
    );
    assert_eq!(
        alice.err("send", json!({ "conv": conv, "body": "thanks" })),
        "forbidden",
        "nobody writes back to the server"
    );

    // With an id, a retried notice answers with the original: one message, one push.
    let retried =
        json!({ "user": "alice", "id": "0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b", "body": "once" });
    let (_, first) = admin(&server, "POST", "/admin/notice", Some(retried.clone()));
    let (_, again) = admin(&server, "POST", "/admin/notice", Some(retried));
    assert_eq!(first["ok"]["seq"], 2, "{first}");
    assert_eq!(
        again["ok"]["seq"], 2,
        "the retry is the same notice: {again}"
    );
    assert_eq!(alice.next_push_of("msg")["msg"]["seq"], 2);
    assert!(
        alice
            .push_within(std::time::Duration::from_millis(300))
            .is_none(),
        "no second push"
    );

    // Offline: kept, listed and synced on the next login.
    let (status, _) = admin(
        &server,
        "POST",
        "/admin/notice",
        Some(json!({ "user": "carol", "body": "plain string body" })),
    );
    assert_eq!(status, 200);
    let (mut carol, _) = server.user("carol", "phone");
    let convs = carol.ok("convs", json!({}));
    let carol_conv = convs["convs"][0]["conv"].clone();
    assert_eq!(convs["convs"][0]["peer"], "hermod");
    let sync = carol.ok(
        "sync",
        json!({ "convs": [{ "conv": carol_conv, "after": 0 }] }),
    );
    assert_eq!(sync["convs"][0]["msgs"][0]["body"], "plain string body");

    // Into a group: a system entry every member receives.
    let group = alice.ok(
        "group_create",
        json!({ "name": "Team", "members": ["bob"] }),
    );
    let gconv = group["conv"].as_str().unwrap().to_owned();
    let (status, body) = admin(
        &server,
        "POST",
        "/admin/notice",
        Some(json!({ "group": gconv, "body": { "text": "welcome" } })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"]["conv"], gconv.as_str());
    loop {
        let push = bob.next_push_of("msg");
        if push["msg"]["kind"] == "system" && push["msg"]["body"]["event"] == "notice" {
            assert_eq!(push["msg"]["from"], "hermod");
            assert_eq!(push["msg"]["body"]["body"], json!({ "text": "welcome" }));
            assert_eq!(push["msg"]["seq"], body["ok"]["seq"]);
            break;
        }
    }

    for (target, code) in [
        (
            json!({ "group": "g.123", "body": 1 }),
            "no_such_conversation",
        ),
        (json!({ "user": "nobody", "body": 1 }), "no_such_user"),
        (json!({ "user": "hermod", "body": 1 }), "no_such_user"),
    ] {
        let (status, body) = admin(&server, "POST", "/admin/notice", Some(target.clone()));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some(code)),
            "{target}"
        );
    }
    let mut c = server.client();
    assert_eq!(
        c.err(
            "register",
            json!({ "username": "Hermod", "password": "password123" })
        ),
        "username_taken",
        "the server's name is reserved"
    );
}

#[test]
fn the_tools_client_drives_every_action() {
    use hermod_tools::admin::Client;
    let server = admin_server();
    let client = Client::new(&format!("http://{}", server.addr), ADMIN);
    let users: Vec<(String, String)> = (0..3)
        .map(|i| (format!("tool{i}"), "password123".to_owned()))
        .collect();
    let created = client.create_users(&users).unwrap();
    assert_eq!(created["created"], json!(["tool0", "tool1", "tool2"]));
    let (mut c, _) = server.user("tool1", "pc");
    let notice = client
        .notice(Some("tool1"), None, None, json!({ "text": "hello" }))
        .unwrap();
    assert_eq!(notice["seq"], 1);
    assert_eq!(c.next_push_of("msg")["msg"]["body"]["text"], "hello");
    assert_eq!(client.kick("tool1", Some("pc")).unwrap()["closed"], 1);
    assert_eq!(c.close_code(), Some(4003));
    assert_eq!(
        client.set_disabled("tool2", true).unwrap()["disabled"],
        true
    );
    let tool2 = client.user("tool2").unwrap();
    assert_eq!(
        (tool2["user"].as_str(), &tool2["disabled"]),
        (Some("tool2"), &json!(true))
    );
    assert_eq!(
        client.set_disabled("tool2", false).unwrap()["disabled"],
        false
    );
    // Counters are published each tick (at most 250 ms apart).
    let mut stats = Value::Null;
    for _ in 0..40 {
        stats = client.stats().unwrap();
        if stats["totals"]["messages_appended"].as_u64() >= Some(1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        stats["totals"]["messages_appended"].as_u64() >= Some(1),
        "{stats}"
    );
    let err = client.set_disabled("nobody", true).unwrap_err().to_string();
    assert!(err.contains("no_such_user") && err.contains("404"), "{err}");
    // Bots: created, given a new token (the old one then fails), webhook set and cleared.
    let bot = client.create_bot("toolbot", None).unwrap();
    let first = bot["token"].as_str().unwrap().to_owned();
    let mut ws = server.client();
    ws.ok("resume", json!({ "token": first }));
    let again = client.bot_token("toolbot", false).unwrap();
    assert_ne!(again["token"].as_str(), Some(first.as_str()));
    assert_eq!(ws.close_code(), Some(4002));
    let hooked = client
        .bot_webhook("toolbot", Some("https://bots.example/t"))
        .unwrap();
    assert_eq!(hooked["webhook"], "https://bots.example/t");
    assert_eq!(
        client.bot_webhook("toolbot", None).unwrap()["webhook"],
        Value::Null
    );
    assert_eq!(client.bot_token("toolbot", true).unwrap()["bot"], "toolbot");
    let err = client.bot_token("nobot", false).unwrap_err().to_string();
    assert!(err.contains("no_such_user"), "{err}");
    let wrong = Client::new(&format!("http://{}", server.addr), "not-the-admin-token");
    let err = wrong.stats().unwrap_err().to_string();
    assert!(err.contains("unauthorized"), "{err}");
}

/// `push_register` / `push_unregister` (docs/protocol.md, "Push tokens"): validated, shown by
/// `devices`, replaced, removed; all dropped by a disable (seen through a resume after
/// re-enabling, which drops nothing). The drops with the device (`logout`, `device_logout`,
/// a new login) are checked on the stored keys in the engine's tests (`push_tokens`).
#[test]
fn push_tokens_are_per_device_and_dropped_with_it() {
    let server = admin_server();
    let (mut pc, pc_token) = server.user("alice", "pc");
    let (mut phone, phone_token) = server.user("alice", "phone");
    let push_of = |c: &mut Client, device: &str| -> Value {
        let list = c.ok("devices", json!({}));
        let row = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == device)
            .cloned()
            .unwrap_or_else(|| panic!("no device {device}: {list}"));
        row["push"].clone()
    };

    for (fields, why) in [
        (
            json!({ "platform": "pager", "token": "x" }),
            "unknown platform",
        ),
        (json!({ "platform": "apns", "token": "" }), "empty token"),
        (
            json!({ "platform": "apns", "token": "a\nb" }),
            "control character",
        ),
        (
            json!({ "platform": "fcm", "token": "x".repeat(4097) }),
            "over 4096 bytes",
        ),
        (json!({ "platform": "fcm" }), "no token"),
    ] {
        let r = phone.request("push_register", fields);
        assert_eq!(r["error"]["code"], "bad_request", "{why}: {r}");
    }
    assert_eq!(push_of(&mut pc, "phone"), Value::Null);
    let ok = phone.ok(
        "push_register",
        json!({ "platform": "apns", "token": "a".repeat(64) }),
    );
    assert_eq!(ok, json!({ "platform": "apns" }));
    assert_eq!(push_of(&mut pc, "phone"), "apns");
    assert_eq!(push_of(&mut pc, "pc"), Value::Null, "per device");
    phone.ok(
        "push_register",
        json!({ "platform": "fcm", "token": "f".repeat(4096) }),
    );
    assert_eq!(
        push_of(&mut pc, "phone"),
        "fcm",
        "a new token replaces the old"
    );
    assert_eq!(phone.ok("push_unregister", json!({})), json!({}));
    assert_eq!(push_of(&mut pc, "phone"), Value::Null);
    assert_eq!(
        phone.ok("push_unregister", json!({})),
        json!({}),
        "idempotent"
    );

    // A disable drops every token of the account; after enable, resumed sessions have none.
    phone.ok(
        "push_register",
        json!({ "platform": "webpush", "token": "{\"endpoint\":\"https://x\"}" }),
    );
    pc.ok(
        "push_register",
        json!({ "platform": "other", "token": "t" }),
    );
    let (status, _) = admin(&server, "POST", "/admin/users/alice/disable", None);
    assert_eq!(status, 200);
    let (status, _) = admin(&server, "POST", "/admin/users/alice/enable", None);
    assert_eq!(status, 200);
    let mut pc = server.client();
    pc.ok("resume", json!({ "token": pc_token }));
    let mut phone = server.client();
    phone.ok("resume", json!({ "token": phone_token }));
    assert_eq!(
        push_of(&mut pc, "pc"),
        Value::Null,
        "dropped by the disable"
    );
    assert_eq!(
        push_of(&mut pc, "phone"),
        Value::Null,
        "dropped by the disable"
    );
}
