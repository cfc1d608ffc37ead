//! The one relay: two pumps, one per direction, over two [`Leg`]s, for plain TCP and for
//! the decrypted TLS legs alike.
//!
//! Each [`pump`] loops: read one *packet* (whatever one read returned) -> pass it through the
//! [`Tap`], the hold point (numbering, counting, an intercept hold) -> write what the tap
//! says -> queue its history copy. The packet is a `bytes::Bytes`: the buffer the read
//! filled, handed on without copying (history copies only small packets, see
//! [`tap::record_copy`]).
//!
//! Half-close: when a side sends FIN, its pump ends by shutting down the *write* side of the
//! other stream, and the other pump keeps flowing until its side ends too. There is no idle
//! cut-off. A reset (RST) or any other error ends both directions at once; a reset is passed
//! on as a reset ([`pass_reset`]).
//!
//! While a packet waits for a verdict its pump reads ahead one packet, so that it notices
//! its side ending (see [`held`]): a held packet never keeps a connection that both peers
//! have closed open. A held packet the connection ends under (its peers closed it, the other
//! direction failed, or the proxy shut down) is recorded in the history as dropped, never
//! lost from it: its record's close says why.
//!
//! A pump can also stop early at a packet boundary ([`Boundary`]): the TLS splice uses it
//! to hand a ClientHello that shows up mid-stream to the TLS layer with both directions
//! paused. The plain relay sets no boundary.

pub mod io;
pub mod tap;

use std::{
    future::Future,
    io as stdio,
    sync::atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use proto::common::{CloseKind, ClosedBy, Direction};
use tokio::sync::Notify;

pub use self::{
    io::{Leg, MAX_READ, MIN_READ, PacketReader, PacketWriter, StreamWriter, TcpReader},
    tap::{Check, Fate, FateFuture, Hold, Passage, Tap, Waiting},
};
use crate::conn::ConnEnd;

/// How one pump ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// The reading side sent FIN; it was passed on.
    Eof,
    /// Reading failed.
    Read(stdio::Error),
    /// Writing to the other side failed.
    Write(stdio::Error),
    /// Stopped at a [`Boundary`], with the packet it stopped before (unwritten, not yet
    /// through the tap), if any.
    Stopped(Option<Bytes>),
}

/// A check of a packet's bytes, e.g. "could this start a TLS ClientHello?".
pub type PacketCheck = fn(&[u8]) -> bool;

/// Where a pump may stop early, at a packet boundary. The default stops nowhere.
#[derive(Clone, Copy, Default)]
pub struct Boundary<'a> {
    /// Stop before a packet `check` accepts while `armed` is set (the splice checks
    /// client reads for a ClientHello while the server side is open).
    pub before: Option<(PacketCheck, &'a AtomicBool)>,
    /// Stop between packets once this is notified (a packet is never half written).
    pub pause: Option<&'a Notify>,
}

/// The boundary of a pump that stops nowhere (the plain relay).
pub const NOWHERE: Boundary<'static> = Boundary {
    before: None,
    pause: None,
};

impl Boundary<'_> {
    fn stops_before(&self, data: &[u8]) -> bool {
        self.before
            .is_some_and(|(check, armed)| armed.load(Ordering::Acquire) && check(data))
    }
}

/// What a pump starts with besides its reader (the splice resumes a direction with them).
/// Boxed, and only when there is something: most pumps start with nothing, and an async
/// function's arguments stay in its future for its whole life.
#[derive(Debug, Default)]
pub struct Start(Option<Box<Resume>>);

/// How a pump resumes a direction.
#[derive(Debug, Default)]
pub struct Resume {
    /// Bytes already received, relayed first.
    pub pending: Option<Bytes>,
    /// `pending` was already checked against the boundary: relay it as it is.
    pub checked: bool,
    /// The reading side already ended (after `pending`).
    pub ended: Option<PumpEnd>,
}

impl Start {
    /// Starts with `pending` (empty counts as none), unchecked.
    pub fn with(pending: Bytes) -> Self {
        match pending.is_empty() {
            true => Self(None),
            false => Self::resume(Resume {
                pending: Some(pending),
                ..Resume::default()
            }),
        }
    }

    /// Resumes as `r` says.
    pub fn resume(r: Resume) -> Self {
        Self(Some(Box::new(r)))
    }

    /// Takes the bytes to relay first, if any.
    pub fn take_pending(&mut self) -> Option<Bytes> {
        self.0.as_mut().and_then(|r| r.pending.take())
    }
}

/// What a pump read while its packet waited for a verdict, to go on with after it.
enum Ahead {
    /// The next packet.
    Data(Bytes),
    /// How the reading side ended.
    End(PumpEnd),
}

/// Relays one direction until its reading side ends, a write fails, or a boundary stops it.
///
/// Every connection's task holds two of these futures for its whole life, so they are kept
/// small: arguments by reference or boxed, and the hold's wait boxed (see [`held`]).
pub async fn pump<R: PacketReader, W: PacketWriter>(
    r: &mut R,
    w: &mut W,
    dir: Direction,
    tap: &Tap<'_>,
    at: &Boundary<'_>,
    start: Start,
) -> PumpEnd {
    // A packet already received, relayed first (checked against the boundary unless the
    // splice did that already). Destructured at once: a `Resume` local would stay in the
    // future.
    let Resume {
        pending: mut next,
        checked,
        ended,
    } = start.0.map(|b| *b).unwrap_or_default();
    let mut unchecked = !checked;
    // The reading side may have ended already: nothing more is read, and while `next`
    // waits for a verdict that end counts as seen.
    let mut ahead = ended.map(Ahead::End);
    loop {
        // `if let`, not `match`: its scrutinee is gone before the `else` awaits (edition
        // 2024), a `match` scrutinee would be kept across the read.
        let data = if let Some(d) = next.take() {
            d
        } else {
            unchecked = true;
            let read = if let Some(a) = ahead.take() {
                match a {
                    Ahead::Data(d) => Ok(Some(d)),
                    Ahead::End(PumpEnd::Eof) => Ok(None),
                    Ahead::End(end) => return end,
                }
            } else if let Some(pause) = at.pause {
                tokio::select! {
                    biased;
                    () = pause.notified() => return PumpEnd::Stopped(None),
                    r = r.read_packet() => r,
                }
            } else {
                r.read_packet().await
            };
            match read {
                Ok(Some(d)) => d,
                Ok(None) => {
                    tap.reading_ended(dir);
                    // Pass the FIN on; a failure here means the other side is gone
                    // already, which its own pump will report.
                    let _ = w.shutdown_write().await;
                    return PumpEnd::Eof;
                }
                Err(e) => return PumpEnd::Read(e),
            }
        };
        if unchecked && at.stops_before(&data) {
            return PumpEnd::Stopped(Some(data));
        }
        // Through the hold point and on to `w`; the history copy is queued after the write,
        // so waking the reporter never delays the data.
        let (mut passage, wait) = tap.packet(dir, data);
        if let Some(wait) = wait {
            // Boxed: the wait's state would otherwise be part of every pump's future.
            match Box::pin(held(r, w, dir, tap, wait, &mut ahead, passage)).await {
                Ok(decided) => passage = decided,
                Err(end) => return end,
            }
        }
        let written = w.write_packet(passage.to_send()).await;
        tap.passed(passage);
        if let Err(e) = written {
            return PumpEnd::Write(e);
        }
    }
}

/// Waits for the verdict on a held packet. Meanwhile the pump reads ahead one packet (kept
/// in `ahead`, relayed after this one), so that it notices its side ending: a reset ends
/// the connection at once, and a FIN when the other side has sent FIN too (both peers are
/// done, so the held packet can no longer be relayed; intercept-svc then refuses its
/// verdict, naming who closed the connection). A FIN while the other side is still open is
/// passed on after the packet, as usual.
///
/// Returns the passage with its verdict applied. When the wait ends without one (an `Err`
/// here, or this future dropped because the connection ended or the proxy shut down), the
/// packet is recorded as dropped ([`Unsent`]).
async fn held<R: PacketReader, W: PacketWriter>(
    r: &mut R,
    w: &mut W,
    dir: Direction,
    tap: &Tap<'_>,
    mut wait: FateFuture,
    ahead: &mut Option<Ahead>,
    passage: Passage,
) -> Result<Passage, PumpEnd> {
    let other = if dir == Direction::C2s {
        Direction::S2c
    } else {
        Direction::C2s
    };
    let mut unsent = Unsent {
        tap,
        passage: Some(passage),
    };
    loop {
        let at_end = matches!(ahead, Some(Ahead::End(PumpEnd::Eof)));
        tokio::select! {
            biased;
            v = wait.as_mut() => {
                let mut p = unsent.take();
                p.decide(v);
                return Ok(p);
            }
            read = r.read_packet(), if ahead.is_none() => match read {
                Ok(Some(d)) => *ahead = Some(Ahead::Data(d)),
                Ok(None) => {
                    tap.reading_ended(dir);
                    *ahead = Some(Ahead::End(PumpEnd::Eof));
                }
                Err(e) => return Err(PumpEnd::Read(e)),
            },
            () = tap.wait_reading_ended(other), if at_end => {
                let _ = w.shutdown_write().await;
                return Err(PumpEnd::Eof);
            }
        }
    }
}

/// A held packet that has not been written: recorded in the history as dropped when it is
/// let go without a verdict (see [`held`]).
struct Unsent<'t, 'a> {
    tap: &'t Tap<'a>,
    passage: Option<Passage>,
}

impl Unsent<'_, '_> {
    /// The passage, to be written: no longer recorded as dropped.
    #[expect(
        clippy::expect_used,
        reason = "present from construction; `held` takes it once, just before returning"
    )]
    fn take(&mut self) -> Passage {
        self.passage
            .take()
            .expect("an unsent passage is taken at most once")
    }
}

impl Drop for Unsent<'_, '_> {
    fn drop(&mut self) {
        if let Some(mut p) = self.passage.take() {
            tracing::debug!(
                conn = self.tap.conn_id(),
                seq = p.seq,
                "the connection ended while a packet was held: recorded as dropped"
            );
            p.fate = Fate::Drop;
            self.tap.passed(p);
        }
    }
}

fn is_reset(e: &stdio::Error) -> bool {
    matches!(
        e.kind(),
        stdio::ErrorKind::ConnectionReset
            | stdio::ErrorKind::BrokenPipe
            | stdio::ErrorKind::ConnectionAborted
    )
}

fn side(s: ClosedBy) -> &'static str {
    if s == ClosedBy::Client {
        "client"
    } else {
        "server"
    }
}

/// Classifies a pump's end: (end, fatal). `from`/`to` are the reading and writing sides.
pub fn classify(end: PumpEnd, from: ClosedBy, to: ClosedBy) -> (ConnEnd, bool) {
    let reset = |s| {
        ConnEnd::new(
            s,
            CloseKind::Rst,
            format!("{} reset the connection (RST)", side(s)),
        )
    };
    match end {
        PumpEnd::Eof => (
            ConnEnd::new(from, CloseKind::Fin, format!("{} sent FIN", side(from))),
            false,
        ),
        PumpEnd::Read(e) if is_reset(&e) => (reset(from), true),
        PumpEnd::Read(e) => (
            ConnEnd::new(
                from,
                CloseKind::Error,
                format!("reading from {}: {e}", side(from)),
            ),
            true,
        ),
        PumpEnd::Write(e) if is_reset(&e) => (reset(to), true),
        PumpEnd::Write(e) => (
            ConnEnd::new(
                to,
                CloseKind::Error,
                format!("writing to {}: {e}", side(to)),
            ),
            true,
        ),
        PumpEnd::Stopped(_) => (
            ConnEnd::proxy(CloseKind::Error, "relay stopped early"),
            true,
        ),
    }
}

/// Passes a reset on as a reset: when the connection ended abruptly by one side's RST, the
/// side that did not reset gets one too. Call once the pumps are gone.
pub fn pass_reset(first: &ConnEnd, fatal: bool, client: &impl Leg, server: &impl Leg) {
    if fatal && first.kind == CloseKind::Rst {
        match first.closed_by {
            ClosedBy::Client => server.reset(),
            ClosedBy::Server => client.reset(),
            _ => {}
        }
    }
}

/// Relays between `client` and `server` until both directions ended, one side reset, or
/// `shutdown` completes. `pending` is client data already received. Returns how the
/// connection ended (the first side's end).
pub async fn relay<C: Leg, S: Leg>(
    client: &mut C,
    server: &mut S,
    pending: Bytes,
    tap: &Tap<'_>,
    shutdown: impl Future<Output = ()>,
) -> ConnEnd {
    let (first, fatal) = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let c2s = pump(
            &mut cr,
            &mut sw,
            Direction::C2s,
            tap,
            &NOWHERE,
            Start::with(pending),
        );
        let s2c = pump(
            &mut sr,
            &mut cw,
            Direction::S2c,
            tap,
            &NOWHERE,
            Start::default(),
        );
        tokio::pin!(c2s, s2c, shutdown);
        let (mut c2s_done, mut s2c_done) = (false, false);
        let mut first: Option<ConnEnd> = None;
        let mut fatal = false;
        while !(c2s_done && s2c_done) {
            let (end, is_fatal) = tokio::select! {
                e = &mut c2s, if !c2s_done => {
                    c2s_done = true;
                    classify(e, ClosedBy::Client, ClosedBy::Server)
                }
                e = &mut s2c, if !s2c_done => {
                    s2c_done = true;
                    classify(e, ClosedBy::Server, ClosedBy::Client)
                }
                () = &mut shutdown => {
                    (ConnEnd::proxy(CloseKind::Fin, "proxy shut down"), true)
                }
            };
            first.get_or_insert(end);
            if is_fatal {
                fatal = true;
                break;
            }
        }
        (first, fatal)
    };
    let first = first.unwrap_or_else(|| ConnEnd::proxy(CloseKind::Error, "relay ended"));
    pass_reset(&first, fatal, client, server);
    first
}

#[cfg(test)]
pub(crate) mod tests;
