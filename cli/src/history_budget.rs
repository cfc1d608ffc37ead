//! How `conns stats` shows the history's disk use and budget.

use std::io::Write;

use proto::registry::ConnectionStatsResponse;

use crate::table::size;

/// Prints disk use, the budget and what it evicted or refused.
pub fn print_usage(out: &mut impl Write, s: &ConnectionStatsResponse) -> std::io::Result<()> {
    let budget = match s.history_max_bytes {
        0 => "no budget".to_string(),
        max => format!("budget {}, when full: {}", size(max), s.history_when_full),
    };
    writeln!(
        out,
        "history on disk:   {} ({budget})",
        size(s.history_bytes)
    )?;
    writeln!(out, "records on disk:   {}", size(s.records_bytes))?;
    if s.history_evicted_packets > 0 {
        writeln!(
            out,
            "history evicted:   {} packets, {} (oldest first, to keep within the budget)",
            s.history_evicted_packets,
            size(s.history_evicted_bytes)
        )?;
    }
    if s.history_refused_packets > 0 {
        writeln!(
            out,
            "history refused:   {} packets, {} (the budget was full; not recorded)",
            s.history_refused_packets,
            size(s.history_refused_bytes)
        )?;
    }
    if s.history_purged_packets > 0 {
        writeln!(
            out,
            "history purged:    {} packets, {} (on request)",
            s.history_purged_packets,
            size(s.history_purged_bytes)
        )?;
    }
    Ok(())
}
