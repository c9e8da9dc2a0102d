//! skiff's data plane.
//!
//! A [`Router`] keeps one site's links to its peers: it dials the links this site created (with
//! capped, jittered exponential backoff), accepts the links other sites open to it, runs each
//! link's control stream (hello, heartbeats with RTT, client-certificate renewal) and reports
//! every link's state.
//!
//! - [`proto`] is the sans-IO core: wire messages and prefaces, no sockets, no clock.
//! - [`link`] is the tokio side: transports (TLS + HTTP/2 today) and link sessions.
//!
//! The router never reads files, flags or the environment: whatever must persist (a renewed
//! certificate) or be decided by the site's authority (signing a renewal) goes through
//! [`Hooks`], which the control part implements.

#![forbid(unsafe_code)]

pub mod forward;
pub mod link;
pub mod metrics;
pub mod proto;
pub mod reject;
mod routing;
pub mod shard;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use skiff_certs::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use forward::{ConnectorConfig, ListenerConfig};
pub use link::transport::StreamError;
pub use link::{TransportChoice, TransportKind};
pub use metrics::Metrics;
pub use proto::balance::Strategy;
pub use proto::routing::{Advertisement, Table};
pub use reject::Rejections;

/// ALPN protocol id of link connections on the link port.
pub const ALPN_LINK: &[u8] = b"skiff-link/1";

/// The skiff version this router announces in its hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default of [`Config::max_handshakes`] (and of the TCP link port's limit).
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// Default of [`Config::max_link_streams`]: well above what one site pair carries in practice
/// (the end-to-end benchmark holds 10,000 idle connections over one link), low enough that one
/// neighbour cannot take all of a site's file descriptors and memory.
pub const DEFAULT_MAX_LINK_STREAMS: u32 = 16_384;

/// The stream limit a link's transport announces to the peer (HTTP/2
/// SETTINGS_MAX_CONCURRENT_STREAMS, QUIC MAX_STREAMS) for a router limit of `max_link_streams`.
///
/// It is a little higher than the router's limit on purpose: the router refuses streams beyond
/// its limit itself, with a connect result the origin understands at once (it tries the next
/// site, or resets its client), instead of the opener's transport queueing them until a slot
/// frees. The margin bounds how many such refusals can be in flight; a peer that ignores them
/// and opens still more is stopped by the transport (a refused stream on HTTP/2, a connection
/// error on QUIC).
pub fn transport_stream_limit(max_link_streams: u32) -> u32 {
    max_link_streams
        .saturating_add(max_link_streams / 8)
        .saturating_add(64)
}

/// Router settings (everything has a named default in [`Config::new`]).
#[derive(Clone, Debug)]
pub struct Config {
    /// This site's id (the identity in its certificates).
    pub site_id: Uuid,
    /// This site's name.
    pub site_name: String,
    /// How often each side sends a heartbeat on a link.
    pub heartbeat_interval: Duration,
    /// A link whose peer has sent nothing for this long is declared dead.
    pub dead_after: Duration,
    /// Limit for a TCP connect to a peer.
    pub connect_timeout: Duration,
    /// Limit for a TLS or QUIC handshake plus the link's hello exchange, on both sides.
    pub handshake_timeout: Duration,
    /// Most QUIC handshakes in progress at once on the UDP link port; more are refused (the
    /// dialer retries).
    pub max_handshakes: usize,
    /// Most carried connections a neighbour may have open towards this site on one link at
    /// once; streams beyond it are refused at once (its origin tries another site, or resets
    /// its client). See [`transport_stream_limit`].
    pub max_link_streams: u32,
    /// First reconnect delay after a failure.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Log one line per closed carried connection of this site's listeners (target
    /// `skiff::access`).
    pub access_log: bool,
    /// The runtimes of shards 1, 2, … ([`shard`]): each a one-thread runtime whose thread
    /// called [`shard::enter`] with its index. Empty (the default): the router carries
    /// everything on the runtime it runs on.
    pub shards: Vec<tokio::runtime::Handle>,
}

impl Config {
    /// Defaults: heartbeat every 250 ms, dead after 1 s of silence, 5 s connect and handshake
    /// limits, [`DEFAULT_MAX_HANDSHAKES`] QUIC handshakes at once,
    /// [`DEFAULT_MAX_LINK_STREAMS`] streams from each neighbour, reconnect backoff from 100 ms up to 2 s (so that a link is back within a few
    /// seconds of its path, however long it was gone).
    pub fn new(site_id: Uuid, site_name: impl Into<String>) -> Self {
        Config {
            site_id,
            site_name: site_name.into(),
            heartbeat_interval: Duration::from_millis(250),
            dead_after: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_link_streams: DEFAULT_MAX_LINK_STREAMS,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            access_log: true,
            shards: Vec::new(),
        }
    }

    /// How many shards carry traffic: shard 0 and [`Config::shards`].
    pub fn shard_count(&self) -> usize {
        1 + self.shards.len()
    }
}

/// What the router asks of the site that owns it.
pub trait Hooks: Send + Sync + 'static {
    /// Accepting side: sign a fresh client certificate for `peer`, or say why not (for example
    /// because the site was revoked). Returns the certificate PEM.
    fn renew(&self, peer: Uuid, peer_name: &str, csr_pem: &str) -> Result<String, String>;
    /// Linking side: the peer renewed the client certificate of link `name`. Must persist it
    /// before returning: the router uses it for every later connection.
    fn renewed(&self, name: &str, cert: &CertifiedKey) -> Result<(), String>;
    /// Accepting side, when an incoming link's hello arrives and again once the link is
    /// registered: may `peer` link now? (The TLS layer already refuses revoked sites; this
    /// closes the window where a revocation lands during a link's setup.)
    fn admit(&self, peer: Uuid, peer_name: &str) -> Result<(), String>;
}

/// A site name as skiff allows them: 1-63 of `a-z`, `0-9`, `-`, not starting or ending with
/// `-`. Names from peers are checked against it before they become link names or labels.
pub fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A routing key as skiff allows them: 1-253 of ASCII letters, digits, `.`, `-` and `_`.
/// Keys from peers are checked against it before they reach the routing table.
pub fn valid_routing_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= proto::stream::MAX_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// A link this site dials.
#[derive(Clone, Debug)]
pub struct OutgoingLink {
    /// Local name of the link.
    pub name: String,
    /// The peer site's id (its certificates must carry it).
    pub peer_site: Uuid,
    /// The peer site's name.
    pub peer_name: String,
    /// `host:port` endpoints of the peer's link port, tried in order.
    pub endpoints: Vec<String>,
    /// The peer site's CA certificate (PEM): the root of trust for this link.
    pub peer_ca_pem: String,
    /// The client certificate and key this site presents.
    pub cert: CertifiedKey,
    /// The link's cost for routing.
    pub cost: u32,
    /// `host:port` QUIC (UDP) endpoints of the peer, tried in order; empty if it has none.
    pub quic_endpoints: Vec<String>,
    /// Which transport to use.
    pub transport: TransportChoice,
}

/// Who opened a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This site dials the peer.
    Outgoing,
    /// The peer dials this site.
    Incoming,
}

/// The state of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Connected, hello exchanged, heartbeats flowing.
    Up,
    /// Not connected; an outgoing link retries after a backoff.
    Down,
    /// A connection attempt is under way.
    Connecting,
}

impl LinkState {
    /// The word used in the CLI and its JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Connecting => "connecting",
        }
    }
}

/// A snapshot of one link.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    /// The link's name (for incoming links, the peer site's name).
    pub name: String,
    /// Who opened it.
    pub direction: Direction,
    /// The peer site's id.
    pub peer_site: Uuid,
    /// The peer site's name.
    pub peer_name: String,
    /// Current state.
    pub state: LinkState,
    /// Last measured round-trip time of a heartbeat, while up.
    pub rtt: Option<Duration>,
    /// Routing cost.
    pub cost: u32,
    /// When the state last changed.
    pub since: SystemTime,
    /// Why the link last went down or failed to come up.
    pub last_error: Option<String>,
    /// When the client certificate of an outgoing link expires.
    pub cert_expires: Option<SystemTime>,
    /// How many times the link came up.
    pub connects: u64,
    /// The transport carrying the link while it is up.
    pub transport: Option<TransportKind>,
    /// While the link is up over TLS: how many lanes it has besides its first connection pair
    /// (one per further shard that both sites run; see `link::tls::Lanes`). `None` while it is
    /// down and on QUIC links. Filled in by the router's snapshots ([`Router::links`]).
    pub lanes: Option<usize>,
}

/// The handle to a site's router. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

/// Local connectors by routing key.
pub(crate) type Connectors = Arc<BTreeMap<String, Vec<ConnectorConfig>>>;

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) links: Mutex<Links>,
    pub(crate) pending: Mutex<link::accept::Pending>,
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) shutdown: CancellationToken,
    /// By shard: a token that fires with `shutdown`, for what each shard's carried connections
    /// wait on. Every waiter registers with its token, under the token's lock: one per shard
    /// keeps the shards from contending for it.
    stops: Vec<CancellationToken>,
    /// Link-state database and this site's advertisement sequence.
    pub(crate) routing: Mutex<routing::Routing>,
    /// Every advertisement held, for the sessions to flood.
    pub(crate) adverts: watch::Sender<routing::Adverts>,
    /// The routing table computed from the database.
    pub(crate) table: watch::Sender<Arc<Table>>,
    /// Links that are up, by peer site.
    pub(crate) live: Mutex<HashMap<Uuid, routing::Live>>,
    /// This site's connectors.
    pub(crate) connectors: Mutex<Connectors>,
    /// This site's listeners, by name.
    pub(crate) listeners: Mutex<HashMap<String, CancellationToken>>,
    /// Open carried connections by (routing key, serving site), for the balanced strategy.
    pub(crate) open: Mutex<HashMap<(String, Uuid), u64>>,
    pub(crate) next_session: AtomicU64,
    pub(crate) next_connection: AtomicU64,
    /// Round-robin turn shared by all listeners.
    pub(crate) turn: AtomicU64,
    /// Turn among this site's own connectors for a key (separate from `turn`, so serving a
    /// connection locally never shifts a listener's rotation).
    pub(crate) local_turn: AtomicU64,
    /// Why links to a site are being closed, for the `Refuse` message the session sends.
    pub(crate) closing: Mutex<HashMap<Uuid, String>>,
    /// The QUIC endpoint links are served on and dialed from (made on first use if this site
    /// does not serve QUIC).
    pub(crate) quic: Mutex<Option<quinn::Endpoint>>,
    pub(crate) metrics: Metrics,
    /// Every carried connection's task (origin, transit and destination), so that a drain can
    /// wait for them and a stop can wait for their resets to go out.
    pub(crate) carried: TaskTracker,
    /// Set by [`Router::drain`]: no listeners, no connectors advertised or served.
    pub(crate) draining: AtomicBool,
}

#[derive(Default)]
pub(crate) struct Links {
    pub(crate) outgoing: BTreeMap<String, Outgoing>,
    pub(crate) incoming: BTreeMap<Uuid, Incoming>,
    next_session: u64,
}

impl Links {
    /// Every link's status, outgoing first, each group sorted by name.
    fn statuses(&self) -> Vec<LinkStatus> {
        self.outgoing
            .values()
            .map(|l| l.status.clone())
            .chain(self.incoming.values().map(|l| l.status.clone()))
            .collect()
    }
}

pub(crate) struct Outgoing {
    pub(crate) status: LinkStatus,
    pub(crate) cancel: CancellationToken,
}

pub(crate) struct Incoming {
    pub(crate) status: LinkStatus,
    pub(crate) cancel: CancellationToken,
    pub(crate) session: u64,
}

impl Router {
    /// A router with no links yet. Every task it spawns stops when `shutdown` is cancelled.
    /// `metrics` are updated as the router works (see [`Metrics::register`]).
    pub fn new(
        config: Config,
        hooks: Arc<dyn Hooks>,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        let own = config.site_id;
        let config_shards = config.shard_count();
        let inner = Arc::new(Inner {
            routing: Mutex::new(routing::Routing::new(own)),
            adverts: watch::channel(Arc::new(Vec::new())).0,
            table: watch::channel(Arc::new(Table::default())).0,
            live: Mutex::new(HashMap::new()),
            connectors: Mutex::new(Arc::new(BTreeMap::new())),
            listeners: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
            turn: AtomicU64::new(0),
            local_turn: AtomicU64::new(0),
            closing: Mutex::new(HashMap::new()),
            quic: Mutex::new(None),
            metrics,
            carried: TaskTracker::new(),
            draining: AtomicBool::new(false),
            config,
            hooks,
            links: Mutex::new(Links::default()),
            pending: Mutex::new(link::accept::Pending::default()),
            changed: watch::channel(0).0,
            stops: (0..config_shards)
                .map(|shard| match shard {
                    0 => shutdown.clone(),
                    _ => shutdown.child_token(),
                })
                .collect(),
            shutdown,
        });
        inner.reoriginate();
        tokio::spawn(routing::refresh(Arc::downgrade(&inner)));
        Router { inner }
    }

    /// Replaces this site's connectors and advertises the routing keys they serve.
    pub fn set_connectors(&self, connectors: Vec<ConnectorConfig>) {
        let mut by_key: BTreeMap<String, Vec<ConnectorConfig>> = BTreeMap::new();
        for c in connectors {
            by_key.entry(c.routing_key.clone()).or_default().push(c);
        }
        *self
            .inner
            .connectors
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(by_key);
        self.inner.reoriginate();
    }

    /// Starts serving a listener on an already bound socket. Replaces a listener of the same
    /// name. A draining router closes the socket instead.
    ///
    /// With several shards, each further shard accepts on a socket of its own bound to the
    /// same address, and the kernel spreads new connections over them: `listener` must have
    /// been bound with `SO_REUSEPORT` then. A shard that cannot bind leaves its share to the
    /// others (and says so).
    pub fn add_listener(&self, config: ListenerConfig, listener: tokio::net::TcpListener) {
        if self.is_draining() {
            tracing::warn!(listener = %config.name, "site is draining; listener not started");
            return;
        }
        let cancel = self.inner.shutdown.child_token();
        let previous = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(config.name.clone(), cancel.clone());
        if let Some(previous) = previous {
            previous.cancel();
        }
        if let Ok(addr) = listener.local_addr() {
            for (index, runtime) in self.inner.config.shards.iter().enumerate() {
                let (inner, config, cancel) = (self.inner.clone(), config.clone(), cancel.clone());
                runtime.spawn(async move {
                    match forward::join_listener(addr) {
                        Ok(listener) => {
                            forward::run_listener(inner, config, listener, cancel).await
                        }
                        Err(e) => tracing::warn!(
                            listener = %config.name, shard = index + 1, error = %e,
                            "this shard cannot accept on the listener's port; the others do"
                        ),
                    }
                });
            }
        }
        tokio::spawn(forward::run_listener(
            self.inner.clone(),
            config,
            listener,
            cancel,
        ));
    }

    /// Stops a listener (its port is closed; carried connections go on); false if none.
    pub fn remove_listener(&self, name: &str) -> bool {
        let removed = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(cancel) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Begins a graceful stop: closes every listener's port (new clients are refused by the
    /// kernel), withdraws this site's connectors from its advertisement (so other sites send
    /// new connections elsewhere as soon as it reaches them) and refuses streams that still
    /// arrive for them, so their origin tries the next site before its client notices. Links
    /// stay up, and carried connections (those this site originates, relays and serves) go on;
    /// [`Router::wait_carried`] resolves when the last one has ended. Returns how many are carried
    /// now.
    pub fn drain(&self) -> usize {
        self.inner.draining.store(true, Ordering::Release);
        let listeners: Vec<CancellationToken> = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, cancel)| cancel)
            .collect();
        for cancel in listeners {
            cancel.cancel();
        }
        self.inner.reoriginate();
        self.inner.carried.close();
        self.carried()
    }

    /// True once [`Router::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// How many carried connections this router has now (as origin, transit or destination,
    /// including those still connecting).
    pub fn carried(&self) -> usize {
        self.inner.carried.len()
    }

    /// Waits until no carried connection is left (those that start meanwhile count too). For
    /// stopping: after [`Router::drain`], or once the router's shutdown token fired, which
    /// aborts every carried connection at once (a TCP RST to its client or backend, a stream
    /// reset towards its peer), so that this resolves as soon as those resets are out.
    pub async fn wait_carried(&self) {
        self.inner.carried.close();
        self.inner.carried.wait().await
    }

    /// The current routing table (sites, next hops, and where each key is served).
    pub fn table(&self) -> Arc<Table> {
        self.inner.table()
    }

    /// A receiver that sees every new routing table.
    pub fn subscribe_table(&self) -> watch::Receiver<Arc<Table>> {
        self.inner.table.subscribe()
    }

    /// Every link-state advertisement this router holds (the whole network as it knows it).
    pub fn advertisements(&self) -> Vec<Arc<Advertisement>> {
        self.inner.adverts.borrow().as_ref().clone()
    }

    /// This router's settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Where connections turned away at the link port are counted and logged (the site's TCP
    /// link port reports to it too).
    pub fn rejections(&self) -> &Rejections {
        &self.inner.metrics.rejections
    }

    /// Starts dialing `link` (and redialing it whenever it drops) until it is removed.
    /// Replaces a link of the same name.
    pub fn add_link(&self, link: OutgoingLink) {
        let cancel = self.inner.shutdown.child_token();
        let status = LinkStatus {
            name: link.name.clone(),
            direction: Direction::Outgoing,
            peer_site: link.peer_site,
            peer_name: link.peer_name.clone(),
            state: LinkState::Connecting,
            rtt: None,
            cost: link.cost,
            since: SystemTime::now(),
            last_error: None,
            cert_expires: link.cert.not_after().ok(),
            connects: 0,
            transport: None,
            lanes: None,
        };
        let previous = self.inner.update(|links| {
            links.outgoing.insert(
                link.name.clone(),
                Outgoing {
                    status,
                    cancel: cancel.clone(),
                },
            )
        });
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        tokio::spawn(link::dial::run(self.inner.clone(), link, cancel));
    }

    /// Stops and forgets the outgoing link `name`; false if there is none.
    pub fn remove_link(&self, name: &str) -> bool {
        match self.inner.update(|links| links.outgoing.remove(name)) {
            Some(link) => {
                link.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Closes the incoming links of `site` at once, telling it `reason`, and forgets them (used
    /// on revocation; the TLS layer refuses the site's next handshakes).
    pub fn close_site(&self, site: Uuid, reason: &str) {
        self.inner.close_site(site, reason);
    }

    /// Serves QUIC links on `socket` (the UDP link port) with the site's TLS server config,
    /// until the router shuts down. The same endpoint dials this site's QUIC links.
    pub fn serve_quic(
        &self,
        socket: std::net::UdpSocket,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<std::net::SocketAddr> {
        let limit = transport_stream_limit(self.inner.config.max_link_streams);
        let endpoint = link::quic::server_endpoint(socket, tls, limit)?;
        let addr = endpoint.local_addr()?;
        *self.inner.quic.lock().unwrap_or_else(|e| e.into_inner()) = Some(endpoint.clone());
        tokio::spawn(link::accept::serve_quic(self.inner.clone(), endpoint));
        Ok(addr)
    }

    /// Hands an accepted TLS connection (ALPN [`ALPN_LINK`]) to the router. Returns when the link
    /// session it belongs to ends.
    pub async fn accept(&self, tls: tokio_rustls::server::TlsStream<link::tls::LinkTcp>) {
        link::accept::run(self.inner.clone(), tls).await
    }

    /// A snapshot of every link, outgoing first, each group sorted by name.
    pub fn links(&self) -> Vec<LinkStatus> {
        let links = self.inner.lock().statuses();
        self.inner.count_lanes(links)
    }

    /// Describes an existing link with `site` in either direction, if there is one.
    pub fn link_with(&self, site: Uuid) -> Option<LinkStatus> {
        let status = {
            let links = self.inner.lock();
            links
                .outgoing
                .values()
                .map(|l| &l.status)
                .chain(links.incoming.get(&site).map(|l| &l.status))
                .find(|s| s.peer_site == site)
                .cloned()?
        };
        self.inner.count_lanes(vec![status]).pop()
    }

    /// Waits until the outgoing link `name` is up, for at most `limit`. On failure returns the
    /// link's last error (or a timeout message).
    pub async fn wait_up(&self, name: &str, limit: Duration) -> Result<LinkStatus, String> {
        let mut changed = self.inner.changed.subscribe();
        let limit = limit.min(Duration::from_secs(3600));
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self
                .inner
                .lock()
                .outgoing
                .get(name)
                .map(|l| l.status.clone())
                .ok_or_else(|| format!("link {name} was removed"))?;
            if status.state == LinkState::Up {
                return Ok(self.inner.count_lanes(vec![status]).remove(0));
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(status.last_error.unwrap_or_else(|| {
                        format!("link {name} did not come up within {limit:?}")
                    }))
                }
            }
        }
    }

    /// A receiver that ticks whenever any link's status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// The host part of an endpoint written `host:port`, `[v6]:port` or as a bare host.
pub fn endpoint_host(endpoint: &str) -> &str {
    if let Some(rest) = endpoint.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match endpoint.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => endpoint,
    }
}

impl Inner {
    /// The token that fires when the router stops, for the shard the caller runs on.
    pub(crate) fn stop(&self) -> &CancellationToken {
        self.stops.get(shard::current()).unwrap_or(&self.shutdown)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Links> {
        // A panic while holding this lock is a bug elsewhere; the table itself stays consistent
        // (every update is a single insert/remove/assign), so keep serving it.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `links` with the lanes of those up over TLS counted, from the live links' transports
    /// (taken after the link table's lock is released: the two locks are never held together).
    fn count_lanes(&self, mut links: Vec<LinkStatus>) -> Vec<LinkStatus> {
        let live = self.live_links();
        for status in &mut links {
            status.lanes = match (status.state, live.get(&status.peer_site)) {
                (LinkState::Up, Some(l)) => match &*l.transport {
                    link::LinkTransport::Tls(tls) => Some(tls.lanes().up()),
                    link::LinkTransport::Quic(_) => None,
                },
                _ => None,
            };
        }
        links
    }

    /// Applies `f` to the link table and tells subscribers something changed.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Links) -> R) -> R {
        let result = {
            let mut links = self.lock();
            let result = f(&mut links);
            let all = links.statuses();
            // Under the table lock, so concurrent updates export their snapshots in order.
            self.metrics.refresh_links(&all);
            result
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        result
    }

    /// The QUIC endpoint to dial from.
    pub(crate) fn quic_endpoint(&self) -> std::io::Result<quinn::Endpoint> {
        let mut quic = self.quic.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(endpoint) = quic.as_ref() {
            return Ok(endpoint.clone());
        }
        let endpoint = link::quic::client_endpoint()?;
        *quic = Some(endpoint.clone());
        Ok(endpoint)
    }

    pub(crate) fn connectors(&self) -> Connectors {
        self.connectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Updates the status of outgoing link `name`, if it still exists.
    pub(crate) fn set_outgoing(&self, name: &str, f: impl FnOnce(&mut LinkStatus)) {
        self.update(|links| {
            if let Some(link) = links.outgoing.get_mut(name) {
                f(&mut link.status);
            }
        })
    }

    /// Registers a new incoming session from `status.peer_site`, replacing (and closing) an
    /// older session from the same site: a peer that restarted reconnects before its old
    /// session has timed out. Returns the session number for [`Inner::set_incoming`].
    pub(crate) fn add_incoming(&self, status: LinkStatus, cancel: CancellationToken) -> u64 {
        let (session, old) = self.update(|links| {
            links.next_session += 1;
            let session = links.next_session;
            let mut status = status;
            if let Some(old) = links.incoming.get(&status.peer_site) {
                status.connects = old.status.connects;
            }
            status.connects += 1;
            if status.connects > 1 {
                self.metrics
                    .link_reconnects
                    .get_or_create(&metrics::NameLabels {
                        link: status.name.clone(),
                    })
                    .inc();
            }
            let old = links.incoming.insert(
                status.peer_site,
                Incoming {
                    status,
                    cancel,
                    session,
                },
            );
            (session, old)
        });
        if let Some(old) = old {
            old.cancel.cancel();
        }
        session
    }

    /// Closes the incoming link of `site`, if one is registered, telling it `reason`
    /// ([`Router::close_site`]).
    pub(crate) fn close_site(&self, site: Uuid, reason: &str) {
        let closed = self.update(|links| links.incoming.remove(&site));
        if let Some(link) = closed {
            self.closing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(site, reason.to_string());
            link.cancel.cancel();
        }
    }

    /// Updates an incoming link's status if `session` is still the current one for that site.
    pub(crate) fn set_incoming(&self, site: Uuid, session: u64, f: impl FnOnce(&mut LinkStatus)) {
        self.update(|links| {
            if let Some(link) = links.incoming.get_mut(&site) {
                if link.session == session {
                    f(&mut link.status);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts() {
        assert_eq!(endpoint_host("example.com:55671"), "example.com");
        assert_eq!(endpoint_host("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(endpoint_host("[::1]:55671"), "::1");
        assert_eq!(endpoint_host("example.com"), "example.com");
    }
}
