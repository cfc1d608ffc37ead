//! The registry's storage as a trait: everything the service, the ingest pipeline, the
//! watchers, the followers and node liveness need from a store, so that another backend
//! can take the place of the embedded sled store ([`crate::backend::sled_store::Store`]) without touching
//! them (issue 13 puts PostgreSQL behind it).
//!
//! Every method may block on disk or network: the registry calls them on its writer and
//! committer threads ([`crate::ingest`]) or on the blocking pool ([`crate::State::blocking`]),
//! never on the async threads. Writes that change a record are made while the caller holds
//! the watch hub's lock ([`crate::hub`]), so watchers see each change once.

use proto::{
    common::{ConnStatus, Connection, Packet},
    registry::{ConnectionClosed, ConnectionFilter, ConnectionUpdate, ProxyLosses},
};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

pub mod frame;
pub mod model;
pub mod pg;
pub mod sled_store;

pub use sled_store::{LogPage, Purge, Purged};

/// Longest a batch waits for the commit that makes it durable, unless the store says
/// otherwise ([`Durability::commit_interval`]).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(5);

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O error, corruption detected by sled).
    // Not a `#[source]`: the cause chain would print sled's debug text after the sentence.
    #[error("registry store: {}", describe_sled(.0))]
    Sled(sled::Error),
    /// The history log failed.
    #[error("registry history: {0}")]
    History(#[from] std::io::Error),
    /// A stored value does not decode.
    #[error("corrupt {what} in the registry store: {source}")]
    Corrupt {
        what: &'static str,
        source: prost::DecodeError,
    },
    /// Stored history packets do not decode (a block of framed packets cut short).
    #[error("corrupt {what} in the registry store: {source}")]
    CorruptFrame {
        what: &'static str,
        source: frame::FrameError,
    },
    /// No record with this ID.
    #[error("no connection with ID {0}")]
    NotFound(u64),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The task doing the store work panicked or was cancelled.
    #[error("registry store task: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The PostgreSQL database failed or cannot be reached: what happened as a sentence,
    /// and the client's error when there is one.
    // Not a `#[source]`: the sentence already says what the error's own text would.
    #[error("registry database: {message}")]
    Database {
        message: String,
        error: Option<Box<postgres::Error>>,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        Self::Sled(e)
    }
}

/// A sled error as a sentence: sled's own messages embed Rust debug text (`Os { code: 11,
/// kind: WouldBlock, .. }`), which users should never see.
fn describe_sled(e: &sled::Error) -> String {
    match e {
        // sled reports a held lock as an `Other` error with this text.
        sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock") => {
            "the data directory is in use by another Interpose process (another `interpose \
             up` or registry-svc holds its lock)"
                .to_string()
        }
        sled::Error::Io(io) => match io.raw_os_error() {
            // The OS's words for the error, without sled's debug-formatted wrapping.
            Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
            None if io.get_ref().is_some() => io.to_string(),
            None => format!("I/O error ({})", io.kind()),
        },
        sled::Error::Corruption { at, .. } => match at {
            Some(at) => format!("the store is corrupt (at {at})"),
            None => "the store is corrupt".to_string(),
        },
        sled::Error::CollectionNotFound(_) => "a store collection is missing".to_string(),
        sled::Error::Unsupported(what) => format!("unsupported: {what}"),
        sled::Error::ReportableBug(what) => format!("internal sled error: {what}"),
    }
}

/// A change to the connection records, as watchers see it.
#[derive(Debug, Clone)]
pub enum Change {
    /// The record was created or changed.
    Upsert(std::sync::Arc<Connection>),
    /// The record was cleared.
    Removed(u64),
    /// Changes were missed (a store's feed fell behind what it keeps): every watcher starts
    /// over from a new snapshot.
    Reset,
}

/// A change with its place in the order of changes.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// 1, 2, 3, ... in publication order.
    pub seq: u64,
    pub change: Change,
}

/// One page of records read at one point of a store's own order of changes.
#[derive(Debug, Default)]
pub struct PageAt {
    /// The matching records of the page, in ID order.
    pub records: Vec<Connection>,
    /// Where the next page starts (`None`: the end was reached).
    pub next: Option<u64>,
    /// The number of the last record change the page reflects.
    pub seq: u64,
    /// The last arrival position the page reflects.
    pub position: u64,
}

/// What a store holds and has had to drop, as `conns stats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Packets in the history.
    pub history_packets: u64,
    /// Bytes of history payload on disk.
    pub history_bytes: u64,
    /// Bytes the records and the history's bookkeeping use on disk.
    pub records_bytes: u64,
    /// The history's budget (0: none) and what happens at it (`evict` or `stop`).
    pub max_bytes: u64,
    pub when_full: &'static str,
    /// (packets, bytes) evicted at the budget, refused at it, purged on request, and not
    /// written because the disk failed.
    pub evicted: (u64, u64),
    pub refused: (u64, u64),
    pub purged: (u64, u64),
    pub unwritten: (u64, u64),
    /// Why history cannot be written now, if it cannot.
    pub failing: Option<String>,
}

/// A store of connection records, proxy history, leased IDs and node reports: every part
/// below. Callers name the part they use ([`Records`], [`History`], [`Nodes`],
/// [`Durability`], [`Feed`]); the registry holds one `Box<dyn Backend>`.
pub trait Backend: Records + History + Nodes + Durability + Feed {}

impl<T: Records + History + Nodes + Durability + Feed + ?Sized> Backend for T {}

/// Connection records: opened, updated, closed, read, cleared, and leased IDs.
pub trait Records: Send + Sync {
    /// Records a newly opened connection (active unless it says otherwise); `None` when its
    /// ID was cleared before.
    fn open_conn(&self, c: Connection) -> Result<Option<Connection>, StoreError>;

    /// Applies an update to a record; `None` when it is unknown or cleared.
    fn update_conn(&self, u: &ConnectionUpdate) -> Result<Option<Connection>, StoreError>;

    /// Records the end of a connection; `None` when it is unknown or cleared.
    fn close_conn(&self, e: &ConnectionClosed) -> Result<Option<Connection>, StoreError>;

    /// The record with `id`, if there is one.
    fn get_opt(&self, id: u64) -> Result<Option<Connection>, StoreError>;

    /// Records with IDs from `from` up, in ID order, each passed to `f` until it says stop.
    fn scan_conns(
        &self,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError>;

    /// Records with IDs below `below`, highest first, each passed to `f` until it says stop.
    fn scan_conns_rev(
        &self,
        below: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError>;

    /// [`Records::scan_conns`] of the active records only, reading no closed ones.
    fn scan_active(
        &self,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError>;

    /// Removes the records `ids`, all or none (`NotFound` names the first unknown one); a
    /// cleared ID never comes back.
    fn clear(&self, ids: &[u64]) -> Result<Vec<u64>, StoreError>;

    /// Removes up to `max` records with IDs from `from` up, lowest first, as
    /// [`Records::clear`] does; the IDs removed (none: no records are left there).
    fn clear_page(&self, from: u64, max: usize) -> Result<Vec<u64>, StoreError>;

    /// Leases `count` IDs never given out before, durable before it returns.
    fn lease(&self, count: u32) -> Result<(u64, u64), StoreError>;

    /// The record with `id`, or `NotFound`.
    fn get(&self, id: u64) -> Result<Connection, StoreError> {
        self.get_opt(id)?.ok_or(StoreError::NotFound(id))
    }

    /// One page of the records matching `filter`: the matches among at most `max` records
    /// from `from` on, through the active records when only those can match, and the ID the
    /// next page starts at (`None`: the end was reached).
    fn scan_page(
        &self,
        filter: &ConnectionFilter,
        from: u64,
        max: usize,
    ) -> Result<(Vec<Connection>, Option<u64>), StoreError> {
        page_of(filter, max, |visit| self.scan_for(filter, from, visit))
    }

    /// Records matching `filter` from `from` on, each passed to `f` until it says stop.
    fn scan_matching(
        &self,
        filter: &ConnectionFilter,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_for(filter, from, &mut |c| {
            !crate::filter::matches(filter, &c) || f(c)
        })
    }

    /// The scan that can hold matches of `filter`: the active records only, or all.
    fn scan_for(
        &self,
        filter: &ConnectionFilter,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        if filter.status == ConnStatus::Active as i32 {
            self.scan_active(from, f)
        } else {
            self.scan_conns(from, f)
        }
    }
}

/// Proxy history: recorded, read in (connection, seq) order and in arrival order, purged.
pub trait History: Send + Sync {
    /// Stores history packets, idempotently, and logs them with the records `closed` at the
    /// next arrival position (see [`crate::backend::sled_store::arrivals`]).
    fn record(&self, packets: Vec<Packet>, closed: Vec<Connection>) -> Result<(), StoreError>;

    /// History packets from `(conn_id, seq)` on, in that order (one connection's only when
    /// `only_conn`), recorded at arrival positions up to `upto`, each passed to `f` until
    /// it says stop.
    fn scan_history_upto(
        &self,
        start: (u64, u64),
        only_conn: bool,
        upto: u64,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> Result<(), StoreError>;

    /// Deletes history on request.
    fn purge(&self, what: &Purge) -> Result<Purged, StoreError>;

    /// The last arrival position written.
    fn position(&self) -> u64;

    /// Wakes when a new arrival position is written.
    fn follow_positions(&self) -> watch::Receiver<u64>;

    /// What was recorded after position `after` (of `conn_id` only, unless 0), at most
    /// `max_entries` positions and about `max_bytes` of payload.
    fn log_after(
        &self,
        after: u64,
        conn_id: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError>;

    /// Positions up to this one may have lost packets to eviction or purge.
    fn removed_position(&self) -> u64;

    /// What the store holds and has had to drop.
    fn usage(&self) -> Result<Usage, StoreError>;

    /// Follows whether history can be written: the failure's text while it cannot.
    fn history_failing(&self) -> watch::Receiver<Option<String>>;
}

/// What proxy nodes reported: losses, ingest sessions, liveness across replicas.
pub trait Nodes: Send + Sync {
    /// Stores the loss totals `node` reported.
    fn set_losses(&self, node: &str, losses: &ProxyLosses) -> Result<(), StoreError>;

    /// The loss totals of every node that reported any.
    fn losses(&self) -> Result<Vec<(String, ProxyLosses)>, StoreError>;

    /// The ingest session `node` last reported, if known.
    fn node_session(&self, node: &str) -> Result<Option<String>, StoreError>;

    /// Records the ingest session `node` reports now.
    fn set_node_session(&self, node: &str, session: &str) -> Result<(), StoreError>;

    /// Notes that `nodes` are reporting to this process now (for the other registry
    /// processes on the same store, see [`Nodes::node_reported_within`]).
    fn touch_nodes(&self, _nodes: &[String]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether `node` reported to another registry process on the same store within
    /// `grace` (never, for a store of one process).
    fn node_reported_within(&self, _node: &str, _grace: Duration) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// Making writes durable: group commit and the close at shutdown.
pub trait Durability: Send + Sync {
    /// Makes everything written so far durable.
    fn commit(&self) -> Result<(), StoreError>;

    /// How many commits have failed in a way that lost what they took (a store that stages
    /// writes until they are committed); 0 for a store whose writes stay applied when a
    /// commit fails. See the ingest pipeline's `Settler`.
    fn failed_commits(&self) -> u64 {
        0
    }

    /// How long the oldest batch applied waits for others before [`Durability::commit`] makes
    /// them durable together (the ingest committer's group commit).
    fn commit_interval(&self) -> Duration {
        COMMIT_INTERVAL
    }

    /// Makes everything durable and notes a clean close (at shutdown; nothing is written
    /// after it).
    fn close(&self) -> Result<(), StoreError>;
}

/// Record changes made through other registry processes (a shared store).
pub trait Feed: Send + Sync {
    /// Whether record changes made through other registry processes reach this one: the
    /// store then numbers every change itself and publishes them all, numbered, to `feed`
    /// (from a thread of its own), and [`Feed::page_at`] reads pages at a number. False
    /// for a store only this process writes: the hub numbers changes as they are made.
    fn start_feed(&self, _feed: broadcast::Sender<Numbered>) -> bool {
        false
    }

    /// With a feed of its own ([`Feed::start_feed`]): one page as [`Records::scan_page`]
    /// reads it (or only the record `only`, when not 0), read in one snapshot together with
    /// the number of the last change and the arrival position it reflects.
    fn page_at(
        &self,
        _filter: &ConnectionFilter,
        _from: u64,
        _max: usize,
        _only: u64,
    ) -> Option<Result<PageAt, StoreError>> {
        None
    }
}

/// The page [`Records::scan_page`] describes, from a `scan` of records in ID order: the
/// matches of `filter` among the first `max` records it passes, and the next one's ID.
pub(crate) fn page_of(
    filter: &ConnectionFilter,
    max: usize,
    scan: impl FnOnce(&mut dyn FnMut(Connection) -> bool) -> Result<(), StoreError>,
) -> Result<(Vec<Connection>, Option<u64>), StoreError> {
    let (mut items, mut scanned, mut next) = (Vec::new(), 0, None);
    scan(&mut |c: Connection| {
        if scanned == max {
            next = Some(c.id);
            return false;
        }
        scanned += 1;
        if crate::filter::matches(filter, &c) {
            items.push(c);
        }
        true
    })?;
    Ok((items, next))
}
