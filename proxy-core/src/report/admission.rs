//! Admission and shedding: what the reporter's queue takes, and what it sheds while the
//! registry is slow or down.
//!
//! Everything buffered counts against one bound, whether still queued or sent in a batch
//! not yet acknowledged: at most `bound` events, and [`MAX_BUFFERED_BYTES`] of packet
//! payload. When full, the reporter sheds, in this order: periodic counter updates
//! (skipped once the buffer is half full: the next one carries the same totals), history
//! packets (at the bound), and only then opens, closes and other updates (which get a
//! reserve of a quarter of the bound above it). Everything shed is counted ([`Losses`]).
//!
//! The queue itself is a bounded channel whose capacity is the most events admission ever
//! lets be buffered ([`capacity`]), so the memory bound holds in the channel as well as in
//! the accounting; a send never waits (a full channel sheds, and counts, like admission).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use proto::{
    common::{Connection, Packet},
    registry::{ConnectionClosed, ConnectionUpdate},
};
use tokio::sync::{Semaphore, mpsc};

use super::losses::Losses;

/// Most packet payload bytes buffered (queued plus unacknowledged) before packets are shed.
pub const MAX_BUFFERED_BYTES: usize = 256 << 20;

/// One queued event. Packets, by far the most frequent, are not boxed: no allocation each.
#[derive(Debug)]
pub(super) enum Item {
    Opened(Box<Connection>),
    Updated(Box<ConnectionUpdate>),
    Closed(Box<ConnectionClosed>),
    Packet(Packet),
}

impl Item {
    /// Payload bytes it holds: both versions of a modified packet.
    pub(super) fn payload_len(&self) -> usize {
        match self {
            Item::Packet(p) => p.data.len() + p.original.len(),
            _ => 0,
        }
    }
}

/// Shedding priority of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Opens, closes and one-off updates: shed last.
    Record,
    /// A history packet.
    Packet,
    /// Periodic running counters: skipped first.
    Counters,
}

/// The most events of `class` buffered at once under `bound`.
fn limit(class: Class, bound: usize) -> usize {
    match class {
        Class::Counters => bound / 2,
        Class::Packet => bound,
        Class::Record => bound.saturating_add(bound / 4).saturating_add(64),
    }
}

/// The queue's capacity under `bound`: the most events admission lets be buffered (the
/// records' limit), within what a tokio channel can count.
pub(super) fn capacity(bound: usize) -> usize {
    limit(Class::Record, bound).min(Semaphore::MAX_PERMITS)
}

/// The sending end of the queue, with the accounting of everything buffered.
pub(super) struct Admission {
    tx: mpsc::Sender<Item>,
    bound: usize,
    /// Events queued or in batches awaiting acknowledgement.
    events: AtomicUsize,
    /// Their packet payload bytes.
    bytes: AtomicUsize,
    /// What was shed.
    pub(super) losses: Losses,
}

impl Admission {
    /// An empty queue under `bound` (at least 1), and its receiving end.
    pub(super) fn new(bound: usize) -> (Self, mpsc::Receiver<Item>) {
        let bound = bound.max(1);
        let (tx, rx) = mpsc::channel(capacity(bound));
        let admission = Self {
            tx,
            bound,
            events: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            losses: Losses::default(),
        };
        (admission, rx)
    }

    /// Events queued or awaiting acknowledgement.
    pub(super) fn buffered(&self) -> usize {
        self.events.load(Relaxed)
    }

    /// Packet payload bytes queued or awaiting acknowledgement.
    #[cfg(test)]
    pub(super) fn buffered_bytes(&self) -> usize {
        self.bytes.load(Relaxed)
    }

    /// Reserves room for one event of `class` carrying `len` payload bytes; whether there
    /// was room. Nothing is counted as shed (see [`Admission::push`]).
    pub(super) fn admit(&self, class: Class, len: usize) -> bool {
        if self.events.fetch_add(1, Relaxed) >= limit(class, self.bound) {
            self.events.fetch_sub(1, Relaxed);
            return false;
        }
        if len > 0 && self.bytes.fetch_add(len, Relaxed) + len > MAX_BUFFERED_BYTES {
            self.bytes.fetch_sub(len, Relaxed);
            self.events.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    /// Queues `item`, admitted as one event of `class` with `len` payload bytes, or sheds
    /// and counts it; whether it was queued.
    pub(super) fn push(&self, item: Item, class: Class, len: usize) -> bool {
        if !self.admit(class, len) {
            self.shed(class, len);
            return false;
        }
        self.send_admitted(item, class, len)
    }

    /// Queues `item`, for which [`Admission::admit`] already made room; if the queue is
    /// closed (the background task is gone, after shutdown) or full, the room is given back
    /// and the item shed.
    pub(super) fn send_admitted(&self, item: Item, class: Class, len: usize) -> bool {
        if self.tx.try_send(item).is_err() {
            self.release(1, len);
            self.shed(class, len);
            return false;
        }
        true
    }

    /// Counts one event of `class` shed (periodic counters are not: the next carries the
    /// same totals).
    fn shed(&self, class: Class, len: usize) {
        match class {
            Class::Packet => self.losses.packet(len),
            Class::Record => self.losses.event(),
            Class::Counters => {}
        }
    }

    /// Gives back the room of `events` events with `bytes` payload bytes (acknowledged,
    /// lost, or never sent).
    pub(super) fn release(&self, events: usize, bytes: usize) {
        self.events.fetch_sub(events, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }

    /// Whether the queue is closed (its receiver is gone).
    pub(super) fn closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn packet(seq: u64, data: &'static [u8]) -> Item {
        Item::Packet(Packet {
            conn_id: 9,
            seq,
            data: Bytes::from_static(data),
            ..Default::default()
        })
    }

    #[test]
    fn sheds_counters_then_packets_then_records() {
        let (a, _rx) = Admission::new(8);
        // Counters stop at half the bound.
        for _ in 0..4 {
            assert!(a.admit(Class::Counters, 0));
        }
        assert!(!a.admit(Class::Counters, 0));
        // Packets fill up to the bound.
        for i in 0..4 {
            assert!(a.push(packet(i, b"abc"), Class::Packet, 3));
        }
        assert!(!a.push(packet(9, b"abc"), Class::Packet, 3));
        assert_eq!(a.losses.snapshot().packets_dropped, 1);
        assert_eq!(a.losses.snapshot().bytes_dropped, 3);
        // Records still fit in the reserve above the bound.
        for _ in 0..(8 / 4 + 64) {
            assert!(a.push(Item::Updated(Box::default()), Class::Record, 0));
        }
        assert!(!a.push(Item::Updated(Box::default()), Class::Record, 0));
        assert_eq!(a.losses.snapshot().events_dropped, 1);
        a.release(1, 3);
        assert!(a.admit(Class::Record, 0));
    }

    #[test]
    fn the_channel_holds_exactly_what_admission_lets_in() {
        let bound = 8;
        let (a, mut rx) = Admission::new(bound);
        assert_eq!(capacity(bound), 8 + 2 + 64);
        // Records alone fill the channel to its capacity, and no further.
        for _ in 0..capacity(bound) {
            assert!(a.push(Item::Updated(Box::default()), Class::Record, 0));
        }
        assert!(!a.push(Item::Updated(Box::default()), Class::Record, 0));
        assert_eq!(a.buffered(), capacity(bound));
        assert_eq!(rx.len(), capacity(bound));
        // Received (now in a batch awaiting acknowledgement): still counted, so still full.
        let mut taken = Vec::new();
        rx.try_recv().map(|i| taken.push(i)).expect("an item");
        assert!(!a.push(Item::Updated(Box::default()), Class::Record, 0));
        // Acknowledged: room again.
        a.release(1, 0);
        assert!(a.push(Item::Updated(Box::default()), Class::Record, 0));
        assert_eq!(a.losses.snapshot().events_dropped, 2);
    }

    #[test]
    fn packets_stop_at_the_payload_bound_whatever_their_count() {
        let (a, _rx) = Admission::new(1000);
        assert!(a.admit(Class::Packet, MAX_BUFFERED_BYTES - 1));
        assert!(!a.push(packet(1, b"ab"), Class::Packet, 2));
        assert!(a.push(packet(2, b"a"), Class::Packet, 1));
        assert_eq!(a.buffered_bytes(), MAX_BUFFERED_BYTES);
        assert_eq!(a.buffered(), 2);
        let l = a.losses.snapshot();
        assert_eq!((l.packets_dropped, l.bytes_dropped), (1, 2));
    }

    #[test]
    fn after_the_receiver_is_gone_everything_is_shed_and_nothing_stays_counted() {
        let (a, rx) = Admission::new(8);
        drop(rx);
        assert!(a.closed());
        assert!(!a.push(packet(1, b"abc"), Class::Packet, 3));
        assert!(!a.push(Item::Closed(Box::default()), Class::Record, 0));
        assert_eq!((a.buffered(), a.buffered_bytes()), (0, 0));
        let l = a.losses.snapshot();
        assert_eq!(
            (l.packets_dropped, l.bytes_dropped, l.events_dropped),
            (1, 3, 1)
        );
    }

    #[test]
    fn a_huge_bound_still_makes_a_channel() {
        assert_eq!(capacity(usize::MAX), Semaphore::MAX_PERMITS);
        let (a, _rx) = Admission::new(usize::MAX);
        assert!(a.push(Item::Opened(Box::default()), Class::Record, 0));
    }
}
