//! Bounds on the streaming calls a gRPC server keeps open: per connection and per token.
//!
//! A streaming call (a watch, `FollowHistory`, a live export, a proxy's ingest stream, a
//! health watch) holds a task, a channel and buffers for as long as its client keeps it, so
//! one client opening thousands would take the server's memory and time from everyone. Every
//! server of the project counts them: at most [`DEFAULT_PER_CONNECTION`] on one HTTP/2
//! connection, and at most [`DEFAULT_PER_TOKEN`] for one token. A server accepts exactly one
//! token (or none, with `--no-auth`), so the per-token bound is also the most streams the
//! server serves at once. A call beyond either bound is answered at once with
//! RESOURCE_EXHAUSTED and a sentence naming the bound; unary calls are never counted, so
//! they keep being served while the streams are at their limit.
//!
//! Which methods stream is read from the descriptor sets the server serves (the project's,
//! health's and reflection's), so a new streaming RPC is counted without a list to keep.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use prost::Message;
use tonic::Status;

use crate::accept::ConnInfo;

/// Default bound on the streaming calls open on one connection.
pub const DEFAULT_PER_CONNECTION: u32 = 64;
/// Default bound on the streaming calls open for one token (so, on the whole server).
pub const DEFAULT_PER_TOKEN: u32 = 512;

/// The stream bounds as command-line options (every gRPC server takes them).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct StreamArgs {
    /// Most streaming calls (watches, history follows, live exports, ingest streams) one
    /// gRPC connection may have open at once; one more is refused with RESOURCE_EXHAUSTED.
    /// Unary calls are not counted.
    #[arg(long, default_value_t = DEFAULT_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Most streaming calls open at once for one token, over all connections (a server
    /// accepts one token, so this bounds all of its streams); one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = DEFAULT_PER_TOKEN, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_token: u32,
}

impl Default for StreamArgs {
    fn default() -> Self {
        Self {
            max_streams_per_connection: DEFAULT_PER_CONNECTION,
            max_streams_per_token: DEFAULT_PER_TOKEN,
        }
    }
}

impl StreamArgs {
    /// The bounds these options set.
    pub fn limits(&self) -> StreamLimits {
        StreamLimits {
            per_connection: self.max_streams_per_connection as usize,
            per_token: self.max_streams_per_token as usize,
        }
    }
}

/// The bounds one server enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streaming calls open at once on one connection.
    pub per_connection: usize,
    /// Streaming calls open at once for the server's token.
    pub per_token: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamArgs::default().limits()
    }
}

/// The paths (`/package.Service/Method`) of every streaming method the servers may serve.
fn streaming_paths() -> &'static HashSet<String> {
    static PATHS: OnceLock<HashSet<String>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let sets = [
            proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut paths = HashSet::new();
        for bytes in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    for m in service.method {
                        if m.client_streaming() || m.server_streaming() {
                            paths.insert(format!(
                                "/{package}.{name}/{}",
                                m.name.unwrap_or_default()
                            ));
                        }
                    }
                }
            }
        }
        paths
    })
}

/// Whether a call to `path` is a streaming call.
pub fn is_streaming(path: &str) -> bool {
    streaming_paths().contains(path)
}

/// One counted stream: released when its response is done or dropped.
pub(crate) struct StreamGuard {
    counters: [Option<Arc<AtomicUsize>>; 2],
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        for c in self.counters.iter().flatten() {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Takes one of `limit` from `counter`, or says it is all taken.
fn take(counter: &Arc<AtomicUsize>, limit: usize) -> Option<Arc<AtomicUsize>> {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| counter.clone())
}

/// Counts streaming calls against [`StreamLimits`] (see the module docs).
#[derive(Clone)]
pub(crate) struct StreamLimitLayer {
    limits: StreamLimits,
    per_token: Arc<AtomicUsize>,
}

impl StreamLimitLayer {
    pub(crate) fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            per_token: Arc::default(),
        }
    }
}

impl<S> tower_layer::Layer<S> for StreamLimitLayer {
    type Service = StreamLimit<S>;

    fn layer(&self, inner: S) -> StreamLimit<S> {
        StreamLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`StreamLimitLayer`].
#[derive(Clone)]
pub(crate) struct StreamLimit<S> {
    inner: S,
    layer: StreamLimitLayer,
}

impl<S> StreamLimit<S> {
    /// A guard for one more stream on `conn`, or the refusal.
    fn admit(&self, conn: Option<&ConnInfo>) -> Result<StreamGuard, Status> {
        let limits = self.layer.limits;
        let on_conn = match conn {
            Some(c) => Some(take(&c.streams, limits.per_connection).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "this connection already has {} streaming calls open, the most the server \
                     allows (--max-streams-per-connection): end one first",
                    limits.per_connection
                ))
            })?),
            None => None,
        };
        let on_token = take(&self.layer.per_token, limits.per_token);
        let guard = StreamGuard {
            counters: [on_conn, on_token.clone()],
        };
        if on_token.is_none() {
            // `guard` gives back the connection's share as it drops.
            return Err(Status::resource_exhausted(format!(
                "this token already has {} streaming calls open, the most the server allows \
                 (--max-streams-per-token): end one first",
                limits.per_token
            )));
        }
        Ok(guard)
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for StreamLimit<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<Limited<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = if is_streaming(req.uri().path()) {
            match self.admit(req.extensions().get::<ConnInfo>()) {
                Ok(g) => Some(g),
                Err(status) => {
                    tracing::debug!(path = req.uri().path(), "{}", status.message());
                    let refused = status.into_http();
                    return Box::pin(async move { Ok(refused) });
                }
            }
        } else {
            None
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| Limited {
                body: Some(body),
                guard,
            }))
        })
    }
}

/// A response body holding its stream's place until it is done or dropped; empty for a
/// refused call (whose status travels in the headers).
pub(crate) struct Limited<B> {
    body: Option<B>,
    #[allow(dead_code)] // Held for its Drop.
    guard: Option<StreamGuard>,
}

impl<B> Default for Limited<B> {
    fn default() -> Self {
        Self {
            body: None,
            guard: None,
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Limited<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match &mut self.body {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => http_body::SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_methods_come_from_the_descriptors() {
        for path in [
            "/interpose.registry.v1.Registry/FollowHistory",
            "/interpose.registry.v1.Registry/WatchConnections",
            "/interpose.registry.v1.Registry/Ingest",
            "/interpose.intercept.v1.Intercept/WatchHeld",
            "/interpose.export.v1.Export/ExportCapture",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(is_streaming(path), "{path}");
        }
        for path in [
            "/interpose.registry.v1.Registry/ListConnections",
            "/grpc.health.v1.Health/Check",
            "/nope.Nope/Nope",
        ] {
            assert!(!is_streaming(path), "{path}");
        }
    }

    #[test]
    fn a_refused_stream_gives_back_what_it_took() {
        let layer = StreamLimitLayer::new(StreamLimits {
            per_connection: 2,
            per_token: 3,
        });
        let svc = StreamLimit { inner: (), layer };
        let conn = ConnInfo::for_tests();
        let a = svc.admit(Some(&conn)).expect("1st");
        let _b = svc.admit(Some(&conn)).expect("2nd");
        let e = svc.admit(Some(&conn)).err().expect("3rd on one connection");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("--max-streams-per-connection"), "{e}");
        let other = ConnInfo::for_tests();
        let _c = svc.admit(Some(&other)).expect("another connection");
        let e = svc.admit(Some(&other)).err().expect("4th for the token");
        assert!(e.message().contains("--max-streams-per-token"), "{e}");
        assert_eq!(other.streams.load(Ordering::SeqCst), 1, "given back");
        drop(a);
        svc.admit(Some(&other)).expect("room again");
    }
}
