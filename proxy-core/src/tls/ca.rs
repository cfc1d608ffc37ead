//! The project CA: created on first start in the data directory, loaded on later starts.
//!
//! Files in the CA directory: [`CA_CERT_FILE`] (the certificate, PEM) and [`CA_KEY_FILE`]
//! (the PKCS#8 private key, PEM, mode 0600 from the moment it is created). The key is never
//! logged, and [`Ca`]'s `Debug` output leaves it out.
//!
//! The CA is ECDSA P-256, subject `CN=Interpose CA (HOSTNAME), O=Interpose`, a CA with path
//! length 0 (it signs leaves only), key usage keyCertSign and cRLSign, valid for about ten
//! years and backdated by a day against clock skew.
//! [`Ca::regenerate`] replaces both files, each atomically (temporary file, then rename).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate (PEM) in the CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File name of the CA private key (PKCS#8 PEM, mode 0600) in the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How far a new CA's `notBefore` lies in the past.
pub const CA_BACKDATE: Duration = Duration::days(1);

/// Errors of creating, loading, exporting or regenerating the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or directory could not be read, written or created.
    #[error("CA file {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A CA file exists but its content is not a usable certificate or key.
    #[error("CA file {path} is corrupt: {detail}")]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Only one of the two CA files exists; refusing to overwrite or guess.
    #[error(
        "CA file {missing} is missing while {present} exists; restore it or remove both to create a new CA"
    )]
    Incomplete {
        /// The file that is missing.
        missing: PathBuf,
        /// The file that exists.
        present: PathBuf,
    },
    /// The key file does not belong to the certificate file.
    #[error("CA key {key} does not match the certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Generating a key or certificate failed.
    #[error("generating the CA failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The project CA: certificate plus signing key, ready to issue leaves.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    subject: String,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// This host's name (for the CA subject and the default node name), if it can be found.
pub fn host_name() -> Option<String> {
    let from_file = |p: &str| {
        fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
}

/// A random positive serial number of 16 bytes.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let provider = rustls::crypto::ring::default_provider();
    if provider.secure_random.fill(&mut bytes).is_err() {
        // The system RNG failing is not recoverable in any meaningful way; fall back to
        // time-based uniqueness rather than a constant.
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        bytes.copy_from_slice(&nanos.to_be_bytes());
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Path of the certificate file in `dir`.
    pub fn cert_path_in(dir: &Path) -> PathBuf {
        dir.join(CA_CERT_FILE)
    }

    /// Path of the key file in `dir`.
    pub fn key_path_in(dir: &Path) -> PathBuf {
        dir.join(CA_KEY_FILE)
    }

    /// Loads the CA from `dir`, or creates it there (and the directory, mode 0700) when
    /// neither file exists. A half-present or corrupt CA is an error naming the file.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let cert = Self::cert_path_in(dir);
        let key = Self::key_path_in(dir);
        match (cert.exists(), key.exists()) {
            (true, true) => Self::load(dir),
            (false, false) => Self::create(dir),
            (true, false) => Err(CaError::Incomplete {
                missing: key,
                present: cert,
            }),
            (false, true) => Err(CaError::Incomplete {
                missing: cert,
                present: key,
            }),
        }
    }

    /// Loads an existing CA from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = Self::cert_path_in(dir);
        let key_path = Self::key_path_in(dir);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
            path: key_path.clone(),
            detail: format!("not a usable private key ({e})"),
        })?;
        Self::from_parts(dir, cert_pem, key, &cert_path, &key_path)
    }

    fn from_parts(
        dir: &Path,
        cert_pem: String,
        key: KeyPair,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Ca, CaError> {
        use rustls::pki_types::pem::PemObject;
        let corrupt = |detail: String| CaError::Corrupt {
            path: cert_path.to_owned(),
            detail,
        };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| corrupt(format!("no PEM certificate ({e})")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| corrupt(format!("not an X.509 certificate ({e})")))?;
        if x509.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let subject = x509.tbs_certificate.subject.to_string();
        let not_after = x509.tbs_certificate.validity.not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| corrupt(format!("not usable as an issuer ({e})")))?;
        Ok(Ca {
            dir: dir.to_owned(),
            cert_pem,
            cert_der,
            subject,
            not_after,
            issuer,
        })
    }

    /// Generates a new CA key and certificate in memory (nothing written).
    fn generate() -> Result<(KeyPair, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!(
                "Interpose CA ({})",
                host_name().unwrap_or_else(|| "unknown-host".to_owned())
            ),
        );
        dn.push(DnType::OrganizationName, "Interpose");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CA_BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok((key, cert.pem()))
    }

    /// Creates a new CA in `dir`. Fails if either file already exists (never overwrites).
    pub fn create(dir: &Path) -> Result<Ca, CaError> {
        create_dir_private(dir)?;
        let cert_path = Self::cert_path_in(dir);
        let key_path = Self::key_path_in(dir);
        let (key, cert_pem) = Self::generate()?;
        let key_pem = key.serialize_pem();
        write_new_private(&key_path, key_pem.as_bytes())?;
        if let Err(e) = write_new_public(&cert_path, cert_pem.as_bytes()) {
            // Do not leave a key without a certificate behind.
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        tracing::info!(cert = %cert_path.display(), "created a new Interpose CA");
        Self::from_parts(dir, cert_pem, key, &cert_path, &key_path)
    }

    /// Replaces the CA in `dir` with a new one: each file is written to a temporary file in
    /// the same directory and renamed over the old one. Returns the new CA; running
    /// proxies pick it up through `LeafIssuer::replace_ca` (which drops the old leaves).
    pub fn regenerate(dir: &Path) -> Result<Ca, CaError> {
        create_dir_private(dir)?;
        let cert_path = Self::cert_path_in(dir);
        let key_path = Self::key_path_in(dir);
        let (key, cert_pem) = Self::generate()?;
        let key_pem = key.serialize_pem();
        let key_tmp = temp_path(&key_path);
        let cert_tmp = temp_path(&cert_path);
        let result = (|| {
            write_new_private(&key_tmp, key_pem.as_bytes())?;
            write_new_public(&cert_tmp, cert_pem.as_bytes())?;
            fs::rename(&key_tmp, &key_path).map_err(io_err(&key_path))?;
            fs::rename(&cert_tmp, &cert_path).map_err(io_err(&cert_path))?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&key_tmp);
            let _ = fs::remove_file(&cert_tmp);
            return Err(e);
        }
        tracing::info!(cert = %cert_path.display(), "regenerated the Interpose CA");
        Self::from_parts(dir, cert_pem, key, &cert_path, &key_path)
    }

    /// Writes the CA certificate (never the key) to `out`: PEM, or DER when `der` is set.
    pub fn export(&self, out: &Path, der: bool) -> Result<(), CaError> {
        let bytes: &[u8] = if der {
            self.cert_der.as_ref()
        } else {
            self.cert_pem.as_bytes()
        };
        fs::write(out, bytes).map_err(io_err(out))
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The subject, e.g. `CN=Interpose CA (lab1), O=Interpose`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// End of the CA's validity; leaves never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The directory the CA lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the certificate file.
    pub fn cert_path(&self) -> PathBuf {
        Self::cert_path_in(&self.dir)
    }

    /// Path of the key file.
    pub fn key_path(&self) -> PathBuf {
        Self::key_path_in(&self.dir)
    }

    /// The rcgen issuer, for signing leaves.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

fn create_dir_private(dir: &Path) -> Result<(), CaError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_err(dir))
}

/// Creates `path` (which must not exist) with mode 0600 from the start and writes `bytes`.
pub(crate) fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f: File = opts.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_new_public(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o644);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("data");
        let a = Ca::load_or_create(&ca_dir).expect("create");
        assert!(a.subject().contains("CN=Interpose CA ("), "{}", a.subject());
        assert!(a.subject().contains("O=Interpose"), "{}", a.subject());
        let b = Ca::load_or_create(&ca_dir).expect("load");
        assert_eq!(a.cert_der(), b.cert_der());
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("PRIVATE"), "{dbg}");
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("create");
        let mode = fs::metadata(ca.key_path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca2 = Ca::regenerate(dir.path()).expect("regenerate");
        let mode = fs::metadata(ca2.key_path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(ca.cert_der(), ca2.cert_der());
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("readdir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn ca_certificate_has_ca_properties() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::create(dir.path()).expect("create");
        let (_, x) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        let bc = x
            .basic_constraints()
            .expect("ext ok")
            .expect("basic constraints present");
        assert!(bc.value.ca);
        let ku = x.key_usage().expect("ext ok").expect("key usage present");
        assert!(ku.value.key_cert_sign());
        assert!(ku.value.crl_sign());
        let now = OffsetDateTime::now_utc();
        let nb = x.validity().not_before.to_datetime();
        let na = x.validity().not_after.to_datetime();
        assert!(nb < now - Duration::hours(23));
        assert!(na > now + Duration::days(3600));
        assert!(x.public_key().algorithm.algorithm.to_id_string() == "1.2.840.10045.2.1");
    }

    #[test]
    fn corrupt_and_incomplete_ca_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        Ca::create(dir.path()).expect("create");
        fs::write(dir.path().join(CA_CERT_FILE), "garbage").expect("write");
        let err = Ca::load_or_create(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");

        let dir2 = tempfile::tempdir().expect("tempdir");
        Ca::create(dir2.path()).expect("create");
        fs::write(dir2.path().join(CA_KEY_FILE), "garbage").expect("write");
        let err = Ca::load(dir2.path()).expect_err("corrupt key");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
        // The error text never contains key material.
        assert!(!err.to_string().contains("PRIVATE KEY"));

        let dir3 = tempfile::tempdir().expect("tempdir");
        Ca::create(dir3.path()).expect("create");
        fs::remove_file(dir3.path().join(CA_CERT_FILE)).expect("rm");
        let err = Ca::load_or_create(dir3.path()).expect_err("incomplete");
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
        // The key was not overwritten.
        assert!(dir3.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn mismatched_key_is_detected() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        Ca::create(a.path()).expect("create");
        Ca::create(b.path()).expect("create");
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).expect("copy");
        let err = Ca::load(a.path()).expect_err("mismatch");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn export_pem_and_der() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::create(dir.path()).expect("create");
        let pem = dir.path().join("out.pem");
        let der = dir.path().join("out.der");
        ca.export(&pem, false).expect("pem");
        ca.export(&der, true).expect("der");
        let p = fs::read_to_string(&pem).expect("read");
        assert!(p.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!p.contains("PRIVATE"));
        assert_eq!(fs::read(&der).expect("read"), ca.cert_der().as_ref());
    }
}
