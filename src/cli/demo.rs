//! `skiff demo`: three sites (dev, stg, prod) in this process on loopback, linked
//! dev → stg → prod with real tokens, real mutual TLS and real link ports.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use skiff_control::admin::{self, CreateLink, IssueToken, LinkView, TokenIssued};
use skiff_control::{InitOptions, Listeners, Store};
use tokio_util::sync::CancellationToken;

use super::output;

/// Flags of `skiff demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the network running (until Ctrl-C) and print how to inspect it.
    #[arg(long)]
    keep: bool,
}

const SITES: [&str; 3] = ["dev", "stg", "prod"];

pub async fn run(args: DemoArgs) -> Result<()> {
    let root = std::env::temp_dir().join(format!("skiff-demo-{}", std::process::id()));
    let shutdown = CancellationToken::new();
    let result = demo(&root, &args, &shutdown).await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn demo(root: &std::path::Path, args: &DemoArgs, shutdown: &CancellationToken) -> Result<()> {
    println!("starting sites {} on loopback...", SITES.join(", "));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for name in SITES {
        let dir = root.join(name);
        let store = Store::new(&dir);
        skiff_control::init(
            &store,
            InitOptions {
                name: name.into(),
                link_hosts: vec!["127.0.0.1".into()],
                link_port: 0,
                metrics_addr: None,
                cert_lifetime: Duration::from_secs(3600),
            },
        )?;
        let link = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin = admin::bind(&store.admin_socket())?;
        tokio::spawn(skiff_control::site::run(
            store,
            Listeners {
                link,
                admin,
                metrics: None,
            },
            shutdown.child_token(),
        ));
        dirs.push(dir);
    }
    let client = |i: usize| admin::Client::new(&dirs[i]);

    for (from, to) in [(0, 1), (1, 2)] {
        let issued: TokenIssued = client(to)
            .post(
                "/v1/tokens",
                &IssueToken {
                    uses: 1,
                    expiry_secs: 900,
                    cost: 1,
                },
            )
            .await
            .with_context(|| format!("{} could not issue a token", SITES[to]))?;
        let link: LinkView = client(from)
            .post(
                "/v1/links",
                &CreateLink {
                    token: issued.token,
                    name: None,
                    cost: None,
                    wait_secs: Some(10),
                },
            )
            .await
            .with_context(|| format!("{} could not link to {}", SITES[from], SITES[to]))?;
        println!(
            "{} -> {}: token {} redeemed, link {}",
            SITES[from], SITES[to], issued.grant, link.state
        );
    }
    // Let a few heartbeats pass so every link shows a measured RTT.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let mut all_up = true;
    for (i, name) in SITES.iter().enumerate() {
        let links: Vec<LinkView> = client(i).get("/v1/links").await?;
        all_up &= links.iter().all(|l| l.state == "up");
        println!("\nsite {name}:");
        print!("{}", output::link_table(&links));
    }
    anyhow::ensure!(all_up, "some links are not up");

    if args.keep {
        println!("\nthe demo network keeps running; inspect it with e.g.:");
        for (i, name) in SITES.iter().enumerate() {
            println!(
                "  skiff --state-dir {} status    # {name}",
                dirs[i].display()
            );
        }
        println!("press Ctrl-C to stop");
        super::shutdown_on_signals()?.cancelled().await;
    }
    Ok(())
}
