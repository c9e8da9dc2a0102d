//! One reconcile function per kind. Each reads the resource, makes the site (through its admin
//! API) and the cluster (through owned objects) match it, and writes what is real into its
//! status. They are idempotent — a second run with nothing changed writes nothing — and
//! cancellation-safe: every step checks what exists before it creates, so a run cut short is
//! finished by the next one.
//!
//! Errors the user can fix (a port in use, a spent token) go into the status and are retried
//! slowly; errors of the Kubernetes API go back to the controller, which retries with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::resources::{self, GRANT_ANNOTATION, TOKEN_KEY};
use super::state::STATE_SECRET;
use crate::admin::{self, ClientError, ConnectorView, GrantView, LinkView, ListenerView};
use crate::crd::{
    AccessGrant, AccessGrantStatus, AccessTokenResource, AccessTokenStatus, Condition, Connector,
    ConnectorStatus, Link, LinkSpec, LinkStatus, Listener, ListenerStatus,
};

/// The finalizer on Listeners, Connectors, AccessGrants and Links: the site's side is removed
/// before the resource goes.
pub const FINALIZER: &str = "skiff.dev/cleanup";
/// The field manager of every object the controller applies.
pub const FIELD_MANAGER: &str = "skiff";

/// What every reconcile needs.
pub struct Context {
    /// The Kubernetes API.
    pub client: Client,
    /// The namespace this site controls.
    pub namespace: String,
    /// The site daemon's admin API.
    pub site: admin::Client,
    /// Labels of the router pods (the selector of the Services the controller creates).
    pub router_selector: BTreeMap<String, String>,
    /// False while the Site gives other sites no way in (`linkAccess: None`, no `linkHosts`):
    /// a token would name no reachable address, so AccessGrants say so instead.
    pub reachable: std::sync::atomic::AtomicBool,
}

impl Context {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// Why a reconcile failed (the controller retries).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The site daemon failed.
    #[error("site: {0}")]
    Site(#[from] ClientError),
    /// Adding or removing the finalizer, or the cleanup behind it, failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

fn finalizer_error(e: kube::runtime::finalizer::Error<Error>) -> Error {
    Error::Finalizer(Box::new(e))
}

/// True if the API said "not found".
fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// True if the daemon said "no such object".
fn site_not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status: 404, .. })
}

/// Deletes `path` on the site's admin API; `true` if it existed (a second delete is not an
/// error: cleanup must be repeatable).
async fn site_delete(ctx: &Context, path: &str) -> Result<bool, Error> {
    match ctx.site.delete::<serde_json::Value>(path).await {
        Ok(_) => Ok(true),
        Err(e) if site_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Server-side applies `object` (create or update; fields we own follow us).
async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

/// Writes `status` unless the resource already has it (so an unchanged reconcile writes
/// nothing and wakes no watcher).
async fn set_status<K, S>(
    api: &Api<K>,
    resource: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        &resource.meta().name.clone().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Applies `service` unless a Service of that name exists that is not ours: then says whose.
async fn apply_owned_service(
    ctx: &Context,
    service: &Service,
) -> Result<Result<Service, String>, Error> {
    let api: Api<Service> = ctx.api();
    let name = service.metadata.name.clone().unwrap_or_default();
    let our_uid = service
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.first())
        .map(|o| o.uid.clone());
    match api.get(&name).await {
        Ok(existing) => {
            let owned = existing
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == our_uid.as_ref());
            if !owned {
                return Ok(Err(format!(
                    "a Service named {name} already exists and is not managed by skiff; \
                     pick another name (spec.host) or remove that Service"
                )));
            }
        }
        Err(e) if not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Ok(apply(&api, service).await?))
}

fn previous(conditions: Option<&Vec<Condition>>) -> &[Condition] {
    conditions.map(Vec::as_slice).unwrap_or(&[])
}

/// Reconciles a Listener: a listener on the router (all addresses, the Listener's port) and a
/// ClusterIP Service named by its `host` that reaches it.
pub async fn listener(listener: Arc<Listener>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Listener> = ctx.api();
    finalizer(&api, FINALIZER, listener, |event| async {
        match event {
            Event::Apply(l) => apply_listener(&l, &ctx).await,
            Event::Cleanup(l) => {
                if site_delete(&ctx, &format!("/v1/listeners/{}", l.name_any())).await? {
                    tracing::info!(listener = %l.name_any(), "listener removed");
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(finalizer_error)
}

async fn apply_listener(listener: &Listener, ctx: &Context) -> Result<Action, Error> {
    let api: Api<Listener> = ctx.api();
    let name = listener.name_any();
    let status = listener.status.as_ref();
    let before = previous(status.map(|s| &s.conditions));
    let outcome = match ensure_site_listener(ctx, &name, listener).await? {
        Err(message) => Err(message),
        Ok(view) => {
            let service =
                resources::listener_service(listener, &ctx.namespace, &ctx.router_selector);
            apply_owned_service(ctx, &service).await?.map(|_| view)
        }
    };
    let next = match &outcome {
        Ok(view) if view.targets.is_empty() => ListenerStatus {
            conditions: resources::conditions(
                before,
                false,
                false,
                "NoTargets",
                &format!(
                    "port {} is open; no reachable site serves routing key {} yet",
                    view.port, view.routing_key
                ),
            ),
            targets: Vec::new(),
        },
        Ok(view) => ListenerStatus {
            conditions: resources::conditions(
                before,
                true,
                false,
                "Ready",
                &format!(
                    "Service {} port {} reaches {}",
                    resources::listener_service_name(listener),
                    view.port,
                    view.targets.join(", ")
                ),
            ),
            targets: view.targets.clone(),
        },
        Err(message) => ListenerStatus {
            conditions: resources::conditions(before, false, true, "Failed", message),
            targets: Vec::new(),
        },
    };
    set_status(&api, listener, status, &next).await?;
    // Targets are the router's state, not a Kubernetes event: look again soon while there are
    // none, and now and then once there are.
    let again = match &outcome {
        Ok(view) if view.targets.is_empty() => 2,
        Ok(_) => 15,
        Err(_) => 30,
    };
    Ok(Action::requeue(Duration::from_secs(again)))
}

/// Makes the router's listener `name` match the resource; `Err` carries what the user must fix.
async fn ensure_site_listener(
    ctx: &Context,
    name: &str,
    listener: &Listener,
) -> Result<Result<ListenerView, String>, Error> {
    let spec = &listener.spec;
    let strategy = spec.strategy.clone().unwrap_or_else(|| "balanced".into());
    let views: Vec<ListenerView> = ctx.site.get("/v1/listeners").await?;
    if let Some(view) = views.iter().find(|v| v.name == name) {
        let same = view.routing_key == spec.routing_key
            && view.port == spec.port
            && view.strategy == strategy
            && view.bind == "0.0.0.0";
        if same && view.error.is_none() {
            return Ok(Ok(view.clone()));
        }
        site_delete(ctx, &format!("/v1/listeners/{name}")).await?;
    }
    let created = ctx
        .site
        .post::<_, ListenerView>(
            "/v1/listeners",
            &admin::CreateListener {
                name: Some(name.to_string()),
                routing_key: spec.routing_key.clone(),
                port: spec.port,
                bind: Some("0.0.0.0".into()),
                strategy: Some(strategy),
            },
        )
        .await;
    match created {
        Ok(view) => {
            tracing::info!(listener = %name, key = %spec.routing_key, port = spec.port, "listener applied");
            Ok(Ok(view))
        }
        Err(ClientError::Api { message, .. }) => Ok(Err(message)),
        Err(e) => Err(e.into()),
    }
}

/// Reconciles a Connector: with a selector, a headless Service whose EndpointSlices name the
/// ready pods, one router connector per ready pod; with a host, one router connector.
pub async fn connector(connector: Arc<Connector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Connector> = ctx.api();
    finalizer(&api, FINALIZER, connector, |event| async {
        match event {
            Event::Apply(c) => apply_connector(&c, &ctx).await,
            Event::Cleanup(c) => {
                // With no backends wanted, only deletions happen: nothing for the user to fix.
                if let Err(message) = sync_site_connectors(&ctx, &c, &[]).await? {
                    tracing::warn!(connector = %c.name_any(), %message, "cleanup incomplete");
                }
                tracing::info!(connector = %c.name_any(), "connector removed");
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(finalizer_error)
}

async fn apply_connector(connector: &Connector, ctx: &Context) -> Result<Action, Error> {
    let api: Api<Connector> = ctx.api();
    let name = connector.name_any();
    let spec = &connector.spec;
    let status = connector.status.as_ref();
    let before = previous(status.map(|s| &s.conditions));
    let backends: Result<Vec<(String, String)>, String> = match (&spec.selector, &spec.host) {
        (Some(selector), _) if !selector.is_empty() => {
            let service = resources::connector_service(connector, &ctx.namespace, selector);
            match apply_owned_service(ctx, &service).await? {
                Err(message) => Err(message),
                Ok(_) => {
                    let slices: Api<EndpointSlice> = ctx.api();
                    let params = ListParams::default().labels(&format!(
                        "{}={}",
                        resources::SERVICE_NAME_LABEL,
                        resources::connector_service_name(connector)
                    ));
                    let list = slices.list(&params).await?;
                    Ok(resources::ready_addresses(&list.items)
                        .into_iter()
                        .map(|ip| (resources::pod_connector_name(&name, &ip), ip))
                        .collect())
                }
            }
        }
        (_, Some(host)) if !host.is_empty() => Ok(vec![(name.clone(), host.clone())]),
        _ => Err("set spec.selector (pod labels) or spec.host".into()),
    };
    let next = match backends {
        Ok(backends) => match sync_site_connectors(ctx, connector, &backends).await? {
            Ok(()) => {
                let endpoints: Vec<String> = backends
                    .iter()
                    .map(|(_, host)| {
                        crate::model::host_ports(std::slice::from_ref(host), spec.port).remove(0)
                    })
                    .collect();
                let (ready, reason, message) = if endpoints.is_empty() {
                    (
                        false,
                        "NoReadyPods",
                        format!("no ready pod matches the selector of connector {name}"),
                    )
                } else {
                    (
                        true,
                        "Ready",
                        format!(
                            "routing key {} served by {}",
                            spec.routing_key,
                            endpoints.join(", ")
                        ),
                    )
                };
                ConnectorStatus {
                    conditions: resources::conditions(before, ready, false, reason, &message),
                    endpoints,
                }
            }
            Err(message) => ConnectorStatus {
                conditions: resources::conditions(before, false, true, "Failed", &message),
                endpoints: Vec::new(),
            },
        },
        Err(message) => ConnectorStatus {
            conditions: resources::conditions(before, false, true, "Invalid", &message),
            endpoints: Vec::new(),
        },
    };
    set_status(&api, connector, status, &next).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Makes the router's connectors of `connector` exactly `backends` (name, host); `Err` carries
/// what the user must fix.
async fn sync_site_connectors(
    ctx: &Context,
    connector: &Connector,
    backends: &[(String, String)],
) -> Result<Result<(), String>, Error> {
    let name = connector.name_any();
    let spec = &connector.spec;
    let weight = spec.weight.unwrap_or(1).clamp(1, 1000);
    let current: Vec<ConnectorView> = ctx.site.get("/v1/connectors").await?;
    let ours = current
        .iter()
        .filter(|c| resources::is_connector_of(&c.name, &name));
    for existing in ours {
        let wanted = backends.iter().any(|(n, host)| {
            *n == existing.name
                && *host == existing.host
                && existing.port == spec.port
                && existing.routing_key == spec.routing_key
                && existing.weight == weight
        });
        if !wanted && site_delete(ctx, &format!("/v1/connectors/{}", existing.name)).await? {
            tracing::info!(connector = %existing.name, host = %existing.host, "backend removed");
        }
    }
    for (backend, host) in backends {
        if current.iter().any(|c| {
            c.name == *backend
                && c.host == *host
                && c.port == spec.port
                && c.routing_key == spec.routing_key
                && c.weight == weight
        }) {
            continue;
        }
        let created = ctx
            .site
            .post::<_, ConnectorView>(
                "/v1/connectors",
                &admin::CreateConnector {
                    name: Some(backend.clone()),
                    routing_key: spec.routing_key.clone(),
                    host: host.clone(),
                    port: spec.port,
                    weight: Some(weight),
                },
            )
            .await;
        match created {
            Ok(_) => tracing::info!(connector = %backend, %host, "backend added"),
            Err(ClientError::Api { message, .. }) => return Ok(Err(message)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ok(()))
}

/// The name of an AccessGrant's token Secret.
pub fn token_secret_name(grant: &AccessGrant) -> String {
    format!("{}-token", grant.name_any())
}

/// Reconciles an AccessGrant: issues its token once, keeps it in a Secret it owns, and reports
/// expiry and uses left. Deleting the grant withdraws the token.
pub async fn grant(grant: Arc<AccessGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<AccessGrant> = ctx.api();
    finalizer(&api, FINALIZER, grant, |event| async {
        match event {
            Event::Apply(g) => apply_grant(&g, &ctx).await,
            Event::Cleanup(g) => {
                let secrets: Api<Secret> = ctx.api();
                let id = match secrets.get_opt(&token_secret_name(&g)).await? {
                    Some(secret) => secret.annotations().get(GRANT_ANNOTATION).cloned(),
                    None => None,
                };
                if let Some(id) = id {
                    if site_delete(&ctx, &format!("/v1/grants/{id}")).await? {
                        tracing::info!(grant = %g.name_any(), "token withdrawn");
                    }
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(finalizer_error)
}

async fn apply_grant(grant: &AccessGrant, ctx: &Context) -> Result<Action, Error> {
    let api: Api<AccessGrant> = ctx.api();
    let secrets: Api<Secret> = ctx.api();
    let status = grant.status.as_ref();
    let before = previous(status.map(|s| &s.conditions));
    let secret_name = token_secret_name(grant);
    let fail = |reason: &str, message: String| AccessGrantStatus {
        conditions: resources::conditions(before, false, true, reason, &message),
        token_secret: None,
        expires: None,
        uses_left: None,
    };
    let grant_id = match secrets.get_opt(&secret_name).await? {
        Some(secret) => secret.annotations().get(GRANT_ANNOTATION).cloned(),
        None if !ctx.reachable.load(std::sync::atomic::Ordering::Relaxed) => {
            let next = fail(
                "Unreachable",
                "this site only dials out (its Site has linkAccess None and no linkHosts), so \
                 no other site could use a token from it: set spec.linkAccess on the Site, or \
                 issue the token on the other site and apply it here"
                    .into(),
            );
            set_status(&api, grant, status, &next).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        None => {
            let expiry = match humantime::parse_duration(&grant.spec.expiry) {
                Ok(d) => d,
                Err(e) => {
                    let next = fail(
                        "Invalid",
                        format!(
                            "spec.expiry {:?} is not a duration like 15m or 2h: {e}",
                            grant.spec.expiry
                        ),
                    );
                    set_status(&api, grant, status, &next).await?;
                    return Ok(Action::await_change());
                }
            };
            let issued = ctx
                .site
                .post::<_, admin::TokenIssued>(
                    "/v1/tokens",
                    &admin::IssueToken {
                        uses: grant.spec.uses,
                        expiry_secs: expiry.as_secs(),
                        cost: grant.spec.cost,
                    },
                )
                .await;
            let issued = match issued {
                Ok(issued) => issued,
                Err(ClientError::Api { message, .. }) => {
                    set_status(&api, grant, status, &fail("Invalid", message)).await?;
                    return Ok(Action::await_change());
                }
                Err(e) => return Err(e.into()),
            };
            let secret = resources::token_secret(
                &secret_name,
                &ctx.namespace,
                grant,
                &issued.grant,
                &issued.token.0,
            );
            secrets.create(&PostParams::default(), &secret).await?;
            tracing::info!(grant = %grant.name_any(), secret = %secret_name, "token issued");
            Some(issued.grant)
        }
    };
    let views: Vec<GrantView> = ctx.site.get("/v1/grants").await?;
    let view = grant_id
        .as_ref()
        .and_then(|id| views.into_iter().find(|v| &v.id == id));
    let next = match view {
        Some(view) => {
            let (ready, reason, message) = if view.spent {
                (
                    false,
                    "Spent",
                    format!(
                        "the token in Secret {secret_name} is used up or expired; delete and \
                         re-create this AccessGrant for a new one"
                    ),
                )
            } else {
                (
                    true,
                    "Ready",
                    format!(
                        "token in Secret {secret_name} (key {TOKEN_KEY}): {} use(s) left until {}",
                        view.uses_left, view.expires
                    ),
                )
            };
            AccessGrantStatus {
                conditions: resources::conditions(before, ready, false, reason, &message),
                token_secret: Some(secret_name),
                expires: Some(view.expires),
                uses_left: Some(view.uses_left),
            }
        }
        None => fail(
            "Unknown",
            format!(
                "the site no longer knows the token in Secret {secret_name}; delete and \
                 re-create this AccessGrant"
            ),
        ),
    };
    set_status(&api, grant, status, &next).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Reconciles an AccessToken: redeems it once and creates the Link it makes (owned by the
/// token, so deleting the token deletes the link).
pub async fn token(token: Arc<AccessTokenResource>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<AccessTokenResource> = ctx.api();
    let links: Api<Link> = ctx.api();
    let name = token.name_any();
    let status = token.status.as_ref();
    let before = previous(status.map(|s| &s.conditions));
    if links.get_opt(&name).await?.is_none() {
        let site_links: Vec<LinkView> = ctx.site.get("/v1/links").await?;
        let known = site_links
            .iter()
            .any(|l| l.name == name && l.direction == "outgoing");
        if !known {
            let text = crate::token::AccessToken {
                api_version: crate::token::API_VERSION.into(),
                kind: crate::token::KIND.into(),
                metadata: crate::token::Metadata { name: name.clone() },
                spec: token.spec.token.clone(),
            }
            .to_yaml();
            let redeemed = ctx
                .site
                .post::<_, LinkView>(
                    "/v1/links",
                    &admin::CreateLink {
                        token: crate::token::Secret(text),
                        name: Some(name.clone()),
                        cost: None,
                        wait_secs: Some(0),
                        transport: None,
                    },
                )
                .await;
            match redeemed {
                // 504: created, not up yet; the Link's status follows it.
                Ok(_) | Err(ClientError::Api { status: 504, .. }) => {
                    tracing::info!(token = %name, peer = %token.spec.token.issuer.name, "token redeemed");
                }
                Err(ClientError::Api {
                    status: code,
                    message,
                }) => {
                    let next = AccessTokenStatus {
                        conditions: resources::conditions(
                            before,
                            false,
                            true,
                            "RedeemFailed",
                            &message,
                        ),
                        link: None,
                    };
                    set_status(&api, &*token, status, &next).await?;
                    // A malformed or self-issued token never gets better; an unreachable
                    // issuer may.
                    return Ok(if code == 400 {
                        Action::await_change()
                    } else {
                        Action::requeue(Duration::from_secs(60))
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let spec = &token.spec.token;
        let mut link = Link::new(
            &name,
            LinkSpec {
                peer_site: spec.issuer.name.clone(),
                peer_id: spec.issuer.id.to_string(),
                endpoints: spec.endpoints.clone(),
                quic_endpoints: spec.quic_endpoints.clone(),
                peer_ca: spec.ca.clone(),
                cost: spec.cost,
                transport: None,
                credentials_secret: STATE_SECRET.into(),
            },
        );
        link.metadata.namespace = Some(ctx.namespace.clone());
        link.metadata.owner_references = Some(resources::owner(&*token));
        apply(&links, &link).await?;
    }
    let next = AccessTokenStatus {
        conditions: resources::conditions(
            before,
            true,
            false,
            "Redeemed",
            &format!("redeemed; see Link {name}"),
        ),
        link: Some(name),
    };
    set_status(&api, &*token, status, &next).await?;
    Ok(Action::await_change())
}

/// Reconciles a Link: reports the router's link in its status; deleting it deletes the link.
pub async fn link(link: Arc<Link>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Link> = ctx.api();
    finalizer(&api, FINALIZER, link, |event| async {
        match event {
            Event::Apply(l) => apply_link(&l, &ctx).await,
            Event::Cleanup(l) => {
                if site_delete(&ctx, &format!("/v1/links/{}", l.name_any())).await? {
                    tracing::info!(link = %l.name_any(), "link removed");
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(finalizer_error)
}

async fn apply_link(link: &Link, ctx: &Context) -> Result<Action, Error> {
    let api: Api<Link> = ctx.api();
    let name = link.name_any();
    let status = link.status.as_ref();
    let before = previous(status.map(|s| &s.conditions));
    let views: Vec<LinkView> = ctx.site.get("/v1/links").await?;
    let next = match views
        .iter()
        .find(|v| v.name == name && v.direction == "outgoing")
    {
        Some(view) => {
            let up = view.state == "up";
            let message = if up {
                format!(
                    "up to site {} over {}",
                    view.peer_site,
                    view.transport.as_deref().unwrap_or("?")
                )
            } else {
                format!(
                    "{} to site {}{}",
                    view.state,
                    view.peer_site,
                    view.last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            };
            let reason = if up { "Up" } else { "Connecting" };
            LinkStatus {
                conditions: resources::conditions(before, up, false, reason, &message),
                state: Some(view.state.clone()),
                transport: view.transport.clone(),
                rtt_ms: view.rtt_ms.map(|r| (r * 10.0).round() / 10.0),
                lanes: view.lanes,
            }
        }
        None => LinkStatus {
            conditions: resources::conditions(
                before,
                false,
                true,
                "NoCredentials",
                &format!(
                    "this site has no link named {name}: links are made by applying an \
                     AccessToken (the token file from the other site), which creates its Link"
                ),
            ),
            state: None,
            transport: None,
            rtt_ms: None,
            lanes: None,
        },
    };
    set_status(&api, link, status, &next).await?;
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// What the controller does when a reconcile fails: log it and retry soon.
pub fn retry<K: ResourceExt>(resource: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        kind = std::any::type_name::<K>().rsplit("::").next().unwrap_or("?"),
        name = %resource.name_any(),
        error = %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}
