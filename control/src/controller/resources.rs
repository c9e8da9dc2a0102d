//! The Kubernetes objects the controller owns, built from the custom resources, and the pure
//! pieces of reconciling: conditions that keep their transition times, ready addresses out of
//! EndpointSlices, the router's connector names for pod addresses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{Condition, Connector, LinkAccess, Listener, Site};

/// The Service that exposes a site's link port (when `linkAccess` is not `None`).
pub const LINK_SERVICE: &str = "skiff-link";
/// Prefix of the headless Service a Connector with a selector gets (its EndpointSlices list
/// the ready pods).
pub const CONNECTOR_SERVICE_PREFIX: &str = "skiff-connector-";
/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label on every object the controller creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "skiff");
/// Annotation on a grant's token Secret naming the grant (the token's name) in the site.
pub const GRANT_ANNOTATION: &str = "skiff.dev/grant";
/// The key of the token file in a grant's token Secret.
pub const TOKEN_KEY: &str = "token.yaml";
/// Separator between a Connector's name and a pod address in the router's connector names.
const POD_SEPARATOR: &str = "--";

/// An owner reference making `owner` the controller of what carries it (deleted with it).
pub fn owner<K: Resource<DynamicType = ()>>(owner: &K) -> Vec<OwnerReference> {
    owner.controller_owner_ref(&()).into_iter().collect()
}

fn metadata(name: &str, namespace: &str, owners: Vec<OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([(
            MANAGED_BY.0.to_string(),
            MANAGED_BY.1.to_string(),
        )])),
        owner_references: Some(owners),
        ..ObjectMeta::default()
    }
}

fn tcp_port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port: i32::from(port),
        target_port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// The name of the Service clients of `listener` use: its `host`, else its routing key.
pub fn listener_service_name(listener: &Listener) -> String {
    listener
        .spec
        .host
        .clone()
        .unwrap_or_else(|| listener.spec.routing_key.clone())
}

/// The ClusterIP Service of a Listener: its port on the router pods.
pub fn listener_service(
    listener: &Listener,
    namespace: &str,
    router_selector: &BTreeMap<String, String>,
) -> Service {
    let mut meta = metadata(&listener_service_name(listener), namespace, owner(listener));
    meta.labels
        .get_or_insert_with(Default::default)
        .insert("skiff.dev/listener".into(), listener.name_any());
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(router_selector.clone()),
            ports: Some(vec![tcp_port("tcp", listener.spec.port)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The name of the headless Service of a Connector with a selector.
pub fn connector_service_name(connector: &Connector) -> String {
    format!("{CONNECTOR_SERVICE_PREFIX}{}", connector.name_any())
}

/// The headless Service whose EndpointSlices list a Connector's ready pods.
pub fn connector_service(
    connector: &Connector,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Service {
    let mut meta = metadata(
        &connector_service_name(connector),
        namespace,
        owner(connector),
    );
    meta.labels
        .get_or_insert_with(Default::default)
        .insert("skiff.dev/connector".into(), connector.name_any());
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector.clone()),
            ports: Some(vec![tcp_port("tcp", connector.spec.port)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Connector a headless Service's EndpointSlice belongs to, if it is one of ours.
pub fn connector_of_slice(slice: &EndpointSlice) -> Option<String> {
    slice
        .labels()
        .get(SERVICE_NAME_LABEL)?
        .strip_prefix(CONNECTOR_SERVICE_PREFIX)
        .map(str::to_string)
}

/// The addresses of ready endpoints in `slices`, sorted and without duplicates. An endpoint
/// whose `ready` condition is absent counts as ready (the API's meaning of "unknown").
pub fn ready_addresses(slices: &[EndpointSlice]) -> Vec<String> {
    let mut addresses: Vec<String> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first().cloned())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The router connector name for pod `address` of Connector `connector`
/// (`web--10-244-1-7`).
pub fn pod_connector_name(connector: &str, address: &str) -> String {
    let address: String = address
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{connector}{POD_SEPARATOR}{}", address.trim_matches('-'))
}

/// True if router connector `name` belongs to Connector `connector`.
pub fn is_connector_of(name: &str, connector: &str) -> bool {
    name == connector
        || name
            .strip_prefix(connector)
            .is_some_and(|rest| rest.starts_with(POD_SEPARATOR))
}

/// The link-access Service of a site, or `None` when its link port is not exposed.
pub fn link_service(
    site: &Site,
    namespace: &str,
    router_selector: &BTreeMap<String, String>,
) -> Option<Service> {
    let type_ = match site.spec.link_access {
        LinkAccess::None => return None,
        LinkAccess::ClusterIP => "ClusterIP",
        LinkAccess::NodePort => "NodePort",
        LinkAccess::LoadBalancer => "LoadBalancer",
    };
    let port = site.spec.link_port;
    let mut ports = vec![tcp_port("link", port)];
    if site.spec.quic {
        ports.push(ServicePort {
            protocol: Some("UDP".into()),
            ..tcp_port("quic", port)
        });
    }
    Some(Service {
        metadata: metadata(LINK_SERVICE, namespace, owner(site)),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(router_selector.clone()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// Where other sites reach a site, read off its link-access Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkAccessPoint {
    /// Host names and addresses (server certificate names and token endpoints).
    pub hosts: Vec<String>,
    /// The TCP port other sites dial, when it differs from the link port (NodePort).
    pub port: Option<u16>,
    /// The UDP port other sites dial for QUIC, when it differs (NodePort).
    pub quic_port: Option<u16>,
    /// Why other sites cannot reach it yet (a load balancer without an address, ...).
    pub pending: Option<String>,
}

/// Where other sites reach `site`, given its link-access Service as the API server has it.
pub fn link_access_point(
    site: &Site,
    namespace: &str,
    service: Option<&Service>,
) -> LinkAccessPoint {
    let mut point = LinkAccessPoint {
        hosts: site.spec.link_hosts.clone(),
        ..LinkAccessPoint::default()
    };
    let cluster_names = [
        format!("{LINK_SERVICE}.{namespace}.svc.cluster.local"),
        format!("{LINK_SERVICE}.{namespace}.svc"),
    ];
    match site.spec.link_access {
        LinkAccess::None => {}
        LinkAccess::ClusterIP => point.hosts.extend(cluster_names),
        LinkAccess::LoadBalancer => {
            let ingress: Vec<String> = service
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .map(|list| {
                    list.iter()
                        .filter_map(|i| i.hostname.clone().or_else(|| i.ip.clone()))
                        .collect()
                })
                .unwrap_or_default();
            if ingress.is_empty() {
                point.pending = Some(format!(
                    "waiting for the load balancer of Service {LINK_SERVICE} to get an address"
                ));
            }
            point.hosts.extend(ingress);
            point.hosts.extend(cluster_names);
        }
        LinkAccess::NodePort => {
            let node_port = |protocol: &str| {
                service
                    .and_then(|s| s.spec.as_ref())
                    .and_then(|s| s.ports.as_ref())
                    .and_then(|ports| {
                        ports
                            .iter()
                            .find(|p| p.protocol.as_deref() == Some(protocol))
                    })
                    .and_then(|p| p.node_port)
                    .and_then(|p| u16::try_from(p).ok())
            };
            point.port = node_port("TCP");
            point.quic_port = if site.spec.quic {
                node_port("UDP")
            } else {
                None
            };
            if site.spec.link_hosts.is_empty() {
                point.pending = Some(
                    "linkAccess NodePort needs spec.linkHosts: the node addresses other sites \
                     can reach"
                        .into(),
                );
            } else if point.port.is_none() {
                point.pending = Some(format!(
                    "waiting for Service {LINK_SERVICE} to get a node port"
                ));
            }
            point.hosts.extend(cluster_names);
        }
    }
    let mut seen = std::collections::HashSet::new();
    point.hosts.retain(|h| seen.insert(h.clone()));
    point
}

/// A grant's token Secret: the token file under `token.yaml`, owned by the grant.
pub fn token_secret<K: Resource<DynamicType = ()>>(
    name: &str,
    namespace: &str,
    grant_owner: &K,
    grant_id: &str,
    token_yaml: &str,
) -> Secret {
    let mut meta = metadata(name, namespace, owner(grant_owner));
    meta.annotations = Some(BTreeMap::from([(
        GRANT_ANNOTATION.to_string(),
        grant_id.to_string(),
    )]));
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token_yaml.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The conditions of a resource: `Ready` (True/False) and `Error` (True with the message when
/// something is wrong, else False). A condition whose status does not change keeps its
/// `lastTransitionTime`, so re-applying the same status writes nothing new.
pub fn conditions(
    previous: &[Condition],
    ready: bool,
    error: bool,
    reason: &str,
    message: &str,
) -> Vec<Condition> {
    let now = crate::model::rfc3339(crate::model::unix_now());
    let make = |type_: &str, on: bool| {
        let status = if on { "True" } else { "False" }.to_string();
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: since,
        }
    };
    vec![make("Ready", ready), make("Error", error)]
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    use super::*;
    use crate::crd::{ConnectorSpec, SiteSpec};

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        }
    }

    #[test]
    fn only_ready_pods_are_backends() {
        let slices = [
            EndpointSlice {
                endpoints: vec![endpoint("10.0.0.2", Some(true)), endpoint("10.0.0.1", None)],
                ..EndpointSlice::default()
            },
            EndpointSlice {
                endpoints: vec![
                    endpoint("10.0.0.3", Some(false)),
                    endpoint("10.0.0.2", Some(true)),
                ],
                ..EndpointSlice::default()
            },
        ];
        assert_eq!(ready_addresses(&slices), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn pod_connector_names_are_valid_and_attributable() {
        let name = pod_connector_name("web", "10.244.1.7");
        assert_eq!(name, "web--10-244-1-7");
        crate::model::check_name("connector", &name).unwrap();
        let v6 = pod_connector_name("web", "fd00::1");
        crate::model::check_name("connector", &v6).unwrap();
        assert!(is_connector_of(&name, "web"));
        assert!(is_connector_of("web", "web"));
        assert!(!is_connector_of("web2--10-0-0-1", "web"));
        assert!(!is_connector_of("webx", "web"));
    }

    #[test]
    fn conditions_keep_their_transition_time() {
        let first = conditions(&[], true, false, "Ready", "ok");
        let mut old = first.clone();
        old[0].last_transition_time = "2020-01-01T00:00:00Z".into();
        let again = conditions(&old, true, false, "Ready", "still ok");
        assert_eq!(again[0].last_transition_time, "2020-01-01T00:00:00Z");
        let flipped = conditions(&old, false, true, "Failed", "broken");
        assert_ne!(flipped[0].last_transition_time, "2020-01-01T00:00:00Z");
        assert_eq!(flipped[1].status, "True");
    }

    fn site(access: LinkAccess, hosts: &[&str]) -> Site {
        let mut site = Site::new(
            "prod",
            SiteSpec {
                link_access: access,
                link_port: 55671,
                link_hosts: hosts.iter().map(|h| h.to_string()).collect(),
                quic: true,
                cert_lifetime: None,
            },
        );
        site.metadata.uid = Some("uid-1".into());
        site
    }

    #[test]
    fn load_balancer_access_waits_for_an_address() {
        let site = site(LinkAccess::LoadBalancer, &["prod.example.com"]);
        let service = link_service(&site, "skiff", &BTreeMap::new()).unwrap();
        let ports = service.spec.as_ref().unwrap().ports.clone().unwrap();
        assert_eq!(ports.len(), 2, "TCP for links and UDP for QUIC");
        let point = link_access_point(&site, "skiff", Some(&service));
        assert!(point.pending.is_some());
        let mut with_ip = service.clone();
        with_ip.status = Some(
            serde_json::from_value(serde_json::json!({
                "loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}
            }))
            .unwrap(),
        );
        let point = link_access_point(&site, "skiff", Some(&with_ip));
        assert_eq!(point.pending, None);
        assert_eq!(
            point.hosts,
            [
                "prod.example.com",
                "203.0.113.7",
                "skiff-link.skiff.svc.cluster.local",
                "skiff-link.skiff.svc"
            ]
        );
    }

    #[test]
    fn node_port_access_advertises_the_node_ports() {
        let site = site(LinkAccess::NodePort, &["192.0.2.10"]);
        let mut service = link_service(&site, "skiff", &BTreeMap::new()).unwrap();
        for port in service.spec.as_mut().unwrap().ports.as_mut().unwrap() {
            port.node_port = Some(if port.protocol.as_deref() == Some("UDP") {
                31001
            } else {
                31000
            });
        }
        let point = link_access_point(&site, "skiff", Some(&service));
        assert_eq!((point.port, point.quic_port), (Some(31000), Some(31001)));
        assert_eq!(point.hosts[0], "192.0.2.10");
        let no_hosts = self::site(LinkAccess::NodePort, &[]);
        assert!(link_access_point(&no_hosts, "skiff", Some(&service))
            .pending
            .unwrap()
            .contains("linkHosts"));
    }

    #[test]
    fn no_access_means_no_service() {
        let site = site(LinkAccess::None, &[]);
        assert!(link_service(&site, "skiff", &BTreeMap::new()).is_none());
        assert!(link_access_point(&site, "skiff", None).hosts.is_empty());
    }

    #[test]
    fn listener_services_are_owned_and_select_the_router() {
        let mut listener = Listener::new(
            "web",
            crate::crd::ListenerSpec {
                routing_key: "web".into(),
                port: 8080,
                host: Some("web-prod".into()),
                strategy: None,
            },
        );
        listener.metadata.uid = Some("uid-l".into());
        let selector = BTreeMap::from([("app.kubernetes.io/name".into(), "skiff".into())]);
        let service = listener_service(&listener, "skiff", &selector);
        assert_eq!(service.metadata.name.as_deref(), Some("web-prod"));
        let owners = service.metadata.owner_references.unwrap();
        assert_eq!(owners[0].uid, "uid-l");
        assert_eq!(owners[0].controller, Some(true));
        let spec = service.spec.unwrap();
        assert_eq!(spec.selector.unwrap(), selector);
        assert_eq!(spec.ports.unwrap()[0].port, 8080);
    }

    #[test]
    fn connector_slices_map_back_to_their_connector() {
        let connector = Connector::new(
            "db",
            ConnectorSpec {
                routing_key: "db".into(),
                port: 5432,
                selector: Some(BTreeMap::from([("app".into(), "db".into())])),
                host: None,
                weight: None,
            },
        );
        let mut slice = EndpointSlice::default();
        slice.metadata.labels = Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.to_string(),
            connector_service_name(&connector),
        )]));
        assert_eq!(connector_of_slice(&slice).as_deref(), Some("db"));
        slice.metadata.labels = Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.to_string(),
            "someone-else".to_string(),
        )]));
        assert_eq!(connector_of_slice(&slice), None);
    }
}
