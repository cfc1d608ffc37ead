//! Proxy history on PostgreSQL: packets stored once per `(conn_id, seq)` in
//! segments (list partitions of `packets`), the arrival log, the retention budget and purge.
//!
//! A segment is rotated when it holds the budget's segment size; at the budget the oldest
//! segments are dropped whole (`DROP TABLE`, no row-by-row delete), or with `--history-full
//! stop` new packets are refused and counted. Rotation and eviction run in transactions of
//! their own after the commit that grew the history, under an advisory lock, never while
//! holding the change counter: their table locks wait for writers, never the other way, and
//! for 2 s at most (a writer hung inside its `COPY` must not queue everyone behind the
//! drop; the rotation or eviction is tried again after the next commit).

use std::collections::HashMap;

use postgres::{GenericClient, Transaction, binary_copy::BinaryCopyInWriter, types::Type};
use prost::Message;
use proto::common::{Connection, Packet};

use super::{PgStore, decode, key};
use crate::backend::{
    StoreError,
    sled_store::{Followed, LogPage, Purge, Purged, WhenFull, budget::note_refusing},
};

/// Advisory lock key that serialises segment rotation, eviction and purges.
const SEGMENT_LOCK: i64 = 0x696e_7470_6f73_6502;
/// Packets read per round trip of a history scan.
const SCAN_ROWS: i64 = 512;

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

fn nanos(p: &Packet) -> Option<i64> {
    p.ts.as_ref()
        .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
}

impl PgStore {
    /// Stores `packets` in the current segment, skipping those already stored.
    pub(super) fn store_packets(
        &self,
        tx: &mut Transaction<'_>,
        packets: Vec<Packet>,
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
        let segment: i64 = tx
            .query_one("SELECT max(seg) FROM segments", &[])?
            .get::<_, Option<i64>>(0)
            .unwrap_or(1);
        let incoming: i64 = packets.iter().map(payload).sum();
        let max = self.options.max_bytes;
        if max > 0 && self.options.when_full == WhenFull::Stop {
            let stored: i64 = tx
                .query_one("SELECT coalesce(sum(bytes), 0)::int8 FROM segments", &[])?
                .get(0);
            let refused = stored.saturating_add(incoming) > max as i64;
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
            for row in tx.query(
                "SELECT c, (SELECT max(seq) FROM packets WHERE conn_id = c)
                 FROM unnest($1::int8[]) AS c",
                &[&unknown],
            )? {
                let seq: Option<i64> = row.get(1);
                last.insert(row.get::<_, i64>(0) as u64, seq.unwrap_or(0) as u64);
            }
        }
        let mut fresh: Vec<&Packet> = Vec::with_capacity(packets.len());
        for p in &packets {
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
        let batch: i64 = tx.query_one("SELECT nextval('batches')", &[])?.get(0);
        let sink = tx.copy_in(
            "COPY packets (seg, conn_id, seq, batch, ts, bytes, body) FROM STDIN BINARY",
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
                Type::BYTEA,
            ],
        );
        let mut bytes = 0i64;
        for p in &fresh {
            let size = payload(p);
            bytes += size;
            w.write(&[
                &segment,
                &key(p.conn_id)?,
                &key(p.seq)?,
                &batch,
                &nanos(p),
                &(size as i32),
                &p.encode_to_vec(),
            ])?;
        }
        w.finish()?;
        Ok(Fresh {
            packets: fresh.len() as i64,
            bytes,
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
                     CREATE TABLE packets_{next} PARTITION OF packets FOR VALUES IN ({next});
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
            "SET LOCAL lock_timeout = '2s'; DROP TABLE packets_{oldest};"
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
    let mut sql = String::from(
        "SELECT p.conn_id, p.seq, p.body FROM packets p WHERE (p.conn_id, p.seq) >= ($1, $2)",
    );
    if only_conn {
        sql.push_str(" AND p.conn_id = $1");
    }
    let limit_upto = upto < i64::MAX as u64;
    if limit_upto {
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM arrivals a WHERE a.batch = p.batch AND a.pos <= $4)",
        );
    }
    sql.push_str(" ORDER BY p.conn_id, p.seq LIMIT $3");
    let (mut conn, mut seq) = (
        key(start.0.min(i64::MAX as u64))?,
        key(start.1.min(i64::MAX as u64))?,
    );
    let upto = upto.min(i64::MAX as u64) as i64;
    loop {
        let rows = if limit_upto {
            client.query(&sql, &[&conn, &seq, &SCAN_ROWS, &upto])?
        } else {
            client.query(&sql, &[&conn, &seq, &SCAN_ROWS])?
        };
        for row in &rows {
            (conn, seq) = (row.get(0), row.get::<_, i64>(1).saturating_add(1));
            if !f(decode("history packet", row.get::<_, &[u8]>(2))?) {
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
                    "SELECT body FROM packets WHERE batch = $1 ORDER BY conn_id, seq",
                    &[&batch],
                )?
            } else {
                client.query(
                    "SELECT body FROM packets WHERE batch = $1 AND conn_id = $2 ORDER BY seq",
                    &[&batch, &key(conn_id)?],
                )?
            };
            for row in rows {
                let p: Packet = decode("history packet", row.get::<_, &[u8]>(0))?;
                bytes += p.data.len() + p.original.len();
                page.items.push((n, Followed::Packet(p)));
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

/// Deletes history on request, counting what went.
pub(super) fn purge(client: &mut postgres::Client, what: &Purge) -> Result<Purged, StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEGMENT_LOCK])?;
    let per_segment: Vec<(i64, i64, i64)> = match what {
        Purge::All => {
            let rows = tx.query(
                "SELECT seg, packets, bytes FROM segments WHERE packets > 0",
                &[],
            )?;
            tx.batch_execute("SET LOCAL lock_timeout = '2s'; TRUNCATE packets;")?;
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        }
        Purge::Conns(ids) => {
            let keys = ids
                .iter()
                .map(|&id| key(id))
                .collect::<Result<Vec<_>, _>>()?;
            deleted(
                &mut tx,
                "DELETE FROM packets WHERE conn_id = ANY($1) RETURNING seg, bytes",
                &keys,
            )?
        }
        Purge::Before(t) => {
            let before = t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos);
            deleted(
                &mut tx,
                "DELETE FROM packets WHERE ts < $1 RETURNING seg, bytes",
                &before,
            )?
        }
    };
    let (mut packets, mut bytes) = (0i64, 0i64);
    for (seg, n, b) in &per_segment {
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

/// Runs a `DELETE ... RETURNING seg, bytes` with one parameter; the packets and bytes it
/// removed per segment.
fn deleted(
    tx: &mut Transaction<'_>,
    delete: &str,
    param: &(dyn postgres::types::ToSql + Sync),
) -> Result<Vec<(i64, i64, i64)>, StoreError> {
    let sql = format!(
        "WITH d AS ({delete})
         SELECT seg, count(*)::int8, coalesce(sum(bytes), 0)::int8 FROM d GROUP BY seg"
    );
    Ok(tx
        .query(&sql, &[param])?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
