//! Load benchmark (issue 12): 1,000 concurrent SOCKS connections through `interpose up`
//! (history on), half plain and half TLS-intercepted, echoing paced messages for a bounded
//! time while short connections come and go; then every record and byte count must be
//! complete and the history must hold every byte (see `tests::load`). Reports the RSS of
//! `up` at start, at its peak and after the run settles.
//!
//! `cargo run --release -p tests --bin bench-load [SECONDS [CONNECTIONS]]` (60 s, 1,000).

use std::time::Duration;

use anyhow::Context;
use tests::load::{LoadConfig, run};

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args
        .next()
        .map_or(Ok(60), |a| a.parse())
        .context("SECONDS")?;
    let connections = args
        .next()
        .map_or(Ok(1000), |a| a.parse())
        .context("CONNECTIONS")?;
    let cfg = LoadConfig {
        connections,
        duration: Duration::from_secs(secs),
    };
    let dir = tempfile::tempdir()?;
    println!(
        "load: {connections} concurrent connections (half TLS-intercepted) through `interpose up`, history on, {secs} s"
    );
    let r = run(dir.path(), cfg).await?;
    let rows = [
        ("long connections, plain", r.long_plain.to_string()),
        ("long connections, TLS", r.long_tls.to_string()),
        ("short connections (server closes)", r.short.to_string()),
        ("all open after", format!("{:.1} s", r.ramp.as_secs_f64())),
        ("bytes client to server", r.bytes_c2s.to_string()),
        ("bytes server to client", r.bytes_s2c.to_string()),
        ("history packets", r.history_packets.to_string()),
        (
            "records complete after the last close",
            format!("{:.1} s", r.records_complete_after.as_secs_f64()),
        ),
        ("RSS of up: start", mib(r.rss_start)),
        ("RSS of up: peak", mib(r.rss_peak)),
        ("RSS of up: after (settled)", mib(r.rss_end)),
        (
            "RSS after / start",
            format!("{:.2}x", r.rss_end as f64 / r.rss_start as f64),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
    println!(
        "checks passed: every connection has its record, disconnected, closed by the right side, with exact byte counts; the history holds every byte; no losses reported"
    );
    Ok(())
}
