//! The Kubernetes custom resources: group `skiff.dev`, version `v1alpha1`.
//!
//! Six kinds, each with a status subresource whose conditions (`Ready`, `Error`) say what is
//! real: [`Site`], [`Link`], [`AccessGrant`], [`AccessToken`](AccessTokenResource),
//! [`Listener`], [`Connector`].
//! Field names are camelCase. The CRD manifests are generated from these types (`skiff crd`)
//! and committed under deploy/crds/; a test fails when they drift.
//!
//! [`AccessToken`](AccessTokenResource)'s spec is the token file's spec ([`TokenSpec`]), so the
//! file `skiff token issue` writes can be applied to a cluster as is.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::token::TokenSpec;

/// A status condition (`Ready` or `Error`), as in every Kubernetes resource.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` or `Error`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason for programs.
    pub reason: String,
    /// What is going on, for people. Never holds a secret.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
}

/// How other sites reach a cluster site's link port.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
pub enum LinkAccess {
    /// No reachable link port: this site only dials out.
    #[default]
    None,
    /// A Service of type ClusterIP (sites in the same cluster).
    ClusterIP,
    /// A Service of type NodePort.
    NodePort,
    /// A Service of type LoadBalancer.
    LoadBalancer,
}

fn default_link_port() -> u16 {
    crate::model::DEFAULT_LINK_PORT
}

fn yes() -> bool {
    true
}

/// A site: the router of this namespace, and how other sites reach it.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "Site",
    namespaced,
    status = "SiteStatus",
    shortname = "sksite",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// How other sites reach the link port (default `None`: this site only dials out).
    #[serde(default)]
    pub link_access: LinkAccess,
    /// The link port (TCP, and UDP for QUIC).
    #[serde(default = "default_link_port")]
    pub link_port: u16,
    /// Host names or addresses for the link server certificate and tokens, besides what the
    /// link-access Service gets (for example a DNS name pointing at the load balancer).
    #[serde(default)]
    pub link_hosts: Vec<String>,
    /// Serve QUIC links on UDP too.
    #[serde(default = "yes")]
    pub quic: bool,
    /// Lifetime of the client certificates issued to linking sites (e.g. `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_lifetime: Option<String>,
}

/// What is real about a [`Site`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// Ready / Error.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The site's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_id: Option<String>,
    /// Where other sites reach it (`host:port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// A link this site dials (made by redeeming an `AccessToken`).
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "Link",
    namespaced,
    status = "LinkStatus",
    shortname = "sklink"
)]
#[serde(rename_all = "camelCase")]
pub struct LinkSpec {
    /// The peer site's name.
    pub peer_site: String,
    /// The peer site's id.
    pub peer_id: String,
    /// The peer's TCP link endpoints (`host:port`).
    pub endpoints: Vec<String>,
    /// The peer's QUIC endpoints.
    #[serde(default)]
    pub quic_endpoints: Vec<String>,
    /// The peer's CA certificate (PEM, public).
    pub peer_ca: String,
    /// Routing cost.
    #[serde(default = "one")]
    pub cost: u32,
    /// `auto`, `quic` or `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The Secret holding this site's client certificate and key for the link.
    pub credentials_secret: String,
}

fn one() -> u32 {
    1
}

/// What is real about a [`Link`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// Ready / Error.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `up`, `down` or `connecting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `quic` or `tls` while up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Last heartbeat round trip in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// While up over TLS: the lanes besides the first connection pair, one per further shard
    /// both sites run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<usize>,
}

/// Permission for other sites to link to this one: the site issues a token for it.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "AccessGrant",
    namespaced,
    status = "AccessGrantStatus",
    shortname = "skgrant"
)]
#[serde(rename_all = "camelCase")]
pub struct AccessGrantSpec {
    /// How many times the token may be redeemed.
    #[serde(default = "one")]
    pub uses: u32,
    /// How long the token stays valid (e.g. `15m`).
    #[serde(default = "fifteen_minutes")]
    pub expiry: String,
    /// Routing cost of links made with it.
    #[serde(default = "one")]
    pub cost: u32,
}

fn fifteen_minutes() -> String {
    "15m".into()
}

/// What is real about an [`AccessGrant`]. The token itself is a bearer secret: it lives in the
/// Secret named here, never in the status.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AccessGrantStatus {
    /// Ready / Error.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The Secret whose `token.yaml` is the token to hand to the other site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// When the token expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Redemptions left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
}

/// A token from another site, to redeem: applying the token file creates one.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "AccessToken",
    root = "AccessTokenResource",
    namespaced,
    status = "AccessTokenStatus",
    shortname = "sktoken"
)]
#[serde(rename_all = "camelCase")]
pub struct AccessTokenSpec {
    /// The token's content, exactly as in the token file.
    #[serde(flatten)]
    pub token: TokenSpec,
}

/// What is real about an [`AccessTokenResource`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AccessTokenStatus {
    /// Ready (redeemed, link created) / Error (why not).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The Link made from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// "Open a port here; connections to it go to a routing key": owns a ClusterIP Service.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "Listener",
    namespaced,
    status = "ListenerStatus",
    shortname = "sklistener"
)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// Where connections go.
    pub routing_key: String,
    /// The port clients connect to.
    pub port: u16,
    /// Name of the Service clients use (default: the routing key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `balanced` (default), `closest`, `round-robin` or `source-affinity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
}

/// What is real about a [`Listener`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// Ready / Error.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Sites that serve the key and can be reached now.
    #[serde(default)]
    pub targets: Vec<String>,
}

/// "This site serves a routing key": from pods chosen by label, or from a host.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    status = "ConnectorStatus",
    shortname = "skconnector"
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// The routing key served.
    pub routing_key: String,
    /// The backend port.
    pub port: u16,
    /// Pods with these labels serve it (their ready addresses, followed as pods come and go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Or: a host name or address that serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Relative share of connections (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// What is real about a [`Connector`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    /// Ready / Error.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The backend addresses in use (`ip:port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// Every CRD, as YAML documents separated by `---` (what `skiff crd` prints).
pub fn manifests() -> String {
    let crds = [
        Site::crd(),
        Link::crd(),
        AccessGrant::crd(),
        AccessTokenResource::crd(),
        Listener::crd(),
        Connector::crd(),
    ];
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_access_token_resources() {
        let ca = skiff_certs::Authority::generate(uuid::Uuid::new_v4(), "stg").unwrap();
        let yaml = format!(
            "apiVersion: skiff.dev/v1alpha1\nkind: AccessToken\nmetadata:\n  name: stg-1\nspec:\n  endpoints: [\"a:1\"]\n  code: {}\n  ca: {:?}\n  cost: 1\n  expires: 2030-01-01T00:00:00Z\n  issuer:\n    name: stg\n    id: {}\n",
            "ab".repeat(20),
            ca.cert_pem(),
            ca.site_id()
        );
        let file = crate::token::AccessToken::parse(&yaml).unwrap();
        let resource: AccessTokenResource = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(resource.spec.token, file.spec);
    }

    #[test]
    fn every_kind_is_in_the_manifests() {
        let all = manifests();
        for kind in [
            "Site",
            "Link",
            "AccessGrant",
            "AccessToken",
            "Listener",
            "Connector",
        ] {
            assert!(all.contains(&format!("kind: {kind}\n")), "{kind}");
        }
        assert_eq!(all.matches("subresources:").count(), 6);
    }
}
