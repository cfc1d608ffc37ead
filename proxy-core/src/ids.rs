//! Connection IDs, leased from the registry in blocks so that no connection waits for a
//! registry round trip in steady state.
//!
//! The pool keeps the blocks it holds and leases the next one in the background once fewer
//! than half a block remain. Block size adapts to the connection rate: it starts at
//! [`MIN_BLOCK`] and doubles (up to [`MAX_BLOCK`]) whenever a block lasted less than
//! [`FAST_BLOCK`], so a burst of fresh connections does not outrun the prefetch while a
//! quiet proxy wastes few IDs (IDs of a block not used before the process exits are simply
//! never used: they stay unique).
//!
//! When the pool is empty (the registry was unreachable for longer than the remaining IDs
//! lasted) a connection waits up to [`ID_WAIT`] for a lease; if none arrives, [`IdPool::next`]
//! fails and the connection is refused with SOCKS reply 0x01 (general failure) and a logged
//! reason. IDs must be unique across every proxy of a registry, so the proxy cannot invent
//! them itself; refusing is the only honest answer.
//!
//! Where blocks come from is a [`Leases`]: the registry's replicas over gRPC
//! ([`Replicas`], failing over between them), or the registry in this same process
//! (`interpose up`, see [`crate::local`]), called directly.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use platform::{failover::Replicas, retry::Backoff};
use proto::registry::{LeaseIdsRequest, LeaseIdsResponse, registry_client::RegistryClient};
use tokio::{sync::Notify, time::Instant};
use tonic::Status;

/// Smallest block leased.
pub const MIN_BLOCK: u32 = 64;
/// Largest block leased.
pub const MAX_BLOCK: u32 = 4096;
/// A block used up faster than this makes the next one twice as big.
pub const FAST_BLOCK: Duration = Duration::from_secs(2);
/// How long a connection waits for IDs when the pool is empty.
pub const ID_WAIT: Duration = Duration::from_secs(3);
/// Longest one lease may take.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// How a failed lease is retried.
const LEASE_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));

/// No connection ID could be had.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    /// The pool is empty and the registry did not lease more in time.
    #[error(
        "no connection ID available: the registry has not leased IDs for {0:?} \
         (is registry-svc reachable?)"
    )]
    Unavailable(Duration),
}

/// A lease that failed: where it went (for the log) and why.
#[derive(Debug)]
pub struct LeaseFailed {
    /// The registry asked, e.g. its URL.
    pub from: String,
    /// Its answer, or why there was none.
    pub status: Status,
}

/// One lease in flight.
pub type Leasing<'a> =
    Pin<Box<dyn Future<Output = Result<LeaseIdsResponse, LeaseFailed>> + Send + 'a>>;

/// Where a pool leases its blocks: the one call it makes, `Registry.LeaseIds`.
pub trait Leases: Send + Sync {
    /// Leases one block (bounded by [`LEASE_TIMEOUT`]); after a failure the next lease goes
    /// to the next replica, if there is another.
    fn lease_ids(&self, req: LeaseIdsRequest) -> Leasing<'_>;

    /// How many registries a failed lease moves between: the pool backs off only once a
    /// lease from each has failed in a row.
    fn replicas(&self) -> usize {
        1
    }
}

/// The registry's replicas over gRPC: the current one is asked, and one that fails (or
/// does not answer in time) makes the next one current.
impl Leases for Replicas {
    fn lease_ids(&self, req: LeaseIdsRequest) -> Leasing<'_> {
        Box::pin(async move {
            let (index, channel) = self.channel();
            let res = bounded(RegistryClient::new(channel).lease_ids(req)).await;
            res.map_err(|status| {
                let from = self.url(index).to_string();
                self.failed(index, &status);
                LeaseFailed { from, status }
            })
        })
    }

    fn replicas(&self) -> usize {
        self.count()
    }
}

/// `lease` bounded by [`LEASE_TIMEOUT`]: no answer in time is a failure like any other.
pub(crate) async fn bounded(
    lease: impl Future<Output = Result<tonic::Response<LeaseIdsResponse>, Status>>,
) -> Result<LeaseIdsResponse, Status> {
    tokio::time::timeout(LEASE_TIMEOUT, lease)
        .await
        .unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "no answer within {LEASE_TIMEOUT:?}"
            )))
        })
        .map(tonic::Response::into_inner)
}

struct State {
    blocks: VecDeque<(u64, u64)>,
    fetching: bool,
    next_size: u32,
    last_lease: Option<Instant>,
}

impl State {
    fn remaining(&self) -> u64 {
        self.blocks.iter().map(|(a, b)| b - a + 1).sum()
    }

    fn take(&mut self) -> Option<u64> {
        let (first, last) = self.blocks.front_mut()?;
        let id = *first;
        if *first == *last {
            self.blocks.pop_front();
        } else {
            *first += 1;
        }
        Some(id)
    }
}

struct Inner {
    state: Mutex<State>,
    notify: Notify,
    registry: Arc<dyn Leases>,
    node: String,
}

/// A pool of leased connection IDs. Cloning shares the pool.
#[derive(Clone)]
pub struct IdPool {
    inner: Arc<Inner>,
}

impl IdPool {
    /// A pool leasing from `registry` (the next replica when one fails); the first lease
    /// starts now.
    pub fn new(registry: Arc<dyn Leases>, node: String) -> Self {
        let pool = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    blocks: VecDeque::new(),
                    fetching: false,
                    next_size: MIN_BLOCK,
                    last_lease: None,
                }),
                notify: Notify::new(),
                registry,
                node,
            }),
        };
        pool.maybe_fetch();
        pool
    }

    /// IDs held and not yet used.
    pub fn remaining(&self) -> u64 {
        self.inner.state.lock().map(|s| s.remaining()).unwrap_or(0)
    }

    /// The next connection ID: immediate while the pool holds IDs, otherwise waits up to
    /// [`ID_WAIT`] for a lease.
    pub async fn next(&self) -> Result<u64, IdError> {
        let deadline = Instant::now() + ID_WAIT;
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.inner.state.lock().ok().and_then(|mut s| s.take());
            self.maybe_fetch();
            if let Some(id) = got {
                return Ok(id);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(IdError::Unavailable(ID_WAIT));
            }
        }
    }

    /// Starts a background lease when the pool runs low and none is under way.
    fn maybe_fetch(&self) {
        let size = {
            let Ok(mut s) = self.inner.state.lock() else {
                return;
            };
            if s.fetching || s.remaining() >= u64::from(s.next_size / 2) {
                return;
            }
            s.fetching = true;
            s.next_size
        };
        let inner = self.inner.clone();
        tokio::spawn(async move { fetch(inner, size).await });
    }
}

/// Leases one block, retrying until the registry answers: at once from the next replica
/// when there are several, with backoff once each has failed in a row.
async fn fetch(inner: Arc<Inner>, size: u32) {
    let mut retry = LEASE_RETRY.start(inner.registry.replicas());
    loop {
        let req = LeaseIdsRequest {
            node: inner.node.clone(),
            count: size,
        };
        match inner.registry.lease_ids(req).await {
            Ok(r) => {
                if r.first == 0 || r.last < r.first {
                    tracing::error!(
                        first = r.first,
                        last = r.last,
                        "registry leased an invalid ID block"
                    );
                    // No other replica would do better: wait without counting a failure.
                    tokio::time::sleep(retry.backoff()).await;
                } else {
                    if let Ok(mut s) = inner.state.lock() {
                        s.blocks.push_back((r.first, r.last));
                        s.fetching = false;
                        let now = Instant::now();
                        if s.last_lease.is_some_and(|t| now - t < FAST_BLOCK) {
                            s.next_size = (s.next_size * 2).min(MAX_BLOCK);
                        }
                        s.last_lease = Some(now);
                    }
                    tracing::debug!(first = r.first, last = r.last, "leased connection IDs");
                    inner.notify.notify_waiters();
                    return;
                }
            }
            Err(LeaseFailed { from, status }) => {
                let wait = retry.failed();
                if retry.worth_logging() {
                    tracing::warn!("leasing connection IDs from {from} failed: {status}");
                }
                // None: another replica is still untried in this round, no backoff.
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_walks_blocks_in_order() {
        let mut s = State {
            blocks: VecDeque::from([(1, 2), (10, 10)]),
            fetching: false,
            next_size: MIN_BLOCK,
            last_lease: None,
        };
        assert_eq!(s.remaining(), 3);
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), Some(2));
        assert_eq!(s.take(), Some(10));
        assert_eq!(s.take(), None);
        assert_eq!(s.remaining(), 0);
    }
}
