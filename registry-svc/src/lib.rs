//! registry-svc: the durable home of Interpose's connection records and proxy history.
//!
//! [`backend`] holds the storage contract and both stores: [`backend::sled_store`] keeps the
//! records in sled and the history in a log of segment files, [`backend::pg`] keeps both in
//! PostgreSQL; [`ingest`] writes and
//! commits them, [`hub`] orders changes for live watchers ([`watcher`] serves one),
//! [`state`] holds the operations and [`service`](mod@service) serves them as
//! `interpose.registry.v1.Registry`.

pub mod backend;
pub mod filter;
pub mod follow;
pub mod history_args;
pub mod hub;
pub mod ingest;
pub mod liveness;
pub mod service;
pub mod state;
pub mod watcher;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use platform::serve::{Bound, GrpcServer};
use proto::registry::registry_server::RegistryServer;

pub use service::RegistryService;
pub use state::State;

/// Largest gRPC message the registry accepts (an ingest batch of large packets).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Runs `f` on a thread of its own and waits for it: for store work at start, which may
/// block on the network where blocking an async thread is not allowed.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The registry's folder inside a data directory.
pub fn store_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("registry")
}

/// Opens the registry state kept in `data_dir`, with an error that names the path. The data
/// directory is made private first (umask 077, modes 0700/0600 fixed where looser).
/// `history` is its budget (see [`backend::sled_store::budget`]).
/// With `store.store` (a `postgres://` URL) the records and history live in that database
/// instead, shared with any other registry process on it.
pub fn open(
    data_dir: &std::path::Path,
    store: &StoreArgs,
    history: &backend::sled_store::HistoryOptions,
) -> anyhow::Result<Arc<State>> {
    platform::private::prepare_data_dir(data_dir)?;
    if let Some(url) = &store.store {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            anyhow::bail!(
                "--store takes a postgres:// URL (without it the registry keeps its store \
                 in the data directory)"
            );
        }
        return off_runtime(|| {
            let pg = backend::pg::PgStore::open(url, store.store_ca.as_deref(), history)?;
            Ok::<_, backend::StoreError>(State::with_backend(Box::new(pg)))
        })
        .context("opening the PostgreSQL store");
    }
    let path = store_path(data_dir);
    platform::private::create_dir(&path)
        .with_context(|| format!("creating registry store {}", path.display()))?;
    State::open_with(&path, history)
        .with_context(|| format!("opening registry store {}", path.display()))
}

/// The health service name that reports whether history can be written: NOT_SERVING while
/// the disk is full or failing (see `history_failing` in `ConnectionStatsResponse`).
pub const HISTORY_HEALTH: &str = "interpose.registry.v1.History";

/// The gRPC service over `state`, ready to add to `server`; its watch and ingest streams end
/// when the server drains, the records of a proxy node that restarts or stays away past
/// `node_grace` are closed (see [`liveness`]), and health reports [`HISTORY_HEALTH`].
pub fn grpc_service(
    state: Arc<State>,
    node_grace: std::time::Duration,
    server: &GrpcServer,
) -> anyhow::Result<RegistryServer<RegistryService>> {
    Ok(grpc_server(service(state, node_grace, server)?))
}

/// The registry service as [`grpc_service`] starts it, before it is wrapped for gRPC: a
/// proxy in the same process can take it as its ingest sink (`platform::ingest::IngestSink`).
pub fn service(
    state: Arc<State>,
    node_grace: std::time::Duration,
    server: &GrpcServer,
) -> anyhow::Result<RegistryService> {
    report_history_health(&state, server.health());
    let drain = server.drain();
    let liveness = liveness::Liveness::start(state.clone(), node_grace)
        .context("scanning the records of the reporting nodes")?;
    let ingest = ingest::Pipeline::start(state.clone()).context("starting the ingest threads")?;
    Ok(RegistryService::new(
        state,
        Arc::new(ingest),
        liveness,
        drain,
    ))
}

/// `service` served over gRPC, with the registry's message size limits.
pub fn grpc_server(service: RegistryService) -> RegistryServer<RegistryService> {
    RegistryServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Where the registry keeps its records and history: the data directory (sled), or a
/// PostgreSQL database shared with other registry processes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Keep records and history in this PostgreSQL database instead
    /// (`postgres://user:password@host:port/db`; pass it in INTERPOSE_STORE to keep the
    /// password out of the process list). Several registry-svc processes may share it and
    /// serve the same API. TLS as its `sslmode` says (default `prefer`: when the server
    /// offers it; `require` to insist), the server's certificate checked.
    #[arg(long, env = "INTERPOSE_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Trust the database server's certificate when this CA (a PEM file) signed it, besides
    /// the system's roots.
    #[arg(long, env = "INTERPOSE_STORE_CA", requires = "store")]
    pub store_ca: Option<PathBuf>,
}

/// Command-line options of the standalone `registry-svc` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "registry-svc",
    version,
    about = "Interpose registry: connection records and proxy history"
)]
pub struct Args {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50051", value_parser = platform::serve::listen_addr)]
    pub listen: SocketAddr,
    /// Directory for the registry's sled store (and its token and certificates).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Where records and history are kept, if not in the data directory.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Who may call: the token (or `--no-auth`), as every server takes it.
    #[command(flatten)]
    pub auth: platform::token::AuthOptions,
    /// How long a proxy node may have no ingest stream before its records still active are
    /// closed (closed by proxy, reason naming the node). A node that comes back as a new
    /// session (a restarted proxy) has them closed at once.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub node_grace: std::time::Duration,
    /// Age at which a gRPC connection is sent GOAWAY: idle connections (and ones that never
    /// sent a request) close then, busy ones when their calls in progress end.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub grpc_max_age: std::time::Duration,
    /// How long a gRPC connection may stay open with no call in progress after its first
    /// (one that never starts a call is closed 10 s after it connects).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub grpc_idle_timeout: std::time::Duration,
    /// Bounds on streaming calls, as every server takes them.
    #[command(flatten)]
    pub streams: platform::streams::StreamArgs,
    /// The history's disk budget.
    #[command(flatten)]
    pub history: history_args::HistoryArgs,
    /// mTLS for the gRPC API.
    #[command(flatten)]
    pub tls: platform::mtls::ServerTlsArgs,
}

/// Keeps [`HISTORY_HEALTH`] in step with whether history can be written.
fn report_history_health(state: &State, health: tonic_health::server::HealthReporter) {
    let mut failing = state.history_failing();
    tokio::spawn(async move {
        loop {
            let status = match &*failing.borrow_and_update() {
                Some(_) => tonic_health::ServingStatus::NotServing,
                None => tonic_health::ServingStatus::Serving,
            };
            health.set_service_status(HISTORY_HEALTH, status).await;
            if failing.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Runs the standalone registry until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    platform::limits::raise_open_files();
    platform::limits::survive_file_size_limit();
    // Settled first: `--no-auth` beyond loopback is refused before the data directory is
    // touched, and a token file others could read is replaced before it is made private.
    let auth = args
        .auth
        .settle("registry-svc", args.listen, Some(&args.data_dir))?;
    platform::serve::check_exposure(args.listen, auth.token.as_deref())?;
    let state = open(&args.data_dir, &args.store, &args.history.options())?;
    let mut bound = Bound::bind(args.listen, &auth, &args.streams).await?;
    let server = &mut bound.server;
    server
        .max_connection_age(args.grpc_max_age)
        .idle_timeout(args.grpc_idle_timeout);
    server.add_service(grpc_service(state.clone(), args.node_grace, server)?);
    let tls = platform::mtls::serve_tls(server, &args.tls, Some(&args.data_dir), bound.addr)?;
    bound
        .serve_until_signal("registry-svc", &format!("{}{tls}", auth.ready_field()))
        .await?;
    state.flush().await.context("flushing the registry store")?;
    Ok(())
}
