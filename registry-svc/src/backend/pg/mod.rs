//! The registry's store on PostgreSQL (`--store postgres://...`), for labs that outgrow one
//! machine: several registry processes on one database serve the same API.
//!
//! - Record changes and history are staged in memory as the writer thread applies ingest
//!   batches and written by [`Durability::commit`] (the committer's group commit) in one
//!   transaction: packets through `COPY`, records upserted, the change feed and the arrival
//!   log appended. A registry that hangs inside a transaction is ended by the server's
//!   timeouts before its row locks stall the other processes (see [`pool`]). A cleared record keeps a row without a body, so its ID never returns.
//! - Every transaction that changes records or adds history takes its numbers from the one
//!   `counter` row as its last step, so changes commit in number order. Each process
//!   follows the `changes` table ([`feed`]), woken by `NOTIFY`, and publishes every change
//!   (its own included) to its watchers with its number; a watch snapshot page is read in
//!   one snapshot with the number it reflects. So a watcher on any process sees each change
//!   once, with no gap.
//! - IDs are leased from one row: unique across every process, never reused.
//! - History lives in blocks, a row per connection per commit holding its packets framed
//!   as the sled store frames them ([`blocks`]), in segments, list partitions of `blocks`,
//!   dropped whole at the budget ([`history`]).

mod blocks;
mod feed;
mod history;
mod pool;
mod schema;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use postgres::{GenericClient, IsolationLevel, Transaction};
use prost::Message;
use proto::{
    common::{ConnStatus, Connection, Packet},
    registry::{ConnectionClosed, ConnectionFilter, ConnectionUpdate, ProxyLosses},
};
use tokio::sync::{broadcast, watch};

use crate::backend::{
    Durability, Feed, History, Nodes, Numbered, PageAt, Records, StoreError, Usage,
    model::{apply_close, merge_update},
    page_of,
    sled_store::{HistoryOptions, LogPage, MAX_LEASE, Purge, Purged},
};

use pool::Pool;

/// Records read per round trip of a scan.
const SCAN_ROWS: i64 = 1_000;

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    options: HistoryOptions,
    pending: Mutex<Pending>,
    /// One commit at a time from this process (the committer, liveness, a clear).
    commit_lock: Mutex<()>,
    shared: Arc<FeedState>,
    failing: watch::Sender<Option<String>>,
    /// Whether history is being refused at the budget now (for the log lines).
    refusing: AtomicBool,
    /// Commits that failed, losing the staged writes they took.
    failed_commits: AtomicU64,
    /// The last packet sequence number stored per open connection this process wrote
    /// (others are read from the database when their packets come).
    stored_seqs: Mutex<HashMap<u64, u64>>,
}

/// What the change feed's thread updates.
struct FeedState {
    positions: watch::Sender<u64>,
    removed: AtomicU64,
    stop: AtomicBool,
}

impl FeedState {
    /// Announces arrival position `pos` to followers, unless a later one was announced
    /// (this process's commits and the feed both learn of positions).
    fn advance_position(&self, pos: u64) {
        self.positions.send_if_modified(|p| {
            let newer = pos > *p;
            if newer {
                *p = pos;
            }
            newer
        });
    }
}

/// Writes applied but not yet committed, and the records they changed.
#[derive(Default)]
struct Pending {
    staged: Staged,
    /// Records changed here, as of their last change, with the commit generation that
    /// writes it: the base of the next change without a read, until committed and closed.
    records: HashMap<u64, (Connection, u64)>,
    /// The generation of the next commit.
    generation: u64,
}

#[derive(Default)]
struct Staged {
    /// Record changes in the order they were made.
    changes: Vec<Connection>,
    packets: Vec<Packet>,
    closed: Vec<Connection>,
    losses: HashMap<String, ProxyLosses>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.packets.is_empty()
            && self.closed.is_empty()
            && self.losses.is_empty()
    }
}

/// An ID as the database keeps it.
fn key(id: u64) -> Result<i64, StoreError> {
    i64::try_from(id).map_err(|_| StoreError::Invalid(format!("ID {id} is out of range")))
}

fn decode<T: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    T::decode(bytes).map_err(|source| StoreError::Corrupt { what, source })
}

fn is_active(c: &Connection) -> bool {
    c.status == ConnStatus::Active as i32
}

/// What a commit adds to the arrival log: its batch number (0: no packets) and the records
/// closed with it, and the segment its packets grew (segment, packets, bytes).
struct Arrival<'a> {
    batch: i64,
    closed: &'a [Vec<u8>],
    grown: Option<(i64, i64, i64)>,
}

/// Numbers `changes` (ID, record after it or `None` when cleared) and, with an `arrival`,
/// takes the next arrival position, logs the arrival at it and counts its packets in their
/// segment: the transaction's last statement before it commits (one round trip). Returns
/// the last arrival position and the grown segment's bytes.
fn number(
    tx: &mut Transaction<'_>,
    changes: &[(i64, Option<Vec<u8>>)],
    arrival: Option<Arrival<'_>>,
) -> Result<(i64, Option<i64>), StoreError> {
    let n = changes.len() as i64;
    let ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
    let bodies: Vec<Option<&[u8]>> = changes.iter().map(|c| c.1.as_deref()).collect();
    let new_position = i64::from(arrival.is_some());
    let (batch, closed, (seg, packets, bytes)) = match &arrival {
        Some(a) => (a.batch, a.closed, a.grown.unwrap_or((0, 0, 0))),
        None => (0, &[][..], (0, 0, 0)),
    };
    // The counter's row lock orders the commits; the other parts read its new numbers.
    // A data-changing `WITH` part always runs; `n`, a plain one, runs because it is read.
    let row = tx.query_one(
        "WITH c AS (
             UPDATE counter SET seq = seq + $1, pos = pos + $2 RETURNING seq, pos
         ), n AS (
             SELECT pg_notify('interpose_changes', '')
         ), ch AS (
             INSERT INTO changes (seq, id, body)
             SELECT c.seq - $1 + u.ord, u.id, u.body
             FROM c, unnest($3::int8[], $4::bytea[]) WITH ORDINALITY AS u(id, body, ord)
         ), a AS (
             INSERT INTO arrivals (pos, batch, closed)
             SELECT c.pos, $5, $6 FROM c WHERE $2 > 0
         ), s AS (
             UPDATE segments SET packets = packets + $8, bytes = bytes + $9, last_pos = c.pos
             FROM c WHERE segments.seg = $7 RETURNING segments.bytes
         )
         SELECT c.pos, (SELECT bytes FROM s), (SELECT count(*) FROM n) FROM c",
        &[
            &n,
            &new_position,
            &ids,
            &bodies,
            &batch,
            &closed,
            &seg,
            &packets,
            &bytes,
        ],
    )?;
    Ok((row.get(0), row.get(1)))
}

/// Records with IDs from `from` up (active ones only, when `active_only`), each passed to
/// `f` until it says stop.
fn scan_in(
    client: &mut impl GenericClient,
    active_only: bool,
    from: u64,
    f: &mut dyn FnMut(Connection) -> bool,
) -> Result<(), StoreError> {
    let sql = if active_only {
        "SELECT id, body FROM conns WHERE id >= $1 AND active AND body IS NOT NULL
         ORDER BY id LIMIT $2"
    } else {
        "SELECT id, body FROM conns WHERE id >= $1 AND body IS NOT NULL ORDER BY id LIMIT $2"
    };
    let mut from = key(from.min(i64::MAX as u64))?;
    loop {
        let rows = client.query(sql, &[&from, &SCAN_ROWS])?;
        for row in &rows {
            let id: i64 = row.get(0);
            if !f(decode("connection record", row.get::<_, &[u8]>(1))?) {
                return Ok(());
            }
            from = id + 1;
        }
        if (rows.len() as i64) < SCAN_ROWS {
            return Ok(());
        }
    }
}

/// Records with IDs below `below`, highest first, [`SCAN_ROWS`] per query.
fn scan_rev_in(
    client: &mut impl GenericClient,
    below: u64,
    f: &mut dyn FnMut(Connection) -> bool,
) -> Result<(), StoreError> {
    let mut below = key(below.min(i64::MAX as u64))?;
    loop {
        let rows = client.query(
            "SELECT id, body FROM conns WHERE id < $1 AND body IS NOT NULL
             ORDER BY id DESC LIMIT $2",
            &[&below, &SCAN_ROWS],
        )?;
        for row in &rows {
            let id: i64 = row.get(0);
            if !f(decode("connection record", row.get::<_, &[u8]>(1))?) {
                return Ok(());
            }
            below = id;
        }
        if (rows.len() as i64) < SCAN_ROWS {
            return Ok(());
        }
    }
}

fn get_in(client: &mut impl GenericClient, id: u64) -> Result<Option<Connection>, StoreError> {
    let row = client.query_opt(
        "SELECT body FROM conns WHERE id = $1 AND body IS NOT NULL",
        &[&key(id)?],
    )?;
    row.map(|r| decode("connection record", r.get::<_, &[u8]>(0)))
        .transpose()
}

impl PgStore {
    /// Connects to the database at `url` (trusting the CA in the PEM file `ca` too, for its
    /// TLS), creating or migrating its schema.
    pub fn open(
        url: &str,
        ca: Option<&std::path::Path>,
        options: &HistoryOptions,
    ) -> Result<Self, StoreError> {
        let pool = Pool::new(url, ca)?;
        let mut client = pool.get()?;
        let version = schema::migrate(&mut client)?;
        let row = client.query_one(
            "SELECT c.pos, t.removed_pos FROM counter c, history_totals t",
            &[],
        )?;
        let (pos, removed): (i64, i64) = (row.get(0), row.get(1));
        tracing::info!(database = %pool.name, schema = version, "registry store on PostgreSQL");
        drop(client);
        Ok(Self {
            pool,
            options: options.clone(),
            pending: Mutex::default(),
            commit_lock: Mutex::new(()),
            shared: Arc::new(FeedState {
                positions: watch::channel(pos as u64).0,
                removed: AtomicU64::new(removed as u64),
                stop: AtomicBool::new(false),
            }),
            failing: watch::channel(None).0,
            refusing: AtomicBool::new(false),
            stored_seqs: Mutex::default(),
            failed_commits: AtomicU64::new(0),
        })
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record `id` as this process last changed it, else as committed.
    fn current(&self, id: u64) -> Result<Option<Connection>, StoreError> {
        if let Some((c, _)) = self.pending().records.get(&id) {
            return Ok(Some(c.clone()));
        }
        get_in(&mut *self.pool.get()?, id)
    }

    /// Stages record `c` as changed.
    fn stage(&self, c: &Connection) {
        let mut p = self.pending();
        let generation = p.generation;
        p.records.insert(c.id, (c.clone(), generation));
        p.staged.changes.push(c.clone());
    }

    /// Writes `staged` in one transaction; the records it wrote (a cleared one is not).
    fn write(&self, staged: Staged) -> Result<HashSet<u64>, StoreError> {
        let mut client = self.pool.get()?;
        let mut tx = client.transaction()?;
        // Packets first: a registry that hangs inside its `COPY` then holds no row lock
        // another replica could wait on (a hang between statements is ended by the server's
        // idle-in-transaction timeout, a hang inside one by this statement timeout).
        // The timeout, the current segment, the history's size and a batch number in one
        // round trip (a batch number unused is a gap, which nothing minds).
        let row = tx.query_one(
            "SELECT set_config('statement_timeout', '30s', true), max(seg),
                    coalesce(sum(bytes), 0)::int8, nextval('batches')
             FROM segments",
            &[],
        )?;
        let now = history::Now {
            segment: row.get::<_, Option<i64>>(1).unwrap_or(1),
            stored: row.get(2),
            batch: row.get(3),
        };
        let fresh = self.store_packets(&mut tx, staged.packets, &now)?;
        // Each record's last state, in ID order (concurrent writers lock rows alike).
        let mut last: HashMap<u64, &Connection> = HashMap::new();
        for c in &staged.changes {
            last.insert(c.id, c);
        }
        let mut records: Vec<&Connection> = last.into_values().collect();
        records.sort_by_key(|c| c.id);
        let mut written = HashSet::new();
        if !records.is_empty() {
            let ids = records
                .iter()
                .map(|c| key(c.id))
                .collect::<Result<Vec<_>, _>>()?;
            let active: Vec<bool> = records.iter().map(|c| is_active(c)).collect();
            let bodies: Vec<Vec<u8>> = records.iter().map(|c| c.encode_to_vec()).collect();
            for row in tx.query(
                "INSERT INTO conns (id, active, body)
                 SELECT * FROM unnest($1::int8[], $2::bool[], $3::bytea[])
                 ON CONFLICT (id) DO UPDATE SET active = excluded.active, body = excluded.body
                 WHERE conns.body IS NOT NULL
                 RETURNING id",
                &[&ids, &active, &bodies],
            )? {
                written.insert(row.get::<_, i64>(0) as u64);
            }
        }
        let changes: Vec<(i64, Option<Vec<u8>>)> = staged
            .changes
            .iter()
            .filter(|c| written.contains(&c.id))
            .map(|c| (c.id as i64, Some(c.encode_to_vec())))
            .collect();
        // A close is logged unless its record was cleared. Its change is usually in this
        // commit; when an earlier commit took it (the committer ran between the writer's
        // close and its log entry), the record's row says.
        let earlier: Vec<i64> = staged
            .closed
            .iter()
            .filter(|c| records.binary_search_by_key(&c.id, |r| r.id).is_err())
            .map(|c| c.id as i64)
            .collect();
        let mut kept: HashSet<u64> = HashSet::new();
        if !earlier.is_empty() {
            for row in tx.query(
                "SELECT id FROM conns WHERE id = ANY($1) AND body IS NOT NULL",
                &[&earlier],
            )? {
                kept.insert(row.get::<_, i64>(0) as u64);
            }
        }
        let closed: Vec<Vec<u8>> = staged
            .closed
            .iter()
            .filter(|c| written.contains(&c.id) || kept.contains(&c.id))
            .map(Message::encode_to_vec)
            .collect();
        for (node, losses) in &staged.losses {
            tx.execute(
                "INSERT INTO nodes (name, losses) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET losses = excluded.losses",
                &[node, &losses.encode_to_vec()],
            )?;
        }
        let new_position = fresh.packets > 0 || !closed.is_empty();
        let mut position = None;
        let mut segment = None;
        if !changes.is_empty() || new_position {
            let arrival = new_position.then_some(Arrival {
                batch: fresh.batch,
                closed: &closed,
                grown: (fresh.packets > 0).then_some((fresh.segment, fresh.packets, fresh.bytes)),
            });
            let (pos, seg_bytes) = number(&mut tx, &changes, arrival)?;
            if new_position {
                position = Some(pos as u64);
            }
            if let Some(bytes) = seg_bytes {
                segment = Some((fresh.segment, bytes));
            }
        }
        tx.commit()?;
        {
            let mut stored = self.stored_seqs.lock().unwrap_or_else(|e| e.into_inner());
            stored.extend(fresh.last);
            // Closed records are among the changes (`closed` lists them for the log).
            for c in &staged.changes {
                if !is_active(c) {
                    stored.remove(&c.id);
                }
            }
        }
        if let Some(pos) = position {
            self.shared.advance_position(pos);
        }
        if let Some((seg, bytes)) = segment {
            // Bookkeeping after the commit: a failure here loses nothing.
            if let Err(e) = self.after_growth(&mut client, seg, bytes) {
                tracing::warn!("rotating or evicting history segments: {e}");
            }
        }
        Ok(written)
    }
}

impl Records for PgStore {
    fn open_conn(&self, mut c: Connection) -> Result<Option<Connection>, StoreError> {
        if c.id == 0 {
            return Err(StoreError::Invalid("connection ID 0 is reserved".into()));
        }
        key(c.id)?;
        if c.status == ConnStatus::Unspecified as i32 {
            c.status = ConnStatus::Active as i32;
        }
        // A cleared ID is refused when the commit writes it (its row has no body).
        self.stage(&c);
        Ok(Some(c))
    }

    fn update_conn(&self, u: &ConnectionUpdate) -> Result<Option<Connection>, StoreError> {
        let Some(mut c) = self.current(u.id)? else {
            return Ok(None);
        };
        merge_update(&mut c, u);
        self.stage(&c);
        Ok(Some(c))
    }

    fn close_conn(&self, e: &ConnectionClosed) -> Result<Option<Connection>, StoreError> {
        let Some(mut c) = self.current(e.id)? else {
            return Ok(None);
        };
        apply_close(&mut c, e);
        self.stage(&c);
        Ok(Some(c))
    }

    fn get_opt(&self, id: u64) -> Result<Option<Connection>, StoreError> {
        self.current(id)
    }

    fn scan_conns(
        &self,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        scan_in(&mut *self.pool.get()?, false, from, f)
    }

    fn scan_active(
        &self,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        scan_in(&mut *self.pool.get()?, true, from, f)
    }

    fn scan_conns_rev(
        &self,
        below: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        scan_rev_in(&mut *self.pool.get()?, below, f)
    }

    fn clear(&self, ids: &[u64]) -> Result<Vec<u64>, StoreError> {
        // What this process applied is cleared too.
        self.commit()?;
        let keys = ids
            .iter()
            .map(|&id| key(id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut client = self.pool.get()?;
        let mut tx = client.transaction()?;
        let found: HashSet<i64> = tx
            .query(
                "SELECT id FROM conns WHERE id = ANY($1) AND body IS NOT NULL ORDER BY id
                 FOR UPDATE",
                &[&keys],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(&missing) = ids.iter().find(|&&id| !found.contains(&(id as i64))) {
            return Err(StoreError::NotFound(missing));
        }
        let mut seen = HashSet::new();
        let removed: Vec<u64> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        self.tombstone(tx, &removed)?;
        Ok(removed)
    }

    fn clear_page(&self, from: u64, max: usize) -> Result<Vec<u64>, StoreError> {
        self.commit()?;
        let mut client = self.pool.get()?;
        let mut tx = client.transaction()?;
        let removed: Vec<u64> = tx
            .query(
                "SELECT id FROM conns WHERE id >= $1 AND body IS NOT NULL ORDER BY id
                 LIMIT $2 FOR UPDATE",
                &[&key(from.min(i64::MAX as u64))?, &(max as i64)],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        if !removed.is_empty() {
            self.tombstone(tx, &removed)?;
        }
        Ok(removed)
    }

    fn lease(&self, count: u32) -> Result<(u64, u64), StoreError> {
        if count == 0 || count > MAX_LEASE {
            return Err(StoreError::Invalid(format!(
                "lease count must be 1 to {MAX_LEASE}, got {count}"
            )));
        }
        let n = i64::from(count);
        let first: i64 = self
            .pool
            .get()?
            .query_one(
                "UPDATE id_lease SET next = next + $1 RETURNING next - $1",
                &[&n],
            )?
            .get(0);
        Ok((first as u64, (first + n - 1) as u64))
    }
}

impl History for PgStore {
    fn record(&self, packets: Vec<Packet>, closed: Vec<Connection>) -> Result<(), StoreError> {
        // Refused here, with this batch, not at the commit that other streams share.
        for p in &packets {
            key(p.conn_id)?;
            key(p.seq)?;
        }
        let mut p = self.pending();
        p.staged.packets.extend(packets);
        p.staged.closed.extend(closed);
        Ok(())
    }

    fn scan_history_upto(
        &self,
        start: (u64, u64),
        only_conn: bool,
        upto: u64,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> Result<(), StoreError> {
        history::scan(&mut *self.pool.get()?, start, only_conn, upto, f)
    }

    fn purge(&self, what: &Purge) -> Result<Purged, StoreError> {
        self.commit()?;
        let purged = history::purge(&mut *self.pool.get()?, what)?;
        self.refresh_removed()?;
        Ok(purged)
    }

    fn position(&self) -> u64 {
        *self.shared.positions.borrow()
    }

    fn follow_positions(&self) -> watch::Receiver<u64> {
        self.shared.positions.subscribe()
    }

    fn log_after(
        &self,
        after: u64,
        conn_id: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        history::log_after(
            &mut *self.pool.get()?,
            after,
            conn_id,
            max_entries,
            max_bytes,
        )
    }

    fn removed_position(&self) -> u64 {
        self.shared.removed.load(Ordering::Relaxed)
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let row = self.pool.get()?.query_one(
            "SELECT (SELECT coalesce(sum(packets), 0)::int8 FROM segments),
                    (SELECT coalesce(sum(bytes), 0)::int8 FROM segments),
                    (pg_total_relation_size('conns') + pg_total_relation_size('changes')
                     + pg_total_relation_size('arrivals'))::int8,
                    t.evicted_packets, t.evicted_bytes, t.refused_packets, t.refused_bytes,
                    t.purged_packets, t.purged_bytes
             FROM history_totals t",
            &[],
        )?;
        let n = |i: usize| row.get::<_, i64>(i) as u64;
        Ok(Usage {
            history_packets: n(0),
            history_bytes: n(1),
            records_bytes: n(2),
            max_bytes: self.options.max_bytes,
            when_full: self.options.when_full.name(),
            evicted: (n(3), n(4)),
            refused: (n(5), n(6)),
            purged: (n(7), n(8)),
            unwritten: (0, 0),
            failing: self.failing.borrow().clone(),
        })
    }

    fn history_failing(&self) -> watch::Receiver<Option<String>> {
        self.failing.subscribe()
    }
}

impl Nodes for PgStore {
    fn set_losses(&self, node: &str, losses: &ProxyLosses) -> Result<(), StoreError> {
        self.pending()
            .staged
            .losses
            .insert(node.to_string(), *losses);
        Ok(())
    }

    fn losses(&self) -> Result<Vec<(String, ProxyLosses)>, StoreError> {
        self.pool
            .get()?
            .query(
                "SELECT name, losses FROM nodes WHERE losses IS NOT NULL ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.get(0), decode("loss report", r.get::<_, &[u8]>(1))?)))
            .collect()
    }

    fn node_session(&self, node: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .pool
            .get()?
            .query_opt("SELECT session FROM nodes WHERE name = $1", &[&node])?
            .map(|r| r.get(0)))
    }

    fn set_node_session(&self, node: &str, session: &str) -> Result<(), StoreError> {
        self.pool.get()?.execute(
            "INSERT INTO nodes (name, session, seen) VALUES ($1, $2, now())
             ON CONFLICT (name) DO UPDATE SET session = excluded.session, seen = now()",
            &[&node, &session],
        )?;
        Ok(())
    }

    fn touch_nodes(&self, nodes: &[String]) -> Result<(), StoreError> {
        if nodes.is_empty() {
            return Ok(());
        }
        self.pool.get()?.execute(
            "INSERT INTO nodes (name, seen) SELECT unnest($1::text[]), now()
             ON CONFLICT (name) DO UPDATE SET seen = now()",
            &[&nodes],
        )?;
        Ok(())
    }

    fn node_reported_within(&self, node: &str, grace: Duration) -> Result<bool, StoreError> {
        let row = self.pool.get()?.query_opt(
            "SELECT seen > now() - make_interval(secs => $2) FROM nodes WHERE name = $1",
            &[&node, &grace.as_secs_f64()],
        )?;
        Ok(row
            .and_then(|r| r.get::<_, Option<bool>>(0))
            .unwrap_or(false))
    }
}

impl Durability for PgStore {
    fn commit(&self) -> Result<(), StoreError> {
        let _one = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (staged, generation) = {
            let mut p = self.pending();
            if p.staged.is_empty() {
                return Ok(());
            }
            p.generation += 1;
            (std::mem::take(&mut p.staged), p.generation - 1)
        };
        let touched: Vec<u64> = staged.changes.iter().map(|c| c.id).collect();
        let (changes, packets) = (staged.changes.len(), staged.packets.len());
        let start = std::time::Instant::now();
        let result = self.write(staged);
        tracing::debug!(changes, packets, took = ?start.elapsed(), "committed");
        match result {
            Ok(written) => {
                let mut p = self.pending();
                for id in touched {
                    // Closed or refused records, not changed again since, need no base.
                    let done = p.records.get(&id).is_some_and(|(c, g)| {
                        *g <= generation && (!is_active(c) || !written.contains(&id))
                    });
                    if done {
                        p.records.remove(&id);
                    }
                }
                drop(p);
                self.failing.send_if_modified(|f| f.take().is_some());
                Ok(())
            }
            Err(e) => {
                self.failed_commits.fetch_add(1, Ordering::Relaxed);
                let text = e.to_string();
                self.failing.send_if_modified(|f| {
                    let changed = f.as_deref() != Some(text.as_str());
                    *f = Some(text.clone());
                    changed
                });
                Err(e)
            }
        }
    }

    fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    /// None: a commit is a transaction on the server, which batches concurrent commits
    /// itself, and what is applied while one runs joins the next.
    fn commit_interval(&self) -> Duration {
        Duration::ZERO
    }

    fn close(&self) -> Result<(), StoreError> {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.commit()
    }
}

impl Feed for PgStore {
    fn start_feed(&self, feed: broadcast::Sender<Numbered>) -> bool {
        feed::start(&self.pool, self.shared.clone(), feed)
    }

    fn page_at(
        &self,
        filter: &ConnectionFilter,
        from: u64,
        max: usize,
        only: u64,
    ) -> Option<Result<PageAt, StoreError>> {
        Some(self.read_page_at(filter, from, max, only))
    }
}

impl PgStore {
    /// Clears the records `ids` (locked by `tx`) and numbers the removals.
    fn tombstone(&self, mut tx: Transaction<'_>, ids: &[u64]) -> Result<(), StoreError> {
        let keys: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        tx.execute(
            "UPDATE conns SET body = NULL, active = false WHERE id = ANY($1)",
            &[&keys],
        )?;
        let changes: Vec<(i64, Option<Vec<u8>>)> = keys.iter().map(|&k| (k, None)).collect();
        number(&mut tx, &changes, None)?;
        tx.commit()?;
        let mut p = self.pending();
        for id in ids {
            p.records.remove(id);
        }
        Ok(())
    }

    fn read_page_at(
        &self,
        filter: &ConnectionFilter,
        from: u64,
        max: usize,
        only: u64,
    ) -> Result<PageAt, StoreError> {
        let mut client = self.pool.get()?;
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let row = tx.query_one("SELECT seq, pos FROM counter", &[])?;
        let (seq, position) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        let (records, next) = match only {
            0 => {
                let active_only = filter.status == ConnStatus::Active as i32;
                page_of(filter, max, |visit| {
                    scan_in(&mut tx, active_only, from, visit)
                })?
            }
            id => (get_in(&mut tx, id)?.into_iter().collect(), None),
        };
        tx.commit()?;
        Ok(PageAt {
            records,
            next,
            seq,
            position,
        })
    }

    /// Reads the position up to which history may have been removed.
    fn refresh_removed(&self) -> Result<(), StoreError> {
        let removed: i64 = self
            .pool
            .get()?
            .query_one("SELECT removed_pos FROM history_totals", &[])?
            .get(0);
        self.shared
            .removed
            .fetch_max(removed as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use proto::common::Direction;

    use super::*;

    fn store() -> PgStore {
        on(&database())
    }

    fn database() -> String {
        pg_fixture::Cluster::shared()
            .create_database()
            .expect("a database")
    }

    fn on(url: &str) -> PgStore {
        PgStore::open(url, None, &HistoryOptions::default()).expect("open")
    }

    fn open(id: u64) -> Connection {
        Connection {
            id,
            ..Default::default()
        }
    }

    fn packet(conn_id: u64, seq: u64) -> Packet {
        Packet {
            conn_id,
            seq,
            direction: Direction::C2s as i32,
            data: format!("{conn_id}/{seq}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn history(s: &PgStore, conn: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        s.scan_history_upto((conn, 0), true, u64::MAX, &mut |p| {
            seqs.push(p.seq);
            true
        })
        .unwrap();
        seqs
    }

    /// A batch replayed after a failover (here: through a second store on the same
    /// database, which knows nothing of the first's writes) is stored once, and takes no
    /// new arrival position.
    #[test]
    fn a_replayed_batch_is_stored_once_even_through_another_replica() {
        let url = database();
        let (a, b) = (on(&url), on(&url));
        a.open_conn(open(1)).unwrap();
        a.record(vec![packet(1, 1), packet(1, 2)], Vec::new())
            .unwrap();
        a.commit().unwrap();
        // The other replica gets the replay, with a suffix.
        b.record(vec![packet(1, 1), packet(1, 2), packet(1, 3)], Vec::new())
            .unwrap();
        b.commit().unwrap();
        assert_eq!(history(&b, 1), vec![1, 2, 3]);
        assert_eq!(b.usage().unwrap().history_packets, 3);
        // The same replica replays: nothing new, no new position.
        b.record(vec![packet(1, 2), packet(1, 3)], Vec::new())
            .unwrap();
        b.commit().unwrap();
        assert_eq!(history(&a, 1), vec![1, 2, 3]);
        assert_eq!(b.position(), 2);
    }

    #[test]
    fn a_cleared_id_never_comes_back_and_ids_are_leased_once() {
        let s = store();
        let (first, last) = s.lease(10).unwrap();
        assert_eq!((first, last), (1, 10));
        assert_eq!(s.lease(5).unwrap(), (11, 15));
        s.open_conn(open(3)).unwrap();
        s.commit().unwrap();
        assert!(matches!(s.clear(&[3, 4]), Err(StoreError::NotFound(4))));
        assert_eq!(s.clear(&[3]).unwrap(), vec![3]);
        // A replayed open of a cleared ID is not stored.
        s.open_conn(open(3)).unwrap();
        s.commit().unwrap();
        assert_eq!(s.get_opt(3).unwrap(), None);
        let mut ids = Vec::new();
        s.scan_conns(0, &mut |c| {
            ids.push(c.id);
            true
        })
        .unwrap();
        assert!(ids.is_empty(), "{ids:?}");
    }

    /// Every change is numbered in commit order and published by the feed, whichever
    /// store made it; a page read reflects exactly the changes up to its number.
    #[test]
    fn the_feed_publishes_every_change_numbered_and_pages_read_at_a_number() {
        let a = store();
        let (tx, mut rx) = broadcast::channel(64);
        assert!(a.start_feed(tx));
        a.open_conn(open(1)).unwrap();
        a.open_conn(open(2)).unwrap();
        a.commit().unwrap();
        let page = a
            .page_at(&ConnectionFilter::default(), 0, 10, 0)
            .unwrap()
            .unwrap();
        assert_eq!(page.records.len(), 2);
        assert_eq!(page.seq, 2);
        a.clear(&[1]).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(n) => got.push(n),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let seqs: Vec<u64> = got.iter().map(|n| n.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert!(matches!(got[2].change, crate::backend::Change::Removed(1)));
        a.close().unwrap();
    }

    /// The committer may take the staged writes between a close and the `record` call that
    /// logs it (the writer applies a batch while commits run): the close still reaches
    /// the arrival log, and a close of a cleared record does not.
    #[test]
    fn a_close_committed_before_its_log_entry_is_still_logged() {
        let s = store();
        s.open_conn(open(1)).unwrap();
        s.open_conn(open(2)).unwrap();
        s.commit().unwrap();
        let close = |id| ConnectionClosed {
            id,
            ..Default::default()
        };
        let closed: Vec<Connection> = [1, 2]
            .into_iter()
            .map(|id| s.close_conn(&close(id)).unwrap().unwrap())
            .collect();
        s.commit().unwrap();
        s.clear(&[2]).unwrap();
        s.record(Vec::new(), closed).unwrap();
        s.commit().unwrap();
        let page = s.log_after(0, 0, 100, 1 << 20).unwrap();
        let logged: Vec<u64> = page
            .items
            .iter()
            .filter_map(|(_, f)| match f {
                crate::backend::sled_store::Followed::Closed(c) => Some(c.id),
                crate::backend::sled_store::Followed::Packet(_) => None,
            })
            .collect();
        assert_eq!(logged, vec![1]);
    }

    /// Changes trimmed before the feed read them (numbers taken, rows gone) make every
    /// watcher start over: the feed publishes a reset before the next change.
    #[test]
    fn a_gap_in_the_feed_resets_the_watchers() {
        let a = store();
        let (tx, mut rx) = broadcast::channel(64);
        // The feed has read the counter when `start_feed` returns.
        assert!(a.start_feed(tx));
        a.pool
            .get()
            .unwrap()
            .execute("UPDATE counter SET seq = seq + 5", &[])
            .unwrap();
        a.open_conn(open(1)).unwrap();
        a.commit().unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            match rx.try_recv() {
                Ok(n) => got.push(n),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        assert!(
            matches!(got[0].change, crate::backend::Change::Reset),
            "{got:?}"
        );
        assert_eq!(got[1].seq, 6);
        a.close().unwrap();
    }

    fn packets_of(s: &PgStore, start: (u64, u64), only_conn: bool) -> Vec<Packet> {
        let mut got = Vec::new();
        s.scan_history_upto(start, only_conn, u64::MAX, &mut |p| {
            got.push(p);
            true
        })
        .unwrap();
        got
    }

    fn count(s: &PgStore, sql: &str) -> i64 {
        s.pool.get().unwrap().query_one(sql, &[]).unwrap().get(0)
    }

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    /// One commit over three connections, interleaved, with payloads larger than a row's
    /// piece, edited packets and packets without a time: a row per connection (pieces
    /// aside), and each connection's history read back byte-exact, from its start or from
    /// inside a block, and in arrival order.
    #[test]
    fn a_batch_spanning_connections_reads_back_per_connection_byte_exact() {
        let s = store();
        let big = |seed: u8, n: usize| -> bytes::Bytes {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        let mut sent = Vec::new();
        for seq in 1..=4u64 {
            for conn in [3u64, 1, 2] {
                let mut p = packet(conn, seq);
                p.direction = if seq % 2 == 0 { 2 } else { 1 };
                p.ts = if conn == 2 { None } else { at(seq as i64) };
                if conn == 1 {
                    p.data = big(seq as u8, 20_000 + seq as usize);
                }
                if conn == 3 && seq == 2 {
                    p.modified = true;
                    p.original = big(7, 9_000);
                    p.dropped = true;
                }
                sent.push(p);
            }
        }
        for conn in 1..=3 {
            s.open_conn(open(conn)).unwrap();
        }
        s.record(sent.clone(), Vec::new()).unwrap();
        s.commit().unwrap();
        assert_eq!(count(&s, "SELECT count(*) FROM blocks WHERE part = 0"), 3);
        assert!(count(&s, "SELECT max(parts)::int8 FROM blocks") >= 11);
        let of = |conn: u64| -> Vec<Packet> {
            sent.iter().filter(|p| p.conn_id == conn).cloned().collect()
        };
        for conn in 1..=3 {
            assert_eq!(
                packets_of(&s, (conn, 0), true),
                of(conn),
                "connection {conn}"
            );
        }
        // From inside a block, and on across the connections after it.
        assert_eq!(packets_of(&s, (1, 3), true), of(1)[2..]);
        let mut from_2_3 = of(2)[2..].to_vec();
        from_2_3.extend(of(3));
        assert_eq!(packets_of(&s, (2, 3), false), from_2_3);
        // The arrival order: one position, its packets by (connection, seq).
        let page = s.log_after(0, 0, 10, 1 << 30).unwrap();
        let logged: Vec<Packet> = page
            .items
            .into_iter()
            .map(|(pos, f)| match f {
                crate::backend::sled_store::Followed::Packet(p) => {
                    assert_eq!(pos, 1);
                    p
                }
                crate::backend::sled_store::Followed::Closed(c) => panic!("closed {c:?}"),
            })
            .collect();
        let mut by_key = sent.clone();
        by_key.sort_by_key(|p| (p.conn_id, p.seq));
        assert_eq!(logged, by_key);
        let page = s.log_after(0, 3, 10, 1 << 30).unwrap();
        assert_eq!(page.items.len(), 4);
        // A replay of the batch stores nothing new.
        s.record(sent.clone(), Vec::new()).unwrap();
        s.commit().unwrap();
        assert_eq!(count(&s, "SELECT count(*) FROM blocks WHERE part = 0"), 3);
        assert_eq!(s.usage().unwrap().history_packets, 12);
    }

    /// A purge by connection deletes whole blocks; one by time deletes the blocks all of
    /// whose packets are older and rewrites those that keep some (packets without a time
    /// are kept); the counts follow.
    #[test]
    fn purges_delete_whole_blocks_and_rewrite_the_ones_that_keep_packets() {
        let s = store();
        for conn in 1..=3 {
            s.open_conn(open(conn)).unwrap();
        }
        // Commit 1: times 1 and 2; commit 2: times 3 and 4, and one without a time.
        for (seqs, times) in [([1, 2], [1, 2]), ([3, 4], [3, 4])] {
            let mut batch = Vec::new();
            for conn in 1..=3 {
                for (seq, t) in seqs.iter().zip(times) {
                    let mut p = packet(conn, *seq);
                    p.ts = at(t);
                    batch.push(p);
                }
            }
            s.record(batch, Vec::new()).unwrap();
            s.commit().unwrap();
        }
        let mut untimed = packet(1, 5);
        untimed.ts = None;
        s.record(vec![untimed], Vec::new()).unwrap();
        s.commit().unwrap();
        let bytes_of = |p: &Packet| p.data.len() as u64;
        let gone = s.purge(&Purge::Conns(vec![3])).unwrap();
        assert_eq!(gone.packets, 4);
        assert_eq!(
            gone.bytes,
            (1..=4).map(|q| bytes_of(&packet(3, q))).sum::<u64>()
        );
        assert!(history(&s, 3).is_empty());
        assert_eq!(
            count(&s, "SELECT count(*) FROM blocks WHERE conn_id = 3"),
            0
        );
        // Before time 3: commit 1's blocks go whole; the others keep what is newer.
        let before = prost_types::Timestamp {
            seconds: 3,
            nanos: 0,
        };
        let rows = count(&s, "SELECT count(*) FROM blocks");
        let gone = s.purge(&Purge::Before(before)).unwrap();
        assert_eq!(gone.packets, 4);
        assert_eq!(history(&s, 1), vec![3, 4, 5]);
        assert_eq!(history(&s, 2), vec![3, 4]);
        assert_eq!(count(&s, "SELECT count(*) FROM blocks"), rows - 2);
        // Before time 4: the blocks holding times 3 and 4 are rewritten.
        let before = prost_types::Timestamp {
            seconds: 4,
            nanos: 0,
        };
        let gone = s.purge(&Purge::Before(before)).unwrap();
        assert_eq!(gone.packets, 2);
        assert_eq!(history(&s, 1), vec![4, 5]);
        assert_eq!(history(&s, 2), vec![4]);
        let u = s.usage().unwrap();
        assert_eq!(u.history_packets, 3);
        assert_eq!(u.purged.0, 10);
        // A follower finds the kept packets at their positions still.
        let page = s.log_after(0, 1, 10, 1 << 30).unwrap();
        let positions: Vec<u64> = page.items.iter().map(|(pos, _)| *pos).collect();
        assert_eq!(positions, vec![2, 3]);
        let gone = s.purge(&Purge::All).unwrap();
        assert_eq!(gone.packets, 3);
        assert_eq!(count(&s, "SELECT count(*) FROM blocks"), 0);
        assert_eq!(s.usage().unwrap().history_packets, 0);
    }

    /// A database of schema version 1 (a row per packet) is moved into blocks when a
    /// registry opens it: the same history, positions and counts, and `packets` is gone.
    #[test]
    fn a_version_1_database_is_moved_into_blocks_at_open() {
        let url = database();
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(
            "CREATE TABLE interpose_schema (version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO interpose_schema (version) VALUES (1);",
        )
        .unwrap();
        c.batch_execute(include_str!("../../../migrations/0001_init.sql"))
            .unwrap();
        c.batch_execute(
            "CREATE TABLE packets_2 PARTITION OF packets FOR VALUES IN (2);
             INSERT INTO segments (seg) VALUES (2);",
        )
        .unwrap();
        // Two segments, three batches; batch 2 spans connections 1 and 2.
        let rows: Vec<(i64, i64, Packet)> = vec![
            (1, 1, packet(1, 1)),
            (1, 1, packet(1, 2)),
            (1, 2, packet(2, 1)),
            (1, 2, packet(1, 3)),
            (2, 3, packet(2, 2)),
        ];
        for (seg, batch, p) in &rows {
            c.execute(
                "INSERT INTO packets (seg, conn_id, seq, batch, ts, bytes, body)
                 VALUES ($1, $2, $3, $4, NULL, $5, $6)",
                &[
                    seg,
                    &(p.conn_id as i64),
                    &(p.seq as i64),
                    batch,
                    &(p.data.len() as i32),
                    &p.encode_to_vec(),
                ],
            )
            .unwrap();
        }
        c.batch_execute(
            "INSERT INTO arrivals (pos, batch, closed) VALUES (1, 1, '{}'), (2, 2, '{}'),
                 (3, 3, '{}');
             UPDATE counter SET pos = 3;
             UPDATE segments SET packets = 4, bytes = 12, last_pos = 2 WHERE seg = 1;
             UPDATE segments SET packets = 1, bytes = 3, last_pos = 3 WHERE seg = 2;
             INSERT INTO conns (id, active, body) VALUES (1, true, ''), (2, true, '');",
        )
        .unwrap();
        let s = on(&url);
        assert_eq!(history(&s, 1), vec![1, 2, 3]);
        assert_eq!(history(&s, 2), vec![1, 2]);
        assert_eq!(packets_of(&s, (1, 0), true)[2], packet(1, 3));
        let page = s.log_after(0, 0, 10, 1 << 30).unwrap();
        let order: Vec<(u64, u64, u64)> = page
            .items
            .iter()
            .map(|(pos, f)| match f {
                crate::backend::sled_store::Followed::Packet(p) => (*pos, p.conn_id, p.seq),
                crate::backend::sled_store::Followed::Closed(_) => (*pos, 0, 0),
            })
            .collect();
        assert_eq!(
            order,
            vec![(1, 1, 1), (1, 1, 2), (2, 1, 3), (2, 2, 1), (3, 2, 2)]
        );
        assert_eq!(s.position(), 3);
        assert_eq!(s.usage().unwrap().history_packets, 5);
        assert_eq!(
            count(
                &s,
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'blocks'::regclass"
            ),
            2
        );
        assert_eq!(
            count(
                &s,
                "SELECT count(*) FROM pg_class WHERE relname = 'packets'"
            ),
            0
        );
        assert_eq!(
            count(&s, "SELECT max(version)::int8 FROM interpose_schema"),
            2
        );
        // Ingest goes on after the moved history.
        s.record(vec![packet(1, 3), packet(1, 4)], Vec::new())
            .unwrap();
        s.commit().unwrap();
        assert_eq!(history(&s, 1), vec![1, 2, 3, 4]);
    }
}
