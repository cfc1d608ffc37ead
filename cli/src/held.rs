//! `interpose held`: the packets waiting for a verdict. List, watch and show them; forward
//! (as they are or with replacement bytes), drop, or edit one in `$EDITOR`.

use std::{io::Write, path::PathBuf};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use clap::Subcommand;
use platform::client::AuthChannel;
use proto::{
    common::{ClosedBy, ConnStatus, Direction},
    intercept::{
        DropRequest, ForwardRequest, GetHeldRequest, HeldPacket, ListHeldRequest, WatchHeldRequest,
        held_event::Kind, intercept_client::InterceptClient,
    },
    names::name_of,
};
use serde_json::{Value, json};

use crate::{
    ServerArgs,
    client::status,
    columns,
    hexdump::{dump, parse_dump, parse_hex},
    intercept::client,
    output::{now, preview},
    table::{self, TableArgs},
};

#[derive(Debug, Subcommand)]
pub enum HeldCommand {
    /// The held packets, oldest first.
    ///
    /// Columns (--columns): held, conn, dir, target, len, status, data (the default set),
    /// time, seq.
    List {
        /// Print a JSON array of held packet objects.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        table: TableArgs,
    },
    /// The held packets now, then every change (one JSON object per line with --json).
    Watch {
        /// One JSON object per line: {"event": "added"|"updated"|"removed", ...}.
        #[arg(long)]
        json: bool,
    },
    /// One held packet as a hex dump and as text.
    Show { held_id: u64 },
    /// Release a held packet, as it is or with replacement bytes.
    Forward {
        held_id: u64,
        /// Replace the packet with this file's bytes.
        #[arg(long, group = "replacement")]
        replace_file: Option<PathBuf>,
        /// Replace the packet with these bytes, in hex.
        #[arg(long, group = "replacement")]
        replace_hex: Option<String>,
        /// Replace the packet with this text (may be empty).
        #[arg(long, group = "replacement")]
        replace_text: Option<String>,
    },
    /// Discard a held packet: it is never relayed.
    Drop { held_id: u64 },
    /// Edit a held packet in $EDITOR (as text when it is valid UTF-8, otherwise as a hex
    /// dump), then forward the result. In text, a final newline the editor added to a packet
    /// that had none is removed.
    Edit { held_id: u64 },
}

type Client = InterceptClient<AuthChannel>;

/// A held packet as its stable JSON object (DESIGN.md names, plus where it is going).
pub fn held_json(h: &HeldPacket) -> Value {
    let p = h.packet.clone().unwrap_or_default();
    json!({
        "held_id": h.held_id,
        "conn_id": p.conn_id,
        "seq": p.seq,
        "direction": name_of::<Direction>(p.direction),
        "len": (h.len as usize).max(p.data.len()),
        "data_b64": base64::engine::general_purpose::STANDARD.encode(&p.data),
        "conn_status": name_of::<ConnStatus>(h.conn_status),
        "closed_by": name_of::<ClosedBy>(h.closed_by),
        "abandoned": h.abandoned,
        "node": h.node,
        "dst_host": h.dst_host,
        "dst_port": h.dst_port,
    })
}

/// A held packet on one `held watch` line.
fn row(h: &HeldPacket) -> String {
    let p = h.packet.clone().unwrap_or_default();
    let status = columns::status_text(h);
    format!(
        "{:>6} {:>6}  {:<4} {:<28} {:>6}  {:<16} {}",
        h.held_id,
        p.conn_id,
        name_of::<Direction>(p.direction).unwrap_or("-"),
        format!("{}:{}", h.dst_host, h.dst_port),
        (h.len as usize).max(p.data.len()),
        status,
        preview(&p.data, 60)
    )
}

/// Runs one `interpose held` command.
pub async fn run(server: &ServerArgs, cmd: HeldCommand) -> anyhow::Result<()> {
    let mut c = client(server).await?;
    match cmd {
        HeldCommand::List { json, table } => list(&mut c, json, &table).await,
        HeldCommand::Watch { json } => watch(&mut c, json).await,
        HeldCommand::Show { held_id } => show(&get(&mut c, held_id).await?),
        HeldCommand::Forward {
            held_id,
            replace_file,
            replace_hex,
            replace_text,
        } => {
            let data = match (replace_file, replace_hex, replace_text) {
                (Some(f), _, _) => {
                    Some(std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?)
                }
                (_, Some(h), _) => Some(parse_hex(&h).context("--replace-hex")?),
                (_, _, Some(t)) => Some(t.into_bytes()),
                _ => None,
            };
            forward(&mut c, held_id, data).await
        }
        HeldCommand::Drop { held_id } => {
            c.drop(DropRequest { held_id }).await.map_err(status)?;
            crate::say!("dropped held packet {held_id}");
            Ok(())
        }
        HeldCommand::Edit { held_id } => edit(&mut c, held_id).await,
    }
}

async fn list(c: &mut Client, json: bool, how: &TableArgs) -> anyhow::Result<()> {
    // A bad --columns fails before any network I/O.
    let columns = table::select(columns::HELD, how.columns.as_deref())?;
    let held = list_all(c).await?;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<Value> = held.iter().map(held_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if held.is_empty() {
        writeln!(out, "no held packets")?;
    } else {
        let view = table::View::new(how.local_time);
        let width = table::target_width(how.wide);
        writeln!(out, "{}", table::render(&columns, &held, &view, width))?;
    }
    Ok(())
}

async fn watch(c: &mut Client, json: bool) -> anyhow::Result<()> {
    // Ctrl-C (or SIGTERM) ends the watch normally, even when the shell started it in the
    // background with SIGINT ignored.
    let stop = platform::serve::shutdown_signal();
    tokio::pin!(stop);
    let mut stream = c
        .watch_held(WatchHeldRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if !json {
        crate::say!("watching held packets (Ctrl-C to stop)");
    }
    loop {
        let ev = tokio::select! {
            ev = stream.message() => ev.map_err(status)?,
            () = &mut stop => return Ok(()),
        };
        let Some(ev) = ev else { break };
        let name = match ev.kind() {
            Kind::Added => "added",
            Kind::Removed => "removed",
            Kind::Updated => "updated",
            Kind::Unspecified => continue,
        };
        let line = match (&ev.held, json) {
            (Some(h), true) => json!({"event": name, "held": held_json(h)}).to_string(),
            (None, true) => json!({"event": name, "held_id": ev.held_id}).to_string(),
            (Some(h), false) => format!("{} {name:<8}{}", now(), row(h)),
            (None, false) => format!("{} {name:<8}{:>6}", now(), ev.held_id),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

/// Every held packet with its bytes, a page at a time (each page is bounded by the
/// service, so no one message grows with the queue).
async fn list_all(c: &mut Client) -> anyhow::Result<Vec<HeldPacket>> {
    let mut held = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_held(ListHeldRequest {
                page_size: 0,
                page_token,
                omit_data: false,
            })
            .await
            .map_err(status)?
            .into_inner();
        held.extend(page.held);
        if page.next_page_token.is_empty() {
            return Ok(held);
        }
        page_token = page.next_page_token;
    }
}

/// The held packet with `held_id`, with its bytes.
async fn get(c: &mut Client, held_id: u64) -> anyhow::Result<HeldPacket> {
    Ok(c.get_held(GetHeldRequest { held_id })
        .await
        .map_err(status)?
        .into_inner())
}

fn show(h: &HeldPacket) -> anyhow::Result<()> {
    let p = h.packet.clone().unwrap_or_default();
    let columns = table::select(columns::HELD, None)?;
    let table = table::render(
        &columns,
        std::slice::from_ref(h),
        &table::View::new(false),
        None,
    );
    crate::say!("{table}");
    crate::say!("\nhex:\n{}", dump(&p.data));
    crate::say!("text:\n{}", String::from_utf8_lossy(&p.data));
    Ok(())
}

async fn forward(c: &mut Client, held_id: u64, data: Option<Vec<u8>>) -> anyhow::Result<()> {
    let len = data.as_ref().map(Vec::len);
    c.forward(ForwardRequest {
        held_id,
        replace: data.is_some(),
        data: data.unwrap_or_default().into(),
    })
    .await
    .map_err(status)?;
    match len {
        Some(n) => crate::say!("forwarded held packet {held_id} with {n} replacement bytes"),
        None => crate::say!("forwarded held packet {held_id} unmodified"),
    }
    Ok(())
}

async fn edit(c: &mut Client, held_id: u64) -> anyhow::Result<()> {
    let h = get(c, held_id).await?;
    let original = h.packet.clone().unwrap_or_default().data;
    let text = std::str::from_utf8(&original).ok();
    let content = match text {
        Some(t) => t.to_string(),
        None => format!(
            "# held packet {held_id}: {} bytes, not UTF-8. Edit the hex bytes; lines starting \
             with # and the |text| column are ignored.\n{}",
            original.len(),
            dump(&original)
        ),
    };
    let path = std::env::temp_dir().join(format!(
        "interpose-held-{held_id}-{}.{}",
        std::process::id(),
        if text.is_some() { "txt" } else { "hex" }
    ));
    write_private(&path, content.as_bytes())?;
    let edited = run_editor(&path, "a held packet", "the packet is still held");
    let _ = std::fs::remove_file(&path);
    let edited = edited?;
    let new = match text {
        Some(_) => {
            let mut b = edited;
            if !original.ends_with(b"\n") && b.ends_with(b"\n") {
                b.pop();
            }
            b
        }
        None => {
            parse_dump(&String::from_utf8_lossy(&edited)).context("reading the edited hex dump")?
        }
    };
    if new == original {
        forward(c, held_id, None).await
    } else {
        forward(c, held_id, Some(new)).await
    }
}

/// Creates `path` readable only by the user (the packet may hold secrets).
pub(crate) fn write_private(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// Runs `$VISUAL` or `$EDITOR` (which may carry arguments) on `path` and reads it back;
/// `what` is what is edited and `after_failure` what a failed editor leaves, for errors.
pub(crate) fn run_editor(
    path: &std::path::Path,
    what: &str,
    after_failure: &str,
) -> anyhow::Result<Vec<u8>> {
    let editor = std::env::var("VISUAL")
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| std::env::var("EDITOR").ok().filter(|e| !e.is_empty()))
        .ok_or_else(|| anyhow!("set $EDITOR (or $VISUAL) to edit {what}"))?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .with_context(|| format!("running the editor {editor:?}"))?;
    if !status.success() {
        bail!("the editor {editor:?} failed ({status}); {after_failure}");
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}
