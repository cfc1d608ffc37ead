//! mTLS for the management plane (issue 12): servers started with `--grpc-tls` accept only
//! clients with a certificate from their data directory's management CA, issued by
//! `interpose ca issue-client`; the token is still required on top. Real processes, real
//! TLS on loopback.

use std::{os::unix::fs::PermissionsExt, path::Path};

use anyhow::Context;
use proto::common::ConnStatus;
use tests::{
    Output, Proc, Up, WAIT, bin,
    proxy::{Server, socks_connected, wait_conn_by_port},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
};

type R = anyhow::Result<()>;

/// Runs `interpose ARGS` with nothing from the caller's environment: `INTERPOSE_*` removed
/// and the default data directory under `xdg` (`xdg/interpose`), plus `env`.
async fn interpose(xdg: &Path, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<Output> {
    tests::interpose_isolated(xdg, args, env).await
}

/// `interpose ca issue-client --name NAME --out OUT --data-dir DATA_DIR`; the three files.
async fn issue(xdg: &Path, data_dir: &Path, name: &str, out: &Path) -> anyhow::Result<[String; 3]> {
    let (d, o) = (data_dir.to_string_lossy(), out.to_string_lossy());
    let args = [
        "ca",
        "issue-client",
        "--name",
        name,
        "--out",
        &o,
        "--data-dir",
        &d,
    ];
    let res = interpose(xdg, &args, &[]).await?;
    anyhow::ensure!(res.ok, "issue-client: {}", res.stderr);
    let files = [
        out.join(format!("{name}-cert.pem")),
        out.join(format!("{name}-key.pem")),
        out.join("ca-cert.pem"),
    ];
    for f in &files {
        let mode = std::fs::metadata(f)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        assert!(res.stdout.contains(&*f.to_string_lossy()), "{}", res.stdout);
    }
    Ok(files.map(|f| f.to_string_lossy().into_owned()))
}

#[tokio::test]
async fn cli_calls_need_a_client_certificate_from_the_servers_ca_and_the_token() -> R {
    let tmp = tempfile::tempdir()?;
    let xdg = tmp.path().join("xdg");
    // `up` in the default data directory of the CLI runs below.
    let data = xdg.join("interpose");
    std::fs::create_dir(&xdg)?;
    let up = Up::start(&data, &["--grpc-tls"]).await?;
    let url = up.grpc.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{}", up.proc.ready);
    let mtls = up.proc.field("mtls").context("mtls= in the ready line")?;
    assert_eq!(Path::new(&mtls), data.join("mtls"));

    let [cert, key, ca] = issue(&xdg, &data, "alice", &tmp.path().join("alice")).await?;
    // By a name `up` did not record: only what is passed is used, nothing from the default
    // data directory.
    let named = url.replacen("127.0.0.1", "localhost", 1);
    let with = |cert: &str, key: &str, ca: &str| {
        vec![
            "conns".to_string(),
            "list".into(),
            "--json".into(),
            "--server".into(),
            named.clone(),
            "--client-cert".into(),
            cert.to_string(),
            "--client-key".into(),
            key.to_string(),
            "--ca-cert".into(),
            ca.to_string(),
        ]
    };
    let run = |args: Vec<String>, token: bool| {
        let xdg = xdg.clone();
        let token = token.then(|| token_path(&data));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match &token {
                Some(t) => interpose(&xdg, &args, &[("INTERPOSE_TOKEN_FILE", t)]).await,
                None => interpose(&xdg, &args, &[]).await,
            }
        }
    };

    // The issued certificate and the token: served.
    let ok = run(with(&cert, &key, &ca), true).await?;
    assert!(ok.ok, "{}", ok.stderr);
    assert!(serde_json::from_str::<serde_json::Value>(&ok.stdout)?.is_array());

    // No client certificate: one sentence saying the server requires one.
    let args: Vec<String> = with(&cert, &key, &ca)
        .into_iter()
        .filter(|a| a != "--client-cert" && a != "--client-key" && a != &cert && a != &key)
        .collect();
    let none = run(args, true).await?;
    assert!(!none.ok);
    assert_eq!(none.stderr.lines().count(), 1, "{}", none.stderr);
    assert!(
        none.stderr
            .starts_with("interpose: the server requires a client certificate: pass --client-cert and --client-key"),
        "{}",
        none.stderr
    );

    // A certificate from another data directory's management CA: refused, saying so.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other)?;
    let [m_cert, m_key, m_ca] = issue(&xdg, &other, "mallory", &tmp.path().join("m")).await?;
    let foreign = run(with(&m_cert, &m_key, &ca), true).await?;
    assert!(!foreign.ok);
    assert_eq!(foreign.stderr.lines().count(), 1, "{}", foreign.stderr);
    assert!(
        foreign.stderr.starts_with(
            "interpose: the server refused the client certificate: it was not issued by this server's management CA"
        ),
        "{}",
        foreign.stderr
    );

    // The server verified against the wrong CA: the client says it cannot verify it.
    let wrong_ca = run(with(&cert, &key, &m_ca), true).await?;
    assert!(!wrong_ca.ok);
    assert!(
        wrong_ca.stderr.starts_with(
            "interpose: cannot verify the server: its certificate is not from the CA in --ca-cert"
        ),
        "{}",
        wrong_ca.stderr
    );

    // The certificate does not replace the token.
    let no_token = run(with(&cert, &key, &ca), false).await?;
    assert!(!no_token.ok);
    assert!(
        no_token.stderr.starts_with("interpose: not authorised:"),
        "{}",
        no_token.stderr
    );

    // Plain HTTP/2 to the TLS port gets no answer but a hint.
    let plain = url.replacen("https://", "http://", 1);
    let args = ["conns", "list", "--server", &plain];
    let tok = token_path(&data);
    let plain = interpose(&xdg, &args, &[("INTERPOSE_TOKEN_FILE", &tok)]).await?;
    assert!(!plain.ok);
    assert!(
        plain.stderr.contains("wants an https:// URL"),
        "{}",
        plain.stderr
    );

    // The server `up` recorded in the default data directory needs no flags at all: the
    // token and the local client certificate are found there. Through it, `up`'s own
    // intercept and export services (clients of the same TLS port) answer.
    for args in [
        &["conns", "stats", "--json", "--server", &url][..],
        &["intercept", "status", "--server", &url][..],
    ] {
        let out = interpose(&xdg, args, &[]).await?;
        assert!(out.ok, "{args:?}: {}", out.stderr);
    }
    let pcap = tmp.path().join("all.pcap");
    let p = pcap.to_string_lossy();
    let out = interpose(&xdg, &["export", "--out", &p, "--server", &url], &[]).await?;
    assert!(out.ok, "export: {}", out.stderr);
    assert!(
        std::fs::metadata(&pcap)?.len() >= 24,
        "a PCAP header at least"
    );
    Ok(())
}

fn token_path(data: &Path) -> std::path::PathBuf {
    data.join("token")
}

#[tokio::test]
async fn a_proxy_reports_to_a_registry_served_with_mtls() -> R {
    let tmp = tempfile::tempdir()?;
    let xdg = tmp.path().join("xdg");
    let reg_dir = tmp.path().join("reg");
    let mut cmd = Command::new(bin("registry-svc"));
    cmd.args(["--listen", "127.0.0.1:0", "--grpc-tls", "--data-dir"])
        .arg(&reg_dir)
        .env_remove("INTERPOSE_TOKEN");
    let reg = Proc::start(cmd, tmp.path().join("reg.log")).await?;
    let url = format!("https://{}", reg.addr("listen")?);
    let token = platform::token::read_file(&reg_dir.join("token"))?;
    let [cert, key, ca] = issue(&xdg, &reg_dir, "proxy1", &tmp.path().join("p")).await?;

    let mut cmd = Command::new(bin("proxy-core"));
    cmd.args([
        "--socks",
        "127.0.0.1:0",
        "--registry",
        &url,
        "--node",
        "tls-node",
    ])
    .args([
        "--grpc-client-cert",
        &cert,
        "--grpc-client-key",
        &key,
        "--grpc-ca-cert",
        &ca,
    ])
    .arg("--data-dir")
    .arg(tmp.path().join("proxy"))
    .env("INTERPOSE_TOKEN", &token);
    let proxy = Proc::start(cmd, tmp.path().join("proxy.log")).await?;
    let socks = proxy.addr("listen")?;

    // A connection through the proxy, with a byte each way.
    let server = Server::bind().await?;
    let mut client = socks_connected(socks, server.addr).await?;
    let mut upstream = server.accept().await?;
    client.write_all(b"hi").await?;
    let mut b = [0u8; 2];
    tokio::time::timeout(WAIT, upstream.read_exact(&mut b)).await??;
    upstream.write_all(b"yo").await?;
    tokio::time::timeout(WAIT, client.read_exact(&mut b)).await??;
    let port = client.local_addr()?.port();
    drop(client);
    drop(upstream);

    // Its record, read by this test as another mTLS client of the registry.
    platform::mtls::ClientTlsArgs {
        client_cert: Some(cert.into()),
        client_key: Some(key.into()),
        ca_cert: Some(ca.into()),
    }
    .install(None)?;
    let mut rc = tests::registry_client(&url, Some(&token)).await?;
    let c = wait_conn_by_port(&mut rc, port, "closed", |c| {
        c.status == ConnStatus::Disconnected as i32
    })
    .await?;
    assert_eq!(c.node, "tls-node");
    assert_eq!((c.bytes_c2s, c.bytes_s2c), (2, 2));
    assert_eq!(c.dst_port, u32::from(server.addr.port()));
    Ok(())
}
