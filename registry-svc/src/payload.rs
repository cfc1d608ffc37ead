//! The history's payload log: packet bytes appended to one file and referenced from the
//! sled history tree by (offset, length).
//!
//! sled keeps values inside its B-tree nodes and writes any node larger than a quarter of a
//! log segment as a separate blob file; with payloads in the tree, storing bulk history
//! meant creating (and later deleting) a file per node write, at several CPU seconds per
//! GiB. Appending to one file costs one copy into the page cache.
//!
//! Crash safety: bytes are appended before the tree entry that references them is inserted,
//! and [`PayloadLog::sync`] runs before the registry's flush and acknowledgement, so every
//! acknowledged packet's bytes are durable. sled also flushes on its own schedule, so after
//! a power failure an unacknowledged entry can point past the durable end of the log: such
//! a packet counts as not held ([`PayloadLog::holds`]) and the proxy's replay of its batch
//! stores it again. Bytes appended but never referenced are unreachable and harmless.

use std::{
    fs::File,
    io::{self, IoSlice, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// An append-only file of payload bytes.
pub struct PayloadLog {
    /// The file, and the offset the next append goes to.
    writer: Mutex<(File, u64)>,
    /// A second handle for positioned reads, so readers never wait for the writer's lock.
    reader: File,
    /// Appended to since the last sync.
    dirty: AtomicBool,
}

impl PayloadLog {
    /// Opens (or creates) the log at `path`; appends go after whatever it holds.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = proto::private::open_options()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let end = file.metadata()?.len();
        let reader = file.try_clone()?;
        Ok(Self {
            writer: Mutex::new((file, end)),
            reader,
            dirty: AtomicBool::new(false),
        })
    }

    /// Appends `parts` back to back with one vectored write (repeated while the kernel takes
    /// less); returns the offset of the first part.
    pub fn append(&self, parts: &[&[u8]]) -> io::Result<u64> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (file, end) = &mut *w;
        let start = *end;
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The file may now hold part of this append: later appends go after it
                    // (the bytes are simply never referenced).
                    *end = file.metadata().map(|m| m.len()).unwrap_or(start + total);
                    return Err(e);
                }
            }
        }
        *end = start + total;
        // Marked after the write: a sync that clears the mark before this point does not
        // cover these bytes, so the next one must run.
        self.dirty.store(true, Ordering::Release);
        Ok(start)
    }

    /// The `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "payload length too large"))?;
        let mut buf = vec![0u8; len];
        self.reader.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Whether the log holds `len` bytes at `offset` (an entry whose bytes were lost with
    /// the end of the log in a power failure does not; 0 bytes are always held).
    pub fn holds(&self, offset: u64, len: u64) -> bool {
        let end = self.writer.lock().unwrap_or_else(|e| e.into_inner()).1;
        len == 0 || offset.checked_add(len).is_some_and(|e| e <= end)
    }

    /// Whether there are appends a [`PayloadLog::sync`] would make durable.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = self.reader.sync_data()
        {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_read_back_where_they_were_put_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payloads");
        let log = PayloadLog::open(&path).unwrap();
        let big = vec![7u8; 300_000];
        let at = log.append(&[b"hello", b"", &big, b"!"]).unwrap();
        assert_eq!(at, 0);
        assert_eq!(log.read(0, 5).unwrap(), b"hello");
        assert_eq!(log.read(5, 300_000).unwrap(), big);
        assert_eq!(log.read(300_005, 1).unwrap(), b"!");
        let next = log.append(&[b"more"]).unwrap();
        assert_eq!(next, 300_006);
        assert!(log.is_dirty());
        log.sync().unwrap();
        assert!(!log.is_dirty());
        drop(log);
        let log = PayloadLog::open(&path).unwrap();
        assert_eq!(log.read(next, 4).unwrap(), b"more");
        assert_eq!(log.append(&[b"x"]).unwrap(), 300_010);
        // Reading past the end is an error, not zeros.
        assert!(log.read(300_010, 2).is_err());
        assert!(log.holds(300_010, 1) && !log.holds(300_010, 2) && !log.holds(u64::MAX, 2));
        assert!(log.holds(u64::MAX, 0));
    }
}
