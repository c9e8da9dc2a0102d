//! The `skiff` binary: command-line parsing, logging, the runtime, signals — and nothing else.
//! Each command group lives in its own module under `cli/`; the daemon is `skiff-control`.

#![forbid(unsafe_code)]

mod cli;
mod shard;
mod spin;

use std::process::ExitCode;

use clap::Parser;

/// jemalloc instead of the system allocator, so that memory freed after a burst of
/// connections goes back to the system: with glibc's malloc, a site that had carried 10,000
/// connections kept its peak resident memory after they had all closed (tests/load.rs,
/// docs/reliability.md). `site run` turns on its background purging threads.
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let json_logs = args.log_format == cli::LogFormat::Json;
    let recent_logs = cli::init_logging(&args);
    let mut args = args;
    let (busy_poll, shards) = match (args.busy_poll(), args.shards()) {
        (Ok(window), Ok(shards)) => (window, shards),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = match args.threads() {
        cli::Threads::One => {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            spin::install(&mut builder, busy_poll);
            builder
        }
        cli::Threads::Pool(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut further = Vec::new();
    for index in 1..shards {
        match shard::Shard::start(index, busy_poll) {
            Ok(shard) => further.push(shard),
            Err(e) => {
                eprintln!("error: cannot start shard {index} (shard 0 is the main thread): {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    args.set_shard_runtimes(further.iter().map(shard::Shard::handle).collect());
    let outcome = runtime.block_on(async move {
        if !busy_poll.is_zero() {
            tokio::spawn(spin::spinner());
        }
        cli::run(args, recent_logs).await
    });
    // The site has stopped: what is left on the shards goes with them.
    for shard in further {
        shard.stop();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_logs {
                // Collectors expect every line to be JSON, fatal errors included.
                tracing::error!(error = %format!("{e:#}"), "fatal");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
