//! A small pool of database connections: the writer, the committer and the blocking pool
//! each take one for a call and give it back, so no call waits on another's round trip.
// Kept over `r2d2_postgres`: its errors are text only, and a broken connection leaves the idle ones.

use std::{
    ops::{Deref, DerefMut},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::StoreError;

/// Idle connections kept for reuse.
const IDLE: usize = 16;

/// Connections to one database.
pub struct Pool {
    config: Config,
    /// TLS as the URL's `sslmode` asks (libpq's default, `prefer`: when the server offers
    /// it), with the server's certificate checked against the system's roots and `--store-ca`.
    tls: MakeRustlsConnect,
    /// The database as named in errors and logs (the URL without its password).
    pub(super) name: String,
    idle: Mutex<Vec<Client>>,
}

/// A connection taken from the pool, given back when dropped (unless it broke).
pub struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl Pool {
    /// A pool for the database at `url` (`postgres://user:password@host:port/db`), whose
    /// server certificate is also trusted when signed by the CA in the PEM file `ca`.
    pub fn new(url: &str, ca: Option<&Path>) -> Result<Self, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("bad PostgreSQL URL in --store: {e}")))?;
        config
            .connect_timeout(Duration::from_secs(10))
            .application_name("interpose-registry")
            // Notices ("already exists, skipping") are not worth a log line each. A registry
            // that hangs or is cut off inside a transaction would hold its row locks (the
            // change counter's among them) and stall every other replica: the server ends
            // such a session after 5 s idle in its transaction, which rolls it back.
            .options("-c client_min_messages=warning -c idle_in_transaction_session_timeout=5000");
        let name = describe(&config);
        Ok(Self {
            config,
            tls: tls(ca)?,
            name,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A pool of its own for the same database (the change feed's).
    pub fn another(&self) -> Self {
        Self {
            config: self.config.clone(),
            tls: self.tls.clone(),
            name: self.name.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A new connection of its own (the change feed's, which listens).
    pub fn connect(&self) -> Result<Client, StoreError> {
        self.config.connect(self.tls.clone()).map_err(|e| {
            let why = describe_error(&e);
            let hint = match certificate_refused(&e) {
                true => " (trust the CA that signed it with --store-ca)",
                false => "",
            };
            StoreError::Database {
                message: format!("connecting to {}: {why}{hint}", self.name),
                error: Some(Box::new(e)),
            }
        })
    }

    /// A connection, reused when one is idle.
    pub fn get(&self) -> Result<Conn<'_>, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => self.connect()?,
        };
        Ok(Conn {
            pool: self,
            client: Some(client),
        })
    }
}

/// The TLS client for the database: the system's roots and the CA in `ca`, if given.
fn tls(ca: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot use is no reason to refuse the others.
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let bad = |why: String| StoreError::Invalid(format!("--store-ca {}: {why}", ca.display()));
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Invalid(format!("TLS to the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

impl Deref for Conn<'_> {
    type Target = Client;
    #[expect(clippy::expect_used, reason = "taken only by drop")]
    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a pooled connection is present until dropped")
    }
}

impl DerefMut for Conn<'_> {
    #[expect(clippy::expect_used, reason = "taken only by drop")]
    fn deref_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("a pooled connection is present until dropped")
    }
}

impl Drop for Conn<'_> {
    /// Gives a working connection back. A broken one (the server restarted, or ended the
    /// session) takes the idle ones with it: they were opened to the same server and would
    /// each fail their next call, one caller after another, where a fresh connection works.
    fn drop(&mut self) {
        let Some(c) = self.client.take() else { return };
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !c.is_closed() {
            if idle.len() < IDLE {
                idle.push(c);
            }
            return;
        }
        let stale = std::mem::take(&mut *idle);
        drop(idle);
        drop(c);
        drop(stale);
    }
}

impl Drop for Pool {
    /// Each client owns a small runtime, which may not be dropped on an async thread (the
    /// registry drops its state at the end of `main`): they are dropped on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Database {
            message: describe_error(&e),
            error: Some(Box::new(e)),
        }
    }
}

/// A database error as a sentence: the server's own message, or the client's with its cause.
pub fn describe_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Whether TLS to the database failed because this side refused the server's certificate:
/// some cause of `e` is rustls's `InvalidCertificate` (tokio-rustls wraps it in an I/O error).
fn certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let tls = platform::mtls::rustls_error(e);
        if let Some(tls) = tls {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        next = e.source();
    }
    false
}

/// `postgres://user@host:port/db`, never the password.
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_named_without_its_password() {
        let pool = Pool::new("postgres://lab:s3cret@127.0.0.1:5433/interpose", None).unwrap();
        assert_eq!(pool.name, "postgres://lab@127.0.0.1:5433/interpose");
        assert!(!pool.name.contains("s3cret"));
    }

    #[test]
    fn a_refused_server_certificate_is_told_apart_from_other_failures() {
        use rustls::{CertificateError, Error as Tls};
        // As tokio-rustls reports a failed handshake: the rustls error inside an I/O error.
        let wrapped = |tls: Tls| std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let unknown = wrapped(Tls::InvalidCertificate(CertificateError::UnknownIssuer));
        assert!(certificate_refused(&unknown));
        let expired = Tls::InvalidCertificate(CertificateError::Expired);
        assert!(certificate_refused(&expired));
        // A cause further down the chain is found too.
        let outer = Outer(unknown);
        assert!(certificate_refused(&outer));
        // Other TLS failures, and errors that only mention a certificate, get no hint.
        let alert = wrapped(Tls::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert!(!certificate_refused(&alert));
        let words = std::io::Error::other("the certificate table is full");
        assert!(!certificate_refused(&words));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!certificate_refused(&refused));
    }

    /// An error whose source is an I/O error, as `postgres::Error` is for a failed handshake.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error performing TLS handshake")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_bad_url_is_an_invalid_argument_naming_the_flag() {
        let Err(StoreError::Invalid(why)) = Pool::new("postgres://[::1", None) else {
            panic!("a bad URL was accepted");
        };
        assert!(why.contains("--store"), "{why}");
    }
}
