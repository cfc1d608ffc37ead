//! What every connection handler shares: the node name, SOCKS credentials, the reporter,
//! the ID pool, the process resolver, the name resolver, the refused addresses, the TLS splice and the intercept
//! holder.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    dns::Dns, hold::Holder, ids::IdPool, process::Resolver, report::Reporter, tls::Splicer,
};

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
    /// Name lookups for CONNECT and UDP targets.
    pub dns: Dns,
    /// Addresses CONNECT must never reach: the SOCKS listener itself and `Config::refuse`.
    pub refuse: Vec<SocketAddr>,
    /// The TLS splice; `None` relays everything as plain TCP.
    pub splicer: Option<Arc<Splicer>>,
    /// Follows the intercept service; `None` holds nothing.
    pub holder: Option<Arc<Holder>>,
    /// This proxy's own replays, announced by their local address.
    pub replays: crate::replay::Pending,
}
