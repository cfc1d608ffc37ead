//! intercept-svc: the held-packet queue. Proxies follow its configuration and hold the
//! packets it selects until a user forwards (optionally edited) or drops them.
//!
//! [`queue`] is the state machine (no I/O), [`service`] serves it as
//! `interpose.intercept.v1.Intercept`, and [`follow`] keeps each held packet's connection
//! status current from the registry.

pub mod follow;
pub mod queue;
pub mod service;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use proto::{intercept::intercept_server::InterceptServer, serve::GrpcServer};

pub use queue::{DEFAULT_MAX_HELD, MAX_REPLACEMENT};
pub use service::{InterceptService, Shared};

/// Largest gRPC message the service accepts: a replacement at the limit plus framing, so
/// that one just beyond the limit gets INVALID_ARGUMENT naming the limit.
pub const MAX_MESSAGE: usize = 2 * MAX_REPLACEMENT;

/// A running intercept queue: its gRPC service and the task following the registry.
pub struct Intercept {
    shared: Arc<Shared>,
    follower: tokio::task::JoinHandle<()>,
}

impl Intercept {
    /// Starts following the registry at `registry_urls` (lazily: it need not be up yet;
    /// several URLs are replicas it fails over between, see [`proto::failover`]).
    pub fn start(
        registry_urls: &[String],
        token: Option<&str>,
        max_held: usize,
    ) -> Result<Self, proto::client::ClientError> {
        let shared = Shared::new(max_held);
        let registry = Arc::new(proto::failover::Replicas::new(registry_urls, token)?);
        let follower = tokio::spawn(follow::follow_registry(shared.clone(), registry));
        Ok(Self { shared, follower })
    }

    /// The gRPC service, ready to add to a server; its streams end when `drain` fires.
    pub fn grpc_service(&self, drain: proto::serve::Drain) -> InterceptServer<InterceptService> {
        InterceptServer::new(InterceptService::new(self.shared.clone(), drain))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        self.follower.abort();
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
    #[arg(long, default_value = "127.0.0.1:50052", value_parser = proto::serve::listen_addr)]
    pub listen: SocketAddr,
    /// gRPC URL of the registry, for the live status of held packets' connections; for
    /// registry-svc replicas serving one database, several (comma-separated or repeated),
    /// tried in turn.
    #[arg(
        long,
        required = true,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        value_parser = proto::failover::list_entry
    )]
    pub registry: Vec<String>,
    /// Who may call: the token (or `--no-auth`), as every server takes it. The token is
    /// also what this service sends to the registry.
    #[command(flatten)]
    pub auth: proto::token::AuthOptions,
    /// Bounds on streaming calls, as every server takes them.
    #[command(flatten)]
    pub streams: proto::streams::StreamArgs,
    /// mTLS, for this service's API and towards an https:// --registry.
    #[command(flatten)]
    pub mtls: proto::mtls::ServiceTlsArgs,
    /// The most packets that may wait at once; a packet beyond it is forwarded without
    /// holding, and counted.
    #[arg(long, default_value_t = DEFAULT_MAX_HELD)]
    pub max_held: usize,
}

/// Runs the standalone service until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let auth = args
        .auth
        .settle("intercept-svc", args.listen, args.mtls.data_dir.as_deref())?;
    proto::serve::check_exposure(args.listen, auth.token.as_deref())?;
    args.mtls.install_client()?;
    let intercept = Intercept::start(&args.registry, auth.token.as_deref(), args.max_held)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding gRPC on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut server = GrpcServer::with_auth(&auth, &args.streams);
    let tls = args.mtls.serve(&mut server, addr)?;
    server.add_service(intercept.grpc_service(server.drain()));
    // Registered before the ready line: a SIGTERM sent as soon as it is read is handled.
    let stop = proto::serve::shutdown_signal();
    println!(
        "ready intercept-svc listen={addr}{}{tls}",
        auth.ready_field()
    );
    server.serve(listener, stop).await?;
    Ok(())
}
