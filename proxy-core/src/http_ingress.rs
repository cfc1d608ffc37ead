//! The async shell around [`protocols::http_connect`] on the `--http` listener: reads a
//! client's CONNECT request, checks `Proxy-Authorization: Basic` against the proxy's
//! credentials, and answers. What follows (the connection's record, the relay, TLS
//! interception, the hold point, upstream rules) is the same as for a SOCKS client.

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::handshake::Accepted;
use protocols::{
    http_connect::{self, HttpError},
    socks5::{Command, Request},
};

/// Why a CONNECT request was not accepted (the client has been answered).
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The request is malformed or not CONNECT.
    #[error("bad HTTP proxy request: {0}")]
    Protocol(#[from] HttpError),
    /// The client closed before its request was complete.
    #[error("client closed during the HTTP CONNECT request")]
    Closed,
    /// No `Proxy-Authorization: Basic`, while credentials are required.
    #[error("HTTP CONNECT without Proxy-Authorization: Basic credentials")]
    NoCredentials,
    /// Wrong user name or password.
    #[error("HTTP proxy authentication failed for user {0:?}")]
    AuthFailed(String),
    /// Reading or writing the client failed.
    #[error("HTTP CONNECT I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the CONNECT request and checks credentials (with `auth` set, only Basic with
/// those); answers errors itself (400, 405, 407, 431). On success nothing has been sent:
/// the caller answers once the target is reached ([`answer`]).
pub async fn accept<S>(s: &mut S, auth: Option<&(String, String)>) -> Result<Accepted, IngressError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let req = loop {
        match http_connect::parse_connect(&buf) {
            Ok(Some((req, n))) => {
                let _ = buf.split_to(n);
                break req;
            }
            Ok(None) => {
                buf.reserve(1024);
                if s.read_buf(&mut buf).await? == 0 {
                    return Err(IngressError::Closed);
                }
            }
            Err(e) => {
                let _ = answer(s, e.status(), &e.to_string()).await;
                return Err(e.into());
            }
        }
    };
    if let Some((user, pass)) = auth {
        let Some((u, p)) = &req.basic else {
            let _ = answer(
                s,
                407,
                "proxy authentication required: send Proxy-Authorization: Basic",
            )
            .await;
            return Err(IngressError::NoCredentials);
        };
        // Constant time, as for SOCKS: how long the check takes reveals nothing.
        let ok: bool = (u[..].ct_eq(user.as_bytes()) & p[..].ct_eq(pass.as_bytes())).into();
        if !ok {
            let _ = answer(s, 407, "proxy authentication failed").await;
            return Err(IngressError::AuthFailed(
                String::from_utf8_lossy(u).into_owned(),
            ));
        }
    }
    Ok(Accepted {
        request: Request {
            command: Command::Connect,
            addr: req.target,
        },
        leftover: buf.freeze(),
    })
}

/// Sends the answer `status` (200, or an error with the one-line body `why`); after an
/// error the write side is shut so the client sees the end of the answer.
pub async fn answer<S>(s: &mut S, status: u16, why: &str) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    http_connect::encode_answer(status, why, &mut out);
    s.write_all(&out).await?;
    if status != 200 {
        s.shutdown().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        input: &[u8],
        auth: Option<(String, String)>,
    ) -> (Result<Accepted, IngressError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(16 * 1024);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let r = accept(&mut server, auth.as_ref()).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn connect_with_early_data() {
        let (r, out) = run(
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01",
            None,
        )
        .await;
        let a = r.unwrap();
        assert_eq!(
            a.request.addr,
            protocols::socks5::Addr::Domain("h".into(), 443)
        );
        assert_eq!(&a.leftover[..], b"\x16\x03\x01");
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn credentials_are_required_when_set() {
        let creds = Some(("u".to_string(), "p".to_string()));
        let (r, out) = run(b"CONNECT h:443 HTTP/1.1\r\n\r\n", creds.clone()).await;
        assert!(matches!(r, Err(IngressError::NoCredentials)));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 407 "), "{text}");
        assert!(text.contains("Proxy-Authenticate: Basic realm=\"interpose\""));
        // "u:x"
        let (r, out) = run(
            b"CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: Basic dTp4\r\n\r\n",
            creds.clone(),
        )
        .await;
        assert!(matches!(r, Err(IngressError::AuthFailed(u)) if u == "u"));
        assert!(out.starts_with(b"HTTP/1.1 407 "));
        // "u:p"
        let (r, _) = run(
            b"CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: basic dTpw\r\n\r\n",
            creds,
        )
        .await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn other_methods_get_405() {
        let (r, out) = run(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", None).await;
        assert!(matches!(
            r,
            Err(IngressError::Protocol(HttpError::Method(_)))
        ));
        assert!(out.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
        let (r, _) = run(b"CONNECT h:443 HTTP/1.1\r\n", None).await;
        assert!(matches!(r, Err(IngressError::Closed)));
    }
}
