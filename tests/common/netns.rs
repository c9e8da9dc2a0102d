//! Hosts as Linux network namespaces, and impaired paths between them: shared by the fault
//! suite (`tests/faults.rs`) and the lossy-link benchmark (`benches/lossy.rs`), which include
//! this file with `#[path]`.
//!
//! - [`Netns`]: a namespace, removed (with every process still in it) when dropped;
//! - [`Veth`]: a veth pair joining two namespaces, each end with an address;
//! - [`netem`]: `tc netem` on a device, where the kernel has `sch_netem`;
//! - [`Emulator`]: where it has not (many CI and VM kernels lack `sch_netem`), two TUN devices,
//!   one in each namespace, between which this process forwards IP packets in user space,
//!   delaying, dropping and rate-limiting them as netem would. Its impairment can change while
//!   packets flow.
//!
//! Everything here needs root (`CAP_NET_ADMIN`); [`cannot_run`] says why a machine cannot.

#![allow(dead_code)] // Each user needs a different subset.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Bound on one `ip`, `tc` or `sysctl` command.
pub const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the emulator's queue per direction (memory); packets beyond it are dropped and
/// counted.
pub const QUEUE_PACKETS: usize = 16_384;

/// Why this machine cannot build namespaces, if it cannot: not root, or no `ip` command.
pub fn cannot_run() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, veth and TUN devices)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("needs the `ip` command (iproute2)".into()),
    }
}

/// True if this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Runs `cmd` to completion within `bound`; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command, bound: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot spawn {what}"))?;
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A network namespace. Dropping it kills the processes still in it (ours: they were started
/// there by the test) and deletes it, with its devices.
pub struct Netns {
    /// The namespace's name (`ip netns list`).
    pub name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up and IPv6 off (no autoconfiguration
    /// chatter on the paths).
    pub fn create(name: &str) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT)?;
        let ns = Netns { name: name.into() };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        Ok(ns)
    }

    /// A command that runs `program args` in this namespace. `ip netns exec` replaces itself
    /// with the program, so the child's pid is the program's.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Runs `argv` in this namespace to completion (bounded); its stdout.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        run(&mut self.command(argv[0], &argv[1..]), IP_TIMEOUT)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_namespace_pids(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Kills the processes still in namespace `name`.
fn kill_namespace_pids(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// Removes namespaces named `PREFIX…-PID` left by an earlier run that was killed before its
/// guards ran (its pid is gone).
pub fn remove_stale(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        let Some((_, pid)) = name.rsplit_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale namespace {name}");
            kill_namespace_pids(name);
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// One end of a path between two namespaces: the namespace, a device name and an address with
/// its prefix length (`192.0.2.1/30`).
#[derive(Clone, Copy)]
pub struct End<'a> {
    /// The namespace this end is in.
    pub ns: &'a Netns,
    /// The device's name (at most 15 bytes).
    pub dev: &'a str,
    /// The address, with its prefix length.
    pub addr: &'a str,
}

/// A veth pair joining two namespaces, deleted when dropped (or with either namespace).
pub struct Veth {
    /// Namespace and device of each end (an empty namespace name: this process's).
    pub ends: [(String, String); 2],
}

impl Veth {
    /// Creates the pair, addresses both ends and brings them up.
    pub fn create(a: End<'_>, b: End<'_>) -> Result<Veth> {
        run(
            Command::new("ip").args([
                "link", "add", a.dev, "netns", &a.ns.name, "type", "veth", "peer", "name", b.dev,
                "netns", &b.ns.name,
            ]),
            IP_TIMEOUT,
        )?;
        for end in [a, b] {
            end.ns
                .run(&["ip", "addr", "add", end.addr, "dev", end.dev])?;
            end.ns.run(&["ip", "link", "set", end.dev, "up"])?;
        }
        Ok(Veth {
            ends: [
                (a.ns.name.clone(), a.dev.into()),
                (b.ns.name.clone(), b.dev.into()),
            ],
        })
    }

    /// Creates a pair between this process's namespace (device `host_dev` with `host_addr`)
    /// and `end`, addresses both ends and brings them up: how a test reaches a namespace.
    pub fn to_host(host_dev: &str, host_addr: &str, end: End<'_>) -> Result<Veth> {
        run(
            Command::new("ip").args([
                "link",
                "add",
                host_dev,
                "type",
                "veth",
                "peer",
                "name",
                end.dev,
                "netns",
                &end.ns.name,
            ]),
            IP_TIMEOUT,
        )?;
        let veth = Veth {
            ends: [
                (end.ns.name.clone(), end.dev.into()),
                (String::new(), host_dev.into()),
            ],
        };
        run(
            Command::new("ip").args(["addr", "add", host_addr, "dev", host_dev]),
            IP_TIMEOUT,
        )?;
        run(
            Command::new("ip").args(["link", "set", host_dev, "up"]),
            IP_TIMEOUT,
        )?;
        end.ns
            .run(&["ip", "addr", "add", end.addr, "dev", end.dev])?;
        end.ns.run(&["ip", "link", "set", end.dev, "up"])?;
        Ok(veth)
    }

    /// Sets end `i` (0 or 1) administratively up or down (`ip link set DEV up|down`).
    pub fn set_up(&self, i: usize, up: bool) -> Result<()> {
        let (ns, dev) = &self.ends[i];
        let state = if up { "up" } else { "down" };
        let mut cmd = Command::new("ip");
        if !ns.is_empty() {
            cmd.args(["-n", ns]);
        }
        run(cmd.args(["link", "set", dev, state]), IP_TIMEOUT).map(|_| ())
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let (ns, dev) = &self.ends[0];
        let _ = Command::new("ip")
            .args(["-n", ns, "link", "del", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The impairment of each direction of a path.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Loss probability in parts per million.
    pub loss_ppm: u64,
    /// Bottleneck rate in kbit/s, 0 for none.
    pub rate_kbit: u64,
    /// The bottleneck's buffer, as the longest a packet may wait in it; packets that would wait
    /// longer are dropped (tail drop).
    pub queue: Duration,
}

impl Impairment {
    /// A perfect path.
    pub const NONE: Impairment = Impairment {
        delay: Duration::ZERO,
        loss_ppm: 0,
        rate_kbit: 0,
        queue: Duration::ZERO,
    };

    /// `delay` and `loss_percent` random loss, no bottleneck.
    pub fn lossy(delay: Duration, loss_percent: f64) -> Impairment {
        Impairment {
            delay,
            loss_ppm: (loss_percent * 10_000.0).round() as u64,
            ..Impairment::NONE
        }
    }

    /// For people: "200 ms delay, 30% random loss, no rate limit; each direction".
    pub fn describe(&self) -> String {
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

/// Puts `tc netem` with `imp` on device `dev` in `ns` (the egress of that end), replacing any
/// root qdisc there. Fails where the kernel has no `sch_netem`.
pub fn netem(ns: &Netns, dev: &str, imp: Impairment) -> Result<()> {
    let delay = format!("{}ms", imp.delay.as_millis());
    let loss = format!("{}%", imp.loss_ppm as f64 / 10_000.0);
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
    let mut argv = vec![
        "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", &delay, "loss", &loss,
    ];
    if imp.rate_kbit > 0 {
        argv.extend(["rate", &rate]);
    }
    argv.extend(["limit", &limit]);
    ns.run(&argv).map(|_| ())
}

/// Removes the root qdisc (netem) from `dev` in `ns`.
pub fn netem_clear(ns: &Netns, dev: &str) -> Result<()> {
    ns.run(&["tc", "qdisc", "del", "dev", dev, "root"])
        .map(|_| ())
}

/// Forwards IP packets between two TUN devices (one in each namespace). Each direction, like
/// netem: a packet is dropped at random with the loss probability (a seeded xorshift, so runs
/// are repeatable); otherwise it queues for the bottleneck (when there is a rate), is dropped
/// when it would wait there longer than the queue allows, and leaves once serialised at the rate
/// plus the one-way delay. The queue is also bounded by [`QUEUE_PACKETS`]; every drop is
/// counted. The devices disappear when the emulator (its runtime and file descriptors) drops.
pub struct Emulator {
    runtime: Option<tokio::runtime::Runtime>,
    /// The impairment it was created with.
    pub impairment: Impairment,
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
pub struct Stats {
    /// Packets read from either device.
    pub received: u64,
    /// Packets written to the other device.
    pub forwarded: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Packets dropped at random (the loss probability).
    pub dropped_loss: u64,
    /// Packets dropped at the bottleneck queue or the emulator's own bound.
    pub dropped_overflow: u64,
    /// The largest UDP packet seen.
    pub max_udp: u64,
    /// Packets the kernel dropped because the emulator did not read a device fast enough.
    pub tun_tx_dropped: u64,
}

impl Stats {
    /// The counts since `before` (the largest packet is not a count and is kept).
    pub fn since(&self, before: &Stats) -> Stats {
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

    /// The counters as JSON.
    pub fn json(&self) -> Value {
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

    /// The counters for people.
    pub fn describe(&self) -> String {
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
    /// Creates a TUN device at each end (named and addressed as the ends say), moves each into
    /// its namespace, and starts forwarding between them with `imp`.
    pub fn create(a: End<'_>, b: End<'_>, imp: Impairment) -> Result<Emulator> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("path-emulator")
            .enable_all()
            .build()?;
        let names = [
            (a.dev.to_string(), a.ns.name.clone()),
            (b.dev.to_string(), b.ns.name.clone()),
        ];
        let mut devices = Vec::new();
        {
            let _enter = runtime.enter();
            for end in [a, b] {
                let device = tun_rs::DeviceBuilder::new()
                    .name(end.dev)
                    .mtu(1500)
                    // Room for bursts while the emulator is descheduled (the default is 500).
                    .tx_queue_len(10_000)
                    .build_async()
                    .with_context(|| format!("cannot create TUN device {}", end.dev))?;
                run(
                    Command::new("ip").args(["link", "set", end.dev, "netns", &end.ns.name]),
                    IP_TIMEOUT,
                )?;
                end.ns
                    .run(&["ip", "addr", "add", end.addr, "dev", end.dev])?;
                end.ns.run(&["ip", "link", "set", end.dev, "up"])?;
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

    /// Changes the impairment; packets already queued keep the one they got.
    pub fn set(&self, imp: Impairment) {
        let k = &self.knobs;
        k.delay_us
            .store(imp.delay.as_micros() as u64, Ordering::Relaxed);
        k.loss_ppm.store(imp.loss_ppm, Ordering::Relaxed);
        k.rate_kbit.store(imp.rate_kbit, Ordering::Relaxed);
        k.queue_us
            .store(imp.queue.as_micros() as u64, Ordering::Relaxed);
    }

    /// Forgets the largest packet seen so far.
    pub fn reset_max(&self) {
        for c in &self.counters {
            c.max_udp.store(0, Ordering::Relaxed);
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
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
