//! The gRPC face of the registry: maps requests onto [`State`] and store errors onto gRPC
//! status codes.

use std::sync::Arc;

use platform::{
    ingest::{Acks, Batch, IngestSink, Opening},
    serve::Drain,
};
use proto::{
    common::{Connection, Direction},
    registry::{self as pb, IngestAck, IngestRequest, WatchEvent, registry_server::Registry},
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    backend::StoreError,
    follow::follow,
    ingest::Pipeline,
    liveness::Liveness,
    state::{HistoryQuery, State},
};

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => Status::not_found(e.to_string()),
            StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
            StoreError::Sled(_)
            | StoreError::History(_)
            | StoreError::Corrupt { .. }
            | StoreError::CorruptFrame { .. }
            | StoreError::Task(_) => Status::internal(e.to_string()),
            // Another replica may serve the call: the client retries there.
            StoreError::Database { .. } => Status::unavailable(e.to_string()),
        }
    }
}

/// The `interpose.registry.v1.Registry` service.
#[derive(Clone)]
pub struct RegistryService {
    state: Arc<State>,
    ingest: Arc<Pipeline>,
    liveness: Arc<Liveness>,
    drain: Drain,
}

impl RegistryService {
    /// A service over `state`, ingesting through `ingest`, tracking the reporting nodes with
    /// `liveness`, whose streams end when `drain` fires.
    pub fn new(
        state: Arc<State>,
        ingest: Arc<Pipeline>,
        liveness: Arc<Liveness>,
        drain: Drain,
    ) -> Self {
        Self {
            state,
            ingest,
            liveness,
            drain,
        }
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// The ingest stream of a proxy in this same process (`interpose up`): batches go to the
/// writer as a gRPC stream's would, with no encoding or socket between. The writer takes
/// each batch by value and the proxy keeps its own until acknowledged (for a replay), so
/// this is where a batch is copied (its payloads are `Bytes`: shared, not copied).
impl IngestSink for RegistryService {
    fn open(&self, batches: ReceiverStream<Batch>) -> Opening {
        let acks = self.serve_ingest(batches.map(|b| Ok(Arc::unwrap_or_clone(b))));
        Box::pin(async move { Ok(Box::pin(acks) as Acks) })
    }
}

impl RegistryService {
    /// Serves one ingest stream (see [`Pipeline::serve`]); its acknowledgements.
    fn serve_ingest(
        &self,
        batches: impl tokio_stream::Stream<Item = Result<IngestRequest, Status>>
        + Unpin
        + Send
        + 'static,
    ) -> Stream<IngestAck> {
        let (tx, rx) = mpsc::channel(16);
        let (pipeline, liveness, drain) = (
            self.ingest.clone(),
            self.liveness.clone(),
            self.drain.clone(),
        );
        tokio::spawn(async move {
            pipeline.serve(liveness, batches, tx, drain).await;
        });
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    type IngestStream = Stream<IngestAck>;

    async fn ingest(
        &self,
        req: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        Ok(Response::new(self.serve_ingest(req.into_inner())))
    }

    async fn lease_ids(
        &self,
        req: Request<pb::LeaseIdsRequest>,
    ) -> Result<Response<pb::LeaseIdsResponse>, Status> {
        let req = req.into_inner();
        let count = req.count;
        let (first, last) = self.state.blocking(move |s| s.lease(count)).await?;
        tracing::debug!(node = %req.node, first, last, "leased connection IDs");
        Ok(Response::new(pb::LeaseIdsResponse { first, last }))
    }

    async fn list_connections(
        &self,
        req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let req = req.into_inner();
        let page = self
            .state
            .blocking(move |s| {
                s.list(
                    &req.filter.unwrap_or_default(),
                    req.page_size as usize,
                    &req.page_token,
                    req.newest_first,
                )
            })
            .await?;
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: page.items,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn get_connection(
        &self,
        req: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<Connection>, Status> {
        let id = req.into_inner().id;
        Ok(Response::new(
            self.state.blocking(move |s| s.get(id)).await?,
        ))
    }

    type WatchConnectionsStream = Stream<WatchEvent>;

    async fn watch_connections(
        &self,
        req: Request<pb::WatchConnectionsRequest>,
    ) -> Result<Response<Self::WatchConnectionsStream>, Status> {
        let (tx, rx) = mpsc::channel(256);
        let req = req.into_inner();
        let filter = req.filter.unwrap_or_default();
        tokio::spawn(crate::watcher::watch(
            self.state.clone(),
            filter,
            req.start_id,
            tx,
            self.drain.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn clear_connections(
        &self,
        req: Request<pb::ClearConnectionsRequest>,
    ) -> Result<Response<pb::ClearConnectionsResponse>, Status> {
        let ids = req.into_inner().ids;
        let cleared = self.state.blocking(move |s| s.clear(&ids)).await?;
        Ok(Response::new(pb::ClearConnectionsResponse { cleared }))
    }

    async fn purge_history(
        &self,
        req: Request<pb::PurgeHistoryRequest>,
    ) -> Result<Response<pb::PurgeHistoryResponse>, Status> {
        let what = crate::backend::sled_store::Purge::from_request(&req.into_inner())?;
        let p = self.state.blocking(move |s| s.store.purge(&what)).await?;
        Ok(Response::new(pb::PurgeHistoryResponse {
            packets: p.packets,
            bytes: p.bytes,
            freed_bytes: p.freed_bytes,
        }))
    }

    async fn clear_all(
        &self,
        _req: Request<pb::ClearAllRequest>,
    ) -> Result<Response<pb::ClearAllResponse>, Status> {
        let cleared = self.state.blocking(|s| s.clear_all()).await?;
        Ok(Response::new(pb::ClearAllResponse { cleared }))
    }

    async fn search_history(
        &self,
        req: Request<pb::SearchHistoryRequest>,
    ) -> Result<Response<pb::SearchHistoryResponse>, Status> {
        let req = req.into_inner();
        let direction = match Direction::try_from(req.direction) {
            Ok(Direction::Unspecified) => None,
            Ok(d) => Some(d),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown direction {}",
                    req.direction
                )));
            }
        };
        let q = HistoryQuery {
            conn_id: req.conn_id,
            direction,
            contains: req.contains,
            page_size: req.page_size as usize,
            page_token: req.page_token,
            upto: None,
        };
        let page = self.state.blocking(move |s| s.history(&q)).await?;
        Ok(Response::new(pb::SearchHistoryResponse {
            packets: page.items,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    type FollowHistoryStream = Stream<pb::FollowHistoryEvent>;

    async fn follow_history(
        &self,
        req: Request<pb::FollowHistoryRequest>,
    ) -> Result<Response<Self::FollowHistoryStream>, Status> {
        // A few events in flight: a slow follower makes the reader wait, not buffer.
        let (tx, rx) = mpsc::channel(64);
        let req = req.into_inner();
        tokio::spawn(follow(self.state.clone(), req, tx, self.drain.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn connection_stats(
        &self,
        req: Request<pb::ConnectionStatsRequest>,
    ) -> Result<Response<pb::ConnectionStatsResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        Ok(Response::new(
            self.state.blocking(move |s| s.stats(&filter)).await?,
        ))
    }
}
