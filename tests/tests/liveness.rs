//! Node liveness end to end: the records of a proxy killed with SIGKILL do not stay `active`
//! for ever, whether it comes back as a new session of the same node, never comes back, or
//! the registry itself restarts meanwhile.

use std::time::{Duration, Instant};

use anyhow::Context;
use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection},
    registry::{WatchConnectionsRequest, watch_event::Kind},
};
use tests::{
    Ingest, Registry, WAIT, events,
    proxy::{ProxyProc, Server, socks_connected, wait_conn, wait_conn_by_port},
};

type R = anyhow::Result<()>;

fn active(c: &Connection) -> bool {
    c.status == ConnStatus::Active as i32
}

fn closed_as_lost(c: &Connection, node: &str, why: &str) -> bool {
    c.status == ConnStatus::Disconnected as i32
        && c.closed_by == ClosedBy::Proxy as i32
        && c.close_kind == CloseKind::Error as i32
        && c.reason.contains(&format!("proxy node \"{node}\" {why}"))
}

/// Opens a relayed connection through `proxy` and waits until its record is active; returns
/// the record's ID and both ends (kept open by the caller).
async fn open_conn(
    reg: &Registry,
    proxy: &ProxyProc,
    server: &Server,
) -> anyhow::Result<(u64, tokio::net::TcpStream, tokio::net::TcpStream)> {
    let client = socks_connected(proxy.socks, server.addr).await?;
    let srv = server.accept().await?;
    let mut rc = reg.client().await?;
    let port = client.local_addr()?.port();
    let c = wait_conn_by_port(&mut rc, port, "active", active).await?;
    Ok((c.id, client, srv))
}

#[tokio::test]
async fn a_restarted_proxy_closes_the_records_of_its_old_session() -> R {
    let dir = tempfile::tempdir()?;
    // A grace period far beyond the test: only the new session can close the records.
    let reg = Registry::start_with(
        &dir.path().join("reg"),
        "127.0.0.1:0",
        &["--node-grace", "1h"],
    )
    .await?;
    let server = Server::bind().await?;
    let proxy = ProxyProc::start(dir.path(), &reg.url, "lab-1", &[]).await?;
    let (a, _ca, _sa) = open_conn(&reg, &proxy, &server).await?;
    let (b, _cb, _sb) = open_conn(&reg, &proxy, &server).await?;

    let mut rc = reg.client().await?;
    let mut watch = rc
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    proxy.proc.kill().await;
    let proxy = ProxyProc::start(dir.path(), &reg.url, "lab-1", &[]).await?;
    // Its first report (here: a new connection) announces the new session.
    let (c, _cc, _sc) = open_conn(&reg, &proxy, &server).await?;
    for id in [a, b] {
        let rec = wait_conn(&mut rc, id, "closed as lost", |c| {
            closed_as_lost(c, "lab-1", "restarted")
        })
        .await?;
        assert!(rec.closed_at.is_some());
    }
    // The new session's connection is untouched.
    assert!(active(
        &rc.get_connection(proto::registry::GetConnectionRequest { id: c })
            .await?
            .into_inner()
    ));

    // A watch saw both closes.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .context("watch ended")?;
        if ev.kind != Kind::Upsert as i32 {
            continue;
        }
        if let Some(conn) = ev.connection
            && closed_as_lost(&conn, "lab-1", "restarted")
        {
            seen.insert(conn.id);
        }
    }
    assert_eq!(seen, [a, b].into_iter().collect());
    Ok(())
}

#[tokio::test]
async fn a_proxy_that_never_comes_back_is_closed_after_the_grace_period() -> R {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start_with(
        &dir.path().join("reg"),
        "127.0.0.1:0",
        &["--node-grace", "1s"],
    )
    .await?;
    let server = Server::bind().await?;
    let proxy = ProxyProc::start(dir.path(), &reg.url, "lab-2", &[]).await?;
    let (id, _c, _s) = open_conn(&reg, &proxy, &server).await?;
    // Alive and reporting: the grace period does not apply. A ghost node that reports one
    // record and goes away shows when the grace period has passed and the registry looked:
    // its record is closed as lost then, while the live proxy's stays active.
    let mut rc = reg.client().await?;
    const GHOST_ID: u64 = 1 << 40;
    let mut ghost = Ingest::open(&mut rc, "ghost-2").await?;
    ghost
        .send_durable(vec![events::open(GHOST_ID, 40000, "example.com", 443)])
        .await?;
    drop(ghost);
    wait_conn(
        &mut rc,
        GHOST_ID,
        "the ghost's record closed as lost",
        |c| closed_as_lost(c, "ghost-2", "lost"),
    )
    .await?;
    assert!(active(
        &rc.get_connection(proto::registry::GetConnectionRequest { id })
            .await?
            .into_inner()
    ));

    let killed = Instant::now();
    proxy.proc.kill().await;
    let rec = wait_conn(&mut rc, id, "closed as lost", |c| {
        closed_as_lost(c, "lab-2", "lost")
    })
    .await?;
    // Never before the grace period (a lower bound only: a loaded machine takes longer).
    assert!(
        killed.elapsed() >= Duration::from_millis(900),
        "{:?}",
        killed.elapsed()
    );
    assert!(rec.reason.contains("grace period"), "{}", rec.reason);
    Ok(())
}

#[tokio::test]
async fn after_a_registry_restart_records_of_absent_nodes_are_closed() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("reg");
    let reg = Registry::start_with(&data, "127.0.0.1:0", &["--node-grace", "1h"]).await?;
    let mut rc = reg.client().await?;
    let mut ingest = Ingest::open(&mut rc, "ghost").await?;
    ingest
        .send_durable(vec![events::open(7, 40000, "example.com", 443)])
        .await?;
    drop(ingest);
    reg.proc.kill().await;

    // Restarted, the registry gives an absent node its grace period (here longer than the
    // test) before closing its records: the record is still active ...
    let reg = Registry::start_with(&data, "127.0.0.1:0", &["--node-grace", "1h"]).await?;
    let mut rc = reg.client().await?;
    let rec = rc
        .get_connection(proto::registry::GetConnectionRequest { id: 7 })
        .await?
        .into_inner();
    assert!(active(&rec), "{rec:?}");
    reg.proc.kill().await;

    // ... and closed as lost once a (short) grace period has passed.
    let reg = Registry::start_with(&data, "127.0.0.1:0", &["--node-grace", "1s"]).await?;
    let mut rc = reg.client().await?;
    wait_conn(&mut rc, 7, "closed as lost", |c| {
        closed_as_lost(c, "ghost", "lost")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn interpose_up_killed_and_restarted_closes_its_old_records() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let server = Server::bind().await?;
    let up = tests::Up::start(&data, &["--node", "box"]).await?;
    let socks = up.proc.addr("socks")?;
    let _client = socks_connected(socks, server.addr).await?;
    let _srv = server.accept().await?;
    let mut rc = tests::registry_client(&up.grpc, None).await?;
    let old = tests::eventually("an active record", || {
        let mut rc = rc.clone();
        async move {
            let page = rc
                .list_connections(proto::registry::ListConnectionsRequest::default())
                .await?
                .into_inner();
            Ok(page.connections.into_iter().find(active).map(|c| c.id))
        }
    })
    .await?;
    // A record is listed as soon as its batch is applied, and durable once the registry
    // flushed that batch, before it takes the next one. So once a later connection's record
    // is listed too, the first one survives the kill.
    let _later = socks_connected(socks, server.addr).await?;
    let _later_srv = server.accept().await?;
    tests::eventually("a second record", || {
        let mut rc = rc.clone();
        async move {
            let page = rc
                .list_connections(proto::registry::ListConnectionsRequest::default())
                .await?
                .into_inner();
            Ok(page.connections.iter().any(|c| c.id != old).then_some(()))
        }
    })
    .await?;
    up.proc.kill().await;

    let up = tests::Up::start(&data, &["--node", "box"]).await?;
    let socks = up.proc.addr("socks")?;
    let _client2 = socks_connected(socks, server.addr).await?;
    let _srv2 = server.accept().await?;
    rc = tests::registry_client(&up.grpc, None).await?;
    wait_conn(&mut rc, old, "closed as lost", |c| {
        closed_as_lost(c, "box", "restarted")
    })
    .await?;
    Ok(())
}
