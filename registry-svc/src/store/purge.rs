//! Purging history on request (`PurgeHistory`, `interpose history purge`): the packets of
//! some connections, those recorded before a time, or all of it.
//!
//! The runs are rewritten without the purged packets, their `segment_runs` entries for
//! segments they no longer reach removed and the counts written, in one sled transaction;
//! after a flush, every closed segment that no entry points into any more is deleted. A
//! segment still holding one kept packet stays (its purged bytes are freed when it is
//! evicted or purged in full): files are deleted, never rewritten. A crash after the flush
//! leaves a file nothing points into, deleted at the next open.
//!
//! Followers (`FollowHistory`) simply no longer see purged packets; the arrival log keeps
//! its positions so that they continue across restarts.

use std::{collections::BTreeSet, sync::atomic::Ordering};

use prost::Message;

use super::{
    HISTORY_COUNT, Run, Store, StoreError, StoredPacket, budget::PURGED_BYTES,
    budget::PURGED_PACKETS, decode, history_key, segment_run_key,
};

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
        // Held throughout: no write interleaves with the rewrite of a run.
        let _writes = self.arrivals.lock();
        let keys: Vec<sled::IVec> = match what {
            Purge::Conns(ids) => {
                let mut keys = Vec::new();
                for &id in ids {
                    let range = history_key(id, 0)..=history_key(id, u64::MAX);
                    for k in self.history.range(range).keys() {
                        keys.push(k?);
                    }
                }
                keys
            }
            Purge::Before(_) | Purge::All => {
                self.history.iter().keys().collect::<Result<_, _>>()?
            }
        };
        let purged_here = |p: &StoredPacket| match what {
            Purge::Conns(_) | Purge::All => true,
            Purge::Before(t) => before(&p.ts, t),
        };
        let mut out = Purged::default();
        let mut runs: Vec<(sled::IVec, Option<Vec<u8>>)> = Vec::new();
        let mut unindexed: Vec<[u8; 24]> = Vec::new();
        let mut touched = BTreeSet::new();
        for key in keys {
            let Some(v) = self.history.get(&key)? else {
                continue;
            };
            let mut run: Run = decode("history run", &v)?;
            let segments = |r: &Run| -> BTreeSet<u64> {
                r.packets
                    .iter()
                    .filter(|p| p.log_len > 0)
                    .map(|p| p.segment)
                    .collect()
            };
            let had = segments(&run);
            let before_len = run.packets.len();
            run.packets.retain(|p| {
                let gone = purged_here(p);
                if gone {
                    out.packets += 1;
                    out.bytes += p.log_len.max(p.data.len() as u64);
                }
                !gone
            });
            if run.packets.len() == before_len {
                continue;
            }
            let has = segments(&run);
            if let Ok(k16) = <[u8; 16]>::try_from(key.as_ref()) {
                for &n in had.difference(&has) {
                    unindexed.push(segment_run_key(n, &k16));
                    touched.insert(n);
                }
            }
            runs.push((key, (!run.packets.is_empty()).then(|| run.encode_to_vec())));
        }
        let b = &self.budget;
        b.purged_packets.fetch_add(out.packets, Ordering::Relaxed);
        b.purged_bytes.fetch_add(out.bytes, Ordering::Relaxed);
        let count = self
            .history_count
            .load(Ordering::Relaxed)
            .saturating_sub(out.packets);
        self.history_count.store(count, Ordering::Relaxed);
        let meta = [
            (PURGED_PACKETS, b.purged_packets.load(Ordering::Relaxed)),
            (PURGED_BYTES, b.purged_bytes.load(Ordering::Relaxed)),
            (HISTORY_COUNT, count),
        ];
        self.commit_trim(&runs, &unindexed, &meta, "purge")?;
        self.db.flush()?;
        let current = self.payloads.current();
        let current_unused = self
            .segment_runs
            .scan_prefix(current.to_be_bytes())
            .next()
            .is_none();
        if current_unused {
            // Nothing kept is in the segment being written: start a fresh one so it can go.
            self.payloads.close_current()?;
            touched.insert(current);
        }
        if *what == Purge::All {
            touched.extend(self.payloads.numbers());
        }
        out.freed_bytes = self.delete_unreferenced(touched)?;
        tracing::info!(
            packets = out.packets,
            bytes = out.bytes,
            freed_bytes = out.freed_bytes,
            "purged history on request"
        );
        Ok(out)
    }

    /// Deletes those of `segments` that are closed and that no entry points into; returns
    /// the bytes freed. Segment 0 (a store from before segments) has no index: it goes
    /// only when the history is empty.
    pub(super) fn delete_unreferenced(
        &self,
        segments: impl IntoIterator<Item = u64>,
    ) -> Result<u64, StoreError> {
        let current = self.payloads.current();
        let mut freed = 0;
        for n in segments {
            if n == current || !self.payloads.has(n) {
                continue;
            }
            let referenced = match n {
                0 => !self.history.is_empty(),
                n => self
                    .segment_runs
                    .scan_prefix(n.to_be_bytes())
                    .next()
                    .is_some(),
            };
            if !referenced {
                let before = self.payloads.total_bytes();
                self.payloads.remove(n)?;
                freed += before - self.payloads.total_bytes();
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use proto::common::Packet;

    use super::*;
    use crate::store::HistoryOptions;

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
        // Segment 1: conn 1's two packets; segment 2: conn 2 and conn 1; segment 3: conn 2.
        s.put_packets(vec![pkt(1, 1, 10), pkt(1, 2, 10)]).unwrap();
        s.put_packets(vec![pkt(2, 1, 20), pkt(1, 3, 20)]).unwrap();
        s.put_packets(vec![pkt(2, 2, 30)]).unwrap();
        let got = s.purge(&Purge::Conns(vec![1, 99])).unwrap();
        assert_eq!(
            got,
            Purged {
                packets: 3,
                bytes: 1500,
                freed_bytes: 1000
            }
        );
        assert_eq!(kept(&s), [(2, 1), (2, 2)]);
        assert_eq!(s.payloads.numbers(), [2, 3], "segment 2 still holds (2, 1)");
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
        assert_eq!((got.packets, got.freed_bytes), (2, 1000));
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
                freed_bytes: 1500
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
