//! A replay's edits to the original's client-to-server packets, sans I/O: whole new bytes
//! for some packets, literal replace-all rules, and a choice of packets to send. Checked
//! once per request ([`Edits::new`]) and applied per packet ([`Edits::apply`]).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use proto::replay::ReplayRequest;

use crate::hold::rules::replace_all;

/// Most replace rules in one request.
pub const MAX_REPLACEMENTS: usize = 64;
/// Largest a packet may grow to through replace rules; beyond it the request's run fails
/// with a clear error rather than allocating without bound.
pub const MAX_EDITED_PACKET: usize = 16 * 1024 * 1024;

/// Why the edits of a request are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// A replace rule with nothing to find.
    #[error("replacement {0}: the bytes to find are empty")]
    EmptyFind(usize),
    /// Too many replace rules.
    #[error("{0} replacements: at most {MAX_REPLACEMENTS}")]
    TooManyReplacements(usize),
    /// The same packet is given twice.
    #[error("packet {0} is given new bytes twice")]
    DuplicatePacket(u64),
    /// Sequence number 0 does not exist.
    #[error("packet sequence numbers start at 1")]
    ZeroSeq,
    /// A packet grew beyond [`MAX_EDITED_PACKET`].
    #[error(
        "the replacements would make packet {seq} {would_be} bytes (at most {MAX_EDITED_PACKET})"
    )]
    TooLarge {
        /// The packet.
        seq: u64,
        /// Its size after the rules.
        would_be: u128,
    },
}

/// The edits of one replay request.
#[derive(Debug, Clone, Default)]
pub struct Edits {
    replacements: Vec<(Bytes, Bytes)>,
    packets: HashMap<u64, Bytes>,
    only: Option<HashSet<u64>>,
}

impl Edits {
    /// The request's edits, checked.
    pub fn new(req: &ReplayRequest) -> Result<Self, EditError> {
        if req.replacements.len() > MAX_REPLACEMENTS {
            return Err(EditError::TooManyReplacements(req.replacements.len()));
        }
        let mut replacements = Vec::with_capacity(req.replacements.len());
        for (i, r) in req.replacements.iter().enumerate() {
            if r.find.is_empty() {
                return Err(EditError::EmptyFind(i + 1));
            }
            replacements.push((
                Bytes::copy_from_slice(&r.find),
                Bytes::copy_from_slice(&r.replace),
            ));
        }
        let mut packets = HashMap::new();
        for p in &req.packets {
            if p.seq == 0 {
                return Err(EditError::ZeroSeq);
            }
            if packets
                .insert(p.seq, Bytes::copy_from_slice(&p.data))
                .is_some()
            {
                return Err(EditError::DuplicatePacket(p.seq));
            }
        }
        if req.only.contains(&0) {
            return Err(EditError::ZeroSeq);
        }
        let only = (!req.only.is_empty()).then(|| req.only.iter().copied().collect());
        Ok(Self {
            replacements,
            packets,
            only,
        })
    }

    /// Whether nothing is changed.
    pub fn is_empty(&self) -> bool {
        self.replacements.is_empty() && self.packets.is_empty() && self.only.is_none()
    }

    /// Packet numbers named (by `packets` or `only`) that `exists` says are not client
    /// packets of the original, sorted.
    pub fn unknown_seqs(&self, exists: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .packets
            .keys()
            .chain(self.only.iter().flatten())
            .copied()
            .filter(|s| !exists(*s))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The bytes to send for the original's packet `seq`, or `None` when it is not sent
    /// (left out by `only`, or edited to nothing).
    pub fn apply(&self, seq: u64, data: Bytes) -> Result<Option<Bytes>, EditError> {
        if self.only.as_ref().is_some_and(|o| !o.contains(&seq)) {
            return Ok(None);
        }
        let mut data = self.packets.get(&seq).cloned().unwrap_or(data);
        for (find, replace) in &self.replacements {
            match replace_all(&data, find, replace, MAX_EDITED_PACKET) {
                Ok(Some(v)) => data = Bytes::from(v),
                Ok(None) => {}
                Err(e) => {
                    return Err(EditError::TooLarge {
                        seq,
                        would_be: e.would_be,
                    });
                }
            }
        }
        Ok((!data.is_empty()).then_some(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::replay::{PacketEdit, Replacement};

    fn req() -> ReplayRequest {
        ReplayRequest {
            conn_id: 1,
            ..Default::default()
        }
    }

    #[test]
    fn no_edits_send_every_packet_as_it_was() {
        let e = Edits::new(&req()).unwrap();
        assert!(e.is_empty());
        assert_eq!(
            e.apply(3, Bytes::from_static(b"abc")).unwrap().as_deref(),
            Some(&b"abc"[..])
        );
    }

    #[test]
    fn packet_bytes_then_rules_then_only() {
        let mut r = req();
        r.packets.push(PacketEdit {
            seq: 3,
            data: b"hello hello".to_vec(),
        });
        r.replacements.push(Replacement {
            find: b"hello".to_vec(),
            replace: b"bye".to_vec(),
        });
        r.only = vec![3, 5];
        let e = Edits::new(&r).unwrap();
        assert_eq!(
            e.apply(3, Bytes::from_static(b"x")).unwrap().as_deref(),
            Some(&b"bye bye"[..])
        );
        assert_eq!(e.apply(4, Bytes::from_static(b"hello")).unwrap(), None);
        assert_eq!(
            e.apply(5, Bytes::from_static(b"hello!"))
                .unwrap()
                .as_deref(),
            Some(&b"bye!"[..])
        );
        assert_eq!(e.unknown_seqs(|s| s == 3), vec![5]);
    }

    #[test]
    fn bad_edits_are_refused_by_name() {
        let mut r = req();
        r.replacements.push(Replacement::default());
        assert_eq!(Edits::new(&r).unwrap_err(), EditError::EmptyFind(1));
        let mut r = req();
        r.packets = vec![
            PacketEdit {
                seq: 2,
                data: vec![],
            },
            PacketEdit {
                seq: 2,
                data: vec![1],
            },
        ];
        assert_eq!(Edits::new(&r).unwrap_err(), EditError::DuplicatePacket(2));
        let mut r = req();
        r.only = vec![0];
        assert_eq!(Edits::new(&r).unwrap_err(), EditError::ZeroSeq);
        let mut r = req();
        r.replacements.push(Replacement {
            find: b"a".to_vec(),
            replace: vec![b'b'; 1 << 20],
        });
        let e = Edits::new(&r).unwrap();
        let err = e.apply(7, Bytes::from(vec![b'a'; 64])).unwrap_err();
        assert!(err.to_string().contains("packet 7"), "{err}");
    }
}
