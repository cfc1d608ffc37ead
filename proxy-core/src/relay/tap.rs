//! The hold point: what happens to a packet between the read that received it and the write
//! that passes it on, the same for every direction and for plain and TLS legs alike.
//!
//! [`Tap::packet`] numbers and counts the packet (sequence number and timestamp taken at the
//! read) and asks the installed [`Hold`], if any, for a [`Verdict`]; the pump then writes
//! what the resulting [`Passage`] says and hands it to [`Tap::passed`], which queues the
//! history copy (after the write, so waking the reporter never delays the data).
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

use crate::{conn::ConnState, hold::Check, report::Reporter};

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

/// What to do with a held packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Write the packet as it was received.
    Forward,
    /// Write these bytes instead (any length, empty included).
    Replace(Bytes),
    /// Write nothing.
    Drop,
}

/// A packet waiting at the hold point.
#[derive(Debug, Clone)]
pub struct HeldPacket {
    /// The connection.
    pub conn_id: u64,
    /// The packet's sequence number in its connection.
    pub seq: u64,
    /// Which way it was going.
    pub dir: Direction,
    /// The bytes as received.
    pub data: Bytes,
}

/// The future a [`Hold`] returns for one held packet.
pub type VerdictFuture = Pin<Box<dyn Future<Output = Verdict> + Send + 'static>>;

/// Rewrites and holds packets: the packet-intercept client ([`crate::hold::ConnHold`])
/// implements this. The pump of the packet's direction waits for the verdict; the other
/// direction keeps flowing. If the connection ends meanwhile the future is dropped.
pub trait Hold: Send + Sync {
    /// What to do with this packet: pass it, pass rewritten bytes (replace rules), or hold
    /// it. Called for every packet while the hold is installed, so it must be cheap and must
    /// not block.
    fn check(&self, conn_id: u64, dir: Direction, data: &Bytes) -> Check;
    /// Waits for the verdict on `packet`; [`Verdict::Forward`] writes `packet.data`.
    fn hold(&self, packet: HeldPacket) -> VerdictFuture;
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
    /// The verdict ([`Verdict::Forward`] unless a hold decided otherwise).
    pub verdict: Verdict,
}

impl Passage {
    /// Applies the hold's verdict: [`Verdict::Forward`] sends the packet as held (with the
    /// bytes replace rules made, if any); another verdict replaces that.
    pub fn decide(&mut self, verdict: Verdict) {
        if verdict != Verdict::Forward {
            self.verdict = verdict;
        }
    }

    /// The bytes to write on (empty when dropped).
    pub fn to_send(&self) -> &[u8] {
        match &self.verdict {
            Verdict::Forward => &self.received,
            Verdict::Replace(b) => b,
            Verdict::Drop => &[],
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
    pub fn packet(&self, dir: Direction, received: Bytes) -> (Passage, Option<VerdictFuture>) {
        let ts = proto::time::now();
        let seq = self.state.record(dir, received.len());
        let (verdict, wait) = match &self.hold {
            None => (Verdict::Forward, None),
            Some(hold) => match hold.check(self.state.id, dir, &received) {
                Check::Pass => (Verdict::Forward, None),
                Check::Rewritten(b) => (Verdict::Replace(b), None),
                Check::Hold { rewritten } => {
                    // The hold sees the bytes rules made; forwarding them as held sends them.
                    let held = HeldPacket {
                        conn_id: self.state.id,
                        seq,
                        dir,
                        data: rewritten.clone().unwrap_or_else(|| received.clone()),
                    };
                    let verdict = rewritten.map_or(Verdict::Forward, Verdict::Replace);
                    (verdict, Some(hold.hold(held)))
                }
            },
        };
        let passage = Passage {
            seq,
            ts,
            dir,
            received,
            verdict,
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
        match p.verdict {
            Verdict::Forward => self
                .reporter
                .packet(id, seq, dir, ts, record_copy(&p.received)),
            Verdict::Replace(b) if b == p.received => {
                self.reporter
                    .packet(id, seq, dir, ts, record_copy(&p.received));
            }
            Verdict::Replace(b) => self.reporter.modified_packet(
                id,
                seq,
                dir,
                ts,
                record_copy(&b),
                record_copy(&p.received),
                false,
            ),
            Verdict::Drop => self.reporter.modified_packet(
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
        let p = |verdict| Passage {
            seq: 1,
            ts: Timestamp::default(),
            dir: Direction::C2s,
            received: Bytes::from_static(b"abc"),
            verdict,
        };
        assert_eq!(p(Verdict::Forward).to_send(), b"abc");
        assert_eq!(
            p(Verdict::Replace(Bytes::from_static(b"xy"))).to_send(),
            b"xy"
        );
        assert_eq!(p(Verdict::Drop).to_send(), b"");
    }
}
