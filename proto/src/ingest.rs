//! Where a proxy's ingest stream goes. The reporter writes to an [`IngestSink`]: a standalone
//! proxy's is the registry over gRPC (`Registry.Ingest`), while `interpose up` hands batches
//! to the registry in its own process, which saves encoding, two socket copies and decoding
//! per recorded byte. Batches, acknowledgements and errors are the same either way.

use std::{future::Future, pin::Pin};

use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::Status;

use crate::{
    client::AuthChannel,
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
