//! `interpose history`: search the proxy history.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use proto::{
    common::Direction,
    registry::{GetConnectionRequest, SearchHistoryRequest},
};

use crate::{
    ServerArgs,
    client::{registry, status},
    columns::{self, HistoryLine},
    conns::TableArgs,
    output::packet_json,
    table,
};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HistoryArgs {
    #[command(subcommand)]
    pub action: Option<HistoryAction>,
    /// Only this connection's packets.
    #[arg(long)]
    pub conn: Option<u64>,
    /// Only client-to-server or server-to-client packets.
    #[arg(long, value_parser = crate::conns::named::<Direction>())]
    pub direction: Option<Direction>,
    /// Only packets whose bytes contain this text.
    #[arg(long)]
    pub contains: Option<String>,
    /// Print a JSON array of packet objects.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub table: TableArgs,
}

/// What `interpose history` can do besides searching.
#[derive(Debug, clap::Subcommand)]
pub enum HistoryAction {
    /// Delete history packets: --conn ID..., --before TIME or --all. Records stay.
    Purge(crate::history_purge::PurgeArgs),
}

/// Runs `interpose history`, streaming pages to stdout as they arrive.
pub async fn run(server: &ServerArgs, args: HistoryArgs) -> anyhow::Result<()> {
    if let Some(HistoryAction::Purge(purge)) = args.action {
        return crate::history_purge::run(server, purge).await;
    }
    // A bad --columns fails before any network I/O.
    let columns = table::select(columns::HISTORY, args.table.columns.as_deref())?;
    let mut pager = table::Pager::new(
        columns,
        table::View::new(args.table.local_time),
        table::target_width(args.table.wide),
    );
    let mut client = registry(server).await?;
    let direction = args.direction.unwrap_or(Direction::Unspecified);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut token = String::new();
    let mut count = 0u64;
    if args.json {
        write!(out, "[")?;
    }
    loop {
        let page = client
            .search_history(SearchHistoryRequest {
                conn_id: args.conn.unwrap_or(0),
                direction: direction as i32,
                contains: args.contains.clone().unwrap_or_default().into_bytes(),
                page_size: 0,
                page_token: token,
            })
            .await
            .map_err(status)?
            .into_inner();
        if args.json {
            for p in &page.packets {
                let sep = if count == 0 { "\n  " } else { ",\n  " };
                write!(out, "{sep}{}", packet_json(p))?;
                count += 1;
            }
        } else if !page.packets.is_empty() {
            count += page.packets.len() as u64;
            let lines: Vec<HistoryLine> =
                page.packets.into_iter().flat_map(HistoryLine::of).collect();
            for line in pager.page(&lines) {
                writeln!(out, "{line}")?;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if args.json {
        writeln!(out, "{}]", if count == 0 { "" } else { "\n" })?;
    }
    // No packets for a connection that has no record either: the ID is unknown.
    if count == 0
        && let Some(id) = args.conn
    {
        let known = client.get_connection(GetConnectionRequest { id }).await;
        if let Err(s) = known
            && s.code() == tonic::Code::NotFound
        {
            bail!("no connection with ID {id} and no history for it");
        }
    }
    if !args.json {
        match count {
            0 => writeln!(out, "no packets match")?,
            1 => writeln!(out, "1 packet")?,
            n => writeln!(out, "{n} packets")?,
        }
    }
    out.flush()?;
    Ok(())
}
