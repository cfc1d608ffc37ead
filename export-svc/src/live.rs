//! Live export (`follow`): the capture file header at once, then the history as the
//! registry's `FollowHistory` delivers it, snapshot first, then live. Each connection's
//! stream is opened when it is first seen and ended when its record is closed, with the
//! same framing as a batch export ([`Job::packet`], [`Job::end_stream`]). When the
//! registry replica it follows dies after the snapshot, it resumes on the next one.
//!
//! Memory: one [`Conn`] per connection seen (an open stream's few hundred bytes, or a
//! marker once it ended or was filtered out), the records of the snapshot until its end,
//! and one chunk.

use std::collections::HashMap;

use futures::FutureExt;
use proto::{
    common::{ConnStatus, Connection},
    registry::{FollowHistoryEvent, FollowHistoryRequest},
};
use tokio_stream::StreamExt;
use tonic::Status;

use crate::{
    job::{Job, Stop, Stream},
    registry::{Followed, HistoryEvents},
};

/// What the export knows of one connection.
enum Conn {
    /// Being written.
    Open(Box<Open>),
    /// Ended, or not wanted: later events for it are ignored.
    Done,
}

/// A connection being written: its stream, its record when first seen, its latest frame
/// time.
struct Open {
    stream: Stream,
    record: Option<Connection>,
    last: u64,
    /// The last packet sequence number written (a resumed stream repeats a position).
    seq: u64,
}

/// The state of one live export.
#[derive(Default)]
struct Follow {
    conns: HashMap<u64, Conn>,
    /// Records of the snapshot whose connections have not been seen yet.
    snapshot: HashMap<u64, Connection>,
    caught_up: bool,
    /// The position of the last live event (or of `caught_up`).
    position: u64,
    /// After a resume: the position sent again, whose packets already written are skipped.
    repeated: u64,
    /// The connection of the last snapshot packet: the snapshot sends each connection's
    /// packets together, so when the next one starts, a closed one is complete and ends.
    current: Option<u64>,
}

impl Job {
    /// Runs a live export until the caller goes away or the registry stream ends.
    pub(crate) async fn follow(&mut self) -> Result<(), Stop> {
        // The header goes out before anything else, so a late reader gets a valid file.
        self.flush(1).await?;
        let conn_id = match self.plan.conn_ids[..] {
            [id] => id,
            _ => 0,
        };
        let mut state = Follow::default();
        let Followed {
            mut events,
            mut replica,
        } = self.open_follow(conn_id, None).await?;
        loop {
            let event = match events.next().map(Option::transpose).now_or_never() {
                Some(event) => event,
                None => {
                    // Nothing more at hand: send what is written, then wait.
                    self.flush(1).await?;
                    self.next_event(&mut events).await?
                }
            };
            let failed = match event {
                Ok(Some(event)) => {
                    self.on_event(&mut state, event).await?;
                    continue;
                }
                Ok(None) => Status::unavailable("the registry ended the history stream"),
                Err(status) => status,
            };
            // Once caught up, a live export resumes on the next replica (of one database,
            // whose positions they share) after the last position it may not have whole:
            // repeated packets are skipped, and a repeated close finds its stream ended.
            if !state.caught_up
                || self.registry.replicas() < 2
                || !platform::failover::replica_failed(&failed)
            {
                return Err(failed.into());
            }
            self.registry.failed(replica, &failed);
            let after = state.position.saturating_sub(1);
            state.repeated = state.position;
            tracing::info!(
                registry = self.registry.target(),
                after,
                "resuming the live export"
            );
            Followed { events, replica } = self.open_follow(conn_id, Some(after)).await?;
        }
    }

    /// Opens `FollowHistory`: from a snapshot, or after position `after`.
    async fn open_follow(&self, conn_id: u64, after: Option<u64>) -> Result<Followed, Stop> {
        Ok(self
            .registry
            .follow_history(FollowHistoryRequest { conn_id, after })
            .await?)
    }

    /// The next event, or `Gone` when the caller hangs up first.
    async fn next_event(
        &mut self,
        events: &mut HistoryEvents,
    ) -> Result<Result<Option<FollowHistoryEvent>, Status>, Stop> {
        tokio::select! {
            event = events.next() => Ok(event.transpose()),
            () = self.tx.closed() => Err(Stop::Gone),
        }
    }

    async fn on_event(
        &mut self,
        state: &mut Follow,
        event: FollowHistoryEvent,
    ) -> Result<(), Stop> {
        if state.caught_up {
            state.position = state.position.max(event.position);
        }
        if let Some(p) = event.packet {
            let id = p.conn_id;
            if !state.caught_up && state.current != Some(id) {
                self.snapshot_moved_to(state, id);
            }
            if !state.conns.contains_key(&id) {
                let record = match state.snapshot.remove(&id) {
                    Some(c) => Some(c),
                    None if state.caught_up => self.record(id).await?,
                    // In the snapshot, a connection without a record was cleared.
                    None => None,
                };
                let first = p.ts.as_ref().map(proto::time::unix_nanos);
                self.open(state, id, record, first);
            }
            let again = event.position <= state.repeated;
            if let Some(Conn::Open(o)) = state.conns.get_mut(&id)
                && !(again && p.seq <= o.seq)
            {
                o.seq = o.seq.max(p.seq);
                o.last = self.packet(&mut o.stream, &p, o.last).await?;
            }
        } else if let Some(c) = event.connection {
            if !state.caught_up {
                state.snapshot.insert(c.id, c);
            } else {
                self.closed(state, c);
            }
        } else if event.caught_up {
            state.position = event.position;
            self.caught_up(state);
        }
        Ok(())
    }

    /// The snapshot's packets moved on to connection `next` (ID order): the closed
    /// connection before it, and those closed without packets with a lower ID, end now, so
    /// their ends are written before the later connections' packets (in time order, as a
    /// batch export writes them), not after the whole snapshot.
    fn snapshot_moved_to(&mut self, state: &mut Follow, next: u64) {
        let previous = state.current.replace(next);
        let done = previous.and_then(|id| match state.conns.get(&id) {
            Some(Conn::Open(o)) => o
                .record
                .as_ref()
                .filter(|c| c.status == ConnStatus::Disconnected as i32)
                .cloned(),
            _ => None,
        });
        let mut closed: Vec<Connection> = state
            .snapshot
            .values()
            .filter(|c| c.id < next && c.status == ConnStatus::Disconnected as i32)
            .cloned()
            .chain(done)
            .collect();
        closed.sort_unstable_by_key(|c| c.id);
        for c in closed {
            self.closed(state, c);
        }
    }

    /// The end of the snapshot: the connections whose records were closed in it end now,
    /// after all their packets, in ID order (those without packets as a handshake and the
    /// end). Active ones wait for their first packet or their close.
    fn caught_up(&mut self, state: &mut Follow) {
        state.caught_up = true;
        let seen = state.conns.values().filter_map(|conn| match conn {
            Conn::Open(o) => o.record.as_ref(),
            Conn::Done => None,
        });
        let mut closed: Vec<Connection> = state
            .snapshot
            .values()
            .chain(seen)
            .filter(|c| c.status == ConnStatus::Disconnected as i32)
            .cloned()
            .collect();
        closed.sort_unstable_by_key(|c| c.id);
        for c in closed {
            self.closed(state, c);
        }
    }

    /// Opens connection `id` when the request wants it (else marks it done).
    fn open(
        &mut self,
        state: &mut Follow,
        id: u64,
        record: Option<Connection>,
        first: Option<u64>,
    ) {
        let opened = record
            .as_ref()
            .and_then(|c| c.opened_at.as_ref())
            .map(proto::time::unix_nanos)
            .or(first)
            .unwrap_or(0);
        let conn = if self.plan.wants(id, record.as_ref()) && self.plan.in_range(opened) {
            let stream = self.open_stream(id, record.as_ref(), opened);
            Conn::Open(Box::new(Open {
                stream,
                record,
                last: opened,
                seq: 0,
            }))
        } else {
            Conn::Done
        };
        state.conns.insert(id, conn);
    }

    /// Ends the stream of the closed record `c`, opening it first if it had no packets.
    fn closed(&mut self, state: &mut Follow, c: Connection) {
        state.snapshot.remove(&c.id);
        if !state.conns.contains_key(&c.id) {
            self.open(state, c.id, Some(c.clone()), None);
        }
        if let Some(Conn::Open(mut o)) = state.conns.insert(c.id, Conn::Done) {
            self.end_stream(&mut o.stream, Some(&c), o.last);
        }
    }
}
