//! End-to-end tests of proxy-core (issue 3): real `registry-svc` and `proxy-core` processes,
//! real loopback sockets, queried through the registry's gRPC API.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Direction, Transport},
    registry::{ConnectionStatsRequest, WatchConnectionsRequest, watch_event::Kind},
};
use proxy_core::socks5::{self, Addr, Command as SocksCommand, Reply, UdpHeader};
use tests::{
    Registry, WAIT,
    proxy::{
        ProxyProc, Server, all_connections, payload, read_n, read_to_end, set_abortive,
        socks_connect, socks_connected, socks_request, wait_conn, wait_conn_by_port, wait_history,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

type R = anyhow::Result<()>;

async fn setup(extra: &[&str]) -> anyhow::Result<(tempfile::TempDir, Registry, ProxyProc)> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let proxy = ProxyProc::start(dir.path(), &reg.url, "node-a", extra).await?;
    Ok((dir, reg, proxy))
}

fn closed(c: &proto::common::Connection) -> bool {
    c.status == ConnStatus::Disconnected as i32
}

#[tokio::test]
async fn ports_status_process_and_client_fin() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let mut srv = server.accept().await?;
    let src_port = client.local_addr()?.port();

    let c = wait_conn_by_port(&mut rc, src_port, "active", |c| {
        c.status == ConnStatus::Active as i32
    })
    .await?;
    assert_eq!(c.src_ip, "127.0.0.1");
    assert_eq!(c.dst_port, u32::from(server.addr.port()));
    assert_eq!(c.dst_host, "127.0.0.1");
    assert_eq!(c.dst_ip, "127.0.0.1");
    assert_eq!(c.node, "node-a");
    assert_eq!(c.transport, Transport::Tcp as i32);
    assert_eq!(c.closed_by, ClosedBy::Unspecified as i32);
    assert!(c.opened_at.is_some() && c.closed_at.is_none());

    // The client runs in this very process: the record names it.
    let c = wait_conn(&mut rc, c.id, "with a client process", |c| {
        c.client_process.is_some()
    })
    .await?;
    let p = c.client_process.context("client_process")?;
    assert_eq!(p.pid, std::process::id());
    assert!(!p.name.is_empty());

    client.write_all(b"ping").await?;
    assert_eq!(read_n(&mut srv, 4).await?, b"ping");
    srv.write_all(b"pong!").await?;
    assert_eq!(read_n(&mut client, 5).await?, b"pong!");

    // Still active while both are open, with live counters.
    let c = wait_conn(&mut rc, c.id, "counting", |c| c.bytes_s2c == 5).await?;
    assert_eq!(c.status, ConnStatus::Active as i32);

    client.shutdown().await?; // client FIN
    assert!(read_to_end(&mut srv).await?.is_empty());
    drop(srv);
    assert!(read_to_end(&mut client).await?.is_empty());

    let c = wait_conn(&mut rc, c.id, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Client as i32, "{c:?}");
    assert_eq!(c.close_kind, CloseKind::Fin as i32);
    assert_eq!(c.reason, "client sent FIN");
    assert_eq!((c.bytes_c2s, c.bytes_s2c), (4, 5));
    assert_eq!((c.packets_c2s, c.packets_s2c), (1, 1));
    assert!(c.closed_at.is_some());
    Ok(())
}

#[tokio::test]
async fn server_fin_and_half_close_keep_the_other_direction() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let mut srv = server.accept().await?;
    let src_port = client.local_addr()?.port();

    srv.write_all(b"bye").await?;
    srv.shutdown().await?; // server FIN first
    assert_eq!(read_to_end(&mut client).await?, b"bye");
    // The client -> server direction still flows after the server's FIN.
    client.write_all(b"late data").await?;
    assert_eq!(read_n(&mut srv, 9).await?, b"late data");
    client.shutdown().await?;
    assert!(read_to_end(&mut srv).await?.is_empty());

    let c = wait_conn_by_port(&mut rc, src_port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Server as i32, "{c:?}");
    assert_eq!(c.close_kind, CloseKind::Fin as i32);
    assert_eq!(c.reason, "server sent FIN");
    Ok(())
}

#[tokio::test]
async fn abortive_closes_are_rst_on_either_side() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;

    // Client aborts: SO_LINGER 0, then close.
    let client = socks_connected(proxy.socks, server.addr).await?;
    let mut srv = server.accept().await?;
    let port = client.local_addr()?.port();
    set_abortive(&client)?;
    drop(client);
    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Client as i32, "{c:?}");
    assert_eq!(c.close_kind, CloseKind::Rst as i32, "{c:?}");
    assert_eq!(c.reason, "client reset the connection (RST)");
    // The reset is passed on to the server.
    let mut b = [0u8; 8];
    let r = tokio::time::timeout(WAIT, srv.read(&mut b)).await?;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "server saw {r:?}"
    );

    // Server aborts.
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let srv = server.accept().await?;
    let port = client.local_addr()?.port();
    set_abortive(&srv)?;
    drop(srv);
    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Server as i32, "{c:?}");
    assert_eq!(c.close_kind, CloseKind::Rst as i32, "{c:?}");
    assert_eq!(c.reason, "server reset the connection (RST)");
    let r = tokio::time::timeout(WAIT, client.read(&mut b)).await?;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client saw {r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn failed_connects_get_real_replies_and_proxy_records() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;

    // A port nobody listens on: connection refused (0x05).
    let free: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let r = socks_connect(proxy.socks, Addr::Ip(free)).await?;
    assert_eq!(r.reply, Reply::ConnectionRefused);
    let port = r.stream.local_addr()?.port();
    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert_eq!(c.close_kind, CloseKind::Error as i32);
    assert!(c.reason.contains("refused"), "{}", c.reason);
    assert!(c.reason.contains(&free.to_string()), "{}", c.reason);
    assert_eq!(c.dst_port, u32::from(free.port()));

    // The proxy's own SOCKS port: not allowed (0x02), closed by proxy.
    let r = socks_connect(proxy.socks, Addr::Ip(proxy.socks)).await?;
    assert_eq!(r.reply, Reply::NotAllowed);
    let port = r.stream.local_addr()?.port();
    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert!(c.reason.contains("refused"), "{}", c.reason);
    // Also by name.
    let r = socks_connect(
        proxy.socks,
        Addr::Domain("localhost".into(), proxy.socks.port()),
    )
    .await?;
    assert_eq!(r.reply, Reply::NotAllowed);

    // BIND is not supported (0x07).
    let s = TcpStream::connect(proxy.socks).await?;
    let r = socks_request(s, SocksCommand::Bind, Addr::Ip(free), None).await?;
    assert_eq!(r.reply, Reply::CommandNotSupported);

    // An unknown address type (0x08).
    let mut s = TcpStream::connect(proxy.socks).await?;
    s.write_all(&[5, 1, 0]).await?;
    assert_eq!(read_n(&mut s, 2).await?, [5, 0]);
    s.write_all(&[5, 1, 0, 0x07, 1, 2, 3, 4, 0, 80]).await?;
    assert_eq!(read_n(&mut s, 2).await?, [5, 0x08]);

    // Garbage instead of SOCKS (a TLS ClientHello's start): the proxy closes.
    let mut s = TcpStream::connect(proxy.socks).await?;
    s.write_all(b"\x16\x03\x01\x00\x05hello").await?;
    assert!(read_to_end(&mut s).await?.is_empty());
    // HTTP instead of SOCKS: one line of HTTP that says where HTTP proxy clients go (this
    // proxy has no --http port, so how to start one), then the proxy closes.
    let mut s = TcpStream::connect(proxy.socks).await?;
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let answer = String::from_utf8(read_to_end(&mut s).await?)?;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.ends_with(
            "this is Interpose's SOCKS5 port; for HTTP proxy clients start it with --http \
             127.0.0.1:8080 and use that port\n"
        ),
        "{answer}"
    );
    // And it keeps serving.
    let server = Server::bind().await?;
    socks_connected(proxy.socks, server.addr).await?;
    Ok(())
}

#[tokio::test]
async fn history_holds_every_byte_in_order_across_half_close() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let mut srv = server.accept().await?;
    let port = client.local_addr()?.port();

    let mut sent_c2s = Vec::new();
    let mut sent_s2c = Vec::new();
    // Ping-pong of distinct chunks (each read is one packet).
    for i in 0..40u8 {
        let a = payload(100 + usize::from(i) * 37, i);
        client.write_all(&a).await?;
        assert_eq!(read_n(&mut srv, a.len()).await?, a);
        sent_c2s.extend_from_slice(&a);
        let b = payload(50 + usize::from(i) * 91, i.wrapping_add(100));
        srv.write_all(&b).await?;
        assert_eq!(read_n(&mut client, b.len()).await?, b);
        sent_s2c.extend_from_slice(&b);
    }
    // A bulk transfer each way (many reads).
    let bulk = payload(3 << 20, 7);
    let (r1, r2) = tokio::join!(client.write_all(&bulk), read_n(&mut srv, bulk.len()));
    r1?;
    assert!(r2? == bulk);
    sent_c2s.extend_from_slice(&bulk);
    // Half-close: client FIN, then the server keeps talking.
    client.shutdown().await?;
    assert!(read_to_end(&mut srv).await?.is_empty());
    let mut tail = Vec::new();
    for i in 0..10u8 {
        let b = payload(1000 + usize::from(i), i);
        srv.write_all(&b).await?;
        tail.extend_from_slice(&b);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    srv.shutdown().await?;
    assert!(
        read_to_end(&mut client).await? == tail,
        "tail after half-close differs"
    );
    sent_s2c.extend_from_slice(&tail);

    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Client as i32);
    assert_eq!(c.bytes_c2s, sent_c2s.len() as u64);
    assert_eq!(c.bytes_s2c, sent_s2c.len() as u64);
    let h = wait_history(&mut rc, c.id, &sent_c2s, &sent_s2c).await?;
    assert_eq!(h.len() as u64, c.packets_c2s + c.packets_s2c);
    assert!(h.len() >= 100, "only {} packets", h.len());
    assert!(h.iter().all(|p| p.conn_id == c.id && p.ts.is_some()));
    Ok(())
}

#[tokio::test]
async fn history_off_keeps_records_and_counters_only() -> R {
    let (_dir, reg, proxy) = setup(&["--history", "off"]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let mut srv = server.accept().await?;
    let port = client.local_addr()?.port();
    client.write_all(b"secret").await?;
    assert_eq!(read_n(&mut srv, 6).await?, b"secret");
    drop(client);
    drop(srv);
    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!((c.bytes_c2s, c.packets_c2s), (6, 1));
    assert!(tests::proxy::history(&mut rc, c.id).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn two_proxies_one_registry_get_distinct_ids() -> R {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let a = ProxyProc::start(dir.path(), &reg.url, "alpha", &[]).await?;
    let b = ProxyProc::start(dir.path(), &reg.url, "beta", &[]).await?;
    let server = Server::bind().await?;
    let mut ports = Vec::new();
    let mut keep = Vec::new();
    for i in 0..6 {
        let p = if i % 2 == 0 { a.socks } else { b.socks };
        let s = socks_connected(p, server.addr).await?;
        ports.push((
            s.local_addr()?.port(),
            if i % 2 == 0 { "alpha" } else { "beta" },
        ));
        keep.push((s, server.accept().await?));
    }
    let mut rc = reg.client().await?;
    let mut ids = Vec::new();
    for (port, node) in &ports {
        // By port and node: clients of the two proxies can get the same ephemeral port (the
        // kernel reuses a local port towards another destination).
        let c = tests::eventually("the record of each client", || {
            let mut rc = rc.clone();
            async move {
                let all = all_connections(&mut rc).await?;
                Ok(all
                    .into_iter()
                    .find(|c| c.src_port == u32::from(*port) && c.node == *node))
            }
        })
        .await?;
        ids.push(c.id);
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "IDs collide: {ids:?}");
    let stats = rc
        .connection_stats(ConnectionStatsRequest::default())
        .await?
        .into_inner();
    let nodes: Vec<_> = stats
        .by_node
        .iter()
        .map(|c| (c.key.as_str(), c.count))
        .collect();
    assert!(
        nodes.contains(&("alpha", 3)) && nodes.contains(&("beta", 3)),
        "{nodes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn registry_killed_and_restarted_loses_nothing() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("reg");
    let reg = Registry::start(&data).await?;
    let listen = reg.url.trim_start_matches("http://").to_string();
    let proxy =
        ProxyProc::start(dir.path(), &reg.url, "node-a", &["--queue-bound", "100000"]).await?;
    let server = Server::bind().await?;

    struct Flow {
        client: TcpStream,
        srv: TcpStream,
        port: u16,
        c2s: Vec<u8>,
        s2c: Vec<u8>,
    }
    async fn exchange(f: &mut Flow, round: u8) -> R {
        let a = payload(200 + usize::from(round) * 13, round);
        f.client.write_all(&a).await?;
        assert_eq!(read_n(&mut f.srv, a.len()).await?, a);
        f.c2s.extend_from_slice(&a);
        let b = payload(300 + usize::from(round) * 7, round ^ 0x55);
        f.srv.write_all(&b).await?;
        assert_eq!(read_n(&mut f.client, b.len()).await?, b);
        f.s2c.extend_from_slice(&b);
        Ok(())
    }
    async fn open(proxy: &ProxyProc, server: &Server) -> anyhow::Result<Flow> {
        let client = socks_connected(proxy.socks, server.addr).await?;
        let srv = server.accept().await?;
        let port = client.local_addr()?.port();
        Ok(Flow {
            client,
            srv,
            port,
            c2s: Vec::new(),
            s2c: Vec::new(),
        })
    }

    let mut flows = Vec::new();
    for _ in 0..4 {
        flows.push(open(&proxy, &server).await?);
    }
    for round in 0..5 {
        for f in &mut flows {
            exchange(f, round).await?;
        }
    }
    let mut rc = reg.client().await?;
    wait_conn_by_port(&mut rc, flows[3].port, "recorded", |_| true).await?;
    drop(rc);

    reg.proc.kill().await; // SIGKILL mid-traffic
    for round in 5..15 {
        for f in &mut flows {
            exchange(f, round).await?;
        }
    }
    // New connections while the registry is down (IDs come from the leased block).
    for _ in 0..4 {
        let mut f = open(&proxy, &server).await?;
        for round in 0..5 {
            exchange(&mut f, round).await?;
        }
        flows.push(f);
    }
    // Some end while it is down.
    for f in flows.iter_mut().take(2) {
        f.client.shutdown().await?;
        assert!(read_to_end(&mut f.srv).await?.is_empty());
        f.srv.shutdown().await?;
        assert!(read_to_end(&mut f.client).await?.is_empty());
    }

    // (The relays of both have ended: each side read the other's FIN. Their closes wait in
    // the proxy for the registry like the rest.)
    let reg = Registry::start_with(&data, &listen, &[]).await?;
    let mut rc = reg.client().await?;
    for (i, f) in flows.iter().enumerate() {
        let c = wait_conn_by_port(&mut rc, f.port, "recorded", |c| i >= 2 || closed(c)).await?;
        if i < 2 {
            assert_eq!(c.closed_by, ClosedBy::Client as i32);
        } else {
            assert_eq!(c.status, ConnStatus::Active as i32);
        }
        wait_history(&mut rc, c.id, &f.c2s, &f.s2c).await?;
    }
    let stats = rc
        .connection_stats(ConnectionStatsRequest::default())
        .await?
        .into_inner();
    let losses = stats.losses.get("node-a").cloned().unwrap_or_default();
    assert_eq!(
        (losses.events_dropped, losses.packets_dropped),
        (0, 0),
        "{losses:?}"
    );
    Ok(())
}

#[tokio::test]
async fn curl_socks5_hostname_works() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let http = tests::http::http_server("hello through interpose\n").await?;
    let url = format!("http://localhost:{}/x", http.port());
    let Some(body) = tests::http::curl(proxy.socks, &[], &url).await? else {
        return Ok(());
    };
    assert_eq!(body, "hello through interpose\n");

    let mut rc = reg.client().await?;
    let conns = tests::eventually("curl's record closed", || {
        let mut rc = rc.clone();
        async move {
            let all = all_connections(&mut rc).await?;
            Ok(all.into_iter().find(closed))
        }
    })
    .await?;
    assert_eq!(conns.dst_host, "localhost");
    assert_eq!(conns.dst_port, u32::from(http.port()));
    assert_eq!(conns.dst_ip, "127.0.0.1");
    assert_eq!(conns.closed_by, ClosedBy::Server as i32);
    // The history arrives after the close: wait until it holds every counted byte.
    let h = tests::eventually("curl's whole history", || {
        let mut rc = rc.clone();
        let c = conns.clone();
        async move {
            let h = tests::proxy::history(&mut rc, c.id).await?;
            let (c2s, s2c) = (
                tests::proxy::direction_bytes(&h, Direction::C2s),
                tests::proxy::direction_bytes(&h, Direction::S2c),
            );
            let whole = c2s.len() as u64 == c.bytes_c2s && s2c.len() as u64 == c.bytes_s2c;
            Ok(whole.then_some((c2s, s2c)))
        }
    })
    .await?;
    let (req, resp) = h;
    assert!(
        req.starts_with(b"GET /x HTTP/1.1\r\n"),
        "{:?}",
        String::from_utf8_lossy(&req)
    );
    assert_eq!(
        resp,
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello through interpose\n"
    );
    // Client process lookup names curl.
    let c = wait_conn(&mut rc, conns.id, "named", |c| c.client_process.is_some()).await;
    if let Ok(c) = c {
        assert_eq!(c.client_process.map(|p| p.name).as_deref(), Some("curl"));
    }
    Ok(())
}

#[tokio::test]
async fn udp_associate_relays_datagrams_as_packets() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let echo = UdpSocket::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&b[..n]);
            let _ = echo.send_to(&reply, from).await;
        }
    });
    let ctl = TcpStream::connect(proxy.socks).await?;
    let local = UdpSocket::bind("127.0.0.1:0").await?;
    let r = socks_request(
        ctl,
        SocksCommand::UdpAssociate,
        Addr::Ip(local.local_addr()?),
        None,
    )
    .await?;
    assert_eq!(r.reply, Reply::Succeeded);
    let relay = match r.bound {
        Addr::Ip(a) => a,
        other => anyhow::bail!("bound {other:?}"),
    };
    let ctl_port = r.stream.local_addr()?.port();
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for i in 0..3u8 {
        let mut d = Vec::new();
        socks5::encode_udp_header(
            &UdpHeader {
                frag: 0,
                addr: Addr::Ip(echo_addr),
            },
            &mut d,
        );
        let msg = format!("datagram {i}");
        d.extend_from_slice(msg.as_bytes());
        local.send_to(&d, relay).await?;
        let mut b = [0u8; 2048];
        let (n, _) = tokio::time::timeout(WAIT, local.recv_from(&mut b)).await??;
        let (hdr, off) = socks5::parse_udp(&b[..n])?;
        assert_eq!(hdr.addr, Addr::Ip(echo_addr));
        assert_eq!(&b[off..n], format!("echo:{msg}").as_bytes());
        sent.extend_from_slice(msg.as_bytes());
        got.extend_from_slice(&b[off..n]);
    }
    drop(r.stream); // ends the association
    let mut rc = reg.client().await?;
    let c = wait_conn_by_port(&mut rc, ctl_port, "closed", closed).await?;
    assert_eq!(c.transport, Transport::Udp as i32);
    assert_eq!(c.closed_by, ClosedBy::Client as i32);
    assert_eq!((c.packets_c2s, c.packets_s2c), (3, 3));
    wait_history(&mut rc, c.id, &sent, &got).await?;
    Ok(())
}

#[tokio::test]
async fn socks_auth_is_enforced_when_configured() -> R {
    let (_dir, reg, proxy) = setup(&["--socks-user", "alice", "--socks-pass", "s3cret"]).await?;
    let server = Server::bind().await?;
    // No-auth is refused at method selection: 0xFF (no acceptable methods), then the
    // proxy closes.
    let mut s = TcpStream::connect(proxy.socks).await?;
    s.write_all(&[5, 1, 0]).await?;
    assert_eq!(read_n(&mut s, 2).await?, [5, 0xFF]);
    assert!(read_to_end(&mut s).await?.is_empty());
    // A wrong password: user/password is chosen (0x02), the RFC 1929 status is a failure
    // (0x01), then the proxy closes without reading a request.
    let mut s = TcpStream::connect(proxy.socks).await?;
    s.write_all(&[5, 1, 2]).await?;
    assert_eq!(read_n(&mut s, 2).await?, [5, 2]);
    s.write_all(&[
        1, 5, b'a', b'l', b'i', b'c', b'e', 5, b'w', b'r', b'o', b'n', b'g',
    ])
    .await?;
    assert_eq!(read_n(&mut s, 2).await?, [1, 1]);
    assert!(read_to_end(&mut s).await?.is_empty());
    let s = TcpStream::connect(proxy.socks).await?;
    let r = socks_request(
        s,
        SocksCommand::Connect,
        Addr::Ip(server.addr),
        Some(("alice", "s3cret")),
    )
    .await?;
    assert_eq!(r.reply, Reply::Succeeded);
    let port = r.stream.local_addr()?.port();
    let mut rc = reg.client().await?;
    wait_conn_by_port(&mut rc, port, "recorded", |_| true).await?;
    Ok(())
}

// Refusing to be an open proxy by default: proxy-core/tests/open_proxy.rs.

#[tokio::test]
async fn graceful_shutdown_records_open_connections_as_closed_by_proxy() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let _srv = server.accept().await?;
    let port = client.local_addr()?.port();
    wait_conn_by_port(&mut rc, port, "active", |c| {
        c.status == ConnStatus::Active as i32
    })
    .await?;
    assert!(
        proxy.proc.terminate().await?,
        "proxy-core did not exit cleanly"
    );
    assert!(read_to_end(&mut client).await?.is_empty());
    let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert_eq!(c.reason, "proxy shut down");
    Ok(())
}

#[tokio::test]
async fn watch_streams_opens_and_closes() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let mut watch = rc
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    loop {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .context("watch ended")?;
        if ev.kind == Kind::SnapshotEnd as i32 {
            break;
        }
    }
    let server = Server::bind().await?;
    let mut client = socks_connected(proxy.socks, server.addr).await?;
    let mut srv = server.accept().await?;
    let port = u32::from(client.local_addr()?.port());
    client.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    srv.read_exact(&mut buf).await?;
    srv.write_all(b"pong!").await?;
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).await?;
    // The server ends first; the client sees the FIN, then closes too.
    drop(srv);
    assert!(read_to_end(&mut client).await?.is_empty());
    drop(client);
    // Every live event is an upsert of this one connection: first the opened record, then
    // active updates (destination, counters, process), then the closed record, last.
    let mut seen = Vec::new();
    let last = loop {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .context("watch ended")?;
        assert_eq!(ev.kind, Kind::Upsert as i32, "{ev:?}");
        let c = ev.connection.context("an upsert carries the record")?;
        assert_eq!(ev.id, c.id);
        if closed(&c) {
            break c;
        }
        seen.push(c);
    };
    let first = seen
        .first()
        .context("the opened record came before the closed one")?;
    assert_eq!(first.src_port, port);
    assert_eq!(first.src_ip, "127.0.0.1");
    assert_eq!(first.dst_ip, server.addr.ip().to_string());
    assert_eq!(first.dst_port, u32::from(server.addr.port()));
    assert_eq!(first.transport, Transport::Tcp as i32);
    assert!(first.opened_at.is_some());
    for c in &seen {
        assert_eq!(c.id, first.id);
        assert_eq!(c.status, ConnStatus::Active as i32, "{c:?}");
        assert_eq!(c.closed_by, ClosedBy::Unspecified as i32, "{c:?}");
        assert!(c.closed_at.is_none(), "{c:?}");
    }
    assert_eq!(last.id, first.id);
    assert_eq!(last.src_port, port);
    assert_eq!(last.status, ConnStatus::Disconnected as i32);
    assert_eq!(last.closed_by, ClosedBy::Server as i32);
    assert_eq!(last.close_kind, CloseKind::Fin as i32);
    assert_eq!(last.reason, "server sent FIN");
    assert!(last.closed_at.is_some());
    assert_eq!(
        (
            last.bytes_c2s,
            last.bytes_s2c,
            last.packets_c2s,
            last.packets_s2c
        ),
        (4, 5, 1, 1)
    );
    Ok(())
}

#[tokio::test]
async fn cli_clear_selected_and_all_keep_history() -> R {
    let (_dir, reg, proxy) = setup(&[]).await?;
    let mut rc = reg.client().await?;
    let server = Server::bind().await?;
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let mut client = socks_connected(proxy.socks, server.addr).await?;
        let mut srv = server.accept().await?;
        let port = client.local_addr()?.port();
        client.write_all(&[b'a' + i]).await?;
        assert_eq!(read_n(&mut srv, 1).await?, [b'a' + i]);
        drop(client);
        drop(srv);
        let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
        wait_history(&mut rc, c.id, &[b'a' + i], &[]).await?;
        ids.push(c.id);
    }
    // Clear selected: only that record goes; its packets stay.
    let out = tests::interpose(&reg.url, &["conns", "clear", &ids[0].to_string()]).await?;
    assert!(out.ok, "{}", out.stderr);
    let left: Vec<u64> = all_connections(&mut rc)
        .await?
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(left, ids[1..].to_vec());
    assert_eq!(
        tests::proxy::history(&mut rc, ids[0]).await?.len(),
        1,
        "history of a cleared record is kept"
    );
    // An unknown ID fails with a clear error and removes nothing.
    let out = tests::interpose(&reg.url, &["conns", "clear", &ids[0].to_string()]).await?;
    assert!(!out.ok);
    assert_eq!(all_connections(&mut rc).await?.len(), 2);
    // Clear all.
    let out = tests::interpose(&reg.url, &["conns", "clear", "--all"]).await?;
    assert!(out.ok, "{}", out.stderr);
    assert!(all_connections(&mut rc).await?.is_empty());
    for id in &ids {
        assert_eq!(tests::proxy::history(&mut rc, *id).await?.len(), 1);
    }
    Ok(())
}

#[tokio::test]
async fn connect_to_the_management_endpoints_and_denied_addresses_is_refused() -> R {
    let denied = Server::bind().await?;
    let deny = denied.addr.to_string();
    let (_dir, reg, proxy) = setup(&["--deny", &deny]).await?;
    let mut rc = reg.client().await?;
    let registry: SocketAddr = reg.url.trim_start_matches("http://").parse()?;
    // The registry the proxy reports to, by address and by name, and the --deny address:
    // not allowed (0x02), recorded as closed by the proxy.
    for target in [
        Addr::Ip(registry),
        Addr::Domain("localhost".into(), registry.port()),
        Addr::Ip(denied.addr),
    ] {
        let r = socks_connect(proxy.socks, target.clone()).await?;
        assert_eq!(r.reply, Reply::NotAllowed, "{target:?}");
        let port = r.stream.local_addr()?.port();
        let c = wait_conn_by_port(&mut rc, port, "closed", closed).await?;
        assert_eq!(c.closed_by, ClosedBy::Proxy as i32, "{c:?}");
        assert!(c.reason.starts_with("refused: "), "{c:?}");
    }
    // Other ports of the same host still work.
    let open = Server::bind().await?;
    let r = socks_connect(proxy.socks, Addr::Ip(open.addr)).await?;
    assert_eq!(r.reply, Reply::Succeeded);
    Ok(())
}

#[tokio::test]
async fn a_deny_that_does_not_resolve_is_refused_at_start() -> R {
    let dir = tempfile::tempdir()?;
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(tests::bin("proxy-core"))
            .args(["--socks", "127.0.0.1:0", "--registry", "http://127.0.0.1:1"])
            .args(["--deny", "127.0.0.1:99999", "--data-dir"])
            .arg(dir.path())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--deny 127.0.0.1:99999: not a HOST:PORT that resolves to an address"),
        "{err}"
    );
    Ok(())
}
