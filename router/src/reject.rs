//! Connections turned away at the link port: one counter and one log line for each.
//!
//! Anyone who can reach a site's link port (TCP for links and token redemption, UDP for QUIC
//! links) can send it garbage, stall handshakes, present certificates it will not accept, or
//! flood it with redemption attempts. Every such connection is refused, counted in
//! `skiff_rejected_connections_total{endpoint, reason}` and logged at warn level with its source
//! address and reason — never with a secret (no token code, no certificate contents).
//!
//! Logging is bounded, because whoever floods the port would otherwise decide how much the site
//! writes to its log: at most [`LOG_BURST`] lines per second for one endpoint and reason; the
//! rest are counted and summed up in one line (`suppressed=N`) at the end of that second. The
//! counter always counts every connection.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

/// Lines logged per second for one endpoint and reason before the rest are only summed up.
pub const LOG_BURST: u32 = 10;
/// The window [`LOG_BURST`] applies to.
const LOG_WINDOW: Duration = Duration::from_secs(1);

/// Where a refused connection arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The TCP link port, for a link (ALPN `skiff-link/1`) or before anything told what for.
    Link,
    /// The TCP link port, for a token redemption (the client offered ALPN `skiff-claim/1`).
    Claim,
    /// The UDP link port: QUIC links.
    Quic,
}

impl Endpoint {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Link => "link",
            Endpoint::Claim => "claim",
            Endpoint::Quic => "quic",
        }
    }
}

/// Why a connection was refused. The set is small and stable: these words are label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Connected and closed without sending a byte (port scanners, load-balancer health
    /// checks). Counted, but logged at debug level only.
    Closed,
    /// Bytes that are not a well-formed TLS ClientHello: garbage, a truncated record,
    /// impossible lengths.
    Malformed,
    /// A TLS handshake that failed for a reason other than the ones below (no common protocol
    /// version or cipher suite, a handshake message out of place, the client gave up).
    HandshakeFailed,
    /// The handshake (or, after it, what must follow it) did not finish in time.
    Timeout,
    /// The most handshakes allowed at once were already in progress.
    TooManyHandshakes,
    /// The client offered no skiff protocol (ALPN).
    NoAlpn,
    /// A link connection without a client certificate.
    NoCertificate,
    /// A client certificate not issued by this site's CA (self-signed, another site's CA).
    UnknownCa,
    /// A client certificate outside its validity period.
    Expired,
    /// A client certificate of a site this site revoked.
    Revoked,
    /// Any other client certificate problem (wrong purpose, no site id, bad encoding).
    BadCertificate,
    /// An authenticated site broke the link protocol before its link came up (bad preface,
    /// a reverse connection for a session that does not exist).
    Protocol,
    /// The most token redemptions allowed at once were already being answered.
    TooManyClaims,
    /// The source address made more redemption attempts than its rate allows.
    RateLimited,
    /// A redemption whose claim is malformed, oversized, not sent in time, or whose
    /// certificate request is unusable.
    BadClaim,
    /// A redemption with an unknown grant, a wrong code, or an expired or used-up token.
    BadToken,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Closed => "closed",
            Reason::Malformed => "malformed",
            Reason::HandshakeFailed => "handshake_failed",
            Reason::Timeout => "timeout",
            Reason::TooManyHandshakes => "too_many_handshakes",
            Reason::NoAlpn => "no_alpn",
            Reason::NoCertificate => "no_certificate",
            Reason::UnknownCa => "unknown_ca",
            Reason::Expired => "expired",
            Reason::Revoked => "revoked",
            Reason::BadCertificate => "bad_certificate",
            Reason::Protocol => "protocol",
            Reason::TooManyClaims => "too_many_claims",
            Reason::RateLimited => "rate_limited",
            Reason::BadClaim => "bad_claim",
            Reason::BadToken => "bad_token",
        }
    }

    /// Every reason, for documentation checks.
    pub const ALL: [Reason; 16] = [
        Reason::Closed,
        Reason::Malformed,
        Reason::HandshakeFailed,
        Reason::Timeout,
        Reason::TooManyHandshakes,
        Reason::NoAlpn,
        Reason::NoCertificate,
        Reason::UnknownCa,
        Reason::Expired,
        Reason::Revoked,
        Reason::BadCertificate,
        Reason::Protocol,
        Reason::TooManyClaims,
        Reason::RateLimited,
        Reason::BadClaim,
        Reason::BadToken,
    ];

    /// The reason for a TLS handshake that failed on this side with `error`.
    pub fn of_tls(error: &rustls::Error) -> Reason {
        use rustls::CertificateError as C;
        match error {
            rustls::Error::InvalidCertificate(e) => match e {
                C::UnknownIssuer => Reason::UnknownCa,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Reason::Expired,
                C::Revoked => Reason::Revoked,
                _ => Reason::BadCertificate,
            },
            rustls::Error::NoCertificatesPresented => Reason::NoCertificate,
            rustls::Error::NoApplicationProtocol => Reason::NoAlpn,
            rustls::Error::InvalidMessage(_) => Reason::Malformed,
            // skiff's certificate verifiers report a certificate without a usable site id so.
            rustls::Error::General(_) => Reason::BadCertificate,
            _ => Reason::HandshakeFailed,
        }
    }

    /// The reason for a failed TLS handshake as an I/O error from tokio-rustls (which wraps
    /// the rustls error).
    pub fn of_tls_io(error: &std::io::Error) -> Reason {
        match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(e) => Reason::of_tls(e),
            None => Reason::HandshakeFailed,
        }
    }

    /// The reason for a TLS alert this side sent (QUIC reports the alert, not the error).
    pub fn of_alert(alert: u8) -> Reason {
        match alert {
            42 | 43 | 46 | 49 | 51 => Reason::BadCertificate,
            44 => Reason::Revoked,
            45 => Reason::Expired,
            48 => Reason::UnknownCa,
            50 => Reason::Malformed,
            116 => Reason::NoCertificate,
            120 => Reason::NoAlpn,
            _ => Reason::HandshakeFailed,
        }
    }

    /// The reason for a QUIC connection that failed before it was established.
    pub fn of_quic(error: &quinn::ConnectionError) -> Reason {
        match error {
            quinn::ConnectionError::TransportError(e) => {
                let code = u64::from(e.code);
                // TLS alerts travel as CRYPTO_ERROR codes 0x100 + alert.
                match u8::try_from(code.wrapping_sub(0x100)) {
                    Ok(alert) if code >= 0x100 => Reason::of_alert(alert),
                    _ => Reason::HandshakeFailed,
                }
            }
            quinn::ConnectionError::TimedOut => Reason::Timeout,
            _ => Reason::HandshakeFailed,
        }
    }
}

/// Labels of `skiff_rejected_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `link`, `claim` or `quic` (see [`Endpoint`]).
    pub endpoint: String,
    /// See [`Reason`].
    pub reason: String,
}

/// Counts and logs refused connections. Cheap to clone; clones share everything.
#[derive(Clone, Default)]
pub struct Rejections {
    counter: Family<RejectLabels, Counter>,
    windows: Arc<Mutex<HashMap<(Endpoint, Reason), Window>>>,
}

/// One endpoint and reason's current log window.
struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl Rejections {
    /// Creates the counter and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let rejections = Rejections::default();
        registry.register(
            "skiff_rejected_connections",
            "Connections to the link port (TCP or UDP) turned away, by endpoint and reason",
            rejections.counter.clone(),
        );
        rejections
    }

    /// Counts a connection from `from` refused at `endpoint` for `reason`, and logs it (see the
    /// module docs). `detail` must not hold secrets.
    pub fn reject(
        &self,
        endpoint: Endpoint,
        reason: Reason,
        from: SocketAddr,
        detail: impl Display,
    ) {
        self.counter
            .get_or_create(&RejectLabels {
                endpoint: endpoint.as_str().to_string(),
                reason: reason.as_str().to_string(),
            })
            .inc();
        if reason == Reason::Closed {
            tracing::debug!(
                endpoint = %endpoint.as_str(),
                reason = %reason.as_str(),
                %from,
                "connection refused"
            );
            return;
        }
        if !self.may_log(endpoint, reason) {
            return;
        }
        tracing::warn!(
            endpoint = %endpoint.as_str(),
            reason = %reason.as_str(),
            %from,
            %detail,
            "connection refused"
        );
    }

    /// How many connections were refused at `endpoint` for `reason` so far.
    pub fn count(&self, endpoint: Endpoint, reason: Reason) -> u64 {
        self.counter
            .get(&RejectLabels {
                endpoint: endpoint.as_str().to_string(),
                reason: reason.as_str().to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// Whether this rejection may be logged; if not, it is counted for the window's summary,
    /// which a task logs when the window ends.
    fn may_log(&self, endpoint: Endpoint, reason: Reason) -> bool {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry((endpoint, reason)).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        // A window with suppressed lines is closed by its summary task, not here.
        if window.suppressed == 0 && now.duration_since(window.started) >= LOG_WINDOW {
            *window = Window {
                started: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if window.logged < LOG_BURST {
            window.logged += 1;
            return true;
        }
        window.suppressed += 1;
        if window.suppressed == 1 {
            let ends = window.started + LOG_WINDOW;
            let windows = self.windows.clone();
            let summary = async move {
                tokio::time::sleep_until(ends).await;
                let suppressed = {
                    let mut windows = windows.lock().unwrap_or_else(|e| e.into_inner());
                    windows
                        .remove(&(endpoint, reason))
                        .map_or(0, |w| w.suppressed)
                };
                tracing::warn!(
                    endpoint = %endpoint.as_str(),
                    reason = %reason.as_str(),
                    suppressed,
                    "more connections refused for the same reason in the last second; not \
                     logged one by one"
                );
            };
            // Without a runtime (a unit test), the window simply never closes.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(summary);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 4000))
    }

    #[test]
    fn labels_are_distinct_words() {
        let mut words: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        words.sort();
        words.dedup();
        assert_eq!(words.len(), Reason::ALL.len());
        assert!(words
            .iter()
            .all(|w| w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn tls_errors_map_to_reasons() {
        use rustls::CertificateError as C;
        let cert = |e| rustls::Error::InvalidCertificate(e);
        assert_eq!(Reason::of_tls(&cert(C::UnknownIssuer)), Reason::UnknownCa);
        assert_eq!(Reason::of_tls(&cert(C::Expired)), Reason::Expired);
        assert_eq!(Reason::of_tls(&cert(C::Revoked)), Reason::Revoked);
        assert_eq!(
            Reason::of_tls(&cert(C::InvalidPurpose)),
            Reason::BadCertificate
        );
        assert_eq!(
            Reason::of_tls(&rustls::Error::NoApplicationProtocol),
            Reason::NoAlpn
        );
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, cert(C::Revoked));
        assert_eq!(Reason::of_tls_io(&io), Reason::Revoked);
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(Reason::of_tls_io(&eof), Reason::HandshakeFailed);
        // The alerts rustls sends for those errors map back to the same reasons.
        for e in [C::UnknownIssuer, C::Expired, C::Revoked] {
            let alert = u8::from(rustls::AlertDescription::from(e.clone()));
            assert_eq!(Reason::of_alert(alert), Reason::of_tls(&cert(e)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_rejection_counts_but_logging_is_bounded() {
        let rejections = Rejections::default();
        let logged = (0..25)
            .filter(|_| rejections.may_log(Endpoint::Link, Reason::Malformed))
            .count();
        assert_eq!(logged, LOG_BURST as usize);
        // Another reason has its own budget.
        assert!(rejections.may_log(Endpoint::Link, Reason::Timeout));
        // The summary task closes the window when it ends; then lines are logged again.
        tokio::time::sleep(LOG_WINDOW + Duration::from_millis(10)).await;
        tokio::task::yield_now().await;
        assert!(rejections.may_log(Endpoint::Link, Reason::Malformed));
        for _ in 0..3 {
            rejections.reject(Endpoint::Claim, Reason::RateLimited, from(), "x");
        }
        assert_eq!(rejections.count(Endpoint::Claim, Reason::RateLimited), 3);
        assert_eq!(rejections.count(Endpoint::Claim, Reason::BadToken), 0);
    }
}
