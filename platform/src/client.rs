//! Connecting to an Interpose gRPC server as a client, with the bearer token attached to
//! every call when one is configured, over TLS for `https://` URLs (see [`crate::mtls`]).

use std::time::Duration;

use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL does not parse.
    #[error("invalid server URL {url:?}: {source}")]
    BadUrl {
        url: String,
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as a header.
    #[error("the token must be printable ASCII")]
    BadToken,
    /// The URL names a scheme other than `http` or `https`.
    #[error(
        "unsupported scheme {scheme}:// in server URL {url:?}: Interpose gRPC servers speak \
         http://HOST:PORT, or https://HOST:PORT when started with --grpc-tls"
    )]
    UnsupportedScheme { url: String, scheme: String },
    /// `https://` without a CA certificate to verify the server with.
    #[error(
        "server URL {0:?} is https:// but no management CA certificate is known to verify it \
         with: pass --ca-cert (the server's DATA_DIR/mtls/ca-cert.pem) and --client-cert / \
         --client-key (from `interpose ca issue-client`)"
    )]
    NoTlsConfig(String),
    /// The host of an `https://` URL cannot be a TLS server name.
    #[error("server URL {0:?}: its host cannot be checked against a certificate")]
    BadServerName(String),
    /// An entry of a comma-separated URL list is empty.
    #[error(
        "empty URL in a comma-separated list (a doubled or trailing comma?): give each \
         replica's URL, e.g. http://10.0.0.1:50051,http://10.0.0.2:50051"
    )]
    EmptyListEntry,
    /// A URL list holds no URL at all.
    #[error("no server URL given")]
    NoUrl,
    /// Nothing answered at the URL.
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        url: String,
        source: tonic::transport::Error,
    },
}

/// A server address as a user typed it, made into the URL a client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// The URL to connect to, `http://...` or `https://...`.
    pub url: String,
    /// True when the user gave no scheme and `http://` was assumed.
    pub scheme_added: bool,
}

/// Checks the scheme of a server address: none means `http://`, `http://` and `https://`
/// are kept, every other scheme is refused with an error that says why.
pub fn server_url(given: &str) -> Result<ServerUrl, ClientError> {
    let given = given.trim();
    match given.split_once("://") {
        None => Ok(ServerUrl {
            url: format!("http://{given}"),
            scheme_added: true,
        }),
        Some((scheme, _))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            Ok(ServerUrl {
                url: given.to_string(),
                scheme_added: false,
            })
        }
        Some((scheme, _)) => Err(ClientError::UnsupportedScheme {
            url: given.to_string(),
            scheme: scheme.to_string(),
        }),
    }
}

/// Adds `authorization: Bearer TOKEN` to each call.
#[derive(Clone, Default)]
pub struct TokenInjector {
    header: Option<AsciiMetadataValue>,
}

impl TokenInjector {
    /// An injector for `token`; `None` or empty sends nothing.
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::BadToken)?,
            ),
            None => None,
        };
        Ok(Self { header })
    }
}

impl Interceptor for TokenInjector {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// A channel with the token attached: what every generated client is built on.
pub type AuthChannel = InterceptedService<Channel, TokenInjector>;

/// Whether `url` asks for TLS.
pub fn is_https(url: &str) -> bool {
    url.trim()
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("https"))
}

/// An endpoint for `url` with the project's connection settings. For an `https://` URL the
/// endpoint itself is plain (`http://` to the same authority): [`channel`] and
/// [`lazy_channel`] put TLS under it, so tonic's own TLS features are not needed.
pub fn endpoint(url: &str) -> Result<Endpoint, ClientError> {
    Ok(endpoint_without_keepalive(url)?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true))
}

/// Like [`endpoint`], but without HTTP/2 keepalive: a dead peer is noticed by TCP keepalive
/// alone (probes after 10 s idle, every 5 s, 6 unanswered), which the kernels answer, so a
/// loaded machine that is slow to run the server process never makes its calls fail. For
/// calls that must not fail for want of time while the server is alive (a proxy's holds).
pub fn endpoint_without_keepalive(url: &str) -> Result<Endpoint, ClientError> {
    let plain = match url.trim().split_once("://") {
        Some((_, rest)) if is_https(url) => format!("http://{rest}"),
        _ => url.to_string(),
    };
    Endpoint::from_shared(plain)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .tcp_keepalive(Some(Duration::from_secs(10)))
                .tcp_keepalive_interval(Some(Duration::from_secs(5)))
                .tcp_keepalive_retries(Some(6))
        })
        .map_err(|source| ClientError::BadUrl {
            url: url.to_string(),
            source,
        })
}

/// Connects now; fails when nothing answers at `url`.
pub async fn connect(url: &str, token: Option<&str>) -> Result<AuthChannel, ClientError> {
    let injector = TokenInjector::new(token)?;
    let channel = channel(url, endpoint(url)?).await?;
    Ok(InterceptedService::new(channel, injector))
}

/// A channel that connects on first use and reconnects after failures: for long-lived
/// clients (a proxy reporting to its registry) that must start before the server is up.
pub fn connect_lazy(url: &str, token: Option<&str>) -> Result<AuthChannel, ClientError> {
    let injector = TokenInjector::new(token)?;
    Ok(InterceptedService::new(
        lazy_channel(url, endpoint(url)?)?,
        injector,
    ))
}

/// Connects `endpoint` (made by [`endpoint`] from `url`) now, over TLS for an `https://` URL.
pub async fn channel(url: &str, endpoint: Endpoint) -> Result<Channel, ClientError> {
    let unreachable = |source| ClientError::Unreachable {
        url: url.to_string(),
        source,
    };
    match tls_connector(url)? {
        Some(tls) => endpoint.connect_with_connector(tls).await,
        None => endpoint.connect().await,
    }
    .map_err(unreachable)
}

/// [`channel`], connecting on first use.
pub fn lazy_channel(url: &str, endpoint: Endpoint) -> Result<Channel, ClientError> {
    Ok(match tls_connector(url)? {
        Some(tls) => endpoint.connect_with_connector_lazy(tls),
        None => endpoint.connect_lazy(),
    })
}

/// The TLS connector for an `https://` URL (with the process's installed configuration,
/// see [`crate::mtls::install_client`]); `None` for `http://`.
fn tls_connector(url: &str) -> Result<Option<TlsConnector>, ClientError> {
    if !is_https(url) {
        return Ok(None);
    }
    let config = crate::mtls::client().ok_or_else(|| ClientError::NoTlsConfig(url.to_string()))?;
    let bad_name = || ClientError::BadServerName(url.to_string());
    let uri: http::Uri = url.trim().parse().map_err(|_| bad_name())?;
    let host = uri.host().ok_or_else(bad_name)?.trim_matches(['[', ']']);
    let name = ServerName::try_from(host.to_string()).map_err(|_| bad_name())?;
    Ok(Some(TlsConnector { config, name }))
}

/// Opens a TCP connection to the endpoint's authority and runs the TLS handshake on it,
/// checking the server's certificate against the name in the user's `https://` URL.
#[derive(Clone)]
struct TlsConnector {
    config: std::sync::Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = self.name.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            // The same TCP keepalive a plain connection gets (see
            // [`endpoint_without_keepalive`]): a peer host that vanished is noticed.
            socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(10))
                    .with_interval(Duration::from_secs(5))
                    .with_retries(6),
            )?;
            let mut stream = tls.connect(name, tcp).await?;
            await_verdict(&mut stream).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// How long a new TLS connection waits for the server's first records; see [`await_verdict`].
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// In TLS 1.3 the client's handshake is done before the server has checked the client's
/// certificate. Waits for the server's first records (its session tickets and HTTP/2
/// settings, or an alert) and fails with the server's alert when it refused the certificate,
/// so that the refusal is the connection's error and not a later call's "connection closed".
/// The records are handed to rustls, which keeps their plaintext for the first read.
async fn await_verdict(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> std::io::Result<()> {
    let (tcp, conn) = stream.get_mut();
    let first = async {
        let mut buf = [0u8; 4096];
        loop {
            tcp.readable().await?;
            let n = match tcp.try_read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let mut records = &buf[..n];
            while !records.is_empty() {
                conn.read_tls(&mut records)?;
                conn.process_new_packets()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            }
            return Ok(());
        }
    };
    // A server that says nothing in time is left to the call to find out about.
    tokio::time::timeout(VERDICT_WAIT, first)
        .await
        .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_assumes_http_and_refuses_other_schemes() {
        assert_eq!(
            server_url("127.0.0.1:50051").ok(),
            Some(ServerUrl {
                url: "http://127.0.0.1:50051".into(),
                scheme_added: true
            })
        );
        assert_eq!(
            server_url("HTTP://[::1]:1").ok(),
            Some(ServerUrl {
                url: "HTTP://[::1]:1".into(),
                scheme_added: false
            })
        );
        assert_eq!(
            server_url("https://h:1").ok().map(|u| u.url),
            Some("https://h:1".into())
        );
        match server_url("ftp://h:1") {
            Err(e @ ClientError::UnsupportedScheme { .. }) => {
                assert!(e.to_string().contains("ftp://"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
