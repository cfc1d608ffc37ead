//! TLS interception: detection, the project CA, leaf certificates, the upstream client, and
//! the [`Interceptor`] facade the relay calls.
//!
//! How the relay uses it:
//! 1. Read client bytes into a buffer and call [`detect::detect`] (or [`detect::could_be_tls`]
//!    on the first bytes of a later client-to-server read, for STARTTLS) until it says
//!    `ClientHello` or `NotTls`.
//! 2. On a ClientHello, ask [`Interceptor::passthrough`]; if it says no, call
//!    [`Interceptor::intercept`] with the client stream, the bytes already read, the parsed
//!    hello, the already-connected upstream stream and the [`Target`].
//! 3. `intercept` connects the upstream TLS leg first (client's SNI and ALPN offer), learns
//!    the server's ALPN choice, then completes the client handshake with a leaf for the SNI,
//!    else the target name, else the target IP, offering exactly the server's ALPN choice.
//!    On failure the [`InterceptError`] says who closed ([`InterceptError::closed_by`]) and
//!    why ([`InterceptError::reason`]); a failure of the upstream leg is reported to the
//!    client as a TLS alert first.
//!
//! Everything uses rustls with the ring provider only; [`install_provider`] makes it the
//! process default once.

pub mod args;
pub mod ca;
pub mod detect;
pub mod leaf;
pub mod pattern;
pub mod prefixed;
pub mod upstream;

#[cfg(test)]
mod tests;

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, CommonState, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub use args::TlsArgs;
pub use ca::{Ca, CaError};
pub use detect::{ClientHelloInfo, Detection, could_be_tls, detect};
pub use leaf::{LeafError, LeafIssuer, LeafName, LeafOptions};
pub use pattern::HostPattern;
pub use prefixed::PrefixedIo;
pub use upstream::{
    ClientCertSpec, ClientCertStatus, NssKeyLog, Upstream, UpstreamError, UpstreamOptions,
};

/// The client-facing TLS stream returned by [`Interceptor::intercept`].
pub type ClientTlsStream<C> = tokio_rustls::server::TlsStream<PrefixedIo<C>>;
/// The upstream TLS stream returned by [`Interceptor::intercept`].
pub type UpstreamTlsStream<U> = tokio_rustls::client::TlsStream<U>;

/// Installs rustls's ring provider as the process default, once (later calls do nothing;
/// a provider installed by someone else first is left alone).
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The ring crypto provider all of this module's configurations use (shared).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Where the client asked to go (the SOCKS CONNECT target), as the relay resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host name from the SOCKS request, if it was a name rather than an address.
    pub host: Option<String>,
    /// The IP address the relay connected to.
    pub ip: IpAddr,
    /// The port.
    pub port: u16,
}

/// Who ended a connection, as the record shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The application under test.
    Client,
    /// The real server.
    Server,
    /// The proxy itself.
    Proxy,
}

/// Facts about one leg of an intercepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegSummary {
    /// Protocol version, e.g. `TLSv1.3`.
    pub version: String,
    /// IANA name of the cipher suite, e.g. `TLS_AES_128_GCM_SHA256`.
    pub cipher_suite: String,
    /// Negotiated ALPN protocol, if any (lossy UTF-8).
    pub alpn: Option<String>,
}

/// What the record needs to know about an intercepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// The name (DNS name or IP) the client-facing leaf was issued for.
    pub leaf_name: String,
    /// Client <-> proxy.
    pub client: LegSummary,
    /// Proxy <-> server.
    pub upstream: LegSummary,
    /// Upstream certificate verification was off (`--upstream-insecure`).
    pub insecure: bool,
    /// Whether the upstream server asked for a client certificate.
    pub client_cert: ClientCertStatus,
}

/// Why an interception failed. [`InterceptError::closed_by`] and
/// [`InterceptError::reason`] give what the connection record needs.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The upstream server's certificate did not verify.
    #[error("upstream certificate rejected: {0}")]
    UpstreamCertificate(String),
    /// The upstream server demanded a client certificate and none was configured.
    #[error(
        "upstream server demanded a client certificate and none is configured for this host (--client-cert HOST=CERT,KEY): {0}"
    )]
    ServerDemandedClientCert(String),
    /// The upstream TLS handshake failed (protocol error, alert from the server, ...).
    #[error("upstream TLS handshake failed: {0}")]
    UpstreamHandshake(String),
    /// The upstream connection failed during the TLS handshake (reset, closed, ...).
    #[error("upstream connection failed during the TLS handshake: {0}")]
    UpstreamIo(io::Error),
    /// The upstream TLS handshake did not finish in time.
    #[error("upstream TLS handshake timed out after {0:?}")]
    UpstreamTimeout(Duration),
    /// No leaf certificate could be issued.
    #[error("issuing the proxy certificate failed: {0}")]
    Leaf(#[from] LeafError),
    /// The client refused the proxy's certificate (sent a certificate-related alert).
    #[error("client rejected certificate: {}", alert_text(*.0))]
    ClientRejectedCertificate(AlertDescription),
    /// The client aborted the handshake with another alert.
    #[error("client aborted the TLS handshake: {}", alert_text(*.0))]
    ClientAlert(AlertDescription),
    /// The client closed the connection during the handshake without an alert.
    #[error(
        "client closed the connection during the TLS handshake (it may not trust the proxy's certificate)"
    )]
    ClientClosed,
    /// The client connection failed during the handshake (reset, ...).
    #[error("client connection failed during the TLS handshake: {0}")]
    ClientIo(io::Error),
    /// The client's handshake was not acceptable (no common parameters, malformed, ...).
    #[error("client TLS handshake failed: {0}")]
    ClientHandshake(String),
    /// The client-facing handshake did not finish in time.
    #[error("client TLS handshake timed out after {0:?}")]
    ClientTimeout(Duration),
}

impl InterceptError {
    /// Which side the record should name as having ended the connection.
    pub fn closed_by(&self) -> ClosedBy {
        match self {
            InterceptError::ClientRejectedCertificate(_)
            | InterceptError::ClientAlert(_)
            | InterceptError::ClientClosed
            | InterceptError::ClientIo(_) => ClosedBy::Client,
            _ => ClosedBy::Proxy,
        }
    }

    /// The human reason for the record (the error's message).
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// Whether the failure was on the upstream leg (the client got an alert from us).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            InterceptError::UpstreamCertificate(_)
                | InterceptError::ServerDemandedClientCert(_)
                | InterceptError::UpstreamHandshake(_)
                | InterceptError::UpstreamIo(_)
                | InterceptError::UpstreamTimeout(_)
        )
    }
}

/// Text of a TLS alert for reasons: "unknown CA", "bad certificate", ...
pub fn alert_text(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::UnknownCA => "unknown CA".into(),
        AlertDescription::BadCertificate => "bad certificate".into(),
        AlertDescription::CertificateUnknown => "certificate unknown".into(),
        AlertDescription::UnsupportedCertificate => "unsupported certificate".into(),
        AlertDescription::CertificateExpired => "certificate expired".into(),
        AlertDescription::CertificateRevoked => "certificate revoked".into(),
        AlertDescription::AccessDenied => "access denied".into(),
        AlertDescription::HandshakeFailure => "handshake failure".into(),
        AlertDescription::DecryptError => "decrypt error".into(),
        AlertDescription::InternalError => "internal error".into(),
        AlertDescription::CertificateRequired => "certificate required".into(),
        AlertDescription::ProtocolVersion => "protocol version".into(),
        AlertDescription::IllegalParameter => "illegal parameter".into(),
        AlertDescription::NoApplicationProtocol => "no application protocol".into(),
        other => format!("{other:?}"),
    }
}

fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied
    )
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
}

/// The reason to record when reading or writing the upstream stream fails after a
/// successful interception. In TLS 1.3 a server that requires a client certificate accepts
/// the handshake and then sends an alert, so that case only shows here.
pub fn upstream_stream_error_reason(err: &io::Error, summary: &TlsSummary) -> String {
    match rustls_error(err) {
        Some(rustls::Error::AlertReceived(a))
            if summary.client_cert == ClientCertStatus::RequestedNoneAvailable =>
        {
            InterceptError::ServerDemandedClientCert(format!(
                "server sent alert {}",
                alert_text(*a)
            ))
            .to_string()
        }
        Some(e) => format!("upstream TLS error: {e}"),
        None => format!("upstream connection error: {err}"),
    }
}

/// Everything [`Interceptor::new`] needs besides the CA.
#[derive(Debug, Clone, Default)]
pub struct InterceptOptions {
    /// Trust and client certificates of the upstream leg.
    pub upstream: UpstreamOptions,
    /// Leaf cache bounds.
    pub leaves: LeafOptions,
    /// `--passthrough HOST` patterns: relayed without interception.
    pub passthrough: Vec<HostPattern>,
    /// `--keylog FILE`.
    pub keylog: Option<PathBuf>,
    /// Time limit for each leg's handshake (default 30 s when zero).
    pub handshake_timeout: Duration,
}

/// Errors of building an [`Interceptor`].
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Upstream trust, client certificates or the key-log file.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The leaf issuer.
    #[error(transparent)]
    Leaf(#[from] LeafError),
}

/// The result of a successful interception.
#[derive(Debug)]
pub struct Intercepted<C, U> {
    /// The decrypted client-facing stream.
    pub client: ClientTlsStream<C>,
    /// The decrypted upstream stream.
    pub upstream: UpstreamTlsStream<U>,
    /// What the record shows.
    pub summary: TlsSummary,
}

impl<C, U> Intercepted<C, U> {
    /// The certificate chain the upstream server presented (also in insecure mode).
    pub fn upstream_chain(&self) -> &[CertificateDer<'static>] {
        self.upstream.get_ref().1.peer_certificates().unwrap_or(&[])
    }
}

/// The facade the relay calls: owns the leaf issuer, the upstream configuration and the
/// passthrough list.
#[derive(Debug)]
pub struct Interceptor {
    leaves: LeafIssuer,
    upstream: Upstream,
    passthrough: Vec<HostPattern>,
    handshake_timeout: Duration,
}

fn version_text(v: Option<ProtocolVersion>) -> String {
    match v {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
        Some(other) => format!("{other:?}"),
        None => "unknown".into(),
    }
}

fn leg_summary(state: &CommonState) -> LegSummary {
    let cipher_suite = state
        .negotiated_cipher_suite()
        .map(|s| {
            let suite = s.suite();
            match suite.as_str() {
                Some(name) => match name.strip_prefix("TLS13_") {
                    Some(rest) => format!("TLS_{rest}"),
                    None => name.to_owned(),
                },
                None => format!("{suite:?}"),
            }
        })
        .unwrap_or_else(|| "unknown".into());
    LegSummary {
        version: version_text(state.protocol_version()),
        cipher_suite,
        alpn: state
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    }
}

/// Writes a plaintext fatal alert record (before any ServerHello this is what a TLS
/// server sends) and shuts the stream down; errors are ignored, it is best effort.
pub async fn send_alert<IO: AsyncWrite + Unpin>(io: &mut IO, alert: AlertDescription) {
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(alert)];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = io.write_all(&record).await;
        let _ = io.shutdown().await;
    })
    .await;
}

impl Interceptor {
    /// Builds the interceptor: loads upstream trust (system roots unless turned off), the
    /// client certificates and the key-log file, and creates the per-process leaf key.
    pub fn new(ca: Arc<Ca>, options: InterceptOptions) -> Result<Interceptor, SetupError> {
        install_provider();
        let provider = provider();
        let key_log: Option<Arc<dyn rustls::KeyLog>> = match &options.keylog {
            Some(path) => Some(Arc::new(NssKeyLog::open(path)?)),
            None => None,
        };
        let upstream = Upstream::new(&options.upstream, provider.clone(), key_log.clone())?;
        let leaves = LeafIssuer::new(ca, options.leaves.clone(), provider, key_log)?;
        Ok(Interceptor {
            leaves,
            upstream,
            passthrough: options.passthrough,
            handshake_timeout: if options.handshake_timeout.is_zero() {
                Duration::from_secs(30)
            } else {
                options.handshake_timeout
            },
        })
    }

    /// Whether this connection is to be relayed without interception (`--passthrough`):
    /// matches the SNI, the SOCKS target name and the target IP.
    pub fn passthrough(&self, sni: Option<&str>, target: &Target) -> bool {
        pattern::any_matches(
            &self.passthrough,
            &[sni, target.host.as_deref()],
            Some(target.ip),
        )
    }

    /// The CA leaves are signed with now.
    pub fn ca(&self) -> Arc<Ca> {
        self.leaves.ca()
    }

    /// Switches to a new CA (after `Ca::regenerate`) and drops the old CA's leaves.
    pub fn replace_ca(&self, ca: Arc<Ca>) {
        self.leaves.replace_ca(ca);
    }

    /// Re-reads the CA from its directory (e.g. after `interpose ca regenerate` in another
    /// process) and switches to it if the certificate changed. Returns whether it did.
    /// On error (say, a half-written CA) the current CA stays in use.
    pub fn reload_ca_if_changed(&self) -> Result<bool, CaError> {
        let current = self.leaves.ca();
        let on_disk = Ca::load(current.dir())?;
        if on_disk.cert_der() == current.cert_der() {
            return Ok(false);
        }
        tracing::info!(subject = %on_disk.subject(), "switching to the regenerated CA");
        self.leaves.replace_ca(Arc::new(on_disk));
        Ok(true)
    }

    /// Whether upstream verification is off.
    pub fn insecure(&self) -> bool {
        self.upstream.insecure()
    }

    /// The leaf issuer (for statistics or pre-warming).
    pub fn leaves(&self) -> &LeafIssuer {
        &self.leaves
    }

    /// Terminates TLS on both legs. `client_prefix` is every byte already read from
    /// `client_io` (at least the ClientHello `hello` was parsed from; may be empty if the
    /// relay only peeked); `upstream_io` is connected to `target`.
    ///
    /// The upstream handshake comes first (client's SNI, client's ALPN offer); then the
    /// client handshake with a leaf for SNI / target name / target IP and exactly the ALPN
    /// protocol the server chose. If the upstream leg fails, the client receives a TLS
    /// alert (handshake_failure, or internal_error for I/O trouble) before the error is
    /// returned.
    pub async fn intercept<C, U>(
        &self,
        mut client_io: C,
        client_prefix: Bytes,
        hello: &ClientHelloInfo,
        upstream_io: U,
        target: &Target,
    ) -> Result<Intercepted<C, U>, InterceptError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let sni = hello.sni.as_deref();
        // The name to verify the server against: SNI, else the SOCKS name, else the IP.
        let server_name: ServerName<'static> = sni
            .and_then(|s| ServerName::try_from(s.to_owned()).ok())
            .or_else(|| {
                target
                    .host
                    .as_ref()
                    .and_then(|h| ServerName::try_from(h.clone()).ok())
            })
            .unwrap_or_else(|| ServerName::IpAddress(target.ip.into()));
        let (cfg, probe) = self.upstream.connection_config(
            &[sni, target.host.as_deref()],
            Some(target.ip),
            hello.alpn.clone(),
            sni.is_some(),
        );
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let upstream = match tokio::time::timeout(
            self.handshake_timeout,
            connector.connect(server_name, upstream_io),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let err = classify_upstream(e, probe.status());
                let alert = match err {
                    InterceptError::UpstreamIo(_) => AlertDescription::InternalError,
                    _ => AlertDescription::HandshakeFailure,
                };
                send_alert(&mut client_io, alert).await;
                return Err(err);
            }
            Err(_) => {
                send_alert(&mut client_io, AlertDescription::InternalError).await;
                return Err(InterceptError::UpstreamTimeout(self.handshake_timeout));
            }
        };
        let chosen_alpn: Option<Vec<u8>> = upstream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);

        let leaf_name = sni
            .and_then(|s| LeafName::parse(s).ok())
            .or_else(|| target.host.as_deref().and_then(|h| LeafName::parse(h).ok()))
            .unwrap_or(LeafName::Ip(target.ip));
        let server_cfg = match self
            .leaves
            .server_config(&leaf_name, chosen_alpn.as_deref())
        {
            Ok(c) => c,
            Err(e) => {
                send_alert(&mut client_io, AlertDescription::InternalError).await;
                close_upstream(upstream).await;
                return Err(e.into());
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        let client_stream = PrefixedIo::new(client_io, client_prefix);
        let client = match tokio::time::timeout(
            self.handshake_timeout,
            acceptor.accept(client_stream),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                close_upstream(upstream).await;
                return Err(classify_client(e));
            }
            Err(_) => {
                close_upstream(upstream).await;
                return Err(InterceptError::ClientTimeout(self.handshake_timeout));
            }
        };
        let summary = TlsSummary {
            sni: hello.sni.clone(),
            leaf_name: leaf_name.to_string(),
            client: leg_summary(client.get_ref().1),
            upstream: leg_summary(upstream.get_ref().1),
            insecure: self.upstream.insecure(),
            client_cert: probe.status(),
        };
        Ok(Intercepted {
            client,
            upstream,
            summary,
        })
    }
}

async fn close_upstream<U: AsyncRead + AsyncWrite + Unpin>(mut upstream: UpstreamTlsStream<U>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), upstream.shutdown()).await;
}

fn classify_upstream(e: io::Error, client_cert: ClientCertStatus) -> InterceptError {
    match rustls_error(&e) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            InterceptError::UpstreamCertificate(certificate_error_text(c))
        }
        Some(rustls::Error::AlertReceived(a))
            if client_cert == ClientCertStatus::RequestedNoneAvailable =>
        {
            InterceptError::ServerDemandedClientCert(format!(
                "server sent alert {}",
                alert_text(*a)
            ))
        }
        Some(rustls::Error::AlertReceived(a)) => {
            InterceptError::UpstreamHandshake(format!("server sent alert {}", alert_text(*a)))
        }
        Some(other) => InterceptError::UpstreamHandshake(other.to_string()),
        None if client_cert == ClientCertStatus::RequestedNoneAvailable => {
            InterceptError::ServerDemandedClientCert(format!("server closed the connection ({e})"))
        }
        None => InterceptError::UpstreamIo(e),
    }
}

/// Human text for an upstream certificate problem.
fn certificate_error_text(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    match c {
        E::UnknownIssuer => "unknown issuer (not signed by a trusted CA)".into(),
        E::NotValidForName => "not valid for the server name".into(),
        E::Expired => "expired".into(),
        E::NotValidYet => "not valid yet".into(),
        E::BadSignature => "bad signature".into(),
        E::Revoked => "revoked".into(),
        E::BadEncoding => "malformed certificate".into(),
        other => rustls::Error::InvalidCertificate(other.clone())
            .to_string()
            .trim_start_matches("invalid peer certificate: ")
            .to_owned(),
    }
}

fn classify_client(e: io::Error) -> InterceptError {
    match rustls_error(&e) {
        Some(rustls::Error::AlertReceived(a)) if is_certificate_alert(*a) => {
            InterceptError::ClientRejectedCertificate(*a)
        }
        Some(rustls::Error::AlertReceived(a)) => InterceptError::ClientAlert(*a),
        Some(other) => InterceptError::ClientHandshake(other.to_string()),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof => InterceptError::ClientClosed,
            _ => InterceptError::ClientIo(e),
        },
    }
}
