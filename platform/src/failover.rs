//! Several URLs of one service (registry-svc replicas serving one database), used one at a
//! time: [`Replicas`]. Every call goes to the current replica; when it fails for want of a
//! working replica (the connection is refused or breaks, the replica was killed, or it
//! answers but cannot serve: a replica whose database is gone fails every call) the caller
//! moves on to the next, and so does every later call. A unary call is simply tried on
//! each in turn ([`Replicas::call`]); a stream's owner (a proxy's ingest stream, a watch)
//! moves on with [`Replicas::failed`] and reopens the stream the way it already resumes.
//! One URL is one lazily connected channel, exactly as [`crate::client::connect_lazy`]
//! makes it, and nothing is retried.
//!
//! Why not tonic's `Channel::balance_list`: its endpoints connect lazily, and a lazy endpoint
//! whose connection failed still reports ready (tonic's `Reconnect` keeps the error for the
//! next call), so the balancer goes on handing calls to a dead replica, and they fail (tried
//! with tonic 0.14.9: 8 of 20 health checks failed over two endpoints, one refusing); nor
//! could it tell a replica that answers errors from a working one.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use tonic::{Code, Status};

use crate::client::{AuthChannel, ClientError, endpoint, server_url};

/// Checks one entry of a comma-separated URL list (`--registry A,B`): not empty, and a
/// server URL ([`server_url`]: no scheme means `http://`) with a host. The clap value
/// parser of every flag that takes such a list.
pub fn list_entry(given: &str) -> Result<String, ClientError> {
    let given = given.trim();
    if given.is_empty() {
        return Err(ClientError::EmptyListEntry);
    }
    let url = server_url(given)?.url;
    endpoint(&url)?;
    let host = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().filter(|h| !h.is_empty()).map(str::to_string));
    if host.is_none() {
        return Err(ClientError::BadServerName(url));
    }
    Ok(url)
}

/// Whether a call failed for want of a working replica rather than for what it asked:
/// `Unavailable`, `Unauthenticated` (a replica that does not take this token; others may),
/// or any status the client's own transport made (it carries the transport error as its
/// source: a connection refused, reset or closed under the call; a server's answer has no
/// source).
pub fn replica_failed(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unauthenticated)
        || std::error::Error::source(s).is_some()
}

/// Registry replicas (`--registry A,B`), used one at a time; see the module documentation.
pub struct Replicas {
    list: Vec<(String, AuthChannel)>,
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
            .map(|url| Ok((url.clone(), crate::client::connect_lazy(url, token)?)))
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

    /// The current replica's index and channel.
    pub fn channel(&self) -> (usize, AuthChannel) {
        let i = self.current.load(Relaxed) % self.list.len();
        (i, self.list[i].1.clone())
    }

    /// The URL of replica `index`.
    pub fn url(&self, index: usize) -> &str {
        &self.list[index % self.list.len()].0
    }

    /// A call to replica `index` failed ([`replica_failed`]): the next one becomes current,
    /// unless another caller already moved on from `index` (two callers failing on the same
    /// dead replica move one step, not two). Logs the move.
    pub fn failed(&self, index: usize, why: &Status) {
        if self.advance(index) {
            let (from, to) = (self.url(index), self.url(index + 1));
            tracing::warn!(
                %from,
                %to,
                "failover: registry {from} failed ({}: {}); switching to {to}",
                why.code(),
                why.message()
            );
        }
    }

    /// Makes the replica after `index` current, if `index` still is; returns whether it did
    /// (never with one replica).
    pub(crate) fn advance(&self, index: usize) -> bool {
        let next = (index + 1) % self.list.len();
        next != index
            && self
                .current
                .compare_exchange(index, next, Relaxed, Relaxed)
                .is_ok()
    }

    /// Runs `call` on the current replica's channel, and on each next one while it fails
    /// with [`replica_failed`], at most once per replica; returns the first success or the
    /// last failure. For calls that are safe to repeat (reads, leases).
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut left = self.list.len();
        loop {
            let (index, channel) = self.channel();
            left -= 1;
            match call(channel).await {
                Err(s) if left > 0 && replica_failed(&s) => self.failed(index, &s),
                done => return done,
            }
        }
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
        let down = Status::unavailable("down");
        assert_eq!(
            (r.count(), r.channel().0, r.url(0)),
            (3, 0, "http://127.0.0.1:1")
        );
        // Two callers fail on replica 0: one step, to 1.
        r.failed(0, &down);
        r.failed(0, &down);
        assert_eq!(r.channel().0, 1);
        r.failed(1, &down);
        r.failed(2, &down);
        assert_eq!(r.channel().0, 0, "wraps around");
        assert!(matches!(Replicas::new(&[], None), Err(ClientError::NoUrl)));
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

    /// A URL on which nothing listens (the port was just freed).
    async fn dead_url() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    async fn check(channel: AuthChannel) -> Result<(), Status> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn calls_go_on_while_one_replica_is_up() {
        let (a, a_task) = grpc_server().await;
        let (b, _b_task) = grpc_server().await;
        let r = Replicas::new(&[dead_url().await, a, b], None).unwrap();
        // The first URL refuses: the call goes on to A, which stays current.
        r.call(check).await.expect("through A");
        assert_eq!(r.channel().0, 1);
        r.call(check).await.expect("again through A");
        // A dies: calls go on through B.
        a_task.abort();
        let _ = a_task.await;
        r.call(check).await.expect("through B");
        assert_eq!(r.channel().0, 2);
        r.call(check).await.expect("again through B");
    }

    #[tokio::test]
    async fn a_call_fails_when_no_replica_answers_and_answers_are_not_retried() {
        let r = Replicas::new(&[dead_url().await, dead_url().await], None).unwrap();
        let s = r.call(check).await.expect_err("nothing answers");
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        let mut calls = 0;
        let s = r
            .call(|_| {
                calls += 1;
                std::future::ready(Err::<(), _>(Status::not_found("no such connection")))
            })
            .await
            .expect_err("an answer");
        assert_eq!((s.code(), calls), (Code::NotFound, 1));
        assert!(!replica_failed(&Status::cancelled("by the server")));
        assert!(replica_failed(&Status::unauthenticated("wrong token")));
    }
}
