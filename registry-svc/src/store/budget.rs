//! The history's disk budget: `--history-max-bytes` and what happens when history reaches it.
//!
//! The payload bytes live in segment files ([`crate::payload`]). With [`WhenFull::Evict`]
//! (the default) the oldest whole segments are deleted after a write takes the history over
//! its budget; with [`WhenFull::Stop`] a write that would take it over is not recorded.
//! Either way the packets and bytes are counted (kept in `meta` across restarts), shown by
//! `conns stats` and logged: nothing goes silently.
//!
//! Removing a segment is crash-safe: the runs pointing into it are trimmed (found through
//! the `segment_runs` index), its index entries removed and the counts and `removed_below`
//! (every segment below it is gone) written in one sled transaction, sled flushed, and only
//! then the file deleted. A crash before the flush keeps the file and every entry into it,
//! to be evicted again; a crash after it leaves a file no entry points into, deleted on the
//! next open ([`Store::finish_removals`]). No entry ever points into a missing file, and each
//! packet is counted once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prost::Message;
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};

use super::{HISTORY_COUNT, Run, Store, StoreError, decode, u64_value};
use crate::payload::DEFAULT_SEGMENT_BYTES;

/// The budget `interpose up` and registry-svc use unless told otherwise: 10 GiB.
pub const DEFAULT_HISTORY_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// What happens when the history reaches its budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenFull {
    /// Delete the oldest history to make room.
    #[default]
    Evict,
    /// Keep the history there is; record no new history until room is made.
    Stop,
}

impl WhenFull {
    /// The name `conns stats` shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Evict => "evict",
            Self::Stop => "stop",
        }
    }
}

/// How much history to keep.
#[derive(Debug, Clone, Default)]
pub struct HistoryOptions {
    /// Budget of the payload segments in bytes; 0: no budget.
    pub max_bytes: u64,
    /// What happens at the budget.
    pub when_full: WhenFull,
    /// Size of a segment; by default an eighth of the budget (at least 4 KiB, at most
    /// 64 MiB), so eviction frees the budget in small steps.
    pub segment_bytes: Option<u64>,
}

impl HistoryOptions {
    /// The segment size to use.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes.unwrap_or(match self.max_bytes {
            0 => DEFAULT_SEGMENT_BYTES,
            max => (max / 8).clamp(4096, DEFAULT_SEGMENT_BYTES),
        })
    }
}

/// Notes in `refusing` whether history at the `max_bytes` budget is being refused now,
/// logging when that starts and when it ends (every store's `--history-full stop`).
pub(crate) fn note_refusing(refusing: &AtomicBool, now: bool, max_bytes: u64) {
    if refusing.swap(now, Ordering::Relaxed) == now {
        return;
    }
    if now {
        tracing::warn!(
            max_bytes,
            "history reached its budget (--history-max-bytes, --history-full stop): new \
             packets are relayed but not recorded (counted in `conns stats`) until history \
             is purged"
        );
    } else {
        tracing::warn!("history is below its budget again: recording resumes");
    }
}

const EVICTED_PACKETS: &[u8] = b"evicted_packets";
const EVICTED_BYTES: &[u8] = b"evicted_bytes";
const REFUSED_PACKETS: &[u8] = b"refused_packets";
const REFUSED_BYTES: &[u8] = b"refused_bytes";
pub(super) const PURGED_PACKETS: &[u8] = b"purged_packets";
pub(super) const PURGED_BYTES: &[u8] = b"purged_bytes";
/// Every payload segment with a lower number has been removed.
const REMOVED_BELOW: &[u8] = b"segments_removed_below";
/// The last arrival log position whose packets were removed: a follower before it missed some.
const REMOVED_POSITION: &[u8] = b"history_removed_position";

/// The budget and its counts.
pub struct Budget {
    options: HistoryOptions,
    evicted_packets: AtomicU64,
    evicted_bytes: AtomicU64,
    refused_packets: AtomicU64,
    refused_bytes: AtomicU64,
    /// Whether writes are being refused now (for the log lines at the start and end).
    refusing: AtomicBool,
    removed_position: AtomicU64,
    pub(super) purged_packets: AtomicU64,
    pub(super) purged_bytes: AtomicU64,
}

impl Budget {
    /// The budget of `options`, its counts as stored in `meta`.
    pub fn open(options: &HistoryOptions, meta: &sled::Tree) -> Result<Self, StoreError> {
        let get = |k: &[u8]| -> Result<AtomicU64, StoreError> {
            Ok(AtomicU64::new(u64_value(meta.get(k)?)))
        };
        Ok(Self {
            options: options.clone(),
            evicted_packets: get(EVICTED_PACKETS)?,
            evicted_bytes: get(EVICTED_BYTES)?,
            refused_packets: get(REFUSED_PACKETS)?,
            refused_bytes: get(REFUSED_BYTES)?,
            refusing: AtomicBool::new(false),
            removed_position: get(REMOVED_POSITION)?,
            purged_packets: get(PURGED_PACKETS)?,
            purged_bytes: get(PURGED_BYTES)?,
        })
    }

    /// Whether a write of `packets` (`bytes`) onto `stored` bytes is recorded; a write
    /// refused by [`WhenFull::Stop`] is counted.
    pub fn admits(&self, packets: u64, bytes: u64, stored: u64) -> bool {
        let max = self.options.max_bytes;
        if max == 0 || self.options.when_full == WhenFull::Evict {
            return true;
        }
        if stored.saturating_add(bytes) <= max {
            note_refusing(&self.refusing, false, max);
            return true;
        }
        self.refused_packets.fetch_add(packets, Ordering::Relaxed);
        self.refused_bytes.fetch_add(bytes, Ordering::Relaxed);
        note_refusing(&self.refusing, true, max);
        false
    }

    /// Writes the counts into `meta`.
    pub fn save(&self, meta: &sled::Tree) -> Result<(), StoreError> {
        for (k, v) in [
            (EVICTED_PACKETS, &self.evicted_packets),
            (EVICTED_BYTES, &self.evicted_bytes),
            (REFUSED_PACKETS, &self.refused_packets),
            (REFUSED_BYTES, &self.refused_bytes),
            (REMOVED_POSITION, &self.removed_position),
            (PURGED_PACKETS, &self.purged_packets),
            (PURGED_BYTES, &self.purged_bytes),
        ] {
            meta.insert(k, &v.load(Ordering::Relaxed).to_be_bytes())?;
        }
        Ok(())
    }

    /// The options in force.
    pub fn options(&self) -> &HistoryOptions {
        &self.options
    }

    /// Packets and bytes evicted to keep within the budget, in total.
    pub fn evicted(&self) -> (u64, u64) {
        (
            self.evicted_packets.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// Packets and bytes not recorded because the budget was reached, in total.
    pub fn refused(&self) -> (u64, u64) {
        (
            self.refused_packets.load(Ordering::Relaxed),
            self.refused_bytes.load(Ordering::Relaxed),
        )
    }

    /// Packets and bytes purged on request, in total.
    pub fn purged(&self) -> (u64, u64) {
        (
            self.purged_packets.load(Ordering::Relaxed),
            self.purged_bytes.load(Ordering::Relaxed),
        )
    }

    /// The last arrival log position whose packets were removed (0: none).
    pub fn removed_position(&self) -> u64 {
        self.removed_position.load(Ordering::Relaxed)
    }
}

/// What one segment's removal took out of the history.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub packets: u64,
    pub bytes: u64,
}

impl Store {
    /// The history budget and its counts.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Bytes of history payload on disk.
    pub fn history_bytes(&self) -> u64 {
        self.payloads.total_bytes()
    }

    /// Bytes sled uses on disk (records, history runs, bookkeeping).
    pub fn records_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// With [`WhenFull::Evict`], evicts the oldest segments while the history is over its
    /// budget (never the segment being written). Called with the arrival log held.
    pub(super) fn keep_budget(&self) -> Result<(), StoreError> {
        let options = self.budget.options();
        if options.max_bytes == 0 || options.when_full != WhenFull::Evict {
            return Ok(());
        }
        while self.payloads.total_bytes() > options.max_bytes {
            let Some(oldest) = self.payloads.oldest_closed() else {
                break;
            };
            let removed = self.remove_segment(oldest)?;
            tracing::warn!(
                segment = oldest,
                packets = removed.packets,
                bytes = removed.bytes,
                max_bytes = options.max_bytes,
                "history reached its budget (--history-max-bytes): evicted the oldest \
                 history (counted in `conns stats`)"
            );
        }
        Ok(())
    }

    /// Evicts segment `n`: takes its packets out of the history runs and the index and
    /// counts them, all in one sled transaction (so a crash keeps either all of it or none),
    /// makes that durable, and only then deletes the file.
    fn remove_segment(&self, n: u64) -> Result<Removed, StoreError> {
        let (removed, last_position, runs) = self.runs_without(n)?;
        let index: Vec<sled::IVec> = self
            .segment_runs
            .scan_prefix(n.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        let b = &self.budget;
        b.evicted_packets
            .fetch_add(removed.packets, Ordering::Relaxed);
        b.evicted_bytes.fetch_add(removed.bytes, Ordering::Relaxed);
        b.removed_position
            .fetch_max(last_position, Ordering::Relaxed);
        let count = self.history_count.load(Ordering::Relaxed);
        let count = count.saturating_sub(removed.packets);
        self.history_count.store(count, Ordering::Relaxed);
        let below = u64_value(self.meta.get(REMOVED_BELOW)?).max(n + 1);
        let meta = [
            (EVICTED_PACKETS, b.evicted_packets.load(Ordering::Relaxed)),
            (EVICTED_BYTES, b.evicted_bytes.load(Ordering::Relaxed)),
            (REMOVED_POSITION, b.removed_position()),
            (HISTORY_COUNT, count),
            (REMOVED_BELOW, below),
        ];
        self.commit_trim(&runs, &index, &meta, "eviction")?;
        self.db.flush()?;
        self.payloads.remove(n)?;
        // Entries whose runs are gone are skipped by followers anyway; trimmed to keep the
        // log from growing without end.
        self.arrivals.trim_through(last_position)?;
        Ok(removed)
    }

    /// Writes a trim of the history (eviction, purge) in one sled transaction, so a crash
    /// keeps all of it or none: each run rewritten (`None`: removed), the `unindexed`
    /// segment-index entries removed and the `meta` counts set. Not flushed.
    pub(super) fn commit_trim(
        &self,
        runs: &[(sled::IVec, Option<Vec<u8>>)],
        unindexed: &[impl AsRef<[u8]>],
        meta: &[(&[u8], u64)],
        what: &str,
    ) -> Result<(), StoreError> {
        (&self.history, &self.segment_runs, &self.meta)
            .transaction(|(history, segment_runs, m)| {
                for (key, run) in runs {
                    match run {
                        Some(v) => history.insert(key, v.as_slice())?,
                        None => history.remove(key)?,
                    };
                }
                for k in unindexed {
                    segment_runs.remove(k.as_ref())?;
                }
                for (k, v) in meta {
                    m.insert(*k, &v.to_be_bytes())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => StoreError::Invalid(format!("{what} aborted")),
            })
    }

    /// The history runs holding packets in segment `n`, each as it is without them (`None`:
    /// nothing is left), with what that takes out and the last arrival position it touches.
    #[allow(clippy::type_complexity)]
    fn runs_without(
        &self,
        n: u64,
    ) -> Result<(Removed, u64, Vec<(sled::IVec, Option<Vec<u8>>)>), StoreError> {
        let keys: Vec<sled::IVec> = if n == 0 {
            // The single file of a store from before segments has no index: every run.
            self.history.iter().keys().collect::<Result<_, _>>()?
        } else {
            self.segment_runs
                .scan_prefix(n.to_be_bytes())
                .keys()
                .map(|k| k.map(|k| k.subslice(8, k.len() - 8)))
                .collect::<Result<_, _>>()?
        };
        let mut removed = Removed::default();
        let mut last_position = 0;
        let mut runs = Vec::new();
        for key in keys {
            let Some(v) = self.history.get(&key)? else {
                continue;
            };
            let mut run: Run = decode("history run", &v)?;
            let before = run.packets.len();
            run.packets.retain(|p| {
                let gone = p.log_len > 0 && p.segment == n;
                if gone {
                    removed.packets += 1;
                    removed.bytes += p.log_len;
                    last_position = last_position.max(p.recorded);
                }
                !gone
            });
            if run.packets.is_empty() {
                runs.push((key, None));
            } else if run.packets.len() != before {
                runs.push((key, Some(run.encode_to_vec())));
            }
        }
        Ok((removed, last_position, runs))
    }

    /// Finishes removals a crash interrupted (at open): deletes the files of segments already
    /// removed from sled, and takes out of the history any entries that point into a
    /// segment whose file is missing, so no entry ever points at nothing.
    pub(super) fn finish_removals(&self) -> Result<(), StoreError> {
        let below = u64_value(self.meta.get(REMOVED_BELOW)?);
        for n in self.payloads.numbers() {
            if n < below {
                tracing::info!(segment = n, "deleting a history segment already evicted");
                self.remove_segment(n)?;
            }
        }
        let mut from = 0u64;
        while let Some(kv) = self.segment_runs.range(from.to_be_bytes()..).next() {
            let (k, _) = kv?;
            let Some(n) = k.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                break;
            };
            let n = u64::from_be_bytes(n);
            if !self.payloads.has(n) {
                let removed = self.remove_segment(n)?;
                tracing::warn!(
                    segment = n,
                    packets = removed.packets,
                    "history segment file missing: its packets are taken out of the history \
                     (counted as evicted)"
                );
            }
            let Some(next) = n.checked_add(1) else { break };
            from = next;
        }
        // A purge interrupted after its flush leaves files nothing points into.
        self.delete_unreferenced(self.payloads.numbers())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proto::common::Packet;

    use super::*;

    fn pkt(conn_id: u64, seq: u64) -> Packet {
        Packet {
            conn_id,
            seq,
            data: vec![seq as u8; 500].into(),
            ..Default::default()
        }
    }

    fn options(max_bytes: u64, when_full: WhenFull) -> HistoryOptions {
        HistoryOptions {
            max_bytes,
            when_full,
            segment_bytes: Some(1000),
        }
    }

    fn seqs(s: &Store) -> Vec<u64> {
        let mut got = Vec::new();
        s.scan_history((0, 0), false, |p| {
            assert_eq!(
                p.data,
                vec![p.seq as u8; 500],
                "packet {} reads back",
                p.seq
            );
            got.push(p.seq);
            true
        })
        .unwrap();
        got
    }

    fn segment_files(db: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(db.join("history"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }

    #[test]
    fn eviction_removes_the_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let s = Store::open_with(&db, &options(4000, WhenFull::Evict)).unwrap();
        for seq in 1..=20 {
            s.put_packets(vec![pkt(1, seq)]).unwrap();
        }
        // Segments of two 500-byte packets; after each write the oldest go until at most
        // 4000 bytes remain: the last 8 packets, in segments 7 to 10.
        assert_eq!(seqs(&s), (13..=20).collect::<Vec<_>>());
        assert_eq!(s.history_bytes(), 4000);
        assert_eq!(s.budget().evicted(), (12, 6000));
        assert_eq!(s.history_len(), 8);
        assert_eq!(
            segment_files(&db),
            ["000007.seg", "000008.seg", "000009.seg", "000010.seg"]
        );
        // The arrival log lost the evicted positions, and says up to where.
        assert_eq!(s.budget().removed_position(), 12);
        let page = s.log_after(0, 0, 100, 1 << 20).unwrap();
        let first = page.items.first().map(|(n, _)| *n);
        assert_eq!((first, page.items.len()), (Some(13), 8));
        // A packet whose run was partly evicted: the rest of the run stays.
        s.put_packets(vec![pkt(2, 1), pkt(2, 2)]).unwrap();
        assert_eq!(s.history_len(), 8);
        assert_eq!(s.budget().evicted(), (14, 7000));
    }

    #[test]
    fn stop_keeps_the_history_and_counts_what_it_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(&dir.path().join("db"), &options(2000, WhenFull::Stop)).unwrap();
        for seq in 1..=6 {
            s.put_packets(vec![pkt(1, seq)]).unwrap();
        }
        assert_eq!(seqs(&s), [1, 2, 3, 4]);
        assert_eq!(s.budget().refused(), (2, 1000));
        assert_eq!(s.budget().evicted(), (0, 0));
        assert_eq!(s.history_bytes(), 2000);
    }

    #[test]
    fn a_restart_after_eviction_keeps_history_and_counts_and_goes_on_evicting() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        {
            let s = Store::open_with(&db, &options(2000, WhenFull::Evict)).unwrap();
            for seq in 1..=10 {
                s.put_packets(vec![pkt(1, seq)]).unwrap();
            }
            // What `Store::flush` does before an acknowledgement.
            s.payloads.sync().unwrap();
            s.budget.save(&s.meta).unwrap();
            let count = s.history_len().to_be_bytes();
            s.meta.insert(HISTORY_COUNT, &count).unwrap();
            s.db.flush().unwrap();
        }
        // A fresh sled handle of the same path in one process can hit the lock: use a copy.
        let copy = dir.path().join("copy");
        copy_dir(&db, &copy);
        let s = Store::open_with(&copy, &options(2000, WhenFull::Evict)).unwrap();
        assert_eq!(seqs(&s), [7, 8, 9, 10]);
        assert_eq!((s.budget().evicted(), s.history_len()), ((6, 3000), 4));
        s.put_packets(vec![pkt(1, 11), pkt(1, 12)]).unwrap();
        assert_eq!(seqs(&s), [9, 10, 11, 12]);
        assert_eq!(s.budget().evicted(), (8, 4000));
    }

    #[test]
    fn an_interrupted_removal_is_finished_at_open_and_leaves_nothing_dangling() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        {
            let s = Store::open_with(&db, &options(0, WhenFull::Evict)).unwrap();
            for seq in 1..=6 {
                s.put_packets(vec![pkt(1, seq)]).unwrap();
            }
            // A crash after sled was flushed but before segment 1's file was deleted.
            s.payloads.sync().unwrap();
            let kept = std::fs::read(db.join("history/000001.seg")).unwrap();
            s.remove_segment(1).unwrap();
            s.db.flush().unwrap();
            std::fs::write(db.join("history/000001.seg"), kept).unwrap();
        }
        let copy = dir.path().join("copy");
        copy_dir(&db, &copy);
        // And a segment file lost some other way: its entries go too.
        std::fs::remove_file(copy.join("history/000002.seg")).unwrap();
        let s = Store::open_with(&copy, &options(0, WhenFull::Evict)).unwrap();
        assert_eq!(segment_files(&copy), ["000003.seg"]);
        assert_eq!(seqs(&s), [5, 6]);
        assert_eq!(s.history_len(), 2);
        assert_eq!(
            s.budget().evicted(),
            (4, 2000),
            "each lost packet counted once"
        );
        assert!(
            s.segment_runs
                .scan_prefix(1u64.to_be_bytes())
                .next()
                .is_none()
        );
        assert!(
            s.segment_runs
                .scan_prefix(2u64.to_be_bytes())
                .next()
                .is_none()
        );
    }
}
