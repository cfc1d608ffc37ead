//! The registry's durable state in sled: connection records, proxy history, leased IDs,
//! tombstones of cleared records and the losses each proxy reported.
//!
//! Layout (all integers big-endian, so sled's key order is numeric order):
//! - `conns`:   conn ID (8 bytes) -> `common.Connection` (protobuf)
//! - `history`: conn ID (8) + first seq (8) -> a [`Run`] of packets with consecutive
//!   sequence numbers. Storing runs rather than single packets cuts sled inserts (which
//!   copy a whole node each) by the run length. Runs never share a sequence number, so key
//!   order is sequence order; a replayed batch yields the same runs and is merged into
//!   them. The payload bytes are not in sled but in the [`PayloadLog`]'s segment files
//!   (runs hold segment and offset); runs written before the log existed hold their bytes
//!   inline.
//! - `active`: conn ID (8) -> empty, for each active record (see [`active`])
//! - `segment_runs`: segment (8) + history key (16) -> empty: the runs holding packets in a
//!   segment, so evicting or purging a segment finds them without a scan (see [`budget`])
//! - `cleared`: conn ID (8) -> empty; events for a cleared ID are ignored, so a late close or
//!   a replayed batch never brings a cleared record back
//! - `meta`:    `next_id` -> u64, `history_count` -> u64, `open` while open, `unwritten_packets` and
//!   `unwritten_bytes` -> u64 ([`unwritten`]), `losses/NODE` -> `ProxyLosses`, the
//!   budget's counts ([`budget`])
//!
//! - `arrivals`: position (8) -> the runs and closed records written at it: the order in
//!   which things were recorded, for followers (see [`arrivals`])
//!
//! It is the registry's [`crate::backend::Backend`] (`as_backend.rs`). Writes that change a
//! record are made while the caller holds the [`crate::watch::Hub`] lock, so watchers see
//! every change exactly once.

use std::{
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use proto::{
    common::{ConnStatus, Connection, Packet},
    registry::{ConnectionClosed, ConnectionUpdate, Counters, ProxyLosses},
};

use crate::payload::PayloadLog;

pub mod active;
pub mod arrivals;
mod as_backend;
pub mod budget;
pub mod purge;
pub mod unwritten;

pub use arrivals::{Followed, LogPage};
pub use budget::{HistoryOptions, WhenFull};
pub use purge::{Purge, Purged};

/// Largest block of IDs one lease may take.
pub const MAX_LEASE: u32 = 65_536;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O error, corruption detected by sled).
    // Not a `#[source]`: the cause chain would print sled's debug text after the sentence.
    #[error("registry store: {}", describe_sled(.0))]
    Sled(sled::Error),
    /// The payload log failed.
    #[error("registry history payloads: {0}")]
    Payload(#[from] std::io::Error),
    /// A stored value does not decode.
    #[error("corrupt {what} in the registry store: {source}")]
    Corrupt {
        what: &'static str,
        source: prost::DecodeError,
    },
    /// No record with this ID.
    #[error("no connection with ID {0}")]
    NotFound(u64),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The task doing the store work panicked or was cancelled.
    #[error("registry store task: {0}")]
    Task(String),
    /// The PostgreSQL database failed or cannot be reached.
    #[error("registry database: {0}")]
    Database(String),
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

/// The registry's sled database.
pub struct Store {
    db: sled::Db,
    conns: sled::Tree,
    active: sled::Tree,
    history: sled::Tree,
    cleared: sled::Tree,
    meta: sled::Tree,
    payloads: std::sync::Arc<PayloadLog>,
    segment_runs: sled::Tree,
    budget: budget::Budget,
    arrivals: arrivals::Arrivals,
    history_count: AtomicU64,
    unwritten: unwritten::Unwritten,
    lease_lock: Mutex<()>,
    /// The highest run key stored, by connection (see [`Store::run_may_exist`]).
    last_run: Mutex<std::collections::HashMap<u64, u64>>,
}

/// Connections whose last run key is remembered; beyond it the map starts afresh (a
/// connection not in it costs one lookup).
const LAST_RUN_ENTRIES: usize = 65_536;

const NEXT_ID: &[u8] = b"next_id";
const HISTORY_COUNT: &[u8] = b"history_count";
/// Present while a process has the store open: found at open, the last close was a crash.
const OPEN: &[u8] = b"open";
const UNWRITTEN_PACKETS: &[u8] = b"unwritten_packets";
const UNWRITTEN_BYTES: &[u8] = b"unwritten_bytes";
const LOSSES_PREFIX: &[u8] = b"losses/";
const SESSION_PREFIX: &[u8] = b"session/";

fn u64_value(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// A [`Run`] of packets with consecutive sequence numbers is stored under the first; its
/// [`StoredPacket`]s hold their payload in the payload log (`log_len` not 0) or, in runs
/// written before the log existed, inline. Generated from the storage format's .proto.
pub use proto::registry_store::{Run, StoredPacket};

/// Splits packets into runs of one connection with consecutive sequence numbers, dropping
/// repeats of a (connection, seq) within the input.
pub fn into_runs(mut packets: Vec<Packet>) -> Vec<Vec<Packet>> {
    packets.sort_by_key(|p| (p.conn_id, p.seq));
    packets.dedup_by_key(|p| (p.conn_id, p.seq));
    let mut runs: Vec<Vec<Packet>> = Vec::new();
    for p in packets {
        match runs.last_mut() {
            Some(run)
                if run
                    .last()
                    .is_some_and(|l| l.conn_id == p.conn_id && l.seq + 1 == p.seq) =>
            {
                run.push(p);
            }
            _ => runs.push(vec![p]),
        }
    }
    runs
}

/// The history key of a run (or of a packet position).
pub fn history_key(conn_id: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&conn_id.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The `segment_runs` key of the run `key` holding packets in `segment`.
pub fn segment_run_key(segment: u64, key: &[u8; 16]) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&segment.to_be_bytes());
    k[8..].copy_from_slice(key);
    k
}

/// Splits a history key into connection ID and sequence.
pub fn split_history_key(k: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(k.get(8..16)?.try_into().ok()?);
    Some((id, seq))
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt { what, source })
}

impl Store {
    /// Opens (or creates) the store in `dir`, with no history budget.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, &HistoryOptions::default())
    }

    /// Opens (or creates) the store in `dir`, keeping its history within `options`.
    pub fn open_with(dir: &Path, options: &HistoryOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(256 * 1024 * 1024)
            .flush_every_ms(Some(200))
            .open()?;
        let conns = db.open_tree("conns")?;
        let history = db.open_tree("history")?;
        let cleared = db.open_tree("cleared")?;
        let meta = db.open_tree("meta")?;
        let active = active::open(&db, &conns, &meta)?;
        let payloads = std::sync::Arc::new(PayloadLog::open(dir, options.segment_bytes())?);
        let segment_runs = db.open_tree("segment_runs")?;
        let budget = budget::Budget::open(options, &meta)?;
        let arrivals = arrivals::Arrivals::open(&db)?;
        let history_count = match meta.get(HISTORY_COUNT)? {
            Some(v) => u64_value(Some(v)),
            None => history.len() as u64,
        };
        let unwritten = unwritten::Unwritten::new(
            u64_value(meta.get(UNWRITTEN_PACKETS)?),
            u64_value(meta.get(UNWRITTEN_BYTES)?),
        );
        Ok(Self {
            db,
            conns,
            active,
            history,
            cleared,
            meta,
            payloads,
            segment_runs,
            budget,
            arrivals,
            history_count: AtomicU64::new(history_count),
            unwritten,
            lease_lock: Mutex::new(()),
            last_run: Mutex::default(),
        })
        .and_then(|s| {
            s.finish_removals()?;
            s.mark_open()?;
            Ok(s)
        })
    }

    /// Notes that the store is open, and recounts the history when it was not closed
    /// cleanly: the count is saved at each commit, but sled also flushes on its own, so
    /// after a crash the runs on disk can be ahead of the count saved with them.
    fn mark_open(&self) -> Result<(), StoreError> {
        if self.meta.get(OPEN)?.is_some() {
            let count = self.count_history()?;
            self.history_count.store(count, Ordering::Relaxed);
            self.meta.insert(HISTORY_COUNT, &count.to_be_bytes())?;
        }
        self.meta.insert(OPEN, &[])?;
        self.meta.flush()?;
        Ok(())
    }

    /// Makes everything durable and notes a clean close (at shutdown).
    pub fn close(&self) -> Result<(), StoreError> {
        self.commit()?;
        self.meta.remove(OPEN)?;
        self.meta.flush()?;
        Ok(())
    }

    /// The packets a full scan of the history returns (each position once, bytes held).
    fn count_history(&self) -> Result<u64, StoreError> {
        let (mut count, mut last) = (0u64, None);
        for kv in self.history.iter() {
            let (_, v) = kv?;
            let run: Run = decode("history run", &v)?;
            for p in run.packets {
                let pos = (p.conn_id, p.seq);
                if last.is_some_and(|l| pos <= l) || !self.holds(&p) {
                    continue;
                }
                last = Some(pos);
                count += 1;
            }
        }
        Ok(count)
    }

    /// History the store could not write (see [`unwritten`]).
    pub fn unwritten(&self) -> &unwritten::Unwritten {
        &self.unwritten
    }

    /// Makes everything written so far durable: the payload log first, so that no durable
    /// history entry points past its durable end.
    pub fn commit(&self) -> Result<(), StoreError> {
        if self.payloads.is_dirty() {
            self.payloads.sync()?;
        }
        self.save_counts()?;
        self.db.flush()?;
        Ok(())
    }

    /// Writes the running counts to `meta`, to be made durable by the flush that follows.
    fn save_counts(&self) -> Result<(), StoreError> {
        self.meta.insert(
            HISTORY_COUNT,
            &self.history_count.load(Ordering::Relaxed).to_be_bytes(),
        )?;
        self.meta
            .insert(UNWRITTEN_PACKETS, &self.unwritten.packets().to_be_bytes())?;
        self.meta
            .insert(UNWRITTEN_BYTES, &self.unwritten.bytes().to_be_bytes())?;
        self.budget.save(&self.meta)
    }

    /// Leases `count` fresh IDs, durable before it returns: `(first, last)` inclusive.
    pub fn lease(&self, count: u32) -> Result<(u64, u64), StoreError> {
        if count == 0 || count > MAX_LEASE {
            return Err(StoreError::Invalid(format!(
                "lease count must be 1 to {MAX_LEASE}, got {count}"
            )));
        }
        let _g = self.lease_lock.lock().unwrap_or_else(|e| e.into_inner());
        let first = u64_value(self.meta.get(NEXT_ID)?).max(1);
        let next = first + u64::from(count);
        self.meta.insert(NEXT_ID, &next.to_be_bytes())?;
        self.meta.flush()?;
        Ok((first, next - 1))
    }

    /// Stores history packets, idempotently: packets a run already holds (a replayed batch)
    /// are skipped, the rest merged in, and the fresh ones logged (see [`Store::record`]).
    /// Writes are serialised by the arrival log's lock.
    pub fn put_packets(&self, packets: Vec<Packet>) -> Result<(), StoreError> {
        self.record(packets, Vec::new())
    }

    /// Stores packets as [`Store::put_packets`] says, the fresh ones at arrival position
    /// `recorded`; returns the keys of the runs they went into.
    fn store_packets(
        &self,
        packets: Vec<Packet>,
        recorded: u64,
    ) -> Result<Vec<[u8; 16]>, StoreError> {
        // What each run adds, and the run it joins.
        let mut todo: Vec<([u8; 16], Vec<Packet>, Option<Run>)> = Vec::new();
        for mut packets in into_runs(packets) {
            let key = history_key(packets[0].conn_id, packets[0].seq);
            let old: Option<Run> = if self.run_may_exist(packets[0].conn_id, packets[0].seq)? {
                match self.history.get(key)? {
                    Some(v) => Some(decode("history run", &v)?),
                    None => None,
                }
            } else {
                None
            };
            if let Some(old) = &old {
                // A packet is held if its bytes are: after a power loss sled's entry can
                // outlive the end of the payload log, and the proxy's replay then restores it.
                packets.retain(|p| !old.packets.iter().any(|o| o.seq == p.seq && self.holds(o)));
            }
            if !packets.is_empty() {
                todo.push((key, packets, old));
            }
        }
        let parts: Vec<&[u8]> = todo
            .iter()
            .flat_map(|(_, ps, _)| ps.iter().map(|p| &p.data[..]))
            .collect();
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if !self
            .budget
            .admits(parts.len() as u64, bytes, self.payloads.total_bytes())
        {
            return Ok(Vec::new());
        }
        let (segment, mut offset) = match self.payloads.append(&parts) {
            Ok(offset) => {
                self.unwritten.succeeded();
                offset
            }
            Err(e) => {
                // The disk is full or failing: these packets' bytes cannot be kept, but the
                // batch's records and closes must not wait for space (see [`unwritten`]).
                let bytes = parts.iter().map(|p| p.len() as u64).sum();
                self.unwritten.failed(parts.len() as u64, bytes, &e);
                return Ok(Vec::new());
            }
        };
        let mut fresh = 0u64;
        let mut buf = Vec::new();
        let mut keys = Vec::with_capacity(todo.len());
        let (mut index, mut runs) = (sled::Batch::default(), sled::Batch::default());
        for (key, packets, old) in todo {
            fresh += packets.len() as u64;
            let mut run = Run {
                packets: packets
                    .into_iter()
                    .map(|p| {
                        let len = p.data.len() as u64;
                        let stored = StoredPacket {
                            conn_id: p.conn_id,
                            seq: p.seq,
                            direction: p.direction,
                            ts: p.ts,
                            data: Default::default(),
                            modified: p.modified,
                            log_offset: offset,
                            log_len: len,
                            original: p.original,
                            dropped: p.dropped,
                            recorded,
                            segment,
                        };
                        offset += len;
                        stored
                    })
                    .collect(),
            };
            if let Some(old) = old {
                // A replay cut differently: keep the union, so no packet is ever lost (a
                // packet stored again replaces an old entry whose bytes were missing).
                let new: std::collections::HashSet<u64> =
                    run.packets.iter().map(|p| p.seq).collect();
                run.packets
                    .extend(old.packets.into_iter().filter(|o| !new.contains(&o.seq)));
                run.packets.sort_by_key(|p| p.seq);
            }
            buf.clear();
            run.encode(&mut buf)
                .map_err(|_| StoreError::Invalid("packet run too large to encode".to_string()))?;
            index.insert(&segment_run_key(segment, &key)[..], &[]);
            runs.insert(&key[..], buf.as_slice());
            keys.push(key);
        }
        // Indexed before the runs are stored: a crash never leaves a run the index misses.
        // One sled batch each: a lock and an epoch pin per batch, not per run.
        self.segment_runs.apply_batch(index)?;
        self.history.apply_batch(runs)?;
        self.history_count.fetch_add(fresh, Ordering::Relaxed);
        self.keep_budget()?;
        Ok(keys)
    }

    /// Whether a run keyed `(conn_id, seq)` may be stored (a replay), and notes that one
    /// will be. A live connection's packets arrive in order, so its new runs start beyond
    /// every stored one: remembering each connection's last run key saves a lookup per run.
    fn run_may_exist(&self, conn_id: u64, seq: u64) -> Result<bool, StoreError> {
        let mut last = self.last_run.lock().unwrap_or_else(|e| e.into_inner());
        let stored = match last.get(&conn_id) {
            Some(&k) => k,
            None => {
                let range = history_key(conn_id, 0)..=history_key(conn_id, u64::MAX);
                let stored = match self.history.range(range).next_back() {
                    Some(kv) => split_history_key(&kv?.0).map_or(0, |(_, s)| s),
                    None => 0,
                };
                if last.len() >= LAST_RUN_ENTRIES {
                    last.clear();
                }
                stored
            }
        };
        last.insert(conn_id, stored.max(seq));
        Ok(seq <= stored)
    }

    /// Forgets a closed connection's last run key (late packets look it up again).
    fn forget_runs_of(&self, conn_id: u64) {
        self.last_run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn_id);
    }

    /// Whether the payload log holds a stored packet's bytes.
    fn holds(&self, p: &StoredPacket) -> bool {
        self.payloads.holds(p.segment, p.log_offset, p.log_len)
    }

    /// A stored packet with its payload read back.
    fn load(&self, p: StoredPacket) -> Result<Packet, StoreError> {
        let data = if p.log_len > 0 {
            self.payloads
                .read(p.segment, p.log_offset, p.log_len)?
                .into()
        } else {
            p.data
        };
        Ok(Packet {
            conn_id: p.conn_id,
            seq: p.seq,
            direction: p.direction,
            ts: p.ts,
            data,
            modified: p.modified,
            original: p.original,
            dropped: p.dropped,
        })
    }

    fn is_cleared(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.cleared.contains_key(id.to_be_bytes())?)
    }

    fn put_conn(&self, c: &Connection) -> Result<(), StoreError> {
        self.conns.insert(c.id.to_be_bytes(), c.encode_to_vec())?;
        Ok(())
    }

    /// [`Store::put_conn`] for a record whose status may have changed.
    fn put_conn_status(&self, c: &Connection) -> Result<(), StoreError> {
        self.put_conn(c)?;
        self.index_status(c)
    }

    /// Records a newly opened connection; `None` when its ID was cleared before.
    pub fn open_conn(&self, mut c: Connection) -> Result<Option<Connection>, StoreError> {
        if c.id == 0 {
            return Err(StoreError::Invalid("connection ID 0 is reserved".into()));
        }
        if self.is_cleared(c.id)? {
            return Ok(None);
        }
        if c.status == ConnStatus::Unspecified as i32 {
            c.status = ConnStatus::Active as i32;
        }
        self.put_conn_status(&c)?;
        Ok(Some(c))
    }

    /// Applies an update to an active connection; `None` when the record is unknown or
    /// cleared (an update can arrive for a record cleared meanwhile).
    pub fn update_conn(&self, u: &ConnectionUpdate) -> Result<Option<Connection>, StoreError> {
        let Some(mut c) = self.get_opt(u.id)? else {
            return Ok(None);
        };
        merge_update(&mut c, u);
        self.put_conn(&c)?;
        Ok(Some(c))
    }

    /// Records the end of a connection; `None` when the record is unknown or cleared.
    pub fn close_conn(&self, e: &ConnectionClosed) -> Result<Option<Connection>, StoreError> {
        self.forget_runs_of(e.id);
        let Some(mut c) = self.get_opt(e.id)? else {
            return Ok(None);
        };
        apply_close(&mut c, e);
        self.put_conn_status(&c)?;
        Ok(Some(c))
    }

    /// The ingest session `node` last reported (see `liveness`), if known.
    pub fn node_session(&self, node: &str) -> Result<Option<String>, StoreError> {
        let key = [SESSION_PREFIX, node.as_bytes()].concat();
        Ok(self
            .meta
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records the ingest session `node` reports now.
    pub fn set_node_session(&self, node: &str, session: &str) -> Result<(), StoreError> {
        let key = [SESSION_PREFIX, node.as_bytes()].concat();
        self.meta.insert(key, session.as_bytes())?;
        Ok(())
    }

    /// The record with `id`, if there is one.
    pub fn get_opt(&self, id: u64) -> Result<Option<Connection>, StoreError> {
        self.conns
            .get(id.to_be_bytes())?
            .map(|v| decode("connection record", &v))
            .transpose()
    }

    /// Records with IDs from `from` upwards, in ID order, each passed to `f` until it returns
    /// false.
    pub fn scan_conns(
        &self,
        from: u64,
        mut f: impl FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        for kv in self.conns.range(from.to_be_bytes()..) {
            let (_, v) = kv?;
            if !f(decode("connection record", &v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Records with IDs below `below`, highest first, each passed to `f` until it returns
    /// false.
    pub fn scan_conns_rev(
        &self,
        below: u64,
        mut f: impl FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        for kv in self.conns.range(..below.to_be_bytes()).rev() {
            let (_, v) = kv?;
            if !f(decode("connection record", &v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Removes the records `ids`: all of them, or none when any is unknown.
    pub fn clear(&self, ids: &[u64]) -> Result<Vec<u64>, StoreError> {
        for &id in ids {
            if !self.conns.contains_key(id.to_be_bytes())? {
                return Err(StoreError::NotFound(id));
            }
        }
        let mut removed = Vec::with_capacity(ids.len());
        for &id in ids {
            self.cleared.insert(id.to_be_bytes(), &[])?;
            self.active.remove(id.to_be_bytes())?;
            if self.conns.remove(id.to_be_bytes())?.is_some() {
                removed.push(id);
            }
        }
        Ok(removed)
    }

    /// Removes up to `max` records with IDs from `from` up, lowest first; the IDs removed
    /// (none: no records are left there).
    pub fn clear_page(&self, from: u64, max: usize) -> Result<Vec<u64>, StoreError> {
        let mut removed = Vec::new();
        for k in self.conns.range(from.to_be_bytes()..).keys().take(max) {
            let k = k?;
            self.cleared.insert(&k, &[])?;
            self.active.remove(&k)?;
            self.conns.remove(&k)?;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                removed.push(u64::from_be_bytes(b));
            }
        }
        Ok(removed)
    }

    /// History packets from position `(conn_id, seq)` onwards in (connection, seq) order
    /// (only that connection's when `only_conn`), each passed to `f` until it returns false.
    pub fn scan_history(
        &self,
        start: (u64, u64),
        only_conn: bool,
        f: impl FnMut(Packet) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_history_upto(start, only_conn, u64::MAX, f)
    }

    /// [`Store::scan_history`] of the packets recorded at arrival positions up to `upto`
    /// (packets from before the arrival log count as position 0).
    pub fn scan_history_upto(
        &self,
        start: (u64, u64),
        only_conn: bool,
        upto: u64,
        mut f: impl FnMut(Packet) -> bool,
    ) -> Result<(), StoreError> {
        let from = history_key(start.0, start.1);
        // The run holding `start` may begin before it.
        let from = match self.history.range(..=from).next_back() {
            Some(kv) => {
                let (k, _) = kv?;
                match split_history_key(&k) {
                    Some((conn, _)) if conn == start.0 => k.to_vec(),
                    _ => from.to_vec(),
                }
            }
            None => from.to_vec(),
        };
        let iter = if only_conn {
            self.history
                .range(from.as_slice()..=&history_key(start.0, u64::MAX)[..])
        } else {
            self.history.range(from.as_slice()..)
        };
        // The last position passed on: anything at or before it (the start, or an
        // overlapping replay) is skipped, so each packet is passed once and in order.
        let mut last: Option<(u64, u64)> = start.1.checked_sub(1).map(|s| (start.0, s));
        for kv in iter {
            let (_, v) = kv?;
            let run: Run = decode("history run", &v)?;
            for p in run.packets {
                let pos = (p.conn_id, p.seq);
                // A packet whose segment was evicted meanwhile (its run is being trimmed) is gone.
                if last.is_some_and(|l| pos <= l) || p.recorded > upto || !self.holds(&p) {
                    continue;
                }
                last = Some(pos);
                if !f(self.load(p)?) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// How many packets the history holds.
    pub fn history_len(&self) -> u64 {
        self.history_count.load(Ordering::Relaxed)
    }

    /// Stores the loss totals a node reported.
    pub fn set_losses(&self, node: &str, losses: &ProxyLosses) -> Result<(), StoreError> {
        let mut key = LOSSES_PREFIX.to_vec();
        key.extend_from_slice(node.as_bytes());
        self.meta.insert(key, losses.encode_to_vec())?;
        Ok(())
    }

    /// The loss totals of every node that reported any.
    pub fn losses(&self) -> Result<Vec<(String, ProxyLosses)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(LOSSES_PREFIX) {
            let (k, v) = kv?;
            let node = String::from_utf8_lossy(&k[LOSSES_PREFIX.len()..]).into_owned();
            out.push((node, decode("loss report", &v)?));
        }
        Ok(out)
    }
}

fn set_counters(c: &mut Connection, n: &Counters) {
    // Counters only grow; a replayed older update must not shrink them.
    c.bytes_c2s = c.bytes_c2s.max(n.bytes_c2s);
    c.bytes_s2c = c.bytes_s2c.max(n.bytes_s2c);
    c.packets_c2s = c.packets_c2s.max(n.packets_c2s);
    c.packets_s2c = c.packets_s2c.max(n.packets_s2c);
}

/// A record as it is once `e` closed it (shared by every backend).
pub(crate) fn apply_close(c: &mut Connection, e: &ConnectionClosed) {
    c.status = ConnStatus::Disconnected as i32;
    c.closed_at = e.closed_at;
    c.closed_by = e.closed_by;
    c.close_kind = e.close_kind;
    c.reason.clone_from(&e.reason);
    if let Some(n) = &e.counters {
        set_counters(c, n);
    }
}

/// A record as it is once `u` updated it (shared by every backend).
pub(crate) fn merge_update(c: &mut Connection, u: &ConnectionUpdate) {
    fn set(dst: &mut String, src: &str) {
        if !src.is_empty() {
            *dst = src.to_string();
        }
    }
    set(&mut c.dst_ip, &u.dst_ip);
    set(&mut c.sni, &u.sni);
    set(&mut c.alpn, &u.alpn);
    c.tls |= u.tls;
    c.upstream_insecure |= u.upstream_insecure;
    if u.tls_after_seq != 0 {
        c.tls_after_seq = u.tls_after_seq;
    }
    if u.client_tls.is_some() {
        c.client_tls.clone_from(&u.client_tls);
    }
    if u.upstream_tls.is_some() {
        c.upstream_tls.clone_from(&u.upstream_tls);
    }
    if u.client_process.is_some() {
        c.client_process.clone_from(&u.client_process);
    }
    if let Some(n) = &u.counters {
        set_counters(c, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        (dir, s)
    }

    fn conn(id: u64) -> Connection {
        Connection {
            id,
            node: "n".into(),
            dst_port: 443,
            ..Default::default()
        }
    }

    #[test]
    fn leases_never_overlap_and_start_at_one() {
        let (_d, s) = store();
        assert_eq!(s.lease(3).unwrap(), (1, 3));
        assert_eq!(s.lease(1).unwrap(), (4, 4));
        assert!(matches!(s.lease(0), Err(StoreError::Invalid(_))));
        assert!(matches!(
            s.lease(MAX_LEASE + 1),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(s.lease(MAX_LEASE).unwrap(), (5, 4 + u64::from(MAX_LEASE)));
    }

    #[test]
    fn open_defaults_to_active_and_close_fills_the_end() {
        let (_d, s) = store();
        let c = s.open_conn(conn(7)).unwrap().unwrap();
        assert_eq!(c.status, ConnStatus::Active as i32);
        let closed = ConnectionClosed {
            id: 7,
            closed_by: proto::common::ClosedBy::Server as i32,
            close_kind: proto::common::CloseKind::Fin as i32,
            reason: "server sent FIN".into(),
            counters: Some(Counters {
                bytes_c2s: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = s.close_conn(&closed).unwrap().unwrap();
        assert_eq!(c.status, ConnStatus::Disconnected as i32);
        assert_eq!(c.reason, "server sent FIN");
        assert_eq!(c.bytes_c2s, 10);
        assert_eq!(s.get(7).unwrap(), c);
    }

    #[test]
    fn cleared_records_stay_cleared_and_keep_their_packets() {
        let (_d, s) = store();
        s.open_conn(conn(1)).unwrap();
        s.open_conn(conn(2)).unwrap();
        let p = Packet {
            conn_id: 1,
            seq: 1,
            data: b"hi".to_vec().into(),
            ..Default::default()
        };
        s.put_packets(vec![p.clone()]).unwrap();
        assert!(matches!(s.clear(&[1, 99]), Err(StoreError::NotFound(99))));
        assert!(
            s.get_opt(1).unwrap().is_some(),
            "a failed clear removes nothing"
        );
        assert_eq!(s.clear(&[1]).unwrap(), vec![1]);
        assert!(matches!(s.get(1), Err(StoreError::NotFound(1))));
        // A late close, or a replayed open, does not bring it back.
        let late = ConnectionClosed {
            id: 1,
            ..Default::default()
        };
        assert!(s.close_conn(&late).unwrap().is_none());
        assert!(s.open_conn(conn(1)).unwrap().is_none());
        let mut got = Vec::new();
        s.scan_history((1, 0), true, |p| {
            got.push(p);
            true
        })
        .unwrap();
        assert_eq!(got, vec![p]);
        assert_eq!(s.clear_page(0, 10).unwrap(), vec![2]);
        assert!(s.clear_page(0, 10).unwrap().is_empty());
        assert_eq!(s.history_len(), 1);
    }

    #[test]
    fn replayed_packets_are_not_counted_twice() {
        let (_d, s) = store();
        let p = Packet {
            conn_id: 3,
            seq: 9,
            ..Default::default()
        };
        s.put_packets(vec![p.clone(), p.clone()]).unwrap();
        s.put_packets(vec![p.clone()]).unwrap();
        assert_eq!(s.history_len(), 1);
    }

    #[test]
    fn payloads_live_in_the_log_and_inline_runs_still_read() {
        let (d, s) = store();
        let log = d.path().join("db").join("history").join("000001.seg");
        let big = Packet {
            conn_id: 4,
            seq: 1,
            data: vec![9u8; 200_000].into(),
            ..Default::default()
        };
        s.put_packets(vec![big.clone()]).unwrap();
        // The bytes went to the log, not into sled's run.
        let run: Run = decode("run", &s.history.get(history_key(4, 1)).unwrap().unwrap()).unwrap();
        assert_eq!(run.packets[0].log_len, 200_000);
        assert!(run.packets[0].data.is_empty());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 200_000);
        // A replay appends nothing more.
        s.put_packets(vec![big.clone()]).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 200_000);
        // An entry whose bytes the log lost (a power failure after sled's own flush): the
        // proxy's replay stores the packet again.
        let lost = Packet {
            conn_id: 5,
            seq: 1,
            data: b"replayed".to_vec().into(),
            ..Default::default()
        };
        let dangling = Run {
            packets: vec![StoredPacket {
                conn_id: 5,
                seq: 1,
                log_offset: 1 << 40,
                log_len: 8,
                ..Default::default()
            }],
        };
        s.history
            .insert(history_key(5, 1), dangling.encode_to_vec())
            .unwrap();
        s.put_packets(vec![lost.clone()]).unwrap();
        let mut again = Vec::new();
        s.scan_history((5, 1), true, |p| {
            again.push(p);
            true
        })
        .unwrap();
        assert_eq!(again, vec![lost]);
        // A run as a store from before the log wrote it: a `common.Packet` with its bytes inline.
        let old = Packet {
            conn_id: 4,
            seq: 2,
            data: b"inline".to_vec().into(),
            ..Default::default()
        };
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldRun {
            #[prost(message, repeated, tag = "1")]
            packets: Vec<Packet>,
        }
        let enc = OldRun {
            packets: vec![old.clone()],
        }
        .encode_to_vec();
        s.history.insert(history_key(4, 2), enc).unwrap();
        let mut got = Vec::new();
        s.scan_history((4, 1), true, |p| {
            got.push(p);
            true
        })
        .unwrap();
        assert_eq!(got, vec![big, old]);
    }

    fn pkt(conn_id: u64, seq: u64) -> Packet {
        Packet {
            conn_id,
            seq,
            data: format!("{conn_id}/{seq}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn scan_all(s: &Store, start: (u64, u64), only_conn: bool) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        s.scan_history(start, only_conn, |p| {
            got.push((p.conn_id, p.seq));
            true
        })
        .unwrap();
        got
    }

    #[test]
    fn runs_split_on_gaps_and_connections() {
        let ps = [pkt(2, 1), pkt(1, 2), pkt(1, 1), pkt(1, 4), pkt(1, 2)];
        let runs = into_runs(ps.to_vec());
        let shape: Vec<Vec<(u64, u64)>> = runs
            .iter()
            .map(|r| r.iter().map(|p| (p.conn_id, p.seq)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![vec![(1, 1), (1, 2)], vec![(1, 4)], vec![(2, 1)]]
        );
    }

    #[test]
    fn late_packets_fill_gaps_in_order_and_scans_start_mid_run() {
        let (_d, s) = store();
        // Batch 1 has seqs 1, 2, 4 of conn 1; seq 3 arrives in the next batch.
        s.put_packets(vec![pkt(1, 1), pkt(1, 2), pkt(1, 4), pkt(2, 1)])
            .unwrap();
        s.put_packets(vec![pkt(1, 3), pkt(1, 5), pkt(2, 2)])
            .unwrap();
        assert_eq!(
            scan_all(&s, (1, 0), true),
            vec![(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
        );
        assert_eq!(
            scan_all(&s, (1, 2), true),
            vec![(1, 2), (1, 3), (1, 4), (1, 5)]
        );
        assert_eq!(scan_all(&s, (1, 5), false), vec![(1, 5), (2, 1), (2, 2)]);
        assert_eq!(s.history_len(), 7);
        // A replay of the same batch changes nothing.
        s.put_packets(vec![pkt(1, 3), pkt(1, 5), pkt(2, 2)])
            .unwrap();
        assert_eq!(scan_all(&s, (0, 0), false).len(), 7);
        assert_eq!(s.history_len(), 7);
        // A replay cut differently overlaps stored runs: scans still pass each packet once.
        s.put_packets(vec![pkt(1, 2), pkt(1, 3)]).unwrap();
        assert_eq!(
            scan_all(&s, (1, 0), true),
            vec![(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
        );
    }

    #[test]
    fn a_replay_after_the_last_run_keys_are_forgotten_is_still_found() {
        let (_d, s) = store();
        s.put_packets(vec![pkt(1, 1), pkt(1, 2), pkt(1, 5)])
            .unwrap();
        // As after a restart, or a close, or the map starting afresh: the key is looked up.
        s.last_run.lock().unwrap().clear();
        s.put_packets(vec![pkt(1, 5)]).unwrap();
        s.forget_runs_of(1);
        s.put_packets(vec![pkt(1, 1), pkt(1, 2)]).unwrap();
        assert_eq!(s.history_len(), 3);
        // New packets beyond the last run need no lookup and are stored.
        s.put_packets(vec![pkt(1, 6)]).unwrap();
        assert_eq!(
            scan_all(&s, (1, 0), true),
            vec![(1, 1), (1, 2), (1, 5), (1, 6)]
        );
    }

    #[test]
    fn an_unclean_close_has_the_history_recounted_at_open() {
        let (_d, s) = store();
        s.put_packets(vec![pkt(1, 1), pkt(1, 2), pkt(2, 1)])
            .unwrap();
        s.put_packets(vec![pkt(1, 2), pkt(1, 3)]).unwrap();
        // As after a crash: runs on disk ahead of the saved count, the open mark still set.
        s.history_count.store(1, Ordering::Relaxed);
        s.mark_open().unwrap();
        assert_eq!(s.history_len(), 4);
        s.close().unwrap();
        assert!(
            s.meta.get(OPEN).unwrap().is_none(),
            "a clean close clears the mark"
        );
        s.history_count.store(1, Ordering::Relaxed);
        s.mark_open().unwrap();
        assert_eq!(
            s.history_len(),
            1,
            "after a clean close the saved count is trusted"
        );
    }

    #[test]
    fn counters_never_shrink() {
        let mut c = conn(1);
        let u = |b| ConnectionUpdate {
            id: 1,
            counters: Some(Counters {
                bytes_c2s: b,
                ..Default::default()
            }),
            ..Default::default()
        };
        merge_update(&mut c, &u(50));
        merge_update(&mut c, &u(20));
        assert_eq!(c.bytes_c2s, 50);
    }

    #[test]
    fn history_keys_order_numerically() {
        assert!(history_key(1, 2) < history_key(1, 10));
        assert!(history_key(1, u64::MAX) < history_key(2, 0));
        assert_eq!(split_history_key(&history_key(5, 6)), Some((5, 6)));
        assert_eq!(split_history_key(b"short"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// However packets are split into batches and ordered within them, and whatever is
        /// replayed, a scan returns each stored packet once, in (connection, seq) order.
        #[test]
        fn scans_return_each_packet_once_in_order(
            seqs in proptest::collection::vec((1u64..4, 1u64..40), 1..120),
            cuts in proptest::collection::vec(0usize..120, 0..6),
            replay in proptest::collection::vec(0usize..120, 0..20),
        ) {
            let (_d, s) = store();
            let packets: Vec<Packet> = seqs.iter().map(|&(c, q)| pkt(c, q)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % packets.len()).collect();
            cuts.push(packets.len());
            cuts.sort_unstable();
            let mut from = 0;
            for to in cuts {
                s.put_packets(packets[from..to].to_vec()).unwrap();
                from = to;
            }
            s.put_packets(replay.iter().map(|&i| packets[i % packets.len()].clone()).collect())
                .unwrap();
            let mut want: Vec<(u64, u64)> = seqs.clone();
            want.sort_unstable();
            want.dedup();
            proptest::prop_assert_eq!(scan_all(&s, (0, 0), false), want.clone());
            let one: Vec<(u64, u64)> = want.iter().copied().filter(|p| p.0 == 2).collect();
            proptest::prop_assert_eq!(scan_all(&s, (2, 0), true), one);
        }
    }
}
