//! Name resolution under a stalled name server: slow names fail within the lookup bound
//! and never starve fast ones (issue 12, finding 4).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use proto::common::{ClosedBy, ConnStatus};
use proxy_core::socks5::{Addr, Reply};
use tests::{
    Registry, WAIT,
    dns_server::DnsServer,
    eventually,
    proxy::{ProxyProc, socks_connect, wait_conn_by_port},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type R = anyhow::Result<()>;

/// CONNECT to `host:port` through `socks`, then one echo round trip; returns how long the
/// whole took.
async fn echo_through(socks: SocketAddr, host: &str, port: u16) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let r = socks_connect(socks, Addr::Domain(host.to_string(), port)).await?;
    anyhow::ensure!(r.reply == Reply::Succeeded, "{host}: reply {:?}", r.reply);
    let mut s = r.stream;
    s.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut got)).await??;
    anyhow::ensure!(&got == b"ping", "{host}: echoed {got:?}");
    Ok(start.elapsed())
}

/// A SOCKS CONNECT to `host:80` started now: its reply, client port and how long it took.
fn connect_later(
    socks: SocketAddr,
    host: String,
) -> tokio::task::JoinHandle<anyhow::Result<(Reply, u16, Duration)>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let r = socks_connect(socks, Addr::Domain(host, 80)).await?;
        Ok((r.reply, r.stream.local_addr()?.port(), start.elapsed()))
    })
}

/// More stalled lookups than tokio's blocking pool has threads (512): under the old design
/// (getaddrinfo on that pool) these alone starved every other lookup, so this test fails
/// there; with the async resolver they hold nothing the fast names need.
const FLOOD: usize = 600;
const LOOKUP_BOUND: Duration = Duration::from_secs(4);

#[tokio::test]
async fn a_stalled_name_server_does_not_starve_other_names() -> R {
    proto::limits::raise_open_files();
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let dns = DnsServer::start().await?;
    let echo = tests::proxy::echo_server().await?;
    let proxy = ProxyProc::start(
        tmp.path(),
        &reg.url,
        "dns",
        &[
            "--dns",
            &dns.addr.to_string(),
            "--dns-timeout",
            "4s",
            "--dns-per-client",
            "1000",
        ],
    )
    .await?;
    let socks = proxy.socks;

    let flood_start = Instant::now();
    let slow: Vec<_> = (0..FLOOD)
        .map(|i| connect_later(socks, format!("n{i}.slow.test")))
        .collect();
    eventually("every slow name asked of the stalled server", || async {
        Ok((dns.stalled_names() >= FLOOD).then_some(()))
    })
    .await?;

    // During the stall, from the same client address: names the server answers, and
    // localhost (from /etc/hosts), connect promptly, on connections made one after another
    // and side by side.
    for k in 0..3 {
        let t = echo_through(socks, &format!("f{k}.fast.test"), echo.port()).await?;
        assert!(t < Duration::from_secs(2), "f{k}.fast.test took {t:?}");
    }
    let (a, b, c) = tokio::join!(
        echo_through(socks, "fast.test", echo.port()),
        echo_through(socks, "other.fast.test", echo.port()),
        echo_through(socks, "localhost", echo.port()),
    );
    for t in [a?, b?, c?] {
        assert!(t < Duration::from_secs(2), "{t:?}");
    }
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "the fast names must be served during the stall, not after it"
    );
    assert!(
        flood_start.elapsed() < LOOKUP_BOUND,
        "{:?}",
        flood_start.elapsed()
    );

    // Every slow name gets 0x04 (host unreachable) at the lookup bound.
    let mut ports = Vec::new();
    for (i, t) in slow.into_iter().enumerate() {
        let (reply, port, took) = t.await??;
        assert_eq!(reply, Reply::HostUnreachable, "n{i}.slow.test");
        assert!(
            took >= LOOKUP_BOUND - Duration::from_millis(500),
            "{took:?}"
        );
        assert!(took < LOOKUP_BOUND + Duration::from_secs(4), "{took:?}");
        ports.push(port);
    }

    // The record says why, naming the host.
    let mut client = reg.client().await?;
    let c = wait_conn_by_port(&mut client, ports[7], "closed", |c| {
        c.status == ConnStatus::Disconnected as i32
    })
    .await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert_eq!(c.dst_host, "n7.slow.test");
    assert_eq!(c.reason, "resolve n7.slow.test: timed out after 4s");
    Ok(())
}

#[tokio::test]
async fn a_client_beyond_its_lookup_share_is_refused_at_once() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let dns = DnsServer::start().await?;
    let echo = tests::proxy::echo_server().await?;
    let proxy = ProxyProc::start(
        tmp.path(),
        &reg.url,
        "share",
        &[
            "--dns",
            &dns.addr.to_string(),
            "--dns-timeout",
            "3s",
            "--dns-per-client",
            "8",
        ],
    )
    .await?;
    let socks = proxy.socks;

    let slow: Vec<_> = (0..20)
        .map(|i| connect_later(socks, format!("s{i}.slow.test")))
        .collect();
    eventually("8 slow names asked of the stalled server", || async {
        Ok((dns.stalled_names() >= 8).then_some(()))
    })
    .await?;
    // The client's share is taken, but localhost needs no name server.
    let t = echo_through(socks, "localhost", echo.port()).await?;
    assert!(t < Duration::from_secs(2), "{t:?}");

    let (mut timed_out, mut refused) = (Vec::new(), Vec::new());
    for t in slow {
        let (reply, port, took) = t.await??;
        assert_eq!(reply, Reply::HostUnreachable);
        if took >= Duration::from_millis(2500) {
            timed_out.push(port);
        } else {
            assert!(took < Duration::from_millis(1500), "{took:?}");
            refused.push(port);
        }
    }
    assert_eq!((timed_out.len(), refused.len()), (8, 12));
    assert_eq!(dns.stalled_names(), 8, "the refused names never reach DNS");

    let mut client = reg.client().await?;
    let c = wait_conn_by_port(&mut client, refused[0], "closed", |c| {
        c.status == ConnStatus::Disconnected as i32
    })
    .await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert!(
        c.reason
            .ends_with(": 127.0.0.1 already has 8 lookups in progress (--dns-per-client)"),
        "{}",
        c.reason
    );
    // Once the stalled lookups are over, the share is back.
    echo_through(socks, "fast.test", echo.port()).await?;
    Ok(())
}
