//! SOCKS5 wire format (RFC 1928, RFC 1929), sans I/O.
//!
//! Every parser takes the bytes received so far and answers `Ok(None)` when it needs more,
//! `Ok(Some((message, consumed)))` when a whole message is there, or a typed [`Socks5Error`].
//! Encoders append to a `Vec<u8>`. Nothing here touches a socket, so every function is
//! tested directly (unit tests and property tests at the bottom). The async shell that drives
//! these over a stream is proxy-core's `handshake`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Protocol version byte of SOCKS5.
pub const VERSION: u8 = 0x05;
/// Version byte of the RFC 1929 username/password sub-negotiation.
pub const AUTH_VERSION: u8 = 0x01;

/// Authentication method: none required.
pub const METHOD_NONE: u8 = 0x00;
/// Authentication method: username/password (RFC 1929).
pub const METHOD_USERPASS: u8 = 0x02;
/// Method-selection answer: none of the offered methods is acceptable.
pub const METHOD_UNACCEPTABLE: u8 = 0xFF;

const ATYP_V4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_V6: u8 = 0x04;

/// A malformed or unsupported SOCKS5 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    /// The version byte is not the expected one (5, or 1 for RFC 1929).
    #[error("unsupported SOCKS version {0:#04x} (expected {1:#04x})")]
    BadVersion(u8, u8),
    /// The greeting offers no authentication method at all.
    #[error("SOCKS greeting offers no authentication method")]
    NoMethods,
    /// The address type byte is none of IPv4, domain, IPv6.
    #[error("unsupported SOCKS address type {0:#04x}")]
    BadAddressType(u8),
    /// A domain name of length zero.
    #[error("empty domain name in SOCKS request")]
    EmptyDomain,
    /// A domain name that is not valid UTF-8.
    #[error("domain name in SOCKS request is not valid UTF-8")]
    BadDomain,
    /// An RFC 1929 username or password of length zero.
    #[error("empty username or password in SOCKS authentication")]
    EmptyCredential,
    /// A UDP datagram shorter than its header says.
    #[error("UDP datagram too short for its SOCKS header")]
    ShortDatagram,
}

/// SOCKS5 request commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (0x01): a TCP stream to the target.
    Connect,
    /// BIND (0x02): not supported by Interpose (answered with 0x07).
    Bind,
    /// UDP ASSOCIATE (0x03).
    UdpAssociate,
    /// Any other value (answered with 0x07).
    Other(u8),
}

impl Command {
    fn from_byte(b: u8) -> Self {
        match b {
            0x01 => Command::Connect,
            0x02 => Command::Bind,
            0x03 => Command::UdpAssociate,
            other => Command::Other(other),
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Command::Connect => 0x01,
            Command::Bind => 0x02,
            Command::UdpAssociate => 0x03,
            Command::Other(b) => b,
        }
    }
}

/// A target address as a SOCKS message names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// An IP literal and port.
    Ip(SocketAddr),
    /// A domain name and port, to be resolved by the proxy.
    Domain(String, u16),
}

impl Addr {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Addr::Ip(a) => a.port(),
            Addr::Domain(_, p) => *p,
        }
    }

    /// The host as the client named it (IP literal or domain name), without the port.
    pub fn host(&self) -> String {
        match self {
            Addr::Ip(a) => a.ip().to_string(),
            Addr::Domain(d, _) => d.clone(),
        }
    }

    /// Appends the ATYP, address and port encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Addr::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_V4);
                out.extend_from_slice(&a.ip().octets());
            }
            Addr::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_V6);
                out.extend_from_slice(&a.ip().octets());
            }
            Addr::Domain(d, _) => {
                out.push(ATYP_DOMAIN);
                // A name longer than 255 bytes cannot be encoded; truncation keeps the
                // message well-formed (only names we parsed, so at most 255, reach here).
                let bytes = &d.as_bytes()[..d.len().min(255)];
                out.push(bytes.len() as u8);
                out.extend_from_slice(bytes);
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Ip(a) => write!(f, "{a}"),
            Addr::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}

/// Parses ATYP + address + port at the start of `buf`.
fn parse_addr(buf: &[u8]) -> Result<Option<(Addr, usize)>, Socks5Error> {
    let Some(&atyp) = buf.first() else {
        return Ok(None);
    };
    let (addr_len, start) = match atyp {
        ATYP_V4 => (4, 1),
        ATYP_V6 => (16, 1),
        ATYP_DOMAIN => {
            let Some(&len) = buf.get(1) else {
                return Ok(None);
            };
            if len == 0 {
                return Err(Socks5Error::EmptyDomain);
            }
            (usize::from(len), 2)
        }
        other => return Err(Socks5Error::BadAddressType(other)),
    };
    let total = start + addr_len + 2;
    if buf.len() < total {
        return Ok(None);
    }
    let raw = &buf[start..start + addr_len];
    let port = u16::from_be_bytes([buf[start + addr_len], buf[start + addr_len + 1]]);
    let addr = match atyp {
        ATYP_V4 => {
            let o: [u8; 4] = raw.try_into().map_err(|_| Socks5Error::ShortDatagram)?;
            Addr::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
        }
        ATYP_V6 => {
            let o: [u8; 16] = raw.try_into().map_err(|_| Socks5Error::ShortDatagram)?;
            Addr::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => {
            let name = std::str::from_utf8(raw).map_err(|_| Socks5Error::BadDomain)?;
            Addr::Domain(name.to_string(), port)
        }
    };
    Ok(Some((addr, total)))
}

/// The client's greeting: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Offered method codes, in the client's order.
    pub methods: Vec<u8>,
}

/// Parses the greeting `VER NMETHODS METHODS...`.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::BadVersion(ver, VERSION));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let total = 2 + usize::from(n);
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Greeting {
            methods: buf[2..total].to_vec(),
        },
        total,
    )))
}

/// Encodes a greeting (client side; used by tests and the benchmark client).
pub fn encode_greeting(g: &Greeting, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.push(g.methods.len().min(255) as u8);
    out.extend_from_slice(&g.methods[..g.methods.len().min(255)]);
}

/// Encodes the method-selection answer `VER METHOD`.
pub fn encode_method_choice(method: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, method]);
}

/// Parses the method-selection answer `VER METHOD` (client side): the chosen method.
pub fn parse_method_choice(buf: &[u8]) -> Result<Option<(u8, usize)>, Socks5Error> {
    match buf {
        [] | [VERSION] => Ok(None),
        [VERSION, m, ..] => Ok(Some((*m, 2))),
        [v, ..] => Err(Socks5Error::BadVersion(*v, VERSION)),
    }
}

/// Parses the RFC 1929 answer `VER STATUS` (client side): whether it is success (0).
pub fn parse_userpass_reply(buf: &[u8]) -> Result<Option<(bool, usize)>, Socks5Error> {
    match buf {
        [] | [AUTH_VERSION] => Ok(None),
        [AUTH_VERSION, st, ..] => Ok(Some((*st == 0, 2))),
        [v, ..] => Err(Socks5Error::BadVersion(*v, AUTH_VERSION)),
    }
}

/// RFC 1929 username/password request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPass {
    /// Username bytes (1 to 255).
    pub user: Vec<u8>,
    /// Password bytes (1 to 255).
    pub pass: Vec<u8>,
}

/// Parses `VER ULEN UNAME PLEN PASSWD` (RFC 1929).
pub fn parse_userpass(buf: &[u8]) -> Result<Option<(UserPass, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != AUTH_VERSION {
        return Err(Socks5Error::BadVersion(ver, AUTH_VERSION));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(None);
    };
    let ulen = usize::from(ulen);
    let Some(&plen) = buf.get(2 + ulen) else {
        return Ok(None);
    };
    let plen = usize::from(plen);
    let total = 3 + ulen + plen;
    if buf.len() < total {
        return Ok(None);
    }
    if ulen == 0 || plen == 0 {
        return Err(Socks5Error::EmptyCredential);
    }
    Ok(Some((
        UserPass {
            user: buf[2..2 + ulen].to_vec(),
            pass: buf[3 + ulen..total].to_vec(),
        },
        total,
    )))
}

/// Encodes an RFC 1929 request (client side).
pub fn encode_userpass(u: &UserPass, out: &mut Vec<u8>) {
    let user = &u.user[..u.user.len().min(255)];
    let pass = &u.pass[..u.pass.len().min(255)];
    out.push(AUTH_VERSION);
    out.push(user.len() as u8);
    out.extend_from_slice(user);
    out.push(pass.len() as u8);
    out.extend_from_slice(pass);
}

/// Encodes the RFC 1929 answer: status 0 is success, anything else failure.
pub fn encode_userpass_reply(success: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&[AUTH_VERSION, if success { 0x00 } else { 0x01 }]);
}

/// A SOCKS5 request `VER CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What the client asks for.
    pub command: Command,
    /// The target (for UDP ASSOCIATE: where the client will send datagrams from).
    pub addr: Addr,
}

/// Why a request could not be parsed, with the reply the client should get when there is one.
impl Socks5Error {
    /// The reply code to send before closing, when the error happened in a request.
    pub fn reply(&self) -> Reply {
        match self {
            Socks5Error::BadAddressType(_) => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        }
    }
}

/// Parses a request. The reserved byte is not checked (RFC 1928 says it must be zero; being
/// lenient costs nothing).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Socks5Error> {
    Ok(parse_message(buf)?.map(|(cmd, addr, n)| {
        let command = Command::from_byte(cmd);
        (Request { command, addr }, n)
    }))
}

/// Parses the shape requests and replies share: VER, a command or reply code, RSV, an
/// address. Returns the code, the address and the length.
fn parse_message(buf: &[u8]) -> Result<Option<(u8, Addr, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::BadVersion(ver, VERSION));
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    Ok(parse_addr(&buf[3..])?.map(|(addr, n)| (buf[1], addr, 3 + n)))
}

/// Encodes a request (client side).
pub fn encode_request(r: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, r.command.to_byte(), 0x00]);
    r.addr.encode(out);
}

/// SOCKS5 reply codes (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// 0x00 succeeded.
    Succeeded,
    /// 0x01 general SOCKS server failure (internal errors, no connection ID available).
    GeneralFailure,
    /// 0x02 connection not allowed by ruleset (the proxy's own ports).
    NotAllowed,
    /// 0x03 network unreachable (ENETUNREACH).
    NetworkUnreachable,
    /// 0x04 host unreachable (EHOSTUNREACH, DNS failure, connect timeout).
    HostUnreachable,
    /// 0x05 connection refused (ECONNREFUSED).
    ConnectionRefused,
    /// 0x06 TTL expired (not produced: Linux reports ICMP time exceeded as EHOSTUNREACH).
    TtlExpired,
    /// 0x07 command not supported (BIND and unknown commands).
    CommandNotSupported,
    /// 0x08 address type not supported.
    AddressTypeNotSupported,
    /// Any other code (parsing replies from other servers).
    Other(u8),
}

impl Reply {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Reply::Succeeded => 0x00,
            Reply::GeneralFailure => 0x01,
            Reply::NotAllowed => 0x02,
            Reply::NetworkUnreachable => 0x03,
            Reply::HostUnreachable => 0x04,
            Reply::ConnectionRefused => 0x05,
            Reply::TtlExpired => 0x06,
            Reply::CommandNotSupported => 0x07,
            Reply::AddressTypeNotSupported => 0x08,
            Reply::Other(c) => c,
        }
    }

    /// The reply for a wire code.
    pub fn from_code(c: u8) -> Self {
        match c {
            0x00 => Reply::Succeeded,
            0x01 => Reply::GeneralFailure,
            0x02 => Reply::NotAllowed,
            0x03 => Reply::NetworkUnreachable,
            0x04 => Reply::HostUnreachable,
            0x05 => Reply::ConnectionRefused,
            0x06 => Reply::TtlExpired,
            0x07 => Reply::CommandNotSupported,
            0x08 => Reply::AddressTypeNotSupported,
            c => Reply::Other(c),
        }
    }

    /// What the code means, as RFC 1928 names it.
    pub fn meaning(self) -> &'static str {
        match self {
            Reply::Succeeded => "succeeded",
            Reply::GeneralFailure => "general SOCKS server failure",
            Reply::NotAllowed => "connection not allowed by ruleset",
            Reply::NetworkUnreachable => "network unreachable",
            Reply::HostUnreachable => "host unreachable",
            Reply::ConnectionRefused => "connection refused",
            Reply::TtlExpired => "TTL expired",
            Reply::CommandNotSupported => "command not supported",
            Reply::AddressTypeNotSupported => "address type not supported",
            Reply::Other(_) => "unassigned code",
        }
    }

    /// The reply for a failed upstream connect.
    ///
    /// ECONNREFUSED is 0x05, ENETUNREACH 0x03, EHOSTUNREACH 0x04. A connect timeout is
    /// also 0x04 (the host did not answer: what clients show as "host unreachable"); 0x06 is
    /// meant for ICMP time-exceeded, which Linux already reports as EHOSTUNREACH. EACCES /
    /// EPERM (a local firewall) are 0x02; anything else is 0x01.
    pub fn for_connect_error(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Reply::ConnectionRefused,
            K::NetworkUnreachable | K::NetworkDown => Reply::NetworkUnreachable,
            K::HostUnreachable | K::TimedOut => Reply::HostUnreachable,
            K::PermissionDenied => Reply::NotAllowed,
            _ => Reply::GeneralFailure,
        }
    }
}

/// A reply `VER REP RSV ATYP BND.ADDR BND.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyMsg {
    /// The reply code.
    pub reply: Reply,
    /// The bound address (the proxy's upstream socket, or the UDP relay socket).
    pub bound: Addr,
}

/// Encodes a reply.
pub fn encode_reply(r: &ReplyMsg, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, r.reply.code(), 0x00]);
    r.bound.encode(out);
}

/// Parses a reply (client side).
pub fn parse_reply(buf: &[u8]) -> Result<Option<(ReplyMsg, usize)>, Socks5Error> {
    Ok(parse_message(buf)?.map(|(code, bound, n)| {
        let reply = Reply::from_code(code);
        (ReplyMsg { reply, bound }, n)
    }))
}

/// The header of a UDP ASSOCIATE datagram `RSV(2) FRAG ATYP DST.ADDR DST.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    /// Fragment number; 0 for a whole datagram (Interpose drops fragments).
    pub frag: u8,
    /// Destination (client to proxy) or source (proxy to client) of the payload.
    pub addr: Addr,
}

/// Parses a whole UDP datagram: the header and the offset where the payload starts.
pub fn parse_udp(buf: &[u8]) -> Result<(UdpHeader, usize), Socks5Error> {
    if buf.len() < 4 {
        return Err(Socks5Error::ShortDatagram);
    }
    let frag = buf[2];
    match parse_addr(&buf[3..])? {
        None => Err(Socks5Error::ShortDatagram),
        Some((addr, n)) => Ok((UdpHeader { frag, addr }, 3 + n)),
    }
}

/// Encodes a UDP header; the payload follows it.
pub fn encode_udp_header(h: &UdpHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x00, 0x00, h.frag]);
    h.addr.encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_needs_all_bytes() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        let (g, n) = parse_greeting(&[5, 2, 0, 2, 99]).unwrap().unwrap();
        assert_eq!(g.methods, vec![0, 2]);
        assert_eq!(n, 4);
        assert_eq!(
            parse_greeting(&[4, 1, 0]),
            Err(Socks5Error::BadVersion(4, 5))
        );
        assert_eq!(parse_greeting(&[5, 0]), Err(Socks5Error::NoMethods));
    }

    #[test]
    fn requests_of_every_address_type() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90];
        let (r, n) = parse_request(&v4).unwrap().unwrap();
        assert_eq!(n, v4.len());
        assert_eq!(r.command, Command::Connect);
        assert_eq!(r.addr, Addr::Ip("127.0.0.1:8080".parse().unwrap()));

        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 53]);
        let (r, _) = parse_request(&v6).unwrap().unwrap();
        assert_eq!(r.command, Command::UdpAssociate);
        assert_eq!(r.addr, Addr::Ip("[::1]:53".parse().unwrap()));

        let dom = [5, 1, 0, 3, 4, b'h', b'o', b's', b't', 0, 80];
        let (r, _) = parse_request(&dom).unwrap().unwrap();
        assert_eq!(r.addr, Addr::Domain("host".into(), 80));
        assert_eq!(parse_request(&dom[..dom.len() - 1]), Ok(None));

        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0, 0]),
            Err(Socks5Error::BadAddressType(9))
        );
        assert_eq!(
            Socks5Error::BadAddressType(9).reply(),
            Reply::AddressTypeNotSupported
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 0]),
            Err(Socks5Error::EmptyDomain)
        );
        let (r, _) = parse_request(&[5, 9, 0, 1, 1, 2, 3, 4, 0, 1])
            .unwrap()
            .unwrap();
        assert_eq!(r.command, Command::Other(9));
    }

    #[test]
    fn userpass() {
        let mut b = Vec::new();
        encode_userpass(
            &UserPass {
                user: b"me".to_vec(),
                pass: b"pw".to_vec(),
            },
            &mut b,
        );
        assert_eq!(b, [1, 2, b'm', b'e', 2, b'p', b'w']);
        let (u, n) = parse_userpass(&b).unwrap().unwrap();
        assert_eq!(
            (u.user.as_slice(), u.pass.as_slice(), n),
            (&b"me"[..], &b"pw"[..], 7)
        );
        assert_eq!(parse_userpass(&b[..6]), Ok(None));
        assert_eq!(
            parse_userpass(&[1, 0, 0]),
            Err(Socks5Error::EmptyCredential)
        );
    }

    #[test]
    fn client_side_answers() {
        assert_eq!(parse_method_choice(&[5]), Ok(None));
        assert_eq!(parse_method_choice(&[5, 2, 9]), Ok(Some((2, 2))));
        assert_eq!(
            parse_method_choice(b"HT"),
            Err(Socks5Error::BadVersion(b'H', 5))
        );
        assert_eq!(parse_userpass_reply(&[1]), Ok(None));
        assert_eq!(parse_userpass_reply(&[1, 0]), Ok(Some((true, 2))));
        assert_eq!(parse_userpass_reply(&[1, 1]), Ok(Some((false, 2))));
        assert_eq!(
            parse_userpass_reply(&[5, 0]),
            Err(Socks5Error::BadVersion(5, 1))
        );
        assert_eq!(Reply::from_code(5).meaning(), "connection refused");
    }

    #[test]
    fn connect_errors_map_to_reply_codes() {
        use std::io::{Error, ErrorKind};
        let code = |k| Reply::for_connect_error(&Error::from(k)).code();
        assert_eq!(code(ErrorKind::ConnectionRefused), 0x05);
        assert_eq!(code(ErrorKind::HostUnreachable), 0x04);
        assert_eq!(code(ErrorKind::NetworkUnreachable), 0x03);
        assert_eq!(code(ErrorKind::TimedOut), 0x04);
        assert_eq!(code(ErrorKind::Other), 0x01);
        assert_eq!(
            Reply::for_connect_error(&Error::from_raw_os_error(111)).code(),
            0x05
        );
        assert_eq!(
            Reply::for_connect_error(&Error::from_raw_os_error(113)).code(),
            0x04
        );
        assert_eq!(
            Reply::for_connect_error(&Error::from_raw_os_error(101)).code(),
            0x03
        );
    }

    #[test]
    fn udp_header() {
        let h = UdpHeader {
            frag: 0,
            addr: Addr::Ip("10.0.0.1:53".parse().unwrap()),
        };
        let mut b = Vec::new();
        encode_udp_header(&h, &mut b);
        b.extend_from_slice(b"payload");
        let (p, off) = parse_udp(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(&b[off..], b"payload");
        assert_eq!(parse_udp(&b[..5]), Err(Socks5Error::ShortDatagram));
    }

    fn arb_addr() -> impl Strategy<Value = Addr> {
        prop_oneof![
            any::<(u32, u16)>()
                .prop_map(|(ip, p)| Addr::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p))),
            any::<(u128, u16)>()
                .prop_map(|(ip, p)| Addr::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p))),
            ("[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(d, p)| Addr::Domain(d, p)),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_greeting(&buf);
            let _ = parse_userpass(&buf);
            let _ = parse_request(&buf);
            let _ = parse_reply(&buf);
            let _ = parse_udp(&buf);
            let _ = parse_method_choice(&buf);
            let _ = parse_userpass_reply(&buf);
        }

        #[test]
        fn request_round_trip(addr in arb_addr(), cmd in any::<u8>(), extra in proptest::collection::vec(any::<u8>(), 0..8)) {
            let req = Request { command: Command::from_byte(cmd), addr };
            let mut b = Vec::new();
            encode_request(&req, &mut b);
            let len = b.len();
            for cut in 0..len {
                prop_assert_eq!(parse_request(&b[..cut]), Ok(None));
            }
            b.extend_from_slice(&extra);
            prop_assert_eq!(parse_request(&b), Ok(Some((req, len))));
        }

        #[test]
        fn reply_round_trip(addr in arb_addr(), code in any::<u8>()) {
            let r = ReplyMsg { reply: Reply::from_code(code), bound: addr };
            let mut b = Vec::new();
            encode_reply(&r, &mut b);
            prop_assert_eq!(parse_reply(&b), Ok(Some((r, b.len()))));
        }

        #[test]
        fn greeting_and_userpass_round_trip(
            methods in proptest::collection::vec(any::<u8>(), 1..255),
            user in proptest::collection::vec(any::<u8>(), 1..255),
            pass in proptest::collection::vec(any::<u8>(), 1..255),
        ) {
            let g = Greeting { methods };
            let mut b = Vec::new();
            encode_greeting(&g, &mut b);
            prop_assert_eq!(parse_greeting(&b), Ok(Some((g, b.len()))));
            let u = UserPass { user, pass };
            let mut b = Vec::new();
            encode_userpass(&u, &mut b);
            prop_assert_eq!(parse_userpass(&b), Ok(Some((u, b.len()))));
        }

        #[test]
        fn udp_round_trip(addr in arb_addr(), frag in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = UdpHeader { frag, addr };
            let mut b = Vec::new();
            encode_udp_header(&h, &mut b);
            let off = b.len();
            b.extend_from_slice(&payload);
            prop_assert_eq!(parse_udp(&b), Ok((h, off)));
        }
    }
}
