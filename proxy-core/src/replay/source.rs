//! Where a replay reads the original connection: its record and its history, from the
//! registry. A small history (at most [`CACHE_BYTES`]) is read once per request and shared
//! by every run; a larger one is paged from the registry by each run as it goes, so a
//! replay of a long connection holds a few pages, never the whole of it.
//!
//! The registry is an [`Originals`]: its replicas over gRPC ([`Replicas`], each read going
//! on to the next replica when one fails), or the registry in this same process
//! (`interpose up`, see [`crate::local`]), called directly.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use platform::failover::Replicas;
use proto::{
    common::{Connection, Direction, Packet},
    registry::{
        GetConnectionRequest, SearchHistoryRequest, SearchHistoryResponse,
        registry_client::RegistryClient,
    },
};
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// Largest history (both directions) read once and kept for every run of a request.
pub const CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// Packets a paging feed keeps ready ahead of the run.
const FEED_AHEAD: usize = 256;
/// Longest one registry call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One read in flight.
pub type Read<'a, T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'a>>;

/// Where a replay reads the original: the two calls it makes, `Registry.GetConnection` and
/// `Registry.SearchHistory`, each bounded by [`CALL_TIMEOUT`].
pub trait Originals: Send + Sync {
    /// The record of connection `id`.
    fn get_connection(&self, id: u64) -> Read<'_, Connection>;

    /// One page of history.
    fn search_history(&self, req: SearchHistoryRequest) -> Read<'_, SearchHistoryResponse>;
}

/// The registry's replicas over gRPC: each read is tried on the next replica while one
/// fails for want of a working replica ([`Replicas::call`]).
impl Originals for Replicas {
    fn get_connection(&self, id: u64) -> Read<'_, Connection> {
        Box::pin(self.call(move |ch| async move {
            let mut client = RegistryClient::new(ch);
            bounded("record", client.get_connection(GetConnectionRequest { id })).await
        }))
    }

    fn search_history(&self, req: SearchHistoryRequest) -> Read<'_, SearchHistoryResponse> {
        Box::pin(self.call(move |ch| {
            let req = req.clone();
            async move {
                let mut client = RegistryClient::new(ch);
                bounded("history", client.search_history(req)).await
            }
        }))
    }
}

/// A read of `what` (the record, the history) bounded by [`CALL_TIMEOUT`].
pub(crate) async fn bounded<T>(
    what: &str,
    read: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, read)
        .await
        .map_err(|_| Status::deadline_exceeded(format!("reading the {what} timed out")))?
        .map(tonic::Response::into_inner)
}

/// One packet of the original as a run needs it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its sequence number.
    pub seq: u64,
    /// When the proxy read it (nanoseconds since the epoch).
    pub ts_nanos: u64,
    /// For client-to-server packets the bytes the server received (dropped packets are
    /// left out); for server-to-client ones the bytes the server sent.
    pub data: bytes::Bytes,
}

impl Recorded {
    fn from_packet(p: Packet) -> Option<Self> {
        let dir = Direction::try_from(p.direction).unwrap_or(Direction::Unspecified);
        let ts_nanos = p.ts.as_ref().map_or(0, proto::time::unix_nanos);
        let data = match dir {
            Direction::C2s if p.dropped => return None,
            Direction::C2s => p.data,
            _ if p.modified => p.original,
            _ => p.data,
        };
        Some(Self {
            seq: p.seq,
            ts_nanos,
            data,
        })
    }
}

/// The original's packets: read once, or paged by each run.
#[derive(Clone)]
pub enum Source {
    /// Every packet, read once (client-to-server, server-to-client).
    Cached(Arc<(Vec<Recorded>, Vec<Recorded>)>),
    /// Paged from the registry by each run.
    Registry {
        /// The registry.
        registry: Arc<dyn Originals>,
        /// The original's ID.
        conn_id: u64,
    },
}

/// A run's stream of the original's packets in one direction, in order; an error ends it.
pub type Feed = mpsc::Receiver<Result<Recorded, Status>>;

impl Source {
    /// The source for `conn` (read now when it is small).
    pub async fn new(registry: Arc<dyn Originals>, conn: &Connection) -> Result<Self, Status> {
        let total = conn.bytes_c2s + conn.bytes_s2c;
        if total > CACHE_BYTES {
            return Ok(Source::Registry {
                registry,
                conn_id: conn.id,
            });
        }
        let (tx, mut rx) = mpsc::channel(FEED_AHEAD);
        tokio::spawn(page(registry, conn.id, Direction::Unspecified, tx));
        let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
        while let Some(p) = rx.recv().await {
            let (p, dir) = p?;
            match dir {
                Direction::S2c => s2c.push(p),
                _ => c2s.push(p),
            }
        }
        Ok(Source::Cached(Arc::new((c2s, s2c))))
    }

    /// The packets of `dir` (client-to-server or server-to-client), in order.
    pub fn feed(&self, dir: Direction) -> Feed {
        let (tx, rx) = mpsc::channel(FEED_AHEAD);
        match self {
            Source::Cached(both) => {
                let both = both.clone();
                tokio::spawn(async move {
                    let list = if dir == Direction::S2c {
                        &both.1
                    } else {
                        &both.0
                    };
                    for p in list {
                        if tx.send(Ok(p.clone())).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Source::Registry { registry, conn_id } => {
                let (inner_tx, mut inner_rx) = mpsc::channel(FEED_AHEAD);
                tokio::spawn(page(registry.clone(), *conn_id, dir, inner_tx));
                tokio::spawn(async move {
                    while let Some(p) = inner_rx.recv().await {
                        if tx.send(p.map(|(p, _)| p)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        rx
    }
}

/// Sends `conn_id`'s packets of `dir` (unspecified: both) to `tx`, page by page.
async fn page(
    registry: Arc<dyn Originals>,
    conn_id: u64,
    dir: Direction,
    tx: mpsc::Sender<Result<(Recorded, Direction), Status>>,
) {
    let mut token = String::new();
    loop {
        let req = SearchHistoryRequest {
            conn_id,
            direction: dir as i32,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = registry.search_history(req).await;
        let page = match page {
            Ok(p) => p,
            Err(s) => {
                let _ = tx
                    .send(Err(Status::new(
                        s.code(),
                        format!("reading connection {conn_id}'s history: {}", s.message()),
                    )))
                    .await;
                return;
            }
        };
        for p in page.packets {
            let d = Direction::try_from(p.direction).unwrap_or(Direction::Unspecified);
            if let Some(r) = Recorded::from_packet(p)
                && tx.send(Ok((r, d))).await.is_err()
            {
                return;
            }
        }
        if page.next_page_token.is_empty() {
            return;
        }
        token = page.next_page_token;
    }
}

/// The original's record.
pub async fn record(registry: &dyn Originals, id: u64) -> Result<Connection, Status> {
    registry
        .get_connection(id)
        .await
        .map_err(|s| match s.code() {
            Code::NotFound => Status::not_found(format!("no connection {id}")),
            _ => Status::new(
                s.code(),
                format!("reading connection {id}'s record: {}", s.message()),
            ),
        })
}

/// The server-to-client bytes the original's server sent up to packet `through` (its TLS
/// point).
pub async fn s2c_bytes_through(source: &Source, through: u64) -> Result<u64, Status> {
    let mut feed = source.feed(Direction::S2c);
    let mut n = 0;
    if through == 0 {
        return Ok(0);
    }
    while let Some(p) = feed.recv().await {
        let p = p?;
        if p.seq > through {
            break;
        }
        n += p.data.len() as u64;
    }
    Ok(n)
}

/// The sequence numbers of the original's client-to-server packets.
pub async fn c2s_seqs(source: &Source) -> Result<std::collections::HashSet<u64>, Status> {
    let mut feed = source.feed(Direction::C2s);
    let mut seqs = std::collections::HashSet::new();
    while let Some(p) = feed.recv().await {
        seqs.insert(p?.seq);
    }
    Ok(seqs)
}
