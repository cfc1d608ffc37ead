//! The standalone export-svc binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::serve::init_tracing();
    export_svc::run(export_svc::Args::parse()).await
}
