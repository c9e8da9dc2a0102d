//! The linking side: dial, authenticate, say hello, open the reverse connection, run the
//! session, and start over after a capped, jittered backoff when the link drops.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rustls::pki_types::ServerName;
use skiff_certs::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::control::ControlChannel;
use super::session::{self, Role};
use super::tls::{ClientHalf, ServerHalf, TlsTransport};
use crate::proto::{ConnPreface, ConnRole, Message};
use crate::{Inner, LinkState, OutgoingLink, ALPN_LINK, VERSION};

/// Keeps `link` up until `cancel` fires.
pub(crate) async fn run(inner: Arc<Inner>, link: OutgoingLink, cancel: CancellationToken) {
    let span = tracing::info_span!("link", link = %link.name, peer = %link.peer_name);
    async move {
        let mut cert = link.cert.clone();
        let mut failures: u32 = 0;
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
                    tracing::info!("link up");
                    inner.set_outgoing(&link.name, |s| {
                        s.state = LinkState::Up;
                        s.since = SystemTime::now();
                        s.last_error = None;
                        s.connects += 1;
                    });
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
                        s.since = SystemTime::now();
                        s.last_error = Some(reason);
                        s.cert_expires = cert.not_after().ok();
                    });
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let error = explain(error, &cert);
                    tracing::warn!(%error, "link could not connect");
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
    if error.contains("CertificateRevoked") {
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

type Control = ControlChannel<super::tls::H2Send, super::tls::H2Recv>;

/// One attempt: both connections up, hellos exchanged.
async fn connect(
    inner: &Inner,
    link: &OutgoingLink,
    cert: &CertifiedKey,
) -> Result<(TlsTransport, Control), String> {
    let config = &inner.config;
    let tls = skiff_certs::client_config(
        &link.peer_ca_pem,
        Some(cert),
        Some(link.peer_site),
        &[ALPN_LINK],
    )
    .map_err(|e| format!("cannot build TLS config: {e}"))?;
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
    mut forward: tokio_rustls::client::TlsStream<TcpStream>,
    session: [u8; 16],
) -> Result<(TlsTransport, Control), String> {
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
    let mut control = ControlChannel::open(send, recv)
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    control
        .send(&Message::Hello {
            site_id: config.site_id,
            site_name: config.site_name.clone(),
            version: VERSION.into(),
            cost: link.cost,
        })
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    match control.next().await {
        Ok(Message::Hello { site_id, .. }) if site_id == link.peer_site => {}
        Ok(Message::Hello { site_id, .. }) => {
            return Err(format!(
                "{endpoint}: peer says it is site {site_id}, expected {}",
                link.peer_site
            ))
        }
        Ok(Message::Refuse { reason }) => return Err(format!("peer refused the link: {reason}")),
        Ok(other) => return Err(format!("{endpoint}: unexpected {other:?} before hello")),
        Err(e) => return Err(format!("{endpoint}: {e}")),
    }

    let mut reverse = open_tls(connector, endpoint, config.connect_timeout).await?;
    let preface = ConnPreface {
        role: ConnRole::Reverse,
        session,
    };
    reverse
        .write_all(&preface.encode())
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let server = ServerHalf::start(reverse, dead.clone())
        .await
        .map_err(|e| format!("{endpoint}: reverse connection: {e}"))?;
    Ok((TlsTransport::new(client, server, dead), control))
}

async fn open_tls(
    connector: &TlsConnector,
    endpoint: &str,
    connect_timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let host = crate::endpoint_host(endpoint);
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{endpoint}: {host:?} is not a valid host name"))?;
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| format!("{endpoint}: connect timed out"))?
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("{endpoint}: TLS: {e}"))
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
