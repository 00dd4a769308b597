//! Offline notifications through the push webhook, against the real server binary (2 shards)
//! and a real HTTP receiver for the gateway (`common::gateway`): one coalesced notification
//! with the right badge, only for devices that are away, none for muted conversations or
//! during do-not-disturb, and a gateway that hangs costs the message path nothing (the queue
//! overflows into the drop counter instead).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::gateway::{Gateway, Mode};
use common::{create, http_get, metric_sum, next_msg, open, send, Client, Server, TIMEOUT};
use serde_json::{json, Value};

const SECRET: &str = "a-gateway-secret-of-some-length";

/// A server whose `[push]` section points at `gateway`, with `extra` keys in that section.
fn server(gateway: &Gateway, extra: &str, flags: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("hermod.toml");
    std::fs::write(
        &path,
        format!(
            "[push]\nwebhook_url = \"{}\"\nsecret = \"{SECRET}\"\n{extra}\n",
            gateway.url("/notify")
        ),
    )
    .unwrap();
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend_from_slice(flags);
    (Server::start(&args), dir)
}

/// Registers a push token for `device` of `name`, then leaves (the socket closes); `watch` is
/// another connection of the same user, used to see the server has noticed.
fn away_with_token(server: &Server, name: &str, device: &str, token: &str) -> Client {
    let (mut phone, _) = server.user(name, device);
    phone.ok(
        "push_register",
        json!({ "platform": "apns", "token": token }),
    );
    let (mut watch, _) = server.user(name, "watch");
    drop(phone);
    wait_offline(&mut watch, device);
    watch
}

fn wait_offline(watch: &mut Client, device: &str) {
    let end = Instant::now() + TIMEOUT;
    loop {
        let list = watch.ok("devices", json!({}));
        let online = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == device)
            .map(|d| d["online"] == true);
        if online == Some(false) {
            return;
        }
        assert!(Instant::now() < end, "{device} still online: {list}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metrics(server: &Server) -> String {
    http_get(server.addr, "/metrics")
}

/// The one global sample of `name{label}` (the webhook's families have no shard label).
fn global(page: &str, line_start: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics"))
}

#[test]
fn an_away_device_gets_one_coalesced_notification_with_the_badge() {
    let gateway = Gateway::start(SECRET, Mode::Ok);
    let (server, _dir) = server(&gateway, "coalesce_ms = 2000", &[]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut carol, _) = server.user("carol", "pc");
    // bob: a phone with a token that is away, a laptop with a token that is online and acks.
    let mut watch = away_with_token(&server, "bob", "phone", "tok-phone");
    let (mut laptop, _) = server.user("bob", "laptop");
    laptop.ok(
        "push_register",
        json!({ "platform": "fcm", "token": "tok-laptop" }),
    );
    let group = create(&mut carol, "trip", &["alice", "bob"], json!({}))["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    let direct = open(&mut alice, "bob");
    // A burst: 50 direct messages, then 3 in the group.
    for i in 0..50 {
        send(&mut alice, &direct, &format!("m{i}"));
    }
    for i in 0..3 {
        send(&mut carol, &group, &format!("g{i}"));
    }
    // The laptop is here and acks everything (the group's system entries too): it needs no
    // notification.
    while next_msg(&mut laptop)["body"] != json!({ "text": "g2" }) {}

    let hits = gateway.hits_within(Duration::from_millis(4_000));
    assert_eq!(hits.len(), 1, "one notification for the burst: {hits:?}");
    let hit = &hits[0];
    assert!(hit.signed, "signed with the shared secret");
    assert_eq!(hit.path, "/notify");
    let n = &hit.body;
    assert_eq!(n["user"], "bob");
    assert_eq!(n["count"], 53);
    assert_eq!(
        (
            n["conv"].as_str(),
            n["from"].clone(),
            n["seq"].as_u64().is_some()
        ),
        (Some(group.as_str()), json!("carol"), true)
    );
    assert!(n["id"].as_str().is_some_and(|id| id.len() == 36), "{n}");
    let convs: Vec<&str> = n["convs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        convs,
        [direct.as_str(), group.as_str()],
        "least recent first"
    );
    assert!(n.get("preview").is_none(), "no body without preview = true");
    assert_eq!(
        n["devices"],
        json!([{ "device": "phone", "platform": "apns", "token": "tok-phone" }]),
        "only the device that is away"
    );
    // The badge is bob's unread total, the sum of the per-conversation counts `convs` shows.
    let list = watch.ok("convs", json!({}));
    let sum: u64 = list["convs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["unread"].as_u64().unwrap())
        .sum();
    assert!(sum >= 53, "{list}");
    assert_eq!(n["badge"].as_u64(), Some(sum), "{list}");
    assert_eq!(list["total_unread"].as_u64(), Some(sum));

    let page = metrics(&server);
    assert_eq!(
        global(&page, "hermod_push_notifications_total{outcome=\"sent\"}"),
        1
    );
    assert_eq!(metric_sum(&page, "hermod_notify_out_total", ""), 1);
    assert_eq!(metric_sum(&page, "hermod_notify_coalesced_total", ""), 52);
    assert!(global(&page, "hermod_push_gateway_seconds_count") >= 1);

    // Reading everything, then one more message: the badge counts just that one.
    for conv in [&direct, &group] {
        let last = list["convs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["conv"] == conv.as_str())
            .unwrap()["last_seq"]
            .clone();
        watch.ok("read", json!({ "conv": conv, "seq": last }));
    }
    send(&mut alice, &direct, "one more");
    let hit = gateway
        .next_hit(Duration::from_secs(5))
        .expect("a second notification");
    assert_eq!(
        (hit.body["count"].as_u64(), hit.body["badge"].as_u64()),
        (Some(1), Some(1)),
        "{}",
        hit.body
    );
}

#[test]
fn muted_conversations_and_do_not_disturb_notify_no_one() {
    let gateway = Gateway::start(SECRET, Mode::Ok);
    let (server, _dir) = server(&gateway, "coalesce_ms = 200\npreview = true", &[]);
    let (mut alice, _) = server.user("alice", "pc");
    let mut watch = away_with_token(&server, "bob", "phone", "tok-phone");
    let group = create(&mut alice, "noisy", &["bob"], json!({}))["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    let direct = open(&mut alice, "bob");
    watch.ok("conv_mute", json!({ "conv": group, "muted": true }));
    for i in 0..5 {
        send(&mut alice, &group, &format!("g{i}"));
    }
    let hits = gateway.hits_within(Duration::from_millis(1_500));
    assert!(
        hits.is_empty(),
        "a muted conversation notifies no one: {hits:?}"
    );
    assert_eq!(
        metric_sum(&metrics(&server), "hermod_notify_suppressed_total", ""),
        5
    );

    // The direct conversation is not muted; with `preview` the body comes along.
    send(&mut alice, &direct, "hello bob");
    let hit = gateway
        .next_hit(Duration::from_secs(5))
        .expect("a notification");
    assert_eq!(hit.body["conv"], direct.as_str());
    assert_eq!(hit.body["count"], 1);
    assert_eq!(hit.body["preview"], json!({ "text": "hello bob" }));

    // Do-not-disturb silences everything until it ends.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    watch.ok("dnd_set", json!({ "until": until }));
    send(&mut alice, &direct, "are you there?");
    let hits = gateway.hits_within(Duration::from_millis(1_500));
    assert!(hits.is_empty(), "do-not-disturb: {hits:?}");
    watch.ok("dnd_set", json!({ "until": null }));
    send(&mut alice, &direct, "now?");
    assert!(
        gateway.next_hit(Duration::from_secs(5)).is_some(),
        "do-not-disturb over"
    );
    assert_eq!(
        metric_sum(&metrics(&server), "hermod_notify_suppressed_total", ""),
        6
    );
}

#[test]
fn a_device_online_but_silent_is_notified_once() {
    // A connection that takes pushes but never acks (an app asleep with its socket open):
    // after `push_retry_ms` it is treated as away for that message.
    let gateway = Gateway::start(SECRET, Mode::Ok);
    let (server, _dir) = server(&gateway, "coalesce_ms = 100", &["--push-retry-ms", "300"]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut phone, _) = server.user("bob", "phone");
    phone.ok(
        "push_register",
        json!({ "platform": "fcm", "token": "tok" }),
    );
    let direct = open(&mut alice, "bob");
    send(&mut alice, &direct, "wake up");
    let hit = gateway
        .next_hit(Duration::from_secs(5))
        .expect("a notification");
    assert_eq!(hit.body["devices"][0]["device"], "phone");
    // Retries go on, but the notification was once per message.
    let more = gateway.hits_within(Duration::from_millis(1_000));
    assert!(more.is_empty(), "{more:?}");
    assert!(
        phone.push_within(Duration::from_secs(1)).is_some(),
        "still pushed"
    );
}

/// Sends `n` one-to-one messages round-robin to `peers`; every ack's latency, sorted.
fn send_latencies(alice: &mut Client, convs: &[String], n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        send(alice, &convs[i % convs.len()], "ping");
        out.push(started.elapsed());
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[test]
fn a_hanging_gateway_costs_the_message_path_nothing() {
    // A small queue, one worker, short windows: a gateway that never answers fills the queue
    // within a few windows, and the rest are dropped and counted.
    let section = "coalesce_ms = 20\nqueue = 32\nworkers = 1\ntimeout_ms = 1000\nattempts = 2";
    let mut figures = Vec::new();
    for mode in [Mode::Ok, Mode::Hang] {
        let gateway = Gateway::start(SECRET, mode);
        let (server, _dir) = server(&gateway, section, &[]);
        let (mut alice, _) = server.user("alice", "pc");
        let mut convs = Vec::new();
        let mut watches = Vec::new();
        for i in 0..16 {
            let name = format!("user{i}");
            watches.push(away_with_token(&server, &name, "phone", &format!("tok{i}")));
            convs.push(open(&mut alice, &name));
        }
        // Each user gets a message every 16 sends: at ~1 ms a send, each window is full.
        let lat = send_latencies(&mut alice, &convs, 800);
        let (p50, p99) = (pct(&lat, 0.50), pct(&lat, 0.99));
        std::thread::sleep(Duration::from_millis(300));
        let page = metrics(&server);
        let sent = global(&page, "hermod_push_notifications_total{outcome=\"sent\"}");
        let dropped = global(
            &page,
            "hermod_push_notifications_total{outcome=\"dropped\"}",
        );
        let out = metric_sum(&page, "hermod_notify_out_total", "");
        eprintln!("gateway {mode:?}: send p50 {p50:?} p99 {p99:?}; notifications out {out}, sent {sent}, dropped {dropped}");
        figures.push((mode, p99, sent, dropped, out));
        // Every message was delivered regardless: each watcher syncs all of its own.
        for (i, watch) in watches.iter_mut().enumerate() {
            let list = watch.ok("convs", json!({}));
            assert_eq!(
                list["convs"][0]["last_seq"].as_u64(),
                Some(50),
                "u{i}: {list}"
            );
        }
        match mode {
            Mode::Ok => assert!(sent == out && out >= 16 && dropped == 0, "{page}"),
            _ => {
                assert_eq!(sent, 0);
                assert!(
                    // At most the queue and the one in the worker's hands were kept.
                    dropped > 0 && dropped + 33 >= out,
                    "the queue overflowed: {page}"
                );
            }
        }
    }
}

#[test]
fn a_failing_gateway_is_retried_then_counted_failed() {
    let gateway = Gateway::start(SECRET, Mode::Fail);
    let (server, _dir) = server(&gateway, "coalesce_ms = 50\nattempts = 3", &[]);
    let (mut alice, _) = server.user("alice", "pc");
    let _watch = away_with_token(&server, "bob", "phone", "tok");
    let direct = open(&mut alice, "bob");
    send(&mut alice, &direct, "hi");
    let hits = gateway.hits_within(Duration::from_millis(2_500));
    assert_eq!(hits.len(), 3, "three attempts of the same notification");
    assert!(hits.iter().all(|h| h.body == hits[0].body && h.signed));
    let page = metrics(&server);
    assert_eq!(
        global(&page, "hermod_push_notifications_total{outcome=\"failed\"}"),
        1
    );
    assert_eq!(global(&page, "hermod_push_gateway_retries_total"), 2);
}

#[test]
fn push_tokens_outlive_a_restart() {
    // Which users hold tokens is kept in memory and read back at start-up.
    let gateway = Gateway::start(SECRET, Mode::Ok);
    let (mut first, dir) = server(&gateway, "coalesce_ms = 100", &[]);
    let (mut alice, _) = first.user("alice", "pc");
    let watch = away_with_token(&first, "bob", "phone", "tok-phone");
    let direct = open(&mut alice, "bob");
    drop((alice, watch));
    assert!(first.stop().success());
    let config = dir.path().join("hermod.toml");
    let again = Server::start_on(&first.data, &["--config", config.to_str().unwrap()]);
    let (mut alice, _) = again.user("alice", "pc");
    send(&mut alice, &direct, "after the restart");
    let hit = gateway
        .next_hit(Duration::from_secs(5))
        .expect("a notification after the restart");
    assert_eq!(hit.body["devices"][0]["token"], "tok-phone");
}
