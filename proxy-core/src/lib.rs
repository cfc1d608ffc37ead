//! proxy-core: the Interpose SOCKS5 proxy. It relays CONNECT streams and UDP associations
//! and reports every connection's whole life (and, with history on, every packet) to the
//! registry without ever making a connection wait for it.
//!
//! The wire formats are sans-I/O, in the `protocols` crate (pure functions over byte
//! buffers, which `fuzz/` fuzzes); the modules here are the async shells around them.
//!
//! Modules, from the wire up:
//! - [`socks5`] (re-exported from `protocols`): the SOCKS5 wire format; [`handshake`]: its
//!   async shell.
//! - [`http_connect`] (re-exported from `protocols`): the HTTP CONNECT wire format;
//!   [`http_ingress`]: its async shell on the `--http` listener.
//! - [`chain`]: upstream proxies (`--upstream`, `--upstream-rule`), sans I/O;
//!   [`chain::dial`]: the exchange with one.
//! - [`server`]: listener and per-connection handler; [`state`]: the process state handlers share;
//!   [`shutdown`]: graceful shutdown.
//! - [`dns`]: name resolution for CONNECT and UDP targets, bounded per lookup and client.
//! - [`relay`]: the one relay (a pump per direction with half-close, resets, and the hold
//!   point, for plain and TLS legs alike); [`udp`]: UDP ASSOCIATE.
//! - [`tls`]: the CA, leaves, the upstream client and the TLS splice ([`tls::splice`]) that
//!   terminates TLS found on a stream (ClientHello detection is `protocols::client_hello`).
//! - [`report`]: the bounded, replaying event stream to the registry; [`ids`]: leased
//!   connection IDs; [`process`]: which local process a client is (through the netlink
//!   socket of [`sock_diag`]); [`conn`]: per-connection counters; [`local`]: the registry in
//!   the proxy's own process (`interpose up`).
//! - [`replay`]: recorded connections sent again through this proxy, and the Replay service.
//! - [`cli`]: the `proxy-core` binary's options.

pub mod chain;
pub mod cli;
pub mod conn;
pub mod dns;
pub mod handshake;
pub mod hold;
pub mod http_ingress;
pub mod ids;
pub mod local;
pub mod process;
pub mod relay;
pub mod replay;
pub mod report;
pub mod server;
pub mod shutdown;
pub mod sock_diag;
pub mod state;
pub mod tls;
pub mod udp;

pub use local::LocalRegistry;
use platform::ingest::IngestSink;
/// The wire formats, for the shells' callers (tests, benches) that speak them too.
pub use protocols::{http_connect, socks5};
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
    /// HTTP CONNECT listen address (`--http`); `None` serves none.
    pub http: Option<SocketAddr>,
    /// Which targets go through which upstream proxy (default: all direct).
    pub routes: chain::Routes,
    /// The registry's gRPC URL, e.g. `http://127.0.0.1:50051`; several for replicas of one
    /// registry, which the proxy fails over between (see [`platform::failover`]).
    pub registry_urls: Vec<String>,
    /// Bearer token for the registry, if it requires one.
    pub token: Option<String>,
    /// This proxy's node name in every record.
    pub node: String,
    /// Record packet payloads (`--history on`); records and counters are kept either way.
    pub history: bool,
    /// Required SOCKS username and password (RFC 1929); `None` for no authentication.
    pub auth: Option<(String, String)>,
    /// Allow a SOCKS or HTTP listener beyond loopback without authentication.
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
    /// The registry in this same process (`interpose up`), which takes the ingest stream,
    /// leases IDs and answers replays' reads without gRPC; `None` calls `registry_urls`.
    pub local_registry: Option<LocalRegistry>,
    /// The intercept queue in this same process (`interpose up`), which takes holds without
    /// gRPC; `None` holds through `intercept`'s URL.
    pub local_intercept: Option<LocalIntercept>,
}

/// An intercept queue in the proxy's own process, as the sink of its holds.
#[derive(Clone)]
pub struct LocalIntercept(pub Arc<dyn platform::hold::HoldSink>);

impl std::fmt::Debug for LocalIntercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalIntercept")
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
    /// SOCKS or HTTP CONNECT would be open to the network without authentication.
    #[error(
        "refusing to serve {0} on {1} without authentication: it would be an open proxy \
         (set --socks-user/--socks-pass, pass --open-proxy, or listen on 127.0.0.1 / [::1])"
    )]
    OpenProxy(&'static str, SocketAddr),
    /// The node name is empty.
    #[error("the node name must not be empty")]
    EmptyNode,
    /// The DNS resolver cannot be built.
    #[error(transparent)]
    Dns(#[from] dns::DnsConfigError),
    /// The registry URL or token is unusable.
    #[error("registry client: {0}")]
    Registry(#[from] platform::client::ClientError),
    /// The SOCKS or HTTP address cannot be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// SOCKS or HTTP.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// A running proxy.
pub struct Proxy {
    socks_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
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
        let open = |a: SocketAddr| !a.ip().is_loopback() && cfg.auth.is_none() && !cfg.open_proxy;
        if open(cfg.socks) {
            return Err(StartError::OpenProxy("SOCKS", cfg.socks));
        }
        if let Some(http) = cfg.http.filter(|a| open(*a)) {
            return Err(StartError::OpenProxy("HTTP CONNECT", http));
        }
        if cfg.node.is_empty() {
            return Err(StartError::EmptyNode);
        }
        let dns = dns::Dns::new(&cfg.dns)?;
        // The registry's replicas (often one), for ID leases, the ingest stream and replays
        // alike, unless the registry is in this process.
        let registry = Arc::new(platform::failover::Replicas::new(
            &cfg.registry_urls,
            cfg.token.as_deref(),
        )?);
        let (listener, socks_addr) = bind("SOCKS", cfg.socks).await?;
        let http = match cfg.http {
            Some(a) => Some(bind("HTTP", a).await?),
            None => None,
        };
        let http_addr = http.as_ref().map(|(_, a)| *a);
        let (sink, leases, originals) = match &cfg.local_registry {
            Some(local) => (
                local.ingest.clone(),
                local.leases.clone(),
                local.originals.clone(),
            ),
            None => (
                registry.clone() as Arc<dyn IngestSink>,
                registry.clone() as Arc<dyn ids::Leases>,
                registry as Arc<dyn replay::source::Originals>,
            ),
        };
        let (reporter, reporter_task) =
            report::Reporter::start(sink, cfg.node.clone(), cfg.history, cfg.queue_bound);
        let ids = ids::IdPool::new(leases, cfg.node.clone());
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
            registry: originals,
            splicer: cfg.splicer.clone(),
            pending: replays.clone(),
        });
        let mut refuse = vec![socks_addr];
        refuse.extend(http_addr);
        refuse.extend(cfg.refuse.iter().copied());
        let shared = Arc::new(state::ProxyState {
            node: cfg.node.clone(),
            auth: cfg.auth.clone(),
            reporter: reporter.clone(),
            ids,
            resolver,
            dns,
            refuse,
            splicer: cfg.splicer.clone(),
            holder,
            routes: cfg.routes.clone(),
            http: http_addr,
            http_warned: Default::default(),
            replays,
        });
        let (notify_shutdown, _) = broadcast::channel(1);
        let (shutdown_complete_tx, shutdown_complete_rx) = mpsc::channel(1);
        // Both listeners share the connection limit.
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        let refusing = Arc::new(Semaphore::new(server::MAX_REFUSING));
        let listener_for = |listener, ingress| server::Listener {
            listener,
            ingress,
            shared: shared.clone(),
            max_connections: cfg.max_connections,
            limit: limit.clone(),
            refusing: refusing.clone(),
            notify_shutdown: notify_shutdown.clone(),
            shutdown_complete_tx: shutdown_complete_tx.clone(),
        };
        let mut socks_l = listener_for(listener, server::Ingress::Socks5);
        let mut http_l = http.map(|(l, _)| listener_for(l, server::Ingress::Http));
        drop((notify_shutdown, shutdown_complete_tx));
        let (stop, stop_rx) = oneshot::channel();
        let listener_task = tokio::spawn(async move {
            let http = async {
                match &mut http_l {
                    Some(l) => l.run().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = socks_l.run() => {}
                () = http => {}
                _ = stop_rx => {}
            }
            // Dropping the listeners drops the broadcast senders: every handler shuts down.
        });
        tracing::info!(%socks_addr, http = ?http_addr, node = %cfg.node, history = cfg.history, max_connections = cfg.max_connections, "proxy-core serving SOCKS5");
        if let Some(up) = &cfg.routes.default {
            tracing::info!(upstream = %up, rules = cfg.routes.rules.len(), "relaying TCP through an upstream proxy");
        } else if cfg.routes.any_upstream() {
            tracing::info!(
                rules = cfg.routes.rules.len(),
                "relaying TCP through upstream proxies by rule"
            );
        }
        Ok(Proxy {
            socks_addr,
            http_addr,
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

    /// The bound HTTP CONNECT address, when `--http` was given.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
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

/// Binds the `what` listener (SOCKS or HTTP) on `addr`.
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let bound = l.local_addr().map_err(err)?;
    Ok((l, bound))
}
