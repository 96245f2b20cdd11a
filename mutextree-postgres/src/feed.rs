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
//!
//! Forced releases reach their holders on a second channel, the schema's
//! revocation channel: the revoking statement notifies it itself (see
//! `revoke` in the schema module), with the namespace, token and owner as
//! payload. A second connection, started with the first holder that
//! listens ([`Notifications::listen_revocation`]) and closed once none has
//! listened for [`STILL_WANTED_EVERY`], `LISTEN`s on it without a row in
//! `listeners` (a revocation notifies whether or not anyone listens, and
//! nothing a holder does may make releases notify); its [`Revocations`]
//! are live while it does. A revocation sent while it is down is missed:
//! its holder finds the grant gone at its next refresh.

use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use mutextree_core::backend::AbortOnDrop;
use mutextree_core::backend::{ChangeFeed, Listener, Revocation, RevocationListener, Revocations};
use mutextree_core::Grant;
use tokio_postgres::AsyncMessage;

use tracing::Instrument;

use crate::config::Tls;
use crate::error::STORE;
use crate::schema::ListenerStatements;

const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_LAST: Duration = Duration::from_secs(2);

/// How often the revocation connection checks that a holder still
/// listens.
const STILL_WANTED_EVERY: Duration = Duration::from_secs(5);

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
    revocations: Revocations,
    /// The task listening for revocations, once started.
    revocation_task: Mutex<Option<AbortOnDrop>>,
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
        let revocations = Revocations::not_live();
        Notifications {
            feed,
            statements,
            namespace,
            config,
            tls,
            task: Mutex::new(None),
            revocations,
            revocation_task: Mutex::new(None),
        }
    }

    /// A listener subscribed now, with the listening task running (started,
    /// or started again if its runtime went away).
    pub(crate) fn listen(&self) -> Listener {
        let listener = self.feed.listen();
        ensure_running(&self.task, || {
            listen_forever(
                self.config.clone(),
                self.tls.clone(),
                self.statements.clone(),
                self.namespace.clone(),
                self.feed.clone(),
            )
        });
        listener
    }

    /// A listener for the revocation of `grant`, with the task that hears
    /// revocations running.
    pub(crate) fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        let listener = self.revocations.listen(grant);
        ensure_running(&self.revocation_task, || {
            hear_revocations(
                self.config.clone(),
                self.tls.clone(),
                self.statements.listen_revocations.clone(),
                self.namespace.clone(),
                self.revocations.clone(),
            )
        });
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

/// Starts the task `start` makes unless it runs (started before, and its
/// runtime still there). Without a runtime there is nothing to run it on:
/// its feed stays not live (waiters poll, holders hear of a revocation at
/// their next refresh).
fn ensure_running<F>(task: &Mutex<Option<AbortOnDrop>>, start: impl FnOnce() -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut task = task.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if task.as_ref().is_none_or(AbortOnDrop::is_finished) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Its connection's comings and goings are events in this span.
            let span = tracing::debug_span!(target: "mutextree", "notifications", store = STORE);
            *task = Some(AbortOnDrop::new(runtime.spawn(start().instrument(span))));
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
    if !run_while_polled(subscribe, &mut messages).await {
        return false;
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

/// Runs `statements` on a connection whose `messages` must be polled for
/// it to make progress; whether they succeeded (and the connection is
/// still up).
async fn run_while_polled<S>(
    statements: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
    messages: &mut S,
) -> bool
where
    S: Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin,
{
    tokio::pin!(statements);
    loop {
        tokio::select! {
            done = &mut statements => return done.is_ok(),
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            },
        }
    }
}

/// Keeps a connection listening on the revocation channel while holders
/// listen, reconnecting with jittered backoff; runs until aborted.
async fn hear_revocations(
    config: tokio_postgres::Config,
    tls: Tls,
    listen: String,
    namespace: String,
    revocations: Revocations,
) {
    let mut delay = RECONNECT_FIRST;
    loop {
        revocations.wanted().await;
        let was_live = hear_once(&config, tls.clone(), &listen, &namespace, &revocations).await;
        revocations.set_live(false);
        if was_live {
            delay = RECONNECT_FIRST;
        } else {
            tokio::time::sleep(delay / 2 + delay.mul_f64(fastrand::f64()) / 2).await;
            delay = (delay * 2).min(RECONNECT_LAST);
        }
    }
}

/// Connects, listens and announces the namespace's revocations until the
/// connection ends or no holder listens any more; whether it got as far
/// as listening.
async fn hear_once(
    config: &tokio_postgres::Config,
    tls: Tls,
    listen: &str,
    namespace: &str,
    revocations: &Revocations,
) -> bool {
    let Ok((client, mut connection)) = config.connect(tls).await else { return false };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    if !run_while_polled(client.batch_execute(listen), &mut messages).await {
        return false;
    }
    revocations.set_live(true);
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    let revocation = notification
                        .payload()
                        .split_once(' ')
                        .filter(|(of, _)| *of == namespace)
                        .and_then(|(_, message)| Revocation::from_message(message));
                    if let Some(revocation) = revocation {
                        revocations.announce(revocation);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            () = tokio::time::sleep(STILL_WANTED_EVERY) => {
                if !revocations.still_wanted() {
                    break;
                }
            }
        }
    }
    // `client` lives until here: dropping it closes the connection.
    drop(client);
    true
}

/// The payload of the revocation of `grant` in `namespace`, as
/// [`hear_once`] reads it.
pub(crate) fn revocation_payload(namespace: &str, grant: &Grant) -> String {
    format!("{namespace} {}", Revocation::of(grant).to_message())
}
