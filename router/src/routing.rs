//! The tokio side of link-state routing: keeps the [`Lsdb`], re-advertises this site, and
//! publishes the routing table and the advertisement set as `watch` snapshots that the link
//! sessions (flooding) and the forwarding code (next hops, targets) read without locking.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::link::LinkTransport;
use crate::proto::routing::{AdvertisedLink, AdvertisedService, Advertisement, Lsdb, Table};
use crate::Inner;

/// How often a router re-advertises itself even when nothing changed.
pub(crate) const REFRESH: Duration = Duration::from_secs(5);
/// Advertisements not refreshed for this long are dropped.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(20);

/// All advertisements held, as the sessions flood them.
pub(crate) type Adverts = Arc<Vec<Arc<Advertisement>>>;

pub(crate) struct Routing {
    pub(crate) lsdb: Lsdb,
    seq: u64,
}

impl Routing {
    pub(crate) fn new(own: Uuid) -> Self {
        // Sequence numbers start at the wall clock in milliseconds so that a restarted router's
        // advertisements supersede the ones its previous life left in other routers.
        let seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        Routing {
            lsdb: Lsdb::new(own),
            seq,
        }
    }
}

/// A link that is up, as the forwarding code uses it.
pub(crate) struct Live {
    pub(crate) session: u64,
    pub(crate) transport: Arc<LinkTransport>,
    pub(crate) cost: u32,
}

impl Inner {
    /// Registers a link that came up; returns its session number for [`Inner::link_down`].
    pub(crate) fn link_up(&self, peer: Uuid, cost: u32, transport: Arc<LinkTransport>) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.live_links().insert(
            peer,
            Live {
                session,
                transport,
                cost,
            },
        );
        self.reoriginate();
        session
    }

    /// Forgets a link that went down, if `session` is still the current one for `peer`.
    pub(crate) fn link_down(&self, peer: Uuid, session: u64) {
        let removed = {
            let mut live = self.live_links();
            match live.get(&peer) {
                Some(l) if l.session == session => live.remove(&peer).is_some(),
                _ => false,
            }
        };
        if removed {
            self.reoriginate();
        }
    }

    pub(crate) fn live_links(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transport of the live link to neighbour `peer`.
    pub(crate) fn transport_to(&self, peer: Uuid) -> Option<Arc<LinkTransport>> {
        self.live_links().get(&peer).map(|l| l.transport.clone())
    }

    fn routing(&self) -> std::sync::MutexGuard<'_, Routing> {
        self.routing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advertises this site anew (links or services changed, or a refresh is due).
    pub(crate) fn reoriginate(&self) {
        let mut links: Vec<AdvertisedLink> = self
            .live_links()
            .iter()
            .map(|(peer, l)| AdvertisedLink {
                peer: *peer,
                cost: l.cost,
            })
            .collect();
        links.sort_by_key(|l| l.peer);
        // A draining site serves no new connections: it advertises no routing key.
        let draining = self.draining.load(Ordering::Acquire);
        let services: Vec<AdvertisedService> = self
            .connectors()
            .iter()
            .filter(|_| !draining)
            .map(|(key, list)| AdvertisedService {
                key: key.clone(),
                weight: list
                    .iter()
                    .fold(0u32, |sum, c| sum.saturating_add(c.weight.max(1))),
            })
            .collect();
        let mut routing = self.routing();
        routing.seq += 1;
        let adv = Advertisement {
            origin: self.config.site_id,
            name: self.config.site_name.clone(),
            seq: routing.seq,
            links,
            services,
        };
        routing.lsdb.originate(adv, Instant::now());
        self.publish(&routing);
    }

    /// Offers an advertisement from a neighbour; floods and recomputes if it was news.
    pub(crate) fn receive_advert(&self, adv: Advertisement) {
        let mut routing = self.routing();
        if routing.lsdb.receive(adv, Instant::now()) {
            self.publish(&routing);
        }
    }

    fn publish(&self, routing: &Routing) {
        let table = routing.lsdb.compute();
        let reachable = table.routes.len();
        self.metrics.sites_reachable.set(reachable as i64);
        self.table.send_if_modified(|current| {
            if **current == table {
                return false;
            }
            tracing::debug!(reachable, "routing table changed");
            *current = Arc::new(table);
            true
        });
        self.adverts
            .send_replace(Arc::new(routing.lsdb.advertisements()));
    }

    /// The current routing table.
    pub(crate) fn table(&self) -> Arc<Table> {
        self.table.borrow().clone()
    }
}

/// Re-advertises this site every [`REFRESH`] and ages out stale advertisements, until the
/// router is dropped or shut down.
pub(crate) async fn refresh(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REFRESH);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutdown.is_cancelled() {
            return;
        }
        inner.reoriginate();
        let alive: std::collections::HashSet<Uuid> = inner.live_links().keys().copied().collect();
        let mut routing = inner.routing();
        if routing.lsdb.expire(Instant::now(), MAX_AGE, &alive) {
            inner.publish(&routing);
        }
    }
}
