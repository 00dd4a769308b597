//! `hermod-tools`: operator tools. See `tuning.md` and `docs/benchmarks.md`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hermod_tools::doctor::{self, Target};
use hermod_tools::plan::{self, si, Inputs};

#[derive(Parser)]
#[command(
    name = "hermod-tools",
    version,
    about = "Operator tools for Hermod: capacity planner, host doctor, admin client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capacity plan: peak load, cores, hosts, memory, disk and network, with the arithmetic.
    Plan {
        #[arg(long, default_value_t = 1e6)]
        dau: f64,
        #[arg(long, default_value_t = 20.0)]
        msgs_per_user_day: f64,
        #[arg(long, default_value_t = 5.0)]
        peak_factor: f64,
        /// Share of daily users online at the peak.
        #[arg(long, default_value_t = 0.1)]
        online_ratio: f64,
        #[arg(long, default_value_t = 1.5)]
        devices_per_user: f64,
        /// Average recipients per message (1 for one-to-one, the group size for groups).
        #[arg(long, default_value_t = 1.0)]
        group_size: f64,
        #[arg(long, default_value_t = 30.0)]
        retention_days: f64,
        /// A `hermod-bench direct` report: its throughput becomes the per-core figure.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Messages per second per core, when no report is given.
        #[arg(long, default_value_t = 20_000.0)]
        per_core: f64,
        /// Fraction of each core to use at peak.
        #[arg(long, default_value_t = 0.5)]
        headroom: f64,
        #[arg(long, default_value_t = 32.0)]
        cores_per_host: f64,
        #[arg(long, default_value_t = 128.0)]
        mem_gib_per_host: f64,
        /// Server CPU per mail crossing nodes, above a mail within one node, in µs
        /// (scripts/bench-cluster.sh measures it).
        #[arg(long, default_value_t = 1.8)]
        link_us_per_mail: f64,
        /// Share of messages whose members live on different nodes (default: uniform
        /// placement over the planned hosts).
        #[arg(long)]
        cross_node_share: Option<f64>,
        /// Share of messages that carry a medium (docs/media.md).
        #[arg(long, default_value_t = 0.0)]
        media_share: f64,
        /// Average medium size in bytes.
        #[arg(long, default_value_t = 500_000.0)]
        media_bytes: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write benchmark accounts into a stopped server's data dir and print their tokens (TSV).
    Provision {
        /// The server's data dir (created if new). The server must be stopped.
        #[arg(long)]
        data: PathBuf,
        /// The server's shard count (fixed once the data dir exists).
        #[arg(long)]
        shards: u16,
        #[arg(long, default_value_t = 1000)]
        users: usize,
        #[arg(long, default_value = "bench")]
        prefix: String,
        #[arg(long, default_value = "hermod-bench-password")]
        password: String,
        #[arg(long, default_value = "bench")]
        device: String,
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        token_ttl_s: u64,
        /// Write `username<TAB>token` lines here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What a data dir holds per shard (read-only; safe beside a running server).
    Inspect {
        #[arg(long)]
        data: PathBuf,
        /// The media store (default: `media` under the data dir, as the server's default).
        #[arg(long)]
        media: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Drive a running server's admin API (docs/admin.md). Prints the answer as JSON.
    Admin {
        /// The server's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
        /// The admin token (the server's admin_token).
        #[arg(long, env = "HERMOD_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Check this host against tuning.md: current, recommended, why.
    Doctor {
        /// Connections this host should hold.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// Shards (cores) Hermod will run. Default: the number of cores.
        #[arg(long)]
        shards: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Server statistics, per shard and in total.
    Stats,
    /// Create accounts from a file of `username<TAB>password` lines (`-` for stdin), or
    /// `--count` accounts named PREFIX1… with one password.
    CreateUsers {
        #[arg(long, conflicts_with_all = ["prefix", "count", "password"])]
        file: Option<PathBuf>,
        #[arg(long, default_value = "user")]
        prefix: String,
        #[arg(long)]
        count: Option<usize>,
        #[arg(long)]
        password: Option<String>,
    },
    /// An account: when it was created, whether it is disabled, its devices (online or not).
    User {
        user: String,
    },
    /// Refuse the account's logins and close its connections (4003).
    Disable {
        user: String,
    },
    Enable {
        user: String,
    },
    /// Close a device's connections (4003) and revoke its token; every device without --device.
    Kick {
        user: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Bots (docs/bots.md): create one, give it a new token, revoke it, set its webhook.
    Bot {
        #[command(subcommand)]
        action: BotAction,
    },
    /// A message from the server (`hermod`) to a user, or a `notice` entry in a group.
    Notice {
        #[arg(long, conflicts_with = "group")]
        user: Option<String>,
        /// A group id (g.<hex>).
        #[arg(long)]
        group: Option<String>,
        /// Sent as the body {"text": TEXT}.
        #[arg(long, conflicts_with = "body")]
        text: Option<String>,
        /// The body as raw JSON.
        #[arg(long)]
        body: Option<String>,
        /// A UUID for this notice (user notices): a retry with the same id is not sent twice.
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum BotAction {
    /// A bot owned by no user; prints its token and webhook secret.
    Create {
        name: String,
        #[arg(long)]
        webhook: Option<String>,
    },
    /// A new token and secret (the old token stops working at once).
    Token { name: String },
    /// The token stops working until the next `token`.
    Revoke { name: String },
    /// Where its messages are POSTed; `--off` stops it.
    Webhook {
        name: String,
        #[arg(long, conflicts_with = "off")]
        url: Option<String>,
        #[arg(long)]
        off: bool,
    },
}

fn admin(url: &str, token: &str, action: AdminAction) -> anyhow::Result<serde_json::Value> {
    let client = hermod_tools::admin::Client::new(url, token);
    match action {
        AdminAction::Stats => client.stats(),
        AdminAction::CreateUsers {
            file,
            prefix,
            count,
            password,
        } => {
            let users = match (file, count, password) {
                (Some(path), _, _) => {
                    let text = if path.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?
                    };
                    hermod_tools::admin::parse_users(&text)?
                }
                (None, Some(count), Some(password)) => (1..=count)
                    .map(|i| (format!("{prefix}{i}"), password.clone()))
                    .collect(),
                _ => anyhow::bail!("give --file, or --count and --password"),
            };
            client.create_users(&users)
        }
        AdminAction::User { user } => client.user(&user),
        AdminAction::Disable { user } => client.set_disabled(&user, true),
        AdminAction::Enable { user } => client.set_disabled(&user, false),
        AdminAction::Kick { user, device } => client.kick(&user, device.as_deref()),
        AdminAction::Bot { action } => match action {
            BotAction::Create { name, webhook } => client.create_bot(&name, webhook.as_deref()),
            BotAction::Token { name } => client.bot_token(&name, false),
            BotAction::Revoke { name } => client.bot_token(&name, true),
            BotAction::Webhook { name, url, off } => match (url, off) {
                (Some(url), false) => client.bot_webhook(&name, Some(&url)),
                (None, true) => client.bot_webhook(&name, None),
                _ => anyhow::bail!("give --url or --off"),
            },
        },
        AdminAction::Notice {
            user,
            group,
            text,
            body,
            id,
        } => {
            let body = match (text, body) {
                (Some(text), None) => serde_json::json!({ "text": text }),
                (None, Some(raw)) => serde_json::from_str(&raw).context("--body is not JSON")?,
                _ => anyhow::bail!("give --text or --body"),
            };
            client.notice(user.as_deref(), group.as_deref(), id.as_deref(), body)
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Plan {
            dau,
            msgs_per_user_day,
            peak_factor,
            online_ratio,
            devices_per_user,
            group_size,
            retention_days,
            report,
            per_core,
            headroom,
            cores_per_host,
            mem_gib_per_host,
            link_us_per_mail,
            cross_node_share,
            media_share,
            media_bytes,
            json,
        } => {
            let per_core_msgs = match &report {
                Some(path) => per_core_from_report(path)?,
                None => per_core,
            };
            let inputs = Inputs {
                dau,
                msgs_per_user_day,
                peak_factor,
                online_ratio,
                devices_per_user,
                recipients_per_msg: group_size,
                retention_days,
                per_core_msgs,
                headroom,
                cores_per_host,
                mem_gib_per_host,
                link_us_per_mail,
                cross_node_share,
                media_share,
                media_bytes,
                ..Inputs::default()
            };
            let lines = plan::plan(&inputs);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "inputs": inputs, "plan": lines })
                    )?
                );
            } else {
                if let Some(path) = &report {
                    println!(
                        "per-core throughput {} msg/s from {}",
                        si(per_core_msgs),
                        path.display()
                    );
                }
                for l in lines {
                    println!(
                        "{:<22} {:>12} {:<7} = {}",
                        l.what,
                        si(l.value),
                        l.unit,
                        l.arithmetic
                    );
                }
            }
        }
        Command::Provision {
            data,
            shards,
            users,
            prefix,
            password,
            device,
            token_ttl_s,
            out,
        } => {
            let request = hermod_tools::provision::Request {
                data: &data,
                shards,
                prefix: &prefix,
                users,
                password: &password,
                device: &device,
                token_ttl_s,
            };
            let accounts = hermod_tools::provision::provision(&request)?;
            let text: String = accounts
                .iter()
                .map(|(u, t)| format!("{u}\t{t}\n"))
                .collect();
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            eprintln!("provisioned {users} accounts in {}", data.display());
        }
        Command::Admin { url, token, action } => {
            let answer = admin(&url, &token, action)?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        Command::Inspect { data, media, json } => {
            let stats = hermod_tools::inspect::inspect(&data)?;
            let media = hermod_tools::inspect::media(&media.unwrap_or_else(|| data.join("media")))?;
            if json {
                let all = serde_json::json!({ "shards": stats, "media": media });
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", hermod_tools::inspect::render(&stats));
                print!("{}", hermod_tools::inspect::render_media(&media));
            }
        }
        Command::Doctor {
            connections,
            shards,
            json,
        } => {
            let shards = shards.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
            });
            let checks = doctor::checks(Target {
                connections,
                shards,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", doctor::render(&checks));
            }
        }
    }
    Ok(())
}

/// Per-core msg/s from a `direct` report: its throughput divided by the server's shards (the
/// report records the load, not the server; one shard is assumed, as in docs/benchmarks.md).
fn per_core_from_report(path: &PathBuf) -> anyhow::Result<f64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    anyhow::ensure!(
        report["scenario"] == "direct",
        "{}: a `direct` report is needed",
        path.display()
    );
    let correctness = &report["figures"]["correctness"];
    anyhow::ensure!(
        ["lost", "duplicated", "reordered"]
            .iter()
            .all(|k| correctness[k].as_u64() == Some(0)),
        "{}: the run lost, duplicated or reordered messages; its throughput is not a capacity",
        path.display()
    );
    report["figures"]["throughput_per_s"]
        .as_f64()
        .context("report has no throughput_per_s")
}
