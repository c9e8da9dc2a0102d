//! The accepting side: a TLS connection with ALPN `skiff-link/1` arrives from the link port.
//!
//! The forward connection carries the hello; once it is accepted, the acceptor waits (bounded)
//! for the reverse connection with the same session token from the same site, then the link is
//! up. Duplicates are refused here: a site that already has an outgoing link to the peer does not
//! also accept one from it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::control::ControlChannel;
use super::session::{self, Role};
use super::tls::{ClientHalf, ServerHalf, TlsTransport};
use crate::proto::preface::CONN_PREFACE_LEN;
use crate::proto::{ConnPreface, ConnRole, Message};
use crate::{Direction, Inner, LinkState, LinkStatus, VERSION};

type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// Most forward connections waiting for their reverse half at once.
const MAX_PENDING: usize = 1024;

/// Forward connections waiting for their reverse half, by session token.
#[derive(Default)]
pub(crate) struct Pending {
    waiting: HashMap<[u8; 16], (Uuid, oneshot::Sender<ServerTls>)>,
}

pub(crate) async fn run(inner: Arc<Inner>, mut tls: ServerTls) {
    let peer = skiff_certs::peer_site_id(tls.get_ref().1.peer_certificates());
    let Some(peer) = peer else {
        tracing::warn!("link connection without a client certificate refused");
        return;
    };
    let mut raw = [0u8; CONN_PREFACE_LEN];
    let read = tokio::time::timeout(inner.config.handshake_timeout, tls.read_exact(&mut raw)).await;
    let preface = match read {
        Ok(Ok(_)) => ConnPreface::decode(&raw),
        _ => {
            tracing::warn!(%peer, "link connection sent no preface in time");
            return;
        }
    };
    match preface {
        Ok(ConnPreface {
            role: ConnRole::Forward,
            session,
        }) => forward(inner, tls, peer, session).await,
        Ok(ConnPreface {
            role: ConnRole::Reverse,
            session,
        }) => {
            let waiter = {
                let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
                match pending.waiting.remove(&session) {
                    Some((site, tx)) if site == peer => Some(tx),
                    Some(entry) => {
                        // Not this site's session: put it back for its owner.
                        pending.waiting.insert(session, entry);
                        None
                    }
                    None => None,
                }
            };
            match waiter {
                Some(tx) => {
                    let _ = tx.send(tls);
                }
                None => tracing::warn!(%peer, "reverse link connection for an unknown session"),
            }
        }
        Err(e) => tracing::warn!(%peer, error = %e, "link connection refused"),
    }
}

async fn forward(inner: Arc<Inner>, tls: ServerTls, peer: Uuid, session_token: [u8; 16]) {
    let config = &inner.config;
    let dead = CancellationToken::new();
    let setup = async {
        let server = ServerHalf::start(tls, dead.clone())
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = server
            .accept()
            .await
            .ok_or("peer closed before opening its control stream")?;
        let mut control = ControlChannel::accept(send, recv)
            .await
            .map_err(|e| e.to_string())?;
        let (peer_name, cost) = match control.next().await.map_err(|e| e.to_string())? {
            Message::Hello {
                site_id,
                site_name,
                cost,
                ..
            } if site_id == peer => (site_name, cost),
            Message::Hello { site_id, .. } => {
                return Err(format!(
                    "hello names site {site_id} but the certificate is site {peer}"
                ))
            }
            other => return Err(format!("expected hello, got {other:?}")),
        };
        let duplicate = inner
            .lock()
            .outgoing
            .values()
            .find(|l| l.status.peer_site == peer)
            .map(|l| l.status.name.clone());
        if let Some(name) = duplicate {
            let reason = format!(
                "site {} already has a link to site {peer_name} (its outgoing link {name}); \
                 two sites are linked once, in one direction",
                config.site_name
            );
            let _ = control
                .send(&Message::Refuse {
                    reason: reason.clone(),
                })
                .await;
            return Err(reason);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.waiting.len() >= MAX_PENDING {
                return Err("too many links being set up at once".to_string());
            }
            pending.waiting.insert(session_token, (peer, tx));
        }
        control
            .send(&Message::Hello {
                site_id: config.site_id,
                site_name: config.site_name.clone(),
                version: VERSION.into(),
                cost,
            })
            .await
            .map_err(|e| e.to_string())?;
        let reverse = tokio::time::timeout(config.handshake_timeout, rx).await;
        let reverse = match reverse {
            Ok(Ok(reverse)) => reverse,
            _ => {
                let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.waiting.remove(&session_token);
                return Err("the peer's reverse connection did not arrive".to_string());
            }
        };
        let client = ClientHalf::start(reverse, dead.clone())
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((
            TlsTransport::new(client, server, dead.clone()),
            control,
            peer_name,
            cost,
        ))
    };
    let (transport, control, peer_name, cost) =
        match tokio::time::timeout(config.handshake_timeout * 2, setup).await {
            Ok(Ok(up)) => up,
            Ok(Err(error)) => {
                tracing::warn!(%peer, %error, "incoming link refused");
                dead.cancel();
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "incoming link setup timed out");
                dead.cancel();
                return;
            }
        };

    let cancel = inner.shutdown.child_token();
    let status = LinkStatus {
        name: peer_name.clone(),
        direction: Direction::Incoming,
        peer_site: peer,
        peer_name: peer_name.clone(),
        state: LinkState::Up,
        rtt: None,
        cost,
        since: SystemTime::now(),
        last_error: None,
        cert_expires: None,
        connects: 0,
    };
    let session_no = inner.add_incoming(status, cancel.clone());
    let span = tracing::info_span!("link", link = %peer_name, %peer, direction = "incoming");
    async {
        tracing::info!("link up");
        let reason = session::run(
            &inner,
            peer,
            &peer_name,
            cost,
            Role::Acceptor {
                session: session_no,
            },
            Arc::new(transport),
            control,
            &cancel,
        )
        .await;
        tracing::info!(%reason, "link down");
        inner.set_incoming(peer, session_no, |s| {
            s.state = LinkState::Down;
            s.rtt = None;
            s.since = SystemTime::now();
            s.last_error = Some(reason);
        });
    }
    .instrument(span)
    .await
}
