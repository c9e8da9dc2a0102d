//! The admin API: HTTP/1.1 + JSON on the state dir's unix socket `admin.sock` (mode 0600).
//!
//! Every CLI command other than `site init`, `site run` and `demo` is a thin client of this
//! API. Routes (all JSON):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/status | | [`StatusView`] |
//! | GET | /v1/links | | `[LinkView]` |
//! | POST | /v1/links | [`CreateLink`] | [`LinkView`] once up |
//! | DELETE | /v1/links/NAME | | `{}` |
//! | POST | /v1/revocations | [`Revoke`] | [`Revoked`] |
//! | POST | /v1/tokens | [`IssueToken`] | [`TokenIssued`] |
//! | GET | /v1/connectors | | `[ConnectorView]` |
//! | POST | /v1/connectors | [`CreateConnector`] | [`ConnectorView`] |
//! | DELETE | /v1/connectors/NAME | | `{}` |
//! | GET | /v1/listeners | | `[ListenerView]` |
//! | POST | /v1/listeners | [`CreateListener`] | [`ListenerView`] |
//! | DELETE | /v1/listeners/NAME | | `{}` |
//! | GET | /v1/network | | [`NetworkView`] |
//!
//! Errors answer a 4xx/5xx status with [`ApiError`].

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 1024 * 1024;

/// The whole site at a glance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// The site itself.
    pub site: SiteView,
    /// Every link, outgoing and incoming.
    pub links: Vec<LinkView>,
    /// Grants that can still be redeemed.
    pub active_grants: usize,
    /// Revoked sites (ids).
    pub revoked: Vec<Uuid>,
}

/// A site's identity and where it listens.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteView {
    /// Site name.
    pub name: String,
    /// Site id.
    pub id: Uuid,
    /// skiff version of the daemon.
    pub version: String,
    /// The link endpoints tokens point at.
    pub link_endpoints: Vec<String>,
    /// The port the daemon actually listens on for links.
    pub link_port: u16,
    /// The UDP port QUIC links are served on, if any.
    pub quic_port: Option<u16>,
}

/// One link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LinkView {
    /// Link name (for incoming links: the peer's site name).
    pub name: String,
    /// `outgoing` or `incoming`.
    pub direction: String,
    /// The peer site's name.
    pub peer_site: String,
    /// The peer site's id.
    pub peer_id: Uuid,
    /// `up`, `down` or `connecting`.
    pub state: String,
    /// Last heartbeat round trip in milliseconds, while up.
    pub rtt_ms: Option<f64>,
    /// Routing cost.
    pub cost: u32,
    /// When the state last changed (RFC 3339).
    pub since: String,
    /// Why the link last went down or failed.
    pub last_error: Option<String>,
    /// Expiry of the client certificate of an outgoing link (RFC 3339).
    pub cert_expires: Option<String>,
    /// `quic` or `tls` while the link is up.
    pub transport: Option<String>,
    /// While the link is up over TLS: its lanes besides the first connection pair, one per
    /// further shard both sites run (absent from older sites' answers).
    #[serde(default)]
    pub lanes: Option<usize>,
}

/// Body of `POST /v1/links`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateLink {
    /// The token file's text (a bearer secret: printed as `***`).
    pub token: crate::token::Secret,
    /// Link name (default: the issuer's site name).
    pub name: Option<String>,
    /// Cost (default: the token's).
    pub cost: Option<u32>,
    /// How long to wait for the link to come up, in seconds (default 30).
    pub wait_secs: Option<u64>,
    /// Transport: `auto` (default), `quic` or `tls`.
    #[serde(default)]
    pub transport: Option<String>,
}

/// Body of `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueToken {
    /// How many times the token may be redeemed.
    pub uses: u32,
    /// Seconds until it expires.
    pub expiry_secs: u64,
    /// Cost of links made with it.
    pub cost: u32,
}

/// Answer to `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenIssued {
    /// The token file (YAML; a bearer secret: printed as `***`).
    pub token: crate::token::Secret,
    /// The grant's id.
    pub grant: String,
    /// Expiry (RFC 3339).
    pub expires: String,
}

/// A grant (an issued token) as `GET /v1/grants` lists it: never its code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrantView {
    /// The grant's id (the token's name).
    pub id: String,
    /// Redemptions left.
    pub uses_left: u32,
    /// Expiry (RFC 3339).
    pub expires: String,
    /// True once it can no longer be redeemed (used up or expired).
    pub spent: bool,
}

/// Body of `POST /v1/revocations`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revoke {
    /// Site name or id.
    pub site: String,
}

/// Answer to `POST /v1/revocations`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    /// The revoked site's id.
    pub id: Uuid,
    /// Its name, if known.
    pub name: String,
    /// Live links that were closed.
    pub closed_links: usize,
}

/// Body of `POST /v1/connectors`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateConnector {
    /// Name (default: the routing key).
    pub name: Option<String>,
    /// The routing key served.
    pub routing_key: String,
    /// Backend host.
    pub host: String,
    /// Backend port.
    pub port: u16,
    /// Relative share of connections (default 1).
    pub weight: Option<u32>,
}

/// A connector.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorView {
    /// Name.
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

/// Body of `POST /v1/listeners`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateListener {
    /// Name (default: the routing key).
    pub name: Option<String>,
    /// Where connections go.
    pub routing_key: String,
    /// Port to open.
    pub port: u16,
    /// Address to bind (default 127.0.0.1).
    pub bind: Option<String>,
    /// Strategy (default balanced).
    pub strategy: Option<String>,
}

/// A listener and whether its key can be reached.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ListenerView {
    /// Name.
    pub name: String,
    /// Where connections go.
    pub routing_key: String,
    /// Bound address.
    pub bind: String,
    /// Port.
    pub port: u16,
    /// Strategy.
    pub strategy: String,
    /// Sites that serve the key and can be reached now (empty: clients are refused).
    pub targets: Vec<String>,
    /// Why the listener is not serving, if it is not.
    pub error: Option<String>,
}

/// The whole network as this site sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkView {
    /// This site's name.
    pub site: String,
    /// Every site known.
    pub sites: Vec<NetworkSite>,
    /// Every link known.
    pub links: Vec<NetworkLink>,
    /// Every routing key with the sites that serve it.
    pub services: Vec<NetworkService>,
}

/// A site in [`NetworkView`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSite {
    /// Name.
    pub name: String,
    /// Id.
    pub id: Uuid,
    /// True for the site answering.
    pub local: bool,
    /// Whether a path to it exists.
    pub reachable: bool,
    /// Path cost from this site (0 for itself).
    pub cost: Option<u64>,
    /// The neighbour traffic to it goes through.
    pub next_hop: Option<String>,
}

/// A link in [`NetworkView`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkLink {
    /// One end (site name).
    pub from: String,
    /// The other end (site name).
    pub to: String,
    /// Cost.
    pub cost: u32,
    /// `up` when both ends advertise it, `down` otherwise.
    pub state: String,
    /// RTT in milliseconds, for this site's own links.
    pub rtt_ms: Option<f64>,
}

/// A routing key in [`NetworkView`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkService {
    /// The routing key.
    pub routing_key: String,
    /// Reachable sites that serve it, cheapest first.
    pub sites: Vec<ServingSite>,
}

/// A site serving a key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingSite {
    /// Site name.
    pub name: String,
    /// Path cost from this site.
    pub cost: u64,
    /// Connector weight.
    pub weight: u32,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

/// A request as the handler sees it.
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Path, e.g. `/v1/links/dev`.
    pub path: String,
    /// Body bytes (at most [`MAX_BODY`]).
    pub body: Bytes,
}

/// A handler's answer: status and JSON body.
pub type ApiResponse = (StatusCode, Vec<u8>);

/// Serialises `value` as a 200 answer.
pub fn ok<T: Serialize>(value: &T) -> ApiResponse {
    match serde_json::to_vec(value) {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// An error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> ApiResponse {
    let body = serde_json::to_vec(&ApiError {
        error: message.into(),
    })
    .unwrap_or_default();
    (status, body)
}

/// Parses a JSON request body, or answers 400.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// The function that answers admin requests.
pub type Handler =
    Arc<dyn Fn(ApiRequest) -> Pin<Box<dyn Future<Output = ApiResponse> + Send>> + Send + Sync>;

/// Binds the admin socket at `path` (mode 0600), replacing a stale socket file.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "a skiff daemon is already running on {} (stop it first)",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `shutdown` fires.
pub async fn serve(listener: UnixListener, handler: Handler, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually fd exhaustion: back off instead of spinning.
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(answer(req, handler).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn answer(req: Request<hyper::body::Incoming>, handler: Handler) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (status, body) = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => {
            // A task of its own, so that a client that goes away (Ctrl-C on `skiff link
            // create`), which ends the connection and drops this future, does not cut a
            // request short halfway: between spending a token at the issuing site and saving
            // the link it made, say.
            let request = ApiRequest {
                method,
                path,
                body: collected.to_bytes(),
            };
            match tokio::spawn(handler(request)).await {
                Ok(answer) => answer,
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the request failed inside the daemon ({e}); see its log"),
                ),
            }
        }
        Err(e) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body refused: {e}"),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers on the socket.
    #[error(
        "no skiff daemon is running for state dir {dir} ({reason}); start it with: \
         skiff --state-dir {dir} site run"
    )]
    NotRunning {
        /// The state dir.
        dir: String,
        /// The connect error.
        reason: String,
    },
    /// The admin socket (or the state dir) is not this user's: the daemon may be running.
    #[error(
        "permission denied on the admin socket of state dir {dir}: only the user that runs the \
         site's daemon may administer it; run the command as that user"
    )]
    NotAllowed {
        /// The state dir.
        dir: String,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status (404: no such object, 409: conflict, 504: created but not up, ...).
        status: u16,
        /// What the daemon said.
        message: String,
    },
    /// The exchange itself failed.
    #[error("admin API: {0}")]
    Protocol(String),
}

/// A client of a daemon's admin API.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    dir: PathBuf,
}

impl Client {
    /// A client for the daemon of state dir `dir`.
    pub fn new(dir: &Path) -> Self {
        Client {
            socket: dir.join("admin.sock"),
            dir: dir.to_path_buf(),
        }
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return ClientError::NotAllowed {
                    dir: self.dir.display().to_string(),
                };
            }
            let reason = match e.kind() {
                std::io::ErrorKind::NotFound => "its admin socket does not exist".to_string(),
                std::io::ErrorKind::ConnectionRefused => "its admin socket is stale".to_string(),
                _ => e.to_string(),
            };
            ClientError::NotRunning {
                dir: self.dir.display().to_string(),
                reason,
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "skiff")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("daemon answered {status}"));
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::sync::{oneshot, Notify};

    use super::*;

    #[tokio::test]
    async fn a_request_runs_to_its_end_when_the_client_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        // The handler says when it has started, then waits until the test lets it go on (a
        // step that takes a while, like redeeming a token at another site), then says it ended.
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (ended_tx, ended) = oneshot::channel::<()>();
        let ended_tx = Arc::new(std::sync::Mutex::new(Some(ended_tx)));
        let handler: Handler = {
            let (started, release) = (started.clone(), release.clone());
            Arc::new(move |_request| {
                let (started, release, ended_tx) =
                    (started.clone(), release.clone(), ended_tx.clone());
                Box::pin(async move {
                    started.notify_one();
                    release.notified().await;
                    if let Some(tx) = ended_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    ok(&serde_json::json!({}))
                })
            })
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(bind(&path).unwrap(), handler, shutdown.clone()));

        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        client
            .write_all(b"POST /v1/links HTTP/1.1\r\nhost: skiff\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .unwrap();
        started.notified().await;
        drop(client);
        // Let the server see the connection end (and, before the fix, drop the request).
        tokio::time::sleep(Duration::from_millis(100)).await;
        release.notify_one();

        let ended = tokio::time::timeout(Duration::from_secs(5), ended).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the request was cut short when its client went away"
        );
        shutdown.cancel();
        server.await.unwrap();
    }
}
