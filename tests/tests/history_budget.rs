//! The history's disk budget end to end: a real registry-svc with `--history-max-bytes`,
//! fed through gRPC ingest as a proxy feeds it, inspected with `interpose conns stats`.

use proto::{common::Direction, registry::SearchHistoryRequest};
use tests::{Ingest, Registry, connection_stats, events, interpose, interpose_json};

/// 64 KiB: segments of 8 KiB, so packets of 4000 bytes fill one in three (with the
/// PostgreSQL store, and in the sled store's log once each frame's header is added).
const BUDGET: u64 = 64 * 1024;
const PACKET: usize = 4000;
/// The payload bytes of a segment.
const SEGMENT: u64 = 3 * PACKET as u64;

/// Packet `seq`'s bytes: its number, then filler, so a packet read back can be checked.
fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.resize(PACKET, (seq % 251) as u8);
    p
}

async fn start(dir: &std::path::Path) -> anyhow::Result<Registry> {
    Registry::start_with(dir, "127.0.0.1:0", &["--history-max-bytes", "64KiB"]).await
}

/// The sequence numbers of connection 1's history, each packet checked against its bytes.
async fn stored_seqs(reg: &Registry) -> anyhow::Result<Vec<u64>> {
    let mut client = reg.client().await?;
    let h = client
        .search_history(SearchHistoryRequest {
            conn_id: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(h.next_page_token.is_empty(), "one page holds it all");
    for p in &h.packets {
        assert_eq!(p.data, payload(p.seq), "packet {} reads back whole", p.seq);
    }
    Ok(h.packets.iter().map(|p| p.seq).collect())
}

/// Checks that the history is the newest packets up to at least `acked`, oldest evicted
/// first and each evicted packet counted once; returns the first seq kept.
async fn check_kept(reg: &Registry, acked: u64) -> anyhow::Result<u64> {
    let seqs = stored_seqs(reg).await?;
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        anyhow::bail!("no history is kept");
    };
    assert!(
        last >= acked,
        "acknowledged packet {acked} is kept (last {last})"
    );
    assert_eq!(
        seqs,
        (first..=last).collect::<Vec<_>>(),
        "no gap: oldest first"
    );
    let s = connection_stats(&reg.url).await?;
    assert_eq!(
        s.history_packets,
        seqs.len() as u64,
        "no entry without its bytes"
    );
    assert_eq!(s.history_evicted_packets, first - 1);
    assert_eq!(s.history_evicted_bytes, (first - 1) * PACKET as u64);
    assert_eq!(
        (s.history_max_bytes, s.history_when_full.as_str()),
        (BUDGET, "evict")
    );
    Ok(first)
}

#[tokio::test]
async fn eviction_keeps_the_newest_history_within_the_budget_reports_it_and_survives_a_restart()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let reg = start(&data).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    ingest
        .send_durable(vec![events::open(1, 5555, "example.test", 443)])
        .await?;
    for seq in 1..=40 {
        ingest
            .send_durable(vec![events::packet(1, seq, Direction::C2s, &payload(seq))])
            .await?;
    }
    let first = check_kept(&reg, 40).await?;
    let s = connection_stats(&reg.url).await?;
    assert!(first > 1, "something was evicted");
    assert_eq!(s.history_bytes, (41 - first) * PACKET as u64);
    assert!(
        s.history_bytes <= BUDGET,
        "within the budget: {}",
        s.history_bytes
    );
    assert!(
        s.history_bytes + SEGMENT > BUDGET,
        "no more than needed was evicted"
    );
    assert!(s.records_bytes > 0);
    // Only whole segment files were deleted: what is left is the newest few.
    let files = if tests::on_postgres() {
        // The segments are partitions of the database's blocks table.
        let sql = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'blocks'::regclass";
        tests::pg_count(&data, sql).await?
    } else {
        // Each segment's frames (`.log`), beside the indexes of closed ones.
        std::fs::read_dir(data.join("registry/history"))?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log"))
            })
            .count() as u64
    };
    assert_eq!(files, s.history_bytes.div_ceil(SEGMENT));
    assert!(
        reg.proc.stderr().contains("evicted the oldest history"),
        "{}",
        reg.proc.stderr()
    );

    let json = interpose_json(&reg.url, &["conns", "stats", "--json"]).await?;
    assert_eq!(json["history_evicted_packets"], first - 1);
    assert_eq!(json["history_bytes"], s.history_bytes);
    assert_eq!(json["history_max_bytes"], BUDGET);
    assert_eq!(json["history_when_full"], "evict");
    let text = interpose(&reg.url, &["conns", "stats"]).await?.stdout;
    let line = format!(
        "history evicted:   {} packets, {} bytes",
        first - 1,
        (first - 1) * PACKET as u64
    );
    assert!(text.contains(&line), "{text}");
    assert!(
        text.contains("budget 65536 bytes (64.0 KiB), when full: evict"),
        "{text}"
    );

    // A restart keeps the history and the counts, and eviction goes on from there.
    drop(ingest);
    drop(client);
    assert!(reg.proc.terminate().await?, "clean exit");
    let reg = start(&data).await?;
    assert_eq!(check_kept(&reg, 40).await?, first);
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    for seq in 41..=46 {
        ingest
            .send_durable(vec![events::packet(1, seq, Direction::C2s, &payload(seq))])
            .await?;
    }
    assert_eq!(check_kept(&reg, 46).await?, first + 6);
    Ok(())
}

#[tokio::test]
async fn sigkill_during_eviction_loses_nothing_acknowledged_and_leaves_no_dangling_history()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut next = 1;
    for round in 0..3u64 {
        let reg = start(&data).await?;
        let mut client = reg.client().await?;
        let mut ingest = Ingest::open(&mut client, "n").await?;
        // Every batch of two packets fills most of a segment: the registry evicts all the
        // time, and the kill lands in the middle of it.
        let acked = std::cell::Cell::new(next - 1);
        let sending = async {
            let mut seq = next;
            loop {
                let batch = vec![
                    events::packet(1, seq, Direction::C2s, &payload(seq)),
                    events::packet(1, seq + 1, Direction::S2c, &payload(seq + 1)),
                ];
                if let Err(e) = ingest.send_durable(batch).await {
                    return e;
                }
                acked.set(seq + 1);
                seq += 2;
            }
        };
        // The kill lands while the registry evicts: this registry has evicted (its count
        // grew since it started) and goes on acknowledging batches, each of which evicts
        // again; a different number of batches each round, so the kill lands at different
        // points of the work.
        let evicted_at_start = connection_stats(&reg.url).await?.history_evicted_packets;
        let evicting = async {
            let mut since = None;
            loop {
                let s = connection_stats(&reg.url).await?;
                if since.is_none() && s.history_evicted_packets > evicted_at_start {
                    since = Some(acked.get());
                }
                if since.is_some_and(|at| acked.get() >= at + 2 * (round + 1)) {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            e = sending => anyhow::bail!("ingest failed: {e:#}"),
            done = tokio::time::timeout(tests::WAIT, evicting) => {
                done.map_err(|_| anyhow::anyhow!("no eviction under ingest in {:?}", tests::WAIT))??;
            }
        }
        reg.proc.kill().await;
        drop(client);
        let acked = acked.get();

        // Every acknowledged packet is kept unless evicted (and then counted); nothing
        // points into a deleted segment (the stats' count is what reads back).
        let reg = start(&data).await?;
        let first = check_kept(&reg, acked).await?;
        assert!(first > 1);
        let s = connection_stats(&reg.url).await?;
        assert!(
            s.history_bytes <= BUDGET + 2 * SEGMENT,
            "{}",
            s.history_bytes
        );
        next = stored_seqs(&reg).await?.last().copied().unwrap_or(acked) + 1;
        let log = reg.proc.stderr();
        assert!(reg.proc.terminate().await?, "clean exit; stderr:\n{log}");
    }
    Ok(())
}

async fn all_packets(reg: &Registry) -> anyhow::Result<Vec<proto::common::Packet>> {
    let mut client = reg.client().await?;
    let h = client
        .search_history(SearchHistoryRequest::default())
        .await?
        .into_inner();
    Ok(h.packets)
}

#[tokio::test]
async fn purge_deletes_what_it_is_asked_to_and_says_what_it_removed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let reg = Registry::start(&data).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    for conn in 1..=3 {
        ingest
            .send_durable(vec![
                events::open(conn, 5555, "example.test", 443),
                events::packet(conn, 1, Direction::C2s, &payload(conn)),
                events::packet(conn, 2, Direction::S2c, b"pong"),
            ])
            .await?;
    }
    let conns = |h: Vec<proto::common::Packet>| -> Vec<(u64, u64)> {
        h.iter().map(|p| (p.conn_id, p.seq)).collect()
    };

    // Exactly one selector.
    let out = interpose(&reg.url, &["history", "purge"]).await?;
    assert!(!out.ok);
    let out = interpose(&reg.url, &["history", "purge", "--all", "--conn", "1"]).await?;
    assert!(!out.ok, "{}", out.stderr);
    let out = interpose(&reg.url, &["history", "purge", "--before", "soon"]).await?;
    assert!(
        out.stderr.contains("neither an RFC 3339 time"),
        "{}",
        out.stderr
    );
    let bad = client
        .purge_history(proto::registry::PurgeHistoryRequest::default())
        .await;
    assert_eq!(
        bad.map(|_| ()).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    let out = interpose(&reg.url, &["history", "purge", "--conn", "1", "3"]).await?;
    assert!(out.ok, "{}", out.stderr);
    let line = format!("purged 4 packet(s), {} bytes;", 2 * (PACKET + 4));
    assert!(out.stdout.starts_with(&line), "{}", out.stdout);
    assert_eq!(conns(all_packets(&reg).await?), [(2, 1), (2, 2)]);
    // Records stay.
    let listed = interpose_json(&reg.url, &["conns", "list", "--json"]).await?;
    assert_eq!(listed.as_array().map(Vec::len), Some(3));

    // Nothing is older than an hour; everything is older than now (an age of 0s).
    let out = interpose(&reg.url, &["history", "purge", "--before", "1h"]).await?;
    assert!(
        out.stdout.starts_with("purged 0 packet(s)"),
        "{}",
        out.stdout
    );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let out = interpose(&reg.url, &["history", "purge", "--before", "0s"]).await?;
    assert!(
        out.stdout.starts_with("purged 2 packet(s)"),
        "{}",
        out.stdout
    );
    assert!(all_packets(&reg).await?.is_empty());

    // --all frees every segment file, recording goes on, and stats add it all up.
    ingest
        .send_durable(vec![events::packet(2, 3, Direction::C2s, &payload(7))])
        .await?;
    let out = interpose(&reg.url, &["history", "purge", "--all"]).await?;
    let line = format!("purged 1 packet(s), {PACKET} bytes; ");
    assert!(out.stdout.starts_with(&line), "{}", out.stdout);
    let s = connection_stats(&reg.url).await?;
    assert_eq!((s.history_bytes, s.history_packets), (0, 0));
    assert_eq!(s.history_purged_packets, 7);
    assert_eq!(s.history_purged_bytes, 4 * PACKET as u64 + 3 * 4);
    let json = interpose_json(&reg.url, &["conns", "stats", "--json"]).await?;
    assert_eq!(json["history_purged_packets"], 7);
    ingest
        .send_durable(vec![events::packet(2, 4, Direction::C2s, &payload(8))])
        .await?;
    assert_eq!(conns(all_packets(&reg).await?), [(2, 4)]);
    Ok(())
}

/// The next event of a follow stream.
async fn next(
    events: &mut tonic::Streaming<proto::registry::FollowHistoryEvent>,
) -> anyhow::Result<proto::registry::FollowHistoryEvent> {
    tokio::time::timeout(tests::WAIT, events.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the follow stream ended"))
}

#[tokio::test]
async fn a_follower_behind_the_eviction_is_told_of_the_gap() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = start(&dir.path().join("data")).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    for seq in 1..=40 {
        ingest
            .send_durable(vec![events::packet(1, seq, Direction::C2s, &payload(seq))])
            .await?;
    }
    let first = check_kept(&reg, 40).await?;
    // Each batch took one arrival position, so packet N is at position N.
    let mut events = client
        .follow_history(proto::registry::FollowHistoryRequest {
            after: Some(1),
            ..Default::default()
        })
        .await?
        .into_inner();
    let gap = next(&mut events).await?;
    assert_eq!((gap.evicted_through, gap.position), (first - 1, first - 1));
    assert!(gap.packet.is_none());
    for seq in first..=40 {
        let e = next(&mut events).await?;
        let p = e.packet.expect("a packet");
        assert_eq!((p.seq, e.position, e.evicted_through), (seq, seq, 0));
    }
    Ok(())
}

#[tokio::test]
async fn stop_at_the_budget_keeps_the_oldest_and_counts_what_it_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // 17,000 bytes of disk: four packets of 4000 with their frames' headers, not a fifth.
    let args = ["--history-max-bytes", "17KB", "--history-full", "stop"];
    let reg = Registry::start_with(&data, "127.0.0.1:0", &args).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "n").await?;
    ingest
        .send_durable(vec![events::open(1, 5555, "example.test", 443)])
        .await?;
    for seq in 1..=6 {
        ingest
            .send_durable(vec![events::packet(1, seq, Direction::C2s, &payload(seq))])
            .await?;
    }
    // The fifth and sixth are refused.
    assert_eq!(stored_seqs(&reg).await?, [1, 2, 3, 4]);
    let s = connection_stats(&reg.url).await?;
    assert_eq!(
        (s.history_refused_packets, s.history_refused_bytes),
        (2, 8000)
    );
    assert_eq!(
        (s.history_evicted_packets, s.history_when_full.as_str()),
        (0, "stop")
    );
    assert!(
        reg.proc.stderr().contains("history reached its budget"),
        "{}",
        reg.proc.stderr()
    );
    let text = interpose(&reg.url, &["conns", "stats"]).await?.stdout;
    assert!(
        text.contains("history refused:   2 packets, 8000 bytes"),
        "{text}"
    );
    // The record itself is kept and complete; a purge makes room and recording resumes.
    let out = interpose(&reg.url, &["history", "purge", "--conn", "1"]).await?;
    // sled frees the four packets' 16,000 bytes in four frames of 72 bytes of headers each;
    // PostgreSQL counts what it frees in payload bytes, as its budget does.
    let freed = if tests::on_postgres() { 16_000 } else { 16_288 };
    assert!(
        out.stdout.contains(&format!(
            "purged 4 packet(s), 16000 bytes; {freed} bytes of history files deleted"
        )),
        "{}",
        out.stdout
    );
    ingest
        .send_durable(vec![events::packet(1, 7, Direction::C2s, &payload(7))])
        .await?;
    assert_eq!(stored_seqs(&reg).await?, [7]);
    assert!(
        reg.proc.stderr().contains("recording resumes"),
        "{}",
        reg.proc.stderr()
    );
    Ok(())
}
