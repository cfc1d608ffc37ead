//! `interpose history`: search the proxy history.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use proto::{
    common::{Direction, Packet},
    names::name_of,
    registry::{GetConnectionRequest, SearchHistoryRequest},
};

use crate::{
    ServerArgs,
    client::{registry, status},
    output::{packet_json, preview, rfc3339},
};

#[derive(Debug, Args)]
pub struct HistoryArgs {
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
}

/// Runs `interpose history`, streaming pages to stdout as they arrive.
pub async fn run(server: &ServerArgs, args: HistoryArgs) -> anyhow::Result<()> {
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
        for p in &page.packets {
            if args.json {
                let sep = if count == 0 { "\n  " } else { ",\n  " };
                write!(out, "{sep}{}", packet_json(p))?;
            } else {
                if count == 0 {
                    writeln!(
                        out,
                        "  CONN     SEQ  DIR  TIME                            LEN  DATA"
                    )?;
                }
                writeln!(out, "{}", row(p))?;
            }
            count += 1;
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

/// One packet; a modified one shows what was sent (or `[dropped]`) and, on a second line,
/// what was received.
fn row(p: &Packet) -> String {
    let data = match (p.dropped, p.modified) {
        (true, _) => "[dropped]".to_string(),
        (false, true) => format!("[modified] {}", preview(&p.data, 80)),
        (false, false) => preview(&p.data, 80),
    };
    let mut line = format!(
        "{:>6} {:>7}  {:<4} {:<30} {:>5}  {}",
        p.conn_id,
        p.seq,
        name_of::<Direction>(p.direction).unwrap_or("-"),
        rfc3339(p.ts.as_ref()).unwrap_or_default(),
        p.data.len(),
        data
    );
    if p.modified {
        line.push_str(&format!(
            "\n{:>57}  original: {}",
            p.original.len(),
            preview(&p.original, 80)
        ));
    }
    line
}
