//! Batching alone: the builder's encoding, the Nagle decision, acknowledgements and the
//! batches that carry only loss totals.

use bytes::Bytes;
use prost::Message;
use prost_types::Timestamp;
use proto::{
    common::{Connection, Direction, Packet},
    registry::ConnectionClosed,
};

use super::*;

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

pub(in crate::report) fn packets(req: &IngestRequest) -> Vec<&Packet> {
    req.events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Packet(p)) => Some(p),
            _ => None,
        })
        .collect()
}

/// `(seq, events)` of every batch awaiting acknowledgement.
fn in_flight(b: &Batcher) -> Vec<(u64, usize)> {
    b.unacked.iter().map(|x| (x.seq, x.events)).collect()
}

fn pend(b: &mut Batcher, items: impl IntoIterator<Item = Item>) {
    b.pending.extend(items);
    b.received();
}

#[test]
fn batches_and_their_replays_share_payloads_and_track_their_encoded_size() {
    let big = Bytes::from(vec![0xabu8; 100_000]);
    let mut b = Builder::new("n", 1);
    b.push(packet(1, b"small"));
    b.push(Item::Packet(Packet {
        conn_id: 9,
        seq: 2,
        data: big.clone(),
        ..Default::default()
    }));
    b.push(packet(3, b"after"));
    let len = b.len;
    let batch = b.finish(&Losses::default(), &mut ProxyLosses::default());
    // What a send or a replay hands to gRPC: the same request, not a copy of it.
    let sent = batch.request.clone();
    assert!(Arc::ptr_eq(&sent, &batch.request));
    assert_eq!(packets(&sent)[1].data.as_ptr(), big.as_ptr());
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
fn a_batch_carries_node_sequence_session_events_and_losses() {
    let losses = Losses::default();
    let mut b = Builder::new("node-a", 42);
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
    for _ in 0..3 {
        losses.packet(0);
    }
    let mut sent = ProxyLosses::default();
    let batch = b.finish(&losses, &mut sent);
    let req = &batch.request;
    assert_eq!((req.node.as_str(), req.batch_seq), ("node-a", 42));
    assert_eq!(req.session, ingest_session());
    assert_eq!(req.events.len(), 3);
    assert!(matches!(&req.events[0].kind, Some(Kind::Opened(c)) if c.dst_host == "example"));
    let p = packets(req)[0];
    assert_eq!(
        (p.conn_id, p.seq, p.direction),
        (9, 1, Direction::S2c as i32)
    );
    assert_eq!(&p.data[..], b"hello");
    assert!(matches!(&req.events[2].kind, Some(Kind::Closed(c)) if c.reason == "client sent FIN"));
    assert_eq!(req.losses.map(|l| l.packets_dropped), Some(3));
    assert_eq!(sent.packets_dropped, 3);
    assert_eq!((batch.events, batch.payload, batch.packets), (3, 5, 1));
}

#[test]
fn idle_events_go_out_at_once_busy_ones_wait_for_the_acknowledgement() {
    let losses = Losses::default();
    let mut b = Batcher::new("n".into(), &losses);
    // The hello is in flight, and holds nothing back.
    assert_eq!(in_flight(&b), [(1, 0)]);
    pend(&mut b, [packet(1, b"a")]);
    assert!(b.batch(false, &losses));
    assert_eq!(in_flight(&b), [(1, 0), (2, 1)]);
    // A batch with events awaits its acknowledgement: the next events wait, and so does the
    // queue (nothing more is received).
    pend(&mut b, [packet(2, b"b"), packet(3, b"c")]);
    assert!(!b.batch(false, &losses));
    assert_eq!(in_flight(&b), [(1, 0), (2, 1)]);
    // Acknowledged: the waiting events go out in one batch.
    let acked: Vec<u64> = b.acknowledged(2).map(|x| x.seq).collect();
    assert_eq!(acked, [1, 2]);
    assert!(b.batch(false, &losses));
    assert_eq!(in_flight(&b), [(3, 2)]);
    // Shutting down, events go out at once even behind a batch in flight.
    pend(&mut b, [packet(4, b"d")]);
    assert!(b.batch(true, &losses));
    assert_eq!(in_flight(&b), [(3, 2), (4, 1)]);
    assert!(b.pending.is_empty());
    assert!(!b.is_empty());
    b.acknowledged(4).for_each(drop);
    assert!(b.is_empty());
}

#[test]
fn full_batches_go_out_behind_one_in_flight_and_keep_the_queue_flowing() {
    let losses = Losses::default();
    let mut b = Batcher::new("n".into(), &losses);
    pend(&mut b, [packet(1, b"a")]);
    b.batch(false, &losses);
    pend(
        &mut b,
        (0..BATCH_EVENTS as u64 + 1).map(|i| packet(i + 2, b"x")),
    );
    assert_eq!(b.room(), 1);
    // Busy, but a batch is full: out it goes, with the rest in a second one, and since
    // traffic is heavy the queue is read on.
    assert!(b.batch(false, &losses));
    assert_eq!(in_flight(&b), [(1, 0), (2, 1), (3, BATCH_EVENTS), (4, 1)]);
    assert_eq!(b.room(), BATCH_EVENTS);
}

#[test]
fn a_batch_closes_at_its_byte_size() {
    static CHUNK: [u8; 300_000] = [7; 300_000];
    let losses = Losses::default();
    let mut b = Batcher::new("n".into(), &losses);
    b.acknowledged(1).for_each(drop);
    pend(&mut b, (1..=5).map(|i| packet(i, &CHUNK)));
    assert!(b.batch(false, &losses));
    // Four chunks pass BATCH_BYTES (1 MiB): the fifth starts the next batch.
    assert_eq!(in_flight(&b), [(2, 4), (3, 1)]);
    assert_eq!(b.unacked[0].payload, 4 * CHUNK.len());
}

#[test]
fn at_most_max_unacked_batches_are_in_flight() {
    let losses = Losses::default();
    let mut b = Batcher::new("n".into(), &losses);
    for i in 0..MAX_UNACKED as u64 - 1 {
        pend(
            &mut b,
            (0..BATCH_EVENTS as u64).map(|s| packet(i * 10_000 + s + 1, b"x")),
        );
        b.batch(false, &losses);
    }
    assert_eq!(b.unacked.len(), MAX_UNACKED);
    pend(
        &mut b,
        (0..BATCH_EVENTS as u64).map(|s| packet(s + 1, b"y")),
    );
    assert!(!b.batch(false, &losses));
    assert!(!b.batch(true, &losses));
    assert_eq!(b.unacked.len(), MAX_UNACKED);
    assert_eq!(b.pending.len(), BATCH_EVENTS);
    // Nor do loss totals squeeze in.
    losses.event();
    b.report_losses(&losses);
    assert_eq!(b.unacked.len(), MAX_UNACKED);
}

#[test]
fn new_loss_totals_go_out_once_in_an_empty_batch() {
    let losses = Losses::default();
    let mut b = Batcher::new("n".into(), &losses);
    b.report_losses(&losses);
    assert_eq!(in_flight(&b), [(1, 0)]);
    losses.packet(10);
    b.report_losses(&losses);
    b.report_losses(&losses);
    assert_eq!(in_flight(&b), [(1, 0), (2, 0)]);
    let sent = b.unacked[1].request.losses.expect("losses");
    assert_eq!((sent.packets_dropped, sent.bytes_dropped), (1, 10));
}
