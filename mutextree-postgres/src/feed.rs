//! The change feed: one `LISTEN` connection per backend, however many
//! waiters. It knows nothing of the backend, which passes it the
//! connection settings and the schema's listener statements.
//!
//! A release sends `NOTIFY` on the schema's channel with the namespace as
//! payload, at commit, if a session listens for the namespace (a row in the
//! schema's `listeners` table; see "Wake-ups" in the schema module): a
//! notifying commit takes a database-wide lock until its WAL is flushed, so
//! releases nobody waits for must not notify, or their commits could not be
//! flushed together. Each backend runs one background task that holds a
//! dedicated connection (not a pooled one: a pooled connection is handed to
//! whoever asks next) listening on that channel, and turns every
//! notification for its namespace into a [`ChangeFeed`] change, which wakes
//! every waiter of the backend; a waiter woken for a release that did not
//! concern it tries once and waits again.
//!
//! The task starts with the first [`LockBackend::listen`]
//! (mutextree_core::LockBackend::listen), so clients that never wait never
//! open the connection, nor make releases notify. On connecting it removes
//! the rows of ended sessions, adds its own, and only then listens. The
//! feed is marked *not live* until the `LISTEN` is confirmed, and again
//! whenever the connection is lost: waiters then poll with backoff, and the
//! reconnection (with jittered backoff, 50 ms to 2 s) marks it live and
//! wakes them all once, so a release missed while the connection was down
//! (or not notified, before this session's row existed) costs latency,
//! never progress. Expiry sends nothing: core's wait loop also wakes at the
//! blocker's expiry.

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use mutextree_core::backend::AbortOnDrop;
use mutextree_core::backend::{ChangeFeed, Listener};
use tokio_postgres::AsyncMessage;

use crate::config::Tls;
use crate::schema::ListenerStatements;

const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_LAST: Duration = Duration::from_secs(2);

/// What the listening task needs, and the task itself once started.
pub(crate) struct Notifications {
    feed: ChangeFeed,
    statements: ListenerStatements,
    namespace: String,
    config: tokio_postgres::Config,
    tls: Tls,
    /// The listening task, once started; it ends with the backend's last
    /// clone.
    task: Mutex<Option<AbortOnDrop>>,
}

impl Notifications {
    pub(crate) fn new(
        config: tokio_postgres::Config,
        tls: Tls,
        statements: ListenerStatements,
        namespace: String,
    ) -> Self {
        let feed = ChangeFeed::new();
        feed.set_live(false);
        Notifications { feed, statements, namespace, config, tls, task: Mutex::new(None) }
    }

    /// A listener subscribed now, with the listening task running (started,
    /// or started again if its runtime went away).
    pub(crate) fn listen(&self) -> Listener {
        let listener = self.feed.listen();
        let mut task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if task.as_ref().is_none_or(AbortOnDrop::is_finished) {
            // Without a runtime there is nothing to run it on: the feed stays
            // not live and waiters poll.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let listening = listen_forever(
                    self.config.clone(),
                    self.tls.clone(),
                    self.statements.clone(),
                    self.namespace.clone(),
                    self.feed.clone(),
                );
                *task = Some(AbortOnDrop::new(runtime.spawn(listening)));
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
        f.debug_struct("Notifications")
            .field("listen", &self.statements.listen)
            .field("namespace", &self.namespace)
            .finish()
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
    statements: ListenerStatements,
    namespace: String,
    feed: ChangeFeed,
) {
    let _down = DownOnExit(feed.clone());
    let mut delay = RECONNECT_FIRST;
    loop {
        let was_live = listen_once(&config, tls.clone(), &statements, &namespace, &feed).await;
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
    statements: &ListenerStatements,
    namespace: &str,
    feed: &ChangeFeed,
) -> bool {
    let Ok((client, mut connection)) = config.connect(tls).await else { return false };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The connection only makes progress while its messages are polled, so
    // the statements are sent while they are.
    let subscribe = async {
        client.batch_execute(&statements.forget_ended).await?;
        // This session's row, in a transaction that first waits for every
        // release of the namespace holding the listeners' advisory key
        // (shared) and keeps new ones from taking it until the row is
        // committed. A release either looks for listeners after the row
        // was committed, and notifies, or has committed before the barrier
        // was passed.
        client.batch_execute("BEGIN").await?;
        client.execute(&statements.barrier, &[&namespace]).await?;
        client.execute(&statements.register, &[&namespace]).await?;
        client.batch_execute("COMMIT").await?;
        // Only then LISTEN. A release that committed before the LISTEN took
        // effect is not heard, whether it notified or not: marking the feed
        // live below wakes every waiter, and each tries again after the
        // LISTEN, so it sees every release committed before, and hears
        // every one committed after (the row being there by then, those
        // notify).
        client.batch_execute(&statements.listen).await
    };
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
