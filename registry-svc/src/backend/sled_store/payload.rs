//! The payload log of stores from before the history log ([`crate::backend::sled_store::log`]): packet
//! bytes appended to `history/NNNNNN.seg` files (or one `history.log`) and referenced from
//! sled's old `history` tree by (segment, offset, length). Kept to read such a store once,
//! when it is moved into the history log ([`crate::backend::sled_store`]'s `migrate`), and for its tests.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, IoSlice, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

/// Size at which a segment is closed and the next one started, unless configured.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// One segment file and how many bytes it holds.
struct Segment {
    file: File,
    len: AtomicU64,
}

/// Payload bytes in a directory of append-only segment files.
pub struct PayloadLog {
    dir: PathBuf,
    /// The legacy single file (segment 0), if the store has one.
    legacy: PathBuf,
    segment_bytes: u64,
    /// Every segment by number: readers clone one and read without waiting for the writer.
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    /// The segment appends go to, and its number; held for a whole append.
    writer: Mutex<(u64, Arc<Segment>)>,
    /// Bytes in all segments.
    total: AtomicU64,
    /// Appended to since the last sync.
    dirty: AtomicBool,
}

/// The file name of segment `n`.
fn segment_name(n: u64) -> String {
    format!("{n:06}.seg")
}

fn segment_number(name: &std::ffi::OsStr) -> Option<u64> {
    name.to_str()?.strip_suffix(".seg")?.parse().ok()
}

fn open_segment(path: &Path) -> io::Result<Arc<Segment>> {
    let file = platform::private::open_options()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let len = AtomicU64::new(file.metadata()?.len());
    Ok(Arc::new(Segment { file, len }))
}

impl PayloadLog {
    /// Opens (or creates) the log of the store in `store_dir` (segments in its `history`
    /// folder, plus a legacy `history.log`); appends go after whatever the newest holds.
    pub fn open(store_dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        let dir = store_dir.join("history");
        platform::private::create_dir(&dir)?;
        let legacy = store_dir.join("history.log");
        let mut segments = BTreeMap::new();
        if legacy.exists() {
            segments.insert(0, open_segment(&legacy)?);
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if let Some(n) = segment_number(&entry.file_name()).filter(|&n| n > 0) {
                segments.insert(n, open_segment(&entry.path())?);
            }
        }
        let newest = segments.keys().next_back().copied().unwrap_or(0);
        let (current, seg) = match segments.get(&newest) {
            Some(seg) if newest > 0 => (newest, seg.clone()),
            _ => {
                let n = newest + 1;
                let seg = open_segment(&dir.join(segment_name(n)))?;
                segments.insert(n, seg.clone());
                (n, seg)
            }
        };
        let total = segments
            .values()
            .map(|s| s.len.load(Ordering::Relaxed))
            .sum();
        Ok(Self {
            dir,
            legacy,
            segment_bytes: segment_bytes.max(1),
            segments: RwLock::new(segments),
            writer: Mutex::new((current, seg)),
            total: AtomicU64::new(total),
            dirty: AtomicBool::new(false),
        })
    }

    fn path_of(&self, n: u64) -> PathBuf {
        if n == 0 {
            self.legacy.clone()
        } else {
            self.dir.join(segment_name(n))
        }
    }

    /// Appends `parts` back to back with one vectored write (repeated while the kernel takes
    /// less); returns the segment and the offset of the first part.
    pub fn append(&self, parts: &[&[u8]]) -> io::Result<(u64, u64)> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.1.len.load(Ordering::Relaxed) >= self.segment_bytes {
            self.start_segment(&mut w)?;
        }
        let (n, seg) = &*w;
        let start = seg.len.load(Ordering::Relaxed);
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match (&seg.file).write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The file may now hold part of this append: later appends go after it
                    // (the bytes are simply never referenced).
                    let end = seg
                        .file
                        .metadata()
                        .map(|m| m.len())
                        .unwrap_or(start + total);
                    self.grown(seg, end.max(start) - start);
                    return Err(e);
                }
            }
        }
        self.grown(seg, total);
        // Marked after the write: a sync that clears the mark before this point does not
        // cover these bytes, so the next one must run.
        self.dirty.store(true, Ordering::Release);
        Ok((*n, start))
    }

    fn grown(&self, seg: &Segment, by: u64) {
        seg.len.fetch_add(by, Ordering::Relaxed);
        self.total.fetch_add(by, Ordering::Relaxed);
    }

    /// Closes the full segment (made durable first, so [`PayloadLog::sync`] need only cover
    /// the newest) and starts the next.
    fn start_segment(&self, w: &mut (u64, Arc<Segment>)) -> io::Result<()> {
        w.1.file.sync_data()?;
        let n = w.0 + 1;
        let seg = open_segment(&self.path_of(n))?;
        self.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(n, seg.clone());
        *w = (n, seg);
        Ok(())
    }

    /// Starts a new segment unless the one appends go to is empty, so that every byte so
    /// far is in a segment [`PayloadLog::remove`] may delete.
    pub fn close_current(&self) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.1.len.load(Ordering::Relaxed) > 0 {
            self.start_segment(&mut w)?;
        }
        Ok(())
    }

    fn segment(&self, n: u64) -> Option<Arc<Segment>> {
        let segments = self.segments.read().unwrap_or_else(|e| e.into_inner());
        segments.get(&n).cloned()
    }

    /// The `len` bytes at `offset` of segment `n`.
    pub fn read(&self, n: u64, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "payload length too large"))?;
        let seg = self.segment(n).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("history segment {n} was evicted or purged"),
            )
        })?;
        let mut buf = vec![0u8; len];
        seg.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Whether segment `n` holds `len` bytes at `offset` (an entry whose bytes were lost with
    /// the end of a segment in a power failure, or whose segment was removed, does not;
    /// 0 bytes are always held).
    pub fn holds(&self, n: u64, offset: u64, len: u64) -> bool {
        len == 0
            || self.segment(n).is_some_and(|s| {
                offset
                    .checked_add(len)
                    .is_some_and(|e| e <= s.len.load(Ordering::Relaxed))
            })
    }

    /// Whether there are appends a [`PayloadLog::sync`] would make durable.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            let seg = self
                .writer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .clone();
            if let Err(e) = seg.file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Bytes in all segments.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The oldest segment that appends no longer go to, if any.
    pub fn oldest_closed(&self) -> Option<u64> {
        let current = self.writer.lock().unwrap_or_else(|e| e.into_inner()).0;
        let segments = self.segments.read().unwrap_or_else(|e| e.into_inner());
        segments.keys().next().copied().filter(|&n| n < current)
    }

    /// The segment appends go to.
    pub fn current(&self) -> u64 {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Whether segment `n` is present.
    pub fn has(&self, n: u64) -> bool {
        self.segment(n).is_some()
    }

    /// The numbers of the segments present, oldest first.
    pub fn numbers(&self) -> Vec<u64> {
        let segments = self.segments.read().unwrap_or_else(|e| e.into_inner());
        segments.keys().copied().collect()
    }

    /// Deletes segment `n` (never the one appends go to); its bytes are gone. A file already
    /// deleted is not an error.
    pub fn remove(&self, n: u64) -> io::Result<()> {
        let current = self.writer.lock().unwrap_or_else(|e| e.into_inner()).0;
        if n == current {
            return Err(io::Error::other(
                "the history segment being written cannot be removed",
            ));
        }
        let removed = self
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&n);
        if let Some(seg) = removed {
            self.total
                .fetch_sub(seg.len.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        match std::fs::remove_file(self.path_of(n)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_read_back_where_they_were_put_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let log = PayloadLog::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        let big = vec![7u8; 300_000];
        let at = log.append(&[b"hello", b"", &big, b"!"]).unwrap();
        assert_eq!(at, (1, 0));
        assert_eq!(log.read(1, 0, 5).unwrap(), b"hello");
        assert_eq!(log.read(1, 5, 300_000).unwrap(), big);
        assert_eq!(log.read(1, 300_005, 1).unwrap(), b"!");
        let next = log.append(&[b"more"]).unwrap();
        assert_eq!(next, (1, 300_006));
        assert!(log.is_dirty());
        log.sync().unwrap();
        assert!(!log.is_dirty());
        drop(log);
        let log = PayloadLog::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(log.read(1, 300_006, 4).unwrap(), b"more");
        assert_eq!(log.append(&[b"x"]).unwrap(), (1, 300_010));
        assert_eq!(log.total_bytes(), 300_011);
        // Reading past the end is an error, not zeros.
        assert!(log.read(1, 300_010, 2).is_err());
        assert!(log.holds(1, 300_010, 1) && !log.holds(1, 300_010, 2));
        assert!(!log.holds(1, u64::MAX, 2) && !log.holds(2, 0, 1));
        assert!(log.holds(1, u64::MAX, 0));
    }

    #[test]
    fn full_segments_are_closed_and_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = PayloadLog::open(dir.path(), 10).unwrap();
        assert_eq!(log.append(&[b"0123456789ab"]).unwrap(), (1, 0));
        assert_eq!(log.oldest_closed(), None, "the segment written to stays");
        assert_eq!(log.append(&[b"cd"]).unwrap(), (2, 0));
        assert_eq!(log.append(&[b"ef"]).unwrap(), (2, 2));
        assert_eq!(log.oldest_closed(), Some(1));
        assert_eq!(log.total_bytes(), 16);
        log.sync().unwrap();
        log.remove(1).unwrap();
        assert!(log.remove(2).is_err(), "the segment written to is kept");
        assert_eq!((log.total_bytes(), log.oldest_closed()), (4, None));
        assert!(!log.holds(1, 0, 1));
        let err = log.read(1, 0, 1).unwrap_err();
        assert_eq!(err.to_string(), "history segment 1 was evicted or purged");
        assert!(!dir.path().join("history/000001.seg").exists());
        drop(log);
        let log = PayloadLog::open(dir.path(), 10).unwrap();
        assert_eq!(log.numbers(), vec![2]);
        assert_eq!(log.read(2, 2, 2).unwrap(), b"ef");
    }

    #[test]
    fn a_store_from_before_segments_reads_its_log_as_segment_0() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("history.log"), b"old bytes").unwrap();
        let log = PayloadLog::open(dir.path(), 4).unwrap();
        assert_eq!(log.numbers(), vec![0, 1]);
        assert_eq!(log.read(0, 4, 5).unwrap(), b"bytes");
        assert_eq!(log.append(&[b"new"]).unwrap(), (1, 0));
        assert_eq!(log.oldest_closed(), Some(0));
        log.remove(0).unwrap();
        assert!(!dir.path().join("history.log").exists());
    }
}
