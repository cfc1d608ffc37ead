//! The standalone intercept-svc binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::serve::init_tracing();
    intercept_svc::run(intercept_svc::Args::parse()).await
}
