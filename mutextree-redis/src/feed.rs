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

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mutextree_core::backend::ChangeFeed;
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
    let mut pause = Duration::from_millis(50);
    for client in clients.iter().cycle() {
        feed.wanted().await;
        let subscribed = timeout(connect_timeout, async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(scripts.channel()).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        })
        .await;
        let up = match subscribed {
            Ok(Ok(subscription)) => announce().await.map(|announced_at| (subscription, announced_at)),
            _ => None,
        };
        let Some(((mut sink, mut stream), mut announced_at)) = up else {
            sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            continue;
        };
        pause = Duration::from_millis(50);
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
                    if !matches!(timeout(limit, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
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
