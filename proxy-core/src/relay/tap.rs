//! The hold point: what happens to a packet between the read that received it and the write
//! that passes it on, the same for every direction and for plain and TLS legs alike.
//!
//! [`Tap::packet`] numbers and counts the packet (sequence number and timestamp taken at the
//! read) and asks the installed [`Hold`], if any, what to do with it ([`Check`]); a packet
//! the hold keeps waits for its [`Fate`]. The pump then writes what the resulting [`Passage`]
//! says and hands it to [`Tap::passed`], which queues the history copy (after the write, so
//! waking the reporter never delays the data).
//!
//! These are the hold point's only words: [`Check`] (before), [`Waiting`] (a kept packet) and
//! [`Fate`] (after), from the intercept client's decision to the write. The wire's
//! `intercept.Verdict` and `intercept.HeldPacket` are the intercept service's; the client
//! (`crate::hold`) translates them to these.
//!
//! With no hold installed (intercept off) [`Tap::packet`] is one branch and never waits; only
//! a held packet comes with a (boxed) future to await.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use prost_types::Timestamp;
use proto::common::Direction;
use tokio::sync::Notify;

use crate::{conn::ConnState, report::Reporter};

/// History packets up to this size are copied out of the read block, so that a small packet
/// waiting in the report queue does not pin a whole block.
pub const SMALL_PACKET: usize = 2 * 1024;

/// The bytes to record for a packet: small packets are copied (see [`SMALL_PACKET`]).
pub fn record_copy(data: &Bytes) -> Bytes {
    if data.len() <= SMALL_PACKET {
        Bytes::copy_from_slice(data)
    } else {
        data.clone()
    }
}

/// What the relay does with a packet it has just read ([`Hold::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Relay the bytes as read: nothing to rewrite or hold.
    Pass,
    /// Replace rules rewrote the packet: relay these bytes instead (a modified packet).
    Rewritten(Bytes),
    /// Hold the packet: [`Hold::hold`] gets `rewritten` (when rules changed it) or the bytes
    /// as read.
    Hold {
        /// The bytes replace rules made, if they changed the packet.
        rewritten: Option<Bytes>,
    },
}

/// What becomes of a packet at the hold point: the verdict on a held packet (a user's, a
/// timeout's, or the fault policy's when it could not be held), and what the pump writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Write the packet as it was held (as received, or as replace rules made it).
    Forward,
    /// Write these bytes instead (any length, empty included).
    Replace(Bytes),
    /// Write nothing.
    Drop,
}

/// A packet the hold keeps until its [`Fate`] is known.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The connection.
    pub conn_id: u64,
    /// The packet's sequence number in its connection.
    pub seq: u64,
    /// Which way it was going.
    pub dir: Direction,
    /// When it was read.
    pub ts: Timestamp,
    /// The bytes as held (as received, or as replace rules made them).
    pub data: Bytes,
}

/// The future a [`Hold`] returns for one held packet.
pub type FateFuture = Pin<Box<dyn Future<Output = Fate> + Send + 'static>>;

/// Rewrites and holds packets: the packet-intercept client (`hold::ConnHold`) implements
/// this. The pump of the packet's direction waits for the fate; the other direction keeps
/// flowing. If the connection ends meanwhile the future is dropped.
pub trait Hold: Send + Sync {
    /// What to do with this packet: pass it, pass rewritten bytes (replace rules), or hold
    /// it. Called for every packet while the hold is installed, so it must be cheap and must
    /// not block.
    fn check(&self, conn_id: u64, dir: Direction, data: &Bytes) -> Check;
    /// Waits for the fate of `packet`; [`Fate::Forward`] writes `packet.data`.
    fn hold(&self, packet: Waiting) -> FateFuture;
}

/// One packet through the hold point: what was received and what is to be written.
#[derive(Debug)]
pub struct Passage {
    /// Sequence number (shared by both directions, in the order the proxy read them).
    pub seq: u64,
    /// When it was read.
    pub ts: Timestamp,
    /// Its direction.
    pub dir: Direction,
    /// The bytes as received.
    pub received: Bytes,
    /// What to write ([`Fate::Forward`] unless replace rules or a hold decided otherwise).
    pub fate: Fate,
}

impl Passage {
    /// Applies the hold's decision: [`Fate::Forward`] sends the packet as held (with the
    /// bytes replace rules made, if any); another fate replaces that.
    pub fn decide(&mut self, fate: Fate) {
        if fate != Fate::Forward {
            self.fate = fate;
        }
    }

    /// The bytes to write on (empty when dropped).
    pub fn to_send(&self) -> &[u8] {
        match &self.fate {
            Fate::Forward => &self.received,
            Fate::Replace(b) => b,
            Fate::Drop => &[],
        }
    }
}

/// The hold point of one connection, shared by both of its pumps.
pub struct Tap<'a> {
    /// The connection's counters and sequence.
    pub state: &'a ConnState,
    /// Where records, updates and history copies go.
    pub reporter: &'a Reporter,
    /// Holds packets when intercept is on; `None` passes every packet on at once.
    pub hold: Option<Arc<dyn Hold>>,
    /// Which sides have sent FIN, so that a pump waiting for a verdict learns when both
    /// peers are done.
    ends: Ends,
}

/// The reading sides that have ended (FIN), one flag per direction.
#[derive(Default)]
struct Ends {
    c2s: AtomicBool,
    s2c: AtomicBool,
    changed: Notify,
}

impl Ends {
    fn flag(&self, dir: Direction) -> &AtomicBool {
        if dir == Direction::S2c {
            &self.s2c
        } else {
            &self.c2s
        }
    }
}

impl<'a> Tap<'a> {
    /// A tap that holds nothing.
    pub fn new(state: &'a ConnState, reporter: &'a Reporter) -> Self {
        Self {
            state,
            reporter,
            hold: None,
            ends: Ends::default(),
        }
    }

    /// The reading side of `dir` sent FIN.
    pub fn reading_ended(&self, dir: Direction) {
        self.ends.flag(dir).store(true, Ordering::Release);
        self.ends.changed.notify_waiters();
    }

    /// Completes once the reading side of `dir` has sent FIN.
    pub async fn wait_reading_ended(&self, dir: Direction) {
        loop {
            let changed = self.ends.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.ends.flag(dir).load(Ordering::Acquire) {
                return;
            }
            changed.await;
        }
    }

    /// The connection ID.
    pub fn conn_id(&self) -> u64 {
        self.state.id
    }

    /// THE HOLD POINT: a packet was read in `dir`. Counts it and takes its sequence number
    /// and timestamp first; returns what to write and, when the hold keeps the packet, the
    /// wait for its verdict (see [`Passage::decide`]). Not an `async fn`: only a held packet
    /// has a future to await, so a pump's future (and every idle connection's memory)
    /// carries no hold state.
    pub fn packet(&self, dir: Direction, received: Bytes) -> (Passage, Option<FateFuture>) {
        let ts = proto::time::now();
        let seq = self.state.record(dir, received.len());
        let (fate, wait) = match &self.hold {
            None => (Fate::Forward, None),
            Some(hold) => match hold.check(self.state.id, dir, &received) {
                Check::Pass => (Fate::Forward, None),
                Check::Rewritten(b) => (Fate::Replace(b), None),
                Check::Hold { rewritten } => {
                    // The hold sees the bytes rules made; forwarding them as held sends them.
                    let held = Waiting {
                        conn_id: self.state.id,
                        seq,
                        dir,
                        ts,
                        data: rewritten.clone().unwrap_or_else(|| received.clone()),
                    };
                    let fate = rewritten.map_or(Fate::Forward, Fate::Replace);
                    (fate, Some(hold.hold(held)))
                }
            },
        };
        let passage = Passage {
            seq,
            ts,
            dir,
            received,
            fate,
        };
        (passage, wait)
    }

    /// After the write: queues the history copy of `p` (when history is on). An edited or
    /// dropped packet's record holds the bytes sent and, as `original`, those received.
    pub fn passed(&self, p: Passage) {
        if !self.reporter.history() {
            return;
        }
        let (id, seq, dir, ts) = (self.state.id, p.seq, p.dir, p.ts);
        match p.fate {
            Fate::Forward => self
                .reporter
                .packet(id, seq, dir, ts, record_copy(&p.received)),
            Fate::Replace(b) if b == p.received => {
                self.reporter
                    .packet(id, seq, dir, ts, record_copy(&p.received));
            }
            Fate::Replace(b) => self.reporter.modified_packet(
                id,
                seq,
                dir,
                ts,
                record_copy(&b),
                record_copy(&p.received),
                false,
            ),
            Fate::Drop => self.reporter.modified_packet(
                id,
                seq,
                dir,
                ts,
                Bytes::new(),
                record_copy(&p.received),
                true,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_packets_are_copied_large_ones_shared() {
        let big = Bytes::from(vec![7u8; SMALL_PACKET + 1]);
        assert_eq!(record_copy(&big).as_ptr(), big.as_ptr());
        let small = Bytes::from(vec![7u8; 10]);
        assert_ne!(record_copy(&small).as_ptr(), small.as_ptr());
        assert_eq!(record_copy(&small), small);
    }

    #[test]
    fn a_passage_sends_what_its_verdict_says() {
        let p = |fate| Passage {
            seq: 1,
            ts: Timestamp::default(),
            dir: Direction::C2s,
            received: Bytes::from_static(b"abc"),
            fate,
        };
        assert_eq!(p(Fate::Forward).to_send(), b"abc");
        assert_eq!(p(Fate::Replace(Bytes::from_static(b"xy"))).to_send(), b"xy");
        assert_eq!(p(Fate::Drop).to_send(), b"");
    }
}
