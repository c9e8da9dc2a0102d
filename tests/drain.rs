//! Graceful stop, end to end: real `skiff` daemons on loopback carry checked connections
//! (`common/checked.rs`) while one of them gets SIGTERM.
//!
//! - a site that serves a key (connector site) drains: `/readyz` says `draining`, its carried
//!   connections finish intact, new ones go to the other site that serves the key, and it exits
//!   as soon as the last one ended;
//! - a site with the listener drains: its port closes at once (new clients are refused by the
//!   kernel), its carried connections finish intact;
//! - what is still carried when the drain timeout passes is reset, visibly, and a second SIGTERM
//!   stops a draining site at once, resetting the same way.

#[path = "common/checked.rs"]
mod checked;
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checked::{exchange, Outcome, Request, ServerStats, Verdict};
use common::{free_port, http_get, report, wait_for, Site};
use tokio::runtime::Runtime;

/// Bound for routes (listener targets) to appear or change.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound for one checked connection.
const DEADLINE: Duration = Duration::from_secs(30);

on_every_transport!(
    a_serving_site_drains,
    a_listening_site_drains,
    the_drain_timeout_resets_what_is_left,
    a_second_sigterm_stops_at_once,
);

/// A runtime with checked backends on loopback.
struct Backends {
    runtime: Runtime,
    stats: Arc<ServerStats>,
}

impl Backends {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Backends {
            runtime,
            stats: Arc::default(),
        }
    }

    /// Starts a backend answering with `tag`; returns its port.
    fn start(&self, tag: u8) -> u16 {
        let stats = self.stats.clone();
        self.runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(checked::serve(listener, tag, stats));
            port
        })
    }

    /// Starts `n` connections with `req` (seeds differ) in the background.
    fn spawn(
        &self,
        addr: SocketAddr,
        n: u64,
        req: Request,
    ) -> Vec<tokio::task::JoinHandle<Outcome>> {
        (0..n)
            .map(|i| {
                let req = Request {
                    seed: req.seed + i,
                    ..req
                };
                self.runtime.spawn(exchange(addr, req, DEADLINE))
            })
            .collect()
    }

    fn join(&self, tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
        self.runtime.block_on(async {
            let mut out = Vec::new();
            for task in tasks {
                out.push(task.await.unwrap());
            }
            out
        })
    }

    fn one(&self, addr: SocketAddr, req: Request) -> Outcome {
        self.runtime.block_on(exchange(addr, req, DEADLINE))
    }
}

/// A slow connection: its answer takes `pace`.
fn slow(seed: u64, pace: Duration) -> Request {
    Request {
        seed,
        up: 20_000,
        down: 200_000,
        pace,
    }
}

/// A quick one.
fn quick(seed: u64) -> Request {
    Request {
        seed,
        up: 10_000,
        down: 50_000,
        pace: Duration::ZERO,
    }
}

fn listener(site: &Site, key: &str) -> SocketAddr {
    let port = free_port();
    site.ok(&["listener", "create", key, "--port", &port.to_string()]);
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn connector(site: &Site, key: &str, port: u16) {
    site.ok(&[
        "connector",
        "create",
        key,
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ]);
}

fn wait_targets(site: &Site, key: &str, want: &[&str], sites: &[&Site]) {
    wait_for(
        &format!("listener {key} of {} served by {want:?}", site.name),
        ROUTE_TIMEOUT,
        sites,
        || {
            let seen = site.targets(key)?;
            (seen == want).then_some(()).ok_or(format!("{seen:?}"))
        },
    );
}

/// Waits until every connection in `tasks` has its answer under way (the backend saw it).
fn wait_answered(backends: &Backends, n: u64, sites: &[&Site]) {
    wait_for(
        "the slow connections to reach their backends",
        DEADLINE,
        sites,
        || {
            let seen = backends
                .stats
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed);
            (seen >= n).then_some(()).ok_or(format!("{seen} accepted"))
        },
    );
}

fn a_serving_site_drains() {
    let backends = Backends::new();
    let metrics = free_port();
    let a = Site::start("a");
    let mut b = Site::start_with("b", &["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
    let c = Site::start("c");
    a.link_to(&b);
    a.link_to(&c);
    connector(&b, "svc", backends.start(b'b'));
    connector(&c, "svc", backends.start(b'c'));
    let addr = listener(&a, "svc");
    wait_targets(&a, "svc", &["b", "c"], &[&a, &b, &c]);
    assert_eq!(http_get(metrics, "/readyz"), Ok((200, "ready\n".into())));

    // Slow connections, spread over b and c; each answer takes 3 s.
    let in_flight = backends.spawn(addr, 8, slow(1000, Duration::from_secs(3)));
    wait_answered(&backends, 8, &[&a, &b, &c]);
    let term = Instant::now();
    b.sigterm();
    wait_for(
        "b's /readyz to say draining",
        ROUTE_TIMEOUT,
        &[&b],
        || match http_get(metrics, "/readyz") {
            Ok((503, body)) if body == "draining\n" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // New connections while b drains: every one completes, at c.
    let mut fresh = Vec::new();
    for i in 0..20 {
        fresh.push(backends.one(addr, quick(2000 + i)));
    }
    let slow_ones = backends.join(in_flight);
    b.wait_exit();
    let stopped = term.elapsed();

    let through_b = slow_ones.iter().filter(|o| o.tag == Some(b'b')).count();
    assert!(through_b > 0, "no slow connection went to b: {slow_ones:?}");
    for o in &slow_ones {
        assert_eq!(
            o.verdict,
            Verdict::Completed,
            "an in-flight connection (to {:?}) did not complete while b drained\n{}",
            o.tag.map(char::from),
            report(&[&a, &b, &c])
        );
    }
    for (i, o) in fresh.iter().enumerate() {
        assert_eq!(
            (&o.verdict, o.tag),
            (&Verdict::Completed, Some(b'c')),
            "new connection {i} while b drained\n{}",
            report(&[&a, &b, &c])
        );
    }
    let logs = b.logs();
    assert!(
        logs.contains("draining") && logs.contains("drained: every carried connection finished"),
        "b's log does not tell the drain:\n{logs}"
    );
    // It exits once its last connection ended, not at the 10 s drain timeout.
    assert!(
        stopped < Duration::from_secs(8),
        "b took {stopped:?} to stop"
    );
    assert_eq!(backends.stats.silent(), 0, "{:?}", backends.stats);
}

fn a_listening_site_drains() {
    let backends = Backends::new();
    let mut a = Site::start("a");
    let b = Site::start("b");
    a.link_to(&b);
    connector(&b, "svc", backends.start(b'b'));
    let addr = listener(&a, "svc");
    wait_targets(&a, "svc", &["b"], &[&a, &b]);

    let in_flight = backends.spawn(addr, 4, slow(3000, Duration::from_secs(2)));
    wait_answered(&backends, 4, &[&a, &b]);
    a.sigterm();
    wait_for(
        "a's listener port to close",
        ROUTE_TIMEOUT,
        &[&a],
        || match backends.one(addr, quick(4000)).verdict {
            Verdict::Refused => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    for o in backends.join(in_flight) {
        assert_eq!(
            o.verdict,
            Verdict::Completed,
            "an in-flight connection did not complete while a drained\n{}",
            report(&[&a, &b])
        );
    }
    a.wait_exit();
    assert!(a
        .logs()
        .contains("drained: every carried connection finished"));
    assert_eq!(backends.stats.silent(), 0, "{:?}", backends.stats);
}

/// Asserts that `o` ended with a TCP reset around `after` past `since`.
fn assert_reset(o: &Outcome, since: Instant, after: Duration, sites: &[&Site]) {
    match &o.verdict {
        Verdict::Reset(why) if why.contains("reset") => {}
        other => panic!(
            "a connection cut by a stop ended with {other:?}, not a reset\n{}",
            report(sites)
        ),
    }
    let took = o.ended.duration_since(since);
    assert!(
        took >= after && took < after + Duration::from_secs(4),
        "the reset came {took:?} after SIGTERM, expected about {after:?}"
    );
}

fn the_drain_timeout_resets_what_is_left() {
    let backends = Backends::new();
    let a = Site::start("a");
    let mut b = Site::init("b", &[]);
    b.run_args = vec!["--drain-timeout".into(), "1s".into()];
    b.run();
    a.link_to(&b);
    connector(&b, "svc", backends.start(b'b'));
    let addr = listener(&a, "svc");
    wait_targets(&a, "svc", &["b"], &[&a, &b]);

    let in_flight = backends.spawn(addr, 1, slow(5000, Duration::from_secs(60)));
    wait_answered(&backends, 1, &[&a, &b]);
    let term = Instant::now();
    b.sigterm();
    let outcome = backends.join(in_flight).remove(0);
    b.wait_exit();
    assert_reset(&outcome, term, Duration::from_secs(1), &[&a, &b]);
    assert!(
        b.logs().contains("drain timeout: resetting"),
        "{}",
        b.logs()
    );
}

fn a_second_sigterm_stops_at_once() {
    let backends = Backends::new();
    let a = Site::start("a");
    let mut b = Site::start("b");
    a.link_to(&b);
    connector(&b, "svc", backends.start(b'b'));
    let addr = listener(&a, "svc");
    wait_targets(&a, "svc", &["b"], &[&a, &b]);

    let in_flight = backends.spawn(addr, 1, slow(6000, Duration::from_secs(60)));
    wait_answered(&backends, 1, &[&a, &b]);
    let term = Instant::now();
    b.stop_now();
    let outcome = backends.join(in_flight).remove(0);
    assert_reset(&outcome, term, Duration::ZERO, &[&a, &b]);
    assert!(b.logs().contains("stopping now: resetting"), "{}", b.logs());
}
