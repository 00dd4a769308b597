//! `hermod serve`: the server binary (see the library's docs for its modules).

use clap::{Parser, Subcommand};
use hermod::{config, server};

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
