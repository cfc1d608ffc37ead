//! Where a proxy's ingest stream goes. The reporter writes to an [`IngestSink`]: a standalone
//! proxy's is the registry over gRPC (`Registry.Ingest`), while `interpose up` hands batches
//! to the registry in its own process, which saves encoding, two socket copies and decoding
//! per recorded byte. Batches, acknowledgements and errors are the same either way. With
//! several registry-svc replicas of one registry, [`Replicas`] streams to one at a time and
//! moves to the next when a stream fails.

use std::{future::Future, pin::Pin, sync::atomic::Ordering::Relaxed};

use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::Status;

use crate::{
    client::AuthChannel,
    failover::Replicas,
    registry::{IngestAck, IngestRequest, registry_client::RegistryClient},
};

/// The acknowledgements of one ingest stream, ending with the error that ended it, if any.
pub type Acks = Pin<Box<dyn Stream<Item = Result<IngestAck, Status>> + Send>>;

/// Opening an ingest stream, as a future.
pub type Opening = Pin<Box<dyn Future<Output = Result<Acks, Status>> + Send>>;

/// A registry that takes ingest streams.
pub trait IngestSink: Send + Sync {
    /// Opens one ingest stream fed by `batches`.
    fn open(&self, batches: ReceiverStream<IngestRequest>) -> Opening;

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

impl IngestSink for RegistryClient<AuthChannel> {
    fn open(&self, batches: ReceiverStream<IngestRequest>) -> Opening {
        let mut client = self.clone();
        Box::pin(async move {
            let acks = client.ingest(batches).await?.into_inner();
            Ok(Box::pin(acks) as Acks)
        })
    }
}

impl IngestSink for Replicas {
    fn open(&self, batches: ReceiverStream<IngestRequest>) -> Opening {
        let (index, channel) = self.channel();
        self.streaming.store(index, Relaxed);
        RegistryClient::new(channel).open(batches)
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
