//! `skiff link create | status | delete | revoke`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use skiff_control::admin::{self, CreateLink, LinkView, Revoke, Revoked};

use super::output::{self, Format};

/// `skiff link ...`
#[derive(Subcommand, Debug)]
pub enum LinkCommand {
    /// Redeem a token from another site and link to it; waits until the link is up.
    Create {
        /// The token file written by `skiff token issue` on the other site.
        token_file: PathBuf,
        /// Name of the link (default: the other site's name).
        #[arg(long)]
        name: Option<String>,
        /// Routing cost (default: the token's).
        #[arg(long, value_name = "N")]
        cost: Option<u32>,
        /// Link transport: `auto` tries QUIC first and falls back to TLS within 3 s.
        #[arg(long, default_value = "auto", value_parser = ["auto", "quic", "tls"])]
        transport: String,
        /// How long to wait for the link to come up.
        #[arg(long, value_parser = super::parse_duration, default_value = "30s", value_name = "DURATION")]
        wait: Duration,
        /// `-o yaml`: print the AccessToken resource (for GitOps) instead of redeeming here.
        #[arg(short = 'o', long = "output", value_parser = ["yaml"])]
        output: Option<String>,
    },
    /// Show links, outgoing and incoming: state, peer site, RTT.
    Status {
        /// Show only this link.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Delete an outgoing link (its certificate and key are removed too).
    Delete {
        /// The link's name.
        name: String,
    },
    /// Refuse a site that links to this one, from now on; its live links close at once.
    Revoke {
        /// The site's name or id.
        site: String,
    },
}

pub async fn run(command: LinkCommand, dir: &Path) -> Result<()> {
    let client = admin::Client::new(dir);
    match command {
        LinkCommand::Create {
            token_file,
            name,
            cost,
            transport,
            wait,
            output,
        } => {
            if output.is_some() {
                let resource = super::cluster::token_resource(&token_file)?;
                print!("{}", serde_yaml_ng::to_string(&resource)?);
                return Ok(());
            }
            let token = std::fs::read_to_string(&token_file)
                .with_context(|| format!("cannot read token file {}", token_file.display()))?;
            let request = CreateLink {
                token: skiff_control::token::Secret(token),
                name,
                cost,
                wait_secs: Some(wait.as_secs().max(1)),
                transport: Some(transport),
            };
            let what = format!(
                "redeeming the token and waiting up to {} s for the link to come up",
                wait.as_secs()
            );
            let link: LinkView =
                super::with_progress(&what, client.post("/v1/links", &request)).await?;
            println!(
                "link {} to site {} is {}{}{}",
                link.name,
                link.peer_site,
                link.state,
                link.transport
                    .as_deref()
                    .map(|t| format!(" over {t}"))
                    .unwrap_or_default(),
                link.rtt_ms
                    .map(|ms| format!(" (rtt {ms:.2} ms)"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        LinkCommand::Status { name, output } => {
            let mut links: Vec<LinkView> = client.get("/v1/links").await?;
            if let Some(name) = &name {
                links.retain(|l| &l.name == name);
                if links.is_empty() {
                    bail!("no link named {name} (see skiff link status)");
                }
            }
            if !output::print_structured(output, &links)? {
                print!("{}", output::link_table(&links));
            }
            Ok(())
        }
        LinkCommand::Delete { name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/links/{name}")).await?;
            println!("link {name} deleted");
            Ok(())
        }
        LinkCommand::Revoke { site } => {
            let revoked: Revoked = client
                .post("/v1/revocations", &Revoke { site: site.clone() })
                .await?;
            println!(
                "site {} ({}) revoked; {} live link{} closed",
                if revoked.name.is_empty() {
                    &site
                } else {
                    &revoked.name
                },
                revoked.id,
                revoked.closed_links,
                if revoked.closed_links == 1 { "" } else { "s" }
            );
            Ok(())
        }
    }
}
