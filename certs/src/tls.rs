//! rustls configs for link connections and the verifiers that add skiff's checks to WebPKI.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::{
    certs_from_pem, identity_of, parse_cert, provider, site_id_of, CertifiedKey, Error, Result,
    Revocations, Uuid,
};

/// rustls server config for the link port.
///
/// TLS 1.3 only, [`provider()`], presenting `server`. Client certificates are optional at the
/// TLS level (token redemption clients have none; the caller must then restrict what they may
/// do), but a presented one must chain to `ca_pem`, carry EKU clientAuth and name a site that
/// is not in `revocations`. Revocation is checked on every handshake and session resumption is
/// off, so a revocation applies to the next handshake; a revoked certificate fails with
/// [`CertificateError::Revoked`]. ALPN protocols = `alpn`.
pub fn server_config(
    ca_pem: &str,
    server: &CertifiedKey,
    revocations: Revocations,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let verifier = Arc::new(SiteClientVerifier { inner, revocations });
    let (chain, key) = server.to_rustls()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // A resumed handshake would skip client certificate verification, and with it the
    // revocation check; links are long-lived, so a full handshake each time costs nothing.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// rustls client config for dialing a peer.
///
/// TLS 1.3 only, [`provider()`]. The server certificate must pass WebPKI verification against
/// `peer_ca_pem` (chain, server name, EKU serverAuth) and, if `expected_peer` is `Some`, carry
/// that site id; otherwise the handshake fails with a [`rustls::Error::General`] saying
/// "server certificate belongs to site X, expected Y". `client` is the certificate to present
/// (`None` for token redemption). ALPN protocols = `alpn`.
pub fn client_config(
    peer_ca_pem: &str,
    client: Option<&CertifiedKey>,
    expected_peer: Option<Uuid>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(peer_ca_pem)?, provider())
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let verifier = Arc::new(SiteServerVerifier {
        inner,
        expected: expected_peer,
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some(ck) => {
            let (chain, key) = ck.to_rustls()?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    // Resumption would skip the expected-peer check; see `server_config`.
    config.resumption = Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Site id of the peer of an established TLS connection, from its end-entity certificate
/// (`None` if it presented no certificate or one without a site id).
pub fn peer_site_id(certs: Option<&[CertificateDer<'_>]>) -> Option<Uuid> {
    identity_of(certs?.first()?).ok()
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| Error::Verifier(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// The site id of a WebPKI-verified end-entity certificate, after checking it carries `eku`
/// explicitly (WebPKI also accepts certificates with no EKU extension at all).
fn verified_site_id(
    end_entity: &CertificateDer<'_>,
    client: bool,
) -> std::result::Result<Uuid, rustls::Error> {
    let cert = parse_cert(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let has_eku = match cert.extended_key_usage() {
        Ok(Some(eku)) if client => eku.value.client_auth,
        Ok(Some(eku)) => eku.value.server_auth,
        _ => false,
    };
    if !has_eku {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose,
        ));
    }
    site_id_of(&cert).map_err(|e| rustls::Error::General(e.to_string()))
}

/// WebPKI client verification plus the EKU, site id and revocation checks.
#[derive(Debug)]
struct SiteClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for SiteClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let site = verified_site_id(end_entity, true)?;
        if self.revocations.is_revoked(site) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// WebPKI server verification plus the EKU and expected site id checks.
#[derive(Debug)]
struct SiteServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Option<Uuid>,
}

impl ServerCertVerifier for SiteServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let site = verified_site_id(end_entity, false)?;
        match self.expected {
            Some(expected) if expected != site => Err(rustls::Error::General(format!(
                "server certificate belongs to site {site}, expected {expected}"
            ))),
            _ => Ok(verified),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::testutil::{client_cert, shared_ca, DAY};
    use crate::Authority;

    const ALPN: &[&[u8]] = &[b"skiff/1"];
    const SITE_B: Uuid = Uuid::from_u128(0xb);

    /// What each end saw after bytes stopped flowing.
    struct Outcome {
        client: std::result::Result<ClientConnection, rustls::Error>,
        server: std::result::Result<ServerConnection, rustls::Error>,
    }

    /// Runs a handshake in memory, moving bytes between the two ends until neither has anything
    /// to send. Each side's first error is kept (later ones are just the echo of an alert).
    fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>, name: &str) -> Outcome {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut c = ClientConnection::new(client, name).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        let (mut c_err, mut s_err) = (None, None);
        loop {
            let mut moved = false;
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() && s_err.is_none() {
                moved = true;
                s.read_tls(&mut buf.as_slice()).unwrap();
                s_err = s.process_new_packets().err();
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() && c_err.is_none() {
                moved = true;
                c.read_tls(&mut buf.as_slice()).unwrap();
                c_err = c.process_new_packets().err();
            }
            if !moved {
                break;
            }
        }
        Outcome {
            client: c_err.map_or(Ok(c), Err),
            server: s_err.map_or(Ok(s), Err),
        }
    }

    const HOST: &str = "link.alpha.example";

    fn link_server(ca: &Authority, revocations: Revocations) -> Arc<ServerConfig> {
        let server = ca
            .issue_server(&[HOST.into(), "192.0.2.7".into()], DAY)
            .unwrap();
        server_config(ca.cert_pem(), &server, revocations, ALPN).unwrap()
    }

    /// A handshake with the shared CA's link server, dialing `host`.
    fn dial(client: Option<&CertifiedKey>, expect: Option<Uuid>, host: &str) -> Outcome {
        let ca = shared_ca();
        let client = client_config(ca.cert_pem(), client, expect, ALPN).unwrap();
        handshake(client, link_server(ca, Revocations::default()), host)
    }

    /// The certificate error a handshake end failed with.
    fn cert_error<T>(end: std::result::Result<T, rustls::Error>) -> CertificateError {
        match end {
            Err(rustls::Error::InvalidCertificate(e)) => e,
            Err(e) => panic!("expected a certificate error, got {e}"),
            Ok(_) => panic!("expected a certificate error, the handshake succeeded"),
        }
    }

    #[test]
    fn client_from_ca_is_accepted_and_identified() {
        let ca = shared_ca();
        let cert = client_cert(ca, SITE_B);
        for host in [HOST, "192.0.2.7"] {
            let out = dial(Some(&cert), Some(ca.site_id()), host);
            let (c, s) = (out.client.unwrap(), out.server.unwrap());
            assert!(!c.is_handshaking() && !s.is_handshaking());
            assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            assert_eq!(
                c.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            assert_eq!(s.alpn_protocol(), Some(&b"skiff/1"[..]));
            assert_eq!(peer_site_id(s.peer_certificates()), Some(SITE_B));
            assert_eq!(peer_site_id(c.peer_certificates()), Some(ca.site_id()));
        }
    }

    #[test]
    fn server_name_must_match() {
        let err = cert_error(dial(None, None, "other.example").client);
        assert!(matches!(
            err,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        ));
    }

    #[test]
    fn revocation_applies_to_the_next_handshake() {
        let ca = shared_ca();
        let revocations = Revocations::default();
        let server = link_server(ca, revocations.clone());
        // A client that tries to resume must still go through the revocation check.
        let cert = client_cert(ca, SITE_B);
        let mut client = (*client_config(ca.cert_pem(), Some(&cert), None, ALPN).unwrap()).clone();
        client.resumption = Resumption::default();
        let client = Arc::new(client);
        assert!(handshake(client.clone(), server.clone(), HOST)
            .server
            .is_ok());
        revocations.revoke(SITE_B);
        let err = cert_error(handshake(client, server, HOST).server);
        assert_eq!(err, CertificateError::Revoked);
    }

    #[test]
    fn client_cert_from_another_ca_is_refused() {
        let other = Authority::generate(Uuid::from_u128(0xc), "gamma").unwrap();
        let out = dial(Some(&client_cert(&other, SITE_B)), None, HOST);
        assert_eq!(cert_error(out.server), CertificateError::UnknownIssuer);
    }

    #[test]
    fn client_without_cert_is_accepted_anonymously() {
        let out = dial(None, None, HOST);
        let s = out.server.unwrap();
        assert!(out.client.is_ok() && !s.is_handshaking());
        assert_eq!(peer_site_id(s.peer_certificates()), None);
    }

    #[test]
    fn unexpected_peer_fails_with_readable_message() {
        let expected = Uuid::from_u128(0xd);
        let Err(rustls::Error::General(msg)) = dial(None, Some(expected), HOST).client else {
            panic!("expected a General error");
        };
        let actual = shared_ca().site_id();
        assert_eq!(
            msg,
            format!("server certificate belongs to site {actual}, expected {expected}")
        );
    }

    #[test]
    fn certs_are_bound_to_their_role() {
        let ca = shared_ca();
        let wrong_purpose = |e| {
            matches!(
                e,
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        };
        // A client certificate cannot serve the link port...
        let stolen = client_cert(ca, SITE_B);
        let server = server_config(ca.cert_pem(), &stolen, Revocations::default(), ALPN).unwrap();
        let client = client_config(ca.cert_pem(), None, None, ALPN).unwrap();
        assert!(wrong_purpose(cert_error(
            handshake(client, server, HOST).client
        )));
        // ...and the server certificate cannot act as a client.
        let server_cert = ca.issue_server(&[HOST.into()], DAY).unwrap();
        assert!(wrong_purpose(cert_error(
            dial(Some(&server_cert), None, HOST).server
        )));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ca = shared_ca();
        let server = ca.issue_server(&[HOST.into()], DAY).unwrap();
        let config = server_config("nope", &server, Revocations::default(), ALPN);
        assert!(matches!(config, Err(Error::Pem { .. })));
        let broken = CertifiedKey {
            key_pem: "nope".into(),
            ..server
        };
        let config = client_config(ca.cert_pem(), Some(&broken), None, ALPN);
        assert!(matches!(config, Err(Error::InvalidKey(_))));
        let junk = [CertificateDer::from(vec![1, 2, 3])];
        assert_eq!(peer_site_id(Some(&junk)), None);
        assert_eq!(peer_site_id(Some(&[])), None);
    }
}
