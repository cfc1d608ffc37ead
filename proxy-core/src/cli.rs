//! The `proxy-core` binary's command line, and running it until SIGINT or SIGTERM.

use std::{io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context;

use crate::{Config, DEFAULT_QUEUE_BOUND, Proxy};

/// `--history on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Command-line options of the standalone `proxy-core` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "proxy-core",
    version,
    about = "Interpose proxy: SOCKS5 relay that reports every connection to a registry"
)]
pub struct Args {
    /// SOCKS5 listen address (port 0 picks a free port). Beyond loopback it needs
    /// --socks-user/--socks-pass or --open-proxy.
    #[arg(long, default_value = "127.0.0.1:1080")]
    pub socks: SocketAddr,
    /// The registry's gRPC URL.
    #[arg(
        long,
        env = "INTERPOSE_REGISTRY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub registry: String,
    /// This proxy's node name in every record (default: the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// Optional gRPC listen address serving health and reflection (for monitoring); CONNECT
    /// to it is refused like CONNECT to the SOCKS port.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory (reserved for the TLS CA; created when given).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Record packet payloads in the history.
    #[arg(long, value_enum, default_value = "on")]
    pub history: OnOff,
    /// Bearer token for the registry (and for --listen).
    #[arg(long, env = "INTERPOSE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Require this SOCKS username (with --socks-pass).
    #[arg(long, requires = "socks_pass")]
    pub socks_user: Option<String>,
    /// Require this SOCKS password (with --socks-user).
    #[arg(
        long,
        requires = "socks_user",
        env = "INTERPOSE_SOCKS_PASS",
        hide_env_values = true
    )]
    pub socks_pass: Option<String>,
    /// Allow SOCKS beyond loopback without authentication.
    #[arg(long)]
    pub open_proxy: bool,
    /// Events buffered while the registry is unreachable.
    #[arg(long, default_value_t = DEFAULT_QUEUE_BOUND)]
    pub queue_bound: usize,
}

/// The host name, for the default node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "proxy".to_string())
}

/// Runs the proxy until SIGINT or SIGTERM; prints `ready proxy-core listen=ADDR` once
/// serving.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.data_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
    }
    let mut refuse = Vec::new();
    let mut health = None;
    if let Some(addr) = args.listen {
        proto::serve::check_exposure(addr, args.token.as_deref())?;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding gRPC on {addr}"))?;
        refuse.push(l.local_addr()?);
        health = Some(l);
    }
    let cfg = Config {
        socks: args.socks,
        registry_url: args.registry.clone(),
        token: args.token.clone(),
        node: args.node.clone().unwrap_or_else(hostname),
        history: args.history == OnOff::On,
        auth: args.socks_user.clone().zip(args.socks_pass.clone()),
        open_proxy: args.open_proxy,
        queue_bound: args.queue_bound,
        refuse,
    };
    let proxy = Proxy::start(cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let health_task = health.map(|l| {
        let server = proto::serve::GrpcServer::new(args.token.clone());
        tokio::spawn(async move {
            if let Err(e) = server
                .serve(l, async {
                    let _ = stop_rx.await;
                })
                .await
            {
                tracing::error!("gRPC health server: {e}");
            }
        })
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready proxy-core listen={}", proxy.socks_addr())?;
        out.flush()?;
    }
    proto::serve::shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    proxy.shutdown().await;
    if let Some(t) = health_task {
        let _ = t.await;
    }
    Ok(())
}
