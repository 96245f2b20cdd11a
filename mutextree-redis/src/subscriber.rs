//! The backend's one subscription to its namespace's release channel,
//! feeding the [`ChangeFeed`] every waiter of the backend listens to.
//!
//! It runs as a task for the backend's life. While it is not subscribed
//! (starting, the server down, a dead connection found by the periodic
//! ping) the feed is marked not live and waiters poll with backoff, so a
//! release published meanwhile costs latency, never progress. It
//! reconnects by itself, trying the nodes in turn.

use std::time::Duration;

use futures::StreamExt;
use mutextree_core::ChangeFeed;
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};

use crate::RedisOptions;

/// How often an idle subscription checks that its connection still works:
/// a half-open connection delivers nothing and reports no error.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Keeps the subscription up for as long as the backend lives. `first`
/// hears when the first attempt to subscribe succeeded or failed.
pub(crate) async fn run(options: RedisOptions, channel: String, feed: ChangeFeed, first: oneshot::Sender<()>) {
    let clients = match options.node_clients() {
        Ok(clients) => clients,
        // The options were checked when the command connection was
        // made from them: waiters poll if this ever fails.
        Err(_) => return,
    };
    let mut first = Some(first);
    let mut pause = Duration::from_millis(50);
    for client in clients.iter().cycle() {
        let subscribed = timeout(options.connection_timeout_value(), async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        })
        .await;
        if let Ok(Ok((mut sink, mut stream))) = subscribed {
            pause = Duration::from_millis(50);
            feed.set_live(true);
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            loop {
                tokio::select! {
                    message = stream.next() => match message {
                        Some(_) => feed.notify(),
                        None => break,
                    },
                    () = sleep(PING_EVERY) => {
                        let answered = timeout(options.response_timeout_value(), sink.ping::<redis::Value>()).await;
                        if !matches!(answered, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            feed.set_live(false);
        }
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
