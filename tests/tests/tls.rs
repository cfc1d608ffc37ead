//! End-to-end tests of TLS interception (issue 4): `interpose up` as a real process, real
//! TLS servers (tokio-rustls, h2) with certificates from a test CA, and real TLS clients
//! (curl, rustls) going through its SOCKS port.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use base64::Engine;
use proto::common::{CloseKind, ClosedBy, Direction};
use proxy_core::socks5::Addr;
use rustls::pki_types::ServerName;
use tests::{
    Up, WAIT, held_list, interpose_json, interpose_ok,
    proxy::{direction_bytes, history},
    registry_client,
    tls::{
        Pki, disconnected, echo, proxy_ca, round_trip, serve, socks, through, tls_connect,
        wait_record,
    },
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Echoes everything back over TLS (no ALPN): a non-HTTP protocol.
async fn echo_server(pki: &Pki) -> anyhow::Result<SocketAddr> {
    let acceptor = pki.acceptor(&[])?;
    serve(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let mut tls = acceptor.accept(s).await?;
            echo(&mut tls).await
        }
    })
    .await
}

/// A plaintext SMTP-like greeting, `STARTTLS`, then TLS and an echo.
async fn starttls_server(pki: &Pki) -> anyhow::Result<SocketAddr> {
    let acceptor = pki.acceptor(&[])?;
    serve(move |mut s| {
        let acceptor = acceptor.clone();
        async move {
            s.write_all(b"220 test ESMTP ready\r\n").await?;
            let mut cmd = [0u8; 10];
            s.read_exact(&mut cmd).await?;
            if &cmd != b"STARTTLS\r\n" {
                bail!("unexpected command {cmd:?}");
            }
            s.write_all(b"220 2.0.0 go ahead\r\n").await?;
            let mut tls = acceptor.accept(s).await?;
            echo(&mut tls).await
        }
    })
    .await
}

/// The decrypted bytes of one direction, via `interpose history --conn ID --json`.
async fn cli_history(up: &Up, id: u64, dir: &str) -> anyhow::Result<Vec<u8>> {
    let v = interpose_json(&up.grpc, &["history", "--conn", &id.to_string(), "--json"]).await?;
    let packets = v.as_array().context("history JSON is an array")?;
    let mut out = Vec::new();
    for p in packets {
        if p["direction"] == dir {
            let b64 = p["data_b64"].as_str().context("data_b64")?;
            out.extend(base64::engine::general_purpose::STANDARD.decode(b64)?);
        }
    }
    Ok(out)
}

/// curl through `up` trusting the CA in `ca`; `None` when curl is missing and the
/// developer opted out.
async fn curl(
    up: &Up,
    ca: &std::path::Path,
    url: &str,
    extra: &[&str],
) -> anyhow::Result<Option<String>> {
    let ca = ca.display().to_string();
    let mut args = vec!["--cacert", ca.as_str()];
    args.extend(extra);
    tests::http::curl(socks(up)?, &args, url)
        .await
        .with_context(|| format!("proxy log: {}", up.proc.stderr()))
}

async fn curl_case(http2: bool) -> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = tests::tls::https_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let ca = proxy_ca(&up)?;
    let (path, flag, alpn) = if http2 {
        ("/page-over-h2", "--http2", "h2")
    } else {
        ("/page-over-h1", "--http1.1", "http/1.1")
    };
    let url = format!("https://localhost:{}{path}", server.port());
    let Some(body) = curl(&up, &ca, &url, &[flag]).await? else {
        return Ok(());
    };
    assert_eq!(body, format!("hello from {path}"));
    let rec = wait_record(&up, "for the curl connection, closed", |c| {
        c.dst_port == u32::from(server.port()) && disconnected(c)
    })
    .await?;
    assert!(rec.tls, "{rec:?}");
    assert_eq!(rec.sni, "localhost");
    assert_eq!(rec.alpn, alpn);
    let client_tls = rec.client_tls.clone().context("client_tls")?;
    let upstream_tls = rec.upstream_tls.clone().context("upstream_tls")?;
    assert_eq!(client_tls.alpn, alpn);
    assert_eq!(upstream_tls.alpn, alpn);
    assert!(client_tls.version.starts_with("TLSv1."), "{client_tls:?}");
    assert!(client_tls.cipher.starts_with("TLS_"), "{client_tls:?}");
    assert!(upstream_tls.cipher.starts_with("TLS_"), "{upstream_tls:?}");
    assert!(!rec.upstream_insecure);
    // The CLI's JSON shows the same record.
    let listed = interpose_json(&up.grpc, &["conns", "list", "--json"]).await?;
    let row = listed
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == rec.id))
        .context("the record in conns list --json")?;
    assert_eq!(row["tls"], true);
    assert_eq!(row["sni"], "localhost");
    assert_eq!(row["alpn"], alpn);
    assert_eq!(row["client_tls"]["alpn"], alpn);
    assert_eq!(
        row["upstream_tls"]["version"],
        upstream_tls.version.as_str()
    );
    assert_eq!(row["upstream_insecure"], false);
    let c2s = cli_history(&up, rec.id, "c2s").await?;
    let s2c = cli_history(&up, rec.id, "s2c").await?;
    let c2s_text = String::from_utf8_lossy(&c2s);
    if http2 {
        assert!(
            c2s.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            "decrypted HTTP/2 preface: {c2s_text:?}"
        );
    } else {
        assert!(
            c2s_text.starts_with(&format!("GET {path} HTTP/1.1\r\n")),
            "decrypted request: {c2s_text:?}"
        );
        assert!(c2s_text.contains("Host: localhost"), "{c2s_text:?}");
    }
    let body = format!("hello from {path}");
    assert!(
        s2c.windows(body.len()).any(|w| w == body.as_bytes()),
        "decrypted response holds the body: {:?}",
        String::from_utf8_lossy(&s2c)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_page_over_http1_and_history_shows_the_decrypted_request()
-> anyhow::Result<()> {
    curl_case(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_page_over_http2_and_the_record_shows_alpn_h2() -> anyhow::Result<()> {
    curl_case(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tls_echo_protocol_is_intercepted_and_recorded() -> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = echo_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let (tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    let mut tls = tls_connect(&proxy_ca(&up)?, ServerName::try_from("localhost")?, tcp).await??;
    for i in 0..5 {
        let msg = format!("echo protocol message {i}\n");
        assert_eq!(round_trip(&mut tls, msg.as_bytes()).await?, msg.as_bytes());
    }
    tls.shutdown().await?;
    let rec = wait_record(&up, "for the echo connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert!(rec.tls);
    assert_eq!(rec.sni, "localhost");
    assert_eq!(rec.alpn, "");
    assert_eq!(rec.closed_by, ClosedBy::Client as i32, "{rec:?}");
    let mut client = registry_client(&up.grpc, None).await?;
    let packets = history(&mut client, rec.id).await?;
    let expected: String = (0..5)
        .map(|i| format!("echo protocol message {i}\n"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&direction_bytes(&packets, Direction::C2s)),
        expected
    );
    assert_eq!(
        String::from_utf8_lossy(&direction_bytes(&packets, Direction::S2c)),
        expected
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_upgrade_after_a_plaintext_greeting_is_decrypted() -> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = starttls_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let (mut tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    // The server speaks first: the greeting must arrive without the client sending anything.
    let mut greeting = vec![0u8; b"220 test ESMTP ready\r\n".len()];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut greeting))
        .await
        .context("greeting timed out")??;
    assert_eq!(greeting, b"220 test ESMTP ready\r\n");
    tcp.write_all(b"STARTTLS\r\n").await?;
    let mut go = vec![0u8; b"220 2.0.0 go ahead\r\n".len()];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut go))
        .await
        .context("reply timed out")??;
    assert_eq!(go, b"220 2.0.0 go ahead\r\n");
    let mut tls = tls_connect(&proxy_ca(&up)?, ServerName::try_from("localhost")?, tcp).await??;
    let secret = b"MAIL FROM:<secret-after-upgrade@example.com>\r\n";
    assert_eq!(round_trip(&mut tls, secret).await?, secret);
    tls.shutdown().await?;
    let rec = wait_record(&up, "for the STARTTLS connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert!(rec.tls, "{rec:?}");
    assert_eq!(rec.sni, "localhost");
    let mut client = registry_client(&up.grpc, None).await?;
    let packets = history(&mut client, rec.id).await?;
    let c2s = direction_bytes(&packets, Direction::C2s);
    let mut expected = b"STARTTLS\r\n".to_vec();
    expected.extend_from_slice(secret);
    assert_eq!(
        String::from_utf8_lossy(&c2s),
        String::from_utf8_lossy(&expected)
    );
    let s2c = direction_bytes(&packets, Direction::S2c);
    let mut expected = b"220 test ESMTP ready\r\n220 2.0.0 go ahead\r\n".to_vec();
    expected.extend_from_slice(secret);
    assert_eq!(
        String::from_utf8_lossy(&s2c),
        String::from_utf8_lossy(&expected)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_sni_to_an_ip_target_validates_against_an_ip_san() -> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = echo_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let (tcp, port) = through(&up, Addr::Ip(server)).await?;
    // rustls sends no SNI for an IP address and verifies the certificate's IP SAN.
    let ip = ServerName::IpAddress(server.ip().into());
    let mut tls = tls_connect(&proxy_ca(&up)?, ip, tcp).await??;
    assert_eq!(round_trip(&mut tls, b"no sni here").await?, b"no sni here");
    tls.shutdown().await?;
    let rec = wait_record(&up, "for the IP connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert!(rec.tls, "{rec:?}");
    assert_eq!(rec.sni, "");
    assert_eq!(rec.dst_host, "127.0.0.1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_does_not_trust_the_ca_is_recorded_as_rejecting_the_certificate()
-> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = echo_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let (tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    // Trusts the real server's CA, not the proxy's.
    let r = tls_connect(&pki.ca_file(), ServerName::try_from("localhost")?, tcp).await?;
    let Err(e) = r else {
        bail!("the client accepted the proxy's certificate without trusting its CA")
    };
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    let rec = wait_record(&up, "for the rejecting client, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert_eq!(rec.closed_by, ClosedBy::Client as i32, "{rec:?}");
    assert!(
        rec.reason
            .contains("client rejected certificate: unknown CA"),
        "{rec:?}"
    );
    // The client spoke TLS, although nothing was decrypted.
    assert!(rec.tls, "{rec:?}");
    assert!(rec.client_tls.is_none(), "{rec:?}");
    assert_eq!(rec.sni, "localhost");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_an_untrusted_certificate_gets_an_alert_and_a_proxy_record()
-> anyhow::Result<()> {
    let pki = Pki::new("Untrusted Upstream CA")?;
    let server = echo_server(&pki).await?;
    let data = tempfile::tempdir()?;
    // No --upstream-ca: the server's CA is unknown to the proxy.
    let up = Up::start(data.path(), &[]).await?;
    let (tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    let r = tls_connect(&proxy_ca(&up)?, ServerName::try_from("localhost")?, tcp).await?;
    let Err(e) = r else {
        bail!("the handshake succeeded although the upstream is untrusted")
    };
    let alert = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    assert!(
        matches!(alert, Some(rustls::Error::AlertReceived(_))),
        "the client gets a TLS alert, got {e}"
    );
    let rec = wait_record(&up, "for the untrusted upstream, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert_eq!(rec.closed_by, ClosedBy::Proxy as i32, "{rec:?}");
    assert_eq!(rec.close_kind, CloseKind::Error as i32, "{rec:?}");
    assert!(
        rec.reason.contains("upstream certificate rejected")
            && rec.reason.contains("unknown issuer"),
        "{rec:?}"
    );
    assert!(rec.tls && rec.upstream_tls.is_none(), "{rec:?}");
    Ok(())
}

/// A plain TCP echo server.
async fn plain_echo_server() -> anyhow::Result<SocketAddr> {
    serve(|mut s| async move { echo(&mut s).await }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_only_look_like_tls_are_relayed_intact() -> anyhow::Result<()> {
    let server = plain_echo_server().await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    // A record header that could start a ClientHello, then an impossible handshake length.
    let (mut tcp, port) = through(&up, Addr::Ip(server)).await?;
    let fake = b"\x16\x03\x01\x00\x05\x01\xff\xff\xffbinary protocol";
    assert_eq!(round_trip(&mut tcp, fake).await?, fake);
    assert_eq!(round_trip(&mut tcp, b"and more").await?, b"and more");
    drop(tcp);
    let rec = wait_record(&up, "for the look-alike connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert!(!rec.tls, "{rec:?}");
    let mut client = registry_client(&up.grpc, None).await?;
    let packets = history(&mut client, rec.id).await?;
    let mut expected = fake.to_vec();
    expected.extend_from_slice(b"and more");
    assert_eq!(direction_bytes(&packets, Direction::C2s), expected);

    // The start of a ClientHello, then FIN: the bytes and the FIN are passed on.
    let (mut tcp, _) = through(&up, Addr::Ip(server)).await?;
    let partial = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    tcp.write_all(partial).await?;
    tcp.shutdown().await?;
    let back = tests::proxy::read_to_end(&mut tcp).await?;
    assert_eq!(back, partial);
    Ok(())
}

/// Holds client packets at the relay's hold point of a live connection (`s`, echoed by the
/// server) and checks that the server receives exactly what each verdict says: an edit of
/// another length, a drop (the next packet's echo shows nothing of the dropped one), a
/// forward as is; then intercept off lets packets through again.
async fn hold_case<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    up: &Up,
    s: &mut S,
) -> anyhow::Result<()> {
    interpose_ok(&up.grpc, &["intercept", "on", "--direction", "c2s"]).await?;
    // The proxy follows the setting over a stream: until it has it, a packet passes (and
    // is echoed); from then on the first packet is held.
    tests::tls::probe_until_held(s, b"first", &up.grpc).await?;
    let held = held_list(&up.grpc, 1).await?;
    assert_eq!(held[0]["direction"], "c2s");
    assert_eq!(held[0]["conn_status"], "active");
    let data = base64::engine::general_purpose::STANDARD
        .decode(held[0]["data_b64"].as_str().unwrap_or_default())?;
    assert_eq!(data, b"first");
    let id = held[0]["held_id"].to_string();
    // Longer, and binary with a NUL: given as hex, as a NUL cannot be in an argument.
    let hex: String = b"FIRST, EDITED\0LONGER"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    interpose_ok(&up.grpc, &["held", "forward", &id, "--replace-hex", &hex]).await?;
    let mut back = vec![0u8; "FIRST, EDITED\0LONGER".len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await??;
    assert_eq!(back, b"FIRST, EDITED\0LONGER");

    s.write_all(b"dropme").await?;
    s.flush().await?;
    let held = held_list(&up.grpc, 1).await?;
    interpose_ok(&up.grpc, &["held", "drop", &held[0]["held_id"].to_string()]).await?;
    s.write_all(b"third").await?;
    s.flush().await?;
    let held = held_list(&up.grpc, 1).await?;
    interpose_ok(
        &up.grpc,
        &["held", "forward", &held[0]["held_id"].to_string()],
    )
    .await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await??;
    assert_eq!(&back, b"third", "the dropped packet reached the server");

    interpose_ok(&up.grpc, &["intercept", "off"]).await?;
    assert_eq!(round_trip(s, b"free").await?, b"free");
    Ok(())
}

/// The history of a held connection: the edited packet with what was received and sent, the
/// dropped one with what was received and nothing sent.
async fn check_held_history(up: &Up, port: u16) -> anyhow::Result<()> {
    let rec = wait_record(up, "for the held connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    let mut client = registry_client(&up.grpc, None).await?;
    let packets = history(&mut client, rec.id).await?;
    let c2s: Vec<_> = packets
        .iter()
        .filter(|p| p.direction == Direction::C2s as i32)
        .collect();
    let edited = c2s
        .iter()
        .find(|p| p.modified && !p.dropped)
        .context("an edited packet in the history")?;
    assert_eq!(edited.original, &b"first"[..]);
    assert_eq!(edited.data, &b"FIRST, EDITED\0LONGER"[..]);
    let dropped = c2s
        .iter()
        .find(|p| p.dropped)
        .context("a dropped packet in the history")?;
    assert!(dropped.modified);
    assert_eq!(dropped.original, &b"dropme"[..]);
    assert!(dropped.data.is_empty());
    // What the server received, in order, is what the history says was sent.
    let sent: Vec<u8> = c2s.iter().flat_map(|p| p.data.clone()).collect();
    assert!(
        String::from_utf8_lossy(&sent).ends_with("FIRST, EDITED\0LONGERthirdfree"),
        "{}",
        String::from_utf8_lossy(&sent)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_plain_packets_are_forwarded_edited_and_dropped_at_the_relay() -> anyhow::Result<()> {
    let server = plain_echo_server().await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let (mut tcp, port) = through(&up, Addr::Ip(server)).await?;
    hold_case(&up, &mut tcp).await?;
    drop(tcp);
    check_held_history(&up, port).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_packets_inside_tls_are_forwarded_edited_and_dropped_at_the_relay()
-> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = echo_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let (tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    let mut tls = tls_connect(&proxy_ca(&up)?, ServerName::try_from("localhost")?, tcp).await??;
    hold_case(&up, &mut tls).await?;
    tls.shutdown().await?;
    drop(tls);
    check_held_history(&up, port).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_is_not_stalled_by_intercept_on_the_client_direction()
-> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let server = starttls_server(&pki).await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    // The proxy has the setting before connecting (it follows a config stream; a probe
    // connection was held): the greeting check does not depend on it, the held STARTTLS
    // below does.
    tests::tls::intercept_on(&up, &["--direction", "c2s"]).await?;
    let (tcp, _) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    let mut lines = BufReader::new(tcp);
    let mut greeting = String::new();
    tokio::time::timeout(WAIT, lines.read_line(&mut greeting))
        .await
        .context("the server's greeting was stalled")??;
    assert_eq!(greeting, "220 test ESMTP ready\r\n");
    // The client's command is held, as asked.
    let mut tcp = lines.into_inner();
    tcp.write_all(b"STARTTLS\r\n").await?;
    let held = held_list(&up.grpc, 1).await?;
    assert_eq!(held[0]["direction"], "c2s");
    interpose_ok(&up.grpc, &["intercept", "off"]).await?;
    let mut reply = [0u8; 20];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut reply)).await??;
    assert_eq!(&reply, b"220 2.0.0 go ahead\r\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_rules_rewrite_any_protocol_in_the_proxy_and_are_recorded() -> anyhow::Result<()> {
    let server = plain_echo_server().await?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let rule = [
        "intercept",
        "rule",
        "add",
        "--direction",
        "c2s",
        "--match",
        "hello",
        "--replace",
        "HOWDY-LONGER",
    ];
    interpose_ok(&up.grpc, &rule).await?;
    let (mut tcp, port) = through(&up, Addr::Ip(server)).await?;
    // Until the proxy has the rule, the bytes pass as they are.
    let start = std::time::Instant::now();
    loop {
        tcp.write_all(b"say hello").await?;
        let mut back = vec![0u8; 9];
        tokio::time::timeout(WAIT, tcp.read_exact(&mut back)).await??;
        if back == b"say HOWDY" {
            let mut rest = [0u8; 7];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut rest)).await??;
            assert_eq!(&rest, b"-LONGER");
            break;
        }
        assert_eq!(back, b"say hello");
        anyhow::ensure!(start.elapsed() < WAIT, "the rule never applied");
    }
    drop(tcp);
    let rec = wait_record(&up, "for the rewritten connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    let mut client = registry_client(&up.grpc, None).await?;
    let packets = history(&mut client, rec.id).await?;
    let rewritten = packets
        .iter()
        .find(|p| p.modified)
        .context("a rewritten packet in the history")?;
    assert_eq!(rewritten.original, &b"say hello"[..]);
    assert_eq!(rewritten.data, &b"say HOWDY-LONGER"[..]);
    assert!(!rewritten.dropped);
    Ok(())
}
