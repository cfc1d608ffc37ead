//! `interpose up`: every service in one process with a default data directory, the embedded
//! default. The registry serves on one loopback gRPC port; the proxy reports to it over that
//! same port, exactly as a remote proxy-core would.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::serve::GrpcServer;
use proxy_core::{Config, DEFAULT_QUEUE_BOUND, Proxy, cli::OnOff, tls};

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
    /// This proxy's node name in every record (default: the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// Record packet payloads in the history (records are kept either way).
    #[arg(long, value_enum, default_value = "on")]
    pub history: OnOff,
    /// Bearer token the gRPC API requires. Default: the one in DATA_DIR/token, generated on
    /// first start (the ready line names the file).
    #[arg(long, env = "INTERPOSE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file instead.
    #[arg(long, env = "INTERPOSE_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Serve the gRPC API without a token (loopback only; every local user can then call it).
    #[arg(long, conflicts_with_all = ["token", "token_file"])]
    pub no_auth: bool,
    #[command(flatten)]
    pub tls: tls::args::TlsArgs,
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

/// Runs every service until SIGINT or SIGTERM, then shuts down in order: the proxy first
/// (so open connections are recorded as ended), then the API, then the store's last flush.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    proto::serve::init_tracing();
    proto::limits::raise_open_files();
    tls::install_provider();
    let dir = data_dir(args.data_dir)?;
    proto::private::prepare_data_dir(&dir)
        .with_context(|| format!("preparing data directory {}", dir.display()))?;
    let auth = proto::token::AuthOptions {
        token: args.token,
        token_file: args.token_file,
        no_auth: args.no_auth,
    }
    .resolve(args.grpc, &dir)?;
    proto::serve::check_exposure(args.grpc, auth.token.as_deref())?;
    let ca = std::sync::Arc::new(tls::ca::Ca::load_or_create(&dir.join("ca"))?);
    let ca_path = ca.cert_path();
    // Checks the TLS options now (an unreadable --upstream-ca fails here, not later).
    let interceptor = std::sync::Arc::new(tls::Interceptor::new(ca, args.tls.to_options())?);

    let registry = registry_svc::open(&dir)?;
    let listener = tokio::net::TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("binding gRPC on {}", args.grpc))?;
    let grpc = listener.local_addr()?;
    let mut server = GrpcServer::new(auth.token.clone());
    server.add_service(registry_svc::grpc_service(
        registry.clone(),
        registry_svc::liveness::DEFAULT_GRACE,
    )?);
    server.add_service(tls::service::CaService::server(interceptor.clone()));
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut serving = tokio::spawn(server.serve(listener, async {
        let _ = grpc_stopped.await;
    }));

    let proxy = Proxy::start(Config {
        socks: args.socks,
        registry_url: format!("http://{grpc}"),
        token: auth.token.clone(),
        node: args.node.unwrap_or_else(proxy_core::cli::hostname),
        history: args.history == OnOff::On,
        auth: None,
        open_proxy: false,
        queue_bound: DEFAULT_QUEUE_BOUND,
        refuse: vec![grpc],
        interceptor: Some(interceptor.clone()),
    })
    .await?;
    proto::token::record_server(&dir, &format!("http://{grpc}"))
        .with_context(|| format!("recording the server URL in {}", dir.display()))?;
    println!(
        "ready socks={} grpc=http://{grpc} ca={}{}",
        proxy.socks_addr(),
        ca_path.display(),
        auth.ready_field()
    );

    let served = tokio::select! {
        () = proto::serve::shutdown_signal() => None,
        r = &mut serving => Some(r),
    };
    proxy.shutdown().await;
    let _ = stop_grpc.send(());
    let served = match served {
        Some(r) => r,
        None => serving.await,
    };
    served.context("gRPC server task")??;
    registry
        .flush()
        .await
        .context("flushing the registry store")?;
    Ok(())
}
