//! Proxy history on PostgreSQL: packets stored in blocks (one row per connection per commit,
//! [`blocks`]) in segments (list partitions of `blocks`), the arrival log, the retention
//! budget and purge.
//!
//! A segment is rotated when it holds the budget's segment size; at the budget the oldest
//! segments are dropped whole (`DROP TABLE`, no row-by-row delete), or with `--history-full
//! stop` new packets are refused and counted. Rotation and eviction run in transactions of
//! their own after the commit that grew the history, under an advisory lock, never while
//! holding the change counter: their table locks wait for writers, never the other way, and
//! for 2 s at most (a writer hung inside its `COPY` must not queue everyone behind the
//! drop; the rotation or eviction is tried again after the next commit).
//!
//! A connection's blocks never overlap in seq (a commit stores only packets past the last
//! one stored), so `(conn_id, first_seq)` orders blocks as their packets are ordered.

use std::collections::HashMap;

use postgres::{GenericClient, Transaction, binary_copy::BinaryCopyInWriter, types::Type};
use proto::common::{Connection, Packet};

use super::{
    PgStore,
    blocks::{self, Joiner, PIECE},
    decode, key,
};
use crate::backend::{
    StoreError,
    sled_store::{Followed, LogPage, Purge, Purged, WhenFull, budget::note_refusing},
};

/// Advisory lock key that serialises segment rotation, eviction and purges.
const SEGMENT_LOCK: i64 = 0x696e_7470_6f73_6502;
/// Block rows read per round trip of a history scan.
const SCAN_ROWS: i64 = 128;
/// Version 1 packet rows moved into blocks per round trip of the migration.
const MOVE_ROWS: i32 = 20_000;

/// What a commit's first statement read.
pub(super) struct Now {
    /// The current segment and the payload bytes in all segments.
    pub segment: i64,
    pub stored: i64,
    /// The commit's batch number.
    pub batch: i64,
}

/// What one commit stored.
pub(super) struct Fresh {
    /// Packets new to the history (a replayed one is not) and their payload bytes.
    pub packets: i64,
    pub bytes: i64,
    /// The segment they went into and their batch number (0: none).
    pub segment: i64,
    pub batch: i64,
    /// The last sequence number stored per connection, once this commits.
    pub last: HashMap<u64, u64>,
}

/// Payload bytes a packet counts for in the budget.
fn payload(p: &Packet) -> i64 {
    (p.data.len() + p.original.len()) as i64
}

fn corrupt(source: crate::backend::frame::FrameError) -> StoreError {
    StoreError::CorruptFrame {
        what: "history block",
        source,
    }
}

/// Writes the blocks of `packets` (sorted by (connection, seq), no repeats) into segment
/// `seg` with batch number `batch` through one `COPY`.
fn copy_blocks(
    tx: &mut Transaction<'_>,
    seg: i64,
    batch: i64,
    packets: &[Packet],
) -> Result<(), StoreError> {
    let enc = blocks::encode(packets);
    let sink = tx.copy_in(
        "COPY blocks (seg, batch, conn_id, first_seq, last_seq, part, parts, packets, bytes, \
         ts_min, ts_max, untimed, body) FROM STDIN BINARY",
    )?;
    let mut w = BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::INT4,
            Type::INT4,
            Type::INT4,
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::BOOL,
            Type::BYTEA,
        ],
    );
    for row in enc.rows(PIECE) {
        let d = row.desc;
        w.write(&[
            &seg,
            &batch,
            &key(d.conn)?,
            &key(d.first_seq)?,
            &key(d.last_seq)?,
            &row.part,
            &row.parts,
            &(d.packets as i32),
            &(d.bytes as i64),
            &d.ts_min,
            &d.ts_max,
            &d.untimed,
            &row.body,
        ])?;
    }
    w.finish()?;
    Ok(())
}

/// Joins block rows (conn_id, first_seq, part, parts, packets, body at columns 0 to 5)
/// into packets.
struct Reader {
    joiner: Joiner,
}

impl Reader {
    fn new() -> Self {
        Self {
            joiner: Joiner::default(),
        }
    }

    /// Adds one row; the packets of the block it completes, each passed to `f`.
    fn add(
        &mut self,
        row: &postgres::Row,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> Result<bool, StoreError> {
        let block = (row.get::<_, i64>(0), row.get::<_, i64>(1));
        let (part, parts, count): (i32, i32, i32) = (row.get(2), row.get(3), row.get(4));
        let Some(bytes) = self
            .joiner
            .add(block, part, parts, row.get::<_, Vec<u8>>(5))
            .map_err(corrupt)?
        else {
            return Ok(true);
        };
        let mut packets = Vec::with_capacity(count.max(0) as usize);
        blocks::decode(&bytes, count.max(0) as usize, |p| packets.push(p)).map_err(corrupt)?;
        for p in packets {
            if !f(p) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl PgStore {
    /// Stores `packets` in the current segment, skipping those already stored.
    pub(super) fn store_packets(
        &self,
        tx: &mut Transaction<'_>,
        packets: Vec<Packet>,
        now: &Now,
    ) -> Result<Fresh, StoreError> {
        let none = |segment| Fresh {
            packets: 0,
            bytes: 0,
            segment,
            batch: 0,
            last: HashMap::new(),
        };
        if packets.is_empty() {
            return Ok(none(0));
        }
        let segment = now.segment;
        let incoming: i64 = packets.iter().map(payload).sum();
        let max = self.options.max_bytes;
        if max > 0 && self.options.when_full == WhenFull::Stop {
            let refused = now.stored.saturating_add(incoming) > max as i64;
            note_refusing(&self.refusing, refused, max);
            if refused {
                tx.execute(
                    "UPDATE history_totals SET refused_packets = refused_packets + $1,
                     refused_bytes = refused_bytes + $2",
                    &[&(packets.len() as i64), &incoming],
                )?;
                return Ok(none(segment));
            }
        }
        // Fresh packets are those past the last sequence number stored for their connection
        // (a proxy numbers each connection's packets in order, and a replay resends a suffix).
        let stored = self.stored_seqs.lock().unwrap_or_else(|e| e.into_inner());
        let unknown: Vec<i64> = {
            let mut ids: Vec<i64> = packets
                .iter()
                .filter(|p| !stored.contains_key(&p.conn_id))
                .map(|p| p.conn_id as i64)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let mut last: HashMap<u64, u64> = HashMap::new();
        if !unknown.is_empty() {
            // A connection's last block is the one with the highest first seq.
            for row in tx.query(
                "SELECT c, (SELECT last_seq FROM blocks WHERE conn_id = c
                            ORDER BY first_seq DESC, part DESC LIMIT 1)
                 FROM unnest($1::int8[]) AS c",
                &[&unknown],
            )? {
                let seq: Option<i64> = row.get(1);
                last.insert(row.get::<_, i64>(0) as u64, seq.unwrap_or(0) as u64);
            }
        }
        let mut fresh: Vec<Packet> = Vec::with_capacity(packets.len());
        for p in packets {
            let known = last
                .get(&p.conn_id)
                .or_else(|| stored.get(&p.conn_id))
                .copied()
                .unwrap_or(0);
            if p.seq > known {
                last.insert(p.conn_id, p.seq);
                fresh.push(p);
            }
        }
        drop(stored);
        if fresh.is_empty() {
            return Ok(Fresh {
                last,
                ..none(segment)
            });
        }
        // Stable: each connection's packets stay in the (seq) order they were checked in.
        fresh.sort_by_key(|p| p.conn_id);
        let batch = now.batch;
        copy_blocks(tx, segment, batch, &fresh)?;
        Ok(Fresh {
            packets: fresh.len() as i64,
            bytes: fresh.iter().map(payload).sum(),
            segment,
            batch,
            last,
        })
    }

    /// After segment `seg` grew to `bytes`: rotates it when full, evicts at the budget.
    pub(super) fn after_growth(
        &self,
        client: &mut postgres::Client,
        seg: i64,
        bytes: i64,
    ) -> Result<(), StoreError> {
        if bytes >= self.options.segment_bytes() as i64 {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEGMENT_LOCK])?;
            let current: i64 = tx.query_one("SELECT max(seg) FROM segments", &[])?.get(0);
            if current == seg {
                let next = seg + 1;
                tx.batch_execute(&format!(
                    "SET LOCAL lock_timeout = '2s';
                     CREATE TABLE blocks_{next} PARTITION OF blocks FOR VALUES IN ({next});
                     INSERT INTO segments (seg) VALUES ({next});"
                ))?;
            }
            tx.commit()?;
        }
        if self.options.max_bytes > 0 && self.options.when_full == WhenFull::Evict {
            while self.evict_one(client)? {}
        }
        Ok(())
    }

    /// Drops the oldest segment if the history is over its budget and it is not the
    /// current one; whether one was dropped.
    fn evict_one(&self, client: &mut postgres::Client) -> Result<bool, StoreError> {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEGMENT_LOCK])?;
        let row = tx.query_one(
            "SELECT coalesce(sum(bytes), 0)::int8, min(seg), max(seg) FROM segments",
            &[],
        )?;
        let (total, oldest, current): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if total <= self.options.max_bytes as i64 || oldest == current {
            return Ok(false);
        }
        let row = tx.query_one(
            "DELETE FROM segments WHERE seg = $1 RETURNING packets, bytes, last_pos",
            &[&oldest],
        )?;
        let (packets, bytes, last_pos): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '2s'; DROP TABLE blocks_{oldest};"
        ))?;
        tx.execute(
            "UPDATE history_totals SET evicted_packets = evicted_packets + $1,
             evicted_bytes = evicted_bytes + $2, removed_pos = greatest(removed_pos, $3)",
            &[&packets, &bytes, &last_pos],
        )?;
        tx.execute("DELETE FROM arrivals WHERE pos <= $1", &[&last_pos])?;
        tx.commit()?;
        self.shared
            .removed
            .fetch_max(last_pos as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            segment = oldest,
            packets,
            bytes,
            "evicted the oldest history segment"
        );
        Ok(true)
    }
}

/// History packets from `start` on in `(conn_id, seq)` order (of `start.0` only when
/// `only_conn`), recorded at positions up to `upto`, each passed to `f` until it says stop.
pub(super) fn scan(
    client: &mut impl GenericClient,
    start: (u64, u64),
    only_conn: bool,
    upto: u64,
    f: &mut dyn FnMut(Packet) -> bool,
) -> Result<(), StoreError> {
    let (conn0, seq0) = (
        key(start.0.min(i64::MAX as u64))?,
        key(start.1.min(i64::MAX as u64))?,
    );
    // The block holding `start` may begin before it.
    let first: i64 = client
        .query_opt(
            "SELECT first_seq FROM blocks WHERE conn_id = $1 AND first_seq <= $2
             ORDER BY first_seq DESC LIMIT 1",
            &[&conn0, &seq0],
        )?
        .map_or(seq0, |r| r.get(0));
    let mut sql = String::from(
        "SELECT b.conn_id, b.first_seq, b.part, b.parts, b.packets, b.body FROM blocks b
         WHERE (b.conn_id, b.first_seq, b.part) > ($1, $2, $3)",
    );
    if only_conn {
        sql.push_str(" AND b.conn_id = $5");
    }
    let limit_upto = upto < i64::MAX as u64;
    if limit_upto {
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM arrivals a WHERE a.batch = b.batch AND a.pos <= $6)",
        );
    }
    sql.push_str(" ORDER BY b.conn_id, b.first_seq, b.part LIMIT $4");
    let upto = upto.min(i64::MAX as u64) as i64;
    let mut after: (i64, i64, i32) = (conn0, first, -1);
    // The next packet that may be passed on: from `start`, never one twice.
    let mut next = (start.0, start.1);
    let mut reader = Reader::new();
    let mut pass = |p: Packet| {
        if (p.conn_id, p.seq) < next {
            return true;
        }
        next = (p.conn_id, p.seq.saturating_add(1));
        f(p)
    };
    loop {
        let (c, s, part) = &after;
        let rows = match (only_conn, limit_upto) {
            (false, false) => client.query(&sql, &[c, s, part, &SCAN_ROWS])?,
            (true, false) => client.query(&sql, &[c, s, part, &SCAN_ROWS, &conn0])?,
            (false, true) => {
                let sql = sql.replace("$6", "$5");
                client.query(&sql, &[c, s, part, &SCAN_ROWS, &upto])?
            }
            (true, true) => client.query(&sql, &[c, s, part, &SCAN_ROWS, &conn0, &upto])?,
        };
        for row in &rows {
            after = (row.get(0), row.get(1), row.get(2));
            if !reader.add(row, &mut pass)? {
                return Ok(());
            }
        }
        if (rows.len() as i64) < SCAN_ROWS {
            return Ok(());
        }
    }
}

/// What was recorded after position `after` (of `conn_id` only, unless 0): at most
/// `max_entries` positions and about `max_bytes` of payload.
pub(super) fn log_after(
    client: &mut impl GenericClient,
    after: u64,
    conn_id: u64,
    max_entries: usize,
    max_bytes: usize,
) -> Result<LogPage, StoreError> {
    let mut page = LogPage {
        items: Vec::new(),
        last: after,
    };
    let entries = client.query(
        "SELECT pos, batch, closed FROM arrivals WHERE pos > $1 ORDER BY pos LIMIT $2",
        &[&key(after.min(i64::MAX as u64))?, &(max_entries as i64)],
    )?;
    let mut bytes = 0;
    for entry in &entries {
        let (pos, batch): (i64, i64) = (entry.get(0), entry.get(1));
        let n = pos as u64;
        if batch != 0 {
            let rows = if conn_id == 0 {
                client.query(
                    "SELECT conn_id, first_seq, part, parts, packets, body FROM blocks
                     WHERE batch = $1 ORDER BY conn_id, first_seq, part",
                    &[&batch],
                )?
            } else {
                client.query(
                    "SELECT conn_id, first_seq, part, parts, packets, body FROM blocks
                     WHERE batch = $1 AND conn_id = $2 ORDER BY first_seq, part",
                    &[&batch, &key(conn_id)?],
                )?
            };
            let mut reader = Reader::new();
            for row in &rows {
                reader.add(row, &mut |p| {
                    bytes += p.data.len() + p.original.len();
                    page.items.push((n, Followed::Packet(p)));
                    true
                })?;
            }
        }
        for body in entry.get::<_, Vec<Vec<u8>>>(2) {
            let c: Connection = decode("closed record", &body)?;
            if conn_id == 0 || c.id == conn_id {
                page.items.push((n, Followed::Closed(Box::new(c))));
            }
        }
        page.last = n;
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(page)
}

/// Packets and payload bytes removed, per segment.
type PerSegment = HashMap<i64, (i64, i64)>;

/// Deletes history on request, counting what went.
pub(super) fn purge(client: &mut postgres::Client, what: &Purge) -> Result<Purged, StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEGMENT_LOCK])?;
    let mut per_segment = PerSegment::new();
    match what {
        Purge::All => {
            for r in tx.query(
                "SELECT seg, packets, bytes FROM segments WHERE packets > 0",
                &[],
            )? {
                per_segment.insert(r.get(0), (r.get(1), r.get(2)));
            }
            tx.batch_execute("SET LOCAL lock_timeout = '2s'; TRUNCATE blocks;")?;
        }
        Purge::Conns(ids) => {
            let keys = ids
                .iter()
                .map(|&id| key(id))
                .collect::<Result<Vec<_>, _>>()?;
            deleted(
                &mut tx,
                "DELETE FROM blocks WHERE conn_id = ANY($1)",
                &keys,
                &mut per_segment,
            )?;
        }
        Purge::Before(t) => {
            let before = t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos);
            // Blocks all of whose packets go are deleted whole...
            deleted(
                &mut tx,
                "DELETE FROM blocks WHERE ts_max < $1 AND NOT untimed",
                &before,
                &mut per_segment,
            )?;
            // ... and those that keep some are written anew without the others.
            rewrite_before(&mut tx, before, &mut per_segment)?;
        }
    }
    let (mut packets, mut bytes) = (0i64, 0i64);
    for (seg, (n, b)) in &per_segment {
        packets += n;
        bytes += b;
        tx.execute(
            "UPDATE segments SET packets = packets - $2, bytes = bytes - $3 WHERE seg = $1",
            &[seg, n, b],
        )?;
    }
    if packets > 0 {
        tx.execute(
            "UPDATE history_totals SET purged_packets = purged_packets + $1,
             purged_bytes = purged_bytes + $2,
             removed_pos = greatest(removed_pos, (SELECT pos FROM counter))",
            &[&packets, &bytes],
        )?;
    }
    tx.commit()?;
    Ok(Purged {
        packets: packets as u64,
        bytes: bytes as u64,
        freed_bytes: bytes as u64,
    })
}

/// Runs `delete` (a `DELETE FROM blocks` with one parameter) and adds the packets and
/// bytes of the blocks it removed to `per_segment` (each block counted once, by its first
/// piece).
fn deleted(
    tx: &mut Transaction<'_>,
    delete: &str,
    param: &(dyn postgres::types::ToSql + Sync),
    per_segment: &mut PerSegment,
) -> Result<(), StoreError> {
    let sql = format!(
        "WITH d AS ({delete} RETURNING seg, part, packets, bytes)
         SELECT seg, coalesce(sum(packets) FILTER (WHERE part = 0), 0)::int8,
                coalesce(sum(bytes) FILTER (WHERE part = 0), 0)::int8
         FROM d GROUP BY seg"
    );
    for r in tx.query(&sql, &[param])? {
        let e = per_segment.entry(r.get(0)).or_default();
        e.0 += r.get::<_, i64>(1);
        e.1 += r.get::<_, i64>(2);
    }
    Ok(())
}

/// Rewrites the blocks holding packets captured before `before` (ns) and others: each
/// block is read whole, deleted, and written again with the kept packets only.
fn rewrite_before(
    tx: &mut Transaction<'_>,
    before: i64,
    per_segment: &mut PerSegment,
) -> Result<(), StoreError> {
    let rows = tx.query(
        "SELECT conn_id, first_seq, part, parts, packets, body, seg, batch FROM blocks
         WHERE ts_min < $1 ORDER BY conn_id, first_seq, part",
        &[&before],
    )?;
    let mut joiner = Joiner::default();
    for row in &rows {
        let block: (i64, i64) = (row.get(0), row.get(1));
        let (part, parts, count): (i32, i32, i32) = (row.get(2), row.get(3), row.get(4));
        let Some(bytes) = joiner
            .add(block, part, parts, row.get::<_, Vec<u8>>(5))
            .map_err(corrupt)?
        else {
            continue;
        };
        let (seg, batch): (i64, i64) = (row.get(6), row.get(7));
        let mut kept = Vec::new();
        let (mut gone, mut gone_bytes) = (0i64, 0i64);
        blocks::decode(&bytes, count.max(0) as usize, |p| {
            if blocks::nanos(&p).is_some_and(|ts| ts < before) {
                gone += 1;
                gone_bytes += payload(&p);
            } else {
                kept.push(p);
            }
        })
        .map_err(corrupt)?;
        tx.execute(
            "DELETE FROM blocks WHERE conn_id = $1 AND first_seq = $2 AND batch = $3",
            &[&block.0, &block.1, &batch],
        )?;
        if !kept.is_empty() {
            copy_blocks(tx, seg, batch, &kept)?;
        }
        let e = per_segment.entry(seg).or_default();
        e.0 += gone;
        e.1 += gone_bytes;
    }
    Ok(())
}

/// Moves the history of a version 1 database (a row per packet in `packets`, partitioned
/// by segment) into blocks, segment by segment, then drops `packets`; a progress line per
/// segment. Each batch's packets become its blocks, in the same segment with the same
/// batch number, so the arrival log and the budget's counts stay as they were.
pub(super) fn move_v1_packets(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
    let total: i64 = tx.query_one("SELECT count(*) FROM packets", &[])?.get(0);
    let segments: Vec<i64> = tx
        .query("SELECT seg FROM segments ORDER BY seg", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if total > 0 {
        tracing::info!(
            packets = total,
            segments = segments.len(),
            "moving the history into blocks (once; the registry serves when it is done)"
        );
    }
    let mut moved = 0i64;
    for (i, &seg) in segments.iter().enumerate() {
        tx.batch_execute(&format!(
            "CREATE TABLE blocks_{seg} PARTITION OF blocks FOR VALUES IN ({seg})"
        ))?;
        let portal = tx.bind(
            "SELECT batch, body FROM packets WHERE seg = $1 ORDER BY batch, conn_id, seq",
            &[&seg],
        )?;
        loop {
            let rows = tx.query_portal(&portal, MOVE_ROWS)?;
            let mut batch: Option<i64> = None;
            let mut packets: Vec<Packet> = Vec::new();
            for row in &rows {
                let b: i64 = row.get(0);
                if batch.is_some_and(|c| c != b) {
                    copy_blocks(tx, seg, batch.unwrap_or(b), &packets)?;
                    packets.clear();
                }
                batch = Some(b);
                packets.push(decode("history packet", row.get::<_, &[u8]>(1))?);
            }
            if let Some(b) = batch {
                // A batch cut by the round trip becomes two blocks per connection, with
                // ranges that do not overlap: read as one.
                copy_blocks(tx, seg, b, &packets)?;
            }
            moved += rows.len() as i64;
            if (rows.len() as i32) < MOVE_ROWS {
                break;
            }
        }
        if total > 0 {
            tracing::info!(
                segment = i + 1,
                of = segments.len(),
                packets = moved,
                "moving the history into blocks"
            );
        }
    }
    tx.batch_execute("DROP TABLE packets")?;
    if total > 0 {
        tracing::info!(packets = moved, "the history is in blocks");
    }
    Ok(())
}
