//! End-to-end benchmark: skiff against a direct loopback connection, stunnel and haproxy.
//!
//! Run: `cargo bench --bench e2e`. Everything stays on 127.0.0.1. Each *route* carries the
//! same two backends — an iperf3 server and an echo server inside this process — and is set up,
//! measured and torn down in turn:
//!
//! - `direct`: no tunnel;
//! - `stunnel mTLS`: a stunnel client/server pair, mutual TLS 1.3;
//! - `haproxy mTLS`: a haproxy pair, mutual TLS 1.3 between them;
//! - `haproxy plain`: a haproxy pair without TLS (two user-space hops, no crypto);
//! - `skiff TLS` / `skiff QUIC`: two skiff sites (separate processes, each with its default of
//!   a shard per CPU), listener in one, connectors in the other, linked over TLS (HTTP/2) or
//!   QUIC;
//! - `skiff TLS 2-hop` / `skiff QUIC 2-hop`: three sites dev → stg → prod, listener in dev,
//!   connectors in prod;
//! - `haproxy mTLS 2-hop`: the haproxy mTLS pair with a third haproxy relaying between them
//!   (mutual TLS on both sides), for what a second TLS hop costs a peer on the same machine;
//! - `skiff TLS busy-poll` / `skiff QUIC busy-poll`: the one-hop routes with both sites run
//!   with `--threads 1 --busy-poll 200us`, which trades CPU time for latency;
//! - `skiff TLS one thread`: the TLS route with both sites run with `--threads 1`, one thread
//!   and no further shards, to compare with the default of a shard per CPU.
//!
//! Measured per route: bulk throughput with 1 and 8 streams (iperf3), connection rate (connect,
//! 64-byte request and response, close) with 8 and with 64 concurrent clients, round-trip
//! latency of 64-byte messages on one connection, and the memory (RSS) of the tunnel processes
//! holding 10,000 idle carried connections, plus the CPU time the tunnel processes spend (and,
//! in the rate runs, how much of the machine stood idle). The results are printed as one
//! Markdown table with ratios and written to `bench-results.json` at the workspace root.
//!
//! Last, the skiff TLS route runs again with both sites under callgrind, which counts the
//! instructions each router executes in user space per carried connection and per 64-byte
//! round trip. Those counts repeat within a few per cent, where times on a shared VM drift by
//! more than that over minutes, so they show what a change to skiff's own code did (the
//! kernel's share is not in them). `SKIFF_E2E_ROUTES` calls this `skiff-TLS-instructions`.
//!
//! Missing tools (iperf3, stunnel4, haproxy, openssl, valgrind) are installed with apt-get when
//! running as root; otherwise the rows that need them are left empty. `cargo test` runs bench
//! targets without `--bench`; this one then returns at once. The table, its ratios and the
//! targets are built in `report.rs`, which `tests/bench_report.rs` checks with made-up figures.
//!
//! The machine may be shared: each timed measurement records the CPU other processes used
//! meanwhile and is repeated (bounded) when that was above 0.1 cores. `SKIFF_E2E_ROUTES` picks
//! routes (e.g. `skiff-TLS,haproxy-plain`), and `SKIFF_BIN` a skiff binary to run instead of
//! the one cargo built (the profile-guided build of `pgo/build.sh`, say). A proxy process needs two file descriptors per
//! connection and a skiff router one, so with a low open-file limit the proxies hold fewer idle
//! connections; the per-connection figures divide by the number held. docs/performance.md
//! ("Speed against the peers") has a run's results and how to read them.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

mod report;

use report::{
    build_rows, table, targets, Latency, Measured, Memory, Rate, Throughput, DIRECT, HAPROXY_PLAIN,
    HAPROXY_TLS, HAPROXY_TLS_2HOP, SKIFF_QUIC, SKIFF_QUIC_2HOP, SKIFF_QUIC_BUSY, SKIFF_TLS,
    SKIFF_TLS_2HOP, SKIFF_TLS_BUSY, SKIFF_TLS_ONE, STUNNEL,
};

/// Length of each iperf3 run.
const THROUGHPUT_SECS: u64 = 5;
/// Length of each connection-rate run.
const RATE_SECS: u64 = 10;
/// Concurrent clients in the two connection-rate runs. With 8, each client waits for its
/// exchange to come back through the tunnel before it opens the next connection, and on a
/// 2-core machine the CPU stands partly idle while they wait: the rate is set by the round
/// trip. With 64, there is always work queued, and the rate is set by the CPU that every
/// process on the path spends per connection.
const RATE_CLIENTS: [usize; 2] = [8, 64];
/// Size of the request and of the response (rate and latency runs).
const MESSAGE: usize = 64;
/// Round trips before the latency samples start, and samples.
const PING_WARMUP: usize = 2_000;
const PINGS: usize = 20_000;
/// Idle carried connections held for the memory measurement, and how many are opened at once.
const IDLE_CONNECTIONS: usize = 10_000;
const IDLE_OPENERS: usize = 64;
/// File descriptor limit for this process and the daemons it starts.
const NOFILE: u64 = 65_536;
/// Pause that lets processes settle before a memory reading.
const SETTLE: Duration = Duration::from_secs(2);
/// Above this much CPU used by other processes (in cores) a measurement is disturbed: it is
/// repeated, at most `ATTEMPTS` times in all, after waiting at most `QUIET_WAIT` for a quiet
/// machine, while the run has spent less than `RETRY_BUDGET` on repeats.
const NOISY_CORES: f64 = 0.1;
const ATTEMPTS: usize = 3;
const QUIET_WAIT: Duration = Duration::from_secs(10);
const RETRY_BUDGET: Duration = Duration::from_secs(75);
/// Bound for one exchange of the rate run and for opening one idle connection.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Argument that makes this binary the idle-connection backend (an echo server) on a port.
const IDLE_BACKEND_FLAG: &str = "--e2e-idle-backend";
/// Environment variable naming the routes to run (comma-separated labels with `-` for spaces,
/// e.g. `skiff-TLS,haproxy-plain`); all when unset.
const ROUTES_ENV: &str = "SKIFF_E2E_ROUTES";

/// What the busy-poll routes add to `site run`.
const BUSY_POLL_ARGS: [&str; 4] = ["--threads", "1", "--busy-poll", "200us"];
/// Not a route of the table: the skiff TLS route run again under callgrind.
const INSTRUCTIONS: &str = "skiff TLS instructions";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The bench runs its idle-connection backend as a copy of itself, so that the 10,000 idle
    // connections cost this process one descriptor each, not two.
    if let Some(port) = args
        .iter()
        .position(|a| a == IDLE_BACKEND_FLAG)
        .and_then(|i| args.get(i + 1))
    {
        idle_backend(port);
        return;
    }
    // `cargo test --benches` runs bench targets with `--bench` absent: skip the slow run then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    // Before anything is installed or set up: a mistyped SKIFF_BIN should cost a second.
    if !Path::new(skiff_bin()).is_file() {
        eprintln!(
            "e2e bench failed: {SKIFF_BIN_ENV}={} is not a file: build it first \
             (pgo/build.sh), or unset {SKIFF_BIN_ENV} to measure the binary cargo builds",
            skiff_bin()
        );
        std::process::exit(1);
    }
    if std::env::var_os(NETNS_ENV).is_none() {
        if let Some(code) = rerun_in_own_netns(&args) {
            std::process::exit(code);
        }
    }
    if let Err(e) = run() {
        eprintln!("e2e bench failed: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The network namespace
// ---------------------------------------------------------------------------------------------

/// Names a skiff binary to measure instead of the one cargo built for the bench.
const SKIFF_BIN_ENV: &str = "SKIFF_BIN";

/// Set in the copy of the bench that runs in a network namespace of its own.
const NETNS_ENV: &str = "SKIFF_E2E_NETNS";

/// The ephemeral ports of the bench's own network namespace: all unprivileged ports but those
/// [`Ports`] hands out for listening.
const EPHEMERAL_PORTS: &str = "1024 65535";

/// Runs the bench again in a network namespace of its own (`unshare --net`), and returns its exit
/// code; `None` when it cannot, and the bench then runs here.
///
/// Why: every connection a client closes first keeps its local port in TIME_WAIT, and Linux
/// reuses such a port for the same destination only after a second (`tcp_tw_reuse_delay`), so
/// with the default 28,232 ephemeral ports no client opens more than about 14,000 connections a
/// second to one address. The rate runs reach that: in the machine's namespace, `direct` stops
/// there, whatever the number of clients, and every tunnel's hop to the echo backend is capped
/// at it too. The bench's namespace gets its own loopback, the widest ephemeral range, and no
/// TIME_WAIT sockets of other processes; its loads still stay on loopback.
fn rerun_in_own_netns(args: &[String]) -> Option<i32> {
    if is_root() {
        // Tools are installed from here, where the network is (iproute2 among them).
        ensure_tools();
    }
    // What `set_up_netns` does, tried first: where /proc/sys is read-only, say, the bench still
    // runs, here.
    let probe = format!(
        "ip link set lo up && echo {EPHEMERAL_PORTS} > /proc/sys/net/ipv4/ip_local_port_range"
    );
    let why = if !is_root() {
        "not root"
    } else if find_program(&["ip"]).is_none() {
        "no ip (iproute2)"
    } else if !run_bounded(
        "unshare",
        &["--net", "--", "sh", "-c", &probe],
        Duration::from_secs(10),
    )
    .is_ok_and(|o| o.ok)
    {
        "a network namespace of its own could not be set up (unshare --net, ip, sysctl)"
    } else {
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                eprintln!("cannot find the bench's own executable ({e}); running here");
                return None;
            }
        };
        let status = Command::new("unshare")
            .args(["--net", "--"])
            .arg(exe)
            .args(&args[1..])
            .env(NETNS_ENV, "1")
            .status();
        return match status {
            Ok(status) => Some(status.code().unwrap_or(1)),
            Err(e) => {
                eprintln!("cannot run unshare ({e}); running here");
                None
            }
        };
    };
    eprintln!(
        "note: {why}, so the bench runs in this network namespace, whose ephemeral ports cap \
         each connection-rate run at about 14,000 connections per second (docs/performance.md)"
    );
    None
}

/// Inside the bench's own namespace: brings up its loopback and widens its ephemeral ports.
fn set_up_netns() -> Result<()> {
    let up = run_bounded("ip", &["link", "set", "lo", "up"], Duration::from_secs(10))?;
    if !up.ok {
        bail!("ip link set lo up: {}", up.stderr.trim());
    }
    let reserved = format!("{}-{}", Ports::LOW, Ports::HIGH);
    fs::write("/proc/sys/net/ipv4/ip_local_reserved_ports", &reserved)
        .context("cannot reserve the bench's listening ports")?;
    fs::write("/proc/sys/net/ipv4/ip_local_port_range", EPHEMERAL_PORTS)
        .context("cannot widen the ephemeral port range")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A child process that is killed (SIGKILL) and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args` through `sh -c 'ulimit -n N; exec ...'` (the shell is replaced, so
    /// the pid is the program's), with stdout and stderr appended to `log`.
    fn spawn(name: &str, log: &Path, program: &str, args: &[String]) -> Result<Proc> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {NOFILE} 2>/dev/null || true; exec \"$0\" \"$@\""
            ))
            .arg(program)
            .args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the end of its log) if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a bounded command printed.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion, killing it after `timeout`.
fn run_bounded(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{program} {} did not finish within {timeout:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        ok: status.success(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs a command with its output shown on stderr (apt-get), killing it after `timeout`.
fn run_visible(program: &str, args: &[&str], timeout: Duration) -> Result<bool> {
    let out = std::io::stderr().as_fd().try_clone_to_owned()?;
    let err = std::io::stderr().as_fd().try_clone_to_owned()?;
    let mut child = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        // Debian's invoke-rc.d starts no service at runlevel 1: installing haproxy must not
        // start a system haproxy next to the ones measured here.
        .env("RUNLEVEL", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `probe` every 50 ms until it returns `Ok(true)`, for at most `timeout`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match probe() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something listens on 127.0.0.1:`port` (from /proc/net/tcp, without connecting).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            local == Some(want.as_str()) && state == Some("0A")
        })
}

/// Resident memory of a process in KiB (VmRSS).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    stat_fields(pid, &[14, 15]) / ticks
}

/// The sum of numeric fields of /proc/PID/stat (numbered from 1 as in proc(5)).
fn stat_fields(pid: u32, numbers: &[usize]) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> f64 { rest.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    numbers.iter().map(|&n| field(n)).sum()
}

/// The kernel's count of UDP datagrams dropped because a receive buffer was full.
fn udp_receive_buffer_errors() -> u64 {
    let snmp = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// The machine's CPU time since boot, in clock ticks, as the `cpu` line of /proc/stat gives
/// it: user, nice, system, idle, iowait, irq, softirq, steal (guest time is counted in user).
fn cpu_ticks() -> [u64; 8] {
    let mut ticks = [0; 8];
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    if let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) {
        for (t, v) in ticks.iter_mut().zip(cpu.split_whitespace().skip(1)) {
            *t = v.parse().unwrap_or(0);
        }
    }
    ticks
}

/// Of [`cpu_ticks`]: the ticks spent idle (idle and iowait), and all of them.
fn idle_and_total(ticks: &[u64; 8]) -> (u64, u64) {
    (ticks[3] + ticks[4], ticks.iter().sum())
}

/// CPU time all CPUs spent busy (not idle or waiting for I/O) since boot, in seconds.
fn busy_seconds(ticks_per_second: f64) -> f64 {
    let (idle, total) = idle_and_total(&cpu_ticks());
    (total - idle) as f64 / ticks_per_second
}

/// CPU time of this process, its reaped children (iperf3 clients), the route's processes and
/// the backends, in seconds.
fn own_cpu(lab: &Lab, route: &Route) -> f64 {
    let me = std::process::id();
    let mut pids = route.pids.clone();
    pids.extend(lab.iperf_server.iter().map(Proc::pid));
    pids.extend(lab.idle_backend.iter().map(Proc::pid));
    cpu_seconds(me, lab.ticks) + reaped_children_cpu(me, lab.ticks) + cpu_of(&pids, lab.ticks)
}

/// CPU time of the children a process has waited for (cutime + cstime), in seconds.
fn reaped_children_cpu(pid: u32, ticks: f64) -> f64 {
    stat_fields(pid, &[16, 17]) / ticks
}

/// Total CPU seconds of a set of processes.
fn cpu_of(pids: &[u32], ticks: f64) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p, ticks)).sum()
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// The external programs, where found.
#[derive(Debug, Clone, Default, Serialize)]
struct Tools {
    iperf3: Option<String>,
    stunnel: Option<String>,
    haproxy: Option<String>,
    openssl: Option<String>,
    /// valgrind, for the instruction counts (its package also has `callgrind_control`).
    valgrind: Option<String>,
}

fn find_program(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(String::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(String::from));
    let dirs: Vec<String> = dirs.collect();
    names.iter().find_map(|name| {
        dirs.iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
    })
}

impl Tools {
    fn find() -> Tools {
        Tools {
            iperf3: find_program(&["iperf3"]),
            stunnel: find_program(&["stunnel4", "stunnel"]),
            haproxy: find_program(&["haproxy"]),
            openssl: find_program(&["openssl"]),
            valgrind: find_program(&["valgrind"])
                .filter(|_| find_program(&["callgrind_control"]).is_some()),
        }
    }

    fn missing_packages(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if find_program(&["ip"]).is_none() {
            missing.push("iproute2");
        }
        if self.iperf3.is_none() {
            missing.push("iperf3");
        }
        if self.stunnel.is_none() {
            missing.push("stunnel4");
        }
        if self.haproxy.is_none() {
            missing.push("haproxy");
        }
        if self.openssl.is_none() {
            missing.push("openssl");
        }
        if self.valgrind.is_none() {
            missing.push("valgrind");
        }
        missing
    }
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Finds the tools, installing missing ones from Debian packages when running as root.
fn ensure_tools() -> Tools {
    let tools = Tools::find();
    let missing = tools.missing_packages();
    if missing.is_empty() {
        return tools;
    }
    if !is_root() || std::env::var_os(NETNS_ENV).is_some() {
        eprintln!(
            "missing {}; not installing them (not root, or no network in the bench's own \
             namespace): the rows that need them stay empty",
            missing.join(", ")
        );
        return tools;
    }
    eprintln!("installing {} with apt-get", missing.join(", "));
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    let result = run_visible("apt-get", &["update"], Duration::from_secs(300))
        .and_then(|_| run_visible("apt-get", &install, Duration::from_secs(600)));
    match result {
        Ok(true) => {}
        Ok(false) => eprintln!("apt-get install failed; continuing with what is there"),
        Err(e) => eprintln!("apt-get: {e:#}; continuing with what is there"),
    }
    Tools::find()
}

fn version_of(program: &Option<String>, args: &[&str]) -> Option<String> {
    let out = run_bounded(program.as_deref()?, args, Duration::from_secs(10)).ok()?;
    let text = format!("{}{}", out.stdout, out.stderr);
    text.lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with("Initializing"))
        .map(|l| l.trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// Hands out loopback ports below the kernel's ephemeral range (so that the many client
/// connections of a run never take one), free for TCP and UDP when handed out.
struct Ports {
    next: u16,
    used: HashSet<u16>,
}

impl Ports {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;

    fn new() -> Ports {
        let spread = (std::process::id() % 8_000) as u16;
        Ports {
            next: Self::LOW + spread,
            used: HashSet::new(),
        }
    }

    fn take(&mut self) -> Result<u16> {
        for _ in 0..(Self::HIGH - Self::LOW) {
            let port = self.next;
            self.next = if port + 1 >= Self::HIGH {
                Self::LOW
            } else {
                port + 1
            };
            if self.used.contains(&port) {
                continue;
            }
            let tcp = StdTcpListener::bind(("127.0.0.1", port)).is_ok();
            let udp = UdpSocket::bind(("127.0.0.1", port)).is_ok();
            if tcp && udp {
                self.used.insert(port);
                return Ok(port);
            }
        }
        bail!("no free port between {} and {}", Self::LOW, Self::HIGH)
    }
}

// ---------------------------------------------------------------------------------------------
// In-process echo backend and clients
// ---------------------------------------------------------------------------------------------

/// Runs an echo server on 127.0.0.1:`port` until killed.
fn idle_backend(port: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a runtime");
    rt.block_on(async {
        let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
            .await
            .expect("cannot bind the idle backend");
        echo_server(listener).await
    });
}

async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(echo(stream));
    }
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// Connect, send 64 bytes, read them back, close.
async fn exchange(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = [0x5au8; MESSAGE];
    stream.write_all(&request).await?;
    let mut response = [0u8; MESSAGE];
    stream.read_exact(&mut response).await?;
    if response != request {
        return Err(std::io::Error::other("echo answered different bytes"));
    }
    Ok(())
}

/// Retries one exchange until it succeeds (the route is ready), for at most `timeout`.
async fn ready(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let error = match tokio::time::timeout(Duration::from_secs(5), exchange(addr)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() > deadline {
            bail!("no echo through {addr} within {timeout:?}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connection_rate(
    addr: SocketAddr,
    clients: usize,
    length: Duration,
) -> (u64, u64, Option<String>, f64) {
    let started = Instant::now();
    let deadline = started + length;
    let first_error = Arc::new(Mutex::new(None::<String>));
    let mut workers = Vec::new();
    for _ in 0..clients {
        let first_error = first_error.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let error = match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(addr)).await {
                    Ok(Ok(())) => {
                        ok += 1;
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
                failed += 1;
                first_error.lock().unwrap().get_or_insert(error);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for worker in workers {
        let (o, f) = worker.await.unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let error = first_error.lock().unwrap().take();
    (ok, failed, error, elapsed)
}

async fn ping_pong(addr: SocketAddr) -> Result<Latency> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = [0xa5u8; MESSAGE];
    let mut response = [0u8; MESSAGE];
    let mut samples = Vec::with_capacity(PINGS);
    for i in 0..PING_WARMUP + PINGS {
        let start = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        if i >= PING_WARMUP {
            samples.push(start.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index]
    };
    Ok(Latency {
        samples: samples.len(),
        mean_us: samples.iter().sum::<f64>() / samples.len() as f64,
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        p999_us: pick(0.999),
        max_us: *samples.last().unwrap_or(&0.0),
    })
}

/// Opens up to `count` connections, each proven carried end to end by a 1-byte echo, and keeps
/// them open. Returns them and (failures, first error).
async fn open_idle(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, usize, Option<String>) {
    let results: Vec<std::io::Result<TcpStream>> = futures::stream::iter(0..count)
        .map(|_| async move {
            let open = async {
                let mut stream = TcpStream::connect(addr).await?;
                stream.write_all(b"x").await?;
                let mut one = [0u8; 1];
                stream.read_exact(&mut one).await?;
                Ok(stream)
            };
            match tokio::time::timeout(EXCHANGE_TIMEOUT, open).await {
                Ok(result) => result,
                Err(_) => Err(std::io::Error::other("timed out")),
            }
        })
        .buffer_unordered(IDLE_OPENERS)
        .collect()
        .await;
    let mut open = Vec::with_capacity(count);
    let mut failed = 0;
    let mut first_error = None;
    for result in results {
        match result {
            Ok(stream) => open.push(stream),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    (open, failed, first_error)
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// One way from a client to the two backends, and the processes that make it.
struct Route {
    label: &'static str,
    /// Where a client connects to reach the iperf3 server, the echo server, the idle backend.
    iperf: u16,
    echo: u16,
    idle: u16,
    /// The process on the client side (listener site, client-side proxy) and on the server
    /// side (connector site, server-side proxy), and every process of the route.
    client_side: Option<u32>,
    server_side: Option<u32>,
    pids: Vec<u32>,
    /// Kept alive for the route's lifetime (dropped first: killed before the temp dir goes).
    procs: Vec<Proc>,
    note: String,
}

impl Route {
    fn check_alive(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }
}

/// State shared by all routes.
struct Lab {
    /// The iperf3 server; declared before `dir` so it is killed before the dir is removed.
    iperf_server: Option<Proc>,
    idle_backend: Option<Proc>,
    tools: Tools,
    ports: Ports,
    iperf_port: u16,
    echo_port: u16,
    idle_port: u16,
    /// Open files allowed per process (children inherit it).
    nofile: u64,
    ticks: f64,
    certs: Option<PathBuf>,
    /// Time spent repeating disturbed measurements.
    retry_spent: Duration,
    root: PathBuf,
    rt: Runtime,
    dir: tempfile::TempDir,
}

impl Lab {
    fn sub(&self, name: &str) -> Result<PathBuf> {
        let path = self.root.join(name.replace(' ', "-"));
        fs::create_dir_all(&path)?;
        Ok(path)
    }

    /// The backends every route carries: (service name, backend port).
    fn backends(&self) -> [(&'static str, u16); 3] {
        [
            ("iperf", self.iperf_port),
            ("echo", self.echo_port),
            ("idle", self.idle_port),
        ]
    }

    /// How many idle connections a proxy pair can hold: each proxy process spends two file
    /// descriptors per connection.
    fn proxy_idle_connections(&self) -> usize {
        IDLE_CONNECTIONS.min((self.nofile.saturating_sub(300) / 2) as usize)
    }

    fn start_idle_backend(&mut self) -> Result<()> {
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        let log = self.root.join("idle-backend.log");
        let args = vec![IDLE_BACKEND_FLAG.to_string(), self.idle_port.to_string()];
        self.idle_backend = Some(Proc::spawn("idle backend", &log, &exe, &args)?);
        let port = self.idle_port;
        wait_until("the idle backend", Duration::from_secs(10), || {
            Ok(listening(port))
        })
    }

    fn start_iperf_server(&mut self) -> Result<()> {
        let Some(iperf3) = self.tools.iperf3.clone() else {
            return Ok(());
        };
        self.iperf_server = None;
        let log = self.root.join("iperf3-server.log");
        let args = ["-s", "-B", "127.0.0.1", "-p", &self.iperf_port.to_string()];
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.iperf_server = Some(Proc::spawn("iperf3 server", &log, &iperf3, &args)?);
        let port = self.iperf_port;
        wait_until("the iperf3 server", Duration::from_secs(10), || {
            Ok(listening(port))
        })
    }
}

/// Generates the CA, server and client certificates (ECDSA P-256) for stunnel and haproxy.
fn make_certs(openssl: &str, dir: &Path) -> Result<()> {
    let config = dir.join("openssl.cnf");
    fs::write(
        &config,
        "[req]\n\
         distinguished_name = dn\n\
         [dn]\n\
         [ca_ext]\n\
         basicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server_ext]\n\
         basicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1,DNS:localhost\n\
         authorityKeyIdentifier = keyid\n\
         [client_ext]\n\
         basicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\n\
         authorityKeyIdentifier = keyid\n",
    )?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let cnf = p("openssl.cnf");
    let openssl_ok = |args: &[&str]| -> Result<()> {
        let out = run_bounded(openssl, args, Duration::from_secs(30))?;
        if !out.ok {
            bail!("openssl {} failed: {}", args.join(" "), out.stderr);
        }
        Ok(())
    };
    let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
    openssl_ok(&[
        "req",
        "-x509",
        "-config",
        &cnf,
        "-extensions",
        "ca_ext",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "2",
        "-subj",
        "/CN=skiff-bench-ca",
    ])?;
    for (who, ext) in [("server", "server_ext"), ("client", "client_ext")] {
        let (key, csr, pem) = (
            p(&format!("{who}.key")),
            p(&format!("{who}.csr")),
            p(&format!("{who}.pem")),
        );
        openssl_ok(&[
            "req",
            "-new",
            "-config",
            &cnf,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN=skiff-bench-{who}"),
        ])?;
        openssl_ok(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &cnf,
            "-extensions",
            ext,
            "-out",
            &pem,
        ])?;
        // haproxy wants the certificate and its key in one file.
        let both = fs::read_to_string(&pem)? + &fs::read_to_string(&key)?;
        fs::write(dir.join(format!("{who}-full.pem")), both)?;
    }
    Ok(())
}

fn direct(lab: &Lab) -> Route {
    Route {
        label: DIRECT,
        iperf: lab.iperf_port,
        echo: lab.echo_port,
        idle: lab.idle_port,
        client_side: None,
        server_side: None,
        pids: Vec::new(),
        procs: Vec::new(),
        note: "no tunnel".into(),
    }
}

/// Waits until the entry ports of a proxy pair listen.
fn wait_listening(what: &str, ports: &[u16], procs: &mut [Proc]) -> Result<()> {
    wait_until(what, Duration::from_secs(15), || {
        for proc in procs.iter_mut() {
            proc.check_alive()?;
        }
        Ok(ports.iter().all(|&p| listening(p)))
    })
}

fn stunnel(lab: &mut Lab) -> Result<Route> {
    let program = lab
        .tools
        .stunnel
        .clone()
        .context("stunnel is not installed")?;
    let certs = lab
        .certs
        .clone()
        .context("no certificates (openssl missing)")?;
    let dir = lab.sub(STUNNEL)?;
    let c = |f: &str| certs.join(f).to_string_lossy().into_owned();
    // Logging at `err` only: no line per connection. TCP_NODELAY on both sides, as skiff and
    // haproxy do.
    let global =
        "foreground = yes\npid =\ndebug = 3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let mut client = global.to_string();
    let mut server = global.to_string();
    let mut entries = Vec::new();
    let mut listens = Vec::new();
    for (name, backend) in lab.backends() {
        let (entry, mid) = (lab.ports.take()?, lab.ports.take()?);
        entries.push(entry);
        listens.extend([entry, mid]);
        client += &format!(
            "[{name}]\nclient = yes\naccept = 127.0.0.1:{entry}\nconnect = 127.0.0.1:{mid}\n\
             cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
            c("client.pem"),
            c("client.key"),
            c("ca.pem")
        );
        server += &format!(
            "[{name}]\naccept = 127.0.0.1:{mid}\nconnect = 127.0.0.1:{backend}\n\
             cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n\
             sslVersionMin = TLSv1.3\n",
            c("server.pem"),
            c("server.key"),
            c("ca.pem")
        );
    }
    fs::write(dir.join("client.conf"), client)?;
    fs::write(dir.join("server.conf"), server)?;
    let conf = |f: &str| vec![dir.join(f).to_string_lossy().into_owned()];
    let server = Proc::spawn(
        "stunnel server",
        &dir.join("server.log"),
        &program,
        &conf("server.conf"),
    )?;
    let client = Proc::spawn(
        "stunnel client",
        &dir.join("client.log"),
        &program,
        &conf("client.conf"),
    )?;
    let (client_pid, server_pid) = (client.pid(), server.pid());
    let mut procs = vec![server, client];
    wait_listening("stunnel", &listens, &mut procs)?;
    Ok(Route {
        label: STUNNEL,
        iperf: entries[0],
        echo: entries[1],
        idle: entries[2],
        client_side: Some(client_pid),
        server_side: Some(server_pid),
        pids: vec![client_pid, server_pid],
        procs,
        note: "stunnel client + server, mutual TLS 1.3, ECDSA P-256, thread per connection".into(),
    })
}

/// A chain of haproxy processes: the client side, `hops - 1` relays, the server side, with
/// mutual TLS between them when `tls`.
fn haproxy(lab: &mut Lab, label: &'static str, tls: bool, hops: usize) -> Result<Route> {
    let program = lab
        .tools
        .haproxy
        .clone()
        .context("haproxy is not installed")?;
    let certs = if tls {
        Some(
            lab.certs
                .clone()
                .context("no certificates (openssl missing)")?,
        )
    } else {
        None
    };
    let dir = lab.sub(label)?;
    // nbthread is left at its default: one thread per CPU (2 here). No `log` lines: nothing is
    // logged per connection. maxconn as high as the file descriptor limit allows (haproxy
    // refuses to start if it cannot have two descriptors per connection).
    let maxconn = lab.proxy_idle_connections() + 10;
    let global = format!(
        "global\n  maxconn {maxconn}\n\
         defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  \
         timeout client 1h\n  timeout server 1h\n"
    );
    let c = |f: &str| {
        certs
            .as_ref()
            .map(|d| d.join(f).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let (server_tls, client_tls) = if tls {
        (
            format!(
                " ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
                c("server-full.pem"),
                c("ca.pem")
            ),
            format!(
                " ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
                c("client-full.pem"),
                c("ca.pem")
            ),
        )
    } else {
        (String::new(), String::new())
    };
    // configs[0] is the client side, configs[hops] the server side.
    let mut configs = vec![global; hops + 1];
    let mut entries = Vec::new();
    let mut listens = Vec::new();
    for (name, backend) in lab.backends() {
        // ports[k] is where proxy k listens.
        let ports = (0..=hops)
            .map(|_| lab.ports.take())
            .collect::<Result<Vec<u16>>>()?;
        entries.push(ports[0]);
        listens.extend(&ports);
        for (k, config) in configs.iter_mut().enumerate() {
            let bind_tls = if k > 0 { server_tls.as_str() } else { "" };
            let (next, next_tls) = match ports.get(k + 1) {
                Some(&port) => (port, client_tls.as_str()),
                None => (backend, ""),
            };
            *config += &format!(
                "frontend f_{name}\n  bind 127.0.0.1:{}{bind_tls}\n  default_backend b_{name}\n\
                 backend b_{name}\n  server s 127.0.0.1:{next}{next_tls}\n",
                ports[k]
            );
        }
    }
    let mut procs = Vec::new();
    // The server side first, so that each proxy's next hop is up when it starts.
    for (k, config) in configs.iter().enumerate().rev() {
        let file = dir.join(format!("proxy-{k}.cfg"));
        fs::write(&file, config)?;
        let args = [
            "-db".to_string(),
            "-f".to_string(),
            file.to_string_lossy().into_owned(),
        ];
        let role = match k {
            0 => "client side".to_string(),
            k if k == hops => "server side".to_string(),
            k => format!("relay {k}"),
        };
        let log = dir.join(format!("proxy-{k}.log"));
        procs.push(Proc::spawn(
            &format!("haproxy {role}"),
            &log,
            &program,
            &args,
        )?);
    }
    // procs holds the server side first and the client side last.
    let pids: Vec<u32> = procs.iter().rev().map(Proc::pid).collect();
    wait_listening(label, &listens, &mut procs)?;
    let between = if tls {
        "mutual TLS 1.3 (ECDSA P-256) between them"
    } else {
        "plain TCP between them"
    };
    let chain = match hops {
        1 => "haproxy pair".to_string(),
        n => format!("{} haproxy processes in a chain", n + 1),
    };
    Ok(Route {
        label,
        iperf: entries[0],
        echo: entries[1],
        idle: entries[2],
        client_side: pids.first().copied(),
        server_side: pids.last().copied(),
        pids,
        procs,
        note: format!("{chain}, {between}, nbthread default (2)"),
    })
}

/// The skiff binary the routes run: the one cargo built for the bench, or the one `SKIFF_BIN`
/// names (say, the profile-guided build of `pgo/build.sh`).
fn skiff_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var(SKIFF_BIN_ENV).unwrap_or_else(|_| env!("CARGO_BIN_EXE_skiff").to_string())
    })
}

/// `skiff --state-dir DIR ARGS...`, bounded; fails unless it exits 0.
fn skiff_cli(state: &Path, args: &[&str]) -> Result<String> {
    let state = state.to_string_lossy();
    let mut full = vec!["--state-dir", &state];
    full.extend_from_slice(args);
    let out = run_bounded(skiff_bin(), &full, Duration::from_secs(60))?;
    if !out.ok {
        bail!(
            "skiff {} failed: {}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
    }
    Ok(out.stdout)
}

/// A skiff site: init, then `site run` as its own process.
fn skiff_site(
    lab: &mut Lab,
    dir: &Path,
    name: &str,
    run_args: &[&str],
    callgrind: Option<&str>,
) -> Result<(PathBuf, Proc)> {
    let port = lab.ports.take()?;
    let state = dir.join(name);
    skiff_cli(
        &state,
        &[
            "site",
            "init",
            name,
            "--link-host",
            "127.0.0.1",
            "--link-port",
            &port.to_string(),
        ],
    )?;
    let args: Vec<String> = [
        "--state-dir",
        &state.to_string_lossy(),
        "site",
        "run",
        "--no-access-log",
    ]
    .iter()
    .chain(run_args)
    .map(|s| s.to_string())
    .collect();
    let log = dir.join(format!("{name}.log"));
    let (program, args) = match callgrind {
        // Counting starts only when asked (`callgrind_control -i on`): start-up and link set-up
        // stay out of the figures.
        Some(valgrind) => {
            let out = dir.join(format!("{name}.callgrind"));
            let mut wrapped = vec![
                "--tool=callgrind".to_string(),
                "--instr-atstart=no".to_string(),
                format!("--callgrind-out-file={}.%p", out.display()),
                skiff_bin().to_string(),
            ];
            wrapped.extend(args);
            (valgrind.to_string(), wrapped)
        }
        None => (skiff_bin().to_string(), args),
    };
    let mut proc = Proc::spawn(&format!("skiff site {name}"), &log, &program, &args)?;
    wait_until(
        &format!("site {name} to answer"),
        Duration::from_secs(if callgrind.is_some() { 120 } else { 15 }),
        || {
            proc.check_alive()?;
            Ok(skiff_cli(&state, &["status", "-o", "json"]).is_ok())
        },
    )?;
    Ok((state, proc))
}

/// Sites linked in a chain (each dials the next, which issued the token); listeners in the
/// first, connectors in the last.
fn skiff(lab: &mut Lab, label: &'static str, transport: &str, names: &[&str]) -> Result<Route> {
    skiff_route(lab, label, transport, names, &[], None)
}

/// [`skiff`], with `run_args` added to each `site run`, and each site's process run under
/// callgrind when `callgrind` names valgrind.
fn skiff_route(
    lab: &mut Lab,
    label: &'static str,
    transport: &str,
    names: &[&str],
    run_args: &[&str],
    callgrind: Option<&str>,
) -> Result<Route> {
    let dir = lab.sub(label)?;
    let mut states = Vec::new();
    let mut procs = Vec::new();
    for name in names {
        let (state, proc) = skiff_site(lab, &dir, name, run_args, callgrind)?;
        states.push(state);
        procs.push(proc);
    }
    for i in 0..names.len() - 1 {
        let token = dir.join(format!("{}-to-{}.token", names[i], names[i + 1]));
        let token_arg = token.to_string_lossy().into_owned();
        skiff_cli(&states[i + 1], &["token", "issue", "-o", &token_arg])?;
        skiff_cli(
            &states[i],
            &[
                "link",
                "create",
                &token_arg,
                "--transport",
                transport,
                "--wait",
                "20s",
            ],
        )?;
        let links: Value =
            serde_json::from_str(&skiff_cli(&states[i], &["link", "status", "-o", "json"])?)?;
        let link = links
            .as_array()
            .and_then(|l| l.iter().find(|l| l["peerSite"] == names[i + 1]))
            .ok_or_else(|| anyhow!("no link {} -> {}: {links}", names[i], names[i + 1]))?;
        if link["transport"] != transport {
            bail!(
                "link {} -> {} is not over {transport}: {link}",
                names[i],
                names[i + 1]
            );
        }
    }
    let (first, last) = (&states[0], &states[states.len() - 1]);
    let mut entries = Vec::new();
    for (key, backend) in lab.backends() {
        let entry = lab.ports.take()?;
        entries.push(entry);
        skiff_cli(
            last,
            &[
                "connector",
                "create",
                key,
                "--name",
                key,
                "--host",
                "127.0.0.1",
                "--port",
                &backend.to_string(),
            ],
        )?;
        skiff_cli(
            first,
            &[
                "listener",
                "create",
                key,
                "--name",
                key,
                "--port",
                &entry.to_string(),
            ],
        )?;
    }
    wait_until("listeners to have targets", Duration::from_secs(30), || {
        let list: Value =
            serde_json::from_str(&skiff_cli(first, &["listener", "list", "-o", "json"])?)?;
        let listeners = list.as_array().cloned().unwrap_or_default();
        Ok(listeners.len() == 3
            && listeners
                .iter()
                .all(|l| l["targets"].as_array().is_some_and(|t| !t.is_empty())))
    })?;
    let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
    Ok(Route {
        label,
        iperf: entries[0],
        echo: entries[1],
        idle: entries[2],
        client_side: pids.first().copied(),
        server_side: pids.last().copied(),
        pids,
        procs,
        note: format!(
            "{} skiff sites ({}), {transport} links, --no-access-log",
            names.len(),
            names.join(" -> ")
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

fn iperf(lab: &mut Lab, route: &Route, streams: usize) -> Result<Throughput> {
    let program = lab
        .tools
        .iperf3
        .clone()
        .context("iperf3 is not installed")?;
    let (port, time, parallel) = (
        route.iperf.to_string(),
        THROUGHPUT_SECS.to_string(),
        streams.to_string(),
    );
    let args = [
        "-c",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        &time,
        "-P",
        &parallel,
        "-J",
    ];
    let cpu_before = cpu_of(&route.pids, lab.ticks);
    let started = Instant::now();
    let out = run_bounded(&program, &args, Duration::from_secs(THROUGHPUT_SECS + 30));
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_of(&route.pids, lab.ticks) - cpu_before;
    let parsed = out.and_then(|out| {
        let report: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("iperf3 output is not JSON: {}{}", out.stdout, out.stderr))?;
        if let Some(error) = report["error"].as_str() {
            bail!("iperf3: {error}");
        }
        let sum = &report["end"]["sum_received"];
        let bps = sum["bits_per_second"]
            .as_f64()
            .context("no end.sum_received in iperf3 output")?;
        let bytes = sum["bytes"].as_u64().unwrap_or(0);
        let retransmits = report["end"]["sum_sent"]["retransmits"].as_u64();
        Ok((bps, bytes, retransmits))
    });
    let (bps, bytes, retransmits) = match parsed {
        Ok(v) => v,
        Err(e) => {
            // A failed run can leave the server busy: start a fresh one for the next run.
            let _ = lab.start_iperf_server();
            return Err(e);
        }
    };
    let tunnel = !route.pids.is_empty();
    Ok(Throughput {
        streams,
        gbit_per_s: bps / 1e9,
        bytes,
        retransmits,
        tunnel_cpu_ms_per_gb: (tunnel && bytes > 0).then(|| cpu * 1000.0 / (bytes as f64 / 1e9)),
        tunnel_cores: tunnel.then(|| cpu / elapsed),
    })
}

fn memory(lab: &Lab, route: &Route, count: usize) -> Result<Memory> {
    let (Some(client_pid), Some(server_pid)) = (route.client_side, route.server_side) else {
        bail!("no tunnel processes");
    };
    let addr: SocketAddr = ([127, 0, 0, 1], route.idle).into();
    lab.rt.block_on(ready(addr, Duration::from_secs(10)))?;
    std::thread::sleep(SETTLE);
    let (client_before, server_before) = (rss_kib(client_pid)?, rss_kib(server_pid)?);
    let (open, failed, first_error) = lab.rt.block_on(open_idle(addr, count));
    let connections = open.len();
    std::thread::sleep(SETTLE);
    let (client_after, server_after) = (rss_kib(client_pid)?, rss_kib(server_pid)?);
    drop(open);
    std::thread::sleep(SETTLE);
    let (client_closed, server_closed) = (rss_kib(client_pid)?, rss_kib(server_pid)?);
    if connections == 0 {
        bail!("no idle connection could be opened: {first_error:?}");
    }
    let per = |before: u64, after: u64| (after as f64 - before as f64) / connections as f64;
    Ok(Memory {
        connections,
        failed,
        first_error,
        client_side_before_kib: client_before,
        client_side_after_kib: client_after,
        client_side_after_close_kib: client_closed,
        server_side_before_kib: server_before,
        server_side_after_kib: server_after,
        server_side_after_close_kib: server_closed,
        client_side_kib_per_connection: per(client_before, client_after),
        server_side_kib_per_connection: per(server_before, server_after),
    })
}

fn rate(lab: &Lab, route: &Route, clients: usize) -> Result<Rate> {
    let addr: SocketAddr = ([127, 0, 0, 1], route.echo).into();
    let cpu_before = cpu_of(&route.pids, lab.ticks);
    let (idle_before, total_before) = idle_and_total(&cpu_ticks());
    let (completed, failed, first_error, elapsed) = lab.rt.block_on(connection_rate(
        addr,
        clients,
        Duration::from_secs(RATE_SECS),
    ));
    let cpu = cpu_of(&route.pids, lab.ticks) - cpu_before;
    let (idle_after, total_after) = idle_and_total(&cpu_ticks());
    let machine_idle =
        (idle_after - idle_before) as f64 / (total_after - total_before).max(1) as f64;
    if completed == 0 {
        bail!("no connection completed: {first_error:?}");
    }
    Ok(Rate {
        per_second: completed as f64 / elapsed,
        completed,
        failed,
        first_error,
        tunnel_cpu_us_per_connection: (!route.pids.is_empty())
            .then(|| cpu * 1e6 / completed as f64),
        machine_idle,
    })
}

fn latency(lab: &Lab, route: &Route) -> Result<Latency> {
    let addr: SocketAddr = ([127, 0, 0, 1], route.echo).into();
    lab.rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), ping_pong(addr)).await })
        .map_err(|_| anyhow!("latency run did not finish within 60 s"))?
}

/// Connections and round trips counted under callgrind.
const COUNTED: usize = 1_000;

/// Instructions the two routers of a one-hop TLS route execute in user space, per operation,
/// counted by callgrind: unlike times on a shared VM, these repeat within a few per cent from
/// run to run, so they show what a change to skiff's own code did. The kernel's share (system
/// calls, loopback TCP, wake-ups) is not in them.
#[derive(Debug, Clone, Serialize)]
struct Instructions {
    /// Per carried connection (connect, 64-byte request and response, close), one at a time.
    listener_side_per_connection: u64,
    connector_side_per_connection: u64,
    /// Per 64-byte round trip on one connection.
    listener_side_per_round_trip: u64,
    connector_side_per_round_trip: u64,
}

/// Runs the skiff TLS route's two sites under callgrind and counts their instructions over
/// [`COUNTED`] connections, then [`COUNTED`] round trips.
fn instructions(lab: &mut Lab, valgrind: &str) -> Result<Instructions> {
    const LABEL: &str = "skiff TLS under callgrind";
    let sites = ["dev", "stg"];
    // One thread, as before sites had a shard per CPU, so that counts compare across builds.
    let route = skiff_route(
        lab,
        LABEL,
        "tls",
        &sites,
        &["--threads", "1"],
        Some(valgrind),
    )?;
    let dir = lab.sub(LABEL)?;
    let addr: SocketAddr = ([127, 0, 0, 1], route.echo).into();
    let (Some(listener_side), Some(connector_side)) = (route.client_side, route.server_side) else {
        bail!("no site processes");
    };
    let pids = [listener_side, connector_side];
    let exchanges = |n: usize| async move {
        for _ in 0..n {
            exchange(addr).await?;
        }
        anyhow::Ok(())
    };
    lab.rt.block_on(ready(addr, Duration::from_secs(60)))?;
    // Warm up: first connections fill the allocator's caches and h2's tables.
    lab.rt.block_on(exchanges(100))?;
    let control = |args: &[&str]| -> Result<()> {
        let out = run_bounded("callgrind_control", args, Duration::from_secs(60))?;
        if !out.ok {
            bail!(
                "callgrind_control {}: {}{}",
                args.join(" "),
                out.stdout,
                out.stderr
            );
        }
        Ok(())
    };
    // Each dump holds what was counted since the one before (or since counting started).
    let dump = |part: usize| -> Result<[u64; 2]> {
        let mut counts = [0; 2];
        for (i, (pid, name)) in pids.iter().zip(sites).enumerate() {
            control(&["-d", &pid.to_string()])?;
            let file = dir.join(format!("{name}.callgrind.{pid}.{part}"));
            let mut summary = None;
            wait_until("callgrind's dump", Duration::from_secs(30), || {
                summary = fs::read_to_string(&file).ok().and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("summary:"))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                });
                Ok(summary.is_some())
            })?;
            counts[i] = summary.unwrap_or(0);
        }
        Ok(counts)
    };
    for pid in pids {
        control(&["-i", "on", &pid.to_string()])?;
    }
    lab.rt.block_on(exchanges(COUNTED))?;
    let connections = dump(1)?;
    lab.rt.block_on(async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (request, mut response) = ([0xa5u8; MESSAGE], [0u8; MESSAGE]);
        for _ in 0..COUNTED {
            stream.write_all(&request).await?;
            stream.read_exact(&mut response).await?;
        }
        anyhow::Ok(())
    })?;
    let round_trips = dump(2)?;
    drop(route);
    let per = |n: u64| n / COUNTED as u64;
    Ok(Instructions {
        listener_side_per_connection: per(connections[0]),
        connector_side_per_connection: per(connections[1]),
        listener_side_per_round_trip: per(round_trips[0]),
        connector_side_per_round_trip: per(round_trips[1]),
    })
}

/// Records a measurement's result, or its error.
fn keep<T>(measured: &mut Measured, what: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let message = format!("{what}: {e:#}");
            eprintln!("  FAILED {message}");
            measured.errors.push(message);
            None
        }
    }
}

/// CPU used by processes other than this bench and its children since `since`, in cores.
struct OtherCpu {
    busy: f64,
    own: f64,
    at: Instant,
}

impl OtherCpu {
    fn start(lab: &Lab, route: &Route) -> OtherCpu {
        OtherCpu {
            busy: busy_seconds(lab.ticks),
            own: own_cpu(lab, route),
            at: Instant::now(),
        }
    }

    fn cores(&self, lab: &Lab, route: &Route) -> f64 {
        let busy = busy_seconds(lab.ticks) - self.busy;
        let own = own_cpu(lab, route) - self.own;
        (busy - own).max(0.0) / self.at.elapsed().as_secs_f64().max(1e-3)
    }
}

/// Waits (at most `QUIET_WAIT`) until other processes use less than `NOISY_CORES`.
fn wait_for_quiet(lab: &Lab, route: &Route) {
    let deadline = Instant::now() + QUIET_WAIT;
    while Instant::now() < deadline {
        let window = OtherCpu::start(lab, route);
        std::thread::sleep(Duration::from_millis(500));
        if window.cores(lab, route) < NOISY_CORES {
            return;
        }
    }
}

/// Runs a timed measurement; if other processes used more than `NOISY_CORES` meanwhile, waits
/// for a quiet machine and runs it again (at most `ATTEMPTS` times in all, within the run's
/// retry budget), keeping the attempt least disturbed. Returns it and how disturbed it was.
fn undisturbed<T>(
    lab: &mut Lab,
    route: &Route,
    mut run: impl FnMut(&mut Lab, &Route) -> Result<T>,
) -> (Result<T>, f64) {
    let mut best: Option<(Result<T>, f64)> = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            if lab.retry_spent >= RETRY_BUDGET {
                eprintln!("    (retry budget spent; keeping the result)");
                break;
            }
            eprintln!("    disturbed by other processes; waiting for quiet and measuring again");
        }
        let started = Instant::now();
        if attempt > 0 {
            wait_for_quiet(lab, route);
        }
        let other = OtherCpu::start(lab, route);
        let result = run(lab, route);
        let cores = other.cores(lab, route);
        if attempt > 0 {
            lab.retry_spent += started.elapsed();
        }
        let better = match &best {
            None => true,
            Some((Err(_), _)) => true,
            Some((Ok(_), best_cores)) => result.is_ok() && cores < *best_cores,
        };
        let failed = result.is_err();
        if better {
            best = Some((result, cores));
        }
        if failed || cores <= NOISY_CORES {
            break;
        }
    }
    best.expect("at least one attempt")
}

/// Runs every measurement on one route, in turn; `idle` is the number of idle connections for
/// the memory run (0: none).
fn measure(lab: &mut Lab, mut route: Route, idle: usize) -> Measured {
    let mut m = Measured {
        label: route.label.to_string(),
        note: route.note.clone(),
        ..Default::default()
    };
    let echo: SocketAddr = ([127, 0, 0, 1], route.echo).into();
    if let Err(e) = lab.rt.block_on(ready(echo, Duration::from_secs(20))) {
        keep::<()>(&mut m, "route not ready", Err(e));
        return m;
    }
    let t0 = Instant::now();
    let drops_before = udp_receive_buffer_errors();
    if idle > 0 {
        eprintln!("  memory: {idle} idle connections");
        m.memory = keep(&mut m, "memory", memory(lab, &route, idle));
        if let Some(mem) = &m.memory {
            eprintln!(
                "    {} open ({} failed); client side {:.1} KiB/conn, server side {:.1} KiB/conn",
                mem.connections,
                mem.failed,
                mem.client_side_kib_per_connection,
                mem.server_side_kib_per_connection
            );
        }
    }
    for streams in [1, 8] {
        eprintln!("  throughput: {streams} stream(s), {THROUGHPUT_SECS} s");
        let (result, cores) = undisturbed(lab, &route, |lab, route| iperf(lab, route, streams));
        let what = format!("throughput_{streams}");
        m.other_processes_cores.insert(what.clone(), cores);
        let result = keep(&mut m, &what, result);
        if let Some(t) = &result {
            eprintln!("    {:.2} Gbit/s", t.gbit_per_s);
        }
        if streams == 1 {
            m.throughput_1 = result;
        } else {
            m.throughput_8 = result;
        }
    }
    for clients in RATE_CLIENTS {
        eprintln!("  connection rate: {clients} clients, {RATE_SECS} s");
        let (result, cores) = undisturbed(lab, &route, |lab, route| rate(lab, route, clients));
        let what = format!("rate_{clients}");
        m.other_processes_cores.insert(what.clone(), cores);
        let result = keep(&mut m, &what, result);
        if let Some(r) = &result {
            eprintln!(
                "    {:.0} connections/s ({} failed), machine {:.0} % idle",
                r.per_second,
                r.failed,
                r.machine_idle * 100.0
            );
        }
        if clients == RATE_CLIENTS[0] {
            m.rate_8 = result;
        } else {
            m.rate_64 = result;
        }
    }
    eprintln!("  latency: {PINGS} round trips of {MESSAGE} bytes");
    let (result, cores) = undisturbed(lab, &route, |lab, route| latency(lab, route));
    m.other_processes_cores.insert("latency".into(), cores);
    m.latency = keep(&mut m, "latency", result);
    if let Some(l) = &m.latency {
        eprintln!(
            "    p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
            l.p50_us, l.p99_us, l.p999_us
        );
    }
    if let Err(e) = route.check_alive() {
        keep::<()>(&mut m, "process died", Err(e));
    }
    let noisy: Vec<String> = m
        .other_processes_cores
        .iter()
        .filter(|(_, &cores)| cores > NOISY_CORES)
        .map(|(what, cores)| format!("{what} {cores:.2}"))
        .collect();
    if !noisy.is_empty() {
        eprintln!(
            "  note: disturbed by other processes (cores): {}",
            noisy.join(", ")
        );
    }
    m.udp_receive_buffer_drops = udp_receive_buffer_errors().saturating_sub(drops_before);
    if m.udp_receive_buffer_drops > 0 {
        eprintln!(
            "  {} UDP datagrams dropped for full receive buffers",
            m.udp_receive_buffer_drops
        );
    }
    eprintln!("  ({:.0} s)", t0.elapsed().as_secs_f64());
    m
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = run_bounded(program, args, Duration::from_secs(10)).ok()?;
    out.ok.then(|| out.stdout.trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn raise_nofile() -> u64 {
    if rlimit::setrlimit(rlimit::Resource::NOFILE, NOFILE, NOFILE).is_ok() {
        return NOFILE;
    }
    rlimit::increase_nofile_limit(NOFILE).unwrap_or(1024)
}

fn run() -> Result<()> {
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!("e2e bench: load average {load_before}");
    if load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5)
    {
        eprintln!("  note: the machine is busy; figures may be noisy");
    }
    let nofile = raise_nofile();
    if nofile < (IDLE_CONNECTIONS + 1000) as u64 {
        eprintln!(
            "  note: only {nofile} file descriptors; the memory run may open fewer connections"
        );
    }
    let own_netns = std::env::var_os(NETNS_ENV).is_some();
    if own_netns {
        set_up_netns().context("cannot set up the bench's network namespace")?;
        eprintln!("  in a network namespace of its own, ephemeral ports {EPHEMERAL_PORTS}");
    }
    let tools = ensure_tools();
    eprintln!("  skiff: {}", skiff_bin());
    let dir = tempfile::Builder::new().prefix("skiff-e2e-").tempdir()?;
    // The worker count is set here so that TOKIO_WORKER_THREADS, when set to experiment with
    // the daemons (which inherit the environment), leaves the clients as they are.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let ticks = command_line("getconf", &["CLK_TCK"])
        .and_then(|t| t.parse().ok())
        .unwrap_or(100.0);
    let mut ports = Ports::new();
    let (iperf_port, echo_port, idle_port) = (ports.take()?, ports.take()?, ports.take()?);
    let echo_listener = rt.block_on(TcpListener::bind(("127.0.0.1", echo_port)))?;
    rt.spawn(echo_server(echo_listener));
    let mut lab = Lab {
        iperf_server: None,
        idle_backend: None,
        tools: tools.clone(),
        ports,
        iperf_port,
        echo_port,
        idle_port,
        nofile,
        ticks,
        certs: None,
        retry_spent: Duration::ZERO,
        root: dir.path().to_path_buf(),
        rt,
        dir,
    };
    eprintln!("  working in {}", lab.dir.path().display());
    if let Some(openssl) = &tools.openssl {
        let certs = lab.sub("certs")?;
        match make_certs(openssl, &certs) {
            Ok(()) => lab.certs = Some(certs),
            Err(e) => eprintln!("  cannot make certificates: {e:#}"),
        }
    }
    lab.start_iperf_server()?;
    lab.start_idle_backend()?;
    let proxy_idle = lab.proxy_idle_connections();
    if proxy_idle < IDLE_CONNECTIONS {
        eprintln!(
            "  note: a proxy process needs two descriptors per connection: stunnel and haproxy \
             hold {proxy_idle} idle connections, skiff {IDLE_CONNECTIONS}"
        );
    }
    let selected = std::env::var(ROUTES_ENV).ok();
    let wanted = |label: &str| {
        selected.as_ref().is_none_or(|list| {
            list.split(',')
                .any(|l| l.trim().eq_ignore_ascii_case(&label.replace(' ', "-")))
        })
    };

    type Setup = Box<dyn Fn(&mut Lab) -> Result<Route>>;
    let (all, peer) = (IDLE_CONNECTIONS, proxy_idle);
    let setups: Vec<(&str, usize, Setup)> = vec![
        (DIRECT, 0, Box::new(|lab: &mut Lab| Ok(direct(lab)))),
        (STUNNEL, peer, Box::new(stunnel)),
        (
            HAPROXY_TLS,
            peer,
            Box::new(|lab: &mut Lab| haproxy(lab, HAPROXY_TLS, true, 1)),
        ),
        (
            HAPROXY_PLAIN,
            peer,
            Box::new(|lab: &mut Lab| haproxy(lab, HAPROXY_PLAIN, false, 1)),
        ),
        (
            SKIFF_TLS,
            all,
            Box::new(|lab: &mut Lab| skiff(lab, SKIFF_TLS, "tls", &["dev", "stg"])),
        ),
        (
            SKIFF_QUIC,
            all,
            Box::new(|lab: &mut Lab| skiff(lab, SKIFF_QUIC, "quic", &["dev", "stg"])),
        ),
        (
            SKIFF_TLS_2HOP,
            0,
            Box::new(|lab: &mut Lab| skiff(lab, SKIFF_TLS_2HOP, "tls", &["dev", "stg", "prod"])),
        ),
        (
            SKIFF_QUIC_2HOP,
            0,
            Box::new(|lab: &mut Lab| skiff(lab, SKIFF_QUIC_2HOP, "quic", &["dev", "stg", "prod"])),
        ),
        (
            HAPROXY_TLS_2HOP,
            0,
            Box::new(|lab: &mut Lab| haproxy(lab, HAPROXY_TLS_2HOP, true, 2)),
        ),
        (
            SKIFF_TLS_BUSY,
            0,
            Box::new(|lab: &mut Lab| {
                let names = ["dev", "stg"];
                skiff_route(lab, SKIFF_TLS_BUSY, "tls", &names, &BUSY_POLL_ARGS, None)
            }),
        ),
        (
            SKIFF_QUIC_BUSY,
            0,
            Box::new(|lab: &mut Lab| {
                let names = ["dev", "stg"];
                skiff_route(lab, SKIFF_QUIC_BUSY, "quic", &names, &BUSY_POLL_ARGS, None)
            }),
        ),
        (
            SKIFF_TLS_ONE,
            0,
            Box::new(|lab: &mut Lab| {
                let names = ["dev", "stg"];
                skiff_route(lab, SKIFF_TLS_ONE, "tls", &names, &["--threads", "1"], None)
            }),
        ),
    ];
    let mut results = Vec::new();
    for (label, idle, setup) in &setups {
        if !wanted(label) {
            continue;
        }
        eprintln!("[{:>3.0} s] {label}", started.elapsed().as_secs_f64());
        let measured = match setup(&mut lab) {
            Ok(route) => {
                eprintln!("  {}", route.note);
                // The route (and its processes) is dropped at the end of `measure`.
                measure(&mut lab, route, *idle)
            }
            Err(e) => {
                let mut m = Measured {
                    label: label.to_string(),
                    ..Default::default()
                };
                keep::<()>(&mut m, "setup", Err(e));
                m
            }
        };
        results.push(measured);
        // Let the closed connections of this route drain before the next one starts.
        std::thread::sleep(Duration::from_secs(1));
    }

    let counted = match (&tools.valgrind, wanted(INSTRUCTIONS)) {
        (Some(valgrind), true) => {
            eprintln!(
                "[{:>3.0} s] {INSTRUCTIONS}",
                started.elapsed().as_secs_f64()
            );
            let counted = instructions(&mut lab, valgrind);
            if let Err(e) = &counted {
                eprintln!("  FAILED {INSTRUCTIONS}: {e:#}");
            }
            counted.map_err(|e| format!("{e:#}"))
        }
        (None, true) => Err("valgrind is not installed".to_string()),
        (_, false) => Err("not selected".to_string()),
    };

    let rows = build_rows(&results);
    let table = table(&rows);
    let targets = targets(&results);
    let load_after = loadavg();
    println!();
    println!(
        "skiff end-to-end benchmark, 127.0.0.1, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("(↑ higher is better, ↓ lower is better; ratios are skiff ÷ direct and skiff ÷ the best of stunnel/haproxy for that row)");
    println!();
    print!("{table}");
    println!();
    let held: Vec<String> = results
        .iter()
        .filter_map(|m| {
            m.memory
                .as_ref()
                .map(|x| format!("{} {}", m.label, x.connections))
        })
        .collect();
    let noise: Vec<String> = results
        .iter()
        .map(|m| {
            let worst = m
                .other_processes_cores
                .values()
                .copied()
                .fold(0.0, f64::max);
            format!("{} {worst:.2}", m.label)
        })
        .collect();
    println!(
        "most CPU other processes used during a measurement of each route (cores; above \
         {NOISY_CORES} is disturbed; {:.0} s spent on repeats): {}",
        lab.retry_spent.as_secs_f64(),
        noise.join(", ")
    );
    if !held.is_empty() {
        println!(
            "idle connections held for the memory rows: {} (open-file limit {nofile} per process; \
             a proxy needs two descriptors per connection)",
            held.join(", ")
        );
    }
    match &counted {
        Ok(i) => println!(
            "user-space instructions (callgrind, skiff TLS, {COUNTED} of each): per connection \
             {} listener side, {} connector side; per 64-byte round trip {} listener side, {} \
             connector side",
            i.listener_side_per_connection,
            i.connector_side_per_connection,
            i.listener_side_per_round_trip,
            i.connector_side_per_round_trip
        ),
        Err(e) => println!("user-space instructions: not counted ({e})"),
    }
    for t in &targets {
        println!(
            "target {:<42} {:<5} {:>8} (goal {}) {}",
            t.target,
            t.transport,
            t.shown,
            t.goal,
            match t.met {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "not measured",
            }
        );
    }
    let errors: Vec<String> = results
        .iter()
        .flat_map(|m| m.errors.iter().map(move |e| format!("{}: {e}", m.label)))
        .collect();
    for e in &errors {
        println!("error: {e}");
    }
    println!(
        "load average before {load_before}, after {load_after}; {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let manifest = env!("CARGO_MANIFEST_DIR");
    let report = json!({
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "git_commit": command_line("git", &["-C", manifest, "rev-parse", "HEAD"]),
        "git_dirty": command_line("git", &["-C", manifest, "status", "--porcelain"]).map(|s| !s.is_empty()),
        "skiff_binary": skiff_bin(),
        "kernel": command_line("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "duration_s": started.elapsed().as_secs_f64(),
        "tools": {
            "paths": tools,
            "iperf3": version_of(&tools.iperf3, &["--version"]),
            "stunnel": version_of(&tools.stunnel, &["-version"]),
            "haproxy": version_of(&tools.haproxy, &["-v"]),
            "openssl": version_of(&tools.openssl, &["version"]),
        },
        "instructions": match &counted {
            Ok(i) => serde_json::to_value(i)?,
            Err(e) => json!({ "error": e }),
        },
        "settings": {
            "throughput_seconds": THROUGHPUT_SECS,
            "rate_seconds": RATE_SECS,
            "rate_clients": RATE_CLIENTS,
            "own_network_namespace": own_netns,
            "ephemeral_ports": fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .map(|r| r.split_whitespace().collect::<Vec<_>>().join("-"))
                .unwrap_or_default(),
            "message_bytes": MESSAGE,
            "ping_warmup": PING_WARMUP,
            "pings": PINGS,
            "idle_connections_skiff": IDLE_CONNECTIONS,
            "idle_connections_proxies": proxy_idle,
            "nofile": nofile,
        },
        "routes": results,
        "targets": targets,
        "table_markdown": table,
    });
    let path = Path::new(manifest).join("bench-results.json");
    fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
