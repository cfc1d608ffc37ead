//! The `interpose.replay.v1.Replay` gRPC service of one proxy. It may be added to a server
//! before the proxy runs (`interpose up` starts its API first): calls made before
//! [`ReplayHandle::set`] are answered UNAVAILABLE.

use std::sync::{Arc, OnceLock};

use proto::replay::{
    ReplayEvent, ReplayRequest,
    replay_server::{Replay, ReplayServer},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Replayer;

/// Serves the replays of one proxy.
#[derive(Clone)]
pub struct ReplayService {
    replayer: Arc<OnceLock<Arc<Replayer>>>,
}

/// Gives a [`ReplayService`] its proxy once that runs.
#[derive(Clone)]
pub struct ReplayHandle(Arc<OnceLock<Arc<Replayer>>>);

impl ReplayHandle {
    /// The proxy the service replays through (the first one set stays).
    pub fn set(&self, replayer: Arc<Replayer>) {
        let _ = self.0.set(replayer);
    }
}

impl ReplayService {
    /// The service for a running proxy.
    pub fn server(replayer: Arc<Replayer>) -> ReplayServer<Self> {
        let (server, handle) = Self::late();
        handle.set(replayer);
        server
    }

    /// The service, and the handle that gives it its proxy later.
    pub fn late() -> (ReplayServer<Self>, ReplayHandle) {
        let cell = Arc::new(OnceLock::new());
        (
            ReplayServer::new(Self {
                replayer: cell.clone(),
            }),
            ReplayHandle(cell),
        )
    }
}

#[tonic::async_trait]
impl Replay for ReplayService {
    type ReplayConnectionStream = ReceiverStream<Result<ReplayEvent, Status>>;

    async fn replay_connection(
        &self,
        request: Request<ReplayRequest>,
    ) -> Result<Response<Self::ReplayConnectionStream>, Status> {
        let replayer = self
            .replayer
            .get()
            .ok_or_else(|| Status::unavailable("the proxy is not serving yet"))?;
        let rx = replayer.start(request.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
