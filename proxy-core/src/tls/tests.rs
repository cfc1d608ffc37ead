//! End-to-end tests of the TLS splice facade with real rustls clients and servers (and
//! `openssl s_client`) on 127.0.0.1: a minimal relay stands in for the SOCKS relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::*;
use proto::common::ClosedBy;

const WAIT: Duration = Duration::from_secs(10);

/// A throwaway CA for the "real" upstream servers, plus a server certificate for
/// `localhost` and 127.0.0.1, all written as PEM files into a temp dir.
struct TestPki {
    dir: tempfile::TempDir,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    ca_der: CertificateDer<'static>,
}

impl TestPki {
    fn new(cn: &str) -> TestPki {
        install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, cn);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
        TestPki {
            dir,
            ca_der: ca.der().clone(),
            ca_key,
            ca_params,
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate (server or client) for `names`; returns (chain, key) and also
    /// writes them to `<stem>.pem` / `<stem>-key.pem`.
    fn issue(
        &self,
        names: &[&str],
        stem: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        std::fs::write(self.dir.path().join(format!("{stem}.pem")), cert.pem()).expect("write");
        std::fs::write(
            self.dir.path().join(format!("{stem}-key.pem")),
            key.serialize_pem(),
        )
        .expect("write");
        let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key");
        (vec![cert.der().clone()], key_der)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Which server a test runs upstream.
struct ServerSpec {
    alpn: Vec<Vec<u8>>,
    /// Require client certificates signed by this CA.
    client_ca: Option<CertificateDer<'static>>,
    tls12_only: bool,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            alpn: vec![b"http/1.1".to_vec()],
            client_ca: None,
            tls12_only: false,
        }
    }
}

/// A rustls echo server; it first writes one line naming its negotiated ALPN.
async fn start_upstream(pki: &TestPki, spec: ServerSpec) -> SocketAddr {
    let (chain, key) = pki.issue(&["localhost", "127.0.0.1"], "server");
    let versions: &[&rustls::SupportedProtocolVersion] = if spec.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::ALL_VERSIONS
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions");
    let mut cfg = match spec.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca).expect("root");
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    }
    .with_single_cert(chain, key)
    .expect("server cert");
    cfg.alpn_protocols = spec.alpn;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = timeout(WAIT, acceptor.accept(tcp)).await else {
                    return;
                };
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_else(|| "none".into());
                let _ = tls.write_all(format!("alpn={alpn}\n").as_bytes()).await;
                let mut buf = [0u8; 4096];
                loop {
                    match timeout(WAIT, tls.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        _ => {
                            let _ = tls.shutdown().await;
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A minimal stand-in for the relay: detect, intercept, pump. Each interception result is
/// sent on the returned channel.
/// Intercepts one connection, reports the outcome on `tx`, then splices the decrypted legs
/// until either side ends (bounded by [`WAIT`]): the tail shared by the test relays.
async fn terminate_and_splice(
    splicer: &Splicer,
    client: TcpStream,
    prefix: Bytes,
    hello: &ClientHelloInfo,
    up: TcpStream,
    target: &Target,
    tx: &mpsc::UnboundedSender<Result<TlsSummary, SpliceError>>,
) {
    match splicer.terminate(client, prefix, hello, up, target).await {
        Ok(mut i) => {
            let _ = tx.send(Ok(i.summary.clone()));
            let _ = timeout(
                WAIT,
                tokio::io::copy_bidirectional(&mut i.client, &mut i.upstream),
            )
            .await;
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    }
}

async fn start_relay(
    splicer: Arc<Splicer>,
    upstream: SocketAddr,
    target_host: Option<String>,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<TlsSummary, SpliceError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let splicer = splicer.clone();
            let tx = tx.clone();
            let target = Target {
                host: target_host.clone(),
                ip: upstream.ip(),
                port: upstream.port(),
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let hello = loop {
                    let mut chunk = [0u8; 1024];
                    let n = match timeout(WAIT, client.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    match detect(&buf) {
                        Detection::NeedMore => continue,
                        Detection::NotTls { .. } => return,
                        Detection::ClientHello(info) => break info,
                    }
                };
                let Ok(Ok(up)) = timeout(WAIT, TcpStream::connect(upstream)).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                terminate_and_splice(&splicer, client, Bytes::from(buf), &hello, up, &target, &tx)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn roots_from(der: &CertificateDer<'static>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).expect("root");
    roots
}

/// Connects a rustls client through the relay.
async fn client_connect(
    relay: SocketAddr,
    roots: RootCertStore,
    name: ServerName<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(relay).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    timeout(WAIT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("client handshake timed out"))?
}

/// Reads the server's first line, then checks an echo round trip.
async fn echo_check(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = timeout(WAIT, tls.read(&mut b))
            .await
            .expect("no timeout")
            .expect("read");
        assert!(n > 0, "eof before the greeting line");
        line.push(b[0]);
    }
    tls.write_all(b"ping through the proxy")
        .await
        .expect("write");
    let mut echo = [0u8; 22];
    timeout(WAIT, tls.read_exact(&mut echo))
        .await
        .expect("no timeout")
        .expect("read");
    assert_eq!(&echo, b"ping through the proxy");
    String::from_utf8_lossy(&line).trim().to_owned()
}

async fn next_result(
    rx: &mut mpsc::UnboundedReceiver<Result<TlsSummary, SpliceError>>,
) -> Result<TlsSummary, SpliceError> {
    timeout(WAIT, rx.recv())
        .await
        .expect("relay reported in time")
        .expect("relay alive")
}

fn splicer(
    ca_dir: &Path,
    upstream_ca: Option<PathBuf>,
    f: impl FnOnce(&mut SpliceOptions),
) -> Arc<Splicer> {
    let ca = Arc::new(Ca::load_or_create(ca_dir).expect("ca"));
    let mut opts = SpliceOptions {
        upstream: UpstreamOptions {
            system_roots: false,
            extra_roots: upstream_ca.into_iter().collect(),
            ..UpstreamOptions::default()
        },
        handshake_timeout: WAIT,
        ..SpliceOptions::default()
    };
    f(&mut opts);
    Arc::new(Splicer::new(ca, opts).expect("splicer"))
}

/// Loads the CA as a client would: from the exported PEM file.
fn exported_roots(i: &Splicer, dir: &Path) -> RootCertStore {
    let out = dir.join("exported-ca.pem");
    i.ca().export(&out, false).expect("export");
    let der = CertificateDer::from_pem_file(&out).expect("pem");
    roots_from(&der)
}

#[tokio::test]
async fn intercepts_with_exported_ca_and_reports_both_legs() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, Some("localhost".into())).await;
    let roots = exported_roots(&icp, data.path());
    let mut tls = client_connect(
        relay,
        roots,
        ServerName::try_from("localhost").expect("name"),
        &[b"h2", b"http/1.1"],
    )
    .await
    .expect("client handshake through the proxy");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(echo_check(&mut tls).await, "alpn=http/1.1");
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.sni.as_deref(), Some("localhost"));
    assert_eq!(s.leaf_name, "localhost");
    assert_eq!(s.client.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(s.upstream.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(s.client.version, "TLSv1.3");
    assert_eq!(s.upstream.version, "TLSv1.3");
    assert!(
        s.client.cipher_suite.starts_with("TLS_"),
        "{}",
        s.client.cipher_suite
    );
    assert!(!s.client.cipher_suite.starts_with("TLS13_"));
    assert!(!s.insecure);
    assert_eq!(s.client_cert, ClientCertStatus::NotRequested);
}

#[tokio::test]
async fn h2_alpn_passes_through() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(
        &pki,
        ServerSpec {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            ..ServerSpec::default()
        },
    )
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[b"h2", b"http/1.1"],
    )
    .await
    .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(echo_check(&mut tls).await, "alpn=h2");
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.client.alpn.as_deref(), Some("h2"));
    assert_eq!(s.upstream.alpn.as_deref(), Some("h2"));

    // A client offering no ALPN gets none, and the server saw none offered.
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    assert_eq!(echo_check(&mut tls).await, "alpn=none");
}

#[tokio::test]
async fn client_without_sni_to_ip_target_validates_ip_san() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::IpAddress(server.ip().into()),
        &[],
    )
    .await
    .expect("client validated the IP SAN");
    echo_check(&mut tls).await;
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.sni, None);
    assert_eq!(s.leaf_name, "127.0.0.1");
    // The leaf carries an IP SAN and no DNS SAN.
    let chain = tls.get_ref().1.peer_certificates().expect("chain");
    let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse");
    let san = x.subject_alternative_name().expect("ok").expect("san");
    assert!(
        san.value
            .general_names
            .iter()
            .all(|g| matches!(g, x509_parser::extensions::GeneralName::IPAddress(_)))
    );
}

#[tokio::test]
async fn client_that_does_not_trust_the_ca_is_recorded_as_rejecting() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    // The client trusts only some other CA.
    let other = TestPki::new("Someone Else");
    let err = client_connect(
        relay,
        roots_from(&other.ca_der),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect_err("the client must reject our certificate");
    assert!(
        err.to_string().contains("UnknownIssuer") || err.to_string().contains("issuer"),
        "{err}"
    );
    let e = next_result(&mut rx).await.expect_err("interception failed");
    assert!(
        matches!(
            e,
            SpliceError::ClientRejectedCertificate(AlertDescription::UnknownCA)
        ),
        "{e:?}"
    );
    assert_eq!(e.closed_by(), ClosedBy::Client);
    assert_eq!(e.reason(), "client rejected certificate: unknown CA");
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_an_upstream_error_and_the_client_gets_an_alert() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    // The proxy trusts a different CA than the one that signed the server.
    let other = TestPki::new("Unrelated CA");
    let icp = splicer(data.path(), Some(other.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let err = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect_err("upstream failure reaches the client");
    let alert = rustls_error(&err).cloned();
    assert_eq!(
        alert,
        Some(rustls::Error::AlertReceived(
            AlertDescription::HandshakeFailure
        )),
        "{err}"
    );
    let e = next_result(&mut rx).await.expect_err("interception failed");
    assert!(matches!(e, SpliceError::UpstreamCertificate(_)), "{e:?}");
    assert_eq!(e.closed_by(), ClosedBy::Proxy);
    assert!(e.reason().contains("unknown issuer"), "{}", e.reason());
    // What to do about it: name the CA with --upstream-ca.
    assert!(
        e.reason()
            .contains("pass its certificate with --upstream-ca FILE"),
        "{}",
        e.reason()
    );
    assert!(e.is_upstream());
}

#[tokio::test]
async fn insecure_mode_accepts_any_upstream_certificate_and_says_so() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), None, |o| o.upstream.insecure = true);
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect("handshake");
    echo_check(&mut tls).await;
    let s = next_result(&mut rx).await.expect("intercepted");
    assert!(s.insecure);
}

#[tokio::test]
async fn keylog_gets_lines_for_both_legs() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let keylog = data.path().join("keys.log");
    let kl = keylog.clone();
    let icp = splicer(data.path(), Some(pki.ca_file()), move |o| {
        o.keylog = Some(kl)
    });
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect("handshake");
    echo_check(&mut tls).await;
    next_result(&mut rx).await.expect("intercepted");
    let text = std::fs::read_to_string(&keylog).expect("keylog");
    let randoms: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("CLIENT_TRAFFIC_SECRET_0 "))
        .filter_map(|l| l.split(' ').nth(1))
        .collect();
    assert_eq!(randoms.len(), 2, "one per leg:\n{text}");
    assert!(text.contains("SERVER_HANDSHAKE_TRAFFIC_SECRET "));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keylog)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn server_demanding_a_client_certificate_is_recognised() {
    let pki = TestPki::new("Upstream Test CA");
    // TLS 1.2: the server rejects the empty certificate inside the handshake.
    let server = start_upstream(
        &pki,
        ServerSpec {
            client_ca: Some(pki.ca_der.clone()),
            tls12_only: true,
            ..ServerSpec::default()
        },
    )
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let _ = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect_err("no client certificate, no connection");
    let e = next_result(&mut rx).await.expect_err("interception failed");
    assert!(
        matches!(e, SpliceError::ServerDemandedClientCert(_)),
        "{e:?}"
    );
    assert!(
        e.reason().contains("demanded a client certificate"),
        "{}",
        e.reason()
    );
}

#[tokio::test]
async fn tls13_server_demanding_a_client_certificate_shows_on_first_read() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(
        &pki,
        ServerSpec {
            client_ca: Some(pki.ca_der.clone()),
            ..ServerSpec::default()
        },
    )
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    // Drive the facade directly: the client side is a real rustls client over a duplex pipe.
    let (client_side, proxy_side) = tokio::io::duplex(64 * 1024);
    let roots = exported_roots(&icp, data.path());
    let client_task = tokio::spawn(async move {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let c = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        timeout(
            WAIT,
            c.connect(
                ServerName::try_from("localhost").expect("name"),
                client_side,
            ),
        )
        .await
    });
    // The facade gets the pipe; the client's real hello arrives through it (no prefix).
    let up = TcpStream::connect(server).await.expect("connect");
    let target = Target {
        host: None,
        ip: server.ip(),
        port: server.port(),
    };
    // Read the real ClientHello off the pipe first, as the relay would.
    let mut proxy_side = proxy_side;
    let mut buf = Vec::new();
    let real = loop {
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, proxy_side.read(&mut chunk))
            .await
            .expect("no timeout")
            .expect("read");
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Detection::ClientHello(i) = detect(&buf) {
            break i;
        }
    };
    let mut i = icp
        .terminate(proxy_side, Bytes::from(buf), &real, up, &target)
        .await
        .expect("TLS 1.3 handshake completes before the server checks");
    assert_eq!(
        i.summary.client_cert,
        ClientCertStatus::RequestedNoneAvailable
    );
    let _client = client_task
        .await
        .expect("join")
        .expect("no timeout")
        .expect("client ok");
    let mut b = [0u8; 64];
    let err = timeout(WAIT, i.upstream.read(&mut b))
        .await
        .expect("no timeout")
        .expect_err("server alerts");
    let reason = upstream_stream_error_reason(&err, &i.summary);
    assert!(reason.contains("demanded a client certificate"), "{reason}");
}

#[tokio::test]
async fn configured_client_certificate_is_sent_to_matching_host() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(
        &pki,
        ServerSpec {
            client_ca: Some(pki.ca_der.clone()),
            ..ServerSpec::default()
        },
    )
    .await;
    pki.issue(&["device-1"], "client");
    let data = tempfile::tempdir().expect("tempdir");
    let spec: ClientCertSpec = format!(
        "localhost={},{}",
        pki.path("client.pem").display(),
        pki.path("client-key.pem").display()
    )
    .parse()
    .expect("spec");
    let icp = splicer(data.path(), Some(pki.ca_file()), move |o| {
        o.upstream.client_certs = vec![spec];
    });
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect("handshake");
    echo_check(&mut tls).await;
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.client_cert, ClientCertStatus::Sent);
}

#[tokio::test]
async fn passthrough_patterns_match_sni_name_or_ip() {
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), None, |o| {
        o.upstream.insecure = true;
        o.passthrough = vec![
            "*.bank.example".parse().expect("p"),
            "192.0.2.7".parse().expect("p"),
        ];
    });
    let t = |host: Option<&str>, ip: &str| Target {
        host: host.map(str::to_owned),
        ip: ip.parse().expect("ip"),
        port: 443,
    };
    assert!(icp.passthrough(Some("www.bank.example"), &t(None, "10.0.0.1")));
    assert!(icp.passthrough(None, &t(Some("login.bank.example"), "10.0.0.1")));
    assert!(icp.passthrough(None, &t(None, "192.0.2.7")));
    assert!(!icp.passthrough(Some("example.com"), &t(None, "10.0.0.1")));
}

#[tokio::test]
async fn regenerated_ca_is_used_for_new_connections() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let old_roots = exported_roots(&icp, data.path());
    let mut tls = client_connect(
        relay,
        old_roots.clone(),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect("handshake");
    echo_check(&mut tls).await;
    next_result(&mut rx).await.expect("ok");
    assert!(!icp.reload_ca_if_changed().expect("reload"));
    // Another process (the CLI) regenerates the files; the running proxy reloads them.
    Ca::regenerate(data.path()).expect("regen");
    assert!(icp.reload_ca_if_changed().expect("reload"));
    assert!(icp.leaves().is_empty());
    // The old CA no longer works; the new one does.
    assert!(
        client_connect(
            relay,
            old_roots,
            ServerName::try_from("localhost").expect("name"),
            &[]
        )
        .await
        .is_err()
    );
    let e = next_result(&mut rx).await.expect_err("rejected");
    assert_eq!(e.closed_by(), ClosedBy::Client);
    let mut tls = client_connect(
        relay,
        exported_roots(&icp, data.path()),
        ServerName::try_from("localhost").expect("name"),
        &[],
    )
    .await
    .expect("handshake with the new CA");
    echo_check(&mut tls).await;
}

/// Whether the real `openssl` is on PATH. A missing one fails the test (`.ci/run` installs
/// it) unless the developer opted out with `INTERPOSE_TEST_SKIP_MISSING_TOOLS=1` (the one
/// variable the README's "Testing" names; the end-to-end tests' `tests::tools::required`
/// reads it too): then the test is skipped, saying so.
fn openssl_present() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("openssl").is_file()));
    if found {
        return true;
    }
    if std::env::var("INTERPOSE_TEST_SKIP_MISSING_TOOLS").is_ok_and(|v| v == "1") {
        eprintln!("openssl is not installed and INTERPOSE_TEST_SKIP_MISSING_TOOLS=1: skipping");
        return false;
    }
    panic!(
        "openssl is not installed: this test drives the real openssl (.ci/run installs it); \
         set INTERPOSE_TEST_SKIP_MISSING_TOOLS=1 to skip it"
    );
}

/// Starts `openssl s_client` through `relay` with `args`, trusting the CA in `ca_file`.
fn s_client(relay: SocketAddr, args: &[&str], ca_file: &Path) -> tokio::process::Child {
    tokio::process::Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(relay.to_string())
        .args(args)
        .arg("-CAfile")
        .arg(ca_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn openssl")
}

/// Sends a line through a running `s_client`, waits until the server's echo of it is
/// printed, then closes stdin so it exits; asserts that it verified the proxy's
/// certificate, and returns its stdout.
async fn s_client_ping_verified(mut child: tokio::process::Child) -> String {
    const PING: &[u8] = b"ping through the proxy\n";
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let _ = stdin.write_all(PING).await;
    let _ = stdin.flush().await;
    let mut seen = Vec::new();
    timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        while !seen.windows(PING.len()).any(|w| w == PING) {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("openssl printed the echo or ended");
    drop(stdin);
    timeout(WAIT, stdout.read_to_end(&mut seen))
        .await
        .expect("openssl finished")
        .expect("stdout");
    let out = timeout(WAIT, child.wait_with_output())
        .await
        .expect("openssl exited")
        .expect("output");
    let stdout = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        stdout.contains("Verify return code: 0 (ok)") && stdout.contains("ping through the proxy"),
        "openssl output:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn openssl_s_client_verifies_through_the_proxy() {
    if !openssl_present() {
        return;
    }
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(
        &pki,
        ServerSpec {
            alpn: vec![b"h2".to_vec()],
            ..ServerSpec::default()
        },
    )
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let ca_file = data.path().join("exported.pem");
    icp.ca().export(&ca_file, false).expect("export");
    let mut child = s_client(
        relay,
        &[
            "-servername",
            "www.example.test",
            "-alpn",
            "h2,http/1.1",
            "-verify_return_error",
            "-verify_hostname",
            "www.example.test",
        ],
        &ca_file,
    );
    // Let it handshake, then close stdin so it exits.
    let s = next_result(&mut rx).await;
    drop(child.stdin.take());
    timeout(WAIT, child.wait_with_output())
        .await
        .expect("openssl finished")
        .expect("output");
    // Upstream verification uses the SNI; the test server is only valid for localhost.
    assert!(s.is_err(), "www.example.test is not the upstream's name");

    // Now with a name the upstream server is valid for.
    let child = s_client(
        relay,
        &[
            "-servername",
            "localhost",
            "-alpn",
            "h2,http/1.1",
            "-verify_return_error",
            "-verify_hostname",
            "localhost",
        ],
        &ca_file,
    );
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.client.alpn.as_deref(), Some("h2"));
    let stdout = s_client_ping_verified(child).await;
    assert!(stdout.contains("ALPN protocol: h2"), "{stdout}");
    assert!(stdout.contains("alpn=h2"), "{stdout}");
}

/// Micro-benchmark, not run by default:
/// `cargo test -p proxy-core --release tls::tests::bench -- --ignored --nocapture`.
/// Fresh TLS connections per second (each reads the server's greeting line) and echo
/// throughput, direct versus through the splicer, same client, same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_intercepted_versus_direct() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let proxy_roots = exported_roots(&icp, data.path());
    let direct_roots = roots_from(&pki.ca_der);
    let name = || ServerName::try_from("localhost").expect("name");

    async fn greet(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
        let mut b = [0u8; 1];
        loop {
            let n = timeout(WAIT, tls.read(&mut b))
                .await
                .expect("no timeout")
                .expect("read");
            if n == 0 || b[0] == b'\n' {
                return;
            }
        }
    }

    const CONNS: u32 = 300;
    let mut rates = Vec::new();
    for (label, addr, roots) in [
        ("direct", server, direct_roots.clone()),
        ("intercepted", relay, proxy_roots.clone()),
    ] {
        let start = std::time::Instant::now();
        for _ in 0..CONNS {
            let mut tls = client_connect(addr, roots.clone(), name(), &[])
                .await
                .expect("handshake");
            greet(&mut tls).await;
        }
        let rate = f64::from(CONNS) / start.elapsed().as_secs_f64();
        eprintln!("{label}: {rate:.0} fresh TLS connections/s");
        rates.push(rate);
    }
    eprintln!(
        "handshake ratio intercepted/direct: {:.2}",
        rates[1] / rates[0]
    );

    const BYTES: usize = 64 << 20;
    let mut tputs = Vec::new();
    for (label, addr, roots) in [
        ("direct", server, direct_roots),
        ("intercepted", relay, proxy_roots),
    ] {
        let tls = client_connect(addr, roots, name(), &[])
            .await
            .expect("handshake");
        let (mut r, mut w) = tokio::io::split(tls);
        let start = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 16 * 1024];
            let mut sent = 0;
            while sent < BYTES {
                w.write_all(&chunk).await.expect("write");
                sent += chunk.len();
            }
            w
        });
        // Greeting line plus the echo.
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let mut greeting_left = true;
        while got < BYTES {
            let n = timeout(WAIT, r.read(&mut buf))
                .await
                .expect("no timeout")
                .expect("read");
            assert!(n > 0, "eof");
            let mut n = n;
            if greeting_left {
                if let Some(p) = buf[..n].iter().position(|&c| c == b'\n') {
                    n -= p + 1;
                    greeting_left = false;
                } else {
                    continue;
                }
            }
            got += n;
        }
        let _ = writer.await;
        let secs = start.elapsed().as_secs_f64();
        let mbps = (BYTES as f64) / secs / 1e6;
        eprintln!("{label}: {mbps:.0} MB/s echoed");
        tputs.push(mbps);
    }
    eprintln!(
        "throughput ratio intercepted/direct: {:.2}",
        tputs[1] / tputs[0]
    );
}

/// A server that speaks a plaintext preamble, then upgrades to TLS: it sends `greeting`,
/// reads exactly `request`, answers `reply`, then runs the TLS echo of `start_upstream`.
async fn start_starttls_upstream(
    pki: &TestPki,
    greeting: &'static [u8],
    request: &'static [u8],
    reply: &'static [u8],
) -> SocketAddr {
    let (chain, key) = pki.issue(&["localhost", "127.0.0.1"], "server");
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if tcp.write_all(greeting).await.is_err() {
                    return;
                }
                let mut req = vec![0u8; request.len()];
                if !matches!(timeout(WAIT, tcp.read_exact(&mut req)).await, Ok(Ok(_)))
                    || req != request
                {
                    return;
                }
                if tcp.write_all(reply).await.is_err() {
                    return;
                }
                let Ok(Ok(mut tls)) = timeout(WAIT, acceptor.accept(tcp)).await else {
                    return;
                };
                let _ = tls.write_all(b"alpn=none\n").await;
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) = timeout(WAIT, tls.read(&mut buf)).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// Runs the product's relay for a CONNECT stream ([`splice::splice`]: plain relaying with
/// ClientHello detection, then the TLS splice over the one relay) on every accepted
/// connection, without the SOCKS handshake in front. Sends how each connection ended and
/// its counters.
async fn start_product_relay(
    splicer: Arc<Splicer>,
    upstream: SocketAddr,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(crate::conn::ConnEnd, proto::registry::Counters)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let splicer = splicer.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(Ok(up)) = timeout(WAIT, TcpStream::connect(upstream)).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let target = Target {
                    host: None,
                    ip: upstream.ip(),
                    port: upstream.port(),
                };
                let state = crate::conn::ConnState::new(1);
                let reporter = crate::relay::tests::reporter();
                let tap = crate::relay::Tap::new(&state, &reporter);
                let (_keep_open, notify) = tokio::sync::broadcast::channel(1);
                let mut shutdown = crate::shutdown::Shutdown::new(notify);
                let end = splice::splice(
                    client,
                    Bytes::new(),
                    up,
                    target,
                    &splicer,
                    &tap,
                    &mut shutdown,
                )
                .await;
                let _ = tx.send((end, state.counters()));
            });
        }
    });
    (addr, rx)
}

/// The client closes the upgraded stream; the product's relay then records a client FIN and
/// has counted exactly the plaintext preamble and the decrypted application data (the
/// handshake itself is not application data).
async fn close_and_check_counts(
    mut tls: tokio_rustls::client::TlsStream<TcpStream>,
    rx: &mut mpsc::UnboundedReceiver<(crate::conn::ConnEnd, proto::registry::Counters)>,
    c2s: u64,
    s2c: u64,
) {
    tls.shutdown().await.expect("close_notify and FIN");
    let (end, counters) = timeout(WAIT, rx.recv())
        .await
        .expect("relay ended in time")
        .expect("relay alive");
    assert_eq!(
        end,
        crate::conn::ConnEnd::new(
            ClosedBy::Client,
            proto::common::CloseKind::Fin,
            "client sent FIN"
        )
    );
    assert_eq!((counters.bytes_c2s, counters.bytes_s2c), (c2s, s2c));
}

/// A client that speaks the plaintext preamble, then upgrades.
async fn upgrading_client(
    relay: SocketAddr,
    roots: RootCertStore,
    greeting: &[u8],
    request: &[u8],
    reply: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(relay).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let mut g = vec![0u8; greeting.len()];
    timeout(WAIT, tcp.read_exact(&mut g))
        .await
        .expect("no timeout")
        .expect("greeting");
    assert_eq!(g, greeting);
    tcp.write_all(request).await.expect("request");
    let mut r = vec![0u8; reply.len()];
    timeout(WAIT, tcp.read_exact(&mut r))
        .await
        .expect("no timeout")
        .expect("reply");
    assert_eq!(r, reply);
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").expect("name"), tcp),
    )
    .await
    .expect("no timeout")
    .expect("upgraded handshake through the proxy")
}

#[tokio::test]
async fn starttls_upgrade_after_plaintext_preamble_is_intercepted() {
    let pki = TestPki::new("Upstream Test CA");
    let (greeting, request, reply): (&[u8], &[u8], &[u8]) = (
        b"220 mail.example ESMTP\r\n",
        b"STARTTLS\r\n",
        b"220 2.0.0 Ready to start TLS\r\n",
    );
    let server = start_starttls_upstream(&pki, greeting, request, reply).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_product_relay(icp.clone(), server).await;
    // Trusting only the proxy's CA: the handshake succeeds only if the proxy terminated it.
    let mut tls = upgrading_client(
        relay,
        exported_roots(&icp, data.path()),
        greeting,
        request,
        reply,
    )
    .await;
    assert_eq!(echo_check(&mut tls).await, "alpn=none");
    let c2s = request.len() + 22;
    let s2c = greeting.len() + reply.len() + "alpn=none\n".len() + 22;
    close_and_check_counts(tls, &mut rx, c2s as u64, s2c as u64).await;
}

#[tokio::test]
async fn postgres_sslrequest_is_relayed_and_the_following_hello_intercepted() {
    let pki = TestPki::new("Upstream Test CA");
    let (greeting, request, reply): (&[u8], &[u8], &[u8]) =
        (b"", b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"S");
    let server = start_starttls_upstream(&pki, greeting, request, reply).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_product_relay(icp.clone(), server).await;
    let mut tls = upgrading_client(
        relay,
        exported_roots(&icp, data.path()),
        greeting,
        request,
        reply,
    )
    .await;
    assert_eq!(echo_check(&mut tls).await, "alpn=none");
    let c2s = request.len() + 22;
    let s2c = reply.len() + "alpn=none\n".len() + 22;
    close_and_check_counts(tls, &mut rx, c2s as u64, s2c as u64).await;
}

#[tokio::test]
async fn tls12_client_and_server_legs_are_reported_and_key_logged() {
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(
        &pki,
        ServerSpec {
            tls12_only: true,
            ..ServerSpec::default()
        },
    )
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let keylog = data.path().join("keys.log");
    let kl = keylog.clone();
    let icp = splicer(data.path(), Some(pki.ca_file()), move |o| {
        o.keylog = Some(kl)
    });
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(exported_roots(&icp, data.path()))
        .with_no_client_auth();
    let tcp = TcpStream::connect(relay).await.expect("connect");
    let mut tls = timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").expect("name"), tcp),
    )
    .await
    .expect("no timeout")
    .expect("TLS 1.2 handshake");
    echo_check(&mut tls).await;
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.client.version, "TLSv1.2");
    assert_eq!(s.upstream.version, "TLSv1.2");
    assert!(
        s.client.cipher_suite.starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{}",
        s.client.cipher_suite
    );
    let text = std::fs::read_to_string(&keylog).expect("keylog");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("CLIENT_RANDOM "))
            .count(),
        2,
        "one master secret per leg:\n{text}"
    );
}

#[tokio::test]
async fn openssl_s_client_without_sni_validates_the_ip_leaf() {
    if !openssl_present() {
        return;
    }
    let pki = TestPki::new("Upstream Test CA");
    let server = start_upstream(&pki, ServerSpec::default()).await;
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), Some(pki.ca_file()), |_| {});
    let (relay, mut rx) = start_relay(icp.clone(), server, None).await;
    let ca_file = data.path().join("exported.der");
    icp.ca().export(&ca_file, true).expect("export DER");
    let pem_file = data.path().join("exported-from-der.pem");
    // openssl reads the DER export, proving it is a valid certificate.
    let conv = tokio::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&ca_file)
        .arg("-out")
        .arg(&pem_file)
        .output();
    let conv = timeout(WAIT, conv).await.expect("no timeout").expect("run");
    assert!(conv.status.success(), "{conv:?}");
    let child = s_client(
        relay,
        &[
            "-noservername",
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
        ],
        &pem_file,
    );
    let s = next_result(&mut rx).await.expect("intercepted");
    assert_eq!(s.sni, None);
    assert_eq!(s.leaf_name, "127.0.0.1");
    s_client_ping_verified(child).await;
}

#[tokio::test]
async fn ca_watcher_picks_up_a_regenerated_ca() {
    let data = tempfile::tempdir().expect("tempdir");
    let icp = splicer(data.path(), None, |o| o.upstream.insecure = true);
    let before = icp.ca().cert_der().clone();
    let task = icp.watch_ca(Duration::from_millis(20));
    Ca::regenerate(data.path()).expect("regen");
    let deadline = tokio::time::Instant::now() + WAIT;
    while icp.ca().cert_der() == &before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(icp);
    timeout(WAIT, task)
        .await
        .expect("watcher ends with the splicer")
        .expect("join");
}
