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
pub(crate) fn token(args: &ServerArgs, url: &str) -> anyhow::Result<Option<String>> {
    let default_dir = proxy_core::cli::data_dir(None).ok();
    Ok(proto::token::for_client(
        args.token.clone(),
        args.token_file.as_deref(),
        url,
        default_dir.as_deref(),
    )?)
}

/// The server to talk to: `--server`, except that the default URL means the `https://` URL
/// of the same address when `interpose up --grpc-tls` recorded that in the default data
/// directory (so a local `up --grpc-tls` needs no flags, as without TLS).
fn server_to_use(args: &ServerArgs, default_dir: Option<&std::path::Path>) -> String {
    let given = args.server.trim().trim_end_matches('/');
    if given != proto::token::DEFAULT_SERVER {
        return args.server.clone();
    }
    let tls_default = proto::token::DEFAULT_SERVER.replacen("http://", "https://", 1);
    let recorded = default_dir
        .and_then(|d| std::fs::read_to_string(d.join(proto::token::SERVER_FILE)).ok())
        .unwrap_or_default();
    if recorded.trim().trim_end_matches('/') == tls_default {
        tls_default
    } else {
        args.server.clone()
    }
}

/// For an `https://` server: installs the client's TLS configuration, from the given files,
/// else from the default data directory's `mtls` folder when the server is its own.
fn install_tls(
    args: &ServerArgs,
    url: &str,
    default_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if !proto::client::is_https(url) {
        return Ok(());
    }
    let own = default_dir.filter(|d| proto::token::belongs_to(url, d));
    proto::mtls::ClientTlsArgs {
        client_cert: args.client_cert.clone(),
        client_key: args.client_key.clone(),
        ca_cert: args.ca_cert.clone(),
    }
    .install(own)?;
    Ok(())
}

/// [`install_tls`] for `url`, with the default data directory `interpose up` uses.
pub(crate) fn install_tls_for(args: &ServerArgs, url: &str) -> anyhow::Result<()> {
    let default_dir = proxy_core::cli::data_dir(None).ok();
    install_tls(args, url, default_dir.as_deref())
}

/// Connects to the server's channel.
pub async fn channel(args: &ServerArgs) -> anyhow::Result<AuthChannel> {
    let default_dir = proxy_core::cli::data_dir(None).ok();
    let given = server_to_use(args, default_dir.as_deref());
    let server = proto::client::server_url(&given)?;
    if server.scheme_added {
        eprintln!(
            "interpose: note: --server {:?} has no scheme; using {}",
            args.server, server.url
        );
    }
    let token = token(args, &server.url)?;
    install_tls(args, &server.url, default_dir.as_deref())?;
    proto::client::connect(&server.url, token.as_deref())
        .await
        .map_err(|e| match e {
            proto::client::ClientError::Unreachable { url, source } => {
                match proto::mtls::explain(&source) {
                    Some(tls) => anyhow!(tls),
                    None => anyhow!(
                        "cannot reach the Interpose server at {url} (is `interpose up` running? \
                         set --server or INTERPOSE_SERVER)"
                    ),
                }
            }
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
const NOT_GRPC: &str = "the server does not speak gRPC (HTTP/2): is --server an Interpose gRPC \
     address? (a server started with --grpc-tls wants an https:// URL)";

/// A gRPC failure as the one line a user should see.
pub fn status(s: Status) -> anyhow::Error {
    if let Some(tls) = std::error::Error::source(&s).and_then(proto::mtls::explain) {
        return anyhow!(tls);
    }
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
             gRPC address? (a server started with --grpc-tls wants an https:// URL)"
        ),
        code => anyhow!("{code:?}: {msg}"),
    }
}
