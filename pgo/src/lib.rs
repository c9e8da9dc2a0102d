//! The training workload of skiff's profile-guided build (`pgo/build.sh`).
//!
//! A profile-guided build compiles skiff twice: once with counters on every branch, which a
//! workload then runs, and once more with those counts, so that the compiler lays out the code
//! that carried bytes run through as one hot path and inlines where calls are frequent. The
//! counts are only as good as the workload, so [`train`] carries what the routers carry for
//! their users, through real `skiff site run` processes on loopback:
//!
//! - three sites, dev → stg over a TLS link and stg → prod over QUIC, each with its default of
//!   a shard per CPU (so TLS lanes carry traffic too);
//! - an echo backend (in this process) behind a connector `near` in stg — one TLS hop from dev —
//!   and a connector `far` in prod — the TLS hop, then a QUIC hop relayed by stg; listeners for
//!   both in dev;
//! - per key: new connections with a 64-byte request and response (8 and 64 clients), 64-byte
//!   round trips on long connections (1 and 8), and bulk transfers in both directions (1 and 4
//!   streams). The one-hop TLS route, the default shape, gets every phase; the two-hop route a
//!   share of them.
//!
//! Every reply is checked, so a workload that carried nothing (a site that did not come up, a
//! route that does not work) fails rather than training on error paths. Last, the sites are
//! stopped with SIGTERM and must exit cleanly: an instrumented binary writes its counts when it
//! exits normally, and a killed one loses them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// How long a site may take to answer its admin API after being started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a route may take to carry its first exchange once its listener exists.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM-ed site may take to exit (and an instrumented one to write its counts).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one CLI command and on one exchange.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The size of a request/response message.
const MESSAGE: usize = 64;
/// The size of one write in a bulk transfer.
const CHUNK: usize = 64 * 1024;

/// What the workload carried, phase by phase.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per phase, in the order they ran.
    pub phases: Vec<Phase>,
}

/// One phase of the workload.
#[derive(Debug)]
pub struct Phase {
    /// What it did (`near: connections, 8 clients`).
    pub name: String,
    /// Operations completed: connections, round trips, or bytes echoed.
    pub count: u64,
    /// What `count` counts.
    pub unit: &'static str,
    /// How long it ran.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for phase in &self.phases {
            let secs = phase.elapsed.as_secs_f64().max(1e-9);
            writeln!(
                f,
                "{:<34} {:>12} {:<11} {:>12.0}/s",
                phase.name,
                phase.count,
                phase.unit,
                phase.count as f64 / secs
            )?;
        }
        Ok(())
    }
}

/// Runs the workload against `skiff` (a path to the binary), each phase for about `phase`,
/// in a temporary directory of its own that is removed afterwards (two trainings in one process
/// never share one). Fails if a site does not start, a route does not carry, a reply is wrong,
/// or a site does not stop cleanly.
pub async fn train(skiff: &Path, phase: Duration) -> Result<Report> {
    let dir = tempfile::Builder::new()
        .prefix("skiff-pgo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    run(skiff, dir.path(), phase).await
}

async fn run(skiff: &Path, dir: &Path, phase: Duration) -> Result<Report> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let echo_port = echo.local_addr()?.port();
    let backend = tokio::spawn(echo_server(echo));

    let mut sites = Vec::new();
    for name in ["dev", "stg", "prod"] {
        sites.push(Site::start(skiff, dir, name).await?);
    }
    let result = workload(&sites, dir, echo_port, phase).await;
    // Stop every site even when the workload failed, so that none is left running.
    let mut stopped = Ok(());
    for site in &mut sites {
        if let Err(e) = site.stop().await {
            stopped = stopped.and(Err(e));
        }
    }
    backend.abort();
    let report = result?;
    stopped?;
    Ok(report)
}

async fn workload(sites: &[Site], dir: &Path, echo_port: u16, phase: Duration) -> Result<Report> {
    let [dev, stg, prod] = sites else {
        bail!("the workload needs three sites");
    };
    dev.link_to(stg, "tls", dir).await?;
    stg.link_to(prod, "quic", dir).await?;
    let echo = echo_port.to_string();
    for (site, key) in [(stg, "near"), (prod, "far")] {
        site.cli(&[
            "connector",
            "create",
            key,
            "--host",
            "127.0.0.1",
            "--port",
            &echo,
        ])
        .await?;
    }
    let mut ports = Vec::new();
    for key in ["near", "far"] {
        let port = free_port()?;
        dev.cli(&["listener", "create", key, "--port", &port.to_string()])
            .await?;
        ready(port, key).await?;
        ports.push((key, port));
    }

    let mut report = Report::default();
    for (key, port) in ports {
        // The two-hop route runs each phase for a third of the time.
        let time = if key == "near" { phase } else { phase / 3 };
        for clients in [8, 64] {
            let started = Instant::now();
            let count = connections(port, clients, time).await?;
            report.add(
                format!("{key}: connections, {clients} clients"),
                count,
                "connections",
                started,
            );
        }
        for streams in [1, 8] {
            let started = Instant::now();
            let count = round_trips(port, streams, time).await?;
            report.add(
                format!("{key}: round trips, {}", plural(streams, "connection")),
                count,
                "round trips",
                started,
            );
        }
        for streams in [1, 4] {
            let started = Instant::now();
            let count = bulk(port, streams, time).await?;
            report.add(
                format!("{key}: bulk, {}", plural(streams, "stream")),
                count,
                "bytes",
                started,
            );
        }
    }
    Ok(report)
}

impl Report {
    fn add(&mut self, name: String, count: u64, unit: &'static str, started: Instant) {
        self.phases.push(Phase {
            name,
            count,
            unit,
            elapsed: started.elapsed(),
        });
    }
}

/// `1 stream`, `4 streams`.
fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// A `skiff site run` process and its state directory.
struct Site {
    name: &'static str,
    skiff: PathBuf,
    state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Site {
    /// Creates the site (`site init`, link port on 127.0.0.1) and runs it until it answers.
    async fn start(skiff: &Path, dir: &Path, name: &'static str) -> Result<Site> {
        let mut site = Site {
            name,
            skiff: skiff.to_path_buf(),
            state: dir.join(name),
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        let port = free_port()?.to_string();
        site.cli(&[
            "site",
            "init",
            name,
            "--link-host",
            "127.0.0.1",
            "--link-port",
            &port,
        ])
        .await?;
        let log = std::fs::File::create(&site.log)
            .with_context(|| format!("cannot create {}", site.log.display()))?;
        let child = Command::new(&site.skiff)
            .arg("--state-dir")
            .arg(&site.state)
            .args(["site", "run", "--no-access-log"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", site.skiff.display()))?;
        site.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = site.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "site {name} exited ({status}) at start: {}",
                        site.log_tail()
                    );
                }
            }
            if site.cli(&["status", "-o", "json"]).await.is_ok() {
                return Ok(site);
            }
            if Instant::now() > deadline {
                bail!(
                    "site {name} did not answer within {START_TIMEOUT:?}: {}",
                    site.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a CLI command against this site; its standard output on success.
    async fn cli(&self, args: &[&str]) -> Result<String> {
        let run = Command::new(&self.skiff)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COMMAND_TIMEOUT, run)
            .await
            .with_context(|| format!("skiff {} (site {}) timed out", args.join(" "), self.name))?
            .with_context(|| format!("cannot run {}", self.skiff.display()))?;
        if !out.status.success() {
            bail!(
                "skiff {} (site {}) failed: {}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Links this site to `peer` over `transport` with a token `peer` issues.
    async fn link_to(&self, peer: &Site, transport: &str, dir: &Path) -> Result<()> {
        let token = dir.join(format!("{}-to-{}.token", self.name, peer.name));
        let token = token.to_string_lossy();
        peer.cli(&["token", "issue", "-o", &token]).await?;
        self.cli(&[
            "link",
            "create",
            &token,
            "--transport",
            transport,
            "--wait",
            "20s",
        ])
        .await?;
        Ok(())
    }

    /// Stops the site with SIGTERM and waits for it to exit; an error if it does not exit
    /// in time (it is then killed, and an instrumented binary's counts are lost) or fails.
    async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let pid = Pid::from_raw(i32::try_from(pid).context("a process id out of range")?);
            kill(pid, Signal::SIGTERM)
                .with_context(|| format!("cannot send SIGTERM to site {}", self.name))?;
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!(
                        "site {} exited with {status}: {}",
                        self.name,
                        self.log_tail()
                    );
                }
                Ok(())
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "site {} did not stop within {STOP_TIMEOUT:?} of SIGTERM",
                    self.name
                )
            }
        }
    }

    /// The last lines of the site's log, for an error message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until a connection through `port` carries an exchange.
async fn ready(port: u16, key: &str) -> Result<()> {
    let deadline = Instant::now() + ROUTE_TIMEOUT;
    loop {
        match exchange(port).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("route {key} did not carry in time"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Echoes what each connection sends until it closes its side, then closes its own.
async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let (mut reader, mut writer) = tcp.split();
            if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                let _ = writer.shutdown().await;
            }
        });
    }
}

/// One connection: a 64-byte request, its echo, and the end of the stream.
async fn exchange(port: u16) -> Result<()> {
    let work = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let request = [b'q'; MESSAGE];
        tcp.write_all(&request).await?;
        tcp.shutdown().await?;
        let mut reply = Vec::with_capacity(MESSAGE);
        tcp.read_to_end(&mut reply).await?;
        if reply != request {
            bail!(
                "the echo of {MESSAGE} bytes came back as {} bytes",
                reply.len()
            );
        }
        Ok(())
    };
    tokio::time::timeout(COMMAND_TIMEOUT, work)
        .await
        .context("an exchange timed out")?
}

/// `clients` tasks each open connections one after another for `time`; the number made.
async fn connections(port: u16, clients: usize, time: Duration) -> Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + time;
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let done = done.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                exchange(port).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    join(tasks).await?;
    Ok(done.load(Ordering::Relaxed))
}

/// `streams` long connections each send 64 bytes and wait for their echo, for `time`; the
/// number of round trips.
async fn round_trips(port: u16, streams: usize, time: Duration) -> Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + time;
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let done = done.clone();
        tasks.spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            let mut message = [0u8; MESSAGE];
            let mut reply = [0u8; MESSAGE];
            let mut n: u8 = 0;
            while Instant::now() < deadline {
                n = n.wrapping_add(1);
                message.fill(n);
                tokio::time::timeout(COMMAND_TIMEOUT, async {
                    tcp.write_all(&message).await?;
                    tcp.read_exact(&mut reply).await
                })
                .await
                .context("a round trip timed out")??;
                if reply != message {
                    bail!("a round trip came back changed");
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            tcp.shutdown().await?;
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).await?;
            anyhow::Ok(())
        });
    }
    join(tasks).await?;
    Ok(done.load(Ordering::Relaxed))
}

/// `streams` connections each send 64 KiB writes for `time` while reading the echo, then close
/// their side and read the rest; the number of bytes echoed.
async fn bulk(port: u16, streams: usize, time: Duration) -> Result<u64> {
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        tasks.spawn(async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            let (mut reader, mut writer) = tcp.into_split();
            let sender = tokio::spawn(async move {
                let chunk = vec![b'b'; CHUNK];
                let deadline = Instant::now() + time;
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    writer.write_all(&chunk).await?;
                    sent += CHUNK as u64;
                }
                writer.shutdown().await?;
                anyhow::Ok(sent)
            });
            let sent_bytes = vec![b'b'; CHUNK];
            let mut buf = vec![0u8; CHUNK];
            let mut received = 0u64;
            loop {
                let n = tokio::time::timeout(COMMAND_TIMEOUT, reader.read(&mut buf))
                    .await
                    .context("a bulk transfer stalled")??;
                if n == 0 {
                    break;
                }
                if buf[..n] != sent_bytes[..n] {
                    bail!("a bulk transfer came back changed");
                }
                received += n as u64;
            }
            let sent = sender.await??;
            if received != sent {
                bail!("sent {sent} bytes, {received} came back");
            }
            anyhow::Ok(received)
        });
    }
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        total += joined??;
    }
    Ok(total)
}

/// Waits for every task; the first error, if any.
async fn join(mut tasks: JoinSet<Result<()>>) -> Result<()> {
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}
