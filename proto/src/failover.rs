//! Several URLs of one service (registry-svc replicas serving one database), in two forms:
//!
//! - [`connect_lazy`]: one client channel that fails over by itself. It keeps one
//!   connection, to the URL that answered last, and when that connection breaks (the replica
//!   refused, reset or was killed) the next connection goes to the first URL that answers,
//!   trying each in turn. A replica's death costs its callers at most the calls that were in
//!   progress on it (a stream reopens, a read is retried with [`retry_unavailable`]), never
//!   an outage while another replica is up. For export-svc and intercept-svc.
//! - [`Replicas`]: the registries one at a time, moved on from explicitly by a caller that
//!   sees its calls fail, even on a replica that still accepts connections (one whose
//!   database is gone answers every call with an error). For a proxy, whose ingest stream
//!   and ID leases must go on wherever a registry works.
//!
//! Why not tonic's `Channel::balance_list`: its endpoints connect lazily, and a lazy endpoint
//! whose connection failed still reports ready (tonic's `Reconnect` keeps the error for the
//! next call), so the balancer goes on handing calls to the dead replica and they fail. Here
//! the choice is made while connecting, where a refused connection is seen and skipped.

use std::{
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::{Code, Status, service::interceptor::InterceptedService};

use crate::{
    client::{
        AuthChannel, ClientError, TlsConnector, TokenInjector, endpoint, server_url, tls_connector,
    },
    registry::registry_client::RegistryClient,
};

/// How long one URL may take to accept a connection before the next one is tried.
pub const CONNECT_EACH: Duration = Duration::from_secs(5);

/// Checks one entry of a comma-separated URL list (`--registry A,B`): not empty, and a
/// server URL ([`server_url`]: no scheme means `http://`). The clap value parser of every
/// flag that takes such a list.
pub fn list_entry(given: &str) -> Result<String, ClientError> {
    let given = given.trim();
    if given.is_empty() {
        return Err(ClientError::EmptyListEntry);
    }
    let url = server_url(given)?.url;
    authority(&url)?;
    endpoint(&url)?;
    Ok(url)
}

/// A channel over `urls` that connects on first use. One URL is
/// [`crate::client::connect_lazy`] as ever; several fail over as this module describes.
pub fn connect_lazy(urls: &[String], token: Option<&str>) -> Result<AuthChannel, ClientError> {
    let [first, ..] = urls else {
        return Err(ClientError::NoUrl);
    };
    if urls.len() == 1 {
        return crate::client::connect_lazy(first, token);
    }
    let injector = TokenInjector::new(token)?;
    let candidates = urls
        .iter()
        .map(|url| Candidate::new(url))
        .collect::<Result<Vec<_>, _>>()?;
    // Each URL gets CONNECT_EACH (see `Replicas::connect`); this bounds the whole round.
    let round = CONNECT_EACH * urls.len() as u32 + Duration::from_secs(1);
    let connector = Connector(Arc::new(Candidates {
        list: candidates,
        current: AtomicUsize::new(0),
    }));
    let channel = endpoint(first)?
        .connect_timeout(round)
        .connect_with_connector_lazy(connector);
    Ok(InterceptedService::new(channel, injector))
}

/// Registry replicas (`--registry A,B`) used one at a time: [`Replicas::client`] is the
/// current one's, and [`Replicas::failed`] moves on to the next. Each has its own lazy
/// channel, so moving on drops nothing but what failed. One URL is one channel, as
/// [`crate::client::connect_lazy`] makes it.
pub struct Replicas {
    list: Vec<(String, RegistryClient<AuthChannel>)>,
    current: AtomicUsize,
    /// The replica the last ingest stream went to (see the `IngestSink` implementation).
    pub(crate) streaming: AtomicUsize,
}

impl Replicas {
    /// The replicas at `urls` (at least one), sending `token`; none is connected yet.
    pub fn new(urls: &[String], token: Option<&str>) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::NoUrl);
        }
        let list = urls
            .iter()
            .map(|url| {
                let channel = crate::client::connect_lazy(url, token)?;
                Ok((url.clone(), RegistryClient::new(channel)))
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Self {
            list,
            current: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
        })
    }

    /// How many replicas there are.
    pub fn count(&self) -> usize {
        self.list.len()
    }

    /// The current replica's index and client.
    pub fn client(&self) -> (usize, RegistryClient<AuthChannel>) {
        let i = self.current.load(Relaxed) % self.list.len();
        (i, self.list[i].1.clone())
    }

    /// The current replica's URL.
    pub fn url(&self) -> &str {
        &self.list[self.current.load(Relaxed) % self.list.len()].0
    }

    /// A call to replica `index` failed: the next one becomes current, unless another
    /// caller already moved on from `index` (so two callers failing on the same dead
    /// replica move one step, not two).
    pub fn failed(&self, index: usize) {
        let next = (index + 1) % self.list.len();
        let _ = self.current.compare_exchange(index, next, Relaxed, Relaxed);
    }
}

/// Runs `call` again when it failed because its connection broke ([`broken_connection`]:
/// e.g. a replica killed while it answered), at most `attempts` times in all: for reads,
/// which are safe to repeat. The next attempt connects afresh, to whichever URL answers.
pub async fn retry_unavailable<T, F, Fut>(attempts: usize, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut left = attempts.max(1);
    loop {
        left -= 1;
        match call().await {
            Err(s) if broken_connection(&s) && left > 0 => {
                tracing::info!("call failed ({}); retrying", s.message());
            }
            done => return done,
        }
    }
}

/// Whether a call failed for want of a connection, not for what the server answered:
/// `Unavailable`, or `Cancelled` by the client's transport (hyper cancels a call whose
/// connection closed before it was sent; a server's own `Cancelled` has no transport error
/// as its source).
pub fn broken_connection(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Cancelled => std::error::Error::source(s)
            .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some()),
        _ => false,
    }
}

/// `HOST:PORT` of `url`, the port by its scheme when absent.
fn authority(url: &str) -> Result<String, ClientError> {
    let bad = || ClientError::BadServerName(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    let default = if crate::client::is_https(url) {
        443
    } else {
        80
    };
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(default)))
}

/// A byte stream to a replica, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One URL of a [`connect_lazy`] channel.
struct Candidate {
    url: String,
    authority: String,
    tls: Option<TlsConnector>,
}

impl Candidate {
    fn new(url: &str) -> Result<Self, ClientError> {
        Ok(Self {
            url: url.to_string(),
            authority: authority(url)?,
            tls: tls_connector(url)?,
        })
    }

    async fn connect(&self) -> io::Result<Box<dyn Io>> {
        match &self.tls {
            Some(tls) => Ok(Box::new(tls.connect(&self.authority).await?)),
            None => {
                let tcp = tokio::net::TcpStream::connect(&self.authority).await?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(tcp))
            }
        }
    }
}

/// The URLs of a [`connect_lazy`] channel and which one answered last.
struct Candidates {
    list: Vec<Candidate>,
    current: AtomicUsize,
}

impl Candidates {
    /// Connects to the current URL, or else to the next that answers (which becomes current);
    /// fails, naming every URL and its error, when none does.
    async fn connect(&self) -> io::Result<TokioIo<Box<dyn Io>>> {
        let n = self.list.len();
        let first = self.current.load(Relaxed) % n;
        let mut failures = Vec::new();
        for k in 0..n {
            let replica = &self.list[(first + k) % n];
            let error = match tokio::time::timeout(CONNECT_EACH, replica.connect()).await {
                Ok(Ok(io)) => {
                    if k > 0 {
                        self.current.store((first + k) % n, Relaxed);
                        tracing::warn!(
                            from = %self.list[first].url,
                            to = %replica.url,
                            "failover: {} unreachable; connected to {} instead",
                            failures.join("; "),
                            replica.url
                        );
                    }
                    return Ok(TokioIo::new(io));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {CONNECT_EACH:?}"),
            };
            failures.push(format!("{} ({error})", replica.url));
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("no URL answered: {}", failures.join("; ")),
        ))
    }
}

/// The connector tonic calls for each new connection; the URI it is given (the first URL's)
/// is ignored.
#[derive(Clone)]
struct Connector(Arc<Candidates>);

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = io::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let replicas = self.0.clone();
        Box::pin(async move { replicas.connect().await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_entries_are_checked_one_by_one() {
        assert_eq!(
            list_entry(" http://127.0.0.1:1 ").ok().as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(
            list_entry("[::1]:7").ok().as_deref(),
            Some("http://[::1]:7")
        );
        for empty in ["", "  "] {
            let e = list_entry(empty).expect_err("empty");
            assert!(matches!(e, ClientError::EmptyListEntry), "{e}");
            assert!(e.to_string().contains("empty"), "{e}");
        }
        let e = list_entry("ftp://127.0.0.1:1").expect_err("ftp");
        assert!(e.to_string().contains("\"ftp://127.0.0.1:1\""), "{e}");
        let e = list_entry("http://exa mple:1").expect_err("space");
        assert!(e.to_string().contains("exa mple"), "{e}");
    }

    #[tokio::test]
    async fn replicas_move_on_once_per_failure_of_the_current_one() {
        let urls = [
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ]
        .map(String::from);
        let r = Replicas::new(&urls, None).unwrap();
        assert_eq!(
            (r.count(), r.client().0, r.url()),
            (3, 0, "http://127.0.0.1:1")
        );
        // Two callers fail on replica 0: one step, to 1.
        r.failed(0);
        r.failed(0);
        assert_eq!((r.client().0, r.url()), (1, "http://127.0.0.1:2"));
        r.failed(1);
        r.failed(2);
        assert_eq!(r.client().0, 0, "wraps around");
        assert!(matches!(Replicas::new(&[], None), Err(ClientError::NoUrl)));
    }

    #[test]
    fn authorities_get_the_port_of_their_scheme() {
        assert_eq!(authority("http://h:9").ok().as_deref(), Some("h:9"));
        assert_eq!(authority("http://h").ok().as_deref(), Some("h:80"));
        assert_eq!(authority("https://h").ok().as_deref(), Some("h:443"));
        assert_eq!(authority("http://[::1]:5").ok().as_deref(), Some("[::1]:5"));
    }

    #[tokio::test]
    async fn an_empty_list_is_refused() {
        assert!(matches!(connect_lazy(&[], None), Err(ClientError::NoUrl)));
    }

    /// A plain TCP server answering each connection with `tag` and closing it.
    async fn tagged_server(tag: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut s, tag).await;
            }
        });
        (url, task)
    }

    /// A URL on which nothing listens (the port was just freed).
    async fn dead_url() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    async fn read_tag(replicas: &Candidates) -> io::Result<Vec<u8>> {
        let io = replicas.connect().await?;
        let mut s = io.into_inner();
        let mut buf = vec![0; 1];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn connects_to_the_next_url_that_answers_and_stays_there() {
        let dead = dead_url().await;
        let (a, a_task) = tagged_server(b"a").await;
        let (b, _b_task) = tagged_server(b"b").await;
        let replicas = Candidates {
            list: [&dead, &a, &b]
                .iter()
                .map(|u| Candidate::new(u).unwrap())
                .collect(),
            current: AtomicUsize::new(0),
        };
        assert_eq!(read_tag(&replicas).await.unwrap(), b"a");
        assert_eq!(replicas.current.load(Relaxed), 1);
        // A stays current while it answers.
        assert_eq!(read_tag(&replicas).await.unwrap(), b"a");
        a_task.abort();
        let _ = a_task.await;
        // A gone: B (after A), not the dead first URL again.
        assert_eq!(read_tag(&replicas).await.unwrap(), b"b");
        assert_eq!(replicas.current.load(Relaxed), 2);
    }

    /// A gRPC server (health and reflection only, no token) on a free loopback port.
    async fn grpc_server() -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let server = crate::serve::GrpcServer::new(None);
        let task = tokio::spawn(async move {
            let _ = server.serve(l, std::future::pending()).await;
        });
        (url, task)
    }

    async fn check(channel: &AuthChannel) -> Result<(), Status> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let mut client = HealthClient::new(channel.clone());
        client
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn grpc_calls_go_on_while_one_replica_is_up() {
        let dead = dead_url().await;
        let (a, a_task) = grpc_server().await;
        let (b, _b_task) = grpc_server().await;
        let channel = connect_lazy(&[dead, a, b], None).unwrap();
        // The first URL refuses: the call goes to A without failing.
        check(&channel).await.expect("through A");
        check(&channel).await.expect("again through A");
        // A dies: at most the call racing its death fails Unavailable, and is retried.
        a_task.abort();
        let _ = a_task.await;
        let failed = std::sync::Mutex::new(Vec::new());
        retry_unavailable(2, || async {
            let r = check(&channel).await;
            if let Err(s) = &r {
                failed.lock().unwrap().push(s.code());
            }
            r
        })
        .await
        .expect("through B");
        let failed = failed.into_inner().unwrap();
        assert!(failed.len() <= 1, "{failed:?}");
        check(&channel).await.expect("again through B");
    }

    #[tokio::test]
    async fn calls_fail_unavailable_when_no_url_answers() {
        let channel = connect_lazy(&[dead_url().await, dead_url().await], None).unwrap();
        let s = check(&channel).await.expect_err("nothing answers");
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    }

    #[tokio::test]
    async fn names_every_url_when_none_answers() {
        let (x, y) = (dead_url().await, dead_url().await);
        let replicas = Candidates {
            list: vec![Candidate::new(&x).unwrap(), Candidate::new(&y).unwrap()],
            current: AtomicUsize::new(0),
        };
        let e = read_tag(&replicas).await.expect_err("none answers");
        assert!(
            e.to_string().contains(&x) && e.to_string().contains(&y),
            "{e}"
        );
    }

    #[tokio::test]
    async fn retries_only_unavailable_and_only_as_often_as_asked() {
        let mut calls = 0;
        let r: Result<(), Status> = retry_unavailable(3, || {
            calls += 1;
            std::future::ready(Err(Status::unavailable("down")))
        })
        .await;
        assert_eq!(
            (r.map_err(|s| s.code()), calls),
            (Err(Code::Unavailable), 3)
        );
        let mut calls = 0;
        let r: Result<(), Status> = retry_unavailable(3, || {
            calls += 1;
            std::future::ready(Err(Status::not_found("no")))
        })
        .await;
        assert_eq!((r.map_err(|s| s.code()), calls), (Err(Code::NotFound), 1));
        let mut calls = 0;
        let r = retry_unavailable(3, || {
            calls += 1;
            std::future::ready(if calls < 2 {
                Err(Status::unavailable("down"))
            } else {
                Ok(7)
            })
        })
        .await;
        assert_eq!((r.ok(), calls), (Some(7), 2));
        // A server's own Cancelled is an answer, not a broken connection.
        assert!(!broken_connection(&Status::cancelled("by the server")));
    }
}
