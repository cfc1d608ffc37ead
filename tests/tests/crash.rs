//! Crashes of the registry under heavy ingest: `kill -9` of the real `registry-svc` process
//! at random points of a stream of batches, many rounds on the same data directory, and a
//! torn last frame written into the history log by hand. After each restart every
//! acknowledged packet must be in the history byte for byte, none twice (the count the store
//! keeps equals the distinct packets a full search returns, and the log itself holds none
//! twice), and ingest resumes, replaying what was not acknowledged as a proxy does.
//!
//! The kill points come from a seed printed at the start (`CRASH_SEED=N` repeats a run).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use proto::{
    common::Direction,
    registry::{ConnectionStatsRequest, FollowHistoryRequest, SearchHistoryRequest},
};
use tests::{Ingest, Registry, WAIT, events};

type Client = proto::registry::registry_client::RegistryClient<platform::client::AuthChannel>;

/// Kill rounds (each a restart, a random amount of ingest, a kill and a check).
const ROUNDS: u64 = 8;
/// Connections the packets are spread over.
const CONNS: u64 = 40;
/// Packets per batch.
const BATCH: u64 = 400;
/// Unacknowledged batches in flight.
const WINDOW: u64 = 16;

/// A small xorshift generator: the kill points, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The payload of packet (conn, seq): its own bytes, of a length that varies with it.
fn payload(conn: u64, seq: u64) -> Vec<u8> {
    let len = 1 + ((conn * 7919 + seq * 104_729) % 3000) as usize;
    let tag = format!("{conn}:{seq};");
    tag.bytes().cycle().take(len).collect()
}

/// Batch `b` (numbered from 0 across the whole test): `BATCH` packets, each connection's
/// seqs continuing where the previous batch left them.
fn batch(b: u64) -> Vec<(u64, u64)> {
    (0..BATCH)
        .map(|i| {
            let n = b * BATCH + i;
            (1 + n % CONNS, 1 + n / CONNS)
        })
        .collect()
}

fn batch_events(b: u64) -> Vec<proto::registry::Event> {
    batch(b)
        .into_iter()
        .map(|(c, s)| events::packet(c, s, Direction::C2s, &payload(c, s)))
        .collect()
}

async fn start(dir: &Path) -> anyhow::Result<Registry> {
    Registry::start_on(dir, None, "127.0.0.1:0", &["--history-max-bytes", "0"]).await
}

/// Every packet a full search returns, by (conn, seq), each checked byte for byte.
async fn all_history(client: &mut Client) -> anyhow::Result<BTreeMap<(u64, u64), usize>> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .search_history(SearchHistoryRequest {
                page_size: 20_000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        for p in page.packets {
            anyhow::ensure!(
                p.data == payload(p.conn_id, p.seq),
                "packet {}/{} does not read back byte for byte",
                p.conn_id,
                p.seq
            );
            *out.entry((p.conn_id, p.seq)).or_default() += 1;
        }
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// How many packets of each (conn, seq) the log holds, read in arrival order by a follower
/// resuming after position 0 (no snapshot: the log itself) until it has seen `count`.
async fn followed(client: &mut Client, count: u64) -> anyhow::Result<HashMap<(u64, u64), u64>> {
    let mut stream = client
        .follow_history(FollowHistoryRequest {
            after: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut seen = HashMap::new();
    let mut n = 0;
    while n < count {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the follow stream ended"))?;
        if let Some(p) = ev.packet {
            *seen.entry((p.conn_id, p.seq)).or_default() += 1;
            n += 1;
        }
    }
    Ok(seen)
}

/// Checks the store after a restart: every packet of batches up to `acked` (exclusive) is
/// there byte for byte, nothing is there twice, and the stored count agrees.
async fn check(reg: &Registry, acked: u64, round: u64) -> anyhow::Result<u64> {
    let mut client = reg.client().await?;
    let stored = all_history(&mut client).await?;
    let stats = client
        .connection_stats(ConnectionStatsRequest::default())
        .await?
        .into_inner();
    // History the registry could not write (a full disk) is acknowledged and counted, as
    // documented; say so rather than blame the crash recovery.
    let unwritten = match stats.history_unwritten_packets {
        0 => String::new(),
        n => format!(" (the registry counts {n} packets it could not write: was the disk full?)"),
    };
    for b in 0..acked {
        for key in batch(b) {
            anyhow::ensure!(
                stored.contains_key(&key),
                "round {round}: acknowledged packet {key:?} (batch {b}) is missing{unwritten}"
            );
        }
    }
    anyhow::ensure!(
        stats.history_packets == stored.len() as u64,
        "round {round}: the store counts {} packets, a search finds {}",
        stats.history_packets,
        stored.len()
    );
    let log = followed(&mut client, stats.history_packets).await?;
    let twice: Vec<_> = log.iter().filter(|(_, n)| **n > 1).collect();
    anyhow::ensure!(
        twice.is_empty(),
        "round {round}: in the log twice: {twice:?}"
    );
    anyhow::ensure!(
        log.len() == stored.len(),
        "round {round}: the log holds {} packets, a search finds {}",
        log.len(),
        stored.len()
    );
    Ok(stored.len() as u64)
}

/// Sends batches from `first` on, `WINDOW` in flight, publishing the first batch not yet
/// acknowledged; runs until the stream breaks.
async fn pump(client: &mut Client, first: u64, acked: Arc<AtomicU64>) -> anyhow::Result<()> {
    let mut ingest = Ingest::open(client, "crash").await?;
    let mut b = first;
    loop {
        let n = ingest.send(batch_events(b)).await?;
        b += 1;
        if n > WINDOW {
            ingest.wait_ack(n - WINDOW).await?;
            acked.store(first + n - WINDOW, Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn kill_9_under_heavy_ingest_loses_no_acknowledged_packet_and_stores_none_twice()
-> anyhow::Result<()> {
    let seed = match std::env::var("CRASH_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                | 1
        }
    };
    eprintln!("CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // Batches below it were acknowledged; the next round replays from it, as a proxy
    // replays what it holds unacknowledged.
    let mut acked = 0u64;
    for round in 0..ROUNDS {
        let reg = start(&data).await?;
        let stored = check(&reg, acked, round).await?;
        let mut client = reg.client().await?;
        let progress = Arc::new(AtomicU64::new(acked));
        let sender = tokio::spawn({
            let progress = progress.clone();
            async move { pump(&mut client, acked, progress).await }
        });
        // Kill once at least a few batches past the last round went through, then at a
        // random point up to half a second later.
        tests::eventually("ingest under way", || {
            let p = progress.load(Ordering::SeqCst);
            async move { Ok((p >= acked + 2).then_some(())) }
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(rng.next() % 500)).await;
        let pid = reg.proc.pid();
        reg.proc.kill().await;
        let sent = tokio::time::timeout(WAIT, sender).await??;
        anyhow::ensure!(
            sent.is_err(),
            "the ingest stream outlived the kill ({pid:?})"
        );
        let now = progress.load(Ordering::SeqCst);
        eprintln!(
            "round {round}: {stored} packets stored at start; acknowledged batches {acked}..{now}"
        );
        anyhow::ensure!(now > acked, "round {round}: nothing was acknowledged");
        acked = now;
    }
    let reg = start(&data).await?;
    check(&reg, acked, ROUNDS).await?;
    reg.proc.kill().await;
    Ok(())
}

#[tokio::test]
async fn a_torn_last_frame_is_cut_off_at_restart_and_ingest_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let reg = start(&data).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "torn").await?;
    for b in 0..3 {
        ingest.send_durable(batch_events(b)).await?;
    }
    reg.proc.kill().await;
    // The start of one more frame, as a crash in the middle of its write leaves it: the
    // magic, a length far beyond the end of the file, a checksum and a few body bytes.
    let log = data.join("registry").join("history").join("000001.log");
    let len = std::fs::metadata(&log)?.len();
    let mut torn = b"IPH1".to_vec();
    torn.extend_from_slice(&100_000u32.to_le_bytes());
    torn.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    torn.extend_from_slice(&[7u8; 300]);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log)?;
        f.write_all(&torn)?;
    }
    let reg = start(&data).await?;
    anyhow::ensure!(
        std::fs::metadata(&log)?.len() == len,
        "the torn frame was not cut off"
    );
    let said = reg.proc.stderr();
    anyhow::ensure!(
        said.contains("cut off a torn or corrupt frame"),
        "no log line about the torn frame: {said}"
    );
    check(&reg, 3, 0).await?;
    // Ingest resumes after it: a replay of the last batch and two new ones.
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "torn").await?;
    for b in 2..5 {
        ingest.send_durable(batch_events(b)).await?;
    }
    anyhow::ensure!(check(&reg, 5, 1).await? == 5 * BATCH);
    reg.proc.kill().await;
    Ok(())
}
