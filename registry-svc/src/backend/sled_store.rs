//! The registry's durable state: connection records, leased IDs, tombstones of cleared
//! records and the losses each proxy reported in sled, and the proxy history in a log of
//! segment files ([`log`]).
//!
//! sled layout (integers big-endian, so key order is numeric order):
//! - `conns`:   conn ID (8 bytes) -> `common.Connection` (protobuf)
//! - `active`:  conn ID (8) -> empty, for each active record (see [`active`])
//! - `cleared`: conn ID (8) -> empty; events for a cleared ID are ignored, so a late close or
//!   a replayed batch never brings a cleared record back
//! - `meta`:    `next_id` -> u64, `unwritten_packets` and `unwritten_bytes` -> u64
//!   ([`unwritten`]), `losses/NODE` -> `ProxyLosses`, `session/NODE`, the budget's counts
//!   ([`budget`]) and the log's last position
//!
//! History: packets and the records closed with them go to the log, one frame per write in
//! arrival order, which is also the order followers read ([`arrivals`]); nothing per packet
//! goes to sled. A store from before the log (history in sled trees `history`,
//! `segment_runs` and `arrivals`, payloads in `.seg` files) is moved into it once at open
//! ([`migrate`]).
//!
//! It is the registry's [`crate::backend::Backend`] (`as_backend.rs`). Writes that change a
//! record are made while the caller holds the [`crate::hub::Hub`] lock, so watchers see
//! every change exactly once.

use std::{path::Path, sync::Mutex};

use prost::Message;
use proto::{
    common::{ConnStatus, Connection, Packet},
    registry::{ConnectionClosed, ConnectionUpdate, ProxyLosses},
};

pub mod active;
pub mod arrivals;
mod as_backend;
pub mod budget;
pub use crate::backend::frame;
pub mod log;
mod migrate;
pub mod payload;
pub mod purge;
pub mod unwritten;

pub use crate::backend::StoreError;
pub use arrivals::{Followed, LogPage};
pub use budget::{HistoryOptions, WhenFull};
pub use purge::{Purge, Purged};

/// Largest block of IDs one lease may take.
pub const MAX_LEASE: u32 = 65_536;

/// The registry's store: records in sled, history in the log.
pub struct Store {
    db: sled::Db,
    conns: sled::Tree,
    active: sled::Tree,
    cleared: sled::Tree,
    meta: sled::Tree,
    log: log::HistoryLog,
    budget: budget::Budget,
    unwritten: unwritten::Unwritten,
    lease_lock: Mutex<()>,
}

const NEXT_ID: &[u8] = b"next_id";
const UNWRITTEN_PACKETS: &[u8] = b"unwritten_packets";
const UNWRITTEN_BYTES: &[u8] = b"unwritten_bytes";
const LOSSES_PREFIX: &[u8] = b"losses/";
const SESSION_PREFIX: &[u8] = b"session/";
/// The log's last arrival position, so positions continue when every segment was removed.
const LOG_POSITION: &[u8] = b"log_position";

/// sled's page cache for the records (bytes; see `docs/BENCHMARKS.md` for the memory bound).
pub const RECORDS_CACHE_BYTES: u64 = 32 * 1024 * 1024;

fn u64_value(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
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
            .cache_capacity(options.records_cache_bytes.unwrap_or(RECORDS_CACHE_BYTES))
            .flush_every_ms(Some(200))
            .open()?;
        let conns = db.open_tree("conns")?;
        let cleared = db.open_tree("cleared")?;
        let meta = db.open_tree("meta")?;
        let active = active::open(&db, &conns, &meta)?;
        let budget = budget::Budget::open(options, &meta)?;
        let log = log::HistoryLog::open(
            &dir.join("history"),
            options.segment_bytes(),
            budget.removed_below(),
            u64_value(meta.get(LOG_POSITION)?),
            options.index_cache_bytes.unwrap_or(log::INDEX_CACHE_BYTES),
        )?;
        let unwritten = unwritten::Unwritten::new(
            u64_value(meta.get(UNWRITTEN_PACKETS)?),
            u64_value(meta.get(UNWRITTEN_BYTES)?),
        );
        let s = Self {
            db,
            conns,
            active,
            cleared,
            meta,
            log,
            budget,
            unwritten,
            lease_lock: Mutex::new(()),
        };
        migrate::run(&s, dir)?;
        s.keep_budget()?;
        Ok(s)
    }

    /// Makes everything durable (at shutdown).
    pub fn close(&self) -> Result<(), StoreError> {
        self.commit()
    }

    /// History the store could not write (see [`unwritten`]).
    pub fn unwritten(&self) -> &unwritten::Unwritten {
        &self.unwritten
    }

    /// Makes everything written so far durable: the history log, then the records.
    pub fn commit(&self) -> Result<(), StoreError> {
        if self.log.is_dirty() {
            self.log.sync()?;
        }
        self.save_counts()?;
        self.db.flush()?;
        Ok(())
    }

    /// Writes the running counts to `meta`, to be made durable by the flush that follows.
    fn save_counts(&self) -> Result<(), StoreError> {
        self.meta
            .insert(UNWRITTEN_PACKETS, &self.unwritten.packets().to_be_bytes())?;
        self.meta
            .insert(UNWRITTEN_BYTES, &self.unwritten.bytes().to_be_bytes())?;
        self.meta
            .insert(LOG_POSITION, &self.log.position().to_be_bytes())?;
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

    /// Stores history packets, idempotently: packets already stored (a replayed batch) are
    /// skipped and the fresh ones logged (see [`Store::record`]).
    pub fn put_packets(&self, packets: Vec<Packet>) -> Result<(), StoreError> {
        self.record(packets, Vec::new())
    }

    /// Stores `packets` (as [`Store::put_packets`]) and logs them, with the records
    /// `closed`, at the next arrival position. Nothing is logged when nothing is new. A
    /// write the disk refuses drops the packets' bytes and counts them ([`unwritten`]).
    pub fn record(&self, packets: Vec<Packet>, closed: Vec<Connection>) -> Result<(), StoreError> {
        let admits = |n, bytes, stored| self.budget.admits(n, bytes, stored);
        let (done, refused) = self.log.record(packets, closed, &admits)?;
        match refused {
            Some(log::Refused::Failed(packets, bytes, e)) => {
                self.unwritten.failed(packets, bytes, &e)
            }
            _ if done.packets > 0 => self.unwritten.succeeded(),
            _ => {}
        }
        if done.packets > 0 {
            self.keep_budget()?;
        }
        Ok(())
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
        crate::backend::model::merge_update(&mut c, u);
        self.put_conn(&c)?;
        Ok(Some(c))
    }

    /// Records the end of a connection; `None` when the record is unknown or cleared.
    pub fn close_conn(&self, e: &ConnectionClosed) -> Result<Option<Connection>, StoreError> {
        self.log.forget(e.id);
        let Some(mut c) = self.get_opt(e.id)? else {
            return Ok(None);
        };
        crate::backend::model::apply_close(&mut c, e);
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
        mut f: impl FnMut(Packet) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_history_upto(start, only_conn, u64::MAX, &mut f)
    }

    /// [`Store::scan_history`] of the packets recorded at arrival positions up to `upto`.
    pub fn scan_history_upto(
        &self,
        start: (u64, u64),
        only_conn: bool,
        upto: u64,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> Result<(), StoreError> {
        Ok(self.log.scan(start, only_conn, upto, f)?)
    }

    /// How many packets the history holds.
    pub fn history_len(&self) -> u64 {
        self.log.packets()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Records, model::merge_update};
    use proto::registry::Counters;

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
