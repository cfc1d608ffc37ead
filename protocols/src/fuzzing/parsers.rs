//! The properties the parser fuzz targets in `fuzz/` check (`socks5`, `http_connect`,
//! `client_hello`, `sock_diag`), one function per target, over any bytes.
//!
//! The targets (`cargo +nightly fuzz run socks5`, ...) are one line each around these
//! functions, so on stable the same checks run in `cargo test`: over the checked-in seed
//! corpus (`fuzz/corpus/TARGET/`) and over proptest's random inputs. Each function panics
//! when a property fails; none of them does I/O.

#![allow(
    clippy::expect_used,
    reason = "a fuzz property fails by panicking, and the fuzzer reports the panic"
)]

use std::fmt::Debug;

use crate::{
    client_hello::{self as detect, Detection},
    http_connect::{self, HttpError},
    sock_diag::{self, Answer},
    socks5::{self, Socks5Error},
};

/// A sans-I/O SOCKS5 parser: a message and its length, `None` for "need more bytes".
type Parser<T> = fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>;
/// A sans-I/O HTTP CONNECT parser, in the same shape.
type HttpParser<T> = fn(&[u8]) -> Result<Option<(T, usize)>, HttpError>;

/// Fuzz target `socks5`: every SOCKS5 parser on `data` as it stands, then the handshake a
/// client sends (greeting, RFC 1929 credentials when it offers them, request) in sequence.
pub fn socks5(data: &[u8]) {
    check_message(data, socks5::parse_greeting, socks5::encode_greeting, &[]);
    check_message(data, socks5::parse_userpass, socks5::encode_userpass, &[]);
    // RSV (byte 2) is not checked by the parser, and encoded as zero.
    check_message(data, socks5::parse_request, socks5::encode_request, &[2]);
    check_message(data, socks5::parse_reply, socks5::encode_reply, &[2]);
    // The answers an upstream SOCKS5 proxy sends to Interpose as its client.
    check_message(
        data,
        socks5::parse_method_choice,
        |m, out| socks5::encode_method_choice(*m, out),
        &[],
    );
    // Any status but 0 is a failure, encoded as 1.
    check_message(
        data,
        socks5::parse_userpass_reply,
        |ok, out| socks5::encode_userpass_reply(*ok, out),
        &[1],
    );
    if let Ok((header, at)) = socks5::parse_udp(data) {
        let mut out = Vec::new();
        socks5::encode_udp_header(&header, &mut out);
        assert_eq!(out.len(), at, "UDP header length");
        assert_eq!(out[2..], data[2..at], "UDP header re-encodes (RSV aside)");
    }

    let Ok(Some((greeting, n))) = socks5::parse_greeting(data) else {
        return;
    };
    let mut rest = &data[n..];
    if greeting.methods.contains(&socks5::METHOD_USERPASS)
        && let Ok(Some((_, n))) = socks5::parse_userpass(rest)
    {
        rest = &rest[n..];
    }
    check_message(rest, socks5::parse_request, socks5::encode_request, &[2]);
}

/// The properties of an incremental parser on `data`: when it yields a message of `n` bytes,
/// every shorter prefix asks for more bytes (so the handshake's read loop never acts on half a
/// message), the message alone parses the same, and encoding it gives those `n` bytes back
/// (but at the `ignored` offsets).
fn check_message<T: Debug + PartialEq>(
    data: &[u8],
    parse: Parser<T>,
    encode: fn(&T, &mut Vec<u8>),
    ignored: &[usize],
) {
    let Ok(Some((msg, n))) = parse(data) else {
        return;
    };
    assert!(n <= data.len(), "length {n} past the {} bytes", data.len());
    for cut in 0..n {
        assert_eq!(
            parse(&data[..cut]),
            Ok(None),
            "prefix of {cut} of {n} bytes"
        );
    }
    let mut out = Vec::new();
    encode(&msg, &mut out);
    assert_eq!(out.len(), n, "{msg:?} re-encodes to its length");
    for (i, (a, b)) in out.iter().zip(data).enumerate() {
        assert!(a == b || ignored.contains(&i), "{msg:?}: byte {i} differs");
    }
    assert_eq!(parse(&data[..n]), Ok(Some((msg, n))));
}

/// Fuzz target `http_connect`: the CONNECT request parser (the `--http` port), the response
/// parser (an `http://` upstream's answer) and the recognition of HTTP on the SOCKS port.
/// A message of `n` bytes has every shorter prefix asking for more, parses the same alone,
/// and what it holds encodes back to a message that parses to the same.
pub fn http_connect(data: &[u8]) {
    fn prefixes<T: Debug + PartialEq + Clone>(data: &[u8], parse: HttpParser<T>) -> Option<T> {
        let Ok(Some((msg, n))) = parse(data) else {
            return None;
        };
        assert!(
            n <= data.len() && n <= http_connect::MAX_HEADER,
            "length {n}"
        );
        for cut in [0, n / 2, n.saturating_sub(1)] {
            assert_eq!(parse(&data[..cut]), Ok(None), "prefix {cut} of {n}");
        }
        assert_eq!(parse(&data[..n]), Ok(Some((msg.clone(), n))), "alone");
        Some(msg)
    }
    if let Some(req) = prefixes(data, http_connect::parse_connect) {
        let basic = req.basic.as_ref().and_then(|(u, p)| {
            let u = std::str::from_utf8(u).ok().filter(|u| !u.contains(':'))?;
            Some((u, std::str::from_utf8(p).ok()?))
        });
        if req.basic.is_none() || basic.is_some() {
            let mut out = Vec::new();
            http_connect::encode_connect(&req.target, basic, &mut out);
            let back = http_connect::parse_connect(&out).expect("re-encoded CONNECT parses");
            assert_eq!(back, Some((req, out.len())), "CONNECT re-encodes");
        }
    }
    if let Some(resp) = prefixes(data, http_connect::parse_response) {
        let mut out = Vec::new();
        http_connect::encode_answer(resp.status, "", &mut out);
        let (back, _) = http_connect::parse_response(&out)
            .expect("answer parses")
            .expect("whole answer");
        assert_eq!(back.status, resp.status, "status re-encodes");
    }
    // Once the SOCKS port decides HTTP or not, more bytes never change it.
    if let Some(decided) = http_connect::looks_like_http(data) {
        for cut in 0..data.len().min(20) {
            let early = http_connect::looks_like_http(&data[..cut]);
            assert!(early.is_none() || early == Some(decided), "prefix {cut}");
        }
    }
}

/// Fuzz target `client_hello`: ClientHello detection on `data` agrees with the cheap check,
/// with itself on prefixes and extensions, and with the length it reports.
pub fn client_hello(data: &[u8]) {
    let found = detect::detect(data);
    let prefixes = [0, data.len() / 2, data.len().saturating_sub(1)];
    match &found {
        Detection::NotTls { .. } => {
            // What is not TLS stays not TLS whatever follows (the relay decides once).
            let longer = [data, data].concat();
            assert!(
                matches!(detect::detect(&longer), Detection::NotTls { .. }),
                "more bytes turned non-TLS into {:?}",
                detect::detect(&longer)
            );
        }
        Detection::NeedMore => {
            assert!(data.is_empty() || detect::could_be_tls(data));
            for cut in prefixes {
                assert_eq!(
                    detect::detect(&data[..cut]),
                    Detection::NeedMore,
                    "prefix {cut}"
                );
            }
        }
        Detection::ClientHello(info) => {
            assert!(
                detect::could_be_tls(data),
                "the cheap check misses a ClientHello"
            );
            let n = info.records_len;
            assert!(
                n <= data.len(),
                "records_len {n} past the {} bytes",
                data.len()
            );
            assert_eq!(
                detect::detect(&data[..n]),
                found,
                "trailing bytes changed it"
            );
            for cut in [0, n / 2, n.saturating_sub(1)] {
                assert_eq!(
                    detect::detect(&data[..cut]),
                    Detection::NeedMore,
                    "prefix {cut}"
                );
            }
        }
    }
}

/// Fuzz target `sock_diag`: a netlink reply, as the kernel would send one, is read as its
/// header says (the reply's own sequence number taken as the one asked for), and a reply to
/// another request is stale whatever it holds.
pub fn sock_diag(data: &[u8]) {
    let ne16 = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let ne32 = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let seq = ne32(8).unwrap_or(0);
    let kind = ne16(4);
    match sock_diag::parse_reply(data, seq) {
        Ok(Answer::Inode(inode)) => {
            assert_eq!(kind, Some(sock_diag::SOCK_DIAG_BY_FAMILY));
            assert_eq!(Some(inode), ne32(sock_diag::INODE_AT).map(u64::from));
        }
        Ok(Answer::NotFound) => assert_eq!(kind, Some(sock_diag::NLMSG_ERROR)),
        Ok(Answer::Stale) => panic!("a reply numbered {seq} is stale for request {seq}"),
        Err(e) => {
            let whole = data.len() >= sock_diag::INODE_AT + 4;
            assert!(
                data.len() < 12 || kind != Some(sock_diag::NLMSG_ERROR),
                "{e}: an error reply is not-found"
            );
            assert!(
                !(whole && kind == Some(sock_diag::SOCK_DIAG_BY_FAMILY)),
                "{e}: a whole reply is an inode"
            );
        }
    }
    if data.len() >= 12 {
        let other = sock_diag::parse_reply(data, seq.wrapping_add(1));
        assert_eq!(other.ok(), Some(Answer::Stale), "reply to another request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The seed inputs of fuzz target `target`, as checked in.
    pub(crate) fn corpus(target: &str) -> Vec<Vec<u8>> {
        crate::fuzz_corpus::seeds(target).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn socks5_corpus_holds_and_has_real_handshakes() {
        let seeds = corpus("socks5");
        seeds.iter().for_each(|s| socks5(s));
        // The seeds are real client handshakes: a greeting followed by a CONNECT.
        let requests = seeds
            .iter()
            .filter_map(|s| socks5::parse_greeting(s).ok().flatten())
            .count();
        assert!(requests >= 3, "{requests} seeds start with a greeting");
    }

    #[test]
    fn http_connect_corpus_holds_and_has_real_requests_and_answers() {
        let seeds = corpus("http_connect");
        seeds.iter().for_each(|s| http_connect(s));
        let requests = seeds
            .iter()
            .filter(|s| matches!(http_connect::parse_connect(s), Ok(Some(_))))
            .count();
        let answers = seeds
            .iter()
            .filter(|s| matches!(http_connect::parse_response(s), Ok(Some(_))))
            .count();
        assert!(
            requests >= 2 && answers >= 2,
            "{requests} requests, {answers} answers"
        );
    }

    #[test]
    fn client_hello_corpus_holds_and_has_real_hellos() {
        let seeds = corpus("client_hello");
        seeds.iter().for_each(|s| client_hello(s));
        let hellos = seeds
            .iter()
            .filter(|s| matches!(detect::detect(s), Detection::ClientHello(_)))
            .count();
        assert!(hellos >= 3, "{hellos} real ClientHellos among the seeds");
    }

    #[test]
    fn sock_diag_corpus_holds_and_has_both_kernel_answers() {
        let seeds = corpus("sock_diag");
        seeds.iter().for_each(|s| sock_diag(s));
        let answers: Vec<_> = seeds
            .iter()
            .filter_map(|s| {
                let seq = u32::from_ne_bytes(s.get(8..12)?.try_into().ok()?);
                sock_diag::parse_reply(s, seq).ok()
            })
            .collect();
        assert!(answers.iter().any(|a| matches!(a, Answer::Inode(_))));
        assert!(answers.contains(&Answer::NotFound));
    }

    /// A seed with bytes changed, cut or repeated, as a mutating fuzzer would make.
    fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
        let seeds = corpus(target);
        (
            0..seeds.len(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            any::<usize>(),
        )
            .prop_map(move |(i, edits, cut)| {
                let mut s = seeds[i].clone();
                for (at, b) in edits {
                    if !s.is_empty() {
                        let at = at % s.len();
                        s[at] = b;
                    }
                }
                s.truncate(cut % (s.len() + 1));
                s
            })
    }

    proptest! {
        #[test]
        fn socks5_properties_hold(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            socks5(&data);
        }

        #[test]
        fn socks5_properties_hold_near_the_seeds(data in mutated("socks5")) {
            socks5(&data);
        }

        #[test]
        fn http_connect_properties_hold(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            http_connect(&data);
        }

        #[test]
        fn http_connect_properties_hold_near_the_seeds(data in mutated("http_connect")) {
            http_connect(&data);
        }

        #[test]
        fn client_hello_properties_hold(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            client_hello(&data);
        }

        #[test]
        fn client_hello_properties_hold_near_the_seeds(data in mutated("client_hello")) {
            client_hello(&data);
        }

        #[test]
        fn sock_diag_properties_hold(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            sock_diag(&data);
        }

        #[test]
        fn sock_diag_properties_hold_near_the_seeds(data in mutated("sock_diag")) {
            sock_diag(&data);
        }
    }
}
