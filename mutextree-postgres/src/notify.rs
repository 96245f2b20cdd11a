//! Wake-ups: one `LISTEN` connection per backend, however many waiters.
//!
//! A release sends `NOTIFY` on the schema's channel with the namespace as
//! payload, at commit. Each backend runs one background task that holds a
//! dedicated connection (not a pooled one: a pooled connection is handed to
//! whoever asks next) listening on that channel, and turns every
//! notification for its namespace into a [`ChangeFeed`] change, which wakes
//! every waiter of the backend; a waiter woken for a release that did not
//! concern it tries once and waits again.
//!
//! The task starts with the first [`LockBackend::listen`]
//! (mutextree_core::LockBackend::listen), so clients that never wait never
//! open the connection. The feed is marked *not live* until the `LISTEN` is
//! confirmed, and again whenever the connection is lost: waiters then poll
//! with backoff, and the reconnection (with jittered backoff, 50 ms to 2 s)
//! marks it live and wakes them all once, so a release missed while the
//! connection was down costs latency, never progress. Expiry sends nothing:
//! core's wait loop also wakes at the blocker's expiry.

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use mutextree_core::{ChangeFeed, Listener};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use crate::Tls;

const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_LAST: Duration = Duration::from_secs(2);

/// What the listening task needs, and the task itself once started.
pub(crate) struct Notifications {
    feed: ChangeFeed,
    channel: String,
    namespace: String,
    config: tokio_postgres::Config,
    tls: Tls,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Notifications {
    pub(crate) fn new(config: tokio_postgres::Config, tls: Tls, channel: String, namespace: String) -> Self {
        let feed = ChangeFeed::new();
        feed.set_live(false);
        Notifications { feed, channel, namespace, config, tls, task: Mutex::new(None) }
    }

    /// A listener subscribed now, with the listening task running (started,
    /// or started again if its runtime went away).
    pub(crate) fn listen(&self) -> Listener {
        let listener = self.feed.listen();
        let mut task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            // Without a runtime there is nothing to run it on: the feed stays
            // not live and waiters poll.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let listening = listen_forever(
                    self.config.clone(),
                    self.tls.clone(),
                    self.channel.clone(),
                    self.namespace.clone(),
                    self.feed.clone(),
                );
                *task = Some(runtime.spawn(listening));
            }
        }
        listener
    }

    /// Whether the `LISTEN` connection is up and confirmed.
    pub(crate) fn is_live(&self) -> bool {
        self.feed.listen().is_notified()
    }
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifications").field("channel", &self.channel).field("namespace", &self.namespace).finish()
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// Marks the feed not live when the task ends, however it ends (aborted,
/// or its runtime shut down).
struct DownOnExit(ChangeFeed);

impl Drop for DownOnExit {
    fn drop(&mut self) {
        self.0.set_live(false);
    }
}

async fn listen_forever(
    config: tokio_postgres::Config,
    tls: Tls,
    channel: String,
    namespace: String,
    feed: ChangeFeed,
) {
    let _down = DownOnExit(feed.clone());
    let mut delay = RECONNECT_FIRST;
    loop {
        let was_live = listen_once(&config, tls.clone(), &channel, &namespace, &feed).await;
        if was_live {
            feed.set_live(false);
            delay = RECONNECT_FIRST;
        }
        tokio::time::sleep(delay / 2 + delay.mul_f64(fastrand::f64()) / 2).await;
        delay = (delay * 2).min(RECONNECT_LAST);
    }
}

/// Connects, listens and forwards notifications until the connection ends;
/// whether it got as far as listening.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: Tls,
    channel: &str,
    namespace: &str,
    feed: &ChangeFeed,
) -> bool {
    let Ok((client, mut connection)) = config.connect(tls).await else { return false };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The connection only makes progress while its messages are polled, so
    // the LISTEN is sent while they are.
    let listen = format!("LISTEN \"{channel}\"");
    let subscribe = client.batch_execute(&listen);
    tokio::pin!(subscribe);
    loop {
        tokio::select! {
            confirmed = &mut subscribe => match confirmed {
                Ok(()) => break,
                Err(_) => return false,
            },
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            },
        }
    }
    feed.set_live(true);
    while let Some(Ok(message)) = messages.next().await {
        if let AsyncMessage::Notification(notification) = message {
            if notification.payload() == namespace {
                feed.notify();
            }
        }
    }
    // `client` lives until here: dropping it would close the connection.
    true
}
