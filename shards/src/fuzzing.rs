//! Fuzz harness for request parsing and handling: any text frame from a logged-in client,
//! through a real engine on an in-memory store. Run by `fuzz/` (libFuzzer, nightly) and by
//! the seeded tests below and in `engine` (stable, every CI run).
//!
//! What must hold for any frame: no panic; every reply and push is JSON; a frame carrying an
//! integer `rid` (other than an `ack`) gets exactly one reply with that `rid`, unless it
//! closed the connection; nothing else is answered twice.

use crate::auth::HashCost;
use crate::engine::{Config, Output, Shard};
use crate::ids::{ConnId, ShardId};
use crate::storage::MemStorage;

/// One engine (a single shard: every mail stays in process, so every request is answered
/// within one `pump`) with users `alice` (logged in on the harness's connection) and `bob`,
/// a one-to-one conversation between them and a group.
pub struct Harness {
    shard: Shard<MemStorage>,
    store: MemStorage,
    conn: ConnId,
    next_conn: u64,
    now_ms: u64,
}

impl Default for Harness {
    fn default() -> Harness {
        Harness::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        let store = MemStorage::default();
        let mut cfg = Config::new(ShardId(0), 1, [9; 32]);
        cfg.hash_cost = HashCost {
            memory_kib: 8,
            passes: 1,
        };
        // The harness sends far more than a client may per second: no rate limit in the way.
        cfg.requests_per_sec_max = u32::MAX / 20;
        let mut h = Harness {
            shard: Shard::new(cfg, store.clone()),
            store,
            conn: ConnId(0),
            next_conn: 1,
            now_ms: 1_700_000_000_000,
        };
        for name in ["alice", "bob"] {
            let c = h.connect();
            h.shard.handle_frame(
                h.now_ms,
                c,
                &format!(
                    r#"{{"op":"register","rid":1,"username":"{name}","password":"password123"}}"#
                ),
            );
            h.pump();
            h.shard.handle_disconnect(h.now_ms, c);
        }
        h.login();
        for setup in [
            r#"{"op":"open","rid":1,"user":"bob"}"#,
            r#"{"op":"group_create","rid":2,"name":"team","members":["bob"]}"#,
        ] {
            h.shard.handle_frame(h.now_ms, h.conn, setup);
            h.pump();
        }
        h
    }

    fn connect(&mut self) -> ConnId {
        let c = ConnId(self.next_conn);
        self.next_conn += 1;
        self.shard.handle_connect(self.now_ms, c);
        c
    }

    fn login(&mut self) {
        self.conn = self.connect();
        let login =
            r#"{"op":"login","rid":1,"username":"alice","password":"password123","device":"pc"}"#;
        self.shard.handle_frame(self.now_ms, self.conn, login);
        let (sent, closed) = self.pump();
        assert!(
            !closed && sent.iter().any(|f| f.contains("token")),
            "{sent:?}"
        );
    }

    /// Runs jobs and commits until nothing is pending: the frames sent to the harness's
    /// connection, and whether it was closed.
    fn pump(&mut self) -> (Vec<String>, bool) {
        let (mut sent, mut closed) = (Vec::new(), false);
        loop {
            let mut progressed = false;
            while let Some(out) = self.shard.poll_output() {
                progressed = true;
                match out {
                    Output::Send { conn, frame } => {
                        serde_json::from_str::<serde_json::Value>(&frame)
                            .unwrap_or_else(|e| panic!("a frame that is not JSON ({e}): {frame}"));
                        if conn == self.conn {
                            sent.push(frame.to_string());
                        }
                    }
                    Output::Close { conn, .. } if conn == self.conn => closed = true,
                    Output::Job { id, job, .. } => {
                        let result = job.run(HashCost {
                            memory_kib: 8,
                            passes: 1,
                        });
                        self.shard.handle_job_done(self.now_ms, id, result);
                    }
                    _ => {}
                }
            }
            if let Some(commit) = self.shard.poll_commit() {
                progressed = true;
                self.store.apply(&commit.ops);
                self.shard
                    .handle_commit_done(self.now_ms, commit.id, Ok(()));
            }
            if !progressed {
                return (sent, closed);
            }
        }
    }

    /// Sends one frame as alice and checks the answer (see the module doc).
    pub fn frame(&mut self, text: &str) {
        self.now_ms += 7;
        self.shard.handle_frame(self.now_ms, self.conn, text);
        let (sent, closed) = self.pump();
        let parsed: Option<serde_json::Value> = serde_json::from_str(text).ok();
        let rid = parsed.as_ref().and_then(|v| v.get("rid")?.as_u64());
        let is_ack = parsed
            .as_ref()
            .is_some_and(|v| v.get("op").and_then(|o| o.as_str()) == Some("ack"));
        if let Some(rid) = rid.filter(|_| !is_ack) {
            let replies = sent
                .iter()
                .filter(|f| {
                    serde_json::from_str::<serde_json::Value>(f)
                        .is_ok_and(|v| v.get("rid").and_then(|r| r.as_u64()) == Some(rid))
                })
                .count();
            assert!(
                replies == 1 || (closed && replies == 0),
                "{text:?} got {replies} replies (closed: {closed}): {sent:?}"
            );
        }
        if closed {
            // logout, a flood, …: log in again on a new connection and go on.
            self.shard.handle_disconnect(self.now_ms, self.conn);
            self.login();
        }
    }
}

/// The libFuzzer entry: the bytes as one text frame (WebSocket text is UTF-8; anything
/// else never reaches the engine).
pub fn request(harness: &mut Harness, data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        harness.frame(text);
    }
}

/// Frames of every op, valid, for the fuzzers to start from and mutate.
pub const SEEDS: &[&str] = &[
    r#"{"op":"send","rid":1,"conv":"d.1.2","id":"0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b","body":{"t":"x"}}"#,
    r#"{"op":"sync","rid":1,"convs":[{"conv":"d.1.2","after":3}],"limit":10}"#,
    r#"{"op":"history","rid":1,"conv":"d.1.2","before":9,"limit":0}"#,
    r#"{"op":"ack","seqs":{"d.1.2":3,"g.5":1}}"#,
    r#"{"op":"push_register","rid":1,"platform":"fcm","token":"abc"}"#,
    r#"{"op":"conv_mute","rid":1,"conv":"g.5","muted":true}"#,
    r#"{"op":"dnd_set","rid":1,"until":null}"#,
    r#"{"op":"read","rid":1,"conv":"d.1.2","seq":4}"#,
    r#"{"op":"convs","rid":1}"#,
    r#"{"op":"open","rid":1,"user":"bob"}"#,
    r#"{"op":"group_create","rid":1,"name":"team","members":["bob","carol"],"approval":true}"#,
    r#"{"op":"group_invite","rid":1,"conv":"g.1f","users":["bob"]}"#,
    r#"{"op":"group_kick","rid":1,"conv":"g.1f","user":"bob"}"#,
    r#"{"op":"group_mute","rid":1,"conv":"g.1f","user":"bob","muted":false}"#,
    r#"{"op":"group_role","rid":1,"conv":"g.1f","user":"bob","role":"admin"}"#,
    r#"{"op":"group_info","rid":1,"conv":"g.1f","version":3}"#,
    r#"{"op":"group_members","rid":1,"conv":"g.1f"}"#,
    r#"{"op":"edit","rid":1,"conv":"d.1.2","seq":1,"body":{"t":"y"}}"#,
    r#"{"op":"recall","rid":1,"conv":"d.1.2","seq":1}"#,
    r#"{"op":"receipts","rid":1,"conv":"g.1f","seq":1}"#,
    r#"{"op":"typing","rid":1,"conv":"d.1.2"}"#,
    r#"{"op":"friend_request","rid":1,"user":"bob","message":"hi"}"#,
    r#"{"op":"friend_accept","rid":1,"user":"bob"}"#,
    r#"{"op":"friends","rid":1,"version":2}"#,
    r#"{"op":"presence","rid":1,"users":["bob","carol"]}"#,
    r#"{"op":"presence_set","rid":1,"state":"away","status":"lunch"}"#,
    r#"{"op":"profile_set","rid":1,"display_name":"A","bio":"b"}"#,
    r#"{"op":"profile","rid":1,"user":"bob"}"#,
    r#"{"op":"block","rid":1,"user":"bob"}"#,
    r#"{"op":"unblock","rid":1,"user":"bob"}"#,
    r#"{"op":"blocks","rid":1}"#,
    r#"{"op":"devices","rid":1}"#,
    r#"{"op":"device_logout","rid":1,"device":"phone"}"#,
    r#"{"op":"ping","rid":1}"#,
];

/// A seed with a few bytes replaced, removed or inserted (JSON punctuation and digits
/// favoured): `edits` picks how many.
pub fn mutate(rng: &mut impl rand::Rng, seed: &str, edits: std::ops::Range<usize>) -> String {
    let mut b = seed.as_bytes().to_vec();
    for _ in 0..rng.gen_range(edits) {
        if b.is_empty() {
            break;
        }
        let i = rng.gen_range(0..b.len());
        match rng.gen_range(0..3) {
            0 => b[i] = rng.gen_range(0x20..0x7f),
            1 => {
                b.remove(i);
            }
            _ => b.insert(i, b"{}[]\":,0123456789-"[rng.gen_range(0..18)]),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::ids::{ConvId, UserId};

    /// The seeds with the harness's real ids, then mutated: bytes replaced, removed, inserted,
    /// values swapped for other JSON types, numbers pushed to their edges.
    #[test]
    fn mutated_requests_of_a_logged_in_client() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut h = Harness::new();
        let direct = ConvId::direct(UserId::from_username("alice"), UserId::from_username("bob"));
        let seeds: Vec<String> = SEEDS
            .iter()
            .map(|s| s.replace("d.1.2", &direct.to_string()))
            .collect();
        let swaps = [
            "null",
            "true",
            "-1",
            "0",
            "18446744073709551615",
            "18446744073709551616",
            "1e400",
            "\"\"",
            "[]",
            "{}",
            "\"g.0\"",
            "[[[[[[[[]]]]]]]]",
        ];
        for _ in 0..6_000 {
            let mut frame = seeds[rng.gen_range(0..seeds.len())].clone();
            match rng.gen_range(0..3) {
                0 => {
                    // Replace one value (after a ':') with another type.
                    let colons: Vec<usize> = frame.match_indices(':').map(|(i, _)| i).collect();
                    let at = colons[rng.gen_range(0..colons.len())] + 1;
                    let end = frame[at..].find([',', '}']).map_or(frame.len(), |e| at + e);
                    frame.replace_range(at..end, swaps[rng.gen_range(0..swaps.len())]);
                }
                1 => frame = mutate(&mut rng, &frame, 1..4),
                _ => {}
            }
            request(&mut h, frame.as_bytes());
        }
    }
}
