//! The change feed: a thread per registry process that follows the `changes` table, woken
//! by `NOTIFY interpose_changes` (and every 200 ms regardless), and publishes each change,
//! made through any process, to this process's watchers with its number. It also follows
//! the arrival position and the removed position for `FollowHistory`, and trims changes
//! older than a few minutes.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use fallible_iterator::FallibleIterator;
use platform::retry::Backoff;
use postgres::Client;
use tokio::sync::broadcast;

use super::{FeedState, decode, pool::Pool};
use crate::backend::{Change, Numbered, StoreError};

/// Longest wait for a notification before looking anyway.
const POLL: Duration = Duration::from_millis(200);
/// Changes read per round trip.
const ROWS: i64 = 10_000;
/// How often changes older than five minutes are trimmed.
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// The wait after the database refused a connection: a fixed second, so a database that is
/// down is asked once a second until it is back.
const CONNECT_RETRY: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).growth(1);
/// The wait after a connection broke while listening: short and fixed, since the next
/// connection usually works at once (the server restarted, or ended an idle session).
const LISTEN_RETRY: Backoff =
    Backoff::new(Duration::from_millis(250), Duration::from_millis(250)).growth(1);

/// Starts the feed thread, publishing the changes numbered after the current last one.
pub(super) fn start(
    pool: &Pool,
    shared: Arc<FeedState>,
    feed: broadcast::Sender<Numbered>,
) -> bool {
    let pool = pool.another();
    let last = match pool.get().and_then(|mut c| {
        Ok(c.query_one("SELECT seq FROM counter", &[])?
            .get::<_, i64>(0))
    }) {
        Ok(last) => last,
        Err(e) => {
            tracing::error!("starting the change feed: {e}");
            0
        }
    };
    let spawned = std::thread::Builder::new()
        .name("registry-feed".into())
        .spawn(move || run(&pool, last, &shared, &feed));
    if let Err(e) = spawned {
        tracing::error!("starting the change feed thread: {e}");
    }
    true
}

/// Follows the feed until the store stops, reconnecting after failures.
fn run(pool: &Pool, mut last: i64, shared: &FeedState, feed: &broadcast::Sender<Numbered>) {
    let mut trimmed = Instant::now();
    // One database, so every failure is a round of failures: `failed` always says to wait.
    let mut connecting = CONNECT_RETRY.start(1);
    let mut listening = LISTEN_RETRY.start(1);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut client = match pool.connect() {
            Ok(c) => {
                connecting.succeeded();
                c
            }
            Err(e) => {
                tracing::warn!("change feed: {e}; retrying");
                if let Some(wait) = connecting.failed() {
                    std::thread::sleep(wait);
                }
                continue;
            }
        };
        // `listen` returns only once the store stops, or with the error that broke it.
        if let Err(e) = listen(&mut client, &mut last, shared, feed, &mut trimmed) {
            tracing::warn!("change feed: {e}; reconnecting");
            if let Some(wait) = listening.failed() {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Publishes changes over one connection, listening for `NOTIFY`, until the store stops.
fn listen(
    client: &mut Client,
    last: &mut i64,
    shared: &FeedState,
    feed: &broadcast::Sender<Numbered>,
    trimmed: &mut Instant,
) -> Result<(), StoreError> {
    client.batch_execute("LISTEN interpose_changes")?;
    while !shared.stop.load(Ordering::Relaxed) {
        read_changes(client, last, feed)?;
        let row = client.query_one(
            "SELECT c.pos, t.removed_pos FROM counter c, history_totals t",
            &[],
        )?;
        let (pos, removed) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        shared.removed.fetch_max(removed, Ordering::Relaxed);
        shared.advance_position(pos);
        if trimmed.elapsed() >= TRIM_EVERY {
            client.execute(
                "DELETE FROM changes WHERE at < now() - interval '5 minutes'",
                &[],
            )?;
            *trimmed = Instant::now();
        }
        // Wait for the next commit's notification; take every one already queued.
        let mut notes = client.notifications();
        notes.timeout_iter(POLL).next()?;
        while notes.iter().next()?.is_some() {}
    }
    Ok(())
}

/// Publishes the changes numbered after `last`, in order.
fn read_changes(
    client: &mut Client,
    last: &mut i64,
    feed: &broadcast::Sender<Numbered>,
) -> Result<(), StoreError> {
    loop {
        let rows = client.query(
            "SELECT seq, id, body FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&*last, &ROWS],
        )?;
        for row in &rows {
            let (seq, id): (i64, i64) = (row.get(0), row.get(1));
            if seq != *last + 1 {
                tracing::error!(
                    from = *last + 1,
                    to = seq - 1,
                    "changes were trimmed before this registry read them (it fell more than \
                     five minutes behind): every watcher starts over from a new snapshot"
                );
                let _ = feed.send(Numbered {
                    seq: seq as u64 - 1,
                    change: Change::Reset,
                });
            }
            let change = match row.get::<_, Option<&[u8]>>(2) {
                Some(body) => Change::Upsert(Arc::new(decode("record change", body)?)),
                None => Change::Removed(id as u64),
            };
            tracing::debug!(seq, "publishing a change");
            let _ = feed.send(Numbered {
                seq: seq as u64,
                change,
            });
            *last = seq;
        }
        if (rows.len() as i64) < ROWS {
            return Ok(());
        }
    }
}
