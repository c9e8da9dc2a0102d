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

pub(crate) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
