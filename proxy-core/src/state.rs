//! What every connection handler shares: the node name, SOCKS credentials, the reporter,
//! the ID pool, the process resolver, the name resolver, the refused addresses, the TLS splice, the intercept
//! holder, the upstream routes and the HTTP CONNECT port.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    chain::Routes, dns::Dns, hold::Holder, ids::IdPool, process::Resolver, report::Reporter,
    tls::Splicer,
};

/// The proxy process's state that every connection handler shares.
pub struct ProxyState {
    /// This proxy's node name.
    pub node: String,
    /// Required SOCKS credentials, if any.
    pub auth: Option<(String, String)>,
    /// Where events go.
    pub reporter: Reporter,
    /// Where connection IDs come from.
    pub ids: IdPool,
    /// Client process lookups.
    pub resolver: Resolver,
    /// Name lookups for CONNECT and UDP targets.
    pub dns: Dns,
    /// Addresses CONNECT must never reach: the SOCKS listener itself and `Config::refuse`.
    pub refuse: Vec<SocketAddr>,
    /// The TLS splice; `None` relays everything as plain TCP.
    pub splicer: Option<Arc<Splicer>>,
    /// Follows the intercept service; `None` holds nothing.
    pub holder: Option<Arc<Holder>>,
    /// Which targets go through which upstream proxy.
    pub routes: Routes,
    /// The HTTP CONNECT listener (`--http`), named to HTTP clients that reach the SOCKS port.
    pub http: Option<SocketAddr>,
    /// Client addresses already warned about sending HTTP to the SOCKS port.
    pub http_warned: Mutex<HashSet<IpAddr>>,
    /// This proxy's own replays, announced by their local address.
    pub replays: crate::replay::Pending,
}

/// Most client addresses remembered in [`ProxyState::http_warned`]; beyond it the set starts
/// over (a client may then be warned about again, never forgotten silently forever).
pub const MAX_HTTP_WARNED: usize = 4096;

impl ProxyState {
    /// Whether `ip` is to be warned about sending HTTP to the SOCKS port: the first time.
    pub fn first_http_on_socks(&self, ip: IpAddr) -> bool {
        let Ok(mut seen) = self.http_warned.lock() else {
            return true;
        };
        if seen.len() >= MAX_HTTP_WARNED {
            seen.clear();
        }
        seen.insert(ip)
    }
}
