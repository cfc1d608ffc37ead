//! The async shell around [`protocols::socks5`]: method negotiation, optional RFC 1929
//! authentication and the request, over any `AsyncRead + AsyncWrite` stream.

use bytes::{Bytes, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use protocols::{
    http_connect,
    socks5::{self, Addr, Reply, ReplyMsg, Request, Socks5Error},
};

/// The most bytes a handshake message may take (a request with a 255-byte name is 262).
const MAX_MESSAGE: usize = 1024;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client sent something that is not SOCKS5.
    #[error("malformed SOCKS handshake: {0}")]
    Protocol(#[from] Socks5Error),
    /// The client closed before the handshake completed.
    #[error("client closed during the SOCKS handshake")]
    Closed,
    /// A handshake message was longer than any valid one.
    #[error("SOCKS handshake message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    /// None of the offered methods is acceptable.
    #[error("client offered no acceptable authentication method (offered {0:?})")]
    NoAcceptableMethod(Vec<u8>),
    /// Wrong username or password.
    #[error("SOCKS authentication failed for user {0:?}")]
    AuthFailed(String),
    /// The client sent an HTTP request (an HTTP proxy client at the SOCKS port); its
    /// request header has been read, and it has not been answered.
    #[error("HTTP request on the SOCKS port")]
    HttpOnSocksPort,
    /// Reading or writing the client failed.
    #[error("SOCKS handshake I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A completed handshake: the request and any bytes the client sent after it.
#[derive(Debug)]
pub struct Accepted {
    /// The client's request.
    pub request: Request,
    /// Bytes received after the request (a client that did not wait for the reply).
    pub leftover: Bytes,
}

/// Reads until `parse` yields a message; returns it and consumes its bytes from `buf`.
async fn read_msg<S, T>(
    s: &mut S,
    buf: &mut BytesMut,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>,
) -> Result<T, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some((msg, n)) = parse(buf)? {
            let _ = buf.split_to(n);
            return Ok(msg);
        }
        if buf.len() >= MAX_MESSAGE {
            return Err(HandshakeError::TooLong);
        }
        buf.reserve(MAX_MESSAGE - buf.len());
        if s.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// Runs the server side of the handshake up to (not including) the reply to the request.
/// With `auth` set, only username/password with those credentials is accepted; otherwise
/// only "no authentication".
pub async fn accept<S>(
    s: &mut S,
    auth: Option<&(String, String)>,
) -> Result<Accepted, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(MAX_MESSAGE);
    // An HTTP proxy client at this port gets an answer it can show (see `HttpOnSocksPort`),
    // not a silent close: read its request header first, so closing sends no reset.
    loop {
        match http_connect::looks_like_http(&buf) {
            Some(false) => break,
            Some(true) => {
                while !http_connect::header_complete(&buf) && buf.len() < http_connect::MAX_HEADER {
                    buf.reserve(1024);
                    if s.read_buf(&mut buf).await? == 0 {
                        break;
                    }
                }
                return Err(HandshakeError::HttpOnSocksPort);
            }
            None => {
                buf.reserve(MAX_MESSAGE);
                if s.read_buf(&mut buf).await? == 0 {
                    return Err(HandshakeError::Closed);
                }
            }
        }
    }
    let greeting = read_msg(s, &mut buf, socks5::parse_greeting).await?;
    let wanted = if auth.is_some() {
        socks5::METHOD_USERPASS
    } else {
        socks5::METHOD_NONE
    };
    let mut out = Vec::with_capacity(16);
    if !greeting.methods.contains(&wanted) {
        socks5::encode_method_choice(socks5::METHOD_UNACCEPTABLE, &mut out);
        s.write_all(&out).await?;
        return Err(HandshakeError::NoAcceptableMethod(greeting.methods));
    }
    socks5::encode_method_choice(wanted, &mut out);
    s.write_all(&out).await?;
    if let Some((user, pass)) = auth {
        let up = read_msg(s, &mut buf, socks5::parse_userpass).await?;
        // Constant time: how long the check takes reveals nothing about either value.
        let ok: bool =
            (up.user[..].ct_eq(user.as_bytes()) & up.pass[..].ct_eq(pass.as_bytes())).into();
        out.clear();
        socks5::encode_userpass_reply(ok, &mut out);
        s.write_all(&out).await?;
        if !ok {
            return Err(HandshakeError::AuthFailed(
                String::from_utf8_lossy(&up.user).into_owned(),
            ));
        }
    }
    let request = match read_msg(s, &mut buf, socks5::parse_request).await {
        Ok(r) => r,
        Err(HandshakeError::Protocol(e)) => {
            // Answer what we can (e.g. 0x08 for an unknown address type) before closing.
            let _ = reply(s, e.reply(), None).await;
            return Err(HandshakeError::Protocol(e));
        }
        Err(e) => return Err(e),
    };
    Ok(Accepted {
        request,
        leftover: buf.freeze(),
    })
}

/// Sends the reply to the request; `bound` defaults to 0.0.0.0:0.
pub async fn reply<S>(
    s: &mut S,
    reply: Reply,
    bound: Option<std::net::SocketAddr>,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let bound = bound.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut out = Vec::with_capacity(32);
    socks5::encode_reply(
        &ReplyMsg {
            reply,
            bound: Addr::Ip(bound),
        },
        &mut out,
    );
    s.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::socks5::Command;

    #[tokio::test]
    async fn no_auth_request_with_leftover() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(async move { accept(&mut server, None).await });
        client.write_all(&[5, 1, 0]).await.unwrap();
        let mut choice = [0u8; 2];
        client.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [5, 0]);
        client
            .write_all(&[5, 1, 0, 3, 1, b'h', 0, 80, b'G', b'E'])
            .await
            .unwrap();
        let acc = srv.await.unwrap().unwrap();
        assert_eq!(acc.request.command, Command::Connect);
        assert_eq!(acc.request.addr, Addr::Domain("h".into(), 80));
        assert_eq!(&acc.leftover[..], b"GE");
    }

    #[tokio::test]
    async fn auth_is_enforced() {
        let creds = ("u".to_string(), "p".to_string());
        let (mut client, mut server) = tokio::io::duplex(1024);
        let c2 = creds.clone();
        let srv = tokio::spawn(async move { accept(&mut server, Some(&c2)).await });
        client.write_all(&[5, 1, 0]).await.unwrap();
        let mut choice = [0u8; 2];
        client.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [5, 0xFF]);
        assert!(matches!(
            srv.await.unwrap(),
            Err(HandshakeError::NoAcceptableMethod(_))
        ));

        let (mut client, mut server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(async move { accept(&mut server, Some(&creds)).await });
        client.write_all(&[5, 1, 2]).await.unwrap();
        client.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [5, 2]);
        client.write_all(&[1, 1, b'u', 1, b'x']).await.unwrap();
        client.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [1, 1]);
        assert!(matches!(
            srv.await.unwrap(),
            Err(HandshakeError::AuthFailed(_))
        ));
    }

    #[tokio::test]
    async fn http_is_recognised_and_its_header_read() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(async move {
            let r = accept(&mut server, None).await;
            (r, server)
        });
        client.write_all(b"CONN").await.unwrap();
        client
            .write_all(b"ECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n")
            .await
            .unwrap();
        let (r, _server) = srv.await.unwrap();
        assert!(matches!(r, Err(HandshakeError::HttpOnSocksPort)));
    }

    #[tokio::test]
    async fn bad_address_type_gets_0x08() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(async move { accept(&mut server, None).await });
        client
            .write_all(&[5, 1, 0, 5, 1, 0, 7, 0, 0])
            .await
            .unwrap();
        let mut b = [0u8; 12];
        client.read_exact(&mut b).await.unwrap();
        assert_eq!(&b[..4], &[5, 0, 5, 0x08][..]);
        assert!(srv.await.unwrap().is_err());
    }
}
