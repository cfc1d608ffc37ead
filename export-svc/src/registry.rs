//! What the exporter reads from the registry: records, history pages and the history as it
//! grows, the four calls of [`RegistryReads`]. A standalone export-svc reads the registry's
//! replicas over gRPC ([`Replicas`]: each read goes on to the next replica when one fails,
//! and a live export resumes on the next one); in `interpose up` the exporter calls the
//! registry service in its own process directly ([`Direct`]), with no socket, no HTTP/2 and
//! no encoding between.

use std::{future::Future, pin::Pin, sync::Arc};

use platform::{client::AuthChannel, failover::Replicas};
use proto::{
    common::Connection,
    registry::{
        FollowHistoryEvent, FollowHistoryRequest, GetConnectionRequest, ListConnectionsRequest,
        ListConnectionsResponse, SearchHistoryRequest, SearchHistoryResponse,
        registry_client::RegistryClient, registry_server::Registry,
    },
};
use tokio_stream::Stream;
use tonic::{Request, Status};

/// One call in flight.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'a>>;

/// The history as `FollowHistory` delivers it; an error ends it.
pub type HistoryEvents = Pin<Box<dyn Stream<Item = Result<FollowHistoryEvent, Status>> + Send>>;

/// An open `FollowHistory` stream and the replica it is on (to report its failure).
pub struct Followed {
    /// The events.
    pub events: HistoryEvents,
    /// The replica it is on (always 0 with one registry).
    pub replica: usize,
}

/// The registry as the exporter reads it.
pub trait RegistryReads: Send + Sync {
    /// The record of connection `id`.
    fn get_connection(&self, id: u64) -> Call<'_, Connection>;

    /// One page of records.
    fn list_connections(&self, req: ListConnectionsRequest) -> Call<'_, ListConnectionsResponse>;

    /// One page of history.
    fn search_history(&self, req: SearchHistoryRequest) -> Call<'_, SearchHistoryResponse>;

    /// Opens `FollowHistory` on the current registry.
    fn follow_history(&self, req: FollowHistoryRequest) -> Call<'_, Followed>;

    /// How many registries a live export may resume on.
    fn replicas(&self) -> usize {
        1
    }

    /// The stream on `replica` failed (`why`): the next registry becomes current.
    fn failed(&self, replica: usize, why: &Status) {
        let _ = (replica, why);
    }

    /// Where the next stream goes, for logs.
    fn target(&self) -> String {
        "the registry in this process".to_string()
    }
}

/// A client of `channel` that takes replies as large as export-svc reads.
fn client(channel: AuthChannel) -> RegistryClient<AuthChannel> {
    RegistryClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE)
        .max_encoding_message_size(crate::MAX_MESSAGE)
}

impl RegistryReads for Replicas {
    fn get_connection(&self, id: u64) -> Call<'_, Connection> {
        Box::pin(async move {
            let read = self.call(|channel| async move {
                client(channel)
                    .get_connection(GetConnectionRequest { id })
                    .await
            });
            Ok(read.await?.into_inner())
        })
    }

    fn list_connections(&self, req: ListConnectionsRequest) -> Call<'_, ListConnectionsResponse> {
        Box::pin(async move {
            let read = self.call(|channel| {
                let req = req.clone();
                async move { client(channel).list_connections(req).await }
            });
            Ok(read.await?.into_inner())
        })
    }

    fn search_history(&self, req: SearchHistoryRequest) -> Call<'_, SearchHistoryResponse> {
        Box::pin(async move {
            let read = self.call(|channel| {
                let req = req.clone();
                async move { client(channel).search_history(req).await }
            });
            Ok(read.await?.into_inner())
        })
    }

    fn follow_history(&self, req: FollowHistoryRequest) -> Call<'_, Followed> {
        let (replica, channel) = self.channel();
        Box::pin(async move {
            let events = client(channel).follow_history(req).await?.into_inner();
            Ok(Followed {
                events: Box::pin(events),
                replica,
            })
        })
    }

    fn replicas(&self) -> usize {
        self.count()
    }

    fn failed(&self, replica: usize, why: &Status) {
        Replicas::failed(self, replica, why);
    }

    fn target(&self) -> String {
        self.url(self.channel().0).to_string()
    }
}

/// The registry service in this same process (`interpose up`), called as the generated
/// gRPC server would call it.
pub struct Direct<R>(pub Arc<R>);

impl<R: Registry> RegistryReads for Direct<R> {
    fn get_connection(&self, id: u64) -> Call<'_, Connection> {
        Box::pin(async move {
            let req = Request::new(GetConnectionRequest { id });
            Ok(self.0.get_connection(req).await?.into_inner())
        })
    }

    fn list_connections(&self, req: ListConnectionsRequest) -> Call<'_, ListConnectionsResponse> {
        Box::pin(async move {
            Ok(self
                .0
                .list_connections(Request::new(req))
                .await?
                .into_inner())
        })
    }

    fn search_history(&self, req: SearchHistoryRequest) -> Call<'_, SearchHistoryResponse> {
        Box::pin(async move { Ok(self.0.search_history(Request::new(req)).await?.into_inner()) })
    }

    fn follow_history(&self, req: FollowHistoryRequest) -> Call<'_, Followed> {
        Box::pin(async move {
            let events = self.0.follow_history(Request::new(req)).await?.into_inner();
            Ok(Followed {
                events: Box::pin(events),
                replica: 0,
            })
        })
    }
}
