//! Connecting to an Interpose gRPC server as a client, with the bearer token attached to
//! every call when one is configured.

use std::time::Duration;

use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

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
    /// The URL names a scheme other than `http` (or `https`, not served yet).
    #[error(
        "unsupported scheme {scheme}:// in server URL {url:?}: Interpose gRPC servers speak \
         http://HOST:PORT"
    )]
    UnsupportedScheme { url: String, scheme: String },
    /// `https://`: the management API does not serve TLS yet.
    #[error(
        "server URL {0:?}: TLS to the management API (https://) is not supported yet; use \
         http://HOST:PORT (with a token beyond loopback)"
    )]
    TlsNotSupported(String),
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
    /// The URL to connect to, always `http://...`.
    pub url: String,
    /// True when the user gave no scheme and `http://` was assumed.
    pub scheme_added: bool,
}

/// Checks the scheme of a server address: none means `http://`, `http://` is kept, `https://`
/// and every other scheme are refused with an error that says why.
pub fn server_url(given: &str) -> Result<ServerUrl, ClientError> {
    let given = given.trim();
    match given.split_once("://") {
        None => Ok(ServerUrl {
            url: format!("http://{given}"),
            scheme_added: true,
        }),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => Ok(ServerUrl {
            url: given.to_string(),
            scheme_added: false,
        }),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            Err(ClientError::TlsNotSupported(given.to_string()))
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

/// An endpoint for `url` with the project's connection settings.
pub fn endpoint(url: &str) -> Result<Endpoint, ClientError> {
    Endpoint::from_shared(url.to_string())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
        })
        .map_err(|source| ClientError::BadUrl {
            url: url.to_string(),
            source,
        })
}

/// Connects now; fails when nothing answers at `url`.
pub async fn connect(url: &str, token: Option<&str>) -> Result<AuthChannel, ClientError> {
    let injector = TokenInjector::new(token)?;
    let channel = endpoint(url)?
        .connect()
        .await
        .map_err(|source| ClientError::Unreachable {
            url: url.to_string(),
            source,
        })?;
    Ok(InterceptedService::new(channel, injector))
}

/// A channel that connects on first use and reconnects after failures: for long-lived
/// clients (a proxy reporting to its registry) that must start before the server is up.
pub fn connect_lazy(url: &str, token: Option<&str>) -> Result<AuthChannel, ClientError> {
    let injector = TokenInjector::new(token)?;
    Ok(InterceptedService::new(
        endpoint(url)?.connect_lazy(),
        injector,
    ))
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
        assert!(matches!(
            server_url("https://h:1"),
            Err(ClientError::TlsNotSupported(_))
        ));
        match server_url("ftp://h:1") {
            Err(e @ ClientError::UnsupportedScheme { .. }) => {
                assert!(e.to_string().contains("ftp://"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
