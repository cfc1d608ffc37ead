//! The held-packet queue as a plain state machine, without I/O: the configuration, the packets
//! waiting for a verdict (oldest first) and the connections the registry reported closed.
//!
//! Each held packet carries a waiter `W` (in the service, the sender of the proxy's pending
//! `Hold` answer; in tests, `()`). Operations that decide a packet return its waiter with the
//! verdict, and every change a watcher must see is appended to [`Queue::take_events`].

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proto::{
    common::{ClosedBy, ConnStatus, Packet},
    intercept::{
        HeldEvent, HeldPacket, InterceptConfig, InterceptStatus, ReplaceRule, Verdict,
        held_event::Kind, verdict::Action,
    },
    names::name_of,
};

/// Default for the most packets that may wait at once.
pub const DEFAULT_MAX_HELD: usize = 1_000;
/// The largest replacement a `Forward` may carry (4 MiB).
pub const MAX_REPLACEMENT: usize = 4 << 20;

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
    /// listed until a user acts on it, so that its connection's end can be seen).
    waiter: Option<W>,
}

/// The queue and its configuration. See the module documentation.
pub struct Queue<W> {
    config: InterceptConfig,
    max_held: usize,
    next_held_id: u64,
    next_rule_id: u64,
    held: BTreeMap<u64, Entry<W>>,
    ended: HashMap<u64, Ended>,
    events: Vec<HeldEvent>,
    overflow_forwarded: u64,
    timed_out: u64,
    released_by_off: u64,
}

/// A verdict that forwards the packet as it is.
pub fn forward_as_is(reason: &str) -> Verdict {
    Verdict {
        action: Action::Forward as i32,
        replaced: false,
        data: Bytes::new(),
        reason: reason.into(),
    }
}

impl<W> Queue<W> {
    /// An empty queue with intercept off that holds at most `max_held` packets.
    pub fn new(max_held: usize) -> Self {
        Self {
            config: InterceptConfig::default(),
            max_held,
            next_held_id: 1,
            next_rule_id: 1,
            held: BTreeMap::new(),
            ended: HashMap::new(),
            events: Vec::new(),
            overflow_forwarded: 0,
            timed_out: 0,
            released_by_off: 0,
        }
    }

    /// The configuration proxies follow.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// Replaces the configuration (keeping the rules). Turning intercept off releases every
    /// held packet, oldest first: the returned waiters get a forward as is.
    pub fn set_config(&mut self, mut config: InterceptConfig) -> Vec<(W, Verdict)> {
        config.rules = std::mem::take(&mut self.config.rules);
        self.config = config;
        if self.config.enabled {
            return Vec::new();
        }
        let ids: Vec<u64> = self.held.keys().copied().collect();
        let released: Vec<(W, Verdict)> = ids
            .into_iter()
            .filter_map(|id| self.remove(id).flatten())
            .map(|w| (w, forward_as_is("intercept_off")))
            .collect();
        self.released_by_off += released.len() as u64;
        released
    }

    /// Adds a replace rule under a new ID.
    pub fn add_rule(&mut self, mut rule: ReplaceRule) -> Result<ReplaceRule, QueueError> {
        if rule.pattern.is_empty() {
            return Err(QueueError::EmptyPattern);
        }
        rule.id = self.next_rule_id;
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
                HoldOutcome::Immediate(forward_as_is("intercept_off")),
                Some(waiter),
            );
        }
        if self.held.len() >= self.max_held {
            self.overflow_forwarded += 1;
            return (
                HoldOutcome::Immediate(forward_as_is("queue_full")),
                Some(waiter),
            );
        }
        let held_id = self.next_held_id;
        self.next_held_id += 1;
        let mut held = HeldPacket {
            held_id,
            node,
            dst_host,
            dst_port,
            conn_status: ConnStatus::Active as i32,
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
                action: Action::Forward as i32,
                replaced: true,
                data,
                reason: "user".into(),
            },
            None => forward_as_is("user"),
        };
        Ok((waiter, verdict))
    }

    /// A user drops a held packet.
    pub fn drop_packet(&mut self, held_id: u64) -> Result<(W, Verdict), Refused<W>> {
        let waiter = self.take_open(held_id)?;
        Ok((waiter, verdict(Action::Drop, "user")))
    }

    /// The packet's hold timeout passed: forward it as is (if it is still waiting).
    pub fn time_out(&mut self, held_id: u64) -> Option<(W, Verdict)> {
        let waiter = self.remove(held_id).flatten()?;
        self.timed_out += 1;
        Some((waiter, forward_as_is("timeout")))
    }

    /// The proxy stopped waiting (its call was cancelled, e.g. because the connection ended
    /// while the packet was held): the packet stays listed, so that the user sees how its
    /// connection ended, until a user acts on it (refused, and removed) or intercept is
    /// turned off. Returns the waiter if it was still there.
    pub fn cancel(&mut self, held_id: u64) -> Option<W> {
        self.held.get_mut(&held_id)?.waiter.take()
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
            held: u32::try_from(self.held.len()).unwrap_or(u32::MAX),
            max_held: u32::try_from(self.max_held).unwrap_or(u32::MAX),
            overflow_forwarded: self.overflow_forwarded,
            timed_out: self.timed_out,
            released_by_off: self.released_by_off,
            registry_connected: false,
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
                .map(|w| Box::new((w, verdict(Action::Drop, "connection_closed"))));
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
fn verdict(action: Action, reason: &str) -> Verdict {
    Verdict {
        action: action as i32,
        reason: reason.into(),
        ..Default::default()
    }
}

fn conn_of(h: &HeldPacket) -> u64 {
    h.packet.as_ref().map_or(0, |p| p.conn_id)
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
        let mut q = Queue::new(10);
        let (out, w) = q.hold("n".into(), packet(1, b"a"), "h".into(), 1, 7u32);
        assert_eq!(out, HoldOutcome::Immediate(forward_as_is("intercept_off")));
        assert_eq!(w, Some(7));
        q.set_config(on());
        assert_eq!(hold(&mut q, 1, 1), HoldOutcome::Held(1));
        assert_eq!(hold(&mut q, 1, 2), HoldOutcome::Held(2));
        let (w, v) = q.forward(1, None).unwrap();
        assert_eq!((w, v), (1, forward_as_is("user")));
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
        let mut q = Queue::new(10);
        q.set_config(on());
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
        let mut q = Queue::new(10);
        q.set_config(on());
        q.add_rule(ReplaceRule {
            pattern: b"a".to_vec(),
            ..Default::default()
        })
        .unwrap();
        for w in 1..=3 {
            hold(&mut q, 1, w);
        }
        let released = q.set_config(InterceptConfig::default());
        let waiters: Vec<u32> = released.iter().map(|(w, _)| *w).collect();
        assert_eq!(waiters, [1, 2, 3]);
        assert!(
            released
                .iter()
                .all(|(_, v)| *v == forward_as_is("intercept_off"))
        );
        assert!(q.list().is_empty());
        assert_eq!(q.config().rules.len(), 1);
        assert_eq!(q.status().released_by_off, 3);
    }

    #[test]
    fn a_full_queue_forwards_and_counts() {
        let mut q = Queue::new(2);
        q.set_config(on());
        hold(&mut q, 1, 1);
        hold(&mut q, 1, 2);
        assert_eq!(
            hold(&mut q, 1, 3),
            HoldOutcome::Immediate(forward_as_is("queue_full"))
        );
        assert_eq!(q.status().overflow_forwarded, 1);
        assert_eq!(q.status().held, 2);
    }

    #[test]
    fn a_closed_connection_updates_and_refuses_with_who_closed_it() {
        let mut q = Queue::new(10);
        q.set_config(on());
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
            (w, v.action(), v.reason.as_str()),
            (1, Action::Drop, "connection_closed")
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
        let mut q = Queue::new(10);
        q.set_config(on());
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
        let mut q = Queue::new(10);
        q.set_config(on());
        hold(&mut q, 1, 1);
        hold(&mut q, 1, 2);
        assert_eq!(q.time_out(1), Some((1, forward_as_is("timeout"))));
        assert_eq!(q.time_out(1), None);
        assert_eq!(q.cancel(2), Some(2));
        assert_eq!(q.cancel(2), None);
        assert_eq!(q.status().timed_out, 1);
    }

    #[test]
    fn a_packet_the_proxy_stopped_waiting_for_stays_listed_until_a_user_acts() {
        let mut q = Queue::new(10);
        q.set_config(on());
        hold(&mut q, 5, 1);
        hold(&mut q, 6, 2);
        hold(&mut q, 7, 3);
        for id in 1..=3 {
            assert_eq!(q.cancel(id), Some(id as u32));
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
        assert!(q.set_config(InterceptConfig::default()).is_empty());
        assert_eq!(kinds(&mut q), [(Kind::Removed, 3)]);
        assert_eq!(q.status().released_by_off, 0);
        assert!(q.list().is_empty());
    }

    #[test]
    fn rules_get_ids_and_need_a_pattern() {
        let mut q: Queue<()> = Queue::new(10);
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
        });
        assert_eq!(q.config().rules[0].id, 2);
    }
}
