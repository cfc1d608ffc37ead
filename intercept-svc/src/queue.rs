//! The held-packet queue as a plain state machine, without I/O: the configuration, the packets
//! waiting for a verdict (oldest first) and the connections the registry reported closed.
//!
//! Each held packet carries a waiter `W` (in the service, the sender of the proxy's pending
//! `Hold` answer; in tests, `()`). Operations that decide a packet return its waiter with the
//! verdict, and every change a watcher must see is appended to [`Queue::take_events`].
//!
//! Bounds: packets waiting for a verdict are limited by count (`max_held`) and by payload
//! bytes (`max_held_bytes`), and one packet by [`MAX_HELD_PACKET`]. A packet whose proxy
//! stopped waiting is *abandoned*: its bytes are let go, it stops counting against those
//! limits, and it leaves after [`ABANDONED_EXPIRY`] (or the hold timeout, when shorter; see
//! [`Queue::expire`]); at most `max_held` abandoned packets stay listed. The replace rules and
//! the whole configuration are bounded too ([`MAX_RULE_BYTES`], [`MAX_RULES`],
//! [`MAX_CONFIG_BYTES`]).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use bytes::Bytes;
use proto::{
    common::{ClosedBy, ConnStatus, Packet},
    intercept::{
        HeldEvent, HeldPacket, InterceptConfig, InterceptStatus, ReplaceRule, Verdict,
        held_event::Kind,
        verdict::{Action, Reason},
    },
    names::name_of,
};

/// Default for the most packets that may wait at once.
pub const DEFAULT_MAX_HELD: usize = 1_000;
/// Default for the most payload bytes that may wait at once (256 MiB).
pub const DEFAULT_MAX_HELD_BYTES: u64 = 256 << 20;
/// The largest replacement a `Forward` may carry (4 MiB).
pub const MAX_REPLACEMENT: usize = 4 << 20;
/// The largest packet a `Hold` may hold (4 MiB); a larger one is forwarded at once with
/// [`Reason::TooLarge`].
pub const MAX_HELD_PACKET: usize = 4 << 20;
/// The largest pattern, and the largest replacement, of one replace rule (1 MiB).
pub const MAX_RULE_BYTES: usize = 1 << 20;
/// The most replace rules at once.
pub const MAX_RULES: usize = 256;
/// The largest configuration, rules included, encoded (4 MiB): half the largest message the
/// service sends, so `GetConfig` and `WatchConfig` always fit.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// How long an abandoned packet stays listed at most (see the module documentation).
pub const ABANDONED_EXPIRY: Duration = Duration::from_secs(30);
/// Most packets in one `ListHeld` page, and the number a page size of 0 means.
pub const MAX_PAGE: usize = 1_000;
/// The page size a `ListHeld` of page size 0 gets.
pub const DEFAULT_PAGE: usize = 100;
/// A `ListHeld` page ends before this many packet bytes (it always holds one packet, at most
/// [`MAX_HELD_PACKET`]), so every page fits in the service's largest message.
pub const PAGE_BYTES: usize = 6 << 20;

/// Why a user's action on a held packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// Zero is never a held ID.
    #[error("held packet ID must be non-zero")]
    ZeroId,
    /// Nothing waits under that ID.
    #[error("no held packet with ID {0} (already forwarded, dropped or timed out, or never held)")]
    NotFound(u64),
    /// The replacement exceeds [`MAX_REPLACEMENT`].
    #[error("replacement of {0} bytes is larger than the limit of {MAX_REPLACEMENT} bytes")]
    TooLarge(usize),
    /// The packet's connection has ended; the packet left the queue.
    #[error(
        "connection {conn_id} was closed by the {closed_by}{reason}: held packet {held_id} \
         can no longer be forwarded or dropped and has left the queue"
    )]
    Closed {
        held_id: u64,
        conn_id: u64,
        closed_by: &'static str,
        reason: String,
    },
    /// The proxy stopped waiting for the packet (its connection ended, or the proxy went
    /// away) before the registry said how the connection ended; the packet left the queue.
    #[error(
        "the proxy no longer waits for held packet {held_id}: connection {conn_id} ended or \
         its proxy went away; the packet has left the queue"
    )]
    Abandoned { held_id: u64, conn_id: u64 },
    /// A rule with an empty pattern would match everywhere.
    #[error("a replace rule needs a non-empty pattern")]
    EmptyPattern,
    /// A rule's pattern or replacement exceeds [`MAX_RULE_BYTES`].
    #[error(
        "a replace rule's {what} of {len} bytes is larger than the limit of {MAX_RULE_BYTES} \
         bytes (1 MiB)"
    )]
    RuleTooLarge { what: &'static str, len: usize },
    /// There are [`MAX_RULES`] rules already.
    #[error("there are already {MAX_RULES} replace rules, the limit: remove one first")]
    TooManyRules,
    /// The configuration would exceed [`MAX_CONFIG_BYTES`].
    #[error(
        "the intercept configuration would take {0} bytes, more than the limit of \
         {MAX_CONFIG_BYTES} bytes (4 MiB)"
    )]
    ConfigTooLarge(usize),
    /// A `ListHeld` page token this service did not give out.
    #[error("page token {0:?} is not one this service gave out: start again without one")]
    BadPageToken(String),
    /// No rule under that ID.
    #[error("no replace rule with ID {0}")]
    NoRule(u64),
}

/// A refused user action, with the packet to release when the refusal removed it (its
/// connection has closed: the proxy is told not to relay it). Boxed: refusals are rare, and
/// keep the `Result`s of every user action small.
#[derive(Debug)]
pub struct Refused<W> {
    pub error: QueueError,
    pub release: Option<Box<(W, Verdict)>>,
}

impl<W> From<QueueError> for Refused<W> {
    fn from(error: QueueError) -> Self {
        Self {
            error,
            release: None,
        }
    }
}

/// How a registry record ended, as far as held packets care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub closed_by: ClosedBy,
    pub reason: String,
}

/// What a `Hold` request gets: a place in the queue, or an answer at once.
#[derive(Debug, PartialEq)]
pub enum HoldOutcome {
    /// Held under this ID; the waiter gets the verdict later.
    Held(u64),
    /// Not held: forward now (intercept off, or the queue is full).
    Immediate(Verdict),
}

struct Entry<W> {
    held: HeldPacket,
    /// The proxy's pending answer; `None` once the proxy stopped waiting (the packet stays
    /// listed, abandoned, so that its connection's end can be seen; see [`Queue::cancel`]).
    waiter: Option<W>,
}

/// The queue and its configuration. See the module documentation.
pub struct Queue<W> {
    config: InterceptConfig,
    max_held: usize,
    max_held_bytes: u64,
    next_held_id: u64,
    next_rule_id: u64,
    held: BTreeMap<u64, Entry<W>>,
    /// Packets in `held` still waiting (not abandoned), and their payload bytes.
    waiting: usize,
    held_bytes: u64,
    /// Abandoned packets by the time they were abandoned, oldest first (IDs may have left
    /// `held` since: a user's action removes them).
    abandoned: VecDeque<(u64, Instant)>,
    ended: HashMap<u64, Ended>,
    events: Vec<HeldEvent>,
    overflow_forwarded: u64,
    too_large_forwarded: u64,
    timed_out: u64,
    released_by_off: u64,
    abandoned_expired: u64,
}

/// A verdict that forwards the packet as it is.
pub fn forward_as_is(why: Reason) -> Verdict {
    Verdict::because(Action::Forward, why)
}

impl<W> Queue<W> {
    /// An empty queue with intercept off that holds at most `max_held` packets and
    /// `max_held_bytes` of payload.
    pub fn new(max_held: usize, max_held_bytes: u64) -> Self {
        Self {
            config: InterceptConfig::default(),
            max_held,
            max_held_bytes,
            next_held_id: 1,
            next_rule_id: 1,
            held: BTreeMap::new(),
            waiting: 0,
            held_bytes: 0,
            abandoned: VecDeque::new(),
            ended: HashMap::new(),
            events: Vec::new(),
            overflow_forwarded: 0,
            too_large_forwarded: 0,
            timed_out: 0,
            released_by_off: 0,
            abandoned_expired: 0,
        }
    }

    /// The configuration proxies follow.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// Replaces the configuration (keeping the rules). Turning intercept off releases every
    /// held packet, oldest first: the returned waiters get a forward as is. A configuration
    /// beyond [`MAX_CONFIG_BYTES`] is refused and nothing changes.
    pub fn set_config(
        &mut self,
        mut config: InterceptConfig,
    ) -> Result<Vec<(W, Verdict)>, QueueError> {
        config.rules = std::mem::take(&mut self.config.rules);
        let len = prost::Message::encoded_len(&config);
        if len > MAX_CONFIG_BYTES {
            self.config.rules = config.rules;
            return Err(QueueError::ConfigTooLarge(len));
        }
        self.config = config;
        if self.config.enabled {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = self.held.keys().copied().collect();
        let released: Vec<(W, Verdict)> = ids
            .into_iter()
            .filter_map(|id| self.remove(id).flatten())
            .map(|w| (w, forward_as_is(Reason::InterceptOff)))
            .collect();
        self.released_by_off += released.len() as u64;
        Ok(released)
    }

    /// Adds a replace rule under a new ID, within the limits on rules and configuration.
    pub fn add_rule(&mut self, mut rule: ReplaceRule) -> Result<ReplaceRule, QueueError> {
        if rule.pattern.is_empty() {
            return Err(QueueError::EmptyPattern);
        }
        for (what, len) in [
            ("pattern", rule.pattern.len()),
            ("replacement", rule.replacement.len()),
        ] {
            if len > MAX_RULE_BYTES {
                return Err(QueueError::RuleTooLarge { what, len });
            }
        }
        if self.config.rules.len() >= MAX_RULES {
            return Err(QueueError::TooManyRules);
        }
        rule.id = self.next_rule_id;
        let len = prost::Message::encoded_len(&self.config)
            + prost::encoding::message::encoded_len(9, &rule);
        if len > MAX_CONFIG_BYTES {
            return Err(QueueError::ConfigTooLarge(len));
        }
        self.next_rule_id += 1;
        self.config.rules.push(rule.clone());
        Ok(rule)
    }

    /// Removes a replace rule.
    pub fn remove_rule(&mut self, id: u64) -> Result<(), QueueError> {
        let before = self.config.rules.len();
        self.config.rules.retain(|r| r.id != id);
        if self.config.rules.len() == before {
            return Err(QueueError::NoRule(id));
        }
        Ok(())
    }

    /// A proxy asks to hold `packet`.
    pub fn hold(
        &mut self,
        node: String,
        packet: Packet,
        dst_host: String,
        dst_port: u32,
        waiter: W,
    ) -> (HoldOutcome, Option<W>) {
        if !self.config.enabled {
            return (
                HoldOutcome::Immediate(forward_as_is(Reason::InterceptOff)),
                Some(waiter),
            );
        }
        let len = packet.data.len();
        if len > MAX_HELD_PACKET {
            self.too_large_forwarded += 1;
            return (
                HoldOutcome::Immediate(forward_as_is(Reason::TooLarge)),
                Some(waiter),
            );
        }
        if self.waiting >= self.max_held || self.held_bytes + len as u64 > self.max_held_bytes {
            self.overflow_forwarded += 1;
            return (
                HoldOutcome::Immediate(forward_as_is(Reason::QueueFull)),
                Some(waiter),
            );
        }
        let held_id = self.next_held_id;
        self.next_held_id += 1;
        self.waiting += 1;
        self.held_bytes += len as u64;
        let mut held = HeldPacket {
            held_id,
            node,
            dst_host,
            dst_port,
            conn_status: ConnStatus::Active as i32,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            ..Default::default()
        };
        if let Some(end) = self.ended.get(&packet.conn_id) {
            mark_ended(&mut held, end);
        }
        held.packet = Some(packet);
        self.push_event(Kind::Added, Some(held.clone()), held_id);
        self.held.insert(
            held_id,
            Entry {
                held,
                waiter: Some(waiter),
            },
        );
        (HoldOutcome::Held(held_id), None)
    }

    /// The held packets, oldest first.
    pub fn list(&self) -> Vec<HeldPacket> {
        self.held.values().map(|e| e.held.clone()).collect()
    }

    /// One page of the held packets, oldest first: at most `size` (0 means
    /// [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) after the one `token` names, ending before
    /// [`PAGE_BYTES`] of packet bytes, without the bytes when `omit_data`. Returns the page
    /// and the token of the next one (empty after the last).
    pub fn page(
        &self,
        size: usize,
        token: &str,
        omit_data: bool,
    ) -> Result<(Vec<HeldPacket>, String), QueueError> {
        let after = match token {
            "" => 0,
            t => t
                .parse::<u64>()
                .map_err(|_| QueueError::BadPageToken(t.to_string()))?,
        };
        let size = match size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let mut page: Vec<HeldPacket> = Vec::new();
        let mut bytes = 0usize;
        for (id, e) in self.held.range(after.saturating_add(1)..) {
            let len = if omit_data { 0 } else { data_len(&e.held) };
            if page.len() == size || (!page.is_empty() && bytes + len > PAGE_BYTES) {
                let last = page.last().map_or(*id, |h| h.held_id);
                return Ok((page, last.to_string()));
            }
            bytes += len;
            let mut h = e.held.clone();
            if omit_data && let Some(p) = &mut h.packet {
                p.data = Bytes::new();
            }
            page.push(h);
        }
        Ok((page, String::new()))
    }

    /// The held packet `held_id`, with its bytes.
    pub fn get(&self, held_id: u64) -> Result<HeldPacket, QueueError> {
        if held_id == 0 {
            return Err(QueueError::ZeroId);
        }
        self.held
            .get(&held_id)
            .map(|e| e.held.clone())
            .ok_or(QueueError::NotFound(held_id))
    }

    /// A user forwards a held packet, optionally with replacement bytes.
    pub fn forward(
        &mut self,
        held_id: u64,
        replacement: Option<Bytes>,
    ) -> Result<(W, Verdict), Refused<W>> {
        if let Some(r) = &replacement
            && r.len() > MAX_REPLACEMENT
        {
            return Err(QueueError::TooLarge(r.len()).into());
        }
        let waiter = self.take_open(held_id)?;
        let verdict = match replacement {
            Some(data) => Verdict {
                replaced: true,
                data,
                ..forward_as_is(Reason::User)
            },
            None => forward_as_is(Reason::User),
        };
        Ok((waiter, verdict))
    }

    /// A user drops a held packet.
    pub fn drop_packet(&mut self, held_id: u64) -> Result<(W, Verdict), Refused<W>> {
        let waiter = self.take_open(held_id)?;
        Ok((waiter, verdict(Action::Drop, Reason::User)))
    }

    /// The packet's hold timeout passed: forward it as is (if it is still waiting).
    pub fn time_out(&mut self, held_id: u64) -> Option<(W, Verdict)> {
        let waiter = self.remove(held_id).flatten()?;
        self.timed_out += 1;
        Some((waiter, forward_as_is(Reason::Timeout)))
    }

    /// The proxy stopped waiting (its call was cancelled, e.g. because the connection ended
    /// while the packet was held) at `now`: the packet stays listed, abandoned, so that the
    /// user sees how its connection ended, until a user acts on it (refused, and removed),
    /// intercept is turned off, or it expires ([`Queue::expire`]). Its bytes are let go and
    /// it stops counting against the limits. Returns the waiter if it was still there.
    pub fn cancel(&mut self, held_id: u64, now: Instant) -> Option<W> {
        let e = self.held.get_mut(&held_id)?;
        let waiter = e.waiter.take()?;
        self.waiting -= 1;
        self.held_bytes -= data_len(&e.held) as u64;
        e.held.abandoned = true;
        if let Some(p) = &mut e.held.packet {
            p.data = Bytes::new();
        }
        let h = e.held.clone();
        self.push_event(Kind::Updated, Some(h), held_id);
        self.abandoned.push_back((held_id, now));
        // At most `max_held` abandoned packets stay listed: the oldest leave first.
        while self.held.len() - self.waiting > self.max_held {
            let Some((id, _)) = self.abandoned.pop_front() else {
                break;
            };
            self.expire_one(id);
        }
        Some(waiter)
    }

    /// Removes the abandoned packets that have been listed for [`ABANDONED_EXPIRY`] (or the
    /// configured hold timeout, when that is shorter) at `now`; returns how many left.
    pub fn expire(&mut self, now: Instant) -> usize {
        let timeout = Duration::from_secs(u64::from(self.config.hold_timeout_secs));
        let ttl = match timeout.is_zero() {
            true => ABANDONED_EXPIRY,
            false => timeout.min(ABANDONED_EXPIRY),
        };
        let mut n = 0;
        while let Some(&(id, at)) = self.abandoned.front() {
            if now.saturating_duration_since(at) < ttl {
                break;
            }
            self.abandoned.pop_front();
            n += usize::from(self.expire_one(id));
        }
        n
    }

    /// Removes `held_id` if it is still listed and abandoned; whether it was.
    fn expire_one(&mut self, held_id: u64) -> bool {
        if self.held.get(&held_id).is_none_or(|e| e.waiter.is_some()) {
            return false;
        }
        self.remove(held_id);
        self.abandoned_expired += 1;
        true
    }

    /// The registry reports a connection ended: its held packets show it.
    pub fn conn_ended(&mut self, conn_id: u64, end: Ended) {
        let mut updated = Vec::new();
        for e in self.held.values_mut() {
            if conn_of(&e.held) == conn_id {
                mark_ended(&mut e.held, &end);
                updated.push(e.held.clone());
            }
        }
        for h in updated {
            let id = h.held_id;
            self.push_event(Kind::Updated, Some(h), id);
        }
        self.ended.insert(conn_id, end);
    }

    /// The registry no longer has a record for `conn_id` (cleared): nothing is known about
    /// how it ended, so its held packets keep their status.
    pub fn conn_forgotten(&mut self, conn_id: u64) {
        self.ended.remove(&conn_id);
    }

    /// A fresh view of every ended connection (after a registry snapshot): held packets
    /// whose connection is now known to have ended are updated.
    pub fn replace_ended(&mut self, ended: HashMap<u64, Ended>) {
        for (id, end) in &ended {
            if self.ended.get(id) != Some(end) {
                self.conn_ended(*id, end.clone());
            }
        }
        self.ended = ended;
    }

    /// The events since the last call, in order.
    pub fn take_events(&mut self) -> Vec<HeldEvent> {
        std::mem::take(&mut self.events)
    }

    /// The configuration, size and counters (`registry_connected` is the caller's to set).
    pub fn status(&self) -> InterceptStatus {
        InterceptStatus {
            config: Some(self.config.clone()),
            held: u32::try_from(self.waiting).unwrap_or(u32::MAX),
            max_held: u32::try_from(self.max_held).unwrap_or(u32::MAX),
            overflow_forwarded: self.overflow_forwarded,
            timed_out: self.timed_out,
            released_by_off: self.released_by_off,
            registry_connected: false,
            held_bytes: self.held_bytes,
            max_held_bytes: self.max_held_bytes,
            too_large_forwarded: self.too_large_forwarded,
            abandoned: u32::try_from(self.held.len() - self.waiting).unwrap_or(u32::MAX),
            abandoned_expired: self.abandoned_expired,
        }
    }

    /// Removes a packet a user acts on, unless its connection has ended (then it is removed
    /// all the same, and the error names who closed the connection).
    fn take_open(&mut self, held_id: u64) -> Result<W, Refused<W>> {
        if held_id == 0 {
            return Err(QueueError::ZeroId.into());
        }
        let entry = self
            .held
            .get(&held_id)
            .ok_or(QueueError::NotFound(held_id))?;
        if entry.held.conn_status == ConnStatus::Disconnected as i32 {
            let err = QueueError::Closed {
                held_id,
                conn_id: conn_of(&entry.held),
                closed_by: name_of::<ClosedBy>(entry.held.closed_by).unwrap_or("unknown side"),
                reason: match entry.held.close_reason.as_str() {
                    "" => String::new(),
                    r => format!(" ({r})"),
                },
            };
            let release = self
                .remove(held_id)
                .flatten()
                .map(|w| Box::new((w, verdict(Action::Drop, Reason::ConnectionClosed))));
            return Err(Refused {
                error: err,
                release,
            });
        }
        let conn_id = conn_of(&entry.held);
        match self.remove(held_id) {
            Some(Some(w)) => Ok(w),
            Some(None) => Err(QueueError::Abandoned { held_id, conn_id }.into()),
            None => Err(QueueError::NotFound(held_id).into()),
        }
    }

    /// Removes a packet: `None` if there was none, else its waiter if the proxy still waits.
    fn remove(&mut self, held_id: u64) -> Option<Option<W>> {
        let entry = self.held.remove(&held_id)?;
        if entry.waiter.is_some() {
            self.waiting -= 1;
            self.held_bytes -= data_len(&entry.held) as u64;
        }
        self.push_event(Kind::Removed, None, held_id);
        Some(entry.waiter)
    }

    fn push_event(&mut self, kind: Kind, held: Option<HeldPacket>, held_id: u64) {
        self.events.push(HeldEvent {
            kind: kind as i32,
            held,
            held_id,
        });
    }
}

/// A verdict without replacement bytes.
fn verdict(action: Action, why: Reason) -> Verdict {
    Verdict::because(action, why)
}

fn conn_of(h: &HeldPacket) -> u64 {
    h.packet.as_ref().map_or(0, |p| p.conn_id)
}

/// The packet bytes a held packet keeps (none once abandoned).
fn data_len(h: &HeldPacket) -> usize {
    h.packet.as_ref().map_or(0, |p| p.data.len())
}

fn mark_ended(h: &mut HeldPacket, end: &Ended) {
    h.conn_status = ConnStatus::Disconnected as i32;
    h.closed_by = end.closed_by as i32;
    h.close_reason.clone_from(&end.reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::common::Direction;

    fn on() -> InterceptConfig {
        InterceptConfig {
            enabled: true,
            ..Default::default()
        }
    }

    fn packet(conn_id: u64, data: &[u8]) -> Packet {
        Packet {
            conn_id,
            seq: 1,
            direction: Direction::C2s as i32,
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }
    }

    fn hold(q: &mut Queue<u32>, conn_id: u64, waiter: u32) -> HoldOutcome {
        q.hold("n".into(), packet(conn_id, b"x"), "h".into(), 1, waiter)
            .0
    }

    fn kinds(q: &mut Queue<u32>) -> Vec<(Kind, u64)> {
        q.take_events()
            .into_iter()
            .map(|e| (e.kind(), e.held_id))
            .collect()
    }

    #[test]
    fn off_answers_at_once_and_on_holds_with_fresh_ids() {
        let mut q = Queue::new(10, 1 << 30);
        let (out, w) = q.hold("n".into(), packet(1, b"a"), "h".into(), 1, 7u32);
        assert_eq!(
            out,
            HoldOutcome::Immediate(forward_as_is(Reason::InterceptOff))
        );
        assert_eq!(w, Some(7));
        q.set_config(on()).unwrap();
        assert_eq!(hold(&mut q, 1, 1), HoldOutcome::Held(1));
        assert_eq!(hold(&mut q, 1, 2), HoldOutcome::Held(2));
        let (w, v) = q.forward(1, None).unwrap();
        assert_eq!((w, v), (1, forward_as_is(Reason::User)));
        // IDs are never reused, even after the queue empties.
        q.forward(2, None).unwrap();
        assert_eq!(hold(&mut q, 1, 3), HoldOutcome::Held(3));
        assert_eq!(
            kinds(&mut q),
            [
                (Kind::Added, 1),
                (Kind::Added, 2),
                (Kind::Removed, 1),
                (Kind::Removed, 2),
                (Kind::Added, 3)
            ]
        );
    }

    #[test]
    fn forward_replaced_drop_and_errors() {
        let mut q = Queue::new(10, 1 << 30);
        q.set_config(on()).unwrap();
        hold(&mut q, 1, 1);
        hold(&mut q, 1, 2);
        assert_eq!(q.forward(0, None).unwrap_err().error, QueueError::ZeroId);
        assert_eq!(
            q.forward(9, None).unwrap_err().error,
            QueueError::NotFound(9)
        );
        let big = Bytes::from(vec![0; MAX_REPLACEMENT + 1]);
        assert_eq!(
            q.forward(1, Some(big)).unwrap_err().error,
            QueueError::TooLarge(MAX_REPLACEMENT + 1)
        );
        let (_, v) = q.forward(1, Some(Bytes::from_static(b"a\0b"))).unwrap();
        assert!(v.replaced);
        assert_eq!(v.data, &b"a\0b"[..]);
        let (_, v) = q.drop_packet(2).unwrap();
        assert_eq!(v.action(), Action::Drop);
        assert_eq!(q.drop_packet(2).unwrap_err().error, QueueError::NotFound(2));
    }

    #[test]
    fn turning_off_releases_in_order_and_keeps_rules() {
        let mut q = Queue::new(10, 1 << 30);
        q.set_config(on()).unwrap();
        q.add_rule(ReplaceRule {
            pattern: b"a".to_vec(),
            ..Default::default()
        })
        .unwrap();
        for w in 1..=3 {
            hold(&mut q, 1, w);
        }
        let released = q.set_config(InterceptConfig::default()).unwrap();
        let waiters: Vec<u32> = released.iter().map(|(w, _)| *w).collect();
        assert_eq!(waiters, [1, 2, 3]);
        assert!(
            released
                .iter()
                .all(|(_, v)| *v == forward_as_is(Reason::InterceptOff))
        );
        assert!(q.list().is_empty());
        assert_eq!(q.config().rules.len(), 1);
        assert_eq!(q.status().released_by_off, 3);
    }

    #[test]
    fn a_full_queue_forwards_and_counts() {
        let mut q = Queue::new(2, 1 << 30);
        q.set_config(on()).unwrap();
        hold(&mut q, 1, 1);
        hold(&mut q, 1, 2);
        assert_eq!(
            hold(&mut q, 1, 3),
            HoldOutcome::Immediate(forward_as_is(Reason::QueueFull))
        );
        assert_eq!(q.status().overflow_forwarded, 1);
        assert_eq!(q.status().held, 2);
    }

    #[test]
    fn a_closed_connection_updates_and_refuses_with_who_closed_it() {
        let mut q = Queue::new(10, 1 << 30);
        q.set_config(on()).unwrap();
        hold(&mut q, 5, 1);
        hold(&mut q, 6, 2);
        q.take_events();
        q.conn_ended(
            5,
            Ended {
                closed_by: ClosedBy::Server,
                reason: "server sent FIN".into(),
            },
        );
        assert_eq!(kinds(&mut q), [(Kind::Updated, 1)]);
        let l = q.list();
        assert_eq!(l[0].conn_status(), ConnStatus::Disconnected);
        assert_eq!(l[0].closed_by(), ClosedBy::Server);
        assert_eq!(l[1].conn_status(), ConnStatus::Active);
        let refused = q.forward(1, None).unwrap_err();
        let err = refused.error.to_string();
        assert!(
            err.contains("connection 5 was closed by the server (server sent FIN)"),
            "{err}"
        );
        let (w, v) = *refused.release.unwrap();
        assert_eq!(
            (w, v.action(), v.why()),
            (1, Action::Drop, Reason::ConnectionClosed)
        );
        assert_eq!(kinds(&mut q), [(Kind::Removed, 1)]);
        assert_eq!(q.list().len(), 1);
        // A packet held after the close is known shows it at once.
        let (out, _) = q.hold("n".into(), packet(5, b"y"), "h".into(), 1, 3);
        let HoldOutcome::Held(id) = out else {
            panic!("not held")
        };
        assert!(matches!(
            q.drop_packet(id).unwrap_err().error,
            QueueError::Closed { .. }
        ));
    }

    #[test]
    fn a_snapshot_updates_only_what_changed() {
        let mut q = Queue::new(10, 1 << 30);
        q.set_config(on()).unwrap();
        hold(&mut q, 5, 1);
        q.take_events();
        let end = Ended {
            closed_by: ClosedBy::Client,
            reason: String::new(),
        };
        q.replace_ended(HashMap::from([(5, end.clone())]));
        assert_eq!(kinds(&mut q), [(Kind::Updated, 1)]);
        q.replace_ended(HashMap::from([(5, end)]));
        assert!(kinds(&mut q).is_empty());
    }

    #[test]
    fn timeout_removes_once_and_cancel_takes_the_waiter_once() {
        let mut q = Queue::new(10, 1 << 30);
        q.set_config(on()).unwrap();
        hold(&mut q, 1, 1);
        hold(&mut q, 1, 2);
        assert_eq!(q.time_out(1), Some((1, forward_as_is(Reason::Timeout))));
        assert_eq!(q.time_out(1), None);
        assert_eq!(q.cancel(2, Instant::now()), Some(2));
        assert_eq!(q.cancel(2, Instant::now()), None);
        assert_eq!(q.status().timed_out, 1);
    }

    #[test]
    fn a_packet_the_proxy_stopped_waiting_for_stays_listed_until_a_user_acts() {
        let mut q = Queue::new(10, 1 << 30);
        q.set_config(on()).unwrap();
        hold(&mut q, 5, 1);
        hold(&mut q, 6, 2);
        hold(&mut q, 7, 3);
        for id in 1..=3 {
            assert_eq!(q.cancel(id, Instant::now()), Some(id as u32));
        }
        kinds(&mut q);
        assert_eq!(q.list().len(), 3);
        // Its connection's end shows, and the refusal names who closed it.
        q.conn_ended(
            5,
            Ended {
                closed_by: ClosedBy::Server,
                reason: "server sent FIN".into(),
            },
        );
        let r = q.forward(1, None).unwrap_err();
        assert!(r.release.is_none());
        assert!(
            r.error
                .to_string()
                .starts_with("connection 5 was closed by the server (server sent FIN)"),
            "{}",
            r.error
        );
        // Before the registry said anything: refused all the same, never a silent success.
        let r = q.drop_packet(2).unwrap_err();
        assert_eq!(
            r.error,
            QueueError::Abandoned {
                held_id: 2,
                conn_id: 6
            }
        );
        assert_eq!(
            kinds(&mut q),
            [(Kind::Updated, 1), (Kind::Removed, 1), (Kind::Removed, 2)]
        );
        // Off removes the rest, releasing nothing.
        assert!(q.set_config(InterceptConfig::default()).unwrap().is_empty());
        assert_eq!(kinds(&mut q), [(Kind::Removed, 3)]);
        assert_eq!(q.status().released_by_off, 0);
        assert!(q.list().is_empty());
    }

    #[test]
    fn rules_get_ids_and_need_a_pattern() {
        let mut q: Queue<()> = Queue::new(10, 1 << 30);
        assert_eq!(
            q.add_rule(ReplaceRule::default()).unwrap_err(),
            QueueError::EmptyPattern
        );
        let r = ReplaceRule {
            pattern: b"a".to_vec(),
            ..Default::default()
        };
        assert_eq!(q.add_rule(r.clone()).unwrap().id, 1);
        assert_eq!(q.add_rule(r).unwrap().id, 2);
        q.remove_rule(1).unwrap();
        assert_eq!(q.remove_rule(1).unwrap_err(), QueueError::NoRule(1));
        assert_eq!(q.config().rules.len(), 1);
        // SetConfig cannot replace the rules.
        q.set_config(InterceptConfig {
            rules: vec![],
            ..on()
        })
        .unwrap();
        assert_eq!(q.config().rules[0].id, 2);
    }

    #[test]
    fn rules_and_the_configuration_are_bounded() {
        let mut q: Queue<()> = Queue::new(10, 1 << 30);
        let rule = |pattern: usize, replacement: usize| ReplaceRule {
            pattern: vec![b'a'; pattern],
            replacement: vec![b'b'; replacement],
            ..Default::default()
        };
        assert_eq!(
            q.add_rule(rule(1, MAX_RULE_BYTES + 1)).unwrap_err(),
            QueueError::RuleTooLarge {
                what: "replacement",
                len: MAX_RULE_BYTES + 1
            }
        );
        assert!(
            q.add_rule(rule(MAX_RULE_BYTES + 1, 1))
                .unwrap_err()
                .to_string()
                .contains("pattern of 1048577 bytes is larger than the limit of 1048576 bytes")
        );
        // Rules at the limit fit until the whole configuration would pass 4 MiB.
        for _ in 0..3 {
            q.add_rule(rule(1, MAX_RULE_BYTES)).unwrap();
        }
        let err = q.add_rule(rule(1, MAX_RULE_BYTES)).unwrap_err();
        assert!(matches!(err, QueueError::ConfigTooLarge(n) if n > MAX_CONFIG_BYTES));
        assert!(err.to_string().contains("4194304 bytes (4 MiB)"), "{err}");
        assert_eq!(q.config().rules.len(), 3);
        // SetConfig too: a filter that would pass the limit is refused, nothing changes.
        let big = InterceptConfig {
            contains: vec![b'c'; MAX_RULE_BYTES + 1],
            ..on()
        };
        assert!(matches!(
            q.set_config(big),
            Err(QueueError::ConfigTooLarge(_))
        ));
        assert!(!q.config().enabled);
        assert_eq!(q.config().rules.len(), 3);
        // At most MAX_RULES rules.
        let mut q: Queue<()> = Queue::new(10, 1 << 30);
        for _ in 0..MAX_RULES {
            q.add_rule(rule(1, 1)).unwrap();
        }
        assert_eq!(
            q.add_rule(rule(1, 1)).unwrap_err(),
            QueueError::TooManyRules
        );
    }

    fn hold_len(q: &mut Queue<u32>, conn_id: u64, len: usize, waiter: u32) -> HoldOutcome {
        let p = packet(conn_id, &vec![b'x'; len]);
        q.hold("n".into(), p, "h".into(), 1, waiter).0
    }

    #[test]
    fn bytes_and_packet_size_bound_the_queue() {
        let mut q = Queue::new(100, 1000);
        q.set_config(on()).unwrap();
        assert_eq!(hold_len(&mut q, 1, 600, 1), HoldOutcome::Held(1));
        assert_eq!(
            hold_len(&mut q, 1, 401, 2),
            HoldOutcome::Immediate(forward_as_is(Reason::QueueFull))
        );
        assert_eq!(hold_len(&mut q, 1, 400, 3), HoldOutcome::Held(2));
        let mut big = Queue::new(100, u64::MAX);
        big.set_config(on()).unwrap();
        assert_eq!(
            hold_len(&mut big, 1, MAX_HELD_PACKET + 1, 1),
            HoldOutcome::Immediate(forward_as_is(Reason::TooLarge))
        );
        assert_eq!(big.status().too_large_forwarded, 1);
        let s = q.status();
        assert_eq!((s.held, s.held_bytes, s.max_held_bytes), (2, 1000, 1000));
        assert_eq!(s.overflow_forwarded, 1);
        // A decided packet frees its bytes.
        q.forward(1, None).unwrap();
        assert_eq!(q.status().held_bytes, 400);
        assert_eq!(hold_len(&mut q, 1, 600, 4), HoldOutcome::Held(3));
    }

    #[test]
    fn abandoned_packets_free_their_bytes_stop_counting_and_expire() {
        let t0 = Instant::now();
        let mut q = Queue::new(2, 1000);
        q.set_config(on()).unwrap();
        assert_eq!(hold_len(&mut q, 1, 600, 1), HoldOutcome::Held(1));
        assert_eq!(hold_len(&mut q, 2, 400, 2), HoldOutcome::Held(2));
        q.take_events();
        assert_eq!(q.cancel(1, t0), Some(1));
        // Listed, marked, without its bytes, and announced.
        let l = q.list();
        assert!(l[0].abandoned && l[0].packet.as_ref().unwrap().data.is_empty());
        assert_eq!(l[0].len, 600);
        assert_eq!(kinds(&mut q), [(Kind::Updated, 1)]);
        let s = q.status();
        assert_eq!((s.held, s.abandoned, s.held_bytes), (1, 1, 400));
        // Its room is free again.
        assert_eq!(hold_len(&mut q, 3, 600, 3), HoldOutcome::Held(3));
        // Expiry: the hold timeout when shorter than ABANDONED_EXPIRY.
        assert_eq!(
            q.expire(t0 + ABANDONED_EXPIRY - Duration::from_millis(1)),
            0
        );
        assert_eq!(q.expire(t0 + ABANDONED_EXPIRY), 1);
        assert_eq!(q.status().abandoned_expired, 1);
        q.take_events();
        q.cancel(2, t0);
        q.set_config(InterceptConfig {
            hold_timeout_secs: 5,
            ..on()
        })
        .unwrap();
        assert_eq!(q.expire(t0 + Duration::from_secs(5)), 1);
        assert_eq!(kinds(&mut q), [(Kind::Updated, 2), (Kind::Removed, 2)]);
        // At most max_held abandoned stay listed: the oldest leave first.
        for w in 10..13 {
            let HoldOutcome::Held(id) = hold_len(&mut q, 9, 1, w) else {
                panic!("not held")
            };
            q.cancel(id, t0);
        }
        q.cancel(3, t0);
        let s = q.status();
        assert_eq!((s.held, s.abandoned, s.held_bytes), (0, 2, 0));
        assert_eq!(s.abandoned_expired, 4);
    }

    #[test]
    fn pages_end_by_count_and_bytes_and_can_leave_the_bytes_out() {
        let mut q = Queue::new(100, u64::MAX);
        q.set_config(on()).unwrap();
        for w in 0..5 {
            hold_len(&mut q, 1, MAX_HELD_PACKET, w);
        }
        // Bytes: one 4 MiB packet per page (two would pass 6 MiB).
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let (page, next) = q.page(0, &token, false).unwrap();
            assert_eq!(page.len(), 1);
            seen.extend(page.iter().map(|h| h.held_id));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        // Without the bytes: by count.
        let (page, next) = q.page(2, "", true).unwrap();
        assert_eq!(page.iter().map(|h| h.held_id).collect::<Vec<_>>(), [1, 2]);
        assert!(page.iter().all(
            |h| h.len as usize == MAX_HELD_PACKET && h.packet.as_ref().unwrap().data.is_empty()
        ));
        assert_eq!(next, "2");
        let (page, next) = q.page(0, &next, true).unwrap();
        assert_eq!(page.len(), 3);
        assert!(next.is_empty());
        assert!(matches!(
            q.page(0, "x", true),
            Err(QueueError::BadPageToken(_))
        ));
        assert_eq!(
            q.get(4).unwrap().packet.unwrap().data.len(),
            MAX_HELD_PACKET
        );
        assert_eq!(q.get(9).unwrap_err(), QueueError::NotFound(9));
    }
}
