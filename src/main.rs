//! # hermod: the server binary — the I/O shell around the shard engine
//!
//! | module | owns |
//! | --- | --- |
//! | `config` | flags and the TOML file, resolved into one `Config` |
//! | `server` | start-up: data dir, secret, RocksDB, listeners, one pinned executor per shard, signals |
//! | `shard` | the loop around one `hermod_shards::Shard`: routes its outputs, group commits, timers |
//! | `mesh` | the shard↔shard channels and the one envelope type they carry |
//! | `conn` | one client socket: HTTP, WebSocket frames, its bounded outbox, hand-off |
//! | `http`, `ws` | sans-IO HTTP routing and WebSocket framing |
//! | `metrics` | per-shard counters published each tick; `/metrics`, `/healthz`, `/readyz` |
//!
//! The decisions (what a frame means, who owns what, when to ack) are all in the
//! `hermod-shards` crate; this crate only moves bytes and time in and out of it.

mod config;
mod conn;
mod http;
mod mesh;
mod metrics;
mod server;
mod shard;
mod ws;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hermod",
    version,
    about = "Hermod: a thread-per-core instant-messaging server (WebSocket + JSON)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: web page at http://ADDR/, WebSocket at ws://ADDR/ws.
    Serve(config::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => config::Config::resolve(&args).and_then(server::run),
    };
    if let Err(err) = result {
        eprintln!("hermod: {err:#}");
        std::process::exit(1);
    }
}
