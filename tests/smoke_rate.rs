//! A quick send→push rate through the real path (WebSocket, home shard, owner shard, group
//! commit, fan-out, push, ack). Not a benchmark suite — that is `hermod-bench` (next issue) —
//! and not run by default: it reports figures, it asserts only correctness.
//!
//! `cargo test --release --test smoke_rate -- --ignored --nocapture`
//! Environment: `SMOKE_MESSAGES` (default 20000), `SMOKE_WINDOW` (sends in flight, default 256),
//! `SMOKE_SHARDS` (default 1), `SMOKE_DURABILITY` (default wal).

mod common;

use std::time::{Duration, Instant};

use common::{open, Server};
use serde_json::json;
use tungstenite::Message;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "reports a throughput figure; run explicitly"]
fn smoke_send_push_rate() {
    let n = env("SMOKE_MESSAGES", 20_000);
    let window = env("SMOKE_WINDOW", 256);
    let shards = env("SMOKE_SHARDS", 1).to_string();
    let durability = std::env::var("SMOKE_DURABILITY").unwrap_or_else(|_| "wal".into());
    let server = Server::start(&[
        "--shards",
        &shards,
        "--durability",
        &durability,
        "--rate-limit",
        "1000000",
    ]);
    let (mut alice, _) = server.user("alice", "pc");
    let (mut bob, _) = server.user("bob", "pc");
    let conv = open(&mut alice, "bob");

    let receiver = std::thread::spawn(move || {
        let mut last = 0u64;
        let mut unacked = 0;
        let mut first: Option<Instant> = None;
        while last < n {
            let p = bob.push();
            first.get_or_insert_with(Instant::now);
            let seq = p["msg"]["seq"].as_u64().unwrap();
            if seq > last {
                assert_eq!(seq, last + 1, "pushes arrive in order without gaps");
                last = seq;
            }
            unacked += 1;
            if unacked >= 128 {
                bob.ack(&p); // and every earlier push of the conversation
                unacked = 0;
            }
        }
        Instant::now()
    });

    let started = Instant::now();
    let mut ack_latency = Vec::with_capacity(n as usize);
    let mut sent = 0;
    while sent < n {
        let batch = window.min(n - sent);
        let t = Instant::now();
        for i in 0..batch {
            let frame = json!({ "op": "send", "rid": 1_000 + sent + i, "conv": conv, "body": { "text": "hello, this is a smoke test message" } });
            alice.ws.write(Message::text(frame.to_string())).unwrap();
        }
        alice.ws.flush().unwrap();
        for _ in 0..batch {
            let r = alice.next_frame().expect("ack");
            assert!(r["ok"]["seq"].is_u64(), "{r}");
        }
        ack_latency.push(t.elapsed() / batch as u32);
        sent += batch;
    }
    let acked = started.elapsed();
    let delivered = receiver.join().unwrap().duration_since(started);
    let rate = n as f64 / delivered.as_secs_f64();
    println!(
        "smoke: {n} messages, window {window}, {shards} shard(s), durability {durability}: all acked in {:.2}s, all pushed in {:.2}s => {:.0} msg/s persisted+acked+delivered",
        acked.as_secs_f64(),
        delivered.as_secs_f64(),
        rate
    );
    assert!(delivered < Duration::from_secs(600));
}
