//! Serving a set of Interpose gRPC services the way every process of the project does: with
//! gRPC health and server reflection (v1 and v1alpha, since older grpcurl releases speak only
//! v1alpha), a bearer-token check when a token is configured (settled by
//! [`crate::token::AuthOptions::settle`]), bounds on streaming calls ([`crate::streams`]),
//! and a refusal to expose the management API beyond loopback without a token.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::{
    Request, Status,
    body::Body,
    server::NamedService,
    service::{Interceptor, InterceptorLayer, RoutesBuilder},
    transport::Server,
};

/// Why a gRPC server refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address is reachable from other hosts and no token protects it.
    #[error(
        "refusing to serve the management API on {0} without a token: it would be open to \
         the network (set --token or INTERPOSE_TOKEN, or listen on 127.0.0.1 / [::1])"
    )]
    ExposedWithoutToken(SocketAddr),
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("binding gRPC on {addr}")]
    Bind {
        /// The address given.
        addr: SocketAddr,
        /// Why the bind failed.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptor set.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed while serving.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Checks `authorization: Bearer TOKEN` on every call when a token is configured.
#[derive(Clone, Default)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl TokenCheck {
    /// A check for `token`; `None` lets every call through.
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
        }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated(
                "this server requires a token: send metadata `authorization: Bearer TOKEN` \
                 (interpose --token / INTERPOSE_TOKEN)",
            )),
        }
    }
}

/// Compares without an early exit, so the time taken does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// A listen address as the command line takes it: `IP:PORT`, or `HOST:PORT` resolved now
/// (e.g. `localhost:0`; an IPv4 address is preferred when the name has both). Where it may
/// listen is checked afterwards, as for an IP (loopback unless told otherwise).
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not an IP:PORT or HOST:PORT that resolves: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Refuses a listen address beyond loopback unless a token is set.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), ServeError> {
    if addr.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        Ok(())
    } else {
        Err(ServeError::ExposedWithoutToken(addr))
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM: the graceful-shutdown trigger of every binary.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    // Registered now, not at the first poll: a caller that creates this before printing its
    // ready line is never killed by a SIGTERM sent right after it.
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = wait(int) => {}
                () = wait(term) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), so stdout stays for the ready
/// line and command output.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// How long calls still open at shutdown may take to finish before their connections are
/// closed under them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Tells long-lived streams (watches, ingest) that their server is shutting down, so they end
/// with [`Drain::status`] instead of holding the shutdown up until their clients go.
#[derive(Clone, Debug)]
pub struct Drain {
    rx: watch::Receiver<bool>,
}

impl Drain {
    /// Completes once the server has begun shutting down.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The status a stream ends with when the server shuts down.
    pub fn status() -> Status {
        Status::unavailable(SHUTTING_DOWN)
    }
}

/// The message of [`Drain::status`]; clients match on it to say the server shut down.
pub const SHUTTING_DOWN: &str = "the server is shutting down";

/// Default bound on how long a gRPC connection is kept without a call in progress: at this
/// age the server sends GOAWAY, so an idle connection (or one that never sent a request)
/// closes then, and a busy one as soon as its calls in progress end (a long watch or a
/// proxy's ingest stream is never cut). Clients reconnect for their next call.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// HTTP/2 keepalive: a PING after this much silence...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is closed when its acknowledgement takes longer than this (a peer
/// that vanished without a FIN or RST).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The services of one gRPC server, to which health and reflection are added on `serve`.
pub struct GrpcServer {
    routes: RoutesBuilder,
    health: tonic_health::server::HealthReporter,
    names: Vec<&'static str>,
    token: TokenCheck,
    drain: watch::Sender<bool>,
    max_connection_age: Duration,
    preface_timeout: Duration,
    idle_timeout: Duration,
    tls: Option<Arc<rustls::ServerConfig>>,
    streams: crate::streams::StreamLimits,
}

impl GrpcServer {
    /// An empty server that checks `token` when one is given.
    pub fn new(token: Option<String>) -> Self {
        Self {
            routes: RoutesBuilder::default(),
            health: tonic_health::server::HealthReporter::new(),
            names: Vec::new(),
            token: TokenCheck::new(token),
            drain: watch::channel(false).0,
            max_connection_age: MAX_CONNECTION_AGE,
            preface_timeout: crate::preface::PREFACE_TIMEOUT,
            idle_timeout: crate::accept::IDLE_TIMEOUT,
            tls: None,
            streams: crate::streams::StreamLimits::default(),
        }
    }

    /// An empty server checking the token `auth` settled on, with the stream bounds
    /// `streams` (see [`crate::streams`]): how every server of the project starts.
    pub fn with_auth(
        auth: &crate::token::ServerAuth,
        streams: &crate::streams::StreamArgs,
    ) -> Self {
        let mut server = Self::new(auth.token.clone());
        server.stream_limits(streams.limits());
        server
    }

    /// Sets the bounds on streaming calls (see [`crate::streams`]).
    pub fn stream_limits(&mut self, limits: crate::streams::StreamLimits) -> &mut Self {
        self.streams = limits;
        self
    }

    /// Serves over TLS with `config` (see [`crate::mtls::server_config`]).
    pub fn tls(&mut self, config: Arc<rustls::ServerConfig>) -> &mut Self {
        self.tls = Some(config);
        self
    }

    /// Sets how long a connection may stay open with no call in progress after its first
    /// (see [`crate::accept`]).
    pub fn idle_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.idle_timeout = timeout;
        self
    }

    /// The drain signal of this server, for services with long-lived streams.
    pub fn drain(&self) -> Drain {
        Drain {
            rx: self.drain.subscribe(),
        }
    }

    /// The health service's reporter: every added service is reported serving; a service
    /// may report other names (a part of it that can fail on its own) through this.
    pub fn health(&self) -> tonic_health::server::HealthReporter {
        self.health.clone()
    }

    /// Sets the connection age at which the server sends GOAWAY (see [`MAX_CONNECTION_AGE`]).
    pub fn max_connection_age(&mut self, age: Duration) -> &mut Self {
        self.max_connection_age = age;
        self
    }

    /// Sets how long a new connection has to send the HTTP/2 preface before it is closed
    /// (see [`crate::preface`]).
    pub fn preface_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.preface_timeout = timeout;
        self
    }

    /// Adds a service; health reports it as serving.
    pub fn add_service<S>(&mut self, svc: S) -> &mut Self
    where
        S: tower_service::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(svc);
        self
    }

    /// A reflection builder that advertises exactly the services this server serves.
    fn reflection(&self) -> tonic_reflection::server::Builder<'static> {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let always = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        for name in self.names.iter().copied().chain(always) {
            b = b.with_service_name(name);
        }
        b
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight calls finish
    /// (streams see [`Drain`]) for at most [`SHUTDOWN_GRACE`] before closing what is left.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let reporter = self.health.clone();
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        for name in &self.names {
            reporter
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let v1 = self.reflection().build_v1()?;
        let v1alpha = self.reflection().build_v1alpha()?;
        self.routes
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha);
        let bounds = crate::accept::Bounds {
            preface: self.preface_timeout,
            first_call: crate::accept::FIRST_CALL_TIMEOUT.max(self.preface_timeout),
            idle: self.idle_timeout,
        };
        let tls = self.tls.map(tokio_rustls::TlsAcceptor::from);
        let incoming = crate::accept::incoming(listener, tls, bounds);
        let drain = self.drain;
        let draining = drain.subscribe();
        let signal = async move {
            shutdown.await;
            let _ = drain.send(true);
        };
        // No `max_connection_age_grace`: with it, tonic 0.14 skips the graceful GOAWAY and
        // cuts every connection, streams in progress included, at age + grace.
        let serving = Server::builder()
            .max_connection_age(self.max_connection_age)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(crate::accept::CountCallsLayer)
            .layer(InterceptorLayer::new(self.token))
            // Inside the token check: a refused caller takes no stream's place.
            .layer(crate::streams::StreamLimitLayer::new(self.streams))
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming, signal);
        let overdue = async move {
            Drain { rx: draining }.wait().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            served = serving => served?,
            () = overdue => tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "calls still open after the shutdown grace period; closing their connections"
            ),
        }
        Ok(())
    }
}

/// A service process's gRPC server, bound and not serving yet: the start every `*-svc`'s
/// `run` shares (the listener, and the server with its token and stream bounds), to which
/// the caller adds its services and TLS before [`Bound::serve_until_signal`].
pub struct Bound {
    /// The server the caller adds its services (and TLS) to.
    pub server: GrpcServer,
    /// The address bound, port 0 resolved to the one the system picked.
    pub addr: SocketAddr,
    listener: TcpListener,
}

impl Bound {
    /// Binds `listen` for a server checking the token `auth` settled on, with the stream
    /// bounds `streams`.
    pub async fn bind(
        listen: SocketAddr,
        auth: &crate::token::ServerAuth,
        streams: &crate::streams::StreamArgs,
    ) -> Result<Self, ServeError> {
        let bind_error = |source| ServeError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            server: GrpcServer::with_auth(auth, streams),
            addr,
            listener,
        })
    }

    /// Prints the ready line, `ready NAME listen=ADDR` and then `fields` (each ` key=value`),
    /// and serves until SIGINT or SIGTERM (see [`GrpcServer::serve`] for the drain).
    pub async fn serve_until_signal(self, name: &str, fields: &str) -> Result<(), ServeError> {
        // Registered before the ready line: a SIGTERM sent as soon as it is read is handled.
        let stop = shutdown_signal();
        println!("ready {name} listen={}{fields}", self.addr);
        self.serve(stop).await
    }

    /// Serves until `shutdown` completes (for a process that prints its own ready line and
    /// stops in its own order, as `interpose up` does).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        self.server.serve(self.listener, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &mut TokenCheck, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().expect("ascii header"));
        }
        check.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn token_check_accepts_only_the_token() {
        let mut open = TokenCheck::new(None);
        assert_eq!(call(&mut open, None), Ok(()));
        let mut check = TokenCheck::new(Some("s3cret".into()));
        assert_eq!(call(&mut check, Some("Bearer s3cret")), Ok(()));
        assert_eq!(
            call(&mut check, Some("Bearer s3cre")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut check, Some("s3cret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&mut check, None), Err(tonic::Code::Unauthenticated));
    }

    #[test]
    fn listen_addresses_take_ips_and_names() {
        assert_eq!(
            listen_addr("127.0.0.1:0"),
            Ok("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(listen_addr("[::1]:7"), Ok("[::1]:7".parse().unwrap()));
        let local = listen_addr("localhost:0").expect("localhost resolves");
        assert!(local.ip().is_loopback() && local.port() == 0, "{local}");
        let err = listen_addr("127.0.0.1").expect_err("no port");
        assert!(
            err.starts_with("\"127.0.0.1\" is not an IP:PORT or HOST:PORT"),
            "{err}"
        );
    }

    #[test]
    fn exposure_needs_a_token_beyond_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: SocketAddr = "[::1]:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(check_exposure(lo, None).is_ok());
        assert!(check_exposure(lo6, None).is_ok());
        assert!(check_exposure(any, None).is_err());
        assert!(check_exposure(any, Some("")).is_err());
        assert!(check_exposure(any, Some("t")).is_ok());
    }
}
