//! Carrying TCP connections: listeners at the origin, connectors at the destination, and the
//! transit hops between them.
//!
//! - Origin: a listener accepts a client, orders the sites serving its key with the listener's
//!   strategy, and tries them in turn. For a remote site it opens a stream on the link towards
//!   the next hop and writes the [`StreamHeader`]; while it waits for the [`ConnectResult`] it
//!   already forwards what the client sends (up to 64 KiB), so a client's first request
//!   travels with the stream's opening instead of a round trip later. Those bytes are kept
//!   until the site accepts: a refusal loses nothing, the next site gets them first.
//! - Transit: a stream whose destination is another site is relayed to the next hop, header
//!   first (with one hop less to live), then bytes both ways.
//! - Destination: the stream's key is served by this site's connectors; the router connects to
//!   one (trying the others if it refuses), answers with the result, then splices.

pub(crate) mod splice;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::link::transport::{RecvStream, SendStream, Transport};
use crate::link::{AnyRecv, AnySend};
use crate::metrics::{KeySeries, PeerLabels, Tally, TargetLabels};
use crate::proto::balance::{self, Candidate, Strategy};
use crate::proto::stream::{ConnectResult, ConnectStatus, StreamHeader, DEFAULT_TTL};
use crate::proto::StreamKind;
use crate::Inner;
use splice::End;

/// Limit for connecting to a connector's backend.
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for a stream's header to arrive, and for a connect result to come back.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const RESULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Most client bytes forwarded (and kept for a retry) before a site has accepted the
/// connection; past it, the client waits for the answer.
pub(crate) const EARLY_DATA: usize = 64 * 1024;

/// Client bytes read before a site accepted the connection.
#[derive(Default)]
struct Early {
    bytes: BytesMut,
    /// The client finished sending (FIN) meanwhile.
    eof: bool,
}

/// Why a site did not take a connection, or why the attempt stopped.
enum Refusal {
    /// The site (or the way to it) refused: try the next (metric reason, detail).
    Site(&'static str, String),
    /// The client went away: stop.
    Client(String),
}

/// A service endpoint this site reaches directly: "routing key K is served at host:port".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorConfig {
    /// The connector's name.
    pub name: String,
    /// The routing key it serves.
    pub routing_key: String,
    /// The backend's host.
    pub host: String,
    /// The backend's port.
    pub port: u16,
    /// Relative share of connections (at least 1).
    pub weight: u32,
}

/// A listener: "connections to this port go to routing key K".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The listener's name.
    pub name: String,
    /// The routing key its connections go to.
    pub routing_key: String,
    /// How it chooses among the sites that serve the key.
    pub strategy: Strategy,
}

/// Accept queue of a listener's socket (the kernel caps it at `net.core.somaxconn`). The
/// default of std and tokio, 128, overflowed under bursts of new connections in the load run
/// (tests/load.rs): the kernel then drops SYNs, and each costs its client a second or more.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener's socket at `addr`, in the context of a tokio runtime. For a router with
/// several `shards` it is bound with `SO_REUSEPORT`, so that each further shard binds one of
/// its own to the same port ([`crate::Router::add_listener`]). Such a socket would also join
/// one that another listener holds (of this site, or of any process of this user) and take a
/// share of its connections, so a plain bind is tried first: a port in use is refused as it is
/// without shards.
pub fn bind_listener(addr: SocketAddr, shards: bool) -> std::io::Result<TcpListener> {
    let mut addr = addr;
    if shards {
        let probe = listener_socket(addr)?;
        probe.bind(addr)?;
        // The port the probe got, should `addr` have asked for any.
        addr = probe.local_addr()?;
    }
    listen(addr, shards)
}

/// A further shard's socket for the listener bound at `addr` (by [`bind_listener`], with
/// shards), registered with the runtime this is called on.
pub(crate) fn join_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    listen(addr, true)
}

fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = listener_socket(addr)?;
    socket.set_reuseport(reuse_port)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn listener_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do for listeners: a restarted site rebinds at once.
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// Accepts clients on `listener` until `cancel` fires.
pub(crate) async fn run_listener(
    inner: Arc<Inner>,
    config: ListenerConfig,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    let config = Arc::new(config);
    // The key's series are the same for every client: looked up once, not per connection.
    let series = Arc::new(inner.metrics.key_series(&config.routing_key));
    loop {
        let (client, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually fd exhaustion: back off instead of spinning.
                    tracing::warn!(listener = %config.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let _ = client.set_nodelay(true);
        let id = inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("conn", id, key = %config.routing_key, %from);
        inner.carried.spawn(
            origin(
                inner.clone(),
                config.clone(),
                series.clone(),
                client,
                from,
                id,
            )
            .instrument(span),
        );
    }
}

/// Serves one client of a listener.
async fn origin(
    inner: Arc<Inner>,
    config: Arc<ListenerConfig>,
    series: Arc<KeySeries>,
    client: TcpStream,
    from: SocketAddr,
    id: u64,
) {
    let started = Instant::now();
    let key = &config.routing_key;
    let metrics = &inner.metrics;
    series.active.inc();
    let _active = scopeguard(|| {
        series.active.dec();
    });
    let table = inner.table();
    let targets = table.targets(key);
    if targets.is_empty() {
        tracing::debug!("refused: no site serves the key");
        metrics.connect_error(key, "no_target");
        splice::abort_tcp(client);
        return;
    }
    let candidates: Vec<Candidate> = targets
        .iter()
        .map(|t| Candidate {
            site: t.site,
            cost: t.cost,
            weight: t.weight,
            open: inner.open_count(key, t.site),
        })
        .collect();
    let turn = inner.turn.fetch_add(1, Ordering::Relaxed);
    let order = balance::order(config.strategy, &candidates, Some(from.ip()), turn);
    let own = inner.config.site_id;
    let (to_target, to_client) = (&series.to_target, &series.to_client);
    let mut early = Early::default();
    let mut client = client;
    for index in order {
        let site = candidates[index].site;
        let site_name = table.name(site);
        let _open = OpenGuard::new(&inner, key, site);
        let outcome = if site == own {
            let local = tokio::select! {
                local = connect_local(&inner, key) => local,
                () = inner.stop().cancelled() => return splice::abort_tcp(client),
            };
            match local {
                Ok(mut server) => {
                    connected(&inner, key, &site_name, started);
                    let tallies = (
                        Tally::new([to_target.clone()]),
                        Tally::new([to_client.clone()]),
                    );
                    // Bytes a refusing site got first go to this one first.
                    if let Err(e) = server.write_all(&early.bytes).await {
                        tracing::debug!(error = %e, "local connector failed; trying the next site");
                        metrics.connect_error(key, "refused");
                        continue;
                    }
                    // Delivered: the copy is no longer needed (an idle connection holds none).
                    let sent = std::mem::take(&mut early).bytes.len();
                    tallies.0.add(sent);
                    let (end, mut moved) =
                        splice::tcp_tcp(client, server, tallies, inner.stop()).await;
                    moved.up += sent as u64;
                    (end, moved)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "local connector refused; trying the next site");
                    metrics.connect_error(key, "refused");
                    continue;
                }
            }
        } else {
            let Some(route) = table.routes.get(&site) else {
                metrics.connect_error(key, "unreachable");
                continue;
            };
            let header = StreamHeader {
                routing_key: key.clone(),
                origin: own,
                destination: site,
                connection_id: id,
                ttl: DEFAULT_TTL,
            };
            let hop = table.name(route.next_hop);
            let opened = tokio::select! {
                opened = open_remote(&inner, route.next_hop, &header, &mut client, &mut early) => opened,
                () = inner.stop().cancelled() => return splice::abort_tcp(client),
            };
            match opened {
                Ok((send, recv, leftover)) => {
                    connected(&inner, key, &site_name, started);
                    let _stream = StreamGauge::new(&inner, &hop);
                    let (tx, rx) = metrics.link_bytes(&hop);
                    let tallies = (
                        Tally::new([to_target.clone(), tx]),
                        Tally::new([to_client.clone(), rx]),
                    );
                    let sent = std::mem::take(&mut early).bytes.len();
                    tallies.0.add(sent);
                    let (end, mut moved) =
                        splice::tcp_stream(client, send, recv, leftover, tallies, inner.stop())
                            .await;
                    moved.up += sent as u64;
                    (end, moved)
                }
                Err(Refusal::Site(reason, e)) => {
                    tracing::debug!(site = %site_name, error = %e, "site refused; trying the next");
                    metrics.connect_error(key, reason);
                    continue;
                }
                Err(Refusal::Client(e)) => {
                    tracing::debug!(error = %e, "client went away before a site accepted");
                    metrics.connect_error(key, "client_gone");
                    splice::abort_tcp(client);
                    return;
                }
            }
        };
        metrics.duration.observe(started.elapsed().as_secs_f64());
        log_end(&outcome);
        if inner.config.access_log {
            let (end, moved) = &outcome;
            tracing::info!(
                target: "skiff::access",
                routing_key = %key,
                client = %from,
                target_site = %site_name,
                bytes_to_target = moved.up,
                bytes_to_client = moved.down,
                duration_ms = started.elapsed().as_millis() as u64,
                end = match end {
                    End::Clean => "closed",
                    End::Aborted(_) => "reset",
                },
                "connection"
            );
        }
        return;
    }
    tracing::debug!("refused: every site serving the key refused");
    metrics.connect_error(key, "exhausted");
    splice::abort_tcp(client);
}

/// Counts a client connection that reached `site`.
fn connected(inner: &Inner, key: &str, site: &str, started: Instant) {
    tracing::debug!(site, "connected");
    inner
        .metrics
        .opened
        .get_or_create(&TargetLabels {
            routing_key: key.to_string(),
            target_site: site.to_string(),
        })
        .inc();
    inner
        .metrics
        .connect_latency
        .observe(started.elapsed().as_secs_f64());
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Counts a carried connection on the links with a peer while it lives.
struct StreamGauge(prometheus_client::metrics::gauge::Gauge);

impl StreamGauge {
    fn new(inner: &Inner, peer: &str) -> Self {
        let gauge = inner.metrics.link_streams.get_or_create_owned(&PeerLabels {
            peer_site: peer.to_string(),
        });
        gauge.inc();
        StreamGauge(gauge)
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn log_end((end, moved): &(End, splice::Moved)) {
    match end {
        End::Clean => tracing::debug!(bytes_up = moved.up, bytes_down = moved.down, "closed"),
        End::Aborted(reason) => {
            tracing::debug!(bytes_up = moved.up, bytes_down = moved.down, %reason, "aborted")
        }
    }
}

/// Opens a stream towards `destination` through `next_hop` and waits for its connect result,
/// sending `early` first and forwarding (and keeping in `early`) what the client sends
/// meanwhile. Returns the stream and any bytes that arrived behind the result.
async fn open_remote(
    inner: &Inner,
    next_hop: Uuid,
    header: &StreamHeader,
    client: &mut TcpStream,
    early: &mut Early,
) -> Result<(AnySend, AnyRecv, Bytes), Refusal> {
    let link = |e: String| Refusal::Site("link", e);
    let timeout = || Refusal::Site("timeout", "no connect result in time".to_string());
    let transport = inner
        .transport_to(next_hop)
        .ok_or_else(|| link("no live link to the next hop".into()))?;
    let (mut send, mut recv) = tokio::time::timeout(RESULT_TIMEOUT, transport.open())
        .await
        .map_err(|_| Refusal::Site("timeout", "the link took no new stream in time".into()))?
        .map_err(|e| link(e.to_string()))?;
    let mut opening = BytesMut::from(&opening(header)[..]);
    opening.extend_from_slice(&early.bytes);
    send.send(opening.freeze())
        .await
        .map_err(|e| link(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
    let mut buf = BytesMut::new();
    // A site that refuses may stop reading before we stop sending: a failed send only ends the
    // early bytes; the answer decides.
    let mut sending = true;
    let result = loop {
        if let Some(result) = ConnectResult::decode(&mut buf).map_err(|e| link(e.to_string()))? {
            break result;
        }
        // Grow with what the client actually sends: most first requests are small, and a
        // client that sends nothing before the answer should cost next to nothing.
        let room = EARLY_DATA.saturating_sub(early.bytes.len());
        if room > 0 && early.bytes.capacity() == early.bytes.len() {
            early.bytes.reserve(room.min(early.bytes.len().max(2048)));
        }
        let reading = sending && !early.eof && room > 0;
        let before = early.bytes.len();
        tokio::select! {
            chunk = recv.recv() => match chunk {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => return Err(link("stream closed before a connect result".into())),
                Err(e) => return Err(link(e.to_string())),
            },
            read = client.read_buf(&mut early.bytes), if reading => match read {
                Ok(0) => early.eof = true,
                Ok(_) => {
                    let fresh = Bytes::copy_from_slice(&early.bytes[before..]);
                    if send.send(fresh).await.is_err() {
                        sending = false;
                    }
                }
                Err(e) => {
                    send.reset();
                    return Err(Refusal::Client(e.to_string()));
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                send.reset();
                return Err(timeout());
            }
        }
    };
    let reason = match result.status {
        ConnectStatus::Ok if sending => return Ok((send, recv, buf.freeze())),
        ConnectStatus::Ok => "link",
        ConnectStatus::Refused => "refused",
        ConnectStatus::NoTarget => "no_target_at_destination",
        ConnectStatus::Unreachable => "unreachable",
    };
    send.reset();
    Err(Refusal::Site(
        reason,
        format!("{:?}: {}", result.status, result.detail),
    ))
}

/// The first bytes of a carried connection's stream: the stream kind, then the header.
fn opening(header: &StreamHeader) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.extend_from_slice(&[StreamKind::Connection.to_byte()]);
    header.encode(&mut out);
    out.freeze()
}

/// Connects to one of this site's connectors for `key`, trying each (in weighted turn) until
/// one accepts.
async fn connect_local(inner: &Inner, key: &str) -> Result<TcpStream, String> {
    let connectors = inner.connectors();
    let Some(list) = connectors.get(key).filter(|l| !l.is_empty()) else {
        return Err(format!("no connector for {key}"));
    };
    let candidates: Vec<Candidate> = list
        .iter()
        .map(|c| Candidate {
            site: Uuid::nil(),
            cost: 0,
            weight: c.weight.max(1),
            open: 0,
        })
        .collect();
    let turn = inner.local_turn.fetch_add(1, Ordering::Relaxed);
    let mut errors = Vec::new();
    for index in balance::order(Strategy::RoundRobin, &candidates, None, turn) {
        let c = &list[index];
        let connect = TcpStream::connect((c.host.as_str(), c.port));
        match tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => errors.push(format!("{}:{}: {e}", c.host, c.port)),
            Err(_) => errors.push(format!("{}:{}: connect timed out", c.host, c.port)),
        }
    }
    Err(errors.join("; "))
}

/// Serves a stream a neighbour opened on a link.
pub(crate) async fn serve_stream(
    inner: Arc<Inner>,
    peer: String,
    mut send: AnySend,
    mut recv: AnyRecv,
) {
    let _stream = StreamGauge::new(&inner, &peer);
    let read = tokio::select! {
        read = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv)) => read,
        () = inner.stop().cancelled() => return send.reset(),
    };
    let (header, leftover) = match read {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad stream from a neighbour");
            send.reset();
            return;
        }
        Err(_) => {
            send.reset();
            return;
        }
    };
    let span = tracing::debug_span!(
        "conn",
        id = header.connection_id,
        key = %header.routing_key,
        origin = %header.origin,
    );
    async move {
        if header.destination == inner.config.site_id {
            destination(&inner, &peer, &header, send, recv, leftover).await;
        } else {
            transit(&inner, &peer, header, send, recv, leftover).await;
        }
    }
    .instrument(span)
    .await
}

/// Refuses a stream a neighbour opened beyond the link's stream limit: reads its header (so
/// that the refusal answers the request rather than cutting it) and answers
/// [`ConnectStatus::Refused`], which makes the origin try the next site or reset its client.
pub(crate) async fn refuse_stream(inner: Arc<Inner>, mut send: AnySend, mut recv: AnyRecv) {
    let read = tokio::select! {
        read = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv)) => read,
        () = inner.stop().cancelled() => return send.reset(),
    };
    if !matches!(read, Ok(Ok(_))) {
        return send.reset();
    }
    let detail = format!(
        "site {} already carries the most connections this link may open ({})",
        inner.config.site_name, inner.config.max_link_streams
    );
    refuse(&mut send, ConnectStatus::Refused, detail).await;
}

async fn read_header(recv: &mut AnyRecv) -> Result<(StreamHeader, Bytes), String> {
    let mut buf = BytesMut::new();
    let mut kind_checked = false;
    loop {
        if !kind_checked && !buf.is_empty() {
            if StreamKind::from_byte(buf[0]) != Some(StreamKind::Connection) {
                return Err(format!("unexpected stream kind {}", buf[0]));
            }
            let _ = buf.split_to(1);
            kind_checked = true;
        }
        if kind_checked {
            if let Some(header) = StreamHeader::decode(&mut buf).map_err(|e| e.to_string())? {
                return Ok((header, buf.freeze()));
            }
        }
        match recv.recv().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) => return Err("stream ended before its header".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn send_result(send: &mut AnySend, result: ConnectResult) -> Result<(), String> {
    let mut out = BytesMut::with_capacity(16 + result.detail.len());
    result.encode(&mut out);
    send.send(out.freeze()).await.map_err(|e| e.to_string())
}

async fn refuse(send: &mut AnySend, status: ConnectStatus, detail: String) {
    tracing::debug!(?status, %detail, "refusing a carried connection");
    if send_result(send, ConnectResult::failed(status, detail))
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}

async fn destination(
    inner: &Inner,
    peer: &str,
    header: &StreamHeader,
    mut send: AnySend,
    recv: AnyRecv,
    leftover: Bytes,
) {
    // A draining site refuses like one without the key: the origin tries the next site before
    // its client notices.
    if inner.draining.load(Ordering::Acquire) {
        let detail = format!("site {} is draining", inner.config.site_name);
        return refuse(&mut send, ConnectStatus::NoTarget, detail).await;
    }
    if !inner.connectors().contains_key(&header.routing_key) {
        let detail = format!(
            "site {} does not serve {}",
            inner.config.site_name, header.routing_key
        );
        return refuse(&mut send, ConnectStatus::NoTarget, detail).await;
    }
    let local = tokio::select! {
        local = connect_local(inner, &header.routing_key) => local,
        () = inner.stop().cancelled() => return send.reset(),
    };
    match local {
        Ok(server) => {
            if send_result(&mut send, ConnectResult::ok()).await.is_err() {
                splice::abort_tcp(server);
                return;
            }
            tracing::debug!("connected to a local connector");
            let (tx, rx) = inner.metrics.link_bytes(peer);
            let tallies = (Tally::new([tx]), Tally::new([rx]));
            let stop = inner.stop();
            log_end(&splice::tcp_stream(server, send, recv, leftover, tallies, stop).await);
        }
        Err(e) => refuse(&mut send, ConnectStatus::Refused, e).await,
    }
}

async fn transit(
    inner: &Inner,
    peer: &str,
    mut header: StreamHeader,
    mut send: AnySend,
    recv: AnyRecv,
    leftover: Bytes,
) {
    if header.ttl == 0 {
        return refuse(
            &mut send,
            ConnectStatus::Unreachable,
            "hop limit reached".into(),
        )
        .await;
    }
    header.ttl -= 1;
    let table = inner.table();
    let Some(route) = table.routes.get(&header.destination) else {
        let detail = format!(
            "site {} has no route to {}",
            inner.config.site_name, header.destination
        );
        return refuse(&mut send, ConnectStatus::Unreachable, detail).await;
    };
    let Some(transport) = inner.transport_to(route.next_hop) else {
        let detail = format!(
            "site {} lost its link to the next hop",
            inner.config.site_name
        );
        return refuse(&mut send, ConnectStatus::Unreachable, detail).await;
    };
    let opened = tokio::select! {
        opened = tokio::time::timeout(RESULT_TIMEOUT, transport.open()) => opened,
        () = inner.stop().cancelled() => return send.reset(),
    };
    let (mut next_send, next_recv) = match opened {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return refuse(&mut send, ConnectStatus::Unreachable, e.to_string()).await,
        Err(_) => {
            let detail = "the next hop took no new stream in time".to_string();
            return refuse(&mut send, ConnectStatus::Unreachable, detail).await;
        }
    };
    if let Err(e) = next_send.send(opening(&header)).await {
        return refuse(&mut send, ConnectStatus::Unreachable, e.to_string()).await;
    }
    let hop = table.name(route.next_hop);
    tracing::debug!(next_hop = %hop, "relaying");
    let _stream = StreamGauge::new(inner, &hop);
    let (peer_tx, peer_rx) = inner.metrics.link_bytes(peer);
    let (hop_tx, hop_rx) = inner.metrics.link_bytes(&hop);
    let tallies = (Tally::new([peer_rx, hop_tx]), Tally::new([hop_rx, peer_tx]));
    // The connect result and everything after it are just bytes to a transit router.
    let (a, b) = ((send, recv), (next_send, next_recv));
    log_end(&splice::stream_stream(a, b, leftover, tallies, inner.stop()).await);
}

/// Counts a connection (attempt) to `site` for `key` while it lives, for the balanced strategy.
struct OpenGuard<'a> {
    inner: &'a Inner,
    key: String,
    site: Uuid,
}

impl<'a> OpenGuard<'a> {
    fn new(inner: &'a Inner, key: &str, site: Uuid) -> Self {
        *inner
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((key.to_string(), site))
            .or_default() += 1;
        OpenGuard {
            inner,
            key: key.to_string(),
            site,
        }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let mut open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = (std::mem::take(&mut self.key), self.site);
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

impl Inner {
    /// Connections this site has open to `site` for `key`.
    pub(crate) fn open_count(&self, key: &str, site: Uuid) -> u64 {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(key.to_string(), site))
            .copied()
            .unwrap_or(0)
    }
}
