//! The gRPC face of the exporter: checks a request, then streams the run's chunks.

use proto::export::{ExportChunk, ExportRequest, export_server::Export};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    job::{self, Registry},
    plan::Plan,
};

/// The `interpose.export.v1.Export` service, reading from one registry.
#[derive(Clone)]
pub struct ExportService {
    registry: Registry,
}

impl ExportService {
    /// A service reading through `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

#[tonic::async_trait]
impl Export for ExportService {
    type ExportCaptureStream = ReceiverStream<Result<ExportChunk, Status>>;

    async fn export_capture(
        &self,
        req: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportCaptureStream>, Status> {
        let plan = Plan::from_request(req.into_inner())?;
        // Two chunks in flight: the run waits for a slow reader instead of buffering.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(job::run(self.registry.clone(), plan, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
