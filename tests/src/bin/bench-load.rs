//! Load benchmark (issue 12): 1,000 concurrent SOCKS connections through `interpose up`
//! (history on), half plain and half TLS-intercepted, echoing paced messages for a bounded
//! time while short connections come and go; then every record and byte count must be
//! complete and the history must hold every byte (see `tests::load`). Two rounds against the
//! same `up`; reports the RSS of `up` at start, at its peak and after each round settles.
//!
//! `cargo run --release -p tests --bin bench-load [SECONDS [CONNECTIONS [ROUNDS]]]
//! [--history-off]` (60 s, 1,000, 2, history on).

use std::time::Duration;

use anyhow::Context;
use tests::load::{LoadConfig, run};

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `--history-off` anywhere: the same run with the history off, for comparison.
    let all: Vec<String> = std::env::args().skip(1).collect();
    let history = !all.iter().any(|a| a == "--history-off");
    let mut args = all.into_iter().filter(|a| a != "--history-off");
    let mut arg = |name: &str, default: u64| -> anyhow::Result<u64> {
        args.next()
            .map_or(Ok(default), |a| a.parse())
            .with_context(|| name.to_string())
    };
    let secs = arg("SECONDS", 60)?;
    let cfg = LoadConfig {
        duration: Duration::from_secs(secs),
        connections: usize::try_from(arg("CONNECTIONS", 1000)?)?,
        rounds: usize::try_from(arg("ROUNDS", 2)?)?,
        history,
    };
    let dir = tempfile::tempdir()?;
    println!(
        "load: {} concurrent connections (half TLS-intercepted) through `interpose up`, history {}, {secs} s, {} rounds",
        cfg.connections,
        if history { "on" } else { "off" },
        cfg.rounds
    );
    let r = run(dir.path(), cfg).await?;
    let mut rows = vec![
        (
            "long connections per round, plain / TLS".to_string(),
            format!("{} / {}", r.long_plain, r.long_tls),
        ),
        (
            "bytes client to server (all rounds)".into(),
            r.bytes_c2s.to_string(),
        ),
        (
            "bytes server to client (all rounds)".into(),
            r.bytes_s2c.to_string(),
        ),
        (
            "history packets checked".into(),
            r.history_packets.to_string(),
        ),
        ("RSS of up: start".into(), mib(r.rss_start)),
        ("RSS of up: peak".into(), mib(r.rss_peak)),
    ];
    for (i, round) in r.rounds.iter().enumerate() {
        let n = i + 1;
        rows.push((
            format!("round {n}: short connections (server closes)"),
            round.short.to_string(),
        ));
        rows.push((
            format!("round {n}: all long connections open after"),
            format!("{:.1} s", round.ramp.as_secs_f64()),
        ));
        rows.push((
            format!("round {n}: records complete after the last close"),
            format!("{:.1} s", round.records_complete_after.as_secs_f64()),
        ));
        rows.push((
            format!("round {n}: RSS of up after (settled)"),
            format!(
                "{} ({:.2}x start)",
                mib(round.rss_after),
                round.rss_after as f64 / r.rss_start as f64
            ),
        ));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
    println!(
        "checks passed: every connection has its record, disconnected, closed by the right side, with exact byte counts; the history holds every byte; no losses reported"
    );
    Ok(())
}
