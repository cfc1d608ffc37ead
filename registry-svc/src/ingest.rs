//! The ingest path: batches from every proxy's stream are applied by one writer thread and
//! made durable by one committer thread, so disk work never runs on the async threads (in
//! `interpose up` those also relay the traffic) and a busy registry syncs on a schedule
//! rather than once per batch.
//!
//! Group commit: the writer applies a batch as soon as it takes it (watchers see the change
//! at once); the batch's acknowledgement waits for the next commit, which makes everything
//! applied before it durable with one payload-log sync and one sled flush. A commit starts
//! when the oldest batch waiting has waited [`COMMIT_INTERVAL`] (the store's
//! `commit_interval`: none for PostgreSQL, whose changes watchers see only once committed)
//! or [`COMMIT_BYTES`] of payload wait; while one commit runs the next group gathers.
//! Acknowledgements are cumulative: the proxy's reporter drops every batch up to the one
//! acknowledged, and since it sends its next batch only when its last one is acknowledged
//! (or a batch is full), a longer interval means fewer, larger batches.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use platform::serve::Drain;
use proto::registry::{IngestAck, IngestRequest, event::Kind};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::{
    liveness::Liveness,
    state::{Rejected, State},
};

pub use crate::backend::COMMIT_INTERVAL;
/// Payload bytes waiting that start a commit at once.
pub const COMMIT_BYTES: usize = 32 << 20;
/// Batches (from all streams) queued for the writer; a full queue holds the streams back.
const QUEUE: usize = 64;

/// The writer and committer threads, fed by every ingest stream.
pub struct Pipeline {
    jobs: mpsc::Sender<Job>,
}

/// One batch for the writer, with the stream to acknowledge it on.
struct Job {
    batch: IngestRequest,
    stream: Arc<watch::Sender<Acked>>,
}

/// What one stream has had made durable, as its task reads it.
#[derive(Debug, Clone, Default)]
struct Acked {
    /// The last batch made durable.
    seq: u64,
    /// Malformed events skipped, in total.
    rejected: u64,
    /// Why the first of them since the last acknowledgement was skipped.
    rejection: Option<String>,
    /// The store failed: the stream ends with this.
    failed: Option<Status>,
}

/// A batch applied and waiting for its commit.
struct Waiting {
    stream: Arc<watch::Sender<Acked>>,
    seq: u64,
    rejected: Rejected,
}

/// The group the next commit makes durable.
#[derive(Default)]
struct Group {
    waiting: Vec<Waiting>,
    /// When the oldest of them was applied.
    since: Option<Instant>,
    bytes: usize,
    /// The writer is gone: commit what is left and stop.
    closed: bool,
}

/// The group, shared by writer and committer.
#[derive(Default)]
struct CommitQueue {
    group: Mutex<Group>,
    wake: Condvar,
    /// How long the oldest batch waits for others to join its commit
    /// ([`crate::backend::Durability::commit_interval`]).
    interval: Duration,
}

impl CommitQueue {
    fn lock(&self) -> MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an applied batch of `bytes` payload to the group; wakes the committer when the
    /// group starts or has grown big enough (not on every batch: it sleeps on a timer).
    fn push(&self, w: Waiting, bytes: usize) {
        let mut g = self.lock();
        let first = g.waiting.is_empty();
        if first {
            g.since = Some(Instant::now());
        }
        g.waiting.push(w);
        let full_before = g.bytes >= COMMIT_BYTES;
        g.bytes += bytes;
        if first || (!full_before && g.bytes >= COMMIT_BYTES) {
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Waits until a group is due and takes it; `None` once closed and empty.
    fn next_group(&self) -> Option<Vec<Waiting>> {
        let mut g = self.lock();
        loop {
            let Some(since) = g.since.filter(|_| !g.waiting.is_empty()) else {
                if g.closed {
                    return None;
                }
                g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let due = since + self.interval;
            let now = Instant::now();
            if g.closed || g.bytes >= COMMIT_BYTES || now >= due {
                g.since = None;
                g.bytes = 0;
                return Some(std::mem::take(&mut g.waiting));
            }
            g = self
                .wake
                .wait_timeout(g, due - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Pipeline {
    /// Starts the writer and committer threads over `state`. They stop once the pipeline
    /// and every stream using it are dropped, after a last commit.
    pub fn start(state: Arc<State>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(CommitQueue {
            interval: state.store.commit_interval(),
            ..CommitQueue::default()
        });
        let (st, sh) = (state.clone(), shared.clone());
        std::thread::Builder::new()
            .name("registry-commit".into())
            .spawn(move || commit(&st, &sh))?;
        std::thread::Builder::new()
            .name("registry-write".into())
            .spawn(move || write(&state, rx, &shared))?;
        Ok(Self { jobs })
    }

    /// Serves one ingest stream: hands its batches to the writer and sends each
    /// acknowledgement once the batch is durable. The stream counts as its node's ingest
    /// session (see [`Liveness`]) from its first batch to its end.
    pub async fn serve(
        &self,
        liveness: Arc<Liveness>,
        mut inbound: impl Stream<Item = Result<IngestRequest, Status>> + Unpin,
        tx: mpsc::Sender<Result<IngestAck, Status>>,
        drain: Drain,
    ) {
        let acks = Arc::new(watch::channel(Acked::default()).0);
        let mut durable = acks.subscribe();
        let mut attached = None;
        // The last batch handed to the writer, and the last acknowledged.
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut rejected_before = 0u64;
        let mut inbound_open = true;
        let end = loop {
            if !inbound_open && acked == sent {
                return;
            }
            tokio::select! {
                next = inbound.next(), if inbound_open => match next.transpose() {
                    Ok(Some(batch)) => {
                        if attached.is_none() && !batch.node.is_empty() {
                            attached = Some(liveness.attach(&batch.node, &batch.session).await);
                        }
                        sent = batch.batch_seq;
                        let job = Job { batch, stream: acks.clone() };
                        if self.jobs.send(job).await.is_err() {
                            break Status::unavailable("the registry is shutting down");
                        }
                    }
                    // The proxy is done sending: acknowledge what is in flight, then end.
                    Ok(None) => inbound_open = false,
                    Err(status) => {
                        tracing::debug!(%status, "ingest stream ended");
                        return;
                    }
                },
                changed = durable.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Read and clear the rejection reason in one step, so none is lost.
                    let mut now = Acked::default();
                    acks.send_if_modified(|a| {
                        now = a.clone();
                        a.rejection = None;
                        false
                    });
                    if let Some(status) = now.failed {
                        break status;
                    }
                    if now.seq == acked {
                        continue;
                    }
                    acked = now.seq;
                    let ack = IngestAck {
                        batch_seq: now.seq,
                        rejected_events: now.rejected - rejected_before,
                        rejection: now.rejection.unwrap_or_default(),
                    };
                    rejected_before = now.rejected;
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
                // At shutdown the proxy is told to go: what it sent after its last
                // acknowledgement it replays to the next registry it reaches.
                () = drain.wait() => break Drain::status(),
            }
        };
        let _ = tx.send(Err(end)).await;
    }
}

/// Payload bytes in a batch: what its commit will sync.
fn payload_bytes(batch: &IngestRequest) -> usize {
    batch
        .events
        .iter()
        .map(|e| match &e.kind {
            Some(Kind::Packet(p)) => p.data.len(),
            _ => 0,
        })
        .sum()
}

/// The writer: applies batches in arrival order and passes them to the committer.
fn write(state: &State, mut jobs: mpsc::Receiver<Job>, shared: &CommitQueue) {
    while let Some(Job { batch, stream }) = jobs.blocking_recv() {
        let bytes = payload_bytes(&batch);
        let seq = batch.batch_seq;
        let mut rejected = Rejected::default();
        match state.apply(batch, &mut rejected) {
            Ok(()) => shared.push(
                Waiting {
                    stream,
                    seq,
                    rejected,
                },
                bytes,
            ),
            Err(e) => {
                let status = Status::from(e);
                stream.send_modify(|a| a.failed = Some(status));
            }
        }
    }
    shared.close();
}

/// The committer: makes each due group durable, then acknowledges it.
fn commit(state: &State, shared: &CommitQueue) {
    let mut settler = Settler::new(state);
    while let Some(group) = shared.next_group() {
        settler.settle(state, group);
    }
}

/// Settles groups as the committer takes them, in order.
///
/// A commit makes durable everything applied before it, whoever starts it (the committer,
/// or a clear, a purge or a liveness close), so it may take the writes of batches whose
/// group is not settled yet. When it fails, a store that stages writes (PostgreSQL's) has
/// lost them ([`crate::backend::Durability::failed_commits`]): every group that may hold such
/// a batch fails, without being acknowledged, and its streams replay it. Those are the
/// group settled across the failure and the first group taken after it.
struct Settler {
    /// Failed commits counted when the last group was taken.
    seen: u64,
}

impl Settler {
    fn new(state: &State) -> Self {
        Self {
            seen: state.store.failed_commits(),
        }
    }

    /// Makes `group` (just taken) durable and acknowledges it, or fails its streams.
    fn settle(&mut self, state: &State, group: Vec<Waiting>) {
        let at_take = state.store.failed_commits();
        let lost_before = at_take > self.seen;
        self.seen = at_take;
        let failed = match state.commit() {
            Err(e) => {
                let status = Status::from(e);
                tracing::error!(%status, "could not make ingested batches durable");
                Some(status)
            }
            Ok(()) if lost_before || state.store.failed_commits() > at_take => {
                Some(Status::unavailable(
                    "a registry commit that took this stream's last batches failed: send \
                     them again",
                ))
            }
            Ok(()) => None,
        };
        for w in group {
            w.stream.send_modify(|a| match &failed {
                Some(status) => a.failed = Some(status.clone()),
                None => {
                    a.seq = a.seq.max(w.seq);
                    a.rejected += w.rejected.count;
                    if a.rejection.is_none() {
                        a.rejection = w.rejected.first;
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{common::Connection, registry::Event};

    use super::*;

    /// Applies a batch opening record `id` and returns what waits for its commit.
    fn applied(state: &State, id: u64, stream: &Arc<watch::Sender<Acked>>) -> Waiting {
        let batch = IngestRequest {
            node: "n".into(),
            batch_seq: id,
            events: vec![Event {
                kind: Some(Kind::Opened(Connection {
                    id,
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let mut rejected = Rejected::default();
        if let Err(e) = state.apply(batch, &mut rejected) {
            panic!("applying batch {id}: {e}");
        }
        Waiting {
            stream: stream.clone(),
            seq: id,
            rejected,
        }
    }

    /// A state on a new PostgreSQL database, and a stream to acknowledge on.
    fn on_postgres() -> (String, Arc<State>, Arc<watch::Sender<Acked>>) {
        let url = pg_fixture::Cluster::shared()
            .create_database()
            .expect("a database");
        let pg = crate::backend::pg::PgStore::open(&url, None, &Default::default()).expect("open");
        let stream = Arc::new(watch::channel(Acked::default()).0);
        (url, State::with_backend(Box::new(pg)), stream)
    }

    /// Ends every session on the database at `url` but this one: the store's next commit
    /// fails.
    fn cut_sessions(url: &str) {
        let mut admin = postgres::Client::connect(url, postgres::NoTls).expect("admin");
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .expect("terminate");
    }

    /// The records the database holds (committed ones only).
    fn stored(state: &State) -> Vec<u64> {
        let mut ids = Vec::new();
        state
            .store
            .scan_conns(0, &mut |c| {
                ids.push(c.id);
                true
            })
            .expect("scan");
        ids
    }

    /// Group 1 is taken; batch 2 is applied (group 2); the commit for group 1 fails, having
    /// taken batch 2's writes with it. Group 2 must fail too (and be replayed), not be
    /// acknowledged with its record lost.
    #[test]
    fn the_group_after_a_failed_commit_fails_too() {
        let (url, state, stream) = on_postgres();
        let mut settler = Settler::new(&state);
        let group1 = vec![applied(&state, 1, &stream)];
        let group2 = vec![applied(&state, 2, &stream)];
        cut_sessions(&url);
        settler.settle(&state, group1);
        assert!(
            stream.borrow().failed.is_some(),
            "the failed commit fails group 1"
        );
        stream.send_modify(|a| a.failed = None);
        settler.settle(&state, group2);
        assert!(
            stream.borrow().failed.is_some(),
            "group 2 is failed, not acknowledged: its record was in the failed commit"
        );
        assert_eq!(stream.borrow().seq, 0);
        // What the failed commit took is gone from the database: only replays bring it back.
        assert!(stored(&state).is_empty(), "{:?}", stored(&state));
    }

    /// A commit that a clear starts fails after batch 1 was applied, taking its writes: the
    /// group holding batch 1 fails though its own commit succeeds; the group after it,
    /// whose batch was applied after the failure, is acknowledged.
    #[test]
    fn a_failed_commit_of_another_caller_fails_the_groups_it_took_from() {
        let (url, state, stream) = on_postgres();
        let mut settler = Settler::new(&state);
        let group1 = vec![applied(&state, 1, &stream)];
        cut_sessions(&url);
        assert!(state.clear(&[1]).is_err(), "the clear's commit fails");
        settler.settle(&state, group1);
        assert!(
            stream.borrow().failed.is_some(),
            "group 1's writes were lost"
        );
        stream.send_modify(|a| a.failed = None);
        let group2 = vec![applied(&state, 2, &stream)];
        settler.settle(&state, group2);
        assert!(stream.borrow().failed.is_none());
        assert_eq!(stream.borrow().seq, 2);
        assert_eq!(stored(&state), vec![2]);
    }
}
