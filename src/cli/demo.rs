//! `skiff demo`: three sites (dev, stg, prod) in this process on loopback, linked
//! dev → stg → prod with real tokens, real mutual TLS and real link ports. stg and prod each run
//! a small built-in web backend under the routing key `backend`; dev has a listener for it, so
//! dev reaches prod through stg. The demo sends batches of connections through dev's listener,
//! shows how they spread, stops prod, and shows the traffic moving to stg without a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use skiff_control::admin::{
    self, CreateConnector, CreateLink, CreateListener, IssueToken, LinkView, ListenerView,
    NetworkView, TokenIssued,
};
use skiff_control::{InitOptions, Listeners, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::output;

/// Flags of `skiff demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the network running (until Ctrl-C) and print the ports to try with curl.
    #[arg(long)]
    keep: bool,
    /// Connections per batch.
    #[arg(long, default_value_t = 100, value_name = "N")]
    connections: usize,
}

const SITES: [&str; 3] = ["dev", "stg", "prod"];
const KEY: &str = "backend";

pub async fn run(args: DemoArgs) -> Result<()> {
    let root = std::env::temp_dir().join(format!("skiff-demo-{}", std::process::id()));
    let shutdown = CancellationToken::new();
    let result = demo(&root, &args, &shutdown).await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

struct Demo {
    dirs: Vec<PathBuf>,
    sites: Vec<CancellationToken>,
}

impl Demo {
    fn client(&self, site: usize) -> admin::Client {
        admin::Client::new(&self.dirs[site])
    }
}

async fn demo(root: &Path, args: &DemoArgs, shutdown: &CancellationToken) -> Result<()> {
    println!("starting sites {} on loopback...", SITES.join(", "));
    let mut demo = Demo {
        dirs: Vec::new(),
        sites: Vec::new(),
    };
    for name in SITES {
        let dir = root.join(name);
        let store = Store::new(&dir);
        skiff_control::init(
            &store,
            InitOptions {
                name: name.into(),
                link_hosts: vec!["127.0.0.1".into()],
                link_port: 0,
                quic_port: Some(0),
                metrics_addr: None,
                cert_lifetime: Duration::from_secs(3600),
            },
        )?;
        let link = TcpListener::bind("127.0.0.1:0").await?;
        let admin = admin::bind(&store.admin_socket())?;
        let quic = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let site = shutdown.child_token();
        tokio::spawn(skiff_control::site::run(
            store,
            Listeners {
                link,
                admin,
                metrics: None,
                quic: Some(quic),
            },
            site.clone(),
        ));
        demo.dirs.push(dir);
        demo.sites.push(site);
    }

    for (from, to) in [(0, 1), (1, 2)] {
        let issued: TokenIssued = demo
            .client(to)
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
        let link: LinkView = demo
            .client(from)
            .post(
                "/v1/links",
                &CreateLink {
                    token: issued.token,
                    name: None,
                    cost: None,
                    wait_secs: Some(10),
                    transport: None,
                },
            )
            .await
            .with_context(|| format!("{} could not link to {}", SITES[from], SITES[to]))?;
        println!(
            "{} -> {}: token {} redeemed, link {}",
            SITES[from], SITES[to], issued.grant, link.state
        );
    }

    for site in [1, 2] {
        let port = backend(SITES[site], shutdown.clone()).await?;
        let _: admin::ConnectorView = demo
            .client(site)
            .post(
                "/v1/connectors",
                &CreateConnector {
                    name: None,
                    routing_key: KEY.into(),
                    host: "127.0.0.1".into(),
                    port,
                    weight: None,
                },
            )
            .await?;
        println!(
            "{}: built-in backend on 127.0.0.1:{port}, connector `{KEY}`",
            SITES[site]
        );
    }
    let listener: ListenerView = demo
        .client(0)
        .post(
            "/v1/listeners",
            &CreateListener {
                name: None,
                routing_key: KEY.into(),
                port: 0,
                bind: Some("127.0.0.1".into()),
                strategy: None,
            },
        )
        .await?;
    let port = listener.port;
    println!("dev: listener `{KEY}` on 127.0.0.1:{port}");
    wait_for_targets(&demo, 2).await?;

    println!(
        "\nbatch 1: {} concurrent connections to dev's listener",
        args.connections
    );
    let (spread, failed) = batch(port, args.connections).await;
    print_spread(&spread, failed);
    if failed > 0 {
        bail!("{failed} connections failed with every site up");
    }

    println!("\nstopping prod...");
    demo.sites[2].cancel();
    // Heartbeats notice a dead peer within a second; give it that plus a little.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "batch 2: {} concurrent connections, 1.5 s after prod stopped",
        args.connections
    );
    let (spread, failed) = batch(port, args.connections).await;
    print_spread(&spread, failed);
    if failed > 0 {
        bail!("{failed} connections failed after failover");
    }

    let network: NetworkView = demo.client(0).get("/v1/network").await?;
    println!("\nthe network as dev sees it:\n");
    print!("{}", super::service::network_table(&network));
    for (i, name) in SITES.iter().enumerate().take(2) {
        let links: Vec<LinkView> = demo.client(i).get("/v1/links").await?;
        println!("\nlinks of {name}:");
        print!("{}", output::link_table(&links));
    }

    if args.keep {
        println!("\nthe demo network keeps running (prod stays stopped). Try:");
        println!("  curl http://127.0.0.1:{port}/");
        for (i, name) in SITES.iter().enumerate().take(2) {
            println!(
                "  skiff --state-dir {} network status    # {name}",
                demo.dirs[i].display()
            );
        }
        println!("press Ctrl-C to stop");
        super::shutdown_on_signals()?.drain.cancelled().await;
    }
    Ok(())
}

async fn wait_for_targets(demo: &Demo, want: usize) -> Result<()> {
    for _ in 0..100 {
        let listeners: Vec<ListenerView> = demo.client(0).get("/v1/listeners").await?;
        if listeners.iter().any(|l| l.targets.len() >= want) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("dev never learned of {want} sites serving {KEY}")
}

/// Sends `n` concurrent HTTP requests through the listener; returns replies per site and the
/// number of failed connections.
async fn batch(port: u16, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut reply = String::new();
            tcp.read_to_string(&mut reply).await.ok()?;
            let body = reply.split("\r\n\r\n").nth(1)?;
            body.trim().strip_prefix("hello from ").map(str::to_string)
        });
    }
    let mut spread = BTreeMap::new();
    let mut failed = 0;
    while let Some(result) = tasks.join_next().await {
        match result.ok().flatten() {
            Some(site) => *spread.entry(site).or_insert(0) += 1,
            None => failed += 1,
        }
    }
    (spread, failed)
}

fn print_spread(spread: &BTreeMap<String, usize>, failed: usize) {
    let total: usize = spread.values().sum::<usize>() + failed;
    for (site, n) in spread {
        println!("  {site:<5} {n:>4}  {}", "#".repeat(n * 40 / total.max(1)));
    }
    println!("  failed {failed:>3}");
}

/// A tiny web server answering `hello from SITE` after a short pause (so the connections of a
/// batch overlap and the balanced strategy has open connections to weigh).
async fn backend(site: &'static str, shutdown: CancellationToken) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(_) => continue,
                },
                _ = shutdown.cancelled() => return,
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                    if request.len() > 16 * 1024 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let body = format!("hello from {site}\n");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    Ok(port)
}
