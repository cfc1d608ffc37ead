//! The registry in the proxy's own process (`interpose up`): the proxy's four calls to it,
//! the ingest stream, ID leases and a replay's reads of the original's record and history,
//! made by calling the registry's service directly, with no socket, no HTTP/2 and no
//! encoding between. Answers and errors are the service's own, as over gRPC; only the
//! token check (of callers from outside the process) is not there to pass.

use std::sync::Arc;

use platform::ingest::IngestSink;
use proto::{
    common::Connection,
    registry::{
        GetConnectionRequest, LeaseIdsRequest, SearchHistoryRequest, SearchHistoryResponse,
        registry_server::Registry,
    },
};
use tonic::Request;

use crate::{
    ids::{self, LeaseFailed, Leases, Leasing},
    replay::source::{self, Originals, Read},
};

/// A registry in the proxy's own process: where its ingest stream goes, its IDs come from
/// and its replays read originals.
#[derive(Clone)]
pub struct LocalRegistry {
    /// The ingest stream's sink.
    pub ingest: Arc<dyn IngestSink>,
    /// Where ID blocks are leased.
    pub leases: Arc<dyn Leases>,
    /// Where replays read the original's record and history.
    pub originals: Arc<dyn Originals>,
}

impl LocalRegistry {
    /// The registry service `service` (the value `registry_svc::service` returns), called
    /// directly for each of the proxy's calls.
    pub fn new<R: Registry + IngestSink>(service: Arc<R>) -> Self {
        let direct = Arc::new(Direct(service.clone()));
        Self {
            ingest: service,
            leases: direct.clone(),
            originals: direct,
        }
    }
}

impl std::fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalRegistry")
    }
}

/// What leases name as where they went (for logs).
const HERE: &str = "the registry in this process";

/// The registry service, called as the generated gRPC server would call it.
struct Direct<R>(Arc<R>);

impl<R: Registry> Leases for Direct<R> {
    fn lease_ids(&self, req: LeaseIdsRequest) -> Leasing<'_> {
        Box::pin(async move {
            ids::bounded(self.0.lease_ids(Request::new(req)))
                .await
                .map_err(|status| LeaseFailed {
                    from: HERE.to_string(),
                    status,
                })
        })
    }
}

impl<R: Registry> Originals for Direct<R> {
    fn get_connection(&self, id: u64) -> Read<'_, Connection> {
        let req = Request::new(GetConnectionRequest { id });
        Box::pin(source::bounded("record", self.0.get_connection(req)))
    }

    fn search_history(&self, req: SearchHistoryRequest) -> Read<'_, SearchHistoryResponse> {
        let req = Request::new(req);
        Box::pin(source::bounded("history", self.0.search_history(req)))
    }
}
