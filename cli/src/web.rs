//! `interpose web`: the web view for services that run apart (a lab's registry replicas,
//! intercept-svc, export-svc, a proxy's CA), so the lab has one address for the browser.
//! It serves the same page as `interpose up` and forwards its gRPC-web calls to them.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;

use crate::ServerArgs;

#[derive(Debug, Args)]
pub struct WebCmdArgs {
    /// Where the web view listens (HTTP); port 0 picks a free port. Beyond loopback it needs
    /// a token (--token / --token-file: the one the services take).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:50080",
        value_parser = platform::serve::listen_addr
    )]
    pub listen: SocketAddr,
    /// gRPC URL of the registry; for registry-svc replicas serving one database, several
    /// (comma-separated or repeated), tried in turn. Default: --server.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        value_parser = platform::failover::list_entry
    )]
    pub registry: Vec<String>,
    /// gRPC URL of the intercept service. Default: the first registry URL (`interpose up`
    /// serves every service on one port).
    #[arg(long, value_name = "URL", value_parser = platform::failover::list_entry)]
    pub intercept: Option<String>,
    /// gRPC URL of the export service. Default: the first registry URL.
    #[arg(long, value_name = "URL", value_parser = platform::failover::list_entry)]
    pub export: Option<String>,
    /// gRPC URL of the CA service (a proxy-core's --listen). Default: the first registry URL.
    #[arg(long, value_name = "URL", value_parser = platform::failover::list_entry)]
    pub ca: Option<String>,
    /// Another host name the web view answers to (it refuses every other Host header, a
    /// guard against DNS rebinding): NAME on the listen port, or NAME:PORT. Repeatable.
    #[arg(long, value_name = "NAME[:PORT]")]
    pub allow_host: Vec<String>,
}

/// Serves until SIGINT or SIGTERM; prints `ready web listen=ADDR url=URL` once serving (the
/// URL carries the token, when one is known, in its fragment).
pub async fn run(server: &ServerArgs, args: WebCmdArgs) -> anyhow::Result<()> {
    platform::serve::init_tracing();
    let registry = if args.registry.is_empty() {
        let dir = crate::client::data_dir(server);
        let given = crate::client::server_to_use(server, dir.as_deref())?;
        vec![platform::client::server_url(&given)?.url]
    } else {
        args.registry
    };
    let first = registry.first().cloned().context("no registry URL")?;
    let backends = web::Backends {
        intercept: args.intercept.unwrap_or_else(|| first.clone()),
        export: args.export.unwrap_or_else(|| first.clone()),
        ca: args.ca.unwrap_or_else(|| first.clone()),
        registry,
    };
    // The page sends its own token with each call; this one only goes into the ready URL
    // (and decides whether listening beyond loopback is allowed).
    let token = crate::client::token(server, &first, crate::client::data_dir(server).as_deref())?;
    platform::serve::check_exposure(args.listen, token.as_deref())?;
    for url in backends
        .registry
        .iter()
        .chain([&backends.intercept, &backends.export, &backends.ca])
    {
        crate::client::install_tls_for(server, url)?;
    }
    let web = web::WebServer::bind(args.listen, false).await?;
    let stop = platform::serve::shutdown_signal();
    crate::say!(
        "ready web listen={} url={}",
        web.local_addr(),
        web.url(token.as_deref())
    );
    web.serve(&backends, &args.allow_host, stop).await?;
    Ok(())
}
