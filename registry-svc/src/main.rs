//! The standalone registry-svc binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proto::serve::init_tracing();
    registry_svc::run(registry_svc::Args::parse()).await
}
