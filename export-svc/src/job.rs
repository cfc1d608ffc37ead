//! One export run: reads records and history from the registry page by page, turns each
//! connection into frames and sends the capture file as chunks of about 1 MiB. At most one
//! history page, one connection's state and one chunk are held, so memory stays flat
//! however large the export.

use std::{collections::VecDeque, sync::Arc};

use proto::{
    common::{Connection, Direction, Packet, Transport},
    export::{ExportChunk, ExportSummary},
    registry::{ListConnectionsRequest, SearchHistoryRequest},
};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::{
    endpoints::Endpoints,
    plan::{Plan, comment, ending},
};
use protocols::{
    capture::CaptureWriter,
    frames::{Ending, FrameSink, Side, TcpSession, UdpSession},
};

/// Chunk size the file is sent in.
const CHUNK: usize = 1 << 20;
/// A packet is framed this many bytes at a time (a multiple of both MSS values).
const PIECE: usize = 1460 * 1440 / 20 * 2;

/// The registry export-svc reads through: its replicas (often one) over gRPC, each read
/// going on to the next when one fails (see [`platform::failover`]), or the registry in the
/// same process (see [`crate::registry`]).
pub type Registry = Arc<dyn crate::registry::RegistryReads>;

/// Why a run stopped early.
pub(crate) enum Stop {
    /// The caller hung up: nothing more to do.
    Gone,
    /// A failure to report to the caller.
    Failed(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Failed(registry_status(s))
    }
}

/// A registry failure as the export's caller should see it.
fn registry_status(s: Status) -> Status {
    match s.code() {
        Code::NotFound | Code::InvalidArgument => s,
        code => Status::new(code, format!("reading from the registry: {}", s.message())),
    }
}

/// Runs the export `plan`, sending chunks (and at the end the summary, or an error) on `tx`.
pub async fn run(registry: Registry, plan: Plan, tx: mpsc::Sender<Result<ExportChunk, Status>>) {
    let mut job = Job {
        writer: CaptureWriter::new(plan.format),
        registry,
        plan,
        tx,
        summary: ExportSummary::default(),
    };
    if let Err(Stop::Failed(status)) = job.run().await {
        let _ = job.tx.send(Err(status)).await;
    }
}

/// One run's state: the request, the registry, the file being written and its totals.
pub(crate) struct Job {
    pub(crate) registry: Registry,
    pub(crate) plan: Plan,
    pub(crate) tx: mpsc::Sender<Result<ExportChunk, Status>>,
    pub(crate) writer: CaptureWriter,
    pub(crate) summary: ExportSummary,
}

impl Job {
    async fn run(&mut self) -> Result<(), Stop> {
        if self.plan.follow {
            return self.follow().await;
        }
        if !self.plan.conn_ids.is_empty() {
            self.by_id().await?;
        } else if let Some(filter) = self.plan.filter.clone() {
            self.by_filter(filter).await?;
        } else {
            self.everything().await?;
        }
        let data = self.writer.take();
        self.summary.file_bytes += data.len() as u64;
        let chunk = ExportChunk {
            data: data.into(),
            summary: Some(std::mem::take(&mut self.summary)),
        };
        self.tx.send(Ok(chunk)).await.map_err(|_| Stop::Gone)
    }

    /// Explicit IDs: each must have a record or history (checked before any byte is sent).
    async fn by_id(&mut self) -> Result<(), Stop> {
        let mut records = Vec::with_capacity(self.plan.conn_ids.len());
        for id in self.plan.conn_ids.clone() {
            let record = self.record(id).await?;
            if record.is_none() {
                let mut h = History::new(id);
                if h.peek(&self.registry).await?.is_none() {
                    return Err(Stop::Failed(Status::not_found(format!(
                        "connection {id} has neither a record nor history"
                    ))));
                }
            }
            records.push((id, record));
        }
        for (id, record) in records {
            self.connection(id, record, &mut History::new(id)).await?;
        }
        Ok(())
    }

    /// Records matching a filter, each with its history.
    async fn by_filter(&mut self, filter: proto::registry::ConnectionFilter) -> Result<(), Stop> {
        let mut records = Records::new(Some(filter));
        while let Some(c) = records.next(&self.registry).await? {
            let id = c.id;
            self.connection(id, Some(c), &mut History::new(id)).await?;
        }
        Ok(())
    }

    /// Every record and every connection in the history (cleared ones as placeholders): the
    /// two ID-ordered sequences merged.
    async fn everything(&mut self) -> Result<(), Stop> {
        let mut records = Records::new(None);
        let mut history = History::new(0);
        loop {
            let record_id = records.peek(&self.registry).await?.map(|c| c.id);
            let packet_id = history.peek(&self.registry).await?.map(|p| p.conn_id);
            let id = match (record_id, packet_id) {
                (None, None) => return Ok(()),
                (Some(r), Some(p)) => r.min(p),
                (Some(r), None) => r,
                (None, Some(p)) => p,
            };
            let record = match record_id == Some(id) {
                true => records.next(&self.registry).await?,
                false => None,
            };
            self.connection(id, record, &mut history).await?;
        }
    }

    /// The record of `id`, or `None` when it was cleared.
    pub(crate) async fn record(&mut self, id: u64) -> Result<Option<Connection>, Stop> {
        match self.registry.get_connection(id).await {
            Ok(r) => Ok(Some(r)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Writes connection `id` from its record (or placeholders) and its packets in
    /// `history` (those at its front with this ID).
    async fn connection(
        &mut self,
        id: u64,
        record: Option<Connection>,
        history: &mut History,
    ) -> Result<(), Stop> {
        let first_ts = history
            .peek(&self.registry)
            .await?
            .filter(|p| p.conn_id == id)
            .and_then(|p| p.ts.as_ref())
            .map(proto::time::unix_nanos);
        let opened = record
            .as_ref()
            .and_then(|c| c.opened_at.as_ref())
            .map(proto::time::unix_nanos)
            .or(first_ts)
            .unwrap_or(0);
        if !self.plan.in_range(opened) {
            while history.next_of(id, &self.registry).await?.is_some() {}
            return Ok(());
        }
        let mut stream = self.open_stream(id, record.as_ref(), opened);
        let mut last = opened;
        while let Some(p) = history.next_of(id, &self.registry).await? {
            last = self.packet(&mut stream, &p, last).await?;
        }
        self.end_stream(&mut stream, record.as_ref(), last);
        self.flush(CHUNK).await
    }

    /// Writes packet `p` of `stream` at its timestamp (`last` when it has none); returns
    /// the stream's latest timestamp.
    pub(crate) async fn packet(
        &mut self,
        stream: &mut Stream,
        p: &Packet,
        last: u64,
    ) -> Result<u64, Stop> {
        let ts = p.ts.as_ref().map_or(last, proto::time::unix_nanos);
        if let Some(bytes) = payload(p, self.plan.original) {
            let side = match Direction::try_from(p.direction) {
                Ok(Direction::S2c) => Side::Server,
                _ => Side::Client,
            };
            // A large packet goes out in pieces, so no chunk grows past CHUNK + PIECE.
            for piece in bytes.chunks(PIECE) {
                stream.data(&mut self.writer, ts, side, piece);
                self.flush(CHUNK).await?;
            }
            self.summary.packets += 1;
            self.summary.bytes += bytes.len() as u64;
        }
        Ok(last.max(ts))
    }

    /// Writes the end of a TCP stream as its `record` says (a cleared record: an orderly
    /// close by the client at `last`).
    pub(crate) fn end_stream(
        &mut self,
        stream: &mut Stream,
        record: Option<&Connection>,
        last: u64,
    ) {
        if let Stream::Tcp(s) = stream {
            let (end_ts, how) = match record {
                Some(c) => (
                    c.closed_at.as_ref().map_or(last, proto::time::unix_nanos),
                    ending(c),
                ),
                None => (last, Ending::Fin(Side::Client)),
            };
            s.end(&mut self.writer, end_ts, how);
        }
    }

    /// Counts connection `id` and writes its start: the name record, and for TCP the
    /// handshake at `opened`.
    pub(crate) fn open_stream(
        &mut self,
        id: u64,
        record: Option<&Connection>,
        opened: u64,
    ) -> Stream {
        let ends = match record {
            Some(c) => Endpoints::from_record(c, &self.plan.ports),
            None => {
                self.summary.placeholder_connections += 1;
                self.summary.placeholder_ids.push(id);
                Endpoints::placeholder(id)
            }
        };
        self.summary.connections += 1;
        let note = comment(id, record, &ends);
        if let Some(c) = record.filter(|c| c.dst_host.parse::<std::net::IpAddr>().is_err()) {
            self.writer.name(ends.server.ip(), &c.dst_host);
        }
        if record.is_some_and(|c| c.transport == Transport::Udp as i32) {
            return Stream::Udp(UdpSession::new(ends.client, ends.server, Some(note)));
        }
        let isn = self.plan.isn(id);
        let mut s = TcpSession::new(ends.client, ends.server, isn, Some(note));
        s.handshake(&mut self.writer, opened);
        Stream::Tcp(s)
    }

    /// Sends what is written once it reaches `at_least` bytes.
    pub(crate) async fn flush(&mut self, at_least: usize) -> Result<(), Stop> {
        if self.writer.out.len() < at_least {
            return Ok(());
        }
        let data = self.writer.take();
        self.summary.file_bytes += data.len() as u64;
        let chunk = ExportChunk {
            data: data.into(),
            summary: None,
        };
        self.tx.send(Ok(chunk)).await.map_err(|_| Stop::Gone)
    }
}

/// The bytes of a packet the export writes: as relayed by default (nothing for a dropped
/// packet), as received with `original`.
fn payload(p: &Packet, original: bool) -> Option<&[u8]> {
    let bytes = match (original, p.modified) {
        (true, true) => &p.original[..],
        (false, _) if p.dropped => return None,
        _ => &p.data[..],
    };
    (!bytes.is_empty()).then_some(bytes)
}

/// A TCP stream or a UDP association.
pub(crate) enum Stream {
    Tcp(TcpSession),
    Udp(UdpSession),
}

impl Stream {
    fn data(&mut self, sink: &mut impl FrameSink, ts: u64, side: Side, bytes: &[u8]) {
        match self {
            Stream::Tcp(s) => s.data(sink, ts, side, bytes),
            Stream::Udp(s) => s.data(sink, ts, side, bytes),
        }
    }
}

/// The history of one connection (or of all, `conn_id` 0), page by page.
struct History {
    conn_id: u64,
    /// The next page's token; `None` once the last page was fetched.
    token: Option<String>,
    page: VecDeque<Packet>,
}

impl History {
    fn new(conn_id: u64) -> Self {
        Self {
            conn_id,
            token: Some(String::new()),
            page: VecDeque::new(),
        }
    }

    /// The next packet, fetching a page when needed.
    async fn peek(&mut self, registry: &Registry) -> Result<Option<&Packet>, Status> {
        while self.page.is_empty() {
            let Some(page_token) = self.token.take() else {
                return Ok(None);
            };
            let request = SearchHistoryRequest {
                conn_id: self.conn_id,
                page_token,
                ..Default::default()
            };
            let page = registry.search_history(request).await?;
            self.page = page.packets.into();
            self.token = Some(page.next_page_token).filter(|t| !t.is_empty());
        }
        Ok(self.page.front())
    }

    /// The next packet if it belongs to connection `id`.
    async fn next_of(&mut self, id: u64, registry: &Registry) -> Result<Option<Packet>, Status> {
        match self.peek(registry).await? {
            Some(p) if p.conn_id == id => Ok(self.page.pop_front()),
            _ => Ok(None),
        }
    }
}

/// Connection records, page by page.
struct Records {
    filter: Option<proto::registry::ConnectionFilter>,
    token: Option<String>,
    page: VecDeque<Connection>,
}

impl Records {
    fn new(filter: Option<proto::registry::ConnectionFilter>) -> Self {
        Self {
            filter,
            token: Some(String::new()),
            page: VecDeque::new(),
        }
    }

    async fn peek(&mut self, registry: &Registry) -> Result<Option<&Connection>, Status> {
        while self.page.is_empty() {
            let Some(page_token) = self.token.take() else {
                return Ok(None);
            };
            let request = ListConnectionsRequest {
                filter: self.filter.clone(),
                page_size: 1000,
                page_token,
                newest_first: false,
            };
            let page = registry.list_connections(request).await?;
            self.page = page.connections.into();
            self.token = Some(page.next_page_token).filter(|t| !t.is_empty());
        }
        Ok(self.page.front())
    }

    async fn next(&mut self, registry: &Registry) -> Result<Option<Connection>, Status> {
        self.peek(registry).await?;
        Ok(self.page.pop_front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_what_was_sent_or_with_original_what_was_received() {
        let edited = Packet {
            data: b"sent".to_vec().into(),
            modified: true,
            original: b"received".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(payload(&edited, false), Some(&b"sent"[..]));
        assert_eq!(payload(&edited, true), Some(&b"received"[..]));
        let dropped = Packet {
            modified: true,
            dropped: true,
            original: b"held".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(payload(&dropped, false), None);
        assert_eq!(payload(&dropped, true), Some(&b"held"[..]));
        let plain = Packet {
            data: b"same".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(payload(&plain, true), Some(&b"same"[..]));
    }
}
