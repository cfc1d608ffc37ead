//! The `interpose` CLI and `interpose up` end to end, plus a generic gRPC client (grpcurl,
//! which finds everything through server reflection).

use anyhow::Context;
use base64::Engine;
use proto::common::{CloseKind, ClosedBy, Direction};
use serde_json::{Value, json};
use tests::{
    Ingest, Up, WAIT, events, interpose, interpose_columns, interpose_json, registry_client,
};
use tokio::io::AsyncBufReadExt;

fn grpcurl() -> String {
    tests::tools::grpcurl()
}

/// Runs grpcurl with `args`, adding the bearer token of the server among them (as
/// `-H 'authorization: Bearer TOKEN'`) when the harness started it with one.
async fn run_grpcurl(args: &[&str]) -> anyhow::Result<String> {
    let auth: Vec<String> = args
        .iter()
        .find_map(|a| tests::token(&format!("http://{a}")))
        .map(|t| vec!["-H".into(), format!("authorization: Bearer {t}")])
        .unwrap_or_default();
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(grpcurl())
            .args(&auth)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("running {}: {e}", grpcurl()))?;
    anyhow::ensure!(
        out.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn up_serves_the_api_to_the_cli_and_to_reflection_clients() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    assert!(
        up.grpc.starts_with("http://127.0.0.1:"),
        "{}",
        up.proc.ready
    );

    assert_eq!(
        interpose_json(&up.grpc, &["conns", "list", "--json"]).await?,
        json!([])
    );

    let out = interpose(&up.grpc, &["conns", "clear", "999999"]).await?;
    assert!(!out.ok);
    assert_eq!(out.stderr.trim(), "interpose: no connection with ID 999999");

    let out = interpose("http://127.0.0.1:1", &["conns", "list"]).await?;
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot reach the Interpose server"),
        "{}",
        out.stderr
    );

    // grpcurl (v1alpha reflection) lists the services and calls one.
    let addr = up.grpc.trim_start_matches("http://");
    let services = run_grpcurl(&["-plaintext", addr, "list"]).await?;
    let services: Vec<&str> = services.lines().collect();
    for s in ["interpose.registry.v1.Registry", "grpc.health.v1.Health"] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    let leased = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"node": "grpcurl", "count": 3}"#,
        addr,
        "interpose.registry.v1.Registry/LeaseIds",
    ])
    .await?;
    let leased: Value = serde_json::from_str(&leased)?;
    // uint64 is a string in proto JSON; the embedded proxy may have leased a block first.
    let num = |k: &str| leased[k].as_str().and_then(|v| v.parse::<u64>().ok());
    let (first, last) = (num("first").unwrap_or(0), num("last").unwrap_or(0));
    assert!(first >= 1 && last == first + 2, "{leased}");

    // Reflection v1 answers too, and health says the registry is serving.
    let ch = tests::channel(&up.grpc, None).await?;
    let mut refl =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await?
        .into_inner();
    let msg = resp
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no reflection reply"))?;
    let names: Vec<String> = match msg.message_response {
        Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => anyhow::bail!("unexpected reflection reply {other:?}"),
    };
    assert!(
        names.contains(&"interpose.registry.v1.Registry".to_string()),
        "{names:?}"
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "interpose.registry.v1.Registry".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    assert!(up.proc.terminate().await?, "up exits cleanly on SIGTERM");
    Ok(())
}

async fn seed(url: &str) -> anyhow::Result<Ingest> {
    let mut client = registry_client(url, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    ingest
        .send_durable(vec![
            events::open(1, 50001, "example.test", 443),
            events::packet(1, 1, Direction::C2s, b"GET / HTTP/1.1\r\n\r\n"),
            events::packet(1, 2, Direction::S2c, b"HTTP/1.1 200 OK\r\n\r\nhi"),
            events::close(1, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
            events::open(2, 50002, "db.test", 5432),
            events::packet(2, 1, Direction::C2s, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
        ])
        .await?;
    Ok(ingest)
}

#[tokio::test]
async fn conns_and_history_commands_show_what_was_recorded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let _ingest = seed(&up.grpc).await?;

    let all = interpose_json(&up.grpc, &["conns", "list", "--json"]).await?;
    let all = all.as_array().expect("array");
    assert_eq!(all.len(), 2);
    let c1 = &all[0];
    let keys: Vec<&str> = c1
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for k in [
        "id",
        "node",
        "src_ip",
        "src_port",
        "dst_host",
        "dst_ip",
        "dst_port",
        "status",
        "closed_by",
        "close_kind",
        "reason",
        "tls",
        "sni",
        "alpn",
        "opened_at",
        "closed_at",
        "bytes_c2s",
        "bytes_s2c",
        "packets_c2s",
        "packets_s2c",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert_eq!(c1["id"], 1);
    assert_eq!(c1["src_port"], 50001);
    assert_eq!(c1["dst_port"], 443);
    assert_eq!(c1["status"], "disconnected");
    assert_eq!(c1["closed_by"], "client");
    assert_eq!(c1["close_kind"], "fin");
    assert_eq!(c1["node"], "lab1");
    assert!(c1["closed_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(all[1]["status"], "active");
    assert_eq!(all[1]["closed_by"], Value::Null);

    let active =
        interpose_json(&up.grpc, &["conns", "list", "--status", "active", "--json"]).await?;
    assert_eq!(active.as_array().map(Vec::len), Some(1));
    assert_eq!(active[0]["id"], 2);

    let table = interpose(&up.grpc, &["conns", "list"]).await?;
    assert!(table.ok);
    assert!(
        table.stdout.contains("example.test:443"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("2 connection(s)"), "{}", table.stdout);

    let copy = interpose(&up.grpc, &["conns", "copy", "1", "2"]).await?;
    assert!(copy.ok, "{}", copy.stderr);
    let rows: Vec<Vec<&str>> = copy
        .stdout
        .lines()
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][..4], ["id", "node", "src_ip", "src_port"]);
    assert_eq!(rows[1][..4], ["1", "lab1", "127.0.0.1", "50001"]);
    assert_eq!(rows[2][0], "2");
    let bad = interpose(&up.grpc, &["conns", "copy", "1", "77"]).await?;
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("no connection with ID 77"),
        "{}",
        bad.stderr
    );

    let stats = interpose_json(&up.grpc, &["conns", "stats", "--json"]).await?;
    assert_eq!(stats["total"], 2);
    assert_eq!(stats["by_status"]["active"], 1);
    assert_eq!(stats["by_closed_by"]["client"], 1);
    assert_eq!(stats["by_destination"]["db.test:5432"], 1);
    assert_eq!(stats["history_packets"], 3);

    let h = interpose_json(&up.grpc, &["history", "--conn", "1", "--json"]).await?;
    let h = h.as_array().expect("array");
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["seq"], 1);
    assert_eq!(h[0]["direction"], "c2s");
    assert_eq!(h[1]["direction"], "s2c");
    assert_eq!(h[1]["len"], 21);
    let data = base64::engine::general_purpose::STANDARD
        .decode(h[1]["data_b64"].as_str().unwrap_or(""))?;
    assert_eq!(data, b"HTTP/1.1 200 OK\r\n\r\nhi");
    let h = interpose_json(
        &up.grpc,
        &[
            "history",
            "--direction",
            "s2c",
            "--contains",
            "200 OK",
            "--json",
        ],
    )
    .await?;
    assert_eq!(h.as_array().map(Vec::len), Some(1));
    // The table ends with a count.
    let table = interpose(&up.grpc, &["history", "--conn", "1"]).await?;
    assert!(table.ok, "{}", table.stderr);
    assert_eq!(
        table.stdout.lines().last(),
        Some("2 packets"),
        "{}",
        table.stdout
    );
    let none = interpose(&up.grpc, &["history", "--conn", "31337"]).await?;
    assert!(!none.ok);
    assert!(none.stderr.contains("31337"), "{}", none.stderr);

    let cleared = interpose(&up.grpc, &["conns", "clear", "1"]).await?;
    assert!(cleared.ok, "{}", cleared.stderr);
    let ids = interpose_json(&up.grpc, &["conns", "list", "--json"]).await?;
    assert_eq!(
        ids.as_array()
            .map(|a| a.iter().map(|c| c["id"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(2)])
    );
    // The cleared connection's packets are still in the history.
    let h = interpose_json(&up.grpc, &["history", "--conn", "1", "--json"]).await?;
    assert_eq!(h.as_array().map(Vec::len), Some(2));
    let cleared = interpose(&up.grpc, &["conns", "clear", "--all"]).await?;
    assert!(cleared.ok, "{}", cleared.stderr);
    assert_eq!(
        interpose_json(&up.grpc, &["conns", "list", "--json"]).await?,
        json!([])
    );
    Ok(())
}

#[tokio::test]
async fn conns_watch_json_prints_each_event_as_it_happens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let mut ingest = seed(&up.grpc).await?;

    let mut watch = tokio::process::Command::new(tests::bin("interpose"))
        .args(["conns", "watch", "--json", "--server", &up.grpc])
        .env(
            "INTERPOSE_TOKEN_FILE",
            tests::token_file(&up.grpc).expect("token file"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = watch
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut next = async || -> anyhow::Result<Value> {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        Ok(serde_json::from_str(&line)?)
    };
    for id in [1, 2] {
        let ev = next().await?;
        assert_eq!(ev["event"], "snapshot");
        assert_eq!(ev["connection"]["id"], id);
    }
    assert_eq!(next().await?["event"], "snapshot_end");

    ingest
        .send_durable(vec![events::open(3, 50003, "new.test", 80)])
        .await?;
    let ev = next().await?;
    assert_eq!(
        (ev["event"].as_str(), ev["connection"]["id"].as_u64()),
        (Some("opened"), Some(3))
    );
    assert_eq!(ev["connection"]["status"], "active");
    ingest
        .send_durable(vec![events::close(
            3,
            ClosedBy::Server,
            CloseKind::Rst,
            "server reset the connection",
        )])
        .await?;
    let ev = next().await?;
    assert_eq!(
        (ev["event"].as_str(), ev["connection"]["closed_by"].as_str()),
        (Some("closed"), Some("server"))
    );
    assert_eq!(ev["connection"]["close_kind"], "rst");
    let out = interpose(&up.grpc, &["conns", "clear", "2"]).await?;
    assert!(out.ok);
    assert_eq!(next().await?, json!({"event": "cleared", "id": 2}));

    // Ctrl-C on `up` with the watch (and the test's ingest stream) still open: both streams
    // are told, the watch says so and fails, and `up` exits cleanly without waiting for them.
    // Held up by them, it would have waited out the shutdown grace and said so.
    let log = up.proc.log.clone();
    assert!(up.proc.signal("INT").await?, "up exits cleanly on SIGINT");
    let log = std::fs::read_to_string(&log)?;
    assert!(
        !log.contains("calls still open after the shutdown grace period"),
        "the open streams held up's exit up: {log}"
    );
    let out = tokio::time::timeout(WAIT, watch.wait_with_output()).await??;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "interpose: the server shut down"
    );
    drop(ingest);
    Ok(())
}

#[tokio::test]
async fn curl_through_up_is_recorded_with_its_history() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &["--node", "lab-up"]).await?;
    let socks = up.proc.addr("socks")?;
    let web = tests::http::http_server("hello through interpose").await?;
    let url = format!("http://localhost:{}/probe", web.port());
    let Some(body) = tests::http::curl(socks, &[], &url).await? else {
        return Ok(());
    };
    assert_eq!(body, "hello through interpose");

    let conns = tests::eventually("the closed record", || async {
        let v = interpose_json(&up.grpc, &["conns", "list", "--json"]).await?;
        let done = v
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["status"] == "disconnected");
        Ok(done.then_some(v))
    })
    .await?;
    let c = &conns[0];
    assert_eq!(c["node"], "lab-up");
    assert_eq!(c["dst_host"], "localhost");
    assert_eq!(c["dst_port"], web.port());
    assert_eq!(c["src_ip"], "127.0.0.1");
    let id = c["id"].as_u64().expect("id").to_string();
    let h = tests::eventually("the history", || async {
        let h = interpose_json(&up.grpc, &["history", "--conn", &id, "--json"]).await?;
        Ok(h.as_array().is_some_and(|a| a.len() >= 2).then_some(h))
    })
    .await?;
    let first = base64::engine::general_purpose::STANDARD
        .decode(h[0]["data_b64"].as_str().unwrap_or(""))?;
    assert!(
        first.starts_with(b"GET /probe HTTP/1.1\r\n"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    assert_eq!(h[0]["direction"], "c2s");
    Ok(())
}

/// A TLS handshake with `server` (as localhost) through `up`, trusting only the CA in
/// `ca`: the outer error is the harness's, the inner one the handshake's.
async fn handshake(
    up: &Up,
    server: std::net::SocketAddr,
    ca: &std::path::Path,
) -> anyhow::Result<std::io::Result<()>> {
    let target = proxy_core::socks5::Addr::Domain("localhost".into(), server.port());
    let (tcp, _) = tests::tls::through(up, target).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(tests::tls::tls_connect(ca, name, tcp).await?.map(|_| ()))
}

#[tokio::test]
async fn ca_export_and_regenerate_over_grpc() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = tests::tls::Pki::new("Upstream Test CA")?;
    let server = tests::tls::serve({
        let acceptor = pki.acceptor(&[])?;
        move |s| {
            let acceptor = acceptor.clone();
            async move { tests::tls::echo(&mut acceptor.accept(s).await?).await }
        }
    })
    .await?;
    let up = Up::start(&dir.path().join("data"), &["--upstream-ca", &pki.ca_arg()]).await?;
    let ca_path = std::path::PathBuf::from(up.proc.field("ca").unwrap_or_default());
    let pem_out = dir.path().join("ca.pem");
    let der_out = dir.path().join("ca.der");
    let out = interpose(
        &up.grpc,
        &["ca", "export", "--out", pem_out.to_str().unwrap_or("")],
    )
    .await?;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("sha256"), "{}", out.stdout);
    let original = std::fs::read_to_string(&ca_path)?;
    assert_eq!(std::fs::read_to_string(&pem_out)?, original);
    let out = interpose(
        &up.grpc,
        &[
            "ca",
            "export",
            "--der",
            "--out",
            der_out.to_str().unwrap_or(""),
        ],
    )
    .await?;
    assert!(out.ok, "{}", out.stderr);
    let der = std::fs::read(&der_out)?;
    assert_eq!(der.first(), Some(&0x30), "DER starts with a SEQUENCE");

    // A live TLS client through the proxy trusts the original CA (the proxy now has a leaf
    // for localhost it could keep using).
    handshake(&up, server, &pem_out)
        .await?
        .context("a client trusting the original CA")?;

    let out = interpose(&up.grpc, &["ca", "regenerate"]).await?;
    assert!(out.ok, "{}", out.stderr);
    let renewed = std::fs::read_to_string(&ca_path)?;
    assert_ne!(renewed, original);
    // The running proxy switched: a client trusting only the renewed CA completes a
    // handshake (once the proxy picked the new CA up), and then one trusting only the
    // original no longer does.
    let renewed_file = dir.path().join("renewed.pem");
    std::fs::write(&renewed_file, &renewed)?;
    tests::eventually("the proxy signing with the renewed CA", || async {
        Ok(handshake(&up, server, &renewed_file).await?.ok())
    })
    .await?;
    let old = handshake(&up, server, &pem_out).await?;
    let err = old
        .err()
        .context("a client trusting only the original CA is refused")?;
    // (The renewed CA has the original's name: the leaf's signature is what fails.)
    assert!(
        err.to_string()
            .starts_with("invalid peer certificate: BadSignature"),
        "{err}"
    );
    let out = interpose(
        &up.grpc,
        &[
            "ca",
            "export",
            "--force",
            "--out",
            pem_out.to_str().unwrap_or(""),
        ],
    )
    .await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&pem_out)?, renewed);
    Ok(())
}

#[tokio::test]
async fn a_second_up_on_the_same_data_dir_says_so_in_words() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let _first = Up::start(&data, &[]).await?;
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(tests::bin("interpose"))
            .args([
                "up",
                "--socks",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("the data directory is in use by another Interpose process"),
        "{err}"
    );
    for debug in ["Os {", "kind:", "Other("] {
        assert!(!err.contains(debug), "debug text {debug:?} in: {err}");
    }
    Ok(())
}

/// Runs `interpose conns list ...` with `COLUMNS` set (or, with `tty`, inside a pseudo
/// terminal of that width made by `script`), returning stdout.
async fn conns_list_at(
    server: &str,
    width: u16,
    tty: bool,
    extra: &[&str],
) -> anyhow::Result<String> {
    let bin = tests::bin("interpose");
    let mut cmd = if tty {
        let line = format!(
            "stty cols {width} rows 50; {} conns list --server {server} {}",
            bin.display(),
            extra.join(" ")
        );
        let mut c = tokio::process::Command::new("script");
        c.args(["-qec", &line, "/dev/null"]).env_remove("COLUMNS");
        if let Some(file) = tests::token_file(server) {
            c.env("INTERPOSE_TOKEN_FILE", file);
        }
        c
    } else {
        let mut c = tokio::process::Command::new(bin);
        c.args(["conns", "list", "--server", server])
            .args(extra)
            .env("COLUMNS", width.to_string());
        if let Some(file) = tests::token_file(server) {
            c.env("INTERPOSE_TOKEN_FILE", file);
        }
        c
    };
    let out = tokio::time::timeout(WAIT, cmd.kill_on_drop(true).output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "conns list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}

#[tokio::test]
async fn conns_list_fits_the_terminal_and_cuts_long_values() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let long_host = "a-rather-long-host-name-for-a-table.service.internal.example.test";
    let mut client = registry_client(&up.grpc, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    ingest
        .send_durable(vec![
            events::open(1, 50001, long_host, 443),
            events::close(
                1,
                ClosedBy::Server,
                CloseKind::Rst,
                "server reset the connection while the client was still sending its request body",
            ),
            events::open(2, 50002, "db.test", 5432),
        ])
        .await?;

    for (width, tty) in [(80, false), (200, false), (80, true)] {
        let text = conns_list_at(&up.grpc, width, tty, &[]).await?;
        for line in text.lines() {
            assert!(
                line.chars().count() <= usize::from(width),
                "{width} cols (tty {tty}): {line:?} is {} wide in\n{text}",
                line.chars().count()
            );
        }
        // The columns a tester scans for first survive at 80 columns; at 200 all do.
        let header = text.lines().next().unwrap_or_default();
        let mut want = vec!["ID", "CLIENT", "TARGET", "STATUS", "CLOSED BY", "REASON"];
        if width == 200 {
            want.extend(["SNI", "TLS", "KIND", "C2S", "S2C", "DURATION", "OPENED"]);
        }
        for col in want {
            assert!(header.contains(col), "{col} missing from {header:?}");
        }
        assert!(text.contains("db.test:5432"), "{text}");
        assert!(text.ends_with("2 connection(s)\n"), "{text}");
        if width == 80 {
            assert!(text.contains('…'), "nothing cut at 80 columns:\n{text}");
        }
    }

    // --wide and --json keep the full values; --columns chooses and orders.
    let wide = conns_list_at(&up.grpc, 80, false, &["--wide"]).await?;
    assert!(wide.contains(&format!("{long_host}:443")), "{wide}");
    let picked = conns_list_at(&up.grpc, 80, false, &["--columns", "target,id"]).await?;
    let header: Vec<&str> = picked
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["TARGET", "ID"]);
    let out = interpose(&up.grpc, &["conns", "list", "--columns", "id,nope"]).await?;
    assert!(!out.ok);
    assert!(
        out.stderr.starts_with("interpose: unknown column \"nope\""),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn history_is_a_table_that_fits_and_shows_what_an_edit_changed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let mut client = registry_client(&up.grpc, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    let long = "GET /".to_string() + &"x".repeat(300) + " HTTP/1.1\r\n";
    ingest
        .send_durable(vec![
            events::open(1, 50001, "web.test", 80),
            events::packet(1, 1, Direction::C2s, long.as_bytes()),
            events::edited_packet(1, 2, Direction::C2s, b"secret=1", b"secret=2", false),
            events::edited_packet(1, 3, Direction::S2c, b"tracking pixel", b"", true),
        ])
        .await?;

    for width in [80u16, 200] {
        let out = interpose_columns(&up.grpc, &["history"], width).await?;
        assert!(out.ok, "{}", out.stderr);
        let text = out.stdout;
        for line in text.lines() {
            assert!(
                line.chars().count() <= usize::from(width),
                "{width} cols: {line:?} is {} wide in\n{text}",
                line.chars().count()
            );
        }
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            ["CONN", "SEQ", "DIR", "TIME", "LEN", "DATA"],
            "{text}"
        );
        // The long request is cut with an ellipsis; the edit shows the bytes sent, then on a
        // line of its own those received; the drop likewise.
        assert!(
            lines[1].contains("GET /xxx") && lines[1].ends_with('…'),
            "{text}"
        );
        assert!(lines[2].ends_with("[modified] secret=2"), "{text}");
        assert!(
            lines[3].trim_start().starts_with("8 original: secret=1"),
            "{text}"
        );
        assert!(lines[4].ends_with("[dropped]"), "{text}");
        assert!(lines[5].ends_with("original: tracking pixel"), "{text}");
        assert_eq!(lines.last(), Some(&"3 packets"), "{text}");
    }
    // --wide keeps the whole preview; --columns chooses and orders; a bad one is named.
    let wide = interpose_columns(&up.grpc, &["history", "--wide"], 80).await?;
    assert!(wide.stdout.contains(&"x".repeat(150)), "{}", wide.stdout);
    let picked = interpose_columns(&up.grpc, &["history", "--columns", "seq,data"], 80).await?;
    let first = picked.stdout.lines().next().unwrap_or_default().to_string();
    assert_eq!(
        first.split_whitespace().collect::<Vec<_>>(),
        ["SEQ", "DATA"]
    );
    let bad = interpose(&up.grpc, &["history", "--columns", "seq,when"]).await?;
    assert!(!bad.ok);
    assert!(
        bad.stderr.starts_with(
            "interpose: unknown column \"when\": choose from conn,seq,dir,time,len,data"
        ),
        "{}",
        bad.stderr
    );
    Ok(())
}

#[tokio::test]
async fn up_takes_host_names_for_its_listen_addresses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(tests::bin("interpose"));
    cmd.args([
        "up",
        "--socks",
        "localhost:0",
        "--grpc",
        "localhost:0",
        "--data-dir",
    ])
    .arg(dir.path().join("data"));
    let up = tests::Proc::start(cmd, dir.path().join("up.log")).await?;
    assert!(up.addr("socks")?.ip().is_loopback(), "{}", up.ready);
    let grpc = up.field("grpc").unwrap_or_default();
    assert!(
        grpc.starts_with("http://127.0.0.1:") || grpc.starts_with("http://[::1]:"),
        "{grpc}"
    );
    Ok(())
}
