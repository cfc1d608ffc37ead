//! Batching: queued events gathered into `IngestRequest`s, numbered, and kept until the
//! registry acknowledges them.
//!
//! Batching is Nagle-like, with no timer: a batch goes out at once when none is awaiting
//! acknowledgement, otherwise events gather until the acknowledgement arrives or a batch is
//! full ([`BATCH_EVENTS`] events or [`BATCH_BYTES`] encoded); heavy traffic keeps several
//! full batches in flight (at most [`MAX_UNACKED`]). So an idle proxy reports each event
//! immediately and a busy one sends few large batches.
//!
//! Batches carry an increasing `batch_seq` and are kept, shared ([`platform::ingest::Batch`]),
//! until acknowledged: sending one hands the stream a reference, and the replay after a
//! broken stream sends the very same batches again, in order; nothing is copied per send.
//! Packet payloads are `Bytes` (see the proto crate's build script), which gRPC copies
//! once, into its frame. Batches without events carry the hello (the first batch, so the
//! registry learns the proxy's session as soon as the stream opens) or new loss totals.

use std::{collections::VecDeque, sync::Arc};

use proto::registry::{Event, IngestRequest, ProxyLosses, event::Kind};

use super::{admission::Item, losses::Losses};

/// Most events in one batch.
pub const BATCH_EVENTS: usize = 1000;
/// A batch is closed once its encoded size reaches this (one more packet may exceed it).
pub const BATCH_BYTES: usize = 1 << 20;
/// Most batches sent and awaiting acknowledgement; the queue waits behind them.
pub(super) const MAX_UNACKED: usize = 64;

/// A batch sent (or to be sent) and not yet acknowledged.
pub(super) struct Batch {
    pub(super) seq: u64,
    /// Shared with the stream it is sent on: its payloads are not copied, nor is it.
    pub(super) request: platform::ingest::Batch,
    pub(super) events: usize,
    /// Payload bytes of its packets (both versions of a modified one).
    pub(super) payload: usize,
    pub(super) packets: u64,
}

/// The events received and not yet batched, and the batches awaiting acknowledgement.
pub(super) struct Batcher {
    node: String,
    next_seq: u64,
    /// Events received from the queue, not yet in a batch.
    pub(super) pending: Vec<Item>,
    /// Payload bytes of the packets in `pending`.
    pending_bytes: usize,
    /// The last batch formed was full: traffic is heavy, keep several in flight.
    last_full: bool,
    /// Batches in order of `seq`, sent or not, until acknowledged.
    pub(super) unacked: VecDeque<Batch>,
    /// The loss totals the last batch carried.
    sent_losses: ProxyLosses,
}

impl Batcher {
    /// Batches as `node`, starting with the hello.
    pub(super) fn new(node: String, losses: &Losses) -> Self {
        let mut b = Self {
            node,
            next_seq: 1,
            pending: Vec::with_capacity(BATCH_EVENTS),
            pending_bytes: 0,
            last_full: false,
            unacked: VecDeque::new(),
            sent_losses: ProxyLosses::default(),
        };
        // The hello: an empty first batch, sent as soon as the stream opens, so the registry
        // learns this process's session at start (a restarted proxy's old records are closed
        // then, not at its first connection or after the grace period).
        b.empty_batch(losses);
        b
    }

    /// Events were received into `pending`.
    pub(super) fn received(&mut self) {
        self.pending_bytes = self.pending.iter().map(Item::payload_len).sum();
    }

    /// How many more events to receive into `pending` at most (at least one).
    pub(super) fn room(&self) -> usize {
        BATCH_EVENTS.saturating_sub(self.pending.len()).max(1)
    }

    /// Nothing pending, nothing awaiting acknowledgement.
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.unacked.is_empty()
    }

    /// Makes batches of pending events when it is time to (at once while shutting down);
    /// returns whether to receive more events from the queue now.
    pub(super) fn batch(&mut self, shutting_down: bool, losses: &Losses) -> bool {
        // Nagle for batches: a batch goes out at once when none is awaiting its
        // acknowledgement; otherwise events wait (in the channel, without waking the task)
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
            self.make_batches(losses);
            self.pending_bytes = 0;
        }
        self.pending.len() < BATCH_EVENTS
            && self.pending_bytes < BATCH_BYTES
            && self.unacked.len() < MAX_UNACKED
            && (idle || self.last_full || shutting_down)
    }

    /// Sends the latest loss totals in an empty batch, if they changed since the last batch
    /// and there is room in flight.
    pub(super) fn report_losses(&mut self, losses: &Losses) {
        if losses.snapshot() != self.sent_losses && self.unacked.len() < MAX_UNACKED {
            self.empty_batch(losses);
        }
    }

    /// The registry acknowledged every batch up to `seq`: they are dropped, and handed to
    /// the caller to give their room back.
    pub(super) fn acknowledged(&mut self, seq: u64) -> impl Iterator<Item = Batch> + '_ {
        let n = self.unacked.iter().take_while(|b| b.seq <= seq).count();
        self.unacked.drain(..n)
    }

    /// All pending events into as many batches as they fill.
    fn make_batches(&mut self, losses: &Losses) {
        let mut builder: Option<Builder> = None;
        for item in self.pending.drain(..) {
            let b = builder.get_or_insert_with(|| {
                let seq = self.next_seq;
                self.next_seq += 1;
                Builder::new(&self.node, seq)
            });
            b.push(item);
            let full = b.events() >= BATCH_EVENTS || b.len >= BATCH_BYTES;
            if let Some(b) = builder.take_if(|_| full) {
                self.unacked
                    .push_back(b.finish(losses, &mut self.sent_losses));
            }
        }
        if let Some(b) = builder.take() {
            self.unacked
                .push_back(b.finish(losses, &mut self.sent_losses));
        }
    }

    /// One batch without events: it carries the session and the loss totals.
    fn empty_batch(&mut self, losses: &Losses) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let b = Builder::new(&self.node, seq);
        self.unacked
            .push_back(b.finish(losses, &mut self.sent_losses));
    }
}

/// This process's ingest session (`IngestRequest.session`): random, picked once, so the
/// registry tells a restarted proxy from a reconnecting one.
pub(super) fn ingest_session() -> &'static str {
    static SESSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SESSION.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        platform::token::generate().unwrap_or_else(|_| format!("{}-{nanos}", std::process::id()))
    })
}

/// Gathers events into one `IngestRequest`, keeping count of its encoded size.
pub(super) struct Builder {
    request: IngestRequest,
    /// Encoded length of `request` so far.
    pub(super) len: usize,
    payload: usize,
    packets: u64,
}

impl Builder {
    pub(super) fn new(node: &str, seq: u64) -> Self {
        let request = IngestRequest {
            node: node.to_string(),
            batch_seq: seq,
            events: Vec::with_capacity(64),
            losses: None,
            session: ingest_session().to_string(),
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

    pub(super) fn push(&mut self, item: Item) {
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

    /// The batch, carrying the loss totals now (if any), which become the `sent` ones.
    pub(super) fn finish(mut self, losses: &Losses, sent: &mut ProxyLosses) -> Batch {
        let losses = losses.snapshot();
        if losses != ProxyLosses::default() {
            self.request.losses = Some(losses);
        }
        *sent = losses;
        Batch {
            seq: self.request.batch_seq,
            events: self.events(),
            request: Arc::new(self.request),
            payload: self.payload,
            packets: self.packets,
        }
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
