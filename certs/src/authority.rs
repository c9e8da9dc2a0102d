//! The site CA: generating it, loading it, and issuing server and client certificates.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;

use crate::{
    first_cert_from_pem, parse_cert, provider, site_id_of, site_uri, CertifiedKey, Error, Result,
    Uuid,
};

/// The longest lifetime accepted for an issued certificate (100 years).
pub const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Validity of a site CA.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Issued certificates start this far in the past, to tolerate clock skew between sites.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A site's certificate authority: ECDSA P-256, self-signed, valid 10 years,
/// CN `skiff site CA <name>`, carrying the site id URI SAN. Debug prints the key as `***`.
pub struct Authority {
    site_id: Uuid,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// Generates a fresh CA for a site.
    pub fn generate(site_id: Uuid, site_name: &str) -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = base_params(&format!("skiff site CA {site_name}"), site_id, CA_LIFETIME)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            site_id,
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`Authority::cert_pem`] and [`Authority::key_pem`]. Checks that the
    /// certificate is a CA carrying a site id and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let der = first_cert_from_pem(cert_pem)?;
        let cert = parse_cert(&der)?;
        let site_id = site_id_of(&cert)?;
        if !cert.is_ca() {
            return Err(Error::InvalidAuthority(
                "the certificate is not a CA".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::InvalidKey(e.to_string()))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(Error::InvalidAuthority(
                "the private key does not belong to the certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| Error::InvalidAuthority(e.to_string()))?;
        Ok(Self {
            site_id,
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate, PEM. This is what peers trust; it is safe to share.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Secret: store it with owner-only permissions.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The id of the site this CA belongs to.
    pub fn site_id(&self) -> Uuid {
        self.site_id
    }

    /// Issues the link server certificate for this site: a fresh P-256 key, SANs = each host as
    /// an IP address or DNS name plus the site URI SAN, EKU serverAuth only, valid from 5 minutes
    /// ago until `lifetime` from now.
    pub fn issue_server(&self, hosts: &[String], lifetime: Duration) -> Result<CertifiedKey> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cn = hosts.first().map_or("skiff link server", String::as_str);
        let mut params = leaf_params(cn, self.site_id, lifetime)?;
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(Ia5String::try_from(host.as_str()).map_err(|e| {
                    Error::InvalidHost {
                        host: host.clone(),
                        reason: e.to_string(),
                    }
                })?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a CSR from a linking site and returns the certificate PEM.
    ///
    /// Only the CSR's public key is used, after its signature verifies; its subject, SANs and
    /// extensions are ignored. The certificate gets CN = `site_name`, the URI SAN of `site_id` as
    /// its only SAN, EKU clientAuth only, no CA rights, a random serial, and is valid from 5
    /// minutes ago until `lifetime` from now. Keys other than ECDSA P-256 and Ed25519 are refused.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        site_id: Uuid,
        site_name: &str,
        lifetime: Duration,
    ) -> Result<String> {
        let key = csr_public_key(csr_pem)?;
        let mut params = leaf_params(site_name, site_id, lifetime)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("site_id", &self.site_id)
            .field("cert_pem", &self.cert_pem)
            .field("key", &"***")
            .finish()
    }
}

/// A fresh P-256 key and a CSR for it (subject CN = `site_name`, URI SAN for `site_id`).
/// Returns `(key_pem, csr_pem)`; the key never leaves the linking site.
pub fn generate_csr(site_id: Uuid, site_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(site_name);
    params.subject_alt_names = vec![site_san(site_id)?];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A public key taken from a verified CSR.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

fn csr_public_key(csr_pem: &str) -> Result<CsrKey> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        Error::Pem {
            what: "certificate request",
            detail: e.to_string(),
        }
    })?;
    let csr = match X509CertificationRequest::from_der(der.as_ref()) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(Error::InvalidCsr("trailing bytes after the request".into())),
        Err(e) => return Err(Error::InvalidCsr(e.to_string())),
    };
    // Proof of possession: whoever sent the CSR holds the private key.
    csr.verify_signature()
        .map_err(|e| Error::InvalidCsr(format!("its signature does not verify ({e})")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm;
    let alg = if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) == Some(OID_EC_P256)
    {
        &rcgen::PKCS_ECDSA_P256_SHA256
    } else if alg.algorithm == OID_SIG_ED25519 && alg.parameters.is_none() {
        &rcgen::PKCS_ED25519
    } else {
        return Err(Error::InvalidCsr(format!(
            "its key type {} is not supported",
            alg.algorithm
        )));
    };
    Ok(CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

/// Parameters shared by the CA and leaf certificates: CN, site URI SAN, validity, random serial.
fn base_params(cn: &str, site_id: Uuid, lifetime: Duration) -> Result<CertificateParams> {
    if lifetime > MAX_LIFETIME {
        return Err(Error::InvalidLifetime(lifetime));
    }
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(cn);
    params.subject_alt_names = vec![site_san(site_id)?];
    params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
    params.not_after = now
        .checked_add(lifetime)
        .ok_or(Error::InvalidLifetime(lifetime))?
        .into();
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Parameters of an end-entity certificate issued by the CA.
fn leaf_params(cn: &str, site_id: Uuid, lifetime: Duration) -> Result<CertificateParams> {
    let mut params = base_params(cn, site_id, lifetime)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn site_san(site_id: Uuid) -> Result<SanType> {
    Ok(SanType::URI(Ia5String::try_from(site_uri(site_id))?))
}

/// 16 random bytes, positive and without a leading zero byte, so every serial has full length.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(rustls::Error::from)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testutil::{cert_der, client_cert, csr_der, pem, shared_ca, summary, DAY};
    use crate::{identity_of, identity_of_pem, not_after_pem};

    const SITE_B: Uuid = Uuid::from_u128(0xb);

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Authority::generate(Uuid::from_u128(7), "gamma").unwrap();
        let loaded = Authority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.site_id(), Uuid::from_u128(7));
        assert_eq!(
            (loaded.cert_pem(), loaded.key_pem()),
            (ca.cert_pem(), ca.key_pem())
        );
        // A certificate issued by the reloaded CA verifies under the original CA certificate.
        let leaf = cert_der(&client_cert(&loaded, SITE_B).cert_pem);
        let ca_der = cert_der(ca.cert_pem());
        let ca_cert = crate::parse_cert(&ca_der).unwrap();
        let leaf = crate::parse_cert(&leaf).unwrap();
        assert!(leaf.verify_signature(Some(ca_cert.public_key())).is_ok());
        let info = summary(ca.cert_pem());
        assert_eq!(info.cn, "skiff site CA gamma");
        assert!(info.is_ca);
        let ten_years = SystemTime::now() + CA_LIFETIME;
        let not_after = not_after_pem(ca.cert_pem()).unwrap();
        assert!(not_after <= ten_years && not_after + DAY > ten_years);
        let dbg = format!("{ca:?}");
        assert!(dbg.contains("***") && !dbg.contains("PRIVATE KEY"), "{dbg}");
    }

    #[test]
    fn from_pem_rejects_foreign_key_and_non_ca() {
        let ca = shared_ca();
        let other = Authority::generate(Uuid::from_u128(9), "other").unwrap();
        let err = Authority::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, Error::InvalidAuthority(_)), "{err}");
        let leaf = client_cert(ca, SITE_B);
        let err = Authority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, Error::InvalidAuthority(_)), "{err}");
        let err = Authority::from_pem(ca.cert_pem(), "no key").unwrap_err();
        assert!(matches!(err, Error::InvalidKey(_)), "{err}");
    }

    #[test]
    fn server_cert_has_hosts_site_and_server_eku() {
        let ca = shared_ca();
        let hosts = ["link.alpha.example".into(), "10.0.0.1".into()];
        let server = ca.issue_server(&hosts, DAY).unwrap();
        assert_eq!(server.site_id().unwrap(), ca.site_id());
        assert!(
            server.not_after().unwrap() > SystemTime::now() + DAY - 60 * Duration::from_secs(1)
        );
        let info = summary(&server.cert_pem);
        assert_eq!(
            info.sans,
            [
                format!("URI({})", site_uri(ca.site_id())),
                "DNSName(link.alpha.example)".into(),
                "IPAddress(0a:00:00:01)".into(),
            ]
        );
        assert!(info.server_auth && !info.client_auth && !info.is_ca);
        assert!((295..=305).contains(&info.backdated), "{}", info.backdated);
        assert!(format!("{server:?}").contains("***"));
    }

    #[test]
    fn issue_rejects_bad_host_and_lifetime() {
        let ca = shared_ca();
        let err = ca.issue_server(&["hôst".into()], DAY).unwrap_err();
        assert!(matches!(err, Error::InvalidHost { .. }), "{err}");
        let err = ca.issue_server(&[], Duration::MAX).unwrap_err();
        assert!(matches!(err, Error::InvalidLifetime(_)), "{err}");
    }

    #[test]
    fn csr_signing_keeps_only_the_public_key() {
        let ca = shared_ca();
        // A CSR asking for much more than it may have: a foreign site id, a DNS name, CA rights
        // and serverAuth.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(site_san(ca.site_id()).unwrap());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let cert_pem = ca.sign_client_csr(&csr, SITE_B, "beta", DAY).unwrap();
        assert_eq!(identity_of_pem(&cert_pem).unwrap(), SITE_B);
        let info = summary(&cert_pem);
        assert_eq!(info.sans, [format!("URI({})", site_uri(SITE_B))]);
        assert_eq!(info.cn, "beta");
        assert!(info.client_auth && !info.server_auth && !info.is_ca);
        assert!((295..=305).contains(&info.backdated), "{}", info.backdated);
        assert_eq!(info.public_key, key.public_key_raw());
    }

    #[test]
    fn csr_key_types() {
        let ca = shared_ca();
        let csr_for = |alg| {
            let key = KeyPair::generate_for(alg).unwrap();
            CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap()
        };
        let ed = ca
            .sign_client_csr(&csr_for(&rcgen::PKCS_ED25519), SITE_B, "b", DAY)
            .unwrap();
        assert_eq!(identity_of_pem(&ed).unwrap(), SITE_B);
        let err = ca
            .sign_client_csr(&csr_for(&rcgen::PKCS_ECDSA_P384_SHA384), SITE_B, "b", DAY)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidCsr(_)), "{err}");
    }

    #[test]
    fn tampered_or_garbage_csr_is_rejected() {
        let ca = shared_ca();
        let (_, csr) = generate_csr(SITE_B, "beta").unwrap();
        let mut der = csr_der(&csr);
        // Flip a bit in the subject: the structure still parses, the signature no longer does.
        let at = der.windows(4).position(|w| w == b"beta").unwrap();
        der[at] ^= 1;
        let err = ca.sign_client_csr(&pem("CERTIFICATE REQUEST", &der), SITE_B, "b", DAY);
        assert!(
            matches!(err, Err(Error::InvalidCsr(ref m)) if m.contains("signature")),
            "{err:?}"
        );
        let err = ca.sign_client_csr("garbage", SITE_B, "b", DAY).unwrap_err();
        assert!(matches!(err, Error::Pem { .. }), "{err}");
        let err = ca.sign_client_csr(&pem("CERTIFICATE REQUEST", b"\x30\x00"), SITE_B, "b", DAY);
        assert!(matches!(err, Err(Error::InvalidCsr(_))), "{err:?}");
    }

    #[test]
    fn serials_are_random() {
        let ca = shared_ca();
        let serial = || summary(&client_cert(ca, SITE_B).cert_pem).serial;
        let (a, b) = (serial(), serial());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn authority_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Authority>();
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_text(s in ".{0,300}", der in proptest::collection::vec(any::<u8>(), 0..300)) {
            let ca = shared_ca();
            let _ = identity_of(s.as_bytes());
            let _ = identity_of(&der);
            let _ = identity_of_pem(&s);
            let _ = not_after_pem(&s);
            let _ = ca.sign_client_csr(&s, SITE_B, &s, DAY);
            let _ = Authority::from_pem(&s, &s);
            let wrapped = pem("CERTIFICATE", &der);
            let _ = identity_of_pem(&wrapped);
            let _ = Authority::from_pem(&wrapped, &pem("PRIVATE KEY", &der));
            let _ = ca.sign_client_csr(&pem("CERTIFICATE REQUEST", &der), SITE_B, "b", DAY);
        }

        #[test]
        fn mutated_cert_and_csr_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let ca = shared_ca();
            let mut cert = cert_der(ca.cert_pem());
            let i = at.index(cert.len());
            cert[i] = byte;
            let _ = identity_of(&cert);
            let _ = Authority::from_pem(&pem("CERTIFICATE", &cert), &ca.key_pem());
            let (_, csr) = generate_csr(SITE_B, "beta").unwrap();
            let mut csr = csr_der(&csr);
            // Mutate the signed part. (The BER-tolerant parser accepts some changes to the tags
            // of the unsigned outer framing; those cannot alter what gets signed.)
            let info = X509CertificationRequest::from_der(&csr).unwrap().1.certification_request_info.raw.to_vec();
            let start = csr.windows(info.len()).position(|w| w == info).unwrap();
            let i = start + at.index(info.len());
            let changed = csr[i] != byte;
            csr[i] = byte;
            let signed = ca.sign_client_csr(&pem("CERTIFICATE REQUEST", &csr), SITE_B, "b", DAY);
            prop_assert!(!changed || signed.is_err());
        }
    }
}
