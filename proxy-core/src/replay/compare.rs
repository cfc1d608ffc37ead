//! The comparison of a replay's server side with the original's, sans I/O: the original's
//! server-to-client packets are fed in as they are fetched, the replay's bytes as they
//! arrive, and [`Comparer::finish`] names the first difference by the original's packet and
//! offset. Packet boundaries are not compared (TCP may cut a stream anywhere), only bytes.

use std::collections::VecDeque;

use bytes::Bytes;
use proto::replay::Comparison;

/// Compares two byte streams incrementally: `expect` (the original's packets) and `got`
/// (the replay's reads).
#[derive(Debug, Default)]
pub struct Comparer {
    /// Original packets not yet fully matched: (1-based index, seq, bytes).
    pending: VecDeque<(u32, u64, Bytes)>,
    /// Offset already matched within the front pending packet.
    at: usize,
    /// Packets fed so far.
    fed: u32,
    /// Original bytes fed so far.
    expected_total: u64,
    /// Bytes matched so far.
    matched: u64,
    /// Replay bytes received beyond the original's (only counted once the original is
    /// complete).
    extra: u64,
    /// Replay bytes received while the original's next packet was not fed yet.
    waiting: Vec<u8>,
    /// The first difference, once found.
    diff: Option<Comparison>,
}

impl Comparer {
    /// An empty comparison.
    pub fn new() -> Self {
        Self::default()
    }

    /// The original's next server-to-client packet (in order).
    pub fn expect(&mut self, seq: u64, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.fed += 1;
        self.expected_total += data.len() as u64;
        self.pending.push_back((self.fed, seq, data));
        if !self.waiting.is_empty() {
            let w = std::mem::take(&mut self.waiting);
            self.got(&w);
        }
    }

    /// Bytes of the replay's server side, in order.
    pub fn got(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.diff.is_none() {
            let Some((index, seq, packet)) = self.pending.front() else {
                // Nothing left to compare against yet: keep it until more is fed or the
                // end says the original is complete.
                self.waiting.extend_from_slice(data);
                return;
            };
            let rest = &packet[self.at..];
            let n = rest.len().min(data.len());
            if let Some(i) = first_mismatch(&rest[..n], &data[..n]) {
                let offset = (self.at + i) as u64;
                self.diff = Some(Comparison {
                    identical: false,
                    packet: *index,
                    seq: *seq,
                    offset,
                    stream_offset: self.matched + i as u64,
                    summary: format!(
                        "differs at server packet {index} (seq {seq}), offset {offset}: the \
                         original has 0x{:02x}, the replay 0x{:02x}",
                        rest[i], data[i]
                    ),
                });
                return;
            }
            self.matched += n as u64;
            self.at += n;
            data = &data[n..];
            if self.at == packet.len() {
                self.pending.pop_front();
                self.at = 0;
            }
        }
    }

    /// The first difference found so far, if any.
    pub fn difference(&self) -> Option<&Comparison> {
        self.diff.as_ref()
    }

    /// The result once the replay's server side ended and every original packet was fed.
    pub fn finish(mut self) -> Comparison {
        if let Some(d) = self.diff.take() {
            return d;
        }
        self.extra = self.waiting.len() as u64;
        if self.extra > 0 {
            return Comparison {
                identical: false,
                stream_offset: self.matched,
                summary: format!(
                    "the replay's server sent {} bytes more than the original's {} bytes",
                    self.extra, self.expected_total
                ),
                ..Default::default()
            };
        }
        if let Some((index, seq, _)) = self.pending.front() {
            let offset = self.at as u64;
            return Comparison {
                identical: false,
                packet: *index,
                seq: *seq,
                offset,
                stream_offset: self.matched,
                summary: format!(
                    "the replay's server stopped after {} of the original's {} bytes (server \
                     packet {index}, seq {seq}, offset {offset})",
                    self.matched, self.expected_total
                ),
            };
        }
        Comparison {
            identical: true,
            stream_offset: self.matched,
            summary: format!("identical ({} bytes)", self.matched),
            ..Default::default()
        }
    }
}

/// The index of the first byte where `a` and `b` (equal lengths) differ.
fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fed(packets: &[&[u8]]) -> Comparer {
        let mut c = Comparer::new();
        for (i, p) in packets.iter().enumerate() {
            c.expect(2 * i as u64 + 2, Bytes::copy_from_slice(p));
        }
        c
    }

    #[test]
    fn identical_whatever_the_cuts() {
        let mut c = fed(&[b"hello ", b"world"]);
        c.got(b"hel");
        c.got(b"lo wor");
        c.got(b"ld");
        let r = c.finish();
        assert!(r.identical, "{r:?}");
        assert_eq!(r.summary, "identical (11 bytes)");
    }

    #[test]
    fn names_the_packet_and_offset_of_the_first_difference() {
        let mut c = fed(&[b"hello ", b"world"]);
        c.got(b"hello wXrld and more");
        let r = c.finish();
        assert!(!r.identical);
        assert_eq!((r.packet, r.seq, r.offset, r.stream_offset), (2, 4, 1, 7));
        assert!(
            r.summary.contains("server packet 2 (seq 4), offset 1"),
            "{}",
            r.summary
        );
    }

    #[test]
    fn short_and_long_replays_are_named() {
        let mut c = fed(&[b"abc", b"def"]);
        c.got(b"abcd");
        let r = c.finish();
        assert_eq!((r.identical, r.packet, r.offset), (false, 2, 1));
        assert!(
            r.summary
                .contains("stopped after 4 of the original's 6 bytes")
        );
        let mut c = fed(&[b"abc"]);
        c.got(b"abcdef");
        let r = c.finish();
        assert_eq!((r.identical, r.packet, r.stream_offset), (false, 0, 3));
        assert!(r.summary.contains("3 bytes more"), "{}", r.summary);
    }

    #[test]
    fn bytes_ahead_of_the_feed_wait_for_it() {
        let mut c = Comparer::new();
        c.got(b"abcx");
        c.expect(1, Bytes::from_static(b"ab"));
        assert!(c.difference().is_none());
        c.expect(3, Bytes::from_static(b"cd"));
        let r = c.difference().cloned().expect("difference");
        assert_eq!((r.packet, r.seq, r.offset), (2, 3, 1));
    }

    proptest! {
        #[test]
        fn any_cut_of_the_same_bytes_is_identical(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20), 0..8),
            cuts in proptest::collection::vec(1usize..30, 0..20),
        ) {
            let all: Vec<u8> = packets.concat();
            let mut c = Comparer::new();
            for (i, p) in packets.iter().enumerate() {
                c.expect(i as u64 + 1, Bytes::copy_from_slice(p));
            }
            let mut rest = &all[..];
            for n in cuts {
                let n = n.min(rest.len());
                c.got(&rest[..n]);
                rest = &rest[n..];
            }
            c.got(rest);
            prop_assert!(c.finish().identical);
        }

        #[test]
        fn one_changed_byte_is_found_where_it_is(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20), 1..8),
            pick in any::<proptest::sample::Index>(),
        ) {
            let mut all: Vec<u8> = packets.concat();
            let at = pick.index(all.len());
            all[at] ^= 0x55;
            let mut c = Comparer::new();
            for (i, p) in packets.iter().enumerate() {
                c.expect(i as u64 + 1, Bytes::copy_from_slice(p));
            }
            c.got(&all);
            let r = c.finish();
            prop_assert!(!r.identical);
            prop_assert_eq!(r.stream_offset, at as u64);
            let before: usize = packets[..r.packet as usize - 1].iter().map(Vec::len).sum();
            prop_assert_eq!(before + r.offset as usize, at);
        }
    }
}
