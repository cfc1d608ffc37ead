//! Capture file framing (sans-I/O): classic PCAP (microsecond timestamps) and pcapng
//! (nanosecond timestamps, per-frame comments, name resolution blocks), appended to an
//! output buffer that the caller drains as chunks, so a file of any size streams.

use std::net::IpAddr;

use crate::frames::FrameSink;

/// Snap length in every header: what older libpcap releases still accept.
pub const SNAPLEN: u32 = 262_144;
/// The longest host name written into a pcapng name record (DNS names are at most 253
/// bytes; a SOCKS5 domain at most 255).
pub const MAX_NAME_LEN: usize = 1024;
/// Link type Ethernet.
const LINKTYPE_ETHERNET: u16 = 1;

/// The two capture file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pcap,
    PcapNg,
}

/// Writes a capture file into [`CaptureWriter::out`]: the header on creation, then frames
/// and host names as they come.
pub struct CaptureWriter {
    format: Format,
    /// Bytes written and not yet taken by the caller.
    pub out: Vec<u8>,
    /// Frames written so far.
    pub frames: u64,
}

impl CaptureWriter {
    /// A writer whose buffer already holds the file header.
    pub fn new(format: Format) -> Self {
        let mut w = Self {
            format,
            out: Vec::with_capacity(1 << 20),
            frames: 0,
        };
        match format {
            Format::Pcap => w.pcap_header(),
            Format::PcapNg => w.pcapng_header(),
        }
        w
    }

    /// Takes the bytes written so far.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.out, Vec::with_capacity(1 << 20))
    }

    fn pcap_header(&mut self) {
        let o = &mut self.out;
        o.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        o.extend_from_slice(&2u16.to_le_bytes());
        o.extend_from_slice(&4u16.to_le_bytes());
        o.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        o.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        o.extend_from_slice(&SNAPLEN.to_le_bytes());
        o.extend_from_slice(&u32::from(LINKTYPE_ETHERNET).to_le_bytes());
    }

    fn pcapng_header(&mut self) {
        // Section header block: byte-order magic, version 1.0, section length unknown.
        let mut body = Vec::new();
        body.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(-1i64).to_le_bytes());
        push_option(&mut body, 4, b"interpose export-svc"); // shb_userappl
        end_options(&mut body);
        self.block(0x0a0d_0d0a, &body);
        // Interface description block: Ethernet, snap length, nanosecond resolution.
        let mut body = Vec::new();
        body.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&SNAPLEN.to_le_bytes());
        push_option(&mut body, 9, &[9]); // if_tsresol: 10^-9
        end_options(&mut body);
        self.block(1, &body);
    }

    /// Maps `ip` to `host` for readers (pcapng only; ignored for PCAP). A name the format
    /// cannot carry (empty, holding a NUL, which ends a name there, or over
    /// [`MAX_NAME_LEN`]) is left out: the frames still carry the address.
    pub fn name(&mut self, ip: IpAddr, host: &str) {
        let fits = !host.is_empty() && !host.contains('\0') && host.len() <= MAX_NAME_LEN;
        if self.format != Format::PcapNg || !fits {
            return;
        }
        let mut body = Vec::new();
        let (kind, addr): (u16, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (1, v4.octets().to_vec()),
            IpAddr::V6(v6) => (2, v6.octets().to_vec()),
        };
        let mut value = addr;
        value.extend_from_slice(host.as_bytes());
        value.push(0);
        push_option(&mut body, kind, &value);
        end_options(&mut body); // nrb_record_end has the same shape as opt_endofopt
        self.block(4, &body);
    }

    /// Appends one block: type, total length, body (already padded), total length.
    fn block(&mut self, kind: u32, body: &[u8]) {
        let total = u32::try_from(12 + body.len()).unwrap_or(u32::MAX);
        self.out.extend_from_slice(&kind.to_le_bytes());
        self.out.extend_from_slice(&total.to_le_bytes());
        self.out.extend_from_slice(body);
        self.out.extend_from_slice(&total.to_le_bytes());
    }

    fn pcap_record(&mut self, ts_nanos: u64, frame: &[u8]) {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        // Past the classic format's range (the year 2106) every time is its last microsecond,
        // so later frames never read back as earlier ones.
        let (secs, micros) = match u32::try_from(ts_nanos / 1_000_000_000) {
            Ok(secs) => (secs, ((ts_nanos % 1_000_000_000) / 1000) as u32),
            Err(_) => (u32::MAX, 999_999),
        };
        let o = &mut self.out;
        o.extend_from_slice(&secs.to_le_bytes());
        o.extend_from_slice(&micros.to_le_bytes());
        o.extend_from_slice(&len.to_le_bytes());
        o.extend_from_slice(&len.to_le_bytes());
        o.extend_from_slice(frame);
    }

    fn pcapng_packet(&mut self, ts_nanos: u64, frame: &[u8], comment: Option<&str>) {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let padded = frame.len().next_multiple_of(4);
        let options = comment.map_or(0, |c| 4 + c.len().next_multiple_of(4) + 4);
        let total = u32::try_from(32 + padded + options).unwrap_or(u32::MAX);
        let o = &mut self.out;
        o.extend_from_slice(&6u32.to_le_bytes());
        o.extend_from_slice(&total.to_le_bytes());
        o.extend_from_slice(&0u32.to_le_bytes()); // interface 0
        o.extend_from_slice(&((ts_nanos >> 32) as u32).to_le_bytes());
        o.extend_from_slice(&(ts_nanos as u32).to_le_bytes());
        o.extend_from_slice(&len.to_le_bytes());
        o.extend_from_slice(&len.to_le_bytes());
        o.extend_from_slice(frame);
        o.resize(o.len() + padded - frame.len(), 0);
        if let Some(c) = comment {
            push_option(o, 1, c.as_bytes()); // opt_comment
            end_options(o);
        }
        o.extend_from_slice(&total.to_le_bytes());
    }
}

impl FrameSink for CaptureWriter {
    fn frame(&mut self, ts_nanos: u64, frame: &[u8], comment: Option<&str>) {
        self.frames += 1;
        match self.format {
            Format::Pcap => self.pcap_record(ts_nanos, frame),
            Format::PcapNg => self.pcapng_packet(ts_nanos, frame, comment),
        }
    }
}

/// Appends a pcapng option (code, length, value padded to 4 bytes).
fn push_option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
    out.resize(out.len() + (4 - usize::from(len) % 4) % 4, 0);
}

/// Appends `opt_endofopt`.
fn end_options(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::{
        pcap::PcapReader,
        pcapng::{Block, PcapNgReader},
    };

    #[test]
    fn pcap_reads_back_with_pcap_file() {
        let mut w = CaptureWriter::new(Format::Pcap);
        w.frame(1_700_000_000_123_456_789, &[1, 2, 3, 4, 5], Some("ignored"));
        let mut r = PcapReader::new(&w.out[..]).expect("pcap header");
        assert_eq!(r.header().snaplen, SNAPLEN);
        let p = r.next_packet().expect("one packet").expect("valid packet");
        assert_eq!(&p.data[..], &[1, 2, 3, 4, 5]);
        assert_eq!(p.timestamp.as_secs(), 1_700_000_000);
        assert_eq!(p.timestamp.subsec_micros(), 123_456);
        assert!(r.next_packet().is_none());
    }

    #[test]
    fn pcap_times_past_its_range_never_go_back() {
        let mut w = CaptureWriter::new(Format::Pcap);
        w.frame(
            u64::from(u32::MAX) * 1_000_000_000 + 999_000_000,
            &[1],
            None,
        );
        w.frame(u64::MAX, &[2], None);
        let mut r = PcapReader::new(&w.out[..]).expect("pcap header");
        let a = r.next_packet().expect("first").expect("valid").timestamp;
        let b = r.next_packet().expect("second").expect("valid").timestamp;
        assert!(a <= b, "{a:?} then {b:?}");
    }

    #[test]
    fn names_pcapng_cannot_carry_are_left_out() {
        let mut w = CaptureWriter::new(Format::PcapNg);
        let header = w.out.len();
        w.name("10.0.0.2".parse().unwrap(), "evil\0.example");
        w.name("10.0.0.2".parse().unwrap(), &"a".repeat(MAX_NAME_LEN + 1));
        assert_eq!(w.out.len(), header, "no name block");
        w.name("10.0.0.2".parse().unwrap(), "ok.example");
        assert!(w.out.len() > header);
    }

    #[test]
    fn pcapng_has_nanoseconds_comments_and_names() {
        let mut w = CaptureWriter::new(Format::PcapNg);
        w.name("10.0.0.2".parse().unwrap(), "example.com");
        w.frame(1_700_000_000_123_456_789, &[9; 61], Some("conn 1 sni=x"));
        w.frame(1_700_000_001_000_000_001, &[8; 60], None);
        let mut r = PcapNgReader::new(&w.out[..]).expect("pcapng header");
        let mut packets = Vec::new();
        let mut names = Vec::new();
        while let Some(block) = r.next_block() {
            match block.expect("valid block") {
                Block::EnhancedPacket(p) => {
                    packets.push((p.timestamp, p.data.to_vec(), format!("{:?}", p.options)))
                }
                Block::NameResolution(n) => names.push(format!("{:?}", n.records)),
                Block::InterfaceDescription(i) => assert_eq!(i.snaplen, SNAPLEN),
                _ => {}
            }
        }
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].1, vec![9; 61]);
        assert!(packets[0].2.contains("conn 1 sni=x"), "{}", packets[0].2);
        assert_eq!(
            packets[1].0,
            std::time::Duration::new(1_700_000_001, 1),
            "nanosecond timestamps"
        );
        assert_eq!(names.len(), 1);
        assert!(names[0].contains("example.com"), "{}", names[0]);
    }
}
