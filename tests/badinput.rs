//! Bad input at the link port, end to end: real `skiff` daemons on loopback, one carried
//! connection streaming checked data through a link, and a stranger throwing everything at the
//! accepting site's link port and claim endpoint — garbage, truncated and oversized TLS records,
//! slowloris connections beyond the handshake limit, TLS with self-signed, foreign, expired and
//! revoked client certificates, malformed claims, a bad token, a redemption flood — and at its
//! QUIC port. The site must stay up, the carried connection must complete byte-identical, and
//! every attempt must show in the log and in `skiff_rejected_connections_total`, exactly.
//!
//! Also: a link over its stream limit refuses the streams beyond it (its clients are reset)
//! and carries on; bad limits stop `site run` before it binds anything.

#[path = "common/checked.rs"]
mod checked;
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checked::{exchange, Outcome, Request, ServerStats, Verdict};
use common::{free_port, http_get, report, transport, wait_for, Site};
use skiff_certs::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

on_every_transport!(
    the_link_port_survives_everything_and_counts_it,
    a_link_over_its_stream_limit_refuses_streams,
);

/// Handshake limits of the attacked site, small so the test can exceed them.
const MAX_HANDSHAKES: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Redemption burst of the attacked site; its rate is one a minute, so nothing refills in the
/// test (or one attempt, on a very slow machine: the assertions allow for that).
const REDEMPTION_BURST: u32 = 12;

const ALPN_LINK: &[u8] = b"skiff-link/1";
const ALPN_CLAIM: &[u8] = b"skiff-claim/1";

/// A rejection count key: (endpoint, reason).
type Key = (String, String);

fn key(endpoint: &str, reason: &str) -> Key {
    (endpoint.to_string(), reason.to_string())
}

/// `skiff_rejected_connections_total` by endpoint and reason, scraped from `/metrics`.
fn rejected(metrics: u16) -> BTreeMap<Key, u64> {
    let (status, body) = http_get(metrics, "/metrics").expect("cannot scrape /metrics");
    assert_eq!(status, 200, "/metrics answered {status}");
    let mut counts = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("skiff_rejected_connections_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").expect("a sample line");
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .expect("a label")
        };
        counts.insert(
            (label("endpoint"), label("reason")),
            value.trim().parse::<f64>().expect("a number") as u64,
        );
    }
    counts
}

/// The value of one sample (`name{labels}` exactly as exported), 0 if absent.
fn sample(metrics: u16, series: &str) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").expect("cannot scrape /metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
}

/// What grew from `before` to `after`.
fn delta(before: &BTreeMap<Key, u64>, after: &BTreeMap<Key, u64>) -> BTreeMap<Key, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let grew = v - before.get(k).copied().unwrap_or(0);
            (grew > 0).then(|| (k.clone(), grew))
        })
        .collect()
}

/// Refused connections in a daemon log, by endpoint and reason: one per `connection refused`
/// line, plus the `suppressed=N` of summary lines. Every single line must name its source.
fn logged(log: &str) -> BTreeMap<Key, u64> {
    let mut counts = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("skiff_router::reject")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let (Some(endpoint), Some(reason)) = (field("endpoint"), field("reason")) else {
            continue;
        };
        let n = match field("suppressed") {
            Some(n) => n.parse().expect("suppressed=N"),
            None => {
                assert!(
                    field("from").is_some_and(|f| f.starts_with("127.0.0.1:")),
                    "a refused connection logged without its source: {line}"
                );
                1
            }
        };
        *counts.entry((endpoint, reason)).or_insert(0) += n;
    }
    counts
}

/// Tiny xorshift generator: enough noise for garbage.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `bytes` on a fresh connection to `port`, half-closes, and reads until the peer closes
/// (bounded).
fn poke(port: u16, bytes: &[u8]) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("cannot connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = tcp.write_all(bytes);
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = tcp.read_to_end(&mut sink);
}

/// A TLS handshake record carrying a ClientHello `body` (whose lengths may lie).
fn client_hello(body: &[u8], claimed_len: u32) -> Vec<u8> {
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&claimed_len.to_be_bytes()[1..]);
    handshake.extend_from_slice(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// A ClientHello body whose cipher-suite list claims far more bytes than follow.
fn overlong_cipher_suites() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0xff, 0xfe]); // 65534 bytes of cipher suites...
    body.extend_from_slice(&[0x13, 0x01, 0x13, 0x02]); // ...but four
    body
}

/// A client certificate for a random site id, signed by `ca` (PEM certificate and key) or by
/// itself; valid now, or `expired` long ago.
fn mint(ca: Option<(&str, &str)>, expired: bool) -> CertifiedKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let uri = format!("urn:skiff:site:{}", uuid::Uuid::new_v4());
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stranger");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = if expired {
        rcgen::date_time_ymd(2020, 1, 2)
    } else {
        rcgen::date_time_ymd(2090, 1, 1)
    };
    let cert = match ca {
        Some((cert_pem, key_pem)) => {
            let ca_key = rcgen::KeyPair::from_pem(key_pem).unwrap();
            let issuer = rcgen::Issuer::from_ca_cert_pem(cert_pem, ca_key).unwrap();
            params.signed_by(&key, &issuer).unwrap()
        }
        None => params.self_signed(&key).unwrap(),
    };
    CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A link's certificate file as the store writes it: certificate, then key.
fn link_cert(site: &Site, link: &str) -> CertifiedKey {
    let pem = std::fs::read_to_string(site.state_dir().join(format!("links/{link}.pem")))
        .expect("cannot read the link certificate");
    let at = pem.find("-----BEGIN PRIVATE KEY-----").expect("a key");
    CertifiedKey {
        cert_pem: pem[..at].to_string(),
        key_pem: pem[at..].to_string(),
    }
}

fn read_state(site: &Site, file: &str) -> String {
    std::fs::read_to_string(site.state_dir().join(file)).expect("cannot read a state file")
}

/// Dials the link port with TLS (trusting `ca`, offering `alpn`, presenting `cert`), sends
/// `then`, and reads what comes back until the site closes. Returns the bytes read, or the
/// error that ended the connection.
async fn tls_attempt(
    port: u16,
    ca: &str,
    cert: Option<&CertifiedKey>,
    alpn: &[&[u8]],
    then: &[u8],
) -> Result<Vec<u8>, String> {
    let config = skiff_certs::client_config(ca, cert, None, alpn).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(then).await.map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
        Ok(got)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no end within 10 s".to_string())?
}

/// A claim frame: 4-byte length, then `body`.
fn frame(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Sends one raw claim; returns the site's refusal reason.
async fn claim(port: u16, ca: &str, raw: &[u8]) -> String {
    let got = tls_attempt(port, ca, None, &[ALPN_CLAIM], raw)
        .await
        .unwrap_or_else(|e| panic!("claim attempt failed: {e}"));
    assert!(got.len() > 4, "no claim response: {got:?}");
    let answer: serde_json::Value = serde_json::from_slice(&got[4..]).expect("a JSON answer");
    answer["refused"]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("not a refusal: {answer}"))
        .to_string()
}

/// Dials the QUIC port (trusting `ca`, offering `alpn`, presenting `cert`); returns how it
/// ended.
async fn quic_attempt(port: u16, ca: &str, cert: Option<&CertifiedKey>, alpn: &[&[u8]]) -> String {
    let tls = skiff_certs::client_config(ca, cert, None, alpn).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let conn = endpoint
            .connect(addr, "127.0.0.1")
            .map_err(|e| e.to_string())?;
        let conn = conn.await.map_err(|e| e.to_string())?;
        // Handshake done on this side; the site judges the certificate meanwhile.
        Ok::<_, String>(conn.closed().await.to_string())
    })
    .await;
    endpoint.close(0u32.into(), b"");
    match outcome {
        Ok(Ok(closed)) => format!("closed: {closed}"),
        Ok(Err(e)) => e,
        Err(_) => "no end within 5 s".into(),
    }
}

/// A runtime with a checked backend on loopback.
struct Backend {
    runtime: Runtime,
    stats: Arc<ServerStats>,
    port: u16,
}

impl Backend {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .unwrap();
        let stats: Arc<ServerStats> = Arc::default();
        let port = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(checked::serve(listener, b'b', stats.clone()));
            port
        });
        Backend {
            runtime,
            stats,
            port,
        }
    }
}

/// Site `a` with a listener for `key`, site `b` serving it from `backend`; waits for the route.
fn listener_to(a: &Site, b: &Site, key: &str, backend: &Backend) -> SocketAddr {
    b.ok(&[
        "connector",
        "create",
        key,
        "--host",
        "127.0.0.1",
        "--port",
        &backend.port.to_string(),
    ]);
    let port = free_port();
    a.ok(&["listener", "create", key, "--port", &port.to_string()]);
    wait_for(
        &format!("a's listener {key} to reach b"),
        Duration::from_secs(15),
        &[a, b],
        || {
            let seen = a.targets(key)?;
            (seen == ["b"]).then_some(()).ok_or(format!("{seen:?}"))
        },
    );
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn the_link_port_survives_everything_and_counts_it() {
    let backend = Backend::start();
    let metrics = free_port();
    let mut b = Site::init("b", &["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
    b.run_args = [
        "--max-handshakes",
        &MAX_HANDSHAKES.to_string(),
        "--handshake-timeout",
        "2s",
        "--redemption-rate",
        "1",
        "--redemption-burst",
        &REDEMPTION_BURST.to_string(),
    ]
    .map(String::from)
    .to_vec();
    b.run();
    let a = Site::start("a");
    let mut c = Site::start("c");
    let d = Site::start("d");
    a.link_to(&b);
    c.link_to(&b);
    let port = b.port;

    // c is revoked and stopped: its certificate is now a revoked site's certificate. (Stopped
    // first, so that its own redials do not count below.)
    b.ok(&["link", "revoke", "c"]);
    c.kill();
    let revoked = link_cert(&c, "b");
    let sites = [&a, &b, &d];
    let b_ca = read_state(&b, "ca.pem");
    let b_ca_key = read_state(&b, "ca.key");
    let a_ca = read_state(&a, "ca.pem");
    let a_ca_key = read_state(&a, "ca.key");

    // A carried connection that lasts through everything below.
    let addr = listener_to(&a, &b, "data", &backend);
    let request = Request {
        seed: 42,
        up: 2_000_000,
        down: 8_000_000,
        pace: Duration::from_secs(25),
    };
    let carried = backend
        .runtime
        .spawn(exchange(addr, request, Duration::from_secs(60)));
    wait_for(
        "the carried connection to reach the backend",
        Duration::from_secs(10),
        &sites,
        || {
            let n = backend
                .stats
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed);
            (n >= 1).then_some(()).ok_or(format!("{n} accepted"))
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    let before = rejected(metrics);
    let log_before = logged(&b.logs());
    let mut expected: BTreeMap<Key, u64> = BTreeMap::new();
    let mut expect = |endpoint: &str, reason: &str, n: u64| {
        *expected.entry(key(endpoint, reason)).or_insert(0) += n;
    };

    // Garbage, truncated and oversized TLS, and a connection that sends nothing.
    for seed in 1..=5u64 {
        let mut bytes = noise(seed, 200 * seed as usize);
        if bytes[0] == 0x16 {
            bytes[0] = 0;
        }
        poke(port, &bytes);
    }
    poke(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    expect("link", "malformed", 6);
    poke(port, b"");
    expect("link", "closed", 1);
    // A record announcing 512 bytes of ClientHello, cut after 40.
    poke(port, &client_hello(&[0x03; 507], 507)[..40]);
    // A record longer than TLS allows.
    poke(
        port,
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb],
    );
    // A ClientHello claiming 16 MiB; one whose cipher suites overrun it.
    poke(port, &client_hello(&[0u8; 16], 0xff_ffff));
    let body = overlong_cipher_suites();
    poke(port, &client_hello(&body, body.len() as u32));
    expect("link", "malformed", 4);
    std::thread::sleep(Duration::from_millis(1100));

    // Slowloris: more connections than handshakes allowed, each sending a ClientHello a byte a
    // second. The first MAX_HANDSHAKES hold every handshake slot until they time out; the rest
    // are dropped at once.
    let slow = MAX_HANDSHAKES + 8;
    let hello = client_hello(&overlong_cipher_suites(), 0);
    let started = Instant::now();
    backend.runtime.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..slow {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            conns.push(tcp);
        }
        let trickles = conns.into_iter().map(|mut tcp| {
            let hello = hello.clone();
            tokio::spawn(async move {
                for byte in hello.iter().take(8) {
                    if tcp.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        });
        futures::future::join_all(trickles).await;
    });
    assert!(
        started.elapsed() > HANDSHAKE_TIMEOUT,
        "the slow connections ended before the handshake timeout"
    );
    expect("link", "timeout", MAX_HANDSHAKES as u64);
    expect("link", "too_many_handshakes", 8);

    // TLS with client certificates the site must refuse, and without any.
    let self_signed = mint(None, false);
    let foreign = mint(Some((&a_ca, &a_ca_key)), false);
    let expired = mint(Some((&b_ca, &b_ca_key)), true);
    let genuine = mint(Some((&b_ca, &b_ca_key)), false);
    let outcomes = backend.runtime.block_on(async {
        let mut outcomes = Vec::new();
        for (what, cert, alpn) in [
            ("self-signed", Some(&self_signed), &[ALPN_LINK][..]),
            ("another site's CA", Some(&foreign), &[ALPN_LINK][..]),
            ("expired", Some(&expired), &[ALPN_LINK][..]),
            ("revoked", Some(&revoked), &[ALPN_LINK][..]),
            ("no certificate", None, &[ALPN_LINK][..]),
            ("no ALPN", None, &[][..]),
            ("wrong ALPN", None, &[&b"h2"[..]][..]),
        ] {
            let outcome = tls_attempt(port, &b_ca, cert, alpn, b"").await;
            outcomes.push((what, outcome));
        }
        // A certificate from the site's own CA, then a bad link preface.
        let garbage = noise(7, 22);
        let outcome = tls_attempt(port, &b_ca, Some(&genuine), &[ALPN_LINK], &garbage).await;
        outcomes.push(("bad preface", outcome));
        outcomes
    });
    expect("link", "unknown_ca", 2);
    expect("link", "expired", 1);
    expect("link", "revoked", 1);
    expect("link", "no_certificate", 1);
    expect("link", "no_alpn", 2);
    expect("link", "protocol", 1);
    // The client of a refused certificate reads why (TLS 1.3 finishes the client's side first).
    for (what, want) in [
        ("self-signed", "UnknownCA"),
        ("another site's CA", "UnknownCA"),
        ("expired", "CertificateExpired"),
        ("revoked", "CertificateRevoked"),
    ] {
        let (_, outcome) = outcomes.iter().find(|(w, _)| *w == what).unwrap();
        match outcome {
            Err(e) if e.contains(want) => {}
            other => panic!("{what}: expected an alert {want}, got {other:?}"),
        }
    }

    // Claims: malformed, oversized, not JSON for a claim, and none at all.
    let reasons = backend.runtime.block_on(async {
        let mut reasons = Vec::new();
        for raw in [
            frame(5, b"hello"),
            frame(u32::MAX, b"x"),
            frame(33, br#"{"grant":"x","code":"0123456789"}"#),
            Vec::new(),
        ] {
            reasons.push(claim(port, &b_ca, &raw).await);
        }
        reasons
    });
    assert!(reasons[0].starts_with("malformed claim"), "{reasons:?}");
    assert!(reasons[1].contains("exceeds"), "{reasons:?}");
    assert!(
        reasons[2].starts_with("malformed claim") && !reasons[2].contains("0123456789"),
        "a refusal must not repeat the claim: {reasons:?}"
    );
    assert!(
        reasons[3].starts_with("no claim sent within 2s"),
        "{reasons:?}"
    );
    expect("claim", "bad_claim", 4);

    // A token whose code was changed, and one already used, redeemed by an honest client.
    let token = b.issue("fresh.yaml", &[]);
    let yaml = std::fs::read_to_string(&token).unwrap();
    let code = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("code: "))
        .expect("a code")
        .to_string();
    let flipped: String = code
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let tampered = b.scratch("tampered.yaml");
    std::fs::write(&tampered, yaml.replace(&code, &flipped)).unwrap();
    let out = d.redeem(&tampered);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not valid here"),
        "a tampered token: {stderr}"
    );
    let out = d.redeem(&b.scratch("to-b-from-a.yaml"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("already used"),
        "a used token: {stderr}"
    );
    expect("claim", "bad_token", 2);

    // A redemption flood from one address: what is left of the burst is answered, the rest
    // refused until the rate allows more; then the honest client is told when to retry.
    let flood = backend.runtime.block_on(async {
        let mut reasons = Vec::new();
        for _ in 0..10 {
            reasons.push(claim(port, &b_ca, &frame(5, b"hello")).await);
        }
        reasons
    });
    let limited = flood
        .iter()
        .filter(|r| r.starts_with("too many redemption attempts from 127.0.0.1; retry in "))
        .count() as u64;
    // a, c, four bad claims and two bad tokens took 8 of the burst.
    let left = u64::from(REDEMPTION_BURST) - 8;
    assert!(
        (10 - left - 1..=10 - left).contains(&limited),
        "{limited} of 10 rate-limited with {left} attempts left: {flood:?}"
    );
    expect("claim", "bad_claim", 10 - limited);
    expect("claim", "rate_limited", limited);
    let out = d.redeem(&token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("too many redemption attempts from 127.0.0.1; retry in "),
        "the honest client over the rate: {stderr}"
    );
    expect("claim", "rate_limited", 1);

    // QUIC: garbage datagrams (dropped uncounted by QUIC itself), then handshakes with bad
    // certificates, none, and the wrong protocol.
    let quic = backend.runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for seed in 1..=50u64 {
            let mut datagram = noise(seed, 1200);
            // Every other one looks like a QUIC v1 long-header Initial.
            if seed % 2 == 0 {
                datagram[0] = 0xc3;
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
            let _ = socket.send_to(&datagram, ("127.0.0.1", port)).await;
        }
        let mut outcomes = Vec::new();
        for (cert, alpn) in [
            (Some(&self_signed), ALPN_LINK),
            (Some(&expired), ALPN_LINK),
            (Some(&revoked), ALPN_LINK),
            (None, ALPN_LINK),
            (None, &b"h2"[..]),
        ] {
            outcomes.push(quic_attempt(port, &b_ca, cert, &[alpn]).await);
        }
        outcomes
    });
    assert!(
        quic[3].contains("needs a client certificate"),
        "a QUIC client without a certificate is told why: {quic:?}"
    );
    expect("quic", "unknown_ca", 1);
    expect("quic", "expired", 1);
    expect("quic", "revoked", 1);
    expect("quic", "no_certificate", 1);
    expect("quic", "no_alpn", 1);
    let attacks_ended = Instant::now();

    // Every attempt is counted (the handshake timeouts land a moment after the attempt).
    let counted = wait_for(
        "every refused connection to be counted",
        Duration::from_secs(10),
        &sites,
        || {
            let counted = delta(&before, &rejected(metrics));
            (counted == expected)
                .then(|| counted.clone())
                .ok_or(format!(
                    "counted {counted:?}\nexpected {expected:?}\nQUIC: {quic:?}"
                ))
        },
    );
    // ...and logged, with its source (summary lines come at the end of their second).
    wait_for(
        "every refused connection to be logged",
        Duration::from_secs(5),
        &sites,
        || {
            let seen = delta(&log_before, &logged(&b.logs()));
            let mut want = counted.clone();
            want.remove(&key("link", "closed")); // logged at debug level only
            (seen == want)
                .then_some(())
                .ok_or(format!("logged {seen:?}\ncounted {want:?}"))
        },
    );
    // No secret reached the log: neither the token's code nor the tampered one.
    let log = b.logs();
    assert!(
        !log.contains(&code) && !log.contains(&flipped),
        "a token code is in the log"
    );

    // The site is up, its link untouched, and the carried connection completes intact.
    b.status_json();
    assert_eq!(http_get(metrics, "/healthz"), Ok((200, "ok\n".into())));
    b.link_up("a", "incoming")
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&sites)));
    assert_eq!(
        sample(metrics, "skiff_link_reconnects_total{link=\"a\"}"),
        0,
        "the link reconnected"
    );
    let outcome: Outcome = backend.runtime.block_on(carried).unwrap();
    assert_eq!(
        outcome.verdict,
        Verdict::Completed,
        "the carried connection: {outcome:?}\n{}",
        report(&sites)
    );
    assert_eq!(outcome.received, u64::from(request.down));
    assert!(
        outcome.ended > attacks_ended,
        "the carried connection ended before the attacks did; make it longer"
    );
    assert_eq!(backend.stats.silent(), 0);
    eprintln!(
        "over {}: refused {counted:?}; QUIC clients saw {quic:?}",
        transport()
    );
}

fn a_link_over_its_stream_limit_refuses_streams() {
    const LIMIT: u64 = 4;
    let backend = Backend::start();
    let (a_metrics, b_metrics) = (free_port(), free_port());
    let a = Site::start_with("a", &["--metrics-addr", &format!("127.0.0.1:{a_metrics}")]);
    let mut b = Site::init("b", &["--metrics-addr", &format!("127.0.0.1:{b_metrics}")]);
    b.run_args = vec!["--max-link-streams".into(), LIMIT.to_string()];
    b.run();
    a.link_to(&b);
    let addr = listener_to(&a, &b, "data", &backend);
    let sites = [&a, &b];

    // LIMIT slow connections fill the link's streams towards b...
    let slow = |seed| Request {
        seed,
        up: 100_000,
        down: 400_000,
        pace: Duration::from_secs(6),
    };
    let held: Vec<_> = (0..LIMIT)
        .map(|i| {
            backend
                .runtime
                .spawn(exchange(addr, slow(100 + i), Duration::from_secs(30)))
        })
        .collect();
    wait_for(
        "the slow connections to reach the backend",
        Duration::from_secs(10),
        &sites,
        || {
            let n = backend
                .stats
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed);
            (n >= LIMIT).then_some(()).ok_or(format!("{n} accepted"))
        },
    );
    // ...so the next ones are refused at once: their clients are reset, visibly.
    for seed in 0..3 {
        let started = Instant::now();
        let quick = Request {
            seed: 200 + seed,
            up: 1000,
            down: 1000,
            pace: Duration::ZERO,
        };
        let outcome = backend
            .runtime
            .block_on(exchange(addr, quick, Duration::from_secs(10)));
        assert!(
            matches!(outcome.verdict, Verdict::Reset(_)),
            "a connection over the limit: {outcome:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the refusal took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        sample(
            b_metrics,
            "skiff_link_streams_refused_total{peer_site=\"a\"}"
        ),
        3
    );
    assert_eq!(
        sample(
            a_metrics,
            "skiff_service_connect_errors_total{routing_key=\"data\",reason=\"exhausted\"}"
        ),
        3
    );
    assert!(b
        .logs()
        .contains("refusing new ones (see --max-link-streams)"));

    // The held connections complete intact; then the link carries new ones again.
    for task in held {
        let outcome = backend.runtime.block_on(task).unwrap();
        assert_eq!(outcome.verdict, Verdict::Completed, "{outcome:?}");
    }
    // A client's end is not yet b's: over QUIC, b's side of a finished stream waits for a's
    // acknowledgement of its last bytes before the stream lets go of its place on the link.
    wait_for(
        "b to let go of the finished streams",
        Duration::from_secs(15),
        &sites,
        || {
            let n = sample(b_metrics, "skiff_link_streams_active{peer_site=\"a\"}");
            (n == 0)
                .then_some(())
                .ok_or(format!("{n} streams still open"))
        },
    );
    let outcome = backend
        .runtime
        .block_on(exchange(addr, slow(300), Duration::from_secs(30)));
    assert_eq!(outcome.verdict, Verdict::Completed, "{outcome:?}");
    b.link_up("a", "incoming")
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&sites)));
    assert_eq!(backend.stats.silent(), 0);
}

#[test]
fn bad_limits_stop_the_daemon_before_it_binds() {
    let b = Site::init("b", &[]);
    for (flag, value) in [
        ("--max-link-streams", "0"),
        ("--max-handshakes", "0"),
        ("--handshake-timeout", "10ms"),
        ("--redemption-rate", "0"),
        ("--redemption-burst", "x"),
    ] {
        // Bounded: were the flag accepted, the daemon would run.
        let out = std::process::Command::new("timeout")
            .arg("10")
            .arg(common::skiff())
            .arg("--state-dir")
            .arg(b.state_dir())
            .args(["site", "run", flag, value])
            .output()
            .expect("cannot run skiff");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(flag),
            "site run {flag} {value}: {stderr}"
        );
    }
    // Nothing was bound: the link port is free.
    std::net::TcpListener::bind(("0.0.0.0", b.port)).expect("the link port was left bound");
}

#[test]
fn idle_connections_to_the_metrics_endpoint_are_bounded() {
    let metrics = free_port();
    let b = Site::start_with("b", &["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", b.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let baseline = fds();
    // Far more idle connections than the endpoint serves at once, each sending half a request
    // line and then nothing.
    let idle: Vec<TcpStream> = (0..400)
        .map(|_| {
            let mut tcp = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
            let _ = tcp.write_all(b"GET /met");
            tcp
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = fds() - baseline;
    assert!(
        held <= 256 + 8,
        "the daemon holds {held} more file descriptors for 400 idle connections"
    );
    // The daemon and its link port do not notice.
    b.status_json();
    let a = Site::start("a");
    a.link_to(&b);
    // The idle connections are closed after the header timeout; then scrapes work again.
    wait_for(
        "the metrics endpoint to answer again",
        Duration::from_secs(20),
        &[&a, &b],
        || match http_get(metrics, "/metrics") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    drop(idle);
}
