//! Helpers shared by the unit tests.

use std::sync::OnceLock;
use std::time::Duration;

use crate::{generate_csr, Authority, CertifiedKey, Uuid};

pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// One CA per test binary: key generation is cheap, but proptest runs many cases.
pub fn shared_ca() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| Authority::generate(Uuid::from_u128(0xa), "alpha").unwrap())
}

/// A client certificate for `site` signed by `ca`, the way a linking site gets one.
pub fn client_cert(ca: &Authority, site: Uuid) -> CertifiedKey {
    let (key_pem, csr) = generate_csr(site, "beta").unwrap();
    let cert_pem = ca.sign_client_csr(&csr, site, "beta", DAY).unwrap();
    CertifiedKey { cert_pem, key_pem }
}

/// PEM armour around arbitrary bytes, to reach the DER parsers with fuzzed input.
pub fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut body = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            body.push(if i <= chunk.len() {
                B64[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// The DER of the first certificate in a PEM text.
pub fn cert_der(pem_text: &str) -> Vec<u8> {
    crate::first_cert_from_pem(pem_text).unwrap().to_vec()
}

/// The DER of a CSR in PEM.
pub fn csr_der(pem_text: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem_text.as_bytes());
    der.unwrap().as_ref().to_vec()
}

/// What the tests check in an issued certificate.
#[derive(Debug)]
pub struct Summary {
    pub cn: String,
    /// Display form, e.g. `DNSName(a.example)`, `URI(urn:...)`.
    pub sans: Vec<String>,
    pub server_auth: bool,
    pub client_auth: bool,
    pub is_ca: bool,
    /// Seconds between notBefore and now.
    pub backdated: i64,
    pub serial: Vec<u8>,
    pub public_key: Vec<u8>,
}

pub fn summary(cert_pem: &str) -> Summary {
    let der = cert_der(cert_pem);
    let cert = crate::parse_cert(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().map(|e| e.value);
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let summary = Summary {
        cn: cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .into(),
        sans: sans
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect(),
        server_auth: eku.is_some_and(|e| e.server_auth),
        client_auth: eku.is_some_and(|e| e.client_auth),
        is_ca: cert.is_ca(),
        backdated: now.unwrap().as_secs() as i64 - cert.validity().not_before.timestamp(),
        serial: cert.raw_serial().to_vec(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    };
    summary
}
