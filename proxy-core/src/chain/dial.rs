//! The async shell of [`crate::chain`]: the exchange with an upstream proxy over a TCP
//! stream already connected to it, ending either with the stream as a tunnel to the target
//! or with the refusal (the reply the client gets and a reason quoting the upstream).
//!
//! Messages from the upstream are read exactly: nothing past an answer is consumed (a
//! server that speaks first, such as SMTP, may send its banner right behind the 200 or the
//! SOCKS reply), so what follows belongs to the relayed stream untouched.

use std::io;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::chain::{Scheme, Upstream};
use protocols::{
    http_connect,
    socks5::{self, Addr, Command, Greeting, Reply, ReplyMsg, Request, UserPass},
};

/// The longest answer an upstream may send before the tunnel.
const MAX_ANSWER: usize = http_connect::MAX_HEADER;

/// Why an upstream did not open the tunnel: the reply the client gets, and the reason for
/// the record (it names the upstream without credentials, and quotes its answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The SOCKS reply (an HTTP client gets the matching status).
    pub reply: Reply,
    /// The record's reason.
    pub reason: String,
}

impl Refusal {
    fn new(reply: Reply, up: &Upstream, what: impl std::fmt::Display) -> Self {
        Self {
            reply,
            reason: format!("upstream {up} {what}"),
        }
    }
}

/// Asks `up` (whose listener `s` is connected to) for a tunnel to `target`.
pub async fn open(s: &mut TcpStream, up: &Upstream, target: &Addr) -> Result<(), Refusal> {
    let r = match up.scheme {
        Scheme::Socks5 | Scheme::Socks5h => socks(s, up, target).await,
        Scheme::Http => http(s, up, target).await,
    };
    r.map_err(|e| match e {
        Step::Refused(r) => r,
        Step::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => Refusal::new(
            Reply::GeneralFailure,
            up,
            "closed the connection before answering",
        ),
        Step::Io(e) => Refusal::new(Reply::GeneralFailure, up, format_args!("failed: {e}")),
    })
}

enum Step {
    Refused(Refusal),
    Io(io::Error),
}

impl From<io::Error> for Step {
    fn from(e: io::Error) -> Self {
        Step::Io(e)
    }
}

async fn socks(s: &mut TcpStream, up: &Upstream, target: &Addr) -> Result<(), Step> {
    let garbled = |e: socks5::Socks5Error| {
        Step::Refused(Refusal::new(
            Reply::GeneralFailure,
            up,
            format_args!("does not speak SOCKS5: {e}"),
        ))
    };
    let mut methods = vec![socks5::METHOD_NONE];
    if up.creds.is_some() {
        methods.push(socks5::METHOD_USERPASS);
    }
    let mut out = Vec::with_capacity(300);
    socks5::encode_greeting(&Greeting { methods }, &mut out);
    s.write_all(&out).await?;
    let method = read_exact_message(s, socks5::parse_method_choice)
        .await?
        .map_err(garbled)?;
    match (method, &up.creds) {
        (socks5::METHOD_NONE, _) => {}
        (socks5::METHOD_USERPASS, Some((user, pass))) => {
            out.clear();
            socks5::encode_userpass(
                &UserPass {
                    user: user.as_bytes().to_vec(),
                    pass: pass.as_bytes().to_vec(),
                },
                &mut out,
            );
            s.write_all(&out).await?;
            let ok = read_exact_message(s, socks5::parse_userpass_reply)
                .await?
                .map_err(garbled)?;
            if !ok {
                return Err(Step::Refused(Refusal::new(
                    Reply::NotAllowed,
                    up,
                    "refused the credentials (RFC 1929 authentication failed)",
                )));
            }
        }
        (socks5::METHOD_UNACCEPTABLE, creds) => {
            return Err(Step::Refused(Refusal::new(
                Reply::NotAllowed,
                up,
                if creds.is_some() {
                    "accepted none of the offered authentication methods"
                } else {
                    "requires authentication: give USER:PASS@ in the upstream URL"
                },
            )));
        }
        (m, _) => {
            return Err(Step::Refused(Refusal::new(
                Reply::GeneralFailure,
                up,
                format_args!("chose authentication method {m:#04x}, which was not offered"),
            )));
        }
    }
    out.clear();
    socks5::encode_request(
        &Request {
            command: Command::Connect,
            addr: target.clone(),
        },
        &mut out,
    );
    s.write_all(&out).await?;
    let ReplyMsg { reply, .. } = read_exact_message(s, socks5::parse_reply)
        .await?
        .map_err(garbled)?;
    if reply == Reply::Succeeded {
        return Ok(());
    }
    // The upstream's own reply is the right one for the client: it says what happened.
    Err(Step::Refused(Refusal::new(
        reply,
        up,
        format_args!(
            "refused CONNECT {target}: reply {:#04x} ({})",
            reply.code(),
            reply.meaning()
        ),
    )))
}

async fn http(s: &mut TcpStream, up: &Upstream, target: &Addr) -> Result<(), Step> {
    let mut out = Vec::with_capacity(256);
    http_connect::encode_connect(
        target,
        up.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        &mut out,
    );
    s.write_all(&out).await?;
    let resp = read_exact_message(s, http_connect::parse_response)
        .await?
        .map_err(|e| {
            Step::Refused(Refusal::new(
                Reply::GeneralFailure,
                up,
                format_args!("does not speak HTTP CONNECT: {e}"),
            ))
        })?;
    if (200..300).contains(&resp.status) {
        return Ok(());
    }
    Err(Step::Refused(Refusal::new(
        http_connect::reply_for_status(resp.status),
        up,
        format_args!("refused CONNECT {target}: {:?}", resp.line),
    )))
}

/// Reads one message with `parse` and consumes exactly its bytes: each read first peeks,
/// and takes only what the message needs once it is complete. Errors of `parse` are the
/// inner result; I/O errors (end of stream as `UnexpectedEof`) the outer.
async fn read_exact_message<T, E>(
    s: &mut TcpStream,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> io::Result<Result<T, E>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut peeked = vec![0u8; MAX_ANSWER];
    loop {
        let n = s.peek(&mut peeked).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let have = buf.len();
        buf.extend_from_slice(&peeked[..n]);
        match parse(&buf) {
            Ok(Some((msg, used))) => {
                // `used > have`: the bytes already taken did not make a message.
                s.read_exact(&mut peeked[..used - have]).await?;
                return Ok(Ok(msg));
            }
            Ok(None) if buf.len() < MAX_ANSWER => {
                // All peeked bytes belong to the message: take them.
                s.read_exact(&mut peeked[..n]).await?;
            }
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("answer longer than {MAX_ANSWER} bytes"),
                ));
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// A scripted upstream: reads `expect` exactly, then writes `answer`.
    async fn scripted(
        steps: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let t = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            for (expect, answer) in steps {
                let mut got = vec![0u8; expect.len()];
                s.read_exact(&mut got).await.unwrap();
                assert_eq!(got, expect);
                s.write_all(&answer).await.unwrap();
            }
            s
        });
        (a, t)
    }

    fn up(url: &str, a: std::net::SocketAddr) -> Upstream {
        let mut u = Upstream::parse(url).unwrap();
        u.port = a.port();
        u
    }

    #[tokio::test]
    async fn socks5_with_credentials_leaves_the_banner_unread() {
        let target = Addr::Domain("db".into(), 5432);
        let mut req = vec![5, 1, 0, 3, 2, b'd', b'b'];
        req.extend_from_slice(&5432u16.to_be_bytes());
        let mut reply = vec![5, 0, 0, 1, 10, 0, 0, 1, 0, 9];
        reply.extend_from_slice(b"BANNER");
        let (a, srv) = scripted(vec![
            (vec![5, 2, 0, 2], vec![5, 2]),
            (vec![1, 1, b'u', 2, b'p', b'w'], vec![1, 0]),
            (req, reply),
        ])
        .await;
        let u = up("socks5h://u:pw@127.0.0.1:1", a);
        let mut s = TcpStream::connect(a).await.unwrap();
        open(&mut s, &u, &target).await.unwrap();
        let mut banner = [0u8; 6];
        s.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"BANNER");
        drop(srv);
    }

    #[tokio::test]
    async fn refusals_quote_the_upstream() {
        let target = Addr::Ip("10.0.0.9:80".parse().unwrap());
        let (a, _srv) = scripted(vec![(vec![5, 1, 0], vec![5, 0xFF])]).await;
        let mut s = TcpStream::connect(a).await.unwrap();
        let r = open(&mut s, &up("socks5://127.0.0.1:1", a), &target)
            .await
            .unwrap_err();
        assert_eq!(r.reply, Reply::NotAllowed);
        assert!(r.reason.contains("requires authentication"), "{}", r.reason);

        let (a, _srv) = scripted(vec![
            (vec![5, 2, 0, 2], vec![5, 2]),
            (
                vec![1, 1, b'u', 6, b's', b'e', b'c', b'r', b'e', b't'],
                vec![1, 1],
            ),
        ])
        .await;
        let mut s = TcpStream::connect(a).await.unwrap();
        let r = open(&mut s, &up("socks5://u:secret@127.0.0.1:1", a), &target)
            .await
            .unwrap_err();
        assert_eq!(r.reply, Reply::NotAllowed);
        assert_eq!(
            r.reason,
            format!(
                "upstream socks5://127.0.0.1:{} refused the credentials (RFC 1929 authentication failed)",
                a.port()
            )
        );

        let mut req = Vec::new();
        socks5::encode_request(
            &Request {
                command: Command::Connect,
                addr: target.clone(),
            },
            &mut req,
        );
        let (a, _srv) = scripted(vec![
            (vec![5, 1, 0], vec![5, 0]),
            (req, vec![5, 5, 0, 1, 0, 0, 0, 0, 0, 0]),
        ])
        .await;
        let mut s = TcpStream::connect(a).await.unwrap();
        let r = open(&mut s, &up("socks5://127.0.0.1:1", a), &target)
            .await
            .unwrap_err();
        assert_eq!(r.reply, Reply::ConnectionRefused);
        assert!(
            r.reason
                .ends_with("refused CONNECT 10.0.0.9:80: reply 0x05 (connection refused)"),
            "{}",
            r.reason
        );

        let (a, _srv) = scripted(vec![(
            b"CONNECT 10.0.0.9:80 HTTP/1.1\r\nHost: 10.0.0.9:80\r\nProxy-Authorization: Basic dTpzZWNyZXQ=\r\n\r\n".to_vec(),
            b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n".to_vec(),
        )])
        .await;
        let mut s = TcpStream::connect(a).await.unwrap();
        let r = open(&mut s, &up("http://u:secret@127.0.0.1:1", a), &target)
            .await
            .unwrap_err();
        assert_eq!(r.reply, Reply::NotAllowed);
        assert!(
            r.reason.ends_with(
                "refused CONNECT 10.0.0.9:80: \"HTTP/1.0 407 Proxy Authentication Required\""
            ),
            "{}",
            r.reason
        );
        assert!(!r.reason.contains("secret"));

        let (a, _srv) = scripted(vec![(vec![5, 1, 0], vec![])]).await;
        let mut s = TcpStream::connect(a).await.unwrap();
        let u = up("socks5://127.0.0.1:1", a);
        let srv_end = _srv;
        let h = tokio::spawn(async move { open(&mut s, &u, &target).await });
        drop(srv_end.await.unwrap());
        let r = h.await.unwrap().unwrap_err();
        assert_eq!(r.reply, Reply::GeneralFailure);
        assert!(
            r.reason.ends_with("closed the connection before answering"),
            "{}",
            r.reason
        );
    }
}
