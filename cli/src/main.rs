//! The `interpose` binary: parses the command line and reports a failure as one line.

use std::process::ExitCode;

/// jemalloc rather than glibc's malloc, as registry-svc: `interpose up` holds the registry
/// (see registry-svc's `main.rs` and `docs/BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::parse();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("interpose: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
