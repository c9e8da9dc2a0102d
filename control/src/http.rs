//! The site's HTTP endpoints on `--metrics-addr`: `/metrics` (Prometheus), `/healthz`,
//! `/readyz` and `/network.svg` (a picture of the network), plus the control part's own
//! metrics.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels of `skiff_token_redemptions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `granted`, `invalid`, `expired`, `used`, `revoked`, `duplicate` or `error`.
    pub result: String,
}

/// Labels of `skiff_cert_expiry_timestamp_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `ca`, `server` or `client` (the earliest of this site's outgoing links).
    pub kind: String,
}

/// The control part's metrics.
pub struct ControlMetrics {
    redemptions: Family<ResultLabels, Counter>,
    cert_expiry: Family<KindLabels, Gauge<f64, AtomicU64>>,
}

impl ControlMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ControlMetrics {
            redemptions: Family::default(),
            cert_expiry: Family::default(),
        };
        registry.register(
            "skiff_token_redemptions",
            "Token redemptions answered by this site, by result",
            metrics.redemptions.clone(),
        );
        registry.register(
            "skiff_cert_expiry_timestamp_seconds",
            "When this site's certificates expire (Unix time), by kind",
            metrics.cert_expiry.clone(),
        );
        metrics
    }

    /// Counts one redemption with `result`.
    pub fn redemption(&self, result: &str) {
        self.redemptions
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// Records the expiry of a certificate of `kind` (`None` removes the series).
    pub fn cert_expiry(&self, kind: &str, expires: Option<SystemTime>) {
        let labels = KindLabels {
            kind: kind.to_string(),
        };
        match expires.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => {
                self.cert_expiry.get_or_create(&labels).set(d.as_secs_f64());
            }
            None => {
                self.cert_expiry.remove(&labels);
            }
        }
    }
}

/// What the HTTP endpoints need from the running site.
pub trait Endpoints: Send + Sync + 'static {
    /// True once state is loaded and listeners are bound.
    fn ready(&self) -> bool;
    /// True while the site drains before it stops (it is then not ready).
    fn draining(&self) -> bool {
        false
    }
    /// The network picture (SVG).
    fn network_svg(&self) -> String;
}

/// Most connections served at once; more are closed at once. Scrapers and probes need a few;
/// the bound keeps a flood of idle connections from taking the daemon's file descriptors (and
/// with them the link port).
pub const MAX_CONNECTIONS: usize = 256;
/// A connection must send a request's headers within this time, also when it is idle between
/// requests, or it is closed (slowloris).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    site: Arc<dyn Endpoints>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually fd exhaustion: back off instead of spinning.
                    tracing::debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%from, "too many connections to the metrics endpoint; closed");
            continue;
        };
        let (site, registry) = (site.clone(), registry.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let answer = answer(req.uri().path(), site.as_ref(), &registry);
                    async move { Ok::<_, Infallible>(answer) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, site: &dyn Endpoints, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("cannot encode metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if site.draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        ),
        "/readyz" if site.ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "starting\n".into(),
        ),
        "/network.svg" => (StatusCode::OK, "image/svg+xml", site.network_svg()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz or /network.svg\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
