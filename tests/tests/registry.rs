//! registry-svc end to end: a real server process on loopback, driven through gRPC the way
//! proxies and users drive it.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test"
)]

use std::collections::{HashMap, HashSet};

use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Direction},
    registry::{
        ClearAllRequest, ClearConnectionsRequest, ConnectionFilter, ConnectionStatsRequest, Event,
        GetConnectionRequest, LeaseIdsRequest, ListConnectionsRequest, SearchHistoryRequest,
        WatchConnectionsRequest, WatchEvent, watch_event::Kind,
    },
};
use tests::{Ingest, Registry, WAIT, events, registry_client};
use tonic::Code;

async fn list_ids(
    client: &mut proto::registry::registry_client::RegistryClient<platform::client::AuthChannel>,
) -> anyhow::Result<Vec<u64>> {
    let r = client
        .list_connections(ListConnectionsRequest::default())
        .await?
        .into_inner();
    Ok(r.connections.iter().map(|c| c.id).collect())
}

/// Reads `stream` after the events already `got` until `done` holds for all of them.
async fn collect_watch(
    mut stream: tonic::Streaming<WatchEvent>,
    mut got: Vec<WatchEvent>,
    mut done: impl FnMut(&[WatchEvent]) -> bool,
) -> anyhow::Result<Vec<WatchEvent>> {
    while !done(&got) {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        got.push(ev);
    }
    Ok(got)
}

#[tokio::test]
async fn watch_sees_every_change_once_with_no_gap_between_snapshot_and_live() -> anyhow::Result<()>
{
    every_change_once(300, 1).await
}

/// As above with snapshots of several pages (the registry reads 4,096 records per hold of
/// its lock), written to while the watchers are inside them.
#[tokio::test]
async fn a_paged_watch_snapshot_sees_every_change_once() -> anyhow::Result<()> {
    every_change_once(10_000, 40).await
}

/// `n` connections opened (`per_batch` per batch) and then closed while two watchers watch:
/// one from before, one subscribing midway. The changes after the late watcher subscribes
/// stay under the registry's backlog of 16,384, so neither watcher is reset.
async fn every_change_once(n: u64, per_batch: u64) -> anyhow::Result<()> {
    let opens = move |ids: std::ops::RangeInclusive<u64>| -> Vec<Vec<Event>> {
        ids.map(|id| events::open(id, 40000 + (id % 20000) as u32, "h", 80))
            .collect::<Vec<_>>()
            .chunks(per_batch as usize)
            .map(<[Event]>::to_vec)
            .collect()
    };
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "node-a").await?;

    // Half the connections exist before the late watcher subscribes.
    for batch in opens(1..=n / 2) {
        ingest.send(batch).await?;
    }
    let early = client
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    // The late watcher subscribes while batches are still streaming in; or (paged) before
    // them, with its first page read and its stream then left unread, so that it waits
    // inside its snapshot while the rest is written.
    let mut client2 = reg.client().await?;
    let write_rest = async move {
        for batch in opens(n / 2 + 1..=n) {
            ingest.send(batch).await?;
        }
        let closes: Vec<Event> = (1..=n)
            .map(|id| events::close(id, ClosedBy::Client, CloseKind::Fin, "client sent FIN"))
            .collect();
        ingest.send_durable(closes).await?;
        anyhow::Ok(())
    };
    let watch_all = WatchConnectionsRequest::default();
    let (late, late_first, writer) = if per_batch == 1 {
        let writer = tokio::spawn(write_rest);
        let late = client2.watch_connections(watch_all).await?.into_inner();
        (late, Vec::new(), writer)
    } else {
        let mut late = client2.watch_connections(watch_all).await?.into_inner();
        let first = tokio::time::timeout(WAIT, late.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the late watch ended"))?;
        (late, vec![first], tokio::spawn(write_rest))
    };
    writer.await??;

    // Each watcher must end with all n records disconnected, having seen each ID's states
    // in order and never the same state twice. A late watcher's snapshot can already hold
    // all n closed records, so its SNAPSHOT_END is awaited too.
    let closed = |evs: &[WatchEvent]| {
        evs.iter().any(|e| e.kind == Kind::SnapshotEnd as i32)
            && evs
                .iter()
                .filter(|e| {
                    e.connection
                        .as_ref()
                        .is_some_and(|c| c.status == ConnStatus::Disconnected as i32)
                })
                .count()
                == n as usize
    };
    for (name, stream, first) in [("early", early, Vec::new()), ("late", late, late_first)] {
        let evs = collect_watch(stream, first, closed).await?;
        let snapshot_end = evs
            .iter()
            .position(|e| e.kind == Kind::SnapshotEnd as i32)
            .ok_or_else(|| anyhow::anyhow!("{name}: no SNAPSHOT_END"))?;
        let mut states: HashMap<u64, Vec<i32>> = HashMap::new();
        for (i, e) in evs.iter().enumerate() {
            if i == snapshot_end {
                continue;
            }
            assert_eq!(e.kind, Kind::Upsert as i32, "{name}: unexpected {e:?}");
            let c = e.connection.as_ref().expect("upsert carries the record");
            states.entry(c.id).or_default().push(c.status);
        }
        assert_eq!(states.len(), n as usize, "{name}: every ID seen");
        let active = ConnStatus::Active as i32;
        let disc = ConnStatus::Disconnected as i32;
        for (id, s) in &states {
            assert!(
                s == &vec![active, disc] || s == &vec![disc],
                "{name}: ID {id} went through {s:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn clear_removes_records_but_keeps_history() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    let mut evs = Vec::new();
    for id in 1..=4 {
        evs.push(events::open(id, 1000 + id as u32, "example.test", 443));
        evs.push(events::packet(
            id,
            1,
            Direction::C2s,
            format!("hello {id}").as_bytes(),
        ));
    }
    ingest.send_durable(evs).await?;
    let watch = client
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();

    // Unknown IDs are refused and nothing is removed.
    let err = client
        .clear_connections(ClearConnectionsRequest { ids: vec![2, 999] })
        .await
        .expect_err("999 is unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("999"), "{}", err.message());
    assert_eq!(list_ids(&mut client).await?, vec![1, 2, 3, 4]);

    let r = client
        .clear_connections(ClearConnectionsRequest { ids: vec![2, 3] })
        .await?
        .into_inner();
    assert_eq!(r.cleared, 2);
    assert_eq!(list_ids(&mut client).await?, vec![1, 4]);
    let err = client
        .get_connection(GetConnectionRequest { id: 2 })
        .await
        .expect_err("cleared");
    assert_eq!(err.code(), Code::NotFound);

    // A close arriving after the clear does not bring the record back.
    ingest
        .send_durable(vec![events::close(
            2,
            ClosedBy::Server,
            CloseKind::Fin,
            "server sent FIN",
        )])
        .await?;
    assert_eq!(list_ids(&mut client).await?, vec![1, 4]);

    // Packets of cleared records stay in the history.
    let h = client
        .search_history(SearchHistoryRequest {
            conn_id: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(h.packets.len(), 1);
    assert_eq!(h.packets[0].data, &b"hello 2"[..]);

    let r = client.clear_all(ClearAllRequest {}).await?.into_inner();
    assert_eq!(r.cleared, 2);
    assert!(list_ids(&mut client).await?.is_empty());
    let h = client
        .search_history(SearchHistoryRequest::default())
        .await?
        .into_inner();
    assert_eq!(h.packets.len(), 4);

    // The watcher saw the snapshot, then exactly the four removals.
    let evs = collect_watch(watch, Vec::new(), |e| e.len() == 4 + 1 + 4).await?;
    let removed: Vec<u64> = evs
        .iter()
        .filter(|e| e.kind == Kind::Removed as i32)
        .map(|e| e.id)
        .collect();
    assert_eq!(removed, vec![2, 3, 1, 4]);
    Ok(())
}

#[tokio::test]
async fn acknowledged_data_survives_a_crash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    ingest
        .send_durable(vec![
            events::open(7, 5555, "db.internal", 5432),
            events::packet(7, 1, Direction::C2s, &payload),
            events::packet(7, 2, Direction::S2c, b"pong"),
            events::close(
                7,
                ClosedBy::Server,
                CloseKind::Rst,
                "server reset the connection",
            ),
        ])
        .await?;
    drop(client);
    reg.proc.kill().await; // SIGKILL: no graceful flush

    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let c = client
        .get_connection(GetConnectionRequest { id: 7 })
        .await?
        .into_inner();
    assert_eq!(c.src_port, 5555);
    assert_eq!(c.dst_port, 5432);
    assert_eq!(c.node, "n");
    assert_eq!(c.status, ConnStatus::Disconnected as i32);
    assert_eq!(c.closed_by, ClosedBy::Server as i32);
    assert_eq!(c.close_kind, CloseKind::Rst as i32);
    let h = client
        .search_history(SearchHistoryRequest {
            conn_id: 7,
            ..Default::default()
        })
        .await?
        .into_inner();
    let data: Vec<&[u8]> = h.packets.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, vec![payload.as_slice(), b"pong".as_slice()]);
    Ok(())
}

#[tokio::test]
async fn leased_ids_are_unique_across_lessees_and_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut seen = HashSet::new();
    let mut max_before = 0;
    for round in 0..2 {
        let reg = Registry::start(dir.path()).await?;
        let lessees = (0..2).map(|i| {
            let url = reg.url.clone();
            tokio::spawn(async move {
                let mut c = registry_client(&url, None).await?;
                let mut got = Vec::new();
                for _ in 0..50 {
                    let r = c
                        .lease_ids(LeaseIdsRequest {
                            node: format!("p{i}"),
                            count: 7,
                        })
                        .await?
                        .into_inner();
                    assert_eq!(r.last - r.first + 1, 7);
                    got.extend(r.first..=r.last);
                }
                anyhow::Ok(got)
            })
        });
        let mut min_this_round = u64::MAX;
        for l in lessees.collect::<Vec<_>>() {
            for id in l.await?? {
                assert!(id > 0);
                assert!(seen.insert(id), "ID {id} handed out twice (round {round})");
                min_this_round = min_this_round.min(id);
            }
        }
        assert!(min_this_round > max_before, "a restart reissued IDs");
        max_before = *seen.iter().max().expect("ids");
        reg.proc.kill().await;
    }
    assert_eq!(seen.len(), 2 * 2 * 50 * 7);
    Ok(())
}

fn code<T>(r: Result<T, tonic::Status>) -> Result<(), Code> {
    r.map(|_| ()).map_err(|s| s.code())
}

#[tokio::test]
async fn bad_requests_get_the_right_status_codes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;

    assert_eq!(
        code(client.get_connection(GetConnectionRequest { id: 0 }).await),
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .get_connection(GetConnectionRequest { id: 12345 })
                .await
        ),
        Err(Code::NotFound)
    );
    assert_eq!(
        code(
            client
                .lease_ids(LeaseIdsRequest {
                    node: "x".into(),
                    count: 0
                })
                .await
        ),
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .lease_ids(LeaseIdsRequest {
                    node: "x".into(),
                    count: 1 << 20
                })
                .await
        ),
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .list_connections(ListConnectionsRequest {
                    page_token: "not-a-number".into(),
                    ..Default::default()
                })
                .await
        ),
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .search_history(SearchHistoryRequest {
                    page_token: "x:y".into(),
                    ..Default::default()
                })
                .await
        ),
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .clear_connections(ClearConnectionsRequest { ids: vec![] })
                .await
        ),
        Err(Code::InvalidArgument)
    );
    // A malformed event is skipped and reported in the ack; the rest of its batch is kept
    // and the stream goes on.
    let mut ingest = Ingest::open(&mut client, "n").await?;
    ingest
        .send_durable(vec![events::open(0, 1, "h", 1), events::open(5, 2, "h", 1)])
        .await?;
    assert_eq!(ingest.rejected.0, 1);
    assert!(ingest.rejected.1.contains("ID 0"), "{}", ingest.rejected.1);
    ingest
        .send_durable(vec![
            events::packet(5, 0, Direction::C2s, b"x"),
            events::open(6, 3, "h", 1),
        ])
        .await?;
    assert_eq!(ingest.rejected.0, 2);
    assert_eq!(list_ids(&mut client).await?, vec![5, 6]);
    // A batch without a node name fails the stream with the reason.
    let mut anonymous = Ingest::open(&mut client, "").await?;
    anonymous.send(vec![events::open(7, 1, "h", 1)]).await?;
    let status = anonymous.next_error().await?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("node name"),
        "{}",
        status.message()
    );
    assert_eq!(list_ids(&mut client).await?, vec![5, 6]);
    Ok(())
}

/// A watch from a start ID snapshots only the records from there up and sends no change to
/// a lower one: what the web view opens with after listing the newest records.
#[tokio::test]
async fn a_watch_from_a_start_id_covers_only_the_records_from_there_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    ingest
        .send_durable(
            (1..=30)
                .map(|id| events::open(id, 40000, "h", 80))
                .collect(),
        )
        .await?;
    let mut stream = client
        .watch_connections(WatchConnectionsRequest {
            filter: None,
            start_id: 21,
        })
        .await?
        .into_inner();
    let mut next = async || -> anyhow::Result<WatchEvent> {
        tokio::time::timeout(WAIT, stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))
    };
    let mut ids = Vec::new();
    loop {
        let e = next().await?;
        match e.connection {
            Some(c) => ids.push(c.id),
            None if e.kind == Kind::SnapshotEnd as i32 => break,
            None => anyhow::bail!("unexpected event in the snapshot: {e:?}"),
        }
    }
    assert_eq!(ids, (21..=30).collect::<Vec<_>>());
    // Closing 5 (below the start), then 25, then opening 31: the watch sends 25's close and
    // 31's open, in that order, and nothing about 5.
    ingest
        .send_durable(vec![
            events::close(5, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
            events::close(25, ClosedBy::Server, CloseKind::Rst, "server sent RST"),
            events::open(31, 40001, "h", 80),
        ])
        .await?;
    let mut got = Vec::new();
    for _ in 0..2 {
        let e = next().await?;
        got.push((e.id, e.connection.map_or(0, |c| c.status)));
    }
    assert_eq!(
        got,
        vec![
            (25, ConnStatus::Disconnected as i32),
            (31, ConnStatus::Active as i32)
        ]
    );
    Ok(())
}

#[tokio::test]
async fn paging_filters_and_stats() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    let mut evs = Vec::new();
    for id in 1..=25u64 {
        let port = if id % 2 == 0 { 443 } else { 80 };
        evs.push(events::open(id, 2000 + id as u32, "example.test", port));
        if id % 5 == 0 {
            evs.push(events::close(
                id,
                ClosedBy::Server,
                CloseKind::Fin,
                "server sent FIN",
            ));
        }
        evs.push(events::packet(id, 1, Direction::C2s, b"GET / HTTP/1.1"));
        evs.push(events::packet(id, 2, Direction::S2c, b"HTTP/1.1 200 OK"));
    }
    ingest.send_durable(evs).await?;

    // Pages of 10 cover everything exactly once, in ID order.
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_connections(ListConnectionsRequest {
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(page.connections.len() <= 10);
        ids.extend(page.connections.iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids, (1..=25).collect::<Vec<_>>());

    // Newest first: pages of 10 from the top, each token the highest ID of the next page;
    // with a filter, only its matches, still from the top.
    let newest = |token: String, filter: Option<ConnectionFilter>| ListConnectionsRequest {
        filter,
        page_size: 10,
        page_token: token,
        newest_first: true,
    };
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_connections(newest(token, None))
            .await?
            .into_inner();
        pages.push(page.connections.iter().map(|c| c.id).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        pages,
        vec![
            (16..=25).rev().collect::<Vec<u64>>(),
            (6..=15).rev().collect(),
            (1..=5).rev().collect(),
        ]
    );
    let closed = ConnectionFilter {
        status: ConnStatus::Disconnected as i32,
        ..Default::default()
    };
    let r = client
        .list_connections(newest(String::new(), Some(closed)))
        .await?
        .into_inner();
    assert_eq!(
        r.connections.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![25, 20, 15, 10, 5]
    );

    let f = ConnectionFilter {
        status: ConnStatus::Disconnected as i32,
        ..Default::default()
    };
    let r = client
        .list_connections(ListConnectionsRequest {
            filter: Some(f),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        r.connections.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![5, 10, 15, 20, 25]
    );

    let s = client
        .connection_stats(ConnectionStatsRequest::default())
        .await?
        .into_inner();
    assert_eq!(s.total, 25);
    assert_eq!(s.history_packets, 50);
    let by = |v: &[proto::registry::Count], k: &str| v.iter().find(|c| c.key == k).map(|c| c.count);
    assert_eq!(by(&s.by_status, "active"), Some(20));
    assert_eq!(by(&s.by_status, "disconnected"), Some(5));
    assert_eq!(by(&s.by_closed_by, "server"), Some(5));
    assert_eq!(by(&s.by_destination, "example.test:443"), Some(12));
    assert_eq!(by(&s.by_destination, "example.test:80"), Some(13));
    assert_eq!(by(&s.by_node, "lab1"), Some(25));

    // History search by direction and content, paged one packet at a time.
    let mut found = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .search_history(SearchHistoryRequest {
                direction: Direction::S2c as i32,
                contains: b"200 OK".to_vec(),
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        found.extend(page.packets.iter().map(|p| (p.conn_id, p.seq)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(found, (1..=25).map(|id| (id, 2)).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn a_token_is_required_when_configured_and_exposure_without_one_is_refused()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start_with(dir.path(), "127.0.0.1:0", &["--token", "hunter2"]).await?;
    let mut anon = registry_client(&reg.url, None).await?;
    let err = anon
        .list_connections(ListConnectionsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = registry_client(&reg.url, Some("nope")).await?;
    let err = wrong
        .list_connections(ListConnectionsRequest::default())
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut ok = registry_client(&reg.url, Some("hunter2")).await?;
    ok.list_connections(ListConnectionsRequest::default())
        .await?;

    // (Beyond loopback without a token is refused before binding:
    // registry-svc/tests/exposure.rs.)
    Ok(())
}

/// What a follower saw, in order: `("packet", conn, seq)`, `("closed", conn, 0)`,
/// `("record", conn, status)` for snapshot records, `("caught_up", 0, 0)`; with positions.
/// Adds to `got` (what was read before) until `done`; a resumed stream (`after` set) is live
/// from the start.
async fn collect_follow(
    stream: &mut tonic::Streaming<proto::registry::FollowHistoryEvent>,
    resumed: bool,
    mut got: Vec<(u64, &'static str, u64, u64)>,
    mut done: impl FnMut(&[(u64, &'static str, u64, u64)]) -> bool,
) -> anyhow::Result<Vec<(u64, &'static str, u64, u64)>> {
    let mut caught_up = resumed || got.iter().any(|e| e.1 == "caught_up");
    while !done(&got) {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("follow ended"))?;
        let item = match (&ev.packet, &ev.connection) {
            (Some(p), _) => ("packet", p.conn_id, p.seq),
            (None, Some(c)) if caught_up => {
                assert_eq!(
                    c.status,
                    ConnStatus::Disconnected as i32,
                    "live record {c:?}"
                );
                ("closed", c.id, 0)
            }
            (None, Some(c)) => ("record", c.id, c.status as u64),
            (None, None) => {
                assert!(ev.caught_up, "empty event {ev:?}");
                caught_up = true;
                ("caught_up", 0, 0)
            }
        };
        got.push((ev.position, item.0, item.1, item.2));
    }
    Ok(got)
}

#[tokio::test]
async fn follow_history_sends_each_packet_once_across_the_snapshot_and_resumes_after_a_position()
-> anyhow::Result<()> {
    use proto::registry::FollowHistoryRequest;
    const N: u64 = 200;
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "node-a").await?;
    let batch = |id: u64, seq: u64| {
        let mut evs = Vec::new();
        if seq == 1 {
            evs.push(events::open(id, 40000 + id as u32, "h", 80));
        }
        evs.push(events::packet(
            id,
            seq,
            Direction::C2s,
            format!("{id}/{seq}").as_bytes(),
        ));
        if seq == 2 {
            evs.push(events::close(id, ClosedBy::Client, CloseKind::Fin, "fin"));
        }
        evs
    };
    // Half the connections are complete before the follower joins.
    for id in 1..=N / 2 {
        ingest.send(batch(id, 1)).await?;
        ingest.send(batch(id, 2)).await?;
    }
    ingest.send_durable(Vec::new()).await?;
    let mut stream = client
        .follow_history(FollowHistoryRequest::default())
        .await?
        .into_inner();
    // The snapshot's position is fixed once its first event arrives; the rest is recorded
    // while the snapshot is still being sent (it is larger than the stream's buffer).
    let first = collect_follow(&mut stream, false, Vec::new(), |got| !got.is_empty()).await?;
    let writer = tokio::spawn(async move {
        for id in N / 2 + 1..=N {
            ingest.send(batch(id, 1)).await?;
            ingest.send(batch(id, 2)).await?;
        }
        ingest.send_durable(Vec::new()).await?;
        anyhow::Ok(())
    });
    let complete = |evs: &[(u64, &'static str, u64, u64)]| {
        evs.iter().filter(|e| e.1 == "packet").count() == 2 * N as usize
            && evs.iter().any(|e| e.1 == "caught_up")
            && evs
                .iter()
                .filter(|e| e.1 == "closed" || (e.1 == "record" && e.3 == 2))
                .count()
                == N as usize
    };
    let evs = collect_follow(&mut stream, false, first, complete).await?;
    writer.await??;

    let packets: Vec<(u64, u64)> = evs
        .iter()
        .filter(|e| e.1 == "packet")
        .map(|e| (e.2, e.3))
        .collect();
    let unique: HashSet<(u64, u64)> = packets.iter().copied().collect();
    assert_eq!(unique.len(), packets.len(), "a packet was sent twice");
    let caught_up = evs
        .iter()
        .position(|e| e.1 == "caught_up")
        .expect("caught_up");
    let horizon = evs[caught_up].0;
    for (i, e) in evs.iter().enumerate() {
        match e.1 {
            "record" | "packet" if i < caught_up => {
                assert_eq!(e.0, horizon, "snapshot position {e:?}")
            }
            _ if i > caught_up => assert!(e.0 > horizon, "live position {e:?}"),
            _ => {}
        }
        // A live close comes after every packet of its connection.
        if e.1 == "closed" {
            assert!(
                packets.contains(&(e.2, 1)) && packets.contains(&(e.2, 2)),
                "conn {} closed before its packets",
                e.2
            );
            let later = evs[i..].iter().any(|x| x.1 == "packet" && x.2 == e.2);
            assert!(!later, "conn {}: a packet after its close", e.2);
        }
    }
    let live: Vec<_> = evs[caught_up + 1..].to_vec();
    let live_packets = live.iter().filter(|e| e.1 == "packet").count();
    assert_eq!(live_packets, N as usize, "the second half is live");

    // Resuming after the snapshot's position gives exactly the live part again.
    let mut resumed = client
        .follow_history(FollowHistoryRequest {
            conn_id: 0,
            after: Some(horizon),
        })
        .await?
        .into_inner();
    let n = live.len();
    let again = collect_follow(&mut resumed, true, Vec::new(), |got| got.len() == n).await?;
    assert_eq!(again, live);
    Ok(())
}
