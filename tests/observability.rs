//! End-to-end tests of skiff's observability: real `skiff` daemons on loopback carry real TCP
//! connections, and the tests read what the sites say about it — `/metrics` (scraped with a
//! plain HTTP/1.1 GET over `std::net::TcpStream`), `/healthz`, `/readyz`, `/network.svg`, the
//! access log (text and `--log-format json`), every `-o json|yaml` output of the CLI,
//! `network status --dot` and `skiff debug dump` — and check it against what was carried,
//! byte for byte. The deploy files (Grafana dashboard, Prometheus examples) are checked too: they
//! parse, and every metric the dashboard queries exists in a real scrape.
//!
//! Every wait is bounded (`common::wait_for`); a failure prints the last observed state with
//! every involved site's links and daemon log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{free_port, skiff, wait_for, Site};
use serde_json::Value;

/// Bound for a metric to reach its expected value.
const METRIC_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for routes (listener targets) to appear.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound for one client connect, read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a site must notice a SIGKILL-ed peer (heartbeats: dead after 1 s of silence).
const LINK_DOWN_BOUND: Duration = Duration::from_secs(3);

/// Every metric family a site exports, with the names Prometheus stores (counters end in
/// `_total`, histograms have `_bucket`/`_sum`/`_count` series).
const METRIC_FAMILIES: &[&str] = &[
    "skiff_link_up",
    "skiff_link_rtt_seconds",
    "skiff_link_bytes_total",
    "skiff_link_streams_active",
    "skiff_link_reconnects_total",
    "skiff_link_lanes",
    "skiff_service_connections_opened_total",
    "skiff_service_connections_active",
    "skiff_service_connect_errors_total",
    "skiff_service_bytes_total",
    "skiff_service_connection_duration_seconds",
    "skiff_service_connect_latency_seconds",
    "skiff_routing_sites_reachable",
    "skiff_token_redemptions_total",
    "skiff_cert_expiry_timestamp_seconds",
];

// ---------------------------------------------------------------------------------------------
// HTTP: a minimal HTTP/1.1 GET over std TcpStream.
// ---------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// `GET path` on 127.0.0.1:port with `Connection: close`.
fn http_get(port: u16, path: &str) -> Result<HttpResponse, String> {
    let mut stream = TcpStream::connect_timeout(&local(port), Duration::from_secs(2))
        .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET {path}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("GET {path}: reading the response: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("GET {path}: not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {path}: bad status line {status_line:?}"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body).map_err(|e| format!("GET {path}: {e}"))?
    } else {
        if let Some(length) = headers.get("content-length") {
            let length: usize = length.parse().map_err(|_| "bad content-length")?;
            if length != body.len() {
                return Err(format!(
                    "GET {path}: content-length {length} but {} body bytes",
                    body.len()
                ));
            }
        }
        body.to_string()
    };
    Ok(HttpResponse {
        status,
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        body,
    })
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("truncated chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        body = rest[size..]
            .strip_prefix("\r\n")
            .ok_or("chunk without CRLF")?;
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: a parser for the text exposition format.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape of `/metrics`.
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Result<Scrape, String> {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_sample(line).map_err(|e| format!("{e} in line {line:?}"))?);
        }
        Ok(Scrape {
            samples,
            text: text.to_string(),
        })
    }

    /// The sum of the series of `name` whose labels include `labels`; `None` if there is none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        if matching.is_empty() {
            None
        } else {
            Some(matching.iter().sum())
        }
    }

    /// Checks that `name{labels}` is `want`; `Err` says what it is.
    fn expect(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Result<(), String> {
        match self.get(name, labels) {
            Some(v) if v == want => Ok(()),
            other => Err(format!("{name}{labels:?} is {other:?}, want {want}")),
        }
    }

    /// The family names of every sample (histogram suffixes stripped).
    fn families(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .map(|s| family(&s.name).to_string())
            .collect()
    }

    /// Every series of metrics whose name starts with `prefix`, for failure messages.
    fn show(&self, prefix: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `name` without a histogram series suffix.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut consumed = None;
        loop {
            // label name
            let mut key = String::new();
            for (i, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' if key.is_empty() => {
                        consumed = Some(i + 1);
                        break;
                    }
                    c => key.push(c),
                }
            }
            if consumed.is_some() {
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} without a quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("unterminated escape".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            let key = key.trim_start_matches(',').trim().to_string();
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.peek() {
                Some(&(_, ',')) => {
                    chars.next();
                }
                Some(&(i, '}')) => {
                    consumed = Some(i + 1);
                    break;
                }
                other => return Err(format!("unexpected {other:?} after a label")),
            }
        }
        rest = &after[consumed.ok_or("unterminated label set")?..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value")?
        .parse::<f64>()
        .map_err(|e| format!("bad value: {e}"))?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Scrapes `/metrics` on 127.0.0.1:port.
fn scrape(port: u16) -> Result<Scrape, String> {
    let response = http_get(port, "/metrics")?;
    if response.status != 200 {
        return Err(format!("/metrics answered {}", response.status));
    }
    if !response.content_type.contains("text") {
        return Err(format!(
            "/metrics has content type {:?}",
            response.content_type
        ));
    }
    if !response.body.ends_with("# EOF\n") {
        return Err("/metrics does not end with # EOF".into());
    }
    Scrape::parse(&response.body)
}

/// Waits until `check` accepts a scrape of `port`; returns that scrape.
fn wait_metrics(
    what: &str,
    port: u16,
    sites: &[&Site],
    mut check: impl FnMut(&Scrape) -> Result<(), String>,
) -> Scrape {
    wait_metrics_within(what, METRIC_TIMEOUT, port, sites, &mut check)
}

fn wait_metrics_within(
    what: &str,
    timeout: Duration,
    port: u16,
    sites: &[&Site],
    check: &mut dyn FnMut(&Scrape) -> Result<(), String>,
) -> Scrape {
    wait_for(what, timeout, sites, || {
        let scrape = scrape(port)?;
        check(&scrape).map_err(|e| format!("{e}\n--- scrape ---\n{}", scrape.show("skiff_")))?;
        Ok(scrape)
    })
}

fn metrics_arg(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

// ---------------------------------------------------------------------------------------------
// Backends and clients: real TCP in this process (std threads).
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads until the client half-closes, then answers `reply_len(read)` bytes and closes.
    ReplyAfterEof,
    /// Echoes everything; half-closes when the client does.
    Echo,
}

/// The size of the answer to `n` bytes: differs from `n`, so swapped directions show.
fn reply_len(n: usize) -> usize {
    n * 3 / 2 + 17
}

/// `n` bytes of test data.
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A backend on a loopback port, served by threads until dropped.
struct Backend {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start(behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind a backend");
        listener
            .set_nonblocking(true)
            .expect("cannot make the backend non-blocking");
        let port = listener.local_addr().expect("backend address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        thread::spawn(move || serve(conn, behaviour));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Backend { port, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut conn: TcpStream, behaviour: Behaviour) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                read += n;
                if let Behaviour::Echo = behaviour {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
            Err(_) => return,
        }
    }
    if let Behaviour::ReplyAfterEof = behaviour {
        if conn.write_all(&payload(reply_len(read))).is_err() {
            return;
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

fn connect(port: u16) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)
        .map_err(|e| format!("connect to {port}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Sends the rest of the request (half-closing) and reads the whole answer; returns its size.
fn finish(mut conn: TcpStream) -> Result<usize, String> {
    conn.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut got = Vec::new();
    conn.read_to_end(&mut got)
        .map_err(|e| format!("reading the answer after {} bytes: {e}", got.len()))?;
    Ok(got.len())
}

/// One client connection: sends `n` bytes, half-closes, reads the answer; returns its size.
fn exchange(port: u16, n: usize) -> Result<usize, String> {
    let mut conn = connect(port)?;
    conn.write_all(&payload(n))
        .map_err(|e| format!("sending {n} bytes: {e}"))?;
    finish(conn)
}

// ---------------------------------------------------------------------------------------------
// Sites: listeners, connectors, routes, daemons with extra `site run` arguments.
// ---------------------------------------------------------------------------------------------

/// `connector create KEY --host 127.0.0.1 --port PORT`.
fn connector(site: &Site, key: &str, port: u16) {
    site.ok(&[
        "connector",
        "create",
        key,
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ]);
}

/// `listener create KEY --port P` on a free port; returns the port.
fn listener(site: &Site, key: &str) -> u16 {
    let port = free_port();
    site.ok(&["listener", "create", key, "--port", &port.to_string()]);
    port
}

/// Waits until listener `name` of `site` is served by exactly `want`.
fn wait_targets(site: &Site, name: &str, want: &[&str], sites: &[&Site]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(
        &format!("listener {name} of {} served by {want:?}", site.name),
        ROUTE_TIMEOUT,
        sites,
        || {
            let list = json(&site.cli(&["listener", "list", "-o", "json"]))?;
            let seen: BTreeSet<String> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["name"] == name)
                .flat_map(|l| l["targets"].as_array().cloned().unwrap_or_default())
                .filter_map(|t| t.as_str().map(String::from))
                .collect();
            if seen == want {
                Ok(())
            } else {
                Err(format!("targets {seen:?} in {list}"))
            }
        },
    );
}

/// The stdout of a successful CLI run, parsed as JSON.
fn json(out: &std::process::Output) -> Result<Value, String> {
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })
}

/// A `site run` daemon started with arguments the harness does not pass (`--log-format json`,
/// `--no-access-log`); its stderr goes to its own file. Killed (SIGKILL) when dropped.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl Daemon {
    /// Runs `skiff --state-dir DIR ARGS...` and waits until the admin API answers.
    fn spawn(site: &Site, args: &[&str], log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).expect("cannot create the daemon log");
        let child = Command::new(skiff())
            .arg("--state-dir")
            .arg(site.state_dir())
            .args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("cannot spawn skiff");
        let mut daemon = Daemon {
            child: Some(child),
            log,
            name: site.name.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(exit) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                daemon.child = None;
                panic!(
                    "daemon of site {} ({args:?}) exited at start ({exit})\n--- log ---\n{}",
                    daemon.name,
                    daemon.logs()
                );
            }
            if site.cli(&["status", "-o", "json"]).status.success() {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "daemon of site {} ({args:?}) did not answer within 10 s\n--- log ---\n{}",
                daemon.name,
                daemon.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 10 s) for the exit.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(exit) = child.try_wait().expect("cannot wait for the daemon") {
                return exit;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon of site {} ignored SIGTERM for 10 s\n--- log ---\n{}",
                    self.name,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files of the repository: the dashboard and the Prometheus examples.
// ---------------------------------------------------------------------------------------------

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&repo_file("deploy/grafana/skiff.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/skiff.json is not JSON: {e}"))
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The PromQL expressions of every panel, and the queries of the template variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for q in [&var["definition"], &var["query"], &var["query"]["query"]] {
            if let Some(q) = q.as_str() {
                queries.push(q.to_string());
            }
        }
    }
    queries
}

/// The `skiff_...` metric names in `text`, histogram suffixes stripped.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("skiff_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.insert(family(&name).to_string());
    }
    names
}

// ---------------------------------------------------------------------------------------------
// XML: a small, strict well-formedness check (tags balanced, one root, attributes quoted,
// entities known), since no XML parser is a dependency and xmllint may be absent.
// ---------------------------------------------------------------------------------------------

fn check_entities(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        let after = &rest[i + 1..];
        let end = after
            .find(';')
            .ok_or_else(|| format!("unterminated entity at {:?}", &rest[i..]))?;
        let entity = &after[..end];
        let known = matches!(entity, "amp" | "lt" | "gt" | "quot" | "apos")
            || entity
                .strip_prefix("#x")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
            || entity
                .strip_prefix('#')
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
        if !known {
            return Err(format!("unknown entity &{entity};"));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

/// Parses `name attr="v" ...` (the inside of a start tag, without `/`).
fn check_start_tag(tag: &str) -> Result<String, String> {
    let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
    let name = &tag[..name_end];
    if !is_name(name) {
        return Err(format!("bad element name {name:?}"));
    }
    let mut rest = tag[name_end..].trim_start();
    let mut seen = BTreeSet::new();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("attribute without value in <{tag}>"))?;
        let attr = rest[..eq].trim();
        if !is_name(attr) || !seen.insert(attr.to_string()) {
            return Err(format!("bad or repeated attribute {attr:?} in <{name}>"));
        }
        let value = rest[eq + 1..].trim_start();
        let quote = value
            .chars()
            .next()
            .filter(|q| *q == '"' || *q == '\'')
            .ok_or_else(|| format!("unquoted attribute {attr} in <{name}>"))?;
        let close = value[1..]
            .find(quote)
            .ok_or_else(|| format!("unterminated attribute {attr} in <{name}>"))?;
        let text = &value[1..1 + close];
        if text.contains('<') {
            return Err(format!("'<' in attribute {attr} of <{name}>"));
        }
        check_entities(text)?;
        let after = &value[close + 2..];
        if !after.is_empty() && !after.starts_with(char::is_whitespace) {
            return Err(format!("no space after attribute {attr} in <{name}>"));
        }
        rest = after.trim_start();
    }
    Ok(name.to_string())
}

fn check_xml(doc: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = doc;
    loop {
        let next = rest.find('<').unwrap_or(rest.len());
        let text = &rest[..next];
        if stack.is_empty() && !text.trim().is_empty() {
            return Err(format!("text outside the root element: {:?}", text.trim()));
        }
        check_entities(text)?;
        rest = &rest[next..];
        if rest.is_empty() {
            break;
        }
        let (end_marker, skip) = if rest.starts_with("<?") {
            ("?>", true)
        } else if rest.starts_with("<!--") {
            ("-->", true)
        } else if rest.starts_with("<![CDATA[") {
            if stack.is_empty() {
                return Err("CDATA outside the root element".into());
            }
            ("]]>", true)
        } else if rest.starts_with("<!") {
            if roots > 0 {
                return Err("declaration after the root element".into());
            }
            (">", true)
        } else {
            (">", false)
        };
        if skip {
            let end = rest
                .find(end_marker)
                .ok_or_else(|| format!("unterminated {:?}", &rest[..rest.len().min(20)]))?;
            rest = &rest[end + end_marker.len()..];
            continue;
        }
        // A tag: find its '>' outside quoted attribute values.
        let mut quote = None;
        let mut end = None;
        for (i, c) in rest.char_indices().skip(1) {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '<') => return Err(format!("'<' inside a tag: {:?}", &rest[..i])),
                (None, '>') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or("unterminated tag")?;
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let name = name.trim_end();
            match stack.pop() {
                Some(open) if open == name => {}
                Some(open) => return Err(format!("</{name}> closes <{open}>")),
                None => return Err(format!("</{name}> without a start tag")),
            }
        } else {
            let (inner, empty) = match tag.strip_suffix('/') {
                Some(inner) => (inner, true),
                None => (tag, false),
            };
            let name = check_start_tag(inner.trim_end())?;
            if stack.is_empty() {
                roots += 1;
                if roots > 1 {
                    return Err(format!("second root element <{name}>"));
                }
            }
            if !empty {
                stack.push(name);
            }
        }
    }
    if let Some(open) = stack.last() {
        return Err(format!("<{open}> is never closed (open: {stack:?})"));
    }
    if roots != 1 {
        return Err("no root element".into());
    }
    Ok(())
}

#[test]
fn the_xml_check_catches_broken_documents() {
    check_xml("<?xml version=\"1.0\"?>\n<a x=\"1 &amp; 2\"><b/><c>t &lt; u</c></a>\n").unwrap();
    for bad in [
        "<a><b></a></b>",
        "<a>",
        "<a></a><b></b>",
        "<a x=1></a>",
        "<a>AT&T</a>",
        "<a x=\"<\"></a>",
        "text<a/>",
        "<a x=\"1\" x=\"2\"/>",
    ] {
        assert!(check_xml(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

/// Parses the `key=value` fields of the text-format access log lines of `key`.
fn text_access_lines(log: &str, key: &str) -> Vec<BTreeMap<String, String>> {
    log.lines()
        .filter(|l| l.contains(" skiff::access: "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|f| f.get("routing_key").map(String::as_str) == Some(key))
        .collect()
}

/// A listener site and a connector site linked; connections with known sizes; the listener
/// site's counters, gauges and histograms must equal what was carried, exactly — while
/// connections are held open and after they end — and so must the access log. Then a
/// connect error, a reconnect, and the dashboard's metric names against the real scrapes.
#[test]
fn service_traffic_is_counted_exactly() {
    let (alpha_port, beta_port) = (free_port(), free_port());
    let alpha = Site::start_with("alpha", &["--metrics-addr", &metrics_arg(alpha_port)]);
    let mut beta = Site::start_with("beta", &["--metrics-addr", &metrics_arg(beta_port)]);
    alpha.link_to(&beta);
    let backend = Backend::start(Behaviour::ReplyAfterEof);
    connector(&beta, "echo", backend.port);
    let port = listener(&alpha, "echo");
    wait_targets(&alpha, "echo", &["beta"], &[&alpha, &beta]);
    let sites = [&alpha, &beta];

    let before = scrape(alpha_port).unwrap();
    assert_eq!(
        before.get("skiff_service_connections_opened_total", &[]),
        None,
        "connections counted before any client came:\n{}",
        before.show("skiff_service")
    );

    // Concurrent connections of known sizes, each answered with reply_len(size) bytes.
    let sizes: Vec<usize> = vec![
        0,
        1,
        7,
        1000,
        12_345,
        65_535,
        65_536,
        65_537,
        250_001,
        1 << 20,
    ];
    let clients: Vec<_> = sizes
        .iter()
        .map(|&n| thread::spawn(move || exchange(port, n)))
        .collect();
    let mut expected_pairs: Vec<(u64, u64)> = Vec::new();
    for (client, &n) in clients.into_iter().zip(&sizes) {
        let got = client.join().expect("client thread panicked");
        match got {
            Ok(got) => assert_eq!(got, reply_len(n), "client of {n} bytes got {got}"),
            Err(e) => panic!(
                "client of {n} bytes failed: {e}\n{}",
                common::report(&sites)
            ),
        }
        expected_pairs.push((n as u64, reply_len(n) as u64));
    }
    let mut sent: u64 = sizes.iter().map(|&n| n as u64).sum();
    let mut answered: u64 = sizes.iter().map(|&n| reply_len(n) as u64).sum();
    wait_metrics("phase 1 connections ended", alpha_port, &sites, |s| {
        s.expect(
            "skiff_service_connections_active",
            &[("routing_key", "echo")],
            0.0,
        )
    });

    // Connections held open: the gauges show them, the byte counters move before they end.
    let held_sizes = [100usize, 2000, 30_000];
    let mut held = Vec::new();
    for &n in &held_sizes {
        let mut conn = connect(port).unwrap();
        conn.write_all(&payload(n)).unwrap();
        held.push((conn, n));
    }
    let opened_so_far = (sizes.len() + held_sizes.len()) as f64;
    let held_sent: u64 = held_sizes.iter().map(|&n| n as u64).sum();
    let during = wait_metrics("held connections visible", alpha_port, &sites, |s| {
        s.expect(
            "skiff_service_connections_active",
            &[("routing_key", "echo")],
            3.0,
        )?;
        s.expect("skiff_link_streams_active", &[("peer_site", "beta")], 3.0)?;
        s.expect(
            "skiff_service_connections_opened_total",
            &[("routing_key", "echo"), ("target_site", "beta")],
            opened_so_far,
        )?;
        s.expect(
            "skiff_service_bytes_total",
            &[("routing_key", "echo"), ("direction", "to_target")],
            (sent + held_sent) as f64,
        )?;
        s.expect(
            "skiff_service_bytes_total",
            &[("routing_key", "echo"), ("direction", "to_client")],
            answered as f64,
        )?;
        s.expect(
            "skiff_service_connect_latency_seconds_count",
            &[],
            opened_so_far,
        )?;
        // Durations are observed when connections end: the held ones are not in yet.
        s.expect(
            "skiff_service_connection_duration_seconds_count",
            &[],
            sizes.len() as f64,
        )
    });
    assert!(
        during.get(
            "skiff_link_bytes_total",
            &[("peer_site", "beta"), ("direction", "tx")]
        ) == Some((sent + held_sent) as f64),
        "link tx while held:\n{}",
        during.show("skiff_link_bytes")
    );
    wait_metrics(
        "held connections on the connector site",
        beta_port,
        &sites,
        |s| s.expect("skiff_link_streams_active", &[("peer_site", "alpha")], 3.0),
    );
    for (conn, n) in held {
        let got = finish(conn).unwrap_or_else(|e| panic!("held client of {n} bytes: {e}"));
        assert_eq!(got, reply_len(n), "held client of {n} bytes got {got}");
        sent += n as u64;
        answered += reply_len(n) as u64;
        expected_pairs.push((n as u64, reply_len(n) as u64));
    }
    let total = (sizes.len() + held_sizes.len()) as f64;

    // After: every counter exact.
    let after = wait_metrics("every connection counted", alpha_port, &sites, |s| {
        s.expect(
            "skiff_service_connections_active",
            &[("routing_key", "echo")],
            0.0,
        )?;
        s.expect("skiff_link_streams_active", &[("peer_site", "beta")], 0.0)?;
        s.expect(
            "skiff_service_connections_opened_total",
            &[("routing_key", "echo"), ("target_site", "beta")],
            total,
        )?;
        s.expect(
            "skiff_service_bytes_total",
            &[("routing_key", "echo"), ("direction", "to_target")],
            sent as f64,
        )?;
        s.expect(
            "skiff_service_bytes_total",
            &[("routing_key", "echo"), ("direction", "to_client")],
            answered as f64,
        )?;
        s.expect(
            "skiff_link_bytes_total",
            &[("peer_site", "beta"), ("direction", "tx")],
            sent as f64,
        )?;
        s.expect(
            "skiff_link_bytes_total",
            &[("peer_site", "beta"), ("direction", "rx")],
            answered as f64,
        )?;
        s.expect("skiff_service_connect_latency_seconds_count", &[], total)?;
        s.expect(
            "skiff_service_connect_latency_seconds_bucket",
            &[("le", "+Inf")],
            total,
        )?;
        s.expect(
            "skiff_service_connection_duration_seconds_count",
            &[],
            total,
        )?;
        s.expect(
            "skiff_service_connection_duration_seconds_bucket",
            &[("le", "+Inf")],
            total,
        )
    });
    assert_eq!(
        after.get("skiff_service_connect_errors_total", &[]),
        None,
        "connect errors without a failed connection"
    );
    assert!(
        after
            .get("skiff_service_connection_duration_seconds_sum", &[])
            .is_some_and(|s| s > 0.0)
            && after
                .get("skiff_service_connect_latency_seconds_sum", &[])
                .is_some_and(|s| s > 0.0),
        "histogram sums:\n{}",
        after.show("skiff_service_conn")
    );
    assert!(
        after
            .get("skiff_link_rtt_seconds", &[("peer_site", "beta")])
            .is_some_and(|rtt| rtt > 0.0 && rtt < 1.0),
        "rtt:\n{}",
        after.show("skiff_link_rtt")
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for kind in ["ca", "server"] {
        let expiry = after.get("skiff_cert_expiry_timestamp_seconds", &[("kind", kind)]);
        assert!(
            expiry.is_some_and(|t| t > now + 86_400.0),
            "{kind} certificate expiry {expiry:?} (now {now})"
        );
    }
    // The connector site counts the same bytes on its side of the link.
    wait_metrics("connector site's link bytes", beta_port, &sites, |s| {
        s.expect(
            "skiff_link_bytes_total",
            &[("peer_site", "alpha"), ("direction", "rx")],
            sent as f64,
        )?;
        s.expect(
            "skiff_link_bytes_total",
            &[("peer_site", "alpha"), ("direction", "tx")],
            answered as f64,
        )?;
        s.expect("skiff_link_streams_active", &[("peer_site", "alpha")], 0.0)
    });

    // One access log line per connection, with its exact byte counts.
    let lines = text_access_lines(&alpha.logs(), "echo");
    let mut logged: Vec<(u64, u64)> = lines
        .iter()
        .map(|f| {
            assert_eq!(
                f.get("target_site").map(String::as_str),
                Some("beta"),
                "{f:?}"
            );
            assert_eq!(f.get("end").map(String::as_str), Some("closed"), "{f:?}");
            let n = |k: &str| -> u64 {
                f.get(k)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("access log line without {k}: {f:?}"))
            };
            (n("bytes_to_target"), n("bytes_to_client"))
        })
        .collect();
    logged.sort_unstable();
    expected_pairs.sort_unstable();
    assert_eq!(logged, expected_pairs, "access log byte counts");

    // A client of a key nobody serves: a connect error with reason no_target.
    let ghost = listener(&alpha, "ghost");
    // The reset may come so fast that even the connect reports it.
    if let Ok(mut conn) = connect(ghost) {
        let mut buf = [0u8; 16];
        let refused = conn.read(&mut buf);
        assert!(
            matches!(refused, Ok(0) | Err(_)),
            "a client of an unserved key got {refused:?}"
        );
    }
    wait_metrics("no_target counted", alpha_port, &sites, |s| {
        s.expect(
            "skiff_service_connect_errors_total",
            &[("routing_key", "ghost"), ("reason", "no_target")],
            1.0,
        )?;
        s.expect(
            "skiff_service_connections_active",
            &[("routing_key", "ghost")],
            0.0,
        )
    });

    // The connector site restarts: the link comes back, counted as one reconnect. (Its
    // counters start again from zero: keep what it exported before.)
    let beta_before_restart = scrape(beta_port).unwrap();
    beta.restart();
    let sites = [&alpha, &beta];
    let alpha_final = wait_metrics("link back up after a restart", alpha_port, &sites, |s| {
        s.expect(
            "skiff_link_up",
            &[
                ("link", "beta"),
                ("peer_site", "beta"),
                ("direction", "outgoing"),
            ],
            1.0,
        )?;
        s.expect("skiff_link_reconnects_total", &[("link", "beta")], 1.0)
    });
    let beta_final = wait_metrics("beta sees the link again", beta_port, &sites, |s| {
        s.expect(
            "skiff_link_up",
            &[("peer_site", "alpha"), ("direction", "incoming")],
            1.0,
        )
    });

    // Every family is exported by one of the two sites, documented, and every metric the
    // dashboard queries exists in these real scrapes.
    let mut exported = alpha_final.families();
    exported.extend(beta_final.families());
    exported.extend(after.families());
    exported.extend(beta_before_restart.families());
    let docs = repo_file("docs/metrics.md");
    for family in METRIC_FAMILIES {
        assert!(
            exported.contains(*family),
            "{family} not exported by a site that carried traffic; exported: {exported:?}"
        );
    }
    for family in &exported {
        assert!(
            docs.contains(family.as_str()),
            "{family} is exported but not documented in docs/metrics.md"
        );
    }
    let dashboard = dashboard();
    let mut referenced = BTreeSet::new();
    for query in dashboard_queries(&dashboard) {
        referenced.extend(metric_names(&query));
    }
    assert!(!referenced.is_empty(), "the dashboard queries no metric");
    let unknown: Vec<&String> = referenced.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics no site exports: {unknown:?}\nexported: {exported:?}"
    );
}

/// A hub with two linked sites: `skiff_link_up` is 1 for both links, then 0 (within
/// [`LINK_DOWN_BOUND`]) for the one whose peer is SIGKILL-ed, on the surviving side, and
/// `skiff_routing_sites_reachable` drops with it — on the hub and on the other spoke.
fn link_down_is_seen_within_three_seconds() {
    let (hub_port, west_port) = (free_port(), free_port());
    let mut hub = Site::start_with("hub", &["--metrics-addr", &metrics_arg(hub_port)]);
    let mut east = Site::start("east");
    let west = Site::start_with("west", &["--metrics-addr", &metrics_arg(west_port)]);
    east.link_to(&hub);
    west.link_to(&hub);
    {
        let sites = [&hub, &east, &west];
        wait_metrics("hub sees both links up", hub_port, &sites, |s| {
            s.expect(
                "skiff_link_up",
                &[("peer_site", "east"), ("direction", "incoming")],
                1.0,
            )?;
            s.expect(
                "skiff_link_up",
                &[("peer_site", "west"), ("direction", "incoming")],
                1.0,
            )?;
            s.expect("skiff_routing_sites_reachable", &[], 2.0)
        });
        wait_metrics("west reaches hub and east", west_port, &sites, |s| {
            s.expect(
                "skiff_link_up",
                &[("peer_site", "hub"), ("direction", "outgoing")],
                1.0,
            )?;
            s.expect("skiff_routing_sites_reachable", &[], 2.0)
        });
    }

    east.kill();
    let killed = Instant::now();
    let sites = [&hub, &west];
    wait_metrics_within(
        "hub sees east down",
        LINK_DOWN_BOUND,
        hub_port,
        &sites,
        &mut |s| {
            s.expect("skiff_link_up", &[("peer_site", "east")], 0.0)?;
            s.expect("skiff_link_up", &[("peer_site", "west")], 1.0)?;
            s.expect("skiff_routing_sites_reachable", &[], 1.0)
        },
    );
    let remaining = LINK_DOWN_BOUND.saturating_sub(killed.elapsed());
    wait_metrics_within(
        "west no longer reaches east",
        remaining.max(Duration::from_millis(500)),
        west_port,
        &sites,
        &mut |s| {
            s.expect("skiff_link_up", &[("peer_site", "hub")], 1.0)?;
            s.expect("skiff_routing_sites_reachable", &[], 1.0)
        },
    );
    eprintln!("east's death seen everywhere after {:?}", killed.elapsed());

    hub.kill();
    let killed = Instant::now();
    let sites = [&west];
    wait_metrics_within(
        "west sees hub down",
        LINK_DOWN_BOUND,
        west_port,
        &sites,
        &mut |s| {
            s.expect(
                "skiff_link_up",
                &[
                    ("link", "hub"),
                    ("peer_site", "hub"),
                    ("direction", "outgoing"),
                ],
                0.0,
            )?;
            s.expect("skiff_routing_sites_reachable", &[], 0.0)
        },
    );
    eprintln!("hub's death seen after {:?}", killed.elapsed());
}

on_every_transport!(link_down_is_seen_within_three_seconds);

/// /healthz, /readyz, /network.svg, token redemption counters, every `-o json|yaml` output,
/// `network status --dot` and `debug dump`.
#[test]
fn endpoints_cli_outputs_and_debug_dump() {
    let (alpha_port, beta_port) = (free_port(), free_port());
    let alpha = Site::start_with("alpha", &["--metrics-addr", &metrics_arg(alpha_port)]);
    let beta = Site::start_with("beta", &["--metrics-addr", &metrics_arg(beta_port)]);
    let sites = [&alpha, &beta];

    for port in [alpha_port, beta_port] {
        let health = http_get(port, "/healthz").unwrap();
        assert_eq!((health.status, health.body.trim()), (200, "ok"));
        let ready = http_get(port, "/readyz").unwrap();
        assert_eq!((ready.status, ready.body.trim()), (200, "ready"));
        let other = http_get(port, "/nothing-here").unwrap();
        assert_eq!(other.status, 404);
    }

    // Token redemptions: beta grants alpha's; a second site presenting the used token is
    // refused and counted as `used`.
    alpha.link_to(&beta);
    wait_metrics("granted redemption counted", beta_port, &sites, |s| {
        s.expect(
            "skiff_token_redemptions_total",
            &[("result", "granted")],
            1.0,
        )
    });
    let carol = Site::start("carol");
    let used = beta.scratch("to-beta-from-alpha.yaml");
    assert!(used.exists(), "link_to no longer writes {}", used.display());
    let out = carol.redeem(&used);
    assert!(
        !out.status.success(),
        "a used token was redeemed again: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already used"), "refusal: {stderr}");
    wait_metrics("used redemption counted", beta_port, &sites, |s| {
        s.expect("skiff_token_redemptions_total", &[("result", "used")], 1.0)?;
        s.expect(
            "skiff_token_redemptions_total",
            &[("result", "granted")],
            1.0,
        )?;
        s.expect("skiff_token_redemptions_total", &[], 2.0)
    });
    drop(carol);

    // Services on both sites, so the pictures have routing keys.
    let backend = Backend::start(Behaviour::ReplyAfterEof);
    connector(&beta, "web", backend.port);
    connector(&alpha, "db", backend.port);
    listener(&alpha, "web");
    wait_targets(&alpha, "web", &["beta"], &sites);

    // /network.svg: well-formed XML naming every site and key, on both sites.
    for port in [alpha_port, beta_port] {
        wait_for(
            "network.svg names every site and key",
            ROUTE_TIMEOUT,
            &sites,
            || {
                let svg = http_get(port, "/network.svg")?;
                if svg.status != 200 || svg.content_type != "image/svg+xml" {
                    return Err(format!("{} {:?}", svg.status, svg.content_type));
                }
                check_xml(&svg.body)
                    .map_err(|e| format!("not well-formed XML: {e}\n{}", svg.body))?;
                if !svg.body.trim_start().starts_with("<?xml") || !svg.body.contains("<svg") {
                    return Err(format!("not an SVG document:\n{}", svg.body));
                }
                for site in ["alpha", "beta"] {
                    // A site's box is titled "NAME", "NAME (this site)" or "NAME (unreachable)".
                    if !svg.body.contains(&format!(">{site}<"))
                        && !svg.body.contains(&format!(">{site} ("))
                    {
                        return Err(format!("no box for site {site} in\n{}", svg.body));
                    }
                }
                for text in ["serves web", "serves db", "cost 1"] {
                    if !svg.body.contains(text) {
                        return Err(format!("no {text:?} in\n{}", svg.body));
                    }
                }
                Ok(())
            },
        );
    }
    // A second opinion from xmllint, where it is installed.
    let xmllint = Command::new("xmllint")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if xmllint {
        let svg = http_get(alpha_port, "/network.svg").unwrap().body;
        let mut child = Command::new("xmllint")
            .args(["--noout", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(svg.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "xmllint: {}\n{svg}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("note: xmllint is not installed; /network.svg checked by check_xml only");
    }

    // Every structured output parses, as JSON and as YAML, and both say the same.
    fn strip_rtt(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("rttMs");
                map.values_mut().for_each(strip_rtt);
            }
            Value::Array(list) => list.iter_mut().for_each(strip_rtt),
            _ => {}
        }
    }
    let commands: [&[&str]; 5] = [
        &["status"],
        &["link", "status"],
        &["listener", "list"],
        &["connector", "list"],
        &["network", "status"],
    ];
    for site in [&alpha, &beta] {
        for command in commands {
            let run = |format: &str| {
                let mut args = command.to_vec();
                args.extend(["-o", format]);
                site.ok(&args)
            };
            let text = run("json");
            let mut from_json: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!(
                    "{}: `{}` -o json: {e}:\n{text}",
                    site.name,
                    command.join(" ")
                )
            });
            let text = run("yaml");
            let mut from_yaml: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| {
                panic!(
                    "{}: `{}` -o yaml: {e}:\n{text}",
                    site.name,
                    command.join(" ")
                )
            });
            strip_rtt(&mut from_json);
            strip_rtt(&mut from_yaml);
            assert_eq!(
                from_json,
                from_yaml,
                "{}: `{}`: JSON and YAML differ",
                site.name,
                command.join(" ")
            );
        }
    }
    let status: Value = serde_json::from_str(&alpha.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["site"]["name"], "alpha");
    let network: Value =
        serde_json::from_str(&alpha.ok(&["network", "status", "-o", "json"])).unwrap();
    let names: BTreeSet<&str> = network["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["alpha", "beta"]), "{network}");
    let connectors: Value =
        serde_json::from_str(&alpha.ok(&["connector", "list", "-o", "json"])).unwrap();
    assert_eq!(connectors[0]["routingKey"], "db", "{connectors}");

    // DOT.
    for site in [&alpha, &beta] {
        let dot = site.ok(&["network", "status", "--dot"]);
        assert!(dot.starts_with("graph skiff {"), "{dot}");
        assert!(dot.trim_end().ends_with('}'), "{dot}");
        for name in ["\"alpha\"", "\"beta\"", "serves web", "serves db"] {
            assert!(dot.contains(name), "no {name} in\n{dot}");
        }
        assert!(
            dot.contains("\"alpha\" -- \"beta\"") || dot.contains("\"beta\" -- \"alpha\""),
            "no edge in\n{dot}"
        );
    }

    // debug dump of the issuing site, which holds grants (one used, one live).
    beta.issue("spare.yaml", &[]);
    let archive = beta.scratch("dump.tar.gz");
    let archive_arg = archive.to_str().unwrap();
    let said = beta.ok(&["debug", "dump", archive_arg]);
    assert!(said.contains("wrote"), "{said}");
    let listing = Command::new("tar")
        .args(["tzf", archive_arg])
        .output()
        .unwrap();
    assert!(listing.status.success(), "tar tzf failed");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let files: BTreeSet<&str> = listing
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .collect();
    for want in ["config.json", "status.json", "recent.log", "metrics.txt"] {
        assert!(files.contains(want), "no {want} in the dump: {listing}");
    }
    let out_dir = beta.scratch("dump");
    std::fs::create_dir_all(&out_dir).unwrap();
    let extracted = Command::new("tar")
        .args(["xzf", archive_arg, "-C"])
        .arg(&out_dir)
        .status()
        .unwrap();
    assert!(extracted.success(), "tar xzf failed");
    let mut contents: BTreeMap<String, String> = BTreeMap::new();
    for line in listing.lines().filter(|l| !l.ends_with('/')) {
        let text = std::fs::read_to_string(out_dir.join(line)).unwrap();
        contents.insert(line.rsplit('/').next().unwrap().to_string(), text);
    }
    // The real code hashes, from the state file, must appear nowhere in the dump.
    fn code_hashes(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("codeSha256", Value::String(s)) => out.push(s.clone()),
                        _ => code_hashes(v, out),
                    }
                }
            }
            Value::Array(list) => list.iter().for_each(|v| code_hashes(v, out)),
            _ => {}
        }
    }
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(beta.state_dir().join("state.json")).unwrap(),
    )
    .unwrap();
    let mut real = Vec::new();
    code_hashes(&state, &mut real);
    assert!(real.len() >= 2, "expected two grants in {state}");
    for (name, text) in &contents {
        assert!(!text.contains("PRIVATE KEY"), "{name} holds a private key");
        for hash in &real {
            assert!(
                !text.contains(hash.as_str()),
                "{name} holds a grant code hash"
            );
        }
    }
    let config: Value = serde_json::from_str(&contents["config.json"]).unwrap();
    let mut masked = Vec::new();
    code_hashes(&config, &mut masked);
    assert_eq!(masked.len(), real.len(), "grants in config.json: {config}");
    assert!(masked.iter().all(|h| h == "***"), "{masked:?}");
    let status: Value = serde_json::from_str(&contents["status.json"]).unwrap();
    assert_eq!(status["site"]["name"], "beta");
    assert!(contents["recent.log"].contains("site running"));
    let metrics = Scrape::parse(&contents["metrics.txt"]).unwrap();
    assert_eq!(
        metrics.get("skiff_token_redemptions_total", &[("result", "granted")]),
        Some(1.0),
        "{}",
        contents["metrics.txt"]
    );
}

/// `--log-format json`: every stderr line of the daemon is a JSON object, from start to
/// SIGTERM; the access log line carries routing_key, target_site, bytes_to_target,
/// bytes_to_client and end. Connections served by the site's own connector are counted too
/// (when they end). `--no-access-log` silences the access log only.
#[test]
fn json_logs_and_the_access_log() {
    let port = free_port();
    let solo = Site::init("solo", &["--metrics-addr", &metrics_arg(port)]);
    let log = solo.scratch("json.log");
    let mut daemon = Daemon::spawn(&solo, &["--log-format", "json", "site", "run"], log);
    let backend = Backend::start(Behaviour::ReplyAfterEof);
    connector(&solo, "local", backend.port);
    let listen = listener(&solo, "local");
    wait_targets(&solo, "local", &["solo"], &[&solo]);
    let sizes = [0usize, 10, 70_000];
    for &n in &sizes {
        assert_eq!(exchange(listen, n), Ok(reply_len(n)));
    }
    let sent: usize = sizes.iter().sum();
    let answered: usize = sizes.iter().map(|&n| reply_len(n)).sum();
    wait_metrics("local connections counted", port, &[&solo], |s| {
        s.expect(
            "skiff_service_connections_opened_total",
            &[("routing_key", "local"), ("target_site", "solo")],
            3.0,
        )?;
        s.expect(
            "skiff_service_connections_active",
            &[("routing_key", "local")],
            0.0,
        )?;
        s.expect(
            "skiff_service_bytes_total",
            &[("routing_key", "local"), ("direction", "to_target")],
            sent as f64,
        )?;
        s.expect(
            "skiff_service_bytes_total",
            &[("routing_key", "local"), ("direction", "to_client")],
            answered as f64,
        )
    });
    let exit = daemon.stop();
    assert!(exit.success(), "exit {exit}\n{}", daemon.logs());

    let parse_lines = |text: &str| -> Vec<Value> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match serde_json::from_str::<Value>(l) {
                Ok(v) if v.is_object() => v,
                _ => panic!("a stderr line is not a JSON object: {l:?}\n--- log ---\n{text}"),
            })
            .collect()
    };
    let text = daemon.logs();
    let lines = parse_lines(&text);
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for want in ["site running", "site stopped"] {
        assert!(messages.contains(&want), "no {want:?} line in\n{text}");
    }
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "skiff::access")
        .collect();
    let mut logged: Vec<(u64, u64)> = access
        .iter()
        .map(|l| {
            let f = &l["fields"];
            assert_eq!(f["routing_key"], "local", "{l}");
            assert_eq!(f["target_site"], "solo", "{l}");
            assert_eq!(f["end"], "closed", "{l}");
            assert!(
                f["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("127.0.0.1:")),
                "{l}"
            );
            assert!(f["duration_ms"].is_u64(), "{l}");
            (
                f["bytes_to_target"].as_u64().expect("bytes_to_target"),
                f["bytes_to_client"].as_u64().expect("bytes_to_client"),
            )
        })
        .collect();
    logged.sort_unstable();
    let mut expected: Vec<(u64, u64)> = sizes
        .iter()
        .map(|&n| (n as u64, reply_len(n) as u64))
        .collect();
    expected.sort_unstable();
    assert_eq!(logged, expected, "access log lines:\n{text}");

    // --no-access-log: traffic still flows and is counted, but no access line.
    let quiet_log = solo.scratch("quiet.log");
    let mut daemon = Daemon::spawn(
        &solo,
        &["--log-format", "json", "site", "run", "--no-access-log"],
        quiet_log,
    );
    wait_targets(&solo, "local", &["solo"], &[&solo]);
    assert_eq!(exchange(listen, 5), Ok(reply_len(5)));
    wait_metrics("counted without an access log", port, &[&solo], |s| {
        s.expect(
            "skiff_service_connections_opened_total",
            &[("routing_key", "local")],
            1.0,
        )?;
        s.expect(
            "skiff_service_connections_active",
            &[("routing_key", "local")],
            0.0,
        )
    });
    let exit = daemon.stop();
    let text = daemon.logs();
    assert!(exit.success(), "exit {exit}\n{text}");
    let lines = parse_lines(&text);
    assert!(
        lines.iter().all(|l| l["target"] != "skiff::access"),
        "access log line despite --no-access-log:\n{text}"
    );
}

/// `--log-format json` holds for a daemon that cannot start, too: its fatal error is the last
/// thing a log collector sees of it, so it must be a JSON line like the others.
#[test]
fn json_logs_include_a_fatal_error() {
    let port = free_port();
    let site = Site::init("doomed", &["--metrics-addr", &metrics_arg(port)]);
    // Someone else holds the metrics port: the daemon must fail to start.
    let _taken = TcpListener::bind(local(port)).expect("cannot take the metrics port");
    let mut child = Command::new(skiff())
        .arg("--state-dir")
        .arg(site.state_dir())
        .args(["--log-format", "json", "site", "run"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot spawn skiff");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started although its metrics port is taken");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "exit {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metrics address"),
        "no reason given: {stderr}"
    );
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "with --log-format json, the daemon wrote a line that is not a JSON object: \
             {line:?}\n--- stderr ---\n{stderr}"
        );
    }
}

/// A client that resets its connection after both directions carried bytes: the byte
/// counters and the access log must still say what was carried — for a connection carried to
/// another site and for one served by this site's own connector alike.
#[test]
fn reset_connections_count_the_bytes_they_carried() {
    let (alpha_port, beta_port) = (free_port(), free_port());
    let alpha = Site::start_with("alpha", &["--metrics-addr", &metrics_arg(alpha_port)]);
    let beta = Site::start_with("beta", &["--metrics-addr", &metrics_arg(beta_port)]);
    alpha.link_to(&beta);
    let sites = [&alpha, &beta];
    let echo = Backend::start(Behaviour::Echo);
    connector(&beta, "far", echo.port);
    connector(&alpha, "near", echo.port);
    let far = listener(&alpha, "far");
    let near = listener(&alpha, "near");
    wait_targets(&alpha, "far", &["beta"], &sites);
    wait_targets(&alpha, "near", &["alpha"], &sites);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const N: usize = 5000;
    let mut failures = Vec::new();
    for (key, port, target) in [("far", far, "beta"), ("near", near, "alpha")] {
        // Send N bytes, read their N-byte echo, then close with RST.
        let mut conn = connect(port).unwrap();
        conn.write_all(&payload(N)).unwrap();
        let mut back = vec![0u8; N];
        conn.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("{key}: echo: {e}"));
        assert_eq!(back, payload(N), "{key}: echo differs");
        conn.set_nonblocking(true).unwrap();
        runtime.block_on(async {
            let conn = tokio::net::TcpStream::from_std(conn).unwrap();
            conn.set_zero_linger().unwrap();
            drop(conn);
        });
        let scrape = wait_metrics(
            &format!("the reset {key} connection ended"),
            alpha_port,
            &sites,
            |s| {
                s.expect(
                    "skiff_service_connections_opened_total",
                    &[("routing_key", key), ("target_site", target)],
                    1.0,
                )?;
                s.expect(
                    "skiff_service_connections_active",
                    &[("routing_key", key)],
                    0.0,
                )
            },
        );
        let counted = |direction: &str| {
            scrape.get(
                "skiff_service_bytes_total",
                &[("routing_key", key), ("direction", direction)],
            )
        };
        let (to_target, to_client) = (counted("to_target"), counted("to_client"));
        let logged = text_access_lines(&alpha.logs(), key);
        let line = logged.first().cloned().unwrap_or_default();
        let ok = to_target == Some(N as f64)
            && to_client == Some(N as f64)
            && line.get("bytes_to_target").map(String::as_str) == Some("5000")
            && line.get("bytes_to_client").map(String::as_str) == Some("5000")
            && line.get("end").map(String::as_str) == Some("reset");
        if !ok {
            failures.push(format!(
                "{key} (served by {target}): carried {N} bytes each way before the client's \
                 RST, but skiff_service_bytes_total says to_target={to_target:?} \
                 to_client={to_client:?} and the access log says {line:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The Grafana dashboard and the Prometheus examples parse and have the expected shape.
#[test]
fn deploy_files_parse() {
    let dashboard = dashboard();
    let version = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!((36..=41).contains(&version), "schemaVersion {version}");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "site"] {
        assert_eq!(var(name)["type"], "query");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}");
    }
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in panels(&dashboard) {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "id twice"
        );
        let title = panel["title"].as_str().expect("panel title");
        titles.push(title);
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("skiff_"), "{title}: {expr}");
            assert!(
                expr.contains("instance=~\"$site\""),
                "{title} ignores $site: {expr}"
            );
        }
    }
    let mut referenced = BTreeSet::new();
    for query in dashboard_queries(&dashboard) {
        referenced.extend(metric_names(&query));
    }
    for family in METRIC_FAMILIES {
        assert!(
            referenced.contains(*family),
            "the dashboard shows nothing of {family}"
        );
    }
    for query in dashboard_queries(&dashboard) {
        if query.contains("_bucket") {
            assert!(query.contains("histogram_quantile"), "{query}");
        }
    }

    let prometheus: Value = serde_yaml_ng::from_str(&repo_file("deploy/prometheus/prometheus.yml"))
        .expect("prometheus.yml is not YAML");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"], "skiff");
    assert_eq!(job["metrics_path"], "/metrics");
    assert!(
        job["static_configs"][0]["targets"][0].is_string(),
        "{prometheus}"
    );
    let monitor: Value =
        serde_yaml_ng::from_str(&repo_file("deploy/prometheus/servicemonitor.yaml"))
            .expect("servicemonitor.yaml is not YAML");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "ServiceMonitor");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "skiff"
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
}
