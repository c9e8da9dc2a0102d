//! Checks on what ships beside the code: the CRDs under deploy/crds/ are exactly what
//! `skiff crd` generates from the Rust types, and every YAML and JSON example under deploy/ and
//! docs/ parses.

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
