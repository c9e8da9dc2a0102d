//! What runs while a link is up: heartbeats and RTT, certificate renewal, incoming streams.
//!
//! Both sides send a ping every heartbeat interval and answer every ping with a pong. Anything
//! heard on the control stream proves the peer alive; silence for `dead_after` ends the session,
//! so a dead peer is noticed within that bound even when its TCP connection never fails.
//!
//! The linking side renews its client certificate over this stream when two thirds of the
//! certificate's remaining life (as of when it was loaded or received) has passed. The live link
//! is untouched by a renewal: the new certificate is persisted and used from the next connection.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use skiff_certs::CertifiedKey;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::control::ControlChannel;
use super::transport::{SendStream, Transport};
use super::{AnyRecv, AnySend, LinkTransport};
use crate::proto::Message;
use crate::Inner;

/// Pings whose pongs are still awaited; older ones are forgotten.
const MAX_PINGS_IN_FLIGHT: usize = 8;
/// The wait before asking again when a renewal failed or went unanswered.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// Which side of the link this session runs on.
pub(crate) enum Role<'a> {
    /// The linking site; it owns the client certificate and renews it.
    Dialer {
        name: String,
        cert: &'a mut CertifiedKey,
    },
    /// The accepting site; `session` identifies this session in the link table.
    Acceptor { session: u64 },
}

/// Runs the session until the link dies or `cancel` fires; returns why it ended.
///
/// While it runs, the link is registered for forwarding and routing, advertisements are
/// flooded to the peer (each origin's newest, once), and streams the peer opens are served.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    inner: &Arc<Inner>,
    peer: Uuid,
    peer_name: &str,
    cost: u32,
    mut role: Role<'_>,
    transport: Arc<LinkTransport>,
    mut control: ControlChannel<AnySend, AnyRecv>,
    cancel: &CancellationToken,
) -> String {
    let config = &inner.config;
    let live = inner.link_up(peer, cost, transport.clone());
    // Every link that is up has a lanes series: 0 until a lane comes up (and on QUIC links).
    inner.metrics.lanes(peer_name);
    // What the peer has been told (or told us) about each origin: flooding sends only news.
    let mut told: HashMap<Uuid, u64> = HashMap::new();
    let mut adverts = inner.adverts.subscribe();
    adverts.mark_changed();
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut last_received = transport.received();
    // Heartbeat ticks in a row at which nothing had arrived. The peer is dead when both this
    // many ticks and `dead_after` have passed in silence: a router too busy to run its own
    // tasks on time (its connection drivers included, which count what arrives) must not
    // take its lateness for the peer's death — an overloaded site once cut a link carrying
    // 10,000 connections this way (tests/load.rs with the CPU taken by something else).
    let mut silent_ticks: u32 = 0;
    let dead_ticks = (config.dead_after.as_millis() / config.heartbeat_interval.as_millis().max(1))
        .max(1) as u32;
    let mut seq: u64 = 0;
    let mut pings: VecDeque<(u64, Instant)> = VecDeque::with_capacity(MAX_PINGS_IN_FLIGHT);
    let mut renew_at = match &role {
        Role::Dialer { cert, .. } => renewal_due(cert),
        Role::Acceptor { .. } => None,
    };
    let mut renewal_key: Option<String> = None;
    let incoming = Arc::new(Incoming {
        inner: Arc::downgrade(inner),
        peer_name: peer_name.to_string(),
        span: tracing::Span::current(),
        permits: Arc::new(tokio::sync::Semaphore::new(
            config.max_link_streams as usize,
        )),
        warned: std::sync::Mutex::new(None),
    });
    {
        let incoming = incoming.clone();
        transport.hand_streams_to(move |send, recv| incoming.take(send, recv));
    }

    let reason = loop {
        let renew_sleep = async {
            match renew_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                // Tell the peer why, so its link status says more than "connection lost".
                let reason = inner
                    .closing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&peer)
                    .unwrap_or_else(|| {
                        if inner.shutdown.is_cancelled() {
                            format!("site {} is shutting down", config.site_name)
                        } else {
                            format!("site {} closed the link", config.site_name)
                        }
                    });
                let refuse = Message::Refuse { reason: reason.clone() };
                let _ = tokio::time::timeout(Duration::from_millis(200), control.send(&refuse)).await;
                break format!("closed here: {reason}");
            }
            _ = transport.closed() => break "connection lost".to_string(),
            _ = heartbeat.tick() => {
                // Any bytes from the peer prove it alive, not only control messages: a busy
                // link may delay a pong behind data.
                let received = transport.received();
                if received != last_received {
                    last_received = received;
                    last_heard = Instant::now();
                }
                if last_heard.elapsed() > config.heartbeat_interval {
                    silent_ticks += 1;
                } else {
                    silent_ticks = 0;
                }
                if last_heard.elapsed() > config.dead_after && silent_ticks >= dead_ticks {
                    break format!(
                        "peer {peer_name} sent nothing for {} ms",
                        last_heard.elapsed().as_millis()
                    );
                }
                seq += 1;
                if pings.len() == MAX_PINGS_IN_FLIGHT {
                    pings.pop_front();
                }
                pings.push_back((seq, Instant::now()));
                if let Err(e) = send(&mut control, &Message::Ping { seq }, config.dead_after).await {
                    break e;
                }
            }
            message = control.next() => {
                let message = match message {
                    Ok(message) => message,
                    Err(e) => break e.to_string(),
                };
                last_heard = Instant::now();
                let reply = match message {
                    Message::Ping { seq } => Some(Message::Pong { seq }),
                    Message::Pong { seq } => {
                        if let Some(&(_, sent)) = pings.iter().find(|(s, _)| *s == seq) {
                            let rtt = sent.elapsed();
                            set_status(inner, &role, peer, |s| s.rtt = Some(rtt));
                            inner
                                .metrics
                                .link_rtt
                                .get_or_create(&crate::metrics::PeerLabels {
                                    peer_site: peer_name.to_string(),
                                })
                                .set(rtt.as_secs_f64());
                            pings.retain(|(s, _)| *s > seq);
                        }
                        None
                    }
                    Message::RenewRequest { csr_pem } => match role {
                        Role::Acceptor { .. } => {
                            let result = inner.hooks.renew(peer, peer_name, &csr_pem);
                            match &result {
                                Ok(_) => tracing::info!("renewed the peer's client certificate"),
                                Err(e) => tracing::warn!(error = %e, "refused a renewal"),
                            }
                            Some(Message::RenewResponse { result })
                        }
                        Role::Dialer { .. } => break "peer asked this site for a renewal".into(),
                    },
                    Message::RenewResponse { result } => {
                        let Role::Dialer { name, cert } = &mut role else {
                            break "peer sent an unsolicited renewal".into();
                        };
                        match (result, renewal_key.take()) {
                            (Ok(cert_pem), Some(key_pem)) => {
                                let renewed = CertifiedKey { cert_pem, key_pem };
                                match accept_renewal(inner, name, &renewed) {
                                    Ok(()) => {
                                        **cert = renewed;
                                        renew_at = renewal_due(cert);
                                        let expires = cert.not_after().ok();
                                        set_status(inner, &role, peer, |s| s.cert_expires = expires);
                                        tracing::info!("client certificate renewed");
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "renewed certificate not usable");
                                        renew_at = Some(Instant::now() + RENEW_RETRY);
                                    }
                                }
                            }
                            (Err(reason), _) => {
                                tracing::warn!(%reason, "peer refused to renew the client certificate");
                                renew_at = Some(Instant::now() + RENEW_RETRY);
                            }
                            (Ok(_), None) => break "peer sent an unsolicited renewal".into(),
                        }
                        None
                    }
                    Message::Advertise(adv) => {
                        told.insert(adv.origin, adv.seq);
                        inner.receive_advert(adv);
                        None
                    }
                    Message::Refuse { reason } => break format!("peer closed the link: {reason}"),
                    Message::Hello { .. } => break "peer sent a second hello".into(),
                };
                if let Some(reply) = reply {
                    if let Err(e) = send(&mut control, &reply, config.dead_after).await {
                        break e;
                    }
                }
            }
            _ = renew_sleep => {
                let Role::Dialer { cert, .. } = &role else { unreachable!("only dialers renew") };
                renew_at = Some(Instant::now() + RENEW_RETRY.min(remaining(cert) / 2).max(Duration::from_secs(1)));
                match skiff_certs::generate_csr(config.site_id, &config.site_name) {
                    Ok((key_pem, csr_pem)) => {
                        renewal_key = Some(key_pem);
                        let request = Message::RenewRequest { csr_pem };
                        if let Err(e) = send(&mut control, &request, config.dead_after).await {
                            break e;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot make a renewal request"),
                }
            }
            changed = adverts.changed() => {
                if changed.is_err() {
                    break "router stopped".to_string();
                }
                let snapshot = adverts.borrow_and_update().clone();
                let mut failed = None;
                for adv in snapshot.iter() {
                    if adv.origin == peer || told.get(&adv.origin).is_some_and(|&s| s >= adv.seq) {
                        continue;
                    }
                    told.insert(adv.origin, adv.seq);
                    let message = Message::Advertise((**adv).clone());
                    if let Err(e) = send(&mut control, &message, config.dead_after).await {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    break e;
                }
            }
            stream = transport.accept() => {
                let Some((send, recv)) = stream else {
                    break "connection lost".to_string();
                };
                incoming.take(send, recv);
            }
        }
    };
    inner.link_down(peer, live);
    // A down link has no RTT and no lanes: drop the series rather than keep stale values.
    let labels = crate::metrics::PeerLabels {
        peer_site: peer_name.to_string(),
    };
    inner.metrics.link_rtt.remove(&labels);
    inner.metrics.link_lanes.remove(&labels);
    control.reset();
    transport.close();
    reason
}

/// Takes the streams the peer opens on a link: serves each as a carried connection while the
/// link's stream limit allows, and refuses the rest.
struct Incoming {
    /// Weak: the link's transport holds this (as its stream handler), and the router's state
    /// holds the transport while the link is up.
    inner: std::sync::Weak<Inner>,
    peer_name: String,
    /// The session's span (which link), for what is logged from the link's connection driver.
    span: tracing::Span,
    /// Streams the peer may have open towards this site at once (see
    /// `Config::max_link_streams`); each carried connection it opens holds a permit until it
    /// ends.
    permits: Arc<tokio::sync::Semaphore>,
    /// When the link last warned that it was full: once per second at most, as a busy link may
    /// refuse many.
    warned: std::sync::Mutex<Option<Instant>>,
}

impl Incoming {
    /// Spawns what serves (or refuses) the stream; returns at once.
    fn take(&self, mut send: AnySend, recv: AnyRecv) {
        let Some(inner) = self.inner.upgrade() else {
            // The router is gone.
            return send.reset();
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            inner
                .metrics
                .streams_refused
                .get_or_create(&crate::metrics::PeerLabels {
                    peer_site: self.peer_name.clone(),
                })
                .inc();
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *warned = Some(Instant::now());
                tracing::warn!(
                    parent: &self.span,
                    limit = inner.config.max_link_streams,
                    "the link carries the most connections the peer may open; \
                     refusing new ones (see --max-link-streams)"
                );
            }
            // Not a carried connection: a drain does not wait for it.
            tokio::spawn(crate::forward::refuse_stream(inner.clone(), send, recv));
            return;
        };
        let serve = crate::forward::serve_stream(inner.clone(), self.peer_name.clone(), send, recv);
        inner.carried.spawn(async move {
            let _permit = permit;
            serve.await
        });
    }
}

/// Sends a control message, bounded in time: a send stuck on flow control must not keep the
/// session loop (and with it the dead-peer check and cancellation) waiting forever.
async fn send(
    control: &mut ControlChannel<AnySend, AnyRecv>,
    message: &Message,
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, control.send(message)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "peer did not take a control message for {} ms",
            limit.as_millis()
        )),
    }
}

fn set_status(inner: &Inner, role: &Role<'_>, peer: Uuid, f: impl FnOnce(&mut crate::LinkStatus)) {
    match role {
        Role::Dialer { name, .. } => inner.set_outgoing(name, f),
        Role::Acceptor { session } => inner.set_incoming(peer, *session, f),
    }
}

/// Checks a renewed certificate belongs to this site, then has the site persist it.
fn accept_renewal(inner: &Inner, name: &str, renewed: &CertifiedKey) -> Result<(), String> {
    let id = renewed.site_id().map_err(|e| e.to_string())?;
    if id != inner.config.site_id {
        return Err(format!("renewed certificate names site {id}"));
    }
    // A late answer to an earlier request would carry the earlier key's certificate.
    if !skiff_certs::cert_matches_key(&renewed.cert_pem, &renewed.key_pem).unwrap_or(false) {
        return Err("renewed certificate is not for the key this site sent".into());
    }
    inner.hooks.renewed(name, renewed)
}

fn remaining(cert: &CertifiedKey) -> Duration {
    cert.not_after()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or_default()
}

/// When to renew `cert`: after two thirds of its remaining life, but not sooner than a second
/// from now (an already expired certificate cannot be renewed: the peer will refuse the next
/// handshake, and the link's error says to ask for a new token).
fn renewal_due(cert: &CertifiedKey) -> Option<Instant> {
    let left = remaining(cert);
    if left.is_zero() {
        return None;
    }
    Some(Instant::now() + (left * 2 / 3).max(Duration::from_secs(1)))
}
