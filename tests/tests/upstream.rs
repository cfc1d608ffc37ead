//! End-to-end tests of upstream proxies and the HTTP CONNECT ingress (issue 23): proxy-core
//! and `interpose up` as real processes chaining through Debian's dante (`danted`, SOCKS5,
//! with and without user/password) and tinyproxy (HTTP CONNECT with basic auth), both
//! started here on free loopback ports; curl as the HTTP proxy client (`-x http://` and
//! `HTTPS_PROXY`). The target servers greet each client with the address it came from:
//! dante connects from 127.0.0.2 and tinyproxy from 127.0.0.3, so a greeting proves which
//! path a connection took.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use proto::common::{CloseKind, ClosedBy, Connection};
use proxy_core::socks5::{Addr, Reply};
use rustls::pki_types::ServerName;
use tests::{
    Registry, Up, WAIT,
    http::{curl_output, http_server},
    proxy::{ProxyProc, all_connections, socks_connect, wait_conn_by_port},
    registry_client,
    tls::{
        Pki, disconnected, echo, https_server, proxy_ca, round_trip, serve, tls_connect,
        wait_record,
    },
    upstreams::{Upstream, free_port},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

type R = anyhow::Result<()>;

const DANTE_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const TINYPROXY_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A server that greets each client with `from IP\n` (the address it came from), then
/// echoes.
async fn who_server() -> anyhow::Result<SocketAddr> {
    serve(|mut s: TcpStream| async move {
        let peer = s.peer_addr()?;
        s.write_all(format!("from {}\n", peer.ip()).as_bytes())
            .await?;
        echo(&mut s).await
    })
    .await
}

/// Reads the greeting line, bounded by [`WAIT`].
async fn greeting<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let mut line = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut b = [0u8; 1];
        while s.read(&mut b).await? == 1 {
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        anyhow::Ok(())
    })
    .await
    .context("no greeting")??;
    Ok(String::from_utf8(line)?)
}

/// CONNECTs through `socks` to `target` and expects success: the greeting (which path it
/// took) after an echo round trip, and the client port of the connection.
async fn via(socks: SocketAddr, target: Addr) -> anyhow::Result<(String, u16)> {
    let r = socks_connect(socks, target.clone()).await?;
    anyhow::ensure!(r.reply == Reply::Succeeded, "{target}: reply {:?}", r.reply);
    let mut s = r.stream;
    let port = s.local_addr()?.port();
    let from = greeting(&mut s).await?;
    assert_eq!(
        round_trip(&mut s, b"through the chain").await?,
        b"through the chain"
    );
    Ok((from, port))
}

/// CONNECTs through `socks` to `target` and expects the refusal `reply`; returns the
/// record, once closed.
async fn refused(
    socks: SocketAddr,
    registry: &str,
    target: Addr,
    reply: Reply,
) -> anyhow::Result<Connection> {
    let r = socks_connect(socks, target.clone()).await?;
    let port = r.stream.local_addr()?.port();
    let mut rc = registry_client(registry, None).await?;
    let c = wait_conn_by_port(&mut rc, port, "refused", disconnected).await?;
    assert_eq!(r.reply, reply, "{target}: {c:?}");
    assert_eq!(
        (c.closed_by, c.close_kind),
        (ClosedBy::Proxy as i32, CloseKind::Error as i32),
        "{c:?}"
    );
    Ok(c)
}

/// The record of the connection from client port `port`, once closed (so every update it
/// had is in).
async fn record(registry: &str, port: u16) -> anyhow::Result<Connection> {
    let mut rc = registry_client(registry, None).await?;
    wait_conn_by_port(&mut rc, port, "closed", disconnected).await
}

/// Every record and the proxy's log, for checking that a secret appears in neither.
async fn everything_said(registry: &str, log: &str) -> anyhow::Result<String> {
    let mut rc = registry_client(registry, None).await?;
    let all = all_connections(&mut rc).await?;
    Ok(format!("{all:?}\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_and_socks5h_through_dante_and_rules_pick_the_route() -> R {
    let dir = tempfile::tempdir()?;
    let Some(dante) = Upstream::dante(&dir.path().join("dante"), DANTE_FROM, None).await? else {
        return Ok(());
    };
    let (a, b, c) = (
        who_server().await?,
        who_server().await?,
        who_server().await?,
    );
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let d = dante.addr;
    let proxy = ProxyProc::start(
        dir.path(),
        &reg.url,
        "chain",
        &[
            "--upstream",
            &format!("socks5h://{d}"),
            "--upstream-rule",
            &format!("*:{}=socks5://{d}", a.port()),
            "--upstream-rule",
            &format!("127.0.0.0/8:{}=direct", c.port()),
        ],
    )
    .await?;

    // socks5://: the name is resolved here, and dante is asked for the address.
    let (from, port) = via(proxy.socks, Addr::Domain("localhost".into(), a.port())).await?;
    assert_eq!(from, format!("from {DANTE_FROM}"), "{}", dante.log_text());
    let rec = record(&reg.url, port).await?;
    assert_eq!(rec.upstream, format!("socks5://{d}"));
    assert_eq!(rec.ingress, "socks5");
    assert_eq!(
        (rec.dst_host.as_str(), rec.dst_ip.as_str()),
        ("localhost", "127.0.0.1")
    );

    // socks5h:// (the default): dante resolves the name; its address stays unknown here.
    let (from, port) = via(proxy.socks, Addr::Domain("localhost".into(), b.port())).await?;
    assert_eq!(from, format!("from {DANTE_FROM}"));
    let rec = record(&reg.url, port).await?;
    assert_eq!(rec.upstream, format!("socks5h://{d}"));
    assert_eq!(
        (rec.dst_host.as_str(), rec.dst_ip.as_str()),
        ("localhost", "")
    );

    // The CIDR rule sends an IP target directly; a name is not an IP, so the same port by
    // name takes the default upstream.
    let (from, port) = via(proxy.socks, Addr::Ip(c)).await?;
    assert_eq!(from, "from 127.0.0.1");
    assert_eq!(record(&reg.url, port).await?.upstream, "");
    let (from, _) = via(proxy.socks, Addr::Domain("localhost".into(), c.port())).await?;
    assert_eq!(from, format!("from {DANTE_FROM}"));

    // The upstream's own refusal reaches the client as its reply, quoted in the record.
    let closed = free_port()?;
    let rec = refused(
        proxy.socks,
        &reg.url,
        Addr::Domain("localhost".into(), closed),
        Reply::ConnectionRefused,
    )
    .await?;
    assert_eq!(
        rec.reason,
        format!(
            "upstream socks5h://{d} refused CONNECT localhost:{closed}: reply 0x05 (connection refused)"
        )
    );
    assert_eq!(rec.upstream, format!("socks5h://{d}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dante_with_user_and_password_and_wrong_or_unreachable_upstreams_refuse_clearly() -> R {
    let dir = tempfile::tempdir()?;
    let Some(dante) = Upstream::dante(
        &dir.path().join("dante"),
        DANTE_FROM,
        Some(("alice", "s3cret-pw")),
    )
    .await?
    else {
        return Ok(());
    };
    let (good, wrong, none, gone) = (
        who_server().await?,
        who_server().await?,
        who_server().await?,
        who_server().await?,
    );
    let nowhere = free_port()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let d = dante.addr;
    let proxy = ProxyProc::start(
        dir.path(),
        &reg.url,
        "chain-auth",
        &[
            "--upstream",
            &format!("socks5h://alice:s3cret-pw@{d}"),
            "--upstream-rule",
            &format!("*:{}=socks5h://alice:wrong-pw@{d}", wrong.port()),
            "--upstream-rule",
            &format!("*:{}=socks5h://{d}", none.port()),
            "--upstream-rule",
            &format!("*:{}=socks5://127.0.0.1:{nowhere}", gone.port()),
        ],
    )
    .await?;

    let (from, port) = via(proxy.socks, Addr::Domain("localhost".into(), good.port())).await?;
    assert_eq!(from, format!("from {DANTE_FROM}"), "{}", dante.log_text());
    assert_eq!(
        record(&reg.url, port).await?.upstream,
        format!("socks5h://{d}")
    );

    let rec = refused(proxy.socks, &reg.url, Addr::Ip(wrong), Reply::NotAllowed).await?;
    assert_eq!(
        rec.reason,
        format!("upstream socks5h://{d} refused the credentials (RFC 1929 authentication failed)")
    );
    let rec = refused(proxy.socks, &reg.url, Addr::Ip(none), Reply::NotAllowed).await?;
    assert_eq!(
        rec.reason,
        format!(
            "upstream socks5h://{d} requires authentication: give USER:PASS@ in the upstream URL"
        )
    );
    let rec = refused(proxy.socks, &reg.url, Addr::Ip(gone), Reply::GeneralFailure).await?;
    assert_eq!(
        rec.reason,
        format!(
            "upstream socks5://127.0.0.1:{nowhere} unreachable: connect to 127.0.0.1:{nowhere}: \
             Connection refused (os error 111)"
        )
    );
    assert_eq!(rec.upstream, format!("socks5://127.0.0.1:{nowhere}"));

    let said = everything_said(&reg.url, &proxy.proc.stderr()).await?;
    for secret in ["s3cret-pw", "wrong-pw"] {
        assert!(!said.contains(secret), "{secret} leaked: {said}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_with_basic_auth_as_the_http_connect_upstream() -> R {
    let dir = tempfile::tempdir()?;
    let Some(tp) = Upstream::tinyproxy(
        &dir.path().join("tinyproxy"),
        TINYPROXY_FROM,
        Some(("alice", "s3cret-pw")),
    )
    .await?
    else {
        return Ok(());
    };
    let (good, wrong, none, gone) = (
        who_server().await?,
        who_server().await?,
        who_server().await?,
        who_server().await?,
    );
    let nowhere = free_port()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let t = tp.addr;
    let proxy = ProxyProc::start(
        dir.path(),
        &reg.url,
        "chain-http",
        &[
            "--upstream",
            &format!("http://alice:s3cret-pw@{t}"),
            "--upstream-rule",
            &format!("*:{}=http://alice:wrong-pw@{t}", wrong.port()),
            "--upstream-rule",
            &format!("*:{}=http://{t}", none.port()),
            "--upstream-rule",
            &format!("*:{}=http://127.0.0.1:{nowhere}", gone.port()),
        ],
    )
    .await?;

    // The greeting comes right behind tinyproxy's 200: it must reach the client intact.
    let (from, port) = via(proxy.socks, Addr::Domain("localhost".into(), good.port())).await?;
    assert_eq!(from, format!("from {TINYPROXY_FROM}"), "{}", tp.log_text());
    let rec = record(&reg.url, port).await?;
    assert_eq!(rec.upstream, format!("http://{t}"));
    assert_eq!(rec.dst_ip, "");

    // tinyproxy answers wrong credentials with 401, missing ones with 407.
    for (target, answer) in [
        (wrong, "HTTP/1.0 401 Unauthorized"),
        (none, "HTTP/1.0 407 Proxy Authentication Required"),
    ] {
        let rec = refused(proxy.socks, &reg.url, Addr::Ip(target), Reply::NotAllowed).await?;
        assert_eq!(
            rec.reason,
            format!("upstream http://{t} refused CONNECT {target}: \"{answer}\"")
        );
    }
    let rec = refused(proxy.socks, &reg.url, Addr::Ip(gone), Reply::GeneralFailure).await?;
    assert!(
        rec.reason.starts_with(&format!(
            "upstream http://127.0.0.1:{nowhere} unreachable: "
        )),
        "{}",
        rec.reason
    );
    let said = everything_said(&reg.url, &proxy.proc.stderr()).await?;
    for secret in ["s3cret-pw", "wrong-pw"] {
        assert!(!said.contains(secret), "{secret} leaked: {said}");
    }
    Ok(())
}

/// curl's stdout, or an error with its stderr; `None` when curl is missing and skipping is
/// allowed.
async fn curl_ok(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
    let Some(out) = curl_output(args, env).await? else {
        return Ok(None);
    };
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Some(String::from_utf8(out.stdout)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_clients_get_interception_records_and_upstream_rules_like_socks_ones() -> R {
    let dir = tempfile::tempdir()?;
    let Some(dante) = Upstream::dante(&dir.path().join("dante"), DANTE_FROM, None).await? else {
        return Ok(());
    };
    let pki = Pki::new("Upstream Chain Test CA")?;
    let https = https_server(&pki).await?;
    let tls_echo = {
        let acceptor = pki.acceptor(&[])?;
        serve(move |s| {
            let acceptor = acceptor.clone();
            async move {
                let peer = s.peer_addr()?;
                let mut tls = acceptor.accept(s).await?;
                tls.write_all(format!("from {}\n", peer.ip()).as_bytes())
                    .await?;
                echo(&mut tls).await
            }
        })
        .await?
    };
    let plain = http_server("plain through the tunnel").await?;
    let starttls = {
        let acceptor = pki.acceptor(&[])?;
        serve(move |mut s| {
            let acceptor = acceptor.clone();
            async move {
                let peer = s.peer_addr()?;
                s.write_all(b"220 ready\r\n").await?;
                let mut cmd = [0u8; 10];
                s.read_exact(&mut cmd).await?;
                anyhow::ensure!(&cmd == b"STARTTLS\r\n", "unexpected command {cmd:?}");
                s.write_all(format!("220 go ahead from {}\r\n", peer.ip()).as_bytes())
                    .await?;
                let mut tls = acceptor.accept(s).await?;
                echo(&mut tls).await
            }
        })
        .await?
    };
    let d = dante.addr;
    let up = Up::start(
        &dir.path().join("up"),
        &[
            "--http",
            "127.0.0.1:0",
            "--upstream-ca",
            &pki.ca_arg(),
            "--upstream",
            &format!("socks5h://{d}"),
            "--upstream-rule",
            &format!("*:{}=direct", plain.port()),
        ],
    )
    .await?;
    let http = up.proc.addr("http")?;
    let socks = up.proc.addr("socks")?;
    let ca = proxy_ca(&up)?;
    let ca_arg = ca.display().to_string();

    // A SOCKS client's TLS is intercepted through dante: the proxy's CA signs the leaf, the
    // server sees dante's address.
    let r = socks_connect(socks, Addr::Domain("localhost".into(), tls_echo.port())).await?;
    assert_eq!(r.reply, Reply::Succeeded);
    let name = ServerName::try_from("localhost")?;
    let mut tls = tls_connect(&ca, name, r.stream).await??;
    assert_eq!(greeting(&mut tls).await?, format!("from {DANTE_FROM}"));
    assert_eq!(round_trip(&mut tls, b"decrypted").await?, b"decrypted");
    drop(tls);
    let rec = wait_record(&up, "the SOCKS TLS connection", |c| {
        c.dst_port == u32::from(tls_echo.port()) && disconnected(c)
    })
    .await?;
    assert!(
        rec.tls && rec.client_tls.is_some() && rec.upstream_tls.is_some(),
        "{rec:?}"
    );
    assert_eq!(
        (rec.ingress.as_str(), rec.upstream.as_str()),
        ("socks5", &*format!("socks5h://{d}"))
    );

    // curl -x http://: CONNECT to the HTTP port, TLS intercepted, through dante.
    let url = format!("https://localhost:{}/over-http-connect", https.port());
    let proxy_url = format!("http://{http}");
    let Some(body) = curl_ok(&["--cacert", &ca_arg, "-x", &proxy_url, &url], &[]).await? else {
        return Ok(());
    };
    assert_eq!(body, "hello from /over-http-connect");
    let rec = wait_record(&up, "the curl -x connection", |c| {
        c.dst_port == u32::from(https.port()) && disconnected(c) && c.ingress == "http"
    })
    .await?;
    assert!(rec.tls, "{rec:?}");
    assert_eq!(rec.sni, "localhost");
    assert_eq!(rec.upstream, format!("socks5h://{d}"));
    let listed = tests::interpose_json(&up.grpc, &["conns", "list", "--json"]).await?;
    let row = listed
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == rec.id))
        .context("the record in conns list --json")?;
    assert_eq!(row["ingress"], "http");
    assert_eq!(row["upstream"], format!("socks5h://{d}"));

    // HTTPS_PROXY, as programs that honour it use the port.
    let url = format!("https://localhost:{}/over-https-proxy", https.port());
    let body = curl_ok(&["--cacert", &ca_arg, &url], &[("HTTPS_PROXY", &proxy_url)])
        .await?
        .context("curl")?;
    assert_eq!(body, "hello from /over-https-proxy");

    // Plain HTTP tunnelled with CONNECT (curl -p), and routed directly by the rule.
    let url = format!("http://localhost:{}/", plain.port());
    let body = curl_ok(&["-p", "-x", &proxy_url, &url], &[])
        .await?
        .context("curl")?;
    assert_eq!(body, "plain through the tunnel");
    let rec = wait_record(&up, "the plain tunnel", |c| {
        c.dst_port == u32::from(plain.port()) && c.ingress == "http"
    })
    .await?;
    assert_eq!((rec.upstream.as_str(), rec.tls), ("", false));

    // Late TLS (a STARTTLS-style greeting first) from an HTTP CONNECT client, through dante:
    // the plaintext prefix is relayed, then the handshake is intercepted.
    let mut s = TcpStream::connect(http).await?;
    let req = format!(
        "CONNECT localhost:{0} HTTP/1.1\r\nHost: localhost:{0}\r\n\r\n",
        starttls.port()
    );
    s.write_all(req.as_bytes()).await?;
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let mut answer = vec![0u8; established.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut answer)).await??;
    assert_eq!(answer, established);
    assert_eq!(greeting(&mut s).await?, "220 ready\r");
    s.write_all(b"STARTTLS\r\n").await?;
    assert_eq!(
        greeting(&mut s).await?,
        format!("220 go ahead from {DANTE_FROM}\r")
    );
    let name = ServerName::try_from("localhost")?;
    let mut tls = tls_connect(&ca, name, s).await??;
    assert_eq!(
        round_trip(&mut tls, b"late and decrypted").await?,
        b"late and decrypted"
    );
    drop(tls);
    let rec = wait_record(&up, "the late-TLS CONNECT", |c| {
        c.dst_port == u32::from(starttls.port()) && disconnected(c)
    })
    .await?;
    assert!(rec.tls && rec.client_tls.is_some(), "{rec:?}");
    assert_eq!(rec.ingress, "http");
    assert_eq!(rec.upstream, format!("socks5h://{d}"));

    // A CONNECT the upstream refuses gets the matching HTTP status and the reason.
    let closed = free_port()?;
    let out = curl_output(
        &[
            "-p",
            "-x",
            &proxy_url,
            &format!("http://localhost:{closed}/"),
        ],
        &[],
    )
    .await?
    .context("curl")?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CONNECT tunnel failed, response 502"), "{err}");
    let rec = wait_record(&up, "the refused CONNECT", |c| {
        c.dst_port == u32::from(closed) && disconnected(c)
    })
    .await?;
    assert_eq!(rec.closed_by, ClosedBy::Proxy as i32);
    assert!(
        rec.reason.ends_with("reply 0x05 (connection refused)"),
        "{}",
        rec.reason
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_asks_for_basic_credentials_when_socks_ones_are_set() -> R {
    let dir = tempfile::tempdir()?;
    let plain = http_server("authorised").await?;
    let up = Up::start(
        &dir.path().join("up"),
        &[
            "--http",
            "127.0.0.1:0",
            "--socks-user",
            "carol",
            "--socks-pass",
            "hunter22",
        ],
    )
    .await?;
    let http = up.proc.addr("http")?;
    let url = format!("http://localhost:{}/", plain.port());
    let Some(out) = curl_output(&["-p", "-x", &format!("http://{http}"), &url], &[]).await? else {
        return Ok(());
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CONNECT tunnel failed, response 407"), "{err}");
    let out = curl_output(
        &["-p", "-x", &format!("http://carol:wrong@{http}"), &url],
        &[],
    )
    .await?
    .context("curl")?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("response 407"));
    let body = curl_ok(
        &["-p", "-x", &format!("http://carol:hunter22@{http}"), &url],
        &[],
    )
    .await?
    .context("curl")?;
    assert_eq!(body, "authorised");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sent_to_the_socks_port_gets_one_line_naming_the_http_port_and_one_warning() -> R {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("up"), &["--http", "127.0.0.1:0"]).await?;
    let (socks, http) = (up.proc.addr("socks")?, up.proc.addr("http")?);
    let want = format!(
        "this is Interpose's SOCKS5 port; HTTP proxy clients use its HTTP CONNECT port {http}\n"
    );
    for _ in 0..2 {
        let Some(out) = curl_output(
            &["-x", &format!("http://{socks}"), "http://example.invalid/"],
            &[],
        )
        .await?
        else {
            return Ok(());
        };
        assert_eq!(String::from_utf8(out.stdout)?, want);
    }
    let warned = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("HTTP request on the SOCKS port"))
            .count()
    };
    assert_eq!(warned(&up.proc.stderr()), 1, "{}", up.proc.stderr());
    // No record: nothing was relayed.
    let mut rc = registry_client(&up.grpc, None).await?;
    assert!(all_connections(&mut rc).await?.is_empty());

    // Without --http the answer says how to get one.
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let proxy = ProxyProc::start(dir.path(), &reg.url, "no-http", &[]).await?;
    let mut s = TcpStream::connect(proxy.socks).await?;
    s.write_all(b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer)).await??;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            "\r\n\r\nthis is Interpose's SOCKS5 port; for HTTP proxy clients start it with \
             --http 127.0.0.1:8080 and use that port\n"
        ),
        "{answer}"
    );
    Ok(())
}

#[tokio::test]
async fn an_http_port_beyond_loopback_without_credentials_is_refused_at_start() -> R {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let err = ProxyProc::start(dir.path(), &reg.url, "open", &["--http", "0.0.0.0:0"])
        .await
        .err()
        .context("proxy-core started an open HTTP proxy")?;
    assert!(
        err.to_string()
            .contains("refusing to serve HTTP CONNECT on 0.0.0.0:0 without authentication"),
        "{err:#}"
    );
    // A bad upstream URL is refused at start, naming the flag but not the password.
    let err = ProxyProc::start(
        dir.path(),
        &reg.url,
        "bad-upstream",
        &["--upstream", "socks4://bob:topsecret@10.0.0.1:1080"],
    )
    .await
    .err()
    .context("proxy-core started with a socks4 upstream")?
    .to_string();
    assert!(
        err.contains("--upstream: unsupported upstream scheme \"socks4\""),
        "{err}"
    );
    assert!(!err.contains("topsecret"), "{err}");
    Ok(())
}
