//! One connection as synthetic frames (sans-I/O): a TCP stream with handshake, segments,
//! acknowledgements and its real end, or a UDP association's datagrams. Frames go to a
//! [`FrameSink`] (a capture file writer) as they are made, so nothing is buffered.

use std::net::SocketAddr;

use crate::wire::{self, CLIENT_MAC, SERVER_MAC, Station, TcpHeader, flags};

/// The receiver acknowledges after this many segments of one packet (and after its last):
/// 16 full segments stay well inside the unscaled 65,535-byte window.
const ACK_EVERY: usize = 16;
/// The advertised receive window (no window scaling).
const WINDOW: u16 = 65535;
/// The largest UDP payload written as one datagram (fits IPv4 and IPv6 length fields).
pub const MAX_DATAGRAM: usize = 65_467;

/// Where the frames of a session go.
pub trait FrameSink {
    /// One frame at `ts_nanos` (since the Unix epoch), with a comment for pcapng.
    fn frame(&mut self, ts_nanos: u64, frame: &[u8], comment: Option<&str>);
}

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// How the stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Still open: no FIN or RST.
    Open,
    /// `Side` sends FIN first, the other answers with FIN.
    Fin(Side),
    /// `Side` resets.
    Rst(Side),
}

/// One end of a stream: its station, next sequence number and IPv4 identification.
struct TcpPeer {
    station: Station,
    next_seq: u32,
    ip_id: u16,
}

/// A TCP stream being written: the state needed to number the next segment.
pub struct TcpSession {
    client: TcpPeer,
    server: TcpPeer,
    mss: usize,
    last_ts: u64,
    /// The comment for the first frame, taken when it is written.
    comment: Option<String>,
    scratch: Vec<u8>,
}

impl TcpSession {
    /// A stream between `client` and `server` (one family) with initial sequence numbers
    /// `isn` (client, server); `comment` goes on its first frame.
    pub fn new(
        client: SocketAddr,
        server: SocketAddr,
        isn: (u32, u32),
        comment: Option<String>,
    ) -> Self {
        let end = |mac, addr, seq| TcpPeer {
            station: Station { mac, addr },
            next_seq: seq,
            ip_id: 1,
        };
        Self {
            client: end(CLIENT_MAC, client, isn.0),
            server: end(SERVER_MAC, server, isn.1),
            mss: wire::mss(client.ip()),
            last_ts: 0,
            comment,
            scratch: Vec::with_capacity(wire::MTU + wire::ETHERNET_LEN),
        }
    }

    /// SYN, SYN-ACK, ACK at `ts`.
    pub fn handshake(&mut self, sink: &mut impl FrameSink, ts: u64) {
        let mss = u16::try_from(self.mss).ok();
        self.send(sink, ts, Side::Client, flags::SYN, mss, &[]);
        self.send(sink, ts, Side::Server, flags::SYN | flags::ACK, mss, &[]);
        self.send(sink, ts, Side::Client, flags::ACK, None, &[]);
    }

    /// `data` from `from` at `ts`: MSS-sized segments, acknowledged by the other side.
    pub fn data(&mut self, sink: &mut impl FrameSink, ts: u64, from: Side, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let count = data.len().div_ceil(self.mss);
        for (i, chunk) in data.chunks(self.mss).enumerate() {
            let last = i + 1 == count;
            let f = if last {
                flags::ACK | flags::PSH
            } else {
                flags::ACK
            };
            self.send(sink, ts, from, f, None, chunk);
            if last || (i + 1) % ACK_EVERY == 0 {
                self.send(sink, ts, from.other(), flags::ACK, None, &[]);
            }
        }
    }

    /// The stream's end at `ts`, as `ending` says.
    pub fn end(&mut self, sink: &mut impl FrameSink, ts: u64, ending: Ending) {
        match ending {
            Ending::Open => {}
            Ending::Fin(first) => {
                self.send(sink, ts, first, flags::FIN | flags::ACK, None, &[]);
                self.send(sink, ts, first.other(), flags::FIN | flags::ACK, None, &[]);
                self.send(sink, ts, first, flags::ACK, None, &[]);
            }
            Ending::Rst(side) => self.send(sink, ts, side, flags::RST | flags::ACK, None, &[]),
        }
    }

    /// Writes one segment and advances the sender's sequence number.
    fn send(
        &mut self,
        sink: &mut impl FrameSink,
        ts: u64,
        from: Side,
        f: u8,
        mss: Option<u16>,
        payload: &[u8],
    ) {
        let (src, dst) = match from {
            Side::Client => (&mut self.client, &self.server),
            Side::Server => (&mut self.server, &self.client),
        };
        let header = TcpHeader {
            seq: src.next_seq,
            // A SYN acknowledges nothing; every other segment acknowledges all it has seen.
            ack: if f & flags::ACK != 0 { dst.next_seq } else { 0 },
            flags: f,
            window: WINDOW,
            mss,
        };
        wire::tcp_frame(
            &mut self.scratch,
            &src.station,
            &dst.station,
            src.ip_id,
            &header,
            payload,
        );
        let consumed = payload.len() as u32 + u32::from(f & (flags::SYN | flags::FIN) != 0);
        src.next_seq = src.next_seq.wrapping_add(consumed);
        src.ip_id = src.ip_id.wrapping_add(1);
        // Frames of one stream never go back in time, so data never precedes the handshake.
        self.last_ts = self.last_ts.max(ts);
        sink.frame(self.last_ts, &self.scratch, self.comment.take().as_deref());
    }
}

/// A UDP association being written: one datagram per packet.
pub struct UdpSession {
    client: Station,
    server: Station,
    ip_id: u16,
    last_ts: u64,
    comment: Option<String>,
    scratch: Vec<u8>,
}

impl UdpSession {
    /// An association between `client` and `server` (one family).
    pub fn new(client: SocketAddr, server: SocketAddr, comment: Option<String>) -> Self {
        Self {
            client: Station {
                mac: CLIENT_MAC,
                addr: client,
            },
            server: Station {
                mac: SERVER_MAC,
                addr: server,
            },
            ip_id: 1,
            last_ts: 0,
            comment,
            scratch: Vec::new(),
        }
    }

    /// `data` from `from` at `ts`, as one datagram (several if it exceeds [`MAX_DATAGRAM`],
    /// which a SOCKS5 UDP relay never carries).
    pub fn data(&mut self, sink: &mut impl FrameSink, ts: u64, from: Side, data: &[u8]) {
        let (src, dst) = match from {
            Side::Client => (&self.client, &self.server),
            Side::Server => (&self.server, &self.client),
        };
        self.last_ts = self.last_ts.max(ts);
        for chunk in data.chunks(MAX_DATAGRAM) {
            wire::udp_frame(&mut self.scratch, src, dst, self.ip_id, chunk);
            self.ip_id = self.ip_id.wrapping_add(1);
            sink.frame(self.last_ts, &self.scratch, self.comment.take().as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fuzzing::pcap_writer::{self as fuzzing, Frames, TcpSegment};

    /// A decoded frame, its lengths and checksums checked: (from client?, seq, ack, flags,
    /// payload).
    fn decode(f: &[u8]) -> (bool, u32, u32, u8, Vec<u8>) {
        let s = TcpSegment::of(&fuzzing::decode(f));
        (s.from_client, s.seq, s.ack, s.flags, s.payload)
    }

    /// Reassembles both directions as a receiver would (see [`fuzzing::reassemble`]), after
    /// checking that timestamps never go back.
    fn reassemble(frames: &Frames) -> (Vec<u8>, Vec<u8>) {
        assert!(
            frames.0.windows(2).all(|f| f[0].0 <= f[1].0),
            "timestamps go back"
        );
        let segments: Vec<TcpSegment> = frames
            .0
            .iter()
            .map(|f| TcpSegment::of(&fuzzing::decode(&f.1)))
            .collect();
        fuzzing::reassemble(&segments)
    }

    fn session(isn: u32) -> TcpSession {
        TcpSession::new(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            (isn, isn.wrapping_add(7)),
            Some("conn 1".into()),
        )
    }

    #[test]
    fn handshake_data_and_fin_are_consistent() {
        let mut s = session(1000);
        let mut out = Frames::default();
        s.handshake(&mut out, 10);
        s.data(&mut out, 20, Side::Client, b"GET / HTTP/1.1\r\n\r\n");
        s.data(&mut out, 30, Side::Server, b"HTTP/1.1 200 OK\r\n\r\n");
        s.end(&mut out, 40, Ending::Fin(Side::Server));
        assert_eq!(out.0[0].2.as_deref(), Some("conn 1"));
        assert!(out.0[1..].iter().all(|f| f.2.is_none()));
        let flags_seq: Vec<u8> = out.0.iter().map(|f| decode(&f.1).3).collect();
        use flags::*;
        assert_eq!(
            flags_seq,
            [
                SYN,
                SYN | ACK,
                ACK,
                PSH | ACK,
                ACK,
                PSH | ACK,
                ACK,
                FIN | ACK,
                FIN | ACK,
                ACK
            ]
        );
        // The server closed first.
        assert!(!decode(&out.0[7].1).0);
        let (c, srv) = reassemble(&out);
        assert_eq!(c, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(srv, b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[test]
    fn rst_comes_from_the_resetting_side_only() {
        let mut s = session(5);
        let mut out = Frames::default();
        s.handshake(&mut out, 1);
        s.end(&mut out, 2, Ending::Rst(Side::Client));
        assert_eq!(out.0.len(), 4);
        let (from_client, _, _, fl, _) = decode(&out.0[3].1);
        assert!(from_client);
        assert_eq!(fl, flags::RST | flags::ACK);
    }

    #[test]
    fn sequence_numbers_wrap_modulo_2_32() {
        let mut s = session(u32::MAX - 100);
        let mut out = Frames::default();
        s.handshake(&mut out, 1);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        s.data(&mut out, 2, Side::Client, &data);
        s.end(&mut out, 3, Ending::Fin(Side::Client));
        let seqs: Vec<u32> = out.0.iter().map(|f| decode(&f.1).1).collect();
        assert!(seqs.iter().any(|&q| q < 10_000), "no wrap: {seqs:?}");
        assert_eq!(reassemble(&out).0, data);
    }

    #[test]
    fn a_packet_over_64_kib_is_split_into_mtu_segments() {
        let mut s = session(1);
        let mut out = Frames::default();
        s.handshake(&mut out, 1);
        let data = vec![0xab; 70_000];
        s.data(&mut out, 2, Side::Server, &data);
        let segments = out.0.iter().filter(|f| !decode(&f.1).4.is_empty()).count();
        assert_eq!(segments, 70_000usize.div_ceil(1460));
        assert!(
            out.0
                .iter()
                .all(|f| f.1.len() <= wire::MTU + wire::ETHERNET_LEN)
        );
        assert_eq!(reassemble(&out).1, data);
    }

    #[test]
    fn timestamps_before_the_handshake_are_clamped() {
        let mut s = session(1);
        let mut out = Frames::default();
        s.handshake(&mut out, 100);
        s.data(&mut out, 50, Side::Client, b"early");
        assert!(out.0.iter().all(|f| f.0 == 100));
    }

    proptest::proptest! {
        #[test]
        fn reassembly_equals_input(
            isn in proptest::num::u32::ANY,
            packets in proptest::collection::vec(
                (proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..4000)),
                0..12,
            ),
        ) {
            let mut s = session(isn);
            let mut out = Frames::default();
            s.handshake(&mut out, 1);
            let (mut want_c, mut want_s) = (Vec::new(), Vec::new());
            for (i, (from_client, data)) in packets.iter().enumerate() {
                let side = if *from_client { Side::Client } else { Side::Server };
                s.data(&mut out, 2 + i as u64, side, data);
                if *from_client { want_c.extend_from_slice(data) } else { want_s.extend_from_slice(data) }
            }
            s.end(&mut out, 100, Ending::Fin(Side::Client));
            let (c, srv) = reassemble(&out);
            proptest::prop_assert_eq!(c, want_c);
            proptest::prop_assert_eq!(srv, want_s);
        }
    }
}
