//! `interpose up`: every service in one process on one loopback gRPC port, with a default
//! data directory: the embedded default.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::serve::GrpcServer;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory (registry store, CA). Default: the user's data home, e.g.
    /// ~/.local/share/interpose.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// SOCKS5 listen address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:1080")]
    pub socks: SocketAddr,
    /// gRPC listen address for every service; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc: SocketAddr,
    /// Extra PEM roots to trust for upstream TLS servers.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// Do not verify upstream TLS certificates (logged, and recorded on every connection).
    #[arg(long)]
    pub upstream_insecure: bool,
    /// Bearer token the gRPC API requires (needed to listen beyond loopback).
    #[arg(long, env = "INTERPOSE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The data directory to use: the given one, or `interpose` under the user's data home.
pub fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(d) => Ok(d),
        None => dirs::data_dir()
            .map(|d| d.join("interpose"))
            .ok_or_else(|| anyhow!("no data home found for this user: pass --data-dir")),
    }
}

/// Runs every service until SIGINT or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    proto::serve::init_tracing();
    proto::serve::check_exposure(args.grpc, args.token.as_deref())?;
    let dir = data_dir(args.data_dir)?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let registry = registry_svc::open(&dir)?;
    let listener = tokio::net::TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("binding gRPC on {}", args.grpc))?;
    let grpc = listener.local_addr()?;
    let mut server = GrpcServer::new(args.token.clone());
    server.add_service(registry_svc::grpc_service(registry.clone()));
    let serving = tokio::spawn(server.serve(listener, proto::serve::shutdown_signal()));
    println!("ready grpc=http://{grpc} data_dir={}", dir.display());
    serving.await.context("gRPC server task")??;
    registry
        .flush()
        .await
        .context("flushing the registry store")?;
    Ok(())
}
