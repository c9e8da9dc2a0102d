//! The fault suite: four hosts, each a network namespace with one real `skiff site run`,
//! carry checked traffic (`common/checked.rs`) while faults are injected one after another.
//! Every carried connection must end complete and byte-identical or visibly reset — never
//! corrupted, never silently truncated, never hung — and after each fault the network must
//! converge (every link up on both sides, every site reachable from every site, the listener
//! served by both serving sites) within 5 s.
//!
//! ```text
//!          this process: the clients, and two backends (answering with tags b and c)
//!            |  access veth             |  access veth               |  access veth
//!      [ns a: site a] ------ veth ----- [ns b: site b]               |
//!       listener svc    (link, a dials)  connector svc               |
//!            \                                                       |
//!             \--- emulated path or veth + netem --- [ns c: site c] -'
//!                       (link, a dials)               connector svc, state dir on a 1 MiB tmpfs
//!                                                          |
//!                                              veth (link, c dials, made in the disk phase)
//!                                                          |
//!                                                     [ns d: site d]
//! ```
//!
//! It runs twice, with fresh namespaces and sites: first a–b and c–d over TLS and a–c over
//! QUIC, then the other way round, so that every fault hits both transports.
//!
//! (A tree: skiff refuses to redeem a token for a site id that is already alive in the
//! network, so two sites of one network cannot be linked directly, and a redundant path
//! cannot be built; see docs/reliability.md.)
//!
//! The faults, in order, with traffic flowing throughout:
//!
//! 1. **disk**: c's state dir is filled; `token issue` and `link create` (to d) on c, and a
//!    redemption of c's token by d, fail with a clear "no space left … free space in DIR" and
//!    change nothing; c keeps running and carrying; once space is freed, the same token and the
//!    same commands succeed (the c–d link is made here);
//! 2. **cut**: the a–b veth is set down for 8 s (everything goes to c meanwhile), then up;
//! 3. **loss**: 30 % loss and 200 ms delay each way on the a–c path for 6 s, with `tc netem`
//!    where the kernel has it, else the TUN path emulator (`common/netns.rs`);
//! 4. **kill**: site b is killed (SIGKILL) and restarted a second later;
//! 5. **drain**: site c gets SIGTERM: connections it carries finish, new ones go to b, it
//!    exits, and is started again.
//!
//! A dead process cannot reset its connections: its kernel closes them, with a FIN where no
//! data was unread. The declared lengths make those truncations visible (they count as resets),
//! and the suite checks they happen in the kill phase only: a live router always resets.
//!
//! It prints a summary (faults injected; connections carried, completed, reset, corrupted;
//! convergence times) to stderr, and writes it to `target/faults-summary.txt`. It needs root
//! (it skips, passing, otherwise) and creates and removes namespaces `skfR-{a,b,c,d}-PID` (R
//! the round), their devices, and the tmpfs mount, also when it fails; it keeps the daemon logs
//! in `target/faults-logs/`. `SKIFF_FAULTS_LOG=FILTER` sets the daemons' log filter. It takes
//! about a minute.

#[path = "common/checked.rs"]
mod checked;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checked::{exchange, Outcome, Request, ServerStats, Tally, Verdict};
use common::{report, wait_for, Host, Site};
use netns::{Emulator, End, Impairment, Netns, Veth};
use serde_json::Value;
use tokio::runtime::Runtime;

/// After a fault ends, the network must have converged within this.
const CONVERGE: Duration = Duration::from_secs(5);
/// How long the suite keeps polling for convergence (to report how late it was).
const CONVERGE_POLL: Duration = Duration::from_secs(30);
/// Bound on setup steps (links, routes).
const SETUP: Duration = Duration::from_secs(30);
/// The listener's port in namespace a.
const LISTEN_PORT: u16 = 9000;
/// Concurrent client loops.
const WORKERS: u64 = 16;
/// A checked connection that has neither finished nor failed after this is hung.
const DEADLINE: Duration = Duration::from_secs(30);
/// The phases, in order; each connection belongs to the one in which it ended.
const PHASES: [&str; 7] = ["setup", "disk", "cut", "loss", "kill", "drain", "after"];
/// The phase in which a dead process's kernel may close connections with a FIN.
const KILL: usize = 4;

#[test]
fn faults() {
    if let Some(reason) = netns::cannot_run() {
        eprintln!("faults: skipped: {reason}");
        return;
    }
    let started = Instant::now();
    netns::remove_stale("skf");
    // Two rounds with the transports swapped, so that each fault hits each transport: a cut
    // TLS link dies with its TCP connection's errors or its silence, a cut QUIC link only by
    // silence; 30 % loss is a different thing for TCP and for QUIC.
    let mut summary = String::new();
    let mut total = Tally::default();
    let mut injected = 0;
    for (round, ab, ac) in [(1, "tls", "quic"), (2, "quic", "tls")] {
        let (text, tally, faults) = run_round(round, ab, ac);
        summary += &text;
        total.merge(&tally);
        injected += faults;
    }
    let line = format!(
        "fault suite: {injected} faults injected; {} connections carried: {} completed, {} \
         reset, {} corrupted, {} hung; {:.0} s in all\n",
        total.carried,
        total.completed,
        total.reset,
        total.corrupted,
        total.hung,
        started.elapsed().as_secs_f64()
    );
    eprintln!("{line}");
    let _ = std::fs::write(target_dir().join("faults-summary.txt"), line + &summary);
}

/// One round: a fresh network with `ab` and `ac` as the transports of the a–b and a–c links,
/// every fault in turn, the summary printed, then every check. Returns the summary, the
/// tally and the number of faults.
fn run_round(round: u32, ab: &str, ac: &str) -> (String, Tally, usize) {
    let started = Instant::now();
    let world = World::build(round, std::process::id());
    let traffic = Traffic::start(world.listener());
    let mut sites = Sites::start(&world, &traffic, ab, ac);
    traffic.begin();
    std::thread::sleep(Duration::from_secs(1));
    let mut faults = Vec::new();

    traffic.set_phase(1);
    faults.push(disk(&mut sites, ab));
    traffic.set_phase(2);
    faults.push(cut(&world, &sites));
    traffic.set_phase(3);
    faults.push(loss(&world, &sites));
    traffic.set_phase(4);
    faults.push(kill(&mut sites));
    traffic.set_phase(5);
    faults.push(drain(&mut sites, &traffic));
    traffic.set_phase(6);
    std::thread::sleep(Duration::from_secs(1));

    let records = traffic.stop();
    let transports = format!("round {round}: links a->b {ab}, a->c {ac}, c->d {ab}");
    let summary = summarise(
        &transports,
        &faults,
        &records,
        &traffic.server,
        &world,
        started,
    );
    eprintln!("{summary}");
    check(&faults, &records, &traffic.server, &sites);
    let mut tally = Tally::default();
    for t in tallies(&records).values() {
        tally.merge(t);
    }
    (summary, tally, faults.len())
}

// ---------------------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------------------

/// The a–c path: a veth pair with netem put on and taken off, or the TUN emulator.
enum AcPath {
    Netem(Veth),
    Tun(Emulator),
}

/// Namespaces and paths. Dropped last: its namespaces take every process and device with them.
struct World {
    round: u32,
    ns: [Netns; 4],
    /// This process to each namespace: (host-side address, namespace-side address).
    access: Vec<(Veth, String, String)>,
    ab: Veth,
    /// Kept so the c–d path lives as long as the world.
    _cd: Veth,
    ac: AcPath,
}

/// Addresses on the paths between namespaces (inside them only, so fixed).
const AB: [&str; 2] = ["10.1.0.1", "10.1.0.2"];
const AC: [&str; 2] = ["10.2.0.1", "10.2.0.2"];
const CD: [&str; 2] = ["10.3.0.1", "10.3.0.2"];

impl World {
    fn build(round: u32, pid: u32) -> World {
        let ns = ["a", "b", "c", "d"].map(|n| {
            Netns::create(&format!("skf{round}-{n}-{pid}")).expect("cannot create a namespace")
        });
        // The access paths' addresses live in this process's namespace too, so they must not
        // collide with another run's: a /30 per namespace picked by pid and round in
        // 198.18.0.0/15.
        let slot = (pid % 5000) * 6 + (round % 2) * 3;
        let mut access = Vec::new();
        for (i, n) in ns.iter().take(3).enumerate() {
            let base = (198u32 << 24) | (18 << 16);
            let net = base + (slot + i as u32) * 4;
            let (host, inside) = (ipv4(net + 1), ipv4(net + 2));
            let veth = Veth::to_host(
                &format!("skx{round}{i}-{pid}"),
                &format!("{host}/30"),
                End {
                    ns: n,
                    dev: "acc",
                    addr: &format!("{inside}/30"),
                },
            )
            .expect("cannot create an access veth");
            access.push((veth, host, inside));
        }
        let path = |x: usize, y: usize, dev: [&str; 2], addr: [&str; 2]| {
            Veth::create(
                End {
                    ns: &ns[x],
                    dev: dev[0],
                    addr: &format!("{}/30", addr[0]),
                },
                End {
                    ns: &ns[y],
                    dev: dev[1],
                    addr: &format!("{}/30", addr[1]),
                },
            )
            .expect("cannot create a veth pair")
        };
        let ab = path(0, 1, ["to-b", "to-a"], AB);
        let cd = path(2, 3, ["to-d", "to-c"], CD);
        let ac = if netem_works(&ns[0]) {
            AcPath::Netem(path(0, 2, ["to-c", "to-a"], AC))
        } else {
            let (dev_a, dev_c) = (format!("ska{round}-{pid}"), format!("skc{round}-{pid}"));
            let (addr_a, addr_c) = (format!("{}/30", AC[0]), format!("{}/30", AC[1]));
            AcPath::Tun(
                Emulator::create(
                    End {
                        ns: &ns[0],
                        dev: &dev_a,
                        addr: &addr_a,
                    },
                    End {
                        ns: &ns[2],
                        dev: &dev_c,
                        addr: &addr_c,
                    },
                    Impairment::NONE,
                )
                .expect("cannot create the emulated a-c path"),
            )
        };
        eprintln!(
            "faults: namespaces {}, {}, {}, {}; a-c path: {}",
            ns[0].name,
            ns[1].name,
            ns[2].name,
            ns[3].name,
            match ac {
                AcPath::Netem(_) => "veth with tc netem",
                AcPath::Tun(_) => "TUN path emulator (this kernel has no sch_netem)",
            }
        );
        World {
            round,
            ns,
            access,
            ab,
            _cd: cd,
            ac,
        }
    }

    /// Where clients reach a's listener.
    fn listener(&self) -> SocketAddr {
        SocketAddr::new(self.access[0].2.parse().unwrap(), LISTEN_PORT)
    }

    /// Puts `imp` on the a–c path (both directions); `None` takes it off.
    fn impair_ac(&self, imp: Option<Impairment>) {
        match (&self.ac, imp) {
            (AcPath::Tun(emu), imp) => emu.set(imp.unwrap_or(Impairment::NONE)),
            (AcPath::Netem(veth), Some(imp)) => {
                netns::netem(&self.ns[0], &veth.ends[0].1, imp).unwrap();
                netns::netem(&self.ns[2], &veth.ends[1].1, imp).unwrap();
            }
            (AcPath::Netem(veth), None) => {
                netns::netem_clear(&self.ns[0], &veth.ends[0].1).unwrap();
                netns::netem_clear(&self.ns[2], &veth.ends[1].1).unwrap();
            }
        }
    }

    fn impairment_kind(&self) -> &'static str {
        match self.ac {
            AcPath::Netem(_) => "tc netem",
            AcPath::Tun(_) => "the TUN path emulator (no sch_netem here)",
        }
    }
}

/// Whether `tc netem` works here (tried on a dummy device in `ns`).
fn netem_works(ns: &Netns) -> bool {
    let works = ns
        .run(&["ip", "link", "add", "probe0", "type", "dummy"])
        .and_then(|_| {
            netns::netem(
                ns,
                "probe0",
                Impairment::lossy(Duration::from_millis(1), 0.0),
            )
        })
        .is_ok();
    let _ = ns.run(&["ip", "link", "del", "probe0"]);
    works
}

fn ipv4(n: u32) -> String {
    std::net::Ipv4Addr::from(n).to_string()
}

// ---------------------------------------------------------------------------------------------
// The sites
// ---------------------------------------------------------------------------------------------

struct Sites {
    a: Site,
    b: Site,
    c: Site,
    /// Not linked until the disk phase.
    d: Site,
    /// Links made so far, (dialer, acceptor) by name.
    links: Vec<(&'static str, &'static str)>,
    /// The sites in the network.
    members: Vec<&'static str>,
    /// Which round they belong to (to name their kept logs).
    round: u32,
}

impl Sites {
    fn start(world: &World, traffic: &Traffic, ab: &str, ac: &str) -> Sites {
        let host = |i: usize, hosts: &[&str], tmpfs: Option<&str>| -> Site {
            let name = ["a", "b", "c", "d"][i];
            let mut site = Site::init_on(
                name,
                &Host {
                    netns: &world.ns[i].name,
                    link_hosts: hosts,
                    state_tmpfs: tmpfs,
                },
                &[],
            );
            if let Ok(filter) = std::env::var("SKIFF_FAULTS_LOG") {
                site.run_args = vec!["--log".into(), filter];
            }
            site.run();
            site
        };
        let a = host(0, &[AB[0], AC[0]], None);
        let b = host(1, &[AB[1]], None);
        let c = host(2, &[AC[1], CD[0]], Some("1m"));
        let d = host(3, &[CD[1]], None);
        let mut sites = Sites {
            a,
            b,
            c,
            d,
            links: Vec::new(),
            members: vec!["a", "b", "c"],
            round: world.round,
        };
        sites.link("a", "b", ab);
        sites.link("a", "c", ac);
        for (site, i, tag) in [(&sites.b, 1, b'b'), (&sites.c, 2, b'c')] {
            let backend = traffic.backend(tag);
            site.ok(&[
                "connector",
                "create",
                "svc",
                "--host",
                &world.access[i].1,
                "--port",
                &backend.to_string(),
            ]);
        }
        sites.a.ok(&[
            "listener",
            "create",
            "svc",
            "--bind",
            "0.0.0.0",
            "--port",
            &LISTEN_PORT.to_string(),
        ]);
        let since = Instant::now();
        let took = sites.converge("setup", since);
        eprintln!("faults: network up (converged {took:.1?} after the listener was made)");
        sites
    }

    fn get(&self, name: &str) -> &Site {
        match name {
            "a" => &self.a,
            "b" => &self.b,
            "c" => &self.c,
            _ => &self.d,
        }
    }

    fn all(&self) -> [&Site; 4] {
        [&self.a, &self.b, &self.c, &self.d]
    }

    /// `dialer` redeems a fresh token of `acceptor` over `transport`; waits for the link.
    fn link(&mut self, dialer: &'static str, acceptor: &'static str, transport: &str) {
        let (d, a) = (self.get(dialer), self.get(acceptor));
        let token = a.issue(&format!("{acceptor}-for-{dialer}.yaml"), &[]);
        let out = create_link(d, &token, transport);
        assert!(
            out.status.success(),
            "{dialer} link create {acceptor}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            report(&self.all())
        );
        self.links.push((dialer, acceptor));
    }

    /// Whether the network has converged; `Err` says what is not there yet.
    fn converged(&self) -> Result<(), String> {
        for (dialer, acceptor) in &self.links {
            self.get(dialer).link_up(acceptor, "outgoing")?;
            self.get(acceptor).link_up(dialer, "incoming")?;
        }
        let n = self.members.len();
        for site in self.members.iter().map(|m| self.get(m)) {
            let out = site.cli(&["network", "status", "-o", "json"]);
            if !out.status.success() {
                return Err(format!(
                    "{}: network status: {}",
                    site.name,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let net: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let sites = net["sites"].as_array().cloned().unwrap_or_default();
            let reachable = sites.iter().filter(|s| s["reachable"] == true).count();
            if reachable != n {
                return Err(format!("{}: {reachable} of {n} sites reachable", site.name));
            }
        }
        let targets = self.a.targets("svc")?;
        if targets != ["b", "c"] {
            return Err(format!("a's listener is served by {targets:?}"));
        }
        Ok(())
    }

    /// Waits for convergence (bounded by [`CONVERGE_POLL`]); returns how long it took since
    /// `since`, the end of the fault.
    fn converge(&self, what: &str, since: Instant) -> Duration {
        wait_for(
            &format!("the network to converge after {what}"),
            CONVERGE_POLL,
            &self.all(),
            || self.converged(),
        );
        since.elapsed()
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        // Keep the daemon logs (the state dirs go): target/faults-logs/roundN-NAME.log.
        let kept = target_dir().join("faults-logs");
        if std::fs::create_dir_all(&kept).is_ok() {
            for site in self.all() {
                let file = kept.join(format!("round{}-{}.log", self.round, site.name));
                let _ = std::fs::write(file, site.logs());
            }
        }
    }
}

/// `link create TOKEN --transport T --wait 20s` on `site`.
fn create_link(site: &Site, token: &Path, transport: &str) -> std::process::Output {
    site.cli(&[
        "link",
        "create",
        token.to_str().unwrap(),
        "--transport",
        transport,
        "--wait",
        "20s",
    ])
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// One client connection's result and the phase in which it ended (a connection that a
/// fault cut belongs to that fault, whenever it started).
struct Record {
    phase: usize,
    seed: u64,
    outcome: Outcome,
}

/// Client loops through a's listener, and the backends, on a runtime of their own.
struct Traffic {
    runtime: Runtime,
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    records: Arc<Mutex<Vec<Record>>>,
    server: Arc<ServerStats>,
    next_seed: Arc<checked::Counter>,
    addr: SocketAddr,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    began: Instant,
}

impl Traffic {
    /// Starts the runtime (for the backends); the client loops start with [`Traffic::begin`].
    fn start(addr: SocketAddr) -> Traffic {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("traffic")
            .enable_all()
            .build()
            .unwrap();
        Traffic {
            runtime,
            stop: Arc::default(),
            phase: Arc::default(),
            records: Arc::default(),
            server: Arc::default(),
            next_seed: Arc::default(),
            addr,
            workers: Mutex::default(),
            began: Instant::now(),
        }
    }

    /// Starts a backend on every address of this namespace; returns its port.
    fn backend(&self, tag: u8) -> u16 {
        let stats = self.server.clone();
        let port = self.runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(checked::serve(listener, tag, stats));
            port
        });
        port
    }

    /// Starts the client loops.
    fn begin(&self) {
        let mut workers = self.workers.lock().unwrap();
        for id in 0..WORKERS {
            let (stop, phase, records, seeds) = (
                self.stop.clone(),
                self.phase.clone(),
                self.records.clone(),
                self.next_seed.clone(),
            );
            let addr = self.addr;
            workers.push(self.runtime.spawn(async move {
                let mut rng = 0x5eed_u64 ^ (id << 32) ^ 0x9e37_79b9;
                while !stop.load(Ordering::Relaxed) {
                    rng = xorshift(rng);
                    let seed = (u64::from(std::process::id()) << 32) | seeds.next();
                    // One in six connections is long-lived (its answer is spread over 1 to
                    // 2.5 s), so that faults hit connections in the middle of their lives.
                    let pace = if rng % 6 == 0 {
                        Duration::from_millis(1000 + (rng >> 8) % 1500)
                    } else {
                        Duration::ZERO
                    };
                    let req = Request {
                        seed,
                        up: ((rng >> 16) % 32_768) as u32,
                        down: ((rng >> 32) % 262_144) as u32,
                        pace,
                    };
                    let outcome = exchange(addr, req, DEADLINE).await;
                    let failed = outcome.verdict != Verdict::Completed;
                    records.lock().unwrap().push(Record {
                        phase: phase.load(Ordering::Relaxed),
                        seed,
                        outcome,
                    });
                    if failed {
                        // Do not spin while the network is broken.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
    }

    fn set_phase(&self, phase: usize) {
        eprintln!(
            "faults: {} (after {} connections, {:.1} s)",
            PHASES[phase],
            self.records.lock().unwrap().len(),
            self.began.elapsed().as_secs_f64()
        );
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// `n` extra long-lived connections (2 s answers) started now; waits until the backends
    /// have them all.
    fn long_lived(&self, n: u64) -> Vec<tokio::task::JoinHandle<()>> {
        let before = self.server.accepted.load(Ordering::Relaxed);
        let tasks = (0..n)
            .map(|_| {
                let seed = (u64::from(std::process::id()) << 32) | self.next_seed.next();
                let req = Request {
                    seed,
                    up: 1000,
                    down: 100_000,
                    pace: Duration::from_secs(2),
                };
                let (records, phase, addr) = (self.records.clone(), self.phase.clone(), self.addr);
                self.runtime.spawn(async move {
                    let outcome = exchange(addr, req, DEADLINE).await;
                    records.lock().unwrap().push(Record {
                        phase: phase.load(Ordering::Relaxed),
                        seed,
                        outcome,
                    });
                })
            })
            .collect();
        let deadline = Instant::now() + SETUP;
        while self.server.accepted.load(Ordering::Relaxed) < before + n && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        tasks
    }

    /// Stops the client loops, waits for their last connections, returns every record.
    fn stop(&self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap());
        self.runtime.block_on(async {
            for w in workers {
                let _ = w.await;
            }
        });
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

// ---------------------------------------------------------------------------------------------
// The faults
// ---------------------------------------------------------------------------------------------

/// What one fault did, for the summary.
struct Fault {
    name: &'static str,
    what: String,
    /// From the end of the fault to convergence.
    converged: Duration,
    /// Extra lines for the summary.
    notes: Vec<String>,
}

fn cut(world: &World, sites: &Sites) -> Fault {
    let held = Duration::from_secs(8);
    world.ab.set_up(0, false).unwrap();
    // Meanwhile a reaches b through c (the b–c link was made in the disk phase).
    std::thread::sleep(held);
    world.ab.set_up(0, true).unwrap();
    let converged = sites.converge("the a-b cut", Instant::now());
    Fault {
        name: "cut",
        what: format!("a-b link cut for {} s (ip link set down)", held.as_secs()),
        converged,
        notes: Vec::new(),
    }
}

fn loss(world: &World, sites: &Sites) -> Fault {
    let held = Duration::from_secs(6);
    let imp = Impairment::lossy(Duration::from_millis(200), 30.0);
    world.impair_ac(Some(imp));
    std::thread::sleep(held);
    world.impair_ac(None);
    let converged = sites.converge("loss and delay on a-c", Instant::now());
    Fault {
        name: "loss",
        what: format!("30% loss + 200 ms delay on a-c for {} s", held.as_secs()),
        converged,
        notes: Vec::new(),
    }
}

fn kill(sites: &mut Sites) -> Fault {
    sites.b.kill();
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    sites.b.run();
    let converged = sites.converge("b's SIGKILL and restart", restarted);
    Fault {
        name: "kill",
        what: "SIGKILL b, restart after 1 s".into(),
        converged,
        notes: Vec::new(),
    }
}

fn drain(sites: &mut Sites, traffic: &Traffic) -> Fault {
    // Make sure some connections are in flight at c when it drains.
    let extra = traffic.long_lived(6);
    let term = Instant::now();
    sites.c.sigterm();
    sites.c.wait_exit();
    let exited = Instant::now();
    traffic.runtime.block_on(async {
        for task in extra {
            let _ = task.await;
        }
    });
    let restarted = Instant::now();
    sites.c.run();
    let converged = sites.converge("c's graceful restart", restarted);
    let records = traffic.records.lock().unwrap();
    let window = |r: &&Record| r.outcome.started < exited && r.outcome.ended > term;
    let in_flight: Vec<&Record> = records
        .iter()
        .filter(window)
        .filter(|r| r.outcome.started < term && r.outcome.tag == Some(b'c'))
        .collect();
    let during: Vec<&Record> = records.iter().filter(window).collect();
    let late: Vec<&Record> = during
        .iter()
        .copied()
        .filter(|r| r.outcome.started > term + Duration::from_millis(500))
        .collect();
    let mut notes = vec![format!(
        "drain: c exited {:.1?} after SIGTERM; {} connections were in flight at c, {} overlapped \
         the drain, {} started 0.5 s or more into it",
        exited - term,
        in_flight.len(),
        during.len(),
        late.len()
    )];
    let bad: Vec<String> = during
        .iter()
        .filter(|r| r.outcome.verdict != Verdict::Completed)
        .map(|r| {
            format!(
                "{:?} (tag {:?})",
                r.outcome.verdict,
                r.outcome.tag.map(char::from)
            )
        })
        .collect();
    let to_c = late.iter().filter(|r| r.outcome.tag == Some(b'c')).count();
    if in_flight.is_empty() {
        notes.push("DRAIN FAILURE: no connection was in flight at c".into());
    }
    if !bad.is_empty() {
        notes.push(format!(
            "DRAIN FAILURE: connections overlapping the drain did not complete: {bad:?}"
        ));
    }
    if to_c > 0 {
        notes.push(format!(
            "DRAIN FAILURE: {to_c} connections started during the drain went to c"
        ));
    }
    Fault {
        name: "drain",
        what: "SIGTERM c during traffic (graceful drain), restart".into(),
        converged,
        notes,
    }
}

fn disk(sites: &mut Sites, transport: &str) -> Fault {
    let dir = sites.c.state_dir();
    let t1 = sites.c.issue("c-for-d.yaml", &[]);
    let t2 = sites.d.issue("d-for-c.yaml", &[]);
    let grants = (active_grants(&sites.c), active_grants(&sites.d));
    let before = snapshot(&dir);
    let filler = fill(&dir);
    let mut notes = Vec::new();

    // The issuer's disk is full: `token issue` fails, clearly, and changes nothing.
    let scratch = sites.c.scratch("never.yaml");
    let err = sites
        .c
        .fails(&["token", "issue", "-o", scratch.to_str().unwrap()]);
    check_no_space("c: token issue", &err, &dir);
    notes.push(format!("disk: c token issue: {}", err.trim()));
    // The linking site's disk is full: `link create` fails before it spends the token.
    let out = create_link(&sites.c, &t2, transport);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "c link create succeeded on a full disk"
    );
    check_no_space("c: link create", &err, &dir);
    notes.push(format!("disk: c link create: {}", err.trim()));
    // The issuer's disk is full while another site redeems its token.
    let out = create_link(&sites.d, &t1, transport);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "d redeemed a token of c's while c's disk was full"
    );
    assert!(
        err.contains("no space left") && err.contains("still valid"),
        "d: link create with a token of c's, whose disk is full: unclear error: {err}"
    );
    notes.push(format!("disk: d link create (c's token): {}", err.trim()));

    // Nothing changed: files, grants, the running daemon, its links and routes.
    assert_eq!(
        snapshot(&dir),
        before,
        "c's state dir changed while its disk was full"
    );
    assert_eq!(
        (active_grants(&sites.c), active_grants(&sites.d)),
        grants,
        "a failed command spent or dropped a grant"
    );
    // Traffic keeps flowing through c while its disk stays full.
    std::thread::sleep(Duration::from_secs(2));
    sites.converged().unwrap_or_else(|e| {
        panic!(
            "c's full disk disturbed the network: {e}\n{}",
            report(&sites.all())
        )
    });

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    // The same token works now, and so does issuing; c's first token is still valid.
    let out = create_link(&sites.c, &t2, transport);
    assert!(
        out.status.success(),
        "c link create after freeing space: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        report(&sites.all())
    );
    sites.links.push(("c", "d"));
    sites.members.push("d");
    sites.c.issue("c-after.yaml", &[]);
    assert_eq!(
        active_grants(&sites.c),
        grants.0 + 1,
        "c's first token should still be valid, beside the new one"
    );
    let converged = sites.converge("freeing c's disk", freed);
    Fault {
        name: "disk",
        what: "c's state dir (1 MiB tmpfs) full: token issue, link create".into(),
        converged,
        notes,
    }
}

/// Fills the filesystem of `dir` with a file; returns it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [64 * 1024, 1024, 1] {
        let data = vec![0x5au8; chunk];
        while file.write_all(&data).and_then(|()| file.flush()).is_ok() {}
    }
    path
}

/// Every file under `dir` (but the filler and the admin socket) and its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() && entry.file_name() != "filler" {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn active_grants(site: &Site) -> u64 {
    site.status_json()["activeGrants"].as_u64().unwrap()
}

/// A full disk's error must say so and say what to do.
fn check_no_space(what: &str, err: &str, dir: &Path) {
    let lower = err.to_lowercase();
    let free = format!("free space in {}", dir.display());
    assert!(
        lower.contains("no space left") && err.contains(&free),
        "{what} on a full disk: the error should say \"no space left\" and \"{free}\": {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Summary and verdict
// ---------------------------------------------------------------------------------------------

fn tallies(records: &[Record]) -> BTreeMap<usize, Tally> {
    let mut by_phase: BTreeMap<usize, Tally> = BTreeMap::new();
    for r in records {
        by_phase.entry(r.phase).or_default().add(&r.outcome);
    }
    by_phase
}

fn summarise(
    title: &str,
    faults: &[Fault],
    records: &[Record],
    server: &ServerStats,
    world: &World,
    started: Instant,
) -> String {
    let by_phase = tallies(records);
    let mut total = Tally::default();
    for t in by_phase.values() {
        total.merge(t);
    }
    let truncated = server.truncated_seeds.lock().unwrap().clone();
    let mut out = String::new();
    out += &format!(
        "{title}: {} faults injected; {} connections carried: {} completed, {} reset, {} \
         corrupted, {} hung ({} refused at connect); {:.0} s\n",
        faults.len(),
        total.carried,
        total.completed,
        total.reset,
        total.corrupted,
        total.hung,
        total.refused,
        started.elapsed().as_secs_f64()
    );
    out += &format!("a-c impairment via {}\n", world.impairment_kind());
    out += "phase   fault                                                      carried completed  reset corrupted hung refused converged\n";
    for (i, phase) in PHASES.iter().enumerate() {
        let t = by_phase.get(&i).cloned().unwrap_or_default();
        let fault = faults.iter().find(|f| f.name == *phase);
        out += &format!(
            "{:<7} {:<58} {:>7} {:>9} {:>6} {:>9} {:>4} {:>7} {:>9}\n",
            phase,
            fault.map(|f| f.what.as_str()).unwrap_or("-"),
            t.carried,
            t.completed,
            t.reset,
            t.corrupted,
            t.hung,
            t.refused,
            fault
                .map(|f| format!("{:.1} s", f.converged.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let mut truncated_by_phase: BTreeMap<usize, u64> = BTreeMap::new();
    for r in records {
        if truncated.contains(&r.seed) {
            *truncated_by_phase.entry(r.phase).or_default() += 1;
        }
    }
    out += &format!(
        "backends: {} uploads reset, {} ended early with a FIN ({}), {} corrupt\n",
        server.upload_reset.load(Ordering::Relaxed),
        truncated.len(),
        truncated_by_phase
            .iter()
            .map(|(p, n)| format!("{n} in {}", PHASES[*p]))
            .collect::<Vec<_>>()
            .join(", "),
        server.upload_corrupt.load(Ordering::Relaxed),
    );
    for f in faults {
        for note in &f.notes {
            out += note;
            out.push('\n');
        }
    }
    if !total.examples.is_empty() {
        out += &format!("examples: {}\n", total.examples.join("; "));
    }
    out
}

fn check(faults: &[Fault], records: &[Record], server: &ServerStats, sites: &Sites) {
    let by_phase = tallies(records);
    let mut total = Tally::default();
    for t in by_phase.values() {
        total.merge(t);
    }
    let sites = sites.all();
    assert!(total.carried > 0, "no traffic was carried");
    assert_eq!(
        total.corrupted,
        0,
        "corrupted connections\n{}",
        report(&sites)
    );
    assert_eq!(total.hung, 0, "hung connections\n{}", report(&sites));
    assert_eq!(
        server.upload_corrupt.load(Ordering::Relaxed),
        0,
        "backends saw corrupt uploads"
    );
    let truncated = server.truncated_seeds.lock().unwrap().clone();
    let live_truncations: Vec<u64> = records
        .iter()
        .filter(|r| r.phase != KILL && truncated.contains(&r.seed))
        .map(|r| r.seed)
        .collect();
    assert!(
        live_truncations.is_empty(),
        "a live router ended {} uploads with a FIN instead of a reset",
        live_truncations.len()
    );
    for f in faults {
        assert!(
            f.converged <= CONVERGE,
            "after {} ({}), the network took {:.1?} to converge (bound {CONVERGE:?})",
            f.name,
            f.what,
            f.converged
        );
        for note in &f.notes {
            assert!(!note.contains("FAILURE"), "{note}");
        }
    }
    // The full disk must not disturb the data plane, nor the drain (checked above).
    let disk = by_phase.get(&1).cloned().unwrap_or_default();
    assert!(
        disk.completed > 0 && disk.reset == 0,
        "disk phase: {disk:?}"
    );
}

/// `target/`, from this binary's place in `target/debug/deps/`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target")))
}
