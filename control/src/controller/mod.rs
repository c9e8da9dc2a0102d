//! `skiff site run --kube`: the site daemon as the controller of its namespace.
//!
//! The controller runs the same daemon as a host site, and drives it from custom resources:
//!
//! - the namespace's [`Site`] names the site and says how other sites reach it: the controller
//!   creates the link-access Service (LoadBalancer, NodePort or ClusterIP), derives the link
//!   hosts and ports from it, and restarts the router in-process when they change;
//! - [`Listener`], [`Connector`], [`AccessGrant`], [`AccessTokenResource`] and [`Link`] each
//!   have a reconciler ([`reconcile`]) that talks to the daemon's admin API;
//! - the state directory (the CA key among it) lives in a Secret ([`state`]).
//!
//! Nothing secret goes into a status or a log line: tokens stay in Secrets.

pub mod reconcile;
pub mod resources;
pub mod state;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::crd::{AccessGrant, AccessTokenResource, Connector, Link, Listener, Site, SiteStatus};
use crate::site::{Listeners, RunOptions};
use crate::store::Store;
use reconcile::Context;
use resources::LinkAccessPoint;

/// Why the controller cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The site failed.
    #[error(transparent)]
    Site(#[from] crate::Error),
    /// A socket could not be bound.
    #[error("{0}")]
    Bind(String),
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The namespace to control (default: the client's, in a pod its own).
    pub namespace: Option<String>,
    /// The state directory (an emptyDir; restored from the state Secret).
    pub state_dir: PathBuf,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: Option<SocketAddr>,
    /// Labels of the router pods, the selector of the Services the controller creates.
    pub router_selector: BTreeMap<String, String>,
    /// Daemon options.
    pub run: RunOptions,
}

/// What the running router was started with; a change restarts it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Settings {
    name: String,
    link_port: u16,
    quic: bool,
    cert_lifetime: Duration,
    access: LinkAccessPoint,
}

/// Runs the controller of `options.namespace` until `shutdown` fires.
pub async fn run(
    client: Client,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let namespace = options
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let metrics = match options.metrics_addr {
        Some(addr) => {
            let socket = std::net::TcpListener::bind(addr).map_err(|e| {
                Error::Bind(format!("cannot listen on metrics address {addr}: {e}"))
            })?;
            socket
                .set_nonblocking(true)
                .map_err(|e| Error::Bind(e.to_string()))?;
            Some(socket)
        }
        None => None,
    };
    let store = Store::new(&options.state_dir);
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace: namespace.clone(),
        site: admin::Client::new(store.dir()),
        router_selector: options.router_selector.clone(),
        reachable: true.into(),
    });
    tracing::info!(namespace = %namespace, "controller starting");
    while !shutdown.is_cancelled() {
        let Some(site) = wait_for_site(&ctx, metrics.as_ref(), &shutdown).await else {
            break;
        };
        let phase = shutdown.child_token();
        let result = run_site(&ctx, &site, &store, &options, metrics.as_ref(), &phase).await;
        phase.cancel();
        if let Err(e) = result {
            tracing::error!(site = %site.name_any(), error = %e, "site stopped; retrying in 10 s");
            let status = site_status(&site, None, Some(&e.to_string()), None);
            let _ = patch_site_status(&ctx, &site, &status).await;
            // Alive (liveness keeps passing), not ready, while it waits to retry.
            let waiting = shutdown.child_token();
            let _stop = waiting.clone().drop_guard();
            serve_metrics(metrics.as_ref(), Arc::new(Waiting), Arc::default(), waiting);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// `/healthz` and `/readyz` while no router runs: alive, not ready.
struct Waiting;

impl crate::http::Endpoints for Waiting {
    fn ready(&self) -> bool {
        false
    }
    fn network_svg(&self) -> String {
        String::new()
    }
}

fn serve_metrics(
    metrics: Option<&std::net::TcpListener>,
    endpoints: Arc<dyn crate::http::Endpoints>,
    registry: Arc<prometheus_client::registry::Registry>,
    until: CancellationToken,
) {
    let Some(listener) = metrics
        .and_then(|m| m.try_clone().ok())
        .and_then(|m| tokio::net::TcpListener::from_std(m).ok())
    else {
        return;
    };
    tokio::spawn(crate::http::serve(listener, endpoints, registry, until));
}

/// Waits for the namespace's Site (the oldest, if several), serving "not ready" meanwhile.
async fn wait_for_site(
    ctx: &Context,
    metrics: Option<&std::net::TcpListener>,
    shutdown: &CancellationToken,
) -> Option<Site> {
    let waiting = shutdown.child_token();
    let _stop = waiting.clone().drop_guard();
    serve_metrics(metrics, Arc::new(Waiting), Arc::default(), waiting);
    let api: Api<Site> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut said = false;
    loop {
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                let mut sites = list.items;
                sites.sort_by_key(|s| (s.metadata.creation_timestamp.clone(), s.name_any()));
                if let Some(site) = sites.first() {
                    for other in &sites[1..] {
                        let status = site_status(
                            other,
                            None,
                            Some(&format!(
                                "only one Site per namespace: this namespace runs site {}",
                                site.name_any()
                            )),
                            None,
                        );
                        let _ = patch_site_status(ctx, other, &status).await;
                    }
                    return Some(site.clone());
                }
                if !said {
                    tracing::info!(
                        namespace = %ctx.namespace,
                        "waiting for a Site resource in this namespace (kubectl apply -f site.yaml)"
                    );
                    said = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list Sites; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// Applies (or removes) the link-access Service of `site` and reads where it is reached. With
/// `apply` false (the Site is unchanged since it was applied) the Service is only read, unless
/// it has gone.
async fn link_access(ctx: &Context, site: &Site, apply: bool) -> Result<LinkAccessPoint, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let existing = if apply {
        None
    } else {
        api.get_opt(resources::LINK_SERVICE).await?
    };
    let service = match resources::link_service(site, &ctx.namespace, &ctx.router_selector) {
        Some(_) if existing.is_some() => existing,
        Some(service) => Some(
            api.patch(
                resources::LINK_SERVICE,
                &PatchParams::apply(reconcile::FIELD_MANAGER).force(),
                &Patch::Apply(&service),
            )
            .await?,
        ),
        None => {
            // linkAccess went back to None: remove the Service if it is ours.
            if let Some(existing) = api.get_opt(resources::LINK_SERVICE).await? {
                let ours = existing
                    .owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == site.metadata.uid.as_ref());
                if ours {
                    api.delete(resources::LINK_SERVICE, &Default::default())
                        .await?;
                }
            }
            None
        }
    };
    Ok(resources::link_access_point(
        site,
        &ctx.namespace,
        service.as_ref(),
    ))
}

async fn settings_of(ctx: &Context, site: &Site, apply: bool) -> Result<Settings, Error> {
    let cert_lifetime = match &site.spec.cert_lifetime {
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            crate::Error::Invalid(format!(
                "spec.certLifetime {text:?} is not a duration like 7d or 12h: {e}"
            ))
        })?,
        None => crate::model::DEFAULT_CERT_LIFETIME,
    };
    Ok(Settings {
        name: site.name_any(),
        link_port: site.spec.link_port,
        quic: site.spec.quic,
        cert_lifetime,
        access: link_access(ctx, site, apply).await?,
    })
}

/// Restores or creates the site in `store` and writes `settings` into its `site.json`.
async fn prepare_store(ctx: &Context, store: &Store, settings: &Settings) -> Result<(), Error> {
    if !state::has_site(store.dir()) && !state::restore(&ctx.client, &ctx.namespace, store).await? {
        let config = crate::init(
            store,
            crate::InitOptions {
                name: settings.name.clone(),
                link_hosts: settings.access.hosts.clone(),
                link_port: settings.link_port,
                quic_port: settings.quic.then_some(settings.link_port),
                metrics_addr: None,
                cert_lifetime: settings.cert_lifetime,
            },
        )?;
        tracing::info!(site = %config.name, id = %config.id, "new site created");
    }
    let mut config = store.load_config()?;
    if config.name != settings.name {
        return Err(crate::Error::Invalid(format!(
            "Secret {} holds site {:?}, but the Site resource is named {:?}: rename the Site \
             back, or delete that Secret to start a new site (a new identity: other sites must \
             link again)",
            state::STATE_SECRET,
            config.name,
            settings.name
        ))
        .into());
    }
    config.link_hosts = if settings.access.hosts.is_empty() {
        // A site that only dials out still needs a name in its server certificate.
        vec![format!("{}.{}.skiff.local", settings.name, ctx.namespace)]
    } else {
        settings.access.hosts.clone()
    };
    config.link_port = settings.link_port;
    config.quic_port = settings.quic.then_some(settings.link_port);
    config.advertised_port = settings.access.port;
    config.advertised_quic_port = settings.access.quic_port;
    config.cert_lifetime_secs = settings.cert_lifetime.as_secs();
    config.metrics_addr = None;
    store.save_config(&config)?;
    let files = state::snapshot(store).map_err(|e| crate::Error::Io {
        path: store.dir().to_path_buf(),
        source: e,
    })?;
    state::save(&ctx.client, &ctx.namespace, &files).await?;
    Ok(())
}

async fn bind(
    settings: &Settings,
    store: &Store,
    metrics: Option<&std::net::TcpListener>,
) -> Result<Listeners, Error> {
    let port = settings.link_port;
    let link = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| Error::Bind(format!("cannot listen on link port {port}: {e}")))?;
    let quic = if settings.quic {
        Some(
            std::net::UdpSocket::bind(("0.0.0.0", port))
                .map_err(|e| Error::Bind(format!("cannot listen on UDP port {port}: {e}")))?,
        )
    } else {
        None
    };
    let admin = admin::bind(&store.admin_socket()).map_err(|e| {
        Error::Bind(format!(
            "cannot open {}: {e}",
            store.admin_socket().display()
        ))
    })?;
    let metrics = metrics
        .and_then(|m| m.try_clone().ok())
        .and_then(|m| tokio::net::TcpListener::from_std(m).ok());
    Ok(Listeners {
        link,
        admin,
        metrics,
        quic,
    })
}

/// Runs the router for `site` and the reconcilers until the Site changes, goes away, or
/// `phase` is cancelled.
async fn run_site(
    ctx: &Arc<Context>,
    site: &Site,
    store: &Store,
    options: &Options,
    metrics: Option<&std::net::TcpListener>,
    phase: &CancellationToken,
) -> Result<(), Error> {
    let settings = settings_of(ctx, site, true).await?;
    ctx.reachable.store(
        !settings.access.hosts.is_empty(),
        std::sync::atomic::Ordering::Relaxed,
    );
    prepare_store(ctx, store, &settings).await?;
    let listeners = bind(&settings, store, metrics).await?;
    let daemon = tokio::spawn(crate::site::run_with(
        store.clone(),
        listeners,
        options.run.clone(),
        phase.clone(),
    ));
    let mirror = tokio::spawn(state::mirror(
        ctx.client.clone(),
        ctx.namespace.clone(),
        store.clone(),
        phase.clone(),
    ));
    // The admin API answers once the daemon has loaded its state.
    let mut view = None;
    for _ in 0..100 {
        if let Ok(status) = ctx.site.get::<admin::StatusView>("/v1/status").await {
            view = Some(status);
            break;
        }
        if daemon.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = match view {
        None => Err(Error::Bind(
            "the router did not start (see the log above)".into(),
        )),
        Some(_) => {
            tracing::info!(site = %settings.name, hosts = ?settings.access.hosts, "router running");
            let controllers = tokio::spawn(run_controllers(ctx.clone(), phase.clone()));
            let watched = watch_site(ctx, site, &settings, phase).await;
            phase.cancel();
            let _ = controllers.await;
            watched
        }
    };
    phase.cancel();
    match daemon.await {
        Ok(Err(e)) => tracing::error!(error = %e, "router failed"),
        Err(e) => tracing::error!(error = %e, "router task failed"),
        Ok(Ok(())) => {}
    }
    let _ = mirror.await;
    result
}

/// Keeps the Site's status current; returns when its settings change or it is deleted.
async fn watch_site(
    ctx: &Context,
    site: &Site,
    running: &Settings,
    phase: &CancellationToken,
) -> Result<(), Error> {
    let api: Api<Site> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let name = site.name_any();
    loop {
        let current = match api.get_opt(&name).await {
            Ok(Some(current)) if current.metadata.uid == site.metadata.uid => current,
            Ok(_) => {
                tracing::info!(site = %name, "Site resource deleted; stopping the router");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Site; retrying");
                site.clone()
            }
        };
        // The Service is applied again only when the Site's spec changed; otherwise it is read
        // (for the load balancer's address).
        let changed = current.metadata.generation != site.metadata.generation;
        match settings_of(ctx, &current, changed).await {
            Ok(settings) if settings != *running => {
                tracing::info!(site = %name, "Site settings changed; restarting the router");
                return Ok(());
            }
            Ok(_) => {}
            Err(Error::Kube(e)) => tracing::warn!(error = %e, "cannot read link access; retrying"),
            Err(e) => return Err(e),
        }
        let view = ctx.site.get::<admin::StatusView>("/v1/status").await.ok();
        let status = site_status(
            &current,
            view.as_ref(),
            None,
            running.access.pending.as_deref(),
        );
        if let Err(e) = patch_site_status(ctx, &current, &status).await {
            tracing::warn!(error = %e, "cannot update the Site's status");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = phase.cancelled() => return Ok(()),
        }
    }
}

fn site_status(
    site: &Site,
    view: Option<&admin::StatusView>,
    error: Option<&str>,
    pending: Option<&str>,
) -> SiteStatus {
    let before = site
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let (ready, failed, reason, message) = match (error, view) {
        (Some(e), _) => (false, true, "Failed", e.to_string()),
        (None, None) => (
            false,
            false,
            "Starting",
            "the router is starting".to_string(),
        ),
        (None, Some(view)) => {
            let up = view.links.iter().filter(|l| l.state == "up").count();
            match pending {
                Some(p) => (false, false, "Pending", format!("router running; {p}")),
                None => (
                    true,
                    false,
                    "Ready",
                    format!("router running; {up} of {} link(s) up", view.links.len()),
                ),
            }
        }
    };
    SiteStatus {
        conditions: resources::conditions(before, ready, failed, reason, &message),
        site_id: view.map(|v| v.site.id.to_string()),
        endpoints: view
            .map(|v| v.site.link_endpoints.clone())
            .unwrap_or_default(),
    }
}

async fn patch_site_status(
    ctx: &Context,
    site: &Site,
    status: &SiteStatus,
) -> Result<(), kube::Error> {
    if site.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<Site> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    api.patch_status(
        &site.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// What the controllers' result streams are drained with: failures were logged by
/// [`reconcile::retry`]; this adds the queue's own errors at debug level.
fn log<T, E: std::fmt::Display>(
    kind: &'static str,
) -> impl FnMut(Result<T, E>) -> futures::future::Ready<()> {
    move |result| {
        if let Err(e) = result {
            tracing::debug!(kind, error = %e, "reconcile");
        }
        futures::future::ready(())
    }
}

/// Runs one controller per kind until `phase` is cancelled.
async fn run_controllers(ctx: Arc<Context>, phase: CancellationToken) {
    let client = ctx.client.clone();
    let ns = ctx.namespace.clone();
    let config = watcher::Config::default;
    let stop = || phase.clone().cancelled_owned();
    let listeners = Controller::new(Api::<Listener>::namespaced(client.clone(), &ns), config())
        .owns(Api::<Service>::namespaced(client.clone(), &ns), config())
        .graceful_shutdown_on(stop())
        .run(reconcile::listener, reconcile::retry, ctx.clone())
        .for_each(log("Listener"));
    let slice_ns = ns.clone();
    let connectors = Controller::new(Api::<Connector>::namespaced(client.clone(), &ns), config())
        .owns(Api::<Service>::namespaced(client.clone(), &ns), config())
        .watches(
            Api::<EndpointSlice>::namespaced(client.clone(), &ns),
            config(),
            move |slice| {
                resources::connector_of_slice(&slice)
                    .map(|name| ObjectRef::<Connector>::new(&name).within(&slice_ns))
            },
        )
        .graceful_shutdown_on(stop())
        .run(reconcile::connector, reconcile::retry, ctx.clone())
        .for_each(log("Connector"));
    let grants = Controller::new(
        Api::<AccessGrant>::namespaced(client.clone(), &ns),
        config(),
    )
    .owns(Api::<Secret>::namespaced(client.clone(), &ns), config())
    .graceful_shutdown_on(stop())
    .run(reconcile::grant, reconcile::retry, ctx.clone())
    .for_each(log("AccessGrant"));
    let tokens = Controller::new(
        Api::<AccessTokenResource>::namespaced(client.clone(), &ns),
        config(),
    )
    .owns(Api::<Link>::namespaced(client.clone(), &ns), config())
    .graceful_shutdown_on(stop())
    .run(reconcile::token, reconcile::retry, ctx.clone())
    .for_each(log("AccessToken"));
    let links = Controller::new(Api::<Link>::namespaced(client.clone(), &ns), config())
        .graceful_shutdown_on(stop())
        .run(reconcile::link, reconcile::retry, ctx.clone())
        .for_each(log("Link"));
    futures::join!(listeners, connectors, grants, tokens, links);
}
