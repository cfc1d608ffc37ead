//! Name resolution for CONNECT and UDP targets.
//!
//! Lookups are asynchronous (hickory-resolver), so a name server that never answers holds
//! only the lookups waiting on it, never a thread pool that every other lookup needs (the
//! system resolver behind `tokio::net::lookup_host` runs on tokio's blocking pool, which a
//! few hundred stalled names exhaust). Each lookup is bounded in time, and each client IP in
//! how many lookups it may have in progress, so one client's stalled names cannot take the
//! proxy's sockets and memory: what a client asks beyond its share fails at once.
//!
//! The resolver reads `/etc/resolv.conf` (name servers, search domains, options) unless
//! name servers are given (`--dns`), and `/etc/hosts` either way (once, at start);
//! `localhost` and `*.localhost` resolve to loopback (RFC 6761). Names found there and
//! numeric hosts, including the shorthand IPv4 forms `getaddrinfo` accepts (`127.1`,
//! `2130706433`, `0x7f.1`), never reach DNS and take no lookup slot: a client whose share
//! is taken by stalled names can still reach `localhost`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use hickory_resolver::{
    Hosts, TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::{
        op::Query,
        rr::{Name, RecordType},
    },
};

/// Default bound on one lookup (all its queries and retries together).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of lookups one client IP may have in progress at once.
pub const DEFAULT_PER_CLIENT: usize = 256;

/// How to resolve names.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Name servers to ask instead of the system's; empty: those of `/etc/resolv.conf`.
    pub servers: Vec<SocketAddr>,
    /// Bound on one lookup.
    pub timeout: Duration,
    /// Lookups one client IP may have in progress at once.
    pub per_client: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            per_client: DEFAULT_PER_CLIENT,
        }
    }
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the DNS resolver: {0}")]
pub struct DnsConfigError(String);

/// Why a name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The lookup took longer than its bound.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The client already has its share of lookups in progress.
    #[error("{client} already has {limit} lookups in progress (--dns-per-client)")]
    TooMany {
        /// The client IP.
        client: IpAddr,
        /// Its share.
        limit: usize,
    },
    /// The name exists but has no address.
    #[error("no addresses")]
    NoAddresses,
    /// The name servers answered with an error, or could not be asked.
    #[error("{0}")]
    Failed(String),
}

/// The proxy's resolver, shared by every connection.
pub struct Dns {
    resolver: TokioResolver,
    /// `/etc/hosts` as read at start.
    hosts: Hosts,
    timeout: Duration,
    per_client: usize,
    /// Lookups in progress per client IP (absent: none).
    in_progress: Mutex<HashMap<IpAddr, usize>>,
}

impl Dns {
    /// A resolver as `cfg` says; reads the system configuration unless servers are given.
    pub fn new(cfg: &DnsConfig) -> Result<Self, DnsConfigError> {
        let given = |servers: &[SocketAddr]| {
            let servers = servers.iter().map(|s| name_server(*s)).collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut builder = if !cfg.servers.is_empty() {
            given(&cfg.servers)
        } else {
            match TokioResolver::builder(TokioRuntimeProvider::default()) {
                Ok(b) => b,
                Err(e) => {
                    // What the system resolver does without a resolv.conf.
                    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 53));
                    tracing::warn!(
                        "reading /etc/resolv.conf: {e}; asking {local} as the system resolver \
                         would (name servers can be given with --dns)"
                    );
                    given(&[local])
                }
            }
        };
        let opts = builder.options_mut();
        // A and AAAA together, IPv4 first: what most local test servers listen on.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = opts.timeout.min(cfg.timeout);
        let resolver = builder.build().map_err(|e| DnsConfigError(e.to_string()))?;
        Ok(Self {
            resolver,
            hosts: Hosts::from_system().unwrap_or_default(),
            timeout: cfg.timeout,
            per_client: cfg.per_client.max(1),
            in_progress: Mutex::new(HashMap::new()),
        })
    }

    /// The addresses of `host` (a name or a numeric address) with `port`, looked up for
    /// `client`.
    pub async fn lookup(
        &self,
        client: IpAddr,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, DnsError> {
        if let Some(ip) = numeric_host(host) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.local(host) {
            return Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect());
        }
        let _slot = self.slot(client.to_canonical())?;
        let found = tokio::time::timeout(self.timeout, self.resolver.lookup_ip(host))
            .await
            .map_err(|_| DnsError::TimedOut(self.timeout))?
            .map_err(|e| DnsError::Failed(e.to_string()))?;
        let addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        if addrs.is_empty() {
            return Err(DnsError::NoAddresses);
        }
        Ok(addrs)
    }

    /// The addresses of `host` known without asking a name server: from `/etc/hosts`, or
    /// loopback for `localhost` and its subdomains.
    fn local(&self, host: &str) -> Option<Vec<IpAddr>> {
        let name = Name::from_utf8(host).ok()?;
        let mut ips = Vec::new();
        for t in [RecordType::A, RecordType::AAAA] {
            if let Some(found) = self
                .hosts
                .lookup_static_host(&Query::query(name.clone(), t))
            {
                ips.extend(found.answers().iter().filter_map(|r| r.data.ip_addr()));
            }
        }
        let bare = host.trim_end_matches('.').to_ascii_lowercase();
        if ips.is_empty() && (bare == "localhost" || bare.ends_with(".localhost")) {
            ips = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        }
        (!ips.is_empty()).then_some(ips)
    }

    /// Takes one of `client`'s lookup slots, or says it has none left.
    fn slot(&self, client: IpAddr) -> Result<Slot<'_>, DnsError> {
        let mut map = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(client).or_insert(0);
        if *n >= self.per_client {
            return Err(DnsError::TooMany {
                client,
                limit: self.per_client,
            });
        }
        *n += 1;
        Ok(Slot { dns: self, client })
    }

    /// Lookups `client` has in progress.
    pub fn in_progress(&self, client: IpAddr) -> usize {
        let map = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&client.to_canonical()).copied().unwrap_or(0)
    }
}

/// One lookup in progress for a client; gives its slot back when dropped (also when the
/// lookup is abandoned: timed out, or its connection shut down).
struct Slot<'a> {
    dns: &'a Dns,
    client: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut map = self
            .dns
            .in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

/// A name server at `addr`, over UDP and (for truncated answers) TCP on the same port.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

/// `--dns ADDR`: a name server as `IP` (port 53) or `IP:PORT`.
pub fn server_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not a name server address (IP or IP:PORT)"))
}

/// The address a numeric host stands for, as `getaddrinfo` reads it: an IPv6 or dotted-quad
/// IPv4 address, or the IPv4 shorthand of `inet_aton` (one to four parts, each decimal,
/// octal with a leading `0`, or hex with `0x`; the last part fills the remaining bytes).
pub fn numeric_host(host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for p in &parts {
        values.push(inet_aton_part(p)?);
    }
    let (last, head) = values.split_last()?;
    if head.iter().any(|v| *v > 0xff) {
        return None;
    }
    let tail_bits = 32 - 8 * head.len() as u32;
    if tail_bits < 32 && *last >> tail_bits != 0 {
        return None;
    }
    let mut addr = u32::try_from(*last).ok()?;
    for (i, v) in head.iter().enumerate() {
        addr |= (*v as u32) << (24 - 8 * i);
    }
    Some(IpAddr::V4(Ipv4Addr::from(addr)))
}

/// One part of an `inet_aton` address: decimal, `0`-prefixed octal or `0x`-prefixed hex.
fn inet_aton_part(p: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or(p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() || digits.len() > 12 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests;
