//! `interpose.intercept.v1.Intercept` over the [`Queue`]: each `Hold` call waits on a oneshot
//! channel that a user's verdict, the hold timeout or turning intercept off completes.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::Stream;
use platform::serve::Drain;
use proto::intercept::{
    self as pb, HeldEvent, InterceptConfig, Verdict, held_event::Kind, intercept_server::Intercept,
    verdict::Reason,
};
use tokio::sync::{broadcast, oneshot, watch};
use tokio_stream::{StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};

use crate::queue::{Ended, HoldOutcome, Queue, QueueError, Refused};

/// How many held-queue events a slow watcher may fall behind before its stream ends.
const WATCH_BACKLOG: usize = 4096;

type Waiter = oneshot::Sender<Verdict>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The queue shared by the gRPC handlers and the registry follower.
pub struct InterceptState {
    queue: Mutex<Queue<Waiter>>,
    events: broadcast::Sender<HeldEvent>,
    config: watch::Sender<InterceptConfig>,
    /// Whether the registry follower has a live `WatchConnections` stream.
    pub registry_connected: AtomicBool,
}

impl InterceptState {
    /// An empty queue with intercept off, holding at most `max_held` packets and
    /// `max_held_bytes` of payload.
    pub fn new(max_held: usize, max_held_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue::new(max_held, max_held_bytes)),
            events: broadcast::channel(WATCH_BACKLOG).0,
            config: watch::channel(InterceptConfig::default()).0,
            registry_connected: AtomicBool::new(false),
        })
    }

    /// Runs `f` on the queue, then publishes its events and configuration while still
    /// holding the lock (so that a watcher's snapshot and its live events never overlap).
    pub fn apply<R>(&self, f: impl FnOnce(&mut Queue<Waiter>) -> R) -> R {
        let mut q = match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        let r = f(&mut q);
        for ev in q.take_events() {
            let _ = self.events.send(ev);
        }
        self.config.send_if_modified(|c| {
            let changed = c != q.config();
            if changed {
                c.clone_from(q.config());
            }
            changed
        });
        r
    }

    /// The registry reports connection `id` ended.
    pub fn conn_ended(&self, id: u64, end: Ended) {
        self.apply(|q| q.conn_ended(id, end));
    }

    /// Removes abandoned packets past their expiry, every [`EXPIRE_EVERY`], for as long as
    /// the task runs.
    pub async fn expire_abandoned(self: Arc<Self>) {
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.apply(|q| q.expire(Instant::now()));
        }
    }
}

/// How often abandoned packets are checked for expiry.
pub const EXPIRE_EVERY: Duration = Duration::from_millis(500);

/// Sends each verdict to its waiting `Hold` call (a call already gone is fine).
fn release(decided: impl IntoIterator<Item = (Waiter, Verdict)>) {
    for (w, v) in decided {
        let _ = w.send(v);
    }
}

/// Tells the queue when a `Hold` call ends without a verdict (the proxy cancelled it): the
/// packet stays listed until a user acts on it; after a verdict it is gone already.
struct CancelOnDrop {
    shared: Arc<InterceptState>,
    held_id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let id = self.held_id;
        self.shared.apply(|q| q.cancel(id, Instant::now()));
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct InterceptService {
    shared: Arc<InterceptState>,
    drain: Drain,
}

impl InterceptService {
    /// A service over `shared` whose streams and pending holds end when `drain` fires (so a
    /// graceful shutdown is not held up by them; a proxy then follows its fault policy).
    pub fn new(shared: Arc<InterceptState>, drain: Drain) -> Self {
        Self { shared, drain }
    }

    /// `stream`, ended with [`Drain::status`] once the server shuts down.
    fn until_drained<T: Send + 'static>(
        &self,
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> BoxStream<T> {
        let drain = self.drain.clone();
        let end = futures::stream::once(async move {
            drain.wait().await;
            Err(Drain::status())
        });
        Box::pin(futures::stream::select(stream, end))
    }

    async fn wait_verdict(
        &self,
        held_id: u64,
        rx: oneshot::Receiver<Verdict>,
        timeout: u32,
    ) -> Verdict {
        let _cancel = CancelOnDrop {
            shared: self.shared.clone(),
            held_id,
        };
        let mut rx = rx;
        if timeout > 0 {
            tokio::select! {
                v = &mut rx => return v.unwrap_or_else(|_| crate::queue::forward_as_is(Reason::Cancelled)),
                () = tokio::time::sleep(Duration::from_secs(u64::from(timeout))) => {}
            }
            if let Some((_, v)) = self.shared.apply(|q| q.time_out(held_id)) {
                return v;
            }
        }
        // A verdict (a user's, or the release when intercept is turned off) is on its way.
        rx.await
            .unwrap_or_else(|_| crate::queue::forward_as_is(Reason::Cancelled))
    }
}

fn status_of(e: QueueError) -> Status {
    match e {
        QueueError::ZeroId
        | QueueError::TooLarge(_)
        | QueueError::EmptyPattern
        | QueueError::RuleTooLarge { .. }
        | QueueError::TooManyRules
        | QueueError::ConfigTooLarge(_)
        | QueueError::BadPageToken(_) => Status::invalid_argument(e.to_string()),
        QueueError::NotFound(_) | QueueError::NoRule(_) => Status::not_found(e.to_string()),
        QueueError::Closed { .. } | QueueError::Abandoned { .. } => {
            Status::failed_precondition(e.to_string())
        }
    }
}

/// Releases what a refusal removed, and reports the refusal.
fn refused(r: Refused<Waiter>) -> Status {
    release(r.release.map(|r| *r));
    status_of(r.error)
}

#[tonic::async_trait]
impl Intercept for InterceptService {
    async fn get_config(
        &self,
        _req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<InterceptConfig>, Status> {
        Ok(Response::new(self.shared.apply(|q| q.config().clone())))
    }

    async fn set_config(
        &self,
        req: Request<pb::SetConfigRequest>,
    ) -> Result<Response<InterceptConfig>, Status> {
        let config = req.into_inner().config.unwrap_or_default();
        let (released, now) = self
            .shared
            .apply(|q| (q.set_config(config), q.config().clone()));
        release(released.map_err(status_of)?);
        Ok(Response::new(now))
    }

    type WatchConfigStream = BoxStream<InterceptConfig>;

    async fn watch_config(
        &self,
        _req: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        let stream = WatchStream::new(self.shared.config.subscribe()).map(Ok);
        Ok(Response::new(self.until_drained(stream)))
    }

    async fn hold(&self, req: Request<pb::HoldRequest>) -> Result<Response<Verdict>, Status> {
        let r = req.into_inner();
        let packet = r
            .packet
            .ok_or_else(|| Status::invalid_argument("HoldRequest.packet is missing"))?;
        let (tx, rx) = oneshot::channel();
        let (outcome, timeout) = self.shared.apply(|q| {
            let timeout = q.config().hold_timeout_secs;
            (
                q.hold(r.node, packet, r.dst_host, r.dst_port, tx).0,
                timeout,
            )
        });
        let verdict = match outcome {
            HoldOutcome::Immediate(v) => v,
            HoldOutcome::Held(id) => tokio::select! {
                v = self.wait_verdict(id, rx, timeout) => v,
                () = self.drain.wait() => return Err(Drain::status()),
            },
        };
        Ok(Response::new(verdict))
    }

    async fn list_held(
        &self,
        req: Request<pb::ListHeldRequest>,
    ) -> Result<Response<pb::ListHeldResponse>, Status> {
        let r = req.into_inner();
        let (held, next_page_token) = self
            .shared
            .apply(|q| q.page(r.page_size as usize, &r.page_token, r.omit_data))
            .map_err(status_of)?;
        Ok(Response::new(pb::ListHeldResponse {
            held,
            next_page_token,
        }))
    }

    async fn get_held(
        &self,
        req: Request<pb::GetHeldRequest>,
    ) -> Result<Response<pb::HeldPacket>, Status> {
        let id = req.into_inner().held_id;
        let held = self.shared.apply(|q| q.get(id)).map_err(status_of)?;
        Ok(Response::new(held))
    }

    type WatchHeldStream = BoxStream<HeldEvent>;

    async fn watch_held(
        &self,
        _req: Request<pb::WatchHeldRequest>,
    ) -> Result<Response<Self::WatchHeldStream>, Status> {
        let (snapshot, live) = self
            .shared
            .apply(|q| (q.list(), self.shared.events.subscribe()));
        let snapshot = snapshot.into_iter().map(|h| {
            Ok(HeldEvent {
                kind: Kind::Added as i32,
                held_id: h.held_id,
                held: Some(h),
            })
        });
        let live = tokio_stream::wrappers::BroadcastStream::new(live).map(|r| {
            r.map_err(|_| {
                Status::resource_exhausted(
                    "this watcher fell behind the queue's changes: watch again",
                )
            })
        });
        let stream = tokio_stream::iter(snapshot).chain(live);
        Ok(Response::new(self.until_drained(stream)))
    }

    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let r = req.into_inner();
        let replacement = r.replace.then_some(r.data);
        let decided = self
            .shared
            .apply(|q| q.forward(r.held_id, replacement))
            .map_err(refused)?;
        release([decided]);
        Ok(Response::new(pb::ForwardResponse {}))
    }

    async fn drop(
        &self,
        req: Request<pb::DropRequest>,
    ) -> Result<Response<pb::DropResponse>, Status> {
        let id = req.into_inner().held_id;
        let decided = self.shared.apply(|q| q.drop_packet(id)).map_err(refused)?;
        release([decided]);
        Ok(Response::new(pb::DropResponse {}))
    }

    async fn add_rule(
        &self,
        req: Request<pb::AddRuleRequest>,
    ) -> Result<Response<pb::ReplaceRule>, Status> {
        let rule = req.into_inner().rule.unwrap_or_default();
        let rule = self.shared.apply(|q| q.add_rule(rule)).map_err(status_of)?;
        Ok(Response::new(rule))
    }

    async fn remove_rule(
        &self,
        req: Request<pb::RemoveRuleRequest>,
    ) -> Result<Response<pb::RemoveRuleResponse>, Status> {
        let id = req.into_inner().id;
        self.shared
            .apply(|q| q.remove_rule(id))
            .map_err(status_of)?;
        Ok(Response::new(pb::RemoveRuleResponse {}))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::InterceptStatus>, Status> {
        let mut s = self.shared.apply(|q| q.status());
        s.registry_connected = self.shared.registry_connected.load(Ordering::Relaxed);
        Ok(Response::new(s))
    }
}

/// The in-process path of `interpose up`: the proxy holds through the service itself, with
/// the same answers as over gRPC (see [`platform::hold`]).
impl platform::hold::HoldSink for InterceptService {
    fn watch_config(&self) -> platform::hold::Call<platform::hold::ConfigStream> {
        let me = self.clone();
        Box::pin(async move {
            let stream = Intercept::watch_config(&me, Request::new(pb::WatchConfigRequest {}))
                .await?
                .into_inner();
            Ok(stream as platform::hold::ConfigStream)
        })
    }

    fn hold(&self, mut req: pb::HoldRequest) -> platform::hold::Call<Verdict> {
        // The packet's bytes share the relay's read block (up to 256 KiB for a packet of any
        // size): the queue keeps a copy of just the packet, so what it holds is what
        // `max_held_bytes` counts.
        if let Some(p) = &mut req.packet {
            p.data = bytes::Bytes::copy_from_slice(&p.data);
        }
        let me = self.clone();
        Box::pin(async move { Ok(Intercept::hold(&me, Request::new(req)).await?.into_inner()) })
    }
}
