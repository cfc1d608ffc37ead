//! The standalone proxy-core binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::serve::init_tracing();
    // Private files whatever the caller's umask, and room for many connections.
    platform::private::restrict_umask();
    platform::limits::raise_open_files();
    proxy_core::cli::run(proxy_core::cli::Args::parse()).await
}
