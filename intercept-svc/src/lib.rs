//! intercept-svc: the held-packet queue. Proxies follow its configuration and hold the
//! packets it selects until a user forwards (optionally edited) or drops them.
//!
//! [`queue`] is the state machine (no I/O), [`service`] serves it as
//! `interpose.intercept.v1.Intercept`, and [`registry_watch`] keeps each held packet's connection
//! status current from the registry (over gRPC, or in `interpose up` from the registry in
//! the same process).

pub mod queue;
pub mod registry_watch;
pub mod service;

use std::{net::SocketAddr, sync::Arc};

use platform::serve::Bound;
use proto::{intercept::intercept_server::InterceptServer, registry::registry_server::Registry};

pub use queue::{DEFAULT_MAX_HELD, DEFAULT_MAX_HELD_BYTES, MAX_REPLACEMENT};
pub use service::{InterceptService, InterceptState};

/// Largest gRPC message the service accepts: a replacement at the limit plus framing, so
/// that one just beyond the limit gets INVALID_ARGUMENT naming the limit.
pub const MAX_MESSAGE: usize = 2 * MAX_REPLACEMENT;

/// A running intercept queue: its gRPC service, the task following the registry and the
/// one expiring abandoned packets.
pub struct Intercept {
    shared: Arc<InterceptState>,
    follower: tokio::task::JoinHandle<()>,
    expirer: tokio::task::JoinHandle<()>,
}

impl Intercept {
    /// Starts following the registry at `registry_urls` (lazily: it need not be up yet;
    /// several URLs are replicas it fails over between, see [`platform::failover`]).
    pub fn start(
        registry_urls: &[String],
        token: Option<&str>,
        limits: Limits,
    ) -> Result<Self, platform::client::ClientError> {
        let replicas = platform::failover::Replicas::new(registry_urls, token)?;
        Ok(Self::following(
            Arc::new(registry_watch::Grpc::new(replicas)),
            limits,
        ))
    }

    /// Starts following `registry`, the registry service in this same process (the value
    /// `registry_svc::service` returns, in `interpose up`), by calling it directly.
    pub fn start_in_process<R: Registry>(registry: Arc<R>, limits: Limits) -> Self {
        Self::following(Arc::new(registry_watch::Direct(registry)), limits)
    }

    /// Starts following `registry`'s connection records.
    fn following(registry: Arc<dyn registry_watch::ConnectionEvents>, limits: Limits) -> Self {
        let shared = InterceptState::new(limits.max_held, limits.max_held_bytes);
        let follower = tokio::spawn(registry_watch::watch_registry(shared.clone(), registry));
        let expirer = tokio::spawn(shared.clone().expire_abandoned());
        Self {
            shared,
            follower,
            expirer,
        }
    }

    /// The queue as a proxy in this same process holds through it (`interpose up`): no
    /// socket, no HTTP/2 connection, and the same answers as over gRPC. Its holds and
    /// configuration stream end when `drain` fires.
    pub fn hold_sink(&self, drain: platform::serve::Drain) -> Arc<dyn platform::hold::HoldSink> {
        Arc::new(InterceptService::new(self.shared.clone(), drain))
    }

    /// The gRPC service, ready to add to a server; its streams end when `drain` fires.
    pub fn grpc_service(&self, drain: platform::serve::Drain) -> InterceptServer<InterceptService> {
        InterceptServer::new(InterceptService::new(self.shared.clone(), drain))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        self.follower.abort();
        self.expirer.abort();
    }
}

/// The held queue's bounds (the same flags for `intercept-svc` and `interpose up`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Limits {
    /// The most packets that may wait at once; a packet beyond it is forwarded without
    /// holding, and counted.
    #[arg(long, default_value_t = DEFAULT_MAX_HELD)]
    pub max_held: usize,
    /// The most payload bytes that may wait at once (e.g. 64MiB, 1GiB); a packet
    /// beyond it is forwarded without holding, and counted. One packet may be at most 4 MiB.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub max_held_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_held: DEFAULT_MAX_HELD,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
        }
    }
}

/// `--max-held-bytes`: a byte size as [`proto::size::parse`] reads it, more than 0.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    match proto::size::parse(s)? {
        0 => Err(format!(
            "{s:?}: the held queue needs room for at least 1 byte"
        )),
        b => Ok(b),
    }
}

/// Command-line options of the standalone `intercept-svc` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "intercept-svc",
    version,
    about = "Interpose intercept queue: held packets waiting for a verdict"
)]
pub struct Args {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50052", value_parser = platform::serve::listen_addr)]
    pub listen: SocketAddr,
    /// The registry to read from, who may call, streaming bounds and mTLS.
    #[command(flatten)]
    pub service: platform::registry_reader::RegistryReaderArgs,
    /// The held queue's bounds.
    #[command(flatten)]
    pub limits: Limits,
}

/// Runs the standalone service until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        listen,
        service: flags,
        limits,
    } = args;
    let auth = flags
        .auth
        .settle("intercept-svc", listen, flags.mtls.data_dir.as_deref())?;
    platform::serve::check_exposure(listen, auth.token.as_deref())?;
    flags.mtls.install_client()?;
    let intercept = Intercept::start(&flags.registry, auth.token.as_deref(), limits)?;
    let mut bound = Bound::bind(listen, &auth, &flags.streams).await?;
    let tls = flags.mtls.serve(&mut bound.server, bound.addr)?;
    bound
        .server
        .add_service(intercept.grpc_service(bound.server.drain()));
    bound
        .serve_until_signal("intercept-svc", &format!("{}{tls}", auth.ready_field()))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("2 mb"), Ok(2_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").unwrap_err().contains("at least 1 byte"));
        assert!(parse_bytes("ten").unwrap_err().contains("is not a size"));
    }
}
