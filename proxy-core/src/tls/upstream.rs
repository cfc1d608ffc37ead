//! The upstream leg: a real rustls client, configured per connection.
//!
//! Trust: the system roots (rustls-native-certs) plus any `--upstream-ca FILE` PEM roots; or
//! `--upstream-insecure`, where any certificate is accepted (the chain is still available
//! from the connection, handshake signatures are still checked against it) and a warning is
//! logged. Per connection the ALPN offer is the client's, SNI is the client's (or none), and
//! a client certificate from `--client-cert HOST=CERT,KEY` is offered when the server asks
//! and the host matches; [`ClientCertProbe`] tells afterwards whether the server asked.
//!
//! [`NssKeyLog`] writes NSS key-log lines (`--keylog FILE`) for both legs to one file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustls::client::ResolvesClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, KeyLog, RootCertStore, SignatureScheme};

use super::pattern::{HostPattern, PatternError};

/// Errors of building the upstream configuration (at startup).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the file is, e.g. "upstream CA file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file was read but holds nothing usable.
    #[error("{what} {path}: {detail}")]
    Invalid {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Neither the system store nor `--upstream-ca` gave any trusted root.
    #[error(
        "no trusted roots for verifying upstream servers: {system}; pass --upstream-ca FILE or --upstream-insecure"
    )]
    NoRoots {
        /// What happened with the system store.
        system: String,
    },
    /// A `--client-cert` argument is malformed.
    #[error("invalid --client-cert {arg:?}: expected HOST=CERT,KEY ({detail})")]
    ClientCertArg {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        detail: String,
    },
    /// rustls rejected part of the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The key-log file cannot be used (a link, another user's, readable by others, ...).
    #[error("--keylog: {0}")]
    KeyLog(#[from] platform::out_file::OutFileError),
}

/// One `--client-cert HOST=CERT,KEY`: offer this certificate to matching upstream hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertSpec {
    /// Which hosts get it (wildcards allowed).
    pub pattern: HostPattern,
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
}

impl FromStr for ClientCertSpec {
    type Err = UpstreamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |detail: String| UpstreamError::ClientCertArg {
            arg: s.to_owned(),
            detail,
        };
        let (host, files) = s.split_once('=').ok_or_else(|| bad("no '='".into()))?;
        let (cert, key) = files
            .split_once(',')
            .ok_or_else(|| bad("no ',' between CERT and KEY".into()))?;
        if cert.is_empty() || key.is_empty() {
            return Err(bad("empty file name".into()));
        }
        let pattern = host
            .parse::<HostPattern>()
            .map_err(|e: PatternError| bad(e.to_string()))?;
        Ok(ClientCertSpec {
            pattern,
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })
    }
}

/// How the upstream leg verifies servers and authenticates itself.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Trust the operating system's roots (default true).
    pub system_roots: bool,
    /// `--upstream-ca FILE`: extra PEM roots.
    pub extra_roots: Vec<PathBuf>,
    /// `--upstream-insecure`: accept any upstream certificate.
    pub insecure: bool,
    /// `--client-cert HOST=CERT,KEY`, first match wins.
    pub client_certs: Vec<ClientCertSpec>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            system_roots: true,
            extra_roots: Vec::new(),
            insecure: false,
            client_certs: Vec::new(),
        }
    }
}

/// Whether the upstream server asked for a client certificate, and whether we sent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertStatus {
    /// The server did not ask.
    NotRequested,
    /// The server asked and we sent the configured certificate.
    Sent,
    /// The server asked and we had none for this host (an empty certificate was sent).
    RequestedNoneAvailable,
}

/// Per-connection record of the server's client-certificate request.
#[derive(Debug, Clone)]
pub struct ClientCertProbe {
    requested: Arc<AtomicBool>,
    have_cert: bool,
}

impl ClientCertProbe {
    /// The status after (or during) the handshake.
    pub fn status(&self) -> ClientCertStatus {
        match (self.requested.load(Ordering::Acquire), self.have_cert) {
            (false, _) => ClientCertStatus::NotRequested,
            (true, true) => ClientCertStatus::Sent,
            (true, false) => ClientCertStatus::RequestedNoneAvailable,
        }
    }
}

#[derive(Debug)]
struct ProbeResolver {
    cert: Option<Arc<CertifiedKey>>,
    requested: Arc<AtomicBool>,
}

impl ResolvesClientCert for ProbeResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested.store(true, Ordering::Release);
        self.cert.clone()
    }

    fn has_certs(&self) -> bool {
        self.cert.is_some()
    }
}

/// Accepts any server certificate (`--upstream-insecure`); handshake signatures are still
/// verified against the presented certificate.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Builds per-connection upstream `ClientConfig`s.
pub struct Upstream {
    template: ClientConfig,
    client_certs: Vec<(HostPattern, Arc<CertifiedKey>)>,
    insecure: bool,
    roots: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("insecure", &self.insecure)
            .field("roots", &self.roots)
            .field("client_certs", &self.client_certs.len())
            .finish_non_exhaustive()
    }
}

/// The roots upstream certificates are checked against: the system's (unless turned off
/// or `--upstream-insecure`) and every `--upstream-ca` file; with a note on the system roots
/// for error messages and logs.
fn trust_roots(options: &UpstreamOptions) -> Result<(RootCertStore, String), UpstreamError> {
    let mut roots = RootCertStore::empty();
    let mut system_note = "system roots not used".to_owned();
    if options.system_roots && !options.insecure {
        let found = rustls_native_certs::load_native_certs();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        system_note = if added == 0 {
            let mut note =
                "the system trust store has no usable roots (install ca-certificates)".to_owned();
            if !errors.is_empty() {
                note.push_str(&format!(": {}", errors.join("; ")));
            }
            tracing::warn!("{note}");
            note
        } else {
            let mut note = format!("{added} system roots loaded");
            if ignored > 0 {
                note.push_str(&format!(", {ignored} unparsable skipped"));
            }
            if !errors.is_empty() {
                note.push_str(&format!(" (errors: {})", errors.join("; ")));
            }
            note
        };
    }
    for path in &options.extra_roots {
        let certs = load_pem_certs(path, "upstream CA file")?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(UpstreamError::Invalid {
                what: "upstream CA file",
                path: path.clone(),
                detail: "no certificate in it is usable as a trust anchor".into(),
            });
        }
    }
    Ok((roots, system_note))
}

/// Reads every PEM certificate of `path`; an error names the file.
pub fn load_pem_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let bytes = std::fs::read(path).map_err(|source| UpstreamError::Io {
        what,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UpstreamError::Invalid {
            what,
            path: path.to_owned(),
            detail: format!("not valid PEM ({e})"),
        })?;
    if certs.is_empty() {
        return Err(UpstreamError::Invalid {
            what,
            path: path.to_owned(),
            detail: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

fn load_client_cert(
    spec: &ClientCertSpec,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, UpstreamError> {
    let chain = load_pem_certs(&spec.cert, "client certificate file")?;
    let key_bytes = std::fs::read(&spec.key).map_err(|source| UpstreamError::Io {
        what: "client key file",
        path: spec.key.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| UpstreamError::Invalid {
        what: "client key file",
        path: spec.key.clone(),
        detail: format!("no usable PEM private key ({e})"),
    })?;
    let signing =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| UpstreamError::Invalid {
                what: "client key file",
                path: spec.key.clone(),
                detail: format!("unsupported key ({e})"),
            })?;
    let ck = CertifiedKey::new(chain, signing);
    if let Err(e) = ck.keys_match() {
        return Err(UpstreamError::Invalid {
            what: "client key file",
            path: spec.key.clone(),
            detail: format!("does not match {} ({e})", spec.cert.display()),
        });
    }
    Ok(Arc::new(ck))
}

impl Upstream {
    /// Builds the upstream configuration. Loads the system roots once (this can take a
    /// moment) unless `options.system_roots` is off; fails when no root at all is available
    /// and verification is on.
    pub fn new(
        options: &UpstreamOptions,
        provider: Arc<CryptoProvider>,
        key_log: Option<Arc<dyn KeyLog>>,
    ) -> Result<Upstream, UpstreamError> {
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::ALL_VERSIONS)?;
        let (roots, system_note) = trust_roots(options)?;
        let roots_len = roots.len();
        let mut template = if options.insecure {
            tracing::warn!(
                "UPSTREAM CERTIFICATE VERIFICATION IS OFF (--upstream-insecure): any server certificate is accepted"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                    algs: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        } else {
            if roots.is_empty() {
                return Err(UpstreamError::NoRoots {
                    system: system_note,
                });
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| UpstreamError::NoRoots {
                        system: format!("{system_note}; verifier: {e}"),
                    })?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        };
        if let Some(k) = key_log {
            template.key_log = k;
        }
        let mut client_certs = Vec::new();
        for spec in &options.client_certs {
            client_certs.push((spec.pattern.clone(), load_client_cert(spec, &provider)?));
        }
        Ok(Upstream {
            template,
            client_certs,
            insecure: options.insecure,
            roots: roots_len,
        })
    }

    /// Whether verification is off.
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// Number of trusted roots.
    pub fn roots_len(&self) -> usize {
        self.roots
    }

    /// A `ClientConfig` for one upstream connection: ALPN offer `alpn` (the client's),
    /// SNI on or off, and the client certificate matching any of `hosts` (or `ip`).
    pub fn connection_config(
        &self,
        hosts: &[Option<&str>],
        ip: Option<std::net::IpAddr>,
        alpn: Vec<Vec<u8>>,
        enable_sni: bool,
    ) -> (Arc<ClientConfig>, ClientCertProbe) {
        let cert = self
            .client_certs
            .iter()
            .find(|(p, _)| {
                hosts.iter().flatten().any(|h| p.matches(h))
                    || ip.is_some_and(|ip| p.matches_ip(ip))
            })
            .map(|(_, k)| k.clone());
        let probe = ClientCertProbe {
            requested: Arc::new(AtomicBool::new(false)),
            have_cert: cert.is_some(),
        };
        let mut cfg = self.template.clone();
        cfg.alpn_protocols = alpn;
        cfg.enable_sni = enable_sni;
        cfg.client_auth_cert_resolver = Arc::new(ProbeResolver {
            cert,
            requested: probe.requested.clone(),
        });
        (Arc::new(cfg), probe)
    }
}

/// `--keylog FILE`: NSS key-log lines (`LABEL <client_random hex> <secret hex>`) for both
/// legs, appended to one private file (mode 0600, see [`NssKeyLog::open`]).
pub struct NssKeyLog {
    path: PathBuf,
    file: Mutex<File>,
    failed: AtomicBool,
}

impl std::fmt::Debug for NssKeyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NssKeyLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl NssKeyLog {
    /// Opens the key-log file for appending, creating it with mode 0600; never through a
    /// symbolic link, and an existing file must be this user's and readable by nobody else
    /// (see [`platform::out_file::append`]): it is refused rather than tightened, since anyone
    /// who has it open already would go on reading the secrets.
    pub fn open(path: &Path) -> Result<NssKeyLog, UpstreamError> {
        let file = platform::out_file::append(path)?;
        tracing::warn!(file = %path.display(), "TLS session secrets of both legs are written to the key-log file");
        Ok(NssKeyLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            failed: AtomicBool::new(false),
        })
    }
}

impl KeyLog for NssKeyLog {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let mut line =
            String::with_capacity(label.len() + 2 * (client_random.len() + secret.len()) + 3);
        line.push_str(label);
        line.push(' ');
        proto::hex::encode_into(&mut line, client_random);
        line.push(' ');
        proto::hex::encode_into(&mut line, secret);
        line.push('\n');
        let mut f = match self.file.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        if let Err(e) = f.write_all(line.as_bytes())
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::error!(file = %self.path.display(), "writing the key-log file failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cert_spec_parses() {
        let s: ClientCertSpec = "*.iot.example=/a/c.pem,/a/k.pem".parse().expect("spec");
        assert!(s.pattern.matches("dev.iot.example"));
        assert_eq!(s.cert, PathBuf::from("/a/c.pem"));
        assert_eq!(s.key, PathBuf::from("/a/k.pem"));
        for bad in ["host", "host=c.pem", "=c,k", "h=,k", "a*b=c,k"] {
            assert!(bad.parse::<ClientCertSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_upstream_ca_file_is_named() {
        crate::tls::install_provider();
        let opts = UpstreamOptions {
            system_roots: false,
            extra_roots: vec![PathBuf::from("/nonexistent/ca.pem")],
            ..UpstreamOptions::default()
        };
        let err = Upstream::new(&opts, crate::tls::provider(), None).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn system_roots_load_or_say_clearly_that_there_are_none() {
        crate::tls::install_provider();
        // What this machine's trust store holds decides which outcome is right: its
        // usable roots, all of them, or (none) the clear error.
        let mut expected = RootCertStore::empty();
        let (usable, _) =
            expected.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let got = Upstream::new(&UpstreamOptions::default(), crate::tls::provider(), None);
        if usable > 0 {
            assert_eq!(got.expect("system roots").roots_len(), usable);
        } else {
            let Err(e) = got else {
                panic!("no usable system roots must be an error");
            };
            assert!(
                e.to_string().contains(
                    "the system trust store has no usable roots (install ca-certificates)"
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn no_roots_is_a_clear_error() {
        crate::tls::install_provider();
        let opts = UpstreamOptions {
            system_roots: false,
            ..UpstreamOptions::default()
        };
        let err = Upstream::new(&opts, crate::tls::provider(), None).expect_err("no roots");
        assert!(err.to_string().contains("no trusted roots"), "{err}");
        let insecure = UpstreamOptions {
            system_roots: false,
            insecure: true,
            ..UpstreamOptions::default()
        };
        let up = Upstream::new(&insecure, crate::tls::provider(), None).expect("insecure ok");
        assert!(up.insecure());
    }

    #[cfg(unix)]
    #[test]
    fn keylog_is_0600_and_appends_lines() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("keys.log");
        let k = NssKeyLog::open(&p).expect("open");
        k.log("CLIENT_RANDOM", &[0xab; 32], &[0x01; 48]);
        drop(k);
        let k = NssKeyLog::open(&p).expect("reopen");
        k.log("CLIENT_TRAFFIC_SECRET_0", &[0xcd; 32], &[0x02; 32]);
        let text = std::fs::read_to_string(&p).expect("read");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&format!("CLIENT_RANDOM {} ", "ab".repeat(32))));
        assert!(lines[1].starts_with("CLIENT_TRAFFIC_SECRET_0 "));
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
