//! The web view's server, end to end: `interpose up` and `interpose web` as real processes,
//! driven with curl (HTTP/1.1, as a browser's fetch is): the page with its security headers,
//! the Host and Origin guards, and gRPC-web calls (a hand-built 5-byte-framed request, the
//! test's own client) forwarded to the real services, unary and streaming, with and without
//! the token, over records made by real curl traffic through the SOCKS port.

use std::{net::SocketAddr, path::Path, process::Stdio};

use anyhow::{Context, bail, ensure};
use prost::Message;
use proto::{
    common::Connection,
    registry::{
        ListConnectionsRequest, ListConnectionsResponse, WatchConnectionsRequest, WatchEvent,
        watch_event::Kind,
    },
};
use tests::{Proc, Up, WAIT, bin, eventually};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    process::Command,
};

type R = anyhow::Result<()>;

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
     frame-ancestors 'none'; form-action 'none'";

/// The page as committed (what the binary embeds).
const INDEX: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../web/ui/dist/index.html"
));

/// An HTTP answer as curl saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits curl's `-i` output (the last head, after any `100 Continue`) from the body.
fn parse_reply(out: &[u8]) -> anyhow::Result<Reply> {
    let mut rest = out;
    loop {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of the response head")?;
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .context("status line")?
            .parse()?;
        if status == 100 {
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        return Ok(Reply {
            status,
            headers,
            body: rest.to_vec(),
        });
    }
}

/// curl `url` (HTTP/1.1) with `args`, sending `body` (a POST) when given.
async fn curl(url: &str, args: &[&str], body: Option<Vec<u8>>) -> anyhow::Result<Reply> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--http1.1", "--max-time", "15"])
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]).stdin(Stdio::piped());
    } else {
        cmd.stdin(Stdio::null());
    }
    let mut child = cmd.spawn().context("spawning curl")?;
    if let Some(body) = body {
        let mut stdin = child.stdin.take().context("curl stdin")?;
        stdin.write_all(&body).await?;
        drop(stdin);
    }
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .context("curl did not finish in time")??;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_reply(&out.stdout)
}

/// A gRPC-web request body: one data frame (flag 0, big-endian length, the message).
fn frame(msg: &impl Message) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

/// The frames of a gRPC-web response body so far: the messages, and the trailers once the
/// trailer frame (flag 0x80) has come; `rest` is what a frame still lacks.
fn unframe(mut buf: &[u8]) -> anyhow::Result<(Vec<Vec<u8>>, Option<String>, usize)> {
    let mut messages = Vec::new();
    let mut trailers = None;
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let payload = &buf[5..5 + len];
        match buf[0] {
            0 => messages.push(payload.to_vec()),
            0x80 => trailers = Some(String::from_utf8_lossy(payload).into_owned()),
            flag => bail!("unexpected gRPC-web frame flag {flag:#x}"),
        }
        buf = &buf[5 + len..];
    }
    Ok((messages, trailers, buf.len()))
}

/// The `grpc-status` of a gRPC-web answer: in its head (trailers-only) or its trailer frame.
fn grpc_status(reply: &Reply) -> anyhow::Result<(u32, String)> {
    let from_trailers = |t: &str| -> Option<(u32, String)> {
        let mut code = None;
        let mut message = String::new();
        for line in t.split("\r\n") {
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "grpc-status" => code = v.trim().parse().ok(),
                    "grpc-message" => message = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        code.map(|c| (c, message))
    };
    if let Some(code) = reply.header("grpc-status") {
        return Ok((
            code.parse()?,
            reply.header("grpc-message").unwrap_or_default().to_string(),
        ));
    }
    let (_, trailers, _) = unframe(&reply.body)?;
    trailers
        .as_deref()
        .and_then(from_trailers)
        .context("no grpc-status in the answer")
}

/// A unary gRPC-web call (`application/grpc-web+proto`) through the web view at `base`
/// (`http://IP:PORT`), with `token` when given.
async fn call<Res: Message + Default>(
    base: &str,
    method: &str,
    req: &impl Message,
    token: Option<&str>,
) -> anyhow::Result<Result<Res, (u32, String)>> {
    let auth = token.map(|t| format!("authorization: Bearer {t}"));
    let mut args = vec![
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "x-grpc-web: 1",
    ];
    if let Some(a) = &auth {
        args.extend(["-H", a.as_str()]);
    }
    let reply = curl(&format!("{base}{method}"), &args, Some(frame(req))).await?;
    ensure!(reply.status == 200, "HTTP {}: {reply:?}", reply.status);
    assert_eq!(
        reply.header("content-type"),
        Some("application/grpc-web+proto")
    );
    let (code, message) = grpc_status(&reply)?;
    if code != 0 {
        return Ok(Err((code, message)));
    }
    let (messages, _, _) = unframe(&reply.body)?;
    ensure!(messages.len() == 1, "{} messages", messages.len());
    Ok(Ok(Res::decode(messages[0].as_slice())?))
}

/// `http://IP:PORT` of a `web=` or `url=` URL.
fn base_of(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    format!("http://{}", rest.split('/').next().unwrap_or_default())
}

/// A one-shot HTTP server answering every request with `body`, for curl to fetch through
/// the SOCKS port.
async fn http_server(body: &'static str) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// The bytes [`http_server`] answers with `body`.
fn response_len(body: &str) -> u64 {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    (head.len() + body.len()) as u64
}

/// curl through `up`'s SOCKS port to `target`.
async fn curl_through(up: &Up, target: SocketAddr) -> R {
    let socks = up.proc.field("socks").context("socks=")?;
    let out = tokio::time::timeout(
        WAIT,
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--socks5-hostname", &socks])
            .arg(format!("http://localhost:{}/", target.port()))
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    ensure!(
        out.status.success(),
        "curl through SOCKS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The listening TCP sockets a process owns (from /proc: its socket inodes in state LISTEN).
fn listening_sockets(pid: u32) -> anyhow::Result<usize> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(link) = std::fs::read_link(fd?.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(i) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(i.to_string());
            }
        }
    }
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Column 3 is the state (0A: LISTEN), column 9 the inode.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[tokio::test]
async fn up_serves_the_page_with_its_security_headers() -> R {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let token = tests::token(&up.grpc).context("up's token")?;
    // web= is the last field, and carries the token once, in the fragment.
    let last = up.proc.ready.split_whitespace().last().unwrap_or_default();
    let url = last.strip_prefix("web=").context("web= last")?;
    let base = base_of(url);
    assert!(base.starts_with("http://127.0.0.1:"), "{url}");
    assert_eq!(url, format!("{base}/#token={token}"));

    for path in ["/", "/index.html"] {
        let page = curl(&format!("{base}{path}"), &[], None).await?;
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(page.body, INDEX, "{path}");
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("cache-control"), Some("no-cache"));
        assert_eq!(page.header("content-security-policy"), Some(CSP));
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
        assert_eq!(page.header("set-cookie"), None);
        assert_eq!(page.header("access-control-allow-origin"), None);
    }
    // Every hashed file the page loads is served as it was built, cached for good.
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/ui/dist/assets");
    if assets.is_dir() {
        for entry in std::fs::read_dir(&assets)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let file = curl(&format!("{base}/assets/{name}"), &[], None).await?;
            assert_eq!(file.status, 200, "{name}");
            assert_eq!(file.body, std::fs::read(&path)?, "{name}");
            assert_eq!(
                file.header("cache-control"),
                Some("public, max-age=31536000, immutable"),
                "{name}"
            );
            if name.ends_with(".js") {
                assert_eq!(
                    file.header("content-type"),
                    Some("text/javascript; charset=utf-8")
                );
            }
            assert_eq!(file.header("content-security-policy"), Some(CSP));
        }
    }
    let missing = curl(&format!("{base}/nope.js"), &[], None).await?;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("content-security-policy"), Some(CSP));
    Ok(())
}

#[tokio::test]
async fn a_foreign_host_or_origin_is_refused() -> R {
    let dir = tempfile::tempdir()?;
    let up = Up::start(
        &dir.path().join("data"),
        &["--web-allow-host", "lab.example"],
    )
    .await?;
    let base = base_of(&up.proc.field("web").context("web=")?);
    let port = base.rsplit(':').next().unwrap_or_default().to_string();

    // DNS rebinding: evil.example resolved to 127.0.0.1 still says Host: evil.example.
    let evil = format!("Host: evil.example:{port}");
    let refused = curl(&format!("{base}/"), &["-H", &evil], None).await?;
    assert_eq!(refused.status, 421);
    let body = String::from_utf8_lossy(&refused.body);
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(body.contains("evil.example"), "{body}");
    assert_ne!(refused.body, INDEX);
    let wrong_port = curl(&format!("{base}/"), &["-H", "Host: 127.0.0.1:1"], None).await?;
    assert_eq!(wrong_port.status, 421);
    for ok in [format!("localhost:{port}"), format!("lab.example:{port}")] {
        let page = curl(&format!("{base}/"), &["-H", &format!("Host: {ok}")], None).await?;
        assert_eq!(page.status, 200, "{ok}");
    }

    // A call from another origin is refused before it reaches a service; no CORS at all.
    let req = frame(&ListConnectionsRequest::default());
    let method = format!("{base}/interpose.registry.v1.Registry/ListConnections");
    let ct = "content-type: application/grpc-web+proto";
    let cross = curl(
        &method,
        &["-H", ct, "-H", "Origin: http://evil.example"],
        Some(req.clone()),
    )
    .await?;
    assert_eq!(cross.status, 403);
    assert_eq!(cross.header("access-control-allow-origin"), None);
    let site = curl(
        &method,
        &["-H", ct, "-H", "Sec-Fetch-Site: cross-site"],
        Some(req.clone()),
    )
    .await?;
    assert_eq!(site.status, 403);
    let preflight = curl(
        &method,
        &["-X", "OPTIONS", "-H", "Origin: http://evil.example"],
        None,
    )
    .await?;
    assert_eq!(preflight.status, 405);
    assert_eq!(preflight.header("access-control-allow-origin"), None);
    // The page's own origin is let through (to the service, which wants the token).
    let own = format!("Origin: {base}");
    let same = curl(&method, &["-H", ct, "-H", &own], Some(req)).await?;
    assert_eq!(same.status, 200);
    assert_eq!(
        grpc_status(&same)?.0,
        16,
        "UNAUTHENTICATED without the token"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_web_calls_need_the_token_and_list_real_traffic() -> R {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let token = tests::token(&up.grpc).context("up's token")?;
    let base = base_of(&up.proc.field("web").context("web=")?);
    let target = http_server("through the web view").await?;
    curl_through(&up, target).await?;
    curl_through(&up, target).await?;

    let method = "/interpose.registry.v1.Registry/ListConnections";
    let req = ListConnectionsRequest::default();
    let (code, message) = call::<ListConnectionsResponse>(&base, method, &req, None)
        .await?
        .expect_err("no token");
    assert_eq!(code, 16, "UNAUTHENTICATED: {message}");
    let (code, _) = call::<ListConnectionsResponse>(&base, method, &req, Some("wrong"))
        .await?
        .expect_err("wrong token");
    assert_eq!(code, 16);

    let conns: Vec<Connection> = eventually("both closed records", || async {
        let list = call::<ListConnectionsResponse>(&base, method, &req, Some(&token))
            .await?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .connections;
        let done = list.len() == 2 && list.iter().all(|c| c.status == 2);
        Ok(done.then_some(list))
    })
    .await?;
    for c in &conns {
        assert_eq!(c.dst_port, u32::from(target.port()), "{c:?}");
        assert_eq!(c.dst_host, "localhost");
        assert_eq!(c.bytes_s2c, response_len("through the web view"), "{c:?}");
    }
    // The same records as any gRPC client gets.
    let mut grpc = tests::registry_client(&up.grpc, None).await?;
    let direct = grpc
        .list_connections(ListConnectionsRequest::default())
        .await?
        .into_inner()
        .connections;
    assert_eq!(direct, conns);

    // The text encoding (base64) of gRPC-web works the same way.
    let body = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, frame(&req));
    let auth = format!("authorization: Bearer {token}");
    let reply = curl(
        &format!("{base}{method}"),
        &[
            "-H",
            "content-type: application/grpc-web-text",
            "-H",
            "accept: application/grpc-web-text",
            "-H",
            &auth,
        ],
        Some(body.into_bytes()),
    )
    .await?;
    assert_eq!(
        reply.header("content-type"),
        Some("application/grpc-web-text+proto")
    );
    // Each frame is base64 on its own; every piece is a whole number of 4-character groups.
    let text = reply.body.trim_ascii();
    let mut raw = Vec::new();
    for group in text.chunks(4) {
        raw.extend(base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            group,
        )?);
    }
    let (messages, trailers, _) = unframe(&raw)?;
    assert!(trailers.unwrap_or_default().contains("grpc-status:0"));
    assert_eq!(
        ListConnectionsResponse::decode(messages.first().context("a message")?.as_slice())?
            .connections,
        conns
    );

    // Methods only proxies call are not forwarded.
    let (code, _) = call::<ListConnectionsResponse>(
        &base,
        "/interpose.registry.v1.Registry/LeaseIds",
        &req,
        Some(&token),
    )
    .await?
    .expect_err("a proxy's method");
    assert_eq!(code, 7, "PERMISSION_DENIED");
    Ok(())
}

#[tokio::test]
async fn watch_connections_streams_through_grpc_web() -> R {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let token = tests::token(&up.grpc).context("up's token")?;
    let base = base_of(&up.proc.field("web").context("web=")?);

    let mut watch = Command::new("curl")
        .args(["-sS", "-N", "--http1.1", "--max-time", "60"])
        .args(["-H", "content-type: application/grpc-web+proto"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args(["--data-binary", "@-", "-o", "-"])
        .arg(format!(
            "{base}/interpose.registry.v1.Registry/WatchConnections"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = watch.stdin.take().context("stdin")?;
    stdin
        .write_all(&frame(&WatchConnectionsRequest::default()))
        .await?;
    drop(stdin);
    let mut out = watch.stdout.take().context("stdout")?;
    let mut buf = Vec::new();
    // Reads until `done` says so on the events so far (the stream stays open throughout).
    async fn read_until(
        out: &mut tokio::process::ChildStdout,
        buf: &mut Vec<u8>,
        done: impl Fn(&[WatchEvent]) -> bool,
    ) -> anyhow::Result<Vec<WatchEvent>> {
        tokio::time::timeout(WAIT, async {
            loop {
                let (messages, trailers, _) = unframe(buf)?;
                let events = messages
                    .iter()
                    .map(|m| WatchEvent::decode(m.as_slice()))
                    .collect::<Result<Vec<_>, _>>()?;
                if done(&events) {
                    return Ok(events);
                }
                ensure!(trailers.is_none(), "the stream ended: {trailers:?}");
                let mut chunk = [0u8; 4096];
                let n = out.read(&mut chunk).await?;
                ensure!(n > 0, "curl's output ended");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .context("no such event in time")?
    }
    // The (empty) snapshot arrives while the call is open: nothing is held back.
    read_until(&mut out, &mut buf, |e| {
        e.iter().any(|e| e.kind == Kind::SnapshotEnd as i32)
    })
    .await?;

    let target = http_server("watched").await?;
    curl_through(&up, target).await?;
    let port = u32::from(target.port());
    let events = read_until(&mut out, &mut buf, |e| {
        e.iter().any(|e| {
            e.connection
                .as_ref()
                .is_some_and(|c| c.dst_port == port && c.status == 2)
        })
    })
    .await?;
    let upserts: Vec<&Connection> = events
        .iter()
        .filter(|e| e.kind == Kind::Upsert as i32)
        .filter_map(|e| e.connection.as_ref())
        .collect();
    assert!(upserts.iter().all(|c| c.dst_port == port), "{upserts:?}");
    assert!(
        upserts.iter().any(|c| c.status == 1),
        "seen active: {upserts:?}"
    );
    let _ = watch.kill().await;
    Ok(())
}

#[tokio::test]
async fn interpose_web_serves_a_separate_up_and_no_web_serves_nothing() -> R {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &["--no-web"]).await?;
    assert_eq!(up.proc.field("web"), None, "{}", up.proc.ready);
    let pid = up.proc.pid().context("pid")?;
    assert_eq!(listening_sockets(pid)?, 2, "SOCKS and gRPC only");
    let token = tests::token(&up.grpc).context("up's token")?;
    let token_file = tests::token_file(&up.grpc).context("token file")?;

    // A registry URL that refuses connections first: the web view fails over to up's.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        format!("http://{}", l.local_addr()?)
    };
    let mut cmd = Command::new(bin("interpose"));
    cmd.args(["web", "--listen", "127.0.0.1:0", "--registry"])
        .arg(format!("{dead},{}", up.grpc))
        .args([
            "--intercept",
            &up.grpc,
            "--export",
            &up.grpc,
            "--ca",
            &up.grpc,
        ])
        .arg("--token-file")
        .arg(&token_file)
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_SERVER");
    let web = Proc::start(cmd, dir.path().join("web.log")).await?;
    assert!(
        web.ready.starts_with("ready web listen=127.0.0.1:"),
        "{}",
        web.ready
    );
    let listen = web.addr("listen")?;
    let url = web.field("url").context("url=")?;
    assert_eq!(url, format!("http://{listen}/#token={token}"));
    let base = base_of(&url);

    let page = curl(&format!("{base}/"), &[], None).await?;
    assert_eq!((page.status, page.body.as_slice()), (200, INDEX));
    assert_eq!(page.header("content-security-policy"), Some(CSP));

    let target = http_server("lab").await?;
    curl_through(&up, target).await?;
    let method = "/interpose.registry.v1.Registry/ListConnections";
    let req = ListConnectionsRequest::default();
    let list = eventually("the record through interpose web", || async {
        let list = call::<ListConnectionsResponse>(&base, method, &req, Some(&token))
            .await?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .connections;
        Ok((!list.is_empty()).then_some(list))
    })
    .await?;
    assert_eq!(list[0].dst_port, u32::from(target.port()));
    let (code, _) = call::<ListConnectionsResponse>(&base, method, &req, None)
        .await?
        .expect_err("no token");
    assert_eq!(
        code, 16,
        "UNAUTHENTICATED, not a failover to the dead replica"
    );
    // ...nor does such a call move the web view off the working replica.
    let again = call::<ListConnectionsResponse>(&base, method, &req, Some(&token))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(again.connections.first().map(|c| c.id), Some(list[0].id));
    // The CA service.
    let ca = call::<proto::ca::CaCertificate>(
        &base,
        "/interpose.ca.v1.CertificateAuthority/GetCaCertificate",
        &proto::ca::GetCaCertificateRequest::default(),
        Some(&token),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let pem = std::fs::read_to_string(up.proc.field("ca").context("ca=")?)?;
    assert!(pem.contains(ca.pem.trim()), "the CA up uses");

    ensure!(
        web.terminate().await?,
        "interpose web exits cleanly on SIGTERM"
    );
    Ok(())
}

#[tokio::test]
async fn up_refuses_a_second_web_view_on_a_taken_address() -> R {
    let dir = tempfile::tempdir()?;
    let taken = TcpListener::bind("127.0.0.1:0").await?;
    let addr = taken.local_addr()?.to_string();
    let out = tokio::time::timeout(
        WAIT,
        Command::new(bin("interpose"))
            .args([
                "up",
                "--socks",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--web",
                &addr,
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("INTERPOSE_TOKEN")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("binding the web view on {addr}")) && err.contains("--no-web"),
        "{err}"
    );
    Ok(())
}
