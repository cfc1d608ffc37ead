//! What every connection handler shares: the node name, SOCKS credentials, the reporter,
//! the ID pool, the process resolver, the refused addresses and the TLS splice.

use std::{net::SocketAddr, sync::Arc};

use crate::{ids::IdPool, process::Resolver, report::Reporter, tls::Splicer};

/// What every handler shares.
pub struct Shared {
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
    /// Addresses CONNECT must never reach: the SOCKS listener itself and `Config::refuse`.
    pub refuse: Vec<SocketAddr>,
    /// The TLS splice; `None` relays everything as plain TCP.
    pub splicer: Option<Arc<Splicer>>,
}
