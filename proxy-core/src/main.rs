//! The standalone proxy-core binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proto::serve::init_tracing();
    // Private files whatever the caller's umask, and room for many connections.
    proto::private::restrict_umask();
    proto::limits::raise_open_files();
    proxy_core::cli::run(proxy_core::cli::Args::parse()).await
}
