//! export-svc: the decrypted sessions as PCAP and pcapng, built from the registry's
//! connection records and proxy history, which it reads over gRPC (so it runs on any host),
//! or in `interpose up` from the registry in the same process ([`registry`]).
//!
//! The framing is sans-I/O, in the `protocols` crate (which `fuzz/` fuzzes): its `wire` writes
//! Ethernet/IP/TCP/UDP headers, `frames` turns one connection into frames and `capture`
//! frames them as a capture file. Here [`endpoints`] picks a stream's addresses, [`plan`]
//! checks a request, [`job`] runs it page by page against the registry (a live export,
//! `follow`, in `live`, tails the registry's `FollowHistory` instead) and [`service`] serves
//! it: the I/O shell around the framing.

pub mod endpoints;
pub mod job;
mod live;
pub mod plan;
pub mod registry;
pub mod service;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use platform::serve::Bound;
use proto::{export::export_server::ExportServer, registry::registry_server::Registry};

pub use service::ExportService;

/// Largest registry reply read (a history page holding one very large packet).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The gRPC service reading from the registry at `registry_urls` (connecting on first use,
/// so it can start before the registry; several URLs are replicas it fails over between,
/// see [`platform::failover`]), ready to add to a server.
pub fn grpc_service(
    registry_urls: &[String],
    token: Option<&str>,
) -> anyhow::Result<ExportServer<ExportService>> {
    let registry = platform::failover::Replicas::new(registry_urls, token)
        .with_context(|| format!("registry URL {}", registry_urls.join(",")))?;
    Ok(ExportServer::new(ExportService::new(Arc::new(registry))))
}

/// The gRPC service reading from `registry`, the registry service in this same process (the
/// value `registry_svc::service` returns, in `interpose up`), by calling it directly.
pub fn in_process_service<R: Registry>(registry: Arc<R>) -> ExportServer<ExportService> {
    ExportServer::new(ExportService::new(Arc::new(registry::Direct(registry))))
}

/// Command-line options of the standalone `export-svc` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "export-svc",
    version,
    about = "Interpose exporter: decrypted sessions as PCAP and pcapng"
)]
pub struct Args {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50053", value_parser = platform::serve::listen_addr)]
    pub listen: SocketAddr,
    /// The registry to read from, who may call, streaming bounds and mTLS.
    #[command(flatten)]
    pub service: platform::registry_reader::RegistryReaderArgs,
}

/// Runs the standalone exporter until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        listen,
        service: flags,
    } = args;
    let auth = flags
        .auth
        .settle("export-svc", listen, flags.mtls.data_dir.as_deref())?;
    platform::serve::check_exposure(listen, auth.token.as_deref())?;
    flags.mtls.install_client()?;
    let service = grpc_service(&flags.registry, auth.token.as_deref())?;
    let mut bound = Bound::bind(listen, &auth, &flags.streams).await?;
    let tls = flags.mtls.serve(&mut bound.server, bound.addr)?;
    bound.server.add_service(service);
    bound
        .serve_until_signal("export-svc", &format!("{}{tls}", auth.ready_field()))
        .await?;
    Ok(())
}
