//! `--kube`: the commands acting on a cluster's custom resources instead of a local daemon, and
//! `site run --kube`, the namespace controller.
//!
//! The cluster is the one KUBECONFIG (or the in-cluster config) points at; the namespace is
//! `--namespace`, else the context's. Create commands apply a resource with server-side apply
//! and wait for its `Ready` or `Error` condition, so the user sees what happened, not only
//! that the API server accepted the object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use skiff_control::crd::{
    AccessGrant, AccessGrantSpec, AccessTokenResource, AccessTokenSpec, Condition, Connector,
    ConnectorSpec, Link, Listener, ListenerSpec, Site,
};

use super::output::{self, table, Format};

/// The field manager of objects the CLI applies.
const FIELD_MANAGER: &str = "skiff-cli";

/// A client of the cluster and the namespace to act in.
pub struct Cluster {
    client: Client,
    namespace: String,
}

impl Cluster {
    /// Connects with KUBECONFIG or the in-cluster config.
    pub async fn connect(namespace: Option<&str>) -> Result<Cluster> {
        let client = Client::try_default().await.context(
            "cannot reach a Kubernetes cluster: set KUBECONFIG (or run in a pod with a service \
             account), or drop --kube to talk to a local site",
        )?;
        let namespace = namespace
            .map(str::to_string)
            .unwrap_or_else(|| client.default_namespace().to_string());
        Ok(Cluster { client, namespace })
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn apply<K>(&self, mut resource: K) -> Result<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        resource.meta_mut().namespace = Some(self.namespace.clone());
        let name = resource.name_any();
        self.api::<K>()
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&resource),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot apply {} {name} in namespace {} (are the CRDs installed? \
                     skiff crd | kubectl apply -f -)",
                    K::kind(&()),
                    self.namespace
                )
            })
    }

    /// Polls `name` until `conditions` says Ready or Error, or `timeout` passes.
    async fn wait<K, F>(
        &self,
        name: &str,
        timeout: Duration,
        conditions: F,
    ) -> Result<Vec<Condition>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        F: Fn(&K) -> Vec<Condition>,
    {
        let api = self.api::<K>();
        let start = Instant::now();
        loop {
            let current = conditions(&api.get(name).await?);
            let decided = current
                .iter()
                .any(|c| c.status == "True" && (c.type_ == "Ready" || c.type_ == "Error"));
            if decided || start.elapsed() >= timeout {
                return Ok(current);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One line saying what the conditions say (`Ready: ...` or `Error: ...`).
fn describe(conditions: &[Condition]) -> String {
    let error = conditions
        .iter()
        .find(|c| c.type_ == "Error" && c.status == "True");
    let ready = conditions.iter().find(|c| c.type_ == "Ready");
    match (error, ready) {
        (Some(e), _) => format!("error: {}", e.message),
        (None, Some(r)) if r.status == "True" => format!("ready: {}", r.message),
        (None, Some(r)) => format!("not ready ({}): {}", r.reason, r.message),
        (None, None) => {
            "no status yet: is `skiff site run --kube` running in this namespace?".into()
        }
    }
}

fn conditions_of<S>(status: Option<&S>, get: impl Fn(&S) -> &Vec<Condition>) -> Vec<Condition> {
    status.map(|s| get(s).clone()).unwrap_or_default()
}

/// The wait for a new resource's first status.
const STATUS_WAIT: Duration = Duration::from_secs(15);

/// `skiff --kube token issue`: an AccessGrant, then its token from the Secret the site writes.
pub async fn token_issue(
    cluster: &Cluster,
    uses: u32,
    expiry: Duration,
    cost: u32,
    output: Option<&Path>,
) -> Result<()> {
    let name = format!("grant-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let grant = AccessGrant::new(
        &name,
        AccessGrantSpec {
            uses,
            expiry: humantime::format_duration(expiry)
                .to_string()
                .replace(' ', ""),
            cost,
        },
    );
    cluster.apply(grant).await?;
    let conditions = cluster
        .wait::<AccessGrant, _>(&name, STATUS_WAIT, |g| {
            conditions_of(g.status.as_ref(), |s| &s.conditions)
        })
        .await?;
    let grant: AccessGrant = cluster.api().get(&name).await?;
    let Some(secret_name) = grant.status.and_then(|s| s.token_secret) else {
        bail!(
            "AccessGrant {name} has no token yet ({}); check it with kubectl describe accessgrant {name} -n {}",
            describe(&conditions),
            cluster.namespace
        );
    };
    let secret: Secret = cluster.api().get(&secret_name).await?;
    let token = secret
        .data
        .and_then(|d| {
            d.get(skiff_control::controller::resources::TOKEN_KEY)
                .cloned()
        })
        .with_context(|| format!("Secret {secret_name} holds no token"))?;
    let token = String::from_utf8(token.0).context("the token is not UTF-8")?;
    match output {
        Some(path) => {
            super::token::write_private(path, token.as_bytes())
                .with_context(|| format!("cannot write the token to {}", path.display()))?;
            eprintln!(
                "token of AccessGrant {name} written to {} ({uses} use(s), valid {}); hand it \
                 to the other site over a secure channel",
                path.display(),
                humantime::format_duration(expiry)
            );
        }
        None => print!("{token}"),
    }
    Ok(())
}

/// The token file as an AccessToken resource.
pub fn token_resource(token_file: &Path) -> Result<AccessTokenResource> {
    let text = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read token file {}", token_file.display()))?;
    let token = skiff_control::token::AccessToken::parse(&text)
        .with_context(|| format!("{} is not a usable token", token_file.display()))?;
    Ok(AccessTokenResource::new(
        &token.metadata.name,
        AccessTokenSpec { token: token.spec },
    ))
}

/// `skiff --kube link create TOKEN`: applies the token as an AccessToken and waits for its Link.
pub async fn link_create(cluster: &Cluster, token_file: &Path, wait: Duration) -> Result<()> {
    let resource = cluster.apply(token_resource(token_file)?).await?;
    let name = resource.name_any();
    let conditions = cluster
        .wait::<AccessTokenResource, _>(&name, wait, |t| {
            conditions_of(t.status.as_ref(), |s| &s.conditions)
        })
        .await?;
    if conditions
        .iter()
        .any(|c| c.type_ == "Error" && c.status == "True")
    {
        bail!("AccessToken {name}: {}", describe(&conditions));
    }
    let link = cluster
        .wait::<Link, _>(&name, wait, |l| {
            conditions_of(l.status.as_ref(), |s| &s.conditions)
        })
        .await;
    match link {
        Ok(conditions) => println!("link {name}: {}", describe(&conditions)),
        Err(_) => println!("AccessToken {name}: {}", describe(&conditions)),
    }
    Ok(())
}

/// `skiff --kube listener create`.
pub async fn listener_create(cluster: &Cluster, name: &str, spec: ListenerSpec) -> Result<()> {
    cluster.apply(Listener::new(name, spec)).await?;
    let conditions = cluster
        .wait::<Listener, _>(name, STATUS_WAIT, |l| {
            conditions_of(l.status.as_ref(), |s| &s.conditions)
        })
        .await?;
    println!("listener {name}: {}", describe(&conditions));
    Ok(())
}

/// `skiff --kube connector create`.
pub async fn connector_create(cluster: &Cluster, name: &str, spec: ConnectorSpec) -> Result<()> {
    cluster.apply(Connector::new(name, spec)).await?;
    let conditions = cluster
        .wait::<Connector, _>(name, STATUS_WAIT, |c| {
            conditions_of(c.status.as_ref(), |s| &s.conditions)
        })
        .await?;
    println!("connector {name}: {}", describe(&conditions));
    Ok(())
}

/// `skiff --kube {listener,connector,link} delete NAME`.
pub async fn delete<K>(cluster: &Cluster, name: &str) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&());
    cluster
        .api::<K>()
        .delete(name, &Default::default())
        .await
        .with_context(|| {
            format!(
                "cannot delete {kind} {name} in namespace {}",
                cluster.namespace
            )
        })?;
    println!("{kind} {name} deleted");
    Ok(())
}

/// Everything skiff in the namespace, as `skiff --kube status` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    namespace: String,
    sites: Vec<Site>,
    links: Vec<Link>,
    listeners: Vec<Listener>,
    connectors: Vec<Connector>,
    access_grants: Vec<AccessGrant>,
    access_tokens: Vec<AccessTokenResource>,
}

/// `skiff --kube status`.
pub async fn status(cluster: &Cluster, format: Format) -> Result<()> {
    let all = ListParams::default();
    let view = ClusterStatus {
        namespace: cluster.namespace.clone(),
        sites: cluster
            .api::<Site>()
            .list(&all)
            .await
            .context("cannot list Sites (are the CRDs installed? skiff crd | kubectl apply -f -)")?
            .items,
        links: cluster.api::<Link>().list(&all).await?.items,
        listeners: cluster.api::<Listener>().list(&all).await?.items,
        connectors: cluster.api::<Connector>().list(&all).await?.items,
        access_grants: cluster.api::<AccessGrant>().list(&all).await?.items,
        access_tokens: cluster.api::<AccessTokenResource>().list(&all).await?.items,
    };
    if output::print_structured(format, &view)? {
        return Ok(());
    }
    let mut rows = vec![["KIND", "NAME", "STATUS"].map(String::from).to_vec()];
    let mut row = |kind: &str, name: String, conditions: Vec<Condition>| {
        rows.push(vec![kind.to_string(), name, describe(&conditions)]);
    };
    for s in &view.sites {
        row(
            "Site",
            s.name_any(),
            conditions_of(s.status.as_ref(), |s| &s.conditions),
        );
    }
    for l in &view.links {
        row(
            "Link",
            l.name_any(),
            conditions_of(l.status.as_ref(), |s| &s.conditions),
        );
    }
    for l in &view.listeners {
        row(
            "Listener",
            l.name_any(),
            conditions_of(l.status.as_ref(), |s| &s.conditions),
        );
    }
    for c in &view.connectors {
        row(
            "Connector",
            c.name_any(),
            conditions_of(c.status.as_ref(), |s| &s.conditions),
        );
    }
    for g in &view.access_grants {
        row(
            "AccessGrant",
            g.name_any(),
            conditions_of(g.status.as_ref(), |s| &s.conditions),
        );
    }
    for t in &view.access_tokens {
        row(
            "AccessToken",
            t.name_any(),
            conditions_of(t.status.as_ref(), |s| &s.conditions),
        );
    }
    if view.sites.is_empty() {
        println!(
            "no Site in namespace {}: apply one (see docs/kubernetes.md)",
            view.namespace
        );
    }
    print!("{}", table(&rows));
    Ok(())
}

/// Runs `command` against the cluster (`--kube`).
pub async fn run(
    command: super::Command,
    namespace: Option<&str>,
    state_dir: PathBuf,
    recent_logs: skiff_control::logs::Recent,
) -> Result<()> {
    use super::link::LinkCommand;
    use super::service::{ConnectorCommand, ListenerCommand};
    use super::site::SiteCommand;
    use super::token::TokenCommand;
    use super::Command;
    // Printing a resource needs no cluster.
    match &command {
        Command::Listener(ListenerCommand::Create {
            output: Some(_), ..
        })
        | Command::Connector(ConnectorCommand::Create {
            output: Some(_), ..
        }) => {
            return Box::pin(super::run_local(
                command,
                &state_dir,
                namespace,
                recent_logs,
            ))
            .await;
        }
        Command::Link(LinkCommand::Create {
            token_file,
            output: Some(_),
            ..
        }) => {
            let mut resource = token_resource(token_file)?;
            resource.metadata.namespace = namespace.map(str::to_string);
            print!("{}", serde_yaml_ng::to_string(&resource)?);
            return Ok(());
        }
        Command::Site(SiteCommand::Run {
            no_access_log,
            metrics_addr,
            router_selector,
            drain_timeout,
            limits,
            threads: _,
            busy_poll: _,
            shards: _,
            shard_runtimes,
        }) => {
            let options = skiff_control::site::RunOptions {
                access_log: !no_access_log,
                recent_logs: Some(recent_logs),
                drain: None,
                drain_timeout: *drain_timeout,
                limits: limits.limits(),
                shards: shard_runtimes.clone(),
            };
            return run_controller(
                namespace,
                state_dir,
                *metrics_addr,
                router_selector.clone(),
                options,
            )
            .await;
        }
        _ => {}
    }
    let cluster = Cluster::connect(namespace).await?;
    match command {
        Command::Token(TokenCommand::Issue {
            uses,
            expiry,
            cost,
            output,
        }) => token_issue(&cluster, uses, expiry, cost, output.as_deref()).await,
        Command::Link(LinkCommand::Create {
            token_file, wait, ..
        }) => link_create(&cluster, &token_file, wait).await,
        Command::Link(LinkCommand::Delete { name }) => delete::<Link>(&cluster, &name).await,
        Command::Listener(ListenerCommand::Create {
            key,
            port,
            name,
            strategy,
            host,
            ..
        }) => {
            let spec = super::service::listener_spec(&key, port, host, strategy);
            listener_create(&cluster, &name.unwrap_or(key), spec).await
        }
        Command::Listener(ListenerCommand::Delete { name }) => {
            delete::<Listener>(&cluster, &name).await
        }
        Command::Connector(ConnectorCommand::Create {
            key,
            host,
            selector,
            port,
            name,
            weight,
            ..
        }) => {
            let spec = super::service::connector_spec(&key, port, selector, host, weight);
            connector_create(&cluster, &name.unwrap_or(key), spec).await
        }
        Command::Connector(ConnectorCommand::Delete { name }) => {
            delete::<Connector>(&cluster, &name).await
        }
        Command::Status { output } => status(&cluster, output).await,
        _ => bail!(
            "this command acts on a local site only; with --kube use token issue, link create,              link delete, listener create/delete, connector create/delete, status or site run              (or kubectl on the skiff.dev resources)"
        ),
    }
}

/// `skiff site run --kube`: the namespace controller, until SIGTERM.
pub async fn run_controller(
    namespace: Option<&str>,
    state_dir: PathBuf,
    metrics_addr: Option<std::net::SocketAddr>,
    router_selector: Vec<(String, String)>,
    run: skiff_control::site::RunOptions,
) -> Result<()> {
    let client = Client::try_default().await.context(
        "cannot reach the Kubernetes API: run in a pod with a service account, or set KUBECONFIG",
    )?;
    let router_selector: BTreeMap<String, String> = if router_selector.is_empty() {
        BTreeMap::from([("app.kubernetes.io/name".into(), "skiff".into())])
    } else {
        router_selector.into_iter().collect()
    };
    super::site::prepare_process();
    let signals = super::shutdown_on_signals()?;
    // The first SIGTERM (a pod being replaced) drains the router: its listeners stop taking
    // clients and other sites stop routing here, while carried connections finish. The
    // controller stops once the drain time is over, or at once on a second signal.
    let shutdown = signals.stop.clone();
    let (drain, grace) = (signals.drain.clone(), run.drain_timeout);
    tokio::spawn(async move {
        drain.cancelled().await;
        tokio::select! {
            _ = tokio::time::sleep(grace + std::time::Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => {}
        }
        shutdown.cancel();
    });
    let mut run = run;
    run.drain = Some(signals.drain);
    let options = skiff_control::controller::Options {
        namespace: namespace.map(str::to_string),
        state_dir,
        metrics_addr,
        router_selector,
        run,
    };
    skiff_control::controller::run(client, options, signals.stop).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(type_: &str, status: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "R".into(),
            message: message.into(),
            last_transition_time: String::new(),
        }
    }

    #[test]
    fn descriptions_lead_with_errors() {
        let both = [
            condition("Ready", "False", "x"),
            condition("Error", "True", "port taken"),
        ];
        assert_eq!(describe(&both), "error: port taken");
        let ready = [
            condition("Ready", "True", "up"),
            condition("Error", "False", ""),
        ];
        assert_eq!(describe(&ready), "ready: up");
        assert!(describe(&[]).contains("site run --kube"));
    }
}
