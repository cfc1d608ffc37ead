//! One `WatchConnections` stream: a snapshot of the matching records, read a page at a time,
//! then live changes, each change exactly once.
//!
//! Each page is read under the hub lock with the sequence number of the last change before
//! it ([`Hub::read`](crate::hub::Hub::read)); between pages writers go on. A live change
//! to a record the snapshot has already read is sent only if it is newer than the page that
//! read the record; a change to a record not read yet is left to the page that will read it.
//! So no lock is held across a whole-store scan and no whole-store list is built: a watcher
//! holds one page, the page boundaries, and (unless its filter matches every record) the
//! IDs it has been sent, to tell it when one leaves its view.

use std::{collections::HashSet, sync::Arc};

use platform::serve::Drain;
use proto::{
    common::Connection,
    registry::{self as pb, WatchEvent, watch_event::Kind as WatchKind},
};
use tokio::sync::{
    broadcast::{self, error::RecvError, error::TryRecvError},
    mpsc,
};
use tonic::Status;

use crate::{
    backend::{Change, PageAt},
    filter::matches,
    hub::Numbered,
    state::State,
};

/// Records read per hold of the hub lock.
const PAGE: usize = 4_096;

type Tx = mpsc::Sender<Result<WatchEvent, Status>>;

/// Why a watch stream stops or starts over.
enum Stop {
    /// The client left, or was told why the stream ended.
    Done,
    /// The watcher fell behind the live changes: it is sent `RESET` and a new snapshot.
    Lagged,
}

/// What the watcher has read and sent so far.
struct View {
    filter: pb::ConnectionFilter,
    /// Each page read: the last ID it covered and the sequence number it was read at.
    pages: Vec<(u64, u64)>,
    /// The first ID not read yet (`None` once the snapshot is complete).
    unread: Option<u64>,
    /// IDs sent and still in the view; `None` when the filter matches every record.
    known: Option<HashSet<u64>>,
    /// The lowest ID in the view: changes to records below it are not sent.
    start: u64,
}

impl View {
    fn new(filter: pb::ConnectionFilter, start: u64) -> Self {
        let everything = filter == pb::ConnectionFilter::default();
        Self {
            filter,
            pages: Vec::new(),
            unread: Some(start),
            known: (!everything).then(HashSet::new),
            start,
        }
    }

    /// Whether the snapshot already reflects change number `seq` to record `id`.
    fn has_seen(&self, seq: u64, id: u64) -> bool {
        if self.unread.is_some_and(|u| id >= u) {
            // A later page reads the record as it is then, this change included.
            return true;
        }
        let page = self.pages.partition_point(|&(last, _)| last < id);
        self.pages
            .get(page)
            .is_some_and(|&(_, read_at)| seq <= read_at)
    }

    /// The event to send for a live change, if any.
    fn event(&mut self, n: Numbered) -> Option<WatchEvent> {
        let id = match &n.change {
            Change::Upsert(c) => c.id,
            Change::Removed(id) => *id,
            Change::Reset => return None,
        };
        if id < self.start || self.has_seen(n.seq, id) {
            return None;
        }
        match n.change {
            Change::Upsert(c) if matches(&self.filter, &c) => {
                if let Some(known) = &mut self.known {
                    known.insert(c.id);
                }
                Some(upsert(Connection::clone(&c)))
            }
            Change::Upsert(_) | Change::Removed(_) | Change::Reset => {
                let was_in_view = self.known.as_mut().is_none_or(|k| k.remove(&id));
                was_in_view.then(|| marker(WatchKind::Removed, id))
            }
        }
    }
}

/// Streams a snapshot of the records from `start` up, then live changes to them;
/// re-snapshots after a `RESET` when the watcher lags.
pub async fn watch(
    state: Arc<State>,
    filter: pb::ConnectionFilter,
    start: u64,
    tx: Tx,
    drain: Drain,
) {
    loop {
        let mut view = View::new(filter.clone(), start);
        let mut rx = state.hub.subscribe();
        let stop = match snapshot(&state, &mut view, &mut rx, &tx).await {
            Ok(()) => live(&mut view, &mut rx, &tx, &drain).await,
            Err(stop) => stop,
        };
        match stop {
            Stop::Done => return,
            Stop::Lagged => {
                if tx.send(Ok(marker(WatchKind::Reset, 0))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends the matching records page by page, and the changes to pages already sent.
async fn snapshot(
    state: &Arc<State>,
    view: &mut View,
    rx: &mut broadcast::Receiver<Numbered>,
    tx: &Tx,
) -> Result<(), Stop> {
    while let Some(from) = view.unread {
        let filter = view.filter.clone();
        let read = state
            .blocking(move |s| s.read_page(&filter, from, PAGE, 0))
            .await;
        let PageAt {
            records: items,
            next,
            seq,
            ..
        } = match read {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return Err(Stop::Done);
            }
        };
        view.pages.push((next.map_or(u64::MAX, |n| n - 1), seq));
        view.unread = next;
        for c in items {
            if let Some(known) = &mut view.known {
                known.insert(c.id);
            }
            send(tx, upsert(c)).await?;
        }
        // Keep up with the changes meanwhile, so a long snapshot does not lag.
        loop {
            match rx.try_recv() {
                Ok(n) if matches!(n.change, Change::Reset) => return Err(lagged(0)),
                Ok(n) => {
                    if let Some(ev) = view.event(n) {
                        send(tx, ev).await?;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Lagged(n)) => return Err(lagged(n)),
                Err(TryRecvError::Closed) => return Err(Stop::Done),
            }
        }
    }
    send(tx, marker(WatchKind::SnapshotEnd, 0)).await
}

/// Sends live changes until the client leaves, the server drains or the watcher lags.
async fn live(
    view: &mut View,
    rx: &mut broadcast::Receiver<Numbered>,
    tx: &Tx,
    drain: &Drain,
) -> Stop {
    loop {
        let change = tokio::select! {
            change = rx.recv() => change,
            () = tx.closed() => return Stop::Done,
            () = drain.wait() => {
                let _ = tx.send(Err(Drain::status())).await;
                return Stop::Done;
            }
        };
        let event = match change {
            Ok(n) if matches!(n.change, Change::Reset) => return lagged(0),
            Ok(n) => view.event(n),
            Err(RecvError::Lagged(n)) => return lagged(n),
            Err(RecvError::Closed) => return Stop::Done,
        };
        if let Some(ev) = event
            && let Err(stop) = send(tx, ev).await
        {
            return stop;
        }
    }
}

fn lagged(missed: u64) -> Stop {
    tracing::warn!(missed, "watcher fell behind; resetting it");
    Stop::Lagged
}

async fn send(tx: &Tx, ev: WatchEvent) -> Result<(), Stop> {
    tx.send(Ok(ev)).await.map_err(|_| Stop::Done)
}

fn upsert(c: Connection) -> WatchEvent {
    WatchEvent {
        kind: WatchKind::Upsert as i32,
        id: c.id,
        connection: Some(c),
    }
}

fn marker(kind: WatchKind, id: u64) -> WatchEvent {
    WatchEvent {
        kind: kind as i32,
        connection: None,
        id,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proto::common::ConnStatus;

    use super::*;

    /// The watcher reads its first page, then waits (its channel holds one event) while
    /// every record is closed: records of the first page get their close live, records of
    /// later pages come closed in their page and their live close is not sent again.
    #[tokio::test]
    async fn changes_made_while_a_snapshot_is_paged_are_sent_once() {
        const N: u64 = 2 * PAGE as u64 + 100;
        let dir = tempfile::tempdir().unwrap();
        let state = State::with_open_records(&dir.path().join("db"), N);
        let (tx, mut rx) = mpsc::channel(1);
        let server = platform::serve::GrpcServer::new(None);
        tokio::spawn(watch(
            state.clone(),
            pb::ConnectionFilter::default(),
            0,
            tx,
            server.drain(),
        ));
        let first = rx.recv().await.unwrap().unwrap();
        state.close_records(N);
        let mut states: HashMap<u64, Vec<i32>> = HashMap::new();
        let mut ev = first;
        let (mut ended, mut closed) = (false, 0);
        loop {
            match ev.connection {
                Some(c) => {
                    closed += usize::from(c.status == ConnStatus::Disconnected as i32);
                    states.entry(c.id).or_default().push(c.status);
                }
                None => {
                    assert_eq!(ev.kind, WatchKind::SnapshotEnd as i32, "{ev:?}");
                    ended = true;
                }
            }
            if ended && closed == N as usize {
                break;
            }
            let next = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv());
            ev = next.await.unwrap().unwrap().unwrap();
        }
        let (active, disc) = (ConnStatus::Active as i32, ConnStatus::Disconnected as i32);
        assert_eq!(states.len(), N as usize);
        assert_eq!(
            states[&1],
            vec![active, disc],
            "first page: opened, then closed live"
        );
        assert_eq!(states[&N], vec![disc], "last page: closed in the page");
        for (id, s) in &states {
            assert!(s == &vec![active, disc] || s == &vec![disc], "{id}: {s:?}");
        }
        assert!(rx.try_recv().is_err(), "nothing more");
    }

    fn numbered(seq: u64, id: u64) -> Numbered {
        Numbered {
            seq,
            change: Change::Upsert(Arc::new(Connection {
                id,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_view_from_a_start_id_sends_no_change_below_it() {
        let mut v = View::new(pb::ConnectionFilter::default(), 100);
        assert_eq!(v.unread, Some(100), "the snapshot starts at the start ID");
        v.pages = vec![(u64::MAX, 10)];
        v.unread = None;
        assert!(v.event(numbered(11, 99)).is_none(), "below the start");
        let removed = Numbered {
            seq: 12,
            change: Change::Removed(42),
        };
        assert!(v.event(removed).is_none(), "a removal below the start");
        let ev = v.event(numbered(13, 100)).expect("the start ID itself");
        assert_eq!((ev.kind, ev.id), (WatchKind::Upsert as i32, 100));
    }

    #[test]
    fn a_change_is_sent_only_if_the_page_that_read_its_record_is_older() {
        let mut v = View::new(pb::ConnectionFilter::default(), 0);
        // Page 1 read IDs 0..=99 at change 10; page 2 read 100..=199 at change 20.
        v.pages = vec![(99, 10), (199, 20)];
        v.unread = Some(200);
        assert!(v.event(numbered(9, 50)).is_none(), "in page 1 already");
        assert!(v.event(numbered(11, 50)).is_some(), "after page 1 was read");
        assert!(v.event(numbered(15, 150)).is_none(), "in page 2 already");
        assert!(v.event(numbered(21, 150)).is_some());
        assert!(v.event(numbered(5, 500)).is_none(), "a later page reads it");
        v.unread = None;
        v.pages.push((u64::MAX, 30));
        assert!(
            v.event(numbered(25, 500)).is_none(),
            "the last page read it"
        );
        assert!(v.event(numbered(31, 500)).is_some());
    }
}
