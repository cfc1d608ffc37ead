//! History blocks as PostgreSQL rows, sans I/O: a commit's packets framed once, each
//! connection's packets in the frame (a *block*) cut into rows, and rows joined back into
//! packets.
//!
//! A commit's fresh packets, sorted by (connection, seq), are encoded as one history frame
//! ([`crate::backend::frame`], the sled store's format); each block of it becomes one row of
//! `blocks`, or several when it is larger than [`PIECE`]: its bytes cut into pieces numbered
//! from 0, every piece carrying the block's description. A row then stays under a page, so
//! the body column is stored `PLAIN`: never compressed, never moved out to TOAST (whose
//! ~2 KB chunks each cost a row and an index entry of their own).

use std::ops::Range;

use bytes::Bytes;
use proto::common::Packet;

use crate::backend::frame::{self, FrameError};

/// Most bytes of a block in one row: with the row's other columns and header it stays
/// under PostgreSQL's largest row in an 8 KiB page (8,160 bytes).
pub const PIECE: usize = 8_000;

/// What every row of a block says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// The connection and its lowest and highest seq in the block.
    pub conn: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Packets in the block and their payload bytes (data and original).
    pub packets: u32,
    pub bytes: u64,
    /// The earliest and latest capture time of its packets that have one (ns since the
    /// epoch), and whether some have none (a purge by time keeps those).
    pub ts_min: Option<i64>,
    pub ts_max: Option<i64>,
    pub untimed: bool,
}

/// One row of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row<'a> {
    pub desc: &'a Desc,
    /// This piece's number and the block's count of pieces.
    pub part: i32,
    pub parts: i32,
    pub body: &'a [u8],
}

/// A commit's packets, framed: the blocks and the bytes they point into.
#[derive(Debug, Default)]
pub struct Encoded {
    buf: Vec<u8>,
    blocks: Vec<(Desc, Range<usize>)>,
}

/// A packet's capture time in ns since the epoch, if it has one.
pub fn nanos(p: &Packet) -> Option<i64> {
    p.ts.as_ref()
        .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
}

/// Frames `packets`, sorted by (connection, seq) with no repeats.
pub fn encode(packets: &[Packet]) -> Encoded {
    let mut buf = Vec::new();
    // The frame's own position is not used: rows carry their batch number instead.
    let enc = frame::encode(&mut buf, 0, packets, &[]);
    let mut blocks = Vec::with_capacity(enc.blocks.len());
    let mut at = 0;
    for b in &enc.blocks {
        let of_block = &packets[at..at + b.count as usize];
        at += b.count as usize;
        let times = of_block.iter().filter_map(nanos);
        let desc = Desc {
            conn: b.conn,
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            packets: b.count,
            bytes: of_block
                .iter()
                .map(|p| (p.data.len() + p.original.len()) as u64)
                .sum(),
            ts_min: times.clone().min(),
            ts_max: times.max(),
            untimed: of_block.iter().any(|p| p.ts.is_none()),
        };
        let start = b.offset as usize;
        blocks.push((desc, start..start + b.len as usize));
    }
    Encoded { buf, blocks }
}

impl Encoded {
    /// The rows to store: every block cut into pieces of at most `piece` bytes.
    pub fn rows(&self, piece: usize) -> impl Iterator<Item = Row<'_>> {
        self.blocks.iter().flat_map(move |(desc, range)| {
            let bytes = &self.buf[range.clone()];
            let parts = bytes.len().div_ceil(piece).max(1) as i32;
            // An empty block cannot be (every packet record has a header), but one row
            // each still keeps a block's description.
            let pieces: Vec<&[u8]> = if bytes.is_empty() {
                vec![bytes]
            } else {
                bytes.chunks(piece).collect()
            };
            pieces.into_iter().enumerate().map(move |(part, body)| Row {
                desc,
                part: part as i32,
                parts,
                body,
            })
        })
    }
}

/// Joins rows read in (connection, first seq, part) order back into whole blocks.
#[derive(Debug, Default)]
pub struct Joiner {
    /// The block being joined: (connection, first seq), the next part expected, its bytes.
    partial: Option<((i64, i64), i32, Vec<u8>)>,
}

impl Joiner {
    /// Adds piece `part` of `parts` of the block `(conn, first_seq)`: its bytes once the
    /// block is whole. A block whose later pieces never come (purged between two reads)
    /// is dropped when the next block starts; a piece out of order is corrupt.
    pub fn add(
        &mut self,
        block: (i64, i64),
        part: i32,
        parts: i32,
        body: Vec<u8>,
    ) -> Result<Option<Bytes>, FrameError> {
        if part == 0 {
            self.partial = None;
            if parts == 1 {
                return Ok(Some(Bytes::from(body)));
            }
            self.partial = Some((block, 1, body));
            return Ok(None);
        }
        match &mut self.partial {
            Some((key, next, bytes)) if *key == block && *next == part => {
                bytes.extend_from_slice(&body);
                *next += 1;
                if part + 1 < parts {
                    return Ok(None);
                }
                let (_, _, bytes) = self.partial.take().unwrap_or_default();
                Ok(Some(Bytes::from(bytes)))
            }
            _ => Err(FrameError::Short),
        }
    }
}

/// The `count` packets of a whole block, each passed to `f`.
pub fn decode(block: &Bytes, count: usize, f: impl FnMut(Packet)) -> Result<(), FrameError> {
    let end = frame::packets(block, count, f)?;
    if end != block.len() {
        return Err(FrameError::Short);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn packet() -> impl Strategy<Value = Packet> {
        (
            1u64..4,
            any::<u8>(),
            proptest::option::of((any::<i32>(), 0i32..1_000_000_000)),
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            any::<bool>(),
            0i32..3,
        )
            .prop_map(
                |(conn_id, seq, ts, data, original, dropped, direction)| Packet {
                    conn_id,
                    seq: u64::from(seq) + 1,
                    direction,
                    ts: ts.map(|(s, n)| prost_types::Timestamp {
                        seconds: i64::from(s),
                        nanos: n,
                    }),
                    data: data.into(),
                    modified: original.is_some(),
                    original: original.unwrap_or_default().into(),
                    dropped,
                },
            )
    }

    /// Packets sorted by (connection, seq) with no repeats, as a commit stores them.
    fn batch() -> impl Strategy<Value = Vec<Packet>> {
        proptest::collection::vec(packet(), 0..60).prop_map(|mut v| {
            v.sort_by_key(|p| (p.conn_id, p.seq));
            v.dedup_by_key(|p| (p.conn_id, p.seq));
            v
        })
    }

    /// Rows joined and decoded, per block.
    fn read_back(enc: &Encoded, piece: usize) -> Vec<(Desc, Vec<Packet>)> {
        let mut joiner = Joiner::default();
        let mut out = Vec::new();
        for row in enc.rows(piece) {
            assert!(row.body.len() <= piece);
            let key = (row.desc.conn as i64, row.desc.first_seq as i64);
            if let Some(block) = joiner
                .add(key, row.part, row.parts, row.body.to_vec())
                .unwrap()
            {
                let mut packets = Vec::new();
                decode(&block, row.desc.packets as usize, |p| packets.push(p)).unwrap();
                out.push((*row.desc, packets));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the packets and the piece size, the rows give every packet back
        /// byte-exact, block by block, and each block's description holds for its packets.
        #[test]
        fn blocks_round_trip_through_rows(packets in batch(), piece in 1usize..300) {
            let enc = encode(&packets);
            let blocks = read_back(&enc, piece);
            let all: Vec<Packet> = blocks.iter().flat_map(|(_, p)| p.clone()).collect();
            prop_assert_eq!(&all, &packets);
            for (desc, of_block) in &blocks {
                prop_assert!(of_block.iter().all(|p| p.conn_id == desc.conn));
                prop_assert_eq!(of_block.first().map(|p| p.seq), Some(desc.first_seq));
                prop_assert_eq!(of_block.last().map(|p| p.seq), Some(desc.last_seq));
                prop_assert_eq!(desc.packets as usize, of_block.len());
                let bytes: usize = of_block.iter().map(|p| p.data.len() + p.original.len()).sum();
                prop_assert_eq!(desc.bytes, bytes as u64);
                prop_assert_eq!(desc.ts_min, of_block.iter().filter_map(nanos).min());
                prop_assert_eq!(desc.ts_max, of_block.iter().filter_map(nanos).max());
                prop_assert_eq!(desc.untimed, of_block.iter().any(|p| p.ts.is_none()));
            }
            let conns: Vec<u64> = blocks.iter().map(|(d, _)| d.conn).collect();
            let mut distinct = conns.clone();
            distinct.dedup();
            prop_assert_eq!(conns, distinct, "one block per connection");
        }

        /// A block cut short anywhere does not decode; it never panics.
        #[test]
        fn a_block_cut_short_is_refused(packets in batch(), cut in any::<prop::sample::Index>()) {
            let enc = encode(&packets);
            for (desc, range) in &enc.blocks {
                let bytes = Bytes::copy_from_slice(&enc.buf[range.clone()]);
                let at = cut.index(bytes.len());
                let short = bytes.slice(..at);
                let refused = decode(&short, desc.packets as usize, drop).is_err();
                prop_assert!(refused);
            }
        }
    }

    #[test]
    fn a_piece_out_of_order_is_corrupt_and_a_dropped_block_is_skipped() {
        let mut j = Joiner::default();
        assert_eq!(j.add((1, 1), 0, 3, b"ab".to_vec()), Ok(None));
        assert_eq!(j.add((1, 1), 2, 3, b"ef".to_vec()), Err(FrameError::Short));
        // A block whose later pieces went: the next block starts over.
        assert_eq!(j.add((1, 1), 0, 2, b"ab".to_vec()), Ok(None));
        assert_eq!(
            j.add((1, 5), 0, 1, b"x".to_vec()),
            Ok(Some(Bytes::from_static(b"x")))
        );
        assert_eq!(j.add((1, 5), 1, 2, b"y".to_vec()), Err(FrameError::Short));
    }
}
