//! A test PKI for the benchmarks' upstream TLS servers: a CA and a certificate for
//! `localhost` signed by it, written as PEM files for `bench-server --tls-cert/--tls-key` and
//! for the proxy's `--upstream-ca`.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;

/// The files of a test PKI.
pub struct UpstreamPki {
    /// The CA certificate (for clients that connect to the server directly).
    pub ca: CertificateDer<'static>,
    /// The CA certificate as PEM (`--upstream-ca`).
    pub ca_pem: PathBuf,
    /// The server's certificate for `localhost`, PEM.
    pub cert_pem: PathBuf,
    /// The server's private key, PEM.
    pub key_pem: PathBuf,
}

impl UpstreamPki {
    /// Creates a CA named `cn` and a server certificate, and writes them into `dir`.
    pub fn create(dir: &Path, cn: &str) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, cn);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["localhost".to_string()])?
            .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))?;
        let pki = Self {
            ca: ca.der().clone(),
            ca_pem: dir.join("upstream-ca.pem"),
            cert_pem: dir.join("server.pem"),
            key_pem: dir.join("server.key"),
        };
        std::fs::write(&pki.ca_pem, ca.pem())?;
        std::fs::write(&pki.cert_pem, cert.pem())?;
        std::fs::write(&pki.key_pem, key.serialize_pem())?;
        Ok(pki)
    }
}
