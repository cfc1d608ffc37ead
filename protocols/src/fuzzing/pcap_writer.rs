//! The properties the `pcap_writer` fuzz target in `fuzz/` checks: a connection of any shape
//! (family, ports, sequence numbers, packets, timestamps, ending, host name, comment) written
//! through [`TcpSession`] or [`UdpSession`] into a [`CaptureWriter`] reads back, with the
//! `pcap-file` crate, as exactly what was written: valid IP and TCP/UDP checksums and
//! lengths, a gapless TCP stream whose acknowledgements cover only what was sent, the bytes
//! of each direction in order, the ending as it was, and timestamps that never go back.
//!
//! On stable the same checks run in `cargo test` over the seed corpus
//! (`fuzz/corpus/pcap_writer/`, decoded as the fuzzer decodes it) and over proptest's random
//! inputs. [`capture`] panics when a property fails.

#![allow(
    clippy::expect_used,
    reason = "a fuzz property fails by panicking, and the fuzzer reports the panic"
)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use arbitrary::{Arbitrary, Unstructured};
use pcap_file::{
    pcap::PcapReader,
    pcapng::{
        Block, PcapNgReader,
        blocks::{enhanced_packet::EnhancedPacketOption, name_resolution::Record},
    },
};

use crate::{
    capture::{CaptureWriter, Format},
    frames::{Ending, FrameSink, Side, TcpSession, UdpSession},
    wire::{self, CLIENT_MAC, SERVER_MAC, flags},
};

/// One connection to export, as the fuzzer makes it up.
#[derive(Debug, Arbitrary)]
pub struct Capture {
    pub pcapng: bool,
    pub udp: bool,
    pub v6: bool,
    pub client_ip: u128,
    pub server_ip: u128,
    pub client_port: u16,
    pub server_port: u16,
    pub isn: (u32, u32),
    /// The target's host name, for pcapng's name resolution block.
    pub host: String,
    pub comment: Option<String>,
    pub start_ts: u64,
    pub packets: Vec<Packet>,
    pub ending: StreamEnd,
}

/// One recorded packet.
#[derive(Debug, Arbitrary)]
pub struct Packet {
    pub from_client: bool,
    pub ts: u64,
    pub data: Vec<u8>,
}

/// How the TCP stream ended (`true`: the client first).
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum StreamEnd {
    Open,
    Fin(bool),
    Rst(bool),
}

/// [`capture`] on `data` decoded as the fuzzer decodes it (for seeds and random bytes).
pub fn capture_bytes(data: &[u8]) {
    if let Ok(input) = Capture::arbitrary_take_rest(Unstructured::new(data)) {
        capture(&input);
    }
}

/// Fuzz target `pcap_writer`: writes `c` and checks what reads back.
pub fn capture(c: &Capture) {
    let (client, server) = c.stations();
    let format = if c.pcapng {
        Format::PcapNg
    } else {
        Format::Pcap
    };
    let mut w = CaptureWriter::new(format);
    w.name(server.ip(), &c.host);
    let side = |client_first: bool| {
        if client_first {
            Side::Client
        } else {
            Side::Server
        }
    };
    if c.udp {
        let mut s = UdpSession::new(client, server, c.comment.clone());
        for p in &c.packets {
            s.data(&mut w, p.ts, side(p.from_client), &p.data);
        }
    } else {
        let mut s = TcpSession::new(client, server, c.isn, c.comment.clone());
        s.handshake(&mut w, c.start_ts);
        for p in &c.packets {
            s.data(&mut w, p.ts, side(p.from_client), &p.data);
        }
        let ending = match c.ending {
            StreamEnd::Open => Ending::Open,
            StreamEnd::Fin(client_first) => Ending::Fin(side(client_first)),
            StreamEnd::Rst(client_first) => Ending::Rst(side(client_first)),
        };
        s.end(&mut w, c.start_ts, ending);
    }
    let file = read_back(&w.out, format);
    assert_eq!(file.frames.len() as u64, w.frames, "frames read back");
    if let (Some(first), Some(comment), Format::PcapNg) = (file.frames.first(), &c.comment, format)
    {
        assert_eq!(
            first.comment.as_ref(),
            Some(comment),
            "first frame's comment"
        );
    }
    if format == Format::PcapNg && !c.host.is_empty() && representable(&c.host) {
        assert_eq!(
            file.names,
            vec![(server.ip(), c.host.clone())],
            "name block"
        );
    }
    assert!(
        file.frames.windows(2).all(|f| f[0].ts <= f[1].ts),
        "timestamps go back"
    );
    let segments: Vec<Segment> = file.frames.iter().map(|f| decode(&f.data)).collect();
    for s in &segments {
        let (src, dst) = if s.from_client {
            (client, server)
        } else {
            (server, client)
        };
        assert_eq!((s.src, s.dst), (src, dst), "addresses and ports");
    }
    if c.udp {
        check_udp(c, &segments);
    } else {
        check_tcp(c, &segments);
    }
}

/// Whether a host name fits a pcapng name record (no NUL, which ends a name there).
fn representable(host: &str) -> bool {
    !host.contains('\0') && host.len() <= crate::capture::MAX_NAME_LEN
}

impl Capture {
    /// The client and server addresses, of one family.
    fn stations(&self) -> (SocketAddr, SocketAddr) {
        let ip = |raw: u128| -> IpAddr {
            if self.v6 {
                Ipv6Addr::from(raw).into()
            } else {
                Ipv4Addr::from(raw as u32).into()
            }
        };
        (
            SocketAddr::new(ip(self.client_ip), self.client_port),
            SocketAddr::new(ip(self.server_ip), self.server_port),
        )
    }

    /// The bytes each direction sent, in order: (client to server, server to client).
    fn streams(&self) -> (Vec<u8>, Vec<u8>) {
        let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
        for p in &self.packets {
            let to = if p.from_client { &mut c2s } else { &mut s2c };
            to.extend_from_slice(&p.data);
        }
        (c2s, s2c)
    }
}

/// Every datagram is one packet's payload, in order, from its side.
fn check_udp(c: &Capture, segments: &[Segment]) {
    let want: Vec<(bool, &[u8])> = c
        .packets
        .iter()
        .flat_map(|p| {
            p.data
                .chunks(crate::frames::MAX_DATAGRAM)
                .map(move |d| (p.from_client, d))
        })
        .collect();
    let got: Vec<(bool, &[u8])> = segments
        .iter()
        .map(|s| {
            assert_eq!(s.proto, 17, "UDP");
            let len = usize::from(u16::from_be_bytes([s.l4[4], s.l4[5]]));
            assert_eq!(len, s.l4.len(), "UDP length");
            (s.from_client, &s.l4[wire::UDP_LEN..])
        })
        .collect();
    assert_eq!(got, want, "datagrams");
}

/// The stream reassembles as a receiver would to what each side sent, and ends as it did.
fn check_tcp(c: &Capture, segments: &[Segment]) {
    let tcp: Vec<TcpSegment> = segments.iter().map(TcpSegment::of).collect();
    let (c2s, s2c) = reassemble(&tcp);
    assert!(
        c2s == c.streams().0 && s2c == c.streams().1,
        "reassembled bytes"
    );
    let fins: Vec<bool> = tcp
        .iter()
        .filter(|s| s.flags & flags::FIN != 0)
        .map(|s| s.from_client)
        .collect();
    let rsts: Vec<bool> = tcp
        .iter()
        .filter(|s| s.flags & flags::RST != 0)
        .map(|s| s.from_client)
        .collect();
    match c.ending {
        StreamEnd::Open => assert!(fins.is_empty() && rsts.is_empty(), "an open stream ended"),
        StreamEnd::Fin(client_first) => {
            assert_eq!(fins, [client_first, !client_first], "FIN order");
            assert!(rsts.is_empty(), "RST on a FIN close");
        }
        StreamEnd::Rst(client) => {
            assert_eq!(rsts, [client], "RST side");
            assert!(tcp.last().is_some_and(|s| s.flags & flags::RST != 0));
        }
    }
}

/// A capture file read back.
struct File {
    frames: Vec<Frame>,
    /// pcapng name records: (address, name).
    names: Vec<(IpAddr, String)>,
}

/// A frame read back.
struct Frame {
    ts: Duration,
    data: Vec<u8>,
    comment: Option<String>,
}

fn read_back(out: &[u8], format: Format) -> File {
    let mut file = File {
        frames: Vec::new(),
        names: Vec::new(),
    };
    match format {
        Format::Pcap => {
            let mut r = PcapReader::new(out).expect("pcap header");
            while let Some(p) = r.next_packet() {
                let p = p.expect("valid pcap record");
                assert_eq!(p.orig_len as usize, p.data.len(), "whole frames");
                file.frames.push(Frame {
                    ts: p.timestamp,
                    data: p.data.into_owned(),
                    comment: None,
                });
            }
        }
        Format::PcapNg => {
            let mut r = PcapNgReader::new(out).expect("pcapng header");
            while let Some(block) = r.next_block() {
                match block.expect("valid pcapng block") {
                    Block::EnhancedPacket(p) => file.frames.push(Frame {
                        ts: p.timestamp,
                        comment: p.options.iter().find_map(|o| match o {
                            EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                            _ => None,
                        }),
                        data: p.data.into_owned(),
                    }),
                    Block::NameResolution(n) => file.names.extend(n.records.iter().flat_map(name)),
                    _ => {}
                }
            }
        }
    }
    file
}

/// The (address, name) pairs of a name record.
fn name(r: &Record) -> Vec<(IpAddr, String)> {
    let (ip, names): (IpAddr, _) = match r {
        Record::Ipv4(v4) => (
            <[u8; 4]>::try_from(&v4.ip_addr[..])
                .expect("4 bytes")
                .into(),
            &v4.names,
        ),
        Record::Ipv6(v6) => (
            <[u8; 16]>::try_from(&v6.ip_addr[..])
                .expect("16 bytes")
                .into(),
            &v6.names,
        ),
        _ => return Vec::new(),
    };
    names.iter().map(|n| (ip, n.to_string())).collect()
}

/// An IP packet's transport segment, its checksums and lengths checked.
pub struct Segment {
    pub from_client: bool,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// The transport header and payload.
    pub l4: Vec<u8>,
}

/// Decodes an Ethernet frame of IPv4 or IPv6; panics on a wrong length or checksum.
pub fn decode(f: &[u8]) -> Segment {
    assert!(f.len() >= wire::ETHERNET_LEN, "frame shorter than Ethernet");
    let from_client = f[6..12] == CLIENT_MAC;
    let to = if from_client { SERVER_MAC } else { CLIENT_MAC };
    assert_eq!(f[0..6], to, "MAC addresses");
    let ip = &f[wire::ETHERNET_LEN..];
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) =
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 => {
                assert_eq!(ip[0], 0x45, "IPv4 without options");
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                assert_eq!(total, ip.len(), "IPv4 total length");
                assert!(wire::ipv4_header_ok(&ip[..20]), "IPv4 header checksum");
                let a = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
                (a(12).into(), a(16).into(), ip[9], &ip[20..])
            }
            0x86dd => {
                assert_eq!(ip[0] >> 4, 6, "IPv6 version");
                let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
                assert_eq!(payload, ip.len() - 40, "IPv6 payload length");
                let a = |at: usize| {
                    Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).expect("16 bytes"))
                };
                (a(8).into(), a(24).into(), ip[6], &ip[40..])
            }
            other => panic!("ethertype {other:#06x}"),
        };
    assert_eq!(
        wire::l4_checksum(src, dst, proto, l4),
        0,
        "transport checksum"
    );
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Segment {
        from_client,
        src: SocketAddr::new(src, port(0)),
        dst: SocketAddr::new(dst, port(2)),
        proto,
        l4: l4.to_vec(),
    }
}

/// A TCP segment's fields.
pub struct TcpSegment {
    pub from_client: bool,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl TcpSegment {
    /// The TCP fields of a decoded segment; panics on a segment over the MSS.
    pub fn of(s: &Segment) -> Self {
        assert_eq!(s.proto, 6, "TCP");
        let t = &s.l4;
        let off = usize::from(t[12] >> 4) * 4;
        let word = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        assert!(
            t.len() - off <= wire::mss(s.src.ip()),
            "segment over the MSS"
        );
        Self {
            from_client: s.from_client,
            seq: word(4),
            ack: word(8),
            flags: t[13],
            payload: t[off..].to_vec(),
        }
    }
}

/// Reassembles both directions as a receiver would: checks every segment starts where the
/// previous one ended and every ACK covers exactly what the other side sent so far.
pub fn reassemble(segments: &[TcpSegment]) -> (Vec<u8>, Vec<u8>) {
    let mut next = [None::<u32>, None];
    let mut bytes = [Vec::new(), Vec::new()];
    for s in segments {
        let (me, peer) = if s.from_client { (0, 1) } else { (1, 0) };
        if s.flags & flags::SYN != 0 {
            next[me] = Some(s.seq.wrapping_add(1));
        } else {
            let expected = next[me].expect("segment before SYN");
            assert_eq!(s.seq, expected, "sequence gap");
            let fin = u32::from(s.flags & flags::FIN != 0);
            next[me] = Some(s.seq.wrapping_add(s.payload.len() as u32).wrapping_add(fin));
            bytes[me].extend_from_slice(&s.payload);
        }
        if s.flags & flags::ACK != 0 {
            assert_eq!(Some(s.ack), next[peer], "ACK of unseen or old data");
        }
    }
    let [c, s] = bytes;
    (c, s)
}

/// Collects frames in memory (a [`FrameSink`] for tests).
#[derive(Default)]
pub struct Frames(pub Vec<(u64, Vec<u8>, Option<String>)>);

impl FrameSink for Frames {
    fn frame(&mut self, ts: u64, frame: &[u8], comment: Option<&str>) {
        self.0
            .push((ts, frame.to_vec(), comment.map(str::to_string)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_writer_corpus_holds_and_covers_both_formats_and_transports() {
        let seeds = crate::fuzz_corpus::seeds("pcap_writer").unwrap_or_else(|e| panic!("{e}"));
        let inputs: Vec<Capture> = seeds
            .iter()
            .map(|s| Capture::arbitrary_take_rest(Unstructured::new(s)).expect("seed decodes"))
            .collect();
        inputs.iter().for_each(capture);
        for (what, covered) in [
            ("pcap", inputs.iter().any(|c| !c.pcapng)),
            ("pcapng", inputs.iter().any(|c| c.pcapng)),
            (
                "TCP with data",
                inputs.iter().any(|c| !c.udp && !c.packets.is_empty()),
            ),
            (
                "UDP with data",
                inputs.iter().any(|c| c.udp && !c.packets.is_empty()),
            ),
            ("IPv6", inputs.iter().any(|c| c.v6)),
        ] {
            assert!(covered, "no seed writes {what}");
        }
    }

    proptest::proptest! {
        #[test]
        fn pcap_writer_properties_hold(data in proptest::collection::vec(proptest::num::u8::ANY, 0..6000)) {
            capture_bytes(&data);
        }
    }
}
