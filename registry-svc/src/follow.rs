//! `FollowHistory`: a snapshot of the records and history at one arrival position, then
//! everything recorded after it, read from the arrival log (see [`crate::store::arrivals`]).
//!
//! Memory stays bounded whatever the follower's speed: the task reads one page from disk,
//! sends it through a small channel (waiting while the follower is slow) and reads the next.
//! The snapshot's records are the one exception: like `WatchConnections`, it holds the
//! matching records while it sends them.

use std::sync::Arc;

use proto::{
    common::{Connection, Packet},
    registry::{FollowHistoryEvent, FollowHistoryRequest},
    serve::Drain,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    state::{HistoryQuery, PAGE_BYTES, State},
    store::{Followed, StoreError},
};

/// Arrival log entries read per page.
const LOG_PAGE: usize = 256;

type Tx = mpsc::Sender<Result<FollowHistoryEvent, Status>>;

/// Why the stream ends.
enum End {
    /// The follower went away.
    Gone,
    /// A failure to send to the follower.
    Failed(Status),
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> Self {
        End::Failed(e.into())
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
        () = drain.wait() => Err(End::Failed(Drain::status())),
    };
    if let Err(End::Failed(status)) = end {
        let _ = tx.send(Err(status)).await;
    }
}

/// Sends the records and history as of one position, then `caught_up`; returns the position.
async fn snapshot(state: &Arc<State>, conn_id: u64, tx: &Tx) -> Result<u64, End> {
    let (records, upto) = blocking(state, move |st| {
        // Under the hub lock no batch is half applied: the records and the position agree.
        let (_rx, snap) = st.hub.subscribe_with(|| {
            let upto = st.store.position();
            let mut records = Vec::new();
            match conn_id {
                0 => st.store.scan_conns(0, &mut |c| {
                    records.push(c);
                    true
                })?,
                id => records.extend(st.store.get_opt(id)?),
            }
            Ok::<_, StoreError>((records, upto))
        });
        snap
    })
    .await?;
    for c in records {
        send(tx, connection(c, upto)).await?;
    }
    let evicted_before = state.store.removed_position();
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
    // Evicted while the snapshot was read: some of it may be missing.
    let evicted = state.store.removed_position();
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

/// Sends everything recorded after `cursor`, waiting for more whenever it has caught up.
async fn live(state: &Arc<State>, conn_id: u64, mut cursor: u64, tx: &Tx) -> Result<(), End> {
    let mut positions = state.store.follow_positions();
    loop {
        // Marked seen before the read: a position written after it wakes the wait below.
        positions.borrow_and_update();
        let page = blocking(state, move |st| {
            st.store.log_after(cursor, conn_id, LOG_PAGE, PAGE_BYTES)
        })
        .await?;
        // Read after the page: positions up to it may have lost packets before or while
        // the page was read (eviction removes whole segments, so later ones are whole).
        let evicted = state.store.removed_position();
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
                    return Err(End::Failed(Status::unavailable("the registry store closed")));
                }
            }
            () = tx.closed() => return Err(End::Gone),
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

async fn send(tx: &Tx, event: FollowHistoryEvent) -> Result<(), End> {
    tx.send(Ok(event)).await.map_err(|_| End::Gone)
}

/// Runs a store read off the async threads.
async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&State) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, End> {
    state.blocking(f).await.map_err(End::from)
}
