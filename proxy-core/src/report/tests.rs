//! The reporter as a whole, over registries in memory: what reaches them, failover, replay
//! after a broken stream, and a rejected batch.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use platform::ingest::{Acks, Batch, Opening};
use prost::Message;
use proto::registry::{IngestAck, IngestRequest, event::Kind};
use tokio::time::sleep;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Status;

use super::*;

fn packets(req: &IngestRequest) -> Vec<&Packet> {
    req.events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Packet(p)) => Some(p),
            _ => None,
        })
        .collect()
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let wait = async {
        while !done() {
            sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn ack(batch_seq: u64) -> Result<IngestAck, Status> {
    Ok(IngestAck {
        batch_seq,
        ..Default::default()
    })
}

#[test]
fn modified_and_dropped_packets_carry_both_versions_and_release_all_they_held() {
    let (admission, mut rx) = Admission::new(10);
    let reporter = Reporter {
        admission: Arc::new(admission),
        live: Arc::default(),
        history: true,
    };
    let ts = Timestamp::default();
    let old = Bytes::from_static(b"old\0");
    reporter.modified_packet(9, 1, Direction::C2s, ts, "new".into(), old.clone(), false);
    reporter.modified_packet(9, 2, Direction::C2s, ts, Bytes::new(), old.clone(), true);
    assert_eq!(reporter.admission.buffered_bytes(), 3 + 4 + 4);
    let mut b = batch::Builder::new("n", 1);
    while let Ok(item) = rx.try_recv() {
        b.push(item);
    }
    let batch = b.finish(&reporter.admission.losses, &mut ProxyLosses::default());
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
    reporter.admission.release(batch.events, batch.payload);
    assert_eq!(
        (reporter.buffered(), reporter.admission.buffered_bytes()),
        (0, 0)
    );
}

#[tokio::test]
async fn history_off_queues_no_packets_but_records_and_the_live_table() {
    let (admission, mut rx) = Admission::new(10);
    let reporter = Reporter {
        admission: Arc::new(admission),
        live: Arc::default(),
        history: false,
    };
    let state = Arc::new(ConnState::new(4));
    let conn = Connection {
        id: 4,
        ..Default::default()
    };
    reporter.opened(conn, state.clone());
    reporter.packet(4, 1, Direction::C2s, Timestamp::default(), "x".into());
    assert_eq!(reporter.active().len(), 1);
    let end = ConnEnd::proxy(proto::common::CloseKind::Fin, "test");
    reporter.closed(&state, &end);
    assert!(reporter.active().is_empty());
    let kinds: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|i| match i {
            Item::Opened(_) => "opened",
            Item::Closed(_) => "closed",
            Item::Updated(_) => "updated",
            Item::Packet(_) => "packet",
        })
        .collect();
    assert_eq!(kinds, ["opened", "closed"]);
}

/// Two registries in memory: streams to `down` fail at once, the other acknowledges
/// each batch and keeps it.
struct TwoReplicas {
    current: AtomicUsize,
    down: usize,
    opened: Mutex<Vec<usize>>,
    got: Arc<Mutex<Vec<Batch>>>,
}

impl IngestSink for TwoReplicas {
    fn open(&self, batches: ReceiverStream<Batch>) -> Opening {
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
                ack(batch_seq)
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
    until("delivery to replica 1", || {
        sink.got.lock().unwrap().len() >= 2
    })
    .await;
    assert_eq!(*sink.opened.lock().unwrap(), [0, 1]);
    let got = sink.got.lock().unwrap().clone();
    // The hello (empty) first, then the packet.
    assert!(got[0].events.is_empty());
    assert_eq!(got[0].session, batch::ingest_session());
    let with_packets: Vec<_> = got.iter().filter(|b| !b.events.is_empty()).collect();
    assert_eq!(&packets(with_packets[0])[0].data[..], b"first");
    assert_eq!(task.flush(&reporter, Duration::from_secs(1)).await, 0);
}

/// What one stream of [`Scripted`] does.
enum Script {
    /// Takes `n` batches without acknowledging any, then breaks.
    TakeThenBreak(usize),
    /// Acknowledges the first batch, then rejects the next as invalid.
    AckThenReject,
}

/// One registry whose streams follow a script, then acknowledge everything; records
/// `(stream, batch)` for each batch it takes.
struct Scripted {
    scripts: Mutex<VecDeque<Script>>,
    streams: AtomicUsize,
    got: Arc<Mutex<Vec<(usize, Batch)>>>,
}

impl Scripted {
    fn new(scripts: impl IntoIterator<Item = Script>) -> Arc<Self> {
        Arc::new(Self {
            scripts: Mutex::new(scripts.into_iter().collect()),
            streams: AtomicUsize::new(0),
            got: Arc::default(),
        })
    }

    fn seqs(&self, stream: usize) -> Vec<u64> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, b)| b.batch_seq)
            .collect()
    }
}

impl IngestSink for Scripted {
    fn open(&self, batches: ReceiverStream<Batch>) -> Opening {
        let stream = self.streams.fetch_add(1, Relaxed);
        let script = self.scripts.lock().unwrap().pop_front();
        let got = self.got.clone();
        let take = move |b: Batch| {
            let seq = b.batch_seq;
            got.lock().unwrap().push((stream, b));
            seq
        };
        let acks: Acks = match script {
            Some(Script::TakeThenBreak(n)) => Box::pin(
                batches
                    .take(n)
                    .filter_map(move |b| {
                        take(b);
                        None::<Result<IngestAck, Status>>
                    })
                    .chain(tokio_stream::once(Err(Status::unavailable("cut")))),
            ),
            Some(Script::AckThenReject) => {
                let mut first = true;
                Box::pin(batches.map(move |b| {
                    let seq = take(b);
                    if std::mem::take(&mut first) {
                        ack(seq)
                    } else {
                        Err(Status::invalid_argument("bad batch"))
                    }
                }))
            }
            None => Box::pin(batches.map(move |b| ack(take(b)))),
        };
        Box::pin(async move { Ok(acks) })
    }
}

#[tokio::test]
async fn a_broken_stream_replays_the_very_same_batches_in_order() {
    let sink = Scripted::new([Script::TakeThenBreak(2)]);
    let (reporter, task) = Reporter::start(sink.clone(), "n".into(), true, 100);
    reporter.packet(9, 1, Direction::C2s, Timestamp::default(), "a".into());
    until("the replay", || sink.seqs(1).len() >= 2).await;
    // The hello and the packet's batch, taken and never acknowledged; then again, in
    // order, on the next stream.
    assert_eq!(sink.seqs(0), [1, 2]);
    assert_eq!(sink.seqs(1), [1, 2]);
    {
        let got = sink.got.lock().unwrap();
        // The replay sent the batches kept, not copies of them.
        assert!(Arc::ptr_eq(&got[0].1, &got[2].1));
        assert!(Arc::ptr_eq(&got[1].1, &got[3].1));
        assert_eq!(&packets(&got[3].1)[0].data[..], b"a");
    }
    // New events follow on the new stream.
    reporter.packet(9, 2, Direction::C2s, Timestamp::default(), "b".into());
    until("the next batch", || sink.seqs(1).len() >= 3).await;
    assert_eq!(sink.seqs(1), [1, 2, 3]);
    assert_eq!(task.flush(&reporter, Duration::from_secs(1)).await, 0);
    assert_eq!(reporter.losses(), ProxyLosses::default());
}

#[tokio::test]
async fn a_rejected_batch_is_dropped_and_counted_not_replayed() {
    let sink = Scripted::new([Script::AckThenReject]);
    let (reporter, task) = Reporter::start(sink.clone(), "n".into(), true, 100);
    reporter.packet(9, 1, Direction::C2s, Timestamp::default(), "abc".into());
    until("the rejection", || reporter.losses().packets_dropped == 1).await;
    let l = reporter.losses();
    assert_eq!(
        (l.packets_dropped, l.bytes_dropped, l.events_dropped),
        (1, 3, 0)
    );
    reporter.packet(9, 2, Direction::C2s, Timestamp::default(), "d".into());
    let second = || -> Vec<Batch> {
        let got = sink.got.lock().unwrap();
        got.iter()
            .filter(|(s, _)| *s == 1)
            .map(|(_, b)| b.clone())
            .collect()
    };
    until("the next packet", || {
        second().iter().any(|b| !b.events.is_empty())
    })
    .await;
    assert_eq!(sink.seqs(0), [1, 2]);
    // The rejected batch is not sent again: the second stream carries only the new packet,
    // with the loss.
    let second = second();
    assert!(second.iter().all(|b| b.batch_seq > 2));
    let sent: Vec<&[u8]> = second
        .iter()
        .flat_map(|b| packets(b))
        .map(|p| &p.data[..])
        .collect();
    assert_eq!(sent, [b"d"]);
    let with_packet = second.iter().find(|b| !b.events.is_empty());
    let carried = with_packet
        .and_then(|b| b.losses)
        .map(|l| l.packets_dropped);
    assert_eq!(carried, Some(1));
    assert_eq!(task.flush(&reporter, Duration::from_secs(1)).await, 0);
}
