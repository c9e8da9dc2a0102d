//! The `skiff` binary: command-line parsing, logging, the runtime, signals — and nothing else.
//! Each command group lives in its own module under `cli/`; the daemon is `skiff-control`.

#![forbid(unsafe_code)]

mod cli;
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
    let busy_poll = match args.busy_poll() {
        Ok(window) => window,
        Err(e) => {
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
    match runtime.block_on(async move {
        if !busy_poll.is_zero() {
            tokio::spawn(spin::spinner());
        }
        cli::run(args, recent_logs).await
    }) {
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
