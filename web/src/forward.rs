//! The gRPC side of the web view: each call (already turned from gRPC-web into gRPC by
//! `tonic_web`) goes, unchanged, to the service that owns it, over a tonic channel: the
//! registry (with failover across `--registry A,B` replicas, as every other client does),
//! the intercept queue, the exporter or the CA. The page's `authorization` header goes with
//! it, so each service checks the token itself; answers, streams included, flow back frame
//! by frame as they come.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Uri, header};
use http_body_util::{BodyExt, Full};
use platform::failover::{Replicas, replica_failed};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use crate::limits;

/// Where the calls of each service go.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Registry replicas, tried in this order (`--registry A,B`).
    pub registry: Vec<String>,
    /// The intercept service.
    pub intercept: String,
    /// The export service.
    pub export: String,
    /// The CA service (`interpose up`'s gRPC port, or a proxy-core's `--listen`).
    pub ca: String,
}

impl Backends {
    /// Every service at one URL, as `interpose up` serves them.
    pub fn all_at(url: &str) -> Self {
        Self {
            registry: vec![url.to_string()],
            intercept: url.to_string(),
            export: url.to_string(),
            ca: url.to_string(),
        }
    }
}

/// Which backend a call goes to, by its service name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `interpose.registry.v1.Registry`.
    Registry,
    /// `interpose.intercept.v1.Intercept`.
    Intercept,
    /// `interpose.export.v1.Export`.
    Export,
    /// `interpose.ca.v1.CertificateAuthority`.
    Ca,
}

impl Route {
    /// The route of a gRPC path `/SERVICE/METHOD`, or the status the call is refused with:
    /// services other than Interpose's own are not forwarded, nor the methods only a proxy
    /// calls (its ingest stream, ID leases, holding a packet).
    pub fn of(path: &str) -> Result<Self, Status> {
        let Some((service, method)) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
        else {
            return Err(Status::unimplemented(format!(
                "{path:?} is not a gRPC method path (/SERVICE/METHOD)"
            )));
        };
        use proto::{ca, export, intercept, registry};
        let route = match service {
            registry::registry_server::SERVICE_NAME => Route::Registry,
            intercept::intercept_server::SERVICE_NAME => Route::Intercept,
            export::export_server::SERVICE_NAME => Route::Export,
            ca::certificate_authority_server::SERVICE_NAME => Route::Ca,
            _ => {
                return Err(Status::unimplemented(format!(
                    "the web view forwards only Interpose's registry, intercept, export and CA \
                     services, not {service}"
                )));
            }
        };
        let proxy_only = match route {
            Route::Registry => matches!(method, "Ingest" | "LeaseIds"),
            Route::Intercept => method == "Hold",
            Route::Export | Route::Ca => false,
        };
        if proxy_only {
            return Err(Status::permission_denied(format!(
                "{service}/{method} is called by proxies, not through the web view"
            )));
        }
        Ok(route)
    }

    /// The service's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Route::Registry => "registry",
            Route::Intercept => "intercept",
            Route::Export => "export",
            Route::Ca => "CA",
        }
    }

    /// The largest request body (as sent by the browser) a call of this service may have:
    /// see [`limits`].
    pub fn max_body(self) -> usize {
        match self {
            Route::Intercept => limits::MAX_INTERCEPT_BODY,
            _ => limits::MAX_BODY,
        }
    }
}

/// The forwarding service `tonic_web::GrpcWebLayer` wraps: see the module documentation.
#[derive(Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Replicas,
    intercept: Replicas,
    export: Replicas,
    ca: Replicas,
    /// One permit per call in progress (a stream holds its permit until it ends).
    calls: Arc<Semaphore>,
}

/// Why the forwarding service could not be set up.
pub type ForwardError = platform::client::ClientError;

impl Forward {
    /// Channels (connected on first use) to every backend. They send no token of their
    /// own: the page's `authorization` header is forwarded as it came.
    pub fn new(backends: &Backends) -> Result<Self, ForwardError> {
        let one = |url: &String| Replicas::new(std::slice::from_ref(url), None);
        Ok(Self {
            inner: Arc::new(Inner {
                registry: Replicas::new(&backends.registry, None)?,
                intercept: one(&backends.intercept)?,
                export: one(&backends.export)?,
                ca: one(&backends.ca)?,
                calls: Arc::new(Semaphore::new(limits::MAX_CALLS)),
            }),
        })
    }
}

impl tower_service::Service<http::Request<Body>> for Forward {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(inner.forward(req).await) })
    }
}

/// Headers of the browser's HTTP request that are not the call's metadata: hop-by-hop
/// ones (HTTP/2 forbids them) and what only concerns the web server.
fn is_browser_only(name: &HeaderName) -> bool {
    const DROP: &[HeaderName] = &[
        header::HOST,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::COOKIE,
        header::ORIGIN,
        header::REFERER,
        header::CONTENT_LENGTH,
        header::ACCEPT_LANGUAGE,
        header::USER_AGENT,
    ];
    DROP.contains(name)
        || matches!(
            name.as_str(),
            "keep-alive" | "proxy-connection" | "x-grpc-web"
        )
        || name.as_str().starts_with("sec-")
}

impl Inner {
    async fn forward(&self, req: http::Request<Body>) -> http::Response<Body> {
        let route = match Route::of(req.uri().path()) {
            Ok(r) => r,
            Err(s) => return s.into_http(),
        };
        let Ok(permit) = self.calls.clone().try_acquire_owned() else {
            return Status::resource_exhausted(format!(
                "the web view already has {} calls in progress, its limit: close other tabs \
                 or wait",
                limits::MAX_CALLS
            ))
            .into_http();
        };
        let (parts, body) = req.into_parts();
        // The browser sent one whole request message: read it (bounded by the server's
        // body limit), so a registry call can be sent again to the next replica.
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Status::invalid_argument(format!(
                    "reading the request (at most {} bytes): {e}",
                    route.max_body()
                ))
                .into_http();
            }
        };
        let mut headers = parts.headers;
        let names: Vec<HeaderName> = headers.keys().cloned().collect();
        for name in names.iter().filter(|n| is_browser_only(n)) {
            headers.remove(name);
        }
        let call = Call {
            method: parts.method,
            uri: parts.uri,
            headers,
            body,
        };
        let replicas = match route {
            Route::Registry => &self.registry,
            Route::Intercept => &self.intercept,
            Route::Export => &self.export,
            Route::Ca => &self.ca,
        };
        let response = call.send(replicas, route).await;
        response.map(|body| {
            Body::new(Held {
                body,
                _permit: permit,
            })
        })
    }
}

/// Whether an answer means the replica cannot serve, so the call goes to the next one:
/// [`replica_failed`], except `Unauthenticated`. The web view forwards the token of whoever
/// calls; a call without the lab's token says nothing about the replica, and must not move
/// every page's calls away from a working one.
fn fails_over(s: &Status) -> bool {
    s.code() != tonic::Code::Unauthenticated && replica_failed(s)
}

/// One call as it is sent to a backend (again to the next replica when one fails).
struct Call {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Call {
    fn request(&self) -> http::Request<Body> {
        let mut req = http::Request::new(Body::new(Full::new(self.body.clone())));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// Sends the call to the current replica, and to each next one while a replica fails
    /// before answering ([`fails_over`]: unreachable, or `Unavailable` without a response
    /// body), at most once each.
    async fn send(&self, replicas: &Replicas, route: Route) -> http::Response<Body> {
        let mut left = replicas.count();
        loop {
            let (index, mut channel) = replicas.channel();
            left -= 1;
            let sent = async {
                std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx))
                    .await?;
                tower_service::Service::call(&mut channel, self.request()).await
            }
            .await;
            let failed = match sent {
                Ok(response) => match Status::from_header_map(response.headers()) {
                    Some(s) if fails_over(&s) => (s, Some(response.map(Body::new))),
                    _ => return response.map(Body::new),
                },
                Err(e) => (
                    Status::unavailable(format!(
                        "the web view cannot reach the {} service at {}: {e}",
                        route.name(),
                        replicas.url(index)
                    )),
                    None,
                ),
            };
            match failed {
                (s, _) if left > 0 => replicas.failed(index, &s),
                (_, Some(response)) => return response,
                (s, None) => return s.into_http(),
            }
        }
    }
}

/// A response body that holds its call's permit until it ends (see [`limits::MAX_CALLS`]).
struct Held {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_routed_by_service_and_proxy_methods_refused() {
        let route = |p: &str| Route::of(p).map_err(|s| s.code());
        assert_eq!(
            route("/interpose.registry.v1.Registry/ListConnections"),
            Ok(Route::Registry)
        );
        assert_eq!(
            route("/interpose.intercept.v1.Intercept/WatchHeld"),
            Ok(Route::Intercept)
        );
        assert_eq!(
            route("/interpose.export.v1.Export/ExportCapture"),
            Ok(Route::Export)
        );
        assert_eq!(
            route("/interpose.ca.v1.CertificateAuthority/GetCaCertificate"),
            Ok(Route::Ca)
        );
        for proxy_only in [
            "/interpose.registry.v1.Registry/Ingest",
            "/interpose.registry.v1.Registry/LeaseIds",
            "/interpose.intercept.v1.Intercept/Hold",
        ] {
            assert_eq!(route(proxy_only), Err(tonic::Code::PermissionDenied));
        }
        for other in [
            "/grpc.health.v1.Health/Check",
            "/",
            "/interpose.registry.v1.Registry",
            "/interpose.registry.v1.Registry/",
            "/interpose.registry.v1.Registry/A/B",
        ] {
            assert_eq!(route(other), Err(tonic::Code::Unimplemented), "{other}");
        }
    }

    #[test]
    fn browser_headers_are_not_forwarded_but_metadata_is() {
        for drop in ["host", "cookie", "origin", "sec-fetch-site", "x-grpc-web"] {
            assert!(is_browser_only(&HeaderName::from_static(drop)), "{drop}");
        }
        for keep in ["authorization", "grpc-timeout", "te", "content-type"] {
            assert!(!is_browser_only(&HeaderName::from_static(keep)), "{keep}");
        }
    }
}
