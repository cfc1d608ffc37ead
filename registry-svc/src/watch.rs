//! The change hub: orders record changes against watch snapshots so a watcher sees every
//! change exactly once, with no gap between its snapshot and the live stream.
//!
//! Writers hold the hub's lock while they change the store and publish; a new watcher takes
//! the same lock to subscribe and read its snapshot. A change is therefore either in the
//! snapshot or in the subscription, never both and never neither.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::store::Change;

/// How many changes a slow watcher may fall behind before it is reset.
const BACKLOG: usize = 16_384;

/// Serialises record changes and fans them out to watchers.
pub struct Hub {
    lock: Mutex<()>,
    tx: broadcast::Sender<Change>,
}

/// Proof that the caller holds the hub lock; needed to publish.
pub struct WriteGuard<'a> {
    _guard: MutexGuard<'a, ()>,
    tx: &'a broadcast::Sender<Change>,
}

impl WriteGuard<'_> {
    /// Sends a change to every watcher (none listening is fine).
    pub fn publish(&self, change: Change) {
        let _ = self.tx.send(change);
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            lock: Mutex::new(()),
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Hub {
    /// Takes the lock for a change to the records.
    pub fn write(&self) -> WriteGuard<'_> {
        WriteGuard {
            _guard: self.lock.lock().unwrap_or_else(|e| e.into_inner()),
            tx: &self.tx,
        }
    }

    /// Subscribes and takes a snapshot atomically with respect to writers.
    pub fn subscribe_with<T>(
        &self,
        snapshot: impl FnOnce() -> T,
    ) -> (broadcast::Receiver<Change>, T) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        (rx, snapshot())
    }
}
