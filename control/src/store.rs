//! The site's state directory.
//!
//! Layout (everything a restarted daemon needs):
//!
//! ```text
//! DIR/site.json        the site's settings (name, id, link hosts and port, ...)
//! DIR/ca.pem, ca.key   the site's CA (the key is 0600)
//! DIR/state.json       grants, outgoing links, linked peers, revocations (0600)
//! DIR/links/NAME.pem   the client certificate of outgoing link NAME
//! DIR/links/NAME.key   its private key (0600)
//! DIR/admin.sock       the running daemon's admin API (0600)
//! ```
//!
//! Every write is atomic: a temporary file in the same directory, fsync, rename, fsync of the
//! directory. A failed write (a full disk) leaves the previous file intact and returns an error.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{SiteConfig, State};
use crate::Error;

/// A site's state directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Who may read a file the store writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 0644: certificates and settings.
    Public,
    /// 0600: private keys and state holding secrets.
    Private,
}

impl Store {
    /// The store at `dir` (nothing is read or created yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// True if a site was initialised here.
    pub fn exists(&self) -> bool {
        self.dir.join("site.json").exists()
    }

    /// Creates the directory (0700) if needed.
    pub fn create_dir(&self) -> Result<(), Error> {
        fs::create_dir_all(self.dir.join("links")).map_err(|e| self.io_error(&self.dir, e))?;
        let _ = fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700));
        Ok(())
    }

    /// Reads the site's settings; says how to create a site if there is none.
    pub fn load_config(&self) -> Result<SiteConfig, Error> {
        if !self.exists() {
            return Err(Error::NoSite(self.dir.clone()));
        }
        self.read_json("site.json")
    }

    /// Writes the site's settings.
    pub fn save_config(&self, config: &SiteConfig) -> Result<(), Error> {
        self.write_json("site.json", config, Mode::Public)
    }

    /// Reads the mutable state (empty if the site has none yet).
    pub fn load_state(&self) -> Result<State, Error> {
        if !self.dir.join("state.json").exists() {
            return Ok(State::default());
        }
        self.read_json("state.json")
    }

    /// Writes the mutable state.
    pub fn save_state(&self, state: &State) -> Result<(), Error> {
        self.write_json("state.json", state, Mode::Private)
    }

    /// Reads a text file relative to the state dir.
    pub fn read(&self, name: &str) -> Result<String, Error> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(|e| self.io_error(&path, e))
    }

    /// Removes a file relative to the state dir (no error if it is already gone).
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io_error(&path, e)),
            _ => Ok(()),
        }
    }

    /// Atomically writes `contents` to `name` (relative to the state dir) with `mode`.
    pub fn write(&self, name: &str, contents: &[u8], mode: Mode) -> Result<(), Error> {
        let path = self.dir.join(name);
        let parent = path.parent().unwrap_or(&self.dir).to_path_buf();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{file_name}{}", temporary_suffix()));
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(match mode {
                    Mode::Public => 0o644,
                    Mode::Private => 0o600,
                })
                .open(&tmp)?;
            file.write_all(contents)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &path)?;
            // The rename is only durable once the directory entry is on disk too.
            fs::File::open(&parent)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_error(&path, e));
        }
        Ok(())
    }

    fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T, Error> {
        let path = self.dir.join(name);
        let raw = fs::read(&path).map_err(|e| self.io_error(&path, e))?;
        serde_json::from_slice(&raw).map_err(|e| Error::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T, mode: Mode) -> Result<(), Error> {
        let mut raw = serde_json::to_vec_pretty(value).map_err(|e| Error::Bug(e.to_string()))?;
        raw.push(b'\n');
        self.write(name, &raw, mode)
    }

    /// Makes sure `bytes` more can be written to the state dir, by writing (and syncing) a
    /// file of that size, removed when the returned guard drops. For writes that must not fail
    /// after something irrevocable, such as spending a token's use at another site: reserve
    /// first, act, drop the reservation, write.
    pub fn reserve(&self, bytes: usize) -> Result<Reservation, Error> {
        let path = self.dir.join(format!(".reserved{}", temporary_suffix()));
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            // Real bytes, not a sparse file or fallocate: they are what a later write needs.
            file.write_all(&vec![0u8; bytes])?;
            file.sync_all()
        })();
        let reservation = Reservation { path };
        match result {
            Ok(()) => Ok(reservation),
            Err(e) => Err(self.io_error(&self.dir, e)),
        }
    }

    fn io_error(&self, path: &Path, e: std::io::Error) -> Error {
        use std::io::ErrorKind;
        if matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
            return Error::NoSpace {
                path: path.to_path_buf(),
                dir: self.dir.clone(),
            };
        }
        Error::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// `.tmpPID.N`, a suffix no other write or reservation, in this process or another, uses at the
/// same time: two writes of one file (a link's certificate renewed while it is written anew)
/// must not share a temporary file, nor two link creations under way at once a reservation.
fn temporary_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(".tmp{}.{n}", std::process::id())
}

/// Space held in the state dir by [`Store::reserve`]; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    path: PathBuf,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_atomic_and_private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.create_dir().unwrap();
        store.write("a.key", b"one", Mode::Private).unwrap();
        store.write("a.key", b"two", Mode::Private).unwrap();
        assert_eq!(store.read("a.key").unwrap(), "two");
        let mode = fs::metadata(dir.path().join("a.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.create_dir().unwrap();
        store.write("links/x.pem", b"old", Mode::Public).unwrap();
        // Writing into a directory that does not exist fails like a full disk would: before
        // the rename, so the old file stays.
        assert!(store.write("nope/x.pem", b"new", Mode::Public).is_err());
        assert_eq!(store.read("links/x.pem").unwrap(), "old");
    }

    #[test]
    fn a_reservation_holds_space_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.create_dir().unwrap();
        let files = || fs::read_dir(dir.path()).unwrap().count();
        let before = files();
        let reservation = store.reserve(10_000).unwrap();
        assert_eq!(files(), before + 1);
        // Two held at once (two link creations under way) are two files: dropping one leaves
        // the other's space held.
        let second = store.reserve(10_000).unwrap();
        assert_eq!(files(), before + 2);
        drop(reservation);
        assert_eq!(files(), before + 1);
        drop(second);
        assert_eq!(files(), before);
    }

    #[test]
    fn missing_site_says_how_to_create_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::new(dir.path())
            .load_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("skiff"), "{err}");
        assert!(err.contains("site init"), "{err}");
    }
}
