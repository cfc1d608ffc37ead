//! Moving a store from before the history log into it, once, at open.
//!
//! Such a store keeps its history in sled: runs of packets in the `history` tree (payloads
//! in `history/NNNNNN.seg` files or a single `history.log`, see [`crate::backend::sled_store::payload`]), with
//! the `segment_runs` and `arrivals` trees beside them. Its packets are written to the log
//! in (connection, seq) order, in batches, with a progress line every few seconds; then the
//! log is synced, the old trees dropped and flushed, and the old files deleted.
//!
//! A crash midway keeps the old trees: the next open deletes what the log got and starts
//! again. A crash after the trees were dropped leaves only old files, deleted at the next
//! open.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use proto::{
    common::Packet,
    registry_store::{Run, StoredPacket},
};

use super::payload::PayloadLog;
use super::{Store, StoreError, decode};

/// Packets per batch written to the log.
const BATCH_PACKETS: usize = 1_000;
/// Payload bytes per batch, at most about.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
const OLD_TREES: [&str; 3] = ["history", "segment_runs", "arrivals"];

/// Moves the old layout's history into the log, if the store in `dir` has any.
pub(super) fn run(s: &Store, dir: &Path) -> Result<(), StoreError> {
    let old = s.db.open_tree("history")?;
    if old.is_empty() {
        drop(old);
        return finish(s, dir);
    }
    let total = old.len();
    tracing::info!(
        runs = total,
        "moving the history into the log-structured store (once; the registry serves when \
         it is done)"
    );
    if s.log.packets() > 0 {
        // What an interrupted migration wrote: it starts again.
        let p = s.log.purge(&|_| true, true, &|_, _| true)?;
        for n in p.emptied {
            s.log.remove(n)?;
        }
    }
    let payloads = PayloadLog::open(dir, u64::MAX)?;
    let (mut batch, mut bytes, mut done, mut moved) = (Vec::new(), 0usize, 0usize, 0u64);
    let mut said = Instant::now();
    let yes = |_, _, _| true;
    for kv in old.iter() {
        let (_, v) = kv?;
        let run: Run = decode("history run", &v)?;
        for p in run.packets {
            let Some(p) = load(&payloads, p)? else {
                continue;
            };
            bytes += p.data.len() + p.original.len();
            batch.push(p);
        }
        if batch.len() >= BATCH_PACKETS || bytes >= BATCH_BYTES {
            moved += batch.len() as u64;
            s.log.record(std::mem::take(&mut batch), Vec::new(), &yes)?;
            bytes = 0;
        }
        done += 1;
        if said.elapsed() >= Duration::from_secs(2) {
            tracing::info!(
                runs = done,
                of = total,
                packets = moved,
                "moving the history"
            );
            said = Instant::now();
        }
    }
    moved += batch.len() as u64;
    s.log.record(batch, Vec::new(), &yes)?;
    s.log.sync()?;
    drop(old);
    for tree in OLD_TREES {
        s.db.drop_tree(tree)?;
    }
    s.meta.remove(b"history_count")?;
    s.meta.remove(b"open")?;
    s.save_counts()?;
    s.db.flush()?;
    drop(payloads);
    tracing::info!(
        packets = moved,
        "the history is in the log-structured store"
    );
    finish(s, dir)
}

/// Deletes what is left of the old layout (its files, its empty trees).
fn finish(s: &Store, dir: &Path) -> Result<(), StoreError> {
    for tree in OLD_TREES {
        if s.db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == tree.as_bytes())
        {
            s.db.drop_tree(tree)?;
        }
    }
    let legacy = dir.join("history.log");
    if legacy.exists() {
        std::fs::remove_file(&legacy)?;
    }
    for entry in std::fs::read_dir(dir.join("history"))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".seg") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// An old stored packet with its payload, or `None` when its bytes were lost.
fn load(payloads: &PayloadLog, p: StoredPacket) -> Result<Option<Packet>, StoreError> {
    let data = if p.log_len > 0 {
        if !payloads.holds(p.segment, p.log_offset, p.log_len) {
            return Ok(None);
        }
        payloads.read(p.segment, p.log_offset, p.log_len)?.into()
    } else {
        p.data
    };
    Ok(Some(Packet {
        conn_id: p.conn_id,
        seq: p.seq,
        direction: p.direction,
        ts: p.ts,
        data,
        modified: p.modified,
        original: p.original,
        dropped: p.dropped,
    }))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn a_store_from_before_the_log_is_moved_into_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        // The old layout, as the store before the log wrote it: one run with its bytes in
        // a payload segment, one with them inline.
        {
            let sled = sled::open(&db).unwrap();
            let history = sled.open_tree("history").unwrap();
            let log = PayloadLog::open(&db, 1 << 20).unwrap();
            let (seg, off) = log.append(&[b"in the log"]).unwrap();
            log.sync().unwrap();
            let run = Run {
                packets: vec![StoredPacket {
                    conn_id: 1,
                    seq: 1,
                    segment: seg,
                    log_offset: off,
                    log_len: 10,
                    ..Default::default()
                }],
            };
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&1u64.to_be_bytes());
            key[8..].copy_from_slice(&1u64.to_be_bytes());
            history.insert(key, run.encode_to_vec()).unwrap();
            let inline = Run {
                packets: vec![StoredPacket {
                    conn_id: 2,
                    seq: 5,
                    data: bytes::Bytes::from_static(b"inline"),
                    ..Default::default()
                }],
            };
            key[..8].copy_from_slice(&2u64.to_be_bytes());
            key[8..].copy_from_slice(&5u64.to_be_bytes());
            history.insert(key, inline.encode_to_vec()).unwrap();
            sled.flush().unwrap();
        }
        let s = Store::open(&db).unwrap();
        let mut got = Vec::new();
        s.scan_history((0, 0), false, |p| {
            got.push((p.conn_id, p.seq, p.data.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(
            got,
            [(1, 1, b"in the log".to_vec()), (2, 5, b"inline".to_vec())]
        );
        assert_eq!(s.history_len(), 2);
        assert!(!s.db.tree_names().iter().any(|n| n.as_ref() == b"history"));
        let seg_files = std::fs::read_dir(db.join("history"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count();
        assert_eq!(seg_files, 0);
    }
}
