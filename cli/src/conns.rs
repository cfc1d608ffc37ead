//! `interpose conns`: list, watch, clear, copy and count connection records.

use std::{
    collections::HashMap,
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use clap::{
    Args, Subcommand,
    builder::{PossibleValuesParser, TypedValueParser},
};
use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection},
    names::Named,
    registry::{
        ClearAllRequest, ClearConnectionsRequest, ConnectionFilter, ConnectionStatsRequest,
        GetConnectionRequest, ListConnectionsRequest, WatchConnectionsRequest, watch_event::Kind,
    },
};
use serde_json::json;

use crate::{
    ServerArgs,
    client::{registry, status},
    columns,
    output::{ConnJson, TSV_HEADER, conn_json, conn_tsv},
    table::{self, TableArgs},
};

#[derive(Debug, Subcommand)]
pub enum ConnsCommand {
    /// List connection records, oldest first.
    ///
    /// Columns (--columns): id, client, target, sni, tls, status, closed_by, kind, c2s, s2c,
    /// duration, opened, reason (the default set), node, alpn, packets.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Print a JSON array of connection objects.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        table: TableArgs,
    },
    /// Show every record, then each open, change, close and clear as it happens.
    Watch {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line: {"event": "snapshot"|"opened"|"updated"|"closed", "connection": {...}},
        /// {"event": "cleared", "id": N}, {"event": "snapshot_end"} or {"event": "reset"}.
        #[arg(long)]
        json: bool,
    },
    /// Remove connection records. Their packets stay in the history, but without the record
    /// an export has no addresses or ports for them: PCAP exports then use placeholders.
    Clear {
        /// The IDs to remove.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<u64>,
        /// Remove every record.
        #[arg(long)]
        all: bool,
    },
    /// Print records as TSV with a header row (or put them on the clipboard).
    Copy {
        /// The IDs to copy.
        #[arg(required = true)]
        ids: Vec<u64>,
        /// Copy to the clipboard (wl-copy, xclip, xsel or pbcopy) instead of printing.
        #[arg(long)]
        clipboard: bool,
    },
    /// Count records by status, closer, close kind, destination and node.
    Stats {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
}

/// Parses a contract enum by its stable name ([`Named`]): the CLI accepts exactly the
/// names the JSON output prints, and help and errors list them.
pub fn named<T: Named + Clone + Send + Sync>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::ALL.iter().filter_map(|v| v.name())).map(|name| {
        // The possible-values parser let only listed names through.
        T::from_name(&name).unwrap_or(T::ALL[0])
    })
}

/// Filters shared by list, watch and stats.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only active or only disconnected connections.
    #[arg(long, value_parser = named::<ConnStatus>())]
    pub status: Option<ConnStatus>,
    /// Only connections ended by this side.
    #[arg(long, value_parser = named::<ClosedBy>())]
    pub closed_by: Option<ClosedBy>,
    /// Only connections that ended this way.
    #[arg(long, value_parser = named::<CloseKind>())]
    pub close_kind: Option<CloseKind>,
    /// Only this target host.
    #[arg(long)]
    pub dst_host: Option<String>,
    /// Only this target port.
    #[arg(long)]
    pub dst_port: Option<u16>,
    /// Only this proxy node.
    #[arg(long)]
    pub node: Option<String>,
}

impl FilterArgs {
    pub fn to_proto(&self) -> ConnectionFilter {
        ConnectionFilter {
            status: self.status.map_or(0, |s| s as i32),
            closed_by: self.closed_by.map_or(0, |c| c as i32),
            close_kind: self.close_kind.map_or(0, |k| k as i32),
            dst_host: self.dst_host.clone().unwrap_or_default(),
            dst_port: self.dst_port.map_or(0, u32::from),
            node: self.node.clone().unwrap_or_default(),
        }
    }
}

/// Runs one `conns` subcommand.
pub async fn run(server: &ServerArgs, cmd: ConnsCommand) -> anyhow::Result<()> {
    match cmd {
        ConnsCommand::List {
            filter,
            json,
            table,
        } => list(server, &filter.to_proto(), json, &table).await,
        ConnsCommand::Watch { filter, json } => watch(server, filter.to_proto(), json).await,
        ConnsCommand::Clear { ids, all } => clear(server, &ids, all).await,
        ConnsCommand::Copy { ids, clipboard } => copy(server, &ids, clipboard).await,
        ConnsCommand::Stats { filter, json } => stats(server, filter.to_proto(), json).await,
    }
}

/// Every record matching `filter`, following pages.
pub async fn fetch_all(
    server: &ServerArgs,
    filter: &ConnectionFilter,
) -> anyhow::Result<Vec<Connection>> {
    let mut client = registry(server).await?;
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_connections(ListConnectionsRequest {
                filter: Some(filter.clone()),
                page_size: 0,
                page_token: token,
                newest_first: false,
            })
            .await
            .map_err(status)?
            .into_inner();
        all.extend(page.connections);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

async fn list(
    server: &ServerArgs,
    filter: &ConnectionFilter,
    json: bool,
    how: &TableArgs,
) -> anyhow::Result<()> {
    // A bad --columns fails before any network I/O.
    let columns = table::select(columns::CONNECTION, how.columns.as_deref())?;
    let conns = fetch_all(server, filter).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let arr: Vec<ConnJson> = conns.iter().map(ConnJson::from).collect();
        serde_json::to_writer_pretty(&mut out, &arr)?;
        writeln!(out)?;
    } else {
        let view = table::View::new(how.local_time);
        let width = table::target_width(how.wide);
        writeln!(out, "{}", table::render(&columns, &conns, &view, width))?;
        writeln!(out, "{} connection(s)", conns.len())?;
    }
    out.flush()?;
    Ok(())
}

async fn watch(server: &ServerArgs, filter: ConnectionFilter, json: bool) -> anyhow::Result<()> {
    // Ctrl-C (or SIGTERM) ends the watch normally, even when the shell started it in the
    // background with SIGINT ignored. Registered before any output: a signal sent once the
    // first line is read is handled.
    let stop = platform::serve::shutdown_signal();
    tokio::pin!(stop);
    let mut client = registry(server).await?;
    let mut stream = client
        .watch_connections(WatchConnectionsRequest {
            filter: Some(filter),
            start_id: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    // The last version seen per ID tells an open from an update from a close, and what an
    // update changed.
    let mut seen: HashMap<u64, Connection> = HashMap::new();
    let mut live = false;
    let width = table::target_width(false).map(usize::from);
    let mut out = std::io::stdout();
    if !json {
        writeln!(out, "{}", crate::watch::fit(crate::watch::header(), width))?;
        out.flush()?;
    }
    loop {
        let ev = tokio::select! {
            ev = stream.message() => ev.map_err(status)?,
            () = &mut stop => return Ok(()),
        };
        let Some(ev) = ev else { break };
        let kind = Kind::try_from(ev.kind).unwrap_or(Kind::Unspecified);
        let line = match (kind, ev.connection) {
            (Kind::Upsert, Some(c)) => {
                let before = seen.insert(c.id, c.clone());
                let event = if !live {
                    "snapshot"
                } else if c.status == ConnStatus::Disconnected as i32
                    && before
                        .as_ref()
                        .is_none_or(|b| b.status != ConnStatus::Disconnected as i32)
                {
                    "closed"
                } else if before.is_none() {
                    "opened"
                } else {
                    "updated"
                };
                if json {
                    json!({"event": event, "connection": conn_json(&c)}).to_string()
                } else {
                    crate::watch::line(event, &c, before.as_ref(), width)
                }
            }
            (Kind::Removed, _) => {
                seen.remove(&ev.id);
                if json {
                    json!({"event": "cleared", "id": ev.id}).to_string()
                } else {
                    crate::watch::cleared(ev.id, width)
                }
            }
            (Kind::SnapshotEnd, _) => {
                live = true;
                if json {
                    json!({"event": "snapshot_end"}).to_string()
                } else {
                    let n = seen.len();
                    let records = if n == 1 { "record" } else { "records" };
                    crate::watch::fit(format!("-- {n} {records}; watching for changes --"), width)
                }
            }
            (Kind::Reset, _) => {
                live = false;
                seen.clear();
                if json {
                    json!({"event": "reset"}).to_string()
                } else {
                    crate::watch::fit("-- fell behind; starting over --".into(), width)
                }
            }
            _ => continue,
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    bail!("the server ended the watch")
}

async fn clear(server: &ServerArgs, ids: &[u64], all: bool) -> anyhow::Result<()> {
    let mut client = registry(server).await?;
    let cleared = if all {
        client.clear_all(ClearAllRequest {}).await
    } else {
        client
            .clear_connections(ClearConnectionsRequest { ids: ids.to_vec() })
            .await
            .map(|r| r.map(|r| proto::registry::ClearAllResponse { cleared: r.cleared }))
    }
    .map_err(status)?
    .into_inner()
    .cleared;
    let records = if cleared == 1 { "record" } else { "records" };
    crate::say!(
        "cleared {cleared} connection {records}; their packets stay in the history, but \
         `interpose export` now writes {} with placeholder addresses and ports",
        if cleared == 1 {
            "that connection"
        } else {
            "those connections"
        }
    );
    Ok(())
}

async fn copy(server: &ServerArgs, ids: &[u64], clipboard: bool) -> anyhow::Result<()> {
    let mut client = registry(server).await?;
    let mut tsv = format!("{TSV_HEADER}\n");
    for &id in ids {
        let c = client
            .get_connection(GetConnectionRequest { id })
            .await
            .map_err(status)?
            .into_inner();
        tsv.push_str(&conn_tsv(&c));
        tsv.push('\n');
    }
    if clipboard {
        to_clipboard(&tsv)?;
        eprintln!("copied {} record(s) to the clipboard", ids.len());
    } else {
        std::io::stdout().lock().write_all(tsv.as_bytes())?;
    }
    Ok(())
}

/// Hands `text` to the first clipboard tool found on PATH.
fn to_clipboard(text: &str) -> anyhow::Result<()> {
    const TOOLS: &[(&str, &[&str])] = &[
        ("wl-copy", &[]),
        ("xclip", &["-selection", "clipboard"]),
        ("xsel", &["--clipboard", "--input"]),
        ("pbcopy", &[]),
    ];
    for (tool, args) in TOOLS {
        let Ok(mut child) = Command::new(tool)
            .args(*args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(text.as_bytes())?;
        }
        let st = child.wait().with_context(|| format!("running {tool}"))?;
        if st.success() {
            return Ok(());
        }
        bail!("{tool} failed ({st}); run without --clipboard to print the TSV");
    }
    bail!(
        "no clipboard tool found (wl-copy, xclip, xsel, pbcopy); run without --clipboard to print the TSV"
    )
}

async fn stats(server: &ServerArgs, filter: ConnectionFilter, json: bool) -> anyhow::Result<()> {
    let mut client = registry(server).await?;
    let s = client
        .connection_stats(ConnectionStatsRequest {
            filter: Some(filter),
        })
        .await
        .map_err(status)?
        .into_inner();
    let counts = |v: &[proto::registry::Count]| -> serde_json::Map<String, serde_json::Value> {
        v.iter()
            .map(|c| {
                let key = if c.key.is_empty() { "none" } else { &c.key };
                (key.to_string(), json!(c.count))
            })
            .collect()
    };
    if json {
        let losses: serde_json::Map<_, _> = s
            .losses
            .iter()
            .map(|(node, l)| {
                (
                    node.clone(),
                    json!({"events_dropped": l.events_dropped, "packets_dropped": l.packets_dropped, "bytes_dropped": l.bytes_dropped, "intercept_not_held": l.intercept_not_held, "intercept_hold_failed": l.intercept_hold_failed, "intercept_refused": l.intercept_refused, "rewrite_skipped": l.rewrite_skipped}),
                )
            })
            .collect();
        let v = json!({
            "total": s.total,
            "by_status": counts(&s.by_status),
            "by_closed_by": counts(&s.by_closed_by),
            "by_close_kind": counts(&s.by_close_kind),
            "by_destination": counts(&s.by_destination),
            "by_node": counts(&s.by_node),
            "history_packets": s.history_packets,
            "history_unwritten_packets": s.history_unwritten_packets,
            "history_unwritten_bytes": s.history_unwritten_bytes,
            "history_failing": (!s.history_failing.is_empty()).then_some(&s.history_failing),
            "history_bytes": s.history_bytes,
            "records_bytes": s.records_bytes,
            "history_max_bytes": s.history_max_bytes,
            "history_when_full": s.history_when_full,
            "history_evicted_packets": s.history_evicted_packets,
            "history_evicted_bytes": s.history_evicted_bytes,
            "history_refused_packets": s.history_refused_packets,
            "history_refused_bytes": s.history_refused_bytes,
            "history_purged_packets": s.history_purged_packets,
            "history_purged_bytes": s.history_purged_bytes,
            "losses": losses,
        });
        crate::say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(out, "total connections: {}", s.total)?;
    writeln!(out, "history packets:   {}", s.history_packets)?;
    crate::history_budget::print_usage(&mut out, &s)?;
    if s.history_unwritten_packets > 0 {
        writeln!(
            out,
            "history not written: {} packets, {} (the registry's disk was full or failing)",
            s.history_unwritten_packets,
            table::size(s.history_unwritten_bytes)
        )?;
    }
    if !s.history_failing.is_empty() {
        writeln!(
            out,
            "history cannot be written now: {} (records are kept; recording resumes by itself)",
            s.history_failing
        )?;
    }
    for (title, v) in [
        ("by status", &s.by_status),
        ("by closed_by", &s.by_closed_by),
        ("by close_kind", &s.by_close_kind),
        ("by destination", &s.by_destination),
        ("by node", &s.by_node),
    ] {
        writeln!(out, "{title}:")?;
        for c in v {
            let key = if c.key.is_empty() { "(none)" } else { &c.key };
            writeln!(out, "  {:>8}  {key}", c.count)?;
        }
    }
    for (node, l) in &s.losses {
        writeln!(
            out,
            "not recorded by node {node}: {} event(s), {} packet(s), {}",
            l.events_dropped,
            l.packets_dropped,
            table::size(l.bytes_dropped)
        )?;
        if l.intercept_not_held > 0 {
            writeln!(
                out,
                "not held by node {node}: {} packet(s) ({} failed hold call(s): the intercept \
                 service unreachable, gone or failing, see the proxy's log; {} forwarded by \
                 the intercept service without holding: its queue full or the packet too large)",
                l.intercept_not_held, l.intercept_hold_failed, l.intercept_refused
            )?;
        }
        if l.rewrite_skipped > 0 {
            writeln!(
                out,
                "not rewritten by node {node}: {} packet(s) the replace rules would have grown \
                 by more than 4 MiB (relayed as received)",
                l.rewrite_skipped
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The names the CLI accepts are the contract's names.
#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Filters {
        #[command(flatten)]
        filter: FilterArgs,
    }

    #[test]
    fn filters_take_the_contract_names_and_only_those() {
        let f = Filters::try_parse_from([
            "t",
            "--status",
            "disconnected",
            "--closed-by",
            "server",
            "--close-kind",
            "rst",
        ])
        .expect("valid names");
        assert_eq!(f.filter.status, Some(ConnStatus::Disconnected));
        assert_eq!(f.filter.closed_by, Some(ClosedBy::Server));
        assert_eq!(f.filter.close_kind, Some(CloseKind::Rst));
        let err = Filters::try_parse_from(["t", "--closed-by", "nobody"])
            .expect_err("unknown name")
            .to_string();
        assert!(
            err.contains("client") && err.contains("server") && err.contains("proxy"),
            "{err}"
        );
    }
}
