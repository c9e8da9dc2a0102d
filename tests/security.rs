//! What another local user, or someone who copies a site's files, finds on the host: the
//! checks behind the "local user" and "stolen token" parts of docs/security.md.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::Site;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `dir`, recursively, with its contents (sockets and unreadable files
/// skipped).
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.extend(files(&path));
        } else if kind.is_file() {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn secrets_stay_private_on_the_host() {
    let b = Site::start("b");
    let a = Site::start("a");
    let token = b.issue("token.yaml", &["--uses", "2"]);
    a.link_to(&b);
    let (state_a, state_b) = (a.state_dir(), b.state_dir());

    // Modes: the state dir is the owner's alone; keys, state and the admin socket are 0600;
    // the token file too.
    for state in [&state_a, &state_b] {
        assert_eq!(mode(state), 0o700, "{}", state.display());
        for private in ["ca.key", "state.json", "admin.sock"] {
            assert_eq!(mode(&state.join(private)), 0o600, "{private}");
        }
    }
    assert_eq!(mode(&state_a.join("links/b.pem")), 0o600, "a link's key");
    assert_eq!(mode(&token), 0o600, "the token file");

    // The token holds no private key; the issuer keeps only the code's hash: the code is in no
    // file of its state dir, nor in either daemon's log.
    let yaml = std::fs::read_to_string(&token).unwrap();
    assert!(!yaml.contains("PRIVATE KEY"), "a private key in a token");
    let code = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("code: "))
        .expect("a code")
        .to_string();
    assert_eq!(code.len(), 40, "160 bits, hex");
    for (path, content) in files(&state_b).iter().chain(files(&state_a).iter()) {
        assert!(
            !contains(content, &code),
            "the code is in {}",
            path.display()
        );
    }
    assert!(!b.logs().contains(&code) && !a.logs().contains(&code));

    // Another local user can neither read the keys nor talk to the admin socket — not even
    // with the directories opened for traversal, so that the socket's own mode is what
    // refuses it.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let have_runuser = Command::new("runuser").arg("--help").output().is_ok();
    if !is_root || !have_runuser {
        eprintln!("note: not root or no runuser; skipping the other-user part");
        return;
    }
    let parent = state_b.parent().unwrap().to_path_buf();
    let saved = (mode(&parent), mode(&state_b));
    for dir in [&parent, &state_b] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(args)
            .output()
            .expect("cannot run runuser")
    };
    let key = state_b.join("ca.key");
    let read = as_nobody(&["cat", key.to_str().unwrap()]);
    let status = as_nobody(&[
        common::skiff(),
        "--state-dir",
        state_b.to_str().unwrap(),
        "status",
    ]);
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(saved.0)).unwrap();
    std::fs::set_permissions(&state_b, std::fs::Permissions::from_mode(saved.1)).unwrap();
    assert!(!read.status.success(), "another user read the CA key");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success()
            && stderr.contains("permission denied on the admin socket")
            && stderr.contains("run the command as that user"),
        "another user used the admin socket, or was not told why not: {stderr}"
    );
    // The owner still can.
    b.status_json();
}
