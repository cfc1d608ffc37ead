//! The `interpose` binary: parses the command line and reports a failure as one line.

use std::process::ExitCode;

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
