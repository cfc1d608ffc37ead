//! The counter ticker: every [`COUNTERS_INTERVAL`] a `ConnectionUpdate` with the running
//! counters of each open connection whose counters changed, so live byte counts show in the
//! registry. These updates are the first thing shed (see [`super::admission`]): the next
//! tick carries the same totals.

use std::{sync::Arc, time::Duration};

use proto::registry::ConnectionUpdate;
use tokio::{
    sync::watch,
    time::{Instant, MissedTickBehavior},
};

use super::{
    admission::{Admission, Class, Item},
    live::Live,
};

/// How often counters of active connections are published (an empty batch with new loss
/// totals goes out on the same beat).
pub const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes running counters of open connections every [`COUNTERS_INTERVAL`] until `stop`
/// changes (or the queue closes).
pub(super) async fn run(
    admission: Arc<Admission>,
    live: Arc<Live>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut tick = tokio::time::interval(COUNTERS_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !publish(&admission, &live) {
            return;
        }
    }
}

/// Queues one update per open connection whose counters changed, while there is room for
/// them; returns whether to go on (false once the table or the queue is gone).
fn publish(admission: &Admission, live: &Live) -> bool {
    let Some(states) = live.snapshot() else {
        return false;
    };
    for s in states {
        if !admission.admit(Class::Counters, 0) {
            break;
        }
        match s.counters_if_changed() {
            Some(counters) => {
                let update = ConnectionUpdate {
                    id: s.id,
                    counters: Some(counters),
                    ..Default::default()
                };
                let item = Item::Updated(Box::new(update));
                if !admission.send_admitted(item, Class::Counters, 0) {
                    return !admission.closed();
                }
            }
            None => admission.release(1, 0),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use proto::common::Direction;

    use super::*;
    use crate::conn::ConnState;

    #[test]
    fn publishes_changed_counters_only_and_within_half_the_bound() {
        let (admission, mut rx) = Admission::new(4);
        let live = Live::default();
        for id in 1..=3 {
            let s = Arc::new(ConnState::new(id));
            s.record(Direction::C2s, 10 * id as usize);
            live.insert(id, s);
        }
        // Half the bound (2) is all counters may take: the third waits for the next tick.
        assert!(publish(&admission, &live));
        assert_eq!(rx.len(), 2);
        assert_eq!(admission.buffered(), 2);
        let mut got = Vec::new();
        while let Ok(Item::Updated(u)) = rx.try_recv() {
            got.push((u.id, u.counters.map(|c| c.bytes_c2s)));
        }
        admission.release(2, 0);
        assert!(publish(&admission, &live));
        while let Ok(Item::Updated(u)) = rx.try_recv() {
            got.push((u.id, u.counters.map(|c| c.bytes_c2s)));
        }
        admission.release(1, 0);
        got.sort_unstable();
        assert_eq!(got, [(1, Some(10)), (2, Some(20)), (3, Some(30))]);
        // Nothing changed since: nothing queued, nothing left counted.
        assert!(publish(&admission, &live));
        assert!(rx.is_empty());
        assert_eq!(admission.buffered(), 0);
        // No counters are counted as lost when shed.
        assert_eq!(admission.losses.snapshot().events_dropped, 0);
    }

    #[test]
    fn stops_once_the_queue_is_gone() {
        let (admission, rx) = Admission::new(4);
        let live = Live::default();
        let s = Arc::new(ConnState::new(1));
        s.record(Direction::S2c, 5);
        live.insert(1, s);
        drop(rx);
        assert!(!publish(&admission, &live));
        assert_eq!(admission.buffered(), 0);
    }
}
