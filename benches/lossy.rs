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
//! each namespace's kernel (TCP for TLS links, UDP for QUIC) sees real loss and delay.
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
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
/// Bound on one CLI command, and on a daemon answering after start.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the link coming up and the listener learning its route.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the emulator's queue per direction (memory); packets beyond it are dropped and
/// counted.
const QUEUE_PACKETS: usize = 16_384;

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
    if let Some(reason) = cannot_run() {
        println!("lossy: skipped: {reason}");
        return;
    }
    if let Err(e) = bench() {
        eprintln!("lossy: FAILED: {e:#}");
        std::process::exit(1);
    }
}

/// Why this machine cannot run the bench, if it cannot.
fn cannot_run() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Some("needs root (network namespaces, TUN devices)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("needs the `ip` command (iproute2)".into()),
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

/// The impairment of each direction of the path.
#[derive(Clone, Copy)]
struct Impairment {
    /// One-way delay.
    delay: Duration,
    /// Loss probability in parts per million.
    loss_ppm: u64,
    /// Bottleneck rate in kbit/s, 0 for none.
    rate_kbit: u64,
    /// The bottleneck's buffer, as the longest a packet may wait in it; packets that would wait
    /// longer are dropped (tail drop).
    queue: Duration,
}

impl Impairment {
    const NONE: Impairment = Impairment {
        delay: Duration::ZERO,
        loss_ppm: 0,
        rate_kbit: 0,
        queue: Duration::ZERO,
    };

    fn describe(&self) -> String {
        let rate = match self.rate_kbit {
            0 => "no rate limit".to_string(),
            kbit => format!(
                "{} Mbit/s bottleneck with a {} ms tail-drop queue",
                kbit as f64 / 1000.0,
                self.queue.as_millis()
            ),
        };
        format!(
            "{} ms delay, {}% random loss, {rate}; each direction",
            self.delay.as_millis(),
            self.loss_ppm as f64 / 10_000.0
        )
    }
}

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
    remove_stale_namespaces();

    let ns_a = Netns::create(&format!("skiff-lossy-a-{pid}"))?;
    let ns_b = Netns::create(&format!("skiff-lossy-b-{pid}"))?;
    for ns in [&ns_a, &ns_b] {
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        // Keep the path quiet: no IPv6 autoconfiguration chatter.
        let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    }
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

struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]), CLI_TIMEOUT)?;
        Ok(Netns { name: name.into() })
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    fn run(&self, argv: &[&str]) -> Result<String> {
        run(&mut self.command(argv[0], &argv[1..]), CLI_TIMEOUT)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_namespace_pids(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Kills the processes still in namespace `name` (ours: they were started there by this bench).
fn kill_namespace_pids(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// Removes namespaces left by an earlier run of this bench that was killed (its pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("skiff-lossy-a-")
            .or_else(|| name.strip_prefix("skiff-lossy-b-"))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("lossy: removing stale namespace {name}");
            kill_namespace_pids(name);
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Runs `cmd` to completion within `bound`; its stdout, or an error with its stderr.
fn run(cmd: &mut Command, bound: Duration) -> Result<String> {
    let desc = format!("{cmd:?}");
    let mut child = Proc::spawn(cmd, &desc, true)?;
    child.wait_output(bound)
}

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
        run(
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
        run(
            &mut self.ns.command(env!("CARGO_BIN_EXE_skiff"), &full),
            CLI_TIMEOUT,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The impaired path

/// The path between the namespaces: netem on a veth pair, or the user-space emulator.
enum Wire {
    Netem(Impairment),
    Tun(Emulator),
}

impl Wire {
    fn create(kind: &str, a: &Netns, b: &Netns, pid: u32, imp: Impairment) -> Result<Wire> {
        if kind != "tun" {
            match netem_path(a, b, pid, imp) {
                Ok(()) => return Ok(Wire::Netem(imp)),
                Err(e) if kind == "netem" => return Err(e),
                Err(e) => eprintln!("lossy: netem unavailable ({e:#}); emulating the path"),
            }
        }
        Ok(Wire::Tun(Emulator::create(a, b, pid, imp)?))
    }

    fn describe(&self) -> String {
        match self {
            Wire::Netem(imp) => format!("veth + tc netem: {}", imp.describe()),
            Wire::Tun(emu) => format!("TUN + user-space emulator: {}", emu.impairment.describe()),
        }
    }

    fn stats(&self) -> Stats {
        match self {
            Wire::Netem(_) => Stats::default(),
            Wire::Tun(emu) => emu.stats(),
        }
    }
}

fn netem_path(a: &Netns, b: &Netns, pid: u32, imp: Impairment) -> Result<()> {
    let (va, vb) = (format!("skl-a-{pid}"), format!("skl-b-{pid}"));
    run(
        Command::new("ip").args([
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ]),
        CLI_TIMEOUT,
    )?;
    let delay = format!("{}ms", imp.delay.as_millis());
    let loss = format!("{}%", imp.loss_ppm as f64 / 10_000.0);
    let mut netem = vec!["netem", "delay", &delay, "loss", &loss];
    let rate = format!("{}kbit", imp.rate_kbit);
    // netem's limit counts packets in its delay line too: the queue plus one delay's worth of
    // full-size packets at the rate.
    let limit = if imp.rate_kbit > 0 {
        let packets_per_s = imp.rate_kbit * 1000 / (1500 * 8);
        (packets_per_s * (imp.delay + imp.queue).as_millis() as u64 / 1000).max(100)
    } else {
        100_000
    }
    .to_string();
    if imp.rate_kbit > 0 {
        netem.extend(["rate", &rate]);
    }
    netem.extend(["limit", &limit]);
    for (ns, dev, addr) in [(a, &va, ADDR_A), (b, &vb, ADDR_B)] {
        let mut tc = vec!["tc", "qdisc", "add", "dev", dev, "root"];
        tc.extend(&netem);
        let configured = ns
            .run(&tc)
            .and_then(|_| ns.run(&["ip", "addr", "add", &format!("{addr}/30"), "dev", dev]))
            .and_then(|_| ns.run(&["ip", "link", "set", dev, "up"]));
        if let Err(e) = configured {
            let _ = a.run(&["ip", "link", "del", &va]);
            return Err(e);
        }
    }
    Ok(())
}

/// Forwards IP packets between two TUN devices (one in each namespace). Each direction, like
/// netem: a packet is dropped at random with the loss probability (a seeded xorshift, so runs
/// are repeatable); otherwise it queues for the bottleneck (when there is a rate), is dropped
/// when it would wait there longer than the queue allows, and leaves once serialised at the rate
/// plus the one-way delay. The queue is also bounded by [`QUEUE_PACKETS`]; every drop is
/// counted. The devices disappear when the emulator (its runtime and file descriptors) drops.
struct Emulator {
    runtime: Option<tokio::runtime::Runtime>,
    impairment: Impairment,
    knobs: Arc<Knobs>,
    counters: [Arc<Counters>; 2],
    names: [(String, String); 2],
}

/// The impairment in force, changeable while packets flow.
#[derive(Default)]
struct Knobs {
    delay_us: AtomicU64,
    loss_ppm: AtomicU64,
    rate_kbit: AtomicU64,
    queue_us: AtomicU64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_overflow: AtomicU64,
    max_udp: AtomicU64,
}

/// Emulator counters, both directions summed, plus what the kernel dropped at the TUN queues.
#[derive(Default, Clone, Debug)]
struct Stats {
    received: u64,
    forwarded: u64,
    bytes: u64,
    dropped_loss: u64,
    dropped_overflow: u64,
    max_udp: u64,
    tun_tx_dropped: u64,
}

impl Stats {
    fn since(&self, before: &Stats) -> Stats {
        Stats {
            received: self.received - before.received,
            forwarded: self.forwarded - before.forwarded,
            bytes: self.bytes - before.bytes,
            dropped_loss: self.dropped_loss - before.dropped_loss,
            dropped_overflow: self.dropped_overflow - before.dropped_overflow,
            max_udp: self.max_udp,
            tun_tx_dropped: self.tun_tx_dropped - before.tun_tx_dropped,
        }
    }

    fn json(&self) -> Value {
        json!({
            "received": self.received,
            "forwarded": self.forwarded,
            "bytes": self.bytes,
            "dropped_loss": self.dropped_loss,
            "dropped_overflow": self.dropped_overflow,
            "max_udp_packet": self.max_udp,
            "tun_tx_dropped": self.tun_tx_dropped,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} packets, {} forwarded, {} dropped at random, {} at the bottleneck queue, {} at \
             the TUN queues, largest UDP packet {} bytes",
            self.received,
            self.forwarded,
            self.dropped_loss,
            self.dropped_overflow,
            self.tun_tx_dropped,
            self.max_udp
        )
    }
}

impl Emulator {
    fn create(a: &Netns, b: &Netns, pid: u32, imp: Impairment) -> Result<Emulator> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let names = [
            (format!("skl-a-{pid}"), a.name.clone()),
            (format!("skl-b-{pid}"), b.name.clone()),
        ];
        let mut devices = Vec::new();
        {
            let _enter = runtime.enter();
            for (((dev, _), ns), addr) in names.iter().zip([a, b]).zip([ADDR_A, ADDR_B]) {
                let device = tun_rs::DeviceBuilder::new()
                    .name(dev)
                    .mtu(1500)
                    // Room for bursts while the emulator is descheduled (the default is 500).
                    .tx_queue_len(10_000)
                    .build_async()
                    .with_context(|| format!("cannot create TUN device {dev}"))?;
                run(
                    Command::new("ip").args(["link", "set", dev, "netns", &ns.name]),
                    CLI_TIMEOUT,
                )?;
                ns.run(&["ip", "addr", "add", &format!("{addr}/30"), "dev", dev])?;
                ns.run(&["ip", "link", "set", dev, "up"])?;
                devices.push(Arc::new(device));
            }
        }
        let knobs = Arc::new(Knobs::default());
        let counters = [Arc::new(Counters::default()), Arc::new(Counters::default())];
        for (dir, (from, to)) in [(0, 1), (1, 0)].into_iter().enumerate() {
            runtime.spawn(pump(
                devices[from].clone(),
                devices[to].clone(),
                knobs.clone(),
                counters[dir].clone(),
                0x5eed_0000_0000_0001 + dir as u64,
            ));
        }
        let emulator = Emulator {
            runtime: Some(runtime),
            impairment: imp,
            knobs,
            counters,
            names,
        };
        emulator.set(imp);
        Ok(emulator)
    }

    fn set(&self, imp: Impairment) {
        let k = &self.knobs;
        k.delay_us
            .store(imp.delay.as_micros() as u64, Ordering::Relaxed);
        k.loss_ppm.store(imp.loss_ppm, Ordering::Relaxed);
        k.rate_kbit.store(imp.rate_kbit, Ordering::Relaxed);
        k.queue_us
            .store(imp.queue.as_micros() as u64, Ordering::Relaxed);
    }

    /// Forgets the largest packet seen so far.
    fn reset_max(&self) {
        for c in &self.counters {
            c.max_udp.store(0, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for c in &self.counters {
            s.received += c.received.load(Ordering::Relaxed);
            s.forwarded += c.forwarded.load(Ordering::Relaxed);
            s.bytes += c.bytes.load(Ordering::Relaxed);
            s.dropped_loss += c.dropped_loss.load(Ordering::Relaxed);
            s.dropped_overflow += c.dropped_overflow.load(Ordering::Relaxed);
            s.max_udp = s.max_udp.max(c.max_udp.load(Ordering::Relaxed));
        }
        for (dev, ns) in &self.names {
            s.tun_tx_dropped += tun_tx_dropped(ns, dev).unwrap_or(0);
        }
        s
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Packets the kernel dropped because the emulator did not read the TUN device fast enough.
fn tun_tx_dropped(ns: &str, dev: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "-s", "link", "show", "dev", dev])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["stats64"]["tx"]["dropped"].as_u64()
}

/// xorshift64*: a small, seeded generator, enough to drop packets at random.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One direction: reads packets from `from`, drops some, delays the rest, writes them to `to`.
async fn pump(
    from: Arc<tun_rs::AsyncDevice>,
    to: Arc<tun_rs::AsyncDevice>,
    knobs: Arc<Knobs>,
    counters: Arc<Counters>,
    seed: u64,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(QUEUE_PACKETS);
    // The writer is a thread, not a task: std::thread::sleep wakes within tens of microseconds
    // (tokio's timer has 1 ms granularity), so packets leave spaced as the bottleneck spaces
    // them instead of in 1 ms bursts, as netem's high-resolution timers would.
    let writer = {
        let counters = counters.clone();
        std::thread::spawn(move || {
            while let Some((due, packet)) = rx.blocking_recv() {
                let wait = due.into_std().saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                loop {
                    match to.try_send(&packet) {
                        Ok(_) => {
                            counters.forwarded.fetch_add(1, Ordering::Relaxed);
                            counters
                                .bytes
                                .fetch_add(packet.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_micros(20));
                            continue;
                        }
                        Err(_) => {}
                    }
                    break;
                }
            }
        })
    };
    let reader = async move {
        let mut rng = XorShift(seed);
        let mut buf = vec![0u8; 65_536];
        // When the bottleneck has sent everything queued so far.
        let mut idle_at = tokio::time::Instant::now();
        loop {
            let Ok(n) = from.recv(&mut buf).await else {
                return;
            };
            counters.received.fetch_add(1, Ordering::Relaxed);
            if buf.get(9) == Some(&17) {
                counters.max_udp.fetch_max(n as u64, Ordering::Relaxed);
            }
            if rng.next() % 1_000_000 < knobs.loss_ppm.load(Ordering::Relaxed) {
                counters.dropped_loss.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = tokio::time::Instant::now();
            let mut sent_at = now;
            // Nanoseconds the packet takes to cross the bottleneck (none without a rate).
            let serialise =
                (n as u64 * 8_000_000).checked_div(knobs.rate_kbit.load(Ordering::Relaxed));
            if let Some(ns) = serialise {
                let start = idle_at.max(now);
                if start - now > Duration::from_micros(knobs.queue_us.load(Ordering::Relaxed)) {
                    counters.dropped_overflow.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                idle_at = start + Duration::from_nanos(ns);
                sent_at = idle_at;
            }
            let due = sent_at + Duration::from_micros(knobs.delay_us.load(Ordering::Relaxed));
            if tx.try_send((due, buf[..n].to_vec())).is_err() {
                counters.dropped_overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    reader.await;
    drop(writer); // it ends once the reader (and with it the channel's sender) is gone
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
