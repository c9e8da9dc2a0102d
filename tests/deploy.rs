//! Checks on what ships beside the code: the CRDs under deploy/crds/ are exactly what
//! `skiff crd` generates from the Rust types, every YAML and JSON example under deploy/ and
//! docs/ parses, and the kustomize base and the dev/stg/prod overlays render (with
//! `kubectl kustomize`) into what the controller needs: one Site per cluster, namespaced RBAC
//! only, a probed, limited, unprivileged router, and the Argo CD Applications pointing at them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crds_match_the_rust_types() {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("crd")
        .output()
        .expect("run skiff crd");
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(root().join("deploy/crds/skiff.dev.yaml"))
        .expect("deploy/crds/skiff.dev.yaml");
    assert!(
        generated == committed,
        "deploy/crds/skiff.dev.yaml is out of date: regenerate it with \
         `cargo run -- crd > deploy/crds/skiff.dev.yaml`"
    );
    for doc in serde_yaml_ng::Deserializer::from_str(&committed) {
        let crd = serde_yaml_ng::Value::deserialize(doc).expect("CRD parses");
        assert_eq!(crd["spec"]["group"].as_str(), Some("skiff.dev"));
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"].as_str(), Some("v1alpha1"));
        assert!(
            version["subresources"]["status"].is_mapping(),
            "status subresource"
        );
    }
}

use serde::Deserialize;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_example_file_parses() {
    let mut all = Vec::new();
    files(&root().join("deploy"), &mut all);
    files(&root().join("docs"), &mut all);
    let mut checked = 0;
    for path in all {
        let text = std::fs::read_to_string(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => {
                for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                    serde_yaml_ng::Value::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                }
                checked += 1;
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked > 0);
}

#[test]
fn token_example_in_the_docs_has_the_real_shape() {
    // The YAML block in docs/tokens.md must carry the same fields as a real token.
    let doc = std::fs::read_to_string(root().join("docs/tokens.md")).unwrap();
    let block = doc
        .split("```yaml")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a yaml block in docs/tokens.md");
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(block).expect("example parses");
    assert_eq!(value["kind"].as_str(), Some("AccessToken"));
    for field in [
        "endpoints",
        "quicEndpoints",
        "code",
        "ca",
        "cost",
        "expires",
        "issuer",
    ] {
        assert!(
            !value["spec"][field].is_null(),
            "docs/tokens.md example lacks spec.{field}"
        );
    }
}

fn skiff(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .output()
        .expect("run skiff");
    assert!(
        out.status.success(),
        "skiff {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn create_commands_print_resources_for_gitops() {
    // No daemon and no cluster needed: `-o yaml` only prints.
    let yaml = skiff(&[
        "--namespace",
        "skiff-prod",
        "listener",
        "create",
        "web",
        "--port",
        "8080",
        "--strategy",
        "closest",
        "-o",
        "yaml",
    ]);
    let listener: skiff_control::crd::Listener = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(listener.metadata.name.as_deref(), Some("web"));
    assert_eq!(listener.metadata.namespace.as_deref(), Some("skiff-prod"));
    assert_eq!(listener.spec.port, 8080);
    assert_eq!(listener.spec.strategy.as_deref(), Some("closest"));
    assert!(
        yaml.starts_with("apiVersion: skiff.dev/v1alpha1\nkind: Listener\n"),
        "{yaml}"
    );

    let yaml = skiff(&[
        "connector",
        "create",
        "db",
        "--selector",
        "app=postgres",
        "--port",
        "5432",
        "--name",
        "db-main",
        "-o",
        "yaml",
    ]);
    let connector: skiff_control::crd::Connector = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(connector.metadata.name.as_deref(), Some("db-main"));
    assert_eq!(
        connector
            .spec
            .selector
            .unwrap()
            .get("app")
            .map(String::as_str),
        Some("postgres")
    );
    assert!(!yaml.contains("null"), "unset fields are left out: {yaml}");
}

// ---------------------------------------------------------------------------------------------
// The kustomize base, the overlays and the Argo CD Applications.

/// Where everything namespaced is installed.
const NAMESPACE: &str = "skiff";
/// The clusters, each with an overlay and a site of the same name.
const ENVIRONMENTS: [&str; 3] = ["dev", "stg", "prod"];
/// Kinds that have no namespace.
const CLUSTER_SCOPED: [&str; 8] = [
    "CustomResourceDefinition",
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "MutatingWebhookConfiguration",
];

/// `kubectl kustomize deploy/DIR`, as one JSON value per YAML document. kubectl comes from
/// `KUBECTL` or PATH; its absence fails the test with what to install.
fn kustomize(dir: &str) -> Vec<serde_json::Value> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let path = root().join("deploy").join(dir);
    let out = match Command::new(&kubectl).arg("kustomize").arg(&path).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{kubectl}` not found: these tests render deploy/ with `kubectl kustomize`. Install \
             kubectl (Debian: `apt-get install kubernetes-client`; .ci/run does it) or set \
             KUBECTL=/path/to/kubectl"
        ),
        Err(e) => panic!("cannot run {kubectl}: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).expect("kustomize output parses"))
        .filter(|doc| !doc.is_null())
        .collect();
    assert!(!docs.is_empty(), "{dir} renders nothing");
    docs
}

fn kind(doc: &serde_json::Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &serde_json::Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn of_kind<'a>(docs: &'a [serde_json::Value], k: &str) -> Vec<&'a serde_json::Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn one<'a>(docs: &'a [serde_json::Value], k: &str, n: &str) -> &'a serde_json::Value {
    let found: Vec<_> = docs
        .iter()
        .filter(|d| kind(d) == k && name(d) == n)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {k} {n}, found {}",
        found.len()
    );
    found[0]
}

fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

/// Every rendering: the base and each overlay.
fn renderings() -> Vec<(&'static str, Vec<serde_json::Value>)> {
    let mut all = vec![("base", kustomize("base"))];
    for env in ENVIRONMENTS {
        all.push((env, kustomize(&format!("overlays/{env}"))));
    }
    all
}

#[test]
fn each_overlay_is_one_site_in_namespace_skiff() {
    for env in ENVIRONMENTS {
        let docs = kustomize(&format!("overlays/{env}"));
        for doc in &docs {
            if CLUSTER_SCOPED.contains(&kind(doc)) {
                assert!(
                    doc["metadata"]["namespace"].is_null(),
                    "{env}: {} {} is cluster-scoped but has a namespace",
                    kind(doc),
                    name(doc)
                );
            } else {
                assert_eq!(
                    doc["metadata"]["namespace"].as_str(),
                    Some(NAMESPACE),
                    "{env}: {} {} is not in namespace {NAMESPACE}",
                    kind(doc),
                    name(doc)
                );
            }
        }
        let sites = of_kind(&docs, "Site");
        assert_eq!(sites.len(), 1, "{env}: one Site per cluster");
        assert_eq!(name(sites[0]), env, "{env}: the Site is named after it");
        // The rendered Site is one the controller reads.
        let site: skiff_control::crd::Site = serde_json::from_value(sites[0].clone())
            .unwrap_or_else(|e| panic!("{env}: the Site is not a valid Site: {e}"));
        let expected = if env == "dev" {
            skiff_control::crd::LinkAccess::None
        } else {
            skiff_control::crd::LinkAccess::LoadBalancer
        };
        assert_eq!(site.spec.link_access, expected, "{env}: link access");
        // The namespace holds the site's identity (Secret skiff-site-state): nothing synced from
        // git may own it, or a prune could delete it.
        assert!(
            of_kind(&docs, "Namespace").is_empty(),
            "{env}: the namespace must not be part of the rendering"
        );
    }
}

/// Equal as data: kustomize writes `65535.0` as `65535`.
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn base_has_the_crds_and_no_site() {
    let docs = kustomize("base");
    let committed = std::fs::read_to_string(root().join("deploy/crds/skiff.dev.yaml")).unwrap();
    let committed: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&committed)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .collect();
    let rendered = of_kind(&docs, "CustomResourceDefinition");
    assert_eq!(rendered.len(), committed.len(), "every CRD is in the base");
    for crd in &committed {
        let found = one(&docs, "CustomResourceDefinition", name(crd));
        assert!(
            same(&found["spec"], &crd["spec"]),
            "{} differs from deploy/crds/skiff.dev.yaml",
            name(crd)
        );
    }
    assert!(
        of_kind(&docs, "Site").is_empty(),
        "sites belong to overlays"
    );
    for env in ENVIRONMENTS {
        let docs = kustomize(&format!("overlays/{env}"));
        assert_eq!(
            of_kind(&docs, "CustomResourceDefinition").len(),
            committed.len(),
            "{env}: CRDs"
        );
    }
}

/// Everything the controller does with the API: (API group, resource, verbs).
fn needed() -> Vec<(&'static str, String, &'static [&'static str])> {
    const ALL: &[&str] = &[
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    const READ: &[&str] = &["get", "list", "watch"];
    const RECORD: &[&str] = &["create", "patch"];
    let mut needed = Vec::new();
    for kind in [
        "sites",
        "links",
        "accessgrants",
        "accesstokens",
        "listeners",
        "connectors",
    ] {
        for sub in ["", "/status", "/finalizers"] {
            needed.push(("skiff.dev", format!("{kind}{sub}"), ALL));
        }
    }
    needed.push(("", "services".into(), ALL));
    needed.push(("", "secrets".into(), ALL));
    needed.push(("", "pods".into(), READ));
    needed.push(("discovery.k8s.io", "endpointslices".into(), READ));
    needed.push(("", "events".into(), RECORD));
    needed.push(("events.k8s.io", "events".into(), RECORD));
    needed
}

#[test]
fn rbac_is_one_namespaced_role_with_what_the_controller_needs() {
    for (what, docs) in renderings() {
        for k in ["ClusterRole", "ClusterRoleBinding"] {
            assert!(of_kind(&docs, k).is_empty(), "{what}: no {k}");
        }
        one(&docs, "ServiceAccount", "skiff");
        let binding = one(&docs, "RoleBinding", "skiff");
        assert_eq!(binding["roleRef"]["kind"], "Role", "{what}: binds a Role");
        assert_eq!(binding["roleRef"]["name"], "skiff");
        let subjects = binding["subjects"].as_array().unwrap();
        assert_eq!(subjects.len(), 1, "{what}: one subject");
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], "skiff");
        assert_eq!(subjects[0]["namespace"], NAMESPACE);

        let roles = of_kind(&docs, "Role");
        assert_eq!(roles.len(), 1, "{what}: one Role");
        let rules = roles[0]["rules"].as_array().unwrap();
        for rule in rules {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).contains(&"*"),
                    "{what}: no wildcard {field}: {rule}"
                );
            }
            assert!(rule["nonResourceURLs"].is_null(), "{what}: {rule}");
        }
        let allows = |group: &str, resource: &str, verb: &str| {
            rules.iter().any(|r| {
                strings(&r["apiGroups"]).contains(&group)
                    && strings(&r["resources"]).contains(&resource)
                    && strings(&r["verbs"]).contains(&verb)
            })
        };
        for (group, resource, verbs) in needed() {
            for verb in verbs {
                assert!(
                    allows(group, &resource, verb),
                    "{what}: the Role lacks {verb} on {resource} (group {group:?})"
                );
            }
        }
        // So Secrets are readable in this namespace only: a Role bound by a RoleBinding is the
        // only grant there is.
    }
}

/// A container port by name or number.
fn port_number(container: &serde_json::Value, port: &serde_json::Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
}

/// CPU in millicores, memory in bytes.
fn quantity(text: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("m", 1),
    ];
    for (suffix, factor) in units {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<u64>().expect("quantity") * factor;
        }
    }
    // Plain CPU cores.
    text.parse::<u64>().expect("quantity") * 1000
}

fn quantity_of(value: &serde_json::Value) -> u64 {
    match value {
        serde_json::Value::String(s) => quantity(s),
        serde_json::Value::Number(n) => n.as_u64().expect("whole quantity") * 1000,
        other => panic!("not a quantity: {other}"),
    }
}

#[test]
fn the_router_is_probed_limited_and_unprivileged() {
    for (what, docs) in renderings() {
        let deployment = one(&docs, "Deployment", "skiff");
        let spec = &deployment["spec"];
        assert_eq!(spec["replicas"], 1, "{what}: one router per site");
        assert_eq!(
            spec["strategy"]["type"], "Recreate",
            "{what}: never two routers"
        );
        let pod = &spec["template"];
        let labels = pod["metadata"]["labels"].as_object().unwrap();
        // The controller's Services select the router by this label.
        assert_eq!(labels["app.kubernetes.io/name"], "skiff", "{what}");
        assert_eq!(labels["app.kubernetes.io/component"], "router", "{what}");
        for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{what}: the selector matches the pod"
            );
        }
        let pod = &pod["spec"];
        assert_eq!(pod["serviceAccountName"], "skiff");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
        assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{what}");

        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{what}: one container");
        let c = &containers[0];
        let image = c["image"].as_str().unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.contains('/'),
            "{what}: the image is pinned to a version: {image}"
        );
        assert_eq!(strings(&c["command"]), ["/usr/local/bin/skiff"], "{what}");
        let args = strings(&c["args"]);
        let joined = args.join(" ");
        for part in [
            "--state-dir /var/lib/skiff",
            "site run --kube",
            "--metrics-addr 0.0.0.0:9090",
            "--log-format json",
        ] {
            assert!(
                joined.contains(part),
                "{what}: args lack `{part}`: {joined}"
            );
        }
        let env = c["env"].as_array().unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == "RUST_LOG" && e["value"] == "info"),
            "{what}: RUST_LOG=info"
        );

        let ports: Vec<(u64, &str)> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["containerPort"].as_u64().unwrap(),
                    p["protocol"].as_str().unwrap_or("TCP"),
                )
            })
            .collect();
        for port in [(55671, "TCP"), (55671, "UDP"), (9090, "TCP")] {
            assert!(ports.contains(&port), "{what}: port {port:?} declared");
        }
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{what}: {probe}");
            assert_eq!(
                port_number(c, &get["port"]),
                Some(9090),
                "{what}: {probe} on the metrics port"
            );
        }
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    !c["resources"][bound][resource].is_null(),
                    "{what}: resources.{bound}.{resource}"
                );
            }
        }
        for resource in ["cpu", "memory"] {
            assert!(
                quantity_of(&c["resources"]["requests"][resource])
                    <= quantity_of(&c["resources"]["limits"][resource]),
                "{what}: {resource} request within the limit"
            );
        }
        let security = &c["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{what}");
        assert_eq!(security["runAsUser"], 65532, "{what}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(
            strings(&security["capabilities"]["drop"]),
            ["ALL"],
            "{what}"
        );
        assert!(security["capabilities"]["add"].is_null(), "{what}");
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "{what}"
        );

        // The state dir is an emptyDir: the Secret, not a volume, keeps the site.
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/var/lib/skiff")
            .unwrap_or_else(|| panic!("{what}: /var/lib/skiff is mounted"));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert!(
            volume["emptyDir"].is_object(),
            "{what}: state is an emptyDir"
        );

        // Prometheus finds the metrics: by annotation, and by the Service's `metrics` port.
        let annotations = &spec["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{what}");
        assert_eq!(annotations["prometheus.io/port"], "9090", "{what}");
        let service = one(&docs, "Service", "skiff-metrics");
        assert_eq!(
            service["metadata"]["labels"]["app.kubernetes.io/name"],
            "skiff"
        );
        for (k, v) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{what}: the metrics Service selects the pod"
            );
        }
        let port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "metrics")
            .unwrap_or_else(|| panic!("{what}: a port named metrics"));
        assert_eq!(port_number(c, &port["targetPort"]), Some(9090), "{what}");
    }
}

#[test]
fn the_router_command_line_is_one_skiff_accepts() {
    // `--help` after the deployment's arguments: clap rejects an unknown flag before it gets
    // there, and prints help instead of running the controller.
    let docs = kustomize("base");
    let deployment = one(&docs, "Deployment", "skiff");
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(&args)
        .arg("--help")
        .output()
        .expect("run skiff");
    assert!(
        out.status.success(),
        "skiff {args:?} is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prod_accepts_links_and_is_ready_for_two_replicas() {
    let base = kustomize("base");
    let prod = kustomize("overlays/prod");
    let site = one(&prod, "Site", "prod");
    assert_eq!(site["spec"]["linkAccess"], "LoadBalancer");

    let pdbs = of_kind(&prod, "PodDisruptionBudget");
    assert_eq!(pdbs.len(), 1, "prod has a PodDisruptionBudget");
    let deployment = one(&prod, "Deployment", "skiff");
    let pod = &deployment["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    let selector = pdbs[0]["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "the budget covers the router");
    }
    // With one replica a budget that allows no disruption would block every node drain.
    let spec = &pdbs[0]["spec"];
    assert!(
        spec["maxUnavailable"].as_u64().is_some_and(|n| n >= 1)
            || spec["minAvailable"].as_u64() == Some(0),
        "the budget lets a drain evict the single router: {spec}"
    );

    // Still one replica until leader election, but spread over nodes and zones already.
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &pod["spec"];
    assert!(
        pod["affinity"]["podAntiAffinity"].is_object(),
        "anti-affinity prepared"
    );
    assert!(
        pod["topologySpreadConstraints"].is_array(),
        "topology spread prepared"
    );

    // More resources than the base.
    let base_resources = &one(&base, "Deployment", "skiff")["spec"]["template"]["spec"]
        ["containers"][0]["resources"];
    let prod_resources = &pod["containers"][0]["resources"];
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                quantity_of(&prod_resources[bound][resource])
                    > quantity_of(&base_resources[bound][resource]),
                "prod {bound}.{resource} is above the base's"
            );
        }
    }
    // The patch left the rest of the container alone.
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
}

#[test]
fn argocd_applications_sync_each_cluster_from_its_overlay() {
    let mut apps = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/argocd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            apps.push(serde_json::Value::deserialize(doc).unwrap());
        }
    }
    assert_eq!(
        apps.len(),
        ENVIRONMENTS.len(),
        "one Application per cluster"
    );
    for env in ENVIRONMENTS {
        let overlay = format!("deploy/overlays/{env}");
        let app = apps
            .iter()
            .find(|a| a["spec"]["source"]["path"] == overlay.as_str())
            .unwrap_or_else(|| panic!("an Application for {overlay}"));
        assert_eq!(kind(app), "Application");
        assert!(root().join(&overlay).join("kustomization.yaml").is_file());
        let spec = &app["spec"];
        assert_eq!(spec["destination"]["name"], env, "{env}: its own cluster");
        assert_eq!(spec["destination"]["namespace"], NAMESPACE, "{env}");
        assert_eq!(spec["syncPolicy"]["automated"]["prune"], true, "{env}");
        assert_eq!(spec["syncPolicy"]["automated"]["selfHeal"], true, "{env}");
        assert!(
            strings(&spec["syncPolicy"]["syncOptions"]).contains(&"CreateNamespace=true"),
            "{env}: CreateNamespace"
        );
    }
}

#[test]
fn the_image_is_what_the_deployment_runs() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let last_stage = dockerfile.rsplit("\nFROM ").next().expect("a final stage");
    assert!(
        last_stage.contains(" /usr/local/bin/skiff\n"),
        "the binary is /usr/local/bin/skiff"
    );
    assert!(last_stage.contains("\nUSER 65532"), "runs as uid 65532");
    assert!(last_stage.contains("55671/udp"), "declares the QUIC port");
    let build = dockerfile.split("\nFROM ").nth(1).expect("a build stage");
    assert!(
        build.contains("pgo/build.sh --target \"$target\" --out /out/skiff"),
        "the image's binary is the profile-guided build"
    );
    let script = root().join("pgo/build.sh");
    let mode = std::fs::metadata(&script).unwrap().permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
        "pgo/build.sh is executable"
    );
    let help = std::process::Command::new(&script)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Usage: pgo/build.sh [--target TRIPLE]") && !help.contains("set -e"),
        "pgo/build.sh --help prints its usage: {help}"
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "the build context leaves target/ out"
    );
}

#[test]
fn kubernetes_doc_examples_are_real_resources() {
    use skiff_control::crd;
    let doc = std::fs::read_to_string(root().join("docs/kubernetes.md")).unwrap();
    let mut checked = 0;
    for block in doc.split("```yaml").skip(1) {
        let block = block.split("```").next().unwrap();
        for value in serde_yaml_ng::Deserializer::from_str(block) {
            let value = serde_json::Value::deserialize(value)
                .unwrap_or_else(|e| panic!("docs/kubernetes.md: a yaml block does not parse: {e}"));
            if value["apiVersion"] != "skiff.dev/v1alpha1" {
                continue;
            }
            let parsed = match kind(&value) {
                "Site" => serde_json::from_value::<crd::Site>(value.clone()).map(drop),
                "Listener" => serde_json::from_value::<crd::Listener>(value.clone()).map(drop),
                "Connector" => serde_json::from_value::<crd::Connector>(value.clone()).map(drop),
                "AccessGrant" => {
                    serde_json::from_value::<crd::AccessGrant>(value.clone()).map(drop)
                }
                other => panic!("docs/kubernetes.md: unexpected kind {other}"),
            };
            parsed.unwrap_or_else(|e| {
                panic!("docs/kubernetes.md: {} {}: {e}", kind(&value), name(&value))
            });
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "docs/kubernetes.md shows the resources it explains"
    );
}
