//! The web view in a real browser: `interpose up --web` as a real process, real traffic
//! through its SOCKS port (curl, plain and TLS, and raw sockets for holds), and Debian's
//! chromium driven by playwright-core (web/ui/tests/page.mjs) checking what the page shows
//! and does: live rows and their closers, Copy as TSV, clears, history search, intercept
//! (status, edit, forward, drop, a closed connection's packet), export read by tshark, the
//! CA, and no data without the token.
//!
//! Needs node, /usr/bin/chromium (or `$INTERPOSE_CHROMIUM`) and tshark; `npm ci` runs in
//! web/ui when its node_modules is missing. A missing tool fails the test unless
//! `INTERPOSE_TEST_SKIP_MISSING_TOOLS=1` is set. With `INTERPOSE_UPDATE_SCREENSHOTS=1` the
//! screenshots of the three tabs are written to docs/screenshots/ (else under the target
//! folder), so that a test run leaves the working tree as it was.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use proto::common::{CloseKind, ClosedBy};
use proxy_core::socks5::Addr;
use serde_json::{Value, json};
use tests::{
    Up, WAIT,
    browser::{Page, tools},
    eventually, interpose_ok,
    proxy::{Server, echo_server, history, read_to_end},
    registry_client,
    tls::{Pki, proxy_ca, serve, socks, through, wait_record},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
};

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A one-shot HTTP server on loopback: answers every request with `body` and closes first
/// (no Content-Length, so the client reads to the end: the server's FIN comes first).
async fn http_server(
    body: &'static str,
    tls: Option<&Pki>,
) -> anyhow::Result<std::net::SocketAddr> {
    async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        s: &mut S,
        body: &str,
    ) -> anyhow::Result<()> {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                bail!("the client closed before its request ended");
            }
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}").as_bytes())
            .await?;
        s.shutdown().await?;
        Ok(())
    }
    match tls {
        None => serve(move |mut s| async move { answer(&mut s, body).await }).await,
        Some(pki) => {
            let acceptor = pki.acceptor(&[b"http/1.1"])?;
            serve(move |s| {
                let acceptor = acceptor.clone();
                async move {
                    let mut s = acceptor.accept(s).await?;
                    answer(&mut s, body).await
                }
            })
            .await
        }
    }
}

/// curl through the SOCKS port; its stdout.
async fn curl(up: &Up, args: &[&str]) -> anyhow::Result<String> {
    let socks = socks(up)?.to_string();
    let out = tokio::time::timeout(
        WAIT,
        Command::new("curl")
            .args(["-sS", "--max-time", "15", "--socks5-hostname", &socks])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("curl timed out")??;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `probe` over a connection the proxy relays to `srv` until one does not arrive
/// within 300 ms: the proxy now holds packets (it follows intercept settings over a stream,
/// so not at once). Bounded by [`WAIT`].
async fn probe_until_held(
    client: &mut tokio::net::TcpStream,
    srv: &mut tokio::net::TcpStream,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    loop {
        client.write_all(b"probe").await?;
        match tokio::time::timeout(Duration::from_millis(300), srv.read(&mut buf)).await {
            Ok(n) => ensure!(n? > 0, "the server saw the connection close"),
            Err(_) => return Ok(()),
        }
        ensure!(start.elapsed() < WAIT, "the proxy never held a packet");
    }
}

/// Reads exactly `n` bytes (bounded).
async fn read_n(s: &mut tokio::net::TcpStream, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut v))
        .await
        .context("the server did not receive the bytes")??;
    Ok(v)
}

/// Where the screenshots go (see the module doc).
fn screenshot_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let dir = if std::env::var("INTERPOSE_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots")
    } else {
        out.join("screenshots")
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn tshark(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        WAIT,
        Command::new("tshark")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("tshark timed out")??;
    ensure!(
        out.status.success(),
        "tshark {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_does_the_connection_tab_workflow_in_chromium() -> anyhow::Result<()> {
    let Some(chromium) = tools()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let pki = Pki::new("web test upstream CA")?;
    let up = Up::start(
        &dir.path().join("data"),
        &["--web", "127.0.0.1:0", "--upstream-ca", &pki.ca_arg()],
    )
    .await?;
    let web = up.proc.field("web").context("web= in the ready line")?;
    let last = up.proc.ready.split_whitespace().last().unwrap_or_default();
    ensure!(
        last.starts_with("web="),
        "web= is not the last field: {}",
        up.proc.ready
    );
    let (origin, token) = web
        .split_once("/#token=")
        .with_context(|| format!("web= has no #token=: {web}"))?;
    ensure!(origin.starts_with("http://127.0.0.1:"), "{web}");
    ensure!(
        Some(token.to_string()) == tests::token(&up.grpc),
        "the URL's token is not the API token"
    );
    let out = dir.path().join("browser");
    std::fs::create_dir_all(&out)?;
    let shots = screenshot_dir(&out)?;
    let mut page = Page::start(&chromium, &out).await?;
    let result = workflow(&mut page, &up, &pki, origin, &web, token, &out, &shots).await;
    let hygiene = page.call("hygiene", Value::Null).await;
    page.quit().await?;
    result?;
    let hygiene = hygiene?;
    ensure!(
        hygiene["foreign"].as_array().is_some_and(|a| a.is_empty()),
        "the page made requests to other origins: {hygiene}"
    );
    let csp: Vec<String> = strs(&hygiene["consoleErrors"])
        .into_iter()
        .filter(|e| e.contains("Content Security Policy"))
        .collect();
    ensure!(csp.is_empty(), "CSP violations: {csp:?}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn workflow(
    page: &mut Page,
    up: &Up,
    pki: &Pki,
    origin: &str,
    web: &str,
    token: &str,
    out: &Path,
    shots: &Path,
) -> anyhow::Result<()> {
    // No token, no data: the login form, and a wrong token is refused.
    page.call("open", json!({"url": format!("{origin}/")}))
        .await?;
    let login = page.call("loginShown", Value::Null).await?;
    ensure!(login["rows"] == 0, "rows without a token: {login}");
    page.call("login", json!({"token": "not-the-token"}))
        .await?;
    let err = page.call("loginError", Value::Null).await?;
    let err = err.as_str().unwrap_or_default();
    ensure!(err.contains("not accepted"), "{err}");

    // With the URL the ready line printed: the token leaves the address bar.
    page.call("open", json!({"url": web})).await?;
    let now = page.call("url", Value::Null).await?;
    ensure!(
        !now.as_str().unwrap_or_default().contains(token),
        "the token stayed in the address bar: {now}"
    );

    // A raw connection appears live as active, then disconnected, closed by the client.
    let echo = echo_server().await?;
    let (mut client, port) = through(up, Addr::Ip(echo)).await?;
    client.write_all(b"hello-live").await?;
    let mut back = [0u8; 10];
    tokio::time::timeout(WAIT, client.read_exact(&mut back)).await??;
    let rec = wait_record(up, "of the raw connection", |c| {
        c.src_port == u32::from(port)
    })
    .await?;
    let live = rec.id.to_string();
    let cells = page
        .call("waitRow", json!({"id": live, "status": "active"}))
        .await?;
    ensure!(strs(&cells)[1] == port.to_string(), "{cells}");
    drop(client);
    page.call(
        "waitRow",
        json!({"id": live, "status": "disconnected (client, fin)"}),
    )
    .await?;

    // curl, plain: the server closes first.
    let plain = http_server("plain-body", None).await?;
    let body = curl(up, &[&format!("http://127.0.0.1:{}/x", plain.port())]).await?;
    ensure!(body == "plain-body", "{body}");
    let rec = wait_record(up, "of curl plain", |c| {
        c.dst_port == u32::from(plain.port())
    })
    .await?;
    let plain_id = rec.id.to_string();
    let cells = page
        .call(
            "waitRow",
            json!({"id": plain_id, "status": "disconnected (server, fin)"}),
        )
        .await?;
    ensure!(strs(&cells)[2] == plain.port().to_string(), "{cells}");

    // curl over TLS with the Interpose CA: SNI shows, the record closes.
    let tls = http_server("tls-body", Some(pki)).await?;
    let ca = proxy_ca(up)?;
    let body = curl(
        up,
        &[
            "--cacert",
            &ca.display().to_string(),
            &format!("https://localhost:{}/y", tls.port()),
        ],
    )
    .await?;
    ensure!(body == "tls-body", "{body}");
    let rec = wait_record(up, "of curl TLS, closed", |c| {
        c.dst_port == u32::from(tls.port()) && c.status == 2
    })
    .await?;
    let tls_id = rec.id.to_string();
    let tls_status = format!(
        "disconnected ({}, {})",
        ["", "client", "server", "proxy"][rec.closed_by as usize],
        ["", "fin", "rst", "error"][rec.close_kind as usize]
    );
    let cells = page
        .call("waitRow", json!({"id": tls_id, "status": tls_status}))
        .await?;
    ensure!(
        strs(&cells)[4] == "localhost" && strs(&cells)[5] == "localhost",
        "{cells}"
    );

    // The counts by status cover every record.
    page.call(
        "waitCounts",
        json!({"text": "total 3 · active 0 · disconnected 3"}),
    )
    .await?;

    // Selection by keyboard, then Copy: the clipboard holds `interpose conns copy`'s TSV.
    page.call("select", json!({"ids": [live], "modifier": "Control"}))
        .await?;
    let sel = page
        .call("keys", json!({"keys": ["Shift+ArrowDown"]}))
        .await?;
    ensure!(strs(&sel) == [live.clone(), plain_id.clone()], "{sel}");
    let sel = page
        .call(
            "select",
            json!({"ids": [live, tls_id], "modifier": "Control"}),
        )
        .await?;
    ensure!(strs(&sel) == [live.clone(), tls_id.clone()], "{sel}");
    page.call("menu", json!({"id": live, "item": "Copy"}))
        .await?;
    let clip = page.call("clipboard", Value::Null).await?;
    let cli = interpose_ok(&up.grpc, &["conns", "copy", &live, &tls_id]).await?;
    ensure!(clip == cli.as_str(), "clipboard {clip:?} != CLI {cli:?}");
    page.call("screenshot", json!({"path": shots.join("connections.png")}))
        .await?;

    // History: the connection's exact bytes; a contents search; the ID links back. The
    // registry has them first (the page reads what it has).
    let client = registry_client(&up.grpc, None).await?;
    for id in [&live, &plain_id, &tls_id] {
        let id: u64 = id.parse()?;
        eventually("the history of the three connections", || {
            let mut client = client.clone();
            async move { Ok((history(&mut client, id).await?.len() >= 2).then_some(())) }
        })
        .await?;
    }
    page.call("tab", json!({"name": "history"})).await?;
    let rows = page.call("historySearch", json!({"conn": live})).await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    ensure!(rows.len() == 2, "history of {live}: {rows:?}");
    let pk = page
        .call("packet", json!({"conn": live, "seq": "1"}))
        .await?;
    ensure!(pk["sent"] == hex(b"hello-live"), "{pk}");
    let rows = page
        .call("historySearch", json!({"contains": "plain-body"}))
        .await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    ensure!(
        rows.len() == 1 && rows[0]["conn"] == plain_id.as_str(),
        "{rows:?}"
    );
    let rows = page
        .call(
            "historySearch",
            json!({"contains": hex(b"tls-body"), "hex": true, "direction": 2}),
        )
        .await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    ensure!(
        rows.len() == 1 && rows[0]["conn"] == tls_id.as_str(),
        "{rows:?}"
    );
    let sel = page.call("followLink", json!({"conn": tls_id})).await?;
    ensure!(strs(&sel) == [tls_id.clone()], "{sel}");

    // Intercept, turned on in the page: a held packet shows its connection's status, is
    // edited and forwarded; another is dropped; a closed connection's cannot be forwarded.
    let server = Server::bind().await?;
    page.call(
        "setIntercept",
        json!({"enabled": true, "ports": server.addr.port().to_string(), "direction": 1}),
    )
    .await?;
    let (mut client, port) = through(up, Addr::Ip(server.addr)).await?;
    let mut srv = server.accept().await?;
    probe_until_held(&mut client, &mut srv).await?;
    let rec = wait_record(up, "of the held connection", |c| {
        c.src_port == u32::from(port)
    })
    .await?;
    let held = rec.id.to_string();
    page.call("waitHeld", json!({"conn": held, "status": "active"}))
        .await?;
    let st = page.call("pickHeld", json!({"conn": held})).await?;
    ensure!(st["text"] == "probe", "{st}");
    page.call("actHeld", json!({"button": "forward"})).await?;
    ensure!(read_n(&mut srv, 5).await? == b"probe");
    page.call("waitHeldGone", json!({"conn": held})).await?;

    client.write_all(b"hello-hold").await?;
    page.call("waitHeld", json!({"conn": held, "status": "active"}))
        .await?;
    let st = page.call("pickHeld", json!({"conn": held})).await?;
    ensure!(
        st["text"] == "hello-hold" && st["forwardDisabled"] == false,
        "{st}"
    );
    page.call("screenshot", json!({"path": shots.join("intercept.png")}))
        .await?;
    page.call(
        "actHeld",
        json!({"text": "HELLO-EDITED!", "button": "forward-edited"}),
    )
    .await?;
    ensure!(read_n(&mut srv, 13).await? == b"HELLO-EDITED!");
    page.call("waitHeldGone", json!({"conn": held})).await?;

    // Drop with the D key; the next packet (forwarded with F) is the first the server sees.
    client.write_all(b"drop-me").await?;
    page.call("waitHeld", json!({"conn": held, "status": "active"}))
        .await?;
    let st = page.call("pickHeld", json!({"conn": held})).await?;
    ensure!(st["text"] == "drop-me", "{st}");
    page.call("actHeld", json!({"key": "d"})).await?;
    page.call("waitHeldGone", json!({"conn": held})).await?;
    client.write_all(b"after-drop").await?;
    page.call("waitHeld", json!({"conn": held, "status": "active"}))
        .await?;
    let st = page.call("pickHeld", json!({"conn": held})).await?;
    ensure!(st["text"] == "after-drop", "{st}");
    page.call("actHeld", json!({"key": "f"})).await?;
    ensure!(read_n(&mut srv, 10).await? == b"after-drop");

    // The server closes while a packet is held: the page says so and will not forward it.
    client.write_all(b"QUIT\r\n").await?;
    page.call("waitHeld", json!({"conn": held, "status": "active"}))
        .await?;
    srv.write_all(b"421 closing\r\n").await?;
    drop(srv);
    ensure!(read_to_end(&mut client).await? == b"421 closing\r\n");
    drop(client);
    page.call(
        "waitHeld",
        json!({"conn": held, "status": "disconnected (closed by server"}),
    )
    .await?;
    let st = page.call("pickHeld", json!({"conn": held})).await?;
    ensure!(
        st["forwardDisabled"] == true && st["forwardEditedDisabled"] == true,
        "{st}"
    );
    ensure!(
        st["warning"]
            .as_str()
            .is_some_and(|w| w.contains("cannot be forwarded")),
        "{st}"
    );
    page.call("actHeld", json!({"button": "drop"})).await?;
    let note = page.call("interceptNote", Value::Null).await?;
    ensure!(
        note.as_str()
            .is_some_and(|n| n.contains("closed by the server")),
        "{note}"
    );
    page.call("waitHeldGone", json!({"conn": held})).await?;
    page.call("setIntercept", json!({"enabled": false})).await?;

    // The history shows what was received and what was sent for the edit and the drop.
    page.call("tab", json!({"name": "history"})).await?;
    let rows = page
        .call("historySearch", json!({"conn": held, "direction": 1}))
        .await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    let seq_of = |state: &str| {
        rows.iter()
            .find(|r| r["cells"][5] == state)
            .and_then(|r| r["seq"].as_str())
            .map(str::to_string)
    };
    let edited = seq_of("edited").with_context(|| format!("no edited packet in {rows:?}"))?;
    let pk = page
        .call("packet", json!({"conn": held, "seq": edited}))
        .await?;
    ensure!(
        pk["received"] == hex(b"hello-hold") && pk["sent"] == hex(b"HELLO-EDITED!"),
        "{pk}"
    );
    page.call("screenshot", json!({"path": shots.join("history.png")}))
        .await?;
    let dropped = seq_of("dropped").with_context(|| format!("no dropped packet in {rows:?}"))?;
    let pk = page
        .call("packet", json!({"conn": held, "seq": dropped}))
        .await?;
    ensure!(
        pk["received"] == hex(b"drop-me") && pk["sent"].is_null(),
        "{pk}"
    );

    // Export of the selection (PCAP), read by tshark: two TCP streams.
    page.call("tab", json!({"name": "connections"})).await?;
    page.call(
        "select",
        json!({"ids": [live, plain_id], "modifier": "Control"}),
    )
    .await?;
    page.call("menu", json!({"id": live, "item": "Export PCAP"}))
        .await?;
    let pcap = out.join("selection.pcap");
    let ex = page
        .call(
            "exportCapture",
            json!({"format": "pcap", "ports": "", "path": pcap}),
        )
        .await?;
    ensure!(ex["name"] == "interpose-2-connections.pcap", "{ex}");
    let streams = tshark(&[
        "-r",
        &pcap.display().to_string(),
        "-T",
        "fields",
        "-e",
        "tcp.stream",
    ])
    .await?;
    let mut streams: Vec<&str> = streams.lines().collect();
    streams.sort();
    streams.dedup();
    ensure!(streams == ["0", "1"], "{streams:?}");
    let payload = tshark(&[
        "-r",
        &pcap.display().to_string(),
        "-T",
        "fields",
        "-e",
        "tcp.payload",
        "-Y",
        "tcp.len > 0",
    ])
    .await?;
    ensure!(
        payload.contains(&hex(b"hello-live").replace(' ', "")),
        "{payload}"
    );

    // Clear Selected (the TLS record) with the seed's warning; it leaves the table and the
    // registry; an export of everything then writes it with the dummy server port 9.
    page.call("tab", json!({"name": "connections"})).await?;
    page.call("select", json!({"ids": [tls_id], "modifier": "Control"}))
        .await?;
    page.call("menu", json!({"id": tls_id, "item": "Clear Selected"}))
        .await?;
    let warning = page.call("confirmClear", Value::Null).await?;
    ensure!(
        warning.as_str().is_some_and(|w| w.contains("dummy")),
        "{warning}"
    );
    page.call("waitGone", json!({"ids": [tls_id]})).await?;
    let list = interpose_ok(&up.grpc, &["conns", "list", "--json"]).await?;
    let list: Value = serde_json::from_str(&list)?;
    ensure!(
        list.as_array()
            .is_some_and(|l| l.iter().all(|c| c["id"].as_u64() != tls_id.parse().ok())),
        "{list}"
    );
    let all = out.join("all.pcapng");
    page.call(
        "exportCapture",
        json!({"scope": "all", "format": "pcapng", "ports": "443:80", "path": all}),
    )
    .await?;
    let ports = tshark(&[
        "-r",
        &all.display().to_string(),
        "-T",
        "fields",
        "-e",
        "tcp.dstport",
        "-Y",
        "tcp.flags.syn == 1 && tcp.flags.ack == 0",
    ])
    .await?;
    let ports: Vec<&str> = ports.lines().collect();
    ensure!(ports.contains(&"9"), "no dummy port 9 among {ports:?}");
    ensure!(
        ports.contains(&plain.port().to_string().as_str()),
        "{ports:?}"
    );

    // The CA certificate's details.
    let ca_text = page.call("caText", Value::Null).await?;
    ensure!(
        ca_text.as_str().is_some_and(|t| t.contains("SHA-256")),
        "{ca_text}"
    );

    // Clear All: every row goes, and so does every record.
    page.call("tab", json!({"name": "connections"})).await?;
    page.call("menu", json!({"id": live, "item": "Clear All"}))
        .await?;
    page.call("confirmClear", Value::Null).await?;
    page.call("waitGone", json!({"ids": [live, plain_id, held]}))
        .await?;
    let list = interpose_ok(&up.grpc, &["conns", "list", "--json"]).await?;
    ensure!(serde_json::from_str::<Value>(&list)? == json!([]), "{list}");

    // A new tab without the token shows only the login form.
    page.call("newPage", Value::Null).await?;
    page.call("open", json!({"url": format!("{origin}/")}))
        .await?;
    let login = page.call("loginShown", Value::Null).await?;
    ensure!(login["rows"] == 0, "{login}");
    Ok(())
}

/// IDs far above what `up`'s own proxy leases, for records the test writes itself.
const BASE: u64 = 1 << 40;

/// The page opens at the registry's newest page of records and watches only those (and
/// newer), not every record: with 4,500 records it holds the newest 2,000, keeps them live,
/// and brings older pages on request, moving its watch down so they are live too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_opens_at_the_newest_records_and_loads_older_ones_on_request()
-> anyhow::Result<()> {
    let Some(chromium) = tools()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &["--web", "127.0.0.1:0"]).await?;
    let web = up.proc.field("web").context("web= in the ready line")?;
    let mut client = registry_client(&up.grpc, None).await?;
    let mut ingest = tests::Ingest::open(&mut client, "bench").await?;
    ingest
        .send_durable(
            (1..=4500)
                .map(|i| tests::events::open(BASE + i, 40000, "example.test", 443))
                .collect(),
        )
        .await?;
    let out = dir.path().join("browser");
    std::fs::create_dir_all(&out)?;
    let mut page = Page::start(&chromium, &out).await?;
    let result = async {
        page.call("open", json!({"url": web})).await?;
        let w = page.call("waitWindow", json!({"size": 2000})).await?;
        let id = |n: u64| (BASE + n).to_string();
        ensure!(w["first"] == id(2501) && w["last"] == id(4500), "{w}");
        ensure!(w["watchFrom"] == id(2501), "{w}");
        ensure!(w["older"] == true && w["button"] == true, "{w}");
        // A record in the window closes live; one below it is not held, so not sent.
        let close = |n: u64| {
            tests::events::close(
                BASE + n,
                ClosedBy::Server,
                CloseKind::Fin,
                "server sent FIN",
            )
        };
        ingest.send_durable(vec![close(100), close(4400)]).await?;
        page.call("waitStored", json!({"id": id(4400), "status": 2}))
            .await?;
        ensure!(page.call("stored", json!({"id": id(100)})).await? == false);
        // Older pages: 2,000, then the last 500; the watch moves down with them.
        page.call("loadOlder", Value::Null).await?;
        let w = page.call("waitWindow", json!({"size": 4000})).await?;
        ensure!(w["first"] == id(501) && w["watchFrom"] == id(501), "{w}");
        page.call("loadOlder", Value::Null).await?;
        let w = page.call("waitWindow", json!({"size": 4500})).await?;
        ensure!(w["watchFrom"] == "0" && w["older"] == false, "{w}");
        ensure!(
            w["button"] == false,
            "no button once everything is held: {w}"
        );
        page.call("waitStored", json!({"id": id(100), "status": 2}))
            .await?;
        // Now live from the bottom too.
        ingest.send_durable(vec![close(1)]).await?;
        page.call("waitStored", json!({"id": id(1), "status": 2}))
            .await?;
        anyhow::Ok(())
    }
    .await;
    page.quit().await?;
    result
}
