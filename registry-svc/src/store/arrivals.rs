//! The arrival log: the order in which history packets and connection closes were recorded,
//! so a follower (`FollowHistory`) can tail the history as it grows.
//!
//! Every write of fresh packets or closed records takes the next *position* (1, 2, 3, ...):
//! the packets are stored with it (`StoredPacket::recorded`) and one `arrivals` entry,
//! position (8 bytes, big-endian) -> [`Arrival`], lists the runs they went into and the
//! closed records as they were then. Positions are assigned under one lock and announced
//! after the write, so a reader that has seen position N finds every entry up to N.
//!
//! A follower reads the log from disk at its own pace: however slow it is, the registry
//! buffers nothing for it. Packets stored before the log existed have position 0; they are
//! reached through a snapshot scan only.

use std::sync::{Mutex, MutexGuard};

use prost::Message;
use proto::common::{Connection, Packet};
use tokio::sync::watch;

use super::{Run, Store, StoreError, decode, split_history_key};

/// One log entry: where the packets recorded at a position went, and the records closed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Arrival {
    /// History keys of the runs holding the position's packets, in key order.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub runs: Vec<Vec<u8>>,
    /// Records closed at this position, as they were once closed.
    #[prost(message, repeated, tag = "2")]
    pub closed: Vec<Connection>,
}

/// One thing a follower is told, in log order.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    Packet(Packet),
    Closed(Box<Connection>),
}

/// The log's tree, its last position and the announcement of new positions.
pub struct Arrivals {
    tree: sled::Tree,
    last: Mutex<u64>,
    announce: watch::Sender<u64>,
}

impl Arrivals {
    /// Opens the log in `db`, continuing after its last position.
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("arrivals")?;
        let last = match tree.last()? {
            Some((k, _)) => position_of(&k),
            None => 0,
        };
        Ok(Self {
            tree,
            last: Mutex::new(last),
            announce: watch::channel(last).0,
        })
    }

    /// Holds the log for one write; [`Arrivals::next`] is the position it takes.
    pub fn lock(&self) -> MutexGuard<'_, u64> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `entry` at the position after `*last` and announces it.
    pub fn append(&self, last: &mut u64, entry: &Arrival) -> Result<(), StoreError> {
        let n = *last + 1;
        self.tree.insert(n.to_be_bytes(), entry.encode_to_vec())?;
        *last = n;
        self.announce.send_replace(n);
        Ok(())
    }

    /// Deletes the entries up to position `last` (their packets were removed).
    pub fn trim_through(&self, last: u64) -> Result<(), StoreError> {
        for k in self.tree.range(..=last.to_be_bytes()).keys() {
            self.tree.remove(k?)?;
        }
        Ok(())
    }

    /// The last position written.
    pub fn position(&self) -> u64 {
        *self.announce.borrow()
    }

    /// A receiver that wakes when a new position is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.announce.subscribe()
    }
}

fn position_of(k: &[u8]) -> u64 {
    <[u8; 8]>::try_from(k).map(u64::from_be_bytes).unwrap_or(0)
}

/// A page of the log read by a follower.
pub struct LogPage {
    /// What was recorded, each with its position, in order.
    pub items: Vec<(u64, Followed)>,
    /// The last position read (the cursor to continue from).
    pub last: u64,
}

impl Store {
    /// Stores `packets` (as [`Store::put_packets`]) and logs them, with the records
    /// `closed`, at the next position. Nothing is logged when nothing is new.
    pub fn record(&self, packets: Vec<Packet>, closed: Vec<Connection>) -> Result<(), StoreError> {
        let mut last = self.arrivals.lock();
        let runs = self.store_packets(packets, *last + 1)?;
        if runs.is_empty() && closed.is_empty() {
            return Ok(());
        }
        let runs = runs.iter().map(|k| k.to_vec()).collect();
        self.arrivals.append(&mut last, &Arrival { runs, closed })
    }

    /// The last position written to the arrival log.
    pub fn position(&self) -> u64 {
        self.arrivals.position()
    }

    /// A receiver that wakes when the arrival log grows.
    pub fn follow_positions(&self) -> watch::Receiver<u64> {
        self.arrivals.subscribe()
    }

    /// What was recorded after position `after` (of connection `conn_id` only, unless 0),
    /// up to about `max_bytes` of payload and at most `max_entries` positions. Runs removed
    /// meanwhile are skipped.
    pub fn log_after(
        &self,
        after: u64,
        conn_id: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        let mut page = LogPage {
            items: Vec::new(),
            last: after,
        };
        let mut bytes = 0;
        let start = after.saturating_add(1).to_be_bytes();
        for kv in self.arrivals.tree.range(start..).take(max_entries) {
            let (k, v) = kv?;
            let n = position_of(&k);
            let entry: Arrival = decode("arrival log entry", &v)?;
            for key in &entry.runs {
                let Some((conn, _)) = split_history_key(key) else {
                    continue;
                };
                if conn_id != 0 && conn != conn_id {
                    continue;
                }
                let Some(run) = self.history.get(key)? else {
                    continue;
                };
                let run: Run = decode("history run", &run)?;
                for p in run
                    .packets
                    .into_iter()
                    .filter(|p| p.recorded == n && self.holds(p))
                {
                    let p = self.load(p)?;
                    bytes += p.data.len() + p.original.len();
                    page.items.push((n, Followed::Packet(p)));
                }
            }
            page.items.extend(
                entry
                    .closed
                    .into_iter()
                    .filter(|c| conn_id == 0 || c.id == conn_id)
                    .map(|c| (n, Followed::Closed(Box::new(c)))),
            );
            page.last = n;
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(page)
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
            s.db.flush().unwrap();
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
