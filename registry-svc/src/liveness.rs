//! Node liveness: which proxies are reporting, so that the records of a proxy that died
//! (kill -9, a crash, a lost host) do not stay `active` for ever.
//!
//! Each ingest stream belongs to a node and to the session the proxy process picked at start
//! (`IngestRequest.session`). A record still active when its node
//! - reports with a new session (the proxy restarted: the old process's connections are
//!   gone), or
//! - has had no ingest stream for the grace period (default [`DEFAULT_GRACE`]; also counted
//!   from the registry's own start for nodes with active records, which covers a registry
//!   restart after which a proxy never comes back)
//!
//! is closed as `closed_by: proxy`, `close_kind: error`, with a reason naming the node.
//! Each node's last session is kept in the store, so a proxy that restarted while the
//! registry was down too (`interpose up` killed and started again) is still recognised.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use proto::{
    common::{CloseKind, ClosedBy, ConnStatus},
    registry::ConnectionClosed,
};

use crate::{
    backend::{Change, StoreError},
    state::State,
};

/// How long a node may have no ingest stream before its active records are closed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Node {
    /// The session last reported; empty when unknown.
    session: String,
    /// Open ingest streams.
    streams: usize,
    /// When the last stream ended (or the registry started); `None` while reporting or after
    /// the node's records were closed.
    gone_since: Option<Instant>,
}

/// The nodes reporting to one registry.
pub struct Liveness {
    state: Arc<State>,
    grace: Duration,
    nodes: Mutex<HashMap<String, Node>>,
}

impl Liveness {
    /// Tracks nodes for `state`; every node with active records starts as gone now. Starts
    /// the sweeper that closes the records of nodes gone past `grace` (it ends with `self`).
    pub fn start(state: Arc<State>, grace: Duration) -> Result<Arc<Self>, StoreError> {
        let nodes = crate::off_runtime(|| {
            let mut nodes = HashMap::new();
            let now = Instant::now();
            state.store.scan_active(0, &mut |c| {
                nodes.entry(c.node).or_insert_with(|| Node {
                    gone_since: Some(now),
                    ..Node::default()
                });
                true
            })?;
            for (name, node) in &mut nodes {
                node.session = state.store.node_session(name)?.unwrap_or_default();
            }
            Ok::<_, StoreError>(nodes)
        })?;
        let me = Arc::new(Self {
            state,
            grace,
            nodes: Mutex::new(nodes),
        });
        tokio::spawn(sweep(Arc::downgrade(&me)));
        Ok(me)
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An ingest stream of `node` with `session` began; the returned guard marks its end.
    /// A new session of a known node closes the old session's active records (before the
    /// stream's first batch is applied: the store work runs on the blocking pool, awaited).
    pub async fn attach(self: &Arc<Self>, node: &str, session: &str) -> Attached {
        let attached = Attached {
            liveness: self.clone(),
            node: node.to_string(),
        };
        {
            let mut nodes = self.nodes();
            let n = nodes.entry(node.to_string()).or_default();
            n.streams += 1;
            n.gone_since = None;
        }
        let (me, node, session) = (self.clone(), node.to_string(), session.to_string());
        let _ = tokio::task::spawn_blocking(move || me.check_session(&node, &session)).await;
        attached
    }

    /// Notes the session `node` reports, closing the old session's records when it changed.
    fn check_session(&self, node: &str, session: &str) {
        let unknown = self.nodes().get(node).is_some_and(|n| n.session.is_empty());
        // A node with no active records at start: its last session is in the store.
        let stored = if unknown {
            self.stored_session(node)
        } else {
            String::new()
        };
        let (changed, replaced) = {
            let mut nodes = self.nodes();
            let n = nodes.entry(node.to_string()).or_default();
            if n.session.is_empty() {
                n.session = stored;
            }
            let changed = !session.is_empty() && n.session != session;
            let replaced = changed && !n.session.is_empty();
            if changed {
                n.session = session.to_string();
            }
            (changed, replaced)
        };
        if changed && let Err(e) = self.state.store.set_node_session(node, session) {
            tracing::error!(node, "recording the node's ingest session: {e}");
        }
        if replaced {
            self.close_node(
                node,
                &format!("proxy node {node:?} restarted (a new session)"),
            );
        }
    }

    fn stored_session(&self, node: &str) -> String {
        self.state
            .store
            .node_session(node)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn detach(&self, node: &str) {
        let mut nodes = self.nodes();
        if let Some(n) = nodes.get_mut(node) {
            n.streams = n.streams.saturating_sub(1);
            if n.streams == 0 {
                n.gone_since = Some(Instant::now());
            }
        }
    }

    /// Closes the records of nodes gone longer than the grace period. On a store shared
    /// by several registry processes, the nodes reporting here are noted as seen, and a node
    /// that reported to another process within the grace period is not gone.
    fn sweep_once(&self) {
        let (reporting, due): (Vec<String>, Vec<String>) = {
            let mut nodes = self.nodes();
            let (mut reporting, mut due) = (Vec::new(), Vec::new());
            for (name, n) in nodes.iter_mut() {
                if n.streams > 0 {
                    reporting.push(name.clone());
                } else if n.gone_since.is_some_and(|t| t.elapsed() >= self.grace) {
                    n.gone_since = None;
                    due.push(name.clone());
                }
            }
            (reporting, due)
        };
        if let Err(e) = self.state.store.touch_nodes(&reporting) {
            tracing::warn!("noting the nodes reporting here: {e}");
        }
        for node in due {
            match self.state.store.node_reported_within(&node, self.grace) {
                Ok(false) => {}
                Ok(true) => {
                    // Reporting to another registry process: look again a grace period on.
                    if let Some(n) = self.nodes().get_mut(&node)
                        && n.streams == 0
                    {
                        n.gone_since = Some(Instant::now());
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(node, "asking whether the node reports elsewhere: {e}");
                    if let Some(n) = self.nodes().get_mut(&node) {
                        n.gone_since.get_or_insert_with(Instant::now);
                    }
                    continue;
                }
            }
            let secs = self.grace.as_secs_f64();
            self.close_node(
                &node,
                &format!("proxy node {node:?} lost: no report for {secs} s (grace period)"),
            );
        }
    }

    /// Closes every active record of `node` as closed by the proxy with `reason`; when the
    /// store fails, a node with no stream is looked at again a grace period later.
    fn close_node(&self, node: &str, reason: &str) {
        if let Err(e) = self.try_close_node(node, reason) {
            tracing::error!(
                node,
                "closing the records of a lost node (tried again later): {e}"
            );
            if let Some(n) = self.nodes().get_mut(node)
                && n.streams == 0
            {
                n.gone_since = Some(Instant::now());
            }
        }
    }

    fn try_close_node(&self, node: &str, reason: &str) -> Result<(), StoreError> {
        let mut ids = Vec::new();
        self.state.store.scan_active(0, &mut |c| {
            if c.node == node {
                ids.push(c.id);
            }
            true
        })?;
        if ids.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            node,
            records = ids.len(),
            "{reason}: closing its active records"
        );
        let w = self.state.hub.write();
        let mut closed = Vec::new();
        for id in ids {
            let e = ConnectionClosed {
                id,
                closed_at: Some(proto::time::now()),
                closed_by: ClosedBy::Proxy as i32,
                close_kind: CloseKind::Error as i32,
                reason: reason.to_string(),
                counters: None,
            };
            // Only records still active: a close that raced in wins.
            match self.state.store.get_opt(id)? {
                Some(c) if c.status == ConnStatus::Active as i32 => {}
                _ => continue,
            }
            if let Some(c) = self.state.store.close_conn(&e)? {
                closed.push(c.clone());
                w.publish(Change::Upsert(Arc::new(c)));
            }
        }
        // Followers of the history see these closes too.
        self.state.store.record(Vec::new(), closed)?;
        drop(w);
        self.state.store.commit()
    }
}

/// Marks the end of an ingest stream when dropped.
pub struct Attached {
    liveness: Arc<Liveness>,
    node: String,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.liveness.detach(&self.node);
    }
}

async fn sweep(me: Weak<Liveness>) {
    let every = match me.upgrade() {
        Some(l) => (l.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match me.upgrade() {
            // Store work (a database round trip, on a shared store) off the async threads.
            Some(l) => {
                let _ = tokio::task::spawn_blocking(move || l.sweep_once()).await;
            }
            None => return,
        }
    }
}
