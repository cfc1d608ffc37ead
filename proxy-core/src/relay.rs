//! The bidirectional relay: two pumps, one per direction, over a pair of byte streams.
//!
//! Each pump loops: read one *packet* (whatever one read returned) -> number it (sequence
//! number from the connection's shared counter, direction, timestamp taken at the read) ->
//! write it to the other side -> queue its history copy (after the write, so the reporter's
//! wake-up never delays the data). The packet is a `bytes::Bytes`: the buffer the read
//! filled, handed on without copying (history copies only small packets, see
//! [`record_copy`]). An intercept hold slots in between numbering and writing: one direction
//! then simply waits for a verdict while the other keeps flowing.
//!
//! Half-close: when a side sends FIN, its pump ends by shutting down the *write* side of the
//! other stream, and the other pump keeps flowing until its side ends too. There is no idle
//! cut-off. A reset (RST) or any other error ends both directions at once; a reset is passed
//! on as a reset (SO_LINGER 0 on the other socket).
//!
//! Buffers are allocated on readiness: [`TcpReader`] awaits `readable()` with no buffer
//! held, then reads into a block; an idle connection holds no buffer at all.
//!
//! The streams are abstracted by [`PacketReader`] and [`PacketWriter`], so a TLS layer can
//! provide its own (decrypted) reader and writer and reuse the pumps unchanged.

use std::{future::Future, io, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use proto::common::{CloseKind, ClosedBy, Direction};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

use crate::{conn::ConnState, conn::End, report::Reporter};

/// Smallest read block.
pub const MIN_READ: usize = 4 * 1024;
/// Largest read block.
pub const MAX_READ: usize = 256 * 1024;
/// History packets up to this size are copied out of the read block, so that a small packet
/// waiting in the report queue does not pin a whole block.
pub const SMALL_PACKET: usize = 2 * 1024;

/// The reading side of one stream, one packet per read.
pub trait PacketReader: Send {
    /// The next packet; `None` at end of stream (FIN).
    fn read_packet(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// The writing side of one stream.
pub trait PacketWriter: Send {
    /// Writes a whole packet.
    fn write_packet(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends FIN (half-close): no more data in this direction.
    fn shutdown_write(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes the coming close abortive (RST), to pass on a reset.
    fn abort(&mut self);
}

/// Reads a TCP stream, allocating a block only once data is ready.
pub struct TcpReader {
    half: OwnedReadHalf,
    buf: BytesMut,
    size: usize,
    pending: Option<Bytes>,
}

impl TcpReader {
    /// A reader over `half`; `pending` (bytes already received, e.g. after the SOCKS
    /// request) comes out first.
    pub fn new(half: OwnedReadHalf, pending: Option<Bytes>) -> Self {
        Self {
            half,
            buf: BytesMut::new(),
            size: MIN_READ,
            pending: pending.filter(|p| !p.is_empty()),
        }
    }

    /// The read half back, and any pending bytes not yet returned.
    pub fn into_inner(self) -> (OwnedReadHalf, Option<Bytes>) {
        (self.half, self.pending)
    }
}

impl PacketReader for TcpReader {
    async fn read_packet(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(p) = self.pending.take() {
            return Ok(Some(p));
        }
        loop {
            if self.buf.capacity() == 0 {
                // Idle: no buffer held while waiting.
                self.half.readable().await?;
                self.buf = BytesMut::with_capacity(self.size);
            }
            let spare = self.buf.capacity() - self.buf.len();
            // tokio's own read path (polled once, never left waiting with the block held)
            // marks the socket drained after a short read, which saves the read that would
            // only say WouldBlock: one system call less per packet.
            match self.half.read_buf(&mut self.buf).now_or_never() {
                None => {
                    // Readiness was stale: wait again without the block.
                    self.buf = BytesMut::new();
                }
                Some(Ok(0)) => return Ok(None),
                Some(Ok(n)) => {
                    if n == spare && self.size < MAX_READ {
                        self.size *= 2;
                    }
                    let packet = self.buf.split_to(n).freeze();
                    if n < spare || self.buf.capacity() < MIN_READ / 2 {
                        // Drained (or the block is used up): packets keep their bytes,
                        // the next wait holds none.
                        self.buf = BytesMut::new();
                    }
                    return Ok(Some(packet));
                }
                Some(Err(e)) => return Err(e),
            }
        }
    }
}

/// Writes a TCP stream.
pub struct TcpWriter {
    /// `None` after [`PacketWriter::abort`].
    half: Option<OwnedWriteHalf>,
}

impl TcpWriter {
    /// A writer over `half`.
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self { half: Some(half) }
    }

    /// The write half back; `None` after [`PacketWriter::abort`].
    pub fn into_inner(self) -> Option<OwnedWriteHalf> {
        self.half
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection aborted by the proxy",
    )
}

impl PacketWriter for TcpWriter {
    async fn write_packet(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.half {
            Some(h) => h.write_all(data).await,
            None => Err(aborted()),
        }
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        match &mut self.half {
            Some(h) => h.shutdown().await,
            None => Err(aborted()),
        }
    }

    fn abort(&mut self) {
        if let Some(h) = self.half.take() {
            // SO_LINGER 0 makes close() send RST. Tokio deprecates set_linger because a
            // non-zero linger blocks on drop; zero never blocks.
            #[allow(deprecated)]
            let _ = h.as_ref().set_linger(Some(Duration::ZERO));
            // Dropping a write half would send FIN first; forget it so the close (when the
            // read half goes) is the reset alone.
            h.forget();
        }
    }
}

/// How one pump ended.
#[derive(Debug)]
pub(crate) enum PumpEnd {
    /// The reading side sent FIN; it was passed on.
    Eof,
    /// Reading failed.
    Read(io::Error),
    /// Writing to the other side failed.
    Write(io::Error),
}

/// The bytes to record for a packet: small packets are copied (see [`SMALL_PACKET`]).
pub fn record_copy(data: &Bytes) -> Bytes {
    if data.len() <= SMALL_PACKET {
        Bytes::copy_from_slice(data)
    } else {
        data.clone()
    }
}

/// What the pumps need to know about their connection.
pub struct Ctx<'a> {
    /// Shared counters and sequence.
    pub state: &'a ConnState,
    /// Where packets go.
    pub reporter: &'a Reporter,
}

async fn pump<R: PacketReader, W: PacketWriter>(
    r: &mut R,
    w: &mut W,
    dir: Direction,
    ctx: &Ctx<'_>,
) -> PumpEnd {
    loop {
        let data = match r.read_packet().await {
            Ok(Some(d)) => d,
            Ok(None) => {
                // Pass the FIN on; a failure here means the other side is gone already,
                // which its own pump will report.
                let _ = w.shutdown_write().await;
                return PumpEnd::Eof;
            }
            Err(e) => return PumpEnd::Read(e),
        };
        // Future hook: an intercept hold waits here for a verdict (forward, edit, drop).
        if let Err(e) = forward(w, data, dir, ctx).await {
            return PumpEnd::Write(e);
        }
    }
}

/// Counts one packet, writes it on and queues its history copy. The timestamp and sequence
/// number are taken at the read; the copy is queued only after the write, so waking the
/// reporter never delays the data.
pub(crate) async fn forward<W: PacketWriter>(
    w: &mut W,
    data: Bytes,
    dir: Direction,
    ctx: &Ctx<'_>,
) -> io::Result<()> {
    let ts = proto::time::now();
    let seq = ctx.state.record(dir, data.len());
    let written = w.write_packet(&data).await;
    if ctx.reporter.history() {
        ctx.reporter
            .packet(ctx.state.id, seq, dir, ts, record_copy(&data));
    }
    written
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Classifies a pump's end: (end, fatal). `from`/`to` are the reading and writing sides.
pub(crate) fn classify(end: PumpEnd, from: ClosedBy, to: ClosedBy) -> (End, bool) {
    let name = |s: ClosedBy| {
        if s == ClosedBy::Client {
            "client"
        } else {
            "server"
        }
    };
    match end {
        PumpEnd::Eof => (
            End::new(from, CloseKind::Fin, format!("{} sent FIN", name(from))),
            false,
        ),
        PumpEnd::Read(e) if is_reset(&e) => (
            End::new(
                from,
                CloseKind::Rst,
                format!("{} reset the connection (RST)", name(from)),
            ),
            true,
        ),
        PumpEnd::Read(e) => (
            End::new(
                from,
                CloseKind::Error,
                format!("reading from {}: {e}", name(from)),
            ),
            true,
        ),
        PumpEnd::Write(e) if is_reset(&e) => (
            End::new(
                to,
                CloseKind::Rst,
                format!("{} reset the connection (RST)", name(to)),
            ),
            true,
        ),
        PumpEnd::Write(e) => (
            End::new(
                to,
                CloseKind::Error,
                format!("writing to {}: {e}", name(to)),
            ),
            true,
        ),
    }
}

/// Relays between client and server until both directions ended, one side reset, or
/// `shutdown` completes. Returns how the connection ended (the first side's end).
pub async fn relay<CR, CW, SR, SW>(
    client: (&mut CR, &mut CW),
    server: (&mut SR, &mut SW),
    ctx: &Ctx<'_>,
    shutdown: impl Future<Output = ()>,
) -> End
where
    CR: PacketReader,
    CW: PacketWriter,
    SR: PacketReader,
    SW: PacketWriter,
{
    let (cr, cw) = client;
    let (sr, sw) = server;
    let (first, fatal) = {
        let c2s = pump(cr, sw, Direction::C2s, ctx);
        let s2c = pump(sr, cw, Direction::S2c, ctx);
        tokio::pin!(c2s, s2c, shutdown);
        let (mut c2s_done, mut s2c_done) = (false, false);
        let mut first: Option<End> = None;
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
                    (End::proxy(CloseKind::Fin, "proxy shut down"), true)
                }
            };
            if first.is_none() {
                first = Some(end);
            }
            if is_fatal {
                fatal = is_fatal;
                break;
            }
        }
        (first, fatal)
    };
    let first = first.unwrap_or_else(|| End::proxy(CloseKind::Error, "relay ended"));
    if fatal && first.kind == CloseKind::Rst {
        // Pass a reset on as a reset: the side that did not reset gets one too.
        match first.closed_by {
            ClosedBy::Client => sw.abort(),
            ClosedBy::Server => cw.abort(),
            _ => {}
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_names_the_right_side() {
        let (e, fatal) = classify(PumpEnd::Eof, ClosedBy::Client, ClosedBy::Server);
        assert_eq!(
            e,
            End::new(ClosedBy::Client, CloseKind::Fin, "client sent FIN")
        );
        assert!(!fatal);
        let (e, fatal) = classify(
            PumpEnd::Read(io::Error::from(io::ErrorKind::ConnectionReset)),
            ClosedBy::Server,
            ClosedBy::Client,
        );
        assert_eq!(
            e,
            End::new(
                ClosedBy::Server,
                CloseKind::Rst,
                "server reset the connection (RST)"
            )
        );
        assert!(fatal);
        let (e, _) = classify(
            PumpEnd::Write(io::Error::from(io::ErrorKind::BrokenPipe)),
            ClosedBy::Client,
            ClosedBy::Server,
        );
        assert_eq!(e.closed_by, ClosedBy::Server);
        assert_eq!(e.kind, CloseKind::Rst);
    }

    #[test]
    fn small_packets_are_copied_large_ones_shared() {
        let big = Bytes::from(vec![7u8; SMALL_PACKET + 1]);
        assert_eq!(record_copy(&big).as_ptr(), big.as_ptr());
        let small = Bytes::from(vec![7u8; 10]);
        assert_ne!(record_copy(&small).as_ptr(), small.as_ptr());
        assert_eq!(record_copy(&small), small);
    }
}
