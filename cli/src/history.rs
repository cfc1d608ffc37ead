//! `interpose history`: search the proxy history, and show one stored packet.

use std::{
    collections::{HashMap, VecDeque},
    io::Write,
    time::SystemTime,
};

use anyhow::bail;
use clap::Args;
use platform::client::AuthChannel;
use proto::{
    common::{Direction, Packet},
    names::name_of,
    registry::{
        ConnectionFilter, GetConnectionRequest, SearchHistoryRequest,
        registry_client::RegistryClient,
    },
};

use crate::{
    ServerArgs,
    client::{registry, status},
    columns::{self, HistoryLine},
    hexdump::dump,
    history_purge::parse_time,
    output::{packet_json, target},
    table::{self, TableArgs},
};

/// A connection ID as an option takes it: 0 is no connection.
pub fn conn_id(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("connection IDs start at 1 (0 names no connection)".into()),
        Ok(id) => Ok(id),
        Err(_) => Err(format!("{s:?} is not a connection ID")),
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HistoryArgs {
    #[command(subcommand)]
    pub action: Option<HistoryAction>,
    /// Only this connection's packets.
    #[arg(long, value_parser = conn_id)]
    pub conn: Option<u64>,
    /// Only client-to-server or server-to-client packets.
    #[arg(long, value_parser = crate::conns::named::<Direction>())]
    pub direction: Option<Direction>,
    /// Only packets whose bytes contain this text.
    #[arg(long)]
    pub contains: Option<String>,
    /// Only connections to this target host (as in `conns list --dst-host`; packets whose
    /// record was cleared have no target and are left out).
    #[arg(long)]
    pub dst_host: Option<String>,
    /// Only connections to this target port.
    #[arg(long)]
    pub dst_port: Option<u16>,
    /// Only packets recorded at or after TIME: RFC 3339 (2026-11-30T02:00:00Z) or an age
    /// (10min: the last ten minutes).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub since: Option<SystemTime>,
    /// Only packets recorded before TIME (RFC 3339 or an age).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub until: Option<SystemTime>,
    /// At most N packets: the first N that match.
    #[arg(long, value_name = "N", conflicts_with = "tail")]
    pub limit: Option<u64>,
    /// Only the last N packets that match.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
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
    /// One stored packet (CONN and SEQ from the table) as a hex dump and as text, and the
    /// bytes received when an intercept edit changed it.
    Show {
        /// The packet's connection ID.
        #[arg(value_parser = conn_id)]
        conn: u64,
        /// The packet's sequence number (the SEQ column).
        seq: u64,
    },
}

type Client = RegistryClient<AuthChannel>;

/// Looks up and remembers each connection's target.
#[derive(Default)]
struct Targets(HashMap<u64, String>);

impl Targets {
    async fn of(&mut self, client: &mut Client, id: u64) -> String {
        if let Some(t) = self.0.get(&id) {
            return t.clone();
        }
        let t = match client.get_connection(GetConnectionRequest { id }).await {
            Ok(c) => target(&c.into_inner()),
            Err(_) => "-".to_string(),
        };
        self.0.insert(id, t.clone());
        t
    }
}

/// Runs `interpose history`, streaming pages to stdout as they arrive.
pub async fn run(server: &ServerArgs, args: HistoryArgs) -> anyhow::Result<()> {
    match args.action {
        Some(HistoryAction::Purge(purge)) => return crate::history_purge::run(server, purge).await,
        Some(HistoryAction::Show { conn, seq }) => return show(server, conn, seq).await,
        None => {}
    }
    // A bad --columns fails before any network I/O.
    let columns = table::select(columns::HISTORY, args.table.columns.as_deref())?;
    let want_target = columns.iter().any(|c| c.key == "target");
    let pager = table::Pager::new(
        columns,
        table::View::new(args.table.local_time),
        table::target_width(args.table.wide),
    );
    let mut client = registry(server).await?;
    let mut targets = Targets::default();
    // The connections to search: one, those to the target asked for, or all (0).
    let conns: Vec<u64> = if args.dst_host.is_some() || args.dst_port.is_some() {
        let filter = ConnectionFilter {
            dst_host: args.dst_host.clone().unwrap_or_default(),
            dst_port: args.dst_port.map_or(0, u32::from),
            ..Default::default()
        };
        let found = crate::conns::fetch_all(server, &filter).await?;
        for c in &found {
            targets.0.insert(c.id, target(c));
        }
        found
            .iter()
            .map(|c| c.id)
            .filter(|id| args.conn.is_none_or(|only| only == *id))
            .collect()
    } else {
        vec![args.conn.unwrap_or(0)]
    };
    let in_time = |p: &Packet| {
        let Some(ts) = p.ts.as_ref().map(proto::time::from_timestamp) else {
            return args.since.is_none() && args.until.is_none();
        };
        args.since.is_none_or(|s| ts >= s) && args.until.is_none_or(|u| ts < u)
    };
    let direction = args.direction.unwrap_or(Direction::Unspecified);
    let mut sink = Sink {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        pager,
        targets,
        json: args.json,
        want_target,
        json_items: 0,
    };
    let mut count = 0u64;
    let mut matched = 0u64;
    let mut tail: VecDeque<Packet> = VecDeque::new();
    let mut limited = false;
    if args.json {
        write!(sink.out, "[")?;
    }
    'conns: for conn in conns {
        let mut token = String::new();
        loop {
            let page = client
                .search_history(SearchHistoryRequest {
                    conn_id: conn,
                    direction: direction as i32,
                    contains: args.contains.clone().unwrap_or_default().into_bytes(),
                    page_size: 0,
                    page_token: token,
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut packets: Vec<Packet> = page.packets.into_iter().filter(in_time).collect();
            matched += packets.len() as u64;
            if let Some(n) = args.tail {
                tail.extend(packets);
                while tail.len() > n {
                    tail.pop_front();
                }
            } else {
                if let Some(limit) = args.limit {
                    let room = limit.saturating_sub(count) as usize;
                    if packets.len() >= room {
                        packets.truncate(room);
                        limited = true;
                    }
                }
                count += packets.len() as u64;
                sink.print(&mut client, packets).await?;
                if limited {
                    break 'conns;
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    if args.tail.is_some() {
        let packets: Vec<Packet> = tail.into_iter().collect();
        count = packets.len() as u64;
        sink.print(&mut client, packets).await?;
    }
    let mut out = sink.out;
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
        let noun = |n: u64| if n == 1 { "packet" } else { "packets" };
        match count {
            0 => writeln!(out, "no packets match")?,
            n if limited => writeln!(out, "first {n} {} (--limit)", noun(n))?,
            n if args.tail.is_some() && matched > n => {
                writeln!(out, "last {n} of {matched} {}", noun(matched))?
            }
            n => writeln!(out, "{n} {}", noun(n))?,
        }
    }
    out.flush()?;
    Ok(())
}

/// Where matching packets go: JSON array items or table lines, on stdout.
struct Sink<'c, W: Write> {
    out: W,
    pager: table::Pager<'c, HistoryLine>,
    targets: Targets,
    json: bool,
    /// The table shows targets (looked up once per connection).
    want_target: bool,
    /// JSON items written so far.
    json_items: u64,
}

impl<W: Write> Sink<'_, W> {
    /// Writes `packets`.
    async fn print(&mut self, client: &mut Client, packets: Vec<Packet>) -> anyhow::Result<()> {
        if self.json {
            for p in &packets {
                // `[` was written alone; every item after the first follows a comma.
                let sep = if self.json_items == 0 {
                    "\n  "
                } else {
                    ",\n  "
                };
                write!(self.out, "{sep}{}", packet_json(p))?;
                self.json_items += 1;
            }
            return Ok(());
        }
        if packets.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::new();
        for p in packets {
            let t = if self.want_target {
                self.targets.of(client, p.conn_id).await
            } else {
                String::new()
            };
            lines.extend(HistoryLine::of(p, t));
        }
        for line in self.pager.page(&lines) {
            writeln!(self.out, "{line}")?;
        }
        Ok(())
    }
}

/// `interpose history show CONN SEQ`.
async fn show(server: &ServerArgs, conn: u64, seq: u64) -> anyhow::Result<()> {
    let mut client = registry(server).await?;
    let mut token = String::new();
    let mut stored = 0u64;
    let found = loop {
        let page = client
            .search_history(SearchHistoryRequest {
                conn_id: conn,
                page_token: token,
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        stored += page.packets.len() as u64;
        if let Some(p) = page.packets.into_iter().find(|p| p.seq == seq) {
            break Some(p);
        }
        if page.next_page_token.is_empty() {
            break None;
        }
        token = page.next_page_token;
    };
    let record = client
        .get_connection(GetConnectionRequest { id: conn })
        .await;
    let Some(p) = found else {
        if stored == 0
            && let Err(s) = &record
            && s.code() == tonic::Code::NotFound
        {
            bail!("no connection with ID {conn} and no history for it");
        }
        bail!(
            "connection {conn} has no packet {seq} in the history ({stored} stored; `interpose \
             history --conn {conn}` lists them)"
        );
    };
    let target = record.map_or_else(|_| "- (record cleared)".into(), |c| target(&c.into_inner()));
    let time = p.ts.as_ref().map_or_else(
        || "-".into(),
        |t| table::View::new(false).time_us(proto::time::from_timestamp(t)),
    );
    let state = match (p.modified, p.dropped) {
        (_, true) => " [dropped]",
        (true, false) => " [modified]",
        _ => "",
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "conn {conn} seq {seq} {} {time} {target}: {} bytes{state}",
        name_of::<Direction>(p.direction).unwrap_or("-"),
        p.data.len()
    )?;
    if !p.dropped {
        writeln!(out, "\nhex:\n{}", dump(&p.data).trim_end())?;
        writeln!(out, "\ntext:\n{}", String::from_utf8_lossy(&p.data))?;
    }
    if p.modified {
        writeln!(
            out,
            "\nreceived ({} bytes, before the edit):\n{}",
            p.original.len(),
            dump(&p.original).trim_end()
        )?;
    }
    out.flush()?;
    Ok(())
}
