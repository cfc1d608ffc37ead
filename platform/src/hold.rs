//! Where a proxy's holds go. The proxy's holder follows the intercept configuration and
//! holds packets through a [`HoldSink`]: a standalone proxy's is intercept-svc over gRPC,
//! while `interpose up` hands holds to the intercept queue in its own process, so that a
//! hold crosses no socket and no HTTP/2 connection (whose keepalive or cancellation a loaded
//! machine could trip). Configurations, verdicts and errors are the same either way.

use std::{future::Future, pin::Pin};

use tokio_stream::Stream;
use tonic::Status;

use proto::intercept::{
    HoldRequest, InterceptConfig, Verdict, WatchConfigRequest, intercept_client::InterceptClient,
};

use crate::client::AuthChannel;

/// The configurations a proxy follows: the current one, then each change.
pub type ConfigStream = Pin<Box<dyn Stream<Item = Result<InterceptConfig, Status>> + Send>>;

/// A call in flight, as a future.
pub type Call<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send>>;

/// An intercept queue that follows-and-holds, as `Intercept.WatchConfig` and `Intercept.Hold`.
pub trait HoldSink: Send + Sync {
    /// Opens the configuration stream.
    fn watch_config(&self) -> Call<ConfigStream>;

    /// Holds one packet until its verdict.
    fn hold(&self, req: HoldRequest) -> Call<Verdict>;
}

impl HoldSink for InterceptClient<AuthChannel> {
    fn watch_config(&self) -> Call<ConfigStream> {
        let mut client = self.clone();
        Box::pin(async move {
            let stream = InterceptClient::watch_config(&mut client, WatchConfigRequest {})
                .await?
                .into_inner();
            Ok(Box::pin(stream) as ConfigStream)
        })
    }

    fn hold(&self, req: HoldRequest) -> Call<Verdict> {
        let mut client = self.clone();
        Box::pin(async move { Ok(InterceptClient::hold(&mut client, req).await?.into_inner()) })
    }
}
