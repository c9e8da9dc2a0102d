//! Command-line interface: flags and the dispatch to each command group.

mod cluster;
mod debug;
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
    /// `RUST_LOG` variable wins if set. Release builds log at most `debug`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,

    /// Act on a Kubernetes cluster's skiff resources (KUBECONFIG, or the in-cluster config)
    /// instead of a local site; with `site run`, run as the namespace's controller.
    #[arg(long, global = true)]
    pub kube: bool,

    /// Kubernetes namespace (with --kube, and for resources printed with `-o yaml`).
    #[arg(long, global = true, env = "SKIFF_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,

    /// Log format: readable text, or one JSON object per line for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

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
    /// Print the Kubernetes CustomResourceDefinitions (kubectl apply -f - installs them).
    Crd,
    /// Collect what is needed to debug a site.
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Run a three-site demo network (dev, stg, prod) on loopback in this process.
    Demo(demo::DemoArgs),
}

/// Most shards a site runs by default. Each shard costs every TLS link a lane: two more
/// connections, with a 256 KiB read buffer each once the link is up.
pub const DEFAULT_MAX_SHARDS: usize = 8;

/// How many threads the async runtime runs: 1 means a single-threaded runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Everything on the thread that calls `block_on`.
    One,
    /// A work-stealing pool of this many workers.
    Pool(usize),
}

impl Args {
    /// The runtime the command wants (of each shard, for a site daemon: see [`Args::shards`]).
    /// A site daemon gets one thread unless `--threads` asks for a pool: on two cores one
    /// thread carries a fifth more than a pool of two, because the second costs more in
    /// cross-thread wake-ups than it adds, and shards use more cores without them (see
    /// docs/performance.md). The demo runs three sites and keeps a pool; client commands make
    /// one request and need no pool.
    pub fn threads(&self) -> Threads {
        let wanted = match &self.command {
            Command::Site(site::SiteCommand::Run { threads, .. }) => threads.map_or(1, usize::from),
            Command::Demo(_) => {
                return Threads::Pool(std::thread::available_parallelism().map_or(2, |n| n.get()))
            }
            _ => 1,
        };
        match wanted {
            0 | 1 => Threads::One,
            n => Threads::Pool(n),
        }
    }

    /// How many shards `site run` carries traffic on: `--shards`, by default one per CPU the
    /// process may use up to [`DEFAULT_MAX_SHARDS`], or one when `--threads` chose the runtime;
    /// one for every other command. An error when the site also runs a pool of threads: each
    /// shard is one thread.
    pub fn shards(&self) -> Result<usize, String> {
        let Command::Site(site::SiteCommand::Run {
            shards, threads, ..
        }) = &self.command
        else {
            return Ok(1);
        };
        let shards = match (shards, threads) {
            (Some(shards), _) => usize::from(*shards),
            (None, Some(_)) => 1,
            (None, None) => {
                std::thread::available_parallelism().map_or(1, |n| n.get().min(DEFAULT_MAX_SHARDS))
            }
        };
        match self.threads() {
            Threads::One => Ok(shards),
            Threads::Pool(_) if shards == 1 => Ok(1),
            Threads::Pool(n) => Err(format!(
                "--shards runs each shard on one thread, and --threads asks for a pool of {n}: \
                 drop --threads (or make it 1)"
            )),
        }
    }

    /// Hands `site run` the runtimes of its shards 2 and on.
    pub fn set_shard_runtimes(&mut self, runtimes: Vec<tokio::runtime::Handle>) {
        if let Command::Site(site::SiteCommand::Run { shard_runtimes, .. }) = &mut self.command {
            *shard_runtimes = runtimes;
        }
    }

    /// How long the runtime busy-polls before it sleeps (`site run --busy-poll`; zero: it
    /// does not). An error when the site runs a pool of threads, where it does not apply.
    pub fn busy_poll(&self) -> Result<Duration, String> {
        let Command::Site(site::SiteCommand::Run {
            busy_poll: Some(window),
            ..
        }) = &self.command
        else {
            return Ok(Duration::ZERO);
        };
        match self.threads() {
            Threads::One => Ok(*window),
            Threads::Pool(_) if window.is_zero() => Ok(Duration::ZERO),
            Threads::Pool(n) => Err(format!(
                "--busy-poll applies to a site that runs on one thread, and this one runs {n}: \
                 add --threads 1, or drop --busy-poll"
            )),
        }
    }
}

/// Log output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up logging to stderr (`info` for the daemon, `warn` for client commands, `error` for
/// the demo). The daemon also keeps its recent lines for `skiff debug dump`.
pub fn init_logging(args: &Args) -> skiff_control::logs::Recent {
    let recent = skiff_control::logs::Recent::default();
    let default = match &args.command {
        Command::Site(site::SiteCommand::Run { .. }) => "info",
        // The demo stops a site on purpose; its peers' reconnect warnings are expected noise.
        Command::Demo(_) => "error",
        _ => "warn",
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| args.log.clone())
        .unwrap_or_else(|| default.to_string());
    let writer = Tee {
        recent: recent.clone(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(writer);
    let _ = match args.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    recent
}

/// Writes log lines to stderr and keeps them in the recent-lines ring.
#[derive(Clone)]
struct Tee {
    recent: skiff_control::logs::Recent,
}

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.recent.push(&String::from_utf8_lossy(buf));
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;

    fn make_writer(&'a self) -> Tee {
        self.clone()
    }
}

/// Runs one command.
pub async fn run(args: Args, recent_logs: skiff_control::logs::Recent) -> Result<()> {
    let state_dir = state_dir(args.state_dir.clone())?;
    if args.kube {
        return cluster::run(
            args.command,
            args.namespace.as_deref(),
            state_dir,
            recent_logs,
        )
        .await;
    }
    run_local(
        args.command,
        &state_dir,
        args.namespace.as_deref(),
        recent_logs,
    )
    .await
}

/// Runs `command` against the local site in `state_dir`.
pub async fn run_local(
    command: Command,
    state_dir: &std::path::Path,
    namespace: Option<&str>,
    recent_logs: skiff_control::logs::Recent,
) -> Result<()> {
    let state_dir = state_dir.to_path_buf();
    match command {
        Command::Site(command) => site::run(command, &state_dir, recent_logs).await,
        Command::Debug(command) => debug::run(command, &state_dir).await,
        Command::Token(command) => token::run(command, &state_dir).await,
        Command::Link(command) => link::run(command, &state_dir).await,
        Command::Connector(command) => service::connector(command, &state_dir, namespace).await,
        Command::Listener(command) => service::listener(command, &state_dir, namespace).await,
        Command::Network(command) => service::network(command, &state_dir).await,
        Command::Status { output } => site::status(&state_dir, output).await,
        Command::Crd => {
            print!("{}", skiff_control::crd::manifests());
            Ok(())
        }
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

/// What the stop signals ask for.
pub struct Signals {
    /// Cancelled on the first SIGTERM or SIGINT (Ctrl-C): stop gracefully.
    pub drain: tokio_util::sync::CancellationToken,
    /// Cancelled on the second: stop at once.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Watches SIGTERM and SIGINT: the first asks for a graceful stop, the second for an
/// immediate one.
pub fn shutdown_on_signals() -> Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = Signals {
        drain: tokio_util::sync::CancellationToken::new(),
        stop: tokio_util::sync::CancellationToken::new(),
    };
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let (drain, stop) = (signals.drain.clone(), signals.stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully"),
            _ = int.recv() => tracing::info!("SIGINT: stopping gracefully"),
        }
        drain.cancel();
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM again: stopping now"),
            _ = int.recv() => tracing::info!("SIGINT again: stopping now"),
        }
        stop.cancel();
    });
    Ok(signals)
}

/// Runs `work`, showing a spinner with the elapsed time on stderr while it runs (only when
/// stderr is a terminal, so scripts and logs stay clean).
pub async fn with_progress<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let started = std::time::Instant::now();
    let frames = ['|', '/', '-', '\\'];
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(150));
    tokio::pin!(work);
    let mut n = 0usize;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = tick.tick() => {
                n += 1;
                eprint!("\r{} {what} ({} s)", frames[n % frames.len()], started.elapsed().as_secs());
                let _ = std::io::stderr().flush();
            }
        }
    };
    eprint!("\r\x1b[2K");
    result
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
    fn the_runtime_follows_the_command() {
        let threads = |args: &[&str]| Args::try_parse_from(args).map(|a| a.threads());
        assert_eq!(
            threads(&["skiff", "site", "run", "--threads", "1"]).unwrap(),
            Threads::One
        );
        assert_eq!(
            threads(&["skiff", "site", "run", "--threads", "3"]).unwrap(),
            Threads::Pool(3)
        );
        // Without --threads, one thread (per shard).
        let default = threads(&["skiff", "site", "run"]).unwrap();
        assert_eq!(default, Threads::One);
        // A client command makes one request: no pool.
        assert_eq!(threads(&["skiff", "status"]).unwrap(), Threads::One);
        assert!(matches!(
            threads(&["skiff", "demo"]).unwrap(),
            Threads::Pool(_)
        ));
        let zero = threads(&["skiff", "site", "run", "--threads", "0"]).unwrap_err();
        assert!(zero.to_string().contains("--threads"), "{zero}");
    }

    #[test]
    fn shards_run_one_thread_each() {
        let parse = |args: &[&str]| Args::try_parse_from(args).unwrap();
        let run = ["skiff", "site", "run"];
        let with = |extra: &[&str]| parse(&[&run[..], extra].concat());
        // By default a shard per CPU, up to the most; with --threads, the one runtime it asks for.
        let cpus =
            std::thread::available_parallelism().map_or(1, |n| n.get().min(DEFAULT_MAX_SHARDS));
        assert_eq!(with(&[]).shards(), Ok(cpus));
        assert_eq!(with(&["--threads", "1"]).shards(), Ok(1));
        assert_eq!(with(&["--threads", "3"]).shards(), Ok(1));
        assert_eq!(parse(&["skiff", "status"]).shards(), Ok(1));
        // --shards alone makes the runtime one thread, whatever the machine.
        let sharded = with(&["--shards", "4"]);
        assert_eq!((sharded.threads(), sharded.shards()), (Threads::One, Ok(4)));
        let one = with(&["--threads", "1", "--shards", "2"]);
        assert_eq!((one.threads(), one.shards()), (Threads::One, Ok(2)));
        let both = with(&["--threads", "2", "--shards", "2"])
            .shards()
            .unwrap_err();
        assert!(both.contains("drop --threads"), "{both}");
        assert_eq!(with(&["--threads", "2", "--shards", "1"]).shards(), Ok(1));
        assert!(Args::try_parse_from([&run[..], &["--shards", "0"]].concat()).is_err());
        assert!(Args::try_parse_from([&run[..], &["--shards", "65"]].concat()).is_err());
    }

    #[test]
    fn busy_polling_needs_one_thread() {
        let busy_poll = |args: &[&str]| Args::try_parse_from(args).unwrap().busy_poll();
        assert_eq!(
            busy_poll(&[
                "skiff",
                "site",
                "run",
                "--threads",
                "1",
                "--busy-poll",
                "50us"
            ]),
            Ok(Duration::from_micros(50))
        );
        assert_eq!(
            busy_poll(&["skiff", "site", "run", "--threads", "1"]),
            Ok(Duration::ZERO)
        );
        assert_eq!(busy_poll(&["skiff", "status"]), Ok(Duration::ZERO));
        let pool = busy_poll(&[
            "skiff",
            "site",
            "run",
            "--threads",
            "2",
            "--busy-poll",
            "50us",
        ])
        .unwrap_err();
        assert!(pool.contains("--threads 1"), "{pool}");
        let long = Args::try_parse_from(["skiff", "site", "run", "--busy-poll", "5ms"])
            .map(|_| ())
            .unwrap_err();
        assert!(long.to_string().contains("at most 1ms"), "{long}");
    }

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
