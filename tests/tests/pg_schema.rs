//! A PostgreSQL database made by an earlier registry-svc (schema version 1: a row per
//! history packet) is moved into blocks when a registry-svc starts on it: the registry logs
//! its progress, then serves the same history (per connection byte-exact, by contents, in
//! arrival order) and ingests after it.

use prost::Message;
use proto::{
    common::{Connection, Direction, Packet},
    registry::{ConnectionStatsRequest, FollowHistoryRequest, SearchHistoryRequest},
};
use tests::{Ingest, Registry, WAIT, events};

const TOKEN: &str = "schema-token";

/// Version 1's schema, exactly as the registry applied it.
const V1: &str = include_str!("../../registry-svc/migrations/0001_init.sql");

fn packet(conn_id: u64, seq: u64, data: &[u8], ts: Option<i64>) -> Packet {
    Packet {
        conn_id,
        seq,
        direction: if seq % 2 == 1 {
            Direction::C2s as i32
        } else {
            Direction::S2c as i32
        },
        ts: ts.map(|seconds| prost_types::Timestamp { seconds, nanos: 5 }),
        data: bytes::Bytes::copy_from_slice(data),
        ..Default::default()
    }
}

/// The history a version 1 registry would have left: two segments, three commits (the
/// second spanning both connections), a closed record logged with the last.
fn old_history() -> Vec<(i64, i64, Packet)> {
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut edited = packet(2, 1, b"GET /new HTTP/1.1\r\n", Some(11));
    edited.modified = true;
    edited.original = bytes::Bytes::from_static(b"GET /old HTTP/1.1\r\n");
    vec![
        (1, 1, packet(1, 1, b"hello from one", Some(10))),
        (1, 1, packet(1, 2, &big, None)),
        (1, 2, edited),
        (1, 2, packet(1, 3, b"needle in one", Some(12))),
        (2, 3, packet(2, 2, b"needle in two", Some(13))),
    ]
}

/// Makes `url` a version 1 database holding [`old_history`].
fn make_v1(url: &str) -> anyhow::Result<()> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(
        "CREATE TABLE interpose_schema (version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO interpose_schema (version) VALUES (1);",
    )?;
    c.batch_execute(V1)?;
    c.batch_execute(
        "CREATE TABLE packets_2 PARTITION OF packets FOR VALUES IN (2);
         INSERT INTO segments (seg) VALUES (2);",
    )?;
    for (seg, batch, p) in old_history() {
        let ts = p.ts.map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos));
        let size = (p.data.len() + p.original.len()) as i32;
        c.execute(
            "INSERT INTO packets (seg, conn_id, seq, batch, ts, bytes, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &seg,
                &(p.conn_id as i64),
                &(p.seq as i64),
                &batch,
                &ts,
                &size,
                &p.encode_to_vec(),
            ],
        )?;
    }
    let closed = Connection {
        id: 2,
        status: proto::common::ConnStatus::Disconnected as i32,
        dst_host: "two.example".into(),
        ..Default::default()
    };
    let open = Connection {
        id: 1,
        status: proto::common::ConnStatus::Active as i32,
        dst_host: "one.example".into(),
        ..Default::default()
    };
    c.execute(
        "INSERT INTO conns (id, active, body) VALUES (1, true, $1), (2, false, $2)",
        &[&open.encode_to_vec(), &closed.encode_to_vec()],
    )?;
    c.execute(
        "INSERT INTO arrivals (pos, batch, closed) VALUES (1, 1, '{}'), (2, 2, '{}'),
             (3, 3, ARRAY[$1::bytea])",
        &[&closed.encode_to_vec()],
    )?;
    let (seg1, seg2) =
        old_history()
            .iter()
            .fold(((0i64, 0i64), (0i64, 0i64)), |(a, b), (seg, _, p)| {
                let n = (p.data.len() + p.original.len()) as i64;
                if *seg == 1 {
                    ((a.0 + 1, a.1 + n), b)
                } else {
                    (a, (b.0 + 1, b.1 + n))
                }
            });
    c.execute(
        "UPDATE segments SET packets = $1, bytes = $2, last_pos = 2 WHERE seg = 1",
        &[&seg1.0, &seg1.1],
    )?;
    c.execute(
        "UPDATE segments SET packets = $1, bytes = $2, last_pos = 3 WHERE seg = 2",
        &[&seg2.0, &seg2.1],
    )?;
    c.batch_execute(
        "UPDATE counter SET pos = 3, seq = 2; UPDATE id_lease SET next = 3;
         SELECT setval('batches', 3);",
    )?;
    Ok(())
}

#[tokio::test]
async fn a_version_1_database_is_moved_into_blocks_and_served_as_it_was() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = pg_fixture::Cluster::shared().create_database()?;
    {
        let url = url.clone();
        tokio::task::spawn_blocking(move || make_v1(&url)).await??;
    }
    let reg = Registry::start_replica(&dir.path().join("r"), &url, TOKEN).await?;
    let log = reg.proc.stderr();
    assert!(
        log.contains("moving the history into blocks") && log.contains("the history is in blocks"),
        "{log}"
    );
    let mut client = tests::registry_client(&reg.url, Some(TOKEN)).await?;
    let old = old_history();
    for conn in [1, 2] {
        let got = client
            .search_history(SearchHistoryRequest {
                conn_id: conn,
                ..Default::default()
            })
            .await?
            .into_inner()
            .packets;
        let want: Vec<Packet> = old
            .iter()
            .filter(|(_, _, p)| p.conn_id == conn)
            .map(|(_, _, p)| p.clone())
            .collect();
        assert_eq!(got, want, "connection {conn}");
    }
    let found: Vec<(u64, u64)> = client
        .search_history(SearchHistoryRequest {
            contains: b"needle".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .packets
        .iter()
        .map(|p| (p.conn_id, p.seq))
        .collect();
    assert_eq!(found, vec![(1, 3), (2, 2)]);

    // The arrival order, from the start of the log: each commit's packets at its position,
    // and the close logged with the last.
    let mut follow = client
        .follow_history(FollowHistoryRequest {
            conn_id: 0,
            after: Some(0),
        })
        .await?
        .into_inner();
    let mut order = Vec::new();
    while order.len() < 6 {
        let ev = tokio::time::timeout(WAIT, follow.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the follow ended"))?;
        if let Some(p) = ev.packet {
            order.push((ev.position, p.conn_id, p.seq));
        } else if let Some(c) = ev.connection {
            order.push((ev.position, c.id, 0));
        }
    }
    assert_eq!(
        order,
        vec![
            (1, 1, 1),
            (1, 1, 2),
            (2, 1, 3),
            (2, 2, 1),
            (3, 2, 2),
            (3, 2, 0)
        ]
    );

    // Ingest continues after the moved history; a replayed old packet is not stored twice.
    let mut ingest = Ingest::open(&mut client, "node").await?;
    ingest
        .send_durable(vec![
            events::packet(1, 3, Direction::C2s, b"needle in one"),
            events::packet(1, 4, Direction::S2c, b"after the move"),
        ])
        .await?;
    let seqs: Vec<u64> = client
        .search_history(SearchHistoryRequest {
            conn_id: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .packets
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let stats = client
        .connection_stats(ConnectionStatsRequest::default())
        .await?
        .into_inner();
    assert_eq!(stats.history_packets, 6);

    // A second start finds schema 2: nothing to move.
    reg.proc.kill().await;
    let reg = Registry::start_replica(&dir.path().join("r2"), &url, TOKEN).await?;
    assert!(
        !reg.proc.stderr().contains("moving the history"),
        "{}",
        reg.proc.stderr()
    );
    let n = tests::pg_count_at(
        url,
        "SELECT count(*) FROM pg_class WHERE relname = 'packets'",
    )
    .await?;
    assert_eq!(n, 0, "version 1's table is gone");
    Ok(())
}
