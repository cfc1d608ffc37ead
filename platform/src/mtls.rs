//! Mutual TLS for the management plane, an option (`--grpc-tls`) on top of the bearer token.
//!
//! A server started with `--grpc-tls` serves gRPC over TLS 1.3 only, with a certificate that
//! its data directory's management CA ([`authority`], in `DATA_DIR/mtls/`) signs at each
//! start, and completes no handshake without a client certificate signed by that same CA.
//! The token is still required on top (unless `--no-auth`): mTLS proves the client holds a
//! key the CA's owner handed out, the token that it may call the API.
//!
//! Clients connect to `https://` URLs with the CA certificate to verify the server and a
//! client certificate (`interpose ca issue-client`). A process has one identity towards the
//! management plane, so it installs its client configuration once ([`install_client`]) and
//! every channel [`crate::client`] opens to an `https://` URL uses it: the CLI, a proxy
//! reporting to its registry, intercept-svc and export-svc following theirs, `up`'s own
//! services talking to its port.
//!
//! Besides its CA, a server's `mtls` folder holds the certificate of its local client
//! (`client-cert.pem`, `client-key.pem`, issued on the first `--grpc-tls` start), which `up`
//! uses for its own services and the CLI finds without flags, the way it finds the token.

pub mod authority;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

pub use authority::{Authority, AuthorityError};

/// The management CA's folder in a data directory.
pub const MTLS_DIR: &str = "mtls";
/// The local client's certificate in that folder.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
/// The local client's key in that folder.
pub const CLIENT_KEY_FILE: &str = "client-key.pem";
/// The name (subject CN) of the local client certificate.
pub const LOCAL_CLIENT: &str = "local";

/// Why mTLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// The management CA or a certificate file.
    #[error("management CA: {0}")]
    Authority(#[from] AuthorityError),
    /// A certificate or key file given to a client.
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    /// Only one of `--client-cert` and `--client-key`.
    #[error("a client certificate and its key go together: pass both (or neither)")]
    HalfIdentity,
    /// `--grpc-tls` without a data directory to keep the management CA in.
    #[error("--grpc-tls needs --data-dir: the management CA is kept in its `mtls` folder")]
    NoDataDir,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The `mtls` folder of `data_dir`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(MTLS_DIR)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Options of every gRPC server (`up`, registry-svc, intercept-svc, export-svc).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve gRPC over TLS (https://) and accept only clients presenting a certificate from
    /// DATA_DIR/mtls's management CA (`interpose ca issue-client`); the token is still
    /// required on top. The CA and a local client certificate are created on first use.
    #[arg(long)]
    pub grpc_tls: bool,
    /// A further host name or IP address clients reach this server by, for its certificate
    /// (repeatable; loopback, `localhost`, this host's name and the listen address are
    /// always in it).
    #[arg(long = "grpc-tls-name", value_name = "HOST", requires = "grpc_tls")]
    pub names: Vec<String>,
}

/// The TLS configuration of a server listening on `listen` with its data in `data_dir`:
/// a new server certificate from the management CA (created when missing, as is the local
/// client certificate), client certificates required.
pub fn server_config(
    data_dir: &Path,
    listen: SocketAddr,
    names: &[String],
) -> Result<Arc<ServerConfig>, MtlsError> {
    let dir = dir(data_dir);
    let authority = Authority::load_or_create(&dir)?;
    local_client(&authority, &dir)?;
    let mut dns = vec!["localhost".to_string()];
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if let Some(host) = host_name() {
        dns.push(host);
    }
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    for n in names {
        match n.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(n.clone()),
        }
    }
    let issued = authority.issue_server(&dns, &ips)?;
    let mut roots = RootCertStore::empty();
    roots.add(authority.cert_der().clone())?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![issued.cert_der], issued.key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    tracing::info!(ca = %dir.join(authority::CA_CERT_FILE).display(), ?dns, ?ips, "serving gRPC over TLS; client certificates from the management CA required");
    Ok(Arc::new(config))
}

/// Sets `server` up for TLS when `args` ask for it (`--grpc-tls`, which needs `data_dir`);
/// returns ` mtls=DIR` for the end of the ready line then, else nothing.
pub fn serve_tls(
    server: &mut crate::serve::GrpcServer,
    args: &ServerTlsArgs,
    data_dir: Option<&Path>,
    listen: SocketAddr,
) -> Result<String, MtlsError> {
    if !args.grpc_tls {
        return Ok(String::new());
    }
    let data_dir = data_dir.ok_or(MtlsError::NoDataDir)?;
    server.tls(server_config(data_dir, listen, &args.names)?);
    Ok(format!(" mtls={}", dir(data_dir).display()))
}

/// Issues the local client certificate into `dir` unless it is there.
fn local_client(authority: &Authority, dir: &Path) -> Result<(), MtlsError> {
    let cert = dir.join(CLIENT_CERT_FILE);
    if cert.exists() {
        return Ok(());
    }
    let issued =
        authority.issue_client(LOCAL_CLIENT, std::time::Duration::from_secs(3650 * 86_400))?;
    let key = dir.join(CLIENT_KEY_FILE);
    authority::publish_pair(
        (&key, issued.key_pem.as_bytes()),
        (&cert, issued.cert_pem.as_bytes()),
    )?;
    Ok(())
}

/// This host's name, when it can be found and is a valid DNS name.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && rcgen::string::Ia5String::try_from(name).is_ok()).then(|| name.to_string())
}

/// Options of the services as clients of `https://` servers (their `--registry`,
/// `--intercept` URLs): what they present and how they verify the server. (The CLI's are
/// `--client-cert`, `--client-key`, `--ca-cert`; proxy-core's `--client-cert` is for
/// upstream TLS servers, hence the `grpc-` prefix here.)
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// Client certificate (PEM) for https:// management URLs, from `interpose ca
    /// issue-client`. Default: DATA_DIR/mtls/client-cert.pem when it exists.
    #[arg(
        id = "grpc_client_cert",
        long = "grpc-client-cert",
        env = "INTERPOSE_CLIENT_CERT",
        value_name = "FILE"
    )]
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM). Default: DATA_DIR/mtls/client-key.pem.
    #[arg(
        id = "grpc_client_key",
        long = "grpc-client-key",
        env = "INTERPOSE_CLIENT_KEY",
        value_name = "FILE"
    )]
    pub client_key: Option<PathBuf>,
    /// The management CA certificate https:// servers must present a certificate from.
    /// Default: DATA_DIR/mtls/ca-cert.pem when it exists.
    #[arg(
        id = "grpc_ca_cert",
        long = "grpc-ca-cert",
        env = "INTERPOSE_CA_CERT",
        value_name = "FILE"
    )]
    pub ca_cert: Option<PathBuf>,
}

/// The mTLS options of a service with no store of its own (intercept-svc, export-svc): a
/// data directory for its token, the management CA and the default client files, and both
/// sides.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceTlsArgs {
    /// Data directory: its `token` file is this service's token when none is given
    /// (generated on first start), and its `mtls` folder holds the management CA
    /// (`--grpc-tls`) and the default client certificate (for an https:// --registry).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// mTLS for this service's gRPC API.
    #[command(flatten)]
    pub server: ServerTlsArgs,
    /// mTLS towards https:// servers.
    #[command(flatten)]
    pub client: ClientTlsArgs,
}

impl ServiceTlsArgs {
    /// Installs the client side (see [`ClientTlsArgs::install`]).
    pub fn install_client(&self) -> Result<bool, MtlsError> {
        self.client.install(self.data_dir.as_deref())
    }

    /// Sets `server` up for TLS when asked (see [`serve_tls`]).
    pub fn serve(
        &self,
        server: &mut crate::serve::GrpcServer,
        listen: SocketAddr,
    ) -> Result<String, MtlsError> {
        serve_tls(server, &self.server, self.data_dir.as_deref(), listen)
    }
}

/// The files a client uses for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The CA certificate servers are verified with.
    pub ca_cert: PathBuf,
    /// The client certificate and key presented, if any.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTlsArgs {
    /// The files to use: the given ones, each completed from `defaults` (a data directory
    /// whose `mtls` folder to look in) when missing there. `None` when no CA certificate is
    /// known: then the process cannot connect to `https://` URLs.
    pub fn files(&self, defaults: Option<&Path>) -> Result<Option<ClientFiles>, MtlsError> {
        let found = |file: &str| defaults.map(|d| dir(d).join(file)).filter(|p| p.exists());
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => found(CLIENT_CERT_FILE).zip(found(CLIENT_KEY_FILE)),
            _ => return Err(MtlsError::HalfIdentity),
        };
        let ca_cert = self
            .ca_cert
            .clone()
            .or_else(|| found(authority::CA_CERT_FILE));
        Ok(ca_cert.map(|ca_cert| ClientFiles { ca_cert, identity }))
    }

    /// [`Self::files`], made into a configuration and installed for this process's
    /// `https://` channels. Returns whether one was installed.
    pub fn install(&self, defaults: Option<&Path>) -> Result<bool, MtlsError> {
        match self.files(defaults)? {
            Some(files) => {
                install_client(client_config(&files)?);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, MtlsError> {
    std::fs::read(path).map_err(|e| MtlsError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// A client configuration from `files`: TLS 1.3, ALPN h2, the CA as the only root.
pub fn client_config(files: &ClientFiles) -> Result<Arc<ClientConfig>, MtlsError> {
    let bad = |path: &Path, what: &str| {
        let path = path.to_owned();
        let what = what.to_string();
        move |e: rustls::pki_types::pem::Error| MtlsError::File {
            path,
            detail: format!("no PEM {what} ({e})"),
        }
    };
    let mut roots = RootCertStore::empty();
    let ca = read(&files.ca_cert)?;
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.map_err(bad(&files.ca_cert, "certificate"))?)?;
    }
    if roots.is_empty() {
        return Err(MtlsError::File {
            path: files.ca_cert.clone(),
            detail: "no PEM certificate in it".into(),
        });
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match &files.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad(cert, "certificate"))?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&read(key)?).map_err(bad(key, "private key"))?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn installed() -> &'static RwLock<Option<Arc<ClientConfig>>> {
    static CONFIG: RwLock<Option<Arc<ClientConfig>>> = RwLock::new(None);
    &CONFIG
}

/// Makes `config` the TLS configuration of every `https://` channel this process opens
/// from now on.
pub fn install_client(config: Arc<ClientConfig>) {
    *installed().write().unwrap_or_else(|e| e.into_inner()) = Some(config);
}

/// The installed client configuration, if any.
pub fn client() -> Option<Arc<ClientConfig>> {
    installed()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The rustls error `e` is, or carries as an I/O error (as tokio-rustls wraps it); one
/// link of an error's chain, so a caller walking `source()` sees each link once.
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

/// A sentence for a TLS failure somewhere in `err`'s causes, naming what to do; `None` when
/// no cause is a TLS error.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        let tls = rustls_error(e);
        if let Some(tls) = tls {
            return Some(describe(tls));
        }
        // HTTP/2 keeps only the text of an I/O error that ends a connection.
        let text = e.to_string();
        if let Some(alert) = text.split("received fatal alert: ").nth(1) {
            return Some(describe_alert(alert.trim()).unwrap_or_else(|| failed(&text)));
        }
        next = e.source();
    }
    None
}

/// The sentence for an alert the server sent, by its rustls name.
fn describe_alert(alert: &str) -> Option<String> {
    Some(match alert {
        "CertificateRequired" => "the server requires a client certificate: pass --client-cert \
            and --client-key (env INTERPOSE_CLIENT_CERT, INTERPOSE_CLIENT_KEY; services: \
            --grpc-client-cert, --grpc-client-key) with one from `interpose ca issue-client` \
            run on the server's data directory"
            .into(),
        "CertificateExpired" => "the server refused the client certificate: it has expired \
            (issue a new one with `interpose ca issue-client`)"
            .into(),
        "UnknownCA"
        | "BadCertificate"
        | "CertificateUnknown"
        | "UnsupportedCertificate"
        | "AccessDenied"
        | "DecryptError" => "the server refused the client certificate: it \
            was not issued by this server's management CA (issue one with `interpose ca \
            issue-client --data-dir SERVER_DATA_DIR`)"
            .into(),
        _ => return None,
    })
}

fn failed(e: &dyn std::fmt::Display) -> String {
    format!("TLS with the server failed: {e} (only servers started with --grpc-tls speak https://)")
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::AlertReceived(alert) => {
            describe_alert(&format!("{alert:?}")).unwrap_or_else(|| failed(e))
        }
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "cannot verify the server: \
            its certificate is not from the CA in --ca-cert / --grpc-ca-cert (use the server's \
            DATA_DIR/mtls/ca-cert.pem, also written by `interpose ca issue-client`)"
            .into(),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "cannot verify the server: its certificate does not name the host in the URL \
             (start it with --grpc-tls-name HOST)"
                .into()
        }
        other => failed(other),
    }
}
