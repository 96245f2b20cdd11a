//! The backend's one subscription to its namespace's release channel,
//! feeding the [`ChangeFeed`] every waiter of the backend listens to.
//!
//! It is up only while waiters need it. Redis sends every published
//! release to every subscribed connection, so a subscription nobody waits
//! on costs each release a write, and this process a read and a wake-up,
//! for nothing: with 16 backends releasing on one namespace that was most
//! of the client's work. The subscription starts when a waiter first waits
//! ([`ChangeFeed::wanted`]) and ends once nobody has waited for a
//! [`PING_EVERY`] period; meanwhile the feed is marked not live, waiters
//! poll with backoff, and they retry at once when it goes live. The same
//! holds while the server is down or a dead connection was found by the
//! periodic ping: a release published meanwhile costs latency, never
//! progress. It reconnects by itself, trying the nodes in turn.

use std::time::Duration;

use futures::StreamExt;
use mutextree_core::ChangeFeed;
use tokio::time::{sleep, timeout};

use crate::RedisOptions;

/// How often a subscription checks that its connection still works (a
/// half-open connection delivers nothing and reports no error) and that
/// someone still waits.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(5);

/// Keeps the subscription up whenever waiters need it, for as long as the
/// backend lives. `feed` starts not live.
pub(crate) async fn run(options: RedisOptions, channel: String, feed: ChangeFeed) {
    let clients = match options.node_clients() {
        Ok(clients) => clients,
        // The options were checked when the command connection was
        // made from them: waiters poll if this ever fails.
        Err(_) => return,
    };
    let mut pause = Duration::from_millis(50);
    for client in clients.iter().cycle() {
        feed.wanted().await;
        let subscribed = timeout(options.connection_timeout_value(), async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        })
        .await;
        let Ok(Ok((mut sink, mut stream))) = subscribed else {
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
                    let answered = timeout(options.response_timeout_value(), sink.ping::<redis::Value>()).await;
                    if !matches!(answered, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        // Dropping the connection ends the subscription.
        feed.set_live(false);
    }
}
