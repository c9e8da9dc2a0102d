//! The access token: the file one site hands another so that it can link.
//!
//! ```yaml
//! apiVersion: skiff.dev/v1alpha1
//! kind: AccessToken
//! metadata:
//!   name: stg-3f2a9c1d
//! spec:
//!   endpoints: ["stg.example.com:55671"]
//!   code: 9c0e...            # one-time redemption code, 160 random bits
//!   ca: |                     # the issuer's CA: the linking site verifies the issuer with it
//!     -----BEGIN CERTIFICATE-----
//!   cost: 1
//!   expires: 2026-11-24T10:15:00Z
//!   issuer: { name: stg, id: 6f1c... }
//! ```
//!
//! No private key travels: the linking site generates its own key and sends only a CSR when it
//! redeems the code (see docs/tokens.md).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `apiVersion` of every skiff resource.
pub const API_VERSION: &str = "skiff.dev/v1alpha1";
/// `kind` of a token.
pub const KIND: &str = "AccessToken";
/// Largest token file accepted.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Shortest redemption code accepted (hex digits: 128 bits).
const MIN_CODE_HEX: usize = 32;

/// A parsed access token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessToken {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// Always [`KIND`].
    pub kind: String,
    /// The token's name (the grant id on the issuer).
    pub metadata: Metadata,
    /// What the linking site needs.
    pub spec: TokenSpec,
}

/// Object metadata (as in Kubernetes, so the same file can be applied to a cluster).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// Name of the object.
    pub name: String,
}

/// The token's content.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSpec {
    /// Redemption and TLS link endpoints (`host:port` of the issuer's TCP link port), tried in
    /// order.
    pub endpoints: Vec<String>,
    /// QUIC link endpoints (`host:port`, UDP); empty if the issuer does not serve QUIC.
    /// Redemption always uses the TCP endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quic_endpoints: Vec<String>,
    /// The one-time redemption code.
    pub code: Secret,
    /// The issuer's CA certificate (PEM).
    pub ca: String,
    /// Routing cost of the link.
    pub cost: u32,
    /// When the grant expires (RFC 3339).
    pub expires: String,
    /// The issuing site.
    pub issuer: Issuer,
}

/// The site that issued a token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Issuer {
    /// Site name.
    pub name: String,
    /// Site id.
    pub id: Uuid,
}

/// A secret string: serialised as is, printed as `***`.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Why a token was refused. All of these are the caller's (the token holder's) to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The file is larger than any token.
    #[error("the token file is {0} bytes, larger than any skiff token; is it the right file?")]
    TooLarge(usize),
    /// The file is not a YAML token.
    #[error("the token is malformed: {0}; use the file `skiff token issue` wrote, unedited")]
    Malformed(String),
    /// The file is YAML but not a skiff access token.
    #[error("this is not a skiff access token (apiVersion {0:?}, kind {1:?})")]
    WrongKind(String, String),
    /// A field has an impossible value.
    #[error("the token is invalid: {0}; ask the issuing site for a new one")]
    Invalid(String),
    /// The token's expiry has passed.
    #[error("the token expired at {0}; ask the issuing site for a new one (`skiff token issue`)")]
    Expired(String),
}

impl AccessToken {
    /// Parses and checks a token file (expiry included).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        Self::parse_at(text, SystemTime::now())
    }

    /// Like [`AccessToken::parse`], with the time passed in.
    pub fn parse_at(text: &str, now: SystemTime) -> Result<Self, TokenError> {
        if text.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(text.len()));
        }
        let token: AccessToken = serde_yaml_ng::from_str(text).map_err(|e| {
            // A token with the wrong kind usually fails on its unknown fields first; say what
            // it is when we can tell.
            if let Ok(generic) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
                let field = |k: &str| generic.get(k).and_then(|v| v.as_str()).unwrap_or("");
                if field("kind") != KIND || field("apiVersion") != API_VERSION {
                    return TokenError::WrongKind(field("apiVersion").into(), field("kind").into());
                }
            }
            TokenError::Malformed(e.to_string())
        })?;
        if token.api_version != API_VERSION || token.kind != KIND {
            return Err(TokenError::WrongKind(token.api_version, token.kind));
        }
        token.check(now)?;
        Ok(token)
    }

    fn check(&self, now: SystemTime) -> Result<(), TokenError> {
        let spec = &self.spec;
        if spec.endpoints.is_empty() {
            return Err(TokenError::Invalid("it lists no endpoints".into()));
        }
        let code = &spec.code.0;
        if code.len() < MIN_CODE_HEX || !code.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Invalid("its code is not a skiff code".into()));
        }
        skiff_certs::identity_of_pem(&spec.ca)
            .map_err(|e| TokenError::Invalid(format!("its CA certificate is unusable ({e})")))?;
        if self.expires_at()? <= now {
            return Err(TokenError::Expired(spec.expires.clone()));
        }
        Ok(())
    }

    /// The token's expiry.
    pub fn expires_at(&self) -> Result<SystemTime, TokenError> {
        humantime::parse_rfc3339_weak(&self.spec.expires)
            .map_err(|e| TokenError::Invalid(format!("its expiry {:?}: {e}", self.spec.expires)))
    }

    /// The token as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn sample() -> AccessToken {
        let ca = skiff_certs::Authority::generate(Uuid::new_v4(), "stg").unwrap();
        AccessToken {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name: "stg-1".into(),
            },
            spec: TokenSpec {
                endpoints: vec!["127.0.0.1:55671".into()],
                quic_endpoints: vec!["127.0.0.1:55671".into()],
                code: Secret("ab".repeat(20)),
                ca: ca.cert_pem().to_string(),
                cost: 3,
                expires: crate::model::rfc3339(crate::model::unix_now() + 900),
                issuer: Issuer {
                    name: "stg".into(),
                    id: ca.site_id(),
                },
            },
        }
    }

    #[test]
    fn round_trip_and_no_private_key() {
        let token = sample();
        let yaml = token.to_yaml();
        assert!(!yaml.contains("PRIVATE KEY"));
        assert_eq!(AccessToken::parse(&yaml).unwrap(), token);
        assert!(!format!("{token:?}").contains(&"ab".repeat(20)));
    }

    #[test]
    fn expired_tokens_are_refused_with_a_hint() {
        let token = sample();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let err = AccessToken::parse_at(&token.to_yaml(), later).unwrap_err();
        assert!(matches!(err, TokenError::Expired(_)));
        assert!(err.to_string().contains("token issue"));
    }

    #[test]
    fn wrong_kind_malformed_and_tampered_tokens_are_refused() {
        let yaml = sample().to_yaml();
        let wrong = yaml.replace("kind: AccessToken", "kind: Listener");
        assert!(matches!(
            AccessToken::parse(&wrong),
            Err(TokenError::WrongKind(..))
        ));
        assert!(matches!(
            AccessToken::parse("{"),
            Err(TokenError::Malformed(_))
        ));
        let short = yaml.replace(&"ab".repeat(20), "abcd");
        assert!(matches!(
            AccessToken::parse(&short),
            Err(TokenError::Invalid(_))
        ));
        let bad_ca = yaml.replace("BEGIN CERTIFICATE", "BEGIN NOTHING");
        assert!(matches!(
            AccessToken::parse(&bad_ca),
            Err(TokenError::Invalid(_))
        ));
        let extra = format!("{yaml}privateKey: x\n");
        assert!(AccessToken::parse(&extra).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = AccessToken::parse(&text);
        }

        #[test]
        fn mutated_tokens_never_panic(cut in 0usize..2000, byte in any::<u8>()) {
            let mut raw = sample().to_yaml().into_bytes();
            if !raw.is_empty() {
                let i = cut % raw.len();
                raw[i] = byte;
            }
            let _ = AccessToken::parse(&String::from_utf8_lossy(&raw));
        }
    }
}
