//! The engine's own tests: seeded random frames through a real engine (`fuzz`), and time
//! through `poll_timeout`/`handle_timeout` (`deadlines`). The simulation of several engines is
//! `shards/tests/sim.rs`.

mod fuzz {
    //! Seeded random and mutated frames through a real engine (a stable-toolchain stand-in for
    //! cargo-fuzz): no panic, and every frame that carries a rid is answered exactly once or
    //! the connection is closed.
    use rand::{Rng, SeedableRng};

    use super::super::*;
    use crate::auth::HashCost;
    use crate::storage::MemStorage;

    const SEEDS: &[&str] = &[
        r#"{"op":"send","rid":1,"conv":"d.1.2","id":"0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b","body":{"t":"x"}}"#,
        r#"{"op":"login","rid":1,"username":"alice","password":"password123","device":"pc"}"#,
        r#"{"op":"sync","rid":1,"convs":[{"conv":"d.1.2","after":3}],"limit":10}"#,
        r#"{"op":"history","rid":1,"conv":"d.1.2","before":9}"#,
        r#"{"op":"ack","pids":[1,2,3]}"#,
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

    /// Runs the engine's jobs and commits until nothing is pending; returns frames sent.
    fn pump(shard: &mut Shard<MemStorage>, store: &MemStorage, now: u64) -> Vec<String> {
        let mut sent = Vec::new();
        loop {
            let mut progressed = false;
            while let Some(out) = shard.poll_output() {
                progressed = true;
                match out {
                    Output::Send { frame, .. } => sent.push(frame),
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
        use crate::cluster::{ClusterMap, NodeSpec};
        use crate::ids::{ConvId, UserId};

        let node = |id: &str| NodeSpec {
            id: id.into(),
            url: format!("ws://{id}/ws"),
            shards: 1,
        };
        let map = std::sync::Arc::new(ClusterMap {
            version: 1,
            nodes: vec![node("a"), node("b")],
        });
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
        settle(&mut shard, &store, 1_000);
        let login = format!(
            r#"{{"op":"login","rid":2,"username":"{me}","password":"password123","device":"pc"}}"#
        );
        shard.handle_frame(1_000, conn, &login);
        let replies = settle(&mut shard, &store, 1_000);
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

    /// Runs the engine's outputs to rest (jobs inline, commits applied); the frames sent.
    fn settle(shard: &mut Shard<MemStorage>, store: &MemStorage, now: u64) -> Vec<String> {
        let mut frames = Vec::new();
        loop {
            let mut idle = true;
            while let Some(out) = shard.poll_output() {
                idle = false;
                match out {
                    Output::Job { id, job, .. } => {
                        let cost = crate::auth::HashCost {
                            memory_kib: 8,
                            passes: 1,
                        };
                        shard.handle_job_done(now, id, job.run(cost));
                    }
                    Output::Send { frame, .. } => frames.push(frame),
                    _ => {} // mail to node b: taken, never answered (it died)
                }
            }
            if let Some(c) = shard.poll_commit() {
                idle = false;
                store.apply(&c.ops);
                shard.handle_commit_done(now, c.id, Ok(()));
            }
            if idle {
                return frames;
            }
        }
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
        assert!(settle(&mut shard, &store, now).is_empty());
        shard.handle_timeout(now + CROSS_NODE_WAIT_MS - 1);
        assert!(
            settle(&mut shard, &store, now).is_empty(),
            "not before the deadline"
        );
        shard.handle_timeout(now + CROSS_NODE_WAIT_MS);
        let replies = settle(&mut shard, &store, now);
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
            settle(&mut shard, &store, now).is_empty(),
            "forwarded to its owner"
        );
        shard.handle_timeout(now + CROSS_NODE_WAIT_MS);
        let replies = settle(&mut shard, &store, now);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert!(replies[0].starts_with(r#"{"rid":4,"error":{"code":"unavailable""#));
        let late = Mail::Reply {
            conn: ConnId(1),
            frame: r#"{"rid":4,"ok":{"seq":1}}"#.into(),
        };
        shard.handle_mail(now + CROSS_NODE_WAIT_MS + 5, late);
        assert!(
            settle(&mut shard, &store, now).is_empty(),
            "the late answer is dropped"
        );
        // Answered in time, a forwarded request's reply goes through and arms nothing more.
        shard.handle_frame(now, ConnId(1), &send.replace(r#""rid":4"#, r#""rid":5"#));
        settle(&mut shard, &store, now);
        let answer = Mail::Reply {
            conn: ConnId(1),
            frame: r#"{"rid":5,"ok":{"seq":1}}"#.into(),
        };
        shard.handle_mail(now + 10, answer);
        assert_eq!(settle(&mut shard, &store, now).len(), 1);
        shard.handle_timeout(now + 3 * CROSS_NODE_WAIT_MS);
        assert!(
            settle(&mut shard, &store, now).is_empty(),
            "no unavailable after an answer"
        );
    }
}
