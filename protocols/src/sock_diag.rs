//! The sock_diag netlink messages (what `ss` uses), sans I/O: the request for the inode of
//! one TCP socket by its exact address pair, and the kernel's reply.
//!
//! Reading `/proc/net/tcp` makes the kernel walk and print its whole socket table, which
//! under a high connection rate (tens of thousands of TIME_WAIT entries) cost a third of the
//! proxy's CPU; an exact sock_diag request is one hash lookup. The messages are built and
//! parsed by pure functions ([`request`], [`parse_reply`]); proxy-core's `sock_diag::SockDiag`
//! is the thin socket shell around them (Linux only: elsewhere opening it fails and the
//! caller falls back to `/proc/net/tcp`).

use std::{io, net::SocketAddr};

pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
pub(crate) const NLMSG_ERROR: u16 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
/// `nlmsghdr` (16 bytes) + `inet_diag_req_v2` (8 bytes + the 48-byte `inet_diag_sockid`).
const REQUEST_LEN: usize = 16 + 8 + 48;
/// Offset of `idiag_inode` in a reply: `nlmsghdr`, then `inet_diag_msg` (family, state,
/// timer, retrans, sockid, expires, rqueue, wqueue, uid, inode).
pub(crate) const INODE_AT: usize = 16 + 4 + 48 + 4 * 4;

/// The request for the socket whose local address is `local` and remote address `remote`
/// (both of the same family; IPv4-mapped IPv6 addresses must be given as IPv4).
pub fn request(local: SocketAddr, remote: SocketAddr, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(REQUEST_LEN);
    // nlmsghdr
    m.extend_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states (every state)
    m.push(if local.is_ipv4() { AF_INET } else { AF_INET6 });
    m.push(IPPROTO_TCP);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses in network order, interface, and the cookie
    // INET_DIAG_NOCOOKIE (an exact lookup then matches on the addresses alone).
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    for a in [local, remote] {
        let mut ip = [0u8; 16];
        match a {
            SocketAddr::V4(v4) => ip[..4].copy_from_slice(&v4.ip().octets()),
            SocketAddr::V6(v6) => ip = v6.ip().octets(),
        }
        m.extend_from_slice(&ip);
    }
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0xff; 8]);
    m
}

/// What a reply says.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The socket's inode.
    Inode(u64),
    /// The kernel has no such socket (the client closed meanwhile).
    NotFound,
    /// A reply to another (earlier, timed-out) request.
    Stale,
}

/// What a reply to [`request`] numbered `seq` says; an error for a malformed reply.
pub fn parse_reply(reply: &[u8], seq: u32) -> io::Result<Answer> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let u32_at = |at: usize| -> io::Result<u32> {
        reply
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .ok_or_else(|| bad("reply too short"))
    };
    let kind = reply
        .get(4..6)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or_else(|| bad("reply too short"))?;
    if u32_at(8)? != seq {
        return Ok(Answer::Stale);
    }
    match kind {
        // The kernel answers a lookup of a socket it does not have with an error (ENOENT).
        NLMSG_ERROR => Ok(Answer::NotFound),
        SOCK_DIAG_BY_FAMILY => Ok(Answer::Inode(u64::from(u32_at(INODE_AT)?))),
        other => Err(bad(&format!("unexpected message type {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_kernel_layout() {
        let m = request(
            "127.0.0.1:4660".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
            7,
        );
        assert_eq!(m.len(), REQUEST_LEN);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..18], &[AF_INET, IPPROTO_TCP]);
        assert_eq!(&m[24..28], &[0x12, 0x34, 0, 80]);
        assert_eq!(&m[28..32], &[127, 0, 0, 1]);
        assert_eq!(&m[32..44], &[0; 12]);
        assert_eq!(&m[44..48], &[127, 0, 0, 2]);
        assert_eq!(&m[64..72], &[0xff; 8]);
        let v6 = request("[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap(), 1);
        assert_eq!(v6[16], AF_INET6);
        assert_eq!(v6[43], 1);
    }

    #[test]
    fn replies_are_checked() {
        let mut r = vec![0u8; INODE_AT + 4];
        r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        r[8..12].copy_from_slice(&9u32.to_ne_bytes());
        r[INODE_AT..].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(parse_reply(&r, 9).unwrap(), Answer::Inode(4242));
        assert_eq!(parse_reply(&r, 8).unwrap(), Answer::Stale);
        assert!(parse_reply(&r[..INODE_AT], 9).is_err());
        assert!(parse_reply(&r[..3], 9).is_err());
        r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_reply(&r[..20], 9).unwrap(), Answer::NotFound);
        r[4..6].copy_from_slice(&99u16.to_ne_bytes());
        assert!(parse_reply(&r, 9).is_err());
    }

    proptest::proptest! {
        /// Every request carries its family, sequence number, ports and addresses where the
        /// kernel reads them, and says its own length.
        #[test]
        fn requests_carry_what_they_ask_for(
            local in proptest::prelude::any::<SocketAddr>(),
            remote_port in proptest::prelude::any::<u16>(),
            seq in proptest::prelude::any::<u32>(),
        ) {
            let remote = SocketAddr::new(local.ip(), remote_port);
            let m = request(local, remote, seq);
            proptest::prop_assert_eq!(m.len(), REQUEST_LEN);
            proptest::prop_assert_eq!(&m[0..4], &(REQUEST_LEN as u32).to_ne_bytes());
            proptest::prop_assert_eq!(&m[8..12], &seq.to_ne_bytes());
            proptest::prop_assert_eq!(m[16], if local.is_ipv4() { AF_INET } else { AF_INET6 });
            proptest::prop_assert_eq!(&m[24..26], &local.port().to_be_bytes());
            proptest::prop_assert_eq!(&m[26..28], &remote_port.to_be_bytes());
            let ip = match local.ip() {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            proptest::prop_assert_eq!(&m[28..28 + ip.len()], &ip[..]);
            proptest::prop_assert_eq!(&m[44..44 + ip.len()], &ip[..]);
        }

        /// A reply of any length past the inode field yields that inode for its own request
        /// and is stale for any other.
        #[test]
        fn replies_yield_their_inode(
            seq in proptest::prelude::any::<u32>(),
            other in proptest::prelude::any::<u32>(),
            inode in proptest::prelude::any::<u32>(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut r = vec![0u8; INODE_AT + 4];
            r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
            r[8..12].copy_from_slice(&seq.to_ne_bytes());
            r[INODE_AT..].copy_from_slice(&inode.to_ne_bytes());
            r.extend_from_slice(&tail);
            proptest::prop_assert_eq!(parse_reply(&r, seq).ok(), Some(Answer::Inode(inode.into())));
            if other != seq {
                proptest::prop_assert_eq!(parse_reply(&r, other).ok(), Some(Answer::Stale));
            }
        }
    }
}
