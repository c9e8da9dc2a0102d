//! End-to-end tests of links between sites, each running the real `skiff` binary as separate
//! daemons on loopback: token issue and redemption (one-use, multi-use, expired, wrong CA, self
//! and duplicate links, two created at once), links coming back after a crash or a restart of either side,
//! revocation, garbage on the link port, a stopped daemon, and client certificate renewal over a
//! live link.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{hold_for, report, wait_for, Site};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `Ok` unless the link is up; a link that is gone counts as down (`Null`).
fn not_up(site: &Site, peer: &str, direction: &str) -> Result<serde_json::Value, String> {
    match site.find_link(peer, direction)? {
        Some(link) if link["state"] == "up" => Err(format!("{}: still up: {link}", site.name)),
        Some(link) => Ok(link),
        None => Ok(serde_json::Value::Null),
    }
}

/// `Ok` while the link is up (whatever its RTT).
fn is_up(site: &Site, peer: &str, direction: &str) -> Result<(), String> {
    let link = site.link_with(peer, direction)?;
    if link["state"] == "up" {
        Ok(())
    } else {
        Err(format!(
            "{}: {direction} link with {peer} is not up: {link}",
            site.name
        ))
    }
}

fn two_sites_link_and_report_rtt() {
    let b = Site::start("b");
    let a = Site::start("a");

    let token = b.issue("token.yaml", &[]);
    let text = std::fs::read_to_string(&token).unwrap();
    assert!(
        !text.contains("PRIVATE KEY"),
        "a private key travels in the token:\n{text}"
    );
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(yaml["kind"].as_str(), Some("AccessToken"), "{text}");
    assert_eq!(
        yaml["apiVersion"].as_str(),
        Some("skiff.dev/v1alpha1"),
        "{text}"
    );

    let out = a.redeem(&token);
    assert!(
        out.status.success(),
        "link create failed: {}\n{}",
        stderr(&out),
        report(&[&a, &b])
    );

    let link = wait_for(
        "A's outgoing link up with an RTT",
        Duration::from_secs(10),
        &[&a, &b],
        || a.link_up("b", "outgoing"),
    );
    assert_eq!(link["peerId"].as_str(), Some(b.id().as_str()), "{link}");
    assert_eq!(
        a.links_json().as_array().map(Vec::len),
        Some(1),
        "{}",
        a.links_json()
    );

    let link = wait_for(
        "B's incoming link up with an RTT",
        Duration::from_secs(10),
        &[&a, &b],
        || b.link_up("a", "incoming"),
    );
    assert_eq!(link["peerId"].as_str(), Some(a.id().as_str()), "{link}");
    assert_eq!(
        b.links_json().as_array().map(Vec::len),
        Some(1),
        "{}",
        b.links_json()
    );
}

#[test]
fn single_use_token_is_refused_the_second_time() {
    let b = Site::start("b");
    let a = Site::start("a");
    let c = Site::start("c");

    let token = b.issue("token.yaml", &[]);
    let out = a.redeem(&token);
    assert!(
        out.status.success(),
        "first redemption failed: {}",
        stderr(&out)
    );

    let out = c.redeem(&token);
    assert!(
        !out.status.success(),
        "second redemption of a one-use token succeeded"
    );
    let message = stderr(&out);
    assert!(
        message.contains("already used"),
        "unclear refusal: {message}"
    );
    assert_eq!(
        c.links_json(),
        serde_json::json!([]),
        "a refused token left a link behind"
    );
}

#[test]
fn token_with_two_uses_links_two_sites() {
    let b = Site::start("b");
    let a = Site::start("a");
    let c = Site::start("c");

    let token = b.issue("token.yaml", &["--uses", "2"]);
    for site in [&a, &c] {
        let out = site.redeem(&token);
        assert!(
            out.status.success(),
            "{} link create failed: {}",
            site.name,
            stderr(&out)
        );
    }
    wait_for(
        "both links up on B",
        Duration::from_secs(10),
        &[&a, &b, &c],
        || {
            b.link_up("a", "incoming")?;
            b.link_up("c", "incoming")
        },
    );
    assert_eq!(b.status_json()["activeGrants"], 0, "{}", b.status_json());
}

#[test]
fn expired_token_is_refused() {
    let b = Site::start("b");
    let a = Site::start("a");

    let token = b.issue("token.yaml", &["--expiry", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let out = a.redeem(&token);
    assert!(!out.status.success(), "an expired token was redeemed");
    let message = stderr(&out);
    assert!(message.contains("expired"), "unclear refusal: {message}");
}

#[test]
fn token_with_another_ca_fails_tls_and_keeps_the_grant() {
    let b = Site::start("b");
    let a = Site::start("a");
    let d = Site::init("d", &[]); // only its CA is needed

    let token = b.issue("token.yaml", &[]);
    let text = std::fs::read_to_string(&token).unwrap();
    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let other_ca = std::fs::read_to_string(d.state_dir().join("ca.pem")).unwrap();
    assert_ne!(yaml["spec"]["ca"].as_str(), Some(other_ca.as_str()));
    yaml["spec"]["ca"] = serde_yaml_ng::Value::String(other_ca);
    let swapped = a.scratch("swapped.yaml");
    std::fs::write(&swapped, serde_yaml_ng::to_string(&yaml).unwrap()).unwrap();

    let out = a.redeem(&swapped);
    assert!(
        !out.status.success(),
        "a token with a foreign CA was redeemed"
    );
    let message = stderr(&out);
    assert!(
        message.contains("issuer") || message.contains("certificate"),
        "the error does not name the TLS verification problem: {message}"
    );
    assert_eq!(
        a.links_json(),
        serde_json::json!([]),
        "a failed redemption left a link behind"
    );
    assert_eq!(
        b.status_json()["activeGrants"],
        1,
        "the grant was consumed: {}",
        b.status_json()
    );

    let out = a.redeem(&token);
    assert!(
        out.status.success(),
        "the original token no longer works: {}",
        stderr(&out)
    );
    wait_for("link up on B", Duration::from_secs(10), &[&a, &b], || {
        b.link_up("a", "incoming")
    });
}

fn links_come_back_after_crash_and_restart() {
    let mut b = Site::start("b");
    let mut a = Site::start("a");
    a.link_to(&b);

    // The accepting side crashes: A notices, and reconnects by itself once B is back.
    b.kill();
    wait_for(
        "A sees the link down",
        Duration::from_secs(3),
        &[&a, &b],
        || not_up(&a, "b", "outgoing"),
    );
    b.run();
    wait_for(
        "link back up after B's crash",
        Duration::from_secs(15),
        &[&a, &b],
        || {
            a.link_up("b", "outgoing")?;
            b.link_up("a", "incoming")
        },
    );

    // The dialling side stops gracefully and starts again: it restores its link.
    a.stop();
    wait_for(
        "B sees the link down",
        Duration::from_secs(3),
        &[&a, &b],
        || not_up(&b, "a", "incoming"),
    );
    a.run();
    wait_for(
        "link back up after A's restart",
        Duration::from_secs(15),
        &[&a, &b],
        || {
            a.link_up("b", "outgoing")?;
            b.link_up("a", "incoming")
        },
    );
}

fn revoke_cuts_one_site_and_keeps_the_others() {
    let b = Site::start("b");
    let a = Site::start("a");
    let c = Site::start("c");
    a.link_to(&b);
    c.link_to(&b);
    let a_id = a.id();
    let sites = [&a, &b, &c];
    let c_stays_up = || {
        if let Err(e) = is_up(&c, "b", "outgoing") {
            panic!("C's link went down: {e}\n{}", report(&sites));
        }
    };

    b.ok(&["link", "revoke", "a"]);
    wait_for(
        "A's link down after revocation",
        Duration::from_secs(2),
        &sites,
        || {
            c_stays_up();
            not_up(&a, "b", "outgoing")
        },
    );
    hold_for(
        "A's link stays down, with an error",
        Duration::from_secs(2),
        Duration::from_millis(200),
        &sites,
        || {
            c_stays_up();
            let link = not_up(&a, "b", "outgoing")?;
            match link["lastError"].as_str() {
                Some(e) if !e.is_empty() => Ok(()),
                _ => Err(format!("A's link has no lastError: {link}")),
            }
        },
    );
    not_up(&b, "a", "incoming").unwrap_or_else(|e| panic!("B still has A's link up: {e}"));
    b.link_up("c", "incoming")
        .unwrap_or_else(|e| panic!("B lost C's link: {e}"));

    let status = b.status_json();
    let revoked: Vec<&str> = status["revoked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        revoked.contains(&a_id.as_str()),
        "A ({a_id}) is not listed as revoked: {status}"
    );
}

/// Beyond "non-empty": the revoked site's `lastError` must say it was revoked, on every
/// reconnect attempt (the dialler has code for it: `explain` in `router/src/link/dial.rs`).
fn revoked_site_is_told_why() {
    let b = Site::start("b");
    let a = Site::start("a");
    a.link_to(&b);
    let says_revoked = || {
        let link = not_up(&a, "b", "outgoing")?;
        match link["lastError"].as_str() {
            Some(e) if e.contains("revoked") => Ok(()),
            _ => Err(format!("A's lastError does not say it was revoked: {link}")),
        }
    };

    b.ok(&["link", "revoke", "a"]);
    wait_for(
        "A's lastError says it was revoked",
        Duration::from_secs(3),
        &[&a, &b],
        says_revoked,
    );
    hold_for(
        "A's lastError keeps saying it was revoked across reconnect attempts",
        Duration::from_secs(4),
        Duration::from_millis(100),
        &[&a, &b],
        says_revoked,
    );
}

/// Tiny xorshift generator: enough noise for garbage, no extra dependency.
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

/// Sends `bytes` on a fresh connection to `port`, then reads until the peer closes (bounded).
fn poke(port: u16, bytes: &[u8]) {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = tcp.write_all(bytes);
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = tcp.read_to_end(&mut sink);
}

/// Runs `openssl s_client` against `port` with `alpn`, feeding it `input`; bounded by `timeout`.
fn openssl_client(port: u16, alpn: &str, input: &[u8]) {
    let child = Command::new("timeout")
        .args([
            "3",
            "openssl",
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-alpn",
            alpn,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Ok(mut child) = child {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input);
        }
        let _ = child.wait();
    }
}

fn garbage_on_the_link_port_harms_nobody() {
    let b = Site::start("b");
    let a = Site::start("a");
    a.link_to(&b);
    let port = b.port;
    let have_openssl = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_openssl {
        eprintln!("note: openssl not found; skipping the TLS-without-client-cert part");
    }

    let garbage = std::thread::spawn(move || {
        for seed in 1..=20u64 {
            poke(port, &noise(seed, 64 * seed as usize));
        }
        poke(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        poke(port, b"");
        // A TLS record header announcing a huge ClientHello, then nothing.
        poke(
            port,
            &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb],
        );
        if have_openssl {
            openssl_client(port, "skiff-link/1", b"");
            openssl_client(port, "skiff-link/1", &noise(99, 4096));
            openssl_client(port, "skiff-claim/1", &[0xff, 0xff, 0xff, 0xff, b'x']);
            openssl_client(port, "skiff-claim/1", b"\x00\x00\x00\x05hello");
            openssl_client(port, "h2", b"");
        }
    });
    hold_for(
        "the link stays up while B's link port gets garbage",
        Duration::from_secs(4),
        Duration::from_millis(100),
        &[&a, &b],
        || {
            is_up(&a, "b", "outgoing")?;
            is_up(&b, "a", "incoming")
        },
    );
    garbage.join().expect("the garbage thread panicked");
    hold_for(
        "A's link stays up after the garbage",
        Duration::from_millis(1500),
        Duration::from_millis(100),
        &[&a, &b],
        || a.link_up("b", "outgoing").map(drop),
    );

    b.status_json(); // B's daemon still answers
    b.link_up("a", "incoming")
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&[&a, &b])));
    assert_eq!(
        b.links_json().as_array().map(Vec::len),
        Some(1),
        "garbage shows as links: {}",
        b.links_json()
    );
}

#[test]
fn self_and_duplicate_links_are_refused() {
    let b = Site::start("b");
    let a = Site::start("a");

    let own = b.issue("own.yaml", &[]);
    let out = b.redeem(&own);
    assert!(!out.status.success(), "a site linked to itself");
    let message = stderr(&out);
    assert!(message.contains("itself"), "unclear refusal: {message}");

    a.link_to(&b);
    // The other direction: A issues, B (already linked with A) redeems.
    let reverse = a.issue("reverse.yaml", &[]);
    let out = b.redeem(&reverse);
    assert!(
        !out.status.success(),
        "a second link between A and B was created"
    );
    let message = stderr(&out);
    assert!(message.contains("already"), "unclear refusal: {message}");
    // The same direction again, with a fresh token from B (and another link name).
    let again = b.issue("again.yaml", &[]);
    let out = a.cli(&[
        "link",
        "create",
        again.to_str().unwrap(),
        "--name",
        "b2",
        "--wait",
        "10s",
    ]);
    assert!(
        !out.status.success(),
        "a second link from A to B was created"
    );
    let message = stderr(&out);
    assert!(message.contains("already"), "unclear refusal: {message}");

    // Refused before redemption: no token was used up ("own", "again"; "reverse" on A).
    let status = b.status_json();
    assert_eq!(
        status["activeGrants"], 2,
        "B's refused tokens were used up: {status}"
    );
    let status = a.status_json();
    assert_eq!(
        status["activeGrants"], 1,
        "A's refused token was used up: {status}"
    );
    assert_eq!(
        a.links_json().as_array().map(Vec::len),
        Some(1),
        "{}",
        a.links_json()
    );
    assert_eq!(
        b.links_json().as_array().map(Vec::len),
        Some(1),
        "{}",
        b.links_json()
    );
    a.link_up("b", "outgoing").unwrap();
}

#[test]
fn two_link_creations_at_once_make_one_link() {
    let b = Site::start("b");
    let a = Site::start("a");
    let tokens = [b.issue("first.yaml", &[]), b.issue("second.yaml", &[])];
    // Two `link create` to the same site at once, as two AccessTokens applied together would
    // make them: each redemption takes a round trip to B, during which the other runs.
    let outs: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = tokens
            .iter()
            .zip(["b", "b2"])
            .map(|(token, name)| {
                let a = &a;
                let token = token.to_str().unwrap();
                scope.spawn(move || {
                    a.cli(&["link", "create", token, "--name", name, "--wait", "10s"])
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let made = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(made, 1, "{} link creations succeeded, not one", made);
    let refused = outs.iter().find(|o| !o.status.success()).unwrap();
    let message = stderr(refused);
    assert!(
        message.contains("being created by another request") || message.contains("already"),
        "unclear refusal: {message}"
    );
    assert_eq!(
        a.links_json().as_array().map(Vec::len),
        Some(1),
        "{}",
        a.links_json()
    );
    // The refused creation was stopped before its token was redeemed.
    assert_eq!(b.status_json()["activeGrants"], 1, "{}", b.status_json());
    wait_for(
        "the one link up",
        Duration::from_secs(10),
        &[&a, &b],
        || a.link_up("b", "outgoing"),
    );
}

#[test]
fn commands_on_a_stopped_site_say_how_to_start_it() {
    let never = Site::init("never", &[]);
    let message = never.fails(&["link", "status"]);
    assert!(
        message.contains("site run"),
        "no hint to start the daemon: {message}"
    );

    let mut stopped = Site::start("stopped");
    stopped.stop();
    let message = stopped.fails(&["link", "status", "-o", "json"]);
    assert!(
        message.contains("site run"),
        "no hint to start the daemon: {message}"
    );
}

fn client_certificates_are_renewed_over_the_live_link() {
    let b = Site::start_with("b", &["--cert-lifetime", "6s"]);
    let mut a = Site::start("a");
    a.link_to(&b);
    let expires = |site: &Site| -> String {
        let link = site
            .link_with("b", "outgoing")
            .unwrap_or_else(|e| panic!("{e}"));
        link["certExpires"]
            .as_str()
            .unwrap_or_else(|| panic!("no certExpires: {link}"))
            .to_string()
    };
    let first = expires(&a);

    // Renewal is due at two thirds of 6 s; the first certificate has expired after 8 s.
    hold_for(
        "the link stays up on both sides across renewals",
        Duration::from_secs(8),
        Duration::from_millis(200),
        &[&a, &b],
        || {
            is_up(&a, "b", "outgoing")?;
            is_up(&b, "a", "incoming")
        },
    );
    let renewed = expires(&a);
    // Same RFC 3339 UTC format on both sides, so text order is time order.
    assert!(
        renewed > first,
        "certExpires did not move: {first} -> {renewed}\n{}",
        report(&[&a, &b])
    );

    // Only the renewed certificate is still valid: a fresh A must come up with it.
    a.kill();
    a.run();
    wait_for(
        "link up with the renewed certificate",
        Duration::from_secs(10),
        &[&a, &b],
        || {
            a.link_up("b", "outgoing")?;
            b.link_up("a", "incoming")
        },
    );
}

#[test]
fn auto_falls_back_to_tls_when_udp_does_not_get_through() {
    let b = Site::start("b");
    let a = Site::start("a");
    let token = b.issue("blocked-udp.yaml", &[]);
    // Simulate a network that drops UDP: the QUIC endpoint answers nothing.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap().to_string();
    let mut value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&token).unwrap()).unwrap();
    value["spec"]["quicEndpoints"] = serde_yaml_ng::Value::Sequence(vec![dead.into()]);
    std::fs::write(&token, serde_yaml_ng::to_string(&value).unwrap()).unwrap();

    let started = std::time::Instant::now();
    let path = token.to_str().unwrap();
    a.ok(&[
        "link",
        "create",
        path,
        "--transport",
        "auto",
        "--wait",
        "20s",
    ]);
    let link = a.link_up("b", "outgoing").unwrap();
    assert_eq!(link["transport"], "tls", "{link}");
    // QUIC gets 3 s, then TLS takes over.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[test]
fn quic_is_refused_clearly_when_the_peer_does_not_serve_it() {
    let b = Site::start_with("b", &["--no-quic"]);
    let a = Site::start("a");
    let token = b.issue("no-quic.yaml", &[]);
    let text = std::fs::read_to_string(&token).unwrap();
    assert!(!text.contains("quicEndpoints"), "{text}");
    let path = token.to_str().unwrap();
    let err = a.fails(&["link", "create", path, "--transport", "quic"]);
    assert!(err.contains("does not serve QUIC"), "{err}");
    // The refusal cost nothing: the same token still links over TLS (auto picks it).
    a.ok(&[
        "link",
        "create",
        path,
        "--transport",
        "auto",
        "--wait",
        "10s",
    ]);
    assert_eq!(a.link_up("b", "outgoing").unwrap()["transport"], "tls");
}

// Scenarios where the link's transport matters run once over TLS and once over QUIC.
on_every_transport!(
    two_sites_link_and_report_rtt,
    links_come_back_after_crash_and_restart,
    revoke_cuts_one_site_and_keeps_the_others,
    revoked_site_is_told_why,
    garbage_on_the_link_port_harms_nobody,
    client_certificates_are_renewed_over_the_live_link,
);

/// The same token file serves a host site (`link create`) and a cluster (`kubectl apply`):
/// `link create -o yaml` prints it as the AccessToken resource, key-free, without redeeming it;
/// `--kube` commands print resources without a cluster and fail clearly without one.
#[test]
fn token_files_print_as_access_tokens_and_kube_commands_need_a_cluster() {
    let b = Site::start("b");
    let a = Site::start("a");
    let token = b.issue("for-a.yaml", &[]);
    let path = token.to_str().unwrap();
    let file = std::fs::read_to_string(&token).unwrap();
    let yaml = a.ok(&["--namespace", "dev", "link", "create", path, "-o", "yaml"]);
    let resource: skiff_control::crd::AccessTokenResource = serde_yaml_ng::from_str(&yaml).unwrap();
    let parsed = skiff_control::token::AccessToken::parse(&file).unwrap();
    assert_eq!(
        resource.spec.token, parsed.spec,
        "the same content as the file"
    );
    assert_eq!(
        resource.metadata.name.as_deref(),
        Some(parsed.metadata.name.as_str())
    );
    assert!(!yaml.contains("PRIVATE KEY"), "no key in a token: {yaml}");
    // Printing redeemed nothing: the one-use token still links.
    a.ok(&["link", "create", path, "--wait", "10s"]);

    // The issue's GitOps command, verbatim, needs no cluster.
    let yaml = a.ok(&[
        "--kube",
        "--namespace",
        "ns1",
        "listener",
        "create",
        "web",
        "--port",
        "8080",
        "-o",
        "yaml",
    ]);
    let listener: skiff_control::crd::Listener = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(listener.metadata.namespace.as_deref(), Some("ns1"));
    assert_eq!(listener.spec.port, 8080);
    // Acting on a cluster without one says what to do.
    let out = Command::new(common::skiff())
        .args(["--kube", "status"])
        .env("KUBECONFIG", a.scratch("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set KUBECONFIG"), "{err}");
    let err = a.fails(&["site", "run", "--router-selector", "app=x"]);
    assert!(err.contains("add --kube"), "{err}");
}
