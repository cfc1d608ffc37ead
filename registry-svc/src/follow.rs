//! `FollowHistory`: a snapshot of the records and history at one arrival position, then
//! everything recorded after it, read from the arrival log (see [`crate::backend::sled_store::arrivals`]).
//!
//! Memory stays bounded whatever the follower's speed: the task reads one page from disk
//! (records included), sends it through a small channel (waiting while the follower is
//! slow) and reads the next. No lock is held across a whole-store scan.

use std::sync::Arc;

use platform::serve::Drain;
use proto::{
    common::{Connection, Packet},
    registry::{FollowHistoryEvent, FollowHistoryRequest},
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    backend::PageAt,
    backend::{StoreError, sled_store::Followed},
    state::{HistoryQuery, PAGE_BYTES, State},
};

/// Arrival log entries read per page.
const LOG_PAGE: usize = 256;
/// Records read per hold of the hub lock.
const RECORD_PAGE: usize = 4_096;

type Tx = mpsc::Sender<Result<FollowHistoryEvent, Status>>;

/// Why the stream ends.
enum FollowEnd {
    /// The follower went away.
    Gone,
    /// A failure to send to the follower.
    Failed(Status),
}

impl From<StoreError> for FollowEnd {
    fn from(e: StoreError) -> Self {
        FollowEnd::Failed(e.into())
    }
}

/// Serves one `FollowHistory` call until the follower goes away or `drain` fires.
pub async fn follow(state: Arc<State>, req: FollowHistoryRequest, tx: Tx, drain: Drain) {
    let run = async {
        let cursor = match req.after {
            Some(after) => after,
            None => snapshot(&state, req.conn_id, &tx).await?,
        };
        live(&state, req.conn_id, cursor, &tx).await
    };
    let end = tokio::select! {
        end = run => end,
        () = drain.wait() => Err(FollowEnd::Failed(Drain::status())),
    };
    if let Err(FollowEnd::Failed(status)) = end {
        let _ = tx.send(Err(status)).await;
    }
}

/// Sends the records and history as of one position, then `caught_up`; returns the position.
///
/// The records are read a page at a time, each page under the hub lock (so no batch is half
/// applied) with the arrival position it was read at; the snapshot's position is the last
/// page's. A record read before a close recorded by then gets that close from the log
/// before `caught_up`, so every record reaches the follower as it is at that position.
async fn snapshot(state: &Arc<State>, conn_id: u64, tx: &Tx) -> Result<u64, FollowEnd> {
    let evicted_before = blocking(state, |st| Ok(st.store.removed_position())).await?;
    // Each page read: the last ID it covered and the position it was read at.
    let mut pages: Vec<(u64, u64)> = Vec::new();
    let mut from = Some(0);
    while let Some(start) = from {
        let PageAt {
            records,
            next,
            position,
            ..
        } = blocking(state, move |st| {
            st.read_page(&Default::default(), start, RECORD_PAGE, conn_id)
        })
        .await?;
        pages.push((next.map_or(u64::MAX, |n| n - 1), position));
        for c in records {
            send(tx, connection(c, position)).await?;
        }
        from = next;
    }
    let upto = pages.last().map_or(0, |&(_, at)| at);
    let mut token = String::new();
    loop {
        let q = HistoryQuery {
            conn_id,
            page_token: token,
            upto: Some(upto),
            ..Default::default()
        };
        let page = blocking(state, move |st| st.history(&q)).await?;
        for p in page.items {
            send(tx, packet(p, upto)).await?;
        }
        match page.next {
            Some(next) => token = next,
            None => break,
        }
    }
    closes_between_pages(state, conn_id, &pages, tx).await?;
    // Evicted while the snapshot was read: some of it may be missing.
    let evicted = blocking(state, |st| Ok(st.store.removed_position())).await?;
    if evicted > evicted_before {
        send(tx, gap(evicted.min(upto))).await?;
    }
    send(
        tx,
        FollowHistoryEvent {
            caught_up: true,
            position: upto,
            ..Default::default()
        },
    )
    .await?;
    Ok(upto)
}

/// Sends the closes recorded after the first page of records was read and up to the last,
/// of records read before them.
async fn closes_between_pages(
    state: &Arc<State>,
    conn_id: u64,
    pages: &[(u64, u64)],
    tx: &Tx,
) -> Result<(), FollowEnd> {
    let (Some(&(_, first)), Some(&(_, upto))) = (pages.first(), pages.last()) else {
        return Ok(());
    };
    let read_at = |id: u64| {
        let i = pages.partition_point(|&(last, _)| last < id);
        pages.get(i).map_or(upto, |&(_, at)| at)
    };
    let mut cursor = first;
    while cursor < upto {
        let page = blocking(state, move |st| {
            st.store.log_after(cursor, conn_id, LOG_PAGE, PAGE_BYTES)
        })
        .await?;
        for (n, item) in page.items {
            if n > upto {
                return Ok(());
            }
            if let Followed::Closed(c) = item
                && n > read_at(c.id)
            {
                send(tx, connection(*c, upto)).await?;
            }
        }
        if page.last <= cursor {
            break;
        }
        cursor = page.last;
    }
    Ok(())
}

/// Sends everything recorded after `cursor`, waiting for more whenever it has caught up.
async fn live(state: &Arc<State>, conn_id: u64, mut cursor: u64, tx: &Tx) -> Result<(), FollowEnd> {
    let mut positions = state.store.follow_positions();
    loop {
        // Marked seen before the read: a position written after it wakes the wait below.
        positions.borrow_and_update();
        // `evicted` is read after the page: positions up to it may have lost packets before
        // or while the page was read (eviction removes whole segments, so later ones are
        // whole).
        let (page, evicted) = blocking(state, move |st| {
            let page = st.store.log_after(cursor, conn_id, LOG_PAGE, PAGE_BYTES)?;
            Ok((page, st.store.removed_position()))
        })
        .await?;
        if evicted > cursor {
            send(tx, gap(evicted)).await?;
        }
        for (n, item) in page.items {
            if n <= evicted && evicted > cursor {
                continue;
            }
            let event = match item {
                Followed::Packet(p) => packet(p, n),
                Followed::Closed(c) => connection(*c, n),
            };
            send(tx, event).await?;
        }
        if page.last.max(evicted) > cursor {
            cursor = page.last.max(evicted);
            continue;
        }
        tokio::select! {
            changed = positions.changed() => {
                if changed.is_err() {
                    return Err(FollowEnd::Failed(Status::unavailable("the registry store closed")));
                }
            }
            () = tx.closed() => return Err(FollowEnd::Gone),
        }
    }
}

/// The event that tells a follower history up to `position` was evicted unread.
fn gap(position: u64) -> FollowHistoryEvent {
    FollowHistoryEvent {
        evicted_through: position,
        position,
        ..Default::default()
    }
}

fn packet(p: Packet, position: u64) -> FollowHistoryEvent {
    FollowHistoryEvent {
        packet: Some(p),
        position,
        ..Default::default()
    }
}

fn connection(c: Connection, position: u64) -> FollowHistoryEvent {
    FollowHistoryEvent {
        connection: Some(c),
        position,
        ..Default::default()
    }
}

async fn send(tx: &Tx, event: FollowHistoryEvent) -> Result<(), FollowEnd> {
    tx.send(Ok(event)).await.map_err(|_| FollowEnd::Gone)
}

/// Runs a store read off the async threads.
async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&State) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, FollowEnd> {
    state.blocking(f).await.map_err(FollowEnd::from)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proto::common::ConnStatus;

    use super::*;

    /// The follower reads its first page of records, then waits (its channel holds one
    /// event) while every record is closed. Records of the first page come active and then
    /// get their close before `caught_up`; records of later pages come closed; no close
    /// comes twice, and nothing follows for them after `caught_up`.
    #[tokio::test]
    async fn closes_made_while_the_records_are_paged_reach_the_follower_once() {
        const N: u64 = 2 * RECORD_PAGE as u64 + 100;
        let dir = tempfile::tempdir().unwrap();
        let state = State::with_open_records(&dir.path().join("db"), N);
        let (tx, mut rx) = mpsc::channel(1);
        let server = platform::serve::GrpcServer::new(None);
        tokio::spawn(follow(
            state.clone(),
            FollowHistoryRequest::default(),
            tx,
            server.drain(),
        ));
        let mut ev = next(&mut rx).await;
        state.close_records(N);
        let mut states: HashMap<u64, Vec<i32>> = HashMap::new();
        while !ev.caught_up {
            let c = ev.connection.expect("the snapshot has only records here");
            states.entry(c.id).or_default().push(c.status);
            ev = next(&mut rx).await;
        }
        let (active, closed) = (ConnStatus::Active as i32, ConnStatus::Disconnected as i32);
        assert_eq!(states.len(), N as usize);
        assert_eq!(
            states[&1],
            vec![active, closed],
            "first page: its close follows"
        );
        assert_eq!(states[&N], vec![closed], "last page: read closed");
        for (id, s) in &states {
            assert!(
                s == &vec![active, closed] || s == &vec![closed],
                "{id}: {s:?}"
            );
        }
        // Every close was recorded before the snapshot's position: nothing more comes.
        let more = tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await;
        assert!(more.is_err(), "nothing after caught_up: {more:?}");
    }

    async fn next(
        rx: &mut mpsc::Receiver<Result<FollowHistoryEvent, Status>>,
    ) -> FollowHistoryEvent {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv());
        ev.await.unwrap().unwrap().unwrap()
    }
}
