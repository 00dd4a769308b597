//! `hermod-bench`: run a scenario against a running Hermod, or compare two reports.
//! See `docs/benchmarks.md` for the scenarios, the report schema and published figures.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hermod_bench::conn::{parse_sources, raise_nofile_limit, Target};
use hermod_bench::report::{compare, Report};
use hermod_bench::scenario::{self, DirectParams, EchoParams, Timing};

#[derive(Parser)]
#[command(
    name = "hermod-bench",
    version,
    about = "Load generator for Hermod: open-loop, coordinated-omission-corrected, correctness-checked"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// WebSocket URL of the server; on a cluster, its nodes' URLs, comma-separated
    /// (connections go to them in turn; users living elsewhere are `moved` to their node).
    #[arg(long, default_value = "ws://127.0.0.1:7400/ws")]
    url: String,
    /// Messages (or requests) per second offered, all connections together.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring (excluded from latencies and throughput).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Longest wait after the last send for outstanding acks and deliveries.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// How long a connection holds its pushes' acks to send them together (1-2500 ms):
    /// how often the modelled client acks (docs/protocol.md, `ack`).
    #[arg(long, default_value_t = 20)]
    ack_delay_ms: u64,
    /// Local source addresses, spread round-robin: comma-separated addresses or IPv4 ranges
    /// (`127.0.0.1-127.0.0.8`). Needed past ~28k connections per source (local ports).
    #[arg(long, value_name = "ADDRS")]
    sources: Option<String>,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Prefix of the benchmark users' names (a fresh prefix per run gives fresh users).
    #[arg(long)]
    prefix: Option<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// One-to-one messages between online users: ack and end-to-end latency, throughput.
    Direct {
        #[command(flatten)]
        common: Common,
        /// Online users (one connection each).
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Conversations per user.
        #[arg(long, default_value_t = 4)]
        peers: usize,
        /// Body padding in bytes.
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
        /// Pair only users homed on different shards of a placement over N shards (a
        /// cluster's total): every conversation crosses shards, and nodes on a cluster of
        /// one-shard nodes (docs/cluster.md, figures).
        #[arg(long, value_name = "N")]
        split_shards: Option<u16>,
    },
    /// Group messages: groups of online members, some sending; deliveries/s and latency.
    Group {
        #[command(flatten)]
        common: Common,
        /// Online users (one connection each); groups draw members from them.
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[arg(long, default_value_t = 1)]
        groups: usize,
        /// Members per group.
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Sending members per group.
        #[arg(long, default_value_t = 1)]
        senders: usize,
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
        /// Extra members of every group who are away with a push token: each message takes
        /// the offline-notification path for them (run the server with a `[push]` section).
        #[arg(long, default_value_t = 0)]
        away: usize,
    },
    /// Posts to a channel with many subscribers, some online: posts/s, deliveries/s, latency
    /// per delivery, subscriptions/s (docs/channels.md).
    Channel {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Subscribers that stay connected (one connection each; the rest leave once subscribed).
        #[arg(long, default_value_t = 100)]
        online: usize,
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
        /// Set-up requests in flight at once.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
    },
    /// A live room driven over its rate: what is shed, and the latency of what is delivered.
    Room {
        #[command(flatten)]
        common: Common,
        /// Connections in the room (senders included).
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// The room's rate (ordinary messages per second); --rate is what is offered.
        #[arg(long, default_value_t = 20)]
        room_rate: u32,
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
    },
    /// Uploads then downloads media over HTTP (docs/media.md): MB/s each way, time per chunk.
    Media {
        #[command(flatten)]
        common: Common,
        /// Bytes per medium.
        #[arg(long, default_value_t = 50_000_000)]
        bytes: usize,
        /// Bytes per PATCH (the server's chunk_max must allow it).
        #[arg(long, default_value_t = 1_048_576)]
        chunk: usize,
        /// Media uploaded (and read back) one after the other.
        #[arg(long, default_value_t = 3)]
        count: usize,
        /// Upload pace in MB/s (0: as fast as it goes).
        #[arg(long, default_value_t = 0.0)]
        mb_per_s: f64,
    },
    /// A login storm of users whose friends are online: time for friends to see each login,
    /// presence pushes per login.
    Presence {
        #[command(flatten)]
        common: Common,
        /// Users (even: watch online; odd: log back in during the storm).
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Friends per user (even), in a ring.
        #[arg(long, default_value_t = 10)]
        friends: usize,
    },
    /// `ping` round trips: the ceiling to compare the other scenarios with.
    Echo {
        #[command(flatten)]
        common: Common,
        /// Connections.
        #[arg(long, default_value_t = 10)]
        conns: usize,
    },
    /// Hold N authenticated connections; with --server-pid, the server's memory per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Seconds to hold the connections once all are up.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Logins in flight at once while connecting.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
        /// The server's pid (same host), to sample its resident memory.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// A storm of new authenticated (resumed) connections at --rate per second.
    Connect {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Logins in flight while minting the tokens.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
        /// Use tokens from `hermod-tools provision --out FILE` instead of logging in.
        #[arg(long, value_name = "FILE")]
        tokens: Option<PathBuf>,
    },
    /// Recipients come back to a backlog and pull it with `sync`: messages pulled per second.
    Sync {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 20)]
        pairs: usize,
        #[arg(long, default_value_t = 1000)]
        backlog: usize,
        #[arg(long, default_value_t = 500)]
        page: usize,
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
    },
    /// Acked means durable: runs `hermod serve` itself, loads it with pipelined sends, kill -9s
    /// it at random moments over N cycles, resends unacked ids, then checks from `sync` that
    /// every acked id is stored once at its acked seq with contiguous seqs.
    Crash {
        /// The server binary (default: `hermod` beside this program).
        #[arg(long)]
        hermod: Option<PathBuf>,
        /// A fresh data dir for the run (default: a new temporary one, removed afterwards).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = "wal")]
        durability: String,
        #[arg(long, default_value_t = 2)]
        shards: usize,
        #[arg(long, default_value_t = 20)]
        cycles: usize,
        /// Sending connections, one conversation each (each may send 2000 requests/s).
        #[arg(long, default_value_t = 8)]
        senders: usize,
        /// Sends in flight per connection.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// The kill comes uniformly between these many ms after the load starts.
        #[arg(long, default_value_t = 50)]
        kill_min_ms: u64,
        #[arg(long, default_value_t = 500)]
        kill_max_ms: u64,
        /// Seed of the kill times (default: random, printed in the report).
        #[arg(long)]
        seed: Option<u64>,
        /// Write the JSON report here.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
    /// What this host's kernel allows without Hermod, for the other figures to be read as a
    /// share of: `fanout` (one core writing frames to N sockets) or `echo` (one core echoing
    /// on N sockets). The server side is a thread pinned to --server-core.
    Ceiling {
        #[command(flatten)]
        params: scenario::CeilingParams,
        /// Write the JSON report here.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
    /// Print the figures of two reports side by side with their change.
    Compare { a: PathBuf, b: PathBuf },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hermod-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // One fd per connection: take every descriptor the hard limit allows; a connect that still
    // runs out names the limit in its error.
    raise_nofile_limit();
    let (common, report) = match cli.command {
        Command::Compare { a, b } => {
            let read = |p: &PathBuf| -> anyhow::Result<Report> {
                Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
            };
            print!("{}", compare(&read(&a)?, &read(&b)?));
            return Ok(ExitCode::SUCCESS);
        }
        Command::Crash {
            hermod,
            data,
            durability,
            shards,
            cycles,
            senders,
            window,
            kill_min_ms,
            kill_max_ms,
            seed,
            report,
        } => {
            let hermod = match hermod {
                Some(path) => path,
                None => std::env::current_exe()?.with_file_name("hermod"),
            };
            let temp = data.is_none().then(|| {
                std::env::temp_dir().join(format!("hermod-crash-{:x}", rand::random::<u64>()))
            });
            let params = hermod_bench::crash::CrashParams {
                hermod,
                data: data.or(temp.clone()).expect("one of the two"),
                durability,
                shards,
                cycles,
                senders,
                window,
                kill_after_ms: (kill_min_ms, kill_max_ms),
                seed: seed.unwrap_or_else(rand::random),
                prefix: format!("c{:x}", rand::random::<u32>()),
            };
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(hermod_bench::crash::crash(params));
            if let Some(temp) = temp {
                let _ = std::fs::remove_dir_all(temp);
            }
            return finish(&result?, report.as_ref());
        }
        Command::Ceiling { params, report } => {
            raise_nofile_limit();
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(scenario::ceiling(params));
            return finish(&result?, report.as_ref());
        }
        Command::Direct {
            common,
            users,
            peers,
            body_bytes,
            split_shards,
        } => {
            let params = DirectParams {
                target: target(&common)?,
                users,
                peers,
                timing: timing(&common),
                body_bytes,
                prefix: prefix(&common),
                split_shards,
            };
            let report = runtime(&common)?.block_on(scenario::direct(params))?;
            (common, report)
        }
        Command::Group {
            common,
            users,
            groups,
            members,
            senders,
            body_bytes,
            away,
        } => {
            let params = scenario::GroupParams {
                away,
                target: target(&common)?,
                users,
                groups,
                members,
                senders,
                timing: timing(&common),
                body_bytes,
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(scenario::group(params))?;
            (common, report)
        }
        Command::Channel {
            common,
            subscribers,
            online,
            body_bytes,
            parallel,
        } => {
            let params = scenario::ChannelParams {
                target: target(&common)?,
                timing: timing(&common),
                subscribers,
                online,
                body_bytes,
                prefix: prefix(&common),
                parallel,
            };
            let report = runtime(&common)?.block_on(scenario::channel(params))?;
            (common, report)
        }
        Command::Room {
            common,
            members,
            senders,
            room_rate,
            body_bytes,
        } => {
            let params = scenario::RoomParams {
                target: target(&common)?,
                timing: timing(&common),
                members,
                senders,
                room_rate,
                body_bytes,
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(scenario::room(params))?;
            (common, report)
        }
        Command::Media {
            common,
            bytes,
            chunk,
            count,
            mb_per_s,
        } => {
            let params = scenario::MediaParams {
                target: target(&common)?,
                bytes,
                chunk,
                count,
                mb_per_s,
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(scenario::media(params))?;
            (common, report)
        }
        Command::Presence {
            common,
            users,
            friends,
        } => {
            let params = hermod_bench::presence::PresenceParams {
                target: target(&common)?,
                users,
                friends,
                rate: common.rate,
                drain_s: common.drain.min(5.0),
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(hermod_bench::presence::presence(params))?;
            (common, report)
        }
        Command::Idle {
            common,
            conns,
            hold,
            parallel,
            server_pid,
        } => {
            let params = scenario::IdleParams {
                target: target(&common)?,
                conns,
                hold_s: hold,
                parallel,
                server_pid,
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(scenario::idle(params))?;
            (common, report)
        }
        Command::Connect {
            common,
            conns,
            parallel,
            tokens,
        } => {
            let params = scenario::ConnectParams {
                target: target(&common)?,
                conns,
                rate: common.rate,
                parallel,
                prefix: prefix(&common),
                tokens_file: tokens,
            };
            let report = runtime(&common)?.block_on(scenario::connect(params))?;
            (common, report)
        }
        Command::Sync {
            common,
            pairs,
            backlog,
            page,
            body_bytes,
        } => {
            let params = scenario::SyncParams {
                target: target(&common)?,
                pairs,
                backlog,
                page,
                body_bytes,
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(scenario::sync(params))?;
            (common, report)
        }
        Command::Echo { common, conns } => {
            let params = EchoParams {
                target: target(&common)?,
                conns,
                timing: timing(&common),
                prefix: prefix(&common),
            };
            let report = runtime(&common)?.block_on(scenario::echo(params))?;
            (common, report)
        }
    };
    finish(&report, common.report.as_ref())
}

/// Prints the figures, writes the report, and fails the run on any correctness violation.
fn finish(report: &Report, path: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(&report.figures)?);
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    let correct = report.figures.get("correctness").is_none_or(|c| {
        ["lost", "duplicated", "reordered"]
            .iter()
            .all(|k| c[k].as_u64() == Some(0))
    });
    if !correct {
        eprintln!(
            "hermod-bench: correctness violated: {}",
            report.figures["correctness"]
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn target(common: &Common) -> anyhow::Result<Target> {
    let sources = match &common.sources {
        Some(spec) => parse_sources(spec)?,
        None => Vec::new(),
    };
    Target::new(&common.url, sources)
}

fn timing(common: &Common) -> Timing {
    Timing {
        rate: common.rate,
        warmup_s: common.warmup,
        duration_s: common.duration,
        drain_s: common.drain,
        ack_delay_ms: common.ack_delay_ms,
    }
}

fn prefix(common: &Common) -> String {
    common
        .prefix
        .clone()
        .unwrap_or_else(|| format!("b{:x}", rand::random::<u32>()))
}

fn runtime(common: &Common) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if common.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(common.threads);
        b
    };
    Ok(builder.enable_all().build()?)
}
