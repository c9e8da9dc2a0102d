//! The `skiff` binary: command-line parsing, logging, the runtime, signals — and nothing else.
//! Each command group lives in its own module under `cli/`; the daemon is `skiff-control`.

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: carrying bytes allocates and frees buffers of
/// tens of KiB at a high rate, and glibc's allocator hands that memory back to the kernel and
/// faults it in again (about 200,000 page faults per GB carried; docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let json_logs = args.log_format == cli::LogFormat::Json;
    let recent_logs = cli::init_logging(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args, recent_logs)) {
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
