//! Purging history on request (`PurgeHistory`, `interpose history purge`): the packets of
//! some connections, those recorded before a time, or all of it.
//!
//! The log is closed at the current position first, so every packet is in a closed segment.
//! A segment all of whose packets go is deleted whole; one that keeps some is written anew
//! without the purged packets (same positions, same order) and renamed over the old file.
//! The counts are made durable before any file is deleted.
//!
//! Followers (`FollowHistory`) simply no longer see purged packets; positions continue.

use std::sync::atomic::Ordering;

use proto::common::Packet;

use super::{Store, StoreError, log::Summary};

/// What to purge.
#[derive(Debug, Clone, PartialEq)]
pub enum Purge {
    /// Every packet of these connections.
    Conns(Vec<u64>),
    /// Every packet whose timestamp is before this time (packets without one are kept).
    Before(prost_types::Timestamp),
    /// Everything.
    All,
}

impl Purge {
    /// The purge a `PurgeHistory` request asks for; exactly one selector must be set.
    pub fn from_request(req: &proto::registry::PurgeHistoryRequest) -> Result<Self, StoreError> {
        match (!req.conn_ids.is_empty(), &req.before, req.all) {
            (true, None, false) => Ok(Self::Conns(req.conn_ids.clone())),
            (false, Some(t), false) => Ok(Self::Before(*t)),
            (false, None, true) => Ok(Self::All),
            _ => Err(StoreError::Invalid(
                "purge wants exactly one of conn_ids, before and all".into(),
            )),
        }
    }
}

/// What a purge removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Packets taken out of the history.
    pub packets: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Bytes of segment files deleted (purged bytes in segments still holding kept
    /// packets stay on disk until those go).
    pub freed_bytes: u64,
}

fn before(ts: &Option<prost_types::Timestamp>, t: &prost_types::Timestamp) -> bool {
    ts.as_ref()
        .is_some_and(|ts| (ts.seconds, ts.nanos) < (t.seconds, t.nanos))
}

impl Store {
    /// Purges the history `what` selects; see the module documentation.
    pub fn purge(&self, what: &Purge) -> Result<Purged, StoreError> {
        let gone = |p: &Packet| match what {
            Purge::Conns(ids) => ids.contains(&p.conn_id),
            Purge::Before(t) => before(&p.ts, t),
            Purge::All => true,
        };
        // A segment all of whose packets go is deleted without being read.
        let keeps_none = |s: &Summary, conns: &[u64]| match what {
            Purge::Conns(ids) => conns.iter().all(|c| ids.contains(c)),
            Purge::Before(t) => s.untimed == 0 && s.max_ts < (t.seconds, t.nanos),
            Purge::All => true,
        };
        let p = self.log.purge(&gone, *what == Purge::All, &keeps_none)?;
        let b = &self.budget;
        b.purged_packets.fetch_add(p.packets, Ordering::Relaxed);
        b.purged_bytes.fetch_add(p.bytes, Ordering::Relaxed);
        // Counted and made durable before the files go: a crash in between leaves segments
        // that a purge would delete again, never a count missing.
        self.save_counts()?;
        self.meta.flush()?;
        for n in &p.emptied {
            self.log.remove(*n)?;
        }
        let out = Purged {
            packets: p.packets,
            bytes: p.bytes,
            freed_bytes: p.freed,
        };
        tracing::info!(
            packets = out.packets,
            bytes = out.bytes,
            freed_bytes = out.freed_bytes,
            "purged history on request"
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proto::common::Packet;

    use super::*;
    use crate::backend::sled_store::HistoryOptions;

    fn pkt(conn_id: u64, seq: u64, secs: i64) -> Packet {
        Packet {
            conn_id,
            seq,
            ts: Some(prost_types::Timestamp {
                seconds: secs,
                nanos: 0,
            }),
            data: vec![conn_id as u8; 500].into(),
            ..Default::default()
        }
    }

    fn kept(s: &Store) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        s.scan_history((0, 0), false, |p| {
            got.push((p.conn_id, p.seq));
            true
        })
        .unwrap();
        got
    }

    fn store(dir: &tempfile::TempDir) -> Store {
        let options = HistoryOptions {
            segment_bytes: Some(1000),
            ..Default::default()
        };
        Store::open_with(&dir.path().join("db"), &options).unwrap()
    }

    #[test]
    fn purging_connections_frees_the_segments_only_they_used() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        // Frames of two 500-byte packets take 1116 bytes, of one 572, and each closes its
        // segment. Segment 1: conn 1's two packets; segment 2: conn 1 and conn 2; segment
        // 3: conn 2.
        s.put_packets(vec![pkt(1, 1, 10), pkt(1, 2, 10)]).unwrap();
        s.put_packets(vec![pkt(2, 1, 20), pkt(1, 3, 20)]).unwrap();
        s.put_packets(vec![pkt(2, 2, 30)]).unwrap();
        let got = s.purge(&Purge::Conns(vec![1, 99])).unwrap();
        assert_eq!(
            got,
            Purged {
                packets: 3,
                bytes: 1500,
                freed_bytes: 1116 + (1116 - 572)
            }
        );
        assert_eq!(kept(&s), [(2, 1), (2, 2)]);
        assert_eq!(
            s.log.numbers(),
            [2, 3, 4],
            "segment 2 was written anew with (2, 1)"
        );
        assert_eq!((s.history_len(), s.budget().purged()), (2, (3, 1500)));
    }

    #[test]
    fn purging_before_a_time_keeps_later_and_untimed_packets() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put_packets(vec![pkt(1, 1, 10), pkt(1, 2, 10)]).unwrap();
        let mut untimed = pkt(1, 3, 0);
        untimed.ts = None;
        s.put_packets(vec![untimed, pkt(2, 1, 30)]).unwrap();
        let cut = prost_types::Timestamp {
            seconds: 20,
            nanos: 0,
        };
        let got = s.purge(&Purge::Before(cut)).unwrap();
        assert_eq!((got.packets, got.freed_bytes), (2, 1116));
        assert_eq!(kept(&s), [(1, 3), (2, 1)]);
    }

    #[test]
    fn purging_all_deletes_every_segment_and_recording_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put_packets(vec![pkt(1, 1, 10), pkt(1, 2, 10)]).unwrap();
        s.put_packets(vec![pkt(2, 1, 20)]).unwrap();
        let got = s.purge(&Purge::All).unwrap();
        assert_eq!(
            got,
            Purged {
                packets: 3,
                bytes: 1500,
                freed_bytes: 1116 + 572
            }
        );
        assert_eq!(
            (kept(&s), s.history_bytes(), s.history_len()),
            (vec![], 0, 0)
        );
        s.put_packets(vec![pkt(3, 1, 30)]).unwrap();
        assert_eq!(kept(&s), [(3, 1)]);
        assert_eq!(s.purge(&Purge::All).unwrap().packets, 1);
    }
}
