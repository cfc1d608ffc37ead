//! History the store could not write: its disk full or failing. Records, closes and counters
//! are small sled writes and keep flowing; a history write that fails drops that batch's
//! packet bytes (the proxy cannot keep them either: it has relayed them), counts them here,
//! and the next write tries again, so recording resumes by itself once space returns.
//!
//! The counts are kept in the store's `meta` tree (written with each flush, like the history
//! count), so they survive a restart; the current failure is published for health checks.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::watch;

/// Packets and bytes not written, and the failure in progress.
pub struct Unwritten {
    packets: AtomicU64,
    bytes: AtomicU64,
    /// The last failure's text while history writes fail; `None` while they succeed.
    failing: watch::Sender<Option<String>>,
    /// Packets lost in the failure in progress (for the "resumed" log line).
    this_time: Mutex<u64>,
}

impl Unwritten {
    /// Counts starting from `packets` and `bytes` (as stored).
    pub fn new(packets: u64, bytes: u64) -> Self {
        Self {
            packets: AtomicU64::new(packets),
            bytes: AtomicU64::new(bytes),
            failing: watch::channel(None).0,
            this_time: Mutex::new(0),
        }
    }

    /// A history write of `packets` packets (`bytes` bytes) failed with `error`.
    pub fn failed(&self, packets: u64, bytes: u64, error: &std::io::Error) {
        self.packets.fetch_add(packets, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        *self.this_time.lock().unwrap_or_else(|e| e.into_inner()) += packets;
        let text = error.to_string();
        let first = self.failing.send_replace(Some(text.clone())).is_none();
        if first {
            tracing::error!(
                "history cannot be written ({text}): packets are relayed and records kept, \
                 but their bytes are not stored until writing works again (counted in \
                 `conns stats`)"
            );
        }
    }

    /// A history write succeeded: ends a failure in progress.
    pub fn succeeded(&self) {
        if self.failing.borrow().is_none() {
            return;
        }
        self.failing.send_replace(None);
        let lost = std::mem::take(&mut *self.this_time.lock().unwrap_or_else(|e| e.into_inner()));
        tracing::warn!("history is written again; {lost} packets could not be stored meanwhile");
    }

    /// Packets not written, in total.
    pub fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    /// Bytes not written, in total.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The failure in progress, if any.
    pub fn failing(&self) -> Option<String> {
        self.failing.borrow().clone()
    }

    /// Follows the failure in progress (health checks).
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.failing.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_and_a_success_ends_them() {
        let u = Unwritten::new(5, 50);
        let mut seen = u.subscribe();
        u.failed(2, 20, &std::io::Error::from_raw_os_error(28));
        u.failed(1, 10, &std::io::Error::from_raw_os_error(28));
        assert_eq!((u.packets(), u.bytes()), (8, 80));
        let failing = u.failing().unwrap_or_default();
        assert!(failing.starts_with("No space left on device"), "{failing}");
        assert!(seen.has_changed().unwrap_or(false));
        assert!(seen.borrow_and_update().is_some());
        u.succeeded();
        assert_eq!(u.failing(), None);
        assert_eq!((u.packets(), u.bytes()), (8, 80), "the totals stay");
    }
}
