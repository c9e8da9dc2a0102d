//! skiff's control part.
//!
//! - [`model`]: the site's settings and state as the state directory stores them;
//! - [`store`]: the state directory, written atomically;
//! - [`token`]: the access-token file format;
//! - [`claim`]: token redemption on the link port;
//! - [`limit`]: the per-address rate limit on redemption attempts;
//! - [`admin`]: the admin API (HTTP + JSON on a unix socket) and its client;
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and `/network.svg`, and the control metrics;
//! - [`picture`]: the network drawn as SVG and as Graphviz DOT;
//! - [`logs`]: recent log lines kept for `skiff debug dump`;
//! - [`crd`]: the Kubernetes custom resources;
//! - [`controller`]: `site run --kube`, the daemon as the controller of its namespace;
//! - [`site`]: the site daemon, which composes the router, the grant server and the admin API.

#![forbid(unsafe_code)]

pub mod admin;
pub mod claim;
pub mod controller;
pub mod crd;
pub mod http;
pub mod limit;
pub mod logs;
pub mod model;
pub mod picture;
pub mod site;
pub mod store;
pub mod token;

use std::path::PathBuf;

pub use site::{init, InitOptions, Limits, Listeners};
pub use store::Store;

/// Errors of the control part.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state dir holds no site.
    #[error(
        "no site in {0} (no site.json); create one with: skiff --state-dir {0} site init NAME"
    )]
    NoSite(PathBuf),
    /// A site already exists where one is being created.
    #[error("a site already exists in {0}; use another --state-dir, or remove it first")]
    SiteExists(PathBuf),
    /// Reading or writing a file failed (a full disk, permissions).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The state dir's filesystem is full (or the user's quota is spent); the write was not
    /// made, and the file it was to replace is intact.
    #[error(
        "no space left on device writing {}: free space in {} and try again",
        path.display(),
        dir.display()
    )]
    NoSpace {
        /// The file that could not be written.
        path: PathBuf,
        /// The state dir.
        dir: PathBuf,
    },
    /// A state file cannot be parsed.
    #[error("{} is corrupt ({reason}); restore it from a backup or re-create the site", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
    /// The caller asked for something impossible.
    #[error("{0}")]
    Invalid(String),
    /// A certificate operation failed.
    #[error("certificate: {0}")]
    Certs(#[from] skiff_certs::Error),
    /// Something that cannot happen did.
    #[error("internal error (a bug in skiff): {0}")]
    Bug(String),
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_say_what_to_do() {
        let e = super::Error::NoSite("/x".into()).to_string();
        assert!(e.contains("site init"));
    }
}
