//! The web view's server: the page, embedded in the binary, and gRPC-web forwarded to the
//! Interpose gRPC services. The page is one more gRPC client; there is no second API.
//!
//! # The contract between this crate and the page (`web/ui/`)
//! - The page's sources live in `web/ui/` (package.json, its lock file, the vite config,
//!   `src/`, `tests/`); its build output in `web/ui/dist/` (`index.html` plus hashed files
//!   under `assets/`), committed. `build.rs` embeds every file of `web/ui/dist/` at compile
//!   time, so `cargo build` alone makes a binary that serves the page; it never runs npm.
//! - One address (HTTP/1.1, and HTTP/2 without TLS) serves:
//!   - `GET /` (and `/index.html`): the page, `Cache-Control: no-cache`;
//!     `GET /assets/*`: hashed files, `Cache-Control: public, max-age=31536000, immutable`;
//!     other files of `dist/` at their path; content types by extension ([`assets`]).
//!   - `POST /SERVICE/METHOD` with `content-type: application/grpc-web+proto` (or
//!     `application/grpc-web`, `application/grpc-web-text`, `application/grpc-web-text+proto`):
//!     the gRPC-web protocol, translated by `tonic_web` and forwarded unchanged as gRPC to
//!     the service that owns it ([`forward`]): `interpose.registry.v1.Registry` (with
//!     failover across replicas), `interpose.intercept.v1.Intercept`,
//!     `interpose.export.v1.Export`, `interpose.ca.v1.CertificateAuthority`. Server streams
//!     (`WatchConnections`, `WatchHeld`, `WatchConfig`, `FollowHistory`, `ExportCapture`)
//!     stream through message by message. Only the methods proxies call (`Ingest`,
//!     `LeaseIds`, `Hold`) are refused (`PERMISSION_DENIED`), other services are
//!     `UNIMPLEMENTED`.
//!   - The page authenticates each call with the header `authorization: Bearer TOKEN`; the
//!     services check it (`UNAUTHENTICATED` without it). No cookies are set or read.
//! - `interpose up` prints ` web=http://IP:PORT/#token=TOKEN` as the last field of its ready
//!   line (no `#token=` with `--no-auth`); the token is percent-encoded (`encodeURIComponent`
//!   rules). The page reads the fragment, keeps the token, and removes the fragment from the
//!   address bar.
//! - Security ([`host`], [`server`]): requests whose `Host` is not one this server is reached
//!   by are refused with 421 and one line (DNS rebinding); a gRPC-web POST whose `Origin` is
//!   another origin (or `Sec-Fetch-Site` says cross-site) is refused with 403; no CORS
//!   headers, `OPTIONS` is 405. Every answer carries [`server::CSP`],
//!   `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
//!   `X-Frame-Options: DENY`, `Cross-Origin-Opener-Policy` and
//!   `Cross-Origin-Resource-Policy: same-origin`. Loopback by default; beyond loopback only
//!   with a token.
//! - Memory bounds: [`limits`].

pub mod assets;
pub mod forward;
pub mod host;
pub mod limits;
pub mod server;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use forward::Backends;
pub use server::WebServer;

/// The web view's default address in `interpose up` and `interpose web`.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50080);

/// Why the web view could not serve.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The listen address could not be bound.
    #[error(
        "binding the web view on {addr}: {source} (choose another with --web ADDR, or --no-web)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A backend URL is not usable.
    #[error("the web view's backends: {0}")]
    Backend(#[from] platform::client::ClientError),
}

/// `interpose up`'s web view options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WebArgs {
    /// Where the web view (the page, and gRPC-web to every service) listens; port 0 picks a
    /// free port. Beyond loopback it needs a token. [default: 127.0.0.1:50080, or a free
    /// port when that one is taken]
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = platform::serve::listen_addr,
        overrides_with_all = ["web", "no_web"]
    )]
    pub web: Option<SocketAddr>,
    /// Serve no web view.
    #[arg(long, overrides_with_all = ["web", "no_web"])]
    pub no_web: bool,
    /// Another host name the web view answers to (it refuses every other Host header, a
    /// guard against DNS rebinding): NAME on the web port, or NAME:PORT (e.g. an SSH
    /// tunnel's localhost:9000). Repeatable.
    #[arg(long, value_name = "NAME[:PORT]")]
    pub web_allow_host: Vec<String>,
}

/// The page's URL for a server bound to `addr`, with `token` once in the fragment.
pub fn page_url(addr: SocketAddr, token: Option<&str>) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let base = format!("http://{}/", SocketAddr::new(ip, addr.port()));
    match token.filter(|t| !t.is_empty()) {
        Some(t) => format!("{base}#token={}", percent_encode(t)),
        None => base,
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (what JavaScript's
/// `decodeURIComponent` undoes).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_carries_the_token_in_the_fragment() {
        let a: SocketAddr = "127.0.0.1:50080".parse().unwrap();
        assert_eq!(
            page_url(a, Some("ab12")),
            "http://127.0.0.1:50080/#token=ab12"
        );
        assert_eq!(page_url(a, None), "http://127.0.0.1:50080/");
        assert_eq!(page_url(a, Some("")), "http://127.0.0.1:50080/");
        assert_eq!(
            page_url(a, Some("a b/c#d%")),
            "http://127.0.0.1:50080/#token=a%20b%2Fc%23d%25"
        );
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert_eq!(page_url(any, None), "http://127.0.0.1:1/");
        let v6: SocketAddr = "[::]:2".parse().unwrap();
        assert_eq!(page_url(v6, None), "http://[::1]:2/");
    }
}
