//! The sled [`Store`] as the registry's [`crate::backend::Backend`]: each method is the
//! store's own.

use proto::{
    common::{Connection, Packet},
    registry::{ConnectionClosed, ConnectionUpdate, ProxyLosses},
};
use tokio::sync::watch;

use super::{LogPage, Purge, Purged, Store, StoreError};
use crate::backend::{Durability, Feed, History, Nodes, Records, Usage};

impl Records for Store {
    fn open_conn(&self, c: Connection) -> Result<Option<Connection>, StoreError> {
        Store::open_conn(self, c)
    }

    fn update_conn(&self, u: &ConnectionUpdate) -> Result<Option<Connection>, StoreError> {
        Store::update_conn(self, u)
    }

    fn close_conn(&self, e: &ConnectionClosed) -> Result<Option<Connection>, StoreError> {
        Store::close_conn(self, e)
    }

    fn get_opt(&self, id: u64) -> Result<Option<Connection>, StoreError> {
        Store::get_opt(self, id)
    }

    fn scan_conns(
        &self,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        Store::scan_conns(self, from, f)
    }

    fn scan_conns_rev(
        &self,
        below: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        Store::scan_conns_rev(self, below, f)
    }

    fn scan_active(
        &self,
        from: u64,
        f: &mut dyn FnMut(Connection) -> bool,
    ) -> Result<(), StoreError> {
        Store::scan_active(self, from, f)
    }

    fn clear(&self, ids: &[u64]) -> Result<Vec<u64>, StoreError> {
        Store::clear(self, ids)
    }

    fn clear_page(&self, from: u64, max: usize) -> Result<Vec<u64>, StoreError> {
        Store::clear_page(self, from, max)
    }

    fn lease(&self, count: u32) -> Result<(u64, u64), StoreError> {
        Store::lease(self, count)
    }
}

impl History for Store {
    fn record(&self, packets: Vec<Packet>, closed: Vec<Connection>) -> Result<(), StoreError> {
        Store::record(self, packets, closed)
    }

    fn scan_history_upto(
        &self,
        start: (u64, u64),
        only_conn: bool,
        upto: u64,
        f: &mut dyn FnMut(Packet) -> bool,
    ) -> Result<(), StoreError> {
        Store::scan_history_upto(self, start, only_conn, upto, f)
    }

    fn purge(&self, what: &Purge) -> Result<Purged, StoreError> {
        Store::purge(self, what)
    }

    fn position(&self) -> u64 {
        Store::position(self)
    }

    fn follow_positions(&self) -> watch::Receiver<u64> {
        Store::follow_positions(self)
    }

    fn log_after(
        &self,
        after: u64,
        conn_id: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        Store::log_after(self, after, conn_id, max_entries, max_bytes)
    }

    fn removed_position(&self) -> u64 {
        self.budget().removed_position()
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let budget = self.budget();
        let unwritten = self.unwritten();
        Ok(Usage {
            history_packets: self.history_len(),
            history_bytes: self.history_bytes(),
            records_bytes: self.records_bytes()?,
            max_bytes: budget.options().max_bytes,
            when_full: budget.options().when_full.name(),
            evicted: budget.evicted(),
            refused: budget.refused(),
            purged: budget.purged(),
            unwritten: (unwritten.packets(), unwritten.bytes()),
            failing: unwritten.failing(),
        })
    }

    fn history_failing(&self) -> watch::Receiver<Option<String>> {
        self.unwritten().subscribe()
    }
}

impl Nodes for Store {
    fn set_losses(&self, node: &str, losses: &ProxyLosses) -> Result<(), StoreError> {
        Store::set_losses(self, node, losses)
    }

    fn losses(&self) -> Result<Vec<(String, ProxyLosses)>, StoreError> {
        Store::losses(self)
    }

    fn node_session(&self, node: &str) -> Result<Option<String>, StoreError> {
        Store::node_session(self, node)
    }

    fn set_node_session(&self, node: &str, session: &str) -> Result<(), StoreError> {
        Store::set_node_session(self, node, session)
    }
}

impl Durability for Store {
    fn commit(&self) -> Result<(), StoreError> {
        Store::commit(self)
    }

    fn close(&self) -> Result<(), StoreError> {
        Store::close(self)
    }
}

/// Only this process writes the store: the hub numbers changes as they are made.
impl Feed for Store {}
