//! `skiff site init`, `skiff site run` and `skiff status`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use skiff_control::admin::{self, StatusView};
use skiff_control::model::DEFAULT_LINK_PORT;
use skiff_control::site::RunOptions;
use skiff_control::Limits;
use skiff_control::{InitOptions, Listeners, Store};

use super::output::{self, Format};

/// `skiff site ...`
#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// Create a site in the state dir: its id, its CA and its settings.
    Init {
        /// The site's name (dev, stg, prod, ...): lowercase letters, digits and '-'.
        name: String,
        /// Host name or address other sites use to reach this site's link port (repeatable;
        /// default 127.0.0.1, which only works from this machine).
        #[arg(long = "link-host", value_name = "HOST")]
        link_hosts: Vec<String>,
        /// The link port (TCP).
        #[arg(long, default_value_t = DEFAULT_LINK_PORT, value_name = "PORT")]
        link_port: u16,
        /// The UDP port for QUIC links (default: the link port number).
        #[arg(long, value_name = "PORT", conflicts_with = "no_quic")]
        quic_port: Option<u16>,
        /// Do not serve QUIC links (other sites then link over TLS only).
        #[arg(long)]
        no_quic: bool,
        /// Serve /healthz and /readyz (and later /metrics) on this address.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<SocketAddr>,
        /// Lifetime of the client certificates this site issues to sites linking to it; they
        /// are renewed over the live link after two thirds of it.
        #[arg(long, value_parser = super::parse_duration, default_value = "7d", value_name = "DURATION")]
        cert_lifetime: Duration,
    },
    /// Run the site daemon in the foreground. SIGTERM or Ctrl-C stops it gracefully: it
    /// closes its listeners, withdraws its connectors and lets carried connections finish
    /// (for at most --drain-timeout); a second SIGTERM or Ctrl-C stops it at once.
    Run {
        /// Do not log a line per closed carried connection (target `skiff::access`).
        #[arg(long)]
        no_access_log: bool,
        /// Serve /metrics, /healthz and /readyz here (default: the site's setting; with
        /// --kube, where the probes look).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<SocketAddr>,
        /// With --kube: labels of the router pods, which the Services the controller creates
        /// select (repeatable; default app.kubernetes.io/name=skiff).
        #[arg(long, value_name = "KEY=VALUE", value_parser = super::service::parse_label)]
        router_selector: Vec<(String, String)>,
        /// How long a graceful stop waits for carried connections before it resets them.
        #[arg(long, value_parser = super::parse_duration, default_value = "10s", value_name = "DURATION")]
        drain_timeout: Duration,
        /// Run the site on one runtime of this many threads, a work-stealing pool, instead of
        /// one-thread shards (with 1: the whole site on one thread). Threads of a pool wake
        /// each other for every chunk they carry, which shards avoid (docs/performance.md).
        #[arg(long, env = "SKIFF_THREADS", value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
        /// With one thread: after carrying a message, keep polling for the next one for up to
        /// this long before sleeping, instead of paying a wake-up; make it longer than a round
        /// trip through the tunnel (e.g. 200us). Cuts the round-trip time of request/response
        /// traffic at the cost of CPU time; the window adapts and closes when traffic pauses or
        /// another process wants the core (docs/performance.md). Off by default.
        #[arg(long, value_parser = parse_busy_poll, value_name = "DURATION")]
        busy_poll: Option<Duration>,
        /// Carry traffic on this many threads, each a one-thread runtime with its own share
        /// (default: one per CPU this process may use, up to 8; 1 with --threads): each accepts on
        /// every listener's port (the kernel spreads new connections over them) and has a lane
        /// of its own (two more connections) on every TLS link, so that a carried connection
        /// stays on one thread from end to end (docs/performance.md).
        #[arg(long, env = "SKIFF_SHARDS", value_name = "N",
              value_parser = clap::value_parser!(u8).range(1..=64))]
        shards: Option<u8>,
        #[command(flatten)]
        limits: LimitArgs,
        /// The runtimes of shards 2 and on, started by the binary before the command runs.
        #[arg(skip)]
        shard_runtimes: Vec<tokio::runtime::Handle>,
    },
}

/// A `--busy-poll` window: from 0 (off) to 1ms.
fn parse_busy_poll(text: &str) -> Result<Duration, String> {
    let d = super::parse_duration(text)?;
    if d > crate::spin::MAX_WINDOW {
        return Err(
            "must be at most 1ms: a longer spin costs more than the wake-up it saves".into(),
        );
    }
    Ok(d)
}

/// What the link port and each link accept (`site run`); see docs/security.md.
#[derive(clap::Args, Debug)]
pub struct LimitArgs {
    /// Most TLS handshakes in progress at once on the link port (and, separately, QUIC
    /// handshakes on its UDP port); connections beyond it are dropped at once.
    #[arg(long, default_value_t = skiff_router::DEFAULT_MAX_HANDSHAKES as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: u32,
    /// Limit for a handshake on the link port, and for what must follow it (a redemption's
    /// claim, a link's preface); slower clients are dropped. Also this site's own link
    /// handshakes.
    #[arg(long, value_parser = parse_handshake_timeout, default_value = "5s", value_name = "DURATION")]
    handshake_timeout: Duration,
    /// Most carried connections a neighbour may have open towards this site on one link;
    /// more are refused at once (the origin tries another site, or resets its client).
    #[arg(long, default_value_t = skiff_router::DEFAULT_MAX_LINK_STREAMS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_link_streams: u32,
    /// Token redemption attempts allowed per source address and minute (after a burst of
    /// --redemption-burst); more are refused with the time to wait.
    #[arg(long, default_value_t = skiff_control::site::DEFAULT_REDEMPTION_RATE, value_name = "PER_MINUTE",
          value_parser = clap::value_parser!(u32).range(1..))]
    redemption_rate: u32,
    /// Redemption attempts one source address may make at once before --redemption-rate
    /// applies.
    #[arg(long, default_value_t = skiff_control::site::DEFAULT_REDEMPTION_BURST, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    redemption_burst: u32,
}

impl LimitArgs {
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_handshakes: self.max_handshakes as usize,
            handshake_timeout: self.handshake_timeout,
            max_link_streams: self.max_link_streams,
            redemption_rate: self.redemption_rate,
            redemption_burst: self.redemption_burst,
        }
    }
}

/// A `--handshake-timeout`: a duration from 100ms to 5m.
fn parse_handshake_timeout(text: &str) -> Result<Duration, String> {
    let d = super::parse_duration(text)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(300) {
        return Err("must be between 100ms and 5m".into());
    }
    Ok(d)
}

pub async fn run(
    command: SiteCommand,
    dir: &Path,
    recent_logs: skiff_control::logs::Recent,
) -> Result<()> {
    match command {
        SiteCommand::Init {
            name,
            link_hosts,
            link_port,
            quic_port,
            no_quic,
            metrics_addr,
            cert_lifetime,
        } => {
            let store = Store::new(dir);
            let no_hosts = link_hosts.is_empty();
            let config = skiff_control::init(
                &store,
                InitOptions {
                    name,
                    link_hosts,
                    link_port,
                    quic_port: if no_quic {
                        None
                    } else {
                        Some(quic_port.unwrap_or(link_port))
                    },
                    metrics_addr: metrics_addr.map(|a| a.to_string()),
                    cert_lifetime,
                },
            )?;
            println!(
                "site {} ({}) created in {}",
                config.name,
                config.id,
                dir.display()
            );
            println!("link endpoints: {} (TCP)", config.endpoints().join(", "));
            if config.quic_port.is_some() {
                println!(
                    "QUIC endpoints: {} (UDP)",
                    config.quic_endpoints().join(", ")
                );
            }
            if no_hosts {
                println!(
                    "note: tokens point at 127.0.0.1 and only work from this machine; \
                     re-create the site with --link-host HOST to link from elsewhere"
                );
            }
            println!(
                "start it with: skiff --state-dir {} site run",
                dir.display()
            );
            Ok(())
        }
        SiteCommand::Run {
            no_access_log,
            metrics_addr,
            router_selector,
            drain_timeout,
            limits,
            threads: _,
            busy_poll: _,
            shards: _,
            shard_runtimes,
        } => {
            anyhow::ensure!(
                router_selector.is_empty(),
                "--router-selector is for the Kubernetes controller: add --kube"
            );
            let options = RunOptions {
                access_log: !no_access_log,
                recent_logs: Some(recent_logs),
                drain: None,
                drain_timeout,
                limits: limits.limits(),
                shards: shard_runtimes,
            };
            run_daemon(dir, options, metrics_addr).await
        }
    }
}

/// What a daemon process sets up before it serves: jemalloc's background purging (memory freed
/// after a burst goes back to the system on time, not only when the process allocates again)
/// and the open-file limit (a descriptor per carried connection on each side; the usual soft
/// limit, 1024, would stop a site at a few hundred).
pub(crate) fn prepare_process() {
    #[cfg(unix)]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "jemalloc background threads not started");
    }
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
}

async fn run_daemon(
    dir: &Path,
    mut options: RunOptions,
    metrics_addr: Option<SocketAddr>,
) -> Result<()> {
    prepare_process();
    let store = Store::new(dir);
    // Bad config stops the daemon before it binds anything.
    let mut config = store.load_config()?;
    if let Some(addr) = metrics_addr {
        config.metrics_addr = Some(addr.to_string());
    }
    let link = tokio::net::TcpListener::bind(("0.0.0.0", config.link_port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on link port {} (is another site or program using it? pick \
                 another with site init --link-port)",
                config.link_port
            )
        })?;
    let metrics = match &config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on metrics address {addr}"))?,
        ),
        None => None,
    };
    let quic = match config.quic_port {
        Some(port) => Some(
            std::net::UdpSocket::bind(("0.0.0.0", port)).with_context(|| {
                format!(
                    "cannot listen on UDP port {port} for QUIC links (is another program using \
                 it? pick another with site init --quic-port, or --no-quic)"
                )
            })?,
        ),
        None => None,
    };
    let admin = admin::bind(&store.admin_socket())
        .with_context(|| format!("cannot open {}", store.admin_socket().display()))?;
    let signals = super::shutdown_on_signals()?;
    options.drain = Some(signals.drain);
    skiff_control::site::run_with(
        store,
        Listeners {
            link,
            admin,
            metrics,
            quic,
        },
        options,
        signals.stop,
    )
    .await?;
    Ok(())
}

pub async fn status(dir: &Path, format: Format) -> Result<()> {
    let status: StatusView = admin::Client::new(dir).get("/v1/status").await?;
    if output::print_structured(format, &status)? {
        return Ok(());
    }
    let site = &status.site;
    println!("site      {} ({})", site.name, site.id);
    println!("version   {}", site.version);
    println!("endpoints {}", site.link_endpoints.join(", "));
    println!("grants    {} active", status.active_grants);
    if !status.revoked.is_empty() {
        println!("revoked   {}", status.revoked.len());
    }
    println!();
    print!("{}", output::link_table(&status.links));
    Ok(())
}
