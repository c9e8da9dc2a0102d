//! The router's Prometheus metrics.
//!
//! Names and labels are stable and documented in docs/metrics.md. Label values are bounded:
//! link and site names, routing keys, and small fixed sets of words — never client addresses or
//! connection ids. Byte counters are incremented per chunk as bytes are handed on, so they are
//! exact (bytes counted equal bytes carried) and move while a transfer is in flight.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Labels of `skiff_link_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// Link name.
    pub link: String,
    /// Peer site name.
    pub peer_site: String,
    /// `outgoing` or `incoming`.
    pub direction: String,
}

/// A label set with only the peer site.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Peer site name.
    pub peer_site: String,
}

/// Labels of `skiff_link_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerDirectionLabels {
    /// Peer site name.
    pub peer_site: String,
    /// `tx` (sent to the peer) or `rx` (received from it).
    pub direction: String,
}

/// A label set with only the link name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    /// Link name.
    pub link: String,
}

/// A label set with only the routing key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// Routing key.
    pub routing_key: String,
}

/// Labels of `skiff_service_connections_opened_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// Routing key.
    pub routing_key: String,
    /// The site that served the connection.
    pub target_site: String,
}

/// Labels of `skiff_service_connect_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Routing key.
    pub routing_key: String,
    /// `no_target`, `refused`, `no_target_at_destination`, `unreachable`, `link`, `timeout`,
    /// or `exhausted` (every site refused: the client was reset).
    pub reason: String,
}

/// Labels of `skiff_service_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyDirectionLabels {
    /// Routing key.
    pub routing_key: String,
    /// `to_target` (client to service) or `to_client` (service to client).
    pub direction: String,
}

/// The router's metrics.
pub struct Metrics {
    pub(crate) link_up: Family<LinkLabels, Gauge>,
    pub(crate) link_rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub(crate) link_bytes: Family<PeerDirectionLabels, Counter>,
    pub(crate) link_streams: Family<PeerLabels, Gauge>,
    pub(crate) link_lanes: Family<PeerLabels, Gauge>,
    pub(crate) link_reconnects: Family<NameLabels, Counter>,
    pub(crate) opened: Family<TargetLabels, Counter>,
    pub(crate) active: Family<KeyLabels, Gauge>,
    pub(crate) connect_errors: Family<ErrorLabels, Counter>,
    pub(crate) service_bytes: Family<KeyDirectionLabels, Counter>,
    pub(crate) duration: Histogram,
    pub(crate) connect_latency: Histogram,
    pub(crate) sites_reachable: Gauge,
    pub(crate) streams_refused: Family<PeerLabels, Counter>,
    /// Connections turned away at the link port.
    pub(crate) rejections: crate::reject::Rejections,
    /// Link label sets currently exported by `skiff_link_up`, to drop removed links.
    pub(crate) known_links: Mutex<HashSet<LinkLabels>>,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~4.7 h
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

impl Metrics {
    /// Metrics registered nowhere (for tools and tests that do not export them).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    /// Creates the router's metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            link_up: Family::default(),
            link_rtt: Family::default(),
            link_bytes: Family::default(),
            link_streams: Family::default(),
            link_lanes: Family::default(),
            link_reconnects: Family::default(),
            opened: Family::default(),
            active: Family::default(),
            connect_errors: Family::default(),
            service_bytes: Family::default(),
            duration: duration_histogram(),
            connect_latency: latency_histogram(),
            sites_reachable: Gauge::default(),
            streams_refused: Family::default(),
            rejections: crate::reject::Rejections::register(registry),
            known_links: Mutex::new(HashSet::new()),
        };
        let r = registry;
        r.register(
            "skiff_link_up",
            "1 while the link is up, 0 while it is down or connecting",
            metrics.link_up.clone(),
        );
        r.register_with_unit(
            "skiff_link_rtt",
            "Last heartbeat round-trip time to the peer site",
            Unit::Seconds,
            metrics.link_rtt.clone(),
        );
        r.register(
            "skiff_link_bytes",
            "Bytes of carried connections sent to (tx) and received from (rx) the peer site",
            metrics.link_bytes.clone(),
        );
        r.register(
            "skiff_link_streams_active",
            "Carried connections open on links with the peer site",
            metrics.link_streams.clone(),
        );
        r.register(
            "skiff_link_lanes",
            "Lanes of the TLS link with the peer site besides its first pair of connections",
            metrics.link_lanes.clone(),
        );
        r.register(
            "skiff_link_reconnects",
            "Times the link came back up after having been up before",
            metrics.link_reconnects.clone(),
        );
        r.register(
            "skiff_service_connections_opened",
            "Client connections of this site's listeners that reached a target site",
            metrics.opened.clone(),
        );
        r.register(
            "skiff_service_connections_active",
            "Client connections of this site's listeners open now",
            metrics.active.clone(),
        );
        r.register(
            "skiff_service_connect_errors",
            "Failed attempts to reach a target for a listener's client, by reason",
            metrics.connect_errors.clone(),
        );
        r.register(
            "skiff_service_bytes",
            "Bytes carried for this site's listeners, towards the target and back to the client",
            metrics.service_bytes.clone(),
        );
        r.register_with_unit(
            "skiff_service_connection_duration",
            "Lifetime of client connections of this site's listeners",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        r.register_with_unit(
            "skiff_service_connect_latency",
            "Time from accepting a client to the target's connect result",
            Unit::Seconds,
            metrics.connect_latency.clone(),
        );
        r.register(
            "skiff_routing_sites_reachable",
            "Other sites this site has a route to",
            metrics.sites_reachable.clone(),
        );
        r.register(
            "skiff_link_streams_refused",
            "Streams the peer site opened beyond this site's per-link stream limit, refused",
            metrics.streams_refused.clone(),
        );
        metrics
    }

    /// Counters of bytes sent to and received from `peer` over links.
    pub(crate) fn link_bytes(&self, peer: &str) -> (Counter, Counter) {
        let get = |direction: &str| {
            self.link_bytes.get_or_create_owned(&PeerDirectionLabels {
                peer_site: peer.to_string(),
                direction: direction.to_string(),
            })
        };
        (get("tx"), get("rx"))
    }

    /// Counters of bytes carried for `key` towards the target and back to the client.
    pub(crate) fn service_bytes(&self, key: &str) -> (Counter, Counter) {
        let get = |direction: &str| {
            self.service_bytes.get_or_create_owned(&KeyDirectionLabels {
                routing_key: key.to_string(),
                direction: direction.to_string(),
            })
        };
        (get("to_target"), get("to_client"))
    }

    /// The series a listener for `key` updates for every client, looked up once per listener
    /// rather than per connection (building and hashing the labels is most of a lookup).
    pub(crate) fn key_series(&self, key: &str) -> KeySeries {
        let (to_target, to_client) = self.service_bytes(key);
        KeySeries {
            active: self.active.get_or_create_owned(&KeyLabels {
                routing_key: key.to_string(),
            }),
            to_target,
            to_client,
        }
    }

    /// Counts a failed connect attempt.
    pub(crate) fn connect_error(&self, key: &str, reason: &str) {
        self.connect_errors
            .get_or_create(&ErrorLabels {
                routing_key: key.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The `skiff_link_lanes` series of the links with `peer` (made at 0 if new).
    pub(crate) fn lanes(&self, peer: &str) -> Gauge {
        self.link_lanes.get_or_create_owned(&PeerLabels {
            peer_site: peer.to_string(),
        })
    }

    /// Re-exports `skiff_link_up` from the current link table, dropping links that are gone.
    pub(crate) fn refresh_links(&self, links: &[crate::LinkStatus]) {
        let mut known = self.known_links.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = HashSet::with_capacity(links.len());
        for status in links {
            let labels = LinkLabels {
                link: status.name.clone(),
                peer_site: status.peer_name.clone(),
                direction: match status.direction {
                    crate::Direction::Outgoing => "outgoing".into(),
                    crate::Direction::Incoming => "incoming".into(),
                },
            };
            let up = i64::from(status.state == crate::LinkState::Up);
            self.link_up.get_or_create(&labels).set(up);
            now.insert(labels);
        }
        for gone in known.difference(&now) {
            self.link_up.remove(gone);
        }
        *known = now;
    }
}

/// A routing key's carried-connection series: connections open, and bytes each way.
pub(crate) struct KeySeries {
    pub(crate) active: Gauge,
    pub(crate) to_target: Counter,
    pub(crate) to_client: Counter,
}

/// Adds to a pair of byte counters as chunks pass; `None` counts nothing.
#[derive(Clone, Default)]
pub(crate) struct Tally {
    counters: Vec<Counter>,
}

impl Tally {
    pub(crate) fn new(counters: impl IntoIterator<Item = Counter>) -> Self {
        Tally {
            counters: counters.into_iter().collect(),
        }
    }

    pub(crate) fn add(&self, n: usize) {
        for c in &self.counters {
            c.inc_by(n as u64);
        }
    }
}
