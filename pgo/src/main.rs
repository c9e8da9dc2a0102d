//! `skiff-pgo-train`: runs the training workload of the profile-guided build against a
//! `skiff` binary (pgo/build.sh runs it with the profile-instrumented build).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;

/// Runs sites of a `skiff` binary on loopback and carries traffic through them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The `skiff` binary to train.
    #[arg(long)]
    skiff: PathBuf,
    /// How long each phase of the workload runs.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    phase: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let report = skiff_pgo::train(&args.skiff, args.phase).await?;
    print!("{report}");
    Ok(())
}
