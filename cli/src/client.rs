//! Connecting the client subcommands to the server, and turning gRPC failures into one
//! clear line.

use anyhow::anyhow;
use platform::client::AuthChannel;
use proto::registry::registry_client::RegistryClient;
use tonic::{Code, Status};

use crate::ServerArgs;

/// Largest response a client subcommand accepts.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The data directory whose recorded server, token and client certificate a client uses:
/// `--data-dir` (or `INTERPOSE_DATA_DIR`), else the one `interpose up` uses by default.
pub fn data_dir(args: &ServerArgs) -> Option<std::path::PathBuf> {
    proxy_core::cli::data_dir(args.data_dir.clone()).ok()
}

/// The token to send to `url` (the server URL as connected to, scheme included): see
/// [`platform::token::for_client`], with the data directory of [`data_dir`].
pub(crate) fn token(
    args: &ServerArgs,
    url: &str,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    Ok(platform::token::for_client(
        args.token.clone(),
        args.token_file.as_deref(),
        url,
        dir,
    )?)
}

/// The server to talk to: `--server` when given. Otherwise, with `--data-dir`, the URL
/// `interpose up --data-dir DIR` recorded there (so that directory alone reaches it);
/// without, the default URL, or the `https://` URL of the same address when
/// `interpose up --grpc-tls` recorded that in the default data directory (so a local
/// `up --grpc-tls` needs no flags, as without TLS).
pub(crate) fn server_to_use(
    args: &ServerArgs,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    if let Some(given) = &args.server {
        return Ok(given.clone());
    }
    let recorded = dir
        .and_then(|d| std::fs::read_to_string(d.join(platform::token::SERVER_FILE)).ok())
        .map(|r| r.trim().trim_end_matches('/').to_string())
        .unwrap_or_default();
    if let Some(given_dir) = &args.data_dir {
        anyhow::ensure!(
            !recorded.is_empty(),
            "no server recorded in {}: has `interpose up --data-dir {}` run? (or pass --server)",
            given_dir.join(platform::token::SERVER_FILE).display(),
            given_dir.display()
        );
        return Ok(recorded);
    }
    let tls_default = platform::token::DEFAULT_SERVER.replacen("http://", "https://", 1);
    if recorded == tls_default {
        Ok(tls_default)
    } else {
        Ok(platform::token::DEFAULT_SERVER.to_string())
    }
}

/// For an `https://` server: installs the client's TLS configuration, from the given files,
/// else from the data directory's `mtls` folder when the server is its own.
fn install_tls(args: &ServerArgs, url: &str, dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    if !platform::client::is_https(url) {
        return Ok(());
    }
    let own = dir.filter(|d| platform::token::belongs_to(url, d));
    platform::mtls::ClientTlsArgs {
        client_cert: args.client_cert.clone(),
        client_key: args.client_key.clone(),
        ca_cert: args.ca_cert.clone(),
    }
    .install(own)?;
    Ok(())
}

/// [`install_tls`] for `url`, with the data directory of [`data_dir`].
pub(crate) fn install_tls_for(args: &ServerArgs, url: &str) -> anyhow::Result<()> {
    install_tls(args, url, data_dir(args).as_deref())
}

/// Connects to the server's channel.
pub async fn channel(args: &ServerArgs) -> anyhow::Result<AuthChannel> {
    let dir = data_dir(args);
    let given = server_to_use(args, dir.as_deref())?;
    let server = platform::client::server_url(&given)?;
    if server.scheme_added {
        eprintln!(
            "interpose: note: --server {given:?} has no scheme; using {}",
            server.url
        );
    }
    let token = token(args, &server.url, dir.as_deref())?;
    install_tls(args, &server.url, dir.as_deref())?;
    platform::client::connect(&server.url, token.as_deref())
        .await
        .map_err(|e| match e {
            platform::client::ClientError::Unreachable { url, source } => {
                match platform::mtls::explain(&source) {
                    Some(tls) => anyhow!(tls),
                    None => anyhow!(
                        "cannot reach the Interpose server at {url} (is `interpose up` running? \
                         set --server or INTERPOSE_SERVER, or --data-dir to the one it uses)"
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
    if let Some(tls) = std::error::Error::source(&s).and_then(platform::mtls::explain) {
        return anyhow!(tls);
    }
    let msg = s.message();
    match s.code() {
        Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition => anyhow!("{msg}"),
        Code::Unauthenticated => anyhow!(
            "not authorised: {msg} (pass --token-file with the token= file of the server's \
             ready line, or --token)"
        ),
        Code::Unavailable if msg == platform::serve::SHUTTING_DOWN => {
            anyhow!("the server shut down")
        }
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
