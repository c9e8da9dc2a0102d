//! Token redemption on the link port (ALPN `skiff-claim/1`).
//!
//! The linking site connects with TLS, verifying the issuer's server certificate against the CA
//! in the token (and the issuer's site id), and sends one [`ClaimRequest`]: the code, its own site
//! id and name, and a CSR for a key it generated itself. The issuer answers with one
//! [`ClaimResponse`] and closes. Both are JSON behind a 4-byte big-endian length; anything larger
//! than [`MAX_CLAIM_BYTES`] is refused unread.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::token::{AccessToken, Secret};

/// ALPN protocol id of token redemption on the link port.
pub const ALPN_CLAIM: &[u8] = b"skiff-claim/1";
/// Largest claim request or response.
pub const MAX_CLAIM_BYTES: usize = 64 * 1024;

/// What the linking site sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRequest {
    /// The grant's id (the token's name).
    pub grant: String,
    /// The redemption code.
    pub code: Secret,
    /// The linking site's id.
    pub site_id: Uuid,
    /// The linking site's name.
    pub site_name: String,
    /// CSR (PEM) for the linking site's new key.
    pub csr: String,
}

/// What the issuer answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ClaimResponse {
    /// The signed client certificate (PEM).
    Granted {
        /// The client certificate.
        cert: String,
    },
    /// Why the claim was refused, for the person running `link create`.
    Refused {
        /// Human-readable reason.
        reason: String,
    },
}

/// Why redeeming a token failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// No endpoint could be reached.
    #[error("could not reach the issuing site at {0}")]
    Unreachable(String),
    /// The issuer's certificate does not match the token's CA or issuer.
    #[error(
        "the site at {endpoint} is not the token's issuer ({reason}); the token's CA does not \
         match that server: check the endpoint, or ask for a fresh token"
    )]
    WrongIssuer {
        /// Where.
        endpoint: String,
        /// The TLS error.
        reason: String,
    },
    /// The issuer refused the claim.
    #[error("the issuing site refused the token: {0}")]
    Refused(String),
    /// The issuer answered something that is not a claim response.
    #[error("the issuing site sent a bad answer: {0}")]
    Protocol(String),
    /// The claim went out but no answer came back (the connection broke, or the issuer was
    /// too busy or too slow): the token may or may not have been spent.
    #[error(
        "the issuing site did not answer the claim ({0}); the token may have been spent or \
         not: run the same link create again, and if the issuing site then answers that the \
         token was used, ask it for a new one"
    )]
    Unanswered(String),
}

/// Redeems `token` for a client certificate: returns the certificate PEM.
pub async fn redeem(
    token: &AccessToken,
    site_id: Uuid,
    site_name: &str,
    csr_pem: &str,
) -> Result<String, ClaimError> {
    let tls = skiff_certs::client_config(
        &token.spec.ca,
        None,
        Some(token.spec.issuer.id),
        &[ALPN_CLAIM],
    )
    .map_err(|e| ClaimError::Protocol(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let request = ClaimRequest {
        grant: token.metadata.name.clone(),
        code: token.spec.code.clone(),
        site_id,
        site_name: site_name.to_string(),
        csr: csr_pem.to_string(),
    };
    let mut unreachable = Vec::new();
    for endpoint in &token.spec.endpoints {
        let timeout = std::time::Duration::from_secs(10);
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                unreachable.push(format!("{endpoint} ({e})"));
                continue;
            }
            Err(_) => {
                unreachable.push(format!("{endpoint} (timed out)"));
                continue;
            }
        };
        let host = skiff_router::endpoint_host(endpoint);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| ClaimError::Protocol(format!("bad host in endpoint {endpoint}")))?;
        let mut tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = e.to_string();
                // Only a certificate problem means the token's CA or issuer does not match;
                // anything else (reset, refused ALPN) is the endpoint not answering as a site.
                if reason.contains("certificate") || reason.contains("UnknownIssuer") {
                    return Err(ClaimError::WrongIssuer {
                        endpoint: endpoint.clone(),
                        reason,
                    });
                }
                unreachable.push(format!("{endpoint} (TLS: {reason})"));
                continue;
            }
            Err(_) => {
                unreachable.push(format!("{endpoint} (TLS handshake timed out)"));
                continue;
            }
        };
        let body = serde_json::to_vec(&request).map_err(|e| ClaimError::Protocol(e.to_string()))?;
        write_frame(&mut tls, &body)
            .await
            .map_err(|e| ClaimError::Unanswered(e.to_string()))?;
        let answer = tokio::time::timeout(timeout, read_frame(&mut tls))
            .await
            .map_err(|_| {
                let waited = humantime::format_duration(timeout);
                ClaimError::Unanswered(format!("nothing within {waited}"))
            })?
            .map_err(|e| ClaimError::Unanswered(e.to_string()))?;
        return match serde_json::from_slice(&answer) {
            Ok(ClaimResponse::Granted { cert }) => Ok(cert),
            Ok(ClaimResponse::Refused { reason }) => Err(ClaimError::Refused(reason)),
            Err(e) => Err(ClaimError::Protocol(e.to_string())),
        };
    }
    Err(ClaimError::Unreachable(unreachable.join(", ")))
}

/// Writes one length-prefixed frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// Reads one length-prefixed frame of at most [`MAX_CLAIM_BYTES`].
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CLAIM_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("claim frame of {len} bytes exceeds {MAX_CLAIM_BYTES}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_are_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&(MAX_CLAIM_BYTES as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(read_frame(&mut b).await.is_err());
        write_frame(&mut a, b"{}").await.unwrap();
    }
}
