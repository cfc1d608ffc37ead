//! The management CA: the authority of the management plane's mTLS, kept in a data
//! directory's `mtls` folder and nothing else.
//!
//! It is not the CA that signs the leaves of intercepted TLS (proxy-core's `ca` folder): that
//! one is installed in the programs under test, signs certificates for any name a client asks
//! for, and can be replaced by any token holder (`interpose ca regenerate`). The management
//! CA signs only two kinds of certificate: a server's (extended key usage serverAuth, made
//! fresh at each start and never written) and a client's (clientAuth, written by
//! `interpose ca issue-client`), so neither can stand in for the other.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use time::{Duration, OffsetDateTime};

use crate::private;

/// The management CA's certificate (PEM) in its folder.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The management CA's private key (PKCS#8 PEM, 0600) in its folder.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long the management CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How far back every certificate's `notBefore` lies, against clock skew.
const BACKDATE: Duration = Duration::days(1);
/// How long a server certificate made at start is valid.
const SERVER_VALIDITY: Duration = Duration::days(365);

/// Why the management CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A file holds no usable certificate or key.
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// Only one of the CA's two files exists.
    #[error(
        "{missing} is missing while {present} exists: restore it, or remove both to create a new management CA (every client certificate must then be issued again)"
    )]
    Incomplete { missing: PathBuf, present: PathBuf },
    /// A client name that cannot be a file name or a certificate subject.
    #[error(
        "client name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    /// A client certificate of that name was already issued into that folder.
    #[error(
        "{0} exists: choose another --name or --out (issued certificates are never overwritten)"
    )]
    Exists(PathBuf),
    /// Signing failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA key belongs to another user, who could have planted it.
    #[error(
        "{path} belongs to user {owner}, not to user {me} running this process: refusing a \
         management CA key another user could have planted"
    )]
    Foreign { path: PathBuf, owner: u32, me: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The management CA, able to sign server and client certificates.
pub struct Authority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// A certificate with its private key, as written to files.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 key, PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The key, DER.
    pub key_der: PrivateKeyDer<'static>,
}

impl Authority {
    /// Loads the CA in `dir`, or creates it (and `dir`, 0700) when neither file exists.
    /// Two processes starting at once agree on one CA: each file appears whole or not at all,
    /// and the key is in place before the certificate.
    pub fn load_or_create(dir: &Path) -> Result<Self, AuthorityError> {
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        match (cert.exists(), key.exists()) {
            (true, true) => Self::load(&cert, &key),
            (false, false) => Self::create(dir, &cert, &key),
            (true, false) => Err(AuthorityError::Incomplete {
                missing: key,
                present: cert,
            }),
            (false, true) => {
                // Another process may be between writing the key and the certificate.
                std::thread::sleep(std::time::Duration::from_millis(200));
                if cert.exists() {
                    return Self::load(&cert, &key);
                }
                Err(AuthorityError::Incomplete {
                    missing: cert,
                    present: key,
                })
            }
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, AuthorityError> {
        use std::os::unix::fs::MetadataExt;
        let owner = fs::symlink_metadata(key_path)
            .map_err(io_err(key_path))?
            .uid();
        let me = rustix::process::geteuid().as_raw();
        if owner != me {
            return Err(AuthorityError::Foreign {
                path: key_path.to_owned(),
                owner,
                me,
            });
        }
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| AuthorityError::Corrupt {
            path: key_path.to_owned(),
            detail: format!("not a usable private key ({e})"),
        })?;
        let corrupt = |detail: String| AuthorityError::Corrupt {
            path: cert_path.to_owned(),
            detail,
        };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| corrupt(format!("no PEM certificate ({e})")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| corrupt(format!("not usable with {} ({e})", key_path.display())))?;
        Ok(Self {
            cert_pem,
            cert_der,
            issuer,
        })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, AuthorityError> {
        private::create_dir(dir).map_err(io_err(dir))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("Interpose management CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        publish_pair(
            (key_path, key.serialize_pem().as_bytes()),
            (cert_path, cert.pem().as_bytes()),
        )?;
        tracing::info!(cert = %cert_path.display(), "created the management CA (mTLS)");
        // Load what is on disk: a concurrent starter may have won the race.
        Self::load(cert_path, key_path)
    }

    /// The CA certificate, PEM: what clients verify servers with.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER: what servers verify clients with.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A server certificate for `dns` names and `ips` (extended key usage serverAuth).
    pub fn issue_server(&self, dns: &[String], ips: &[IpAddr]) -> Result<Issued, AuthorityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("Interpose management server");
        for name in dns {
            let ia5 = rcgen::string::Ia5String::try_from(name.as_str())
                .map_err(|_| AuthorityError::BadName(name.clone()))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, SERVER_VALIDITY)
    }

    /// A client certificate named `name` (subject CN, extended key usage clientAuth), valid
    /// for `validity`.
    pub fn issue_client(
        &self,
        name: &str,
        validity: std::time::Duration,
    ) -> Result<Issued, AuthorityError> {
        check_name(name)?;
        let validity = Duration::try_from(validity)
            .unwrap_or(CA_VALIDITY)
            .min(CA_VALIDITY);
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Duration,
    ) -> Result<Issued, AuthorityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        })
    }
}

/// `CN=cn, O=Interpose`.
fn subject(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Interpose");
    dn
}

/// A client name is also a file name: no path separators, no hidden files, no surprises.
fn check_name(name: &str) -> Result<(), AuthorityError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AuthorityError::BadName(name.to_string()))
    }
}

/// Writes `bytes` (mode 0600) to `path` only if it does not exist yet, whole or not at all;
/// returns whether this call created it.
fn publish(path: &Path, bytes: &[u8]) -> Result<bool, AuthorityError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    private::write_new(&tmp, bytes).map_err(io_err(&tmp))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Publishes a key and then its certificate, so that processes starting at once agree on
/// one pair: whoever creates the key writes the certificate; the others wait for it.
pub(crate) fn publish_pair(
    key: (&Path, &[u8]),
    cert: (&Path, &[u8]),
) -> Result<(), AuthorityError> {
    if publish(key.0, key.1)? {
        publish(cert.0, cert.1)?;
        return Ok(());
    }
    for _ in 0..40 {
        if cert.0.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(AuthorityError::Incomplete {
        missing: cert.0.to_owned(),
        present: key.0.to_owned(),
    })
}

/// Writes an issued client certificate into `out` as `NAME-cert.pem` and `NAME-key.pem`
/// (both 0600, never overwriting), with the CA certificate beside them as `ca-cert.pem`;
/// returns the three paths.
pub fn write_client(
    authority: &Authority,
    issued: &Issued,
    name: &str,
    out: &Path,
) -> Result<[PathBuf; 3], AuthorityError> {
    check_name(name)?;
    private::create_dir(out).map_err(io_err(out))?;
    let cert = out.join(format!("{name}-cert.pem"));
    let key = out.join(format!("{name}-key.pem"));
    for p in [&cert, &key] {
        // A link counts as there, a dangling one too: nothing is written through it.
        if fs::symlink_metadata(p).is_ok() {
            return Err(AuthorityError::Exists(p.clone()));
        }
    }
    private::write_new(&key, issued.key_pem.as_bytes()).map_err(io_err(&key))?;
    private::write_new(&cert, issued.cert_pem.as_bytes()).map_err(io_err(&cert))?;
    let ca = out.join(CA_CERT_FILE);
    let ca_tmp = ca.with_extension(format!("tmp.{}", std::process::id()));
    let _ = fs::remove_file(&ca_tmp);
    private::write_new(&ca_tmp, authority.cert_pem().as_bytes()).map_err(io_err(&ca_tmp))?;
    fs::rename(&ca_tmp, &ca).map_err(io_err(&ca))?;
    Ok([cert, key, ca])
}

/// A random positive 16-byte serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The kernel's CSPRNG; a failure would leave zeros, which the fixed bits below still
    // make a valid (if not unique) serial.
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ca_per_folder_and_names_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Authority::load_or_create(dir.path()).expect("create");
        let b = Authority::load_or_create(dir.path()).expect("load");
        assert_eq!(a.cert_pem(), b.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(
                matches!(
                    a.issue_client(bad, std::time::Duration::from_secs(86_400)),
                    Err(AuthorityError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        let issued = a
            .issue_client("alice", std::time::Duration::from_secs(86_400))
            .expect("issue");
        let out = dir.path().join("out");
        let [cert, key, ca] = write_client(&a, &issued, "alice", &out).expect("write");
        assert!(cert.ends_with("alice-cert.pem") && key.ends_with("alice-key.pem"));
        assert_eq!(fs::read_to_string(ca).expect("ca"), a.cert_pem());
        let again = write_client(&a, &issued, "alice", &out).expect_err("exists");
        assert!(
            again.to_string().contains("alice-cert.pem exists"),
            "{again}"
        );
    }
}
