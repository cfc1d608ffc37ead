//! The rules of mTLS for the management plane that SECURITY.md states, each checked on a real
//! `--grpc-tls` server with real TLS clients (rustls, openssl): TLS 1.3 only, server
//! certificates for serverAuth and client certificates for clientAuth only (neither stands in
//! for the other), `--grpc-tls-name` in the server certificate, and the standalone
//! intercept-svc and export-svc served with `--grpc-tls` behind a `--grpc-tls` registry.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tests::{Output, Proc, Up, WAIT, bin};
use tokio::{net::TcpStream, process::Command};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type R = anyhow::Result<()>;

/// Runs `interpose ARGS` with no `INTERPOSE_*` variable and no default data directory.
async fn interpose(home: &Path, args: &[&str]) -> anyhow::Result<Output> {
    tests::interpose_isolated(home, args, &[]).await
}

/// Issues a client certificate `name` from `data_dir`'s management CA into `out`:
/// (cert, key, CA cert) paths.
async fn issue(
    home: &Path,
    data_dir: &Path,
    name: &str,
    out: &Path,
) -> anyhow::Result<[String; 3]> {
    let (d, o) = (data_dir.display().to_string(), out.display().to_string());
    let res = interpose(
        home,
        &[
            "ca",
            "issue-client",
            "--name",
            name,
            "--out",
            &o,
            "--data-dir",
            &d,
        ],
    )
    .await?;
    anyhow::ensure!(res.ok, "issue-client: {}", res.stderr);
    Ok([
        out.join(format!("{name}-cert.pem")),
        out.join(format!("{name}-key.pem")),
        out.join("ca-cert.pem"),
    ]
    .map(|p| p.display().to_string()))
}

fn certs(file: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(CertificateDer::pem_file_iter(file)?.collect::<Result<_, _>>()?)
}

fn roots(ca: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// A client trusting `ca`, presenting `cert`/`key`, speaking only `versions`.
fn client(
    ca: &str,
    cert: &str,
    key: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<TlsConnector> {
    let cfg = ClientConfig::builder_with_provider(proxy_core::tls::provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, PrivateKeyDer::from_pem_file(key)?)?;
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// A TLS handshake with `addr` as `name`: the outer error is the harness's, the inner one
/// the handshake's (and the server certificate it presented).
async fn handshake(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
    name: &str,
) -> anyhow::Result<std::io::Result<Vec<CertificateDer<'static>>>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string())?;
    let r = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .context("TLS handshake timed out")?;
    Ok(r.map(|tls| {
        tls.get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }))
}

/// The extended key usages openssl reads in the PEM certificate `file` (`None` when
/// openssl is missing and the developer opted out).
async fn eku(file: &Path) -> anyhow::Result<Option<String>> {
    let Some(openssl) = tests::tools::required("openssl") else {
        return Ok(None);
    };
    let out = tokio::time::timeout(
        WAIT,
        Command::new(openssl)
            .args(["x509", "-noout", "-ext", "extendedKeyUsage", "-in"])
            .arg(file)
            .output(),
    )
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(
        text.lines()
            .skip(1)
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

#[tokio::test]
async fn grpc_tls_speaks_only_tls_1_3_and_certifies_its_extra_names() -> R {
    proxy_core::tls::install_provider();
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("up");
    let up = Up::start(&data, &["--grpc-tls", "--grpc-tls-name", "lab1.example"]).await?;
    let addr: std::net::SocketAddr = up.grpc.trim_start_matches("https://").parse()?;
    let [cert, key, ca] = issue(tmp.path(), &data, "alice", &tmp.path().join("alice")).await?;

    // TLS 1.3 with the issued certificate: the handshake completes, for the extra name too.
    let tls13 = client(&ca, &cert, &key, &[&rustls::version::TLS13])?;
    for name in ["localhost", "127.0.0.1", "lab1.example"] {
        handshake(&tls13, addr, name)
            .await?
            .with_context(|| format!("a TLS 1.3 handshake as {name}"))?;
    }
    // A name it was not given is not in its certificate.
    let err = handshake(&tls13, addr, "lab2.example")
        .await?
        .err()
        .context("lab2.example is not certified")?;
    assert!(
        err.to_string()
            .contains("certificate not valid for name \"lab2.example\""),
        "{err}"
    );

    // TLS 1.2 only, with the same certificate: no handshake.
    let tls12 = client(&ca, &cert, &key, &[&rustls::version::TLS12])?;
    let err = handshake(&tls12, addr, "localhost")
        .await?
        .err()
        .context("a TLS 1.2 client is refused")?;
    assert!(
        err.to_string().contains("ProtocolVersion") || err.to_string().contains("version"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn server_and_client_certificates_cannot_stand_in_for_each_other() -> R {
    proxy_core::tls::install_provider();
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("up");
    let up = Up::start(&data, &["--grpc-tls"]).await?;
    let addr: std::net::SocketAddr = up.grpc.trim_start_matches("https://").parse()?;
    let [cert, key, ca] = issue(tmp.path(), &data, "alice", &tmp.path().join("alice")).await?;
    let tls13 = client(&ca, &cert, &key, &[&rustls::version::TLS13])?;
    let served = handshake(&tls13, addr, "localhost").await??;
    let server_pem = tmp.path().join("server-cert.pem");
    let leaf = served.first().context("the server's certificate")?;
    std::fs::write(&server_pem, pem("CERTIFICATE", leaf))?;

    // As openssl reads them: the server's is for serverAuth only, the client's for
    // clientAuth only.
    if let Some(server_eku) = eku(&server_pem).await? {
        assert_eq!(server_eku, "TLS Web Server Authentication");
        let client_eku = eku(Path::new(&cert)).await?.context("openssl")?;
        assert_eq!(client_eku, "TLS Web Client Authentication");
    }

    // A client certificate offered as a server's is refused by a client trusting the
    // management CA, although that CA signed it.
    let key_der = PrivateKeyDer::from_pem_file(&key)?;
    let impostor = ServerConfig::builder_with_provider(proxy_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(&cert)?, key_der)?;
    let acceptor = TlsAcceptor::from(Arc::new(impostor));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let impostor_addr = l.local_addr()?;
    tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            let _ = acceptor.accept(s).await;
        }
    });
    let err = handshake(&tls13, impostor_addr, "localhost")
        .await?
        .err()
        .context("a client certificate cannot serve")?;
    assert!(
        err.to_string()
            .contains("certificate does not allow extended key usage for server authentication"),
        "{err}"
    );
    Ok(())
}

/// PEM text of one DER item.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[tokio::test]
async fn standalone_intercept_and_export_services_serve_grpc_tls_behind_a_tls_registry() -> R {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    std::fs::create_dir(&home)?;
    let reg_dir = tmp.path().join("reg");
    let mut cmd = Command::new(bin("registry-svc"));
    cmd.args(["--listen", "127.0.0.1:0", "--grpc-tls", "--data-dir"])
        .arg(&reg_dir)
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_STORE");
    let reg = Proc::start(cmd, tmp.path().join("reg.log")).await?;
    let reg_url = format!("https://{}", reg.addr("listen")?);
    let token_file = reg_dir.join("token");
    let token = platform::token::read_file(&token_file)?;
    let token_arg = token_file.display().to_string();

    for name in ["intercept-svc", "export-svc"] {
        // The service's own management CA in its data directory; towards the registry, a
        // client certificate the registry's CA issued.
        let svc_dir = tmp.path().join(name);
        let [cert, key, ca] = issue(
            &home,
            &reg_dir,
            name,
            &tmp.path().join(format!("{name}-id")),
        )
        .await?;
        let mut cmd = Command::new(bin(name));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &reg_url,
            "--grpc-tls",
        ])
        .arg("--data-dir")
        .arg(&svc_dir)
        .args(["--grpc-client-cert", &cert, "--grpc-client-key", &key])
        .args(["--grpc-ca-cert", &ca, "--token", &token])
        .env_remove("INTERPOSE_TOKEN");
        let svc = Proc::start(cmd, tmp.path().join(format!("{name}.log"))).await?;
        let url = format!("https://{}", svc.addr("listen")?);

        // Its clients need a certificate of its own CA (and the token).
        let [c_cert, c_key, c_ca] = issue(
            &home,
            &svc_dir,
            "tester",
            &tmp.path().join(format!("{name}-tester")),
        )
        .await?;
        let pcap = tmp
            .path()
            .join(format!("{name}.pcap"))
            .display()
            .to_string();
        let call: Vec<&str> = match name {
            "intercept-svc" => vec!["intercept", "status", "--json"],
            // --force: the refused calls below name the file the first one wrote.
            _ => vec!["export", "--force", "--out", &pcap],
        };
        let with_cert = [
            "--server",
            &url,
            "--client-cert",
            &c_cert,
            "--client-key",
            &c_key,
            "--ca-cert",
            &c_ca,
            "--token-file",
            &token_arg,
        ];
        let out = interpose(&home, &[&call[..], &with_cert[..]].concat()).await?;
        assert!(out.ok, "{name}: {}", out.stderr);
        if name == "intercept-svc" {
            // Connected to the registry over mTLS.
            let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
            assert_eq!(v["registry_connected"], true, "{}", out.stdout);
        } else {
            assert!(
                std::fs::metadata(&pcap)?.len() >= 24,
                "a PCAP header at least"
            );
        }
        // Without a client certificate: refused, saying so.
        let no_cert = [
            "--server",
            &url,
            "--ca-cert",
            &c_ca,
            "--token-file",
            &token_arg,
        ];
        let out = interpose(&home, &[&call[..], &no_cert[..]].concat()).await?;
        assert!(!out.ok);
        assert!(
            out.stderr
                .starts_with("interpose: the server requires a client certificate"),
            "{name}: {}",
            out.stderr
        );
        // A certificate of the registry's CA is foreign to the service's.
        let foreign = [
            "--server",
            &url,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
            "--ca-cert",
            &c_ca,
            "--token-file",
            &token_arg,
        ];
        let out = interpose(&home, &[&call[..], &foreign[..]].concat()).await?;
        assert!(!out.ok);
        assert!(
            out.stderr.starts_with(
                "interpose: the server refused the client certificate: it was not issued by this server's management CA"
            ),
            "{name}: {}",
            out.stderr
        );
    }
    Ok(())
}
