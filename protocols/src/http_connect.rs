//! HTTP CONNECT (RFC 9110 section 9.3.6), sans I/O: the request a client sends to `--http`,
//! the answers the proxy gives, the request the proxy sends to an `http://` upstream and
//! that upstream's answer, and the recognition of an HTTP request sent to the SOCKS port.
//!
//! Parsers take the bytes received so far and answer `Ok(None)` when the header is not
//! complete yet, or `Ok(Some((message, consumed)))`; what follows the header (a client that
//! did not wait for the 200) is not consumed. The async shells are proxy-core's
//! `http_ingress` and `chain::dial`.

use base64::Engine;

use crate::socks5::{Addr, Reply};

/// The longest request or response header accepted.
pub const MAX_HEADER: usize = 8 * 1024;

/// A malformed or unsupported HTTP proxy message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The header did not end within [`MAX_HEADER`] bytes.
    #[error("HTTP header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// The request line is not `METHOD TARGET HTTP/1.x`.
    #[error("malformed HTTP request line")]
    RequestLine,
    /// A method other than CONNECT (the value is the method, at most 16 characters).
    #[error("method {0} is not supported: this port tunnels CONNECT only")]
    Method(String),
    /// The CONNECT target is not `HOST:PORT`.
    #[error("CONNECT target is not HOST:PORT")]
    Target,
    /// The response's status line is not `HTTP/1.x NNN reason`.
    #[error("malformed HTTP status line")]
    StatusLine,
    /// The header is not text.
    #[error("HTTP header is not valid UTF-8")]
    NotText,
}

impl HttpError {
    /// The status a client gets for this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Method(_) => 405,
            HttpError::TooLong => 431,
            _ => 400,
        }
    }
}

/// A client's `CONNECT host:port HTTP/1.1` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The target.
    pub target: Addr,
    /// `Proxy-Authorization: Basic` credentials, decoded; `None` when absent or not Basic.
    pub basic: Option<(Vec<u8>, Vec<u8>)>,
}

/// Where the header ends (the index just past the blank line), if it has.
fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether `buf` holds a whole request or response header.
pub fn header_complete(buf: &[u8]) -> bool {
    header_end(buf).is_some()
}

/// The complete header in `buf`, as text, and its length.
fn complete_header(buf: &[u8]) -> Result<Option<(&str, usize)>, HttpError> {
    let Some(end) = header_end(buf) else {
        return if buf.len() >= MAX_HEADER {
            Err(HttpError::TooLong)
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEADER {
        return Err(HttpError::TooLong);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::NotText)?;
    Ok(Some((text, end)))
}

/// Parses a CONNECT request header.
pub fn parse_connect(buf: &[u8]) -> Result<Option<(ConnectRequest, usize)>, HttpError> {
    let Some((text, end)) = complete_header(buf)? else {
        return Ok(None);
    };
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Err(HttpError::RequestLine);
    }
    if method != "CONNECT" {
        return Err(HttpError::Method(method.chars().take(16).collect()));
    }
    let target = parse_target(target).ok_or(HttpError::Target)?;
    let mut basic = None;
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("proxy-authorization") {
            basic = parse_basic(value.trim());
        }
    }
    Ok(Some((ConnectRequest { target, basic }, end)))
}

/// `HOST:PORT` or `[V6]:PORT` as a SOCKS-style address.
fn parse_target(t: &str) -> Option<Addr> {
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        let (h, p) = t.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() || host.len() > 255 {
        return None;
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(Addr::Ip(std::net::SocketAddr::new(ip, port)));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return None;
    }
    Some(Addr::Domain(host.to_string(), port))
}

/// Decodes `Basic BASE64(user:pass)`.
fn parse_basic(v: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let colon = raw.iter().position(|b| *b == b':')?;
    Some((raw[..colon].to_vec(), raw[colon + 1..].to_vec()))
}

/// The `host:port` form of a target in a CONNECT request line and Host header.
pub fn authority(target: &Addr) -> String {
    match target {
        Addr::Ip(a) => a.to_string(),
        Addr::Domain(h, p) => format!("{h}:{p}"),
    }
}

/// Encodes the CONNECT request sent to an upstream, with Basic credentials when given.
pub fn encode_connect(target: &Addr, creds: Option<(&str, &str)>, out: &mut Vec<u8>) {
    let a = authority(target);
    out.extend_from_slice(format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n").as_bytes());
    if let Some((u, p)) = creds {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        out.extend_from_slice(format!("Proxy-Authorization: Basic {b64}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// An upstream's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line as sent (e.g. `HTTP/1.0 407 Proxy Authentication Required`), at most
    /// 200 characters, for the record's reason.
    pub line: String,
}

/// Parses the response header to a CONNECT.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, HttpError> {
    let Some((text, end)) = complete_header(buf)? else {
        return Ok(None);
    };
    let line = text.split("\r\n").next().unwrap_or_default();
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::StatusLine);
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HttpError::StatusLine);
    }
    let status = code.parse().map_err(|_| HttpError::StatusLine)?;
    let line = line.chars().filter(|c| !c.is_control()).take(200).collect();
    Ok(Some((Response { status, line }, end)))
}

/// The SOCKS reply a client gets when an HTTP upstream answers `status` to CONNECT:
/// 407, 401 (tinyproxy's answer to wrong credentials) and 403 are 0x02 (not allowed), 502
/// and 504 0x04 (host unreachable: the upstream could not reach the target), anything else
/// 0x01.
pub fn reply_for_status(status: u16) -> Reply {
    match status {
        401 | 403 | 407 => Reply::NotAllowed,
        502 | 504 => Reply::HostUnreachable,
        _ => Reply::GeneralFailure,
    }
}

/// The HTTP status a CONNECT client gets for what a SOCKS client would get as `reply`.
pub fn status_for_reply(reply: Reply) -> u16 {
    match reply {
        Reply::Succeeded => 200,
        Reply::NotAllowed => 403,
        Reply::CommandNotSupported | Reply::AddressTypeNotSupported => 400,
        Reply::GeneralFailure => 502,
        _ => 502,
    }
}

/// The reason phrase of the statuses the proxy sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Encodes the proxy's answer: `200 Connection established` with no body, or an error
/// with a one-line text body (`why`) and `Connection: close`. A 407 asks for Basic
/// credentials.
pub fn encode_answer(status: u16, why: &str, out: &mut Vec<u8>) {
    let reason = reason_phrase(status);
    if status == 200 {
        out.extend_from_slice(format!("HTTP/1.1 200 {reason}\r\n\r\n").as_bytes());
        return;
    }
    let body: String = why
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = format!("{body}\n");
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    if status == 407 {
        out.extend_from_slice(b"Proxy-Authenticate: Basic realm=\"interpose\"\r\n");
    }
    out.extend_from_slice(
        format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// Whether the first bytes a client sent on the SOCKS port are an HTTP request
/// (`METHOD SP`, e.g. `GET ` or `CONNECT `) rather than SOCKS: `Some(true)` yes,
/// `Some(false)` no, `None` when too few bytes arrived to tell.
pub fn looks_like_http(buf: &[u8]) -> Option<bool> {
    let &first = buf.first()?;
    if !first.is_ascii_uppercase() {
        return Some(false);
    }
    for (i, &b) in buf.iter().enumerate().take(17) {
        if b == b' ' {
            return Some(i > 0);
        }
        if !b.is_ascii_uppercase() {
            return Some(false);
        }
    }
    if buf.len() > 16 { Some(false) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn connect_requests() {
        let req = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
            Proxy-Authorization: Basic dTpwQHNz\r\n\r\n\x16\x03";
        let (r, n) = parse_connect(req).unwrap().unwrap();
        assert_eq!(r.target, Addr::Domain("example.com".into(), 443));
        assert_eq!(r.basic, Some((b"u".to_vec(), b"p@ss".to_vec())));
        assert_eq!(&req[n..], b"\x16\x03");
        for cut in 0..n {
            assert_eq!(parse_connect(&req[..cut]), Ok(None), "{cut}");
        }
        let (r, _) = parse_connect(b"CONNECT [::1]:8443 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.target, Addr::Ip("[::1]:8443".parse().unwrap()));
        assert_eq!(r.basic, None);
        let (r, _) = parse_connect(
            b"CONNECT 10.0.0.1:5432 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.target, Addr::Ip("10.0.0.1:5432".parse().unwrap()));
        assert_eq!(r.basic, None);
        for (bad, e) in [
            (
                &b"GET http://x/ HTTP/1.1\r\n\r\n"[..],
                HttpError::Method("GET".into()),
            ),
            (b"CONNECT x HTTP/1.1\r\n\r\n", HttpError::Target),
            (b"CONNECT x:0 HTTP/1.1\r\n\r\n", HttpError::Target),
            (b"CONNECT a b:1 HTTP/1.1\r\n\r\n", HttpError::RequestLine),
            (b"CONNECT x:1 SPDY/3\r\n\r\n", HttpError::RequestLine),
            (
                b"CONNECT x:1 HTTP/1.1\r\nA: \xff\r\n\r\n",
                HttpError::NotText,
            ),
        ] {
            assert_eq!(parse_connect(bad), Err(e));
        }
        assert_eq!(parse_connect(&[b'A'; MAX_HEADER]), Err(HttpError::TooLong));
        assert_eq!(HttpError::Method("GET".into()).status(), 405);
    }

    #[test]
    fn upstream_exchange() {
        let mut out = Vec::new();
        encode_connect(
            &Addr::Domain("h".into(), 443),
            Some(("u", "p@ss")),
            &mut out,
        );
        assert_eq!(
            out,
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nProxy-Authorization: Basic dTpwQHNz\r\n\r\n"
        );
        let (back, _) = parse_connect(&out).unwrap().unwrap();
        assert_eq!(back.basic, Some((b"u".to_vec(), b"p@ss".to_vec())));
        let resp = b"HTTP/1.0 407 Proxy Authentication Required\r\nServer: tinyproxy\r\n\r\nbody";
        let (r, n) = parse_response(resp).unwrap().unwrap();
        assert_eq!(r.status, 407);
        assert_eq!(r.line, "HTTP/1.0 407 Proxy Authentication Required");
        assert_eq!(&resp[n..], b"body");
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(
            parse_response(b"SSH-2.0\r\n\r\n"),
            Err(HttpError::StatusLine)
        );
        assert_eq!(reply_for_status(407), Reply::NotAllowed);
        assert_eq!(reply_for_status(401), Reply::NotAllowed);
        assert_eq!(reply_for_status(502), Reply::HostUnreachable);
        assert_eq!(reply_for_status(500), Reply::GeneralFailure);
    }

    #[test]
    fn answers() {
        let mut out = Vec::new();
        encode_answer(200, "", &mut out);
        assert_eq!(out, b"HTTP/1.1 200 Connection established\r\n\r\n");
        out.clear();
        encode_answer(407, "credentials\nrequired", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(
            "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic"
        ));
        assert!(text.ends_with("\r\n\r\ncredentials required\n"), "{text}");
        assert!(text.contains("Content-Length: 21\r\n"), "{text}");
    }

    #[test]
    fn http_on_the_socks_port_is_recognised() {
        assert_eq!(looks_like_http(b""), None);
        assert_eq!(looks_like_http(&[5, 1, 0]), Some(false));
        assert_eq!(looks_like_http(&[4, 1]), Some(false));
        assert_eq!(looks_like_http(b"GET / HTTP/1.1"), Some(true));
        assert_eq!(looks_like_http(b"CONNECT x:1 HTTP/1.1"), Some(true));
        assert_eq!(looks_like_http(b"CONN"), None);
        assert_eq!(looks_like_http(b"Get"), Some(false));
        assert_eq!(looks_like_http(b" "), Some(false));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_connect(&buf);
            let _ = parse_response(&buf);
            let _ = looks_like_http(&buf);
        }

        #[test]
        fn connect_round_trip(
            host in "[a-z0-9][a-z0-9.-]{0,40}",
            port in 1u16..,
            creds in proptest::option::of(("[a-zA-Z0-9]{1,12}", "[ -~]{1,20}")),
        ) {
            let target = Addr::Domain(host, port);
            let mut out = Vec::new();
            encode_connect(&target, creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())), &mut out);
            for cut in 0..out.len() {
                prop_assert_eq!(parse_connect(&out[..cut]), Ok(None));
            }
            let (r, n) = parse_connect(&out).unwrap().unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(r.target, target);
            prop_assert_eq!(r.basic, creds.map(|(u, p)| (u.into_bytes(), p.into_bytes())));
        }

        #[test]
        fn answers_parse_back(status in prop::sample::select(vec![200u16, 400, 403, 405, 407, 502]), why in "[ -~]{0,60}") {
            let mut out = Vec::new();
            encode_answer(status, &why, &mut out);
            let (r, n) = parse_response(&out).unwrap().unwrap();
            prop_assert_eq!(r.status, status);
            let body = if status == 200 { String::new() } else { format!("{why}\n") };
            prop_assert_eq!(&out[n..], body.as_bytes());
        }
    }
}
