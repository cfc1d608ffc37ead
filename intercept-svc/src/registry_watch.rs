//! Following the registry's connection records with one `WatchConnections` stream, so every
//! held packet shows whether its connection is still open and, if not, who closed it. The
//! stream is reopened with backoff whenever the registry goes away.
//!
//! Where the stream comes from is a [`ConnectionEvents`]: the registry's replicas over gRPC
//! ([`Grpc`], failing over between them), or the registry in this same process
//! (`interpose up`, [`Direct`]), whose service is called directly.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use platform::{
    failover::Replicas,
    retry::{Backoff, Retry},
};
use proto::{
    common::{ClosedBy, ConnStatus, Connection},
    registry::{
        WatchConnectionsRequest, WatchEvent, registry_client::RegistryClient,
        registry_server::Registry, watch_event::Kind,
    },
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Status};

use crate::{queue::Ended, service::InterceptState};

/// How the watch is reopened after the registry goes away.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// One open watch: the snapshot, then each change; an error ends it.
pub type Events = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

/// Opening a watch, as a future.
pub type Opening<'a> = Pin<Box<dyn Future<Output = Result<Events, Status>> + Send + 'a>>;

/// Where the queue follows connection records: the one call it makes,
/// `Registry.WatchConnections` (every connection, from a snapshot), one stream at a time.
pub trait ConnectionEvents: Send + Sync {
    /// Opens the watch.
    fn watch_connections(&self) -> Opening<'_>;

    /// How many registries a failed watch moves between: the follower backs off only once
    /// a watch on each has failed in a row.
    fn replicas(&self) -> usize {
        1
    }

    /// The last watch failed (`why`): the next one goes to the next registry, if there is
    /// another.
    fn failed(&self, why: &Status) {
        let _ = why;
    }
}

/// The registry's replicas over gRPC, for one follower: a watch goes to the current
/// replica, and when it fails the next one becomes current.
pub struct Grpc {
    replicas: Replicas,
    /// The replica the last watch went to.
    watching: AtomicUsize,
}

impl Grpc {
    /// Watches through `replicas`.
    pub fn new(replicas: Replicas) -> Self {
        Self {
            replicas,
            watching: AtomicUsize::new(0),
        }
    }
}

impl ConnectionEvents for Grpc {
    fn watch_connections(&self) -> Opening<'_> {
        let (index, channel) = self.replicas.channel();
        self.watching.store(index, Ordering::Relaxed);
        Box::pin(async move {
            let stream = RegistryClient::new(channel)
                .watch_connections(WatchConnectionsRequest::default())
                .await?
                .into_inner();
            Ok(Box::pin(stream) as Events)
        })
    }

    fn replicas(&self) -> usize {
        self.replicas.count()
    }

    fn failed(&self, why: &Status) {
        self.replicas
            .failed(self.watching.load(Ordering::Relaxed), why);
    }
}

/// The registry service in this same process (`interpose up`), called as the generated
/// gRPC server would call it: no socket, no HTTP/2, no encoding.
pub struct Direct<R>(pub Arc<R>);

impl<R: Registry> ConnectionEvents for Direct<R> {
    fn watch_connections(&self) -> Opening<'_> {
        Box::pin(async move {
            let stream = self
                .0
                .watch_connections(Request::new(WatchConnectionsRequest::default()))
                .await?
                .into_inner();
            Ok(Box::pin(stream) as Events)
        })
    }
}

/// Follows `registry` for as long as the task runs; with several replicas, a failed watch
/// reopens on the next at once, and backs off only once each has failed in a row.
pub async fn watch_registry(shared: Arc<InterceptState>, registry: Arc<dyn ConnectionEvents>) {
    let mut retry = RETRY.start(registry.replicas());
    loop {
        match follow_once(&shared, &*registry, &mut retry).await {
            Ok(()) => tracing::warn!("registry ended its connection watch; reopening"),
            // A registry shutting down (this process's own, on SIGINT) is no failure to warn
            // about: the watch reopens if the registry comes back.
            Err(s) if s.message() == platform::serve::SHUTTING_DOWN => {
                tracing::debug!("registry connection watch: {}", s.message());
                registry.failed(&s);
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), "registry connection watch: {}", s.message());
                registry.failed(&s);
            }
        }
        shared.registry_connected.store(false, Ordering::Relaxed);
        if let Some(wait) = retry.failed() {
            tokio::time::sleep(wait).await;
        }
    }
}

fn ended(c: &Connection) -> Option<Ended> {
    (c.status == ConnStatus::Disconnected as i32).then(|| Ended {
        closed_by: ClosedBy::try_from(c.closed_by).unwrap_or(ClosedBy::Unspecified),
        reason: c.reason.clone(),
    })
}

/// One watch stream: a snapshot (collected, then applied at once) and live changes.
async fn follow_once(
    shared: &InterceptState,
    registry: &dyn ConnectionEvents,
    retry: &mut Retry,
) -> Result<(), Status> {
    let mut stream = registry.watch_connections().await?;
    retry.succeeded();
    let mut snapshot = Some(HashMap::new());
    while let Some(ev) = stream.next().await.transpose()? {
        match ev.kind() {
            Kind::Upsert => {
                let Some(end) = ev.connection.as_ref().and_then(ended) else {
                    continue;
                };
                match &mut snapshot {
                    Some(m) => {
                        m.insert(ev.id, end);
                    }
                    None => shared.conn_ended(ev.id, end),
                }
            }
            Kind::Removed => match &mut snapshot {
                Some(m) => {
                    m.remove(&ev.id);
                }
                None => shared.apply(|q| q.conn_forgotten(ev.id)),
            },
            Kind::SnapshotEnd => {
                if let Some(m) = snapshot.take() {
                    shared.apply(|q| q.replace_ended(m));
                    shared.registry_connected.store(true, Ordering::Relaxed);
                }
            }
            Kind::Reset => snapshot = Some(HashMap::new()),
            Kind::Unspecified => {}
        }
    }
    Ok(())
}
