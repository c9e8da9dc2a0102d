//! The site daemon: one router, the grant server on the link port, and the admin API.
//!
//! [`run`] is handed its listeners already bound (the binary binds them, the demo binds
//! loopback port 0) and a shutdown token; it returns once the token fires and everything has
//! stopped.
//!
//! Concurrency: the site's mutable state (`State`) sits behind one std mutex that is never held
//! across an `.await`; each change is persisted (atomically) while the lock is held, so the file
//! on disk and memory change together and a failed write (a full disk) rolls the change back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use skiff_certs::{Authority, CertifiedKey, Revocations};
use skiff_router::{
    ConnectorConfig, Direction, LinkState, LinkStatus, ListenerConfig, Router, Strategy,
    TransportChoice, ALPN_LINK,
};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admin::{self, ApiRequest, ApiResponse};
use crate::claim::{self, ClaimRequest, ClaimResponse, ALPN_CLAIM};
use crate::model::{
    self, ConnectorRecord, Grant, LinkRecord, ListenerRecord, PeerRecord, SiteConfig, State,
};
use crate::store::{Mode, Store};
use crate::token::{AccessToken, Issuer, Metadata, Secret, TokenSpec};
use crate::Error;
use skiff_router::link::tls::LinkTcp;
use skiff_router::reject::{Endpoint, Reason};

/// Most token redemptions answered at once; more are refused until one finishes.
const MAX_CLAIMS: usize = 32;
/// Default wait for `link create`.
const DEFAULT_LINK_WAIT: Duration = Duration::from_secs(30);

/// Settings for a new site (`skiff site init`).
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Site name.
    pub name: String,
    /// Link hosts (default `127.0.0.1`).
    pub link_hosts: Vec<String>,
    /// Link port.
    pub link_port: u16,
    /// UDP port for QUIC links (`None`: no QUIC).
    pub quic_port: Option<u16>,
    /// Metrics address.
    pub metrics_addr: Option<String>,
    /// Lifetime of the client certificates this site issues.
    pub cert_lifetime: Duration,
}

/// Creates a site in `store`: its id, its CA and its settings.
pub fn init(store: &Store, options: InitOptions) -> Result<SiteConfig, Error> {
    model::check_name("site", &options.name)?;
    if store.exists() {
        return Err(Error::SiteExists(store.dir().to_path_buf()));
    }
    if options.cert_lifetime < Duration::from_secs(5) {
        return Err(Error::Invalid(
            "--cert-lifetime must be at least 5s (certificates are renewed at two thirds of it)"
                .into(),
        ));
    }
    let link_hosts = if options.link_hosts.is_empty() {
        vec!["127.0.0.1".to_string()]
    } else {
        options.link_hosts
    };
    for host in &link_hosts {
        if rustls::pki_types::ServerName::try_from(host.as_str()).is_err() {
            return Err(Error::Invalid(format!(
                "--link-host {host:?} is neither a DNS name nor an IP address"
            )));
        }
    }
    let config = SiteConfig {
        name: options.name,
        id: Uuid::new_v4(),
        link_hosts,
        link_port: options.link_port,
        quic_port: options.quic_port,
        metrics_addr: options.metrics_addr,
        cert_lifetime_secs: options.cert_lifetime.as_secs(),
        advertised_port: None,
        advertised_quic_port: None,
    };
    store.create_dir()?;
    let authority = Authority::generate(config.id, &config.name)?;
    store.write("ca.key", authority.key_pem().as_bytes(), Mode::Private)?;
    store.write("ca.pem", authority.cert_pem().as_bytes(), Mode::Public)?;
    store.save_state(&State::default())?;
    // site.json last: its presence is what marks the site as initialised.
    store.save_config(&config)?;
    Ok(config)
}

/// The sockets a daemon serves, bound by the caller.
pub struct Listeners {
    /// The link port (links and token redemption).
    pub link: TcpListener,
    /// The admin socket.
    pub admin: UnixListener,
    /// The metrics/health address, if any.
    pub metrics: Option<TcpListener>,
    /// The UDP socket for QUIC links, if the site serves QUIC.
    pub quic: Option<std::net::UdpSocket>,
}

/// The parts of a site the router's hooks need (no router inside, so no cycle).
struct Core {
    config: SiteConfig,
    store: Store,
    authority: Authority,
    revocations: Revocations,
    state: Mutex<State>,
}

/// A running site.
pub struct Site {
    core: Arc<Core>,
    router: Router,
    link_port: u16,
    /// The UDP port QUIC links are served on, if any.
    quic_port: Option<u16>,
    server_tls: Arc<rustls::ServerConfig>,
    /// Listeners that could not be bound at start (name → why).
    listener_errors: Mutex<std::collections::HashMap<String, String>>,
    metrics: crate::http::ControlMetrics,
    /// Every metric of the site, for `/metrics` and debug dumps.
    registry: std::sync::OnceLock<Arc<prometheus_client::registry::Registry>>,
    /// Recent log lines, if the logger keeps them.
    recent_logs: Option<crate::logs::Recent>,
    /// Set once state is loaded and listeners are bound (`/readyz`).
    ready: std::sync::atomic::AtomicBool,
    /// Set when a graceful stop begins (`/readyz` says `draining`).
    draining: std::sync::atomic::AtomicBool,
    /// When the link server certificate expires.
    server_expires: Option<SystemTime>,
    /// What the link port accepts.
    limits: Limits,
    /// Redemption attempts by source address.
    claim_limiter: Mutex<crate::limit::AddressLimiter>,
    /// Links being created (their tokens being redeemed) right now.
    creating: LinkCreations,
}

/// The links `link create` requests are creating right now, by name and peer site. A
/// redemption takes a round trip to the issuing site, and two requests under way at once (two
/// `kubectl apply`d AccessTokens, two scripts) could otherwise both pass the checks that a
/// link's name is free and that no link to that site exists, spend both tokens, and leave two
/// links to one site, or one link's certificate overwritten by the other's.
#[derive(Default)]
struct LinkCreations(Mutex<Vec<(String, Uuid)>>);

/// A link creation under way; its name and peer are free again when this drops.
struct LinkCreation<'a> {
    creations: &'a LinkCreations,
    name: String,
}

impl LinkCreations {
    /// Registers the creation of link `name` to site `peer` (named `peer_name`), or says which
    /// creation under way it would clash with.
    fn begin(&self, name: &str, peer: Uuid, peer_name: &str) -> Result<LinkCreation<'_>, String> {
        let mut creating = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if creating.iter().any(|(n, _)| n == name) {
            return Err(format!(
                "a link named {name} is being created by another request; see skiff link \
                 status once it is done"
            ));
        }
        if creating.iter().any(|(_, p)| *p == peer) {
            return Err(format!(
                "a link to site {peer_name} is being created by another request; see skiff \
                 link status once it is done"
            ));
        }
        creating.push((name.to_string(), peer));
        Ok(LinkCreation {
            creations: self,
            name: name.to_string(),
        })
    }
}

impl Drop for LinkCreation<'_> {
    fn drop(&mut self) {
        let mut creating = self.creations.0.lock().unwrap_or_else(|e| e.into_inner());
        creating.retain(|(n, _)| *n != self.name);
    }
}

/// Default of [`RunOptions::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of the daemon beyond what the state dir holds.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Log one line per closed carried connection.
    pub access_log: bool,
    /// Where the logger keeps recent lines (served to `skiff debug dump`).
    pub recent_logs: Option<crate::logs::Recent>,
    /// Fires to ask for a graceful stop (the binary fires it on the first SIGTERM or SIGINT):
    /// the site drains for at most `drain_timeout`, then stops. `None`: only the shutdown
    /// token stops the site, at once.
    pub drain: Option<CancellationToken>,
    /// How long a graceful stop waits for carried connections to finish.
    pub drain_timeout: Duration,
    /// What the link port and each link accept.
    pub limits: Limits,
    /// The runtimes of the router's further shards (see `skiff_router::shard`); empty: one.
    pub shards: Vec<tokio::runtime::Handle>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            access_log: true,
            recent_logs: None,
            drain: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            limits: Limits::default(),
            shards: Vec::new(),
        }
    }
}

/// What the link port and each link accept (the `skiff site run` flags of the same names).
/// Everything anyone who can reach the link port can make the site spend is bounded here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most handshakes in progress at once on the TCP link port, and (separately) on the UDP
    /// one; connections beyond it are dropped at once rather than queued.
    pub max_handshakes: usize,
    /// Limit for a TLS or QUIC handshake on the link port, and for what must follow it (a
    /// link's preface, a redemption's claim); also for this site's own link handshakes.
    pub handshake_timeout: Duration,
    /// Most carried connections a neighbour may have open towards this site on one link
    /// (see [`skiff_router::Config::max_link_streams`]).
    pub max_link_streams: u32,
    /// Token redemption attempts allowed per source address and minute, after a burst.
    pub redemption_rate: u32,
    /// Redemption attempts one source address may make at once before the rate applies.
    pub redemption_burst: u32,
}

/// Default of [`Limits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`Limits::redemption_rate`].
pub const DEFAULT_REDEMPTION_RATE: u32 = 10;
/// Default of [`Limits::redemption_burst`].
pub const DEFAULT_REDEMPTION_BURST: u32 = 5;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_handshakes: skiff_router::DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_link_streams: skiff_router::DEFAULT_MAX_LINK_STREAMS,
            redemption_rate: DEFAULT_REDEMPTION_RATE,
            redemption_burst: DEFAULT_REDEMPTION_BURST,
        }
    }
}

impl Limits {
    /// Checks every limit is usable; says which flag to fix.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Invalid(m.to_string()));
        if self.max_handshakes == 0 {
            return bad("--max-handshakes must be at least 1");
        }
        if self.handshake_timeout < Duration::from_millis(100)
            || self.handshake_timeout > Duration::from_secs(300)
        {
            return bad("--handshake-timeout must be between 100ms and 5m");
        }
        if self.max_link_streams == 0 {
            return bad("--max-link-streams must be at least 1");
        }
        if self.redemption_rate == 0 || self.redemption_burst == 0 {
            return bad("--redemption-rate and --redemption-burst must be at least 1");
        }
        Ok(())
    }
}

/// Runs the site daemon in `store` until `shutdown` fires; then it stops at once, resetting
/// the connections it still carries.
pub async fn run(
    store: Store,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_with(store, listeners, RunOptions::default(), shutdown).await
}

/// [`run`] with options, among them a graceful stop: when `options.drain` fires, the site
/// drains (see [`skiff_router::Router::drain`]; `/readyz` answers 503 `draining`) until its
/// carried connections have finished, `options.drain_timeout` has passed or `shutdown` fires,
/// whichever comes first; then it stops, resetting whatever is still carried.
pub async fn run_with(
    store: Store,
    mut listeners: Listeners,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    let site = Arc::new(Site::load(
        store,
        &mut listeners,
        &options,
        &mut registry,
        shutdown.child_token(),
    )?);
    let registry = Arc::new(registry);
    let _ = site.registry.set(registry.clone());
    let mut tasks = tokio::task::JoinSet::new();
    // Health endpoints first, so /readyz can say "starting" while listeners are being bound.
    if let Some(metrics) = listeners.metrics {
        let endpoints: Arc<dyn crate::http::Endpoints> = site.clone();
        tasks.spawn(crate::http::serve(
            metrics,
            endpoints,
            registry,
            shutdown.clone(),
        ));
    }
    site.start_listeners().await;
    tasks.spawn(accept_links(site.clone(), listeners.link, shutdown.clone()));
    let handler_site = site.clone();
    let handler: admin::Handler = Arc::new(move |req| {
        let site = handler_site.clone();
        Box::pin(async move { site.handle(req).await })
    });
    tasks.spawn(admin::serve(listeners.admin, handler, shutdown.clone()));
    site.ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        site = %site.core.config.name,
        id = %site.core.config.id,
        link_port = site.link_port,
        quic_port = site.quic_port,
        shards = site.router.config().shard_count(),
        "site running"
    );
    tasks.spawn(watch_certificates(site.clone(), shutdown.clone()));
    let drain = options.drain.clone().unwrap_or_default();
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = drain.cancelled() => site.drain(options.drain_timeout, &shutdown).await,
    }
    shutdown.cancel();
    // Every task watches the same token; wait (bounded) for them to wind down, and for the
    // carried connections' resets to go out before the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
        site.router.wait_carried().await;
    })
    .await;
    let _ = std::fs::remove_file(site.core.store.admin_socket());
    tracing::info!("site stopped");
    Ok(())
}

impl Site {
    fn load(
        store: Store,
        listeners: &mut Listeners,
        options: &RunOptions,
        registry: &mut prometheus_client::registry::Registry,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        options.limits.check()?;
        let config = store.load_config()?;
        let authority = Authority::from_pem(&store.read("ca.pem")?, &store.read("ca.key")?)?;
        let state = store.load_state()?;
        let link_port = listeners
            .link
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(config.link_port);
        let server = authority.issue_server(&config.link_hosts, model::SERVER_CERT_LIFETIME)?;
        let revocations = Revocations::new(state.revoked.iter().copied());
        let server_tls = skiff_certs::server_config(
            authority.cert_pem(),
            &server,
            revocations.clone(),
            &[ALPN_LINK, ALPN_CLAIM],
        )?;
        let links = state.links.clone();
        let core = Arc::new(Core {
            config: config.clone(),
            store,
            authority,
            revocations,
            state: Mutex::new(state),
        });
        let mut router_config = skiff_router::Config::new(config.id, config.name.clone());
        router_config.access_log = options.access_log;
        router_config.handshake_timeout = options.limits.handshake_timeout;
        router_config.max_handshakes = options.limits.max_handshakes;
        router_config.max_link_streams = options.limits.max_link_streams;
        router_config.shards = options.shards.clone();
        let router = Router::new(
            router_config,
            core.clone(),
            shutdown,
            skiff_router::Metrics::register(registry),
        );
        let metrics = crate::http::ControlMetrics::register(registry);
        let quic_port = match listeners.quic.take() {
            Some(socket) => {
                // QUIC carries links only (redemption stays on TCP), so only that ALPN.
                let tls = skiff_certs::server_config(
                    core.authority.cert_pem(),
                    &server,
                    core.revocations.clone(),
                    &[ALPN_LINK],
                )?;
                let addr = router
                    .serve_quic(socket, tls)
                    .map_err(|e| Error::Invalid(format!("cannot serve QUIC links: {e}")))?;
                Some(addr.port())
            }
            None => None,
        };
        for record in links {
            match core.link_cert(&record.name) {
                Ok(cert) => router.add_link(outgoing(&record, cert)),
                Err(e) => tracing::error!(link = %record.name, error = %e, "link not started"),
            }
        }
        let site = Site {
            core,
            router,
            link_port,
            quic_port,
            server_tls,
            listener_errors: Mutex::new(Default::default()),
            creating: LinkCreations::default(),
            metrics,
            registry: std::sync::OnceLock::new(),
            recent_logs: options.recent_logs.clone(),
            ready: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
            server_expires: server.not_after().ok(),
            limits: options.limits.clone(),
            claim_limiter: Mutex::new(crate::limit::AddressLimiter::new(
                options.limits.redemption_rate,
                options.limits.redemption_burst,
            )),
        };
        site.apply_connectors();
        Ok(site)
    }

    /// Drains (see [`run_with`]) until the carried connections have finished, `timeout` has
    /// passed or `stop` fires.
    async fn drain(&self, timeout: Duration, stop: &CancellationToken) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        let carried = self.router.drain();
        tracing::info!(
            carried,
            timeout_s = timeout.as_secs_f64(),
            "draining: listeners closed and connectors withdrawn; waiting for carried \
             connections to finish (SIGTERM or Ctrl-C again stops at once)"
        );
        tokio::select! {
            // A second signal wins even when the connections it aborts finish in the same turn.
            biased;
            () = stop.cancelled() => {
                tracing::warn!(
                    left = self.router.carried(),
                    "stopping now: resetting the connections still carried"
                );
            }
            () = self.router.wait_carried() => {
                tracing::info!("drained: every carried connection finished");
                // QUIC streams were waited for until acknowledged; HTTP/2 acknowledges nothing
                // per stream, so give TLS links a moment to deliver the last frames of the
                // connections that just finished before they close.
                let rtt = self
                    .router
                    .links()
                    .iter()
                    .filter_map(|l| l.rtt)
                    .max()
                    .unwrap_or_default();
                let linger = (rtt * 4).clamp(Duration::from_millis(200), Duration::from_secs(1));
                tokio::time::sleep(linger).await;
            }
            () = tokio::time::sleep(timeout) => {
                tracing::warn!(
                    left = self.router.carried(),
                    "drain timeout: resetting the connections still carried"
                );
            }
        }
    }

    /// Whether the router runs several shards, each accepting on every listener's port.
    fn sharded(&self) -> bool {
        self.router.config().shard_count() > 1
    }

    /// Binds every stored listener; one that cannot be bound is reported, not fatal.
    async fn start_listeners(&self) {
        let records = self.core.lock().listeners.clone();
        for record in records {
            match bind_listener(&record, self.sharded()).await {
                Ok(socket) => self.router.add_listener(listener_config(&record), socket),
                Err(e) => {
                    tracing::error!(listener = %record.name, error = %e, "listener not started");
                    self.errors().insert(record.name.clone(), e);
                }
            }
        }
    }

    fn errors(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.listener_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn apply_connectors(&self) {
        let connectors = self
            .core
            .lock()
            .connectors
            .iter()
            .map(|c| ConnectorConfig {
                name: c.name.clone(),
                routing_key: c.routing_key.clone(),
                host: c.host.clone(),
                port: c.port,
                weight: c.weight,
            })
            .collect();
        self.router.set_connectors(connectors);
    }

    fn create_connector(&self, req: admin::CreateConnector) -> ApiResponse {
        let bad = |m: String| admin::error(StatusCode::BAD_REQUEST, m);
        if let Err(e) = model::check_routing_key(&req.routing_key) {
            return bad(e.to_string());
        }
        let name = req.name.clone().unwrap_or_else(|| req.routing_key.clone());
        if let Err(e) = model::check_name("connector", &name) {
            return bad(format!("{e} (pass --name)"));
        }
        if req.host.is_empty() || req.port == 0 {
            return bad("a connector needs --host and a --port other than 0".into());
        }
        let record = ConnectorRecord {
            name: name.clone(),
            routing_key: req.routing_key,
            host: req.host,
            port: req.port,
            weight: req.weight.unwrap_or(1).clamp(1, 1000),
        };
        let saved = self.core.change(|state| {
            if state.connectors.iter().any(|c| c.name == name) {
                return Err(Error::Invalid(format!(
                    "a connector named {name} already exists; delete it first or pick another --name"
                )));
            }
            state.connectors.push(record.clone());
            Ok(())
        });
        match saved {
            Ok(()) => {
                self.apply_connectors();
                tracing::info!(connector = %name, key = %record.routing_key, "connector created");
                admin::ok(&connector_view(&record))
            }
            Err(e @ Error::Invalid(_)) => admin::error(StatusCode::CONFLICT, e.to_string()),
            Err(e) => admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        }
    }

    fn delete_connector(&self, name: &str) -> ApiResponse {
        let removed = self.core.change(|state| {
            let before = state.connectors.len();
            state.connectors.retain(|c| c.name != name);
            if before == state.connectors.len() {
                return Err(Error::Invalid(format!(
                    "no connector named {name} (see skiff connector list)"
                )));
            }
            Ok(())
        });
        match removed {
            Ok(()) => {
                self.apply_connectors();
                admin::ok(&serde_json::json!({}))
            }
            Err(e @ Error::Invalid(_)) => admin::error(StatusCode::NOT_FOUND, e.to_string()),
            Err(e) => admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        }
    }

    async fn create_listener(&self, req: admin::CreateListener) -> ApiResponse {
        let bad = |m: String| admin::error(StatusCode::BAD_REQUEST, m);
        if let Err(e) = model::check_routing_key(&req.routing_key) {
            return bad(e.to_string());
        }
        let name = req.name.clone().unwrap_or_else(|| req.routing_key.clone());
        if let Err(e) = model::check_name("listener", &name) {
            return bad(format!("{e} (pass --name)"));
        }
        let strategy = req.strategy.unwrap_or_else(|| "balanced".into());
        if Strategy::parse(&strategy).is_none() {
            return bad(format!(
                "unknown strategy {strategy:?}: use balanced, closest, round-robin or source-affinity"
            ));
        }
        if self.core.lock().listeners.iter().any(|l| l.name == name) {
            return admin::error(
                StatusCode::CONFLICT,
                format!("a listener named {name} already exists; delete it first or pick another --name"),
            );
        }
        let record = ListenerRecord {
            name: name.clone(),
            routing_key: req.routing_key,
            bind: req.bind.unwrap_or_else(|| "127.0.0.1".into()),
            port: req.port,
            strategy,
        };
        let socket = match bind_listener(&record, self.sharded()).await {
            Ok(socket) => socket,
            Err(e) => return admin::error(StatusCode::CONFLICT, e),
        };
        let mut record = record;
        if record.port == 0 {
            // Port 0 asks for any free port; store the one we got so restarts keep it.
            record.port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        }
        if let Err(e) = self.core.change(|state| {
            if state.listeners.iter().any(|l| l.name == record.name) {
                return Err(Error::Invalid(format!(
                    "a listener named {} was created meanwhile",
                    record.name
                )));
            }
            state.listeners.push(record.clone());
            Ok(())
        }) {
            return match e {
                Error::Invalid(m) => admin::error(
                    StatusCode::CONFLICT,
                    format!("{m}; delete it first or pick another --name"),
                ),
                e => admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
            };
        }
        self.router.add_listener(listener_config(&record), socket);
        tracing::info!(listener = %name, key = %record.routing_key, port = record.port, "listener created");
        admin::ok(&self.listener_view(&record))
    }

    fn delete_listener(&self, name: &str) -> ApiResponse {
        let removed = self.core.change(|state| {
            let before = state.listeners.len();
            state.listeners.retain(|l| l.name != name);
            if before == state.listeners.len() {
                return Err(Error::Invalid(format!(
                    "no listener named {name} (see skiff listener list)"
                )));
            }
            Ok(())
        });
        match removed {
            Ok(()) => {
                self.router.remove_listener(name);
                self.errors().remove(name);
                admin::ok(&serde_json::json!({}))
            }
            Err(e @ Error::Invalid(_)) => admin::error(StatusCode::NOT_FOUND, e.to_string()),
            Err(e) => admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        }
    }

    fn listener_view(&self, record: &ListenerRecord) -> admin::ListenerView {
        let table = self.router.table();
        admin::ListenerView {
            name: record.name.clone(),
            routing_key: record.routing_key.clone(),
            bind: record.bind.clone(),
            port: record.port,
            strategy: record.strategy.clone(),
            targets: table
                .targets(&record.routing_key)
                .iter()
                .map(|t| table.name(t.site))
                .collect(),
            error: self.errors().get(&record.name).cloned(),
        }
    }

    /// The site's settings and state with every secret replaced by `***`.
    fn masked_config(&self) -> serde_json::Value {
        let mut state = self.core.lock().clone();
        for grant in &mut state.grants {
            grant.code_sha256 = "***".into();
        }
        serde_json::json!({
            "site": self.core.config,
            "state": state,
            "privateKeys": "*** (not included)",
        })
    }

    fn network(&self) -> admin::NetworkView {
        let table = self.router.table();
        let own = self.core.config.id;
        let adverts = self.router.advertisements();
        let rtts: std::collections::HashMap<Uuid, f64> = self
            .router
            .links()
            .iter()
            .filter_map(|l| l.rtt.map(|r| (l.peer_site, r.as_secs_f64() * 1000.0)))
            .collect();
        let mut sites: Vec<admin::NetworkSite> = adverts
            .iter()
            .map(|a| {
                let route = table.routes.get(&a.origin);
                admin::NetworkSite {
                    name: a.name.clone(),
                    id: a.origin,
                    local: a.origin == own,
                    reachable: a.origin == own || route.is_some(),
                    cost: if a.origin == own {
                        Some(0)
                    } else {
                        route.map(|r| r.cost)
                    },
                    next_hop: route.map(|r| table.name(r.next_hop)),
                }
            })
            .collect();
        sites.sort_by(|a, b| {
            (a.cost.is_none(), a.cost, &a.name).cmp(&(b.cost.is_none(), b.cost, &b.name))
        });
        let mut links = Vec::new();
        for a in &adverts {
            for l in &a.links {
                let back = adverts
                    .iter()
                    .find(|b| b.origin == l.peer)
                    .is_some_and(|b| b.links.iter().any(|x| x.peer == a.origin));
                // List each link once: from the smaller id when both ends advertise it.
                if back && a.origin > l.peer {
                    continue;
                }
                let rtt = if a.origin == own {
                    rtts.get(&l.peer).copied()
                } else if l.peer == own {
                    rtts.get(&a.origin).copied()
                } else {
                    None
                };
                links.push(admin::NetworkLink {
                    from: a.name.clone(),
                    to: table.name(l.peer),
                    cost: l.cost,
                    state: if back { "up" } else { "down" }.into(),
                    rtt_ms: rtt,
                });
            }
        }
        links.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        let services = table
            .services
            .iter()
            .map(|(key, targets)| admin::NetworkService {
                routing_key: key.clone(),
                sites: targets
                    .iter()
                    .map(|t| admin::ServingSite {
                        name: table.name(t.site),
                        cost: t.cost,
                        weight: t.weight,
                    })
                    .collect(),
            })
            .collect();
        admin::NetworkView {
            site: self.core.config.name.clone(),
            sites,
            links,
            services,
        }
    }

    async fn handle(&self, req: ApiRequest) -> ApiResponse {
        let path = req.path.trim_end_matches('/');
        match (&req.method, path) {
            (&Method::GET, "/v1/status") => admin::ok(&self.status()),
            (&Method::GET, "/v1/links") => admin::ok(&self.link_views()),
            (&Method::POST, "/v1/links") => match admin::parse(&req.body) {
                Ok(body) => self.create_link(body).await,
                Err(e) => e,
            },
            (&Method::POST, "/v1/tokens") => match admin::parse(&req.body) {
                Ok(body) => self.issue_token(body),
                Err(e) => e,
            },
            (&Method::GET, "/v1/grants") => admin::ok(&self.grant_views()),
            (&Method::DELETE, p) if p.starts_with("/v1/grants/") => {
                self.delete_grant(&p["/v1/grants/".len()..])
            }
            (&Method::POST, "/v1/revocations") => match admin::parse(&req.body) {
                Ok(body) => self.revoke(body),
                Err(e) => e,
            },
            (&Method::DELETE, p) if p.starts_with("/v1/links/") => {
                self.delete_link(&p["/v1/links/".len()..])
            }
            (&Method::GET, "/v1/connectors") => {
                let list: Vec<_> = self
                    .core
                    .lock()
                    .connectors
                    .iter()
                    .map(connector_view)
                    .collect();
                admin::ok(&list)
            }
            (&Method::POST, "/v1/connectors") => match admin::parse(&req.body) {
                Ok(body) => self.create_connector(body),
                Err(e) => e,
            },
            (&Method::DELETE, p) if p.starts_with("/v1/connectors/") => {
                self.delete_connector(&p["/v1/connectors/".len()..])
            }
            (&Method::GET, "/v1/listeners") => {
                let records = self.core.lock().listeners.clone();
                let list: Vec<_> = records.iter().map(|r| self.listener_view(r)).collect();
                admin::ok(&list)
            }
            (&Method::POST, "/v1/listeners") => match admin::parse(&req.body) {
                Ok(body) => self.create_listener(body).await,
                Err(e) => e,
            },
            (&Method::DELETE, p) if p.starts_with("/v1/listeners/") => {
                self.delete_listener(&p["/v1/listeners/".len()..])
            }
            (&Method::GET, "/v1/network") => admin::ok(&self.network()),
            (&Method::GET, "/v1/logs") => admin::ok(
                &self
                    .recent_logs
                    .as_ref()
                    .map(|r| r.lines())
                    .unwrap_or_default(),
            ),
            (&Method::GET, "/v1/metrics") => {
                let mut text = String::new();
                if let Some(registry) = self.registry.get() {
                    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
                }
                admin::ok(&text)
            }
            (&Method::GET, "/v1/config") => admin::ok(&self.masked_config()),
            _ => admin::error(
                StatusCode::NOT_FOUND,
                format!("no such admin API route: {} {}", req.method, req.path),
            ),
        }
    }

    fn status(&self) -> admin::StatusView {
        let now = model::unix_now();
        let state = self.core.lock();
        admin::StatusView {
            site: admin::SiteView {
                name: self.core.config.name.clone(),
                id: self.core.config.id,
                version: skiff_router::VERSION.into(),
                link_endpoints: self.endpoints(),
                link_port: self.link_port,
                quic_port: self.quic_port,
            },
            links: self.link_views(),
            active_grants: state
                .grants
                .iter()
                .filter(|g| g.uses_left > 0 && g.expires > now)
                .count(),
            revoked: state.revoked.clone(),
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.core.config.endpoints_on(self.link_port)
    }

    fn quic_endpoints(&self) -> Vec<String> {
        self.core.config.quic_endpoints_on(self.quic_port)
    }

    fn link_views(&self) -> Vec<admin::LinkView> {
        self.router.links().iter().map(link_view).collect()
    }

    fn issue_token(&self, req: admin::IssueToken) -> ApiResponse {
        if req.uses == 0 {
            return admin::error(StatusCode::BAD_REQUEST, "--uses must be at least 1");
        }
        if req.expiry_secs == 0 || req.expiry_secs > 365 * 24 * 3600 {
            return admin::error(
                StatusCode::BAD_REQUEST,
                "--expiry must be more than 0s and at most 365d",
            );
        }
        let code = hex(&rand::random::<[u8; 20]>());
        let now = model::unix_now();
        let grant = Grant {
            id: format!(
                "{}-{}",
                self.core.config.name,
                hex(&rand::random::<[u8; 4]>())
            ),
            code_sha256: hex(&sha256(code.as_bytes())),
            uses_left: req.uses,
            expires: now + req.expiry_secs,
            cost: req.cost,
        };
        let token = AccessToken {
            api_version: crate::token::API_VERSION.into(),
            kind: crate::token::KIND.into(),
            metadata: Metadata {
                name: grant.id.clone(),
            },
            spec: TokenSpec {
                endpoints: self.endpoints(),
                quic_endpoints: self.quic_endpoints(),
                code: Secret(code),
                ca: self.core.authority.cert_pem().to_string(),
                cost: req.cost,
                expires: model::rfc3339(grant.expires),
                issuer: Issuer {
                    name: self.core.config.name.clone(),
                    id: self.core.config.id,
                },
            },
        };
        let issued = admin::TokenIssued {
            token: Secret(token.to_yaml()),
            grant: grant.id.clone(),
            expires: token.spec.expires.clone(),
        };
        let saved = self.core.change(|state| {
            // Spent or long-expired grants are only kept a day, for clear refusal messages.
            state
                .grants
                .retain(|g| g.expires + 24 * 3600 > now && (g.uses_left > 0 || g.expires > now));
            state.grants.push(grant);
            Ok(())
        });
        match saved {
            Ok(()) => {
                tracing::info!(grant = %issued.grant, uses = req.uses, "token issued");
                admin::ok(&issued)
            }
            Err(e) => admin::error(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("token not issued: {e}"),
            ),
        }
    }

    async fn create_link(&self, req: admin::CreateLink) -> ApiResponse {
        let bad = |m: String| admin::error(StatusCode::BAD_REQUEST, m);
        let token = match AccessToken::parse(&req.token.0) {
            Ok(token) => token,
            Err(e) => return bad(e.to_string()),
        };
        let config = &self.core.config;
        let issuer = &token.spec.issuer;
        if issuer.id == config.id {
            return bad(format!(
                "this token was issued by site {} itself; a site cannot link to itself — \
                 redeem it on the other site",
                config.name
            ));
        }
        let name = req.name.clone().unwrap_or_else(|| issuer.name.clone());
        if let Err(e) = model::check_name("link", &name) {
            return bad(e.to_string());
        }
        let transport = req.transport.clone().unwrap_or_else(|| "auto".into());
        match TransportChoice::parse(&transport) {
            None => {
                return bad(format!(
                    "unknown transport {transport:?}: use auto, quic or tls"
                ))
            }
            Some(TransportChoice::Quic) if token.spec.quic_endpoints.is_empty() => {
                return bad(format!(
                    "site {} does not serve QUIC links (its token lists no QUIC endpoint); \
                     use --transport tls or auto",
                    issuer.name
                ))
            }
            Some(_) => {}
        }
        // Registered before the checks below, so that a creation finishing meanwhile is either
        // still registered (this one is refused here) or already saved (the checks see it).
        let _creating = match self.creating.begin(&name, issuer.id, &issuer.name) {
            Ok(creation) => creation,
            Err(message) => return admin::error(StatusCode::CONFLICT, message),
        };
        if self.core.lock().links.iter().any(|l| l.name == name) {
            return admin::error(
                StatusCode::CONFLICT,
                format!("a link named {name} already exists; pick another with --name, or delete it first"),
            );
        }
        if let Some(existing) = self.router.link_with(issuer.id) {
            if existing.direction == Direction::Outgoing || existing.state == LinkState::Up {
                return admin::error(StatusCode::CONFLICT, duplicate_message(config, &existing));
            }
        }
        let (key_pem, csr_pem) = match skiff_certs::generate_csr(config.id, &config.name) {
            Ok(pair) => pair,
            Err(e) => return admin::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        // Spending the token's use at the issuer cannot be undone: make sure first that the
        // link's files will fit (its certificate, and the state file written anew beside the
        // old one), so that a full disk fails here, with the token unspent.
        let room = {
            let state = serde_json::to_vec_pretty(&*self.core.lock()).map_or(0, |v| v.len());
            let page = |n: usize| n.div_ceil(4096) * 4096;
            page(8 * 1024) + page(state + 4096)
        };
        let reservation = match self.core.store.reserve(room) {
            Ok(reservation) => reservation,
            Err(e) => {
                return admin::error(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!("link not created (the token was not used): {e}"),
                )
            }
        };
        let redeemed = claim::redeem(&token, config.id, &config.name, &csr_pem).await;
        drop(reservation);
        let cert_pem = match redeemed {
            Ok(cert) => cert,
            Err(e) => return admin::error(StatusCode::BAD_GATEWAY, e.to_string()),
        };
        let cert = CertifiedKey { cert_pem, key_pem };
        match cert.site_id() {
            Ok(id) if id == config.id => {}
            _ => {
                return admin::error(
                    StatusCode::BAD_GATEWAY,
                    "the issuing site returned a certificate for another site",
                )
            }
        }
        let record = LinkRecord {
            name: name.clone(),
            peer_id: issuer.id,
            peer_name: issuer.name.clone(),
            endpoints: token.spec.endpoints.clone(),
            peer_ca: token.spec.ca.clone(),
            cost: req.cost.unwrap_or(token.spec.cost),
            quic_endpoints: token.spec.quic_endpoints.clone(),
            transport,
        };
        // `_creating` keeps other requests from creating this link, or another to this site,
        // meanwhile; this check still stops one added some other way, and runs before the
        // certificate file is written, so that it cannot overwrite another link's.
        let clash = |state: &State| {
            let name = &record.name;
            if state.links.iter().any(|l| l.name == *name) {
                Some(format!("a link named {name} was created meanwhile"))
            } else {
                state
                    .links
                    .iter()
                    .find(|l| l.peer_id == record.peer_id)
                    .map(|l| {
                        format!(
                            "link {} to site {} was created meanwhile",
                            l.name, l.peer_name
                        )
                    })
            }
        };
        let clashes = clash(&self.core.lock());
        let saved = match clashes {
            Some(message) => Err(Error::Invalid(message)),
            None => self.core.save_link_cert(&name, &cert).and_then(|()| {
                self.core.change(|state| match clash(state) {
                    Some(message) => Err(Error::Invalid(message)),
                    None => {
                        state.links.push(record.clone());
                        Ok(())
                    }
                })
            }),
        };
        match saved {
            Ok(()) => {}
            Err(Error::Invalid(message)) => {
                return admin::error(
                    StatusCode::CONFLICT,
                    format!("the token was redeemed but {message}; this link is not kept"),
                )
            }
            Err(e) => {
                return admin::error(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "the token was redeemed but the link could not be saved ({e}); free \
                         space and ask for a new token"
                    ),
                )
            }
        }
        tracing::info!(link = %name, peer = %issuer.name, "link created");
        self.router.add_link(outgoing(&record, cert));
        let wait = req
            .wait_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LINK_WAIT);
        match self.router.wait_up(&name, wait).await {
            Ok(status) => admin::ok(&link_view(&status)),
            Err(reason) => admin::error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "link {name} was created but is not up: {reason}. It keeps retrying \
                     (see skiff link status); remove it with skiff link delete {name}"
                ),
            ),
        }
    }

    fn delete_link(&self, name: &str) -> ApiResponse {
        let removed = self.core.change(|state| {
            let before = state.links.len();
            state.links.retain(|l| l.name != name);
            if state.links.len() == before {
                return Err(Error::Invalid(String::new()));
            }
            Ok(())
        });
        match removed {
            Ok(()) => {
                self.router.remove_link(name);
                let _ = self.core.store.remove(&format!("links/{name}.pem"));
                tracing::info!(link = %name, "link deleted");
                admin::ok(&serde_json::json!({}))
            }
            Err(Error::Invalid(_)) => {
                let incoming = self
                    .router
                    .links()
                    .into_iter()
                    .any(|l| l.direction == Direction::Incoming && l.name == name);
                let message = if incoming {
                    format!(
                        "{name} is an incoming link: the site that created it deletes it, or \
                         refuse that site here with skiff link revoke {name}"
                    )
                } else {
                    format!("no link named {name} (see skiff link status)")
                };
                admin::error(StatusCode::NOT_FOUND, message)
            }
            Err(e) => admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        }
    }

    fn grant_views(&self) -> Vec<admin::GrantView> {
        let now = model::unix_now();
        self.core
            .lock()
            .grants
            .iter()
            .map(|g| admin::GrantView {
                id: g.id.clone(),
                uses_left: g.uses_left,
                expires: model::rfc3339(g.expires),
                spent: g.uses_left == 0 || g.expires <= now,
            })
            .collect()
    }

    /// Withdraws a grant: its token can no longer be redeemed (links made with it stay).
    fn delete_grant(&self, id: &str) -> ApiResponse {
        let removed = self.core.change(|state| {
            let before = state.grants.len();
            state.grants.retain(|g| g.id != id);
            if before == state.grants.len() {
                return Err(Error::Invalid(format!(
                    "no grant {id} (see GET /v1/grants)"
                )));
            }
            Ok(())
        });
        match removed {
            Ok(()) => {
                tracing::info!(grant = %id, "grant withdrawn");
                admin::ok(&serde_json::json!({}))
            }
            Err(e @ Error::Invalid(_)) => admin::error(StatusCode::NOT_FOUND, e.to_string()),
            Err(e) => admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        }
    }

    fn revoke(&self, req: admin::Revoke) -> ApiResponse {
        let links = self.router.links();
        let target = {
            let state = self.core.lock();
            let by_id = Uuid::parse_str(&req.site).ok();
            let mut same_name: Vec<Uuid> = state
                .peers
                .iter()
                .filter(|p| p.name == req.site)
                .map(|p| p.id)
                .collect();
            same_name.dedup();
            if same_name.len() > 1 {
                let ids: Vec<String> = same_name.iter().map(Uuid::to_string).collect();
                return admin::error(
                    StatusCode::CONFLICT,
                    format!(
                        "several sites named {} have linked to this site ({}); revoke one by id",
                        req.site,
                        ids.join(", ")
                    ),
                );
            }
            state
                .peers
                .iter()
                .rev()
                .find(|p| Some(p.id) == by_id || p.name == req.site)
                .map(|p| (p.id, p.name.clone()))
                .or_else(|| {
                    links
                        .iter()
                        .find(|l| {
                            l.direction == Direction::Incoming
                                && (Some(l.peer_site) == by_id || l.peer_name == req.site)
                        })
                        .map(|l| (l.peer_site, l.peer_name.clone()))
                })
                .or_else(|| by_id.map(|id| (id, String::new())))
        };
        let Some((id, name)) = target else {
            let outgoing = links
                .iter()
                .any(|l| l.direction == Direction::Outgoing && l.peer_name == req.site);
            let message = if outgoing {
                format!(
                    "this site links to {0} (an outgoing link); revocation is for sites that \
                     link to this one — use skiff link delete instead",
                    req.site
                )
            } else {
                format!("no site named {} has linked to this site", req.site)
            };
            return admin::error(StatusCode::NOT_FOUND, message);
        };
        if let Err(e) = self.core.change(|state| {
            if !state.revoked.contains(&id) {
                state.revoked.push(id);
            }
            // The grant the site redeemed must not let it (under a new id) back in.
            let used: Vec<String> = state
                .peers
                .iter()
                .filter(|p| p.id == id)
                .map(|p| p.grant.clone())
                .collect();
            for grant in state.grants.iter_mut().filter(|g| used.contains(&g.id)) {
                grant.uses_left = 0;
            }
            Ok(())
        }) {
            return admin::error(StatusCode::INSUFFICIENT_STORAGE, e.to_string());
        }
        // Order matters: refuse new handshakes first, then cut the live links, so the revoked
        // site cannot slip back in between the two.
        self.core.revocations.revoke(id);
        let closed_links = links
            .iter()
            .filter(|l| l.direction == Direction::Incoming && l.peer_site == id)
            .count();
        self.router.close_site(
            id,
            &format!("site {} revoked this site", self.core.config.name),
        );
        tracing::warn!(site = %name, %id, "site revoked");
        admin::ok(&admin::Revoked {
            id,
            name,
            closed_links,
        })
    }

    /// Answers one redemption on the link port, from `from`.
    async fn serve_claim(
        &self,
        mut tls: tokio_rustls::server::TlsStream<LinkTcp>,
        from: std::net::SocketAddr,
    ) {
        let allowed = self
            .claim_limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(from.ip(), std::time::Instant::now());
        // The claim is read even from an address over its rate: closing with its bytes unread
        // would send a reset that can overtake the answer, and the answer says when to retry.
        let limit = self.limits.handshake_timeout;
        let request = match tokio::time::timeout(limit, claim::read_frame(&mut tls)).await {
            Ok(Ok(raw)) => serde_json::from_slice::<ClaimRequest>(&raw)
                .map_err(|e| Refusal::bad_claim(malformed_claim(&e))),
            Ok(Err(e)) => Err(Refusal::bad_claim(format!("unreadable claim: {e}"))),
            Err(_) => Err(Refusal::bad_claim(format!(
                "no claim sent within {}",
                humantime::format_duration(limit)
            ))),
        };
        let outcome = match allowed {
            Err(wait) => Err(Refusal::rate_limited(from.ip(), wait)),
            Ok(()) => request.and_then(|r| self.redeem(r)),
        };
        let response = match outcome {
            Ok(cert) => {
                self.metrics.redemption("granted");
                ClaimResponse::Granted { cert }
            }
            Err(refusal) => {
                self.metrics.redemption(refusal.result);
                match refusal.rejection {
                    Some(reason) => self.router.rejections().reject(
                        Endpoint::Claim,
                        reason,
                        from,
                        &refusal.message,
                    ),
                    None => {
                        tracing::warn!(%from, reason = %refusal.message, "token redemption refused")
                    }
                }
                ClaimResponse::Refused {
                    reason: refusal.message,
                }
            }
        };
        if let Ok(body) = serde_json::to_vec(&response) {
            let _ = claim::write_frame(&mut tls, &body).await;
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    }

    /// Redeems a claim: the signed client certificate, or why not.
    fn redeem(&self, req: ClaimRequest) -> Result<String, Refusal> {
        let config = &self.core.config;
        let presented = sha256(req.code.0.as_bytes());
        let now = model::unix_now();
        // The code first: nothing about this site (its links, its revocations, the ids in its
        // network) is told to a claimant without a valid one, and no work is done for it
        // (signing costs CPU).
        let valid = self
            .core
            .lock()
            .grants
            .iter()
            .any(|g| g.id == req.grant && bool::from(unhex(&g.code_sha256).ct_eq(&presented)));
        if !valid {
            return Err(Refusal::invalid_code());
        }
        model::check_name("site", &req.site_name).map_err(|e| Refusal::bad_claim(e.to_string()))?;
        if req.site_id == config.id {
            return Err(Refusal::bad_claim(format!(
                "site {} cannot link to itself",
                config.name
            )));
        }
        if self.core.revocations.is_revoked(req.site_id) {
            let reason = format!(
                "site {} ({}) was revoked by site {}",
                req.site_name, req.site_id, config.name
            );
            return Err(Refusal {
                result: "revoked",
                rejection: Some(Reason::Revoked),
                message: reason,
            });
        }
        if let Some(existing) = self.router.link_with(req.site_id) {
            if existing.direction == Direction::Outgoing || existing.state == LinkState::Up {
                return Err(Refusal::duplicate(duplicate_message(config, &existing)));
            }
        }
        // An id that is alive elsewhere in the network belongs to that site: a token holder
        // must not get a certificate for it.
        if self
            .router
            .advertisements()
            .iter()
            .any(|a| a.origin == req.site_id)
        {
            let reason = format!(
                "site id {} is already in use in this network (by site {}); a site links with \
                 its own id. If that site was re-created, wait 20 s for its old advertisements \
                 to age out",
                req.site_id,
                self.router.table().name(req.site_id)
            );
            return Err(Refusal::duplicate(reason));
        }
        // Sign before consuming a use (a bad CSR must not cost one), hand the certificate out
        // only after the use is on disk.
        let cert = self
            .core
            .authority
            .sign_client_csr(
                &req.csr,
                req.site_id,
                &req.site_name,
                config.cert_lifetime(),
            )
            .map_err(|e| Refusal::bad_claim(format!("the certificate request was refused: {e}")))?;
        let mut refusal = None;
        let saved = self.core.change(|state| {
            let grant = state
                .grants
                .iter_mut()
                .find(|g| g.id == req.grant)
                .filter(|g| unhex(&g.code_sha256).ct_eq(&presented).into());
            let Some(grant) = grant else {
                refusal = Some(Refusal::invalid_code());
                return Err(Error::Invalid(String::new()));
            };
            if grant.expires <= now {
                let when = model::rfc3339(grant.expires);
                refusal = Some(Refusal::bad_token(
                    "expired",
                    format!("the token expired at {when}; ask for a new token"),
                ));
                return Err(Error::Invalid(String::new()));
            }
            if grant.uses_left == 0 {
                refusal = Some(Refusal::bad_token(
                    "used",
                    "the token was already used; ask for a new token".to_string(),
                ));
                return Err(Error::Invalid(String::new()));
            }
            grant.uses_left -= 1;
            let grant = grant.id.clone();
            state.peers.retain(|p| p.id != req.site_id);
            state.peers.push(PeerRecord {
                id: req.site_id,
                name: req.site_name.clone(),
                grant,
                linked_at: now,
            });
            Ok(())
        });
        if let Err(e) = saved {
            return Err(refusal.unwrap_or_else(|| {
                tracing::error!(site = %req.site_name, error = %e, "cannot record a redemption");
                let why = match e {
                    // The path is the issuer's business; the claimant needs to know it is
                    // nobody's fault on its side and that the token is still good.
                    Error::NoSpace { .. } => "it has no space left on its disk".to_string(),
                    e => e.to_string(),
                };
                Refusal {
                    result: "error",
                    rejection: None,
                    message: format!(
                        "the issuing site could not record the redemption ({why}); the token \
                         is still valid: try again later"
                    ),
                }
            }));
        }
        tracing::info!(site = %req.site_name, id = %req.site_id, "token redeemed");
        Ok(cert)
    }
}

/// Why a redemption was refused: the message for the claimant, the result counted in
/// `skiff_token_redemptions_total`, and the reason counted in
/// `skiff_rejected_connections_total` (`None` for honest refusals: a duplicate link, or this
/// site failing to record the use).
struct Refusal {
    result: &'static str,
    rejection: Option<Reason>,
    message: String,
}

impl Refusal {
    fn bad_claim(message: String) -> Self {
        Refusal {
            result: "invalid",
            rejection: Some(Reason::BadClaim),
            message,
        }
    }

    fn bad_token(result: &'static str, message: String) -> Self {
        Refusal {
            result,
            rejection: Some(Reason::BadToken),
            message,
        }
    }

    fn invalid_code() -> Self {
        Refusal::bad_token(
            "invalid",
            "the token is not valid here (unknown grant or wrong code); ask for a new token"
                .to_string(),
        )
    }

    fn duplicate(message: String) -> Self {
        Refusal {
            result: "duplicate",
            rejection: None,
            message,
        }
    }

    fn rate_limited(addr: std::net::IpAddr, wait: Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Refusal {
            result: "rate_limited",
            rejection: Some(Reason::RateLimited),
            message: format!("too many redemption attempts from {addr}; retry in {secs} s"),
        }
    }
}

/// Describes a claim that is not valid JSON for a [`ClaimRequest`] without quoting it: serde's
/// messages can repeat parts of the input, and the input holds the code.
fn malformed_claim(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not a claim",
        serde_json::error::Category::Eof => "truncated",
    };
    format!(
        "malformed claim ({what} at line {} column {})",
        e.line(),
        e.column()
    )
}

impl Core {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `f` to a copy of the state and persists it; memory changes only if the write
    /// succeeded, so a full disk leaves both the file and the running site as they were.
    fn change(&self, f: impl FnOnce(&mut State) -> Result<(), Error>) -> Result<(), Error> {
        let mut state = self.lock();
        let mut next = state.clone();
        f(&mut next)?;
        self.store.save_state(&next)?;
        *state = next;
        Ok(())
    }

    fn link_cert(&self, name: &str) -> Result<CertifiedKey, Error> {
        let pem = self.store.read(&format!("links/{name}.pem"))?;
        split_pem(&pem).ok_or_else(|| Error::Corrupt {
            path: self.store.dir().join(format!("links/{name}.pem")),
            reason: "expected a certificate followed by its private key".into(),
        })
    }

    /// Certificate and key go in one 0600 file so a renewal replaces both in one atomic rename.
    fn save_link_cert(&self, name: &str, cert: &CertifiedKey) -> Result<(), Error> {
        let joined = format!("{}\n{}", cert.cert_pem.trim_end(), cert.key_pem);
        self.store.write(
            &format!("links/{name}.pem"),
            joined.as_bytes(),
            Mode::Private,
        )
    }
}

impl skiff_router::Hooks for Core {
    fn renew(&self, peer: Uuid, peer_name: &str, csr_pem: &str) -> Result<String, String> {
        if self.revocations.is_revoked(peer) {
            return Err(format!("site {peer_name} was revoked"));
        }
        self.authority
            .sign_client_csr(csr_pem, peer, peer_name, self.config.cert_lifetime())
            .map_err(|e| e.to_string())
    }

    fn renewed(&self, name: &str, cert: &CertifiedKey) -> Result<(), String> {
        // Under the state's lock, and only for a link that still exists: a renewal answered
        // while `link delete` runs must not put the deleted link's key back on disk.
        let state = self.lock();
        if !state.links.iter().any(|l| l.name == name) {
            tracing::debug!(link = %name, "renewed certificate of a deleted link not saved");
            return Ok(());
        }
        self.save_link_cert(name, cert).map_err(|e| e.to_string())
    }

    fn admit(&self, peer: Uuid, peer_name: &str) -> Result<(), String> {
        if self.revocations.is_revoked(peer) {
            return Err(format!(
                "site {peer_name} was revoked by site {}",
                self.config.name
            ));
        }
        Ok(())
    }
}

async fn accept_links(site: Arc<Site>, listener: TcpListener, shutdown: CancellationToken) {
    let handshakes = Arc::new(Semaphore::new(site.limits.max_handshakes));
    let claims = Arc::new(Semaphore::new(MAX_CLAIMS));
    loop {
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually fd exhaustion: back off instead of spinning.
                    tracing::warn!(error = %e, "link port accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Never wait for a permit here: a flood of connections that stall their handshakes
        // must cost only themselves, not block the accept loop for everyone else.
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            drop(tcp);
            site.router.rejections().reject(
                Endpoint::Link,
                Reason::TooManyHandshakes,
                from,
                "too many TLS handshakes in progress; connection dropped",
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (site, claims) = (site.clone(), claims.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + site.limits.handshake_timeout;
            let handshake = handshake(&site, tcp, deadline).await;
            drop(permit);
            let (endpoint, tls) = match handshake {
                Ok(pair) => pair,
                Err((endpoint, reason, detail, tcp)) => {
                    site.router
                        .rejections()
                        .reject(endpoint, reason, from, detail);
                    if let Some(tcp) = tcp {
                        // In TLS 1.3 the client has finished its side before we judged its
                        // certificate, and may already be writing. Closing with its bytes
                        // unread would send a RST that can overtake our alert; draining first
                        // makes sure the client reads *why* it was refused (say, "certificate
                        // revoked").
                        drain(tcp).await;
                    }
                    return;
                }
            };
            match tls.get_ref().1.alpn_protocol() {
                Some(p) if p == ALPN_LINK => site.router.accept(tls).await,
                Some(p) if p == ALPN_CLAIM => match claims.clone().try_acquire_owned() {
                    Ok(_claim) => site.serve_claim(tls, from).await,
                    Err(_) => site.router.rejections().reject(
                        Endpoint::Claim,
                        Reason::TooManyClaims,
                        from,
                        "too many token redemptions at once",
                    ),
                },
                _ => site.router.rejections().reject(
                    endpoint,
                    Reason::NoAlpn,
                    from,
                    "TLS connection without a skiff protocol (ALPN)",
                ),
            }
        });
    }
}

/// A link port connection's TLS handshake that failed: where and why, a description, and the
/// connection if the client should be let read our alert before it is closed.
type Refused = (Endpoint, Reason, String, Option<tokio::net::TcpStream>);

/// Runs the TLS handshake of a connection to the link port, by `deadline`. Reads the ClientHello
/// first, to tell garbage from TLS and a redemption (ALPN `skiff-claim/1`) from a link.
async fn handshake(
    site: &Site,
    tcp: tokio::net::TcpStream,
    deadline: tokio::time::Instant,
) -> Result<(Endpoint, tokio_rustls::server::TlsStream<LinkTcp>), Refused> {
    let link = Endpoint::Link;
    // The first byte tells a connection that closes at once (a port scan, a health check) and
    // bytes that are not TLS at all from a handshake. 0x16: a TLS handshake record.
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {
            let detail = "closed before sending anything".to_string();
            return Err((link, Reason::Closed, detail, None));
        }
        Ok(Ok(_)) if first[0] != 0x16 => {
            let detail = format!("not TLS (first byte {:#04x})", first[0]);
            return Err((link, Reason::Malformed, detail, None));
        }
        Ok(Ok(_)) => {}
        Err(_) => {
            let detail = "sent nothing within the handshake timeout".to_string();
            return Err((link, Reason::Timeout, detail, None));
        }
    }
    let acceptor = rustls::server::Acceptor::default();
    let mut hello = tokio_rustls::LazyConfigAcceptor::new(acceptor, LinkTcp::new(tcp));
    let start = match tokio::time::timeout_at(deadline, &mut hello).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            use std::io::ErrorKind;
            let rustls_error = e.get_ref().is_some_and(|e| e.is::<rustls::Error>());
            let reason = match e.kind() {
                _ if rustls_error => Reason::of_tls_io(&e),
                // A ClientHello cut short, or a record larger than any TLS stack sends.
                ErrorKind::UnexpectedEof | ErrorKind::InvalidData | ErrorKind::Other => {
                    Reason::Malformed
                }
                _ => Reason::HandshakeFailed,
            };
            let detail = format!("bad ClientHello: {e}");
            return Err((link, reason, detail, None));
        }
        Err(_) => {
            let detail = "the ClientHello did not arrive within the handshake timeout".to_string();
            return Err((link, Reason::Timeout, detail, None));
        }
    };
    let offers_claim = start
        .client_hello()
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == ALPN_CLAIM));
    let endpoint = if offers_claim {
        Endpoint::Claim
    } else {
        Endpoint::Link
    };
    let accept = start.into_stream(site.server_tls.clone()).into_fallible();
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(tls)) => Ok((endpoint, tls)),
        Ok(Err((e, io))) => {
            let detail = format!("TLS handshake failed: {e}");
            Err((
                endpoint,
                Reason::of_tls_io(&e),
                detail,
                Some(io.into_inner()),
            ))
        }
        Err(_) => {
            let detail = "the TLS handshake did not finish within the handshake timeout";
            Err((endpoint, Reason::Timeout, detail.to_string(), None))
        }
    }
}

/// Closes our side of a refused connection and discards what the peer still sends, for at most
/// a second, so the peer sees our alert and a clean close rather than a reset.
async fn drain(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0usize;
        while total < 1 << 20 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Keeps `skiff_cert_expiry_timestamp_seconds` current (client certificates are renewed while
/// the site runs).
async fn watch_certificates(site: Arc<Site>, shutdown: CancellationToken) {
    let ca = skiff_certs::not_after_pem(site.core.authority.cert_pem()).ok();
    loop {
        site.metrics.cert_expiry("ca", ca);
        site.metrics.cert_expiry("server", site.server_expires);
        let client = site
            .router
            .links()
            .iter()
            .filter_map(|l| l.cert_expires)
            .min();
        site.metrics.cert_expiry("client", client);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

impl crate::http::Endpoints for Site {
    fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    fn network_svg(&self) -> String {
        crate::picture::svg(&self.network())
    }
}

/// Binds a listener's socket at the first of its addresses that takes it; `shared` for a router
/// with several shards (see [`skiff_router::forward::bind_listener`]).
async fn bind_listener(record: &ListenerRecord, shared: bool) -> Result<TcpListener, String> {
    let fail = |e: std::io::Error| {
        format!(
            "cannot listen on {}:{} for listener {} ({e}); pick another --port or stop what \
             uses it",
            record.bind, record.port, record.name
        )
    };
    let mut last = None;
    for addr in tokio::net::lookup_host((record.bind.as_str(), record.port))
        .await
        .map_err(fail)?
    {
        match skiff_router::forward::bind_listener(addr, shared) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(fail(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

fn listener_config(record: &ListenerRecord) -> ListenerConfig {
    ListenerConfig {
        name: record.name.clone(),
        routing_key: record.routing_key.clone(),
        strategy: Strategy::parse(&record.strategy).unwrap_or_default(),
    }
}

fn connector_view(record: &ConnectorRecord) -> admin::ConnectorView {
    admin::ConnectorView {
        name: record.name.clone(),
        routing_key: record.routing_key.clone(),
        host: record.host.clone(),
        port: record.port,
        weight: record.weight,
    }
}

fn outgoing(record: &LinkRecord, cert: CertifiedKey) -> skiff_router::OutgoingLink {
    skiff_router::OutgoingLink {
        name: record.name.clone(),
        peer_site: record.peer_id,
        peer_name: record.peer_name.clone(),
        endpoints: record.endpoints.clone(),
        peer_ca_pem: record.peer_ca.clone(),
        cert,
        cost: record.cost,
        quic_endpoints: record.quic_endpoints.clone(),
        transport: TransportChoice::parse(&record.transport).unwrap_or_default(),
    }
}

fn duplicate_message(config: &SiteConfig, existing: &LinkStatus) -> String {
    match existing.direction {
        Direction::Outgoing => format!(
            "site {} already links to site {} (link {}); two sites are linked once, in one direction",
            config.name, existing.peer_name, existing.name
        ),
        Direction::Incoming => format!(
            "site {} is already linked to site {} (an incoming link); two sites are linked once, \
             in one direction",
            config.name, existing.peer_name
        ),
    }
}

fn link_view(status: &LinkStatus) -> admin::LinkView {
    admin::LinkView {
        name: status.name.clone(),
        direction: match status.direction {
            Direction::Outgoing => "outgoing".into(),
            Direction::Incoming => "incoming".into(),
        },
        peer_site: status.peer_name.clone(),
        peer_id: status.peer_site,
        state: status.state.as_str().into(),
        rtt_ms: status.rtt.map(|d| d.as_secs_f64() * 1000.0),
        cost: status.cost,
        since: humantime::format_rfc3339_seconds(status.since).to_string(),
        last_error: status.last_error.clone(),
        cert_expires: status
            .cert_expires
            .map(|t: SystemTime| humantime::format_rfc3339_seconds(t).to_string()),
        transport: status.transport.map(|t| t.as_str().to_string()),
        lanes: status.lanes,
    }
}

/// Splits "certificate PEM + private key PEM" as [`Core::save_link_cert`] writes it.
fn split_pem(pem: &str) -> Option<CertifiedKey> {
    let at = pem.find("-----BEGIN PRIVATE KEY-----")?;
    let (cert, key) = pem.split_at(at);
    if !cert.contains("-----BEGIN CERTIFICATE-----") {
        return None;
    }
    Some(CertifiedKey {
        cert_pem: cert.trim_end().to_string() + "\n",
        key_pem: key.to_string(),
    })
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| text.get(2 * i..2 * i + 2))
        .filter_map(|pair| u8::from_str_radix(pair, 16).ok())
        .collect()
}

/// `site init dev` in `store`, for tests of what a site keeps there.
#[cfg(test)]
pub(crate) fn init_for_test(store: &Store) -> SiteConfig {
    let options = InitOptions {
        name: "dev".into(),
        link_hosts: vec![],
        link_port: 1,
        quic_port: None,
        metrics_addr: None,
        cert_lifetime: Duration::from_secs(60),
    };
    init(store, options).expect("site init in a temporary directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)), bytes);
    }

    #[test]
    fn link_cert_file_round_trip() {
        let authority = Authority::generate(Uuid::new_v4(), "a").unwrap();
        let (key, csr) = skiff_certs::generate_csr(Uuid::new_v4(), "b").unwrap();
        let cert = authority
            .sign_client_csr(&csr, Uuid::new_v4(), "b", Duration::from_secs(60))
            .unwrap();
        let joined = format!("{}\n{}", cert.trim_end(), key);
        let split = split_pem(&joined).unwrap();
        assert_eq!(split.key_pem, key);
        assert_eq!(split.cert_pem.trim(), cert.trim());
        assert!(split_pem("garbage").is_none());
    }

    #[test]
    fn link_creations_under_way_clash_by_name_and_by_peer() {
        let creations = LinkCreations::default();
        let (stg, prod) = (Uuid::new_v4(), Uuid::new_v4());
        let first = creations.begin("stg", stg, "stg").unwrap();
        let same_name = creations.begin("stg", prod, "prod").err().unwrap();
        assert!(
            same_name.contains("a link named stg is being created"),
            "{same_name}"
        );
        let same_peer = creations.begin("stg-2", stg, "stg").err().unwrap();
        assert!(
            same_peer.contains("a link to site stg is being created"),
            "{same_peer}"
        );
        let other = creations.begin("prod", prod, "prod").unwrap();
        drop(first);
        let again = creations.begin("stg", stg, "stg").unwrap();
        drop((other, again));
        assert!(creations.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_renewal_saves_the_certificate_of_an_existing_link_only() {
        use skiff_router::Hooks;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let config = init_for_test(&store);
        let authority = Authority::from_pem(
            &store.read("ca.pem").unwrap(),
            &store.read("ca.key").unwrap(),
        )
        .unwrap();
        let mut state = State::default();
        state.links.push(LinkRecord {
            name: "stg".into(),
            peer_id: Uuid::new_v4(),
            peer_name: "stg".into(),
            endpoints: vec!["127.0.0.1:1".into()],
            peer_ca: String::new(),
            cost: 1,
            quic_endpoints: vec![],
            transport: "auto".into(),
        });
        let core = Core {
            config,
            store: store.clone(),
            authority,
            revocations: Revocations::new([]),
            state: Mutex::new(state),
        };
        let cert = CertifiedKey {
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        };
        core.renewed("stg", &cert).unwrap();
        assert!(dir.path().join("links/stg.pem").is_file());
        // Deleted meanwhile (`link delete` ran while the renewal was answered): nothing is
        // written back.
        core.renewed("prod", &cert).unwrap();
        assert!(!dir.path().join("links/prod.pem").exists());
    }
}
