//! The resource model as the state directory stores it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default TCP (and, later, UDP) port of the link port.
pub const DEFAULT_LINK_PORT: u16 = 55671;
/// Default lifetime of the client certificates a site issues to sites linking to it.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Lifetime of a site's link server certificate (reissued at every daemon start).
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// A site's settings, fixed at `skiff site init` (file `site.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's name (`dev`, `stg`, ...).
    pub name: String,
    /// The site's id: the identity in its certificates.
    pub id: Uuid,
    /// Host names or addresses other sites use to reach the link port (server cert SANs and
    /// token endpoints, in this order).
    pub link_hosts: Vec<String>,
    /// The link port (TCP).
    pub link_port: u16,
    /// The UDP port QUIC links are served on; `None` when QUIC is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_port: Option<u16>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Lifetime of the client certificates this site issues, in seconds.
    pub cert_lifetime_secs: u64,
    /// The TCP port other sites dial when it differs from `link_port` (a Kubernetes NodePort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_port: Option<u16>,
    /// The UDP port other sites dial for QUIC when it differs from `quic_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_quic_port: Option<u16>,
}

impl SiteConfig {
    /// The lifetime of client certificates this site issues.
    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_secs)
    }

    /// `host:port` of each link host.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints_on(self.link_port)
    }

    /// `host:port` of each link host on the QUIC port (empty when QUIC is off).
    pub fn quic_endpoints(&self) -> Vec<String> {
        self.quic_endpoints_on(self.quic_port)
    }

    /// The endpoints tokens name when the daemon listens for links on `listening`: the
    /// advertised port if one is set, else `listening`.
    pub fn endpoints_on(&self, listening: u16) -> Vec<String> {
        host_ports(&self.link_hosts, self.advertised_port.unwrap_or(listening))
    }

    /// Like [`SiteConfig::endpoints_on`] for QUIC (empty when QUIC is off).
    pub fn quic_endpoints_on(&self, listening: Option<u16>) -> Vec<String> {
        match listening {
            Some(port) => host_ports(&self.link_hosts, self.advertised_quic_port.unwrap_or(port)),
            None => Vec::new(),
        }
    }
}

/// `host:port` for each host, bracketing IPv6 addresses.
pub fn host_ports(hosts: &[String], port: u16) -> Vec<String> {
    hosts
        .iter()
        .map(|h| {
            if h.contains(':') {
                format!("[{h}]:{port}")
            } else {
                format!("{h}:{port}")
            }
        })
        .collect()
}

/// Everything about a site that changes while it runs (file `state.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    /// Grants this site issued (tokens other sites may redeem).
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Links this site dials.
    #[serde(default)]
    pub links: Vec<LinkRecord>,
    /// Sites that redeemed a grant of this site (they link to it).
    #[serde(default)]
    pub peers: Vec<PeerRecord>,
    /// Sites this site refuses.
    #[serde(default)]
    pub revoked: Vec<Uuid>,
    /// This site's listeners.
    #[serde(default)]
    pub listeners: Vec<ListenerRecord>,
    /// This site's connectors.
    #[serde(default)]
    pub connectors: Vec<ConnectorRecord>,
}

/// "Open this port here; its connections go to the routing key."
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerRecord {
    /// Name (default: the routing key).
    pub name: String,
    /// Where connections go.
    pub routing_key: String,
    /// Address to bind (default 127.0.0.1).
    pub bind: String,
    /// Port.
    pub port: u16,
    /// Load-balancing strategy: balanced, closest, round-robin or source-affinity.
    pub strategy: String,
}

/// "This site can reach the routing key at host:port."
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorRecord {
    /// Name (default: the routing key).
    pub name: String,
    /// The routing key served.
    pub routing_key: String,
    /// Backend host.
    pub host: String,
    /// Backend port.
    pub port: u16,
    /// Relative share of connections.
    pub weight: u32,
}

/// An issued token's record on the issuing site.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grant {
    /// Short id, also the token's name.
    pub id: String,
    /// SHA-256 of the redemption code, hex. The code itself is not kept.
    pub code_sha256: String,
    /// Redemptions left.
    pub uses_left: u32,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// The cost a link made from this grant gets.
    pub cost: u32,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("id", &self.id)
            .field("code_sha256", &"***")
            .field("uses_left", &self.uses_left)
            .field("expires", &self.expires)
            .field("cost", &self.cost)
            .finish()
    }
}

/// A link this site dials (its key and certificate live in `links/NAME.{key,pem}`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkRecord {
    /// Local name of the link.
    pub name: String,
    /// The peer's site id.
    pub peer_id: Uuid,
    /// The peer's site name.
    pub peer_name: String,
    /// The peer's link endpoints (`host:port`).
    pub endpoints: Vec<String>,
    /// The peer's CA (PEM).
    pub peer_ca: String,
    /// Routing cost.
    pub cost: u32,
    /// The peer's QUIC endpoints (`host:port`, UDP), if it serves QUIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quic_endpoints: Vec<String>,
    /// Transport choice: `auto`, `quic` or `tls`.
    #[serde(default = "default_transport")]
    pub transport: String,
}

fn default_transport() -> String {
    "auto".into()
}

/// A site that linked to this one by redeeming a grant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerRecord {
    /// The peer's site id.
    pub id: Uuid,
    /// The peer's site name.
    pub name: String,
    /// The grant it redeemed.
    pub grant: String,
    /// When it redeemed it, seconds since the Unix epoch.
    pub linked_at: u64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 text of a Unix time in seconds.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Checks a site, link or resource name: 1-63 characters of `a-z`, `0-9` and `-`, starting and
/// ending with a letter or digit (a Kubernetes label value, so names work everywhere).
pub fn check_name(kind: &str, name: &str) -> Result<(), crate::Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Invalid(format!(
            "{kind} name {name:?} is not valid: use 1-63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        )))
    }
}

/// Checks a routing key: 1-253 characters of letters, digits, `.`, `-` and `_`.
pub fn check_routing_key(key: &str) -> Result<(), crate::Error> {
    if skiff_router::valid_routing_key(key) {
        Ok(())
    } else {
        Err(crate::Error::Invalid(format!(
            "routing key {key:?} is not valid: use 1-253 letters, digits, '.', '-' and '_'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["dev", "prod-1", "a"] {
            check_name("site", good).unwrap();
        }
        for bad in ["", "-a", "a-", "Dev", "a_b", &"x".repeat(64)] {
            assert!(check_name("site", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_bracket_ipv6() {
        let config = SiteConfig {
            name: "a".into(),
            id: Uuid::nil(),
            link_hosts: vec!["example.com".into(), "::1".into()],
            link_port: 1,
            quic_port: None,
            metrics_addr: None,
            cert_lifetime_secs: 1,
            advertised_port: None,
            advertised_quic_port: Some(7),
        };
        assert_eq!(config.endpoints(), ["example.com:1", "[::1]:1"]);
        assert_eq!(
            config.quic_endpoints_on(Some(2)),
            ["example.com:7", "[::1]:7"]
        );
        assert!(config.quic_endpoints_on(None).is_empty());
    }

    #[test]
    fn grant_debug_hides_the_code_hash() {
        let grant = Grant {
            id: "g".into(),
            code_sha256: "secret".into(),
            uses_left: 1,
            expires: 0,
            cost: 1,
        };
        assert!(!format!("{grant:?}").contains("secret"));
    }
}
