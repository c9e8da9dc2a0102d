//! The linking side: dial, authenticate, say hello, open the reverse connection, run the
//! session, and start over after a capped, jittered backoff when the link drops. A site with
//! several shards then adds a lane per further shard to a TLS link, dialed from that shard,
//! until the acceptor has no shard for the next one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rustls::pki_types::ServerName;
use skiff_certs::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::control::ControlChannel;
use super::quic::{self, QuicTransport};
use super::session::{self, Role};
use super::tls::{ClientHalf, Lanes, ServerHalf, TlsTransport};
use super::transport::Transport;
use super::{AnyRecv, AnySend, LinkTransport, TransportChoice};
use crate::proto::preface::{lane_token, LANE_READY, LINK_ACCEPTED, MAX_LANES};
use crate::proto::{ConnPreface, ConnRole, Message};
use crate::{Inner, LinkState, OutgoingLink, ALPN_LINK};

/// Keeps `link` up until `cancel` fires.
pub(crate) async fn run(inner: Arc<Inner>, link: OutgoingLink, cancel: CancellationToken) {
    let span = tracing::info_span!("link", link = %link.name, peer = %link.peer_name);
    async move {
        let mut cert = link.cert.clone();
        let mut failures: u32 = 0;
        // The last failure logged at warn level: a link that stays down retries every couple
        // of seconds, and its log should say so once, not every time.
        let mut logged: Option<String> = None;
        while !cancel.is_cancelled() {
            inner.set_outgoing(&link.name, |s| {
                s.state = LinkState::Connecting;
                s.since = SystemTime::now();
            });
            let attempt = tokio::select! {
                attempt = connect(&inner, &link, &cert) => attempt,
                _ = cancel.cancelled() => break,
            };
            match attempt {
                Ok((transport, control)) => {
                    failures = 0;
                    logged = None;
                    inner.set_outgoing(&link.name, |s| {
                        s.state = LinkState::Up;
                        s.since = SystemTime::now();
                        s.last_error = None;
                        s.connects += 1;
                        if s.connects > 1 {
                            inner
                                .metrics
                                .link_reconnects
                                .get_or_create(&crate::metrics::NameLabels {
                                    link: s.name.clone(),
                                })
                                .inc();
                        }
                        s.transport = Some(transport.kind());
                    });
                    tracing::info!(transport = transport.kind().as_str(), "link up");
                    let role = Role::Dialer {
                        name: link.name.clone(),
                        cert: &mut cert,
                    };
                    let reason = session::run(
                        &inner,
                        link.peer_site,
                        &link.peer_name,
                        link.cost,
                        role,
                        Arc::new(transport),
                        control,
                        &cancel,
                    )
                    .await;
                    tracing::info!(%reason, "link down");
                    inner.set_outgoing(&link.name, |s| {
                        s.state = LinkState::Down;
                        s.rtt = None;
                        s.transport = None;
                        s.since = SystemTime::now();
                        s.last_error = Some(reason);
                        s.cert_expires = cert.not_after().ok();
                    });
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let error = explain(error, &cert);
                    if logged.as_ref() == Some(&error) {
                        tracing::debug!(%error, failures, "link could not connect");
                    } else {
                        tracing::warn!(%error, "link could not connect (retrying)");
                        logged = Some(error.clone());
                    }
                    inner.set_outgoing(&link.name, |s| {
                        s.state = LinkState::Down;
                        s.since = SystemTime::now();
                        s.last_error = Some(error);
                    });
                }
            }
            let delay = backoff(&inner.config, failures);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => break,
            }
        }
    }
    .instrument(span)
    .await
}

/// Reconnect delay after `failures` failed attempts in a row: doubling from the minimum up to
/// the maximum, each time drawn uniformly from its upper half so that many sites whose peer
/// came back at once do not all redial in step.
fn backoff(config: &crate::Config, failures: u32) -> Duration {
    let exp = config
        .backoff_min
        .saturating_mul(1u32 << failures.min(16))
        .min(config.backoff_max);
    let jitter = rand::rng().random_range(0.5..=1.0);
    exp.mul_f64(jitter)
}

fn explain(error: String, cert: &CertifiedKey) -> String {
    // rustls says "CertificateRevoked" over TCP, quinn "invalid peer certificate: Revoked".
    if error.contains("Revoked") {
        return format!(
            "{error} (the peer site revoked this site; only its operators can let it back in, \
             with a new token)"
        );
    }
    match cert.not_after() {
        Ok(expiry) if expiry <= SystemTime::now() => format!(
            "{error} (this link's client certificate expired at {}; ask the peer for a new token \
             and run `skiff link create` again)",
            humantime_like(expiry)
        ),
        _ => error,
    }
}

fn humantime_like(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("unix time {}", d.as_secs()),
        Err(_) => "an unknown time".into(),
    }
}

type Control = ControlChannel<AnySend, AnyRecv>;

/// How long `auto` gives QUIC before falling back to TLS.
const QUIC_FALLBACK: Duration = Duration::from_secs(3);

/// One attempt: the link's transport up and hellos exchanged.
async fn connect(
    inner: &Inner,
    link: &OutgoingLink,
    cert: &CertifiedKey,
) -> Result<(LinkTransport, Control), String> {
    let tls = skiff_certs::client_config(
        &link.peer_ca_pem,
        Some(cert),
        Some(link.peer_site),
        &[ALPN_LINK],
    )
    .map_err(|e| format!("cannot build TLS config: {e}"))?;
    let quic_possible = !link.quic_endpoints.is_empty();
    match link.transport {
        TransportChoice::Tls => connect_tls(inner, link, tls).await,
        TransportChoice::Quic if !quic_possible => {
            Err("the peer offers no QUIC endpoint; use --transport tls or auto".into())
        }
        TransportChoice::Quic => connect_quic(inner, link, tls).await,
        TransportChoice::Auto if !quic_possible => connect_tls(inner, link, tls).await,
        TransportChoice::Auto => {
            let quic = tokio::time::timeout(QUIC_FALLBACK, connect_quic(inner, link, tls.clone()));
            let quic_error = match quic.await {
                Ok(Ok(up)) => return Ok(up),
                Ok(Err(e)) => e,
                Err(_) => format!("QUIC: no answer within {} s", QUIC_FALLBACK.as_secs()),
            };
            tracing::debug!(error = %quic_error, "QUIC did not get through; trying TLS");
            connect_tls(inner, link, tls)
                .await
                .map_err(|e| format!("{e} (and {quic_error})"))
        }
    }
}

/// Sends our hello and checks the peer's answer.
async fn hello(
    inner: &Inner,
    link: &OutgoingLink,
    endpoint: &str,
    control: &mut Control,
) -> Result<(), String> {
    control
        .send(&super::hello(&inner.config, link.cost))
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    match control.next().await {
        Ok(Message::Hello { site_id, .. }) if site_id == link.peer_site => Ok(()),
        Ok(Message::Hello { site_id, .. }) => Err(format!(
            "{endpoint}: peer says it is site {site_id}, expected {}",
            link.peer_site
        )),
        Ok(Message::Refuse { reason }) => Err(format!("peer refused the link: {reason}")),
        Ok(other) => Err(format!("{endpoint}: unexpected {other:?} before hello")),
        Err(e) => Err(format!("{endpoint}: {e}")),
    }
}

async fn connect_quic(
    inner: &Inner,
    link: &OutgoingLink,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(LinkTransport, Control), String> {
    let endpoint = inner.quic_endpoint().map_err(|e| format!("QUIC: {e}"))?;
    let mut errors = Vec::new();
    for target in &link.quic_endpoints {
        let attempt = tokio::time::timeout(inner.config.handshake_timeout * 2, async {
            let addr = tokio::net::lookup_host(target.as_str())
                .await
                .map_err(|e| format!("{target}: {e}"))?
                .next()
                .ok_or_else(|| format!("{target}: no address"))?;
            let host = crate::endpoint_host(target);
            let limit = crate::transport_stream_limit(inner.config.max_link_streams);
            let conn = quic::connect(&endpoint, tls.clone(), addr, host, limit)
                .await
                .map_err(|e| format!("{target}: {e}"))?;
            let transport = QuicTransport::new(conn);
            let (send, recv) = transport
                .open()
                .await
                .map_err(|e| format!("{target}: {e}"))?;
            let mut control = ControlChannel::open(AnySend::Quic(send), AnyRecv::Quic(recv))
                .await
                .map_err(|e| format!("{target}: {e}"))?;
            hello(inner, link, target, &mut control).await?;
            Ok((LinkTransport::Quic(transport), control))
        })
        .await
        .unwrap_or_else(|_| Err(format!("{target}: QUIC handshake timed out")));
        match attempt {
            Ok(up) => return Ok(up),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

async fn connect_tls(
    inner: &Inner,
    link: &OutgoingLink,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(LinkTransport, Control), String> {
    let config = &inner.config;
    let connector = TlsConnector::from(tls);
    let session: [u8; 16] = rand::random();

    let mut errors = Vec::new();
    for endpoint in &link.endpoints {
        let attempt = tokio::time::timeout(config.handshake_timeout * 2, async {
            let forward = open_tls(&connector, endpoint, config.connect_timeout).await?;
            handshake(inner, link, &connector, endpoint, forward, session).await
        })
        .await
        .unwrap_or_else(|_| Err(format!("{endpoint}: handshake timed out")));
        match attempt {
            Ok(up) => return Ok(up),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Err("the link has no endpoints".into());
    }
    Err(errors.join("; "))
}

async fn handshake(
    inner: &Inner,
    link: &OutgoingLink,
    connector: &TlsConnector,
    endpoint: &str,
    mut forward: tokio_rustls::client::TlsStream<super::tls::LinkTcp>,
    session: [u8; 16],
) -> Result<(LinkTransport, Control), String> {
    let config = &inner.config;
    let preface = ConnPreface {
        role: ConnRole::Forward,
        session,
    };
    forward
        .write_all(&preface.encode())
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let dead = CancellationToken::new();
    let client = ClientHalf::start(forward, dead.clone())
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let (send, recv) = client
        .open()
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let mut control = ControlChannel::open(AnySend::Tls(send), AnyRecv::Tls(recv))
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    hello(inner, link, endpoint, &mut control).await?;

    let preface = ConnPreface {
        role: ConnRole::Reverse,
        session,
    };
    let reverse = open_with_preface(connector, endpoint, config.connect_timeout, preface).await?;
    let limit = crate::transport_stream_limit(config.max_link_streams);
    let server = ServerHalf::start(reverse, limit, dead.clone())
        .await
        .map_err(|e| format!("{endpoint}: reverse connection: {e}"))?;
    let shards = config.shard_count().min(MAX_LANES + 1);
    let lanes = Lanes::new(&server, dead, shards, inner.metrics.lanes(&link.peer_name));
    let transport = TlsTransport::with_lanes(client, server, lanes.clone());
    if shards > 1 {
        let (connector, endpoint) = (connector.clone(), endpoint.to_string());
        let adding = add_lanes(config.clone(), connector, endpoint, session, lanes);
        tokio::spawn(adding.in_current_span());
    }
    Ok((LinkTransport::Tls(transport), control))
}

/// Attempts at a lane that fails (rather than being refused) before the link carries on
/// without it: a lane's connections can be dropped by an acceptor at its handshake limit, as
/// when many sites redial it at once after a restart.
const LANE_ATTEMPTS: u32 = 5;

/// Why a lane did not come up.
enum LaneError {
    /// The acceptor closed the lane's forward connection: it has no shard for the lane, so
    /// none for the lanes after it either.
    NoShard,
    /// A connection failed, or the acceptor did not answer in time: worth another attempt.
    Failed(String),
}

/// Adds a lane for each further shard to a link that is up, one after another, each dialed
/// from its shard's runtime; stops at the first the acceptor does not take (it has fewer
/// shards). A lane that fails is tried again after the link's backoff, up to
/// [`LANE_ATTEMPTS`] times, and then left out along with the rest. The shards without a lane
/// open their streams on the link's first pair of connections.
async fn add_lanes(
    config: crate::Config,
    connector: TlsConnector,
    endpoint: String,
    session: [u8; 16],
    lanes: Arc<Lanes>,
) {
    'lanes: for (index, runtime) in config.shards.iter().enumerate().take(MAX_LANES) {
        let shard = index + 1;
        let mut attempt = 0;
        loop {
            if lanes.is_dead() {
                return;
            }
            let lane = add_lane(&config, &connector, &endpoint, session, &lanes, shard);
            let added = runtime.spawn(lane);
            let error = match added.await {
                Ok(Ok(())) => {
                    tracing::debug!(shard, "lane up");
                    break;
                }
                Ok(Err(LaneError::NoShard)) => {
                    tracing::debug!(shard, "the peer has no shard for this lane");
                    break 'lanes;
                }
                Ok(Err(LaneError::Failed(error))) => error,
                Err(e) => format!("lane task failed: {e}"),
            };
            attempt += 1;
            if attempt == LANE_ATTEMPTS {
                tracing::warn!(
                    shard,
                    %error,
                    "lane failed {LANE_ATTEMPTS} times; the link carries on without it and the \
                     lanes after it until it redials"
                );
                break 'lanes;
            }
            tracing::debug!(shard, attempt, %error, "lane failed; trying again");
            tokio::time::sleep(backoff(&config, attempt - 1)).await;
        }
    }
    tracing::info!(lanes = lanes.up(), "link lanes up");
}

/// One attempt at lane `shard`: its two connections, the acceptor's `LANE_READY`, and HTTP/2
/// on both. Runs on the shard's runtime.
fn add_lane(
    config: &crate::Config,
    connector: &TlsConnector,
    endpoint: &str,
    session: [u8; 16],
    lanes: &Arc<Lanes>,
    shard: usize,
) -> impl std::future::Future<Output = Result<(), LaneError>> + Send + 'static {
    let token = lane_token(session, shard as u8);
    let (connector, endpoint, lanes) = (connector.clone(), endpoint.to_string(), lanes.clone());
    let (connect_timeout, handshake_timeout) = (config.connect_timeout, config.handshake_timeout);
    let limit = crate::transport_stream_limit(config.max_link_streams);
    async move {
        let failed = |e: String| LaneError::Failed(e);
        let open = |role| {
            let preface = ConnPreface {
                role,
                session: token,
            };
            open_with_preface(&connector, &endpoint, connect_timeout, preface)
        };
        let mut forward = open(ConnRole::LaneForward).await.map_err(failed)?;
        let reverse = open(ConnRole::LaneReverse).await.map_err(failed)?;
        let mut ready = [0u8; 1];
        match tokio::time::timeout(handshake_timeout, forward.read_exact(&mut ready)).await {
            Ok(Ok(_)) if ready[0] == LANE_READY => {}
            Ok(Ok(_)) => return Err(failed(format!("{endpoint}: unexpected answer to a lane"))),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(LaneError::NoShard)
            }
            Ok(Err(e)) => return Err(failed(format!("{endpoint}: {e}"))),
            Err(_) => {
                return Err(failed(format!(
                    "{endpoint}: the peer did not take it in time"
                )))
            }
        }
        // On the forward connection this site is the HTTP/2 client, on the reverse one the
        // acceptor is.
        lanes
            .add(shard, forward, reverse, limit)
            .await
            .map_err(|e| failed(format!("{endpoint}: {e}")))
    }
}

/// A link connection to `endpoint` ([`open_tls`]) that has said what it is for.
async fn open_with_preface(
    connector: &TlsConnector,
    endpoint: &str,
    connect_timeout: Duration,
    preface: ConnPreface,
) -> Result<tokio_rustls::client::TlsStream<super::tls::LinkTcp>, String> {
    let mut tls = open_tls(connector, endpoint, connect_timeout).await?;
    tls.write_all(&preface.encode())
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    Ok(tls)
}

async fn open_tls(
    connector: &TlsConnector,
    endpoint: &str,
    connect_timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<super::tls::LinkTcp>, String> {
    let host = crate::endpoint_host(endpoint);
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{endpoint}: {host:?} is not a valid host name"))?;
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| format!("{endpoint}: connect timed out"))?
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector
        .connect(server_name, super::tls::LinkTcp::new(tcp))
        .await
        .map_err(|e| format!("{endpoint}: TLS: {e}"))?;
    let mut ack = [0u8; 1];
    match tokio::time::timeout(connect_timeout, tls.read_exact(&mut ack)).await {
        Ok(Ok(_)) if ack[0] == LINK_ACCEPTED => {
            let (io, conn) = tls.get_mut();
            super::tls::ready_for_traffic(io, conn);
            Ok(tls)
        }
        Ok(Ok(_)) => Err(format!("{endpoint}: not a skiff link port")),
        Ok(Err(e)) => Err(format!("{endpoint}: TLS: {e}")),
        Err(_) => Err(format!(
            "{endpoint}: the peer did not accept the connection in time"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use skiff_certs::{Authority, Revocations};
    use tokio::net::TcpListener;
    use uuid::Uuid;

    use super::*;
    use crate::proto::preface::CONN_PREFACE_LEN;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn backoff_is_capped_and_jittered() {
        let config = crate::Config::new(uuid::Uuid::nil(), "x");
        for failures in 0..100 {
            let d = backoff(&config, failures);
            assert!(d <= config.backoff_max);
            assert!(d >= config.backoff_min / 2);
        }
        assert!(backoff(&config, 30) >= config.backoff_max / 2);
    }

    /// What the acceptor of [`lanes_against`] does with the connections it gets.
    #[derive(Clone, Copy)]
    enum Acceptor {
        /// Drops the first `n` connections unanswered, as a site at its handshake limit does,
        /// then takes lanes.
        DropsFirst(usize),
        /// Has no shard for a lane: closes its forward connection after the preface.
        NoShard,
    }

    /// Runs [`add_lanes`] for a two-shard site against an acceptor on a real TLS port that
    /// behaves as `acceptor` says; returns how many lanes came up and how many connections the
    /// acceptor got.
    async fn lanes_against(acceptor: Acceptor) -> (usize, usize) {
        let ca = Authority::generate(Uuid::from_u128(1), "b").unwrap();
        let server = ca.issue_server(&["127.0.0.1".to_string()], DAY).unwrap();
        let (key_pem, csr) = skiff_certs::generate_csr(Uuid::from_u128(2), "a").unwrap();
        let client = CertifiedKey {
            cert_pem: ca
                .sign_client_csr(&csr, Uuid::from_u128(2), "a", DAY)
                .unwrap(),
            key_pem,
        };
        let server_tls =
            skiff_certs::server_config(ca.cert_pem(), &server, Revocations::new([]), &[ALPN_LINK])
                .unwrap();
        let client_tls =
            skiff_certs::client_config(ca.cert_pem(), Some(&client), None, &[ALPN_LINK]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(AtomicUsize::new(0));
        let served = tokio::spawn(serve_lanes(listener, server_tls, acceptor, seen.clone()));

        // The dialer's first pair, in memory: lanes need its server half.
        let (lanes, _first_pair) = super::super::tls::lanes_in_memory(2).await;
        let mut config = crate::Config::new(Uuid::from_u128(2), "a");
        config.shards = vec![tokio::runtime::Handle::current()];
        config.backoff_min = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(20);
        let adding = add_lanes(
            config,
            TlsConnector::from(client_tls),
            endpoint,
            [7; 16],
            lanes.clone(),
        );
        tokio::time::timeout(Duration::from_secs(30), adding)
            .await
            .expect("add_lanes returns");
        served.abort();
        (lanes.up(), seen.load(Ordering::SeqCst))
    }

    async fn serve_lanes(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        acceptor: Acceptor,
        seen: Arc<AtomicUsize>,
    ) {
        let tls = tokio_rustls::TlsAcceptor::from(tls);
        let mut forward = None;
        let mut lanes = Vec::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if matches!(acceptor, Acceptor::DropsFirst(first) if n < first) {
                drop(tcp);
                continue;
            }
            let mut conn = tls
                .accept(super::super::tls::LinkTcp::new(tcp))
                .await
                .unwrap();
            conn.write_all(&[LINK_ACCEPTED]).await.unwrap();
            let mut raw = [0u8; CONN_PREFACE_LEN];
            conn.read_exact(&mut raw).await.unwrap();
            match (ConnPreface::decode(&raw).unwrap().role, acceptor) {
                (ConnRole::LaneForward, Acceptor::NoShard) => drop(conn),
                (ConnRole::LaneForward, _) => forward = Some(conn),
                (ConnRole::LaneReverse, _) => {
                    let Some(mut forward) = forward.take() else {
                        continue;
                    };
                    forward.write_all(&[LANE_READY]).await.unwrap();
                    let dead = CancellationToken::new();
                    let (server, client) = tokio::join!(
                        ServerHalf::start(forward, 10, dead.clone()),
                        ClientHalf::start(conn, dead),
                    );
                    lanes.push((server.unwrap(), client.unwrap()));
                }
                (role, _) => panic!("unexpected {role:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_lane_whose_connection_was_dropped_is_tried_again() {
        // The first attempt's forward connection is dropped; the second attempt's two
        // connections make the lane.
        assert_eq!(lanes_against(Acceptor::DropsFirst(1)).await, (1, 3));
    }

    #[tokio::test]
    async fn a_lane_that_keeps_failing_is_left_out() {
        let (up, seen) = lanes_against(Acceptor::DropsFirst(usize::MAX)).await;
        assert_eq!((up, seen), (0, LANE_ATTEMPTS as usize));
    }

    #[tokio::test]
    async fn a_lane_the_peer_has_no_shard_for_is_not_tried_again() {
        // Its forward and reverse connections, once.
        assert_eq!(lanes_against(Acceptor::NoShard).await, (0, 2));
    }
}
