//! Smoke runs of every hermod-bench scenario at tiny scale against the real server: they
//! assert correctness counts only (figures are published from full runs, never asserted).

mod common;

use common::Server;
use hermod_bench::conn::Target;
use hermod_bench::scenario::{self, DirectParams, EchoParams, Timing};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn direct_scenario_accounts_for_every_message() {
    let server = Server::start(&[]);
    let params = DirectParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        users: 6,
        peers: 2,
        timing: Timing {
            rate: 300.0,
            warmup_s: 0.2,
            duration_s: 1.0,
            drain_s: 10.0,
            ack_delay_ms: 20,
        },
        body_bytes: 32,
        prefix: "smoke".into(),
        split_shards: None,
    };
    let report = runtime().block_on(scenario::direct(params)).unwrap();
    let c = &report.figures["correctness"];
    assert!(c["sent"].as_u64().unwrap() >= 300, "{c}");
    assert_eq!(c["acked"], c["sent"], "{c}");
    assert_eq!(c["delivered"], c["acked"], "{c}");
    for key in ["lost", "duplicated", "reordered", "unacked"] {
        assert_eq!(c[key], 0, "{key}: {c}");
    }
    assert!(report.figures["e2e_latency"]["count"].as_u64().unwrap() > 0);
    assert_eq!(report.schema, hermod_bench::report::SCHEMA);
}

#[test]
fn echo_scenario_answers_every_ping() {
    let server = Server::start(&[]);
    let params = EchoParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        conns: 3,
        timing: Timing {
            rate: 300.0,
            warmup_s: 0.2,
            duration_s: 1.0,
            drain_s: 10.0,
            ack_delay_ms: 20,
        },
        prefix: "echo".into(),
    };
    let report = runtime().block_on(scenario::echo(params)).unwrap();
    let f = &report.figures;
    assert!(f["sent"].as_u64().unwrap() >= 300, "{f}");
    assert_eq!(f["answered"], f["sent"], "{f}");
    assert_eq!(f["errors"], 0, "{f}");
}

/// The ceilings run without a server: frames cross the loopback sockets and round trips
/// complete (a short run; core 0 exists on every machine).
#[test]
fn ceiling_scenarios_move_frames_without_a_server() {
    let paced = |rounds| (scenario::CeilingMode::Fanout, Some(rounds));
    for (mode, rounds_per_s) in [
        (scenario::CeilingMode::Fanout, None),
        paced(50.0),
        (scenario::CeilingMode::Echo, None),
    ] {
        let params = scenario::CeilingParams {
            mode,
            conns: 20,
            frame_bytes: 200,
            batch: 2,
            window: 2,
            rounds_per_s,
            warmup_s: 0.1,
            duration_s: 0.3,
            server_core: 0,
        };
        let report = runtime().block_on(scenario::ceiling(params)).unwrap();
        let f = &report.figures;
        let moved = match mode {
            scenario::CeilingMode::Fanout => &f["frames_written_per_s"],
            scenario::CeilingMode::Echo => &f["round_trips_per_s"],
        };
        assert!(moved.as_f64().unwrap() > 100.0, "{f}");
        if rounds_per_s.is_some() {
            // 50 rounds a second over the 0.3 s window: about 15, each timed.
            let rounds = f["round"]["count"].as_u64().unwrap();
            assert!((5..=20).contains(&rounds), "{f}");
        }
    }
}

#[test]
fn idle_scenario_holds_its_connections() {
    let server = Server::start(&[]);
    let params = scenario::IdleParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        conns: 20,
        hold_s: 0.5,
        parallel: 8,
        server_pid: None,
        prefix: "idle".into(),
    };
    let report = runtime().block_on(scenario::idle(params)).unwrap();
    let f = &report.figures;
    assert_eq!(f["connections_held"], 20, "{f}");
    assert_eq!(f["connection_failures"], 0, "{f}");
    assert_eq!(f["dropped_while_holding"], 0, "{f}");
}

#[test]
fn connect_scenario_resumes_every_connection() {
    let server = Server::start(&[]);
    let params = scenario::ConnectParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        conns: 30,
        rate: 300.0,
        parallel: 8,
        prefix: "storm".into(),
        tokens_file: None,
    };
    let report = runtime().block_on(scenario::connect(params)).unwrap();
    let f = &report.figures;
    assert_eq!(f["connections"], 30, "{f}");
    assert_eq!(f["failures"], 0, "{f}");
    assert_eq!(f["setup_latency"]["count"], 30, "{f}");
}

#[test]
fn sync_scenario_pulls_every_backlogged_message() {
    let server = Server::start(&[]);
    let params = scenario::SyncParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        pairs: 3,
        backlog: 120,
        page: 50,
        body_bytes: 16,
        prefix: "sync".into(),
    };
    let report = runtime().block_on(scenario::sync(params)).unwrap();
    let f = &report.figures;
    assert_eq!(f["pulled"], 360, "{f}");
    assert_eq!(f["missing"], 0, "{f}");
}

#[test]
fn provisioned_accounts_resume_on_the_real_server() {
    // The benchmark provisioning path: accounts written offline, tokens resumed by the server.
    let data = tempfile::Builder::new()
        .prefix("hermod-prov-")
        .tempdir()
        .unwrap()
        .keep();
    let request = hermod_tools::provision::Request {
        data: &data,
        shards: 2,
        prefix: "prov",
        users: 40,
        password: "password123",
        device: "bench",
        token_ttl_s: 3600,
    };
    let accounts = hermod_tools::provision::provision(&request).unwrap();
    let server = Server::start_on(&data, &[]);
    for (name, token) in accounts.iter().take(10) {
        let mut c = server.client();
        let ok = c.ok("resume", serde_json::json!({ "token": token }));
        assert_eq!(ok["user"], name.as_str());
        assert_eq!(ok["device"], "bench");
    }
    // And the shared password logs in too.
    let mut c = server.client();
    c.ok(
        "login",
        serde_json::json!({ "username": "prov-3", "password": "password123", "device": "pc" }),
    );
}

#[test]
fn group_scenario_accounts_for_every_delivery() {
    let server = Server::start(&[]);
    let params = scenario::GroupParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        users: 30,
        groups: 3,
        members: 12,
        senders: 2,
        timing: Timing {
            rate: 100.0,
            warmup_s: 0.2,
            duration_s: 1.0,
            drain_s: 10.0,
            ack_delay_ms: 20,
        },
        body_bytes: 16,
        prefix: "bg".into(),
        // Away members with push tokens: set up, never counted as deliveries.
        away: 3,
    };
    let report = runtime().block_on(scenario::group(params)).unwrap();
    let c = &report.figures["correctness"];
    assert!(c["acked"].as_u64().unwrap() > 50, "{c}");
    assert_eq!(
        c["delivered"].as_u64(),
        c["acked"].as_u64().map(|a| a * 11),
        "{c}"
    );
    for k in ["lost", "duplicated", "reordered", "unacked"] {
        assert_eq!(c[k], 0, "{k}: {c}");
    }
    assert!(report.figures["deliveries_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn presence_scenario_sees_every_login() {
    let server = Server::start(&[]);
    let params = hermod_bench::presence::PresenceParams {
        target: Target::new(&format!("ws://{}/ws", server.addr), Vec::new()).unwrap(),
        users: 40,
        friends: 4,
        rate: 200.0,
        drain_s: 3.0,
        prefix: "bp".into(),
    };
    let report = runtime()
        .block_on(hermod_bench::presence::presence(params))
        .unwrap();
    let f = &report.figures;
    assert_eq!(f["logins"], 20);
    // Each odd user has 2 even (online) friends among its 4.
    assert_eq!(f["friend_pairs_expected"], 40, "{f}");
    assert_eq!(f["friend_pairs_missed"], 0, "{f}");
    assert_eq!(f["presence_pushes_per_login"], 2.0, "{f}");
}

fn crash_run(durability: &str, cycles: usize) -> serde_json::Value {
    let data = tempfile::Builder::new()
        .prefix("hermod-crash-")
        .tempdir()
        .unwrap();
    let params = hermod_bench::crash::CrashParams {
        hermod: env!("CARGO_BIN_EXE_hermod").into(),
        data: data.path().join("d"),
        durability: durability.into(),
        shards: 2,
        cycles,
        senders: 3,
        window: 32,
        kill_after_ms: (100, 300),
        seed: 7,
        prefix: "crash".into(),
    };
    runtime()
        .block_on(hermod_bench::crash::crash(params))
        .unwrap()
        .figures
}

/// `crash` kills the server mid-load and checks every ack from storage: nothing lost under
/// `wal`, and under `memory` (no WAL) the same instrument reports the loss.
#[test]
fn crash_scenario_finds_no_loss_in_wal_and_loss_in_memory() {
    let wal = crash_run("wal", 4);
    let c = &wal["correctness"];
    for key in ["lost", "duplicated", "reordered", "unknown"] {
        assert_eq!(c[key], 0, "{key}: {wal}");
    }
    assert!(wal["acked_before_last_kill"].as_u64().unwrap() > 0, "{wal}");
    assert_eq!(
        wal["stored"], wal["acked_ids"],
        "every id ends up stored once: {wal}"
    );
    let memory = crash_run("memory", 2);
    assert!(
        memory["correctness"]["lost"].as_u64().unwrap() > 0,
        "acked messages vanish without a WAL, and the check must see it: {memory}"
    );
}
