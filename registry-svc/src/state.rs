//! The registry's state and the operations the gRPC service exposes, free of transport
//! concerns: applying ingest batches, listing, clearing, searching and counting.

use std::{collections::HashMap, path::Path, sync::Arc};

use proto::{
    common::{Connection, Direction, Packet},
    names::{Named, name_of},
    registry::{ConnectionFilter, ConnectionStatsResponse, Count, IngestRequest, event::Kind},
};

use crate::{
    backend::{Backend, PageAt},
    backend::{Change, StoreError, sled_store::Store},
    hub::Hub,
};

/// Default and largest page of connection records.
pub const CONN_PAGE: usize = 10_000;
/// Records removed per hold of the hub lock by [`State::clear_all`].
const CLEAR_PAGE: usize = 4_096;
/// Default page of history packets.
pub const HISTORY_PAGE: usize = 1_000;
/// Encoded size a page stays under, below tonic's default 4 MiB message limit.
pub const PAGE_BYTES: usize = 3 * 1024 * 1024;

/// Store plus change hub: everything a registry server holds.
pub struct State {
    pub(crate) store: Box<dyn Backend>,
    pub(crate) hub: Hub,
}

/// Malformed ingest events skipped since the last acknowledgement.
#[derive(Debug, Default)]
pub struct Rejected {
    /// How many.
    pub count: u64,
    /// Why the first was skipped.
    pub first: Option<String>,
}

impl Rejected {
    fn add(&mut self, why: String) {
        tracing::warn!(%why, "skipped a malformed ingest event");
        self.count += 1;
        self.first.get_or_insert(why);
    }
}

/// One page of records or packets.
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts, if there is one.
    pub next: Option<String>,
}

/// A history query.
#[derive(Default)]
pub struct HistoryQuery {
    pub conn_id: u64,
    pub direction: Option<Direction>,
    pub contains: Vec<u8>,
    pub page_size: usize,
    pub page_token: String,
    /// Only packets recorded at arrival positions up to this one (a follower's snapshot).
    pub upto: Option<u64>,
}

impl State {
    /// Applies events of `kinds`, 1,000 per batch, as node `n` (for tests).
    #[cfg(test)]
    pub(crate) fn apply_kinds(&self, kinds: impl Iterator<Item = Kind>) {
        let events: Vec<proto::registry::Event> = kinds
            .map(|k| proto::registry::Event { kind: Some(k) })
            .collect();
        for chunk in events.chunks(1_000) {
            let req = IngestRequest {
                node: "n".into(),
                events: chunk.to_vec(),
                ..Default::default()
            };
            if let Err(e) = self.apply(req, &mut Rejected::default()) {
                panic!("applying test events: {e}");
            }
        }
    }

    /// A state in `dir` with records 1 to `n` open (for tests).
    #[cfg(test)]
    pub(crate) fn with_open_records(dir: &Path, n: u64) -> Arc<Self> {
        let state = match Self::open(dir) {
            Ok(s) => s,
            Err(e) => panic!("opening a test store: {e}"),
        };
        state.apply_kinds((1..=n).map(|id| {
            Kind::Opened(Connection {
                id,
                ..Default::default()
            })
        }));
        state
    }

    /// Closes records 1 to `n` (for tests).
    #[cfg(test)]
    pub(crate) fn close_records(&self, n: u64) {
        self.apply_kinds((1..=n).map(|id| {
            Kind::Closed(proto::registry::ConnectionClosed {
                id,
                ..Default::default()
            })
        }));
    }

    /// Opens the store in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        Self::open_with(dir, &crate::backend::sled_store::HistoryOptions::default())
    }

    /// Opens the store in `dir` with the history budget `history`.
    pub fn open_with(
        dir: &Path,
        history: &crate::backend::sled_store::HistoryOptions,
    ) -> Result<Arc<Self>, StoreError> {
        Ok(Self::with_backend(Box::new(Store::open_with(
            dir, history,
        )?)))
    }

    /// The state over `store`; a store shared by several registry processes feeds the hub.
    pub fn with_backend(store: Box<dyn Backend>) -> Arc<Self> {
        let hub = Hub::default();
        hub.feed_from(|feed| store.start_feed(feed));
        Arc::new(Self { store, hub })
    }

    /// One page of records matching `filter` from `from` on (only the record `only`, when
    /// not 0), with the change number and arrival position it reflects: read in the store's
    /// own snapshot when it numbers changes, else under the hub lock.
    pub fn read_page(
        &self,
        filter: &ConnectionFilter,
        from: u64,
        max: usize,
        only: u64,
    ) -> Result<PageAt, StoreError> {
        if let Some(page) = self.store.page_at(filter, from, max, only) {
            return page;
        }
        let (page, seq) = self.hub.read(|| {
            let (records, next) = match only {
                0 => self.store.scan_page(filter, from, max)?,
                id => (self.store.get_opt(id)?.into_iter().collect(), None),
            };
            Ok::<_, StoreError>((records, next, self.store.position()))
        });
        let (records, next, position) = page?;
        Ok(PageAt {
            records,
            next,
            seq,
            position,
        })
    }

    /// Applies one ingest batch (not yet durable: see [`State::flush`]). Malformed events are
    /// skipped and counted in `rejected`; only a missing node name or a store failure fails
    /// the whole batch.
    pub fn apply(&self, req: IngestRequest, rejected: &mut Rejected) -> Result<(), StoreError> {
        if req.node.is_empty() {
            return Err(StoreError::Invalid(
                "ingest batch without a node name".into(),
            ));
        }
        let mut packets: Vec<Packet> = Vec::new();
        let mut closed = Vec::new();
        {
            // Held until the packets are stored too: a batch's record changes and packets
            // become visible together (followers snapshot records and log position at once).
            let w = self.hub.write();
            for ev in req.events {
                let changed = match ev.kind {
                    Some(Kind::Opened(mut c)) => {
                        if c.node.is_empty() {
                            c.node.clone_from(&req.node);
                        }
                        self.store.open_conn(c)
                    }
                    Some(Kind::Updated(u)) => self.store.update_conn(&u),
                    Some(Kind::Closed(e)) => self.store.close_conn(&e).inspect(|c| {
                        closed.extend(c.clone());
                    }),
                    Some(Kind::Packet(p)) if p.conn_id == 0 || p.seq == 0 => {
                        Err(StoreError::Invalid(format!(
                            "packet with conn_id {} and seq {}: both must be non-zero",
                            p.conn_id, p.seq
                        )))
                    }
                    Some(Kind::Packet(p)) => {
                        packets.push(p);
                        Ok(None)
                    }
                    None => Err(StoreError::Invalid("event with no kind".into())),
                };
                match changed {
                    Ok(Some(c)) => w.publish(Change::Upsert(Arc::new(c))),
                    Ok(None) => {}
                    Err(StoreError::Invalid(why)) => rejected.add(why),
                    Err(e) => return Err(e),
                }
            }
            self.store.record(packets, closed)?;
        }
        if let Some(l) = &req.losses {
            self.store.set_losses(&req.node, l)?;
        }
        Ok(())
    }

    /// Follows whether history can be written: the failure's text while it cannot.
    pub fn history_failing(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.store.history_failing()
    }

    /// Makes everything applied so far durable and notes a clean close (at shutdown).
    pub async fn flush(self: &Arc<Self>) -> Result<(), StoreError> {
        self.blocking(|s| s.store.close()).await
    }

    /// Runs store work `f` on the blocking pool: disk reads and scans stay off the async
    /// threads (in `interpose up` they relay traffic too).
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&State) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e)))
    }

    /// Makes everything applied so far durable, blocking the calling thread.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.store.commit()
    }

    /// Leases `count` IDs.
    pub fn lease(&self, count: u32) -> Result<(u64, u64), StoreError> {
        self.store.lease(count)
    }

    /// One record.
    pub fn get(&self, id: u64) -> Result<Connection, StoreError> {
        if id == 0 {
            return Err(StoreError::Invalid("connection ID 0 is reserved".into()));
        }
        self.store.get(id)
    }

    /// A page of records matching `filter`, from the ID in `token` onwards (downwards, when
    /// `newest_first`).
    pub fn list(
        &self,
        filter: &ConnectionFilter,
        page_size: usize,
        token: &str,
        newest_first: bool,
    ) -> Result<Page<Connection>, StoreError> {
        let from = parse_token(token, "page token")?;
        let limit = if page_size == 0 {
            CONN_PAGE
        } else {
            page_size.min(CONN_PAGE)
        };
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        let mut take = |c: Connection| {
            let size = prost::Message::encoded_len(&c) + 8;
            if items.len() == limit || (bytes + size > PAGE_BYTES && !items.is_empty()) {
                next = Some(c.id.to_string());
                return false;
            }
            bytes += size;
            items.push(c);
            true
        };
        if newest_first {
            // The token names the highest ID of the page; the first page starts at the top.
            let below = from.map_or(u64::MAX, |id| id.saturating_add(1));
            self.store.scan_conns_rev(below, &mut |c| {
                !crate::filter::matches(filter, &c) || take(c)
            })?;
        } else {
            self.store
                .scan_matching(filter, from.unwrap_or(0), &mut take)?;
        }
        Ok(Page { items, next })
    }

    /// Removes the records `ids` (all or none) and tells watchers.
    pub fn clear(&self, ids: &[u64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Err(StoreError::Invalid("no connection IDs given".into()));
        }
        if let Some(0) = ids.iter().find(|&&id| id == 0) {
            return Err(StoreError::Invalid("connection ID 0 is reserved".into()));
        }
        let w = self.hub.write();
        let removed = self.store.clear(ids)?;
        for id in &removed {
            w.publish(Change::Removed(*id));
        }
        Ok(removed.len() as u64)
    }

    /// Removes every record and tells watchers, a page at a time in ID order: the hub lock
    /// is held for one page, and no list of every ID is built. A record opened meanwhile is
    /// removed if its ID is above the page being cleared.
    pub fn clear_all(&self) -> Result<u64, StoreError> {
        let (mut count, mut from) = (0u64, 0u64);
        loop {
            let w = self.hub.write();
            let removed = self.store.clear_page(from, CLEAR_PAGE)?;
            let Some(&last) = removed.last() else {
                return Ok(count);
            };
            count += removed.len() as u64;
            from = last.saturating_add(1);
            for id in removed {
                w.publish(Change::Removed(id));
            }
        }
    }

    /// A page of history packets matching `q`.
    pub fn history(&self, q: &HistoryQuery) -> Result<Page<Packet>, StoreError> {
        let start = match q.page_token.split_once(':') {
            Some((c, s)) => (
                parse_token(c, "page token")?.unwrap_or(0),
                parse_token(s, "page token")?.unwrap_or(0),
            ),
            None if q.page_token.is_empty() => (q.conn_id, 0),
            None => {
                return Err(StoreError::Invalid(format!(
                    "bad page token {}",
                    shown(&q.page_token)
                )));
            }
        };
        if q.conn_id != 0 && start.0 != q.conn_id {
            return Err(StoreError::Invalid(
                "page token is for another connection".into(),
            ));
        }
        let limit = if q.page_size == 0 {
            HISTORY_PAGE
        } else {
            q.page_size
        };
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        let upto = q.upto.unwrap_or(u64::MAX);
        // Built once per query: the SIMD searcher's setup is not redone per packet.
        let finder = memchr::memmem::Finder::new(&q.contains);
        self.store
            .scan_history_upto(start, q.conn_id != 0, upto, &mut |p| {
                if q.direction.is_some_and(|d| d as i32 != p.direction)
                    || !contains(&finder, &p.data)
                {
                    return true;
                }
                if items.len() == limit || (bytes + p.data.len() > PAGE_BYTES && !items.is_empty())
                {
                    next = Some(format!("{}:{}", p.conn_id, p.seq));
                    return false;
                }
                bytes += p.data.len();
                items.push(p);
                true
            })?;
        Ok(Page { items, next })
    }

    /// Counts of the records matching `filter`, with the nodes' loss reports.
    pub fn stats(&self, filter: &ConnectionFilter) -> Result<ConnectionStatsResponse, StoreError> {
        #[derive(Default)]
        struct Tally(HashMap<String, u64>);
        impl Tally {
            fn add(&mut self, k: impl Into<String>) {
                *self.0.entry(k.into()).or_default() += 1;
            }
            fn into_counts(self) -> Vec<Count> {
                let mut v: Vec<Count> = self
                    .0
                    .into_iter()
                    .map(|(key, count)| Count { key, count })
                    .collect();
                v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
                v
            }
        }
        fn name<T: Named + TryFrom<i32>>(raw: i32) -> &'static str {
            name_of::<T>(raw).unwrap_or("")
        }
        let mut tallies: [Tally; 5] = Default::default();
        let mut total = 0u64;
        self.store.scan_matching(filter, 0, &mut |c| {
            total += 1;
            let [status, by, kind, dest, node] = &mut tallies;
            status.add(name::<proto::common::ConnStatus>(c.status));
            by.add(name::<proto::common::ClosedBy>(c.closed_by));
            kind.add(name::<proto::common::CloseKind>(c.close_kind));
            dest.add(format!("{}:{}", c.dst_host, c.dst_port));
            node.add(c.node);
            true
        })?;
        let [status, by, kind, dest, node] = tallies;
        Ok(ConnectionStatsResponse {
            total,
            by_status: status.into_counts(),
            by_closed_by: by.into_counts(),
            by_close_kind: kind.into_counts(),
            by_destination: dest.into_counts(),
            by_node: node.into_counts(),
            losses: self.store.losses()?.into_iter().collect(),
            ..history_usage(self.store.usage()?)
        })
    }
}

/// The history's disk use, budget and losses, as `conns stats` shows them.
fn history_usage(u: crate::backend::Usage) -> ConnectionStatsResponse {
    ConnectionStatsResponse {
        history_packets: u.history_packets,
        history_bytes: u.history_bytes,
        records_bytes: u.records_bytes,
        history_max_bytes: u.max_bytes,
        history_when_full: u.when_full.to_string(),
        history_evicted_packets: u.evicted.0,
        history_evicted_bytes: u.evicted.1,
        history_refused_packets: u.refused.0,
        history_refused_bytes: u.refused.1,
        history_purged_packets: u.purged.0,
        history_purged_bytes: u.purged.1,
        history_unwritten_packets: u.unwritten.0,
        history_unwritten_bytes: u.unwritten.1,
        history_failing: u.failing.unwrap_or_default(),
        ..Default::default()
    }
}

fn parse_token(s: &str, what: &str) -> Result<Option<u64>, StoreError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| StoreError::Invalid(format!("bad {what} {}", shown(s))))
}

/// Client input quoted in an error, cut to its first 64 characters: an error must not echo
/// a megabyte token back (that turned INVALID_ARGUMENT into RESOURCE_EXHAUSTED).
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// True when the needle of `finder` occurs in `hay` (an empty needle always does).
fn contains(finder: &memchr::memmem::Finder<'_>, hay: &[u8]) -> bool {
    finder.needle().is_empty() || finder.find(hay).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clearing every record takes several pages; each removal reaches a watcher once and
    /// the records do not come back.
    #[test]
    fn clear_all_clears_every_page_and_tells_watchers() {
        const N: u64 = 2 * CLEAR_PAGE as u64 + 7;
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("db")).unwrap();
        let open = |id| {
            Kind::Opened(Connection {
                id,
                ..Default::default()
            })
        };
        state.apply_kinds((1..=N).map(open));
        let mut rx = state.hub.subscribe();
        assert_eq!(state.clear_all().unwrap(), N);
        let mut removed = std::collections::HashSet::new();
        while let Ok(n) = rx.try_recv() {
            match n.change {
                Change::Removed(id) => assert!(removed.insert(id), "{id} twice"),
                Change::Upsert(c) => panic!("unexpected upsert of {}", c.id),
                Change::Reset => panic!("unexpected reset"),
            }
        }
        assert_eq!(removed.len() as u64, N);
        let all = state
            .list(&ConnectionFilter::default(), 0, "", false)
            .unwrap();
        assert!(all.items.is_empty());
        // Cleared IDs stay cleared.
        state.apply_kinds((1..=3).map(open));
        assert!(
            state
                .list(&ConnectionFilter::default(), 0, "", false)
                .unwrap()
                .items
                .is_empty()
        );
        assert_eq!(state.clear_all().unwrap(), 0);
    }

    #[test]
    fn contains_finds_substrings() {
        assert!(contains(&memchr::memmem::Finder::new(b""), b"hello world"));
        assert!(contains(
            &memchr::memmem::Finder::new(b"o w"),
            b"hello world"
        ));
        assert!(!contains(&memchr::memmem::Finder::new(b"hello!"), b"hello"));
        assert!(!contains(&memchr::memmem::Finder::new(b"x"), b""));
    }
}
