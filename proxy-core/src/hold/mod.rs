//! The proxy side of intercept: following intercept-svc's configuration, rewriting packets
//! with its replace rules, and holding selected packets until a verdict.
//!
//! A [`Holder`] follows `WatchConfig` in a background task (reopened with backoff; while the
//! service is unreachable it holds nothing, and the last replace rules keep applying). Per
//! packet the relay calls the synchronous [`Holder::wants`], which costs one atomic load when
//! intercept is off and no rule exists, and no allocation and no gRPC call when nothing
//! matches. Only for [`Check::Hold`] does the relay call [`Holder::hold`], one `Hold` call
//! whose `intercept.Verdict` becomes the relay's [`Fate`] for the packet (the relay's words,
//! [`Check`], [`Waiting`] and [`Fate`], live beside its [`crate::relay::Hold`]; this module
//! implements that trait and translates to them).
//!
//! Where holds go is a [`HoldSink`]: intercept-svc over gRPC ([`Holder::start`]), or the
//! queue in the same process ([`Holder::start_local`], `interpose up`), where a hold crosses
//! no socket at all.
//!
//! Faults: a `Hold` that fails (the service is unreachable or dies while the packet waits)
//! follows the [`FaultPolicy`] (default: forward as is, counted in [`HoldStats::not_held`]
//! and logged with its cause). Nothing on the hold path gives up for want of time while the
//! service is alive: no deadline, and no HTTP/2 keepalive (whose ping a loaded machine can
//! answer late); connecting gives up after [`CONNECT_TIMEOUT`] (2 s); a service that dies
//! with the packet held fails the call as soon as its socket closes, and a host that
//! vanishes without closing is noticed by TCP keepalive, which the kernels answer (see
//! [`platform::client::endpoint_without_keepalive`]: about 40 s). A restarted service is
//! picked up again by the same task.
//!
//! Replace rules never grow a packet by more than [`rules::MAX_GROWTH`]; a packet they
//! would grow further is relayed as received and counted ([`HoldStats::rewrite_skipped`]).

pub mod rules;

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use platform::{
    client::{ClientError, TokenInjector},
    hold::HoldSink,
    retry::{Backoff, Retry},
};
use prost_types::Timestamp;
use proto::{
    common::{Direction, Packet},
    intercept::{
        HoldRequest,
        intercept_client::InterceptClient,
        verdict::{Action, Reason},
    },
    names::Named,
};
use tonic::{Code, Status, service::interceptor::InterceptedService};

use crate::{
    relay::{Check, Fate, FateFuture, Hold, Waiting},
    report::InterceptCounts,
};
pub use rules::{Compiled, ConnMeta, Rewrite};

/// How long connecting to intercept-svc may take before a `Hold` follows the fault policy.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How the config watch is reopened after it fails or ends.
const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// Largest verdict accepted (a replacement at intercept-svc's limit, with framing).
const MAX_MESSAGE: usize = 8 << 20;

/// What happens to a packet whose `Hold` call fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FaultPolicy {
    /// Relay it as it was held ([`Fate::Forward`]).
    #[default]
    Forward,
    /// Never relay it ([`Fate::Drop`]).
    Drop,
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
    /// Of those, the failed calls.
    pub hold_failed: u64,
    /// Of those, the ones intercept-svc answered without holding (queue full, too large).
    pub refused: u64,
    /// Packets rewritten by replace rules.
    pub rewritten: u64,
    /// Packets the replace rules would have grown by more than [`rules::MAX_GROWTH`]:
    /// relayed as received.
    pub rewrite_skipped: u64,
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
    sink: Arc<dyn HoldSink>,
    hold_calls: AtomicU64,
    decided: AtomicU64,
    counts: Arc<InterceptCounts>,
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
    /// The channel has no HTTP/2 keepalive (see the module documentation).
    pub fn start(
        url: &str,
        token: Option<&str>,
        node: &str,
        policy: FaultPolicy,
    ) -> Result<Self, ClientError> {
        let endpoint =
            platform::client::endpoint_without_keepalive(url)?.connect_timeout(CONNECT_TIMEOUT);
        let channel = platform::client::lazy_channel(url, endpoint)?;
        let client =
            InterceptClient::new(InterceptedService::new(channel, TokenInjector::new(token)?))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self::start_local(Arc::new(client), node, policy))
    }

    /// Starts following the intercept queue `sink` (in this process, for `interpose up`; or
    /// any other [`HoldSink`]) as node `node`.
    pub fn start_local(sink: Arc<dyn HoldSink>, node: &str, policy: FaultPolicy) -> Self {
        let inner = Arc::new(Inner {
            node: node.to_string(),
            policy,
            active: AtomicBool::new(false),
            compiled: RwLock::new(Arc::new(Compiled::default())),
            sink,
            hold_calls: AtomicU64::new(0),
            decided: AtomicU64::new(0),
            counts: Arc::default(),
            rewritten: AtomicU64::new(0),
            configs: AtomicU64::new(0),
            following: AtomicBool::new(false),
        });
        let task = tokio::spawn(follow_config(inner.clone()));
        Self { inner, task }
    }

    /// The counters.
    pub fn stats(&self) -> HoldStats {
        let i = &self.inner;
        HoldStats {
            hold_calls: i.hold_calls.load(Ordering::Relaxed),
            decided: i.decided.load(Ordering::Relaxed),
            not_held: i.counts.not_held(),
            hold_failed: i.counts.hold_failed.load(Ordering::Relaxed),
            refused: i.counts.refused.load(Ordering::Relaxed),
            rewritten: i.rewritten.load(Ordering::Relaxed),
            rewrite_skipped: i.counts.rewrite_skipped.load(Ordering::Relaxed),
            configs: i.configs.load(Ordering::Relaxed),
            following: i.following.load(Ordering::Relaxed),
        }
    }

    /// What the holder could not do (see [`InterceptCounts`]), shared so the reporter can
    /// send it to the registry with the node's losses.
    pub fn counts(&self) -> Arc<InterceptCounts> {
        Arc::clone(&self.inner.counts)
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
        let rewritten = match compiled.rewrite(conn, dir, data) {
            Rewrite::Unchanged => None,
            Rewrite::Rewritten(r) => {
                self.inner.rewritten.fetch_add(1, Ordering::Relaxed);
                Some(r)
            }
            Rewrite::Skipped => {
                let n = self
                    .inner
                    .counts
                    .rewrite_skipped
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        conn = conn.id,
                        skipped = n,
                        "replace rules would grow a {}-byte packet by more than {} bytes: \
                         relayed as received ({n} such packets so far)",
                        data.len(),
                        rules::MAX_GROWTH
                    );
                }
                None
            }
        };
        let current = rewritten.as_deref().unwrap_or(data);
        match (compiled.holds(conn, dir, current), rewritten) {
            (true, rewritten) => Check::Hold {
                rewritten: rewritten.map(Bytes::from),
            },
            (false, Some(r)) => Check::Rewritten(Bytes::from(r)),
            (false, None) => Check::Pass,
        }
    }

    /// Holds packet `seq` of `conn` (bytes `data`, read in `dir` at `ts`) until
    /// intercept-svc decides; a packet that could not be held follows the fault policy (see
    /// the module documentation; counted in [`HoldStats::not_held`]).
    pub async fn hold(
        &self,
        conn: &ConnMeta<'_>,
        seq: u64,
        dir: Direction,
        ts: Timestamp,
        data: Bytes,
    ) -> Fate {
        let i = &self.inner;
        i.hold_calls.fetch_add(1, Ordering::Relaxed);
        let req = HoldRequest {
            node: i.node.clone(),
            packet: Some(Packet {
                conn_id: conn.id,
                seq,
                direction: dir as i32,
                ts: Some(ts),
                data,
                ..Default::default()
            }),
            dst_host: conn.dst_host.to_string(),
            dst_port: u32::from(conn.dst_port),
        };
        let verdict = match i.sink.hold(req).await {
            Ok(v) => v,
            Err(s) => {
                i.counts.hold_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(conn = conn.id, seq, code = ?s.code(), policy = ?i.policy,
                    "packet not held: {}: {}", cause(&s), s.message());
                return self.not_held();
            }
        };
        match (verdict.action(), verdict.cause()) {
            (Action::Forward, why @ (Reason::QueueFull | Reason::TooLarge)) => {
                let n = i.counts.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    let why = why.name().unwrap_or_default();
                    tracing::warn!(
                        conn = conn.id,
                        seq,
                        reason = why,
                        refused = n,
                        "packet not held: intercept-svc forwarded it without holding ({why}); \
                         {n} such packets so far"
                    );
                }
                self.not_held()
            }
            (Action::Forward, _) => {
                i.decided.fetch_add(1, Ordering::Relaxed);
                if verdict.replaced {
                    Fate::Replace(verdict.data)
                } else {
                    Fate::Forward
                }
            }
            (Action::Drop, _) => {
                i.decided.fetch_add(1, Ordering::Relaxed);
                Fate::Drop
            }
            (Action::Unspecified, _) => {
                i.counts.hold_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    conn = conn.id,
                    seq,
                    "packet not held: intercept-svc answered \
                    without an action"
                );
                self.not_held()
            }
        }
    }

    /// Follows the fault policy for a packet that was not held (already counted).
    fn not_held(&self) -> Fate {
        match self.inner.policy {
            FaultPolicy::Forward => Fate::Forward,
            FaultPolicy::Drop => Fate::Drop,
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

/// Why a hold call failed, in words that fit its status code.
fn cause(s: &Status) -> &'static str {
    match s.code() {
        Code::Unavailable => "intercept-svc is unreachable or went away",
        Code::Cancelled => "the hold call was cancelled (its connection to intercept-svc ended)",
        Code::DeadlineExceeded => "the hold call timed out",
        Code::Unauthenticated | Code::PermissionDenied => {
            "intercept-svc refused the proxy's credentials"
        }
        Code::ResourceExhausted | Code::OutOfRange => "the packet was too large to send",
        _ => "intercept-svc failed the hold call",
    }
}

/// Follows `WatchConfig` for as long as the holder lives.
async fn follow_config(inner: Arc<Inner>) {
    let mut retry = RETRY.start(1);
    loop {
        if let Err(s) = follow_once(&inner, &mut retry).await {
            tracing::debug!(code = ?s.code(), "intercept-svc config watch: {}", s.message());
        }
        inner.following.store(false, Ordering::Relaxed);
        inner.stop_holding();
        // One intercept service: every end of the watch is a round of failures.
        if let Some(wait) = retry.failed() {
            tokio::time::sleep(wait).await;
        }
    }
}

async fn follow_once(inner: &Inner, retry: &mut Retry) -> Result<(), tonic::Status> {
    let mut stream = inner.sink.watch_config().await?;
    retry.succeeded();
    inner.following.store(true, Ordering::Relaxed);
    while let Some(config) = tokio_stream::StreamExt::next(&mut stream)
        .await
        .transpose()?
    {
        inner.install(Compiled::new(&config, &inner.node));
        inner.configs.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The hold point's view of one connection: the [`Holder`] with the connection's target, as
/// the relay's [`Hold`].
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

impl Hold for ConnHold {
    fn check(&self, conn_id: u64, dir: Direction, data: &Bytes) -> Check {
        self.holder.wants(&self.meta(conn_id), dir, data)
    }

    fn hold(&self, packet: Waiting) -> FateFuture {
        let holder = self.holder.clone();
        let dst_host = self.dst_host.clone();
        let dst_port = self.dst_port;
        Box::pin(async move {
            let meta = ConnMeta {
                id: packet.conn_id,
                dst_host: &dst_host,
                dst_port,
            };
            holder
                .hold(&meta, packet.seq, packet.dir, packet.ts, packet.data)
                .await
        })
    }
}
