//! Registry benchmark: ingest through the gRPC ingest stream (small packets and 16 KiB
//! payloads, acknowledged only once durable), listing 100,000 records, and how a store that
//! already holds many records and much history behaves (ingest, `conns list --status
//! active`, a watch's snapshot of the active connections, memory).
//!
//! `cargo run --release -p tests --bin bench-registry [small] [large] [list] [growth]
//! [stores]` (all phases but `stores` when none is named). `stores` compares the sled store
//! with PostgreSQL (a durable throwaway cluster, fsync on, in the same temp dir) in one run:
//! ingest, list, open-to-watch latency, and ingest through two replicas against one. It starts a release `registry-svc` on loopback with a
//! fresh data directory per run and prints medians. The growth phase stores
//! `GROWTH_RECORDS` records (default 1,000,000) and `GROWTH_HISTORY_GIB` GiB of history
//! (default 10) first; it needs that much free disk under the temp directory.
//!
//! With `BENCH_BASELINE=/path/to/registry-svc` (a release build of an earlier commit) the
//! `small`, `large` and `growth` phases run twice in the same run, first on that binary
//! ("before"), then on this workspace's ("after"), and print the ratios; `stores` then
//! measures PostgreSQL's ingest on that binary too ("postgres before"), between sled's and
//! the workspace's PostgreSQL, and prints each PostgreSQL / sled ratio.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context;

use proto::{
    common::{ConnStatus, Direction},
    registry::{
        ConnectionFilter, ListConnectionsRequest, SearchHistoryRequest, WatchConnectionsRequest,
        event::Kind, registry_client::RegistryClient, watch_event,
    },
};
use tests::{
    Ingest, Registry, events,
    stats::{median, percentile, rss_bytes},
};

type Client = RegistryClient<platform::client::AuthChannel>;

const RUNS: usize = 5;
const SMALL_PACKETS: u64 = 1_000_000;
const SMALL_PAYLOAD: usize = 64;
const SMALL_BATCH: u64 = 1_000;
const LARGE_PAYLOAD: usize = 16 * 1024;
/// 16 KiB packets per batch: 1 MiB, the reporter's batch size.
const LARGE_BATCH: u64 = 64;
const LARGE_BYTES: u64 = 2 << 30;
/// Unacknowledged batches in flight, as a busy proxy's reporter keeps them.
const WINDOW: u64 = 32;
/// Connections the packets are spread over.
const CONNS: u64 = 100;
const RECORDS: u64 = 100_000;
/// Active connections among the growth phase's records.
const GROWTH_ACTIVE: u64 = 1_000;

/// The registry binary the phases start when not the workspace's (`BENCH_BASELINE`).
static BASELINE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Starts a registry whose history budget is out of the way of the growth phase.
async fn registry(dir: &std::path::Path) -> anyhow::Result<Registry> {
    // Long-lived gRPC connections: the phases keep one client for minutes.
    registry_on(
        dir,
        None,
        &["--grpc-max-age", "1h", "--grpc-idle-timeout", "1h"],
    )
    .await
}

/// Starts a registry with no history budget, keeping its store in the database at `store`
/// or else in `dir`: the baseline binary when one is set (`BENCH_BASELINE`), else the
/// workspace's.
async fn registry_on(
    dir: &std::path::Path,
    store: Option<String>,
    extra: &[&str],
) -> anyhow::Result<Registry> {
    let baseline = BASELINE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(bin) = baseline else {
        return Registry::start_on(
            dir,
            store,
            "127.0.0.1:0",
            &[&["--history-max-bytes", "0"][..], extra].concat(),
        )
        .await;
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--no-auth",
        "--history-max-bytes",
        "0",
        "--data-dir",
    ])
    .arg(dir)
    .args(extra)
    .env_remove("INTERPOSE_TOKEN")
    .env_remove("INTERPOSE_STORE");
    if let Some(url) = store {
        cmd.env("INTERPOSE_STORE", url);
    }
    let proc = tests::Proc::start(cmd, dir.with_extension("registry.log")).await?;
    let listen = proc.field("listen").context("listen= in the ready line")?;
    Ok(Registry {
        url: format!("http://{listen}"),
        proc,
    })
}

/// The largest RSS of process `pid` seen until `stop` is set, sampled every 50 ms.
fn peak_rss(
    pid: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    })
}

/// Sends `packets` packets of `payload` bytes over connections `first..first + CONNS`
/// (already open), `batch` per batch, and waits for the last acknowledgement; returns
/// packets per second. `seq0` is the sequence the connections' packets continue after.
async fn ingest(
    ingest: &mut Ingest,
    first: u64,
    seq0: u64,
    packets: u64,
    payload: usize,
    batch: u64,
) -> anyhow::Result<f64> {
    let data = vec![0x41u8; payload];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut last = 0;
    while sent < packets {
        let evs = (sent..sent + batch)
            .map(|i| {
                let dir = if i % 2 == 0 {
                    Direction::C2s
                } else {
                    Direction::S2c
                };
                events::packet(first + i % CONNS, seq0 + i / CONNS + 1, dir, &data)
            })
            .collect();
        last = ingest.send(evs).await?;
        sent += batch;
        if last > WINDOW {
            ingest.wait_ack(last - WINDOW).await?;
        }
    }
    ingest.wait_ack(last).await?;
    Ok(packets as f64 / start.elapsed().as_secs_f64())
}

/// Opens connections `first..first + CONNS` as active records.
async fn open_conns(ingest: &mut Ingest, first: u64) -> anyhow::Result<()> {
    ingest
        .send_durable(
            (first..first + CONNS)
                .map(|id| events::open(id, 1, "h", 80))
                .collect(),
        )
        .await
}

/// Packets (or bytes, with `payload`) per second for runs on fresh stores.
async fn ingest_runs(packets: u64, payload: usize, batch: u64) -> anyhow::Result<Vec<f64>> {
    let mut rates = Vec::new();
    for _ in 0..RUNS {
        let dir = tempfile::tempdir()?;
        let reg = registry(dir.path()).await?;
        let mut client = reg.client().await?;
        let mut stream = Ingest::open(&mut client, "bench").await?;
        open_conns(&mut stream, 1).await?;
        rates.push(ingest(&mut stream, 1, 0, packets, payload, batch).await?);
        reg.proc.kill().await;
    }
    Ok(rates)
}

fn list(v: &[f64], unit: &str) -> String {
    v.iter()
        .map(|r| format!("{r:.0}{unit}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn small() -> anyhow::Result<f64> {
    let rates = ingest_runs(SMALL_PACKETS, SMALL_PAYLOAD, SMALL_BATCH).await?;
    println!(
        "ingest small: {SMALL_PACKETS} packets of {SMALL_PAYLOAD} B over {CONNS} connections, \
         batches of {SMALL_BATCH}, {WINDOW} batches in flight"
    );
    println!("  runs (packets/s): {}", list(&rates, ""));
    let rate = median(rates);
    println!("  median: {rate:.0} packets/s");
    Ok(rate)
}

async fn large() -> anyhow::Result<f64> {
    let packets = LARGE_BYTES / LARGE_PAYLOAD as u64;
    let rates: Vec<f64> = ingest_runs(packets, LARGE_PAYLOAD, LARGE_BATCH)
        .await?
        .into_iter()
        .map(|r| r * LARGE_PAYLOAD as f64 / 1e6)
        .collect();
    println!(
        "ingest large: {} GiB in packets of {} KiB, batches of {LARGE_BATCH} (1 MiB), \
         {WINDOW} in flight",
        LARGE_BYTES >> 30,
        LARGE_PAYLOAD / 1024
    );
    println!("  runs (MB/s): {}", list(&rates, ""));
    let disk = disk_write_rate()?;
    let rate = median(rates);
    println!(
        "  median: {rate:.0} MB/s; this disk takes {disk:.0} MB/s (1 MiB writes, then \
         fdatasync, in the same temp dir): {:.2}x the disk",
        rate / disk
    );
    Ok(rate)
}

/// The ceiling for durable history: MB/s of writing `LARGE_BYTES` to a file in the temp
/// dir in 1 MiB writes, then fdatasync, as `dd conv=fdatasync` measures it.
fn disk_write_rate() -> anyhow::Result<f64> {
    use std::io::Write;
    let mut file = tempfile::tempfile()?;
    let block = vec![0x41u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..LARGE_BYTES >> 20 {
        file.write_all(&block)?;
    }
    file.sync_data()?;
    Ok(LARGE_BYTES as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Pages through `ListConnections` with `filter`: (time, records).
async fn list_all(client: &mut Client, filter: &ConnectionFilter) -> anyhow::Result<(f64, usize)> {
    let start = Instant::now();
    let mut n = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list_connections(ListConnectionsRequest {
                filter: Some(filter.clone()),
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        n += page.connections.len();
        if page.next_page_token.is_empty() {
            return Ok((ms(start.elapsed()), n));
        }
        token = page.next_page_token;
    }
}

/// Seconds a `SearchHistory` for bytes stored nowhere takes to page through everything (so
/// every packet's payload is searched), and the packets it found (none is expected).
async fn search_everything(client: &mut Client) -> anyhow::Result<(f64, usize)> {
    let start = Instant::now();
    let mut n = 0;
    let mut token = String::new();
    loop {
        let page = client
            .search_history(SearchHistoryRequest {
                contains: b"no such bytes \xfe\xff".to_vec(),
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        n += page.packets.len();
        if page.next_page_token.is_empty() {
            return Ok((start.elapsed().as_secs_f64(), n));
        }
        token = page.next_page_token;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median milliseconds of `interpose conns list --json ARGS` end to end.
fn cli_list(reg: &Registry, args: &[&str], want: usize) -> anyhow::Result<Vec<f64>> {
    let cli = tests::bin("interpose");
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut cmd = std::process::Command::new(&cli);
        cmd.args(["conns", "list", "--json", "--server", &reg.url])
            .args(args);
        if let Some(file) = tests::token_file(&reg.url) {
            cmd.env("INTERPOSE_TOKEN_FILE", file);
        }
        let out = cmd.output()?;
        anyhow::ensure!(out.status.success(), "interpose conns list failed");
        let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        anyhow::ensure!(
            listed.len() == want,
            "conns list printed {} records",
            listed.len()
        );
        times.push(ms(start.elapsed()));
    }
    Ok(times)
}

/// Opens records 1 to `RECORDS`, 1,000 per batch.
async fn fill_records(stream: &mut Ingest) -> anyhow::Result<()> {
    for chunk in (1..=RECORDS).collect::<Vec<_>>().chunks(1000) {
        let opens = chunk
            .iter()
            .map(|&id| events::open(id, 40000, "example.test", 443))
            .collect();
        stream.send_durable(opens).await?;
    }
    Ok(())
}

/// Milliseconds of `RUNS` lists of every record (`RECORDS` of them).
async fn time_lists(client: &mut Client) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let (t, n) = list_all(client, &ConnectionFilter::default()).await?;
        anyhow::ensure!(n == RECORDS as usize, "listed {n} records");
        times.push(t);
    }
    Ok(times)
}

async fn list_phase() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = registry(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut stream = Ingest::open(&mut client, "bench").await?;
    fill_records(&mut stream).await?;
    let times = time_lists(&mut client).await?;
    let cli_times = cli_list(&reg, &[], RECORDS as usize)?;
    println!("list: {RECORDS} records");
    println!(
        "  gRPC ListConnections, all pages (ms): {}; median {:.0} ms",
        list(&times, ""),
        median(times.clone())
    );
    println!(
        "  `interpose conns list --json` end to end (ms): {}; median {:.0} ms",
        list(&cli_times, ""),
        median(cli_times.clone())
    );
    reg.proc.kill().await;
    Ok(())
}

/// Milliseconds from a watch request (active records only) to its SNAPSHOT_END, and the
/// records in the snapshot.
async fn watch_snapshot(client: &mut Client, active_only: bool) -> anyhow::Result<(f64, usize)> {
    let filter = active_only.then(|| ConnectionFilter {
        status: ConnStatus::Active as i32,
        ..Default::default()
    });
    let start = Instant::now();
    let mut stream = client
        .watch_connections(WatchConnectionsRequest {
            filter,
            start_id: 0,
        })
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(ev) = stream.message().await? {
        if ev.kind == watch_event::Kind::SnapshotEnd as i32 {
            return Ok((ms(start.elapsed()), n));
        }
        n += 1;
    }
    anyhow::bail!("the watch ended before its snapshot did")
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

async fn growth() -> anyhow::Result<()> {
    let records = env_u64("GROWTH_RECORDS", 1_000_000)?;
    let history_gib = env_u64("GROWTH_HISTORY_GIB", 10)?;
    let dir = tempfile::tempdir()?;
    let reg = registry(dir.path()).await?;
    let pid = reg
        .proc
        .pid()
        .ok_or_else(|| anyhow::anyhow!("registry has no pid"))?;
    let mut client = reg.client().await?;
    let mut stream = Ingest::open(&mut client, "bench").await?;
    let rss_start = rss_bytes(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = peak_rss(pid, stop.clone());

    // The connections the ingest runs use: IDs 1..=100, before and after the growth.
    open_conns(&mut stream, 1).await?;
    let empty = ingest(&mut stream, 1, 0, SMALL_PACKETS, SMALL_PAYLOAD, SMALL_BATCH).await?;
    let rss_empty = rss_bytes(pid);

    // Records: all closed but GROWTH_ACTIVE of them, as a long-running lab's store is.
    let start = Instant::now();
    let base = 1_000;
    let ids: Vec<u64> = (base..base + records).collect();
    for chunk in ids.chunks(5_000) {
        let evs = chunk
            .iter()
            .map(|&id| {
                let mut ev = events::open(id, 40000, "example.test", 443);
                if id >= base + GROWTH_ACTIVE
                    && let Some(Kind::Opened(c)) = &mut ev.kind
                {
                    c.status = ConnStatus::Disconnected as i32;
                }
                ev
            })
            .collect();
        let seq = stream.send(evs).await?;
        if seq > 8 {
            stream.wait_ack(seq - 8).await?;
        }
    }
    stream.send_durable(Vec::new()).await?;
    let records_secs = start.elapsed().as_secs_f64();
    let rss_records = rss_bytes(pid);

    // History: 16 KiB packets over 100 other connections.
    let start = Instant::now();
    let hist_first = base + records;
    open_conns(&mut stream, hist_first).await?;
    let packets = (history_gib << 30) / LARGE_PAYLOAD as u64;
    let large_rate = ingest(
        &mut stream,
        hist_first,
        0,
        packets,
        LARGE_PAYLOAD,
        LARGE_BATCH,
    )
    .await?;
    let history_secs = start.elapsed().as_secs_f64();
    let rss_history = rss_bytes(pid);

    let grown = ingest(
        &mut stream,
        1,
        SMALL_PACKETS / CONNS,
        SMALL_PACKETS,
        SMALL_PAYLOAD,
        SMALL_BATCH,
    )
    .await?;

    // Search by contents over the whole history (the grown store's 10 GiB and the small
    // packets), as `interpose history --grep` does with no other condition.
    let (search_secs, found) = search_everything(&mut client).await?;
    anyhow::ensure!(found == 0, "the search found {found} packets");
    let searched = (history_gib << 30) + 2 * SMALL_PACKETS * SMALL_PAYLOAD as u64;
    let rss_search = rss_bytes(pid);

    let active = ConnectionFilter {
        status: ConnStatus::Active as i32,
        ..Default::default()
    };
    // 100 + 100 ingest connections and GROWTH_ACTIVE records are active.
    let want_active = (GROWTH_ACTIVE + 2 * CONNS) as usize;
    let mut list_times = Vec::new();
    let mut watch_times = Vec::new();
    for _ in 0..RUNS {
        let (t, n) = list_all(&mut client, &active).await?;
        anyhow::ensure!(n == want_active, "listed {n} active records");
        list_times.push(t);
        let (t, n) = watch_snapshot(&mut client, true).await?;
        anyhow::ensure!(n == want_active, "watch snapshot had {n} active records");
        watch_times.push(t);
    }
    let cli_times = cli_list(&reg, &["--status", "active"], want_active)?;
    let (all_watch, all_n) = watch_snapshot(&mut client, false).await?;
    let rss_end = rss_bytes(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = peak.await?;

    println!("growth: {records} records ({GROWTH_ACTIVE} active) and {history_gib} GiB of history");
    println!(
        "  stored {records} records in {records_secs:.1} s ({:.0}/s), {history_gib} GiB of \
         history in {history_secs:.1} s ({:.0} MB/s)",
        records as f64 / records_secs,
        large_rate * LARGE_PAYLOAD as f64 / 1e6
    );
    println!(
        "  ingest small packets: empty store {empty:.0}/s, grown store {grown:.0}/s: {:.2}x",
        grown / empty
    );
    println!(
        "  {want_active} active: gRPC list (ms) {}; median {:.0} ms",
        list(&list_times, ""),
        median(list_times.clone())
    );
    println!(
        "  `interpose conns list --json --status active` end to end (ms) {}; median {:.0} ms",
        list(&cli_times, ""),
        median(cli_times.clone())
    );
    println!(
        "  watch snapshot of the active records (ms) {}; median {:.0} ms",
        list(&watch_times, ""),
        median(watch_times.clone())
    );
    println!("  watch snapshot of all {all_n} records: {all_watch:.0} ms");
    println!(
        "  search by contents over all the history ({:.2} GB of payload): {search_secs:.1} s, \
         {:.2} GB/s",
        searched as f64 / 1e9,
        searched as f64 / 1e9 / search_secs
    );
    println!(
        "  registry RSS: start {}, after 1M small packets {}, after the records {}, after the \
         history {}, after the search {}, at the end {}",
        mib(rss_start),
        mib(rss_empty),
        mib(rss_records),
        mib(rss_history),
        mib(rss_search),
        mib(rss_end)
    );
    println!(
        "  registry RSS at its highest (sampled every 50 ms over the whole phase): {}",
        mib(Some(peak))
    );
    reg.proc.kill().await;
    Ok(())
}

/// Packets of the `stores` phase's small-packet runs (each run on a fresh store).
const STORES_SMALL: u64 = 300_000;
/// Bytes of its 16 KiB runs.
const STORES_LARGE: u64 = 512 << 20;
/// Opens timed from ingest to a watcher.
const LATENCY_OPENS: u64 = 1_000;

/// A fresh store: sled in a data dir, or a new database on `cluster`.
async fn fresh(
    dir: &std::path::Path,
    cluster: Option<&pg_fixture::Cluster>,
) -> anyhow::Result<Registry> {
    let store = cluster.map(|c| c.create_database()).transpose()?;
    registry_on(dir, store, &[]).await
}

/// Median rate of `RUNS` ingest runs on fresh stores.
async fn store_ingest(
    cluster: Option<&pg_fixture::Cluster>,
    packets: u64,
    payload: usize,
    batch: u64,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut rates = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir()?;
        let reg = fresh(dir.path(), cluster).await?;
        let mut client = reg.client().await?;
        let mut stream = Ingest::open(&mut client, "bench").await?;
        open_conns(&mut stream, 1).await?;
        rates.push(ingest(&mut stream, 1, 0, packets, payload, batch).await?);
        reg.proc.kill().await;
    }
    Ok((median(rates.clone()), rates))
}

/// Milliseconds from sending an open (one per batch) to a watcher receiving it.
async fn open_to_watch(cluster: Option<&pg_fixture::Cluster>) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let reg = fresh(dir.path(), cluster).await?;
    let mut client = reg.client().await?;
    let mut watch = client
        .watch_connections(WatchConnectionsRequest::default())
        .await?
        .into_inner();
    while let Some(ev) = watch.message().await? {
        if ev.kind == watch_event::Kind::SnapshotEnd as i32 {
            break;
        }
    }
    let mut stream = Ingest::open(&mut client, "bench").await?;
    let mut times = Vec::new();
    for id in 1..=LATENCY_OPENS {
        let start = Instant::now();
        stream.send(vec![events::open(id, 40000, "h", 80)]).await?;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await??
                .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
            if ev.id == id {
                break;
            }
        }
        times.push(ms(start.elapsed()));
    }
    reg.proc.kill().await;
    Ok(times)
}

/// Packets per second of two streams at once, both to the first registry or one each.
async fn two_streams(regs: &[&Registry], first_ids: [u64; 2]) -> anyhow::Result<f64> {
    let mut tasks = Vec::new();
    for (i, first) in first_ids.into_iter().enumerate() {
        let mut client = tests::registry_client(&regs[i % regs.len()].url, Some("bench")).await?;
        tasks.push(tokio::spawn(async move {
            let mut stream = Ingest::open(&mut client, &format!("bench-{i}")).await?;
            open_conns(&mut stream, first).await?;
            let start = Instant::now();
            ingest(
                &mut stream,
                first,
                0,
                STORES_SMALL,
                SMALL_PAYLOAD,
                SMALL_BATCH,
            )
            .await?;
            anyhow::Ok(start.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await??);
    }
    Ok(2.0 * STORES_SMALL as f64 / slowest.as_secs_f64())
}

async fn stores() -> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(pg_fixture::Cluster::start_durable).await??;
    println!(
        "stores: sled against PostgreSQL (durable throwaway cluster on 127.0.0.1, fsync on, \
         data in the same temp dir), medians of 3 runs on fresh stores"
    );
    // With a baseline binary, PostgreSQL is measured on it too ("postgres before").
    let mut passes = vec![("sled", None, None)];
    if let Some(bin) = std::env::var_os("BENCH_BASELINE") {
        passes.push(("postgres before", Some(&cluster), Some(PathBuf::from(bin))));
    }
    passes.push(("postgres", Some(&cluster), None));
    // (name, small packets/s, 16 KiB MB/s)
    let mut rates: Vec<(&str, f64, f64)> = Vec::new();
    for (name, pg, bin) in passes {
        *BASELINE.lock().unwrap_or_else(|e| e.into_inner()) = bin.clone();
        let (small, runs) = store_ingest(pg, STORES_SMALL, SMALL_PAYLOAD, SMALL_BATCH).await?;
        println!(
            "  {name}: ingest {STORES_SMALL} packets of {SMALL_PAYLOAD} B, batches of \
             {SMALL_BATCH}: {small:.0} packets/s ({})",
            list(&runs, "")
        );
        let (large, runs) = store_ingest(
            pg,
            STORES_LARGE / LARGE_PAYLOAD as u64,
            LARGE_PAYLOAD,
            LARGE_BATCH,
        )
        .await?;
        let mbs = |r: f64| r * LARGE_PAYLOAD as f64 / 1e6;
        println!(
            "  {name}: ingest {} MiB in 16 KiB packets: {:.0} MB/s ({})",
            STORES_LARGE >> 20,
            mbs(large),
            list(&runs.into_iter().map(mbs).collect::<Vec<_>>(), "")
        );
        rates.push((name, small, mbs(large)));
        if bin.is_some() {
            // The baseline's ingest only: list and latency are not what it is kept for.
            *BASELINE.lock().unwrap_or_else(|e| e.into_inner()) = None;
            continue;
        }
        let dir = tempfile::tempdir()?;
        let reg = fresh(dir.path(), pg).await?;
        let mut client = reg.client().await?;
        let mut stream = Ingest::open(&mut client, "bench").await?;
        fill_records(&mut stream).await?;
        let times = time_lists(&mut client).await?;
        println!(
            "  {name}: list {RECORDS} records, all pages: median {:.0} ms ({})",
            median(times.clone()),
            list(&times, "")
        );
        reg.proc.kill().await;
        let mut lat = open_to_watch(pg).await?;
        println!(
            "  {name}: open to watch, {LATENCY_OPENS} opens one at a time: p50 {:.2} ms, p99 \
             {:.2} ms, max {:.2} ms",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            percentile(&mut lat, 1.0)
        );
    }
    if let Some(&(_, sled_small, sled_large)) = rates.first() {
        for &(name, small, large) in &rates[1..] {
            println!(
                "  {name} / sled: small packets {:.2}x, 16 KiB {:.2}x",
                small / sled_small,
                large / sled_large
            );
        }
    }
    // Two ingest streams on one database: both through one replica, then one each.
    let url = cluster.create_database()?;
    let dir = tempfile::tempdir()?;
    let a = Registry::start_on(
        &dir.path().join("a"),
        Some(url.clone()),
        "127.0.0.1:0",
        &["--history-max-bytes", "0", "--token", "bench"],
    )
    .await?;
    let b = Registry::start_on(
        &dir.path().join("b"),
        Some(url),
        "127.0.0.1:0",
        &["--history-max-bytes", "0", "--token", "bench"],
    )
    .await?;
    let one = two_streams(&[&a], [1_000, 2_000]).await?;
    let two = two_streams(&[&a, &b], [3_000, 4_000]).await?;
    println!(
        "  postgres: 2 streams x {STORES_SMALL} small packets: one replica {one:.0} packets/s, \
         two replicas {two:.0} packets/s: {:.2}x",
        two / one
    );
    a.proc.kill().await;
    b.proc.kill().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let run = |p: &str| {
        if only.is_empty() {
            p != "stores" && p != "latency"
        } else {
            only.iter().any(|o| o == p)
        }
    };
    if let Some(bad) = only
        .iter()
        .find(|o| !["small", "large", "list", "growth", "stores", "latency"].contains(&o.as_str()))
    {
        anyhow::bail!("unknown phase {bad:?}: use small, large, list, growth, stores or latency");
    }
    if run("stores") {
        stores().await?;
    }
    if run("latency") {
        let cluster = tokio::task::spawn_blocking(pg_fixture::Cluster::start_durable).await??;
        for (name, pg) in [("sled", None), ("postgres", Some(&cluster))] {
            let mut lat = open_to_watch(pg).await?;
            println!(
                "{name}: open to watch: p50 {:.2} ms, p99 {:.2} ms",
                percentile(&mut lat, 0.5),
                percentile(&mut lat, 0.99)
            );
        }
    }
    let passes: Vec<(&str, Option<PathBuf>)> = match std::env::var_os("BENCH_BASELINE") {
        Some(bin) => vec![("before", Some(PathBuf::from(bin))), ("after", None)],
        None => vec![("", None)],
    };
    let set = |bin: &Option<PathBuf>, label: &str| {
        *BASELINE.lock().unwrap_or_else(|e| e.into_inner()) = bin.clone();
        if !label.is_empty() {
            println!("[{label}]");
        }
    };
    if run("small") {
        let mut rates = Vec::new();
        for (label, bin) in &passes {
            set(bin, label);
            rates.push(small().await?);
        }
        if let [before, after] = rates[..] {
            println!("small: after / before {:.2}x", after / before);
        }
    }
    if run("large") {
        let mut rates = Vec::new();
        for (label, bin) in &passes {
            set(bin, label);
            rates.push(large().await?);
        }
        if let [before, after] = rates[..] {
            println!("large: after / before {:.2}x", after / before);
        }
    }
    set(&None, "");
    if run("list") {
        list_phase().await?;
    }
    if run("growth") {
        for (label, bin) in &passes {
            set(bin, label);
            growth().await?;
        }
    }
    Ok(())
}
