//! `skiff connector ...`, `skiff listener ...` and `skiff network status`.

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;
use skiff_control::admin::{
    self, ConnectorView, CreateConnector, CreateListener, ListenerView, NetworkView,
};

use super::output::{self, table, Format};
use skiff_control::crd;

/// Parses a `key=value` label.
pub(crate) fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not a label: write key=value")),
    }
}

/// A custom resource as YAML, with `namespace` set if given.
fn resource_yaml<K>(mut resource: K, namespace: Option<&str>) -> Result<String>
where
    K: kube::Resource + serde::Serialize,
{
    if let Some(ns) = namespace {
        resource.meta_mut().namespace = Some(ns.to_string());
    }
    Ok(serde_yaml_ng::to_string(&resource)?)
}

/// The Connector resource `connector create` describes (printed with `-o yaml`, applied with
/// `--kube`).
pub(crate) fn connector_spec(
    key: &str,
    port: u16,
    selector: Vec<(String, String)>,
    host: Option<String>,
    weight: u32,
) -> crd::ConnectorSpec {
    crd::ConnectorSpec {
        routing_key: key.to_string(),
        port,
        selector: (!selector.is_empty()).then(|| selector.into_iter().collect()),
        host,
        weight: Some(weight),
    }
}

/// The Listener resource `listener create` describes (printed with `-o yaml`, applied with
/// `--kube`).
pub(crate) fn listener_spec(
    key: &str,
    port: u16,
    host: Option<String>,
    strategy: String,
) -> crd::ListenerSpec {
    crd::ListenerSpec {
        routing_key: key.to_string(),
        port,
        host,
        strategy: Some(strategy),
    }
}

/// `skiff connector ...`
#[derive(Subcommand, Debug)]
pub enum ConnectorCommand {
    /// Serve routing key KEY from host:port, for listeners in any site of the network.
    Create {
        /// The routing key (service name in the network).
        key: String,
        /// Backend host.
        #[arg(long, required_unless_present = "selector")]
        host: Option<String>,
        /// In a cluster: pods with this label serve KEY (repeatable, `key=value`).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
        selector: Vec<(String, String)>,
        /// Backend port.
        #[arg(long)]
        port: u16,
        /// Name (default: KEY).
        #[arg(long)]
        name: Option<String>,
        /// Relative share of connections this connector gets.
        #[arg(long, default_value_t = 1, value_name = "N")]
        weight: u32,
        /// `-o yaml`: print the Connector resource (for GitOps) instead of creating it here.
        #[arg(short = 'o', long = "output", value_parser = ["yaml"])]
        output: Option<String>,
    },
    /// List this site's connectors.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Delete a connector.
    Delete {
        /// The connector's name.
        name: String,
    },
}

/// `skiff listener ...`
#[derive(Subcommand, Debug)]
pub enum ListenerCommand {
    /// Open PORT here; its connections go to routing key KEY wherever it is served.
    Create {
        /// The routing key.
        key: String,
        /// Port to open.
        #[arg(long)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
        bind: String,
        /// Name (default: KEY).
        #[arg(long)]
        name: Option<String>,
        /// How to choose among the sites that serve KEY.
        #[arg(long, default_value = "balanced", value_parser = ["balanced", "closest", "round-robin", "source-affinity"])]
        strategy: String,
        /// In a cluster: the name of the Service clients use (default: KEY).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// `-o yaml`: print the Listener resource (for GitOps) instead of creating it here.
        #[arg(short = 'o', long = "output", value_parser = ["yaml"])]
        output: Option<String>,
    },
    /// List this site's listeners and where their keys are served.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Delete a listener (its port closes; carried connections go on).
    Delete {
        /// The listener's name.
        name: String,
    },
}

/// `skiff network ...`
#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Every site, every link (cost, state, RTT), every routing key and the sites serving it.
    Status {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Print the network as a Graphviz DOT graph instead.
        #[arg(long, conflicts_with = "output")]
        dot: bool,
    },
}

pub async fn connector(
    command: ConnectorCommand,
    dir: &Path,
    namespace: Option<&str>,
) -> Result<()> {
    let client = admin::Client::new(dir);
    match command {
        ConnectorCommand::Create {
            key,
            host,
            selector,
            port,
            name,
            weight,
            output: Some(_),
        } => {
            let spec = connector_spec(&key, port, selector, host, weight);
            let resource = crd::Connector::new(&name.unwrap_or(key), spec);
            print!("{}", resource_yaml(resource, namespace)?);
        }
        ConnectorCommand::Create {
            key,
            host,
            selector,
            port,
            name,
            weight,
            output: None,
        } => {
            anyhow::ensure!(
                selector.is_empty(),
                "--selector chooses pods in a cluster; a host site serves KEY from --host \
                 (or print the resource with -o yaml)"
            );
            let host = host.unwrap_or_default();
            let c: ConnectorView = client
                .post(
                    "/v1/connectors",
                    &CreateConnector {
                        name,
                        routing_key: key,
                        host,
                        port,
                        weight: Some(weight),
                    },
                )
                .await?;
            println!(
                "connector {} serves {} from {}:{}",
                c.name, c.routing_key, c.host, c.port
            );
        }
        ConnectorCommand::List { output } => {
            let list: Vec<ConnectorView> = client.get("/v1/connectors").await?;
            if !output::print_structured(output, &list)? {
                let mut rows = vec![["NAME", "KEY", "HOST", "PORT", "WEIGHT"]
                    .map(String::from)
                    .to_vec()];
                for c in &list {
                    rows.push(vec![
                        c.name.clone(),
                        c.routing_key.clone(),
                        c.host.clone(),
                        c.port.to_string(),
                        c.weight.to_string(),
                    ]);
                }
                print!(
                    "{}",
                    if list.is_empty() {
                        "no connectors\n".into()
                    } else {
                        table(&rows)
                    }
                );
            }
        }
        ConnectorCommand::Delete { name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/connectors/{name}")).await?;
            println!("connector {name} deleted");
        }
    }
    Ok(())
}

pub async fn listener(command: ListenerCommand, dir: &Path, namespace: Option<&str>) -> Result<()> {
    let client = admin::Client::new(dir);
    match command {
        ListenerCommand::Create {
            key,
            port,
            name,
            strategy,
            host,
            output: Some(_),
            ..
        } => {
            let spec = listener_spec(&key, port, host, strategy);
            let resource = crd::Listener::new(&name.unwrap_or(key), spec);
            print!("{}", resource_yaml(resource, namespace)?);
        }
        ListenerCommand::Create {
            key,
            port,
            bind,
            name,
            strategy,
            host: _,
            output: None,
        } => {
            let l: ListenerView = client
                .post(
                    "/v1/listeners",
                    &CreateListener {
                        name,
                        routing_key: key,
                        port,
                        bind: Some(bind),
                        strategy: Some(strategy),
                    },
                )
                .await?;
            println!(
                "listener {} on {}:{} -> {} ({})",
                l.name, l.bind, l.port, l.routing_key, l.strategy
            );
            if l.targets.is_empty() {
                println!(
                    "note: no site serves {} yet; clients are refused until one does",
                    l.routing_key
                );
            }
        }
        ListenerCommand::List { output } => {
            let list: Vec<ListenerView> = client.get("/v1/listeners").await?;
            if !output::print_structured(output, &list)? {
                let mut rows = vec![["NAME", "KEY", "ADDRESS", "STRATEGY", "SERVED BY"]
                    .map(String::from)
                    .to_vec()];
                for l in &list {
                    rows.push(vec![
                        l.name.clone(),
                        l.routing_key.clone(),
                        format!("{}:{}", l.bind, l.port),
                        l.strategy.clone(),
                        match (&l.error, l.targets.is_empty()) {
                            (Some(e), _) => format!("error: {e}"),
                            (None, true) => "(nobody: clients are refused)".into(),
                            (None, false) => l.targets.join(", "),
                        },
                    ]);
                }
                print!(
                    "{}",
                    if list.is_empty() {
                        "no listeners\n".into()
                    } else {
                        table(&rows)
                    }
                );
            }
        }
        ListenerCommand::Delete { name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/listeners/{name}")).await?;
            println!("listener {name} deleted");
        }
    }
    Ok(())
}

pub async fn network(command: NetworkCommand, dir: &Path) -> Result<()> {
    let NetworkCommand::Status { output, dot } = command;
    let view: NetworkView = admin::Client::new(dir).get("/v1/network").await?;
    if dot {
        print!("{}", skiff_control::picture::dot(&view));
    } else if !output::print_structured(output, &view)? {
        print!("{}", network_table(&view));
    }
    Ok(())
}

/// The three tables of `network status`: sites, links, services.
pub fn network_table(view: &NetworkView) -> String {
    let mut out = String::new();
    let mut rows = vec![["SITE", "REACHABLE", "COST", "VIA"]
        .map(String::from)
        .to_vec()];
    for s in &view.sites {
        rows.push(vec![
            if s.local {
                format!("{} (this site)", s.name)
            } else {
                s.name.clone()
            },
            if s.reachable { "yes" } else { "no" }.into(),
            s.cost.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            s.next_hop.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');
    let mut rows = vec![["LINK", "COST", "STATE", "RTT"].map(String::from).to_vec()];
    for l in &view.links {
        rows.push(vec![
            format!("{} -- {}", l.from, l.to),
            l.cost.to_string(),
            l.state.clone(),
            l.rtt_ms
                .map(|ms| format!("{ms:.2}ms"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    if view.links.is_empty() {
        out.push_str("no links\n");
    } else {
        out.push_str(&table(&rows));
    }
    out.push('\n');
    let mut rows = vec![["KEY", "SERVED BY (cost)"].map(String::from).to_vec()];
    for s in &view.services {
        rows.push(vec![
            s.routing_key.clone(),
            s.sites
                .iter()
                .map(|t| format!("{} ({})", t.name, t.cost))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    if view.services.is_empty() {
        out.push_str("no services\n");
    } else {
        out.push_str(&table(&rows));
    }
    out
}
