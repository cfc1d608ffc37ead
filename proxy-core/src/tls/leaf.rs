//! Leaf certificates signed by the project CA, for the client-facing leg.
//!
//! One ECDSA P-256 leaf key per process (never the CA key: every handshake signs with the
//! leaf key). A leaf names either a DNS name (DNS SAN) or an IP address (IP SAN, never a DNS
//! SAN), is valid for at most 199 days (and never past the CA), and is backdated by an hour.
//! Leaves are cached per name with a bound on count (least recently used are evicted) and on
//! age (re-issued after `max_age`). [`LeafIssuer::replace_ca`] swaps in a new CA and drops
//! every leaf of the old one; a generation counter keeps leaves issued concurrently with the
//! swap out of the cache.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{KeyLog, ServerConfig};

use super::ca::{Ca, random_serial};

/// Longest validity a leaf may have (browsers' limit is 398 days; Apple's 825; we stay low).
pub const MAX_LEAF_VALIDITY: Duration = Duration::from_secs(199 * 24 * 3600);
/// How far a leaf's `notBefore` lies in the past, against client clock skew.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(3600);

/// The name a leaf certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS name: lowercase, no trailing dot.
    Dns(String),
    /// An IP address: goes into an IP SAN.
    Ip(IpAddr),
}

impl LeafName {
    /// Parses a host: an IP literal (optionally in brackets) becomes [`LeafName::Ip`],
    /// anything else must be a valid DNS name and becomes [`LeafName::Dns`].
    pub fn parse(host: &str) -> Result<LeafName, LeafError> {
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(LeafName::Ip(ip));
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            });
        if !valid {
            return Err(LeafError::InvalidName(host.to_owned()));
        }
        Ok(LeafName::Dns(name))
    }
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafName::Dns(n) => f.write_str(n),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Errors of issuing leaves.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    /// The name is neither an IP address nor a valid DNS name.
    #[error("cannot issue a certificate for {0:?}: not a valid DNS name or IP address")]
    InvalidName(String),
    /// rcgen failed to build or sign the certificate.
    #[error("issuing a leaf certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the generated key.
    #[error("loading the leaf key into rustls failed: {0}")]
    Key(#[from] rustls::Error),
}

/// Bounds and options of the leaf cache.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    /// Most leaves kept; the least recently used are evicted beyond it.
    pub max_entries: usize,
    /// A cached leaf older than this is re-issued.
    pub max_age: Duration,
    /// Validity of a leaf from its (backdated) `notBefore`; capped at [`MAX_LEAF_VALIDITY`].
    pub validity: Duration,
}

impl Default for LeafOptions {
    fn default() -> Self {
        LeafOptions {
            max_entries: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            validity: MAX_LEAF_VALIDITY,
        }
    }
}

struct Entry {
    key: Arc<CertifiedKey>,
    issued: Instant,
    last_used: u64,
}

struct Cache {
    map: HashMap<LeafName, Entry>,
    tick: u64,
}

/// Issues and caches leaves; builds the per-connection rustls `ServerConfig`.
pub struct LeafIssuer {
    ca: RwLock<(Arc<Ca>, u64)>,
    leaf_key: KeyPair,
    signing_key: Arc<dyn SigningKey>,
    cache: Mutex<Cache>,
    options: LeafOptions,
    template: ServerConfig,
}

impl std::fmt::Debug for LeafIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafIssuer")
            .field("options", &self.options)
            .field("cached", &self.len())
            .finish_non_exhaustive()
    }
}

/// A `ResolvesServerCert` that always answers with one certificate.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A resolver that never answers; only a placeholder in the template configuration.
#[derive(Debug)]
struct NoCert;

impl ResolvesServerCert for NoCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

impl LeafIssuer {
    /// A new issuer for `ca` with a fresh per-process leaf key. `key_log` (for `--keylog`)
    /// receives the client-facing leg's secrets.
    pub fn new(
        ca: Arc<Ca>,
        options: LeafOptions,
        provider: Arc<CryptoProvider>,
        key_log: Option<Arc<dyn KeyLog>>,
    ) -> Result<LeafIssuer, LeafError> {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(der)?;
        let mut template = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCert));
        if let Some(k) = key_log {
            template.key_log = k;
        }
        Ok(LeafIssuer {
            ca: RwLock::new((ca, 0)),
            leaf_key,
            signing_key,
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                tick: 0,
            }),
            options,
            template,
        })
    }

    /// The CA leaves are currently signed with.
    pub fn ca(&self) -> Arc<Ca> {
        self.ca_and_generation().0
    }

    fn ca_and_generation(&self) -> (Arc<Ca>, u64) {
        match self.ca.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Swaps in a new CA and drops every cached leaf of the old one.
    pub fn replace_ca(&self, ca: Arc<Ca>) {
        {
            let mut g = match self.ca.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            g.0 = ca;
            g.1 += 1;
        }
        self.lock_cache().map.clear();
    }

    /// Number of cached leaves.
    pub fn len(&self) -> usize {
        self.lock_cache().map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leaf for `name`: from the cache when fresh, else newly issued (and cached).
    pub fn certified_key(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, LeafError> {
        {
            let mut cache = self.lock_cache();
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(e) = cache.map.get_mut(name)
                && e.issued.elapsed() < self.options.max_age
            {
                e.last_used = tick;
                return Ok(e.key.clone());
            }
        }
        let (ca, generation) = self.ca_and_generation();
        let key = Arc::new(self.issue(&ca, name)?);
        // Cache only if the CA was not swapped while we were signing.
        if self.ca_and_generation().1 == generation {
            let mut cache = self.lock_cache();
            cache.tick += 1;
            let tick = cache.tick;
            cache.map.insert(
                name.clone(),
                Entry {
                    key: key.clone(),
                    issued: Instant::now(),
                    last_used: tick,
                },
            );
            self.evict(&mut cache);
        }
        Ok(key)
    }

    fn evict(&self, cache: &mut Cache) {
        let max = self.options.max_entries.max(1);
        if cache.map.len() <= max {
            return;
        }
        let max_age = self.options.max_age;
        cache.map.retain(|_, e| e.issued.elapsed() < max_age);
        if cache.map.len() <= max {
            return;
        }
        // Drop the least recently used eighth (at least down to the bound) in one go, so
        // eviction work is amortised over many inserts.
        let target = max - max / 8;
        let mut ages: Vec<(u64, LeafName)> = cache
            .map
            .iter()
            .map(|(k, e)| (e.last_used, k.clone()))
            .collect();
        ages.sort_unstable_by_key(|(t, _)| *t);
        let remove = cache.map.len().saturating_sub(target);
        for (_, k) in ages.into_iter().take(remove) {
            cache.map.remove(&k);
        }
    }

    fn issue(&self, ca: &Ca, name: &LeafName) -> Result<CertifiedKey, LeafError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        match name {
            LeafName::Dns(n) => {
                if n.len() <= 64 {
                    dn.push(DnType::CommonName, n.as_str());
                }
                let ia5 = rcgen::string::Ia5String::try_from(n.as_str())
                    .map_err(|_| LeafError::InvalidName(n.clone()))?;
                params.subject_alt_names = vec![SanType::DnsName(ia5)];
            }
            LeafName::Ip(ip) => {
                dn.push(DnType::CommonName, ip.to_string());
                params.subject_alt_names = vec![SanType::IpAddress(*ip)];
            }
        }
        dn.push(DnType::OrganizationName, "Interpose");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        let validity = self.options.validity.min(MAX_LEAF_VALIDITY);
        let not_before = now - LEAF_BACKDATE;
        let mut not_after = not_before + validity;
        if not_after > ca.not_after() {
            not_after = ca.not_after();
        }
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&self.leaf_key, ca.issuer())?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone()],
            self.signing_key.clone(),
        ))
    }

    /// A rustls `ServerConfig` for one client connection: the leaf for `name` and exactly
    /// the ALPN protocol `alpn` (the one the upstream server chose), or none.
    pub fn server_config(
        &self,
        name: &LeafName,
        alpn: Option<&[u8]>,
    ) -> Result<Arc<ServerConfig>, LeafError> {
        let key = self.certified_key(name)?;
        let mut cfg = self.template.clone();
        cfg.cert_resolver = Arc::new(FixedCert(key));
        cfg.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
        Ok(Arc::new(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn issuer(options: LeafOptions) -> (tempfile::TempDir, LeafIssuer) {
        crate::tls::install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(Ca::create(dir.path()).expect("ca"));
        let li = LeafIssuer::new(ca, options, crate::tls::provider(), None).expect("issuer");
        (dir, li)
    }

    fn sans(key: &CertifiedKey) -> Vec<String> {
        let (_, x) = x509_parser::parse_x509_certificate(&key.cert[0]).expect("parse");
        let san = x
            .subject_alternative_name()
            .expect("ext ok")
            .expect("san present");
        san.value
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(b) => format!("ip:{b:?}"),
                other => format!("other:{other:?}"),
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn name_parsing_never_panics(s in ".{0,300}") {
            if let Ok(LeafName::Dns(n)) = LeafName::parse(&s) {
                proptest::prop_assert!(rcgen::string::Ia5String::try_from(n.as_str()).is_ok());
            }
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            LeafName::parse("Example.COM.").expect("dns"),
            LeafName::Dns("example.com".into())
        );
        assert_eq!(
            LeafName::parse("127.0.0.1").expect("ip"),
            LeafName::Ip("127.0.0.1".parse().expect("ip"))
        );
        assert_eq!(
            LeafName::parse("[::1]").expect("ip6"),
            LeafName::Ip("::1".parse().expect("ip"))
        );
        for bad in ["", "a..b", "exa mple.com", "-/x", "a.b/"] {
            assert!(LeafName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_leaf_has_dns_san_and_bounded_validity() {
        let (_d, li) = issuer(LeafOptions::default());
        let k = li
            .certified_key(&LeafName::parse("www.example.com").expect("name"))
            .expect("leaf");
        assert_eq!(sans(&k), vec!["dns:www.example.com"]);
        let (_, x) = x509_parser::parse_x509_certificate(&k.cert[0]).expect("parse");
        let nb = x.validity().not_before.to_datetime();
        let na = x.validity().not_after.to_datetime();
        assert!(na - nb <= time::Duration::days(199));
        let now = time::OffsetDateTime::now_utc();
        assert!(nb <= now - time::Duration::minutes(59));
        assert!(nb >= now - time::Duration::minutes(61));
        let bc = x.basic_constraints().expect("ext ok");
        assert!(bc.is_none_or(|b| !b.value.ca));
        // Signed by the CA, not self-signed.
        assert_eq!(x.issuer().to_string(), li.ca().subject());
        // The leaf key is not the CA key.
        let ca = li.ca();
        let (_, cax) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        assert_ne!(x.public_key().raw, cax.public_key().raw);
    }

    #[test]
    fn ip_leaf_has_only_ip_san() {
        let (_d, li) = issuer(LeafOptions::default());
        let k = li
            .certified_key(&LeafName::parse("10.1.2.3").expect("name"))
            .expect("leaf");
        assert_eq!(sans(&k), vec!["ip:[10, 1, 2, 3]"]);
    }

    #[test]
    fn cache_hits_and_distinct_serials() {
        let (_d, li) = issuer(LeafOptions::default());
        let a = LeafName::parse("a.example").expect("name");
        let b = LeafName::parse("b.example").expect("name");
        let ka = li.certified_key(&a).expect("leaf");
        let ka2 = li.certified_key(&a).expect("leaf");
        assert!(Arc::ptr_eq(&ka, &ka2));
        let kb = li.certified_key(&b).expect("leaf");
        let serial = |k: &CertifiedKey| {
            let (_, x) = x509_parser::parse_x509_certificate(&k.cert[0]).expect("parse");
            x.raw_serial().to_vec()
        };
        assert_ne!(serial(&ka), serial(&kb));
        assert_eq!(li.len(), 2);
    }

    #[test]
    fn count_bound_evicts_least_recently_used() {
        let (_d, li) = issuer(LeafOptions {
            max_entries: 16,
            ..LeafOptions::default()
        });
        let hot = LeafName::parse("hot.example").expect("name");
        let hot_key = li.certified_key(&hot).expect("leaf");
        for i in 0..40 {
            li.certified_key(&LeafName::parse(&format!("n{i}.example")).expect("name"))
                .expect("leaf");
            li.certified_key(&hot).expect("leaf");
        }
        assert!(li.len() <= 16, "{}", li.len());
        assert!(Arc::ptr_eq(
            &hot_key,
            &li.certified_key(&hot).expect("leaf")
        ));
    }

    #[test]
    fn age_bound_reissues() {
        let (_d, li) = issuer(LeafOptions {
            max_age: Duration::from_millis(1),
            ..LeafOptions::default()
        });
        let n = LeafName::parse("x.example").expect("name");
        let k1 = li.certified_key(&n).expect("leaf");
        std::thread::sleep(Duration::from_millis(5));
        let k2 = li.certified_key(&n).expect("leaf");
        assert!(!Arc::ptr_eq(&k1, &k2));
    }

    #[test]
    fn replace_ca_drops_old_leaves() {
        let (d, li) = issuer(LeafOptions::default());
        let n = LeafName::parse("x.example").expect("name");
        let k1 = li.certified_key(&n).expect("leaf");
        let new_ca = Arc::new(Ca::regenerate(d.path()).expect("regen"));
        li.replace_ca(new_ca.clone());
        assert!(li.is_empty());
        let k2 = li.certified_key(&n).expect("leaf");
        assert!(!Arc::ptr_eq(&k1, &k2));
        let (_, x) = x509_parser::parse_x509_certificate(&k2.cert[0]).expect("parse");
        let (_, cax) = x509_parser::parse_x509_certificate(new_ca.cert_der()).expect("parse");
        assert!(x.verify_signature(Some(cax.public_key())).is_ok());
    }

    #[test]
    fn server_config_has_exact_alpn() {
        let (_d, li) = issuer(LeafOptions::default());
        let n = LeafName::parse("x.example").expect("name");
        let cfg = li.server_config(&n, Some(b"h2")).expect("cfg");
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec()]);
        let cfg = li.server_config(&n, None).expect("cfg");
        assert!(cfg.alpn_protocols.is_empty());
    }
}
