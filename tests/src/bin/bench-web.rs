//! Web view benchmark: a release `interpose up --web` whose registry holds many records and
//! packets (100,000 and 1,000,000 by default; `WEB_BENCH_RECORDS`, `WEB_BENCH_PACKETS`),
//! opened in Debian's chromium through playwright-core (web/ui/tests/page.mjs). Measures, in
//! the browser: time to the first rendered row and to the end of the live snapshot, the JS
//! heap after a garbage collection (DevTools `Performance.getMetrics`), scrolling to the end
//! and filtering, then live updates at 1,000 connection events per second for 10 s (half
//! opens, half closes): the delay from each event's own time (`opened_at` / `closed_at`) to
//! the table's next render, and whether every connection reached the page closed.
//!
//! `cargo run --release -p tests --bin bench-web`

use std::time::Duration;

use anyhow::{Context, ensure};
use proto::common::{CloseKind, ClosedBy, Direction};
use serde_json::{Value, json};
use tests::{
    Ingest, Up,
    browser::{Page, tools},
    events, registry_client,
};

/// IDs far above what `up`'s own proxy leases.
const BASE: u64 = 1 << 40;
/// Live phase: events per second, seconds.
const RATE: u64 = 1_000;
const LIVE_SECS: u64 = 10;

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Sends `batches`, at most 32 unacknowledged at a time, and waits for the last.
async fn send_all(
    ingest: &mut Ingest,
    batches: impl Iterator<Item = Vec<proto::registry::Event>>,
) -> anyhow::Result<()> {
    let mut last = 0;
    for b in batches {
        last = ingest.send(b).await?;
        if last > 32 {
            ingest.wait_ack(last - 32).await?;
        }
    }
    ingest.wait_ack(last).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let records = env_u64("WEB_BENCH_RECORDS", 100_000)?;
    let packets = env_u64("WEB_BENCH_PACKETS", 1_000_000)?;
    let chromium = tools()?.context("the benchmark needs node, chromium and tshark")?;
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &["--web", "127.0.0.1:0"]).await?;
    let web = up.proc.field("web").context("web= in the ready line")?;
    let mut client = registry_client(&up.grpc, None).await?;
    let mut ingest = Ingest::open(&mut client, "bench").await?;

    let start = std::time::Instant::now();
    send_all(
        &mut ingest,
        (0..records).step_by(1000).map(|first| {
            (first..(first + 1000).min(records))
                .flat_map(|i| {
                    [
                        events::open(BASE + i, 40000, "example.test", 443),
                        events::close(
                            BASE + i,
                            ClosedBy::Server,
                            CloseKind::Fin,
                            "server sent FIN",
                        ),
                    ]
                })
                .collect()
        }),
    )
    .await?;
    // Packets of 64 bytes over the first 1,000 records.
    let conns = records.clamp(1, 1000);
    let payload = [b'x'; 64];
    send_all(
        &mut ingest,
        (0..packets).step_by(1000).map(|first| {
            (first..(first + 1000).min(packets))
                .map(|n| events::packet(BASE + n % conns, n / conns + 1, Direction::C2s, &payload))
                .collect()
        }),
    )
    .await?;
    println!(
        "filled: {records} records, {packets} packets of 64 B in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let out = dir.path().join("browser");
    std::fs::create_dir_all(&out)?;
    let mut page = Page::start(&chromium, &out).await?;
    let open = page.call("timeOpen", json!({"url": web})).await?;
    println!(
        "open: first rows after {} ms, snapshot of every record after {} ms; the page keeps {} records",
        open["firstRows"], open["snapshot"], open["kept"]
    );
    let heap = page.call("heap", Value::Null).await?;
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1048576.0;
    println!(
        "JS heap after GC: {:.1} MiB used, {:.1} MiB total; {} DOM nodes",
        mib(&heap["used"]),
        mib(&heap["total"]),
        heap["nodes"]
    );
    let sf = page
        .call("scrollFilter", json!({"host": "nothing-matches*"}))
        .await?;
    println!(
        "scroll to the end {} ms, back to the top {} ms, host filter {} ms ({})",
        sf["scrollEnd"], sf["scrollTop"], sf["filter"], sf["shown"]
    );

    // Live: every 10 ms, 5 new connections open and the 5 of the previous tick close.
    page.call("liveArm", Value::Null).await?;
    let per_tick = RATE / 100 / 2;
    let ticks = LIVE_SECS * 100;
    let first = BASE + records + 1;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let live_start = std::time::Instant::now();
    for t in 0..=ticks {
        tick.tick().await;
        let mut batch = Vec::new();
        if t < ticks {
            for k in 0..per_tick {
                batch.push(events::open(
                    first + t * per_tick + k,
                    40001,
                    "live.test",
                    443,
                ));
            }
        }
        if t > 0 {
            for k in 0..per_tick {
                let id = first + (t - 1) * per_tick + k;
                batch.push(events::close(
                    id,
                    ClosedBy::Client,
                    CloseKind::Fin,
                    "client sent FIN",
                ));
            }
        }
        ingest.send(batch).await?;
    }
    let sent_secs = live_start.elapsed().as_secs_f64();
    let total = ticks * per_tick;
    // Until every connection has reached the page closed (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let result = loop {
        let r = page.call("liveResult", Value::Null).await?;
        if r["closed"].as_u64() == Some(total) || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "live: {} events ({total} connections opened and closed) sent in {sent_secs:.1} s \
         ({:.0} events/s); in the page: {} updates, delay p50 {} ms, p99 {} ms, max {} ms; \
         {} of {total} connections shown closed ({} missing)",
        2 * total,
        (2 * total) as f64 / sent_secs,
        result["events"],
        result["p50"],
        result["p99"],
        result["max"],
        result["closed"],
        total.saturating_sub(result["closed"].as_u64().unwrap_or(0)),
    );
    let heap = page.call("heap", Value::Null).await?;
    println!(
        "JS heap after the live phase: {:.1} MiB used",
        mib(&heap["used"])
    );
    page.quit().await?;
    ensure!(
        result["closed"].as_u64() == Some(total),
        "the page missed live events"
    );
    Ok(())
}
