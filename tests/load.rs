//! The bounded load run: through one link between two real `skiff` daemons on loopback, 10,000
//! concurrent connections held open for the whole run, plus 1,000 new connections per second
//! for 60 s — every one checked (`common/checked.rs`). Nothing may fail (the backend makes no
//! errors of its own), and afterwards both daemons' open files and resident memory must be
//! back near where they were before the load.
//!
//! Processes: this one runs the clients (one socket per connection); the backend runs in a
//! child process (this binary again, running the ignored `backend_role` test), because one
//! process holding both ends of 10,000 connections would need more descriptors than a hard
//! limit of 20,000 allows. Each daemon holds one socket per connection (the listening site
//! towards the clients, the serving site towards the backend).
//!
//! The long-lived connections: each sends half its upload, holds the connection open (both
//! directions) until the end of the run, then sends the rest and gets its answer. The new ones:
//! a 200-byte upload and a 2 KiB answer each, started on a fixed schedule (open loop: a slow
//! router does not slow the load down).
//!
//! It takes about 85 s (60 s of load, then 15 s in which the daemons' memory goes back); with
//! `cargo test`'s debug build, the two daemons need about one core between them. Knobs (environment): `SKIFF_LOAD_CONCURRENT` (10000), `SKIFF_LOAD_RATE` (1000
//! per second), `SKIFF_LOAD_SECONDS` (60), `SKIFF_LOAD_TRANSPORT` (`tls`; or `quic`),
//! `SKIFF_LOAD_LOG` (the daemons' log filter), `SKIFF_BIN` (another skiff binary, such as
//! `target/release/skiff`). The figures are printed and written to `target/load-results.json`,
//! the daemon logs to `target/load-logs/`; docs/reliability.md reports runs. It skips (passing)
//! when the limit on open files cannot be raised high enough for the run.

#[path = "common/checked.rs"]
mod checked;
mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checked::{Outcome, Request, ServerStats, Tally, Verdict};
use common::{cpu_seconds, wait_for, Site};
use serde_json::{json, Value};

/// Env var that makes `backend_role` serve (its value: where to write the port).
const BACKEND_ENV: &str = "SKIFF_LOAD_BACKEND_PORT_FILE";
/// Bound on one connection (a long-lived one: on its last phase).
const DEADLINE: Duration = Duration::from_secs(30);
/// How long after the load the daemons are watched before the "after" figures: jemalloc
/// returns freed memory to the system over its decay time, 10 s.
const SETTLE: Duration = Duration::from_secs(15);
/// Open files a daemon may keep above its baseline afterwards.
const FD_SLACK: u64 = 16;
/// Resident memory a daemon may keep above its baseline afterwards (structures that keep
/// their capacity, the allocator's own; a leak of half a kilobyte per connection would
/// exceed it).
const RSS_SLACK_KIB: u64 = 32 * 1024;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Not a test: the backend of [`load`], started by it in a child process.
#[test]
#[ignore = "the load test's backend process; started by the load test"]
fn backend_role() {
    let Ok(port_file) = std::env::var(BACKEND_ENV) else {
        return;
    };
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        // A deep accept queue: the load's bursts must not overflow it (a dropped SYN costs
        // the connection a second or more).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4096).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::fs::write(&port_file, port.to_string()).unwrap();
        let stats = Arc::new(ServerStats::default());
        let printer = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                println!(
                    "accepted {} answered {} failed {} upload_reset {} silent {}",
                    printer.accepted.load(Ordering::Relaxed),
                    printer.answered.load(Ordering::Relaxed),
                    printer.answer_failed.load(Ordering::Relaxed),
                    printer.upload_reset.load(Ordering::Relaxed),
                    printer.silent(),
                );
            }
        });
        checked::serve(listener, b'b', stats).await;
    });
}

/// The backend child process, killed when dropped.
struct Backend {
    child: Child,
    port: u16,
    /// The last stats line it printed.
    last: Arc<Mutex<String>>,
}

impl Backend {
    fn start(dir: &Path) -> Backend {
        let port_file = dir.join("backend.port");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["backend_role", "--exact", "--ignored", "--nocapture"])
            .env(BACKEND_ENV, &port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start the backend process");
        let last = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let seen = last.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("accepted") {
                    *seen.lock().unwrap() = line;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "the backend process did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Backend { child, port, last }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open files and resident memory of a process.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    fds: u64,
    rss_kib: u64,
}

impl Usage {
    fn of(pid: u32) -> Usage {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Usage { fds, rss_kib }
    }

    fn max(self, other: Usage) -> Usage {
        Usage {
            fds: self.fds.max(other.fds),
            rss_kib: self.rss_kib.max(other.rss_kib),
        }
    }

    fn json(&self) -> Value {
        json!({ "fds": self.fds, "rss_mib": self.rss_kib as f64 / 1024.0 })
    }
}

/// Latency percentiles (ms) of completed connections.
fn percentiles(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len().saturating_sub(1)) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    json!({ "p50": at(0.5), "p99": at(0.99), "max": at(1.0) })
}

#[test]
fn load() {
    let concurrent: u64 = env_or("SKIFF_LOAD_CONCURRENT", 10_000);
    let rate: u64 = env_or("SKIFF_LOAD_RATE", 1_000);
    let seconds: u64 = env_or("SKIFF_LOAD_SECONDS", 60);
    let transport = match std::env::var("SKIFF_LOAD_TRANSPORT").as_deref() {
        Ok("quic") => "quic",
        _ => "tls",
    };
    // Descriptors: ours (a client socket per connection) and, inherited, the daemons'.
    let need = concurrent + rate * 2 + 1_000;
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit < need {
        eprintln!("load: skipped: the open-file limit is {limit}, the run needs {need}");
        return;
    }
    common::use_transport(transport);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(dir.path());
    let start = |name: &str| {
        let mut site = Site::init(name, &[]);
        if let Ok(filter) = std::env::var("SKIFF_LOAD_LOG") {
            site.run_args = vec!["--log".into(), filter];
        }
        site.run();
        site
    };
    let a = start("a");
    let b = start("b");
    a.link_to(&b);
    b.ok(&[
        "connector",
        "create",
        "svc",
        "--host",
        "127.0.0.1",
        "--port",
        &backend.port.to_string(),
    ]);
    let port = common::free_port();
    a.ok(&["listener", "create", "svc", "--port", &port.to_string()]);
    wait_for(
        "a's listener to be served by b",
        Duration::from_secs(15),
        &[&a, &b],
        || {
            let t = a.targets("svc")?;
            (t == ["b"]).then_some(()).ok_or(format!("{t:?}"))
        },
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Warm up (first connections set up the link's streams, the allocators' arenas), then
    // take the baseline.
    runtime.block_on(async {
        for i in 0..200 {
            let o = checked::exchange(addr, short(u64::MAX - i), DEADLINE).await;
            assert_eq!(o.verdict, Verdict::Completed, "warm-up connection {i}");
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let pids = [a.pid(), b.pid()];
    let baseline = pids.map(Usage::of);
    let overflows = listen_overflows();
    eprintln!(
        "load: {transport} link; baseline a {:?}, b {:?}",
        baseline[0], baseline[1]
    );

    let cpu_before = pids.map(cpu_seconds);
    let started = Instant::now();
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let results: Arc<Mutex<Vec<(bool, Outcome)>>> = Arc::default();
    let opened = Arc::new(AtomicU64::new(0));
    // The long-lived connections, opened at 1,000 per second, all held until the end.
    let long = {
        let (results, opened) = (results.clone(), opened.clone());
        runtime.spawn(async move {
            let mut tasks = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0..concurrent {
                if i % 10 == 0 {
                    tick.tick().await;
                }
                let (results, opened) = (results.clone(), opened.clone());
                let req = Request {
                    seed: i,
                    up: 2_000,
                    down: 2_000,
                    pace: Duration::ZERO,
                };
                tasks.push(tokio::spawn(async move {
                    let o = checked::exchange_held(addr, req, end, &opened, DEADLINE).await;
                    results.lock().unwrap().push((true, o));
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    // The new connections: `rate` per second, on schedule, for the whole run.
    let fresh = {
        let results = results.clone();
        runtime.spawn(async move {
            let mut tasks = Vec::new();
            let per_tick = (rate / 100).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut seed = 1u64 << 40;
            while tokio::time::Instant::now() < end {
                tick.tick().await;
                for _ in 0..per_tick {
                    seed += 1;
                    let results = results.clone();
                    tasks.push(tokio::spawn(async move {
                        let o = checked::exchange(addr, short(seed), DEADLINE).await;
                        results.lock().unwrap().push((false, o));
                    }));
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    // Sample the daemons while the load runs.
    let mut peak = baseline;
    let mut samples = Vec::new();
    while !(long.is_finished() && fresh.is_finished()) {
        std::thread::sleep(Duration::from_secs(1));
        let now = pids.map(Usage::of);
        peak = [peak[0].max(now[0]), peak[1].max(now[1])];
        samples.push(json!({
            "t": started.elapsed().as_secs_f64().round(),
            "held": opened.load(Ordering::Relaxed),
            "done": results.lock().unwrap().len(),
            "a": now[0].json(),
            "b": now[1].json(),
            "accept_queue": { "listener": accept_queue(port), "backend": accept_queue(backend.port) },
            "listen_overflows": listen_overflows() - overflows,
        }));
        assert!(
            started.elapsed() < Duration::from_secs(seconds) + DEADLINE * 2,
            "the load run does not end"
        );
    }
    let took = started.elapsed();
    let cores = [0, 1].map(|i| (cpu_seconds(pids[i]) - cpu_before[i]) / took.as_secs_f64());
    runtime.block_on(async {
        let _ = long.await;
        let _ = fresh.await;
    });
    // Give the allocators their decay time, noting when both daemons were back near their
    // baseline.
    let near = |now: &[Usage; 2]| {
        (0..2).all(|i| {
            now[i].fds <= baseline[i].fds + FD_SLACK
                && now[i].rss_kib <= baseline[i].rss_kib + RSS_SLACK_KIB
        })
    };
    let ended = Instant::now();
    let mut after = pids.map(Usage::of);
    let mut settled = None;
    while ended.elapsed() < SETTLE {
        if settled.is_none() && near(&after) {
            settled = Some(ended.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
        after = pids.map(Usage::of);
    }
    let settled = settled.unwrap_or(SETTLE);
    let overflows = listen_overflows().saturating_sub(overflows);

    let results = std::mem::take(&mut *results.lock().unwrap());
    let (mut held, mut new) = (Tally::default(), Tally::default());
    let mut latencies = Vec::new();
    for (long, o) in &results {
        if *long {
            held.add(o);
        } else {
            new.add(o);
            if o.verdict == Verdict::Completed {
                latencies.push((o.ended - o.started).as_secs_f64() * 1000.0);
            }
        }
    }
    let backend_stats = backend.last.lock().unwrap().clone();
    let report = json!({
        "transport": transport,
        "concurrent": concurrent,
        "rate_per_s": rate,
        "seconds": seconds,
        "took_s": took.as_secs_f64(),
        "settled_s": settled.as_secs_f64(),
        "long_lived": { "completed": held.completed, "reset": held.reset, "corrupted": held.corrupted, "hung": held.hung, "refused": held.refused },
        "new": { "completed": new.completed, "reset": new.reset, "corrupted": new.corrupted, "hung": new.hung, "refused": new.refused, "latency_ms": percentiles(latencies) },
        "a": { "baseline": baseline[0].json(), "peak": peak[0].json(), "after": after[0].json(), "cores": cores[0] },
        "b": { "baseline": baseline[1].json(), "peak": peak[1].json(), "after": after[1].json(), "cores": cores[1] },
        "backend": backend_stats,
        "listen_overflows": overflows,
        "samples": samples,
    });
    let kept = target_dir().join("load-logs");
    if std::fs::create_dir_all(&kept).is_ok() {
        for site in [&a, &b] {
            let _ = std::fs::write(kept.join(format!("{}.log", site.name)), site.logs());
        }
    }
    let file = target_dir().join("load-results.json");
    let _ = std::fs::write(&file, serde_json::to_string_pretty(&report).unwrap() + "\n");
    eprintln!(
        "load: {transport} link, {seconds} s: {} long-lived connections ({} completed, {} failed), \
         {} new ones ({} completed, {} failed; latency p50 {} ms, p99 {} ms); a: fds {} -> {} -> \
         {}, RSS {:.1} -> {:.1} -> {:.1} MiB; b: fds {} -> {} -> {}, RSS {:.1} -> {:.1} -> {:.1} \
         MiB (baseline -> peak -> {} s after the load; near the baseline after {:.1} s); CPU \
         a {:.2}, b {:.2} cores; backend: {backend_stats}; {overflows} SYNs dropped at full \
         accept queues (whole machine); details in {}",
        held.carried + held.refused,
        held.completed,
        held.carried + held.refused - held.completed,
        new.carried + new.refused,
        new.completed,
        new.carried + new.refused - new.completed,
        report["new"]["latency_ms"]["p50"],
        report["new"]["latency_ms"]["p99"],
        baseline[0].fds,
        peak[0].fds,
        after[0].fds,
        baseline[0].rss_kib as f64 / 1024.0,
        peak[0].rss_kib as f64 / 1024.0,
        after[0].rss_kib as f64 / 1024.0,
        baseline[1].fds,
        peak[1].fds,
        after[1].fds,
        baseline[1].rss_kib as f64 / 1024.0,
        peak[1].rss_kib as f64 / 1024.0,
        after[1].rss_kib as f64 / 1024.0,
        SETTLE.as_secs(),
        settled.as_secs_f64(),
        cores[0],
        cores[1],
        file.display()
    );

    for (name, t) in [("long-lived", &held), ("new", &new)] {
        assert!(
            t.completed == t.carried && t.refused == 0,
            "{name} connections failed: {t:?}\n{}",
            common::report(&[&a, &b])
        );
    }
    assert_eq!(held.completed, concurrent, "long-lived connections missing");
    let expected = rate * seconds;
    assert!(
        new.completed >= expected * 95 / 100,
        "only {} of about {expected} new connections were made",
        new.completed
    );
    assert!(
        peak[0].fds >= baseline[0].fds + concurrent && peak[1].fds >= baseline[1].fds + concurrent,
        "the daemons never held the {concurrent} connections at once: peaks {peak:?}"
    );
    for (i, name) in ["a", "b"].iter().enumerate() {
        assert!(
            after[i].fds <= baseline[i].fds + FD_SLACK,
            "site {name} leaks descriptors: {} before the load, {} after",
            baseline[i].fds,
            after[i].fds
        );
        assert!(
            after[i].rss_kib <= baseline[i].rss_kib + RSS_SLACK_KIB,
            "site {name} keeps memory: {} KiB before the load, {} KiB at peak, {} KiB after",
            baseline[i].rss_kib,
            peak[i].rss_kib,
            after[i].rss_kib
        );
    }
}

/// The accept queue of the socket listening on 127.0.0.1:`port`: (waiting, capacity).
fn accept_queue(port: u16) -> Value {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let fields: Vec<&str> = out.split_whitespace().collect();
    json!([fields.get(1), fields.get(2)])
}

/// Connections this machine dropped because a listening socket's accept queue was full
/// (`TcpExtListenOverflows`, for every process).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows");
        if let Some(v) = at.and_then(|i| values.split_whitespace().nth(i)) {
            return v.parse().unwrap_or(0);
        }
    }
    0
}

/// A new connection's request.
fn short(seed: u64) -> Request {
    Request {
        seed,
        up: 200,
        down: 2_048,
        pace: Duration::ZERO,
    }
}

/// `target/`, from this binary's place in `target/debug/deps/`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target")))
}
