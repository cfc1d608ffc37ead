//! The two addresses of an exported stream: from the connection record, with one address
//! family per stream, documented placeholders for what is missing, and the decrypted-port
//! map for intercepted TLS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proto::common::Connection;

/// Server port of placeholder streams (the "discard" port: nothing to dissect).
pub const PLACEHOLDER_SERVER_PORT: u16 = 9;

/// Where an exported stream runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The record's server port when the decrypted-port map replaced it.
    pub original_port: Option<u16>,
}

/// A server-port replacement for decrypted TLS streams (`--decrypted-port 443=80`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub from: u16,
    pub to: u16,
}

impl Endpoints {
    /// The placeholder addresses of connection `id` whose record was cleared: client
    /// 198.18.H.L:49152+((id>>16) mod 16384), server 198.19.H.L:9 (H.L = the low 16 bits
    /// of the ID; RFC 2544's benchmarking range, never a real host). Stable per ID and
    /// distinct for IDs below 2^30.
    pub fn placeholder(id: u64) -> Self {
        Self {
            client: SocketAddr::new(placeholder_ip(18, id), placeholder_client_port(id)),
            server: SocketAddr::new(placeholder_ip(19, id), PLACEHOLDER_SERVER_PORT),
            original_port: None,
        }
    }

    /// The addresses of a recorded connection, with `ports` applied when its TLS was
    /// terminated. An unparseable client IP or a missing target IP falls back to the
    /// placeholder of that side; mixed families become IPv6 (IPv4-mapped).
    pub fn from_record(c: &Connection, ports: &[PortMap]) -> Self {
        let fallback = Self::placeholder(c.id);
        let client_ip = c.src_ip.parse::<IpAddr>().ok();
        let server_ip = c
            .dst_ip
            .parse::<IpAddr>()
            .or_else(|_| c.dst_host.parse::<IpAddr>())
            .ok();
        let (client_ip, server_ip) = match (client_ip, server_ip) {
            (Some(c), Some(s)) => one_family(c, s),
            (Some(c), None) => one_family(c, fallback.server.ip()),
            (None, Some(s)) => one_family(fallback.client.ip(), s),
            (None, None) => (fallback.client.ip(), fallback.server.ip()),
        };
        let record_port = u16::try_from(c.dst_port).unwrap_or(0);
        let mapped = ports
            .iter()
            // Only decrypted streams: a TLS connection that was not spliced (passthrough, a
            // failed handshake) holds TLS records, which Wireshark must still see as TLS.
            .find(|m| c.client_tls.is_some() && m.from == record_port)
            .map(|m| m.to);
        Self {
            client: SocketAddr::new(client_ip, u16::try_from(c.src_port).unwrap_or(0)),
            server: SocketAddr::new(server_ip, mapped.unwrap_or(record_port)),
            original_port: mapped.map(|_| record_port),
        }
    }
}

/// Both addresses in one family: an IPv4 address beside an IPv6 one becomes IPv4-mapped.
fn one_family(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V6(b)) => (IpAddr::V6(a.to_ipv6_mapped()), IpAddr::V6(b)),
        (IpAddr::V6(a), IpAddr::V4(b)) => (IpAddr::V6(a), IpAddr::V6(b.to_ipv6_mapped())),
        same => same,
    }
}

fn placeholder_ip(second_octet: u8, id: u64) -> IpAddr {
    let [hi, lo] = ((id & 0xffff) as u16).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(198, second_octet, hi, lo))
}

fn placeholder_client_port(id: u64) -> u16 {
    49152 + ((id >> 16) % 16384) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(src: &str, dst_ip: &str, host: &str, port: u32, tls: bool) -> Connection {
        Connection {
            id: 5,
            src_ip: src.into(),
            src_port: 40000,
            dst_ip: dst_ip.into(),
            dst_host: host.into(),
            dst_port: port,
            tls,
            ..Default::default()
        }
    }

    #[test]
    fn placeholders_are_stable_and_distinct() {
        assert_eq!(Endpoints::placeholder(7), Endpoints::placeholder(7));
        let p = Endpoints::placeholder(0x1_0203);
        assert_eq!(p.client, "198.18.2.3:49153".parse().unwrap());
        assert_eq!(p.server, "198.19.2.3:9".parse().unwrap());
        let mut seen = std::collections::HashSet::new();
        for id in (1..200_000u64).step_by(97).chain([1 << 29, (1 << 30) - 1]) {
            let p = Endpoints::placeholder(id);
            assert!(seen.insert((p.client, p.server)), "id {id} collides");
        }
    }

    #[test]
    fn mixed_families_become_ipv4_mapped_ipv6() {
        let e = Endpoints::from_record(&record("127.0.0.1", "::1", "h", 80, false), &[]);
        assert_eq!(e.client, "[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(e.server, "[::1]:80".parse().unwrap());
    }

    #[test]
    fn missing_target_ip_uses_the_host_literal_or_a_placeholder() {
        let e = Endpoints::from_record(&record("127.0.0.1", "", "10.1.2.3", 80, false), &[]);
        assert_eq!(e.server, "10.1.2.3:80".parse().unwrap());
        let e = Endpoints::from_record(&record("127.0.0.1", "", "example.com", 80, false), &[]);
        assert_eq!(e.server, "198.19.0.5:80".parse().unwrap());
    }

    #[test]
    fn decrypted_port_map_applies_to_decrypted_tls_only() {
        let map = [PortMap { from: 443, to: 80 }];
        let mut decrypted = record("127.0.0.1", "127.0.0.2", "h", 443, true);
        decrypted.client_tls = Some(Default::default());
        let tls = Endpoints::from_record(&decrypted, &map);
        assert_eq!(tls.server.port(), 80);
        assert_eq!(tls.original_port, Some(443));
        // TLS that was not decrypted (passthrough, a failed handshake) keeps its port.
        let raw = Endpoints::from_record(&record("127.0.0.1", "127.0.0.2", "h", 443, true), &map);
        assert_eq!(raw.server.port(), 443);
        assert_eq!(raw.original_port, None);
        let plain =
            Endpoints::from_record(&record("127.0.0.1", "127.0.0.2", "h", 443, false), &map);
        assert_eq!(plain.server.port(), 443);
        assert_eq!(plain.original_port, None);
    }
}
