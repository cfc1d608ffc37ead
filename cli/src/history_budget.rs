//! How `conns stats` shows the history's disk use and budget.

use std::io::Write;

use proto::registry::ConnectionStatsResponse;

/// Prints disk use, the budget and what it evicted or refused.
pub fn print_usage(out: &mut impl Write, s: &ConnectionStatsResponse) -> std::io::Result<()> {
    let budget = match s.history_max_bytes {
        0 => "no budget".to_string(),
        max => format!("budget {} bytes, when full: {}", max, s.history_when_full),
    };
    writeln!(
        out,
        "history on disk:   {} bytes ({budget})",
        s.history_bytes
    )?;
    writeln!(out, "records on disk:   {} bytes", s.records_bytes)?;
    if s.history_evicted_packets > 0 {
        writeln!(
            out,
            "history evicted:   {} packets, {} bytes (oldest first, to keep within the budget)",
            s.history_evicted_packets, s.history_evicted_bytes
        )?;
    }
    if s.history_refused_packets > 0 {
        writeln!(
            out,
            "history refused:   {} packets, {} bytes (the budget was full; not recorded)",
            s.history_refused_packets, s.history_refused_bytes
        )?;
    }
    if s.history_purged_packets > 0 {
        writeln!(
            out,
            "history purged:    {} packets, {} bytes (on request)",
            s.history_purged_packets, s.history_purged_bytes
        )?;
    }
    Ok(())
}
