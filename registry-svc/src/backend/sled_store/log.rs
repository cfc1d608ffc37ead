//! The history log: the store's history as segment files of checksummed frames in arrival
//! order, one frame per write ([`super::frame`]), with a sparse index per segment.
//!
//! Files in the store's `history` folder:
//! - `NNNNNN.log`: a segment's frames. Appends go to the newest (the *open* segment); once
//!   it holds the configured size the next write starts a new one.
//! - `NNNNNN.idx`: a closed segment's index, written when it closes: its counts, the
//!   connections it holds, one entry per frame (arrival position -> offset, for followers)
//!   and one per block (connection, seq range, position -> offset and length, for one
//!   connection's history). An index that is missing or does not check is rebuilt from its
//!   segment.
//!
//! Nothing per packet goes to sled. In memory stay each segment's counts and connection list
//! (for finding one connection's segments) and the open segment's index; closed segments'
//! indexes are read on demand into a cache of bounded size ([`INDEX_CACHE_BYTES`]).
//!
//! Crash safety: a write is one `pwrite` of a frame at the end of the open segment, made
//! durable by [`HistoryLog::sync`] before the registry acknowledges it. At open the open
//! segment is scanned: a torn or corrupt frame at its end (a crash mid-write) is cut off,
//! and everything before it is indexed again. A closed segment was synced before the next
//! one started. Removing a segment (eviction, purge) deletes whole files; a purge that keeps
//! part of a segment writes the kept frames to a new file and renames it over the old.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use proto::common::{Connection, Packet};
use tokio::sync::watch;

use super::frame::{self, Block, FRAME_HEADER};

/// Bytes of closed segments' indexes kept in memory, at most (beyond it the least recently
/// loaded are dropped and read again when needed).
pub const INDEX_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Connections whose highest stored seq is remembered for telling fresh packets from
/// replayed ones; beyond it the map starts afresh (a connection not in it costs a lookup).
const LAST_SEQ_ENTRIES: usize = 65_536;
/// Bytes read at a time when reading frames in order.
const READ_CHUNK: usize = 4 * 1024 * 1024;
const IDX_MAGIC: [u8; 4] = *b"IPX1";

/// What a segment holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of frames.
    pub len: u64,
    pub first_pos: u64,
    pub last_pos: u64,
    pub packets: u64,
    /// Payload bytes (data and original).
    pub payload: u64,
    /// The latest packet timestamp (seconds, nanos); (i64::MIN, 0) when none has one.
    pub max_ts: (i64, i32),
    /// Packets without a timestamp.
    pub untimed: u64,
}

impl Summary {
    fn empty() -> Self {
        Self {
            max_ts: (i64::MIN, 0),
            ..Default::default()
        }
    }

    fn add(&mut self, pos: u64, enc: &frame::Encoded, len: u64, packets: &[Packet]) {
        if self.first_pos == 0 {
            self.first_pos = pos;
        }
        self.last_pos = pos;
        self.len += len;
        self.packets += enc.packets;
        self.payload += enc.payload;
        for p in packets {
            match p.ts {
                Some(t) => self.max_ts = self.max_ts.max((t.seconds, t.nanos)),
                None => self.untimed += 1,
            }
        }
    }
}

/// A closed segment's full index.
#[derive(Debug, Default)]
struct SegIndex {
    /// (arrival position, offset) of each frame, in order.
    batches: Vec<(u64, u64)>,
    /// Every block, sorted by (connection, first seq, position); offsets from the segment start.
    blocks: Vec<Block>,
}

impl SegIndex {
    fn bytes(&self) -> usize {
        self.batches.len() * 16 + self.blocks.len() * std::mem::size_of::<Block>()
    }

    fn of_conn(&self, conn: u64) -> &[Block] {
        let from = self.blocks.partition_point(|b| b.conn < conn);
        let to = self.blocks.partition_point(|b| b.conn <= conn);
        &self.blocks[from..to]
    }
}

/// A closed segment, as memory keeps it.
struct Closed {
    n: u64,
    /// Changes when a purge rewrites the segment (the cache key).
    generation: u64,
    file: Arc<File>,
    summary: Summary,
    /// The connections with packets in it, sorted.
    conns: Vec<u64>,
}

/// The segment being written, fully indexed in memory.
struct Open {
    n: u64,
    file: Arc<File>,
    summary: Summary,
    batches: Vec<(u64, u64)>,
    blocks: HashMap<u64, Vec<Block>>,
}

impl Open {
    fn new(n: u64, file: Arc<File>) -> Self {
        Self {
            n,
            file,
            summary: Summary::empty(),
            batches: Vec::new(),
            blocks: HashMap::new(),
        }
    }

    fn add(&mut self, offset: u64, pos: u64, enc: &frame::Encoded, len: u64, packets: &[Packet]) {
        self.summary.add(pos, enc, len, packets);
        self.batches.push((pos, offset));
        for b in &enc.blocks {
            let mut b = *b;
            b.offset += offset;
            self.blocks.entry(b.conn).or_default().push(b);
        }
    }

    fn index(&self) -> SegIndex {
        let mut blocks: Vec<Block> = self.blocks.values().flatten().copied().collect();
        blocks.sort_unstable_by_key(|b| (b.conn, b.first_seq, b.pos));
        SegIndex {
            batches: self.batches.clone(),
            blocks,
        }
    }
}

struct Segments {
    closed: BTreeMap<u64, Arc<Closed>>,
    open: Open,
}

struct Writer {
    /// Bytes in the open segment (frames written whole).
    len: u64,
    last_pos: u64,
    /// A failed write could not be cut off: the next write starts a new segment.
    broken: bool,
    buf: Vec<u8>,
    last_seq: HashMap<u64, u64>,
}

/// A segment to read: its file, how much of it is written, and its index.
#[derive(Clone)]
struct Seg {
    n: u64,
    file: Arc<File>,
    summary: Summary,
    closed: Option<Arc<Closed>>,
}

/// What [`HistoryLog::record`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Fresh packets written and their payload bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Whether a frame was written (fresh packets or closed records).
    pub logged: bool,
}

/// Fresh packets the budget refused, or a write that failed.
pub enum Refused {
    /// The budget (`--history-full stop`) refused them.
    Budget,
    /// Writing failed (the disk is full or failing): the packets and bytes lost.
    Failed(u64, u64, io::Error),
}

/// The history log of one store.
pub struct HistoryLog {
    dir: PathBuf,
    segment_bytes: u64,
    segments: RwLock<Segments>,
    writer: Mutex<Writer>,
    /// The open segment's file, for [`HistoryLog::sync`] (which must not wait for a write).
    syncing: Mutex<Arc<File>>,
    dirty: AtomicBool,
    cache: Mutex<Cache>,
    cache_bytes: usize,
    generations: AtomicU64,
    announce: watch::Sender<u64>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<(u64, u64), Arc<SegIndex>>,
    order: VecDeque<(u64, u64)>,
    bytes: usize,
}

fn log_name(n: u64) -> String {
    format!("{n:06}.log")
}

fn idx_name(n: u64) -> String {
    format!("{n:06}.idx")
}

fn corrupt(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn create_file(path: &Path) -> io::Result<Arc<File>> {
    Ok(Arc::new(
        platform::private::open_options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?,
    ))
}

fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Scans the frames of a segment file up to its end; returns its index, summary and
/// connections, and where the intact frames end.
fn scan_segment(file: &File) -> io::Result<(SegIndex, Summary, Vec<u64>, u64)> {
    let len = file.metadata()?.len();
    let mut summary = Summary::empty();
    let mut index = SegIndex::default();
    let mut at = 0u64;
    while at < len {
        let chunk = (len - at).min(READ_CHUNK as u64) as usize;
        let mut buf = read_at(file, at, chunk)?;
        if let Some((body, _)) = frame::header(&buf) {
            let need = FRAME_HEADER + body;
            if need > buf.len() && (at + need as u64) <= len {
                buf = read_at(file, at, need)?;
            }
        }
        let mut err = None;
        let end = frame::scan(&buf, |off, body| {
            let enc = match frame::blocks_of(body) {
                Ok(e) => e,
                Err(e) => {
                    err.get_or_insert(e);
                    return;
                }
            };
            let packets = frame::decode_body(&Bytes::copy_from_slice(body))
                .map(|f| f.packets)
                .unwrap_or_default();
            let base = at + off as u64;
            let pos = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
            summary.add(pos, &enc, (FRAME_HEADER + body.len()) as u64, &packets);
            index.batches.push((pos, base));
            index.blocks.extend(enc.blocks.iter().map(|b| Block {
                offset: b.offset + base,
                ..*b
            }));
        });
        if err.is_some() || end == 0 {
            break;
        }
        at += end as u64;
    }
    index
        .blocks
        .sort_unstable_by_key(|b| (b.conn, b.first_seq, b.pos));
    let mut conns: Vec<u64> = index.blocks.iter().map(|b| b.conn).collect();
    conns.dedup();
    Ok((index, summary, conns, at))
}

fn encode_idx(summary: &Summary, conns: &[u64], index: &SegIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + conns.len() * 8 + index.bytes());
    out.extend_from_slice(&IDX_MAGIC);
    for v in [
        summary.len,
        summary.first_pos,
        summary.last_pos,
        summary.packets,
        summary.payload,
        summary.max_ts.0 as u64,
        summary.max_ts.1 as u64,
        summary.untimed,
        conns.len() as u64,
        index.batches.len() as u64,
        index.blocks.len() as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for c in conns {
        out.extend_from_slice(&c.to_le_bytes());
    }
    for (p, o) in &index.batches {
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&o.to_le_bytes());
    }
    for b in &index.blocks {
        for v in [b.conn, b.first_seq, b.last_seq, b.pos, b.offset] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&b.len.to_le_bytes());
        out.extend_from_slice(&b.count.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes an index file: summary, connections and (when `full`) the index.
fn decode_idx(bytes: &[u8], full: bool) -> Option<(Summary, Vec<u64>, SegIndex)> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) || body[..4] != IDX_MAGIC {
        return None;
    }
    let mut at = 4;
    let mut next = || -> Option<u64> {
        let v = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
        at += 8;
        Some(v)
    };
    let summary = Summary {
        len: next()?,
        first_pos: next()?,
        last_pos: next()?,
        packets: next()?,
        payload: next()?,
        max_ts: (next()? as i64, next()? as i32),
        untimed: next()?,
    };
    let (nc, nb, nk) = (next()? as usize, next()? as usize, next()? as usize);
    let conns = (0..nc).map(|_| next()).collect::<Option<Vec<_>>>()?;
    let mut index = SegIndex::default();
    if full {
        index.batches = (0..nb)
            .map(|_| Some((next()?, next()?)))
            .collect::<Option<_>>()?;
        for _ in 0..nk {
            let (conn, first_seq, last_seq, pos, offset) =
                (next()?, next()?, next()?, next()?, next()?);
            let lc = next()?;
            index.blocks.push(Block {
                conn,
                first_seq,
                last_seq,
                pos,
                offset,
                len: lc as u32,
                count: (lc >> 32) as u32,
            });
        }
    }
    Some((summary, conns, index))
}

/// Writes `bytes` to `path` through a temporary file renamed over it.
fn write_replacing(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let f = create_file(&tmp)?;
    f.set_len(0)?;
    f.write_all_at(bytes, 0)?;
    if sync {
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The packets of one block read back.
fn read_block(file: &File, b: &Block) -> io::Result<Vec<Packet>> {
    let bytes = Bytes::from(read_at(file, b.offset, b.len as usize)?);
    let mut out = Vec::with_capacity(b.count as usize);
    frame::packets(&bytes, b.count as usize, |p| out.push(p))
        .map_err(|e| corrupt(format!("history block: {e}")))?;
    Ok(out)
}

impl HistoryLog {
    /// Opens (or creates) the log in `dir`; segments numbered below `removed_below` were
    /// removed (their files are deleted now if a crash left them), and positions continue
    /// after `saved_position` at least.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        removed_below: u64,
        saved_position: u64,
        cache_bytes: usize,
    ) -> io::Result<Self> {
        platform::private::create_dir(dir)?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                remove_if_present(&entry.path())?;
            } else if let Some(n) = name
                .strip_suffix(".log")
                .and_then(|n| n.parse::<u64>().ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut closed = BTreeMap::new();
        let mut last_pos = saved_position;
        let newest = numbers.last().copied();
        for &n in &numbers {
            if n < removed_below {
                tracing::info!(segment = n, "deleting a history segment already removed");
                remove_if_present(&dir.join(log_name(n)))?;
                remove_if_present(&dir.join(idx_name(n)))?;
                continue;
            }
            if Some(n) == newest {
                continue;
            }
            let file = create_file(&dir.join(log_name(n)))?;
            let found = std::fs::read(dir.join(idx_name(n)))
                .ok()
                .and_then(|b| decode_idx(&b, false))
                .filter(|(s, _, _)| file.metadata().is_ok_and(|m| m.len() >= s.len));
            let (summary, conns) = match found {
                Some((s, c, _)) => (s, c),
                None => {
                    tracing::info!(segment = n, "rebuilding a history segment's index");
                    let (index, summary, conns, _) = scan_segment(&file)?;
                    write_replacing(
                        &dir.join(idx_name(n)),
                        &encode_idx(&summary, &conns, &index),
                        false,
                    )?;
                    (summary, conns)
                }
            };
            last_pos = last_pos.max(summary.last_pos);
            closed.insert(
                n,
                Arc::new(Closed {
                    n,
                    generation: 0,
                    file,
                    summary,
                    conns,
                }),
            );
        }
        let n = newest
            .filter(|&n| n >= removed_below)
            .unwrap_or(removed_below.max(1));
        let file = create_file(&dir.join(log_name(n)))?;
        let mut open = Open::new(n, file.clone());
        let (index, summary, _, end) = scan_segment(&file)?;
        let on_disk = file.metadata()?.len();
        if end < on_disk {
            tracing::warn!(
                segment = n,
                kept = end,
                cut = on_disk - end,
                "history: cut off a torn or corrupt frame at the end of the log (a write \
                 interrupted by a crash; it was never acknowledged)"
            );
            file.set_len(end)?;
            file.sync_data()?;
        }
        open.summary = summary;
        open.batches = index.batches;
        for b in index.blocks {
            open.blocks.entry(b.conn).or_default().push(b);
        }
        last_pos = last_pos.max(summary.last_pos);
        Ok(Self {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1),
            segments: RwLock::new(Segments { closed, open }),
            writer: Mutex::new(Writer {
                len: end,
                last_pos,
                broken: false,
                buf: Vec::new(),
                last_seq: HashMap::new(),
            }),
            syncing: Mutex::new(file),
            dirty: AtomicBool::new(false),
            cache: Mutex::new(Cache::default()),
            cache_bytes,
            generations: AtomicU64::new(1),
            announce: watch::channel(last_pos).0,
        })
    }

    fn read_segments(&self) -> std::sync::RwLockReadGuard<'_, Segments> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_segments(&self) -> std::sync::RwLockWriteGuard<'_, Segments> {
        self.segments.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last arrival position written.
    pub fn position(&self) -> u64 {
        *self.announce.borrow()
    }

    /// Wakes when a new position is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.announce.subscribe()
    }

    /// Packets in the log.
    pub fn packets(&self) -> u64 {
        let s = self.read_segments();
        s.open.summary.packets + s.closed.values().map(|c| c.summary.packets).sum::<u64>()
    }

    /// Bytes of segment files.
    pub fn total_bytes(&self) -> u64 {
        let s = self.read_segments();
        s.open.summary.len + s.closed.values().map(|c| c.summary.len).sum::<u64>()
    }

    /// Payload bytes (data and original) of the packets in the log.
    pub fn payload_bytes(&self) -> u64 {
        let s = self.read_segments();
        s.open.summary.payload + s.closed.values().map(|c| c.summary.payload).sum::<u64>()
    }

    /// Stores `packets` and logs them with `closed` at the next arrival position: packets
    /// already stored (a replayed batch) are skipped, and `admits(packets, bytes, stored)`
    /// decides whether the fresh ones are kept.
    pub fn record(
        &self,
        packets: Vec<Packet>,
        closed: Vec<Connection>,
        admits: &dyn Fn(u64, u64, u64) -> bool,
    ) -> io::Result<(Recorded, Option<Refused>)> {
        let mut w = self.lock_writer();
        let mut fresh = self.fresh(&mut w, packets)?;
        let mut refused = None;
        let bytes: u64 = fresh
            .iter()
            .map(|p| (p.data.len() + p.original.len()) as u64)
            .sum();
        if !fresh.is_empty() && !admits(fresh.len() as u64, bytes, self.total_bytes()) {
            fresh.clear();
            refused = Some(Refused::Budget);
        }
        if fresh.is_empty() && closed.is_empty() {
            return Ok((Recorded::default(), refused));
        }
        let n_fresh = fresh.len() as u64;
        match self.append(&mut w, &fresh, &closed) {
            Ok(()) => Ok((
                Recorded {
                    packets: n_fresh,
                    bytes,
                    logged: true,
                },
                refused,
            )),
            Err(e) => {
                // The packets' bytes cannot be kept; the closes still go to the log if they can.
                let logged = !closed.is_empty() && self.append(&mut w, &[], &closed).is_ok();
                for p in &fresh {
                    // Not stored after all: a replay may store them.
                    w.last_seq.remove(&p.conn_id);
                }
                Ok((
                    Recorded {
                        packets: 0,
                        bytes: 0,
                        logged,
                    },
                    Some(Refused::Failed(n_fresh, bytes, e)),
                ))
            }
        }
    }

    /// Sorts `packets` by (connection, seq), dropping repeats and packets already stored.
    fn fresh(&self, w: &mut Writer, mut packets: Vec<Packet>) -> io::Result<Vec<Packet>> {
        packets.sort_by_key(|p| (p.conn_id, p.seq));
        packets.dedup_by_key(|p| (p.conn_id, p.seq));
        if w.last_seq.len() >= LAST_SEQ_ENTRIES {
            w.last_seq.clear();
        }
        let mut out = Vec::with_capacity(packets.len());
        let mut i = 0;
        while i < packets.len() {
            let conn = packets[i].conn_id;
            let end = i + packets[i..].partition_point(|p| p.conn_id == conn);
            let group = &packets[i..end];
            let last = match w.last_seq.get(&conn) {
                Some(&s) => s,
                None => self
                    .conn_blocks(conn)?
                    .iter()
                    .map(|(_, b)| b.last_seq)
                    .max()
                    .unwrap_or(0),
            };
            let top = group.last().map_or(0, |p| p.seq);
            if group[0].seq > last {
                out.extend_from_slice(group);
            } else {
                // A replay, or a late packet filling a gap: look at what is stored.
                let stored = self.stored_seqs(conn, group[0].seq, last)?;
                out.extend(group.iter().filter(|p| !stored.contains(&p.seq)).cloned());
            }
            w.last_seq.insert(conn, last.max(top));
            i = end;
        }
        Ok(out)
    }

    fn stored_seqs(&self, conn: u64, from: u64, to: u64) -> io::Result<HashSet<u64>> {
        let mut seqs = HashSet::new();
        for (file, b) in self.conn_blocks(conn)? {
            if b.last_seq < from || b.first_seq > to {
                continue;
            }
            seqs.extend(read_block(&file, &b)?.iter().map(|p| p.seq));
        }
        Ok(seqs)
    }

    /// Writes one frame at the next position, starting a new segment first when the open
    /// one is full.
    fn append(&self, w: &mut Writer, packets: &[Packet], closed: &[Connection]) -> io::Result<()> {
        if w.broken || w.len >= self.segment_bytes {
            self.start_segment(w)?;
        }
        let pos = w.last_pos + 1;
        w.buf.clear();
        let enc = frame::encode(&mut w.buf, pos, packets, closed);
        let file = self.read_segments().open.file.clone();
        if let Err(e) = file.write_all_at(&w.buf, w.len) {
            // Cut off what part of the frame was written, so the segment stays a clean
            // sequence of frames; if even that fails, the next write starts a new segment.
            if file.set_len(w.len).is_err() {
                w.broken = true;
            }
            return Err(e);
        }
        let len = w.buf.len() as u64;
        if w.buf.capacity() > 8 * READ_CHUNK {
            w.buf = Vec::new();
        }
        {
            let mut s = self.write_segments();
            s.open.add(w.len, pos, &enc, len, packets);
        }
        w.len += len;
        w.last_pos = pos;
        self.dirty.store(true, Ordering::Release);
        self.announce.send_replace(pos);
        Ok(())
    }

    /// Closes the open segment (synced, its index written) and starts the next.
    fn start_segment(&self, w: &mut Writer) -> io::Result<()> {
        let (n, file) = {
            let s = self.read_segments();
            (s.open.n, s.open.file.clone())
        };
        if w.len == 0 && !w.broken {
            return Ok(());
        }
        file.sync_data()?;
        let next = create_file(&self.dir.join(log_name(n + 1)))?;
        next.set_len(0)?;
        let (summary, conns, index) = {
            let s = self.read_segments();
            let index = s.open.index();
            let mut conns: Vec<u64> = s.open.blocks.keys().copied().collect();
            conns.sort_unstable();
            let mut summary = s.open.summary;
            summary.len = w.len;
            (summary, conns, index)
        };
        // Not synced: an index lost in a crash is rebuilt from its segment.
        write_replacing(
            &self.dir.join(idx_name(n)),
            &encode_idx(&summary, &conns, &index),
            false,
        )?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = self.write_segments();
            s.closed.insert(
                n,
                Arc::new(Closed {
                    n,
                    generation,
                    file,
                    summary,
                    conns,
                }),
            );
            s.open = Open::new(n + 1, next.clone());
        }
        self.cache_put((n, generation), Arc::new(index));
        *self.syncing.lock().unwrap_or_else(|e| e.into_inner()) = next;
        w.len = 0;
        w.broken = false;
        Ok(())
    }

    /// Whether there are writes a [`HistoryLog::sync`] would make durable.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            let file = self
                .syncing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Err(e) = file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    fn cache_put(&self, key: (u64, u64), index: Arc<SegIndex>) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.map.contains_key(&key) {
            return;
        }
        c.bytes += index.bytes();
        c.map.insert(key, index);
        c.order.push_back(key);
        while c.bytes > self.cache_bytes && c.order.len() > 1 {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(i) = c.map.remove(&old) {
                c.bytes -= i.bytes();
            }
        }
    }

    /// A closed segment's full index, from the cache or its file (rebuilt when it does not
    /// check).
    fn index_of(&self, seg: &Closed) -> io::Result<Arc<SegIndex>> {
        let key = (seg.n, seg.generation);
        if let Some(i) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(&key)
        {
            return Ok(i.clone());
        }
        let index = match std::fs::read(self.dir.join(idx_name(seg.n)))
            .ok()
            .and_then(|b| decode_idx(&b, true))
            .filter(|(s, _, _)| *s == seg.summary)
        {
            Some((_, _, index)) => index,
            None => {
                tracing::info!(segment = seg.n, "rebuilding a history segment's index");
                let (index, summary, conns, _) = scan_segment(&seg.file)?;
                write_replacing(
                    &self.dir.join(idx_name(seg.n)),
                    &encode_idx(&summary, &conns, &index),
                    false,
                )?;
                index
            }
        };
        let index = Arc::new(index);
        self.cache_put(key, index.clone());
        Ok(index)
    }

    fn snapshot(&self) -> Vec<Seg> {
        let s = self.read_segments();
        let mut out: Vec<Seg> = s
            .closed
            .values()
            .map(|c| Seg {
                n: c.n,
                file: c.file.clone(),
                summary: c.summary,
                closed: Some(c.clone()),
            })
            .collect();
        out.push(Seg {
            n: s.open.n,
            file: s.open.file.clone(),
            summary: s.open.summary,
            closed: None,
        });
        out
    }

    /// Every block of `conn`, in segment order, with the file holding it.
    fn conn_blocks(&self, conn: u64) -> io::Result<Vec<(Arc<File>, Block)>> {
        let (closed, open, file) = {
            let s = self.read_segments();
            let closed: Vec<Arc<Closed>> = s
                .closed
                .values()
                .filter(|c| c.conns.binary_search(&conn).is_ok())
                .cloned()
                .collect();
            (
                closed,
                s.open.blocks.get(&conn).cloned().unwrap_or_default(),
                s.open.file.clone(),
            )
        };
        let mut out = Vec::new();
        for c in closed {
            let index = self.index_of(&c)?;
            out.extend(index.of_conn(conn).iter().map(|b| (c.file.clone(), *b)));
        }
        out.extend(open.into_iter().map(|b| (file.clone(), b)));
        Ok(out)
    }

    /// The connections with history from `from` up: the lowest ones, at most about `max`.
    fn conns_from(&self, from: u64, max: usize) -> Vec<u64> {
        let s = self.read_segments();
        let mut bound = u64::MAX;
        let mut out = Vec::new();
        let mut take = |list: &[u64]| {
            let list = &list[list.partition_point(|&c| c < from)..];
            if list.len() > max {
                bound = bound.min(list[max - 1]);
                out.extend_from_slice(&list[..max]);
            } else {
                out.extend_from_slice(list);
            }
        };
        for c in s.closed.values() {
            take(&c.conns);
        }
        let mut open: Vec<u64> = s.open.blocks.keys().copied().collect();
        open.sort_unstable();
        take(&open);
        out.sort_unstable();
        out.dedup();
        out.retain(|&c| c <= bound);
        out
    }

    /// Packets from `(conn, seq)` on in (connection, seq) order (one connection's only when
    /// `only_conn`), recorded at positions up to `upto`, each passed to `f` until it says stop.
    pub fn scan(
        &self,
        start: (u64, u64),
        only_conn: bool,
        upto: u64,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> io::Result<()> {
        let mut from = start.0;
        loop {
            let conns = if only_conn {
                vec![start.0]
            } else {
                self.conns_from(from, 4096)
            };
            let Some(&last) = conns.last() else {
                return Ok(());
            };
            for conn in conns {
                let first = if conn == start.0 { start.1 } else { 0 };
                if !self.scan_conn(conn, first, upto, f)? {
                    return Ok(());
                }
            }
            if only_conn {
                return Ok(());
            }
            let Some(next) = last.checked_add(1) else {
                return Ok(());
            };
            from = next;
        }
    }

    /// One connection's packets from `first` on, in seq order; false when `f` said stop.
    fn scan_conn(
        &self,
        conn: u64,
        first: u64,
        upto: u64,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> io::Result<bool> {
        let mut blocks = self.conn_blocks(conn)?;
        blocks.retain(|(_, b)| b.last_seq >= first && b.pos <= upto);
        blocks.sort_by_key(|(_, b)| (b.first_seq, b.pos));
        // Blocks in seq order overlap only where late packets filled gaps: a packet is
        // passed on once every block that could hold an earlier one has been read.
        let mut pending: BTreeMap<u64, Packet> = BTreeMap::new();
        for i in 0..blocks.len() {
            let (file, b) = &blocks[i];
            for p in read_block(file, b)? {
                if p.seq >= first && p.conn_id == conn {
                    pending.entry(p.seq).or_insert(p);
                }
            }
            let below = blocks.get(i + 1).map_or(u64::MAX, |(_, b)| b.first_seq);
            while let Some(entry) = pending.first_entry() {
                if *entry.key() >= below {
                    break;
                }
                if !f(entry.remove()) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// What was logged after position `after`: each frame's packets (of `conn` only, unless
    /// 0) and closed records with its position, at most `max_entries` frames and about
    /// `max_bytes` of payload; and the last position read.
    pub fn after(
        &self,
        after: u64,
        conn: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> io::Result<(Vec<frame::Frame>, u64)> {
        let mut out = Vec::new();
        let mut last = after;
        let mut bytes = 0usize;
        let open_batches = |n: u64| {
            let s = self.read_segments();
            (s.open.n == n).then(|| s.open.batches.clone())
        };
        for seg in self.snapshot() {
            if seg.summary.last_pos <= after || seg.summary.len == 0 {
                continue;
            }
            let mut offset = match &seg.closed {
                Some(c) if seg.summary.first_pos <= after => {
                    let index = self.index_of(c)?;
                    let i = index.batches.partition_point(|&(p, _)| p <= after);
                    index.batches.get(i).map_or(seg.summary.len, |&(_, o)| o)
                }
                None if seg.summary.first_pos <= after => {
                    let batches = open_batches(seg.n).unwrap_or_default();
                    let i = batches.partition_point(|&(p, _)| p <= after);
                    batches.get(i).map_or(seg.summary.len, |&(_, o)| o)
                }
                _ => 0,
            };
            while offset < seg.summary.len {
                let want = ((seg.summary.len - offset) as usize).min(READ_CHUNK);
                let mut buf = read_at(&seg.file, offset, want)?;
                if let Some((body, _)) = frame::header(&buf)
                    && FRAME_HEADER + body > buf.len()
                {
                    buf = read_at(&seg.file, offset, FRAME_HEADER + body)?;
                }
                let buf = Bytes::from(buf);
                let mut done = false;
                let mut bad = None;
                let end = frame::scan(&buf, |_, body| {
                    if done {
                        return;
                    }
                    match frame::decode_body(&Bytes::copy_from_slice(body)) {
                        Ok(mut fr) => {
                            if conn != 0 {
                                fr.packets.retain(|p| p.conn_id == conn);
                                fr.closed.retain(|c| c.id == conn);
                            }
                            bytes += fr
                                .packets
                                .iter()
                                .map(|p| p.data.len() + p.original.len())
                                .sum::<usize>();
                            last = fr.pos;
                            out.push(fr);
                            done = out.len() >= max_entries || bytes >= max_bytes;
                        }
                        Err(e) => {
                            bad.get_or_insert(e);
                        }
                    }
                });
                if let Some(e) = bad {
                    return Err(corrupt(format!("history segment {}: {e}", seg.n)));
                }
                if done {
                    return Ok((out, last));
                }
                if end == 0 {
                    return Err(corrupt(format!(
                        "history segment {}: no frame at offset {offset}",
                        seg.n
                    )));
                }
                offset += end as u64;
            }
        }
        Ok((out, last))
    }

    /// The oldest closed segment: its number and summary.
    pub fn oldest_closed(&self) -> Option<(u64, Summary)> {
        let s = self.read_segments();
        s.closed.values().next().map(|c| (c.n, c.summary))
    }

    /// The numbers of every segment, the open one last.
    pub fn numbers(&self) -> Vec<u64> {
        self.snapshot().iter().map(|s| s.n).collect()
    }

    /// Deletes closed segment `n` (a crash before the files go leaves them to the next
    /// open, which deletes segments below the saved `removed_below`).
    pub fn remove(&self, n: u64) -> io::Result<()> {
        let removed = self.write_segments().closed.remove(&n);
        if removed.is_some() {
            remove_if_present(&self.dir.join(log_name(n)))?;
            remove_if_present(&self.dir.join(idx_name(n)))?;
        }
        Ok(())
    }

    /// Closes the open segment, if it holds anything, so that every frame is in a closed one.
    pub fn close_open(&self) -> io::Result<()> {
        let mut w = self.lock_writer();
        self.start_segment(&mut w)
    }

    /// Forgets what is known of `conn`'s stored seqs (it closed; late packets look it up).
    pub fn forget(&self, conn: u64) {
        self.lock_writer().last_seq.remove(&conn);
    }

    /// Holds off writes while a purge runs; see [`HistoryLog::purge`].
    pub fn purge(
        &self,
        gone: &dyn Fn(&Packet) -> bool,
        all: bool,
        keeps_none: &dyn Fn(&Summary, &[u64]) -> bool,
    ) -> io::Result<Purging> {
        let mut w = self.lock_writer();
        self.start_segment(&mut w)?;
        w.last_seq.clear();
        let mut out = Purging::default();
        let closed: Vec<Arc<Closed>> = self.read_segments().closed.values().cloned().collect();
        for c in closed {
            if all || keeps_none(&c.summary, &c.conns) {
                out.packets += c.summary.packets;
                out.bytes += c.summary.payload;
                out.freed += c.summary.len;
                out.emptied.push(c.n);
                continue;
            }
            // Which packets go? Read the segment's frames and write the kept ones anew.
            let (frames, _) = self.frames_of(&c)?;
            let mut kept = Vec::new();
            let (mut packets, mut bytes) = (0, 0);
            let mut rewritten = Vec::new();
            for mut fr in frames {
                let before = fr.packets.len();
                fr.packets.retain(|p| {
                    let g = gone(p);
                    if g {
                        packets += 1;
                        bytes += (p.data.len() + p.original.len()) as u64;
                    }
                    !g
                });
                if fr.packets.len() != before || !fr.packets.is_empty() || !fr.closed.is_empty() {
                    kept.push(fr);
                }
            }
            if packets == 0 {
                continue;
            }
            out.packets += packets;
            out.bytes += bytes;
            let mut summary = Summary::empty();
            let mut index = SegIndex::default();
            for fr in kept
                .iter()
                .filter(|f| !f.packets.is_empty() || !f.closed.is_empty())
            {
                let at = rewritten.len() as u64;
                let enc = frame::encode(&mut rewritten, fr.pos, &fr.packets, &fr.closed);
                summary.add(fr.pos, &enc, rewritten.len() as u64 - at, &fr.packets);
                index.batches.push((fr.pos, at));
                index.blocks.extend(enc.blocks.iter().map(|b| Block {
                    offset: b.offset + at,
                    ..*b
                }));
            }
            if summary.packets == 0 {
                out.freed += c.summary.len;
                out.emptied.push(c.n);
                continue;
            }
            index
                .blocks
                .sort_unstable_by_key(|b| (b.conn, b.first_seq, b.pos));
            let mut conns: Vec<u64> = index.blocks.iter().map(|b| b.conn).collect();
            conns.dedup();
            // The old index goes first: a crash between the renames leaves a segment
            // whose index is rebuilt at open, never one that does not match.
            remove_if_present(&self.dir.join(idx_name(c.n)))?;
            write_replacing(&self.dir.join(log_name(c.n)), &rewritten, true)?;
            write_replacing(
                &self.dir.join(idx_name(c.n)),
                &encode_idx(&summary, &conns, &index),
                false,
            )?;
            let file = create_file(&self.dir.join(log_name(c.n)))?;
            out.freed += c.summary.len - summary.len;
            let generation = self.generations.fetch_add(1, Ordering::Relaxed);
            self.write_segments().closed.insert(
                c.n,
                Arc::new(Closed {
                    n: c.n,
                    generation,
                    file,
                    summary,
                    conns,
                }),
            );
        }
        out.last_pos = w.last_pos;
        Ok(out)
    }

    /// Every frame of a closed segment.
    fn frames_of(&self, c: &Closed) -> io::Result<(Vec<frame::Frame>, u64)> {
        let bytes = Bytes::from(read_at(&c.file, 0, c.summary.len as usize)?);
        let mut frames = Vec::new();
        let mut bad = None;
        let end = frame::scan(&bytes, |_, body| {
            match frame::decode_body(&Bytes::copy_from_slice(body)) {
                Ok(f) => frames.push(f),
                Err(e) => {
                    bad.get_or_insert(e);
                }
            }
        });
        if let Some(e) = bad {
            return Err(corrupt(format!("history segment {}: {e}", c.n)));
        }
        Ok((frames, end as u64))
    }
}

/// What a purge found: what it takes out, and the segments left empty (to be deleted once
/// the counts are durable).
#[derive(Debug, Default)]
pub struct Purging {
    pub packets: u64,
    pub bytes: u64,
    pub freed: u64,
    pub emptied: Vec<u64>,
    pub last_pos: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(conn_id: u64, seq: u64) -> Packet {
        Packet {
            conn_id,
            seq,
            data: Bytes::from(format!("{conn_id}/{seq}")),
            ..Default::default()
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> HistoryLog {
        HistoryLog::open(dir, segment_bytes, 0, 0, INDEX_CACHE_BYTES).unwrap()
    }

    fn all(log: &HistoryLog) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        log.scan((0, 0), false, u64::MAX, &mut |p| {
            assert_eq!(p.data, format!("{}/{}", p.conn_id, p.seq).as_bytes());
            got.push((p.conn_id, p.seq));
            true
        })
        .unwrap();
        got
    }

    #[test]
    fn reads_cross_segments_and_survive_reopening_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let yes = |_, _, _| true;
        {
            let log = open(dir.path(), 200);
            for seq in 1..=20 {
                log.record(vec![pkt(1, seq), pkt(2, seq)], vec![], &yes)
                    .unwrap();
            }
            log.sync().unwrap();
            assert!(log.numbers().len() > 3);
            assert_eq!(log.packets(), 40);
            assert_eq!(log.position(), 20);
        }
        let newest = *open(dir.path(), 200).numbers().last().unwrap();
        let path = dir.path().join(log_name(newest));
        let len = std::fs::metadata(&path).unwrap().len();
        // A torn frame written by hand after the last good one.
        let mut torn = Vec::new();
        frame::encode(&mut torn, 21, &[pkt(1, 21)], &[]);
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&torn[..torn.len() - 3], len).unwrap();
        drop(f);
        // And a lost index: rebuilt.
        std::fs::remove_file(dir.path().join(idx_name(1))).unwrap();
        let log = open(dir.path(), 200);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len,
            "torn frame cut"
        );
        let want: Vec<(u64, u64)> = (1..=2)
            .flat_map(|c| (1..=20).map(move |s| (c, s)))
            .collect();
        assert_eq!(all(&log), want);
        assert_eq!(log.position(), 20);
        // Replays are not stored twice; new packets continue.
        log.record(vec![pkt(1, 20), pkt(1, 21)], vec![], &yes)
            .unwrap();
        assert_eq!(log.packets(), 41);
        let mut one = Vec::new();
        log.scan((1, 19), true, u64::MAX, &mut |p| {
            one.push(p.seq);
            true
        })
        .unwrap();
        assert_eq!(one, [19, 20, 21]);
        let (frames, last) = log.after(19, 0, 100, 1 << 20).unwrap();
        assert_eq!(last, 21);
        assert_eq!(frames.iter().map(|f| f.pos).collect::<Vec<_>>(), [20, 21]);
    }
}
