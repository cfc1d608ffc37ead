//! Several registry-svc processes on one PostgreSQL database serve the same API: IDs are
//! unique across them, a watcher on one sees the changes made through another once each,
//! with no gap, and a clear on one is seen on all.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test"
)]

use std::collections::{HashMap, HashSet};

use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Direction},
    registry::{
        ClearConnectionsRequest, LeaseIdsRequest, ListConnectionsRequest, SearchHistoryRequest,
        WatchConnectionsRequest, WatchEvent, watch_event::Kind,
    },
};
use tests::{Ingest, Registry, WAIT, events};

const TOKEN: &str = "lab-token";

/// `n` registry-svc replicas on one new database, sharing a token.
async fn replicas(n: usize) -> anyhow::Result<(tempfile::TempDir, Vec<Registry>)> {
    let dir = tempfile::tempdir()?;
    let url = pg_fixture::Cluster::shared().create_database()?;
    let mut regs = Vec::new();
    for i in 0..n {
        let data = dir.path().join(format!("replica-{i}"));
        let reg = Registry::start_replica(&data, &url, TOKEN).await?;
        regs.push(reg);
    }
    Ok((dir, regs))
}

/// Reads `stream` until `done` holds for the events read.
async fn watch_until(
    stream: &mut tonic::Streaming<WatchEvent>,
    got: &mut Vec<WatchEvent>,
    done: impl Fn(&[WatchEvent]) -> bool,
) -> anyhow::Result<()> {
    while !done(got) {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        got.push(ev);
    }
    Ok(())
}

/// Each record's states as a watcher saw them, after its SNAPSHOT_END.
fn states(evs: &[WatchEvent]) -> HashMap<u64, Vec<i32>> {
    let mut states: HashMap<u64, Vec<i32>> = HashMap::new();
    for e in evs.iter().filter(|e| e.kind == Kind::Upsert as i32) {
        let c = e.connection.as_ref().expect("upsert carries the record");
        states.entry(c.id).or_default().push(c.status);
    }
    states
}

#[tokio::test]
async fn leased_ids_are_unique_across_replicas() -> anyhow::Result<()> {
    let (_dir, regs) = replicas(2).await?;
    let mut clients = Vec::new();
    for r in &regs {
        clients.push(tests::registry_client(&r.url, Some(TOKEN)).await?);
    }
    // Both replicas lease at the same time, 50 blocks each.
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let mut ranges = Vec::new();
            for _ in 0..50 {
                let r = c
                    .lease_ids(LeaseIdsRequest {
                        count: 100,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                ranges.push((r.first, r.last));
            }
            anyhow::Ok(ranges)
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for (first, last) in t.await?? {
            assert_eq!(last - first + 1, 100);
            for id in first..=last {
                assert!(seen.insert(id), "ID {id} leased twice");
            }
        }
    }
    assert_eq!(seen.len(), 2 * 50 * 100);
    Ok(())
}

#[tokio::test]
async fn a_watcher_on_one_replica_sees_changes_made_through_another_once() -> anyhow::Result<()> {
    const N: u64 = 600;
    let (_dir, regs) = replicas(2).await?;
    let mut a = tests::registry_client(&regs[0].url, Some(TOKEN)).await?;
    let mut b = tests::registry_client(&regs[1].url, Some(TOKEN)).await?;

    // Watchers on B: one from before any change, one subscribing midway.
    let mut early = b
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    let mut ingest = Ingest::open(&mut a, "node-a").await?;
    for chunk in (1..=N).collect::<Vec<_>>().chunks(20) {
        let batch = chunk
            .iter()
            .flat_map(|&id| {
                [
                    events::open(id, 40000 + id as u32, "h", 80),
                    events::packet(id, 1, Direction::C2s, format!("to {id}").as_bytes()),
                ]
            })
            .collect();
        ingest.send(batch).await?;
    }
    let mut late = b
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    let closes = (1..=N)
        .map(|id| events::close(id, ClosedBy::Client, CloseKind::Fin, "client sent FIN"))
        .collect();
    ingest.send_durable(closes).await?;

    let all_closed = |evs: &[WatchEvent]| {
        evs.iter().any(|e| e.kind == Kind::SnapshotEnd as i32)
            && states(evs)
                .values()
                .filter(|s| s.last() == Some(&(ConnStatus::Disconnected as i32)))
                .count()
                == N as usize
    };
    let active = ConnStatus::Active as i32;
    let disc = ConnStatus::Disconnected as i32;
    for (name, stream) in [("early", &mut early), ("late", &mut late)] {
        let mut evs = Vec::new();
        watch_until(stream, &mut evs, all_closed).await?;
        let states = states(&evs);
        assert_eq!(states.len(), N as usize, "{name}: every ID seen");
        for (id, s) in &states {
            assert!(
                s == &vec![active, disc] || s == &vec![disc],
                "{name}: ID {id} went through {s:?} on the other replica"
            );
        }
    }

    // History written through A reads back through B.
    let page = b
        .search_history(SearchHistoryRequest {
            conn_id: 7,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(page.packets.len(), 1);
    assert_eq!(page.packets[0].data.as_ref(), b"to 7");

    // A clear on B reaches a watcher on A and the lists of both.
    let mut on_a = a
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    let mut evs = Vec::new();
    watch_until(&mut on_a, &mut evs, |evs| {
        evs.iter().any(|e| e.kind == Kind::SnapshotEnd as i32)
    })
    .await?;
    let cleared = b
        .clear_connections(ClearConnectionsRequest {
            ids: (1..=10).collect(),
        })
        .await?
        .into_inner();
    assert_eq!(cleared.cleared, 10);
    let removed = |evs: &[WatchEvent]| -> HashSet<u64> {
        evs.iter()
            .filter(|e| e.kind == Kind::Removed as i32)
            .map(|e| e.id)
            .collect()
    };
    watch_until(&mut on_a, &mut evs, |evs| removed(evs).len() == 10).await?;
    assert_eq!(removed(&evs), (1..=10).collect());
    for client in [&mut a, &mut b] {
        let list = client
            .list_connections(ListConnectionsRequest::default())
            .await?
            .into_inner();
        let ids: Vec<u64> = list.connections.iter().map(|c| c.id).collect();
        assert_eq!(ids, (11..=N).collect::<Vec<_>>());
    }
    Ok(())
}

/// `interpose up --store` keeps its records and history in the database, where a
/// registry-svc replica serves them too.
#[tokio::test]
async fn interpose_up_on_the_database_shares_it_with_a_replica() -> anyhow::Result<()> {
    use tests::proxy::{Server, read_n, socks_connected};
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir()?;
    let url = pg_fixture::Cluster::shared().create_database()?;
    let up = tests::Up::start(&dir.path().join("up"), &["--store", &url, "--token", TOKEN]).await?;
    let replica = Registry::start_replica(&dir.path().join("replica"), &url, TOKEN).await?;

    let server = Server::bind().await?;
    let mut client_side = socks_connected(up.proc.addr("socks")?, server.addr).await?;
    let mut server_side = server.accept().await?;
    client_side.write_all(b"ping").await?;
    assert_eq!(read_n(&mut server_side, 4).await?, b"ping");
    server_side.write_all(b"pong").await?;
    assert_eq!(read_n(&mut client_side, 4).await?, b"pong");
    drop(client_side);
    drop(server_side);

    let mut client = tests::registry_client(&replica.url, Some(TOKEN)).await?;
    let conn = tests::eventually("the replica lists the closed connection", || {
        let mut client = client.clone();
        async move {
            let list = client
                .list_connections(ListConnectionsRequest::default())
                .await?
                .into_inner();
            Ok(list.connections.into_iter().find(|c| {
                c.dst_port == u32::from(server.addr.port())
                    && c.status == ConnStatus::Disconnected as i32
            }))
        }
    })
    .await?;
    let page = client
        .search_history(SearchHistoryRequest {
            conn_id: conn.id,
            ..Default::default()
        })
        .await?
        .into_inner();
    let seen: Vec<(i32, &[u8])> = page
        .packets
        .iter()
        .map(|p| (p.direction, p.data.as_ref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Direction::C2s as i32, &b"ping"[..]),
            (Direction::S2c as i32, &b"pong"[..])
        ]
    );
    assert!(up.proc.terminate().await?, "up exits cleanly");
    Ok(())
}

/// How many times `needle` occurs in the file at `path` (0 when it is not there yet).
fn occurrences(path: &std::path::Path, needle: &[u8]) -> usize {
    let hay = std::fs::read(path).unwrap_or_default();
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// A live export (`export --follow`) through export-svc outlives the replica it follows:
/// it resumes on the next one after the last position it had, and writes each packet once.
#[tokio::test]
async fn a_live_export_resumes_on_the_next_replica_and_writes_each_packet_once()
-> anyhow::Result<()> {
    let (dir, regs) = replicas(2).await?;
    let [a, b] = <[Registry; 2]>::try_from(regs).map_err(|_| anyhow::anyhow!("two replicas"))?;
    let mut cmd = tokio::process::Command::new(tests::bin("export-svc"));
    cmd.args(["--listen", "127.0.0.1:0", "--registry"])
        .arg(format!("{},{}", a.url, b.url))
        .env("INTERPOSE_TOKEN", TOKEN);
    let export = tests::Proc::start(cmd, dir.path().join("export-svc.log")).await?;
    let export_url = format!("http://{}", export.addr("listen")?);

    let mut client = tests::registry_client(&b.url, Some(TOKEN)).await?;
    let mut ingest = Ingest::open(&mut client, "node-e").await?;
    let marker = |i: u64| format!("marker {i} of the live export").into_bytes();
    let dir_of = |seq: u64| match seq % 2 {
        1 => Direction::C2s,
        _ => Direction::S2c,
    };
    ingest
        .send_durable(vec![
            events::open(1, 40001, "live.example", 80),
            events::packet(1, 1, dir_of(1), &marker(1)),
        ])
        .await?;
    let file = dir.path().join("live.pcapng");
    let _follow = tokio::process::Command::new(tests::bin("interpose"))
        .args(["export", "--follow", "--out"])
        .arg(&file)
        .args(["--server", &export_url])
        .env("INTERPOSE_TOKEN", TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let written = |i: u64| {
        let (file, m) = (file.clone(), marker(i));
        move || {
            let n = occurrences(&file, &m);
            async move { Ok((n > 0).then_some(())) }
        }
    };
    // Packet 1 comes in the snapshot; packet 2, sent once it is written, comes live.
    tests::eventually("the snapshot's packet in the file", written(1)).await?;
    ingest
        .send_durable(vec![events::packet(1, 2, dir_of(2), &marker(2))])
        .await?;
    tests::eventually("a live packet in the file", written(2)).await?;

    // The followed replica dies; more arrives through the other.
    a.proc.signal("KILL").await?;
    ingest
        .send_durable(vec![
            events::packet(1, 3, dir_of(3), &marker(3)),
            events::packet(1, 4, dir_of(4), &marker(4)),
            events::close(1, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
        ])
        .await?;
    tests::eventually("the packets after the failover in the file", written(4)).await?;
    for i in 1..=4 {
        assert_eq!(occurrences(&file, &marker(i)), 1, "packet {i} written once");
    }
    assert!(
        export.stderr().contains("resuming the live export"),
        "{}",
        export.stderr()
    );
    Ok(())
}

/// A `--store` that is not a PostgreSQL URL, or a database that cannot be reached, stops
/// registry-svc at start with a sentence naming it, without its password.
#[tokio::test]
async fn a_bad_or_unreachable_store_is_refused_at_start_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    for (store, says) in [
        (
            "mysql://lab@127.0.0.1/interpose".to_string(),
            "--store takes a postgres:// URL".to_string(),
        ),
        (
            format!("postgres://lab:s3cret@127.0.0.1:{closed_port}/interpose"),
            format!("connecting to postgres://lab@127.0.0.1:{closed_port}/interpose"),
        ),
    ] {
        let err = match Registry::start_on(
            &dir.path().join("r"),
            Some(store),
            "127.0.0.1:0",
            &["--token", TOKEN],
        )
        .await
        {
            Ok(_) => anyhow::bail!("registry-svc started on a bad store"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&says), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
    Ok(())
}

/// With `sslmode=require` the registry talks to the database over TLS and checks its
/// certificate: refused without the CA that signed it, served with `--store-ca`.
#[tokio::test]
async fn the_database_connection_is_encrypted_and_its_certificate_checked() -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    let dir = tempfile::tempdir()?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lab database CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])?
        .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))?;
    let ca_pem = dir.path().join("db-ca.pem");
    std::fs::write(&ca_pem, ca.pem())?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let cluster = tokio::task::spawn_blocking(move || {
        let cluster = pg_fixture::Cluster::start()?;
        cluster.enable_tls(&cert_pem, &key_pem)?;
        anyhow::Ok(cluster)
    })
    .await??;
    // The server takes plain connections too: the test's own queries use them.
    let plain = cluster.create_database()?;
    let url = format!("{plain}?sslmode=require");

    let refused = Registry::start_on(
        &dir.path().join("no-ca"),
        Some(url.clone()),
        "127.0.0.1:0",
        &["--token", TOKEN],
    )
    .await;
    let err = match refused {
        Ok(_) => anyhow::bail!("registry-svc started without trusting the database's CA"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("--store-ca"), "{err}");

    let ca_arg = ca_pem.display().to_string();
    let reg = Registry::start_on(
        &dir.path().join("ca"),
        Some(url.clone()),
        "127.0.0.1:0",
        &["--token", TOKEN, "--store-ca", &ca_arg],
    )
    .await?;
    let mut client = tests::registry_client(&reg.url, Some(TOKEN)).await?;
    let mut ingest = Ingest::open(&mut client, "node-t").await?;
    ingest
        .send_durable(vec![events::open(1, 40001, "tls.example", 443)])
        .await?;
    let list = client
        .list_connections(ListConnectionsRequest::default())
        .await?
        .into_inner();
    assert_eq!(list.connections.len(), 1);
    let sessions = |encrypted: bool| {
        let sql: &'static str = match encrypted {
            true => {
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                     WHERE a.application_name = 'interpose-registry' AND s.ssl"
            }
            false => {
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                      WHERE a.application_name = 'interpose-registry' AND NOT s.ssl"
            }
        };
        tests::pg_count_at(plain.clone(), sql)
    };
    assert!(
        sessions(true).await? > 0,
        "the registry's sessions are encrypted"
    );
    assert_eq!(sessions(false).await?, 0, "and none is not");
    drop(reg);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
