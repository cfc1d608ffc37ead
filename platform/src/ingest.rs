//! Where a proxy's ingest stream goes. The reporter writes to an [`IngestSink`]: a standalone
//! proxy's is the registry over gRPC (`Registry.Ingest`), while `interpose up` hands batches
//! to the registry in its own process, which saves encoding, two socket copies and decoding
//! per recorded byte. Batches, acknowledgements and errors are the same either way. With
//! several registry-svc replicas of one registry, [`Replicas`] streams to one at a time and
//! moves to the next when a stream fails.
//!
//! A stream carries [`Batch`]es, shared: the reporter keeps each batch until it is
//! acknowledged (to replay it on the next stream if this one breaks), so sending it hands
//! over a reference, and gRPC encodes it in place ([`proto::codec::SharedCodec`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{GrpcMethod, Status};

use proto::registry::{IngestAck, IngestRequest, registry_client::RegistryClient};

use crate::{client::AuthChannel, failover::Replicas};

/// One ingest batch as a stream carries it: shared with the sender, who keeps it until it is
/// acknowledged.
pub type Batch = Arc<IngestRequest>;

/// The acknowledgements of one ingest stream, ending with the error that ended it, if any.
pub type Acks = Pin<Box<dyn Stream<Item = Result<IngestAck, Status>> + Send>>;

/// Opening an ingest stream, as a future.
pub type Opening = Pin<Box<dyn Future<Output = Result<Acks, Status>> + Send>>;

/// A registry that takes ingest streams.
pub trait IngestSink: Send + Sync {
    /// Opens one ingest stream fed by `batches`.
    fn open(&self, batches: ReceiverStream<Batch>) -> Opening;

    /// Where the next stream goes, for logs.
    fn target(&self) -> String {
        "the registry".to_string()
    }

    /// How many registries the sink moves between: a reporter backs off only once a stream
    /// to each has failed in a row.
    fn replicas(&self) -> usize {
        1
    }

    /// The last stream failed: the next one goes to the next registry, if there is another.
    fn next(&self) {}
}

/// `Registry.Ingest` on `channel`, encoding each shared batch in place (the generated
/// client's `ingest` takes owned requests, which would mean a copy of each batch).
fn ingest(channel: AuthChannel, batches: ReceiverStream<Batch>) -> Opening {
    Box::pin(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| {
            let e: tonic::codegen::StdError = e.into();
            Status::unknown(format!("Service was not ready: {e}"))
        })?;
        let path = http::uri::PathAndQuery::from_static("/interpose.registry.v1.Registry/Ingest");
        let mut req = tonic::Request::new(batches);
        req.extensions_mut()
            .insert(GrpcMethod::new("interpose.registry.v1.Registry", "Ingest"));
        let codec = proto::codec::SharedCodec::<IngestRequest, IngestAck>::default();
        let acks = grpc.streaming(req, path, codec).await?.into_inner();
        Ok(Box::pin(acks) as Acks)
    })
}

/// A client of one registry; tests use it. Each batch is copied into the generated client's
/// request (it takes owned requests): [`Replicas`] is the sink that sends without copying.
impl IngestSink for RegistryClient<AuthChannel> {
    fn open(&self, batches: ReceiverStream<Batch>) -> Opening {
        let mut client = self.clone();
        Box::pin(async move {
            let owned = batches.map(Arc::unwrap_or_clone);
            let acks = client.ingest(owned).await?.into_inner();
            Ok(Box::pin(acks) as Acks)
        })
    }
}

impl IngestSink for Replicas {
    fn open(&self, batches: ReceiverStream<Batch>) -> Opening {
        let (index, channel) = self.channel();
        self.streaming.store(index, Relaxed);
        ingest(channel, batches)
    }

    fn target(&self) -> String {
        self.url(self.channel().0).to_string()
    }

    fn replicas(&self) -> usize {
        self.count()
    }

    fn next(&self) {
        self.advance(self.streaming.load(Relaxed));
    }
}
