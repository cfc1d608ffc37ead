//! The ingest stream, with its failover and replay: the background task that feeds batches
//! to the registry ([`IngestSink`]) and takes their acknowledgements.
//!
//! A broken stream is reopened under the one retry policy ([`platform::retry`]) and sends the
//! unacknowledged batches again, in order, before any new one; the registry applies
//! replays idempotently. With several registry URLs (replicas of one registry,
//! [`platform::failover::Replicas`]), a failed stream reopens on the next replica at once, and
//! backoff starts only once a stream to each has failed in a row; a replica that takes
//! batches but acknowledges none is left after [`ACK_TIMEOUT`]. At shutdown the task sends
//! what is queued and waits for its acknowledgement until the deadline it is given.

use std::{sync::Arc, time::Duration};

use platform::{
    ingest::{Acks, Batch, IngestSink},
    retry::{Backoff, Retry},
};
use proto::registry::IngestAck;
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior, sleep, sleep_until},
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Status;

use super::{
    admission::{Admission, Item},
    batch::Batcher,
    ticker::COUNTERS_INTERVAL,
};

/// How long batches may wait in flight with no acknowledgement before a reporter with other
/// registries to go to leaves the one it streams to (a registry acknowledges once a batch is
/// durable, normally within milliseconds).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How a broken stream is reopened.
const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

/// Why one stream ended.
enum StreamEnd {
    /// Shutdown: everything was acknowledged, or the deadline passed.
    Stopped,
    /// The stream broke; `acked` if it had acknowledged anything.
    Failed { why: Broken, acked: bool },
}

/// What broke a stream.
#[derive(Debug, thiserror::Error)]
enum Broken {
    /// The registry (or the way to it) answered with an error.
    #[error("{0}")]
    Status(Status),
    #[error("the registry ended the stream")]
    Ended,
    #[error("request stream closed")]
    Closed,
    #[error("no acknowledgement for {} s", ACK_TIMEOUT.as_secs())]
    NoAck,
}

/// The background task.
pub(super) struct Task {
    admission: Arc<Admission>,
    rx: mpsc::Receiver<Item>,
    sink: Arc<dyn IngestSink>,
    batcher: Batcher,
    stop: watch::Receiver<Option<Instant>>,
    /// The last stream failed: the next one that opens replays, and says so.
    recovering: bool,
    /// Where the current stream goes ([`IngestSink::target`]), for logs.
    streaming_to: String,
}

impl Task {
    /// The task over the queue `rx`, streaming to `sink` what `batcher` makes, until `stop`
    /// carries a deadline.
    pub(super) fn new(
        admission: Arc<Admission>,
        rx: mpsc::Receiver<Item>,
        sink: Arc<dyn IngestSink>,
        batcher: Batcher,
        stop: watch::Receiver<Option<Instant>>,
    ) -> Self {
        Self {
            admission,
            rx,
            sink,
            batcher,
            stop,
            recovering: false,
            streaming_to: String::new(),
        }
    }

    /// Streams, reopening after every failure, until stopped.
    pub(super) async fn run(mut self) {
        let mut retry = RETRY.start(self.sink.replicas());
        loop {
            let backoff = match self.one_stream().await {
                StreamEnd::Stopped => return,
                StreamEnd::Failed { why, acked } => {
                    self.recovering = true;
                    if acked {
                        retry.succeeded();
                    }
                    let wait = retry.failed();
                    self.fail_over(&why, &retry);
                    match wait {
                        Some(wait) => wait,
                        // Another registry is still untried in this round: no backoff.
                        None => continue,
                    }
                }
            };
            let deadline = *self.stop.borrow();
            match deadline {
                Some(d) if d <= Instant::now() + backoff => {
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
    fn fail_over(&self, why: &Broken, retry: &Retry) {
        let from = &self.streaming_to;
        self.sink.next();
        let buffered = self.admission.buffered();
        if !retry.worth_logging() {
            return;
        }
        if retry.replicas() > 1 {
            let to = self.sink.target();
            tracing::warn!(
                %from,
                %to,
                buffered,
                "failover: registry ingest stream to {from} failed ({why}); switching to \
                 {to}; relaying goes on, events are buffered and will be replayed"
            );
        } else {
            tracing::warn!(
                buffered,
                "registry ingest stream down ({why}); relaying goes on, \
                 events are buffered and will be replayed"
            );
        }
    }

    fn give_up(&self) {
        let left = self.admission.buffered();
        if left > 0 {
            tracing::warn!(
                events = left,
                "shutting down with events the registry never acknowledged"
            );
        }
    }

    /// Whether the stream should end for shutdown: everything was sent and acknowledged,
    /// or the shutdown deadline passed (what is left is then given up, and counted).
    fn stopping(&mut self, deadline: Option<Instant>) -> bool {
        let Some(d) = deadline else {
            return false;
        };
        if self.rx.is_empty() && self.batcher.is_empty() {
            return true;
        }
        if d <= Instant::now() {
            self.give_up();
            return true;
        }
        false
    }

    /// One stream: opens it, replays what the last one left unacknowledged, then sends new
    /// batches as they form, until it breaks or shutdown ends it.
    async fn one_stream(&mut self) -> StreamEnd {
        let (out_tx, out_rx) = mpsc::channel::<Batch>(4);
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
        let unacked = &self.batcher.unacked;
        let replay = (unacked.len(), unacked.iter().map(|b| b.events).sum());
        let failed = |why, acked| StreamEnd::Failed { why, acked };
        loop {
            let deadline = *self.stop.borrow();
            if self.stopping(deadline) {
                return StreamEnd::Stopped;
            }
            let losses = &self.admission.losses;
            let receive = self.batcher.batch(deadline.is_some(), losses);
            let room = self.batcher.room();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                res = &mut call, if acks.is_none() => match res {
                    Ok(stream) => {
                        acks = Some(stream);
                        self.reopened(replay);
                    }
                    Err(status) => return self.rejected(status, acked),
                },
                ack = next_ack(&mut acks) => match ack {
                    Ok(Some(a)) => {
                        acked = true;
                        waiting = Instant::now();
                        self.on_ack(a.batch_seq, &mut next_unsent);
                    }
                    Ok(None) => return failed(Broken::Ended, acked),
                    Err(status) => return self.rejected(status, acked),
                },
                permit = out_tx.reserve(), if next_unsent < self.batcher.unacked.len() => {
                    let Ok(p) = permit else {
                        return failed(Broken::Closed, acked);
                    };
                    if next_unsent == 0 {
                        waiting = Instant::now();
                    }
                    // The batch itself, shared: it stays here until acknowledged.
                    p.send(self.batcher.unacked[next_unsent].request.clone());
                    next_unsent += 1;
                }
                _ = self.rx.recv_many(&mut self.batcher.pending, room), if receive => {
                    self.batcher.received();
                }
                // An empty batch that only carries the latest loss totals, if they changed.
                _ = tick.tick() => self.batcher.report_losses(&self.admission.losses),
                _ = self.stop.changed() => {}
                () = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {}
                () = sleep_until(waiting + ack_timeout.unwrap_or_default()),
                    if ack_timeout.is_some() && next_unsent > 0 => {
                    return failed(Broken::NoAck, acked);
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

    /// The stream ended with `status`. A batch the registry rejects as invalid would fail
    /// every replay too: it is dropped and counted as lost.
    fn rejected(&mut self, status: Status, acked: bool) -> StreamEnd {
        if status.code() == tonic::Code::InvalidArgument {
            // Batches apply in order: the first unacknowledged one is the culprit.
            if let Some(b) = self.batcher.unacked.pop_front() {
                tracing::error!(
                    batch = b.seq,
                    events = b.events,
                    "registry rejected a batch: {status}"
                );
                self.admission.release(b.events, b.payload);
                self.admission.losses.batch(b.events, b.packets, b.payload);
            }
        }
        StreamEnd::Failed {
            why: Broken::Status(status),
            acked,
        }
    }

    /// Batches up to `seq` are acknowledged: their room is given back.
    fn on_ack(&mut self, seq: u64, next_unsent: &mut usize) {
        for b in self.batcher.acknowledged(seq) {
            self.admission.release(b.events, b.payload);
            *next_unsent = next_unsent.saturating_sub(1);
        }
    }
}

/// The next acknowledgement, once the stream is open.
async fn next_ack(acks: &mut Option<Acks>) -> Result<Option<IngestAck>, Status> {
    match acks {
        Some(s) => s.next().await.transpose(),
        None => std::future::pending().await,
    }
}
