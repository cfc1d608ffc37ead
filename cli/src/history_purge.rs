//! `interpose history purge`: delete history packets on the registry (`PurgeHistory`).

use std::time::SystemTime;

use anyhow::Context;
use clap::Args;
use proto::registry::PurgeHistoryRequest;

use crate::{
    ServerArgs,
    client::{registry, status},
};

/// What to purge: exactly one of --conn, --before and --all.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PurgeArgs {
    /// Every packet of these connections.
    #[arg(long, num_args = 1..)]
    pub conn: Vec<u64>,
    /// Every packet recorded before TIME: RFC 3339 (2026-11-30T02:00:00Z, or without the
    /// zone as UTC) or an age (2h, 30min, 7days: older than that).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub before: Option<SystemTime>,
    /// Every packet.
    #[arg(long)]
    pub all: bool,
}

/// A time as RFC 3339 or as an age before now.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let age = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-11-30T02:00:00Z) nor an age (2h)")
    })?;
    SystemTime::now()
        .checked_sub(age)
        .ok_or_else(|| format!("age {s:?} is too large"))
}

/// Runs `interpose history purge` and prints what was removed.
pub async fn run(server: &ServerArgs, args: PurgeArgs) -> anyhow::Result<()> {
    let mut client = registry(server).await?;
    let p = client
        .purge_history(PurgeHistoryRequest {
            conn_ids: args.conn,
            before: args.before.map(proto::time::to_timestamp),
            all: args.all,
        })
        .await
        .map_err(status)
        .context("purging history")?
        .into_inner();
    crate::say!(
        "purged {} packet(s), {} bytes; {} bytes of history files deleted",
        p.packets,
        p.bytes,
        p.freed_bytes
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_ages_and_bad_ones_say_why() {
        let t = parse_time("2026-11-30T02:00:00Z").unwrap();
        assert_eq!(
            humantime::format_rfc3339(t).to_string(),
            "2026-11-30T02:00:00Z"
        );
        let age = SystemTime::now()
            .duration_since(parse_time("2h").unwrap())
            .unwrap();
        assert!((7190..7300).contains(&age.as_secs()), "{age:?}");
        assert!(parse_time("yesterday-ish").unwrap_err().contains("neither"));
    }
}
