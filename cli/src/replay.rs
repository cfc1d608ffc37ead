//! `interpose replay ID`: a recorded connection's client-to-server packets sent again by a
//! proxy (the Replay service), with edits and pacing; prints the server's answers as they
//! arrive and how they compare with the original's.

use std::{io::Read as _, time::Duration};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use clap::{Args, ValueEnum};
use proto::{
    common::Direction,
    registry::SearchHistoryRequest,
    replay::{
        Comparison, Pace, PacketEdit, Replacement, ReplayEvent, ReplayRequest,
        replay_client::ReplayClient,
    },
};
use serde_json::json;

use crate::{
    ServerArgs, client,
    hexdump::{dump, parse_dump, parse_hex},
    say,
};

/// Most client-to-server bytes `--edit` opens in the editor.
pub const MAX_EDIT_BYTES: u64 = 1024 * 1024;

/// How to send the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PaceArg {
    /// The next packet once the server has been quiet for --settle.
    Wait,
    /// The original's timing.
    Recorded,
    /// Everything at once.
    Burst,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The connection to replay (its ID in `conns list`).
    #[arg(value_parser = crate::history::conn_id)]
    pub id: u64,
    /// Connect here instead of the original destination (HOST:PORT, IPv6 in brackets).
    #[arg(long, value_name = "HOST:PORT")]
    pub to: Option<String>,
    /// Replace every occurrence of text A with B in every client packet (split at the first
    /// `=`; repeatable, applied in order).
    #[arg(long = "replace-text", value_name = "A=B")]
    pub replace_text: Vec<String>,
    /// Replace every occurrence of hex bytes A with B (e.g. `0d0a=0a`; repeatable).
    #[arg(long = "replace-hex", value_name = "HEX=HEX")]
    pub replace_hex: Vec<String>,
    /// New bytes for one client packet (its seq in `history --conn ID`), from FILE or `-`
    /// for stdin (repeatable).
    #[arg(long = "packet", value_name = "SEQ=FILE|-")]
    pub packet: Vec<String>,
    /// Send only these client packets (by seq).
    #[arg(long, value_delimiter = ',', value_name = "SEQ,...")]
    pub only: Vec<u64>,
    /// Open the client packets in $EDITOR first (text, or a hex dump when not UTF-8); a
    /// packet whose block is deleted is not sent.
    #[arg(long)]
    pub edit: bool,
    /// wait: the next packet once the server was quiet for --settle; recorded: the
    /// original's timing; burst: everything at once.
    #[arg(long, value_enum, default_value = "wait")]
    pub pace: PaceArg,
    /// Quiet time for --pace wait and at the end of a run (e.g. 200ms, 1s).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub times: u32,
    /// Runs at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub concurrency: u32,
    /// The server's bytes as a hex dump (default: as text when they are UTF-8).
    #[arg(long)]
    pub hex: bool,
    /// One JSON object per line: started, data, finished, summary.
    #[arg(long)]
    pub json: bool,
    /// gRPC URL of the proxy that makes the replay: the original's node's proxy-core
    /// (its --listen). Default: --server (`interpose up` replays through its own proxy).
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// Replay a connection another node carried, from this proxy's host.
    #[arg(long)]
    pub any_node: bool,
}

/// Runs `interpose replay`.
pub async fn run(server: &ServerArgs, args: ReplayArgs) -> anyhow::Result<()> {
    let mut req = request(&args)?;
    if args.edit {
        edit_in_editor(server, &mut req).await?;
    }
    let mut at = server.clone();
    if let Some(p) = &args.proxy {
        at.server = Some(p.clone());
    }
    let channel = client::channel(&at).await?;
    let mut stream = ReplayClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
        .replay_connection(req)
        .await
        .map_err(client::status)?
        .into_inner();
    let mut failed: Vec<String> = Vec::new();
    let several = args.times > 1;
    while let Some(ev) = stream.message().await.map_err(client::status)? {
        if args.json {
            say!("{}", event_json(&ev));
        }
        if let Some(f) = &ev.finished
            && !f.error.is_empty()
        {
            failed.push(format!("run {}: {}", f.run, f.error));
        }
        if !args.json {
            print_event(&ev, args.id, args.hex, several)?;
        }
    }
    if let Some(first) = failed.first() {
        bail!("{} of {} runs failed; {first}", failed.len(), args.times);
    }
    Ok(())
}

/// The request the flags describe.
pub fn request(args: &ReplayArgs) -> anyhow::Result<ReplayRequest> {
    let mut replacements = Vec::new();
    for r in &args.replace_text {
        let (a, b) = r
            .split_once('=')
            .ok_or_else(|| anyhow!("--replace-text {r:?}: expected A=B"))?;
        if a.is_empty() {
            bail!("--replace-text {r:?}: the text to find is empty");
        }
        replacements.push(Replacement {
            find: a.as_bytes().to_vec(),
            replace: b.as_bytes().to_vec(),
        });
    }
    for r in &args.replace_hex {
        let (a, b) = r
            .split_once('=')
            .ok_or_else(|| anyhow!("--replace-hex {r:?}: expected HEX=HEX"))?;
        let find = parse_hex(a).with_context(|| format!("--replace-hex {r:?}"))?;
        if find.is_empty() {
            bail!("--replace-hex {r:?}: the bytes to find are empty");
        }
        let replace = parse_hex(b).with_context(|| format!("--replace-hex {r:?}"))?;
        replacements.push(Replacement { find, replace });
    }
    let mut packets = Vec::new();
    for p in &args.packet {
        let (seq, from) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--packet {p:?}: expected SEQ=FILE or SEQ=-"))?;
        let seq: u64 = seq
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| anyhow!("--packet {p:?}: {seq:?} is not a packet number"))?;
        let data = if from == "-" {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("--packet: reading stdin")?;
            b
        } else {
            std::fs::read(from).with_context(|| format!("--packet {p:?}: reading {from}"))?
        };
        packets.push(PacketEdit { seq, data });
    }
    let pace = match args.pace {
        PaceArg::Wait => Pace::Wait,
        PaceArg::Recorded => Pace::Recorded,
        PaceArg::Burst => Pace::Burst,
    };
    Ok(ReplayRequest {
        conn_id: args.id,
        to: args.to.clone().unwrap_or_default(),
        replacements,
        packets,
        only: args.only.clone(),
        pace: pace as i32,
        settle: prost_types::Duration::try_from(args.settle).ok(),
        times: args.times,
        concurrency: args.concurrency,
        any_node: args.any_node,
        // Many runs print their ends only.
        omit_data: args.times > 1,
    })
}

fn secs(d: Option<&prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

fn comparison_json(c: Option<&Comparison>) -> serde_json::Value {
    match c {
        None => serde_json::Value::Null,
        Some(c) => json!({
            "identical": c.identical,
            "packet": c.packet,
            "seq": c.seq,
            "offset": c.offset,
            "stream_offset": c.stream_offset,
            "summary": c.summary,
        }),
    }
}

/// One event as its JSON line.
pub fn event_json(ev: &ReplayEvent) -> serde_json::Value {
    if let Some(s) = &ev.started {
        return json!({"event": "started", "run": s.run, "conn_id": s.conn_id, "target": s.target, "tls": s.tls});
    }
    if let Some(d) = &ev.data {
        return json!({
            "event": "data",
            "run": d.run,
            "ts": crate::output::rfc3339(d.ts.as_ref()),
            "len": d.data.len(),
            "data_b64": base64::engine::general_purpose::STANDARD.encode(&d.data),
        });
    }
    if let Some(f) = &ev.finished {
        return json!({
            "event": "finished",
            "run": f.run,
            "conn_id": f.conn_id,
            "bytes_sent": f.bytes_sent,
            "packets_sent": f.packets_sent,
            "bytes_received": f.bytes_received,
            "elapsed_s": secs(f.elapsed.as_ref()),
            "error": (!f.error.is_empty()).then_some(&f.error),
            "comparison": comparison_json(f.comparison.as_ref()),
        });
    }
    if let Some(s) = &ev.summary {
        let elapsed = secs(s.elapsed.as_ref());
        return json!({
            "event": "summary",
            "runs": s.runs,
            "completed": s.completed,
            "identical": s.identical,
            "elapsed_s": elapsed,
            "runs_per_s": if elapsed > 0.0 { f64::from(s.runs) / elapsed } else { 0.0 },
        });
    }
    serde_json::Value::Null
}

fn print_event(ev: &ReplayEvent, original: u64, hex: bool, several: bool) -> anyhow::Result<()> {
    if let Some(s) = &ev.started
        && !several
    {
        say!(
            "# run {}: connection {} replays {original} to {}{}",
            s.run,
            s.conn_id,
            s.target,
            if s.tls { " (TLS)" } else { "" }
        );
    }
    if let Some(d) = &ev.data {
        match std::str::from_utf8(&d.data) {
            Ok(t) if !hex => {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                out.write_all(t.as_bytes())?;
                out.flush()?;
            }
            _ => say!("{}", dump(&d.data).trim_end()),
        }
    }
    if let Some(f) = &ev.finished {
        let cmp = f
            .comparison
            .as_ref()
            .map_or("not compared", |c| c.summary.as_str());
        let error = if f.error.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", f.error)
        };
        say!(
            "# run {}: connection {}: sent {} packets ({} bytes), received {} bytes in {:.3}s; \
             server side {cmp}{error}",
            f.run,
            f.conn_id,
            f.packets_sent,
            f.bytes_sent,
            f.bytes_received,
            secs(f.elapsed.as_ref())
        );
    }
    if let Some(s) = &ev.summary
        && several
    {
        let elapsed = secs(s.elapsed.as_ref());
        say!(
            "# {} runs: {} completed, {} identical, in {elapsed:.3}s ({:.1} runs/s)",
            s.runs,
            s.completed,
            s.identical,
            if elapsed > 0.0 {
                f64::from(s.runs) / elapsed
            } else {
                0.0
            }
        );
    }
    Ok(())
}

/// The header line of one packet's block in the `--edit` file.
fn block_header(seq: u64, hex: bool) -> String {
    format!(
        "=== packet {seq} ({}) ===",
        if hex { "hex" } else { "text" }
    )
}

/// `--edit`: writes the client packets (after the flags' edits are not applied: the file
/// shows the original's bytes, or a `--packet` file's), runs the editor, and turns what
/// changed into packet edits and what was deleted into `only`.
async fn edit_in_editor(server: &ServerArgs, req: &mut ReplayRequest) -> anyhow::Result<()> {
    let mut registry = client::registry(server).await?;
    let conn = registry
        .get_connection(proto::registry::GetConnectionRequest { id: req.conn_id })
        .await
        .map_err(client::status)?
        .into_inner();
    if conn.bytes_c2s > MAX_EDIT_BYTES {
        bail!(
            "--edit: connection {} sent {} bytes to its server; the editor takes at most {} \
             (use --packet SEQ=FILE)",
            conn.id,
            conn.bytes_c2s,
            MAX_EDIT_BYTES
        );
    }
    let mut packets = Vec::new();
    let mut token = String::new();
    loop {
        let page = registry
            .search_history(SearchHistoryRequest {
                conn_id: req.conn_id,
                direction: Direction::C2s as i32,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(client::status)?
            .into_inner();
        packets.extend(page.packets.into_iter().filter(|p| !p.dropped));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if packets.is_empty() {
        bail!(
            "--edit: connection {} has no client packets in the history",
            req.conn_id
        );
    }
    let given: std::collections::HashMap<u64, Vec<u8>> = req
        .packets
        .iter()
        .map(|p| (p.seq, p.data.clone()))
        .collect();
    let shown: Vec<(u64, Vec<u8>)> = packets
        .iter()
        .filter(|p| req.only.is_empty() || req.only.contains(&p.seq))
        .map(|p| {
            (
                p.seq,
                given
                    .get(&p.seq)
                    .cloned()
                    .unwrap_or_else(|| p.data.to_vec()),
            )
        })
        .collect();
    let file = render_edit_file(req.conn_id, &shown);
    let path = std::env::temp_dir().join(format!(
        "interpose-replay-{}-{}.txt",
        req.conn_id,
        std::process::id()
    ));
    crate::held::write_private(&path, file.as_bytes())?;
    let edited = crate::held::run_editor(&path, "the replay", "nothing was replayed");
    let _ = std::fs::remove_file(&path);
    let edited = String::from_utf8(edited?).context("the edited file is not UTF-8")?;
    let blocks = parse_edit_file(&edited)?;
    let mut only = Vec::new();
    let mut new_packets = Vec::new();
    for (seq, data) in blocks {
        let Some((_, before)) = shown.iter().find(|(s, _)| *s == seq) else {
            bail!("the edited file names packet {seq}, which was not in it");
        };
        only.push(seq);
        if data != *before || given.contains_key(&seq) {
            new_packets.push(PacketEdit { seq, data });
        }
    }
    req.only = only;
    req.packets = new_packets;
    Ok(())
}

/// The `--edit` file: a comment, then one block per packet.
pub fn render_edit_file(conn_id: u64, packets: &[(u64, Vec<u8>)]) -> String {
    let mut out = format!(
        "# interpose replay {conn_id}: the client-to-server packets, in order. Edit a block's \
         bytes; delete a whole block (its === line too) to leave the packet out. Text blocks \
         are sent as written (the newline before the next === line is not part of the packet); \
         hex blocks are a dump whose offsets and |text| column are ignored.\n"
    );
    for (seq, data) in packets {
        let text = std::str::from_utf8(data)
            .ok()
            .filter(|t| !t.contains("\n=== packet "));
        out.push_str(&block_header(*seq, text.is_none()));
        out.push('\n');
        match text {
            Some(t) => {
                out.push_str(t);
                out.push('\n');
            }
            None => out.push_str(&dump(data)),
        }
    }
    out
}

/// The blocks of an edited `--edit` file, in order: (seq, bytes).
pub fn parse_edit_file(text: &str) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut current: Option<(u64, bool, String)> = None;
    let finish =
        |c: Option<(u64, bool, String)>, out: &mut Vec<(u64, Vec<u8>)>| -> anyhow::Result<()> {
            if let Some((seq, hex, body)) = c {
                let data = if hex {
                    parse_dump(&body).with_context(|| format!("packet {seq}'s hex dump"))?
                } else {
                    let mut b = body.into_bytes();
                    if b.ends_with(b"\n") {
                        b.pop();
                    }
                    b
                };
                out.push((seq, data));
            }
            Ok(())
        };
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if let Some(rest) = bare
            .strip_prefix("=== packet ")
            .and_then(|r| r.strip_suffix(" ==="))
        {
            let (seq, kind) = rest
                .split_once(' ')
                .ok_or_else(|| anyhow!("unreadable block header {bare:?}"))?;
            let seq: u64 = seq
                .parse()
                .map_err(|_| anyhow!("unreadable block header {bare:?}"))?;
            let hex = match kind {
                "(hex)" => true,
                "(text)" => false,
                _ => bail!("unreadable block header {bare:?}: (text) or (hex)"),
            };
            finish(current.take(), &mut out)?;
            if out.iter().any(|(s, _)| *s == seq) {
                bail!("packet {seq} appears twice in the edited file");
            }
            current = Some((seq, hex, String::new()));
            continue;
        }
        // Lines before the first block are comments.
        if let Some((_, _, body)) = &mut current {
            body.push_str(line);
        }
    }
    finish(current.take(), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_file_round_trips_text_and_binary_packets() {
        let packets = vec![
            (1, b"HELLO\n".to_vec()),
            (3, vec![0, 1, 2, 0xff]),
            (5, b"no newline".to_vec()),
        ];
        let file = render_edit_file(7, &packets);
        assert_eq!(parse_edit_file(&file).unwrap(), packets);
    }

    #[test]
    fn edited_and_deleted_blocks_are_read_as_such() {
        let file = render_edit_file(7, &[(1, b"a".to_vec()), (3, b"b".to_vec())]);
        let edited = file
            .replace("=== packet 1 (text) ===\na\n", "")
            .replace("\nb\n", "\nbee\n");
        assert_eq!(
            parse_edit_file(&edited).unwrap(),
            vec![(3, b"bee".to_vec())]
        );
        let bad = format!("{file}=== packet 3 (text) ===\nx\n");
        assert!(
            parse_edit_file(&bad)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            parse_edit_file("=== packet x (text) ===\n")
                .unwrap_err()
                .to_string()
                .contains("header")
        );
    }

    #[test]
    fn flags_become_the_request_or_a_clear_error() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            args: ReplayArgs,
        }
        let args = |v: &[&str]| Cmd::try_parse_from(v).map(|c| c.args);
        let a = args(&[
            "r",
            "7",
            "--replace-text",
            "a=b=c",
            "--replace-hex",
            "0d0a=0a",
            "--only",
            "1,3",
            "--pace",
            "burst",
            "--settle",
            "1s",
        ])
        .unwrap();
        let r = request(&a).unwrap();
        assert_eq!(r.replacements[0].find, b"a");
        assert_eq!(r.replacements[0].replace, b"b=c");
        assert_eq!(r.replacements[1].find, b"\r\n");
        assert_eq!(r.only, vec![1, 3]);
        assert_eq!(r.pace, Pace::Burst as i32);
        assert_eq!(r.settle.unwrap().seconds, 1);
        for (bad, says) in [
            (vec!["r", "7", "--replace-text", "ab"], "A=B"),
            (vec!["r", "7", "--replace-text", "=b"], "empty"),
            (vec!["r", "7", "--replace-hex", "zz=00"], "hex"),
            (vec!["r", "7", "--packet", "0=f"], "packet number"),
        ] {
            let e = request(&args(&bad).unwrap()).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad:?}: {e:#}");
        }
        assert!(args(&["r", "7", "--times", "0"]).is_err());
    }
}
