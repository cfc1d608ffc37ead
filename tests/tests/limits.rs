//! Resource bounds (issue 12): a cap on concurrent SOCKS connections with a clear refusal,
//! and gRPC connections that never send the HTTP/2 preface, never start a call, or sit idle
//! with no call in progress are closed.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use proto::common::{CloseKind, ClosedBy, ConnStatus};
use proxy_core::socks5::{Addr, Reply};
use tests::{
    Registry, Up, WAIT, eventually, interpose_json,
    proxy::{ProxyProc, Server, socks_connect, socks_connected, wait_conn_by_port},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

type R = anyhow::Result<()>;

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_recorded_and_served_again_later() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let proxy = ProxyProc::start(tmp.path(), &reg.url, "cap", &["--max-connections", "3"]).await?;
    let server = Server::bind().await?;

    let mut open = Vec::new();
    for _ in 0..3 {
        let c = socks_connected(proxy.socks, server.addr).await?;
        open.push((c, server.accept().await?));
    }
    // The fourth client is answered while all three are still open: general failure, not a
    // silent wait for a free slot.
    let r = socks_connect(proxy.socks, Addr::Ip(server.addr)).await?;
    assert_eq!(r.reply, Reply::GeneralFailure);
    let refused_port = r.stream.local_addr()?.port();

    // The relayed connections still work.
    for (c, s) in &mut open {
        c.write_all(b"hi").await?;
        let mut b = [0u8; 2];
        tokio::time::timeout(WAIT, s.read_exact(&mut b)).await??;
        assert_eq!(&b, b"hi");
    }

    // The refusal is a record closed by the proxy, naming the limit, and logged.
    let mut client = reg.client().await?;
    let c = wait_conn_by_port(&mut client, refused_port, "closed", |c| {
        c.status == ConnStatus::Disconnected as i32
    })
    .await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert_eq!(c.close_kind, CloseKind::Error as i32);
    assert_eq!(
        c.reason,
        "refused: connection limit 3 reached (--max-connections)"
    );
    assert_eq!(c.dst_port, u32::from(server.addr.port()));
    let log = proxy.proc.stderr();
    assert!(log.contains("connection limit reached"), "{log}");

    // Once a connection closes, a new client is served again.
    drop(open.pop());
    let c = eventually("a free connection slot", || async {
        let r = socks_connect(proxy.socks, Addr::Ip(server.addr)).await?;
        Ok((r.reply == Reply::Succeeded).then_some(r.stream))
    })
    .await?;
    drop(c);
    Ok(())
}

/// How long a test waits for a server to close a stalled connection: far beyond the
/// bounds (10 s), so a loaded machine is never mistaken for a missing close.
const CLOSE_WAIT: Duration = Duration::from_secs(60);

/// Reads `s` until EOF or an error; returns when that happened.
async fn closed_at(mut s: TcpStream) -> anyhow::Result<Instant> {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(CLOSE_WAIT, s.read(&mut buf)).await? {
            Ok(0) | Err(_) => return Ok(Instant::now()),
            Ok(_) => {}
        }
    }
}

/// The documented bound (`platform::preface::PREFACE_TIMEOUT`).
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP client that connects to `addr` and sends nothing: how long until it is closed.
async fn silent(addr: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let s = TcpStream::connect(addr).await?;
    Ok(closed_at(s).await? - start)
}

/// A client sending the HTTP/2 preface one byte a second: how long until it is closed, and
/// how many bytes it got to send.
async fn slowloris(addr: SocketAddr) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let s = TcpStream::connect(addr).await?;
    let (r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut r = r;
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(CLOSE_WAIT, r.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    });
    let mut sent = 0;
    for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        if reader.is_finished() || w.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let closed = reader.await?.context("the slow client was never closed")?;
    Ok((closed - start, sent))
}

#[tokio::test]
async fn grpc_connections_without_a_preface_are_closed_and_normal_clients_are_not() -> R {
    let tmp = tempfile::tempdir()?;
    let up = Up::start(&tmp.path().join("up"), &[]).await?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let up_addr: SocketAddr = up.grpc.trim_start_matches("http://").parse()?;
    let reg_addr = reg.proc.addr("listen")?;

    // A watch opened now must outlive the bound: only the preface is timed.
    let mut watcher = reg.client().await?;
    let mut watch = watcher
        .watch_connections(proto::registry::WatchConnectionsRequest::default())
        .await?
        .into_inner();

    let stalls = async {
        tokio::try_join!(
            silent(up_addr),
            silent(reg_addr),
            slowloris(up_addr),
            slowloris(reg_addr)
        )
    };
    let normal = async {
        // Meanwhile the CLI works as usual.
        tokio::time::sleep(Duration::from_secs(3)).await;
        interpose_json(&up.grpc, &["conns", "list", "--json"]).await
    };
    let (stalls, listed) = tokio::join!(stalls, normal);
    let (a, b, (c, c_sent), (d, d_sent)) = stalls?;
    assert!(listed?.is_array());
    // Closed, and never before the bound (how long after it is the machine's business).
    for t in [a, b, c, d] {
        assert!(t >= PREFACE_TIMEOUT - Duration::from_millis(500), "{t:?}");
    }
    for sent in [c_sent, d_sent] {
        assert!(sent < 24, "the whole preface went through: {sent}");
    }

    watch_still_delivers(&reg, &mut watch, 9).await
}

/// The documented bound on a connection's first call (`platform::accept::FIRST_CALL_TIMEOUT`).
const FIRST_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that sends the whole HTTP/2 preface and an empty SETTINGS frame, then nothing:
/// how long until it is closed.
async fn preface_only(addr: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
    Ok(closed_at(s).await? - start)
}

/// An HTTP/2 client that makes one gRPC call (a health check) and then stays silent: how
/// long after its call ended the connection is closed.
async fn idle_after_one_call(addr: SocketAddr, token: Option<String>) -> anyhow::Result<Duration> {
    let tcp = TcpStream::connect(addr).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    let closed = tokio::spawn(async move {
        tokio::time::timeout(CLOSE_WAIT, conn)
            .await
            .map(|_| Instant::now())
            .map_err(|_| anyhow::anyhow!("the idle connection was never closed"))
    });
    let mut send = send.ready().await?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let (response, mut body) = send.send_request(req.body(())?, false)?;
    // One empty HealthCheckRequest: no compression, length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let response = tokio::time::timeout(WAIT, response).await??;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk?;
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    let ended = Instant::now();
    Ok(closed.await?? - ended)
}

#[tokio::test]
async fn grpc_connections_without_a_call_or_idle_are_closed_and_streams_are_not() -> R {
    let tmp = tempfile::tempdir()?;
    let idle = Duration::from_secs(3);
    let reg = Registry::start_with(
        &tmp.path().join("reg"),
        "127.0.0.1:0",
        &["--grpc-idle-timeout", "3s"],
    )
    .await?;
    let up = Up::start(&tmp.path().join("up"), &[]).await?;
    let reg_addr = reg.proc.addr("listen")?;
    let up_addr: SocketAddr = up.grpc.trim_start_matches("http://").parse()?;

    // A watch opened now stays open past both bounds: a call in progress is not idle.
    let mut watcher = reg.client().await?;
    let mut watch = watcher
        .watch_connections(proto::registry::WatchConnectionsRequest::default())
        .await?
        .into_inner();

    let stalls = async {
        tokio::try_join!(
            preface_only(reg_addr),
            preface_only(up_addr),
            idle_after_one_call(reg_addr, tests::token(&reg.url)),
        )
    };
    let normal = async {
        // Meanwhile the CLI works as usual, on connections of its own.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let listed = interpose_json(&reg.url, &["conns", "list", "--json"]).await?;
        let stats = interpose_json(&up.grpc, &["conns", "stats", "--json"]).await?;
        anyhow::Ok((listed, stats))
    };
    let (stalls, normal) = tokio::join!(stalls, normal);
    let (a, b, after_call) = stalls?;
    let (listed, stats) = normal?;
    assert!(listed.is_array() && stats.is_object());
    // Closed, and never before their bounds (how long after is the machine's business).
    for t in [a, b] {
        assert!(
            t >= FIRST_CALL_TIMEOUT - Duration::from_millis(500),
            "{t:?}"
        );
    }
    assert!(
        after_call >= idle - Duration::from_millis(500),
        "{after_call:?}"
    );

    // The watch, open for longer than either bound, still delivers.
    watch_still_delivers(&reg, &mut watch, 7).await
}

/// Records connection `id` at `reg` and waits until `watch` (opened long before) delivers it.
async fn watch_still_delivers(
    reg: &tests::Registry,
    watch: &mut tonic::Streaming<proto::registry::WatchEvent>,
    id: u64,
) -> anyhow::Result<()> {
    let mut rc = reg.client().await?;
    let mut ingest = tests::Ingest::open(&mut rc, "n").await?;
    ingest
        .send_durable(vec![tests::events::open(id, 1, "h", 2)])
        .await?;
    loop {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        if ev.id == id {
            return Ok(());
        }
    }
}

/// intercept-svc and export-svc, run standalone, bound their own ports as the registry does:
/// a client that never sends the HTTP/2 preface, or sends it and never makes a call, is
/// closed (never before the bound).
#[tokio::test]
async fn side_services_close_connections_without_a_preface_or_a_first_call() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let intercept = tests::Side::start("intercept-svc", tmp.path(), &reg.url, &[]).await?;
    let export = tests::Side::start("export-svc", tmp.path(), &reg.url, &[]).await?;
    let ia = intercept.proc.addr("listen")?;
    let ea = export.proc.addr("listen")?;
    let (a, b, c, d) =
        tokio::try_join!(silent(ia), silent(ea), preface_only(ia), preface_only(ea))?;
    for t in [a, b] {
        assert!(t >= PREFACE_TIMEOUT - Duration::from_millis(500), "{t:?}");
    }
    for t in [c, d] {
        assert!(
            t >= FIRST_CALL_TIMEOUT - Duration::from_millis(500),
            "{t:?}"
        );
    }
    // Both still serve.
    interpose_json(&intercept.url, &["intercept", "status", "--json"]).await?;
    let out = tests::interpose(
        &export.url,
        &[
            "export",
            "--out",
            &tmp.path().join("x.pcap").display().to_string(),
        ],
    )
    .await?;
    assert!(out.ok, "{}", out.stderr);
    Ok(())
}
