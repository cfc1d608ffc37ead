//! Wire formats of the synthetic frames: Ethernet II, IPv4, IPv6, TCP and UDP headers with
//! their checksums, written into a caller's buffer (sans-I/O, no allocation per frame).

use std::net::{IpAddr, SocketAddr};

/// MAC address of the client side of every stream (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC address of the server side of every stream.
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The link MTU the segments are cut for.
pub const MTU: usize = 1500;
/// Ethernet II header length.
pub const ETHERNET_LEN: usize = 14;
/// TCP header length without options.
pub const TCP_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The IP header length of a family.
pub fn ip_header_len(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 20,
        IpAddr::V6(_) => 40,
    }
}

/// The largest TCP payload per segment for a family at [`MTU`].
pub fn mss(ip: IpAddr) -> usize {
    MTU - ip_header_len(ip) - TCP_LEN
}

/// One end of a frame: its MAC and IP address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Station {
    pub mac: [u8; 6],
    pub addr: SocketAddr,
}

/// The TCP header fields a segment sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The MSS option's value, on SYN segments.
    pub mss: Option<u16>,
}

/// Replaces `out` with an Ethernet frame carrying one TCP segment from `src` to `dst`.
///
/// Both stations must be of one address family (the caller maps them first). `ip_id` is the
/// IPv4 identification field (unused for IPv6).
pub fn tcp_frame(
    out: &mut Vec<u8>,
    src: &Station,
    dst: &Station,
    ip_id: u16,
    tcp: &TcpHeader,
    payload: &[u8],
) {
    let options = if tcp.mss.is_some() { 4 } else { 0 };
    let l4_len = TCP_LEN + options + payload.len();
    out.clear();
    let l4_start = ip_frame_head(out, src, dst, ip_id, IPPROTO_TCP, l4_len);
    out.extend_from_slice(&src.addr.port().to_be_bytes());
    out.extend_from_slice(&dst.addr.port().to_be_bytes());
    out.extend_from_slice(&tcp.seq.to_be_bytes());
    out.extend_from_slice(&tcp.ack.to_be_bytes());
    let offset_words = u8::try_from((TCP_LEN + options) / 4).unwrap_or(5);
    out.push(offset_words << 4);
    out.push(tcp.flags);
    out.extend_from_slice(&tcp.window.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    if let Some(mss) = tcp.mss {
        out.extend_from_slice(&[2, 4]);
        out.extend_from_slice(&mss.to_be_bytes());
    }
    out.extend_from_slice(payload);
    let sum = l4_checksum(src.addr.ip(), dst.addr.ip(), IPPROTO_TCP, &out[l4_start..]);
    out[l4_start + 16..l4_start + 18].copy_from_slice(&sum.to_be_bytes());
}

/// Replaces `out` with an Ethernet frame carrying one UDP datagram from `src` to `dst`.
/// `payload` must fit an IP packet (at most 65,467 bytes leaves room for any header).
pub fn udp_frame(out: &mut Vec<u8>, src: &Station, dst: &Station, ip_id: u16, payload: &[u8]) {
    let l4_len = UDP_LEN + payload.len();
    out.clear();
    let l4_start = ip_frame_head(out, src, dst, ip_id, IPPROTO_UDP, l4_len);
    out.extend_from_slice(&src.addr.port().to_be_bytes());
    out.extend_from_slice(&dst.addr.port().to_be_bytes());
    out.extend_from_slice(&u16::try_from(l4_len).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let mut sum = l4_checksum(src.addr.ip(), dst.addr.ip(), IPPROTO_UDP, &out[l4_start..]);
    if sum == 0 {
        sum = 0xffff; // zero means "no checksum" in UDP
    }
    out[l4_start + 6..l4_start + 8].copy_from_slice(&sum.to_be_bytes());
}

/// Writes the Ethernet and IP headers for an `l4_len`-byte payload; returns where the
/// transport header starts.
fn ip_frame_head(
    out: &mut Vec<u8>,
    src: &Station,
    dst: &Station,
    ip_id: u16,
    proto: u8,
    l4_len: usize,
) -> usize {
    out.extend_from_slice(&dst.mac);
    out.extend_from_slice(&src.mac);
    match (src.addr.ip(), dst.addr.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let start = out.len();
            let total = u16::try_from(20 + l4_len).unwrap_or(u16::MAX);
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&ip_id.to_be_bytes());
            out.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]); // DF, TTL 64, checksum 0
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let sum = finish(sum_words(0, &out[start..start + 20]));
            out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
        }
        (s, d) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&u16::try_from(l4_len).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(&[proto, 64]);
            out.extend_from_slice(&v6_octets(s));
            out.extend_from_slice(&v6_octets(d));
        }
    }
    out.len()
}

/// The IPv6 form of an address (IPv4 as IPv4-mapped).
pub fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The TCP/UDP checksum of `segment` (its checksum field zero) with the pseudo-header.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u64;
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum_words(sum_words(0, &s.octets()), &d.octets()),
        (s, d) => sum_words(sum_words(0, &v6_octets(s)), &v6_octets(d)),
    };
    acc += u64::from(proto) + len;
    finish(sum_words(acc, segment))
}

/// Adds `data` as big-endian 16-bit words (odd tail padded with zero) to `acc`.
fn sum_words(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Four 16-bit words at once: fold the 64-bit word into 32-bit halves first.
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits and complements it.
fn finish(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Whether an IPv4 header's checksum is valid (sums to zero).
pub fn ipv4_header_ok(header: &[u8]) -> bool {
    finish(sum_words(0, header)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn station(mac: [u8; 6], addr: &str) -> Station {
        Station {
            mac,
            addr: addr.parse().expect("socket address"),
        }
    }

    /// The reference: one 16-bit word at a time, as RFC 1071 describes it.
    fn rfc1071(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn ipv4_tcp_frame_has_valid_lengths_and_checksums() {
        let c = station(CLIENT_MAC, "10.0.0.1:40000");
        let s = station(SERVER_MAC, "10.0.0.2:80");
        let hdr = TcpHeader {
            seq: 1,
            ack: 2,
            flags: flags::ACK | flags::PSH,
            window: 65535,
            mss: None,
        };
        let mut f = Vec::new();
        tcp_frame(&mut f, &c, &s, 7, &hdr, b"hello");
        assert_eq!(f.len(), 14 + 20 + 20 + 5);
        assert_eq!(&f[0..6], &SERVER_MAC);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 45);
        assert!(ipv4_header_ok(&f[14..34]));
        // The checksum over pseudo-header and segment, checksum included, is zero.
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6, 0, 25];
        pseudo.extend_from_slice(&f[34..]);
        assert_eq!(rfc1071(&pseudo), 0);
    }

    #[test]
    fn ipv6_udp_frame_checksum_verifies() {
        let c = station(CLIENT_MAC, "[::1]:5353");
        let s = station(SERVER_MAC, "[2001:db8::2]:53");
        let mut f = Vec::new();
        udp_frame(&mut f, &c, &s, 0, b"odd");
        assert_eq!(f.len(), 14 + 40 + 8 + 3);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 11);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[22..54]);
        pseudo.extend_from_slice(&[0, 0, 0, 11, 0, 0, 0, 17]);
        pseudo.extend_from_slice(&f[54..]);
        assert_eq!(rfc1071(&pseudo), 0);
    }

    proptest::proptest! {
        #[test]
        fn fast_sum_matches_rfc1071(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
            proptest::prop_assert_eq!(finish(sum_words(0, &data)), rfc1071(&data));
        }
    }
}
