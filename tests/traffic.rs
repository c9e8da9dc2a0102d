//! End-to-end tests of service traffic: real `skiff` daemons on loopback carry TCP connections
//! from a listener in one site to a connector in another (directly or over several hops), and
//! real TCP backends and clients in this process check what arrives: integrity of a large
//! transfer, half-close, resets when a router dies, the load-balancing strategies, failover,
//! refusal without a target, many concurrent connections, a refusing backend, and restarts;
//! and, at the end, three properties the docs promise beyond those: stalled readers cost only
//! their own connections, round-robin gives every site its turn, and sites that busy-poll
//! (`--busy-poll`) stop spinning when traffic stops.
//!
//! Backends run on a tokio runtime owned by each test ([`Backends`]). Data is checked against a
//! seeded pseudo-random [`Pattern`] that both ends can regenerate: comparing slices is fast even
//! in a debug build, where hashing a gigabyte byte by byte would take longer than carrying it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_seconds, free_port, hold_for, refusing_port, report, wait_for, Site};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;

/// Bound for routes (listener targets) to appear or change.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound for one client connection's connect, and for each read.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Test data: a seeded pseudo-random byte stream that both ends can regenerate.
// ---------------------------------------------------------------------------------------------

/// The stream is a sequence of windows of this size...
const WINDOW: usize = 64 * 1024;
/// ...each taken at a pseudo-random offset in a pool of this size (plus one window).
const POOL: usize = 1 << 20;

/// xorshift64*: cheap, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let state = seed ^ 0x9e37_79b9_7f4a_7c15;
        Rng(if state == 0 { 1 } else { state })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The byte stream of one seed: windows of a random pool at random offsets, so that every
/// window differs from its neighbours and a lost, doubled or reordered piece shows.
struct Pattern {
    pool: Vec<u8>,
    rng: Rng,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut pool = vec![0u8; POOL + WINDOW];
        for word in pool.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        Pattern { pool, rng }
    }

    /// Offset of the next window in the pool.
    fn next_offset(&mut self) -> usize {
        (self.rng.next() % POOL as u64) as usize
    }

    /// The next `WINDOW` bytes of the stream.
    fn next_window(&mut self) -> &[u8] {
        let offset = self.next_offset();
        &self.pool[offset..offset + WINDOW]
    }
}

/// Checks a received byte stream against [`Pattern`] `seed`, whatever the chunking.
struct Verifier {
    pattern: Pattern,
    offset: usize,
    pos: usize,
    count: u64,
    mismatch: Option<u64>,
}

impl Verifier {
    fn new(seed: u64) -> Self {
        Verifier {
            pattern: Pattern::new(seed),
            offset: 0,
            pos: WINDOW,
            count: 0,
            mismatch: None,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.pos == WINDOW {
                self.offset = self.pattern.next_offset();
                self.pos = 0;
            }
            let n = (WINDOW - self.pos).min(data.len());
            let start = self.offset + self.pos;
            let want = &self.pattern.pool[start..start + n];
            if self.mismatch.is_none() && want != &data[..n] {
                let at = want.iter().zip(data).position(|(a, b)| a != b);
                self.mismatch = Some(self.count + at.unwrap_or(0) as u64);
            }
            self.count += n as u64;
            self.pos += n;
            data = &data[n..];
        }
    }

    /// `"COUNT ok"` or `"COUNT mismatch-at-OFFSET"`.
    fn verdict(&self) -> String {
        match self.mismatch {
            None => format!("{} ok", self.count),
            Some(at) => format!("{} mismatch-at-{at}", self.count),
        }
    }
}

/// Writes `total` bytes of [`Pattern`] `seed`.
fn send_pattern(out: &mut impl Write, seed: u64, total: u64) -> std::io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut left = total;
    while left > 0 {
        let window = pattern.next_window();
        let n = left.min(WINDOW as u64) as usize;
        out.write_all(&window[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Async [`send_pattern`]; with `pace`, sleeps that long after every 16 KiB.
async fn send_pattern_async<W: AsyncWrite + Unpin>(
    out: &mut W,
    seed: u64,
    total: u64,
    pace: Option<Duration>,
) -> std::io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut left = total;
    while left > 0 {
        let n = left.min(WINDOW as u64) as usize;
        let window = pattern.next_window()[..n].to_vec();
        match pace {
            None => out.write_all(&window).await?,
            Some(pause) => {
                for piece in window.chunks(16 * 1024) {
                    out.write_all(piece).await?;
                    tokio::time::sleep(pause).await;
                }
            }
        }
        left -= n as u64;
    }
    Ok(())
}

/// A unique message for client `i`.
fn message(i: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(i.wrapping_mul(0x1000_0000_01b3).wrapping_add(7));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// Backends: real TCP servers in this process.
// ---------------------------------------------------------------------------------------------

/// What a backend does with each connection.
#[derive(Clone)]
enum Behaviour {
    /// Echoes everything; half-closes when the client does.
    Echo,
    /// Writes its name and half-closes, then reads until the client closes.
    Name(String),
    /// Reads until EOF, checking the bytes against [`Pattern`] `seed`; then replies
    /// `"COUNT ok\n"` (or `"COUNT mismatch-at-OFFSET\n"`) followed by `reply` bytes of pattern
    /// `seed + 1`, and closes.
    Sink { seed: u64, reply: u64 },
    /// Writes `"hello\n"` and half-closes at once, then reads until EOF, checking the bytes
    /// against [`Pattern`] `seed`; records the verdict in [`Stats::verdicts`].
    GreetThenSink { seed: u64 },
    /// Streams [`Pattern`] `seed` slowly (16 KiB every few ms) until the connection breaks.
    Stream { seed: u64 },
}

/// What a backend saw.
#[derive(Default)]
struct Stats {
    accepted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    /// How connections ended: `Ok` or the error, in order.
    ends: Mutex<Vec<Result<(), String>>>,
    /// What [`Behaviour::GreetThenSink`] received: `"COUNT ok"` or `"COUNT mismatch-at-N"`.
    verdicts: Mutex<Vec<String>>,
}

struct Backend {
    port: u16,
    stats: Arc<Stats>,
}

/// A tokio runtime for the test's backends (and async clients); dropping it stops them.
struct Backends {
    rt: Runtime,
}

impl Backends {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        Backends { rt }
    }

    /// Starts a backend on a free loopback port.
    fn start(&self, behaviour: Behaviour) -> Backend {
        let listener: TcpListener = self.rt.block_on(async {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind((Ipv4Addr::LOCALHOST, 0).into())
                .expect("bind a backend");
            socket.listen(4096).expect("listen")
        });
        let port = listener.local_addr().expect("local_addr").port();
        let stats = Arc::new(Stats::default());
        let server_stats = stats.clone();
        self.rt.spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let stats = server_stats.clone();
                let behaviour = behaviour.clone();
                stats.accepted.fetch_add(1, Ordering::SeqCst);
                let open = stats.open.fetch_add(1, Ordering::SeqCst) + 1;
                stats.max_open.fetch_max(open, Ordering::SeqCst);
                tokio::spawn(async move {
                    let end = serve(conn, behaviour, &stats)
                        .await
                        .map_err(|e| e.to_string());
                    stats.open.fetch_sub(1, Ordering::SeqCst);
                    stats.ends.lock().unwrap().push(end);
                });
            }
        });
        Backend { port, stats }
    }
}

async fn serve(
    mut conn: tokio::net::TcpStream,
    behaviour: Behaviour,
    stats: &Stats,
) -> std::io::Result<()> {
    let _ = conn.set_nodelay(true);
    match behaviour {
        Behaviour::Echo => {
            let (mut rd, mut wr) = conn.split();
            tokio::io::copy(&mut rd, &mut wr).await?;
            wr.shutdown().await
        }
        Behaviour::Name(name) => {
            conn.write_all(name.as_bytes()).await?;
            conn.shutdown().await?;
            drain(&mut conn).await
        }
        Behaviour::Sink { seed, reply } => {
            let verifier = verify_until_eof(&mut conn, seed).await?;
            conn.write_all(format!("{}\n", verifier.verdict()).as_bytes())
                .await?;
            send_pattern_async(&mut conn, seed + 1, reply, None).await?;
            conn.shutdown().await?;
            drain(&mut conn).await
        }
        Behaviour::GreetThenSink { seed } => {
            conn.write_all(b"hello\n").await?;
            conn.shutdown().await?;
            let verifier = verify_until_eof(&mut conn, seed).await?;
            stats.verdicts.lock().unwrap().push(verifier.verdict());
            Ok(())
        }
        Behaviour::Stream { seed } => {
            send_pattern_async(&mut conn, seed, u64::MAX, Some(Duration::from_millis(4))).await
        }
    }
}

/// Reads until EOF, checking what arrives against [`Pattern`] `seed`.
async fn verify_until_eof<R: AsyncRead + Unpin>(
    conn: &mut R,
    seed: u64,
) -> std::io::Result<Verifier> {
    let mut verifier = Verifier::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(verifier);
        }
        verifier.update(&buf[..n]);
    }
}

/// Reads until EOF (bounded), so that closing never turns unread data into an RST.
async fn drain<R: AsyncRead + Unpin>(conn: &mut R) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let read_all = async {
        while conn.read(&mut buf).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), read_all)
        .await
        .unwrap_or(Ok(()))
}

// ---------------------------------------------------------------------------------------------
// Sites: listeners, connectors, routes.
// ---------------------------------------------------------------------------------------------

/// `connector create KEY --host 127.0.0.1 --port PORT --name NAME`.
fn connector(site: &Site, key: &str, name: &str, port: u16) {
    site.ok(&[
        "connector",
        "create",
        key,
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--name",
        name,
    ]);
}

/// `listener create KEY --port P --strategy S` on a free port; returns the port.
fn listener(site: &Site, key: &str, strategy: &str) -> u16 {
    let port = free_port();
    site.ok(&[
        "listener",
        "create",
        key,
        "--port",
        &port.to_string(),
        "--strategy",
        strategy,
    ]);
    port
}

/// Links `site` to `issuer` with the given cost (`link create --cost`), and waits for it.
fn link_with_cost(site: &Site, issuer: &Site, cost: u32) {
    let token = issuer.issue(
        &format!("to-{}-from-{}-cost.yaml", issuer.name, site.name),
        &[],
    );
    site.ok(&[
        "link",
        "create",
        token.to_str().unwrap(),
        "--cost",
        &cost.to_string(),
        "--wait",
        "10s",
        "--transport",
        common::transport(),
    ]);
    wait_for(
        &format!("link {} -> {} up", site.name, issuer.name),
        Duration::from_secs(10),
        &[site, issuer],
        || {
            site.link_up(&issuer.name, "outgoing")?;
            issuer.link_up(&site.name, "incoming")
        },
    );
}

/// The sorted `targets` of listener `name` (`listener list -o json`).
fn targets(site: &Site, name: &str) -> Result<Vec<String>, String> {
    let out = site.cli(&["listener", "list", "-o", "json"]);
    if !out.status.success() {
        return Err(format!(
            "listener list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let list: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let listener = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == name)
        .ok_or_else(|| format!("no listener {name}: {list}"))?;
    let mut names: Vec<String> = listener["targets"]
        .as_array()
        .ok_or_else(|| format!("listener without targets: {listener}"))?
        .iter()
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

/// Waits until listener `name` of `site` has exactly the targets `want`.
fn wait_targets(site: &Site, name: &str, want: &[&str], sites: &[&Site]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(
        &format!("listener {name} of {} served by {want:?}", site.name),
        ROUTE_TIMEOUT,
        sites,
        || {
            let seen = targets(site, name)?;
            if seen == want {
                Ok(())
            } else {
                Err(format!("targets {seen:?}"))
            }
        },
    );
}

/// `first` and `rest`, for failure reports.
fn sites<'s>(first: &'s Site, rest: &'s [Site]) -> Vec<&'s Site> {
    std::iter::once(first).chain(rest).collect()
}

// ---------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Connects, reads the whole reply (a [`Behaviour::Name`] backend's name).
fn ask(port: u16) -> Result<String, String> {
    let mut stream = connect(port).map_err(|e| format!("connect: {e}"))?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|e| format!("read: {e} ({:?}) after {} bytes", e.kind(), reply.len()))?;
    String::from_utf8(reply).map_err(|e| e.to_string())
}

/// Like [`ask`], from source address `from` (async, for source-affinity).
async fn ask_from(from: Ipv4Addr, port: u16) -> Result<String, String> {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind((from, 0).into())?;
        let mut stream = socket.connect(local(port)).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    match tokio::time::timeout(IO_TIMEOUT, attempt).await {
        Err(_) => Err(format!("from {from}: timed out")),
        Ok(Err(e)) => Err(format!("from {from}: {e}")),
        Ok(Ok(reply)) => String::from_utf8(reply).map_err(|e| e.to_string()),
    }
}

/// How a listener turned a client away.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The TCP connect itself failed (ECONNREFUSED: nothing listens).
    ConnectRefused,
    /// Reset (ECONNRESET) before any data: on the first read, or already when the connect
    /// completes if the RST arrives first (the kernel completes the handshake before the
    /// listener accepts and resets).
    Reset,
    /// Connected, then a clean end of data (EOF) before any data.
    Eof,
}

/// Connects and waits (at most 2 s) for the listener to turn the client away; `Err` if it
/// served the client or kept it waiting.
fn refusal(port: u16) -> Result<Refusal, String> {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&local(port), IO_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(Refusal::ConnectRefused),
        // The reset can beat a non-blocking connect's completion check.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(Refusal::Reset),
        Err(e) => return Err(format!("connect failed oddly: {e}")),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 1024];
    let outcome = match stream.read(&mut buf) {
        Ok(0) => Ok(Refusal::Eof),
        Ok(n) => Err(format!(
            "served: got {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(Refusal::Reset),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err("neither served nor refused within 2 s".to_string())
        }
        Err(e) => Err(format!("unexpected read error: {e} ({:?})", e.kind())),
    };
    if outcome.is_ok() && start.elapsed() > Duration::from_millis(1500) {
        return Err(format!("refused, but only after {:?}", start.elapsed()));
    }
    outcome
}

/// Writes `msg`, then reads its echo, then half-closes and expects a clean EOF.
fn echo_round_trip(port: u16, msg: &[u8]) -> Result<(), String> {
    let mut stream = connect(port).map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(msg)
        .map_err(|e| format!("write: {e} ({:?})", e.kind()))?;
    let mut back = vec![0u8; msg.len()];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("read echo: {e} ({:?})", e.kind()))?;
    if back != msg {
        return Err("echo differs from what was sent".into());
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .map_err(|e| format!("read EOF: {e} ({:?})", e.kind()))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes after the echo", rest.len()));
    }
    Ok(())
}

/// Counts replies of `n` sequential [`ask`]s; panics at the first failure.
fn tally(port: u16, n: usize, sites: &[&Site]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        match ask(port) {
            Ok(name) => *counts.entry(name).or_insert(0) += 1,
            Err(e) => panic!(
                "connection {i} of {n} failed: {e}\nso far: {counts:?}\n{}",
                report(sites)
            ),
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

/// 1 GiB through a listener in a, relayed by b, to a sink behind c's connector; the sink checks
/// every byte against the sender's pattern and reports the count.
fn gigabyte_over_two_hops_arrives_intact() {
    const TOTAL: u64 = 1 << 30;
    const SEED: u64 = 1;
    let backends = Backends::new();
    let sink = backends.start(Behaviour::Sink {
        seed: SEED,
        reply: 0,
    });
    let a = Site::start("a");
    let b = Site::start("b");
    let c = Site::start("c");
    a.link_to(&b);
    b.link_to(&c);
    connector(&c, "sink", "sink", sink.port);
    let port = listener(&a, "sink", "balanced");
    wait_targets(&a, "sink", &["c"], &[&a, &b, &c]);

    let start = Instant::now();
    let mut stream = connect(port).expect("connect to a's listener");
    if let Err(e) = send_pattern(&mut stream, SEED, TOTAL) {
        panic!(
            "sending failed after {:?}: {e} ({:?})\n{}",
            start.elapsed(),
            e.kind(),
            report(&[&a, &b, &c])
        );
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reply = String::new();
    let read = stream.read_to_string(&mut reply);
    let elapsed = start.elapsed();
    eprintln!(
        "1 GiB over two hops in {elapsed:.2?}: {:.1} MiB/s",
        TOTAL as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );
    if let Err(e) = read {
        panic!(
            "no reply from the sink: {e}; sink ends: {:?}\n{}",
            sink.stats.ends.lock().unwrap(),
            report(&[&a, &b, &c])
        );
    }
    assert_eq!(
        reply,
        format!("{TOTAL} ok\n"),
        "the sink did not get exactly what was sent"
    );
}

/// Half-close in both orders, over a link (b's connector) and locally (a's own connector):
/// the client half-closes after its request and the backend, which answers only after that EOF,
/// sends megabytes that all arrive before a clean EOF; and a backend that half-closes first
/// (a greeting) still receives everything the client sends after seeing that EOF.
fn half_close_keeps_the_reply_coming() {
    const REQUEST: u64 = 300 * 1024 + 17;
    const REPLY: u64 = 8 * 1024 * 1024 + 3;
    const UPLOAD: u64 = 2 * 1024 * 1024 + 5;
    const SEED: u64 = 2;
    let backends = Backends::new();
    let server = backends.start(Behaviour::Sink {
        seed: SEED,
        reply: REPLY,
    });
    let greeter = backends.start(Behaviour::GreetThenSink { seed: SEED });
    let a = Site::start("a");
    let b = Site::start("b");
    a.link_to(&b);
    connector(&b, "remote", "remote", server.port);
    connector(&a, "local", "local", server.port);
    connector(&b, "greet-remote", "greet-remote", greeter.port);
    connector(&a, "greet-local", "greet-local", greeter.port);
    let remote = listener(&a, "remote", "balanced");
    let local = listener(&a, "local", "balanced");
    let greet_remote = listener(&a, "greet-remote", "balanced");
    let greet_local = listener(&a, "greet-local", "balanced");
    wait_targets(&a, "remote", &["b"], &[&a, &b]);
    wait_targets(&a, "local", &["a"], &[&a, &b]);
    wait_targets(&a, "greet-remote", &["b"], &[&a, &b]);
    wait_targets(&a, "greet-local", &["a"], &[&a, &b]);

    // The client half-closes first.
    for (what, port) in [("over the link", remote), ("locally", local)] {
        let mut stream = connect(port).unwrap();
        send_pattern(&mut stream, SEED, REQUEST).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        // The status line, byte by byte (it is short), then the reply.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") && line.len() < 100 {
            match stream.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                other => panic!(
                    "{what}: status line cut short ({other:?}) after {:?}\n{}",
                    String::from_utf8_lossy(&line),
                    report(&[&a, &b])
                ),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&line),
            format!("{REQUEST} ok\n"),
            "{what}: the backend did not get the request intact"
        );
        let mut verifier = Verifier::new(SEED + 1);
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => verifier.update(&buf[..n]),
                Err(e) => panic!(
                    "{what}: reply broken after {} of {REPLY} bytes: {e} ({:?})\n{}",
                    verifier.count,
                    e.kind(),
                    report(&[&a, &b])
                ),
            }
        }
        assert_eq!(
            verifier.verdict(),
            format!("{REPLY} ok"),
            "{what}: the reply after the half-close is not complete and intact"
        );
    }

    // The backend half-closes first.
    for (what, port) in [("over the link", greet_remote), ("locally", greet_local)] {
        let mut stream = connect(port).unwrap();
        let mut greeting = Vec::new();
        if let Err(e) = stream.read_to_end(&mut greeting) {
            panic!(
                "{what}: greeting: {e} after {greeting:?}\n{}",
                report(&[&a, &b])
            );
        }
        assert_eq!(greeting, b"hello\n", "{what}");
        // The client has seen EOF; its own direction is still open.
        if let Err(e) = send_pattern(&mut stream, SEED, UPLOAD) {
            panic!(
                "{what}: sending after the backend's half-close: {e}\n{}",
                report(&[&a, &b])
            );
        }
        stream.shutdown(Shutdown::Write).unwrap();
        wait_for(
            &format!("{what}: the backend to receive the upload"),
            Duration::from_secs(10),
            &[&a, &b],
            || {
                let verdicts = greeter.stats.verdicts.lock().unwrap();
                match verdicts.last() {
                    Some(last) => Ok(last.clone()),
                    None => Err(format!(
                        "backend ends: {:?}",
                        greeter.stats.ends.lock().unwrap()
                    )),
                }
            },
        );
        let last = greeter.stats.verdicts.lock().unwrap().pop().unwrap();
        assert_eq!(last, format!("{UPLOAD} ok"), "{what}");
        let mut rest = Vec::new();
        assert_eq!(
            stream.read_to_end(&mut rest).map_err(|e| e.kind()),
            Ok(0),
            "{what}: the client should stay at a clean EOF"
        );
    }
}

/// A transfer in flight through b when b is SIGKILLed: the client must see an error, never a
/// clean end of data; the backend's connection is broken too.
fn killing_the_middle_router_resets_the_client() {
    const SEED: u64 = 3;
    let backends = Backends::new();
    let streamer = backends.start(Behaviour::Stream { seed: SEED });
    let a = Site::start("a");
    let mut b = Site::start("b");
    let c = Site::start("c");
    a.link_to(&b);
    b.link_to(&c);
    connector(&c, "stream", "stream", streamer.port);
    let port = listener(&a, "stream", "balanced");
    wait_targets(&a, "stream", &["c"], &[&a, &b, &c]);

    let mut stream = connect(port).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut verifier = Verifier::new(SEED);
    let mut buf = vec![0u8; 64 * 1024];
    while verifier.count < 512 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) => panic!("EOF before the kill\n{}", report(&[&a, &b, &c])),
            Ok(n) => verifier.update(&buf[..n]),
            Err(e) => panic!("read before the kill: {e}\n{}", report(&[&a, &b, &c])),
        }
    }
    let before = verifier.count;
    b.kill();
    let killed = Instant::now();
    let outcome = loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                break Err(format!(
                    "clean EOF (read returned 0) {:?} after the kill, after {} bytes: a broken \
                 connection looks complete",
                    killed.elapsed(),
                    verifier.count
                ))
            }
            Ok(n) => {
                verifier.update(&buf[..n]);
                if killed.elapsed() > Duration::from_secs(10) {
                    break Err("data still flowing 10 s after the relay was killed".into());
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break Err(format!(
                    "connection hangs: no data, no error for 5 s (at {:?} after the kill)",
                    killed.elapsed()
                ))
            }
            Err(e) => break Ok(e),
        }
    };
    let err = match outcome {
        Ok(e) => e,
        Err(problem) => panic!("{problem}\n{}", report(&[&a, &c])),
    };
    eprintln!(
        "client got {err} ({:?}) {:?} after the kill; {} bytes before, {} after",
        err.kind(),
        killed.elapsed(),
        before,
        verifier.count - before
    );
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert_eq!(
        verifier.mismatch, None,
        "the data received before the reset is corrupt"
    );
    // The backend's end of the carried connection is broken too (by c), not left hanging.
    wait_for(
        "the backend's connection to end with an error",
        Duration::from_secs(5),
        &[&a, &c],
        || {
            let ends = streamer.stats.ends.lock().unwrap();
            match ends.as_slice() {
                [Err(_)] => Ok(()),
                other => Err(format!("backend connection ends: {other:?}")),
            }
        },
    );
}

/// a's listener (balanced) with two equally cheap serving sites: sequential connections split
/// evenly.
fn balanced_spreads_across_equal_sites() {
    const N: usize = 1000;
    let backends = Backends::new();
    let a = Site::start("a");
    let b = Site::start("b");
    let c = Site::start("c");
    a.link_to(&b);
    a.link_to(&c);
    for site in [&b, &c] {
        let backend = backends.start(Behaviour::Name(site.name.clone()));
        connector(site, "svc", "svc", backend.port);
    }
    let port = listener(&a, "svc", "balanced");
    wait_targets(&a, "svc", &["b", "c"], &[&a, &b, &c]);

    let start = Instant::now();
    let counts = tally(port, N, &[&a, &b, &c]);
    eprintln!("balanced: {counts:?} in {:.2?}", start.elapsed());
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b", "c"], "{counts:?}");
    for (site, n) in &counts {
        assert!(
            (N * 4 / 10..=N * 6 / 10).contains(n),
            "site {site} got {n} of {N} connections: {counts:?}"
        );
    }
}

/// With `closest`, a serving site behind a cost-5 link gets nothing while a cost-1 one serves.
fn closest_prefers_the_cheaper_site() {
    const N: usize = 200;
    let backends = Backends::new();
    let a = Site::start("a");
    let b = Site::start("b");
    let c = Site::start("c");
    a.link_to(&b);
    link_with_cost(&a, &c, 5);
    for site in [&b, &c] {
        let backend = backends.start(Behaviour::Name(site.name.clone()));
        connector(site, "svc", "svc", backend.port);
    }
    let port = listener(&a, "svc", "closest");
    wait_targets(&a, "svc", &["b", "c"], &[&a, &b, &c]);
    let network: Value = serde_json::from_str(&a.ok(&["network", "status", "-o", "json"])).unwrap();
    let cost = |name: &str| {
        network["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["cost"].clone())
    };
    assert_eq!(cost("b"), Some(1.into()), "{network}");
    assert_eq!(cost("c"), Some(5.into()), "{network}");

    let counts = tally(port, N, &[&a, &b, &c]);
    assert_eq!(
        counts,
        BTreeMap::from([("b".to_string(), N)]),
        "closest sent connections past the cheaper site"
    );
}

/// Source affinity: each client address sticks to one site; when that site dies, only its
/// clients move; when it comes back, exactly its clients return.
fn source_affinity_sticks_and_moves_only_departed_clients() {
    let backends = Backends::new();
    let a = Site::start("a");
    let mut serving = vec![Site::start("b"), Site::start("c"), Site::start("d")];
    for site in &serving {
        a.link_to(site);
        let backend = backends.start(Behaviour::Name(site.name.clone()));
        connector(site, "svc", "svc", backend.port);
    }
    let port = listener(&a, "svc", "source-affinity");
    wait_targets(&a, "svc", &["b", "c", "d"], &sites(&a, &serving));

    let clients: Vec<Ipv4Addr> = (2..40).map(|x| Ipv4Addr::new(127, 0, 0, x)).collect();
    // Where every client goes, asked `rounds` times; panics if a client is not stable.
    let placement = |rounds: usize, involved: &[&Site]| -> BTreeMap<Ipv4Addr, String> {
        let mut placed = BTreeMap::new();
        for &client in &clients {
            let mut seen = BTreeSet::new();
            for _ in 0..rounds {
                match backends.rt.block_on(ask_from(client, port)) {
                    Ok(site) => seen.insert(site),
                    Err(e) => panic!("client {client}: {e}\n{}", report(involved)),
                };
            }
            assert_eq!(seen.len(), 1, "client {client} went to {seen:?}");
            placed.insert(client, seen.into_iter().next().unwrap());
        }
        placed
    };
    let before = placement(3, &sites(&a, &serving));
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for site in before.values() {
        *per_site.entry(site).or_default() += 1;
    }
    eprintln!("source affinity: {per_site:?}");
    assert!(per_site.len() >= 2, "all clients on one site: {per_site:?}");
    // Kill the site with the most clients.
    let (&victim, _) = per_site.iter().max_by_key(|(_, n)| **n).unwrap();
    let victim = victim.to_string();
    let index = serving.iter().position(|s| s.name == victim).unwrap();
    serving[index].kill();
    let remaining: Vec<&str> = ["b", "c", "d"]
        .into_iter()
        .filter(|s| *s != victim)
        .collect();
    wait_targets(&a, "svc", &remaining, &sites(&a, &serving));

    let after = placement(2, &sites(&a, &serving));
    for client in &clients {
        let (was, is) = (&before[client], &after[client]);
        if *was == victim {
            assert_ne!(is, &victim, "client {client} still on the dead site");
        } else {
            assert_eq!(
                was, is,
                "client {client} moved from {was} to {is} although {was} stayed"
            );
        }
    }

    // The site comes back (same identity): exactly its clients return.
    serving[index].run();
    wait_targets(&a, "svc", &["b", "c", "d"], &sites(&a, &serving));
    let back = placement(1, &sites(&a, &serving));
    assert_eq!(
        back, before,
        "after {victim} came back the placement differs from the original"
    );
}

/// Three serving sites; one is SIGKILLed (its TCP connections close at once) and, 1.5 s later,
/// every connection succeeds on the others; then one is SIGSTOPped (a hung host: no FIN, no
/// RST, only the missing heartbeats tell) and, 1.5 s later, every connection succeeds again.
fn failover_after_a_site_dies_is_invisible() {
    const N: usize = 200;
    let backends = Backends::new();
    let a = Site::start("a");
    let b = Site::start("b");
    let mut c = Site::start("c");
    let d = Site::start("d");
    for site in [&b, &c, &d] {
        a.link_to(site);
        let backend = backends.start(Behaviour::Name(site.name.clone()));
        connector(site, "svc", "svc", backend.port);
    }
    let port = listener(&a, "svc", "balanced");
    wait_targets(&a, "svc", &["b", "c", "d"], &[&a, &b, &c, &d]);
    let warm = tally(port, 30, &[&a, &b, &c, &d]);
    assert_eq!(warm.len(), 3, "all sites should serve before: {warm:?}");

    c.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let counts = tally(port, N, &[&a, &b, &d]);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b", "d"],
        "after c was killed: {counts:?}"
    );

    let stopped = Command::new("kill")
        .args(["-STOP", &d.pid().to_string()])
        .status()
        .expect("cannot run kill");
    assert!(stopped.success());
    std::thread::sleep(Duration::from_millis(1500));
    let counts = tally(port, N, &[&a, &b]);
    assert_eq!(
        counts,
        BTreeMap::from([("b".to_string(), N)]),
        "after d hung"
    );
    // Dropping `d` SIGKILLs it, stopped or not.
}

/// A listener whose key nobody serves resets its clients at once (observed: the TCP handshake
/// completes, then an RST comes with no data, so the client's first read, or sometimes already
/// its connect, fails with ECONNRESET; never a clean EOF); it serves as soon as a connector
/// appears anywhere, and refuses again once it is deleted.
fn listener_refuses_without_a_target_and_recovers() {
    let backends = Backends::new();
    let a = Site::start("a");
    let b = Site::start("b");
    a.link_to(&b);
    let port = listener(&a, "ghost", "balanced");
    assert_eq!(targets(&a, "ghost").unwrap(), Vec::<String>::new());
    for _ in 0..3 {
        match refusal(port) {
            Ok(how) => assert!(
                matches!(how, Refusal::Reset | Refusal::ConnectRefused),
                "refused with {how:?}, but docs/load-balancing.md promises a reset"
            ),
            Err(e) => panic!("a listener without a target: {e}\n{}", report(&[&a, &b])),
        }
    }

    let backend = backends.start(Behaviour::Name("b".into()));
    connector(&b, "ghost", "ghost", backend.port);
    wait_for(
        "a's listener to serve once b serves the key",
        ROUTE_TIMEOUT,
        &[&a, &b],
        || ask(port).and_then(|r| if r == "b" { Ok(()) } else { Err(r) }),
    );
    assert_eq!(targets(&a, "ghost").unwrap(), ["b"]);

    b.ok(&["connector", "delete", "ghost"]);
    wait_for(
        "a's listener to refuse again once the connector is gone",
        ROUTE_TIMEOUT,
        &[&a, &b],
        || refusal(port).map_err(|e| e.to_string()),
    );
    assert_eq!(refusal(port), Ok(Refusal::Reset));
    assert_eq!(targets(&a, "ghost").unwrap(), Vec::<String>::new());
}

/// 1000 clients open at the same time through one link, each echoing its own 4 KiB.
fn a_thousand_concurrent_connections_through_one_link() {
    const N: usize = 1000;
    const LEN: usize = 4096;
    let backends = Backends::new();
    let echo = backends.start(Behaviour::Echo);
    let a = Site::start("a");
    let b = Site::start("b");
    a.link_to(&b);
    connector(&b, "echo", "echo", echo.port);
    let port = listener(&a, "echo", "balanced");
    wait_targets(&a, "echo", &["b"], &[&a, &b]);

    let start = Instant::now();
    let established = Arc::new(AtomicUsize::new(0));
    let result = backends.rt.block_on({
        let established = established.clone();
        async move {
            let barrier = Arc::new(tokio::sync::Barrier::new(N));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..N {
                let barrier = barrier.clone();
                let established = established.clone();
                tasks.spawn(async move {
                    let msg = message(i as u64, LEN);
                    // Connect and get the echo back: the connection is carried end to end.
                    let first = tokio::time::timeout(Duration::from_secs(40), async {
                        let mut stream = tokio::net::TcpStream::connect(local(port))
                            .await
                            .map_err(|e| format!("connect: {e}"))?;
                        stream
                            .write_all(&msg)
                            .await
                            .map_err(|e| format!("write: {e}"))?;
                        let mut back = vec![0u8; LEN];
                        stream
                            .read_exact(&mut back)
                            .await
                            .map_err(|e| format!("read: {e}"))?;
                        if back != msg {
                            return Err("echo differs".to_string());
                        }
                        Ok(stream)
                    })
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                    if first.is_ok() {
                        established.fetch_add(1, Ordering::SeqCst);
                    }
                    // Every client waits here, so all N are open at the same time.
                    barrier.wait().await;
                    let mut stream = first.map_err(|e| format!("client {i}: {e}"))?;
                    stream.shutdown().await.map_err(|e| e.to_string())?;
                    let mut rest = Vec::new();
                    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest))
                        .await
                        .map_err(|_| format!("client {i}: no EOF"))?
                        .map_err(|e| format!("client {i}: read EOF: {e}"))?;
                    if rest.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("client {i}: {} extra bytes", rest.len()))
                    }
                });
            }
            let mut failures = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined.expect("client task panicked") {
                    failures.push(e);
                }
            }
            failures
        }
    });
    let elapsed = start.elapsed();
    eprintln!(
        "{N} concurrent echo connections in {elapsed:.2?}; backend saw {} at once",
        echo.stats.max_open.load(Ordering::SeqCst)
    );
    assert!(
        result.is_empty(),
        "{} of {N} connections failed ({} were established); first: {:?}\n{}",
        result.len(),
        established.load(Ordering::SeqCst),
        &result[..result.len().min(5)],
        report(&[&a, &b])
    );
    assert_eq!(echo.stats.accepted.load(Ordering::SeqCst), N);
    assert_eq!(echo.stats.max_open.load(Ordering::SeqCst), N);
}

/// b's connector points at a closed port, c's at an echo server: every connection is served
/// (by c), and what the client wrote before its connection was accepted reaches c intact. Once
/// c no longer serves, the refusing b is all that is left and clients are reset.
fn a_refusing_site_is_skipped() {
    const N: usize = 100;
    let backends = Backends::new();
    let echo = backends.start(Behaviour::Echo);
    let a = Site::start("a");
    let b = Site::start("b");
    let c = Site::start("c");
    a.link_to(&b);
    a.link_to(&c);
    let refusing = refusing_port();
    connector(&b, "echo", "echo", refusing.port); // nothing listens there
    connector(&c, "echo", "echo", echo.port);
    let port = listener(&a, "echo", "balanced");
    wait_targets(&a, "echo", &["b", "c"], &[&a, &b, &c]);

    for i in 0..N {
        let msg = message(i as u64, 64 * 1024 + i);
        if let Err(e) = echo_round_trip(port, &msg) {
            panic!("connection {i}: {e}\n{}", report(&[&a, &b, &c]));
        }
    }
    assert_eq!(echo.stats.accepted.load(Ordering::SeqCst), N);

    // With c gone, the only site left refuses: the client is reset, not served nor left hanging.
    c.ok(&["connector", "delete", "echo"]);
    wait_targets(&a, "echo", &["b"], &[&a, &b, &c]);
    for _ in 0..3 {
        assert_eq!(
            refusal(port),
            Ok(Refusal::Reset),
            "every site refuses: the client must be reset\n{}",
            report(&[&a, &b])
        );
    }
}

/// Listeners and connectors are restored after both sites restart (SIGTERM, start) and carry
/// traffic again on the same port; a connection in flight through the stopping site is reset;
/// a listener on a port in use is refused with a clear message and not stored.
fn listeners_and_connectors_survive_a_restart() {
    let backends = Backends::new();
    let echo = backends.start(Behaviour::Echo);
    let mut a = Site::start("a");
    let mut b = Site::start("b");
    a.link_to(&b);
    connector(&b, "echo", "echo", echo.port);
    let port = listener(&a, "echo", "balanced");
    wait_targets(&a, "echo", &["b"], &[&a, &b]);
    echo_round_trip(port, &message(1, 10_000)).expect("traffic before the restart");
    let mut in_flight = connect(port).unwrap();
    in_flight.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    in_flight.read_exact(&mut pong).unwrap();

    b.stop_now();
    b.run();
    // The connection carried through b while b stopped is broken, and must look broken.
    match in_flight.read(&mut pong) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("a connection carried through a stopped site: {other:?}, not a reset"),
    }
    a.restart();
    let listed: Value = serde_json::from_str(&a.ok(&["listener", "list", "-o", "json"])).unwrap();
    assert_eq!(listed[0]["port"], port, "{listed}");
    assert_eq!(listed[0]["error"], Value::Null, "{listed}");
    let connectors: Value =
        serde_json::from_str(&b.ok(&["connector", "list", "-o", "json"])).unwrap();
    assert_eq!(connectors[0]["port"], echo.port, "{connectors}");
    wait_targets(&a, "echo", &["b"], &[&a, &b]);
    for i in 0..20 {
        if let Err(e) = echo_round_trip(port, &message(100 + i, 10_000)) {
            panic!(
                "after the restart, connection {i}: {e}\n{}",
                report(&[&a, &b])
            );
        }
    }

    // A port in use: by this process, and by a's own listener.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    for busy in [taken_port, port] {
        let err = a.fails(&[
            "listener",
            "create",
            "echo",
            "--name",
            "second",
            "--port",
            &busy.to_string(),
        ]);
        eprintln!("listener on a busy port: {}", err.trim());
        assert!(
            err.contains(&format!("127.0.0.1:{busy}")) && err.contains("in use"),
            "unclear error for a port in use: {err}"
        );
    }
    let listed: Value = serde_json::from_str(&a.ok(&["listener", "list", "-o", "json"])).unwrap();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "a refused listener was stored: {listed}"
    );
    echo_round_trip(port, &message(2, 10_000)).expect("the first listener still serves");
}

// ---------------------------------------------------------------------------------------------
// Beyond the list: properties the docs promise that the tests above do not reach.
// ---------------------------------------------------------------------------------------------

/// Clients that stop reading must cost only their own connections: other connections on the
/// same link keep flowing, the link stays up, and the stalled connections resume intact when
/// their clients read again.
fn stalled_readers_do_not_freeze_the_link() {
    const STALLED: usize = 12;
    const SEED: u64 = 12;
    let backends = Backends::new();
    // The client half-closes at once; the sink answers "0 ok\n" and then data without end.
    let flood = backends.start(Behaviour::Sink {
        seed: SEED,
        reply: u64::MAX,
    });
    let echo = backends.start(Behaviour::Echo);
    let a = Site::start("a");
    let b = Site::start("b");
    a.link_to(&b);
    connector(&b, "flood", "flood", flood.port);
    connector(&b, "echo", "echo", echo.port);
    let flood_port = listener(&a, "flood", "balanced");
    let echo_port = listener(&a, "echo", "balanced");
    wait_targets(&a, "flood", &["b"], &[&a, &b]);
    wait_targets(&a, "echo", &["b"], &[&a, &b]);
    let since = a.link_up("b", "outgoing").unwrap()["since"].clone();

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let stream = connect(flood_port).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        stalled.push(stream); // and nobody reads it for a while
    }
    let mut i = 0;
    hold_for(
        "echo connections on the same link succeed and the link stays up",
        Duration::from_secs(4),
        Duration::from_millis(200),
        &[&a, &b],
        || {
            i += 1;
            echo_round_trip(echo_port, &message(i, 1000)).map_err(|e| format!("echo: {e}"))?;
            let link = a.link_up("b", "outgoing")?;
            if link["since"] != since {
                return Err(format!("the link went down and came back: {link}"));
            }
            Ok(())
        },
    );
    for (n, stream) in stalled.iter_mut().enumerate() {
        let mut line = [0u8; 5];
        stream
            .read_exact(&mut line)
            .unwrap_or_else(|e| panic!("stalled client {n}: {e}\n{}", report(&[&a, &b])));
        assert_eq!(&line, b"0 ok\n");
        let mut verifier = Verifier::new(SEED + 1);
        let mut buf = vec![0u8; 256 * 1024];
        while verifier.count < 4 * 1024 * 1024 {
            match stream.read(&mut buf) {
                Ok(0) => panic!("stalled client {n}: EOF\n{}", report(&[&a, &b])),
                Ok(k) => verifier.update(&buf[..k]),
                Err(e) => panic!(
                    "stalled client {n}: {e} after {} bytes\n{}",
                    verifier.count,
                    report(&[&a, &b])
                ),
            }
        }
        assert_eq!(verifier.mismatch, None, "stalled client {n}: corrupt data");
    }
}

/// `round-robin` gives every reachable site its turn, the listener's own site included.
fn round_robin_takes_every_site_in_turn() {
    const N: usize = 90;
    let backends = Backends::new();
    let a = Site::start("a");
    let b = Site::start("b");
    let c = Site::start("c");
    a.link_to(&b);
    a.link_to(&c);
    for site in [&a, &b, &c] {
        let backend = backends.start(Behaviour::Name(site.name.clone()));
        connector(site, "svc", "svc", backend.port);
    }
    let port = listener(&a, "svc", "round-robin");
    wait_targets(&a, "svc", &["a", "b", "c"], &[&a, &b, &c]);
    let counts = tally(port, N, &[&a, &b, &c]);
    assert_eq!(
        counts,
        BTreeMap::from([
            ("a".to_string(), N / 3),
            ("b".to_string(), N / 3),
            ("c".to_string(), N / 3)
        ]),
        "round-robin did not give each site its turn"
    );
}

/// `site run --busy-poll`: sites that busy-poll carry many small round trips intact, and once
/// the traffic stops they sleep again instead of spinning on.
fn busy_polling_sites_carry_traffic_and_rest_when_idle() {
    const ROUND_TRIPS: u64 = 2_000;
    const IDLE: Duration = Duration::from_secs(3);
    let backends = Backends::new();
    let echo = backends.start(Behaviour::Echo);
    let start = |name: &str| {
        let mut site = Site::init(name, &[]);
        site.run_args = ["--threads", "1", "--busy-poll", "200us"]
            .map(String::from)
            .to_vec();
        site.run();
        site
    };
    let a = start("a");
    let b = start("b");
    a.link_to(&b);
    connector(&b, "echo", "echo", echo.port);
    let port = listener(&a, "echo", "balanced");
    wait_targets(&a, "echo", &["b"], &[&a, &b]);

    let mut stream = connect(port).expect("connect to the listener");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let mut back = vec![0u8; 64];
    for i in 0..ROUND_TRIPS {
        let msg = message(i, 64);
        stream.write_all(&msg).expect("write a message");
        stream
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("round trip {i}: {e}\n{}", report(&[&a, &b])));
        assert_eq!(back, msg, "round trip {i}: the echo differs");
    }
    drop(stream);

    // Let the last connection close, then watch the idle sites.
    std::thread::sleep(Duration::from_secs(1));
    let pids = [a.pid(), b.pid()];
    let before = pids.map(cpu_seconds);
    std::thread::sleep(IDLE);
    let used = [0, 1].map(|i| cpu_seconds(pids[i]) - before[i]);
    // A site that kept spinning would use about a core: IDLE seconds.
    for (site, used) in [&a, &b].iter().zip(used) {
        assert!(
            used < IDLE.as_secs_f64() / 6.0,
            "site {} used {used:.2} s of CPU in {IDLE:?} without traffic: it did not stop \
             busy-polling",
            site.name
        );
    }
}

/// Sockets of this network namespace in TCP state `state` (`0A` listening, `01` established)
/// whose local (or, with `remote`, remote) port is `port`, from /proc/net/tcp and tcp6.
fn tcp_sockets(port: u16, state: &str, remote: bool) -> usize {
    let column = if remote { 2 } else { 1 };
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|line| {
                    line.split_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .filter(|f| f.len() > 3 && f[column].ends_with(&port) && f[3] == state)
        .count()
}

/// Sites of three and two shards (`--shards`): every shard accepts on every listener's port,
/// connections whichever shard takes them arrive whole in both directions, and over TLS the
/// link gets one lane, as the acceptor has a shard for one and refuses the second.
fn sharded_sites_carry_traffic_on_every_shard() {
    const CLIENTS: u64 = 8;
    const EACH: u64 = 25;
    let backends = Backends::new();
    let echo = backends.start(Behaviour::Echo);
    let start = |name: &str, shards: &str, metrics: u16| {
        let metrics = format!("127.0.0.1:{metrics}");
        let mut site = Site::init(name, &["--metrics-addr", &metrics]);
        site.run_args = ["--threads", "1", "--shards", shards]
            .map(String::from)
            .to_vec();
        site.run();
        site
    };
    let (a_metrics, b_metrics) = (free_port(), free_port());
    let a = start("a", "3", a_metrics);
    let b = start("b", "2", b_metrics);
    a.link_to(&b);
    connector(&b, "to-b", "echo-b", echo.port);
    connector(&a, "to-a", "echo-a", echo.port);
    let to_b = listener(&a, "to-b", "balanced");
    let to_a = listener(&b, "to-a", "balanced");
    wait_targets(&a, "to-b", &["b"], &[&a, &b]);
    wait_targets(&b, "to-a", &["a"], &[&a, &b]);
    wait_for(
        "a socket per shard on each listener's port",
        ROUTE_TIMEOUT,
        &[&a, &b],
        || match (
            tcp_sockets(to_b, "0A", false),
            tcp_sockets(to_a, "0A", false),
        ) {
            (3, 2) => Ok(()),
            other => Err(format!("listening sockets (a, b): {other:?}")),
        },
    );
    // Sockets bound to share a port must not let a second listener join them.
    for site in [&a, &b] {
        let port = to_b.to_string();
        let err = site.fails(&[
            "listener", "create", "to-b", "--name", "again", "--port", &port,
        ]);
        assert!(err.contains("in use"), "site {}: {err}", site.name);
    }
    assert_eq!(tcp_sockets(to_b, "0A", false), 3, "{}", report(&[&a, &b]));
    if common::transport() == "tls" {
        wait_for("a's lanes", ROUTE_TIMEOUT, &[&a, &b], || {
            let logs = a.logs();
            let line = logs.lines().find(|l| l.contains("link lanes up"));
            match line {
                Some(l) if l.ends_with("lanes=1") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        // The first pair and one lane: four connections from a to b's link port.
        assert_eq!(tcp_sockets(b.port, "01", true), 4, "{}", report(&[&a, &b]));
    }
    // Both sides count the lane; a QUIC link has none.
    let lanes = if common::transport() == "tls" { 1 } else { 0 };
    for (site, port, peer) in [(&a, a_metrics, "b"), (&b, b_metrics, "a")] {
        let series = format!("skiff_link_lanes{{peer_site=\"{peer}\"}} {lanes}");
        wait_for("the lanes metric", ROUTE_TIMEOUT, &[&a, &b], || {
            let (_, body) = common::http_get(port, "/metrics")?;
            match body.lines().find(|l| l.starts_with("skiff_link_lanes{")) {
                Some(line) if line == series => Ok(()),
                other => Err(format!("site {}: {other:?}", site.name)),
            }
        });
    }
    // `link status` shows them too (none on a QUIC link), in JSON and in its table.
    let expected = if common::transport() == "tls" {
        serde_json::json!(1)
    } else {
        serde_json::Value::Null
    };
    for (site, peer, direction) in [(&a, "b", "outgoing"), (&b, "a", "incoming")] {
        let link = site.link_up(peer, direction).unwrap();
        assert_eq!(link["lanes"], expected, "{link}");
    }
    let table = a.cli(&["link", "status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let (header, row) = (table.lines().next().unwrap(), table.lines().nth(1).unwrap());
    let column = header.find("LANES").expect(&table);
    let cell = row[column..].split_whitespace().next().unwrap_or_default();
    let want = if common::transport() == "tls" {
        "1"
    } else {
        "-"
    };
    assert_eq!(cell, want, "{table}");
    // The kernel spreads new connections over the shards' sockets by their addresses: with
    // hundreds, every shard takes some.
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let sites = [&a, &b];
            scope.spawn(move || {
                for i in 0..EACH {
                    for port in [to_b, to_a] {
                        let msg = message(client * 1000 + i, 1000);
                        echo_round_trip(port, &msg).unwrap_or_else(|e| {
                            panic!(
                                "client {client}, connection {i} to {port}: {e}\n{}",
                                report(&sites)
                            )
                        });
                    }
                }
            });
        }
    });
}

// Every scenario runs once over TLS links and once over QUIC links.
on_every_transport!(
    gigabyte_over_two_hops_arrives_intact,
    half_close_keeps_the_reply_coming,
    killing_the_middle_router_resets_the_client,
    balanced_spreads_across_equal_sites,
    closest_prefers_the_cheaper_site,
    source_affinity_sticks_and_moves_only_departed_clients,
    failover_after_a_site_dies_is_invisible,
    listener_refuses_without_a_target_and_recovers,
    a_thousand_concurrent_connections_through_one_link,
    a_refusing_site_is_skipped,
    listeners_and_connectors_survive_a_restart,
    stalled_readers_do_not_freeze_the_link,
    round_robin_takes_every_site_in_turn,
    busy_polling_sites_carry_traffic_and_rest_when_idle,
    sharded_sites_carry_traffic_on_every_shard,
);
