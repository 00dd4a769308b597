//! The engine's own tests: seeded random frames through a real engine (`fuzz`), time through
//! `poll_timeout`/`handle_timeout` (`deadlines`, a bot's unanswered HTTP request among them),
//! multi-step protocols cut between two nodes (`torn`), and what a push token's life ends with
//! (`push_tokens`). The simulation of several engines is `shards/tests/sim.rs`.

use super::{Output, Shard};
use crate::auth::HashCost;
use crate::storage::MemStorage;

/// The map of two one-shard nodes, `a` (shard 0) and `b` (shard 1).
fn two_one_shard_nodes() -> std::sync::Arc<crate::cluster::ClusterMap> {
    use crate::cluster::{ClusterMap, NodeSpec};
    let node = |id: &str| NodeSpec {
        id: id.into(),
        url: format!("ws://{id}/ws"),
        shards: 1,
    };
    std::sync::Arc::new(ClusterMap {
        version: 1,
        nodes: vec![node("a"), node("b")],
    })
}

/// Runs the engine's jobs (inline) and commits until nothing is pending; returns the frames
/// sent. Mail is taken and dropped: a test that needs it delivered routes it itself.
fn pump(shard: &mut Shard<MemStorage>, store: &MemStorage, now: u64) -> Vec<String> {
    let mut sent = Vec::new();
    loop {
        let mut progressed = false;
        while let Some(out) = shard.poll_output() {
            progressed = true;
            match out {
                Output::Send { frame, .. } => sent.push(frame.to_string()),
                Output::Job { id, job, .. } => {
                    let result = job.run(HashCost {
                        memory_kib: 8,
                        passes: 1,
                    });
                    shard.handle_job_done(now, id, result);
                }
                _ => {}
            }
        }
        if let Some(commit) = shard.poll_commit() {
            progressed = true;
            store.apply(&commit.ops);
            shard.handle_commit_done(now, commit.id, Ok(()));
        }
        if !progressed {
            return sent;
        }
    }
}

mod fuzz {
    //! Seeded random and mutated frames through a real engine (a stable-toolchain stand-in for
    //! cargo-fuzz): no panic, and every frame that carries a rid is answered exactly once or
    //! the connection is closed.
    use rand::{Rng, SeedableRng};

    use super::super::*;
    use super::pump;
    use crate::auth::HashCost;
    use crate::storage::MemStorage;

    const SEEDS: &[&str] = &[
        r#"{"op":"send","rid":1,"conv":"d.1.2","id":"0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b","body":{"t":"x"}}"#,
        r#"{"op":"login","rid":1,"username":"alice","password":"password123","device":"pc"}"#,
        r#"{"op":"sync","rid":1,"convs":[{"conv":"d.1.2","after":3}],"limit":10}"#,
        r#"{"op":"history","rid":1,"conv":"d.1.2","before":9}"#,
        r#"{"op":"ack","seqs":{"d.1.2":3}}"#,
        r#"{"op":"read","rid":1,"conv":"d.1.2","seq":4}"#,
        r#"{"op":"open","rid":1,"user":"bob"}"#,
        r#"{"op":"resume","rid":1,"token":"AAAA.BBBB"}"#,
        r#"{"op":"group_create","rid":1,"name":"team","members":["bob","carol"],"approval":true}"#,
        r#"{"op":"group_invite","rid":1,"conv":"g.1f","users":["dave"]}"#,
        r#"{"op":"group_mute","rid":1,"conv":"g.1f","user":"dave","muted":false}"#,
        r#"{"op":"group_role","rid":1,"conv":"g.1f","user":"dave","role":"admin"}"#,
        r#"{"op":"group_info","rid":1,"conv":"g.1f","version":3}"#,
        r#"{"op":"edit","rid":1,"conv":"d.1.2","seq":4,"body":{"t":"y"}}"#,
        r#"{"op":"recall","rid":1,"conv":"g.1f","seq":4}"#,
        r#"{"op":"receipts","rid":1,"conv":"g.1f","seq":4}"#,
        r#"{"op":"typing","rid":1,"conv":"d.1.2"}"#,
        r#"{"op":"friend_request","rid":1,"user":"bob","message":"hi"}"#,
        r#"{"op":"presence","rid":1,"users":["bob","carol"]}"#,
        r#"{"op":"presence_set","rid":1,"state":"away","status":"lunch"}"#,
        r#"{"op":"block","rid":1,"user":"bob"}"#,
        r#"{"op":"device_logout","rid":1,"device":"phone"}"#,
    ];

    #[test]
    fn random_frames_are_answered_or_closed_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut shard = Shard::new(Config::new(ShardId(0), 1, [1; 32]), MemStorage::default());
        let mut conn_id = 0;
        for round in 0..20_000 {
            conn_id += 1;
            let conn = ConnId(conn_id);
            shard.handle_connect(round, conn);
            let seed = SEEDS[rng.gen_range(0..SEEDS.len())];
            let frame = crate::fuzzing::mutate(&mut rng, seed, 0..4);
            shard.handle_frame(round, conn, &frame);
            let mut replies = 0;
            let mut closed = false;
            let mut moved = false;
            while let Some(out) = shard.poll_output() {
                match out {
                    Output::Send { conn: c, frame: f } if c == conn => {
                        serde_json::from_str::<serde_json::Value>(&f).expect("replies are JSON");
                        replies += 1;
                    }
                    Output::Close { conn: c, .. } if c == conn => closed = true,
                    Output::Handoff { .. } | Output::Job { .. } | Output::Mail { .. } => {
                        moved = true
                    }
                    _ => {}
                }
            }
            let has_rid = serde_json::from_str::<serde_json::Value>(&frame)
                .ok()
                .and_then(|v| v.get("rid").cloned())
                .is_some_and(|r| r.is_u64());
            let is_ack = frame.contains("\"ack\"");
            if has_rid && !is_ack && !moved && !closed {
                assert_eq!(replies, 1, "frame {frame:?} must get exactly one reply");
            }
            assert!(
                replies <= 1 || closed,
                "frame {frame:?} got {replies} replies"
            );
            shard.handle_disconnect(round, conn);
        }
    }

    #[test]
    fn requests_naming_made_up_conversations_leave_no_state_behind() {
        let store = MemStorage::default();
        let mut cfg = Config::new(ShardId(0), 1, [1; 32]);
        cfg.hash_cost = HashCost {
            memory_kib: 8,
            passes: 1,
        };
        let mut shard = Shard::new(cfg, store.clone());
        let conn = ConnId(1);
        shard.handle_connect(0, conn);
        let register = r#"{"op":"register","rid":1,"username":"alice","password":"password123"}"#;
        let login =
            r#"{"op":"login","rid":2,"username":"alice","password":"password123","device":"pc"}"#;
        shard.handle_frame(0, conn, register);
        pump(&mut shard, &store, 0);
        shard.handle_frame(0, conn, login);
        let sent = pump(&mut shard, &store, 0);
        assert!(sent.iter().any(|f| f.contains("token")), "{sent:?}");
        let me = crate::ids::UserId::from_username("alice").0;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for rid in 10..1_010u64 {
            let other: u64 = rng.gen();
            let (a, b) = (me.min(other), me.max(other));
            let frame = match rid % 4 {
                0 => format!(r#"{{"op":"send","rid":{rid},"conv":"d.{a:x}.{b:x}","body":1}}"#),
                1 => format!(r#"{{"op":"history","rid":{rid},"conv":"d.{a:x}.{b:x}"}}"#),
                2 => format!(r#"{{"op":"group_info","rid":{rid},"conv":"g.{other:x}"}}"#),
                _ => format!(r#"{{"op":"recall","rid":{rid},"conv":"g.{other:x}","seq":1}}"#),
            };
            shard.handle_frame(rid, conn, &frame);
            let sent = pump(&mut shard, &store, rid);
            assert_eq!(sent.len(), 1, "{frame}: {sent:?}");
            assert!(
                sent[0].contains("no_such_conversation"),
                "{frame}: {sent:?}"
            );
        }
        assert_eq!(shard.loaded_conversations(), 0);
    }
}

mod deadlines {
    //! Time through `poll_timeout`/`handle_timeout`: a connection's heartbeat runs at its
    //! deadline only, moves with activity, pings, and closes at the timeout.
    use super::super::*;
    use crate::protocol::close;
    use crate::storage::MemStorage;

    fn outputs(shard: &mut Shard<MemStorage>) -> Vec<Output> {
        std::iter::from_fn(|| shard.poll_output()).collect()
    }

    #[test]
    fn heartbeats_run_at_their_deadlines() {
        let mut cfg = Config::new(ShardId(0), 1, [1; 32]);
        cfg.heartbeat_interval_ms = 1_000;
        cfg.heartbeat_timeout_ms = 3_000;
        let mut shard = Shard::new(cfg, MemStorage::default());
        let conn = ConnId(1);
        assert_eq!(
            shard.poll_timeout(),
            None,
            "nothing to do without connections"
        );
        shard.handle_connect(0, conn);
        assert_eq!(shard.poll_timeout(), Some(1_000));
        shard.handle_timeout(999);
        assert!(outputs(&mut shard).is_empty(), "not due yet");
        shard.handle_timeout(1_000);
        assert!(matches!(outputs(&mut shard)[..], [Output::Ping { conn: c }] if c == conn));
        shard.handle_activity(1_500, conn);
        shard.handle_timeout(2_000);
        assert!(
            outputs(&mut shard).is_empty(),
            "heard from 500 ms ago: no ping"
        );
        assert_eq!(
            shard.poll_timeout(),
            Some(2_500),
            "rescheduled from the activity"
        );
        for at in [2_500, 3_500] {
            shard.handle_timeout(at);
            assert!(
                matches!(outputs(&mut shard)[..], [Output::Ping { .. }]),
                "at {at}"
            );
        }
        assert_eq!(shard.poll_timeout(), Some(4_500));
        shard.handle_timeout(4_500);
        match &outputs(&mut shard)[..] {
            [Output::Close { code, .. }] => assert_eq!(*code, close::HEARTBEAT_TIMEOUT),
            other => panic!("{other:?}"),
        }
        shard.handle_timeout(10_000);
        assert!(
            outputs(&mut shard).is_empty(),
            "a closed connection's entry just expires"
        );
        assert_eq!(shard.poll_timeout(), None);
    }

    /// Shard 0 of a cluster of two one-shard nodes, with `user…` logged in on `ConnId(1)`;
    /// also returns a one-to-one conversation of that user owned by node b's shard.
    fn node_a_with_a_user() -> (Shard<MemStorage>, MemStorage, crate::ids::ConvId) {
        use crate::ids::{ConvId, UserId};

        let map = super::two_one_shard_nodes();
        let mut cfg = Config::in_cluster(ShardId(0), map.clone(), 0, [1; 32]);
        cfg.hash_cost = crate::auth::HashCost {
            memory_kib: 8,
            passes: 1,
        };
        let store = MemStorage::default();
        let mut shard = Shard::new(cfg, store.clone());
        let placement = map.placement();
        let me = (0..)
            .map(|i| format!("user{i}"))
            .find(|n| placement.home(UserId::from_username(n)) == ShardId(0))
            .unwrap();
        let conn = ConnId(1);
        shard.handle_connect(1_000, conn);
        let auth =
            format!(r#"{{"op":"register","rid":1,"username":"{me}","password":"password123"}}"#);
        shard.handle_frame(1_000, conn, &auth);
        super::pump(&mut shard, &store, 1_000);
        let login = format!(
            r#"{{"op":"login","rid":2,"username":"{me}","password":"password123","device":"pc"}}"#
        );
        shard.handle_frame(1_000, conn, &login);
        let replies = super::pump(&mut shard, &store, 1_000);
        assert!(
            replies.iter().any(|r| r.contains(r#""rid":2,"ok""#)),
            "{replies:?}"
        );
        let conv = (0..)
            .map(|i| {
                let peer = UserId::from_username(&format!("peer{i}"));
                ConvId::direct(UserId::from_username(&me), peer)
            })
            .find(|c| placement.owner(*c) == ShardId(1))
            .unwrap();
        (shard, store, conv)
    }

    /// In a cluster, a gather whose part went to a node that took the mail and died (never
    /// answering) fails with `unavailable` at `CROSS_NODE_WAIT_MS`, not never.
    #[test]
    fn a_gather_waiting_on_another_node_fails_at_its_deadline() {
        use crate::limits::CROSS_NODE_WAIT_MS;
        let (mut shard, store, conv) = node_a_with_a_user();
        let now = 2_000;
        let sync = format!(r#"{{"op":"sync","rid":3,"convs":[{{"conv":"{conv}","after":0}}]}}"#);
        shard.handle_frame(now, ConnId(1), &sync);
        assert!(super::pump(&mut shard, &store, now).is_empty());
        shard.handle_timeout(now + CROSS_NODE_WAIT_MS - 1);
        assert!(
            super::pump(&mut shard, &store, now).is_empty(),
            "not before the deadline"
        );
        shard.handle_timeout(now + CROSS_NODE_WAIT_MS);
        let replies = super::pump(&mut shard, &store, now);
        assert!(
            replies
                .iter()
                .any(|r| r.contains(r#""rid":3,"error":{"code":"unavailable""#)),
            "{replies:?}"
        );
    }

    /// A request forwarded to another node's shard that took it and died: `unavailable` at the
    /// deadline, and the real answer, arriving later, is dropped — one reply per request.
    #[test]
    fn a_forwarded_request_gets_one_reply_even_when_its_node_died_with_it() {
        use crate::limits::CROSS_NODE_WAIT_MS;
        use crate::mail::Mail;
        let (mut shard, store, conv) = node_a_with_a_user();
        let now = 2_000;
        let send = format!(
            r#"{{"op":"send","rid":4,"conv":"{conv}","id":"0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b","body":{{}}}}"#
        );
        shard.handle_frame(now, ConnId(1), &send);
        assert!(
            super::pump(&mut shard, &store, now).is_empty(),
            "forwarded to its owner"
        );
        shard.handle_timeout(now + CROSS_NODE_WAIT_MS);
        let replies = super::pump(&mut shard, &store, now);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert!(replies[0].starts_with(r#"{"rid":4,"error":{"code":"unavailable""#));
        let late = Mail::Reply {
            conn: ConnId(1),
            frame: r#"{"rid":4,"ok":{"seq":1}}"#.into(),
        };
        shard.handle_mail(now + CROSS_NODE_WAIT_MS + 5, late);
        assert!(
            super::pump(&mut shard, &store, now).is_empty(),
            "the late answer is dropped"
        );
        // Answered in time, a forwarded request's reply goes through and arms nothing more.
        shard.handle_frame(now, ConnId(1), &send.replace(r#""rid":4"#, r#""rid":5"#));
        super::pump(&mut shard, &store, now);
        let answer = Mail::Reply {
            conn: ConnId(1),
            frame: r#"{"rid":5,"ok":{"seq":1}}"#.into(),
        };
        shard.handle_mail(now + 10, answer);
        assert_eq!(super::pump(&mut shard, &store, now).len(), 1);
        shard.handle_timeout(now + 3 * CROSS_NODE_WAIT_MS);
        assert!(
            super::pump(&mut shard, &store, now).is_empty(),
            "no unavailable after an answer"
        );
    }

    /// A bot's HTTP request whose home shard never answers (its mail is dropped here) gets one
    /// answer, `unavailable`, at `BOT_CALL_WAIT_MS`; a token that does not verify is refused at
    /// once. (Across nodes the shorter `CROSS_NODE_WAIT_MS` answers first, as for any request.)
    #[test]
    fn a_bot_request_unanswered_by_its_home_fails_at_its_deadline() {
        use crate::auth::TokenClaims;
        use crate::engine::BOT_DEVICE;
        use crate::ids::UserId;
        use crate::limits::BOT_CALL_WAIT_MS;
        let mut shard = Shard::new(Config::new(ShardId(0), 2, [1; 32]), MemStorage::default());
        let bot = (0..)
            .map(|i| UserId::from_username(&format!("bot{i}")))
            .find(|u| shard.home_of(*u) == ShardId(1))
            .unwrap();
        let token = shard.tokens.mint(&TokenClaims {
            user: bot,
            nonce: 7,
            issued_s: 1,
            expires_s: 1_000_000,
            device: BOT_DEVICE.into(),
        });
        let replies = |shard: &mut Shard<MemStorage>| -> Vec<(u16, String)> {
            outputs(shard)
                .into_iter()
                .filter_map(|o| match o {
                    Output::AdminReply { status, body, .. } => Some((status, body)),
                    _ => None,
                })
                .collect()
        };
        let now = 2_000;
        shard.handle_bot_http(now, ConnId(50), "not-a-token", r#"{"op":"ping"}"#.into());
        assert_eq!(replies(&mut shard)[0].0, 401);
        shard.handle_bot_http(now, ConnId(51), &token, r#"{"op":"ping","rid":1}"#.into());
        assert!(replies(&mut shard).is_empty(), "mailed to the bot's home");
        shard.handle_timeout(now + BOT_CALL_WAIT_MS - 1);
        assert!(replies(&mut shard).is_empty(), "not before the deadline");
        shard.handle_timeout(now + BOT_CALL_WAIT_MS);
        let got = replies(&mut shard);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 503);
        assert!(got[0].1.contains("unavailable"), "{got:?}");
        shard.handle_timeout(now + 3 * BOT_CALL_WAIT_MS);
        assert!(replies(&mut shard).is_empty(), "one answer per request");
    }
}

mod torn {
    //! Relations kept on two shards, cut between their two sides — the second side's mail
    //! lost, as it is to a crash or a node lost between them — and what completes them.
    use super::super::*;
    use crate::cluster::ClusterMap;
    use crate::ids::{ConvId, UserId};
    use crate::mail::Mail;
    use crate::storage::{keys, FriendRecord, FriendState, MemStorage, Storage};

    /// Two one-shard nodes (shard 0 on node a, shard 1 on node b), mail routed by hand.
    struct Two {
        map: std::sync::Arc<ClusterMap>,
        shards: Vec<Shard<MemStorage>>,
        stores: Vec<MemStorage>,
        /// Frames sent, with the shard and connection they went to.
        frames: Vec<(usize, ConnId, String)>,
    }

    fn config(map: &std::sync::Arc<ClusterMap>, shard: u16) -> Config {
        let mut cfg = Config::in_cluster(ShardId(shard), map.clone(), usize::from(shard), [1; 32]);
        cfg.hash_cost = crate::auth::HashCost {
            memory_kib: 8,
            passes: 1,
        };
        cfg
    }

    impl Two {
        fn new() -> Two {
            let map = super::two_one_shard_nodes();
            let stores = vec![MemStorage::default(), MemStorage::default()];
            let shards = (0..2)
                .map(|i| Shard::new(config(&map, i), stores[usize::from(i)].clone()))
                .collect();
            Two {
                map,
                shards,
                stores,
                frames: Vec::new(),
            }
        }

        /// Restarts shard `i` on its data (a crash: what was in memory is gone).
        fn restart(&mut self, i: usize) {
            let id = u16::try_from(i).unwrap();
            self.shards[i] = Shard::new(config(&self.map, id), self.stores[i].clone());
        }

        /// Runs both shards to rest; mail for which `lose` is true is lost on the way.
        fn run(&mut self, mut lose: impl FnMut(&Mail) -> bool) {
            let now = 1_000;
            loop {
                let mut idle = true;
                for i in 0..2 {
                    while let Some(out) = self.shards[i].poll_output() {
                        idle = false;
                        match out {
                            Output::Job { id, job, .. } => {
                                let cost = self.shards[i].config().hash_cost;
                                self.shards[i].handle_job_done(now, id, job.run(cost));
                            }
                            Output::Send { conn, frame } => {
                                self.frames.push((i, conn, frame.to_string()))
                            }
                            Output::Mail { to, mail } if !lose(&mail) => {
                                self.shards[usize::from(to.0)].handle_mail(now, mail)
                            }
                            _ => {}
                        }
                    }
                    if let Some(c) = self.shards[i].poll_commit() {
                        idle = false;
                        self.stores[i].apply(&c.ops);
                        self.shards[i].handle_commit_done(now, c.id, Ok(()));
                    }
                }
                if idle {
                    return;
                }
            }
        }

        /// Sends `frame` on `conn` of shard `i`, runs to rest; the replies to it.
        fn ask(&mut self, i: usize, conn: ConnId, frame: &str) -> Vec<String> {
            self.frames.clear();
            self.shards[i].handle_frame(1_000, conn, frame);
            self.run(|_| false);
            self.replies(i, conn)
        }

        fn replies(&self, i: usize, conn: ConnId) -> Vec<String> {
            let to = |&&(s, c, _): &&(usize, ConnId, String)| s == i && c == conn;
            let frames = self.frames.iter().filter(to);
            frames
                .map(|(_, _, f)| f.clone())
                .filter(|f| f.starts_with(r#"{"rid""#))
                .collect()
        }

        /// A user homed on shard `i`, logged in on its `ConnId(conn)`; their name and id.
        fn user(&mut self, i: usize, conn: u64, prefix: &str) -> (String, UserId) {
            let placement = self.map.placement();
            let name = (0..)
                .map(|n| format!("{prefix}{n}"))
                .find(|n| placement.home(UserId::from_username(n)) == ShardId(i as u16))
                .unwrap();
            let conn = ConnId(conn);
            self.shards[i].handle_connect(1_000, conn);
            let register = format!(
                r#"{{"op":"register","rid":1,"username":"{name}","password":"password123"}}"#
            );
            self.ask(i, conn, &register);
            let login = format!(
                r#"{{"op":"login","rid":2,"username":"{name}","password":"password123","device":"pc"}}"#
            );
            let replies = self.ask(i, conn, &login);
            assert!(
                replies.iter().any(|r| r.contains(r#""rid":2,"ok""#)),
                "{replies:?}"
            );
            let id = UserId::from_username(&name);
            (name, id)
        }

        fn friend_state(&self, i: usize, user: UserId, other: UserId) -> FriendState {
            let key = keys::user_pair(keys::FRIEND, user, other);
            self.stores[i]
                .get(&key)
                .unwrap()
                .map_or(FriendState::None, |b| {
                    FriendRecord::decode(&key, &b).unwrap().state
                })
        }
    }

    fn is_friend_answer(mail: &Mail) -> bool {
        matches!(mail, Mail::FriendAnswer { .. })
    }

    /// A request whose answer was lost: the asked user sees it, the asker nothing. The asker's
    /// retry completes it; and so does the asked user's accept, which stands.
    #[test]
    fn a_friend_request_cut_between_its_sides_is_completed_by_either_user() {
        for heal_by_accept in [false, true] {
            let mut two = Two::new();
            let (alice, a) = two.user(0, 1, "alice");
            let (bob, b) = two.user(1, 2, "bob");
            let request = format!(r#"{{"op":"friend_request","rid":3,"user":"{bob}"}}"#);
            two.frames.clear();
            two.shards[0].handle_frame(1_000, ConnId(1), &request);
            two.run(is_friend_answer);
            assert!(two.replies(0, ConnId(1)).is_empty(), "the answer was lost");
            assert_eq!(two.friend_state(1, b, a), FriendState::Incoming);
            assert_eq!(two.friend_state(0, a, b), FriendState::None);
            if heal_by_accept {
                let accept = format!(r#"{{"op":"friend_accept","rid":4,"user":"{alice}"}}"#);
                let replies = two.ask(1, ConnId(2), &accept);
                assert!(replies[0].contains(r#""state":"friends""#), "{replies:?}");
                assert_eq!(two.friend_state(0, a, b), FriendState::Friends);
                assert_eq!(two.friend_state(1, b, a), FriendState::Friends);
            } else {
                let replies = two.ask(0, ConnId(1), &request.replace("\"rid\":3", "\"rid\":4"));
                assert!(replies[0].contains(r#""state":"requested""#), "{replies:?}");
                assert_eq!(two.friend_state(0, a, b), FriendState::Requested);
                assert_eq!(two.friend_state(1, b, a), FriendState::Incoming);
            }
        }
    }

    /// An accept whose answer was lost: the asker's side says friends, the accepter's still
    /// incoming. Accepting again completes it.
    #[test]
    fn a_retried_accept_completes_the_accepters_side() {
        let mut two = Two::new();
        let (alice, a) = two.user(0, 1, "alice");
        let (bob, b) = two.user(1, 2, "bob");
        let request = format!(r#"{{"op":"friend_request","rid":3,"user":"{bob}"}}"#);
        two.ask(0, ConnId(1), &request);
        let accept = format!(r#"{{"op":"friend_accept","rid":4,"user":"{alice}"}}"#);
        two.frames.clear();
        two.shards[1].handle_frame(1_000, ConnId(2), &accept);
        two.run(is_friend_answer);
        assert_eq!(two.friend_state(0, a, b), FriendState::Friends);
        assert_eq!(two.friend_state(1, b, a), FriendState::Incoming);
        let replies = two.ask(1, ConnId(2), &accept.replace("\"rid\":4", "\"rid\":5"));
        assert!(replies[0].contains(r#""state":"friends""#), "{replies:?}");
        assert_eq!(two.friend_state(1, b, a), FriendState::Friends);
    }

    /// Opens the one-to-one conversation of `conn`'s user with `with` and sends to it; the
    /// send's reply.
    fn send(two: &mut Two, i: usize, conn: u64, with: &str, rid: u64) -> String {
        let open = format!(r#"{{"op":"open","rid":{rid},"user":"{with}"}}"#);
        let replies = two.ask(i, ConnId(conn), &open);
        let v: serde_json::Value = serde_json::from_str(&replies[0]).unwrap();
        let conv = v["ok"]["conv"].as_str().unwrap().to_owned();
        let id = uuid::Uuid::now_v7();
        let send = format!(
            r#"{{"op":"send","rid":{},"conv":"{conv}","id":"{id}","body":{{}}}}"#,
            rid + 1
        );
        two.ask(i, ConnId(conn), &send).remove(0)
    }

    /// A block recorded on the blocker's home whose copy never reached the owner (the mail
    /// lost to a crash, then to a link that was down): sent again at the restart and when
    /// the link is back, until the owner confirms; then sends from the blocked are refused.
    #[test]
    fn a_block_cut_from_its_owner_is_sent_again_until_confirmed() {
        let mut two = Two::new();
        let (alice, a) = two.user(0, 1, "alice");
        // bob, homed on node b, whose conversation with alice is owned there too.
        let (bob, b) = two.user(1, 2, "bob");
        assert_eq!(
            two.map.placement().owner(ConvId::direct(a, b)),
            ShardId(1),
            "pick names with another owner"
        );
        assert!(send(&mut two, 1, 2, &alice, 10).contains(r#""ok""#));
        let block = format!(r#"{{"op":"block","rid":3,"user":"{bob}"}}"#);
        two.frames.clear();
        two.shards[0].handle_frame(1_000, ConnId(1), &block);
        two.run(|m| matches!(m, Mail::SetBlock { .. }));
        let pending = keys::user_pair(keys::BLOCK_SYNC, a, b);
        assert!(two.stores[0].get(&pending).unwrap().is_some());
        assert!(
            send(&mut two, 1, 2, &alice, 20).contains(r#""ok""#),
            "not yet applied"
        );

        // The restart resends it; the link to node b is down, so it comes back undelivered.
        two.restart(0);
        let mut refused = Vec::new();
        for _ in 0..2 {
            while let Some(out) = two.shards[0].poll_output() {
                if let Output::Mail { mail, .. } = out {
                    refused.push(mail);
                }
            }
            if let Some(c) = two.shards[0].poll_commit() {
                two.stores[0].apply(&c.ops);
                two.shards[0].handle_commit_done(1_000, c.id, Ok(()));
            }
        }
        assert!(matches!(
            refused[..],
            [Mail::SetBlock {
                reply: None,
                blocked: true,
                ..
            }]
        ));
        for mail in refused {
            two.shards[0].handle_undeliverable(1_000, mail);
        }
        two.run(|_| false);
        assert!(
            two.stores[0].get(&pending).unwrap().is_some(),
            "still unconfirmed"
        );
        assert!(send(&mut two, 1, 2, &alice, 30).contains(r#""ok""#));

        two.shards[0].handle_link_up(1_000, ShardId(1));
        two.run(|_| false);
        assert!(two.stores[0].get(&pending).unwrap().is_none(), "confirmed");
        let refused = send(&mut two, 1, 2, &alice, 40);
        assert!(refused.contains(r#""code":"blocked""#), "{refused}");
    }
}

mod push_tokens {
    //! A device's push token lives and dies with the device: `logout`, `device_logout` and a
    //! new login under the same device name each delete the stored token.
    use super::super::*;
    use crate::auth::HashCost;
    use crate::storage::{keys, MemStorage, Storage};

    struct Alice {
        shard: Shard<MemStorage>,
        store: MemStorage,
        next_conn: u64,
    }

    impl Alice {
        fn new() -> Alice {
            let store = MemStorage::default();
            let mut cfg = Config::new(ShardId(0), 1, [1; 32]);
            cfg.hash_cost = HashCost {
                memory_kib: 8,
                passes: 1,
            };
            let mut alice = Alice {
                shard: Shard::new(cfg, store.clone()),
                store,
                next_conn: 0,
            };
            let conn = alice.connect();
            alice.ask(
                conn,
                r#"{"op":"register","rid":1,"username":"alice","password":"password123"}"#,
            );
            alice
        }

        fn connect(&mut self) -> ConnId {
            self.next_conn += 1;
            let conn = ConnId(self.next_conn);
            self.shard.handle_connect(0, conn);
            conn
        }

        /// Sends `frame` on `conn` and runs jobs and commits until quiet: the frames sent.
        fn ask(&mut self, conn: ConnId, frame: &str) -> Vec<String> {
            self.shard.handle_frame(0, conn, frame);
            super::pump(&mut self.shard, &self.store, 0)
        }

        fn login(&mut self, device: &str) -> ConnId {
            let conn = self.connect();
            let login = format!(
                r#"{{"op":"login","rid":2,"username":"alice","password":"password123","device":"{device}"}}"#
            );
            let sent = self.ask(conn, &login);
            assert!(sent.iter().any(|f| f.contains("token")), "{sent:?}");
            conn
        }

        fn register_token(&mut self, conn: ConnId) {
            let sent = self.ask(
                conn,
                r#"{"op":"push_register","rid":3,"platform":"apns","token":"abc"}"#,
            );
            assert!(sent.iter().any(|f| f.contains(r#""ok""#)), "{sent:?}");
        }

        fn has_token(&self, device: &str) -> bool {
            let key = keys::push_token(UserId::from_username("alice"), device);
            self.store.get(&key).unwrap().is_some()
        }
    }

    #[test]
    fn logout_device_logout_and_a_new_login_drop_the_token() {
        let mut a = Alice::new();
        let pc = a.login("pc");
        let phone = a.login("phone");
        a.register_token(phone);
        assert!(a.has_token("phone") && !a.has_token("pc"));

        a.ask(pc, r#"{"op":"device_logout","rid":4,"device":"phone"}"#);
        assert!(!a.has_token("phone"), "device_logout drops it");

        let phone = a.login("phone");
        a.register_token(phone);
        a.ask(phone, r#"{"op":"logout","rid":5}"#);
        assert!(!a.has_token("phone"), "logout drops it");

        let phone = a.login("phone");
        a.register_token(phone);
        assert!(a.has_token("phone"));
        a.login("phone");
        assert!(
            !a.has_token("phone"),
            "a new login on the device name drops it"
        );
    }
}
