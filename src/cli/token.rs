//! `skiff token issue`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use skiff_control::admin::{self, IssueToken, TokenIssued};

/// `skiff token ...`
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issue a one-time link token; another site links to this one with `skiff link create`.
    Issue {
        /// How many times the token may be redeemed.
        #[arg(long, default_value_t = 1, value_name = "N")]
        uses: u32,
        /// How long the token stays valid.
        #[arg(long, value_parser = super::parse_duration, default_value = "15m", value_name = "DURATION")]
        expiry: Duration,
        /// Routing cost of links made with it.
        #[arg(long, default_value_t = 1, value_name = "N")]
        cost: u32,
        /// Write the token to FILE (mode 0600) instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

pub async fn run(command: TokenCommand, dir: &Path) -> Result<()> {
    let TokenCommand::Issue {
        uses,
        expiry,
        cost,
        output,
    } = command;
    let issued: TokenIssued = admin::Client::new(dir)
        .post(
            "/v1/tokens",
            &IssueToken {
                uses,
                expiry_secs: expiry.as_secs().max(1),
                cost,
            },
        )
        .await?;
    match output {
        Some(path) => {
            write_private(&path, issued.token.0.as_bytes())
                .with_context(|| format!("cannot write the token to {}", path.display()))?;
            eprintln!(
                "token {} written to {} (valid until {}, {} use{}); hand it to the other site \
                 over a secure channel",
                issued.grant,
                path.display(),
                issued.expires,
                uses,
                if uses == 1 { "" } else { "s" }
            );
        }
        None => print!("{}", issued.token.0),
    }
    Ok(())
}

/// Writes a secret to `path`, readable by its owner only (0600): a new file is created so, and
/// an existing one (say, made by `skiff token issue > FILE` earlier) is made so before the
/// secret goes in, as the mode given when opening applies only to a file it creates.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::write_private;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_token_file_is_private_whether_new_or_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.token");
        write_private(&new, b"secret").unwrap();
        assert_eq!(mode(&new), 0o600);

        let old = dir.path().join("old.token");
        std::fs::write(&old, b"an older, longer token").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&old, b"secret").unwrap();
        assert_eq!(
            mode(&old),
            0o600,
            "an existing world-readable file kept its mode"
        );
        assert_eq!(std::fs::read(&old).unwrap(), b"secret");
    }
}
