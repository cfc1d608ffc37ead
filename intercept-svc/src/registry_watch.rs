//! Following the registry's connection records with one `WatchConnections` stream, so every
//! held packet shows whether its connection is still open and, if not, who closed it. The
//! stream is reopened with backoff whenever the registry goes away.

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering, time::Duration};

use platform::{
    client::AuthChannel,
    failover::Replicas,
    retry::{Backoff, Retry},
};
use proto::{
    common::{ClosedBy, ConnStatus, Connection},
    registry::{WatchConnectionsRequest, registry_client::RegistryClient, watch_event::Kind},
};

use crate::{queue::Ended, service::InterceptState};

/// How the watch is reopened after the registry goes away.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Follows `registry` for as long as the task runs; with several replicas, a failed watch
/// reopens on the next at once, and backs off only once each has failed in a row.
pub async fn watch_registry(shared: Arc<InterceptState>, registry: Arc<Replicas>) {
    let mut retry = RETRY.start(registry.count());
    loop {
        let (index, channel) = registry.channel();
        match follow_once(&shared, channel, &mut retry).await {
            Ok(()) => tracing::warn!("registry ended its connection watch; reopening"),
            // A registry shutting down (this process's own, on SIGINT) is no failure to warn
            // about: the watch reopens if the registry comes back.
            Err(s) if s.message() == platform::serve::SHUTTING_DOWN => {
                tracing::debug!("registry connection watch: {}", s.message());
                registry.failed(index, &s);
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), "registry connection watch: {}", s.message());
                registry.failed(index, &s);
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
    channel: AuthChannel,
    retry: &mut Retry,
) -> Result<(), tonic::Status> {
    let mut stream = RegistryClient::new(channel)
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    retry.succeeded();
    let mut snapshot = Some(HashMap::new());
    while let Some(ev) = stream.message().await? {
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
