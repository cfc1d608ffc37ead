//! `interpose export`: the decrypted sessions as a PCAP or pcapng file, streamed from the
//! export service chunk by chunk to a file or stdout; with `--follow`, live, until the
//! reader goes away or Ctrl-C.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use clap::Args;
use proto::export::{ExportRequest, ExportSummary, Format, PortMap, export_client::ExportClient};

use crate::{
    ServerArgs,
    client::{channel, status},
    conns::FilterArgs,
};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Where to write the capture: a file path, or `-` for stdout. The file is created
    /// with mode 0600 and appears whole when the export ends (a live export's file grows as
    /// it goes); an existing file is refused unless --force, a symbolic link always.
    #[arg(long)]
    pub out: String,
    /// Replace the --out file if it exists (never a symbolic link).
    #[arg(long)]
    pub force: bool,
    /// Only these connections (repeatable); default: every connection in the history.
    #[arg(long = "conn", value_name = "ID")]
    pub conns: Vec<u64>,
    /// Write pcapng (nanosecond timestamps, per-connection comments, host names) instead of
    /// classic PCAP.
    #[arg(long)]
    pub pcapng: bool,
    /// Export the bytes as received (before intercept edits, dropped packets included)
    /// instead of as relayed.
    #[arg(long)]
    pub original: bool,
    /// Show intercepted TLS connections on server port Q instead of P, so Wireshark
    /// dissects the decrypted protocol (e.g. 443=80); repeatable.
    #[arg(long = "decrypted-port", value_name = "P=Q", value_parser = parse_port_map)]
    pub decrypted_ports: Vec<PortMap>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only connections opened at or after this time (RFC 3339, e.g. 2026-11-29T10:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<prost_types::Timestamp>,
    /// Only connections opened before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<prost_types::Timestamp>,
    /// Start every TCP stream at this initial sequence number (for testing readers with
    /// sequence numbers that wrap around 2^32).
    #[arg(long, hide = true)]
    pub initial_seq: Option<u32>,
    /// Keep streaming as new packets are recorded (implies --pcapng): the matching
    /// connections already in the history first, then the live traffic, each chunk written
    /// at once, until Ctrl-C or the reader closes the pipe (both exit 0). For Wireshark:
    /// `interpose export --follow --out - | wireshark -k -i -`.
    #[arg(long)]
    pub follow: bool,
}

fn parse_port_map(s: &str) -> Result<PortMap, String> {
    let bad = || format!("expected P=Q with ports 1 to 65535, got {s:?}");
    let (from, to) = s.split_once('=').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
    Ok(PortMap {
        from: u32::from(port(from)?),
        to: u32::from(port(to)?),
    })
}

fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    humantime::parse_rfc3339_weak(s)
        .map(proto::time::to_timestamp)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

/// Runs `interpose export`: the destination is checked first (see [`Dest`]); the file is
/// created only once the first chunk arrives, so a refused request leaves nothing behind.
pub async fn run(server: &ServerArgs, args: ExportArgs) -> anyhow::Result<()> {
    if args.out != "-" {
        platform::out_file::check(std::path::Path::new(&args.out), args.force)?;
    }
    let mut client = ExportClient::new(channel(server).await?).max_decoding_message_size(64 << 20);
    let format = if args.pcapng || args.follow {
        Format::Pcapng
    } else {
        Format::Pcap
    };
    let filter = args.filter.to_proto();
    let mut stream = client
        .export_capture(ExportRequest {
            conn_ids: args.conns.clone(),
            format: format as i32,
            filter: Some(filter),
            since: args.since,
            until: args.until,
            decrypted_ports: args.decrypted_ports.clone(),
            original: args.original,
            initial_seq: args.initial_seq,
            follow: args.follow,
        })
        .await
        .map_err(status)?
        .into_inner();
    let dest = Dest {
        out: args.out.clone(),
        force: args.force,
        live: args.follow,
    };
    if args.follow {
        return follow(&mut stream, &dest).await;
    }
    let mut out: Option<Output> = None;
    let mut progress = Progress::new(&args.out);
    let written = receive(&mut stream, &mut out, &mut progress, &dest).await;
    progress.done();
    // A capture cut short is never put in place (its temporary file goes with `out`).
    let summary = written?;
    if let Some(out) = out {
        out.finish()
            .with_context(|| format!("writing {}", args.out))?;
    }
    eprintln!("{}", summary_line(&summary, &args.out));
    Ok(())
}

/// Where a capture goes: stdout (`-`), a file written whole (a temporary file beside it,
/// renamed into place at the end), or for a live export the file itself, created new. Every
/// file is 0600 and never reached through a symbolic link (see [`platform::out_file`]).
struct Dest {
    out: String,
    force: bool,
    live: bool,
}

/// An open destination.
enum Output {
    Stdout(std::io::StdoutLock<'static>),
    Staged(
        std::io::BufWriter<std::fs::File>,
        platform::out_file::Staged,
    ),
    Live(std::io::BufWriter<std::fs::File>),
}

impl Dest {
    fn open(&self) -> anyhow::Result<Output> {
        if self.out == "-" {
            return Ok(Output::Stdout(std::io::stdout().lock()));
        }
        let path = std::path::Path::new(&self.out);
        if self.live {
            let file = platform::out_file::create_replacing(path, self.force)?;
            return Ok(Output::Live(std::io::BufWriter::with_capacity(
                1 << 20,
                file,
            )));
        }
        let mut staged = platform::out_file::Staged::new(path, self.force)?;
        let file = staged
            .file()
            .try_clone()
            .with_context(|| format!("writing {}", self.out))?;
        Ok(Output::Staged(
            std::io::BufWriter::with_capacity(1 << 20, file),
            staged,
        ))
    }
}

impl Output {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stdout(w) => w,
            Output::Staged(w, _) | Output::Live(w) => w,
        }
    }

    /// Flushes, and puts a file written whole in place.
    fn finish(self) -> anyhow::Result<()> {
        match self {
            Output::Stdout(mut w) => w.flush()?,
            Output::Live(mut w) => w.flush()?,
            Output::Staged(w, staged) => {
                w.into_inner().map_err(|e| e.into_error())?;
                staged.commit()?;
            }
        }
        Ok(())
    }
}

/// Writes every chunk to `out` (opened on the first), returning the final summary.
async fn receive(
    stream: &mut tonic::Streaming<proto::export::ExportChunk>,
    out: &mut Option<Output>,
    progress: &mut Progress,
    dest: &Dest,
) -> anyhow::Result<ExportSummary> {
    loop {
        let chunk = stream
            .message()
            .await
            .map_err(status)?
            .ok_or_else(|| anyhow!("the export service ended the stream without a summary"))?;
        let w = match out {
            Some(w) => w,
            None => out.insert(dest.open()?),
        };
        w.writer()
            .write_all(&chunk.data)
            .with_context(|| format!("writing {}", dest.out))?;
        progress.add(chunk.data.len());
        if let Some(summary) = chunk.summary {
            return Ok(summary);
        }
    }
}

/// Writes a live export's chunks as they come, each flushed at once, until Ctrl-C (or
/// SIGTERM) or a reader that closed the pipe, which end it normally (exit 0); the stream
/// ending is an error (the service or registry went away). A file keeps what was written.
async fn follow(
    stream: &mut tonic::Streaming<proto::export::ExportChunk>,
    dest: &Dest,
) -> anyhow::Result<()> {
    let mut out: Option<Output> = None;
    let stop = platform::serve::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let chunk = tokio::select! {
            chunk = stream.message() => chunk.map_err(status)?,
            () = &mut stop => return Ok(()),
        };
        let chunk = chunk.ok_or_else(|| anyhow!("the export service ended the live export"))?;
        let w = match &mut out {
            Some(w) => w.writer(),
            None => out.insert(dest.open()?).writer(),
        };
        // A reader that closed the pipe (Wireshark quit) ends it quietly: `is_closed_stdout`.
        w.write_all(&chunk.data)
            .and_then(|()| w.flush())
            .with_context(|| format!("writing {}", dest.out))?;
    }
}

/// The one line printed at the end.
fn summary_line(s: &ExportSummary, out: &str) -> String {
    let dest = if out == "-" { "stdout" } else { out };
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut line = format!(
        "exported {}, {}, {} ({} file bytes) to {dest}",
        plural(s.connections, "connection", "connections"),
        plural(s.packets, "packet", "packets"),
        plural(s.bytes, "payload byte", "payload bytes"),
        s.file_bytes
    );
    if s.placeholder_connections > 0 {
        let ids: Vec<String> = s.placeholder_ids.iter().map(u64::to_string).collect();
        line.push_str(&format!(
            "; {} with placeholder addresses (record cleared): {}",
            s.placeholder_connections,
            ids.join(" ")
        ));
    }
    line
}

/// A progress line on stderr, only when stderr is a terminal.
struct Progress {
    shown: bool,
    bytes: u64,
    last: Instant,
    dest: String,
}

impl Progress {
    fn new(out: &str) -> Self {
        Self {
            shown: std::io::stderr().is_terminal(),
            bytes: 0,
            last: Instant::now(),
            dest: out.to_string(),
        }
    }

    fn add(&mut self, n: usize) {
        self.bytes += n as u64;
        if self.shown && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            eprint!("\rexporting to {}: {} MiB", self.dest, self.bytes >> 20);
        }
    }

    fn done(&self) {
        if self.shown {
            eprint!("\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_maps_parse_and_refuse_by_name() {
        assert_eq!(parse_port_map("443=80"), Ok(PortMap { from: 443, to: 80 }));
        assert!(parse_port_map("443").unwrap_err().contains("\"443\""));
        assert!(parse_port_map("0=80").is_err());
        assert!(parse_port_map("443=70000").is_err());
    }
}
