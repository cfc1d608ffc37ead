//! What the reporter could not report, counted: events, packets and payload bytes shed
//! (by admission, or in a batch the registry rejected), and what the intercept holder
//! could not do. The totals go to the registry with every batch as `IngestRequest.losses`
//! and are shown to the user; nothing is lost silently.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use proto::registry::ProxyLosses;

/// What intercept could not do on this proxy: counted by the holder
/// ([`crate::hold::Holder`]) and sent to the registry with the losses
/// (`ProxyLosses.intercept_*`, `rewrite_skipped`).
#[derive(Debug, Default)]
pub struct InterceptCounts {
    /// Holds whose call failed (the intercept service unreachable, gone, or failing).
    pub hold_failed: AtomicU64,
    /// Holds the intercept service answered at once without holding (queue full, packet
    /// too large).
    pub refused: AtomicU64,
    /// Packets the replace rules would have grown beyond the limit: relayed unchanged.
    pub rewrite_skipped: AtomicU64,
}

impl InterceptCounts {
    /// Packets selected for holding but not held, for either reason.
    pub fn not_held(&self) -> u64 {
        self.hold_failed.load(Relaxed) + self.refused.load(Relaxed)
    }
}

/// The reporter's running loss totals.
#[derive(Debug, Default)]
pub(super) struct Losses {
    /// Connection events (opens, updates, closes) shed.
    events_dropped: AtomicU64,
    /// History packets shed, and their payload bytes.
    packets_dropped: AtomicU64,
    bytes_dropped: AtomicU64,
    /// The intercept holder's counts, once there is one.
    intercept: OnceLock<Arc<InterceptCounts>>,
}

impl Losses {
    /// Reports `counts` with the losses from now on (the first holder's only).
    pub(super) fn count_intercept(&self, counts: Arc<InterceptCounts>) {
        let _ = self.intercept.set(counts);
    }

    /// One history packet of `len` payload bytes was shed.
    pub(super) fn packet(&self, len: usize) {
        self.packets_dropped.fetch_add(1, Relaxed);
        self.bytes_dropped.fetch_add(len as u64, Relaxed);
    }

    /// One connection event was shed.
    pub(super) fn event(&self) {
        self.events_dropped.fetch_add(1, Relaxed);
    }

    /// A whole batch was lost: `events` events, `packets` of them history packets carrying
    /// `payload` bytes.
    pub(super) fn batch(&self, events: usize, packets: u64, payload: usize) {
        self.packets_dropped.fetch_add(packets, Relaxed);
        self.events_dropped
            .fetch_add((events as u64).saturating_sub(packets), Relaxed);
        self.bytes_dropped.fetch_add(payload as u64, Relaxed);
    }

    /// The totals so far.
    pub(super) fn snapshot(&self) -> ProxyLosses {
        let intercept = self.intercept.get();
        let count =
            |f: fn(&InterceptCounts) -> &AtomicU64| intercept.map_or(0, |c| f(c).load(Relaxed));
        ProxyLosses {
            events_dropped: self.events_dropped.load(Relaxed),
            packets_dropped: self.packets_dropped.load(Relaxed),
            bytes_dropped: self.bytes_dropped.load(Relaxed),
            intercept_not_held: intercept.map_or(0, |c| c.not_held()),
            intercept_hold_failed: count(|c| &c.hold_failed),
            intercept_refused: count(|c| &c.refused),
            rewrite_skipped: count(|c| &c.rewrite_skipped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_by_kind_and_include_the_holders_counts() {
        let l = Losses::default();
        assert_eq!(l.snapshot(), ProxyLosses::default());
        l.packet(10);
        l.event();
        // A rejected batch of 5 events, 2 of them packets with 7 bytes.
        l.batch(5, 2, 7);
        let counts = Arc::new(InterceptCounts::default());
        counts.hold_failed.store(2, Relaxed);
        counts.refused.store(3, Relaxed);
        counts.rewrite_skipped.store(4, Relaxed);
        l.count_intercept(counts);
        assert_eq!(
            l.snapshot(),
            ProxyLosses {
                events_dropped: 4,
                packets_dropped: 3,
                bytes_dropped: 17,
                intercept_not_held: 5,
                intercept_hold_failed: 2,
                intercept_refused: 3,
                rewrite_skipped: 4,
            }
        );
    }
}
