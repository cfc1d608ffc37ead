//! The proxy side of intercept: following intercept-svc's configuration, rewriting packets
//! with its replace rules, and holding selected packets until a verdict.
//!
//! A [`Holder`] follows `WatchConfig` in a background task (reopened with backoff; while the
//! service is unreachable it holds nothing, and the last replace rules keep applying). Per
//! packet the relay calls the synchronous [`Holder::wants`], which costs one atomic load when
//! intercept is off and no rule exists, and no allocation and no gRPC call when nothing
//! matches. Only for [`Check::Hold`] does the relay call [`Holder::hold`], one `Hold` call
//! that returns the verdict.
//!
//! Faults: a `Hold` that fails (the service is unreachable or dies while the packet waits)
//! follows the [`FaultPolicy`] (default: forward as is, counted in [`HoldStats::not_held`]
//! and logged). The bound: connecting gives up after [`CONNECT_TIMEOUT`] (2 s); a service
//! that dies with the packet held fails the call as soon as its socket closes, and one that
//! vanishes without closing is noticed by HTTP/2 keepalive within [`KEEPALIVE_INTERVAL`] +
//! [`KEEPALIVE_TIMEOUT`] (3 s). A restarted service is picked up again by the same task.

pub mod filter;

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use proto::{
    client::{AuthChannel, ClientError, TokenInjector},
    common::{Direction, Packet},
    intercept::{
        HoldRequest, WatchConfigRequest, intercept_client::InterceptClient, verdict::Action,
    },
};
use tonic::service::interceptor::InterceptedService;

pub use filter::{Compiled, ConnMeta};

/// How long connecting to intercept-svc may take before a `Hold` follows the fault policy.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keepalive ping interval on the channel to intercept-svc.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long an unanswered keepalive ping may wait before the channel counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Largest verdict accepted (a replacement at intercept-svc's limit, with framing).
const MAX_MESSAGE: usize = 8 << 20;

/// What happens to a packet whose `Hold` call fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FaultPolicy {
    /// Relay it as it is ([`Decision::NotHeld`]).
    #[default]
    Forward,
    /// Never relay it ([`Decision::Drop`]).
    Drop,
}

/// What the relay does with a packet it has just read (see [`Holder::wants`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Relay the bytes as read: nothing to rewrite or hold.
    Pass,
    /// Replace rules rewrote the packet: relay these bytes instead (a modified packet).
    Rewritten(Bytes),
    /// Hold the packet: pass `rewritten` (when rules changed it) or the bytes as read to
    /// [`Holder::hold`].
    Hold { rewritten: Option<Bytes> },
}

/// The verdict on a held packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Relay the bytes given to [`Holder::hold`] (a user forwarded them as they were, the hold
    /// timed out, or intercept was turned off).
    Forward(Bytes),
    /// Relay these bytes instead: a user edited the packet.
    ForwardReplaced(Bytes),
    /// Relay nothing: a user dropped the packet, or it could not be held and the fault
    /// policy is [`FaultPolicy::Drop`].
    Drop,
    /// The packet could not be held (intercept-svc unreachable or gone, or its queue full):
    /// relay the bytes given to [`Holder::hold`] as they are.
    NotHeld(Bytes),
}

/// Counters since the holder started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// `Hold` calls made.
    pub hold_calls: u64,
    /// Packets that got a user's (or timeout's) verdict.
    pub decided: u64,
    /// Packets that could not be held (a failed call, or a full queue).
    pub not_held: u64,
    /// Packets rewritten by replace rules.
    pub rewritten: u64,
    /// Configurations received over `WatchConfig`.
    pub configs: u64,
    /// Whether the `WatchConfig` stream is open now.
    pub following: bool,
}

struct Inner {
    node: String,
    policy: FaultPolicy,
    /// `compiled.is_active()`, readable without the lock.
    active: AtomicBool,
    compiled: RwLock<Arc<Compiled>>,
    client: InterceptClient<AuthChannel>,
    hold_calls: AtomicU64,
    decided: AtomicU64,
    not_held: Arc<AtomicU64>,
    rewritten: AtomicU64,
    configs: AtomicU64,
    following: AtomicBool,
}

/// The proxy's view of intercept: see the module documentation.
pub struct Holder {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Holder {
    /// Starts following the intercept-svc at `url` (lazily: it need not be up) as node `node`.
    pub fn start(
        url: &str,
        token: Option<&str>,
        node: &str,
        policy: FaultPolicy,
    ) -> Result<Self, ClientError> {
        let endpoint = proto::client::endpoint(url)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = proto::client::lazy_channel(url, endpoint)?;
        let client =
            InterceptClient::new(InterceptedService::new(channel, TokenInjector::new(token)?))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
        let inner = Arc::new(Inner {
            node: node.to_string(),
            policy,
            active: AtomicBool::new(false),
            compiled: RwLock::new(Arc::new(Compiled::default())),
            client,
            hold_calls: AtomicU64::new(0),
            decided: AtomicU64::new(0),
            not_held: Arc::new(AtomicU64::new(0)),
            rewritten: AtomicU64::new(0),
            configs: AtomicU64::new(0),
            following: AtomicBool::new(false),
        });
        let task = tokio::spawn(follow_config(inner.clone()));
        Ok(Self { inner, task })
    }

    /// The counters.
    pub fn stats(&self) -> HoldStats {
        let i = &self.inner;
        HoldStats {
            hold_calls: i.hold_calls.load(Ordering::Relaxed),
            decided: i.decided.load(Ordering::Relaxed),
            not_held: i.not_held.load(Ordering::Relaxed),
            rewritten: i.rewritten.load(Ordering::Relaxed),
            configs: i.configs.load(Ordering::Relaxed),
            following: i.following.load(Ordering::Relaxed),
        }
    }

    /// The count of packets that could not be held (see [`HoldStats::not_held`]), shared so
    /// the reporter can send it to the registry with the node's losses.
    pub fn not_held_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.inner.not_held)
    }

    /// What to do with a packet of `conn` read in `dir`: relay it, relay rewritten bytes, or
    /// hold it. No gRPC call; no allocation unless a replace rule matches.
    pub fn wants(&self, conn: &ConnMeta<'_>, dir: Direction, data: &[u8]) -> Check {
        if !self.inner.active.load(Ordering::Acquire) {
            return Check::Pass;
        }
        // Read under the lock, no reference count taken: both pumps of every connection
        // come here for every packet, and a shared count would bounce between cores.
        let compiled = self
            .inner
            .compiled
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rewritten = compiled.rewrite(conn, dir, data);
        if rewritten.is_some() {
            self.inner.rewritten.fetch_add(1, Ordering::Relaxed);
        }
        let current = rewritten.as_deref().unwrap_or(data);
        match (compiled.holds(conn, dir, current), rewritten) {
            (true, rewritten) => Check::Hold {
                rewritten: rewritten.map(Bytes::from),
            },
            (false, Some(r)) => Check::Rewritten(Bytes::from(r)),
            (false, None) => Check::Pass,
        }
    }

    /// Holds packet `seq` of `conn` (bytes `data`, read in `dir`) until intercept-svc
    /// decides; a failed call follows the fault policy (see the module documentation).
    pub async fn hold(
        &self,
        conn: &ConnMeta<'_>,
        seq: u64,
        dir: Direction,
        data: Bytes,
    ) -> Decision {
        let i = &self.inner;
        i.hold_calls.fetch_add(1, Ordering::Relaxed);
        let req = HoldRequest {
            node: i.node.clone(),
            packet: Some(Packet {
                conn_id: conn.id,
                seq,
                direction: dir as i32,
                ts: Some(proto::time::now()),
                data: data.clone(),
                ..Default::default()
            }),
            dst_host: conn.dst_host.to_string(),
            dst_port: u32::from(conn.dst_port),
        };
        let verdict = match i.client.clone().hold(req).await {
            Ok(v) => v.into_inner(),
            Err(s) => {
                tracing::warn!(conn = conn.id, seq, code = ?s.code(), policy = ?i.policy,
                    "intercept-svc could not hold the packet: {}", s.message());
                return self.not_held(data);
            }
        };
        match verdict.action() {
            Action::Forward if verdict.reason == "queue_full" => self.not_held(data),
            Action::Forward => {
                i.decided.fetch_add(1, Ordering::Relaxed);
                if verdict.replaced {
                    Decision::ForwardReplaced(verdict.data)
                } else {
                    Decision::Forward(data)
                }
            }
            Action::Drop => {
                i.decided.fetch_add(1, Ordering::Relaxed);
                Decision::Drop
            }
            Action::Unspecified => self.not_held(data),
        }
    }

    fn not_held(&self, data: Bytes) -> Decision {
        self.inner.not_held.fetch_add(1, Ordering::Relaxed);
        match self.inner.policy {
            FaultPolicy::Forward => Decision::NotHeld(data),
            FaultPolicy::Drop => Decision::Drop,
        }
    }
}

impl Inner {
    fn install(&self, compiled: Compiled) {
        let active = compiled.is_active();
        match self.compiled.write() {
            Ok(mut c) => *c = Arc::new(compiled),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(compiled),
        }
        self.active.store(active, Ordering::Release);
    }

    /// The service is gone: stop holding, keep the rules.
    fn stop_holding(&self) {
        let current = match self.compiled.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        self.install(current.without_hold());
    }
}

/// Follows `WatchConfig` for as long as the holder lives.
async fn follow_config(inner: Arc<Inner>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Err(s) = follow_once(&inner, &mut backoff).await {
            tracing::debug!(code = ?s.code(), "intercept-svc config watch: {}", s.message());
        }
        inner.following.store(false, Ordering::Relaxed);
        inner.stop_holding();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn follow_once(inner: &Inner, backoff: &mut Duration) -> Result<(), tonic::Status> {
    let mut stream = inner
        .client
        .clone()
        .watch_config(WatchConfigRequest {})
        .await?
        .into_inner();
    *backoff = MIN_BACKOFF;
    inner.following.store(true, Ordering::Relaxed);
    while let Some(config) = stream.message().await? {
        inner.install(Compiled::new(&config, &inner.node));
        inner.configs.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The hold point's view of one connection: the [`Holder`] with the connection's target, as
/// the relay's [`crate::relay::Hold`].
pub struct ConnHold {
    holder: Arc<Holder>,
    dst_host: Arc<str>,
    dst_port: u16,
}

impl ConnHold {
    /// The hold for a connection to `dst_host:dst_port`.
    pub fn new(holder: Arc<Holder>, dst_host: &str, dst_port: u16) -> Self {
        Self {
            holder,
            dst_host: Arc::from(dst_host),
            dst_port,
        }
    }

    fn meta(&self, id: u64) -> ConnMeta<'_> {
        ConnMeta {
            id,
            dst_host: &self.dst_host,
            dst_port: self.dst_port,
        }
    }
}

impl crate::relay::Hold for ConnHold {
    fn check(&self, conn_id: u64, dir: Direction, data: &Bytes) -> Check {
        self.holder.wants(&self.meta(conn_id), dir, data)
    }

    fn hold(&self, packet: crate::relay::HeldPacket) -> crate::relay::VerdictFuture {
        let holder = self.holder.clone();
        let dst_host = self.dst_host.clone();
        let dst_port = self.dst_port;
        Box::pin(async move {
            let meta = ConnMeta {
                id: packet.conn_id,
                dst_host: &dst_host,
                dst_port,
            };
            match holder
                .hold(&meta, packet.seq, packet.dir, packet.data)
                .await
            {
                // Forwarded as held, or not held at all (counted in the holder's stats and
                // logged): either way the held bytes go on.
                Decision::Forward(_) | Decision::NotHeld(_) => crate::relay::Verdict::Forward,
                Decision::ForwardReplaced(b) => crate::relay::Verdict::Replace(b),
                Decision::Drop => crate::relay::Verdict::Drop,
            }
        })
    }
}
