//! The change feed: the backend's one subscription to its namespace's
//! release channel, feeding the [`ChangeFeed`] every waiter of the backend
//! listens to. It runs scripts (the scripts module) but knows nothing of
//! the backend, which starts it and passes it what it needs.
//!
//! Redis writes every published message to every subscribed connection, so
//! a subscription nobody waits on costs each release a write, and this
//! process a read and a wake-up, for nothing; and publishing costs the
//! release script a call even when nobody listens. So:
//!
//! * the subscription is up only while waiters need it: it starts when a
//!   waiter first waits ([`ChangeFeed::wanted`]) and ends once nobody has
//!   waited for a [`PING_EVERY`] period;
//! * once subscribed, the backend records in the namespace that someone
//!   listens, for [`ANNOUNCED_FOR`] (the `listen` script), and says so
//!   again at every ping; releases publish only while such a record is
//!   current.
//!
//! The feed goes live only after both. A release that ran before the
//! record was made published nothing, but it also ran before the waiters'
//! next attempt, which they make as soon as the feed goes live: no release
//! goes unnoticed. While the feed is not live (starting, the server down, a
//! dead connection found by the ping, a record that could not be renewed)
//! waiters poll with backoff: a lost notification costs latency, never
//! progress. It reconnects by itself, trying the nodes in turn.
//!
//! Revocations (a forced release, announced to its holder) come on a
//! channel of their own, through a second subscription: up, likewise, only
//! while a holder listens ([`Revocations::wanted`]), but with no record,
//! since a revocation is rare and always published. A second connection
//! rather than a second channel on the first: each comes and goes with its
//! own demand (a waiter's subscription must make releases publish, a
//! holder's must not). A revocation published while it is down is missed;
//! its holder finds the lock gone at its next refresh.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mutextree_core::backend::{ChangeFeed, Revocation, Revocations};
use redis::aio::{PubSubSink, PubSubStream};
use tokio::time::{sleep, timeout, Instant};

use crate::scripts::ScriptRunner;

/// How often a subscription checks that its connection still works (a
/// half-open connection delivers nothing and reports no error), that
/// someone still waits, and renews its record.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(5);

/// How long a record that someone listens makes releases publish.
const ANNOUNCED_FOR: Duration = Duration::from_secs(60);

/// A subscription whose record was last renewed this long ago gives up
/// (and marks the feed not live) rather than risk the record lapsing while
/// its waiters count on it: the checks are at most three limits apart
/// (ping period, ping, renewal), far inside [`ANNOUNCED_FOR`].
const RENEWED_WITHIN: Duration = Duration::from_secs(15);

/// Keeps the subscription up whenever waiters need it, for as long as the
/// backend lives (it aborts this task when its last clone goes), on one of
/// `clients` (one per node) at a time. `feed` starts not live.
pub(crate) async fn run(
    clients: Arc<[redis::Client]>,
    connect_timeout: Duration,
    request_timeout: Duration,
    scripts: Arc<ScriptRunner>,
    feed: ChangeFeed,
) {
    // Each check waits at most this long for its answer.
    let limit = request_timeout.min(PING_EVERY);
    let announce = || async {
        let sent_at = Instant::now();
        matches!(timeout(limit, scripts.announce_listener(ANNOUNCED_FOR)).await, Ok(Ok(()))).then_some(sent_at)
    };
    let mut retry = Retry::default();
    for client in clients.iter().cycle() {
        feed.wanted().await;
        let up = match subscribe(client, scripts.channel(), connect_timeout).await {
            Some(subscription) => announce().await.map(|announced_at| (subscription, announced_at)),
            None => None,
        };
        let Some(((mut sink, mut stream), mut announced_at)) = up else {
            retry.failed().await;
            continue;
        };
        retry = Retry::default();
        feed.set_live(true);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(_) => feed.notify(),
                    None => break,
                },
                () = sleep(PING_EVERY) => {
                    if !feed.still_wanted() {
                        break;
                    }
                    if !answers_ping(&mut sink, limit).await {
                        break;
                    }
                    match announce().await {
                        Some(sent_at) => announced_at = sent_at,
                        None if announced_at.elapsed() < RENEWED_WITHIN => {}
                        None => break,
                    }
                }
            }
        }
        // Dropping the connection ends the subscription.
        feed.set_live(false);
    }
}

/// Keeps the revocation subscription up whenever holders listen, for as
/// long as the backend lives, on one of `clients` at a time, turning each
/// message on `channel` into an announcement on `revocations` (which starts
/// not live).
pub(crate) async fn hear_revocations(
    clients: Arc<[redis::Client]>,
    connect_timeout: Duration,
    request_timeout: Duration,
    channel: String,
    revocations: Revocations,
) {
    let limit = request_timeout.min(PING_EVERY);
    let mut retry = Retry::default();
    for client in clients.iter().cycle() {
        revocations.wanted().await;
        let Some((mut sink, mut stream)) = subscribe(client, &channel, connect_timeout).await else {
            retry.failed().await;
            continue;
        };
        retry = Retry::default();
        revocations.set_live(true);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        let payload = message.get_payload::<String>().ok();
                        if let Some(revocation) = payload.as_deref().and_then(Revocation::from_message) {
                            revocations.announce(revocation);
                        }
                    }
                    None => break,
                },
                () = sleep(PING_EVERY) => {
                    if !revocations.still_wanted() || !answers_ping(&mut sink, limit).await {
                        break;
                    }
                }
            }
        }
        // Dropping the connection ends the subscription.
        revocations.set_live(false);
    }
}

/// A subscription to `channel` on `client`, made within `connect_timeout`.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
    connect_timeout: Duration,
) -> Option<(PubSubSink, PubSubStream)> {
    let subscribed = timeout(connect_timeout, async {
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        sink.subscribe(channel).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    });
    subscribed.await.ok()?.ok()
}

/// Whether a subscribed connection still answers, within `limit` (a
/// half-open one delivers nothing and reports no error).
async fn answers_ping(sink: &mut PubSubSink, limit: Duration) -> bool {
    matches!(timeout(limit, sink.ping::<redis::Value>()).await, Ok(Ok(_)))
}

/// The pause before trying the next node after a failed subscription:
/// jittered, 50 ms doubling to 2 s; a new value after a success.
struct Retry(Duration);

impl Default for Retry {
    fn default() -> Self {
        Retry(Duration::from_millis(50))
    }
}

impl Retry {
    async fn failed(&mut self) {
        sleep(self.0.mul_f64(0.5 + fastrand::f64())).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}
