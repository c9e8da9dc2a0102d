//! Command-line interface: flags and the dispatch to each command group.

mod demo;
mod link;
mod output;
mod service;
mod site;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// skiff links TCP services across Kubernetes clusters and hosts over mutual-TLS tunnels.
#[derive(Parser, Debug)]
#[command(name = "skiff", version, about, propagate_version = true)]
pub struct Args {
    /// The site's state directory (default: the user's data dir, e.g. ~/.local/share/skiff).
    #[arg(long, global = true, env = "SKIFF_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Log filter (tracing's env-filter syntax, e.g. `info` or `skiff_router=debug`); the
    /// `RUST_LOG` variable wins if set.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

/// The command groups.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create and run a site.
    #[command(subcommand)]
    Site(site::SiteCommand),
    /// Issue link tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Create, inspect, delete and revoke links.
    #[command(subcommand)]
    Link(link::LinkCommand),
    /// Serve a routing key from a backend this site can reach.
    #[command(subcommand)]
    Connector(service::ConnectorCommand),
    /// Open a local port whose connections go to a routing key.
    #[command(subcommand)]
    Listener(service::ListenerCommand),
    /// The whole network: sites, links, routing keys.
    #[command(subcommand)]
    Network(service::NetworkCommand),
    /// Show the site and its links.
    Status {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = output::Format::Table)]
        output: output::Format,
    },
    /// Print the version.
    Version,
    /// Run a three-site demo network (dev, stg, prod) on loopback in this process.
    Demo(demo::DemoArgs),
}

/// Sets up logging to stderr: `info` for the daemon and the demo, `warn` for client commands.
pub fn init_logging(args: &Args) {
    let default = match &args.command {
        Command::Site(site::SiteCommand::Run) => "info",
        // The demo stops a site on purpose; its peers' reconnect warnings are expected noise.
        Command::Demo(_) => "error",
        _ => "warn",
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| args.log.clone())
        .unwrap_or_else(|| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command.
pub async fn run(args: Args) -> Result<()> {
    let state_dir = state_dir(args.state_dir.clone())?;
    match args.command {
        Command::Site(command) => site::run(command, &state_dir).await,
        Command::Token(command) => token::run(command, &state_dir).await,
        Command::Link(command) => link::run(command, &state_dir).await,
        Command::Connector(command) => service::connector(command, &state_dir).await,
        Command::Listener(command) => service::listener(command, &state_dir).await,
        Command::Network(command) => service::network(command, &state_dir).await,
        Command::Status { output } => site::status(&state_dir, output).await,
        Command::Version => {
            println!("skiff {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Demo(demo) => demo::run(demo).await,
    }
}

fn state_dir(explicit: Option<PathBuf>) -> Result<PathBuf> {
    match explicit {
        Some(dir) => Ok(dir),
        None => dirs::data_dir()
            .map(|d| d.join("skiff"))
            .context("no --state-dir given and no user data dir known; pass --state-dir DIR"),
    }
}

/// A token cancelled on the first SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = tokio_util::sync::CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

/// Parses durations like `30s`, `15m`, `2h`, `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write durations like 30s, 15m, 2h or 7d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("soon").unwrap_err().contains("15m"));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
