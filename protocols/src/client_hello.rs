//! Sans-I/O detection of a TLS ClientHello at the start of a byte buffer.
//!
//! The relay reads client bytes into a buffer and calls [`detect`] after each read: the answer
//! is [`Detection::NeedMore`] while the buffer is a consistent but incomplete prefix of a
//! ClientHello (split across reads and/or across several TLS records),
//! [`Detection::NotTls`] as soon as the bytes cannot be a ClientHello, and
//! [`Detection::ClientHello`] with the parsed [`ClientHelloInfo`] once it is complete.
//!
//! [`could_be_tls`] is the cheap check for every later client-to-server read of a plain
//! stream (STARTTLS, PostgreSQL `SSLRequest`, LDAP StartTLS, ...): it only looks at the first
//! six bytes and never says yes to printable text or to the PostgreSQL `SSLRequest` itself.
//!
//! Nothing here allocates unless a ClientHello spans several records, and nothing panics on
//! any input.

use std::borrow::Cow;

/// TLS record content type of handshake records.
const CONTENT_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// The record header: type (1), version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// Largest plaintext record fragment allowed by RFC 8446 (2^14) plus the TLS 1.2 slack for
/// compression expansion that some stacks still tolerate.
const MAX_RECORD_LEN: usize = 16384 + 2048;
/// Upper bound for a ClientHello we are willing to buffer (real ones, even with post-quantum
/// key shares and many extensions, are well below 8 KiB).
pub const MAX_CLIENT_HELLO_LEN: usize = 64 * 1024;

/// Extension numbers we read.
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// The outcome of looking at the bytes a client sent so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// The buffer is a consistent prefix of a ClientHello: append more bytes and call again.
    NeedMore,
    /// The buffer is not (the start of) a TLS ClientHello; `reason` says what gave it away.
    NotTls {
        /// A short, static explanation, e.g. "first byte is not a TLS handshake record".
        reason: &'static str,
    },
    /// A complete ClientHello.
    ClientHello(ClientHelloInfo),
}

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// The `server_name` extension's host name, if the client sent one (as sent; ASCII).
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order (e.g. `h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
    /// The protocol versions offered: the `supported_versions` extension without GREASE
    /// values, or the legacy `client_version` when that extension is absent
    /// (`0x0304` = TLS 1.3, `0x0303` = TLS 1.2, ...).
    pub versions: Vec<u16>,
    /// The legacy `client_version` field of the ClientHello body.
    pub legacy_version: u16,
    /// How many bytes of the buffer the ClientHello's records occupy (the TLS records that
    /// carried it, headers included).
    pub records_len: usize,
}

impl ClientHelloInfo {
    /// The offered ALPN protocols as lossy UTF-8 strings, for records and logs.
    pub fn alpn_strings(&self) -> Vec<String> {
        self.alpn
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }
}

/// Cheap check for the first bytes of one read: could they start a TLS ClientHello record?
///
/// Looks at no more than six bytes; with fewer bytes it answers whether they are a
/// consistent prefix. Printable text (SMTP, IMAP, POP3, FTP, XMPP, HTTP) never starts with
/// `0x16`, and PostgreSQL's `SSLRequest` (`00 00 00 08 04 d2 16 2f`) starts with `0x00`, so
/// none of them is mistaken for TLS. An empty slice is not TLS.
pub fn could_be_tls(first_bytes: &[u8]) -> bool {
    let b = first_bytes;
    if b.is_empty() || b[0] != CONTENT_HANDSHAKE {
        return false;
    }
    if b.len() >= 2 && b[1] != 0x03 {
        return false;
    }
    if b.len() >= 3 && b[2] > 0x04 {
        return false;
    }
    if b.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([b[3], b[4]]));
        if len == 0 || len > MAX_RECORD_LEN {
            return false;
        }
    }
    if b.len() >= 6 && b[5] != HANDSHAKE_CLIENT_HELLO {
        return false;
    }
    true
}

/// Looks at everything the client sent so far and says whether it is a ClientHello.
///
/// Handles a ClientHello split across reads (call again with the longer buffer) and across
/// several handshake records. Bytes after the ClientHello's last record are ignored.
pub fn detect(buf: &[u8]) -> Detection {
    match reassemble(buf) {
        Ok(Reassembled::NeedMore) => Detection::NeedMore,
        Ok(Reassembled::Complete {
            message,
            records_len,
        }) => match parse_client_hello_body(&message[4..]) {
            Ok(mut info) => {
                info.records_len = records_len;
                Detection::ClientHello(info)
            }
            Err(reason) => Detection::NotTls { reason },
        },
        Err(reason) => Detection::NotTls { reason },
    }
}

/// Result of collecting the handshake message from records.
enum Reassembled<'a> {
    NeedMore,
    Complete {
        /// The whole handshake message: type (1), length (3), body.
        message: Cow<'a, [u8]>,
        /// Bytes of `buf` used by the records carrying it.
        records_len: usize,
    },
}

/// Validates one record header at `buf[pos..]`; `Ok(None)` when the header is incomplete.
fn record_header(buf: &[u8], pos: usize) -> Result<Option<usize>, &'static str> {
    let h = &buf[pos.min(buf.len())..];
    if let Some(&t) = h.first()
        && t != CONTENT_HANDSHAKE
    {
        return Err(if pos == 0 {
            "first byte is not a TLS handshake record"
        } else {
            "ClientHello interrupted by a non-handshake record"
        });
    }
    if let Some(&major) = h.get(1)
        && major != 0x03
    {
        return Err("record version is not 3.x");
    }
    if let Some(&minor) = h.get(2)
        && minor > 0x04
    {
        return Err("record version is not 3.0 to 3.4");
    }
    if h.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len == 0 {
        return Err("empty handshake record");
    }
    if len > MAX_RECORD_LEN {
        return Err("record longer than TLS allows");
    }
    Ok(Some(len))
}

/// Collects the first handshake message from consecutive handshake records.
fn reassemble(buf: &[u8]) -> Result<Reassembled<'_>, &'static str> {
    if buf.is_empty() {
        return Ok(Reassembled::NeedMore);
    }
    // Fast path: first record holds the whole message (the common case): no allocation.
    let Some(first_len) = record_header(buf, 0)? else {
        return Ok(Reassembled::NeedMore);
    };
    let first_frag = &buf[RECORD_HEADER_LEN..buf.len().min(RECORD_HEADER_LEN + first_len)];
    if let Some(&t) = first_frag.first()
        && t != HANDSHAKE_CLIENT_HELLO
    {
        return Err("first handshake message is not a ClientHello");
    }
    if first_frag.len() >= 4 {
        let msg_len = u24(&first_frag[1..4]);
        if msg_len + 4 > MAX_CLIENT_HELLO_LEN {
            return Err("ClientHello longer than the proxy accepts");
        }
        if msg_len < 38 {
            return Err("ClientHello too short");
        }
        // Complete once the whole record is here: `records_len` never passes the buffer,
        // even for a record that holds more than the ClientHello.
        if msg_len + 4 <= first_frag.len() && first_frag.len() == first_len {
            return Ok(Reassembled::Complete {
                message: Cow::Borrowed(&first_frag[..msg_len + 4]),
                records_len: RECORD_HEADER_LEN + first_len,
            });
        }
    }
    if first_frag.len() < first_len {
        // The first record itself is incomplete.
        return Ok(Reassembled::NeedMore);
    }
    // Slow path: the message continues in further records.
    let mut message: Vec<u8> = first_frag.to_vec();
    let mut pos = RECORD_HEADER_LEN + first_len;
    loop {
        if message.len() >= 4 {
            let msg_len = u24(&message[1..4]);
            if msg_len + 4 > MAX_CLIENT_HELLO_LEN {
                return Err("ClientHello longer than the proxy accepts");
            }
            if msg_len < 38 {
                return Err("ClientHello too short");
            }
            if message.len() >= msg_len + 4 {
                message.truncate(msg_len + 4);
                return Ok(Reassembled::Complete {
                    message: Cow::Owned(message),
                    records_len: pos,
                });
            }
        }
        let Some(len) = record_header(buf, pos)? else {
            return Ok(Reassembled::NeedMore);
        };
        let start = pos + RECORD_HEADER_LEN;
        let end = start + len;
        if buf.len() < end {
            // Validate what we can of the partial header of the message before asking for
            // more, so garbage is rejected early.
            let avail = &buf[start.min(buf.len())..];
            let mut probe = message.clone();
            probe.extend_from_slice(avail);
            if probe.len() >= 4 {
                let msg_len = u24(&probe[1..4]);
                if msg_len + 4 > MAX_CLIENT_HELLO_LEN {
                    return Err("ClientHello longer than the proxy accepts");
                }
                if msg_len < 38 {
                    return Err("ClientHello too short");
                }
            }
            return Ok(Reassembled::NeedMore);
        }
        message.extend_from_slice(&buf[start..end]);
        pos = end;
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.buf.len() < n {
            return Err("ClientHello field runs past its end");
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn is_grease(v: u16) -> bool {
    (v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff)
}

/// Parses the body of a ClientHello (after the 4-byte handshake header).
fn parse_client_hello_body(body: &[u8]) -> Result<ClientHelloInfo, &'static str> {
    let mut r = Reader { buf: body };
    let legacy_version = r.u16()?;
    if legacy_version >> 8 != 0x03 {
        return Err("ClientHello version is not 3.x");
    }
    r.take(32)?; // random
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return Err("ClientHello session id longer than 32 bytes");
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("ClientHello cipher suite list malformed");
    }
    let compression = r.vec8()?;
    if compression.is_empty() {
        return Err("ClientHello without compression methods");
    }
    let mut info = ClientHelloInfo {
        legacy_version,
        ..ClientHelloInfo::default()
    };
    let mut supported_versions: Option<Vec<u16>> = None;
    if !r.is_empty() {
        let exts = r.vec16()?;
        if !r.is_empty() {
            return Err("trailing bytes after ClientHello extensions");
        }
        let mut er = Reader { buf: exts };
        while !er.is_empty() {
            let typ = er.u16()?;
            let data = er.vec16()?;
            match typ {
                EXT_SERVER_NAME => info.sni = parse_sni(data)?,
                EXT_ALPN => info.alpn = parse_alpn(data)?,
                EXT_SUPPORTED_VERSIONS => supported_versions = Some(parse_versions(data)?),
                _ => {}
            }
        }
    }
    info.versions = supported_versions.unwrap_or_else(|| vec![legacy_version]);
    Ok(info)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { buf: data };
    let list = r.vec16()?;
    if !r.is_empty() {
        return Err("server_name extension has trailing bytes");
    }
    let mut lr = Reader { buf: list };
    let mut host = None;
    while !lr.is_empty() {
        let name_type = lr.u8()?;
        let name = lr.vec16()?;
        if name_type == 0 && host.is_none() {
            if name.is_empty()
                || !name
                    .iter()
                    .all(|&c| c.is_ascii_graphic() && c != b'/' && c != b'\\')
            {
                return Err("server_name is not a valid host name");
            }
            // All bytes are ASCII, so this cannot fail; map the error anyway.
            let s = std::str::from_utf8(name).map_err(|_| "server_name is not ASCII")?;
            host = Some(s.to_owned());
        }
    }
    Ok(host)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut r = Reader { buf: data };
    let list = r.vec16()?;
    if !r.is_empty() {
        return Err("ALPN extension has trailing bytes");
    }
    let mut lr = Reader { buf: list };
    let mut out = Vec::new();
    while !lr.is_empty() {
        let p = lr.vec8()?;
        if p.is_empty() {
            return Err("empty ALPN protocol name");
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

fn parse_versions(data: &[u8]) -> Result<Vec<u16>, &'static str> {
    let mut r = Reader { buf: data };
    let list = r.vec8()?;
    if !r.is_empty() || list.len() % 2 != 0 {
        return Err("supported_versions extension malformed");
    }
    Ok(list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .filter(|&v| !is_grease(v))
        .collect())
}

/// Human name of a TLS protocol version number (`0x0304` -> "TLSv1.3").
pub fn version_name(v: u16) -> Cow<'static, str> {
    match v {
        0x0300 => "SSLv3".into(),
        0x0301 => "TLSv1.0".into(),
        0x0302 => "TLSv1.1".into(),
        0x0303 => "TLSv1.2".into(),
        0x0304 => "TLSv1.3".into(),
        other => format!("0x{other:04x}").into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::{Arc, OnceLock};

    /// A real ClientHello produced by a rustls client with SNI `example.com` and ALPN
    /// `h2`, `http/1.1`.
    pub(crate) fn rustls_client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        // The ring provider, as proxy-core's `tls::install_provider` installs it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = rustls::RootCertStore::empty();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned())
            .expect("test server name is valid");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write to vec");
        }
        out
    }

    fn sample() -> &'static [u8] {
        static S: OnceLock<Vec<u8>> = OnceLock::new();
        S.get_or_init(|| rustls_client_hello("example.com", &[b"h2", b"http/1.1"]))
    }

    /// Splits the handshake message of `hello` (one record) into several records with the
    /// given fragment sizes.
    fn refragment(hello: &[u8], sizes: &[usize]) -> Vec<u8> {
        let msg = &hello[5..];
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < msg.len() {
            let n = sizes
                .get(i % sizes.len().max(1))
                .copied()
                .unwrap_or(1)
                .max(1);
            let end = (pos + n).min(msg.len());
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(end - pos).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&msg[pos..end]);
            pos = end;
            i += 1;
        }
        out
    }

    #[test]
    fn parses_rustls_client_hello() {
        let Detection::ClientHello(info) = detect(sample()) else {
            panic!("expected ClientHello, got {:?}", detect(sample()));
        };
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(info.versions.contains(&0x0304));
        assert!(info.versions.contains(&0x0303));
        assert_eq!(info.records_len, sample().len());
        assert_eq!(info.alpn_strings(), vec!["h2", "http/1.1"]);
    }

    #[test]
    fn trailing_bytes_after_hello_are_ignored() {
        let mut v = sample().to_vec();
        v.extend_from_slice(b"\x17\x03\x03garbage");
        let Detection::ClientHello(info) = detect(&v) else {
            panic!("expected ClientHello");
        };
        assert_eq!(info.records_len, sample().len());
    }

    #[test]
    fn ip_client_has_no_sni() {
        let hello = rustls_client_hello("127.0.0.1", &[]);
        let Detection::ClientHello(info) = detect(&hello) else {
            panic!("expected ClientHello");
        };
        assert_eq!(info.sni, None);
        assert!(info.alpn.is_empty());
    }

    #[test]
    fn every_prefix_needs_more() {
        let s = sample();
        for n in 0..s.len() {
            assert_eq!(detect(&s[..n]), Detection::NeedMore, "prefix of {n} bytes");
        }
    }

    /// Found by the `client_hello` fuzz target: a record longer than the ClientHello it
    /// carries was reported complete with `records_len` past the end of the buffer.
    #[test]
    fn a_record_longer_than_its_hello_is_complete_only_when_all_here() {
        let s = sample();
        let mut v = s.to_vec();
        let len = u16::from_be_bytes([v[3], v[4]]) + 10;
        v[3..5].copy_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&[0; 10]);
        for n in 0..v.len() {
            assert_eq!(detect(&v[..n]), Detection::NeedMore, "prefix {n}");
        }
        let Detection::ClientHello(info) = detect(&v) else {
            panic!("expected ClientHello");
        };
        assert_eq!(info.records_len, v.len());
    }

    #[test]
    fn split_across_records() {
        let s = sample();
        let multi = refragment(s, &[1, 7, 100, 3]);
        let Detection::ClientHello(info) = detect(&multi) else {
            panic!("expected ClientHello");
        };
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert_eq!(info.records_len, multi.len());
        for n in 0..multi.len() {
            assert_eq!(detect(&multi[..n]), Detection::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn plain_protocols_are_not_tls() {
        let samples: &[&[u8]] = &[
            b"EHLO example.com\r\n",
            b"STARTTLS\r\n",
            b"a001 STARTTLS\r\n",
            b"GET / HTTP/1.1\r\n",
            b"<?xml version='1.0'?>",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"\x30\x1d\x02\x01\x01\x77\x18\x80\x16", // LDAP StartTLS extended request
        ];
        for s in samples {
            assert!(!could_be_tls(s), "{s:?}");
            assert!(matches!(detect(s), Detection::NotTls { .. }), "{s:?}");
        }
        assert!(!could_be_tls(b""));
    }

    #[test]
    fn could_be_tls_on_hello_prefixes() {
        let s = sample();
        for n in 1..16 {
            assert!(could_be_tls(&s[..n]), "prefix {n}");
        }
        // Application data and alerts are not a ClientHello.
        assert!(!could_be_tls(b"\x17\x03\x03\x00\x10"));
        assert!(!could_be_tls(b"\x15\x03\x03\x00\x02"));
        // A handshake record that is not a ClientHello.
        assert!(!could_be_tls(b"\x16\x03\x03\x00\x10\x02"));
    }

    #[test]
    fn rejects_other_handshake_and_bad_lengths() {
        assert!(matches!(
            detect(b"\x16\x03\x01\x00\x00"),
            Detection::NotTls { .. }
        ));
        assert!(matches!(
            detect(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Detection::NotTls { .. }
        ));
        assert!(matches!(detect(b"\x16\x02\x01"), Detection::NotTls { .. }));
        assert!(matches!(detect(b"\x16\x03\x09"), Detection::NotTls { .. }));
        // Handshake claims to be too short to be a ClientHello.
        assert!(matches!(
            detect(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00"),
            Detection::NotTls { .. }
        ));
    }

    #[test]
    fn grease_versions_are_dropped() {
        assert!(is_grease(0x0a0a));
        assert!(is_grease(0xfafa));
        assert!(!is_grease(0x0304));
        assert_eq!(version_name(0x0304), "TLSv1.3");
        assert_eq!(version_name(0x7f1c), "0x7f1c");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = detect(&bytes);
            let _ = could_be_tls(&bytes);
        }

        #[test]
        fn random_after_tls_header_never_panics(
            minor in 0u8..5,
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut v = vec![0x16, 0x03, minor];
            v.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
            v.extend_from_slice(&body);
            let _ = detect(&v);
        }

        #[test]
        fn truncations_need_more(cut in 0usize..2000) {
            let s = sample();
            let n = cut % s.len();
            prop_assert_eq!(detect(&s[..n]), Detection::NeedMore);
        }

        #[test]
        fn corruptions_never_panic(pos in 0usize..2000, val in any::<u8>(), cut in 0usize..2000) {
            let mut s = sample().to_vec();
            let p = pos % s.len();
            s[p] = val;
            let n = cut % (s.len() + 1);
            let _ = detect(&s[..n]);
        }

        #[test]
        fn cheap_check_never_misses_a_hello(
            sizes in proptest::collection::vec(1usize..300, 1..8),
            cut in 1usize..16,
        ) {
            // Whatever detect() accepts, could_be_tls() accepts from its first bytes on.
            let multi = refragment(sample(), &sizes);
            prop_assert!(matches!(detect(&multi), Detection::ClientHello(_)));
            prop_assert!(could_be_tls(&multi[..cut.min(multi.len())]));
        }

        #[test]
        fn detect_implies_could_be_tls(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if matches!(detect(&bytes), Detection::ClientHello(_) | Detection::NeedMore)
                && !bytes.is_empty()
            {
                prop_assert!(could_be_tls(&bytes));
            }
        }

        #[test]
        fn any_fragmentation_parses(sizes in proptest::collection::vec(1usize..300, 1..8)) {
            let multi = refragment(sample(), &sizes);
            match detect(&multi) {
                Detection::ClientHello(info) => {
                    prop_assert_eq!(info.sni.as_deref(), Some("example.com"));
                    prop_assert_eq!(info.records_len, multi.len());
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
