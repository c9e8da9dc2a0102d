//! Lossy long-distance links: 16 concurrent transfers over one QUIC link versus one TLS link.
//!
//! Two real sites (`skiff site run`, the release binary) in two network namespaces. Site B
//! accepts the link and has a connector to a sink server on its loopback; site A dials and has a
//! listener, to which a client on A's loopback makes 16 concurrent connections. The sink sends,
//! the client receives and measures: data crosses the link from B to A. Between the namespaces
//! is an impaired path, in each direction: 25 ms delay, 2 % random loss and a 100 Mbit/s
//! bottleneck with a 50 ms tail-drop queue (so 50 ms RTT, and a buffer of one bandwidth-delay
//! product). The bottleneck stands for the WAN link; without one, a loss-tolerant congestion
//! controller would measure the CPU of the machine running the bench instead.
//!
//! The path is a veth pair with `tc netem` on both ends when the kernel has netem; otherwise
//! (many CI and VM kernels lack `sch_netem`) two TUN devices, one in each namespace, between
//! which this process forwards IP packets in user space, delaying and dropping them. Either way
//! each namespace's kernel (TCP for TLS links, UDP for QUIC) sees real loss and delay. The
//! namespaces, the veth pair, netem and the emulator are `tests/common/netns.rs`, shared with
//! the fault suite.
//!
//! Scenarios, each with fresh sites and a fresh link: `quic` (`link create --transport quic`),
//! `tls` (`--transport tls`, the namespaces' TCP congestion control being CUBIC, Linux's
//! default, or Reno where the host does not let namespaces choose CUBIC) and, for reference,
//! `tls:bbr` (TLS with TCP BBR). Measured in each: the completion time of 16 concurrent 2 MiB
//! transfers, then the goodput of 16 streams receiving for 20 s (total and per stream). A
//! transfer or stream that is reset is retried or reconnected, as an application would, and
//! counted. Also reported: link drops (from site A's log), the link's heartbeat RTT sampled
//! every second, and what the path dropped. Results are printed as a table and written to
//! `target/lossy-results.json`; docs/performance.md explains them.
//!
//! Run: `cargo bench --bench lossy` as root (it skips, exiting 0, when not root or without
//! `ip`); it takes about three minutes. It creates and removes namespaces
//! `skiff-lossy-{a,b}-PID` and, on the TUN path, devices `skl-{a,b}-PID`. Knobs
//! (environment): `SKIFF_LOSSY_TRANSPORTS` (`quic,tls,tls:bbr`; `TRANSPORT:TCPCC` picks the
//! namespaces' TCP congestion control), `SKIFF_LOSSY_SECONDS` (20), `SKIFF_LOSSY_DELAY_MS`
//! (25, one way), `SKIFF_LOSSY_LOSS` (2, percent per direction), `SKIFF_LOSSY_RATE_MBIT` (100;
//! 0 for no bottleneck), `SKIFF_LOSSY_QUEUE_MS` (50), `SKIFF_LOSSY_TCP_CC` (`cubic`),
//! `SKIFF_LOSSY_PATH` (`auto`, `netem` or `tun`).
//!
//! The bench re-executes its own binary, under `ip netns exec`, for the sink (`--lossy-role
//! sink`) and the client (`--lossy-role client`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netns::{Emulator, End, Impairment, Netns, Stats, Veth};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "../tests/common/netns.rs"]
mod netns;

/// Concurrent transfers per measurement.
const STREAMS: usize = 16;
/// Size of each transfer in the completion measurement.
const TRANSFER: u64 = 2 * 1024 * 1024;
/// Bound on the completion measurement; a transport that needs longer is reported as such.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(75);
/// The sink's port, on every address of namespace B (site B's connector uses its loopback).
const SINK_PORT: u16 = 9000;
/// Site A's and B's link port (TCP for TLS, UDP for QUIC); one per scenario.
const LINK_PORT: u16 = 55671;
/// Site A's listener port; one per scenario.
const LISTEN_PORT: u16 = 9100;
/// Addresses of the two ends of the impaired path (TEST-NET-1, inside our namespaces only).
const ADDR_A: &str = "192.0.2.1";
const ADDR_B: &str = "192.0.2.2";
/// Their prefix length.
const PREFIX: &str = "/30";
/// Bound on one CLI command, and on a daemon answering after start.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the link coming up and the listener learning its route.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);

/// I/O buffer for the sink and the client.
const CHUNK: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(role) = arg(&args, "--lossy-role") {
        if let Err(e) = run_role(&role, &args) {
            eprintln!("lossy {role}: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo test --benches` runs bench targets with `--bench` absent: skip the slow run then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    if let Some(reason) = netns::cannot_run() {
        println!("lossy: skipped: {reason}");
        return;
    }
    if let Err(e) = bench() {
        eprintln!("lossy: FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The benchmark

fn bench() -> Result<()> {
    let started = Instant::now();
    let pid = std::process::id();
    let seconds: u64 = env_or("SKIFF_LOSSY_SECONDS", 20);
    let impairment = Impairment {
        delay: Duration::from_millis(env_or("SKIFF_LOSSY_DELAY_MS", 25)),
        loss_ppm: (env_or("SKIFF_LOSSY_LOSS", 2.0f64) * 10_000.0).round() as u64,
        rate_kbit: (env_or("SKIFF_LOSSY_RATE_MBIT", 100.0f64) * 1000.0).round() as u64,
        // One bandwidth-delay product at 50 ms RTT.
        queue: Duration::from_millis(env_or("SKIFF_LOSSY_QUEUE_MS", 50)),
    };
    let tcp_cc = std::env::var("SKIFF_LOSSY_TCP_CC").unwrap_or_else(|_| "cubic".into());
    let transports =
        std::env::var("SKIFF_LOSSY_TRANSPORTS").unwrap_or_else(|_| "quic,tls,tls:bbr".into());
    let path_kind = std::env::var("SKIFF_LOSSY_PATH").unwrap_or_else(|_| "auto".into());
    netns::remove_stale("skiff-lossy-");

    let ns_a = Netns::create(&format!("skiff-lossy-a-{pid}"))?;
    let ns_b = Netns::create(&format!("skiff-lossy-b-{pid}"))?;
    let path = Wire::create(&path_kind, &ns_a, &ns_b, pid, impairment)?;
    eprintln!(
        "lossy: path {} between {} ({ADDR_A}) and {} ({ADDR_B})",
        path.describe(),
        ns_a.name,
        ns_b.name
    );

    let exe = std::env::current_exe().context("current_exe")?;
    let exe = exe
        .to_str()
        .context("non-UTF-8 executable path")?
        .to_string();
    let sink_port = SINK_PORT.to_string();
    let _sink = Proc::spawn(
        &mut ns_b.command(&exe, &["--lossy-role", "sink", "--port", &sink_port]),
        "sink",
        false,
    )?;
    wait_until("the sink to listen", CLI_TIMEOUT, || {
        ns_b.run(&["ss", "-Hltn", &format!("sport = :{SINK_PORT}")])
            .map(|out| !out.trim().is_empty())
    })?;

    // Emulator capacity: the raw path (no skiff), with the impairment switched off.
    let mut results = Vec::new();
    let capacity = if let Wire::Tun(emu) = &path {
        emu.set(Impairment::NONE);
        let before = emu.stats();
        let out = run_client(
            &ns_a,
            &exe,
            &format!("{ADDR_B}:{SINK_PORT}"),
            4,
            0,
            3,
            || {},
        )?;
        let stats = emu.stats().since(&before);
        emu.set(impairment);
        let mbit = total_mbit(&out);
        eprintln!(
            "lossy: emulator capacity (raw TCP, 4 streams, no delay or loss): {mbit:.0} Mbit/s, \
             {} packets forwarded",
            stats.forwarded
        );
        Some(json!({ "raw_tcp_mbit": mbit, "emulator": stats.json() }))
    } else {
        None
    };

    for (i, spec) in transports.split(',').map(str::trim).enumerate() {
        let i = i as u16;
        let (transport, cc) = match spec.split_once(':') {
            Some((transport, cc)) => match set_tcp_cc(&[&ns_a, &ns_b], cc) {
                Ok(cc) => (transport, cc),
                Err(e) => {
                    // An extra comparison (`tls:bbr`); the host may not offer that algorithm.
                    eprintln!("lossy: {spec}: skipped: {e:#}");
                    continue;
                }
            },
            None => (spec, set_tcp_cc(&[&ns_a, &ns_b], &tcp_cc)?),
        };
        eprintln!("lossy: {transport}: starting sites (TCP congestion control {cc})");
        let mut result = scenario(
            transport,
            &ns_a,
            &ns_b,
            &exe,
            LINK_PORT + 10 * i,
            LISTEN_PORT + i,
            seconds,
            &path,
        )
        .with_context(|| format!("{transport} scenario"))?;
        result["tcp_cc"] = cc.into();
        results.push(result);
    }

    print_table(&results, seconds);
    let report = json!({
        "impairment": {
            "path": path.describe(),
            "one_way_delay_ms": impairment.delay.as_millis() as u64,
            "loss_percent_per_direction": impairment.loss_ppm as f64 / 10_000.0,
            "rate_mbit_per_direction": impairment.rate_kbit as f64 / 1000.0,
            "queue_ms": impairment.queue.as_millis() as u64,
        },
        "streams": STREAMS,
        "transfer_bytes": TRANSFER,
        "stream_seconds": seconds,
        "capacity": capacity,
        "results": results,
        "bench_seconds": started.elapsed().as_secs_f64(),
    });
    let file = target_dir().join("lossy-results.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", file.display()))?;
    println!(
        "results written to {} (bench took {:.0} s)",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sets the TCP congestion control of both namespaces (sockets created later use it); returns
/// the one in use. Unprivileged namespaces may only choose among the host's
/// `net.ipv4.tcp_allowed_congestion_control`; when `cubic` (Linux's default) is not among them,
/// `reno`, the other loss-based one, stands in for it.
fn set_tcp_cc(namespaces: &[&Netns], cc: &str) -> Result<String> {
    let set = |cc: &str| -> Result<()> {
        for ns in namespaces {
            ns.run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.tcp_congestion_control={cc}"),
            ])?;
        }
        Ok(())
    };
    match set(cc) {
        Ok(()) => Ok(cc.into()),
        Err(e) if cc == "cubic" => {
            eprintln!(
                "lossy: TCP cubic not allowed in a namespace here ({e:#}); using reno, see \
                 net.ipv4.tcp_allowed_congestion_control"
            );
            set("reno")?;
            Ok("reno".into())
        }
        Err(e) => Err(e.context(format!("cannot use TCP congestion control {cc}"))),
    }
}

/// One transport: fresh sites A and B, a link, a listener and a connector, then the client.
#[allow(clippy::too_many_arguments)]
fn scenario(
    transport: &str,
    ns_a: &Netns,
    ns_b: &Netns,
    exe: &str,
    link_port: u16,
    listen_port: u16,
    seconds: u64,
    path: &Wire,
) -> Result<Value> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("skiff-lossy-{transport}-"))
        .tempdir()?;
    let site_b = Site::start(ns_b, dir.path(), "b", ADDR_B, link_port)?;
    let site_a = Site::start(ns_a, dir.path(), "a", ADDR_A, link_port)?;
    let sites = [&site_a, &site_b];
    let setup = || -> Result<()> {
        let token = dir.path().join("b.token");
        let token = token.to_str().context("path")?;
        site_b.cli(&["token", "issue", "-o", token])?;
        let t0 = Instant::now();
        let out = site_a.cli(&[
            "link",
            "create",
            token,
            "--transport",
            transport,
            "--wait",
            "20s",
        ])?;
        eprintln!(
            "lossy: {transport}: {} ({:.1} s)",
            out.trim(),
            t0.elapsed().as_secs_f64()
        );
        let links: Value = serde_json::from_str(&site_a.cli(&["link", "status", "-o", "json"])?)?;
        let link = &links[0];
        if link["state"] != "up" || link["transport"] != transport {
            bail!("link is not up over {transport}: {link}");
        }
        site_b.cli(&[
            "connector",
            "create",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            &SINK_PORT.to_string(),
        ])?;
        site_a.cli(&[
            "listener",
            "create",
            "bench",
            "--port",
            &listen_port.to_string(),
        ])?;
        wait_until("the listener to learn its route", ROUTE_TIMEOUT, || {
            let list: Value =
                serde_json::from_str(&site_a.cli(&["listener", "list", "-o", "json"])?)?;
            Ok(list[0]["targets"].as_array().is_some_and(|t| !t.is_empty()))
        })
    };
    if let Err(e) = setup() {
        return Err(with_logs(e, &sites));
    }

    let before = path.stats();
    if let Wire::Tun(emu) = path {
        emu.reset_max();
    }
    let t0 = Instant::now();
    // Each second: the link's RTT as its heartbeats see it (they share the link with the data),
    // and whether the listener still has a route (routes age out when advertisements, sent on
    // the control stream, stop arriving).
    let mut rtts = Vec::new();
    let mut routeless = 0;
    let client = run_client(
        ns_a,
        exe,
        &format!("127.0.0.1:{listen_port}"),
        STREAMS,
        TRANSFER,
        seconds,
        || {
            let status = site_a
                .cli(&["link", "status", "-o", "json"])
                .ok()
                .and_then(|out| serde_json::from_str::<Value>(&out).ok());
            if let Some(rtt) = status.as_ref().and_then(|s| s[0]["rttMs"].as_f64()) {
                rtts.push(rtt);
            }
            let listeners = site_a
                .cli(&["listener", "list", "-o", "json"])
                .ok()
                .and_then(|out| serde_json::from_str::<Value>(&out).ok());
            if listeners.is_some_and(|l| l[0]["targets"].as_array().is_some_and(|t| t.is_empty())) {
                routeless += 1;
            }
        },
    );
    let client = match client {
        Ok(c) => c,
        Err(e) => return Err(with_logs(e, &sites)),
    };
    let emulator = path.stats().since(&before);
    // Keep the daemon logs for a look afterwards (the state dirs are removed).
    let kept = target_dir().join("lossy-logs");
    if std::fs::create_dir_all(&kept).is_ok() {
        for site in sites {
            let name = format!("{transport}-{link_port}-{}.log", site.name);
            let _ = std::fs::copy(&site.log, kept.join(name));
        }
    }
    let link_drops = std::fs::read_to_string(&site_a.log)
        .unwrap_or_default()
        .matches("link down")
        .count();
    let completion = &client["completion"];
    let per_stream: Vec<f64> = client["stream"]["mbit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let result = json!({
        "transport": transport,
        "goodput_mbit": total_mbit(&client),
        "stream_min_mbit": per_stream.iter().copied().fold(f64::INFINITY, f64::min),
        "stream_max_mbit": per_stream.iter().copied().fold(0.0, f64::max),
        "completion_s": completion["seconds"],
        "completion_done": completion["done"],
        "completion_first_s": completion["first_s"],
        "resets": completion["retries"].as_u64().unwrap_or(0)
            + client["stream"]["resets"].as_u64().unwrap_or(0),
        "link_drops": link_drops,
        "routeless_s": routeless,
        "heartbeat_rtt_ms": {
            "median": percentile(&rtts, 0.5),
            "max": percentile(&rtts, 1.0),
            // Samples that differ from the one before: a link's RTT changes only when a pong
            // arrives, and pongs later than 2 s are not counted, so a value that never changes
            // means heartbeats were not answered within 2 s.
            "updates": rtts.windows(2).filter(|w| w[0] != w[1]).count(),
            "samples": rtts,
        },
        "client": client,
        "emulator": emulator.json(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    eprintln!(
        "lossy: {transport}: goodput {:.2} Mbit/s; 16 x 2 MiB {} of 16 done in {:.1} s; \
         {} resets, {link_drops} link drops, heartbeat RTT median {:.0} ms max {:.0} ms; path: {}",
        result["goodput_mbit"].as_f64().unwrap_or(0.0),
        completion["done"],
        completion["seconds"].as_f64().unwrap_or(0.0),
        result["resets"],
        result["heartbeat_rtt_ms"]["median"].as_f64().unwrap_or(0.0),
        result["heartbeat_rtt_ms"]["max"].as_f64().unwrap_or(0.0),
        emulator.describe()
    );
    Ok(result)
}

/// The `q` quantile (0 to 1) of `values`, or 0 for none.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn total_mbit(client: &Value) -> f64 {
    client["stream"]["mbit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .sum()
}

fn print_table(results: &[Value], seconds: u64) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    println!();
    println!(
        "{:<14} {:>8} {:>15} {:>16} {:>7} {:>6} {:>8} {:>15} {:>24}",
        "transport",
        "goodput",
        "per stream",
        "16 x 2 MiB",
        "resets",
        "link",
        "no route",
        "heartbeat RTT",
        "path drops",
    );
    println!(
        "{:<14} {:>8} {:>15} {:>16} {:>7} {:>6} {:>8} {:>15} {:>24}",
        "",
        "Mbit/s",
        "min/max Mbit/s",
        "done in",
        "",
        "drops",
        "s",
        "p50/max ms",
        "random/queue of sent",
    );
    for r in results {
        let done = u(&r["completion_done"]);
        let completion = if done == STREAMS as u64 {
            format!("{:.1} s", f(&r["completion_s"]))
        } else {
            format!(">{} s ({done}/16)", COMPLETION_TIMEOUT.as_secs())
        };
        let label = match r["transport"].as_str() {
            Some("tls") => format!("tls (tcp {})", r["tcp_cc"].as_str().unwrap_or("?")),
            other => other.unwrap_or("?").to_string(),
        };
        println!(
            "{:<14} {:>8.2} {:>15} {:>16} {:>7} {:>6} {:>8} {:>15} {:>24}",
            label,
            f(&r["goodput_mbit"]),
            format!(
                "{:.2}/{:.2}",
                f(&r["stream_min_mbit"]),
                f(&r["stream_max_mbit"])
            ),
            completion,
            u(&r["resets"]),
            u(&r["link_drops"]),
            u(&r["routeless_s"]),
            if u(&r["heartbeat_rtt_ms"]["updates"]) < 3 {
                "stuck >2000".to_string()
            } else {
                format!(
                    "{:.0}/{:.0}",
                    f(&r["heartbeat_rtt_ms"]["median"]),
                    f(&r["heartbeat_rtt_ms"]["max"])
                )
            },
            format!(
                "{}/{} of {}",
                u(&r["emulator"]["dropped_loss"]),
                u(&r["emulator"]["dropped_overflow"]),
                u(&r["emulator"]["received"]),
            ),
        );
    }
    let find = |t: &str| results.iter().find(|r| r["transport"] == t);
    if let (Some(q), Some(t)) = (find("quic"), find("tls")) {
        let goodput = f(&q["goodput_mbit"]) / f(&t["goodput_mbit"]).max(1e-9);
        let completion = f(&t["completion_s"]) / f(&q["completion_s"]).max(1e-9);
        let tls_done = u(&t["completion_done"]) == STREAMS as u64;
        println!(
            "QUIC/TLS (tcp {}): goodput x{goodput:.1}; 16 x 2 MiB completes x{completion:.1} \
             faster{}",
            t["tcp_cc"].as_str().unwrap_or("?"),
            if tls_done {
                ""
            } else {
                " (at least: TLS did not finish)"
            }
        );
    }
    println!(
        "(goodput: {STREAMS} streams receiving for {seconds} s, measured by the client; resets: \
         transfers retried and streams reconnected after a reset; no route: seconds (sampled each \
         second) in which the listener had no route; heartbeat RTT: the link's RTT \
         sampled each second, \"stuck\" when it never changed (no pong within 2 s); path drops: \
         packets the emulated path dropped at random and at its bottleneck queue, of those sent \
         into it)"
    );
}

/// `target/`, from this binary's place in `target/release/deps/`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target")))
}

/// Runs the client in `ns` and returns its report; while it runs, `sample` is called about
/// once a second.
fn run_client(
    ns: &Netns,
    exe: &str,
    connect: &str,
    streams: usize,
    size: u64,
    seconds: u64,
    mut sample: impl FnMut(),
) -> Result<Value> {
    let mut child = Proc::spawn(
        &mut ns.command(
            exe,
            &[
                "--lossy-role",
                "client",
                "--connect",
                connect,
                "--streams",
                &streams.to_string(),
                "--size",
                &size.to_string(),
                "--seconds",
                &seconds.to_string(),
            ],
        ),
        "client",
        true,
    )?;
    let deadline = Instant::now() + COMPLETION_TIMEOUT + Duration::from_secs(seconds + 30);
    while child.child.try_wait()?.is_none() && Instant::now() < deadline {
        sample();
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = child.wait_output(deadline.saturating_duration_since(Instant::now()))?;
    serde_json::from_str(out.trim()).with_context(|| format!("client printed {out:?}"))
}

/// `e`, followed by the end of each site's daemon log.
fn with_logs(e: anyhow::Error, sites: &[&Site]) -> anyhow::Error {
    anyhow::anyhow!("{e:#}\n{}", logs(sites))
}

fn logs(sites: &[&Site]) -> String {
    let mut text = String::from("daemon logs:");
    for site in sites {
        let log = std::fs::read_to_string(&site.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        text += &format!("\n--- site {} ---\n", site.name);
        for line in tail.into_iter().rev() {
            text += line;
            text.push('\n');
        }
    }
    text
}

/// Polls `check` every 100 ms until it returns true, for at most `bound`.
fn wait_until(what: &str, bound: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        let last = check();
        if let Ok(true) = last {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {bound:?} waiting for {what} (last: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces, processes and sites, each removed or killed when dropped

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    what: String,
    /// Captured stdout and stderr, read by threads.
    out: Option<(Reader, Reader)>,
}

/// A thread reading a child's output to its end.
type Reader = std::thread::JoinHandle<Vec<u8>>;

impl Proc {
    /// Spawns `cmd`; with `capture`, its stdout and stderr are collected, otherwise stdout is
    /// discarded and stderr inherited.
    fn spawn(cmd: &mut Command, what: &str, capture: bool) -> Result<Proc> {
        cmd.stdin(Stdio::null());
        if capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {what}"))?;
        let out = match (child.stdout.take(), child.stderr.take()) {
            (Some(mut o), Some(mut e)) => Some((
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut o, &mut buf);
                    buf
                }),
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut e, &mut buf);
                    buf
                }),
            )),
            _ => None,
        };
        Ok(Proc {
            child,
            what: what.into(),
            out,
        })
    }

    /// Waits at most `bound` for the process to exit; its stdout if it succeeded.
    fn wait_output(&mut self, bound: Duration) -> Result<String> {
        let deadline = Instant::now() + bound;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not finish within {bound:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = match self.out.take() {
            Some((o, e)) => (o.join().unwrap_or_default(), e.join().unwrap_or_default()),
            None => (Vec::new(), Vec::new()),
        };
        let output = Output {
            status,
            stdout,
            stderr,
        };
        if !output.status.success() {
            bail!(
                "{} failed ({}): {}{}",
                self.what,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One skiff site: its state dir and its daemon, in a namespace.
struct Site<'a> {
    name: String,
    ns: &'a Netns,
    state: PathBuf,
    log: PathBuf,
    _daemon: Proc,
}

impl<'a> Site<'a> {
    fn start(ns: &'a Netns, dir: &Path, name: &str, host: &str, port: u16) -> Result<Site<'a>> {
        let state = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let state_str = state.to_str().context("path")?;
        netns::run(
            &mut ns.command(
                env!("CARGO_BIN_EXE_skiff"),
                &[
                    "--state-dir",
                    state_str,
                    "site",
                    "init",
                    name,
                    "--link-host",
                    host,
                    "--link-port",
                    &port.to_string(),
                ],
            ),
            CLI_TIMEOUT,
        )?;
        let mut cmd = ns.command(
            env!("CARGO_BIN_EXE_skiff"),
            &["--state-dir", state_str, "site", "run"],
        );
        cmd.env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log)?);
        let daemon = Proc::spawn(&mut cmd, &format!("site {name}"), false)?;
        let site = Site {
            name: name.into(),
            ns,
            state,
            log,
            _daemon: daemon,
        };
        wait_until(&format!("site {name} to answer"), CLI_TIMEOUT, || {
            Ok(site.cli(&["status", "-o", "json"]).is_ok())
        })
        .map_err(|e| with_logs(e, &[&site]))?;
        Ok(site)
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let state = self.state.to_str().context("path")?;
        let mut full = vec!["--state-dir", state];
        full.extend_from_slice(args);
        netns::run(
            &mut self.ns.command(env!("CARGO_BIN_EXE_skiff"), &full),
            CLI_TIMEOUT,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The impaired path

/// The path between the namespaces: netem on a veth pair, or the user-space emulator.
enum Wire {
    Netem(Impairment, #[allow(dead_code)] Veth),
    Tun(Emulator),
}

impl Wire {
    fn create(kind: &str, a: &Netns, b: &Netns, pid: u32, imp: Impairment) -> Result<Wire> {
        let (dev_a, dev_b) = (format!("skl-a-{pid}"), format!("skl-b-{pid}"));
        let (addr_a, addr_b) = (format!("{ADDR_A}{PREFIX}"), format!("{ADDR_B}{PREFIX}"));
        let end_a = End {
            ns: a,
            dev: &dev_a,
            addr: &addr_a,
        };
        let end_b = End {
            ns: b,
            dev: &dev_b,
            addr: &addr_b,
        };
        if kind != "tun" {
            let veth = Veth::create(end_a, end_b)?;
            let shaped = netns::netem(a, &dev_a, imp).and_then(|()| netns::netem(b, &dev_b, imp));
            match shaped {
                Ok(()) => return Ok(Wire::Netem(imp, veth)),
                Err(e) if kind == "netem" => return Err(e),
                Err(e) => eprintln!("lossy: netem unavailable ({e:#}); emulating the path"),
            }
            // The TUN devices take the same names.
            drop(veth);
        }
        Ok(Wire::Tun(Emulator::create(end_a, end_b, imp)?))
    }

    fn describe(&self) -> String {
        match self {
            Wire::Netem(imp, _) => format!("veth + tc netem: {}", imp.describe()),
            Wire::Tun(emu) => format!("TUN + user-space emulator: {}", emu.impairment.describe()),
        }
    }

    fn stats(&self) -> Stats {
        match self {
            Wire::Netem(..) => Stats::default(),
            Wire::Tun(emu) => emu.stats(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helper roles, run in a namespace by re-executing this binary

fn run_role(role: &str, args: &[String]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let num = |name: &str| -> Result<u64> {
        arg(args, name)
            .with_context(|| format!("missing {name}"))?
            .parse()
            .with_context(|| format!("bad {name}"))
    };
    match role {
        "sink" => runtime.block_on(sink(num("--port")? as u16)),
        "client" => {
            let connect: SocketAddr = arg(args, "--connect")
                .context("missing --connect")?
                .parse()?;
            let report = runtime.block_on(client(
                connect,
                num("--streams")? as usize,
                num("--size")?,
                Duration::from_secs(num("--seconds")?),
            ))?;
            let mut stdout = std::io::stdout();
            writeln!(stdout, "{report}")?;
            Ok(())
        }
        other => bail!("unknown role {other}"),
    }
}

/// The sink: each connection sends a 9-byte request, `F` + u64 size (send exactly that many
/// bytes, then half-close) or `S` + anything (send until the connection breaks).
async fn sink(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut request = [0u8; 9];
            conn.read_exact(&mut request).await?;
            let size = u64::from_be_bytes(request[1..].try_into().unwrap_or_default());
            let chunk = vec![0x5au8; CHUNK];
            match request[0] {
                b'F' => {
                    let mut left = size;
                    while left > 0 {
                        let n = left.min(CHUNK as u64) as usize;
                        conn.write_all(&chunk[..n]).await?;
                        left -= n as u64;
                    }
                    conn.shutdown().await?;
                    // Wait for the client to close, so that nothing is cut short.
                    let mut rest = [0u8; 64];
                    while conn.read(&mut rest).await? > 0 {}
                }
                _ => loop {
                    conn.write_all(&chunk).await?;
                },
            }
            Ok::<_, std::io::Error>(())
        });
    }
}

/// The client: first `streams` concurrent transfers of `size` bytes (completion time; skipped
/// when `size` is 0), then `streams` connections receiving for `duration` (goodput). Like an
/// application, it retries a transfer that was reset (from the start) and reconnects a stream
/// that was reset, and counts both. Returns a JSON report.
async fn client(
    connect: SocketAddr,
    streams: usize,
    size: u64,
    duration: Duration,
) -> Result<Value> {
    let mut report = json!({});
    if size > 0 {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + COMPLETION_TIMEOUT;
        let progress = counters(streams);
        let retries = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..streams {
            let (progress, retries) = (progress.clone(), retries.clone());
            tasks.spawn(async move {
                loop {
                    progress[i].store(0, Ordering::Relaxed);
                    match transfer(connect, size, &progress[i]).await {
                        Ok(()) => return (i, start.elapsed().as_secs_f64()),
                        Err(_) => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        let mut times = vec![None; streams];
        while let Ok(Some(Ok((i, t)))) = tokio::time::timeout_at(deadline, tasks.join_next()).await
        {
            times[i] = Some(t);
        }
        tasks.abort_all();
        let complete: Vec<f64> = times.iter().flatten().copied().collect();
        let done = complete.len();
        report["completion"] = json!({
            "done": done,
            "seconds": if done == streams {
                complete.iter().copied().fold(0.0, f64::max)
            } else {
                start.elapsed().as_secs_f64()
            },
            "first_s": complete.iter().copied().fold(f64::INFINITY, f64::min),
            "per_stream_s": times,
            "received": snapshot(&progress),
            "retries": retries.load(Ordering::Relaxed),
        });
        if done < streams {
            // Let the link shed what is still queued for the abandoned transfers.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    let progress = counters(streams);
    let resets = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..streams {
        let (progress, resets, errors) = (progress.clone(), resets.clone(), errors.clone());
        tasks.spawn(async move {
            while tokio::time::Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, receive(connect, &progress[i])).await {
                    Err(_) => return,
                    Ok(result) => {
                        resets.fetch_add(1, Ordering::Relaxed);
                        let error = result.err().map(|e| e.to_string()).unwrap_or_default();
                        if let Ok(mut errors) = errors.lock() {
                            *errors.entry(error).or_default() += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    let secs = duration.as_secs_f64();
    let bytes = snapshot(&progress);
    report["stream"] = json!({
        "seconds": secs,
        "bytes": bytes,
        "mbit": bytes.iter().map(|&b| b as f64 * 8.0 / secs / 1e6).collect::<Vec<_>>(),
        "resets": resets.load(Ordering::Relaxed),
        "errors": errors,
    });
    Ok(report)
}

fn counters(n: usize) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

fn snapshot(counters: &[AtomicU64]) -> Vec<u64> {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// One transfer of exactly `size` bytes, counted into `progress`; an error unless all arrived.
async fn transfer(connect: SocketAddr, size: u64, progress: &AtomicU64) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(connect).await?;
    let mut request = vec![b'F'];
    request.extend_from_slice(&size.to_be_bytes());
    conn.write_all(&request).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    if got != size {
        return Err(std::io::Error::other(format!("got {got} of {size} bytes")));
    }
    Ok(())
}

/// Receives an endless stream, counting into `progress`, until the connection fails.
async fn receive(connect: SocketAddr, progress: &AtomicU64) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(connect).await?;
    conn.write_all(&[b'S', 0, 0, 0, 0, 0, 0, 0, 0]).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("stream ended"));
        }
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
}
