//! The history's disk budget: `--history-max-bytes` and what happens when history reaches it.
//!
//! The history lives in segment files ([`super::log`]). With [`WhenFull::Evict`] (the
//! default) the oldest whole segments are deleted after a write takes the history over its
//! budget; with [`WhenFull::Stop`] a write that would take it over is not recorded. Either
//! way the packets and bytes are counted (kept in `meta` across restarts), shown by `conns
//! stats` and logged: nothing goes silently.
//!
//! Removing a segment is crash-safe: the counts and `removed_below` (every segment below it
//! is gone) are written and flushed first, and only then are the files deleted. A crash in
//! between leaves files the next open deletes; each packet is counted once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Store, StoreError, u64_value};

/// Size at which a history segment is closed and the next one started, unless configured.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

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
    /// sled's cache for the records; by default [`super::RECORDS_CACHE_BYTES`].
    pub records_cache_bytes: Option<u64>,
    /// Memory for closed segments' indexes; by default [`super::log::INDEX_CACHE_BYTES`].
    pub index_cache_bytes: Option<usize>,
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
/// Every history segment with a lower number has been removed.
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
    /// Every segment numbered below it has been removed.
    removed_below: AtomicU64,
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
            removed_below: get(REMOVED_BELOW)?,
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
            (REMOVED_BELOW, &self.removed_below),
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

    /// Every segment numbered below it has been removed.
    pub fn removed_below(&self) -> u64 {
        self.removed_below.load(Ordering::Relaxed)
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

    /// Bytes of history payload in the log (its segment files hold them and the frames'
    /// headers, about 72 bytes a packet; the budget counts the files).
    pub fn history_bytes(&self) -> u64 {
        self.log.payload_bytes()
    }

    /// Bytes sled uses on disk (records and bookkeeping).
    pub fn records_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// With [`WhenFull::Evict`], evicts the oldest segments while the history is over its
    /// budget (never the segment being written).
    pub(super) fn keep_budget(&self) -> Result<(), StoreError> {
        let options = self.budget.options();
        if options.max_bytes == 0 || options.when_full != WhenFull::Evict {
            return Ok(());
        }
        while self.log.total_bytes() > options.max_bytes {
            let Some((oldest, summary)) = self.log.oldest_closed() else {
                break;
            };
            self.remove_segment(oldest, &summary)?;
            tracing::warn!(
                segment = oldest,
                packets = summary.packets,
                bytes = summary.payload,
                max_bytes = options.max_bytes,
                "history reached its budget (--history-max-bytes): evicted the oldest \
                 history (counted in `conns stats`)"
            );
        }
        Ok(())
    }

    /// Evicts segment `n`: counts its packets, notes that every segment up to it is gone,
    /// makes that durable, and only then deletes the files (a crash in between leaves files
    /// the next open deletes).
    fn remove_segment(&self, n: u64, summary: &super::log::Summary) -> Result<(), StoreError> {
        let b = &self.budget;
        b.evicted_packets
            .fetch_add(summary.packets, Ordering::Relaxed);
        b.evicted_bytes
            .fetch_add(summary.payload, Ordering::Relaxed);
        b.removed_position
            .fetch_max(summary.last_pos, Ordering::Relaxed);
        b.removed_below.fetch_max(n + 1, Ordering::Relaxed);
        self.save_counts()?;
        self.meta.flush()?;
        self.log.remove(n)?;
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
            ..Default::default()
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

    /// A frame of one 500-byte packet: header 12, body header 16, packet header 44.
    const FRAME: u64 = 572;

    #[test]
    fn eviction_removes_the_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let s = Store::open_with(&db, &options(4 * 2 * FRAME + 10, WhenFull::Evict)).unwrap();
        for seq in 1..=20 {
            s.put_packets(vec![pkt(1, seq)]).unwrap();
        }
        // Segments of two frames; after each write the oldest go until four segments
        // remain: the last 8 packets, in segments 7 to 10.
        assert_eq!(seqs(&s), (13..=20).collect::<Vec<_>>());
        assert_eq!(s.history_bytes(), 8 * 500);
        assert_eq!(s.budget().evicted(), (12, 6000));
        assert_eq!(s.history_len(), 8);
        assert_eq!(
            segment_files(&db),
            [
                "000007.idx",
                "000007.log",
                "000008.idx",
                "000008.log",
                "000009.idx",
                "000009.log",
                "000010.log"
            ]
        );
        // The arrival log lost the evicted positions, and says up to where.
        assert_eq!(s.budget().removed_position(), 12);
        let page = s.log_after(0, 0, 100, 1 << 20).unwrap();
        let first = page.items.first().map(|(n, _)| *n);
        assert_eq!((first, page.items.len()), (Some(13), 8));
        // The next write starts segment 11 and segment 7 goes.
        s.put_packets(vec![pkt(2, 1), pkt(2, 2)]).unwrap();
        assert_eq!(s.history_len(), 8);
        assert_eq!(s.budget().evicted(), (14, 7000));
    }

    #[test]
    fn stop_keeps_the_history_and_counts_what_it_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s =
            Store::open_with(&dir.path().join("db"), &options(4 * FRAME, WhenFull::Stop)).unwrap();
        for seq in 1..=6 {
            s.put_packets(vec![pkt(1, seq)]).unwrap();
        }
        assert_eq!(seqs(&s), [1, 2, 3, 4]);
        assert_eq!(s.budget().refused(), (2, 1000));
        assert_eq!(s.budget().evicted(), (0, 0));
        assert_eq!(s.history_bytes(), 4 * 500);
    }

    #[test]
    fn a_restart_after_eviction_keeps_history_and_counts_and_goes_on_evicting() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let budget = 2 * 2 * FRAME + 10;
        {
            let s = Store::open_with(&db, &options(budget, WhenFull::Evict)).unwrap();
            for seq in 1..=10 {
                s.put_packets(vec![pkt(1, seq)]).unwrap();
            }
            s.commit().unwrap();
        }
        // A fresh sled handle of the same path in one process can hit the lock: use a copy.
        let copy = dir.path().join("copy");
        copy_dir(&db, &copy);
        let s = Store::open_with(&copy, &options(budget, WhenFull::Evict)).unwrap();
        assert_eq!(seqs(&s), [7, 8, 9, 10]);
        assert_eq!((s.budget().evicted(), s.history_len()), ((6, 3000), 4));
        s.put_packets(vec![pkt(1, 11)]).unwrap();
        s.put_packets(vec![pkt(1, 12)]).unwrap();
        assert_eq!(seqs(&s), [9, 10, 11, 12]);
        assert_eq!(s.budget().evicted(), (8, 4000));
    }

    #[test]
    fn an_interrupted_removal_is_finished_at_open_and_a_lost_index_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        {
            let s = Store::open_with(&db, &options(0, WhenFull::Evict)).unwrap();
            for seq in 1..=6 {
                s.put_packets(vec![pkt(1, seq)]).unwrap();
            }
            // A crash after the removal of segment 1 was counted and flushed, before its
            // files were deleted.
            s.budget.removed_below.store(2, Ordering::Relaxed);
            s.commit().unwrap();
        }
        let copy = dir.path().join("copy");
        copy_dir(&db, &copy);
        std::fs::remove_file(copy.join("history/000002.idx")).unwrap();
        let s = Store::open_with(&copy, &options(0, WhenFull::Evict)).unwrap();
        assert_eq!(
            segment_files(&copy),
            ["000002.idx", "000002.log", "000003.log"]
        );
        assert_eq!(seqs(&s), [3, 4, 5, 6]);
        assert_eq!(s.history_len(), 4);
    }
}
