//! proxy-core: the Interpose SOCKS5 proxy. It relays CONNECT streams and UDP associations
//! and reports every connection's whole life (and, with history on, every packet) to the
//! registry without ever making a connection wait for it.
//!
//! Modules, from the wire up:
//! - [`socks5`]: the SOCKS5 wire format, sans I/O; [`handshake`]: its async shell.
//! - [`server`]: listener and per-connection handler; [`shared`]: what handlers share;
//!   [`shutdown`]: graceful shutdown.
//! - [`dns`]: name resolution for CONNECT and UDP targets, bounded per lookup and client.
//! - [`relay`]: the one relay (a pump per direction with half-close, resets, and the hold
//!   point, for plain and TLS legs alike); [`udp`]: UDP ASSOCIATE.
//! - [`tls`]: TLS detection, the CA, leaves, the upstream client and the TLS splice
//!   ([`tls::splice`]) that terminates TLS found on a stream.
//! - [`report`]: the bounded, replaying event stream to the registry; [`ids`]: leased
//!   connection IDs; [`process`]: which local process a client is; [`conn`]: per-connection
//!   counters.
//! - [`replay`]: recorded connections sent again through this proxy, and the Replay service.
//! - [`cli`]: the `proxy-core` binary's options.
//! - `fuzzing` (tests and the `fuzzing` feature): the properties the fuzz targets check.

pub mod cli;
pub mod conn;
pub mod dns;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod handshake;
pub mod hold;
pub mod ids;
pub mod process;
pub mod relay;
pub mod replay;
pub mod report;
pub mod server;
pub mod shared;
pub mod shutdown;
pub mod sock_diag;
pub mod socks5;
pub mod tls;
pub mod udp;

use proto::ingest::IngestSink;
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, broadcast, mpsc, oneshot},
    task::JoinHandle,
};

/// Default number of events buffered while the registry is slow or unreachable.
pub const DEFAULT_QUEUE_BOUND: usize = 200_000;
/// How long [`Proxy::shutdown`] waits for connections to record their end.
pub const SHUTDOWN_CONNECTIONS_WAIT: Duration = Duration::from_secs(3);
/// How long [`Proxy::shutdown`] waits for the registry to acknowledge what is queued.
pub const SHUTDOWN_FLUSH_WAIT: Duration = Duration::from_secs(3);

/// How to run a proxy.
#[derive(Debug, Clone)]
pub struct Config {
    /// SOCKS listen address (port 0 picks a free port).
    pub socks: SocketAddr,
    /// The registry's gRPC URL, e.g. `http://127.0.0.1:50051`; several for replicas of one
    /// registry, which the proxy fails over between (see [`proto::failover`]).
    pub registry_urls: Vec<String>,
    /// Bearer token for the registry, if it requires one.
    pub token: Option<String>,
    /// This proxy's node name in every record.
    pub node: String,
    /// Record packet payloads (`--history on`); records and counters are kept either way.
    pub history: bool,
    /// Required SOCKS username and password (RFC 1929); `None` for no authentication.
    pub auth: Option<(String, String)>,
    /// Allow a SOCKS listener beyond loopback without authentication.
    pub open_proxy: bool,
    /// Events buffered while the registry is down (see [`report`] for what is shed first).
    pub queue_bound: usize,
    /// Addresses CONNECT must refuse besides the SOCKS port itself (the management gRPC
    /// port, ...): reply 0x02 and a record closed by the proxy.
    pub refuse: Vec<SocketAddr>,
    /// The TLS splice ([`tls::Splicer`]); `None` relays every stream as plain TCP.
    pub splicer: Option<Arc<tls::Splicer>>,
    /// The intercept service whose configuration the proxy follows to hold and rewrite
    /// packets; `None` holds nothing.
    pub intercept: Option<InterceptLink>,
    /// How CONNECT and UDP targets given as names are resolved.
    pub dns: dns::DnsConfig,
    /// Most SOCKS connections served at once; a client beyond it gets reply 0x01 and a
    /// record closed by the proxy naming the limit (see [`server::Listener`]).
    pub max_connections: usize,
    /// The registry in this same process (`interpose up`), which takes the ingest stream
    /// without gRPC; `None` streams to `registry_urls`.
    pub local_registry: Option<LocalRegistry>,
    /// The intercept queue in this same process (`interpose up`), which takes holds without
    /// gRPC; `None` holds through `intercept`'s URL.
    pub local_intercept: Option<LocalIntercept>,
}

/// An intercept queue in the proxy's own process, as the sink of its holds.
#[derive(Clone)]
pub struct LocalIntercept(pub Arc<dyn proto::hold::HoldSink>);

impl std::fmt::Debug for LocalIntercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalIntercept")
    }
}

/// A registry in the proxy's own process, as the sink of its ingest stream.
#[derive(Clone)]
pub struct LocalRegistry(pub Arc<dyn IngestSink>);

impl std::fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalRegistry")
    }
}

/// Where a proxy finds its intercept service, and what it does with a packet that service
/// cannot hold.
#[derive(Debug, Clone)]
pub struct InterceptLink {
    /// intercept-svc's gRPC URL (the proxy's own token is sent).
    pub url: String,
    /// What happens to a packet whose hold fails.
    pub fault: hold::FaultPolicy,
}

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// SOCKS would be open to the network without authentication.
    #[error(
        "refusing to serve SOCKS on {0} without authentication: it would be an open proxy \
         (set --socks-user/--socks-pass, pass --open-proxy, or listen on 127.0.0.1 / [::1])"
    )]
    OpenProxy(SocketAddr),
    /// The node name is empty.
    #[error("the node name must not be empty")]
    EmptyNode,
    /// The DNS resolver cannot be built.
    #[error(transparent)]
    Dns(#[from] dns::DnsConfigError),
    /// The registry URL or token is unusable.
    #[error("registry client: {0}")]
    Registry(#[from] proto::client::ClientError),
    /// The SOCKS address cannot be bound.
    #[error("binding SOCKS on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// A running proxy.
pub struct Proxy {
    socks_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    listener_task: JoinHandle<()>,
    shutdown_complete_rx: mpsc::Receiver<()>,
    reporter: report::Reporter,
    reporter_task: report::ReporterTask,
    replayer: Arc<replay::Replayer>,
}

impl Proxy {
    /// Binds the SOCKS listener and starts serving. The registry need not be up: events are
    /// buffered and IDs leased as soon as it answers.
    pub async fn start(cfg: Config) -> Result<Proxy, StartError> {
        if !cfg.socks.ip().is_loopback() && cfg.auth.is_none() && !cfg.open_proxy {
            return Err(StartError::OpenProxy(cfg.socks));
        }
        if cfg.node.is_empty() {
            return Err(StartError::EmptyNode);
        }
        let dns = dns::Dns::new(&cfg.dns)?;
        // The registry's replicas (often one), for ID leases and the ingest stream alike.
        let registry = Arc::new(proto::failover::Replicas::new(
            &cfg.registry_urls,
            cfg.token.as_deref(),
        )?);
        let listener = TcpListener::bind(cfg.socks)
            .await
            .map_err(|source| StartError::Bind {
                addr: cfg.socks,
                source,
            })?;
        let socks_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: cfg.socks,
            source,
        })?;
        let sink = match &cfg.local_registry {
            Some(local) => local.0.clone(),
            None => registry.clone() as Arc<dyn IngestSink>,
        };
        let (reporter, reporter_task) =
            report::Reporter::start(sink, cfg.node.clone(), cfg.history, cfg.queue_bound);
        let ids = ids::IdPool::new(registry.clone(), cfg.node.clone());
        let resolver = process::Resolver::start(reporter.clone());
        if cfg.splicer.is_some() {
            tls::install_provider();
        }
        let holder = match (&cfg.intercept, &cfg.local_intercept) {
            (Some(link), Some(local)) => Some(Arc::new(hold::Holder::start_local(
                local.0.clone(),
                &cfg.node,
                link.fault,
            ))),
            (Some(link), None) => Some(Arc::new(hold::Holder::start(
                &link.url,
                cfg.token.as_deref(),
                &cfg.node,
                link.fault,
            )?)),
            (None, _) => None,
        };
        if let Some(h) = &holder {
            reporter.count_intercept(h.counts());
        }
        let replays = replay::Pending::default();
        let replayer = Arc::new(replay::Replayer {
            node: cfg.node.clone(),
            socks: socks_addr,
            auth: cfg.auth.clone(),
            registry,
            splicer: cfg.splicer.clone(),
            pending: replays.clone(),
        });
        let mut refuse = vec![socks_addr];
        refuse.extend(cfg.refuse.iter().copied());
        let shared = Arc::new(shared::Shared {
            node: cfg.node.clone(),
            auth: cfg.auth.clone(),
            reporter: reporter.clone(),
            ids,
            resolver,
            dns,
            refuse,
            splicer: cfg.splicer.clone(),
            holder,
            replays,
        });
        let (notify_shutdown, _) = broadcast::channel(1);
        let (shutdown_complete_tx, shutdown_complete_rx) = mpsc::channel(1);
        let mut l = server::Listener {
            listener,
            shared,
            max_connections: cfg.max_connections,
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            refusing: Arc::new(Semaphore::new(server::MAX_REFUSING)),
            notify_shutdown,
            shutdown_complete_tx,
        };
        let (stop, stop_rx) = oneshot::channel();
        let listener_task = tokio::spawn(async move {
            tokio::select! {
                () = l.run() => {}
                _ = stop_rx => {}
            }
            // Dropping `l` drops the broadcast sender: every handler shuts down.
        });
        tracing::info!(%socks_addr, node = %cfg.node, history = cfg.history, max_connections = cfg.max_connections, "proxy-core serving SOCKS5");
        Ok(Proxy {
            socks_addr,
            stop,
            listener_task,
            shutdown_complete_rx,
            reporter,
            reporter_task,
            replayer,
        })
    }

    /// What makes this proxy's replays (for [`replay::service::ReplayService`]).
    pub fn replayer(&self) -> Arc<replay::Replayer> {
        self.replayer.clone()
    }

    /// The bound SOCKS address.
    pub fn socks_addr(&self) -> SocketAddr {
        self.socks_addr
    }

    /// The reporter, e.g. to read [`report::Reporter::losses`].
    pub fn reporter(&self) -> &report::Reporter {
        &self.reporter
    }

    /// Stops accepting, ends open connections (recorded as closed by the proxy), then
    /// sends what is queued to the registry, waiting a bounded time for each step.
    pub async fn shutdown(self) {
        let Proxy {
            stop,
            listener_task,
            mut shutdown_complete_rx,
            reporter,
            reporter_task,
            ..
        } = self;
        let _ = stop.send(());
        let _ = listener_task.await;
        if tokio::time::timeout(SHUTDOWN_CONNECTIONS_WAIT, shutdown_complete_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!("connections still closing after {SHUTDOWN_CONNECTIONS_WAIT:?}");
        }
        let left = reporter_task.flush(&reporter, SHUTDOWN_FLUSH_WAIT).await;
        let losses = reporter.losses();
        tracing::info!(
            unacknowledged = left,
            events_dropped = losses.events_dropped,
            packets_dropped = losses.packets_dropped,
            "proxy-core stopped"
        );
    }
}
