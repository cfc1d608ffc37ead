//! `interpose up`: every service in one process with a default data directory, the embedded
//! default. Every service serves on one loopback gRPC port, for callers outside the
//! process. Inside it, no service calls another over that port: each calls the other's
//! service object directly, behind a small trait whose other implementation is the gRPC
//! client a standalone binary uses:
//! - the proxy's records and history, ID leases and replays' reads go to the registry
//!   (`platform::ingest::IngestSink`, `proxy_core::ids::Leases`,
//!   `proxy_core::replay::source::Originals`, all in [`proxy_core::LocalRegistry`]);
//! - the proxy's holds go to the intercept queue (`platform::hold::HoldSink`);
//! - the intercept queue follows the registry's connection records
//!   (`intercept_svc::registry_watch::ConnectionEvents`);
//! - the exporter reads records and history from the registry
//!   (`export_svc::registry::RegistryReads`).
//!
//! So a call crosses no socket, no HTTP/2 connection and no encoding. The web view
//! (`--web`) forwards the page's gRPC-web calls to the port like any other client: it
//! serves a browser, which is outside.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Args;
use platform::serve::Bound;
use proxy_core::{
    Proxy,
    cli::{ProxyArgs, data_dir},
    tls,
};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory (registry store, CA, and the server URL and token clients given the
    /// same --data-dir use). Default: the user's data home, e.g. ~/.local/share/interpose.
    #[arg(long, env = "INTERPOSE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the registry keeps records and history (the same as the `registry-svc`
    /// binary's): the data directory, or a PostgreSQL database shared with registry-svc
    /// replicas.
    #[command(flatten)]
    pub store: registry_svc::StoreArgs,
    /// gRPC listen address for every service; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051", value_parser = platform::serve::listen_addr)]
    pub grpc: SocketAddr,
    /// Who may call the gRPC API: the token (or `--no-auth`), as every server takes it.
    #[command(flatten)]
    pub auth: platform::token::AuthOptions,
    /// Bounds on streaming calls, as every server takes them.
    #[command(flatten)]
    pub streams: platform::streams::StreamArgs,
    /// Caught and refused by [`crate::parse`]: `up` serves (on --grpc), and without its own
    /// `--server` clap would list the clients' global one in `up --help`.
    #[arg(long, hide = true)]
    pub server: Option<String>,
    /// Caught and refused as `server` is: a client option.
    #[arg(long, hide = true)]
    pub client_key: Option<PathBuf>,
    /// Caught and refused as `server` is: a client option.
    #[arg(long, hide = true)]
    pub ca_cert: Option<PathBuf>,
    /// mTLS for the gRPC API (the same as the `registry-svc` binary's).
    #[command(flatten)]
    pub tls: platform::mtls::ServerTlsArgs,
    /// The history's disk budget (the same as the `registry-svc` binary's).
    #[command(flatten)]
    pub history: registry_svc::history_args::HistoryArgs,
    /// The proxy's options (the same as the `proxy-core` binary's).
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// The held queue's bounds (the same as the `intercept-svc` binary's).
    #[command(flatten)]
    pub intercept: intercept_svc::Limits,
    /// The web view (the page, in any browser, over the same API).
    #[command(flatten)]
    pub web: web::WebArgs,
}

/// Runs every service until SIGINT or SIGTERM, then shuts down in order: the proxy first
/// (so open connections are recorded as ended), then the API, then the store's last flush.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    platform::serve::init_tracing();
    platform::limits::raise_open_files();
    platform::limits::survive_file_size_limit();
    let dir = data_dir(args.data_dir)?;
    let auth = args.auth.settle("interpose up", args.grpc, Some(&dir))?;
    platform::serve::check_exposure(args.grpc, auth.token.as_deref())?;
    let splicer = args.proxy.tls_splice(&dir)?;
    let ca_path = splicer.ca().cert_path();

    let registry = registry_svc::open(&dir, &args.store, &args.history.options())?;
    let mut bound = Bound::bind(args.grpc, &auth, &args.streams).await?;
    let grpc = bound.addr;
    let server = &mut bound.server;
    let tls = platform::mtls::serve_tls(server, &args.tls, Some(&dir), grpc)?;
    // Where clients outside the process (and the web view) find the API.
    let url = if args.tls.grpc_tls {
        platform::mtls::ClientTlsArgs::default().install(Some(&dir))?;
        format!("https://{grpc}")
    } else {
        format!("http://{grpc}")
    };
    let registry_service = registry_svc::service(
        registry.clone(),
        registry_svc::liveness::DEFAULT_GRACE,
        server,
    )?;
    let registry_service = Arc::new(registry_service);
    server.add_service(registry_svc::grpc_server((*registry_service).clone()));
    server.add_service(tls::service::CaService::server(splicer.clone()));
    // Replays are made by the proxy in this process, which starts after the API.
    let (replay_service, replay_handle) = proxy_core::replay::service::ReplayService::late();
    server.add_service(replay_service);
    // The exporter and the intercept queue read the registry in this process, not over gRPC.
    server.add_service(export_svc::in_process_service(registry_service.clone()));
    let intercept =
        intercept_svc::Intercept::start_in_process(registry_service.clone(), args.intercept);
    server.add_service(intercept.grpc_service(server.drain()));
    // The proxy holds through the queue itself: a hold crosses no socket (see platform::hold).
    let hold_sink = intercept.hold_sink(server.drain());
    // The web view forwards the page's calls to this same port, as any other client would.
    let web = match args.web.web {
        _ if args.web.no_web => None,
        given => {
            let addr = given.unwrap_or(web::DEFAULT_ADDR);
            platform::serve::check_exposure(addr, auth.token.as_deref())?;
            Some(web::WebServer::bind(addr, given.is_none()).await?)
        }
    };
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut serving = tokio::spawn(bound.serve(async {
        let _ = grpc_stopped.await;
    }));

    let mut config = args.proxy.config(
        vec![url.clone()],
        auth.token.clone(),
        // No CONNECT reaches the gRPC port, the web view or what --deny names.
        std::iter::once(grpc)
            .chain(web.as_ref().map(|w| w.local_addr()))
            .chain(args.proxy.denied().await?)
            .collect(),
        splicer.clone(),
        Some(url.clone()),
    )?;
    // Records, history, leases and replays' reads go straight to the registry in this
    // process, not through gRPC.
    config.local_registry = Some(proxy_core::LocalRegistry::new(registry_service));
    config.local_intercept = Some(proxy_core::LocalIntercept(hold_sink));
    let proxy = Proxy::start(config).await?;
    replay_handle.set(proxy.replayer());
    platform::token::record_server(&dir, &url)
        .with_context(|| format!("recording the server URL in {}", dir.display()))?;
    let web_field = web
        .as_ref()
        .map(|w| format!(" web={}", w.url(auth.token.as_deref())))
        .unwrap_or_default();
    let (stop_web, web_stopped) = tokio::sync::oneshot::channel::<()>();
    let web_task = web.map(|w| {
        let backends = web::Backends::all_at(&url);
        let hosts = args.web.web_allow_host.clone();
        tokio::spawn(async move {
            w.serve(&backends, &hosts, async {
                let _ = web_stopped.await;
            })
            .await
        })
    });
    // Registered before the ready line: a SIGTERM sent as soon as it is read is handled.
    let stop = platform::serve::shutdown_signal();
    let http_field = proxy
        .http_addr()
        .map(|a| format!(" http={a}"))
        .unwrap_or_default();
    crate::say!(
        "ready socks={}{http_field} grpc={url} ca={}{}{tls}{web_field}",
        proxy.socks_addr(),
        ca_path.display(),
        auth.ready_field()
    );

    let served = tokio::select! {
        () = stop => None,
        r = &mut serving => Some(r),
    };
    proxy.shutdown().await;
    // The API's streams end as it drains, and with them the web view's.
    let _ = stop_grpc.send(());
    let _ = stop_web.send(());
    let served = match served {
        Some(r) => r,
        None => serving.await,
    };
    served.context("gRPC server task")??;
    if let Some(t) = web_task {
        t.await.context("web view task")??;
    }
    registry
        .flush()
        .await
        .context("flushing the registry store")?;
    Ok(())
}
