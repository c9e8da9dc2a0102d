//! The accepting side: a TLS connection with ALPN `skiff-link/1` arrives from the link port.
//!
//! The forward connection carries the hello; once it is accepted, the acceptor waits (bounded)
//! for the reverse connection with the same session token from the same site, then the link is
//! up. Duplicates are refused here: a site that already has an outgoing link to the peer does not
//! also accept one from it.
//!
//! A site with several shards expects a lane per further shard once a TLS link is up: its two
//! connections carry the lane's token, they are paired like a link's first two, moved to the
//! shard's runtime, and answered with `LANE_READY`. A lane for which this site has no shard is
//! closed, which tells the dialer to stop adding lanes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::control::ControlChannel;
use super::quic::QuicTransport;
use super::session::{self, Role};
use super::tls::{ClientHalf, Lanes, ServerHalf, TlsTransport};
use super::transport::Transport;
use super::{AnyRecv, AnySend, LinkTransport};
use crate::proto::preface::{lane_token, CONN_PREFACE_LEN, LANE_READY, LINK_ACCEPTED, MAX_LANES};
use crate::proto::{ConnPreface, ConnRole, Message};
use crate::reject::{Endpoint, Reason};
use crate::{Direction, Inner, LinkState, LinkStatus, ALPN_LINK};

type Control = ControlChannel<AnySend, AnyRecv>;

type ServerTls = tokio_rustls::server::TlsStream<super::tls::LinkTcp>;

/// Most forward connections waiting for their reverse half at once.
const MAX_PENDING: usize = 1024;

/// Forward connections waiting for their reverse half, by session token.
#[derive(Default)]
pub(crate) struct Pending {
    waiting: HashMap<[u8; 16], (Uuid, oneshot::Sender<ServerTls>)>,
    /// The lanes incoming links may add, by lane token, while the link is being set up or up.
    lanes: HashMap<[u8; 16], LaneSlot>,
}

impl Pending {
    /// Registers a lane's forward connection from `peer` as waiting for its reverse one, which
    /// is sent on `forward`; returns the lane's shard and the link's lanes, or `None` when no
    /// link of `peer`'s expects this lane. A newer attempt at the lane replaces one still
    /// waiting: the dialer gave up on that one and tried again, and the older attempt's
    /// receiver is told at once (its sender is dropped).
    fn await_lane_reverse(
        &mut self,
        token: &[u8; 16],
        peer: Uuid,
        forward: oneshot::Sender<ServerTls>,
    ) -> Option<(usize, Arc<Lanes>)> {
        let slot = self.lane_slot(token, peer)?;
        slot.forward = Some(forward);
        Some((slot.shard, slot.lanes.clone()))
    }

    /// Takes the sender of the lane's forward connection from `peer` that waits for its
    /// reverse connection, if there is one.
    fn lane_forward(&mut self, token: &[u8; 16], peer: Uuid) -> Option<oneshot::Sender<ServerTls>> {
        self.lane_slot(token, peer)?.forward.take()
    }

    /// Lane `token`'s slot, if a link of `peer`'s expects it.
    fn lane_slot(&mut self, token: &[u8; 16], peer: Uuid) -> Option<&mut LaneSlot> {
        self.lanes.get_mut(token).filter(|slot| slot.peer == peer)
    }
}

/// A lane an incoming link may add.
struct LaneSlot {
    peer: Uuid,
    shard: usize,
    /// The link's lanes.
    lanes: Arc<Lanes>,
    /// The lane's forward connection, waiting for its reverse one.
    forward: Option<oneshot::Sender<ServerTls>>,
}

pub(crate) async fn run(inner: Arc<Inner>, mut tls: ServerTls) {
    let (io, conn) = tls.get_mut();
    super::tls::ready_for_traffic(io, conn);
    let from = tls
        .get_ref()
        .0
        .get_ref()
        .peer_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let rejections = &inner.metrics.rejections;
    let peer = skiff_certs::peer_site_id(tls.get_ref().1.peer_certificates());
    let Some(peer) = peer else {
        rejections.reject(
            Endpoint::Link,
            Reason::NoCertificate,
            from,
            "link connection without a client certificate",
        );
        return;
    };
    if tls.write_all(&[LINK_ACCEPTED]).await.is_err() {
        return;
    }
    let mut raw = [0u8; CONN_PREFACE_LEN];
    let read = tokio::time::timeout(inner.config.handshake_timeout, tls.read_exact(&mut raw)).await;
    let preface = match read {
        Ok(Ok(_)) => ConnPreface::decode(&raw),
        Ok(Err(e)) => {
            let detail = format!("site {peer} sent no link preface ({e})");
            return rejections.reject(Endpoint::Link, Reason::Protocol, from, detail);
        }
        Err(_) => {
            let detail = format!("site {peer} sent no link preface in time");
            return rejections.reject(Endpoint::Link, Reason::Timeout, from, detail);
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
                None => rejections.reject(
                    Endpoint::Link,
                    Reason::Protocol,
                    from,
                    format!("site {peer}: reverse link connection for an unknown session"),
                ),
            }
        }
        Ok(ConnPreface {
            role: ConnRole::LaneForward,
            session,
        }) => lane(inner, tls, peer, session).await,
        Ok(ConnPreface {
            role: ConnRole::LaneReverse,
            session,
        }) => {
            let waiter = inner
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lane_forward(&session, peer);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(tls);
                }
                None => tracing::debug!(%peer, "lane reverse connection without its forward one"),
            }
        }
        Err(e) => rejections.reject(
            Endpoint::Link,
            Reason::Protocol,
            from,
            format!("site {peer}: bad link preface ({e})"),
        ),
    }
}

/// A lane's forward connection: waits for its reverse one, then starts the lane on its shard.
/// A lane this site has no shard for, or whose link is gone, is closed: the dialer then stops
/// adding lanes (it is not an error; the link carries on with the lanes it has).
async fn lane(inner: Arc<Inner>, forward: ServerTls, peer: Uuid, token: [u8; 16]) {
    let (tx, rx) = oneshot::channel();
    let slot = inner
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .await_lane_reverse(&token, peer, tx);
    let Some((shard, lanes)) = slot else {
        tracing::debug!(%peer, "no shard for this lane; closing it");
        return;
    };
    let limit = inner.config.handshake_timeout;
    let reverse = match tokio::time::timeout(limit, rx).await {
        Ok(Ok(reverse)) => reverse,
        _ => {
            tracing::debug!(%peer, shard, "the lane's reverse connection did not arrive");
            return;
        }
    };
    // A lane is added once: its slot goes.
    inner
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .lanes
        .remove(&token);
    let Some(runtime) = inner.config.shards.get(shard - 1) else {
        return;
    };
    let max_streams = crate::transport_stream_limit(inner.config.max_link_streams);
    let started = runtime.spawn(async move {
        let (mut forward, mut reverse) = (forward, reverse);
        forward.get_mut().0.rehome().map_err(|e| e.to_string())?;
        reverse.get_mut().0.rehome().map_err(|e| e.to_string())?;
        forward
            .write_all(&[LANE_READY])
            .await
            .map_err(|e| e.to_string())?;
        forward.flush().await.map_err(|e| e.to_string())?;
        // On the forward connection the dialer is the HTTP/2 client, on the reverse one this
        // site is.
        lanes
            .add(shard, reverse, forward, max_streams)
            .await
            .map_err(|e| e.to_string())
    });
    match started.await {
        Ok(Ok(())) => tracing::debug!(%peer, shard, "lane up"),
        Ok(Err(error)) => tracing::debug!(%peer, shard, %error, "lane failed"),
        Err(e) => tracing::debug!(%peer, shard, error = %e, "lane task failed"),
    }
}

/// Removes an incoming link's lane slots when dropped.
struct ForgetLanes<'a> {
    inner: &'a Inner,
    /// Each lane's shard and token.
    tokens: Vec<(usize, [u8; 16])>,
}

impl Drop for ForgetLanes<'_> {
    fn drop(&mut self) {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (_, token) in &self.tokens {
            pending.lanes.remove(token);
        }
    }
}

/// Removes a pending reverse-connection entry when dropped.
struct ForgetPending<'a> {
    inner: &'a Inner,
    token: [u8; 16],
}

impl Drop for ForgetPending<'_> {
    fn drop(&mut self) {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.waiting.remove(&self.token);
    }
}

/// Tells the peer why its link is refused, giving the message a moment to leave before the
/// caller drops the connection (closing at once can discard unsent data).
async fn refuse(control: &mut Control, reason: &str) {
    let message = Message::Refuse {
        reason: reason.to_string(),
    };
    if control.send(&message).await.is_ok() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Reads the linking site's hello and checks it may link: returns its name and link cost, or
/// why not (after telling the peer).
async fn check_hello(
    inner: &Inner,
    peer: Uuid,
    control: &mut Control,
) -> Result<(String, u32), String> {
    let (peer_name, cost) = match control.next().await.map_err(|e| e.to_string())? {
        Message::Hello {
            site_id,
            site_name,
            cost,
            ..
        } if site_id == peer => {
            if !crate::valid_site_name(&site_name) {
                let reason = format!("site name {site_name:.64?} is not a valid site name");
                refuse(control, &reason).await;
                return Err(reason);
            }
            (site_name, cost)
        }
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
            inner.config.site_name
        );
        refuse(control, &reason).await;
        return Err(reason);
    }
    // A revocation may have landed after this connection's TLS handshake.
    if let Err(reason) = inner.hooks.admit(peer, &peer_name) {
        refuse(control, &reason).await;
        return Err(reason);
    }
    Ok((peer_name, cost))
}

async fn send_hello(inner: &Inner, cost: u32, control: &mut Control) -> Result<(), String> {
    control
        .send(&super::hello(&inner.config, cost))
        .await
        .map_err(|e| e.to_string())
}

async fn forward(inner: Arc<Inner>, tls: ServerTls, peer: Uuid, session_token: [u8; 16]) {
    let config = &inner.config;
    let dead = CancellationToken::new();
    let shards = config.shard_count().min(MAX_LANES + 1);
    let forget_lanes = ForgetLanes {
        inner: &inner,
        tokens: (1..shards)
            .map(|shard| (shard, lane_token(session_token, shard as u8)))
            .collect(),
    };
    let setup = async {
        let limit = crate::transport_stream_limit(config.max_link_streams);
        let server = ServerHalf::start(tls, limit, dead.clone())
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = server
            .accept()
            .await
            .ok_or("peer closed before opening its control stream")?;
        let mut control = ControlChannel::accept(AnySend::Tls(send), AnyRecv::Tls(recv))
            .await
            .map_err(|e| e.to_string())?;
        let (peer_name, cost) = check_hello(&inner, peer, &mut control).await?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.waiting.len() >= MAX_PENDING {
                return Err("too many links being set up at once".to_string());
            }
            pending.waiting.insert(session_token, (peer, tx));
        }
        // However this setup ends (error, timeout, cancellation), its entry must go: stale
        // entries would fill the map and block every later link.
        let _forget = ForgetPending {
            inner: &inner,
            token: session_token,
        };
        // The dialer adds its lanes once it has the link, which may be before this side has
        // finished setting it up: the slots are there first.
        let lanes = Lanes::new(
            &server,
            dead.clone(),
            shards,
            inner.metrics.lanes(&peer_name),
        );
        {
            let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (shard, token) in &forget_lanes.tokens {
                let lanes = lanes.clone();
                let slot = LaneSlot {
                    peer,
                    shard: *shard,
                    lanes,
                    forward: None,
                };
                pending.lanes.insert(*token, slot);
            }
        }
        send_hello(&inner, cost, &mut control).await?;
        let reverse = match tokio::time::timeout(config.handshake_timeout, rx).await {
            Ok(Ok(reverse)) => reverse,
            _ => return Err("the peer's reverse connection did not arrive".to_string()),
        };
        let client = ClientHalf::start(reverse, dead.clone())
            .await
            .map_err(|e| e.to_string())?;
        let transport = LinkTransport::Tls(TlsTransport::with_lanes(client, server, lanes));
        Ok::<_, String>((transport, control, peer_name, cost))
    };
    match tokio::time::timeout(config.handshake_timeout * 2, setup).await {
        Ok(Ok((transport, control, peer_name, cost))) => {
            run_incoming(inner.clone(), peer, peer_name, cost, transport, control).await
        }
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "incoming link refused");
            dead.cancel();
        }
        Err(_) => {
            tracing::warn!(%peer, "incoming link setup timed out");
            dead.cancel();
        }
    }
}

/// Accepts QUIC links on `endpoint` until the router shuts down.
pub(crate) async fn serve_quic(inner: Arc<Inner>, endpoint: quinn::Endpoint) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(inner.config.max_handshakes));
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            _ = inner.shutdown.cancelled() => break,
        };
        // Unvalidated source addresses must prove they can receive before costing a
        // handshake (QUIC's retry), and a flood beyond the limit is refused outright.
        if !incoming.remote_address_validated() {
            let _ = incoming.retry();
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            inner.metrics.rejections.reject(
                Endpoint::Quic,
                Reason::TooManyHandshakes,
                incoming.remote_address(),
                "too many QUIC handshakes in progress",
            );
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            quic(inner, incoming, permit).await;
        });
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"site stopped");
}

async fn quic(
    inner: Arc<Inner>,
    incoming: quinn::Incoming,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let from = incoming.remote_address();
    let config = &inner.config;
    let deadline = tokio::time::Instant::now() + config.handshake_timeout * 2;
    // The QUIC handshake: anyone may get this far; a failure is a refused connection.
    let handshake = async {
        let conn = incoming
            .await
            .map_err(|e| (Reason::of_quic(&e), format!("QUIC handshake: {e}")))?;
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        // Tell the client why, rather than close without a word.
        let refuse = |reason: Reason, detail: &str| {
            conn.close(quinn::VarInt::from_u32(1), detail.as_bytes());
            Err((reason, detail.to_string()))
        };
        if alpn.as_deref() != Some(ALPN_LINK) {
            return refuse(
                Reason::NoAlpn,
                "QUIC connection without the skiff-link ALPN",
            );
        }
        let certs = conn.peer_identity().and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        });
        let Some(peer) = skiff_certs::peer_site_id(certs.as_deref().map(|c| c.as_slice())) else {
            let detail = "a QUIC link needs a client certificate from a token redemption";
            return refuse(Reason::NoCertificate, detail);
        };
        Ok((conn, peer))
    };
    let (conn, peer) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err((reason, detail))) => {
            return inner
                .metrics
                .rejections
                .reject(Endpoint::Quic, reason, from, detail)
        }
        Err(_) => {
            let detail = "the QUIC handshake did not finish in time";
            return inner
                .metrics
                .rejections
                .reject(Endpoint::Quic, Reason::Timeout, from, detail);
        }
    };
    // The link's setup, with an authenticated site.
    let setup = async {
        let transport = QuicTransport::new(conn);
        let (send, recv) = transport
            .accept()
            .await
            .ok_or("peer closed before opening its control stream")?;
        let mut control = ControlChannel::accept(AnySend::Quic(send), AnyRecv::Quic(recv))
            .await
            .map_err(|e| e.to_string())?;
        let (peer_name, cost) = check_hello(&inner, peer, &mut control).await?;
        send_hello(&inner, cost, &mut control).await?;
        Ok::<_, String>((LinkTransport::Quic(transport), control, peer_name, cost))
    };
    let outcome = tokio::time::timeout_at(deadline, setup).await;
    drop(permit);
    match outcome {
        Ok(Ok((transport, control, peer_name, cost))) => {
            run_incoming(inner, peer, peer_name, cost, transport, control).await
        }
        Ok(Err(error)) => tracing::warn!(%from, %peer, %error, "incoming QUIC link refused"),
        Err(_) => tracing::warn!(%from, %peer, "incoming QUIC link setup timed out"),
    }
}

/// Registers an incoming link that is up (see [`Inner::add_incoming`]), and closes it at once,
/// with the reason, if its site was revoked since it was admitted: a revocation closes the
/// links it finds registered, and one still being set up (its hellos, its reverse connection)
/// was not yet among them. Returns the session number.
fn register_incoming(inner: &Inner, status: LinkStatus, cancel: &CancellationToken) -> u64 {
    let (peer, peer_name) = (status.peer_site, status.peer_name.clone());
    let session = inner.add_incoming(status, cancel.clone());
    if let Err(reason) = inner.hooks.admit(peer, &peer_name) {
        inner.close_site(peer, &reason);
    }
    session
}

/// Registers an incoming link that is up and runs its session.
async fn run_incoming(
    inner: Arc<Inner>,
    peer: Uuid,
    peer_name: String,
    cost: u32,
    transport: LinkTransport,
    control: Control,
) {
    let cancel = inner.shutdown.child_token();
    let kind = transport.kind();
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
        transport: Some(kind),
        lanes: None,
    };
    let session_no = register_incoming(&inner, status, &cancel);
    let span = tracing::info_span!("link", link = %peer_name, %peer, direction = "incoming");
    async {
        tracing::info!(transport = kind.as_str(), "link up");
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
            s.transport = None;
            s.since = SystemTime::now();
            s.last_error = Some(reason);
        });
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;

    /// A slot for lane `token` of `peer`'s link, on shard 1.
    async fn pending_with_lane(token: [u8; 16], peer: Uuid) -> Pending {
        let (lanes, _first_pair) = super::super::tls::lanes_in_memory(2).await;
        let mut pending = Pending::default();
        let slot = LaneSlot {
            peer,
            shard: 1,
            lanes,
            forward: None,
        };
        pending.lanes.insert(token, slot);
        pending
    }

    #[tokio::test]
    async fn a_lane_is_paired_only_for_the_site_whose_link_expects_it() {
        let (token, peer, other) = ([7; 16], Uuid::from_u128(1), Uuid::from_u128(2));
        let mut pending = pending_with_lane(token, peer).await;
        let (tx, mut rx) = oneshot::channel();
        assert!(pending.await_lane_reverse(&token, other, tx).is_none());
        // The other site's attempt is refused: its sender is gone.
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Closed)));
        let (tx, _rx) = oneshot::channel();
        assert!(pending.await_lane_reverse(&[8; 16], peer, tx).is_none());

        let (tx, mut rx) = oneshot::channel();
        let (shard, _) = pending.await_lane_reverse(&token, peer, tx).unwrap();
        assert_eq!(shard, 1);
        assert!(pending.lane_forward(&token, other).is_none());
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        let forward = pending
            .lane_forward(&token, peer)
            .expect("the waiting forward half");
        // Taken once: a second reverse connection finds nothing to pair with.
        assert!(pending.lane_forward(&token, peer).is_none());
        drop(forward);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Closed)));
    }

    /// Hooks of a site that refuses every peer once `revoked` is set.
    struct Revoking {
        revoked: std::sync::atomic::AtomicBool,
    }

    impl crate::Hooks for Revoking {
        fn renew(&self, _: Uuid, _: &str, _: &str) -> Result<String, String> {
            Err("not in this test".into())
        }
        fn renewed(&self, _: &str, _: &skiff_certs::CertifiedKey) -> Result<(), String> {
            Ok(())
        }
        fn admit(&self, _: Uuid, peer_name: &str) -> Result<(), String> {
            match self.revoked.load(std::sync::atomic::Ordering::SeqCst) {
                true => Err(format!("site {peer_name} was revoked")),
                false => Ok(()),
            }
        }
    }

    #[tokio::test]
    async fn a_link_whose_site_was_revoked_during_its_setup_is_closed_as_it_registers() {
        let hooks = Arc::new(Revoking {
            revoked: false.into(),
        });
        let metrics =
            crate::Metrics::register(&mut prometheus_client::registry::Registry::default());
        let router = crate::Router::new(
            crate::Config::new(Uuid::from_u128(9), "stg"),
            hooks.clone(),
            CancellationToken::new(),
            metrics,
        );
        let status = |peer: Uuid, name: &str| LinkStatus {
            name: name.into(),
            direction: Direction::Incoming,
            peer_site: peer,
            peer_name: name.into(),
            state: LinkState::Up,
            rtt: None,
            cost: 1,
            since: SystemTime::now(),
            last_error: None,
            cert_expires: None,
            connects: 0,
            transport: None,
            lanes: None,
        };
        let incoming = |peer: Uuid| {
            router
                .links()
                .iter()
                .any(|l| l.direction == Direction::Incoming && l.peer_site == peer)
        };

        let (dev, cancel) = (Uuid::from_u128(1), CancellationToken::new());
        register_incoming(&router.inner, status(dev, "dev"), &cancel);
        assert!(incoming(dev) && !cancel.is_cancelled());

        // Revoked after its hello was admitted, before it registered.
        hooks
            .revoked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (prod, cancel) = (Uuid::from_u128(2), CancellationToken::new());
        register_incoming(&router.inner, status(prod, "prod"), &cancel);
        assert!(
            cancel.is_cancelled(),
            "the revoked site's link was left running"
        );
        assert!(!incoming(prod));
        let reason = router.inner.closing.lock().unwrap().get(&prod).cloned();
        assert_eq!(reason.as_deref(), Some("site prod was revoked"));
    }

    #[tokio::test]
    async fn a_newer_attempt_at_a_lane_replaces_the_waiting_one() {
        let (token, peer) = ([7; 16], Uuid::from_u128(1));
        let mut pending = pending_with_lane(token, peer).await;
        let (first, mut first_rx) = oneshot::channel();
        assert!(pending.await_lane_reverse(&token, peer, first).is_some());
        let (second, mut second_rx) = oneshot::channel();
        assert!(pending.await_lane_reverse(&token, peer, second).is_some());
        // The first attempt stops waiting at once, rather than at its timeout.
        assert!(matches!(first_rx.try_recv(), Err(TryRecvError::Closed)));
        // The reverse connection goes to the newer attempt.
        let forward = pending.lane_forward(&token, peer).unwrap();
        assert!(matches!(second_rx.try_recv(), Err(TryRecvError::Empty)));
        drop(forward);
        assert!(matches!(second_rx.try_recv(), Err(TryRecvError::Closed)));
    }
}
