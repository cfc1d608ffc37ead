//! Name resolution under a stalled name server: slow names fail at the lookup bound and
//! never starve fast ones (issue 12, finding 4). Every check is of order and state (the
//! fast names answered while every slow lookup was still pending), never of elapsed time.

use std::{net::SocketAddr, time::Duration};

use proto::common::{ClosedBy, ConnStatus};
use proxy_core::socks5::{Addr, Command, Reply};
use tests::{
    Registry,
    dns_server::DnsServer,
    eventually,
    proxy::{ProxyProc, echo_through, socks_request_within, wait_conn_by_port},
};

type R = anyhow::Result<()>;

/// A SOCKS CONNECT to `host:80` started now: its reply and client port. It waits for its
/// reply far longer than any lookup the tests leave pending.
fn connect_later(
    socks: SocketAddr,
    host: String,
) -> tokio::task::JoinHandle<anyhow::Result<(Reply, u16)>> {
    tokio::spawn(async move {
        let s = tokio::net::TcpStream::connect(socks).await?;
        let target = Addr::Domain(host, 80);
        let r = socks_request_within(s, Command::Connect, target, None, PENDING).await?;
        Ok((r.reply, r.stream.local_addr()?.port()))
    })
}

/// More stalled lookups than tokio's blocking pool has threads (512): under the old design
/// (getaddrinfo on that pool) these alone starved every other lookup, so this test fails
/// there; with the async resolver they hold nothing the fast names need.
const FLOOD: usize = 600;
/// How long a CONNECT behind a stalled name waits for its reply.
const PENDING: Duration = Duration::from_secs(300);

#[tokio::test]
async fn a_stalled_name_server_does_not_starve_other_names() -> R {
    platform::limits::raise_open_files();
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let dns = DnsServer::start().await?;
    let echo = tests::proxy::echo_server().await?;
    // A lookup bound no step of this test comes near: the slow names stay pending until
    // the test releases the name server (or the resolver's own per-query bound, two tries
    // of 5 s, ends them: still far beyond the few round trips checked meanwhile).
    let proxy = ProxyProc::start(
        tmp.path(),
        &reg.url,
        "dns",
        &[
            "--dns",
            &dns.addr.to_string(),
            "--dns-timeout",
            "10m",
            "--dns-per-client",
            "1000",
        ],
    )
    .await?;
    let socks = proxy.socks;

    let slow: Vec<_> = (0..FLOOD)
        .map(|i| connect_later(socks, format!("n{i}.slow.test")))
        .collect();
    eventually("every slow name asked of the stalled server", || async {
        Ok((dns.stalled_names() >= FLOOD).then_some(()))
    })
    .await?;

    // During the stall, from the same client address: names the server answers, and
    // localhost (from /etc/hosts), connect, on connections made one after another and side
    // by side.
    let echo = Addr::Ip(echo);
    let at = |host: &str| Addr::Domain(host.to_string(), echo.port());
    for k in 0..3 {
        echo_through(socks, at(&format!("f{k}.fast.test")), b"ping").await?;
    }
    let (a, b, c) = tokio::join!(
        echo_through(socks, at("fast.test"), b"ping"),
        echo_through(socks, at("other.fast.test"), b"ping"),
        echo_through(socks, at("localhost"), b"ping"),
    );
    a?;
    b?;
    c?;
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "the fast names must be served during the stall, not after it"
    );

    // Released, every slow name gets 0x04 (host unreachable), and its record says why,
    // naming the host.
    dns.release();
    let mut ports = Vec::new();
    for (i, t) in slow.into_iter().enumerate() {
        let (reply, port) = t.await??;
        assert_eq!(reply, Reply::HostUnreachable, "n{i}.slow.test");
        ports.push(port);
    }
    let mut client = reg.client().await?;
    let c = wait_conn_by_port(&mut client, ports[7], "closed", |c| {
        c.status == ConnStatus::Disconnected as i32
    })
    .await?;
    assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
    assert_eq!(c.dst_host, "n7.slow.test");
    assert!(
        c.reason.starts_with("resolve n7.slow.test: "),
        "{}",
        c.reason
    );
    Ok(())
}

#[tokio::test]
async fn a_client_beyond_its_lookup_share_is_refused_at_once() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let dns = DnsServer::start().await?;
    let echo = tests::proxy::echo_server().await?;
    // A lookup bound (8 s, under the resolver's own two tries of 5 s, so it is this bound
    // that ends them) far beyond the refusals, which need no name server: the 8 slow
    // lookups are still pending when the other 12 are refused, then time out.
    let proxy = ProxyProc::start(
        tmp.path(),
        &reg.url,
        "share",
        &[
            "--dns",
            &dns.addr.to_string(),
            "--dns-timeout",
            "8s",
            "--dns-per-client",
            "8",
        ],
    )
    .await?;
    let socks = proxy.socks;

    let mut slow: Vec<_> = (0..20)
        .map(|i| connect_later(socks, format!("s{i}.slow.test")))
        .collect();
    eventually("8 slow names asked of the stalled server", || async {
        Ok((dns.stalled_names() >= 8).then_some(()))
    })
    .await?;
    // The client's share is taken, but localhost needs no name server.
    echo_through(
        socks,
        Addr::Domain("localhost".into(), echo.port()),
        b"ping",
    )
    .await?;

    // 12 are refused while 8 are pending.
    eventually("12 CONNECTs refused", || async {
        Ok((slow.iter().filter(|t| t.is_finished()).count() >= 12).then_some(()))
    })
    .await?;
    let (done, pending): (Vec<_>, Vec<_>) = slow.drain(..).partition(|t| t.is_finished());
    assert_eq!(
        (done.len(), pending.len()),
        (12, 8),
        "refused while pending"
    );
    let mut client = reg.client().await?;
    for t in done {
        let (reply, port) = t.await??;
        assert_eq!(reply, Reply::HostUnreachable);
        let c = wait_conn_by_port(&mut client, port, "closed", |c| {
            c.status == ConnStatus::Disconnected as i32
        })
        .await?;
        assert_eq!(c.closed_by, ClosedBy::Proxy as i32);
        assert_eq!(
            c.reason,
            format!(
                "resolve {}: 127.0.0.1 already has 8 lookups in progress (--dns-per-client)",
                c.dst_host
            )
        );
    }
    assert_eq!(dns.stalled_names(), 8, "the refused names never reach DNS");

    // The 8 time out at the lookup bound, and say so.
    for t in pending {
        let (reply, port) = t.await??;
        assert_eq!(reply, Reply::HostUnreachable);
        let c = wait_conn_by_port(&mut client, port, "closed", |c| {
            c.status == ConnStatus::Disconnected as i32
        })
        .await?;
        assert_eq!(
            c.reason,
            format!("resolve {}: timed out after 8s", c.dst_host)
        );
    }
    // Once the stalled lookups are over, the share is back.
    echo_through(
        socks,
        Addr::Domain("fast.test".into(), echo.port()),
        b"ping",
    )
    .await?;
    Ok(())
}
