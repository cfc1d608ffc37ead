//! Which `Host` and `Origin` headers the web server answers (sans-I/O).
//!
//! DNS rebinding: a page on `evil.example` can make its own name resolve to 127.0.0.1 and
//! then read this server's answers as same-origin. Its requests still carry
//! `Host: evil.example`, so only host names the server knows it is reached by are answered:
//! its bound `IP:PORT`, `127.0.0.1`, `[::1]` and `localhost` with the bound port, any IP
//! literal with the bound port when it listens on every address (an IP literal cannot be
//! rebound), and the names given with `--web-allow-host` / `--allow-host` (`NAME` with the
//! bound port, or `NAME:PORT` exactly, e.g. for an SSH tunnel's local port).
//!
//! Cross-origin calls: a gRPC-web POST whose `Origin` is not this very host is refused; the
//! server sends no CORS headers at all, so no other origin can read an answer either.

use std::net::{IpAddr, SocketAddr};

/// The accepted `Host` values of one listening address.
#[derive(Debug, Clone)]
pub struct HostCheck {
    port: u16,
    bound_ip: IpAddr,
    /// Extra names, lower case, with the port they are accepted on.
    names: Vec<(String, u16)>,
}

impl HostCheck {
    /// The check for a server bound to `bound`, also accepting `names` (`NAME` or
    /// `NAME:PORT`).
    pub fn new(bound: SocketAddr, names: &[String]) -> Self {
        let port = bound.port();
        let names = names
            .iter()
            .map(|n| {
                let (name, p) = split(n.trim());
                (name.to_ascii_lowercase(), p.unwrap_or(port))
            })
            .collect();
        Self {
            port,
            bound_ip: bound.ip(),
            names,
        }
    }

    /// Whether a request with this `Host` header (or HTTP/2 `:authority`) is answered.
    pub fn allows(&self, host: &str) -> bool {
        let (name, port) = split(host);
        // No port in Host means the scheme's default, 80.
        let port = port.unwrap_or(80);
        let name = name.to_ascii_lowercase();
        if self.names.iter().any(|(n, p)| *n == name && *p == port) {
            return true;
        }
        if port != self.port {
            return false;
        }
        if name == "localhost" {
            return true;
        }
        let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return false;
        };
        ip.is_loopback() || ip == self.bound_ip || self.bound_ip.is_unspecified()
    }

    /// Whether an `Origin` header is the origin of the page served under `host` (an already
    /// allowed `Host`): `http://HOST` or `https://HOST` (behind a TLS-terminating proxy).
    pub fn same_origin(host: &str, origin: &str) -> bool {
        let origin = origin.trim();
        let rest =
            strip_prefix_ci(origin, "http://").or_else(|| strip_prefix_ci(origin, "https://"));
        rest.is_some_and(|r| r.eq_ignore_ascii_case(host.trim()))
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `name[:port]` or `[v6][:port]` into the name (brackets kept) and the port, if any; a
/// port that does not parse makes the whole value a name, which then matches nothing.
fn split(host: &str) -> (&str, Option<u16>) {
    let host = host.trim();
    if host.starts_with('[') {
        return match host.rsplit_once("]:") {
            Some((name, port)) => match port.parse() {
                Ok(p) => (&host[..name.len() + 1], Some(p)),
                Err(_) => (host, None),
            },
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        // A second colon: an IPv6 literal without brackets, which no browser sends.
        Some((name, _)) if name.contains(':') => (host, None),
        Some((name, port)) => match port.parse() {
            Ok(p) => (name, Some(p)),
            Err(_) => (host, None),
        },
        None => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bound: &str, names: &[&str]) -> HostCheck {
        HostCheck::new(
            bound.parse().expect("addr"),
            &names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn loopback_names_with_the_bound_port_are_answered() {
        let c = check("127.0.0.1:50080", &[]);
        for ok in [
            "127.0.0.1:50080",
            "localhost:50080",
            "LocalHost:50080",
            "[::1]:50080",
            "127.0.0.2:50080",
        ] {
            assert!(c.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example:50080",
            "127.0.0.1:50081",
            "127.0.0.1",
            "localhost",
            "10.0.0.1:50080",
            "",
            "localhost:50080:1",
            "[::1]",
            "localhost.evil.example:50080",
        ] {
            assert!(!c.allows(refused), "{refused}");
        }
    }

    #[test]
    fn every_ip_literal_is_answered_when_bound_to_every_address() {
        let c = check("0.0.0.0:8080", &[]);
        assert!(c.allows("10.0.0.1:8080"));
        assert!(c.allows("[fe80::1]:8080"));
        assert!(!c.allows("lab.example:8080"));
        assert!(!c.allows("10.0.0.1:8081"));
        let c = check("10.1.2.3:8080", &[]);
        assert!(c.allows("10.1.2.3:8080"));
        assert!(!c.allows("10.1.2.4:8080"));
    }

    #[test]
    fn given_names_are_answered_on_their_port() {
        let c = check("127.0.0.1:50080", &["lab.example", "Tunnel.local:9000"]);
        assert!(c.allows("lab.example:50080"));
        assert!(c.allows("LAB.example:50080"));
        assert!(!c.allows("lab.example:9000"));
        assert!(c.allows("tunnel.local:9000"));
        assert!(!c.allows("tunnel.local:50080"));
        let c = check("127.0.0.1:80", &["lab.example"]);
        assert!(c.allows("lab.example"), "no port means 80");
    }

    #[test]
    fn only_the_pages_own_origin_is_same_origin() {
        let host = "127.0.0.1:50080";
        assert!(HostCheck::same_origin(host, "http://127.0.0.1:50080"));
        assert!(HostCheck::same_origin(host, "HTTPS://127.0.0.1:50080"));
        assert!(!HostCheck::same_origin(host, "http://127.0.0.1:50081"));
        assert!(!HostCheck::same_origin(host, "http://evil.example"));
        assert!(!HostCheck::same_origin(host, "null"));
        assert!(!HostCheck::same_origin(host, ""));
    }
}
