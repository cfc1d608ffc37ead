//! The arrival order: the order in which history packets and connection closes were
//! recorded, so a follower (`FollowHistory`) can tail the history as it grows.
//!
//! Every write of fresh packets or closed records takes the next *position* (1, 2, 3, ...)
//! and is one frame of the history log ([`super::log`]), so the log itself is the arrival
//! order: a follower reads frames after its position, found through each segment's index of
//! frame offsets. Positions are assigned under the log's writer lock and announced after the
//! write, so a reader that has seen position N finds every frame up to N.
//!
//! A follower reads the log from disk at its own pace: however slow it is, the registry
//! buffers nothing for it.

use proto::common::{Connection, Packet};
use tokio::sync::watch;

use super::{Store, StoreError};

/// One thing a follower is told, in log order.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    Packet(Packet),
    Closed(Box<Connection>),
}

/// A page of the log read by a follower.
pub struct LogPage {
    /// What was recorded, each with its position, in order.
    pub items: Vec<(u64, Followed)>,
    /// The last position read (the cursor to continue from).
    pub last: u64,
}

impl Store {
    /// The last position written to the arrival log.
    pub fn position(&self) -> u64 {
        self.log.position()
    }

    /// A receiver that wakes when the arrival log grows.
    pub fn follow_positions(&self) -> watch::Receiver<u64> {
        self.log.subscribe()
    }

    /// What was recorded after position `after` (of connection `conn_id` only, unless 0),
    /// up to about `max_bytes` of payload and at most `max_entries` positions. Segments
    /// removed meanwhile are skipped.
    pub fn log_after(
        &self,
        after: u64,
        conn_id: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        let (frames, last) = self.log.after(after, conn_id, max_entries, max_bytes)?;
        let mut items = Vec::new();
        for f in frames {
            let n = f.pos;
            items.extend(f.packets.into_iter().map(|p| (n, Followed::Packet(p))));
            items.extend(
                f.closed
                    .into_iter()
                    .map(|c| (n, Followed::Closed(Box::new(c)))),
            );
        }
        Ok(LogPage { items, last })
    }
}

#[cfg(test)]
mod tests {
    use proto::common::{ConnStatus, Direction};

    use super::*;

    fn pkt(conn_id: u64, seq: u64) -> Packet {
        Packet {
            conn_id,
            seq,
            direction: Direction::C2s as i32,
            data: format!("{conn_id}/{seq}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn seqs(page: &LogPage) -> Vec<(u64, String)> {
        page.items
            .iter()
            .map(|(n, f)| match f {
                Followed::Packet(p) => (*n, format!("{}/{}", p.conn_id, p.seq)),
                Followed::Closed(c) => (*n, format!("closed {}", c.id)),
            })
            .collect()
    }

    #[test]
    fn the_log_lists_each_fresh_packet_once_in_recording_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        assert_eq!(s.position(), 0);
        s.record(vec![pkt(2, 1), pkt(1, 1)], Vec::new()).unwrap();
        // A replay of the same batch is not fresh: no position, nothing logged twice.
        s.record(vec![pkt(2, 1), pkt(1, 1)], Vec::new()).unwrap();
        assert_eq!(s.position(), 1);
        let closed = Connection {
            id: 1,
            status: ConnStatus::Disconnected as i32,
            ..Default::default()
        };
        s.record(vec![pkt(1, 2), pkt(2, 1)], vec![closed]).unwrap();
        assert_eq!(s.position(), 2);
        let all = s.log_after(0, 0, 100, 1 << 20).unwrap();
        assert_eq!(all.last, 2);
        assert_eq!(
            seqs(&all),
            [
                (1, "1/1".to_string()),
                (1, "2/1".to_string()),
                (2, "1/2".to_string()),
                (2, "closed 1".to_string())
            ]
        );
        let later = s.log_after(1, 0, 100, 1 << 20).unwrap();
        assert_eq!(seqs(&later), [(2, "1/2".into()), (2, "closed 1".into())]);
        let only_2 = s.log_after(0, 2, 100, 1 << 20).unwrap();
        assert_eq!(seqs(&only_2), [(1, "2/1".to_string())]);
        let one_entry = s.log_after(0, 0, 1, 1 << 20).unwrap();
        assert_eq!(one_entry.last, 1);
        assert!(s.log_after(2, 0, 100, 1 << 20).unwrap().items.is_empty());
    }

    #[test]
    fn positions_continue_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).expect("open");
            s.record(vec![pkt(1, 1)], Vec::new()).unwrap();
            s.record(vec![pkt(1, 2)], Vec::new()).unwrap();
            s.commit().unwrap();
        }
        // A fresh sled handle of the same path in one process can hit the lock: use a copy.
        let copy = dir.path().join("copy");
        copy_dir(&path, &copy);
        let s = Store::open(&copy).expect("reopen");
        assert_eq!(s.position(), 2);
        s.record(vec![pkt(1, 3)], Vec::new()).unwrap();
        assert_eq!(s.position(), 3);
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }
}
