//! The site's state directory kept in a Secret, so a pod (or a whole rebuilt cluster whose
//! Secret was restored) keeps the site's identity, grants and links.
//!
//! At start the state directory (an emptyDir) is restored from Secret `skiff-site-state`; while
//! the site runs, [`mirror`] copies every change back within a second. Files map to keys one to
//! one (`links/NAME.pem` becomes `links.NAME.pem`; names hold no dots). The admin socket is not
//! state and is never copied.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::store::{Mode, Store};

/// The Secret holding the state directory (the site's CA key among it).
pub const STATE_SECRET: &str = "skiff-site-state";
/// How often the state directory is compared with what the Secret last got.
const MIRROR_EVERY: Duration = Duration::from_secs(1);

/// The state directory's files, by Secret key.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

/// Reads the state files of `store` (everything but the admin socket).
pub fn snapshot(store: &Store) -> std::io::Result<Snapshot> {
    let mut files = Snapshot::new();
    for name in ["site.json", "state.json", "ca.pem", "ca.key"] {
        match std::fs::read(store.dir().join(name)) {
            Ok(bytes) => {
                files.insert(name.to_string(), bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let links = store.dir().join("links");
    if links.is_dir() {
        for entry in std::fs::read_dir(&links)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only finished files: the store writes a hidden temporary (`.NAME.pem.tmpPID.N`)
            // first and renames it.
            if name.ends_with(".pem") && !name.starts_with('.') && entry.file_type()?.is_file() {
                files.insert(format!("links.{name}"), std::fs::read(entry.path())?);
            }
        }
    }
    Ok(files)
}

/// Writes `files` into `store`'s directory (creating it), private files with mode 0600, and
/// `site.json` last, as `skiff site init` does: its presence marks the site as initialised, so
/// a restore cut short (the container killed, a write failed) is restored again at the next
/// start instead of running a site without its state.
pub fn write_snapshot(store: &Store, files: &Snapshot) -> Result<(), crate::Error> {
    store.create_dir()?;
    let (marker, rest): (Vec<_>, Vec<_>) = files.iter().partition(|(key, _)| *key == "site.json");
    for (key, bytes) in rest.into_iter().chain(marker) {
        let Some(path) = file_of_key(key) else {
            tracing::warn!(key = %key, "ignoring unknown key in the state Secret");
            continue;
        };
        let mode = if path.ends_with(".key") || path == "state.json" || path.starts_with("links/") {
            Mode::Private
        } else {
            Mode::Public
        };
        store.write(&path, bytes, mode)?;
    }
    Ok(())
}

/// The state file a Secret key stands for, if it is one.
fn file_of_key(key: &str) -> Option<String> {
    match key {
        "site.json" | "state.json" | "ca.pem" | "ca.key" => Some(key.to_string()),
        _ => {
            let name = key.strip_prefix("links.")?.strip_suffix(".pem")?;
            crate::model::check_name("link", name).ok()?;
            Some(format!("links/{name}.pem"))
        }
    }
}

/// Restores `store` from the state Secret; `false` if there is none (a new site).
pub async fn restore(
    client: &Client,
    namespace: &str,
    store: &Store,
) -> Result<bool, super::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_opt(STATE_SECRET).await? else {
        return Ok(false);
    };
    let files: Snapshot = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    if !files.contains_key("site.json") {
        return Ok(false);
    }
    write_snapshot(store, &files)?;
    tracing::info!(secret = STATE_SECRET, files = files.len(), "state restored");
    Ok(true)
}

/// Replaces the state Secret's content with `files`.
pub async fn save(client: &Client, namespace: &str, files: &Snapshot) -> Result<(), kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(STATE_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                super::resources::MANAGED_BY.0.to_string(),
                super::resources::MANAGED_BY.1.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            files
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Secret::default()
    };
    api.patch(
        STATE_SECRET,
        &PatchParams::apply(super::reconcile::FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await?;
    Ok(())
}

/// Copies changes of `store` into the state Secret until `shutdown` fires, then once more.
/// A failed write is logged and retried on the next tick; nothing is skipped.
pub async fn mirror(client: Client, namespace: String, store: Store, shutdown: CancellationToken) {
    let mut saved: Option<Snapshot> = None;
    let mut tick = tokio::time::interval(MIRROR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        match snapshot(&store) {
            Ok(files) if saved.as_ref() != Some(&files) => {
                match save(&client, &namespace, &files).await {
                    Ok(()) => {
                        tracing::debug!(secret = STATE_SECRET, "state saved");
                        saved = Some(files);
                    }
                    Err(e) => tracing::warn!(
                        secret = STATE_SECRET,
                        error = %e,
                        "cannot save the site state to its Secret; retrying"
                    ),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the state directory"),
        }
        if last {
            return;
        }
    }
}

/// True if `dir` holds a site (its `site.json`).
pub fn has_site(dir: &Path) -> bool {
    dir.join("site.json").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_state_files_only() {
        assert_eq!(file_of_key("ca.key").as_deref(), Some("ca.key"));
        assert_eq!(
            file_of_key("links.stg.pem").as_deref(),
            Some("links/stg.pem")
        );
        assert_eq!(file_of_key("links.../x.pem"), None);
        assert_eq!(file_of_key("admin.sock"), None);
        assert_eq!(file_of_key("other"), None);
    }

    #[test]
    fn a_snapshot_round_trips_through_a_fresh_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("a"));
        crate::site::init_for_test(&store);
        store
            .write("links/stg.pem", b"cert", Mode::Private)
            .unwrap();
        let files = snapshot(&store).unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            [
                "ca.key",
                "ca.pem",
                "links.stg.pem",
                "site.json",
                "state.json"
            ]
        );
        let copy = Store::new(dir.path().join("b"));
        write_snapshot(&copy, &files).unwrap();
        assert_eq!(snapshot(&copy).unwrap(), files);
        assert_eq!(copy.load_config().unwrap(), store.load_config().unwrap());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(copy.dir().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the CA key is private");
    }

    #[test]
    fn a_restore_cut_short_leaves_no_site_behind() {
        let mut files = Snapshot::new();
        for key in ["ca.key", "ca.pem", "site.json", "state.json"] {
            files.insert(key.to_string(), b"{}".to_vec());
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        // A directory where state.json goes makes its write fail, as a full disk would.
        std::fs::create_dir_all(dir.path().join("state.json")).unwrap();
        assert!(write_snapshot(&store, &files).is_err());
        assert!(
            !dir.path().join("site.json").exists(),
            "site.json was written before the state it marks as restored"
        );
    }
}
