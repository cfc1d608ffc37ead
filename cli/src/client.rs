//! Connecting the client subcommands to the server, and turning gRPC failures into one
//! clear line.

use anyhow::anyhow;
use proto::{client::AuthChannel, registry::registry_client::RegistryClient};
use tonic::{Code, Status};

use crate::ServerArgs;

/// Largest response a client subcommand accepts.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The token to send to `url` (the server URL as connected to, scheme included): see
/// [`proto::token::for_client`]; the default data directory is the one `interpose up` uses
/// without `--data-dir`.
fn token(args: &ServerArgs, url: &str) -> anyhow::Result<Option<String>> {
    let default_dir = proxy_core::cli::data_dir(None).ok();
    Ok(proto::token::for_client(
        args.token.clone(),
        args.token_file.as_deref(),
        url,
        default_dir.as_deref(),
    )?)
}

/// Connects to the server's channel.
pub async fn channel(args: &ServerArgs) -> anyhow::Result<AuthChannel> {
    let server = proto::client::server_url(&args.server)?;
    if server.scheme_added {
        eprintln!(
            "interpose: note: --server {:?} has no scheme; using {}",
            args.server, server.url
        );
    }
    let token = token(args, &server.url)?;
    proto::client::connect(&server.url, token.as_deref())
        .await
        .map_err(|e| match e {
            proto::client::ClientError::Unreachable { url, .. } => anyhow!(
                "cannot reach the Interpose server at {url} (is `interpose up` running? \
                 set --server or INTERPOSE_SERVER)"
            ),
            other => other.into(),
        })
}

/// A registry client.
pub async fn registry(args: &ServerArgs) -> anyhow::Result<RegistryClient<AuthChannel>> {
    Ok(RegistryClient::new(channel(args).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// What a user sees when `--server` points at something that is not a gRPC server.
const NOT_GRPC: &str =
    "the server does not speak gRPC (HTTP/2): is --server an Interpose gRPC address?";

/// A gRPC failure as the one line a user should see.
pub fn status(s: Status) -> anyhow::Error {
    let msg = s.message();
    match s.code() {
        Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition => anyhow!("{msg}"),
        Code::Unauthenticated => anyhow!(
            "not authorised: {msg} (pass --token-file with the token= file of the server's \
             ready line, or --token)"
        ),
        Code::Unavailable if msg == proto::serve::SHUTTING_DOWN => anyhow!("the server shut down"),
        Code::Unavailable => anyhow!("server unavailable: {msg}"),
        Code::Unimplemented => anyhow!("the server does not offer this service: {msg}"),
        // What tonic reports when the peer is not an HTTP/2 gRPC server at all.
        Code::Internal if msg.starts_with("h2 protocol error") => anyhow!(NOT_GRPC),
        Code::Unknown if msg.contains("transport error") => anyhow!(NOT_GRPC),
        Code::Cancelled => anyhow!(
            "the server closed the connection without answering: is --server an Interpose \
             gRPC address?"
        ),
        code => anyhow!("{code:?}: {msg}"),
    }
}
