//! skiff's certificates: each site's CA, the certificates it issues, and the rustls configs that
//! enforce the trust model on link connections.
//!
//! Trust model:
//! - Every site has its own certificate authority ([`Authority`], ECDSA P-256). An accepting site is
//!   the only root of trust for its incoming links: its link server certificate and every client
//!   certificate it hands out chain to its CA, and nothing else is trusted on that port.
//! - A site's identity is its UUID, carried as a URI SAN `urn:skiff:site:<uuid>` ([`site_uri`]).
//!   Names and hosts are informational; [`identity_of`] is what authorises.
//! - A linking site keeps its private key: it sends a CSR ([`generate_csr`]) and the issuer signs
//!   only the CSR's public key ([`Authority::sign_client_csr`]); everything else in it is ignored.
//! - Revocation is by site id ([`Revocations`]) and is checked on every handshake; TLS session
//!   resumption is disabled so that no handshake skips that check.
#![forbid(unsafe_code)]

mod authority;
#[cfg(test)]
mod testutil;
mod tls;

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use uuid::Uuid;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

pub use authority::{generate_csr, Authority, MAX_LIFETIME};
pub use tls::{client_config, peer_site_id, server_config};

/// What can go wrong, grouped by who has to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- the caller's input or the local configuration ---
    /// PEM text held no item of the expected kind (certificate, private key or CSR).
    #[error("no {what} found in PEM input ({detail}); pass the text of a PEM file starting with -----BEGIN")]
    Pem {
        /// The kind of item that was looked for.
        what: &'static str,
        /// Why nothing usable was found.
        detail: String,
    },
    /// A certificate is not well-formed X.509.
    #[error(
        "certificate is not valid X.509 ({0}); check that the file holds a complete certificate"
    )]
    BadCertificate(String),
    /// A certificate does not name exactly one skiff site in its URI SANs.
    #[error("not a skiff site certificate: {0}; use a certificate issued by a skiff site CA")]
    NotSiteCert(String),
    /// A private key cannot be loaded or used.
    #[error("invalid private key ({0}); expected the PKCS#8 PEM key written by skiff")]
    InvalidKey(String),
    /// A CA certificate and key do not form a usable site authority.
    #[error(
        "invalid site CA: {0}; restore the CA certificate and key files written together by skiff"
    )]
    InvalidAuthority(String),
    /// A host given for a server certificate is neither an IP address nor a DNS name.
    #[error("invalid host {host:?} for the link server certificate ({reason}); use a DNS name or an IP address")]
    InvalidHost {
        /// The offending host text.
        host: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A requested certificate lifetime exceeds [`MAX_LIFETIME`].
    #[error("certificate lifetime of {0:?} is too long; use at most {MAX_LIFETIME:?}")]
    InvalidLifetime(Duration),
    // --- the peer ---
    /// A CSR from a linking site is malformed, badly signed or uses an unsupported key type.
    #[error("invalid certificate signing request: {0}; the linking site must send a fresh CSR from skiff (ECDSA P-256 or Ed25519)")]
    InvalidCsr(String),
    // --- the libraries (or a bug in how this crate drives them) ---
    /// rcgen failed to generate a key or certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(String),
    /// rustls rejected a certificate, key or protocol setting, or had no randomness.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A rustls certificate verifier could not be built from the CA.
    #[error("cannot trust the CA certificate ({0}); check that it is the site CA certificate")]
    Verifier(String),
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Rcgen(e.to_string())
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The crypto provider used everywhere (ring). Every rustls config in this crate is built with it.
///
/// TLS 1.3 suites only, AES-128-GCM first: both ends of a link are skiff, so this is what links
/// use. It is as strong as a link needs and its ten AES rounds cost less per byte than
/// AES-256's fourteen, which shows on bulk transfers.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::cipher_suite;
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// A certificate (PEM) with its private key (PEM). Debug prints the key as `***`.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, optionally followed by its chain, in PEM.
    pub cert_pem: String,
    /// The certificate's private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl CertifiedKey {
    /// The site id carried by this certificate (see [`identity_of_pem`]).
    pub fn site_id(&self) -> Result<Uuid> {
        identity_of_pem(&self.cert_pem)
    }

    /// notAfter of the certificate.
    pub fn not_after(&self) -> Result<SystemTime> {
        not_after_pem(&self.cert_pem)
    }

    /// The certificate chain and key in rustls form.
    pub(crate) fn to_rustls(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let chain = certs_from_pem(&self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::InvalidKey(e.to_string()))?;
        Ok((chain, key))
    }
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"***")
            .finish()
    }
}

/// Prefix of the URI SAN that names a site.
pub const SITE_URI_PREFIX: &str = "urn:skiff:site:";

/// The URI SAN that names a site: `urn:skiff:site:<uuid hyphenated lowercase>`.
pub fn site_uri(site_id: Uuid) -> String {
    format!("{SITE_URI_PREFIX}{}", site_id.hyphenated())
}

/// Reads the site id from a DER certificate's URI SAN (exactly one such SAN expected; else Error).
pub fn identity_of(cert_der: &[u8]) -> Result<Uuid> {
    site_id_of(&parse_cert(cert_der)?)
}

/// Reads the site id from the first certificate of a PEM text (see [`identity_of`]).
pub fn identity_of_pem(cert_pem: &str) -> Result<Uuid> {
    identity_of(&first_cert_from_pem(cert_pem)?)
}

/// notAfter of the first certificate of a PEM text.
pub fn not_after_pem(cert_pem: &str) -> Result<SystemTime> {
    let der = first_cert_from_pem(cert_pem)?;
    let secs = parse_cert(&der)?.validity().not_after.timestamp();
    let offset = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(offset)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(offset)
    };
    t.ok_or_else(|| Error::BadCertificate(format!("notAfter {secs} is out of range")))
}

/// True if the certificate (PEM) is for the public key of the private key (PEM): a renewed
/// certificate must match the key it is stored with, or the next handshake would fail.
pub fn cert_matches_key(cert_pem: &str, key_pem: &str) -> Result<bool> {
    let der = first_cert_from_pem(cert_pem)?;
    let cert = parse_cert(&der)?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| Error::InvalidKey(e.to_string()))?;
    use rcgen::PublicKeyData;
    Ok(cert.public_key().raw == key.subject_public_key_info().as_slice())
}

/// The set of site ids a site refuses. Cheap to clone; clones share the set.
#[derive(Clone, Default, Debug)]
pub struct Revocations {
    ids: Arc<RwLock<HashSet<Uuid>>>,
}

impl Revocations {
    /// A set holding `ids`.
    pub fn new(ids: impl IntoIterator<Item = Uuid>) -> Self {
        Self {
            ids: Arc::new(RwLock::new(ids.into_iter().collect())),
        }
    }

    /// Refuses `id` from the next handshake on. Returns true if it was not revoked before.
    pub fn revoke(&self, id: Uuid) -> bool {
        // A panic while holding the lock cannot leave a HashSet half-updated in a way that
        // matters here, so a poisoned lock is used as is rather than propagated.
        self.ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id)
    }

    /// Whether `id` is refused.
    pub fn is_revoked(&self, id: Uuid) -> bool {
        self.ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&id)
    }

    /// The revoked ids, sorted.
    pub fn list(&self) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self
            .ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }
}

pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Error::BadCertificate(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(Error::BadCertificate(e.to_string())),
    }
}

/// The one skiff site id among a certificate's URI SANs.
pub(crate) fn site_id_of(cert: &X509Certificate<'_>) -> Result<Uuid> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::BadCertificate(format!("subjectAltName: {e}")))?
        .ok_or_else(|| Error::NotSiteCert("it has no subjectAltName".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(SITE_URI_PREFIX),
        _ => None,
    });
    let (Some(text), None) = (uris.next(), uris.next()) else {
        return Err(Error::NotSiteCert(format!(
            "it must carry exactly one {SITE_URI_PREFIX}<uuid> URI SAN"
        )));
    };
    // Only the canonical form is accepted, so one site has exactly one spelling.
    match Uuid::try_parse(text) {
        Ok(id) if site_uri(id) == format!("{SITE_URI_PREFIX}{text}") => Ok(id),
        _ => Err(Error::NotSiteCert(format!(
            "{text:?} is not a lowercase hyphenated UUID"
        ))),
    }
}

pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what: "certificate",
            detail: "no CERTIFICATE section".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn first_cert_from_pem(pem: &str) -> Result<CertificateDer<'static>> {
    // Exactly the first certificate, so a later corrupt section cannot fail the lookup.
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Pem {
        what: "certificate",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod key_match_tests {
    use super::*;

    #[test]
    fn a_certificate_matches_only_its_own_key() {
        let ca = Authority::generate(Uuid::new_v4(), "ca").unwrap();
        let site = Uuid::new_v4();
        let (key, csr) = generate_csr(site, "s").unwrap();
        let (other_key, _) = generate_csr(site, "s").unwrap();
        let cert = ca
            .sign_client_csr(&csr, site, "s", Duration::from_secs(60))
            .unwrap();
        assert!(cert_matches_key(&cert, &key).unwrap());
        assert!(!cert_matches_key(&cert, &other_key).unwrap());
        assert!(cert_matches_key("garbage", &key).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_uri_format() {
        let id = Uuid::parse_str("67E55044-10B1-426F-9247-BB680E5FE0C8").unwrap();
        assert_eq!(
            site_uri(id),
            "urn:skiff:site:67e55044-10b1-426f-9247-bb680e5fe0c8"
        );
    }

    #[test]
    fn revocations_are_shared_and_sorted() {
        let (a, b) = (Uuid::from_u128(2), Uuid::from_u128(1));
        let revs = Revocations::new([a]);
        let clone = revs.clone();
        assert!(clone.revoke(b));
        assert!(!clone.revoke(b));
        assert!(revs.is_revoked(a) && revs.is_revoked(b));
        assert!(!revs.is_revoked(Uuid::from_u128(3)));
        assert_eq!(revs.list(), vec![b, a]);
    }

    #[test]
    fn certified_key_debug_hides_key() {
        let ck = CertifiedKey {
            cert_pem: "CERT".into(),
            key_pem: "SECRET".into(),
        };
        let dbg = format!("{ck:?}");
        assert!(dbg.contains("***") && !dbg.contains("SECRET"), "{dbg}");
    }

    #[test]
    fn pem_without_certificate_is_an_error() {
        assert!(matches!(identity_of_pem(""), Err(Error::Pem { .. })));
        assert!(matches!(not_after_pem("hello"), Err(Error::Pem { .. })));
        assert!(matches!(
            identity_of(b"\x30\x03\x02\x01\x00"),
            Err(Error::BadCertificate(_))
        ));
    }
}
