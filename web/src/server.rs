//! The HTTP front: one listening address speaking HTTP/1.1 and HTTP/2 without TLS (h2c),
//! which checks every request's `Host`, serves the embedded page to `GET`, hands gRPC-web
//! `POST`s to `tonic_web` and the forwarder, and puts the security headers on every answer.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use platform::retry::Backoff;
use tokio::{net::TcpListener, sync::Semaphore};
use tonic::body::Body;
use tower_service::Service;

use crate::{
    WebError, assets,
    forward::{Backends, Forward, Route},
    host::HostCheck,
    limits,
};

/// How long the accept loop waits after an accept that failed (a fixed wait).
const ACCEPT_RETRY: Backoff = Backoff::new(
    std::time::Duration::from_millis(100),
    std::time::Duration::from_millis(100),
);

/// The `Content-Security-Policy` of every answer: the page's own origin only, no inline
/// script or style, no frames, no forms, no plugins.
pub const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
     frame-ancestors 'none'; form-action 'none'";

/// The gRPC-web content types (`application/grpc-web`, `+proto`, `-text`, `-text+proto`).
fn is_grpc_web(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.split(';').next().unwrap_or_default().trim();
            matches!(
                ct,
                "application/grpc-web"
                    | "application/grpc-web+proto"
                    | "application/grpc-web-text"
                    | "application/grpc-web-text+proto"
            )
        })
}

/// Everything one request needs, shared by every connection.
struct App {
    hosts: HostCheck,
    grpc_web: tonic_web::GrpcWebService<Forward>,
    /// Room for request bodies being read, in bytes ([`limits::BODY_BUDGET`]).
    bodies: Arc<Semaphore>,
}

/// A plain-text answer of one line.
fn text(status: StatusCode, line: String) -> http::Response<Body> {
    let mut r = http::Response::new(Body::new(Full::new(Bytes::from(line + "\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl App {
    async fn handle(&self, req: http::Request<Incoming>) -> http::Response<Body> {
        let mut response = self.answer(req).await;
        let h = response.headers_mut();
        h.insert("content-security-policy", HeaderValue::from_static(CSP));
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert(
            "cross-origin-opener-policy",
            HeaderValue::from_static("same-origin"),
        );
        h.insert(
            "cross-origin-resource-policy",
            HeaderValue::from_static("same-origin"),
        );
        response
    }

    async fn answer(&self, req: http::Request<Incoming>) -> http::Response<Body> {
        // HTTP/1.1 names the host in `Host`, HTTP/2 in `:authority`.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let host = match host {
            Some(h) if self.hosts.allows(&h) => h,
            other => {
                return text(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "this server does not answer to Host {:?} (a guard against DNS \
                         rebinding; allow a name with --web-allow-host)",
                        other.unwrap_or_default()
                    ),
                );
            }
        };
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD {
            Self::file(&req)
        } else if method == Method::POST && is_grpc_web(req.headers()) {
            self.grpc_web(req, &host).await
        } else if method == Method::POST {
            text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "only gRPC-web calls (application/grpc-web+proto, application/grpc-web-text) \
                 are served here; gRPC clients call the gRPC port"
                    .into(),
            )
        } else {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} is not served here"),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            r
        }
    }

    /// An embedded file, or 404.
    fn file(req: &http::Request<Incoming>) -> http::Response<Body> {
        let Some(asset) = assets::lookup(req.uri().path()) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no such file: {}", req.uri().path()),
            );
        };
        let body = if req.method() == Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(asset.bytes)
        };
        let mut r = http::Response::new(Body::new(Full::new(body)));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(asset.cache_control),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.bytes.len()));
        r
    }

    /// A gRPC-web call from the page's own origin, forwarded.
    async fn grpc_web(&self, req: http::Request<Incoming>, host: &str) -> http::Response<Body> {
        let origin = req.headers().get(header::ORIGIN).map(|o| o.to_str());
        let cross_origin = match origin {
            None => false,
            Some(Ok(o)) => !HostCheck::same_origin(host, o),
            Some(Err(_)) => true,
        };
        // What browsers say of the request's initiator, where they say it.
        let cross_site = req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| !matches!(v.as_bytes(), b"same-origin" | b"none"));
        if cross_origin || cross_site {
            return text(
                StatusCode::FORBIDDEN,
                "cross-origin calls are refused: the web view answers only its own page".into(),
            );
        }
        let limit = Route::of(req.uri().path()).map_or(limits::MAX_BODY, Route::max_body);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request is larger than this call's limit of {limit} bytes"),
            );
        }
        let room = declared.map_or(limit, |n| n as usize).max(1);
        let Ok(_room) = self
            .bodies
            .clone()
            .acquire_many_owned(u32::try_from(room).unwrap_or(u32::MAX))
            .await
        else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down".into(),
            );
        };
        // Held until the answer's head arrives: by then the request body was read and sent.
        let req = req.map(|b| Limited::new(b, limit));
        let mut grpc_web = self.grpc_web.clone();
        match grpc_web.call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// A bound, not yet serving, web server.
pub struct WebServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl WebServer {
    /// Binds `addr`. With `fallback`, an address in use is replaced by a free port on the
    /// same IP (for the default address, so two `interpose up` still both start; the ready
    /// line names the port taken).
    pub async fn bind(addr: SocketAddr, fallback: bool) -> Result<Self, WebError> {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) if fallback && e.kind() == std::io::ErrorKind::AddrInUse => {
                let free = SocketAddr::new(addr.ip(), 0);
                let l = TcpListener::bind(free)
                    .await
                    .map_err(|source| WebError::Bind { addr: free, source })?;
                tracing::warn!(
                    "the web view's default address {addr} is in use; serving on {} instead",
                    l.local_addr()
                        .map_or_else(|_| free.to_string(), |a| a.to_string())
                );
                l
            }
            Err(source) => return Err(WebError::Bind { addr, source }),
        };
        let addr = listener
            .local_addr()
            .map_err(|source| WebError::Bind { addr, source })?;
        Ok(Self { listener, addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL, with `token` once in the fragment (`#token=...`, percent-encoded):
    /// the page stores it and takes it out of the address bar. A fragment never reaches a
    /// server, logs or `Referer`. An unspecified bound IP is shown as loopback.
    pub fn url(&self, token: Option<&str>) -> String {
        crate::page_url(self.addr, token)
    }

    /// Serves until `shutdown` completes, then lets calls in progress finish for at most
    /// [`platform::serve::SHUTDOWN_GRACE`] (streams end when their backends drain).
    pub async fn serve(
        self,
        backends: &Backends,
        allowed_hosts: &[String],
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), WebError> {
        let app = Arc::new(App {
            hosts: HostCheck::new(self.addr, allowed_hosts),
            grpc_web: tower_layer::Layer::layer(
                &tonic_web::GrpcWebLayer::new(),
                Forward::new(backends)?,
            ),
            bodies: Arc::new(Semaphore::new(limits::BODY_BUDGET)),
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits::HEADER_READ_TIMEOUT)
            .max_buf_size(limits::MAX_HEAD);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits::MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(limits::MAX_HEAD as u32)
            .keep_alive_interval(platform::serve::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(platform::serve::KEEPALIVE_TIMEOUT);
        let connections = Arc::new(Semaphore::new(limits::MAX_CONNECTIONS));
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut retry = ACCEPT_RETRY.start(1);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                p = connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, then go on.
                        tracing::warn!("web view: accepting a connection: {e}");
                        tokio::time::sleep(retry.failed().unwrap_or(ACCEPT_RETRY.min)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, "web view connection: {e}");
                }
                drop(permit);
            });
        }
        drop(self.listener);
        if tokio::time::timeout(platform::serve::SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("web view: calls still open after the shutdown grace period");
        }
        Ok(())
    }
}
