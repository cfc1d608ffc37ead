//! The reporter: streams connection events and history packets to the registry without
//! ever making a connection wait for it.
//!
//! Connection tasks call [`Reporter`] methods, which push onto an in-memory queue and
//! return at once (no await). The queue is bounded by accounting, not by blocking: at most
//! `queue_bound` events (and [`MAX_BUFFERED_BYTES`] of packet payload) are buffered,
//! counting both events still queued and batches sent but not yet acknowledged. When full,
//! the reporter sheds, in this order: periodic counter updates (skipped once the buffer is
//! half full: the next one carries the same totals), history packets (at the bound), and
//! only then opens, closes and other updates (which get a reserve of a quarter of the bound
//! above it). Everything shed is counted and sent to the registry as `IngestRequest.losses`.
//!
//! A background task drains the queue into batches (up to [`BATCH_EVENTS`] events or
//! [`BATCH_BYTES`] of payload). Batching is Nagle-like, with no timer: a batch goes out at
//! once when none is awaiting acknowledgement, otherwise events gather until the
//! acknowledgement arrives or a batch is full (heavy traffic keeps several full batches in
//! flight); so an idle proxy reports each event immediately and a busy one sends few large
//! batches. The task numbers them with an increasing
//! `batch_seq`, keeps every batch until its acknowledgement arrives, and after a broken
//! stream reconnects with backoff and sends the unacknowledged batches again, in order,
//! before any new one. The registry applies replays idempotently. With several registry
//! URLs (replicas of one registry, [`proto::failover::Replicas`]), a failed stream reopens
//! on the next replica at once, and backoff starts only once a stream to each has failed in
//! a row.
//!
//! Batches are the generated `IngestRequest`, whose packet payloads are `Bytes` (see the proto
//! crate's build script): sending or replaying a batch clones reference counts, never the
//! payloads, which gRPC copies once, into its frame.
//! The first batch is empty (a hello): the registry learns the proxy's session as soon as the
//! stream opens, before any connection.
//! Every second a ticker sends a `ConnectionUpdate` with running counters for each active
//! connection whose counters changed, so live byte counts show in the registry.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use prost_types::Timestamp;
use proto::{
    common::{Connection, Direction, Packet},
    ingest::{Acks, IngestSink},
    registry::{
        ConnectionClosed, ConnectionUpdate, Event, IngestAck, IngestRequest, ProxyLosses,
        event::Kind,
    },
    retry::{Backoff, Retry},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior, sleep, sleep_until},
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Status;

use crate::conn::{ConnState, End};

/// Most events in one batch.
pub const BATCH_EVENTS: usize = 1000;
/// A batch is closed once its encoded size reaches this (one more packet may exceed it).
pub const BATCH_BYTES: usize = 1 << 20;
/// Most packet payload bytes buffered (queued plus unacknowledged) before packets are shed.
pub const MAX_BUFFERED_BYTES: usize = 256 << 20;
/// Most batches sent and awaiting acknowledgement; the queue waits behind them.
const MAX_UNACKED: usize = 64;
/// How often counters of active connections are published.
pub const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);
/// How long batches may wait in flight with no acknowledgement before a reporter with other
/// registries to go to leaves the one it streams to (a registry acknowledges once a batch is
/// durable, normally within milliseconds).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How a broken stream is reopened.
const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

/// One queued event. Packets, by far the most frequent, are not boxed: no allocation each.
enum Item {
    Opened(Box<Connection>),
    Updated(Box<ConnectionUpdate>),
    Closed(Box<ConnectionClosed>),
    Packet(Packet),
}

impl Item {
    fn payload_len(&self) -> usize {
        match self {
            Item::Packet(p) => p.data.len() + p.original.len(),
            _ => 0,
        }
    }
}

/// Shedding priority of an event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Opens, closes and one-off updates: shed last.
    Record,
    /// A history packet.
    Packet,
    /// Periodic running counters: skipped first.
    Counters,
}

struct Inner {
    tx: mpsc::UnboundedSender<Item>,
    history: bool,
    bound: usize,
    events: AtomicUsize,
    bytes: AtomicUsize,
    events_dropped: AtomicU64,
    /// The intercept holder's counts of what it could not do, once there is one.
    intercept: std::sync::OnceLock<Arc<InterceptCounts>>,
    packets_dropped: AtomicU64,
    bytes_dropped: AtomicU64,
    active: Mutex<HashMap<u64, Arc<ConnState>>>,
}

/// What intercept could not do on this proxy: counted by the holder
/// ([`crate::hold::Holder`]) and sent to the registry with the losses
/// (`ProxyLosses.intercept_*`, `rewrite_skipped`).
#[derive(Debug, Default)]
pub struct InterceptCounts {
    /// Holds whose call failed (the intercept service unreachable, gone, or failing).
    pub hold_failed: AtomicU64,
    /// Holds the intercept service answered at once without holding (queue full, packet
    /// too large).
    pub refused: AtomicU64,
    /// Packets the replace rules would have grown beyond the limit: relayed unchanged.
    pub rewrite_skipped: AtomicU64,
}

impl InterceptCounts {
    /// Packets selected for holding but not held, for either reason.
    pub fn not_held(&self) -> u64 {
        self.hold_failed.load(Relaxed) + self.refused.load(Relaxed)
    }
}

/// The handle connection tasks report through. Cloning is cheap; no method awaits.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

impl Inner {
    /// Empty queue state and the receiving end of its queue.
    fn new(history: bool, bound: usize) -> (Arc<Inner>, mpsc::UnboundedReceiver<Item>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            tx,
            history,
            bound,
            events: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            events_dropped: AtomicU64::new(0),
            intercept: std::sync::OnceLock::new(),
            packets_dropped: AtomicU64::new(0),
            bytes_dropped: AtomicU64::new(0),
            active: Mutex::new(HashMap::new()),
        };
        (Arc::new(inner), rx)
    }
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
        let (inner, rx) = Inner::new(history, queue_bound.max(1));
        let (stop_tx, stop_rx) = watch::channel(None);
        let mut task = Task {
            inner: inner.clone(),
            rx,
            sink,
            node,
            unacked: VecDeque::new(),
            next_seq: 1,
            pending: Vec::with_capacity(BATCH_EVENTS),
            pending_bytes: 0,
            last_full: false,
            stop: stop_rx.clone(),
            sent_losses: ProxyLosses::default(),
            recovering: false,
            streaming_to: String::new(),
        };
        // The hello: an empty first batch, sent as soon as the stream opens, so the registry
        // learns this process's session at start (a restarted proxy's old records are closed
        // then, not at its first connection or after the grace period).
        task.make_batches_force();
        let join = tokio::spawn(task.run());
        let ticker = tokio::spawn(ticker(inner.clone(), stop_rx));
        (
            Reporter { inner },
            ReporterTask {
                join,
                ticker,
                stop: stop_tx,
            },
        )
    }

    /// Whether packet payloads are recorded (`--history on`).
    pub fn history(&self) -> bool {
        self.inner.history
    }

    /// Reports `counts` (what the intercept holder could not do) with the losses.
    pub fn count_intercept(&self, counts: Arc<InterceptCounts>) {
        let _ = self.inner.intercept.set(counts);
    }

    /// What had to be shed so far.
    pub fn losses(&self) -> ProxyLosses {
        self.inner.losses()
    }

    /// Events queued or awaiting acknowledgement.
    pub fn buffered(&self) -> usize {
        self.inner.events.load(Relaxed)
    }

    /// A connection was accepted; `state` feeds its periodic counter updates until
    /// [`Reporter::closed`].
    pub fn opened(&self, conn: Connection, state: Arc<ConnState>) {
        if let Ok(mut active) = self.inner.active.lock() {
            active.insert(conn.id, state);
        }
        self.inner
            .push(Item::Opened(Box::new(conn)), Class::Record, 0);
    }

    /// Something about an active connection became known.
    pub fn updated(&self, update: ConnectionUpdate) {
        self.inner
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
        if !self.inner.history {
            return;
        }
        let item = Item::Packet(p);
        let len = item.payload_len();
        self.inner.push(item, Class::Packet, len);
    }

    /// A connection ended, with its final counters.
    pub fn closed(&self, state: &ConnState, end: &End) {
        if let Ok(mut active) = self.inner.active.lock() {
            active.remove(&state.id);
        }
        let closed = ConnectionClosed {
            id: state.id,
            closed_at: Some(proto::time::now()),
            closed_by: end.closed_by as i32,
            close_kind: end.kind as i32,
            reason: end.reason.clone(),
            counters: Some(state.counters()),
        };
        self.inner
            .push(Item::Closed(Box::new(closed)), Class::Record, 0);
    }

    /// Connections currently open, as the reporter knows them.
    pub fn active(&self) -> Vec<Arc<ConnState>> {
        self.inner
            .active
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl Inner {
    fn losses(&self) -> ProxyLosses {
        ProxyLosses {
            events_dropped: self.events_dropped.load(Relaxed),
            packets_dropped: self.packets_dropped.load(Relaxed),
            bytes_dropped: self.bytes_dropped.load(Relaxed),
            intercept_not_held: self.intercept.get().map_or(0, |c| c.not_held()),
            intercept_hold_failed: self
                .intercept
                .get()
                .map_or(0, |c| c.hold_failed.load(Relaxed)),
            intercept_refused: self.intercept.get().map_or(0, |c| c.refused.load(Relaxed)),
            rewrite_skipped: self
                .intercept
                .get()
                .map_or(0, |c| c.rewrite_skipped.load(Relaxed)),
        }
    }

    /// Reserves room for one event of `class` carrying `len` payload bytes.
    fn admit(&self, class: Class, len: usize) -> bool {
        let limit = match class {
            Class::Counters => self.bound / 2,
            Class::Packet => self.bound,
            Class::Record => self.bound + self.bound / 4 + 64,
        };
        if self.events.fetch_add(1, Relaxed) >= limit {
            self.events.fetch_sub(1, Relaxed);
            return false;
        }
        if len > 0 && self.bytes.fetch_add(len, Relaxed) + len > MAX_BUFFERED_BYTES {
            self.bytes.fetch_sub(len, Relaxed);
            self.events.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    fn shed(&self, class: Class, len: usize) {
        match class {
            Class::Packet => {
                self.packets_dropped.fetch_add(1, Relaxed);
                self.bytes_dropped.fetch_add(len as u64, Relaxed);
            }
            Class::Record => {
                self.events_dropped.fetch_add(1, Relaxed);
            }
            Class::Counters => {}
        }
    }

    fn push(&self, item: Item, class: Class, len: usize) -> bool {
        if !self.admit(class, len) {
            self.shed(class, len);
            return false;
        }
        if self.tx.send(item).is_err() {
            // The background task is gone (after shutdown): nothing can be sent any more.
            self.release(1, len);
            self.shed(class, len);
            return false;
        }
        true
    }

    fn release(&self, events: usize, bytes: usize) {
        self.events.fetch_sub(events, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }
}

/// Publishes running counters of active connections every [`COUNTERS_INTERVAL`].
async fn ticker(inner: Arc<Inner>, mut stop: watch::Receiver<Option<Instant>>) {
    let mut tick = tokio::time::interval(COUNTERS_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let states: Vec<Arc<ConnState>> = match inner.active.lock() {
            Ok(a) => a.values().cloned().collect(),
            Err(_) => return,
        };
        for s in states {
            if !inner.admit(Class::Counters, 0) {
                break;
            }
            match s.counters_if_changed() {
                Some(counters) => {
                    let update = ConnectionUpdate {
                        id: s.id,
                        counters: Some(counters),
                        ..Default::default()
                    };
                    if inner.tx.send(Item::Updated(Box::new(update))).is_err() {
                        inner.release(1, 0);
                        return;
                    }
                }
                None => inner.release(1, 0),
            }
        }
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
        if tokio::time::timeout_at(deadline + Duration::from_millis(200), &mut join)
            .await
            .is_err()
        {
            join.abort();
        }
        reporter.buffered()
    }
}

/// A batch sent (or to be sent) and not yet acknowledged.
struct Batch {
    seq: u64,
    /// Sent as a clone: its payloads are shared, not copied.
    request: IngestRequest,
    events: usize,
    payload: usize,
    packets: u64,
}

enum SessionEnd {
    Stopped,
    Failed { status: String, acked: bool },
}

struct Task {
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Item>,
    sink: Arc<dyn IngestSink>,
    node: String,
    unacked: VecDeque<Batch>,
    next_seq: u64,
    pending: Vec<Item>,
    /// Payload bytes of the packets in `pending`.
    pending_bytes: usize,
    /// The last batch formed was full: traffic is heavy, keep several in flight.
    last_full: bool,
    stop: watch::Receiver<Option<Instant>>,
    sent_losses: ProxyLosses,
    /// The last stream failed: the next one that opens replays, and says so.
    recovering: bool,
    /// Where the current stream goes ([`IngestSink::target`]), for logs.
    streaming_to: String,
}

impl Task {
    async fn run(mut self) {
        let mut retry = RETRY.start(self.sink.replicas());
        loop {
            let backoff = match self.session().await {
                SessionEnd::Stopped => return,
                SessionEnd::Failed { status, acked } => {
                    self.recovering = true;
                    if acked {
                        retry.succeeded();
                    }
                    let wait = retry.failed();
                    self.fail_over(&status, &retry);
                    match wait {
                        Some(wait) => wait,
                        // Another registry is still untried in this round: no backoff.
                        None => continue,
                    }
                }
            };
            let deadline = *self.stop.borrow();
            let wake = Instant::now() + backoff;
            match deadline {
                Some(d) if d <= wake => {
                    sleep_until(d).await;
                    self.give_up();
                    return;
                }
                _ => {
                    tokio::select! {
                        () = sleep(backoff) => {}
                        _ = self.stop.changed() => {}
                    }
                }
            }
        }
    }

    /// Logs the failed stream (`retry` counts the failures in a row) and moves the sink to
    /// its next registry.
    fn fail_over(&self, status: &str, retry: &Retry) {
        let replicas = retry.replicas();
        let from = &self.streaming_to;
        self.sink.next();
        let buffered = self.inner.events.load(Relaxed);
        if !retry.worth_logging() {
            return;
        }
        if replicas > 1 {
            let to = self.sink.target();
            tracing::warn!(
                %from,
                %to,
                buffered,
                "failover: registry ingest stream to {from} failed ({status}); switching to \
                 {to}; relaying goes on, events are buffered and will be replayed"
            );
        } else {
            tracing::warn!(
                buffered,
                "registry ingest stream down ({status}); relaying goes on, \
                 events are buffered and will be replayed"
            );
        }
    }

    fn give_up(&self) {
        let left = self.inner.events.load(Relaxed);
        if left > 0 {
            tracing::warn!(
                events = left,
                "shutting down with events the registry never acknowledged"
            );
        }
    }

    /// Whether the session should end for shutdown: everything was sent and acknowledged,
    /// or the shutdown deadline passed (what is left is then given up, and counted).
    fn stopping(&mut self, deadline: Option<Instant>) -> bool {
        let Some(d) = deadline else {
            return false;
        };
        if self.rx.is_empty() && self.pending.is_empty() && self.unacked.is_empty() {
            return true;
        }
        if d <= Instant::now() {
            self.give_up();
            return true;
        }
        false
    }

    /// Makes batches of pending events when it is time to (at once while shutting down);
    /// returns whether to receive more events from the queue now.
    fn batch(&mut self, shutting_down: bool) -> bool {
        // Nagle for batches: a batch goes out at once when none is awaiting its
        // acknowledgement; otherwise events wait (in the channel, without waking this task)
        // until the acknowledgement, unless a full batch is ready (bulk traffic keeps up to
        // MAX_UNACKED full batches in flight). Idle: no added latency; busy: few, large
        // batches and one wake-up per acknowledgement instead of one per event.
        let full = self.pending.len() >= BATCH_EVENTS || self.pending_bytes >= BATCH_BYTES;
        // Batches without events (the hello, loss totals) do not hold events back: the first
        // connection's events go out at once, as they did before the hello existed.
        let idle = self.unacked.iter().all(|b| b.events == 0);
        if !self.pending.is_empty()
            && self.unacked.len() < MAX_UNACKED
            && (full || idle || shutting_down)
        {
            self.last_full = full;
            self.make_batches();
            self.pending_bytes = 0;
        }
        self.pending.len() < BATCH_EVENTS
            && self.pending_bytes < BATCH_BYTES
            && self.unacked.len() < MAX_UNACKED
            && (idle || self.last_full || shutting_down)
    }

    async fn session(&mut self) -> SessionEnd {
        let (out_tx, out_rx) = mpsc::channel::<IngestRequest>(4);
        self.streaming_to = self.sink.target();
        let mut call = self.sink.open(ReceiverStream::new(out_rx));
        let mut acks: Option<Acks> = None;
        let mut next_unsent = 0usize;
        let mut acked = false;
        let mut tick = tokio::time::interval(COUNTERS_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // With other replicas to go to, one that takes batches but acknowledges none (hung,
        // or cut off without a reset) is left after ACK_TIMEOUT, not after the connection's
        // keepalive gives up. `waiting` is when the oldest batch in flight was sent or last
        // saw progress.
        let ack_timeout = (self.sink.replicas() > 1).then_some(ACK_TIMEOUT);
        let mut waiting = Instant::now();
        // What this stream replays: every batch the last one left unacknowledged.
        let replay = (
            self.unacked.len(),
            self.unacked.iter().map(|b| b.events).sum(),
        );
        loop {
            let deadline = *self.stop.borrow();
            if self.stopping(deadline) {
                return SessionEnd::Stopped;
            }
            let receive = self.batch(deadline.is_some());
            let room = BATCH_EVENTS.saturating_sub(self.pending.len()).max(1);
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                res = &mut call, if acks.is_none() => match res {
                    Ok(stream) => {
                        acks = Some(stream);
                        self.reopened(replay);
                    }
                    Err(status) => return self.failed(status, acked),
                },
                ack = next_ack(&mut acks) => match ack {
                    Ok(Some(a)) => {
                        acked = true;
                        waiting = Instant::now();
                        self.on_ack(a.batch_seq, &mut next_unsent);
                    }
                    Ok(None) => {
                        return SessionEnd::Failed {
                            status: "the registry ended the stream".into(),
                            acked,
                        };
                    }
                    Err(status) => return self.failed(status, acked),
                },
                permit = out_tx.reserve(), if next_unsent < self.unacked.len() => match permit {
                    Ok(p) => {
                        if next_unsent == 0 {
                            waiting = Instant::now();
                        }
                        p.send(self.unacked[next_unsent].request.clone());
                        next_unsent += 1;
                    }
                    Err(_) => {
                        return SessionEnd::Failed { status: "request stream closed".into(), acked };
                    }
                },
                _ = self.rx.recv_many(&mut self.pending, room), if receive => {
                    self.pending_bytes = self.pending.iter().map(Item::payload_len).sum();
                }
                _ = tick.tick() => {
                    if self.inner.losses() != self.sent_losses && self.unacked.len() < MAX_UNACKED {
                        // An empty batch that only carries the latest loss totals.
                        self.make_batches_force();
                    }
                }
                _ = self.stop.changed() => {}
                () = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {}
                () = sleep_until(waiting + ack_timeout.unwrap_or_default()),
                    if ack_timeout.is_some() && next_unsent > 0 => {
                    let secs = ACK_TIMEOUT.as_secs();
                    return SessionEnd::Failed {
                        status: format!("no acknowledgement for {secs} s"),
                        acked,
                    };
                }
            }
        }
    }

    /// Logs the first stream that opened after a failure, with what it replays
    /// (`(batches, events)`).
    fn reopened(&mut self, (batches, events): (usize, usize)) {
        if std::mem::take(&mut self.recovering) {
            let to = &self.streaming_to;
            tracing::info!(
                batches,
                events,
                %to,
                "registry ingest stream to {to} open again; replaying {batches} \
                 unacknowledged batches ({events} events)"
            );
        }
    }

    fn failed(&mut self, status: Status, acked: bool) -> SessionEnd {
        if status.code() == tonic::Code::InvalidArgument {
            // The registry rejected a batch: sending it again would fail forever. The first
            // unacknowledged batch is the culprit (batches apply in order); count it as lost.
            if let Some(b) = self.unacked.pop_front() {
                tracing::error!(
                    batch = b.seq,
                    events = b.events,
                    "registry rejected a batch: {status}"
                );
                self.inner.release(b.events, b.payload);
                self.inner.packets_dropped.fetch_add(b.packets, Relaxed);
                self.inner
                    .events_dropped
                    .fetch_add(b.events as u64 - b.packets, Relaxed);
                self.inner
                    .bytes_dropped
                    .fetch_add(b.payload as u64, Relaxed);
            }
        }
        SessionEnd::Failed {
            status: status.to_string(),
            acked,
        }
    }

    fn on_ack(&mut self, seq: u64, next_unsent: &mut usize) {
        while self.unacked.front().is_some_and(|b| b.seq <= seq) {
            if let Some(b) = self.unacked.pop_front() {
                self.inner.release(b.events, b.payload);
                *next_unsent = next_unsent.saturating_sub(1);
            }
        }
    }

    fn make_batches(&mut self) {
        let mut builder: Option<BatchBuilder> = None;
        for item in self.pending.drain(..) {
            let b = builder.get_or_insert_with(|| {
                let seq = self.next_seq;
                self.next_seq += 1;
                BatchBuilder::new(&self.node, seq)
            });
            b.push(item);
            let full = b.events() >= BATCH_EVENTS || b.len >= BATCH_BYTES;
            if let Some(b) = builder.take_if(|_| full) {
                self.unacked
                    .push_back(b.finish(&self.inner, &mut self.sent_losses));
            }
        }
        if let Some(b) = builder.take() {
            self.unacked
                .push_back(b.finish(&self.inner, &mut self.sent_losses));
        }
    }

    fn make_batches_force(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let b = BatchBuilder::new(&self.node, seq);
        self.unacked
            .push_back(b.finish(&self.inner, &mut self.sent_losses));
    }
}

async fn next_ack(acks: &mut Option<Acks>) -> Result<Option<IngestAck>, Status> {
    match acks {
        Some(s) => s.next().await.transpose(),
        None => std::future::pending().await,
    }
}

/// Gathers events into one `IngestRequest`, keeping count of its encoded size.
struct BatchBuilder {
    request: IngestRequest,
    /// Encoded length of `request` so far.
    len: usize,
    payload: usize,
    packets: u64,
}

/// This process's ingest session (`IngestRequest.session`): random, picked once, so the
/// registry tells a restarted proxy from a reconnecting one.
fn session() -> &'static str {
    static SESSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SESSION.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        proto::token::generate().unwrap_or_else(|_| format!("{}-{nanos}", std::process::id()))
    })
}

impl BatchBuilder {
    fn new(node: &str, seq: u64) -> Self {
        let request = IngestRequest {
            node: node.to_string(),
            batch_seq: seq,
            events: Vec::with_capacity(64),
            losses: None,
            session: session().to_string(),
        };
        Self {
            len: prost::Message::encoded_len(&request),
            request,
            payload: 0,
            packets: 0,
        }
    }

    fn events(&self) -> usize {
        self.request.events.len()
    }

    fn push(&mut self, item: Item) {
        let kind = match item {
            Item::Opened(c) => Kind::Opened(*c),
            Item::Updated(u) => Kind::Updated(*u),
            Item::Closed(c) => Kind::Closed(*c),
            Item::Packet(p) => {
                self.payload += p.data.len() + p.original.len();
                self.packets += 1;
                Kind::Packet(p)
            }
        };
        let event = Event { kind: Some(kind) };
        self.len += prost::encoding::message::encoded_len(3, &event);
        self.request.events.push(event);
    }

    fn finish(mut self, inner: &Inner, sent: &mut ProxyLosses) -> Batch {
        let losses = inner.losses();
        if losses != ProxyLosses::default() {
            self.request.losses = Some(losses);
        }
        *sent = losses;
        Batch {
            seq: self.request.batch_seq,
            events: self.events(),
            request: self.request,
            payload: self.payload,
            packets: self.packets,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn inner(bound: usize) -> (Arc<Inner>, mpsc::UnboundedReceiver<Item>) {
        Inner::new(true, bound)
    }

    fn packet(seq: u64, data: &'static [u8]) -> Item {
        Item::Packet(Packet {
            conn_id: 9,
            seq,
            direction: Direction::S2c as i32,
            ts: Some(Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            data: Bytes::from_static(data),
            ..Default::default()
        })
    }

    fn packets(req: &IngestRequest) -> Vec<&Packet> {
        req.events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Packet(p)) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn batches_and_their_replays_share_payloads_and_track_their_encoded_size() {
        let (inner, _rx) = inner(10);
        let big = Bytes::from(vec![0xabu8; 100_000]);
        let mut b = BatchBuilder::new("n", 1);
        b.push(packet(1, b"small"));
        b.push(Item::Packet(Packet {
            conn_id: 9,
            seq: 2,
            data: big.clone(),
            ..Default::default()
        }));
        b.push(packet(3, b"after"));
        let len = b.len;
        let batch = b.finish(&inner, &mut ProxyLosses::default());
        // What a send or a replay hands to gRPC: a clone holding the same payload bytes.
        let sent = batch.request.clone();
        for req in [&batch.request, &sent] {
            assert_eq!(packets(req)[1].data.as_ptr(), big.as_ptr());
        }
        let wire = sent.encode_to_vec();
        assert_eq!(wire.len(), len);
        let decoded = IngestRequest::decode(wire.as_slice()).unwrap();
        let got: Vec<(u64, &[u8])> = packets(&decoded)
            .into_iter()
            .map(|p| (p.seq, &p.data[..]))
            .collect();
        assert_eq!(
            got,
            vec![(1, &b"small"[..]), (2, &big[..]), (3, &b"after"[..])]
        );
    }

    #[test]
    fn modified_and_dropped_packets_carry_both_versions_and_release_all_they_held() {
        let (inner, mut rx) = inner(10);
        let reporter = Reporter {
            inner: inner.clone(),
        };
        let ts = Timestamp::default();
        let old = Bytes::from_static(b"old\0");
        reporter.modified_packet(9, 1, Direction::C2s, ts, "new".into(), old.clone(), false);
        reporter.modified_packet(9, 2, Direction::C2s, ts, Bytes::new(), old.clone(), true);
        assert_eq!(inner.bytes.load(Relaxed), 3 + 4 + 4);
        let mut b = BatchBuilder::new("n", 1);
        while let Ok(item) = rx.try_recv() {
            b.push(item);
        }
        let batch = b.finish(&inner, &mut ProxyLosses::default());
        let decoded = IngestRequest::decode(batch.request.encode_to_vec().as_slice()).unwrap();
        let got: Vec<_> = packets(&decoded)
            .into_iter()
            .map(|p| (&p.data[..], p.modified, &p.original[..], p.dropped))
            .collect();
        assert_eq!(
            got,
            vec![
                (&b"new"[..], true, &old[..], false),
                (&b""[..], true, &old[..], true),
            ]
        );
        // The acknowledgement releases the received bytes too, not only the sent ones.
        inner.release(batch.events, batch.payload);
        assert_eq!(
            (inner.events.load(Relaxed), inner.bytes.load(Relaxed)),
            (0, 0)
        );
    }

    #[test]
    fn a_batch_carries_node_sequence_session_events_and_losses() {
        let (inner, _rx) = inner(10);
        let mut b = BatchBuilder::new("node-a", 42);
        b.push(Item::Opened(Box::new(Connection {
            id: 9,
            dst_host: "example".into(),
            ..Default::default()
        })));
        b.push(packet(1, b"hello"));
        b.push(Item::Closed(Box::new(ConnectionClosed {
            id: 9,
            reason: "client sent FIN".into(),
            ..Default::default()
        })));
        inner.packets_dropped.store(3, Relaxed);
        let mut sent = ProxyLosses::default();
        let batch = b.finish(&inner, &mut sent);
        let req = &batch.request;
        assert_eq!((req.node.as_str(), req.batch_seq), ("node-a", 42));
        assert_eq!(req.session, session());
        assert_eq!(req.events.len(), 3);
        assert!(matches!(&req.events[0].kind, Some(Kind::Opened(c)) if c.dst_host == "example"));
        let p = packets(req)[0];
        assert_eq!(
            (p.conn_id, p.seq, p.direction),
            (9, 1, Direction::S2c as i32)
        );
        assert_eq!(&p.data[..], b"hello");
        assert!(
            matches!(&req.events[2].kind, Some(Kind::Closed(c)) if c.reason == "client sent FIN")
        );
        assert_eq!(req.losses.map(|l| l.packets_dropped), Some(3));
        assert_eq!(sent.packets_dropped, 3);
        assert_eq!((batch.events, batch.payload, batch.packets), (3, 5, 1));
    }

    /// Two registries in memory: streams to `down` fail at once, the other acknowledges
    /// each batch and keeps it.
    struct TwoReplicas {
        current: AtomicUsize,
        down: usize,
        opened: Mutex<Vec<usize>>,
        got: Arc<Mutex<Vec<IngestRequest>>>,
    }

    impl IngestSink for TwoReplicas {
        fn open(&self, batches: ReceiverStream<IngestRequest>) -> proto::ingest::Opening {
            let i = self.current.load(Relaxed);
            self.opened.lock().unwrap().push(i);
            let down = i == self.down;
            let got = self.got.clone();
            Box::pin(async move {
                if down {
                    return Err(Status::unavailable("connection refused"));
                }
                let acks = batches.map(move |req| {
                    let batch_seq = req.batch_seq;
                    got.lock().unwrap().push(req);
                    Ok(IngestAck {
                        batch_seq,
                        ..Default::default()
                    })
                });
                Ok(Box::pin(acks) as Acks)
            })
        }

        fn target(&self) -> String {
            format!("replica-{}", self.current.load(Relaxed))
        }

        fn replicas(&self) -> usize {
            2
        }

        fn next(&self) {
            self.current.store(1 - self.current.load(Relaxed), Relaxed);
        }
    }

    #[tokio::test]
    async fn a_failed_stream_moves_to_the_next_registry() {
        let sink = Arc::new(TwoReplicas {
            current: AtomicUsize::new(0),
            down: 0,
            opened: Mutex::new(Vec::new()),
            got: Arc::default(),
        });
        let (reporter, task) = Reporter::start(sink.clone(), "n".into(), true, 100);
        let ts = Timestamp::default();
        reporter.packet(9, 1, Direction::C2s, ts, Bytes::from_static(b"first"));
        let delivered = async {
            while sink.got.lock().unwrap().len() < 2 {
                sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), delivered)
            .await
            .expect("delivered to replica 1");
        assert_eq!(*sink.opened.lock().unwrap(), [0, 1]);
        let got = sink.got.lock().unwrap().clone();
        // The hello (empty) first, then the packet.
        assert!(got[0].events.is_empty());
        assert_eq!(got[0].session, session());
        let with_packets: Vec<_> = got.iter().filter(|b| !b.events.is_empty()).collect();
        assert_eq!(&packets(with_packets[0])[0].data[..], b"first");
        assert_eq!(task.flush(&reporter, Duration::from_secs(1)).await, 0);
    }

    #[test]
    fn sheds_counters_then_packets_then_records() {
        let (inner, _rx) = inner(8);
        // Counters stop at half the bound.
        for _ in 0..4 {
            assert!(inner.admit(Class::Counters, 0));
        }
        assert!(!inner.admit(Class::Counters, 0));
        // Packets fill up to the bound.
        for i in 0..4 {
            assert!(inner.push(packet(i, b"abc"), Class::Packet, 3));
        }
        assert!(!inner.push(packet(9, b"abc"), Class::Packet, 3));
        assert_eq!(inner.losses().packets_dropped, 1);
        assert_eq!(inner.losses().bytes_dropped, 3);
        // Records still fit in the reserve above the bound.
        for _ in 0..(8 / 4 + 64) {
            assert!(inner.push(Item::Updated(Box::default()), Class::Record, 0));
        }
        assert!(!inner.push(Item::Updated(Box::default()), Class::Record, 0));
        assert_eq!(inner.losses().events_dropped, 1);
        inner.release(1, 3);
        assert!(inner.admit(Class::Record, 0));
    }
}
