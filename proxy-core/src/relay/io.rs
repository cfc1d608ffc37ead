//! The streams the pumps read and write: [`PacketReader`] and [`PacketWriter`], and a
//! [`Leg`] (one side of a connection) that lends out one of each.
//!
//! A TCP leg is the [`TcpStream`] itself, split by reference for as long as the pumps run
//! and whole again afterwards (the TLS splice hands it to the TLS layer then). Its
//! [`TcpReader`] awaits readiness with no buffer held, then reads into a block: an idle
//! connection holds no buffer at all. The TLS legs are in [`crate::tls::splice`].

use std::{future::Future, io, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Smallest read block.
pub const MIN_READ: usize = 4 * 1024;
/// Largest read block.
pub const MAX_READ: usize = 256 * 1024;

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
}

/// One side of a relayed connection (client or server), plain or TLS.
pub trait Leg: Send {
    /// Its reading side while split.
    type Reader<'a>: PacketReader
    where
        Self: 'a;
    /// Its writing side while split.
    type Writer<'a>: PacketWriter
    where
        Self: 'a;
    /// Splits the leg for the two pumps; it is whole again once both are dropped.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
    /// Makes the coming close abortive (RST), to pass a reset on.
    fn reset(&self);
}

/// Makes `tcp`'s close send RST instead of FIN.
pub fn reset_tcp(tcp: &TcpStream) {
    // SO_LINGER 0 makes close() send RST. Tokio deprecates set_linger because a non-zero
    // linger blocks on drop; zero never blocks.
    #[allow(deprecated)]
    let _ = tcp.set_linger(Some(Duration::ZERO));
}

impl Leg for TcpStream {
    type Reader<'a> = TcpReader<'a>;
    type Writer<'a> = StreamWriter<WriteHalf<'a>>;

    fn split(&mut self) -> (TcpReader<'_>, StreamWriter<WriteHalf<'_>>) {
        let (r, w) = TcpStream::split(self);
        (TcpReader::new(r), StreamWriter::new(w))
    }

    fn reset(&self) {
        reset_tcp(self);
    }
}

/// Reads a TCP stream, allocating a block only once data is ready.
pub struct TcpReader<'a> {
    half: ReadHalf<'a>,
    buf: BytesMut,
    size: usize,
}

impl<'a> TcpReader<'a> {
    /// A reader over `half`.
    pub fn new(half: ReadHalf<'a>) -> Self {
        Self {
            half,
            buf: BytesMut::new(),
            size: MIN_READ,
        }
    }
}

impl PacketReader for TcpReader<'_> {
    async fn read_packet(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.buf.capacity() == 0 {
                // Idle: no buffer held while waiting. The stream's own read-readiness slot
                // (this pump is the socket's only reader), not `readable()`, whose waiter
                // would sit in every idle connection's future.
                let tcp: &TcpStream = self.half.as_ref();
                std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
                self.buf = BytesMut::with_capacity(self.size);
            }
            let spare = self.buf.capacity() - self.buf.len();
            // tokio's own read path (polled once, never left waiting with the block held)
            // marks the socket drained after a short read, which saves the read that would
            // only say WouldBlock: one system call less per packet.
            match tokio::io::AsyncReadExt::read_buf(&mut self.half, &mut self.buf).now_or_never() {
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

/// Writes any byte stream: a TCP write half, or the plaintext side of a TLS stream (where
/// the flush after each packet sends its TLS records at once; on TCP it does nothing).
pub struct StreamWriter<W> {
    io: W,
}

impl<W> StreamWriter<W> {
    /// A writer over `io`.
    pub fn new(io: W) -> Self {
        Self { io }
    }
}

impl<W: AsyncWrite + Unpin + Send> PacketWriter for StreamWriter<W> {
    async fn write_packet(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        // On TLS: close_notify, then FIN.
        self.io.shutdown().await
    }
}
