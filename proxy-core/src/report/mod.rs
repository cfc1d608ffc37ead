//! The reporter: streams connection events and history packets to the registry without
//! ever making a connection wait for it.
//!
//! Connection tasks call [`Reporter`] methods, which push onto a bounded queue and return at
//! once (no await). The parts, each testable alone:
//! - [`admission`]: what the queue takes and what it sheds while the registry is slow or
//!   down (counters first, then packets, then records), within `queue_bound` events and
//!   [`MAX_BUFFERED_BYTES`] of payload, counting both events still queued and batches sent
//!   but not yet acknowledged; everything shed is counted ([`losses`]) and sent to the
//!   registry as `IngestRequest.losses`;
//! - [`live`]: the connections open now, and [`ticker`]: their running counters, published
//!   every [`COUNTERS_INTERVAL`] so live byte counts show in the registry;
//! - [`batch`]: events gathered into batches (up to [`BATCH_EVENTS`] events or
//!   [`BATCH_BYTES`]), Nagle-like with no timer, numbered and kept until acknowledged;
//! - [`stream`]: the ingest stream with its failover to the next registry and the replay,
//!   in order, of what a broken stream left unacknowledged.

mod admission;
mod batch;
mod live;
mod losses;
mod stream;
mod ticker;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use platform::ingest::IngestSink;
use prost_types::Timestamp;
use proto::{
    common::{Connection, Direction, Packet},
    registry::{ConnectionClosed, ConnectionUpdate, ProxyLosses},
};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, timeout_at},
};

pub use admission::MAX_BUFFERED_BYTES;
pub use batch::{BATCH_BYTES, BATCH_EVENTS};
pub use losses::InterceptCounts;
pub use stream::ACK_TIMEOUT;
pub use ticker::COUNTERS_INTERVAL;

use crate::conn::{ConnEnd, ConnState};
use admission::{Admission, Class, Item};

/// The handle connection tasks report through. Cloning is cheap; no method awaits.
#[derive(Clone)]
pub struct Reporter {
    admission: Arc<Admission>,
    live: Arc<live::Live>,
    history: bool,
}

impl Reporter {
    /// Starts the background task that streams to the registry `sink` as `node`.
    /// `queue_bound` is the number of events buffered while the registry is slow or down.
    pub fn start(
        sink: Arc<dyn IngestSink>,
        node: String,
        history: bool,
        queue_bound: usize,
    ) -> (Reporter, ReporterTask) {
        let (admission, rx) = Admission::new(queue_bound);
        let admission = Arc::new(admission);
        let live = Arc::new(live::Live::default());
        let (stop_tx, stop_rx) = watch::channel(None);
        let batcher = batch::Batcher::new(node, &admission.losses);
        let task = stream::Task::new(admission.clone(), rx, sink, batcher, stop_rx.clone());
        let join = tokio::spawn(task.run());
        let ticker = tokio::spawn(ticker::run(admission.clone(), live.clone(), stop_rx));
        let reporter = Reporter {
            admission,
            live,
            history,
        };
        let task = ReporterTask {
            join,
            ticker,
            stop: stop_tx,
        };
        (reporter, task)
    }

    /// Whether packet payloads are recorded (`--history on`).
    pub fn history(&self) -> bool {
        self.history
    }

    /// Reports `counts` (what the intercept holder could not do) with the losses.
    pub fn count_intercept(&self, counts: Arc<InterceptCounts>) {
        self.admission.losses.count_intercept(counts);
    }

    /// What had to be shed so far.
    pub fn losses(&self) -> ProxyLosses {
        self.admission.losses.snapshot()
    }

    /// Events queued or awaiting acknowledgement.
    pub fn buffered(&self) -> usize {
        self.admission.buffered()
    }

    /// A connection was accepted; `state` feeds its periodic counter updates until
    /// [`Reporter::closed`].
    pub fn opened(&self, conn: Connection, state: Arc<ConnState>) {
        self.live.insert(conn.id, state);
        self.admission
            .push(Item::Opened(Box::new(conn)), Class::Record, 0);
    }

    /// Something about an active connection became known.
    pub fn updated(&self, update: ConnectionUpdate) {
        self.admission
            .push(Item::Updated(Box::new(update)), Class::Record, 0);
    }

    /// A history packet (ignored with history off).
    pub fn packet(&self, conn_id: u64, seq: u64, dir: Direction, ts: Timestamp, data: Bytes) {
        self.push_packet(Packet {
            conn_id,
            seq,
            direction: dir as i32,
            ts: Some(ts),
            data,
            ..Default::default()
        });
    }

    /// A history packet whose relayed bytes `sent` differ from the `original` ones received
    /// (an intercept edit or a replace rule), or that was `dropped` (then `sent` is empty).
    #[allow(clippy::too_many_arguments)]
    pub fn modified_packet(
        &self,
        conn_id: u64,
        seq: u64,
        dir: Direction,
        ts: Timestamp,
        sent: Bytes,
        original: Bytes,
        dropped: bool,
    ) {
        self.push_packet(Packet {
            conn_id,
            seq,
            direction: dir as i32,
            ts: Some(ts),
            data: sent,
            modified: true,
            original,
            dropped,
        });
    }

    /// Queues a history packet, unless history is off.
    fn push_packet(&self, p: Packet) {
        if !self.history {
            return;
        }
        let item = Item::Packet(p);
        let len = item.payload_len();
        self.admission.push(item, Class::Packet, len);
    }

    /// A connection ended, with its final counters.
    pub fn closed(&self, state: &ConnState, end: &ConnEnd) {
        self.live.remove(state.id);
        let closed = ConnectionClosed {
            id: state.id,
            closed_at: Some(proto::time::now()),
            closed_by: end.closed_by as i32,
            close_kind: end.kind as i32,
            reason: end.reason.clone(),
            counters: Some(state.counters()),
        };
        self.admission
            .push(Item::Closed(Box::new(closed)), Class::Record, 0);
    }

    /// Connections currently open, as the reporter knows them.
    pub fn active(&self) -> Vec<Arc<ConnState>> {
        self.live.snapshot().unwrap_or_default()
    }
}

/// The running background task; [`ReporterTask::flush`] ends it.
pub struct ReporterTask {
    join: JoinHandle<()>,
    ticker: JoinHandle<()>,
    stop: watch::Sender<Option<Instant>>,
}

impl ReporterTask {
    /// Sends what is still queued and waits for its acknowledgement, for at most `wait`;
    /// then stops. Returns the number of events left unacknowledged.
    pub async fn flush(self, reporter: &Reporter, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        let _ = self.stop.send(Some(deadline));
        self.ticker.abort();
        let mut join = self.join;
        if timeout_at(deadline + Duration::from_millis(200), &mut join)
            .await
            .is_err()
        {
            join.abort();
        }
        reporter.buffered()
    }
}

#[cfg(test)]
mod tests;
