//! Per-connection shared state: the packet sequence counter both directions draw from and
//! the running byte and packet counters the reporter publishes while the connection is open.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use proto::{
    common::{CloseKind, ClosedBy, Direction},
    registry::Counters,
};

/// State shared by the two directions of one connection and by the reporter's ticker.
#[derive(Debug, Default)]
pub struct ConnState {
    /// The connection ID.
    pub id: u64,
    seq: AtomicU64,
    bytes_c2s: AtomicU64,
    bytes_s2c: AtomicU64,
    packets_c2s: AtomicU64,
    packets_s2c: AtomicU64,
    /// Total packets at the last counters update sent (so unchanged connections send none).
    reported: AtomicU64,
}

impl ConnState {
    /// Fresh state for connection `id`.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            ..Self::default()
        }
    }

    /// Counts one packet of `len` bytes read in `dir` and returns its sequence number
    /// (from 1, shared by both directions: the order in which the proxy read them).
    pub fn record(&self, dir: Direction, len: usize) -> u64 {
        let len = len as u64;
        match dir {
            Direction::S2c => {
                self.bytes_s2c.fetch_add(len, Relaxed);
                self.packets_s2c.fetch_add(1, Relaxed);
            }
            _ => {
                self.bytes_c2s.fetch_add(len, Relaxed);
                self.packets_c2s.fetch_add(1, Relaxed);
            }
        }
        self.seq.fetch_add(1, Relaxed) + 1
    }

    /// The sequence number of the last packet counted (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.seq.load(Relaxed)
    }

    /// The totals so far.
    pub fn counters(&self) -> Counters {
        Counters {
            bytes_c2s: self.bytes_c2s.load(Relaxed),
            bytes_s2c: self.bytes_s2c.load(Relaxed),
            packets_c2s: self.packets_c2s.load(Relaxed),
            packets_s2c: self.packets_s2c.load(Relaxed),
        }
    }

    /// The totals when they changed since the last call, for the periodic update.
    pub fn counters_if_changed(&self) -> Option<Counters> {
        let c = self.counters();
        let total = c.packets_c2s + c.packets_s2c;
        (self.reported.swap(total, Relaxed) != total).then_some(c)
    }
}

/// How a connection ended: the side whose end came first, how, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnEnd {
    /// Who ended it.
    pub closed_by: ClosedBy,
    /// FIN, RST or another failure.
    pub kind: CloseKind,
    /// A human-readable reason, e.g. "client sent FIN".
    pub reason: String,
}

impl ConnEnd {
    /// An end by `closed_by`.
    pub fn new(closed_by: ClosedBy, kind: CloseKind, reason: impl Into<String>) -> Self {
        Self {
            closed_by,
            kind,
            reason: reason.into(),
        }
    }

    /// An end by the proxy itself (connect failures, refused targets, internal errors).
    pub fn proxy(kind: CloseKind, reason: impl Into<String>) -> Self {
        Self::new(ClosedBy::Proxy, kind, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_shared_and_counters_split_by_direction() {
        let s = ConnState::new(7);
        assert_eq!(s.record(Direction::C2s, 10), 1);
        assert_eq!(s.record(Direction::S2c, 5), 2);
        assert_eq!(s.record(Direction::C2s, 1), 3);
        let c = s.counters();
        assert_eq!(
            (c.bytes_c2s, c.bytes_s2c, c.packets_c2s, c.packets_s2c),
            (11, 5, 2, 1)
        );
        assert!(s.counters_if_changed().is_some());
        assert!(s.counters_if_changed().is_none());
        s.record(Direction::S2c, 1);
        assert!(s.counters_if_changed().is_some());
    }
}
