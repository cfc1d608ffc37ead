//! The history log's on-disk frames, sans I/O: encoding a batch of packets (and the records
//! closed with it) into one checksummed frame, and decoding frames and the per-connection
//! blocks inside them back.
//!
//! A frame (all integers little-endian):
//! - header: magic `IPH1` (4), body length (4), CRC-32 of the body (4);
//! - body: arrival position (8), packet count (4), closed-record count (4), the packets
//!   sorted by (connection, seq), then each closed record as length (4) + protobuf.
//!
//! A packet record is a fixed [`PACKET_HEADER`] (connection 8, seq 8, timestamp seconds 8
//! and nanos 4, direction 4, flags 4, data length 4, original length 4) and its bytes. One
//! connection's packets in a frame are contiguous: a *block*, which the segment index
//! points at, so one connection's history is read without its neighbours'.
//!
//! A frame whose header or checksum does not hold is where a crash tore the log: recovery
//! keeps everything before it ([`scan`]).
//!
//! Both stores use this format: the sled store's segment files hold whole frames
//! ([`crate::backend::sled_store::log`]); the PostgreSQL store keeps each block's packet
//! records, cut out of a frame, in rows of its own ([`crate::backend::pg`]).

use bytes::Bytes;
use proto::common::{Connection, Packet};

/// The bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"IPH1";
/// Bytes of a frame's header.
pub const FRAME_HEADER: usize = 12;
/// Bytes of a packet record before its payloads.
pub const PACKET_HEADER: usize = 44;
/// Bytes of a frame body before its packets.
const BODY_HEADER: usize = 16;

const FLAG_TS: u32 = 1;
const FLAG_MODIFIED: u32 = 2;
const FLAG_DROPPED: u32 = 4;

/// One connection's packets inside a frame, as the segment index describes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Block {
    /// The connection.
    pub conn: u64,
    /// Its lowest and highest seq in the block.
    pub first_seq: u64,
    pub last_seq: u64,
    /// The arrival position of the frame.
    pub pos: u64,
    /// Where the block's first packet record starts, from the start of the frame (the
    /// segment index stores it from the start of the segment).
    pub offset: u64,
    /// Bytes of the block's packet records.
    pub len: u32,
    /// Packets in the block.
    pub count: u32,
}

/// A frame as [`encode`] wrote it: its blocks and how much it holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub blocks: Vec<Block>,
    pub packets: u64,
    /// Payload bytes (data and original).
    pub payload: u64,
}

/// Appends the frame of `packets` (sorted by (connection, seq), no repeats) and `closed` at
/// arrival position `pos` to `out`.
pub fn encode(out: &mut Vec<u8>, pos: u64, packets: &[Packet], closed: &[Connection]) -> Encoded {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&pos.to_le_bytes());
    out.extend_from_slice(&(packets.len() as u32).to_le_bytes());
    out.extend_from_slice(&(closed.len() as u32).to_le_bytes());
    let mut enc = Encoded::default();
    for p in packets {
        let at = (out.len() - start) as u64;
        match enc.blocks.last_mut() {
            Some(b) if b.conn == p.conn_id => {
                b.last_seq = p.seq;
                b.count += 1;
            }
            _ => enc.blocks.push(Block {
                conn: p.conn_id,
                first_seq: p.seq,
                last_seq: p.seq,
                pos,
                offset: at,
                len: 0,
                count: 1,
            }),
        }
        put_packet(out, p);
        if let Some(b) = enc.blocks.last_mut() {
            b.len = ((out.len() - start) as u64 - b.offset) as u32;
        }
        enc.packets += 1;
        enc.payload += (p.data.len() + p.original.len()) as u64;
    }
    for c in closed {
        let bytes = prost::Message::encode_to_vec(c);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    let body_len = (out.len() - start - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    enc
}

fn put_packet(out: &mut Vec<u8>, p: &Packet) {
    let (secs, nanos) = p.ts.map_or((0, 0), |t| (t.seconds, t.nanos));
    let flags = (if p.ts.is_some() { FLAG_TS } else { 0 })
        | (if p.modified { FLAG_MODIFIED } else { 0 })
        | (if p.dropped { FLAG_DROPPED } else { 0 });
    out.extend_from_slice(&p.conn_id.to_le_bytes());
    out.extend_from_slice(&p.seq.to_le_bytes());
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
    out.extend_from_slice(&p.direction.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&(p.original.len() as u32).to_le_bytes());
    out.extend_from_slice(&p.data);
    out.extend_from_slice(&p.original);
}

/// A frame's header: the body's length and checksum, or why it is not a frame.
pub fn header(bytes: &[u8]) -> Option<(usize, u32)> {
    if bytes.len() < FRAME_HEADER || bytes[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    (len >= BODY_HEADER).then_some((len, crc))
}

/// What went wrong decoding a frame or block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("history frame cut short")]
    Short,
    #[error("history frame has a bad closed record")]
    Closed,
}

/// A decoded frame.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Frame {
    pub pos: u64,
    pub packets: Vec<Packet>,
    pub closed: Vec<Connection>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, FrameError> {
    Ok(u32::from_le_bytes(
        b.get(at..at + 4)
            .ok_or(FrameError::Short)?
            .try_into()
            .map_err(|_| FrameError::Short)?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, FrameError> {
    Ok(u64::from_le_bytes(
        b.get(at..at + 8)
            .ok_or(FrameError::Short)?
            .try_into()
            .map_err(|_| FrameError::Short)?,
    ))
}

/// Decodes the packet records in `bytes` (a block, or all of a frame's), each passed to `f`
/// with where it starts; the bytes after the last one.
pub fn packets(
    bytes: &Bytes,
    count: usize,
    mut f: impl FnMut(Packet),
) -> Result<usize, FrameError> {
    let b = &bytes[..];
    let mut at = 0;
    for _ in 0..count {
        let conn_id = u64_at(b, at)?;
        let seq = u64_at(b, at + 8)?;
        let secs = u64_at(b, at + 16)? as i64;
        let nanos = u32_at(b, at + 24)? as i32;
        let direction = u32_at(b, at + 28)? as i32;
        let flags = u32_at(b, at + 32)?;
        let data_len = u32_at(b, at + 36)? as usize;
        let orig_len = u32_at(b, at + 40)? as usize;
        let data_at = at + PACKET_HEADER;
        let end = data_at
            .checked_add(data_len)
            .and_then(|e| e.checked_add(orig_len))
            .filter(|&e| e <= b.len())
            .ok_or(FrameError::Short)?;
        f(Packet {
            conn_id,
            seq,
            direction,
            ts: (flags & FLAG_TS != 0).then_some(prost_types::Timestamp {
                seconds: secs,
                nanos,
            }),
            data: bytes.slice(data_at..data_at + data_len),
            modified: flags & FLAG_MODIFIED != 0,
            original: bytes.slice(data_at + data_len..end),
            dropped: flags & FLAG_DROPPED != 0,
        });
        at = end;
    }
    Ok(at)
}

/// Decodes a frame's body (checksum already checked).
pub fn decode_body(body: &Bytes) -> Result<Frame, FrameError> {
    let pos = u64_at(body, 0)?;
    let n_packets = u32_at(body, 8)? as usize;
    let n_closed = u32_at(body, 12)? as usize;
    let rest = body.slice(BODY_HEADER.min(body.len())..);
    let mut frame = Frame {
        pos,
        ..Default::default()
    };
    let mut at = packets(&rest, n_packets, |p| frame.packets.push(p))?;
    for _ in 0..n_closed {
        let len = u32_at(&rest, at)? as usize;
        let bytes = rest.get(at + 4..at + 4 + len).ok_or(FrameError::Short)?;
        let c = <Connection as prost::Message>::decode(bytes).map_err(|_| FrameError::Closed)?;
        frame.closed.push(c);
        at += 4 + len;
    }
    Ok(frame)
}

/// The intact frames at the start of `bytes`, each passed to `f` with its offset and body;
/// returns where the intact part ends (a torn or corrupt frame, or the end).
pub fn scan(bytes: &[u8], mut f: impl FnMut(usize, &[u8])) -> usize {
    let mut at = 0;
    while let Some((len, crc)) = header(&bytes[at..]) {
        let Some(body) = bytes.get(at + FRAME_HEADER..at + FRAME_HEADER + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        f(at, body);
        at += FRAME_HEADER + len;
    }
    at
}

/// The blocks of a frame body, offsets from the start of the frame.
pub fn blocks_of(body: &[u8]) -> Result<Encoded, FrameError> {
    let pos = u64_at(body, 0)?;
    let n = u32_at(body, 8)? as usize;
    let mut enc = Encoded::default();
    let mut at = BODY_HEADER;
    for _ in 0..n {
        let conn = u64_at(body, at)?;
        let seq = u64_at(body, at + 8)?;
        let len = PACKET_HEADER + u32_at(body, at + 36)? as usize + u32_at(body, at + 40)? as usize;
        if at + len > body.len() {
            return Err(FrameError::Short);
        }
        let off = (FRAME_HEADER + at) as u64;
        match enc.blocks.last_mut() {
            Some(b) if b.conn == conn => {
                b.last_seq = seq;
                b.count += 1;
                b.len += len as u32;
            }
            _ => enc.blocks.push(Block {
                conn,
                first_seq: seq,
                last_seq: seq,
                pos,
                offset: off,
                len: len as u32,
                count: 1,
            }),
        }
        enc.packets += 1;
        enc.payload += (len - PACKET_HEADER) as u64;
        at += len;
    }
    Ok(enc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(conn_id: u64, seq: u64, data: &[u8]) -> Packet {
        Packet {
            conn_id,
            seq,
            direction: 2,
            ts: Some(prost_types::Timestamp {
                seconds: -5,
                nanos: 7,
            }),
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }
    }

    #[test]
    fn frames_round_trip_and_blocks_point_at_their_packets() {
        let mut edited = pkt(2, 1, b"new");
        edited.modified = true;
        edited.original = Bytes::from_static(b"old");
        edited.ts = None;
        let packets = vec![pkt(1, 1, b"a"), pkt(1, 2, b""), edited];
        let closed = vec![Connection {
            id: 9,
            ..Default::default()
        }];
        let mut out = b"junk".to_vec();
        let enc = encode(&mut out, 7, &packets, &closed);
        assert_eq!((enc.packets, enc.payload, enc.blocks.len()), (3, 7, 2));
        let frame = &out[4..];
        let mut seen = Vec::new();
        let end = scan(frame, |at, body| {
            seen.push(at);
            let f = decode_body(&Bytes::copy_from_slice(body)).unwrap();
            assert_eq!(f.pos, 7);
            assert_eq!(f.packets, packets);
            assert_eq!(f.closed, closed);
            assert_eq!(blocks_of(body).unwrap(), enc);
        });
        assert_eq!((seen, end), (vec![0], frame.len()));
        let b = enc.blocks[1];
        let bytes = Bytes::copy_from_slice(&frame[b.offset as usize..][..b.len as usize]);
        let mut got = Vec::new();
        super::packets(&bytes, b.count as usize, |p| got.push(p)).unwrap();
        assert_eq!(got, packets[2..]);
    }

    #[test]
    fn a_torn_or_corrupt_frame_ends_the_scan() {
        let mut out = Vec::new();
        encode(&mut out, 1, &[pkt(1, 1, b"one")], &[]);
        let first = out.len();
        encode(&mut out, 2, &[pkt(1, 2, b"two")], &[]);
        for cut in first..out.len() {
            assert_eq!(scan(&out[..cut], |_, _| {}), first, "cut at {cut}");
        }
        let mut bad = out.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(scan(&bad, |_, _| {}), first);
        assert_eq!(scan(&out, |_, _| {}), out.len());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever bytes follow a good frame, scanning never panics and keeps the frame.
        #[test]
        fn scanning_garbage_keeps_the_good_prefix(tail in proptest::collection::vec(0u8..=255, 0..200)) {
            let mut out = Vec::new();
            encode(&mut out, 1, &[pkt(1, 1, b"x")], &[]);
            let good = out.len();
            out.extend_from_slice(&tail);
            let end = scan(&out, |_, body| { let _ = decode_body(&Bytes::copy_from_slice(body)); });
            proptest::prop_assert!(end >= good);
        }
    }
}
