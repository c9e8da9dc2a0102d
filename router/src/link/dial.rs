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

    let mut reverse = open_tls(connector, endpoint, config.connect_timeout).await?;
    let preface = ConnPreface {
        role: ConnRole::Reverse,
        session,
    };
    reverse
        .write_all(&preface.encode())
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
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

/// Adds a lane for each further shard to a link that is up, one after another, each dialed
/// from its shard's runtime; stops at the first the acceptor does not take (it has fewer
/// shards) or that fails. The shards without a lane open their streams on the link's first
/// pair of connections.
async fn add_lanes(
    config: crate::Config,
    connector: TlsConnector,
    endpoint: String,
    session: [u8; 16],
    lanes: Arc<Lanes>,
) {
    let limit = crate::transport_stream_limit(config.max_link_streams);
    for (index, runtime) in config.shards.iter().enumerate().take(MAX_LANES) {
        let shard = index + 1;
        if lanes.is_dead() {
            return;
        }
        let token = lane_token(session, shard as u8);
        let (connector, endpoint, lane_set) = (connector.clone(), endpoint.clone(), lanes.clone());
        let (connect_timeout, handshake_timeout) =
            (config.connect_timeout, config.handshake_timeout);
        let added = runtime.spawn(async move {
            let preface = |role| ConnPreface {
                role,
                session: token,
            };
            let mut forward = open_tls(&connector, &endpoint, connect_timeout).await?;
            forward
                .write_all(&preface(ConnRole::LaneForward).encode())
                .await
                .map_err(|e| format!("{endpoint}: {e}"))?;
            let mut reverse = open_tls(&connector, &endpoint, connect_timeout).await?;
            reverse
                .write_all(&preface(ConnRole::LaneReverse).encode())
                .await
                .map_err(|e| format!("{endpoint}: {e}"))?;
            let mut ready = [0u8; 1];
            match tokio::time::timeout(handshake_timeout, forward.read_exact(&mut ready)).await {
                Ok(Ok(_)) if ready[0] == LANE_READY => {}
                Ok(Ok(_)) => return Err(format!("{endpoint}: unexpected answer to a lane")),
                Ok(Err(_)) => return Err("the peer has no shard for it".to_string()),
                Err(_) => return Err("the peer did not take it in time".to_string()),
            }
            // On the forward connection this site is the HTTP/2 client, on the reverse one the
            // acceptor is.
            lane_set
                .add(shard, forward, reverse, limit)
                .await
                .map_err(|e| format!("{endpoint}: {e}"))
        });
        match added.await {
            Ok(Ok(())) => tracing::debug!(shard, "lane up"),
            Ok(Err(error)) => {
                tracing::debug!(shard, %error, "no lane for this shard");
                break;
            }
            Err(e) => {
                tracing::debug!(shard, error = %e, "lane task failed");
                break;
            }
        }
    }
    tracing::info!(lanes = lanes.up(), "link lanes up");
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
    use super::*;

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
}
