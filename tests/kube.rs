//! Against a real Kubernetes cluster, opt-in: set `SKIFF_E2E_KUBECONFIG` to a kubeconfig whose
//! user may create namespaces and CRDs. Without it the test says so and passes.
//!
//! Two controllers (`skiff site run --kube`, run here as processes outside the cluster, so
//! their links and listeners are on this machine's loopback) each control a fresh namespace.
//! The test walks what a user does: Sites, an AccessGrant whose token Secret is applied in the
//! other namespace as an AccessToken, the Link coming up, a Connector and a Listener carrying
//! real bytes, the Listener's Service, and cleanup when resources are deleted.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, skiff};

struct Cluster {
    kubeconfig: String,
    namespaces: Vec<String>,
    controllers: Vec<Child>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run kubectl: {e}"))?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.kubectl(args, stdin)
            .unwrap_or_else(|e| panic!("kubectl {args:?} failed: {e}"))
    }

    fn controller(&mut self, namespace: &str) {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(skiff())
            .args(["--state-dir"])
            .arg(dir.path())
            .args(["--kube", "--namespace", namespace, "site", "run"])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.controllers.push(child);
        self._dirs.push(dir);
    }

    /// Waits until `jsonpath` of `resource` in `namespace` is `want`.
    fn wait_for(&self, namespace: &str, resource: &str, jsonpath: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.kubectl(
                &[
                    "-n",
                    namespace,
                    "get",
                    resource,
                    "-o",
                    &format!("jsonpath={jsonpath}"),
                ],
                None,
            ) {
                Ok(value) if value == want => return,
                Ok(value) => last = value,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let describe = self
            .kubectl(&["-n", namespace, "describe", resource], None)
            .unwrap_or_default();
        panic!("{namespace}/{resource} {jsonpath}: wanted {want:?}, last {last:?}\n{describe}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.controllers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            // Finalizers need a controller; the test's controllers are gone, so drop them.
            for kind in ["links", "listeners", "connectors", "accessgrants"] {
                if let Ok(names) = self.kubectl(&["-n", ns, "get", kind, "-o", "name"], None) {
                    for name in names.lines() {
                        let _ = self.kubectl(
                            &[
                                "-n",
                                ns,
                                "patch",
                                name,
                                "--type=merge",
                                "-p",
                                r#"{"metadata":{"finalizers":null}}"#,
                            ],
                            None,
                        );
                    }
                }
            }
            let _ = self.kubectl(&["delete", "namespace", ns, "--wait=false"], None);
        }
    }
}

fn site_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: skiff.dev/v1alpha1\nkind: Site\nmetadata:\n  name: {name}\nspec:\n  \
         linkAccess: None\n  linkHosts: [\"127.0.0.1\"]\n  linkPort: {port}\n  quic: false\n"
    )
}

#[test]
fn sites_link_and_carry_traffic_in_a_real_cluster() {
    let Ok(kubeconfig) = std::env::var("SKIFF_E2E_KUBECONFIG") else {
        eprintln!("skipped: set SKIFF_E2E_KUBECONFIG to run against a real cluster");
        return;
    };
    let id = std::process::id();
    let (stg, dev) = (format!("skiff-e2e-stg-{id}"), format!("skiff-e2e-dev-{id}"));
    let mut cluster = Cluster {
        kubeconfig,
        namespaces: vec![stg.clone(), dev.clone()],
        controllers: Vec::new(),
        _dirs: Vec::new(),
    };
    let crds = Command::new(skiff()).arg("crd").output().unwrap().stdout;
    cluster.ok(
        &["apply", "-f", "-"],
        Some(&String::from_utf8(crds).unwrap()),
    );
    for ns in [&stg, &dev] {
        cluster.ok(&["create", "namespace", ns], None);
    }
    cluster.ok(
        &["-n", &stg, "apply", "-f", "-"],
        Some(&site_yaml("stg", free_port())),
    );
    cluster.ok(
        &["-n", &dev, "apply", "-f", "-"],
        Some(&site_yaml("dev", free_port())),
    );
    cluster.controller(&stg);
    cluster.controller(&dev);
    let ready = "{.status.conditions[?(@.type==\"Ready\")].status}";
    cluster.wait_for(&stg, "site/stg", ready, "True");
    cluster.wait_for(&dev, "site/dev", ready, "True");

    // stg grants; its token Secret, applied in dev, becomes a Link that comes up.
    cluster.ok(
        &["-n", &stg, "apply", "-f", "-"],
        Some("apiVersion: skiff.dev/v1alpha1\nkind: AccessGrant\nmetadata:\n  name: for-dev\nspec:\n  uses: 1\n  expiry: 10m\n"),
    );
    cluster.wait_for(
        &stg,
        "accessgrant/for-dev",
        "{.status.tokenSecret}",
        "for-dev-token",
    );
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_str(&cluster.ok(
        &["-n", &stg, "get", "secret", "for-dev-token", "-o", "json"],
        None,
    ))
    .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token.yaml"].0.clone()).unwrap();
    let name = cluster.ok(
        &[
            "-n",
            &dev,
            "apply",
            "-f",
            "-",
            "-o",
            "jsonpath={.metadata.name}",
        ],
        Some(&token),
    );
    cluster.wait_for(&dev, &format!("link/{name}"), "{.status.state}", "up");

    // A backend here served by stg, a listener in dev: bytes go through the link.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in backend.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    cluster.ok(
        &["-n", &stg, "apply", "-f", "-"],
        Some(&format!("apiVersion: skiff.dev/v1alpha1\nkind: Connector\nmetadata:\n  name: echo\nspec:\n  routingKey: echo\n  host: 127.0.0.1\n  port: {backend_port}\n")),
    );
    let listen_port = free_port();
    cluster.ok(
        &["-n", &dev, "apply", "-f", "-"],
        Some(&format!("apiVersion: skiff.dev/v1alpha1\nkind: Listener\nmetadata:\n  name: echo\nspec:\n  routingKey: echo\n  port: {listen_port}\n")),
    );
    cluster.wait_for(&stg, "connector/echo", ready, "True");
    cluster.wait_for(&dev, "listener/echo", ready, "True");
    cluster.wait_for(
        &dev,
        "service/echo",
        "{.spec.ports[0].port}",
        &listen_port.to_string(),
    );
    let mut client = std::net::TcpStream::connect(("127.0.0.1", listen_port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"across the cluster").unwrap();
    let mut answer = [0u8; 18];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"across the cluster");

    // Deleting the Listener closes its port and removes its Service.
    cluster.ok(
        &[
            "-n",
            &dev,
            "delete",
            "listener",
            "echo",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    assert!(
        cluster
            .kubectl(&["-n", &dev, "get", "service", "echo"], None)
            .is_err()
            || {
                std::thread::sleep(Duration::from_secs(5));
                cluster
                    .kubectl(&["-n", &dev, "get", "service", "echo"], None)
                    .is_err()
            }
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err());
}
