//! The standalone proxy-core binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proto::serve::init_tracing();
    proxy_core::cli::run(proxy_core::cli::Args::parse()).await
}
