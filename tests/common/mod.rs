//! A small harness for end-to-end tests that run the real `skiff` binary as separate sites.
//!
//! A [`Site`] owns a temporary directory (state dir + daemon log), a loopback link port, and the
//! `skiff site run` child process, which is killed (SIGKILL) when the `Site` is dropped.
//! [`wait_for`] and [`hold_for`] poll with a bound and, on failure, print the last observed
//! state together with every involved site's links and daemon log.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// How long a daemon may take to answer its admin API after being started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM-ed daemon may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(100);

/// The binary under test: this build's, or the one `SKIFF_BIN` names (say, a release build
/// for the load run).
pub fn skiff() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("SKIFF_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_skiff").to_string())
    })
}

/// One site: its state dir, its link port and (while running) its daemon.
pub struct Site {
    /// The site's name.
    pub name: String,
    /// Its link port on 127.0.0.1.
    pub port: u16,
    dir: TempDir,
    daemon: Option<Child>,
    /// Extra `site run` arguments (`--drain-timeout 1s`), for every later start.
    pub run_args: Vec<String>,
    /// The network namespace the daemon runs in (`None`: this process's).
    netns: Option<String>,
    /// A tmpfs mounted on the state dir, unmounted when the site is dropped.
    tmpfs: Option<PathBuf>,
}

/// Where a site runs when it is not on loopback in this process's network namespace.
pub struct Host<'a> {
    /// The network namespace its daemon runs in (the CLI talks to it over the admin socket,
    /// which namespaces do not separate).
    pub netns: &'a str,
    /// The addresses other sites reach its link port at (`--link-host`, in order).
    pub link_hosts: &'a [&'a str],
    /// Mount a tmpfs of this size (`1m`) on the state dir first, so that a test can fill it.
    pub state_tmpfs: Option<&'a str>,
}

impl Site {
    /// Creates site `name` (`site init`) and starts its daemon.
    pub fn start(name: &str) -> Site {
        Site::start_with(name, &[])
    }

    /// Like [`Site::start`], with extra `site init` arguments.
    pub fn start_with(name: &str, init_args: &[&str]) -> Site {
        let mut site = Site::init(name, init_args);
        site.run();
        site
    }

    /// Creates site `name` without starting it.
    pub fn init(name: &str, init_args: &[&str]) -> Site {
        let site = Site::new(name, free_port(), None);
        let port = site.port.to_string();
        let mut args = vec![
            "site",
            "init",
            name,
            "--link-host",
            "127.0.0.1",
            "--link-port",
            &port,
        ];
        args.extend_from_slice(init_args);
        site.ok(&args);
        site
    }

    /// Creates site `name` on `host` (its daemon in a network namespace, its link port the
    /// default one) without starting it.
    pub fn init_on(name: &str, host: &Host<'_>, init_args: &[&str]) -> Site {
        let mut site = Site::new(name, 55671, Some(host.netns.to_string()));
        if let Some(size) = host.state_tmpfs {
            let state = site.state_dir();
            std::fs::create_dir_all(&state).expect("cannot create the state dir");
            let mounted = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(&state)
                .status()
                .expect("cannot run mount");
            assert!(
                mounted.success(),
                "cannot mount a tmpfs on {}",
                state.display()
            );
            site.tmpfs = Some(state);
        }
        let port = site.port.to_string();
        let mut args = vec!["site", "init", name, "--link-port", &port];
        for host in host.link_hosts {
            args.extend(["--link-host", host]);
        }
        args.extend_from_slice(init_args);
        site.ok(&args);
        site
    }

    fn new(name: &str, port: u16, netns: Option<String>) -> Site {
        let dir = tempfile::Builder::new()
            .prefix(&format!("skiff-{name}-"))
            .tempdir()
            .expect("cannot create a temp dir");
        Site {
            name: name.to_string(),
            port,
            dir,
            daemon: None,
            run_args: Vec::new(),
            netns,
            tmpfs: None,
        }
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A path for scratch files (tokens) outside the state dir.
    pub fn scratch(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Everything the daemon wrote to stderr, across restarts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `site run` and waits until its admin API answers.
    pub fn run(&mut self) {
        assert!(
            self.daemon.is_none(),
            "site {} is already running",
            self.name
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open the daemon log");
        let mut command = match &self.netns {
            Some(ns) => {
                // `ip netns exec` replaces itself with skiff: the child's pid is the daemon's.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, skiff()]);
                command
            }
            None => Command::new(skiff()),
        };
        let child = command
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["site", "run"])
            .args(&self.run_args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot spawn skiff site run");
        self.daemon = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(exit) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.daemon = None;
                panic!(
                    "daemon of site {} exited at start ({exit})\n--- log ---\n{}",
                    self.name,
                    self.logs()
                );
            }
            let status = self.cli(&["status", "-o", "json"]);
            if status.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "daemon of site {} did not answer within {START_TIMEOUT:?}: {}\n--- log ---\n{}",
                    self.name,
                    String::from_utf8_lossy(&status.stderr),
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("site is not running").id()
    }

    /// Whether the daemon process is alive, for failure reports (a dead child not yet waited
    /// for is a zombie).
    pub fn daemon_state(&self) -> String {
        let Some(child) = &self.daemon else {
            return "daemon not started".into();
        };
        let pid = child.id();
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                format!("daemon pid {pid} has EXITED")
            }
            Ok(_) => format!("daemon pid {pid} running"),
            Err(_) => format!("daemon pid {pid} state unknown"),
        }
    }

    /// Sends SIGTERM to the daemon.
    pub fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(sent.success(), "kill -TERM failed");
    }

    /// Stops the daemon gracefully (SIGTERM: it drains, for at most its drain timeout) and
    /// waits for it to exit successfully.
    pub fn stop(&mut self) {
        self.sigterm();
        self.wait_exit();
    }

    /// Stops the daemon at once: SIGTERM, and once it drains, SIGTERM again. Waits for it to
    /// exit successfully.
    pub fn stop_now(&mut self) {
        let drains = self.logs().matches("stopping gracefully").count() + 1;
        self.sigterm();
        // Two signals sent together may arrive as one: wait for the first to be seen.
        wait_for(
            "the daemon to begin draining",
            STOP_TIMEOUT,
            &[self],
            || {
                let seen = self.logs().matches("stopping gracefully").count();
                (seen >= drains)
                    .then_some(())
                    .ok_or_else(|| format!("{seen} graceful stops logged"))
            },
        );
        self.sigterm();
        self.wait_exit();
    }

    /// Waits (bounded) for the stopping daemon to exit successfully.
    pub fn wait_exit(&mut self) {
        let mut child = self.daemon.take().expect("site is not running");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(exit) = child.try_wait().expect("cannot wait for the daemon") {
                assert!(
                    exit.success(),
                    "daemon of site {} exited with {exit} after SIGTERM\n--- log ---\n{}",
                    self.name,
                    self.logs()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon of site {} ignored SIGTERM for {STOP_TIMEOUT:?}\n--- log ---\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Graceful stop, then start again.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Runs `skiff --state-dir DIR ARGS...` and returns what it did.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(skiff())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("SKIFF_STATE_DIR")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run skiff")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "site {}: `skiff {}` failed ({}):\n{}\n--- log ---\n{}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "site {}: `skiff {}` succeeded but should have failed:\n{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `status -o json`.
    pub fn status_json(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "-o", "json"])).expect("status is not JSON")
    }

    /// The site's id.
    pub fn id(&self) -> String {
        self.status_json()["site"]["id"]
            .as_str()
            .expect("status has no site.id")
            .to_string()
    }

    /// `link status -o json`.
    pub fn links_json(&self) -> Value {
        serde_json::from_str(&self.ok(&["link", "status", "-o", "json"]))
            .expect("link status is not JSON")
    }

    /// The link with site `peer` in the given direction, if there is one; `Err` if the CLI
    /// fails or there are several.
    pub fn find_link(&self, peer: &str, direction: &str) -> Result<Option<Value>, String> {
        let out = self.cli(&["link", "status", "-o", "json"]);
        if !out.status.success() {
            return Err(format!(
                "{}: link status failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let links: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let matching: Vec<&Value> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["peerSite"] == peer && l["direction"] == direction)
            .collect();
        match matching.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            _ => Err(format!(
                "{}: several {direction} links with {peer}: {links}",
                self.name
            )),
        }
    }

    /// The one link with site `peer` in the given direction; `Err` describes what is there.
    pub fn link_with(&self, peer: &str, direction: &str) -> Result<Value, String> {
        self.find_link(peer, direction)?
            .ok_or_else(|| format!("{}: no {direction} link with {peer}", self.name))
    }

    /// The link with `peer` if it is up with an RTT; `Err` describes what is there.
    pub fn link_up(&self, peer: &str, direction: &str) -> Result<Value, String> {
        let link = self.link_with(peer, direction)?;
        let rtt = link["rttMs"].as_f64().unwrap_or(0.0);
        if link["state"] == "up" && rtt > 0.0 {
            Ok(link)
        } else {
            Err(format!(
                "{}: {direction} link with {peer} is {link}",
                self.name
            ))
        }
    }

    /// The sorted names of the sites serving listener `name` (`listener list -o json`).
    pub fn targets(&self, name: &str) -> Result<Vec<String>, String> {
        let out = self.cli(&["listener", "list", "-o", "json"]);
        if !out.status.success() {
            return Err(format!(
                "{}: listener list failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let list: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let listener = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .ok_or_else(|| format!("{}: no listener {name}: {list}", self.name))?;
        let mut names: Vec<String> = listener["targets"]
            .as_array()
            .ok_or_else(|| format!("listener without targets: {listener}"))?
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Issues a token (`token issue -o FILE EXTRA...`) and returns the file.
    pub fn issue(&self, file: &str, extra: &[&str]) -> PathBuf {
        let path = self.scratch(file);
        let path_arg = path.to_str().expect("temp path is not UTF-8");
        let mut args = vec!["token", "issue", "-o", path_arg];
        args.extend_from_slice(extra);
        self.ok(&args);
        path
    }

    /// `link create TOKEN`; returns the raw output.
    pub fn redeem(&self, token: &Path) -> Output {
        let token = token.to_str().expect("token path is not UTF-8");
        self.cli(&[
            "link",
            "create",
            token,
            "--wait",
            "10s",
            "--transport",
            transport(),
        ])
    }

    /// Links this site to `issuer` with a fresh one-use token; panics unless both sides see the
    /// link up.
    pub fn link_to(&self, issuer: &Site) {
        let token = issuer.issue(&format!("to-{}-from-{}.yaml", issuer.name, self.name), &[]);
        let out = self.redeem(&token);
        assert!(
            out.status.success(),
            "{} link create {} failed: {}\n--- {} log ---\n{}\n--- {} log ---\n{}",
            self.name,
            issuer.name,
            String::from_utf8_lossy(&out.stderr),
            self.name,
            self.logs(),
            issuer.name,
            issuer.logs()
        );
        wait_for(
            &format!("link {} -> {} up on both sides", self.name, issuer.name),
            Duration::from_secs(10),
            &[self, issuer],
            || {
                let link = self.link_up(&issuer.name, "outgoing")?;
                if transport() != "auto" && link["transport"] != transport() {
                    return Err(format!("link is not over {}: {link}", transport()));
                }
                issuer.link_up(&self.name, "incoming").map(|_| ())
            },
        );
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill();
        if let Some(mount) = self.tmpfs.take() {
            // Lazily, so that nothing left open can keep it (and the temp dir) in place.
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
    }
}

thread_local! {
    static TRANSPORT: std::cell::Cell<&'static str> = const { std::cell::Cell::new("auto") };
}

/// Makes every link this test thread creates use `transport` (`auto`, `tls` or `quic`): the
/// tests of service traffic run once per transport.
pub fn use_transport(transport: &'static str) {
    TRANSPORT.with(|t| t.set(transport));
}

/// The transport links created by this test thread use.
pub fn transport() -> &'static str {
    TRANSPORT.with(|t| t.get())
}

/// Generates one `#[test]` per transport for each named test function (which takes no
/// arguments and creates its links with [`Site::link_to`] or `--transport` from [`transport`]).
#[macro_export]
macro_rules! on_every_transport {
    ($($name:ident),* $(,)?) => {
        mod tls {
            $(#[test] fn $name() { $crate::common::use_transport("tls"); super::$name(); })*
        }
        mod quic {
            $(#[test] fn $name() { $crate::common::use_transport("quic"); super::$name(); })*
        }
    };
}

/// CPU time a process has used (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start with the state;
    // utime and stime are the 14th and 15th fields, in clock ticks (100 per second).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0, so the server closes): the status code and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {raw:?}"))?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

/// A loopback port that refuses every connection for as long as this lives: a socket holds it
/// bound but never listens, so no other test's listener can take the port meanwhile (as one
/// could a port from [`free_port`], whose socket is gone once it returns).
pub struct RefusingPort {
    _socket: tokio::net::TcpSocket,
    /// The port.
    pub port: u16,
}

/// A [`RefusingPort`].
pub fn refusing_port() -> RefusingPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("cannot make a socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("cannot bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .expect("bound socket has an address")
        .port();
    RefusingPort {
        _socket: socket,
        port,
    }
}

/// Polls `probe` until it returns `Ok`, for at most `timeout`; `Err` carries the observed state.
/// On timeout, panics with that state and every site's links and daemon log.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    sites: &[&Site],
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\nlast observed: {last}\n{}",
                    report(sites)
                )
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Checks that `probe` stays `Ok` on every poll for `duration` (polling every `every`); panics
/// at the first `Err` with that state and every site's links and daemon log.
pub fn hold_for(
    what: &str,
    duration: Duration,
    every: Duration,
    sites: &[&Site],
    mut probe: impl FnMut() -> Result<(), String>,
) {
    let start = Instant::now();
    while start.elapsed() < duration {
        if let Err(seen) = probe() {
            panic!(
                "expected to hold for {duration:?}: {what}\nbroken after {:?}: {seen}\n{}",
                start.elapsed(),
                report(sites)
            );
        }
        std::thread::sleep(every);
    }
}

/// Every site's current links and the tail of its daemon log.
pub fn report(sites: &[&Site]) -> String {
    let mut text = String::new();
    for site in sites {
        let links = site.cli(&["link", "status", "-o", "json"]);
        let links = if links.status.success() {
            String::from_utf8_lossy(&links.stdout).into_owned()
        } else {
            String::from_utf8_lossy(&links.stderr).into_owned()
        };
        let logs = site.logs();
        let lines: Vec<&str> = logs.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        text.push_str(&format!(
            "--- site {} ({}) links ---\n{}\n--- site {} log (last 60 lines) ---\n{tail}\n",
            site.name,
            site.daemon_state(),
            links.trim(),
            site.name
        ));
    }
    text
}
