//! The live-connection table: the connections open now, as the reporter knows them (from
//! [`super::Reporter::opened`] to [`super::Reporter::closed`]), whose running counters the
//! ticker publishes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::conn::ConnState;

/// Open connections by ID.
#[derive(Debug, Default)]
pub(super) struct Live(Mutex<HashMap<u64, Arc<ConnState>>>);

impl Live {
    /// Connection `id` opened, with `state`.
    pub(super) fn insert(&self, id: u64, state: Arc<ConnState>) {
        if let Ok(mut live) = self.0.lock() {
            live.insert(id, state);
        }
    }

    /// Connection `id` closed.
    pub(super) fn remove(&self, id: u64) {
        if let Ok(mut live) = self.0.lock() {
            live.remove(&id);
        }
    }

    /// The connections open now; `None` if the table is unusable (a holder panicked).
    pub(super) fn snapshot(&self) -> Option<Vec<Arc<ConnState>>> {
        self.0
            .lock()
            .ok()
            .map(|live| live.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_is_open() {
        let live = Live::default();
        live.insert(1, Arc::new(ConnState::new(1)));
        live.insert(2, Arc::new(ConnState::new(2)));
        live.remove(1);
        live.remove(7);
        let ids: Vec<u64> = live.snapshot().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(ids, [2]);
    }
}
