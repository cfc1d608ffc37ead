//! TLS and relay helpers for the end-to-end tests that go through `interpose up`'s SOCKS
//! port: a test PKI for real upstream servers, loopback servers, SOCKS CONNECT with a TLS
//! client that trusts the Interpose CA, and waits on records.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, bail};
use proto::{
    common::{ConnStatus, Connection},
    intercept::{HeldPacket, ListHeldRequest, intercept_client::InterceptClient},
};
use proxy_core::socks5::Addr;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{
    Up, WAIT,
    proxy::{all_connections, socks_connect},
    registry_client,
};

/// A test CA and a server certificate for `localhost` and 127.0.0.1.
pub struct Pki {
    dir: tempfile::TempDir,
    chain: Vec<CertificateDer<'static>>,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    /// A fresh CA named `cn` and a leaf it signed.
    pub fn new(cn: &str) -> anyhow::Result<Pki> {
        proxy_core::tls::install_provider();
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, cn);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Pki {
            dir,
            chain: vec![cert.der().clone()],
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate's PEM file (what `--upstream-ca` takes).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate and its key, PEM (for servers configured by file, such as
    /// PostgreSQL).
    pub fn server_pem(&self) -> (&str, &str) {
        (&self.cert_pem, &self.key_pem)
    }

    /// [`Pki::ca_file`] as an argument.
    pub fn ca_arg(&self) -> String {
        self.ca_file().display().to_string()
    }

    /// A TLS acceptor with this PKI's server certificate and the given ALPN protocols.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> anyhow::Result<TlsAcceptor> {
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())?;
        let mut cfg = ServerConfig::builder_with_provider(proxy_core::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// Root store holding the certificates of a PEM file.
pub fn roots(pem_file: &std::path::Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pem_file)? {
        roots.add(c?)?;
    }
    Ok(roots)
}

/// The interpose CA file of a running `up`.
pub fn proxy_ca(up: &Up) -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(
        up.proc.field("ca").context("ca= in the ready line")?,
    ))
}

/// The SOCKS address of a running `up`.
pub fn socks(up: &Up) -> anyhow::Result<SocketAddr> {
    up.proc.addr("socks")
}

/// Runs a loopback server: every accepted connection goes to `handle` in its own task.
pub async fn serve<F, Fut>(handle: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let h = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(WAIT, h(s)).await {
                    eprintln!("test server connection: {e}");
                }
            });
        }
    });
    Ok(addr)
}

/// A TLS server speaking HTTP/1.1 or HTTP/2 (whichever ALPN picked); answers every
/// request with `hello from PATH`.
pub async fn https_server(pki: &Pki) -> anyhow::Result<SocketAddr> {
    let acceptor = pki.acceptor(&[b"h2", b"http/1.1"])?;
    serve(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let tls = acceptor.accept(s).await?;
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let mut conn = h2::server::handshake(tls).await?;
                while let Some(req) = conn.accept().await {
                    let (req, mut respond) = req?;
                    let body = format!("hello from {}", req.uri().path());
                    let resp = ::http::Response::builder().status(200).body(())?;
                    let mut send = respond.send_response(resp, false)?;
                    send.send_data(bytes::Bytes::from(body), true)?;
                }
                return Ok(());
            }
            let mut r = BufReader::new(tls);
            let mut request_line = String::new();
            r.read_line(&mut request_line).await?;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await? == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("?");
            let body = format!("hello from {path}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut tls = r.into_inner();
            tls.write_all(resp.as_bytes()).await?;
            tls.shutdown().await?;
            Ok(())
        }
    })
    .await
}

/// Over a connection to an echo server through a proxy that is being told to hold packets
/// (it follows intercept settings over a stream, so not at once): writes `probe` until one
/// is held, as intercept-svc at `intercept` (its gRPC URL) says; a probe that comes back
/// echoed passed before the proxy had the setting, and the next one is sent. Returns the
/// held packet (bounded by [`WAIT`]). The echo's silence is never taken for a hold.
pub async fn probe_until_held<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    probe: &[u8],
    intercept: &str,
) -> anyhow::Result<HeldPacket> {
    let mut client = InterceptClient::new(crate::channel(intercept, None).await?);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        s.write_all(probe).await?;
        s.flush().await?;
        let mut back = vec![0u8; probe.len()];
        let held = async {
            loop {
                let list = client
                    .list_held(ListHeldRequest::default())
                    .await?
                    .into_inner()
                    .held;
                if let Some(h) = list.into_iter().next() {
                    return anyhow::Ok(h);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        // Either the probe is held (then no echo can come), or it passed and is echoed.
        let outcome = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                h = held => h.map(Some),
                r = s.read_exact(&mut back) => r.map(|_| None).map_err(anyhow::Error::from),
            }
        })
        .await
        .context("the proxy neither held nor passed the probe in time")??;
        match outcome {
            Some(h) => {
                let data = h.packet.as_ref().map(|p| p.data.to_vec());
                anyhow::ensure!(
                    data.as_deref() == Some(probe),
                    "held something else than the probe: {h:?}"
                );
                return Ok(h);
            }
            None => anyhow::ensure!(back == probe, "the echo was not the probe"),
        }
    }
}

/// `intercept on ARGS` on `up`, then waits until its proxy holds packets (it follows the
/// setting over a stream): a probe connection to an echo server sends until a packet is
/// held (as intercept-svc says), which is then forwarded. `ARGS` must hold c2s packets to
/// 127.0.0.1.
pub async fn intercept_on(up: &Up, args: &[&str]) -> anyhow::Result<()> {
    let mut on = vec!["intercept", "on"];
    on.extend(args);
    crate::interpose_ok(&up.grpc, &on).await?;
    let server = serve(|mut s| async move { echo(&mut s).await }).await?;
    let (mut probe, _) = through(up, Addr::Ip(server)).await?;
    let held = probe_until_held(&mut probe, b"probe", &up.grpc).await?;
    crate::interpose_ok(&up.grpc, &["held", "forward", &held.held_id.to_string()]).await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, probe.read_exact(&mut back))
        .await
        .context("the forwarded probe was not echoed")??;
    anyhow::ensure!(
        &back == b"probe",
        "the forwarded probe came back as {back:?}"
    );
    Ok(())
}

/// Echoes what `s` reads until it ends (a TLS peer's missing close_notify included).
pub async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> anyhow::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // A client that closes TCP without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        s.write_all(&buf[..n]).await?;
        s.flush().await?;
    }
}

/// A rustls client configuration trusting `roots`.
pub fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(proxy_core::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS handshake over `tcp` as a client that trusts the CA in `ca`, bounded by [`WAIT`]:
/// the outer error is the timeout, the inner one the handshake's own.
pub async fn tls_connect(
    ca: &std::path::Path,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> anyhow::Result<std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>> {
    tokio::time::timeout(
        WAIT,
        TlsConnector::from(client_config(roots(ca)?)).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")
}

/// Opens a SOCKS CONNECT to `target` through `up`; returns the stream and its local port.
pub async fn through(up: &Up, target: Addr) -> anyhow::Result<(TcpStream, u16)> {
    let r = socks_connect(socks(up)?, target).await?;
    if r.reply != proxy_core::socks5::Reply::Succeeded {
        bail!("SOCKS reply {:?}", r.reply);
    }
    let port = r.stream.local_addr()?.port();
    r.stream.set_nodelay(true)?;
    Ok((r.stream, port))
}

/// Writes `msg` and reads the same number of bytes back.
pub async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> anyhow::Result<Vec<u8>> {
    s.write_all(msg).await?;
    s.flush().await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .context("echo timed out")??;
    Ok(back)
}

/// Waits for a record matching `pred` (the last one seen is in the error).
pub async fn wait_record(
    up: &Up,
    what: &str,
    pred: impl Fn(&Connection) -> bool,
) -> anyhow::Result<Connection> {
    let mut client = registry_client(&up.grpc, None).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let all = all_connections(&mut client).await?;
        if let Some(c) = all.iter().find(|c| pred(c)) {
            return Ok(c.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for a record {what}; records: {all:#?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether the record says disconnected.
pub fn disconnected(c: &Connection) -> bool {
    c.status == ConnStatus::Disconnected as i32
}
