//! The change hub: orders record changes against watch snapshots so a watcher sees every
//! change exactly once, with no gap between its snapshot and the live stream.
//!
//! Writers hold the hub's lock while they change the store and publish; each change gets the
//! next sequence number. A watcher subscribes, then reads its snapshot a page at a time, each
//! page under the lock with the sequence number as of it ([`Hub::read`]): a change is in a
//! page if and only if its number is at most that page's, so the watcher can tell which live
//! changes its snapshot already holds (see [`crate::watcher`]). No lock is held across a
//! whole-store scan.

use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::sync::broadcast;

use crate::backend::Change;
pub use crate::backend::Numbered;

/// How many changes a slow watcher may fall behind before it is reset.
const BACKLOG: usize = 16_384;

/// Serialises record changes and fans them out to watchers.
pub struct Hub {
    lock: Mutex<()>,
    /// Set when the store publishes changes itself, numbered in its own order (a store
    /// shared by several registry processes): [`WriteGuard::publish`] then sends nothing.
    store_feed: AtomicBool,
    /// The last sequence number given; written only under `lock`.
    seq: AtomicU64,
    tx: broadcast::Sender<Numbered>,
}

/// Proof that the caller holds the hub lock; needed to publish.
pub struct WriteGuard<'a> {
    _guard: MutexGuard<'a, ()>,
    hub: &'a Hub,
}

impl WriteGuard<'_> {
    /// Sends a change to every watcher (none listening is fine).
    pub fn publish(&self, change: Change) {
        if self.hub.store_feed.load(Ordering::Relaxed) {
            return;
        }
        let seq = self.hub.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.hub.tx.send(Numbered { seq, change });
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            lock: Mutex::new(()),
            store_feed: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the lock for a change to the records.
    pub fn write(&self) -> WriteGuard<'_> {
        WriteGuard {
            _guard: self.lock(),
            hub: self,
        }
    }

    /// Hands publication to the store's own feed of numbered changes: `start` is given the
    /// sender and says whether it took it (see [`crate::backend::Feed::start_feed`]).
    pub fn feed_from(&self, start: impl FnOnce(broadcast::Sender<Numbered>) -> bool) {
        if start(self.tx.clone()) {
            self.store_feed.store(true, Ordering::Relaxed);
        }
    }

    /// Subscribes to the changes published from now on. Takes no lock (it is called on
    /// async threads, and writers hold the lock across store I/O): a change published
    /// while the subscription is made may be missed, but it is numbered at most the
    /// sequence number of the first snapshot page, which is read under the lock after
    /// this, so the snapshot holds it.
    pub fn subscribe(&self) -> broadcast::Receiver<Numbered> {
        self.tx.subscribe()
    }

    /// Runs `read` with no change in progress; its result and the last sequence number
    /// published before it.
    pub fn read<T>(&self, read: impl FnOnce() -> T) -> (T, u64) {
        let _guard = self.lock();
        (read(), self.seq.load(Ordering::Relaxed))
    }
}
