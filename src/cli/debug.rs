//! `skiff debug dump FILE.tar.gz`: everything needed to debug a site, in one archive.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;
use skiff_control::admin;

/// `skiff debug ...`
#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Write settings (secrets masked), status, links, listeners, connectors, the network,
    /// recent logs and a metrics snapshot of the running site to a .tar.gz file.
    Dump {
        /// The archive to write.
        file: PathBuf,
    },
}

pub async fn run(command: DebugCommand, dir: &Path) -> Result<()> {
    let DebugCommand::Dump { file } = command;
    let client = admin::Client::new(dir);
    let mut entries: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, path) in [
        ("config.json", "/v1/config"),
        ("status.json", "/v1/status"),
        ("links.json", "/v1/links"),
        ("listeners.json", "/v1/listeners"),
        ("connectors.json", "/v1/connectors"),
        ("network.json", "/v1/network"),
    ] {
        let value: Value = client.get(path).await?;
        entries.push((name, serde_json::to_vec_pretty(&value)?));
    }
    let logs: Vec<String> = client.get("/v1/logs").await?;
    entries.push(("recent.log", (logs.join("\n") + "\n").into_bytes()));
    let metrics: String = client.get("/v1/metrics").await?;
    entries.push(("metrics.txt", metrics.into_bytes()));

    let out = std::fs::File::create(&file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in &entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        header.set_cksum();
        tar.append_data(&mut header, format!("skiff-debug/{name}"), data.as_slice())?;
    }
    tar.into_inner()?.finish()?.sync_all()?;
    println!(
        "wrote {} ({} files: {})",
        file.display(),
        entries.len(),
        entries
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
