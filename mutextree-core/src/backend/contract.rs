//! The contract between the lock handle and a store: [`LockBackend`].
//!
//! A store implements [`LockBackend`]: the seed's primitives (an expiring
//! lock on one node's key with an owner id, and the list of locks under a
//! key prefix), release and refresh of one grant, the tree operation, and
//! optionally wake-ups. The trait is object safe; the handle works on
//! `Arc<dyn LockBackend>`, so code written against the memory store runs
//! unchanged on Redis, etcd or PostgreSQL.
//!
//! Like object_store's `ObjectStore`, the trait has few default methods,
//! because a default is easy for an implementer to get subtly wrong. The
//! ones it has are honest fallbacks (polling with backoff for wake-ups, a
//! forced release that tells nobody, no count of round trips). The tree operation has none: a store without an
//! atomic one says so by answering with the stepwise algorithm over its
//! primitives ([`super::stepwise`]), which sits above this contract.
//!
//! Below the trait are the few helpers every store needs alike, written
//! once here rather than again in each store crate: [`Check`] (what a grant
//! must find free), [`quote`](super::quote) (rejected input as a message shows it) and
//! [`AbortOnDrop`] (a store's background task, ended with its owner). A
//! store's release and refresh answer a grant that is not live with
//! [`Error::not_held`].

use std::fmt;

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::feed::{Listener, RevocationListener};
use crate::error::Error;
use crate::lock::{Attempt, Fairness, Grant, HeldLock, LockItems, LockKind, LockRequest, Mode, Owner, Ttl};
use crate::path::LockPath;

/// An expiring-lock store with owner ids, seen through one namespace.
///
/// # Contract
///
/// * Inputs are valid by construction; a store does not re-check them.
/// * "Live" means granted, not released and not expired, by the store's own
///   clock (never a client's).
/// * Every method that reads or writes the store either completes or fails
///   with [`Error::Store`]; a failure after the request was sent may still
///   have taken effect, and anything it granted expires at its ttl.
/// * Tokens: every grant (of either kind) takes a fencing token strictly
///   greater than every token granted before in the namespace.
#[async_trait]
pub trait LockBackend: Send + Sync + fmt::Debug {
    /// Primitive: locks the single key of `request.path` if no live lock is
    /// on that exact key, ignoring ancestors and descendants. `kind` is
    /// stored with the lock and reported in [`HeldLock::transient`].
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error>;

    /// Releases exactly this grant: all its items, found by owner and
    /// token. `grant` is the grant as it was made (every item: a tool that
    /// rebuilds one from [`list`](LockBackend::list) gathers the entries
    /// that share its token). Fails with [`Error::NotHeld`], changing
    /// nothing, if it is not live.
    async fn release(&self, grant: &Grant) -> Result<(), Error>;

    /// Releases exactly this grant by force, as [`release`](LockBackend::release)
    /// does (same outcome, same [`Error::NotHeld`]), and announces it to
    /// its holder: an administrator taking a lock away.
    ///
    /// Why a method of its own: after a plain release the holder learns
    /// of its loss only at its next refresh (with automatic refresh, up to
    /// a third of its ttl later: about 100 s with a 5-minute ttl) and works
    /// on unprotected meanwhile. A store that can notify sends the grant's
    /// [`Revocation`](super::feed::Revocation) to every process
    /// that listens ([`listen_revocation`](LockBackend::listen_revocation)),
    /// so that the holder's [`lost`](crate::TreeLock::lost) resolves at
    /// once. An ordinary release never announces anything: a revocation is
    /// rare, and only it pays for the announcement.
    ///
    /// The default, for a store that cannot notify (and for the stepwise
    /// algorithm, [`Stepwise`](super::Stepwise)), is the plain release:
    /// the holder hears nothing and finds the grant gone at its next
    /// refresh.
    async fn revoke(&self, grant: &Grant) -> Result<(), Error> {
        self.release(grant).await
    }

    /// A listener that resolves when this grant is revoked
    /// ([`revoke`](LockBackend::revoke)) by any client of the namespace,
    /// taken by its holder while it wants to know. A store subscribes to
    /// its revocations (at most once per backend and process) only while
    /// such a listener lives; a revocation sent while it is not subscribed
    /// is missed, which costs latency only.
    ///
    /// The default, for a store that cannot notify, never resolves.
    fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        let _ = grant;
        RevocationListener::unannounced()
    }

    /// Sets the remaining life of exactly this grant to `ttl` (not adds to
    /// it), returning the grant with its new ttl and expiry. Fails with
    /// [`Error::NotHeld`], changing nothing, if it is not live.
    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error>;

    /// Primitive and inspection: the live locks on `under` and below it, or
    /// in the whole namespace for `None`, in key order.
    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error>;

    /// The tree operation: grants every item of `request` iff, at one
    /// instant, no live item of another grant conflicts with any of them
    /// (a comparable path, not both Shared; the same owner included: see
    /// [`Mode`]) and, unless the request barges, no live reservation that
    /// comes before it in the queue conflicts with any of them (see
    /// [`Fairness`] and [`Queue`](crate::backend::Queue)); otherwise grants
    /// nothing and reports, for each blocked item, one live item in the
    /// way (a grant's, or else a reservation's). All or nothing, one token.
    ///
    /// The queue's bookkeeping is part of the same atomic step: a refused
    /// [`Queue::Join`](crate::backend::Queue::Join) request takes a ticket
    /// (the next token) and writes its reservation, a refused
    /// [`Queue::Waiting`](crate::backend::Queue::Waiting) one renews it, a
    /// granted `Waiting` one removes it; both refusals answer
    /// [`Attempt::Queued`].
    ///
    /// Every shipped store does it in one atomic operation and one round
    /// trip. A store with only the primitives can answer with the seed's
    /// stepwise algorithm over them:
    /// [`stepwise::try_grant(self, request)`](super::stepwise::try_grant),
    /// which grants single Exclusive items and refuses the rest with
    /// [`Error::Unsupported`].
    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error>;

    /// Changes every item of the live `grant` to `mode` in one atomic step,
    /// with a new fencing token, returning the changed grant (same items,
    /// owner and expiry).
    ///
    /// Either way it is granted iff no live item of another grant
    /// conflicts with the changed items; otherwise [`Attempt::Blocked`]
    /// naming them, and the grant is left as it was. It never waits: two
    /// Shared holders upgrading would wait for each other.
    /// [`Error::NotHeld`], changing nothing, if the grant is not live.
    ///
    /// To [`Mode::Shared`] (a downgrade), the check only matters beside
    /// stepwise clients: natively, nothing conflicts with a live grant, so
    /// a downgrade always succeeds. A stepwise client, though, holds its
    /// node's key (and its token) before it looks below it; a downgrade
    /// below in between would take a newer token, and if its holder then
    /// released, the stepwise grant would hold an older token than a
    /// conflicting holder before it. Refusing the downgrade for the moment
    /// the stepwise client needs keeps tokens rising across conflicting
    /// grants.
    ///
    /// The handle only asks for a change that changes a mode. A store
    /// seen through the stepwise algorithm answers
    /// [`stepwise::change_mode`](super::stepwise::change_mode):
    /// [`Error::Unsupported`].
    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error>;

    /// Removes the reservation with `ticket` of `owner`, if it is there: a
    /// waiter that stops waiting (timed out, cancelled) no longer delays
    /// anyone. Succeeds whether or not it was there (it may have lapsed).
    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error>;

    /// The live reservations on `under` and below it, or in the whole
    /// namespace for `None`, in key order: one [`HeldLock`] per item, with
    /// [`waiting`](HeldLock::waiting) set and the ticket as its token.
    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error>;

    /// How this namespace's requests wait unless a handle says otherwise
    /// (a store's configuration may choose [`Fairness::Barging`]).
    fn fairness(&self) -> Fairness {
        Fairness::Fair
    }

    /// A listener for changes that may unblock a waiter for `items` (a
    /// release, a purged expired lock), taken *before* an attempt so that a
    /// release between the refusal and the wait is not missed. A store may
    /// wake it only for changes on the items' paths, their ancestors or
    /// their descendants, or for any change in the namespace.
    ///
    /// The default polls with jittered backoff; stores override it with their
    /// notifications ([`ChangeFeed`](super::feed::ChangeFeed)).
    fn listen(&self, items: &LockItems) -> Listener {
        let _ = items;
        Listener::polling()
    }

    /// Which store this is and which namespace it serves, as the spans
    /// and metrics of [`telemetry`](crate::telemetry) label them.
    fn labels(&self) -> StoreLabels<'_> {
        StoreLabels { store: "custom", namespace: "" }
    }

    /// How many requests this client has sent to its store so far, for
    /// stores that count them (a benchmark's round trips per operation);
    /// `None` for a store without requests or without a count.
    fn round_trips(&self) -> Option<u64> {
        None
    }
}

/// A backend's name for [`telemetry`](crate::telemetry): its store
/// (`memory`, `redis`, `postgres`, `etcd`; a metric label) and its
/// namespace (a span field only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLabels<'a> {
    /// The store, as [`Error::Store`] names it.
    pub store: &'static str,
    /// The namespace.
    pub namespace: &'a str,
}

/// What a grant must find free. One grant routine of a store serves both
/// the tree operation and the stepwise algorithm's primitive, and is told
/// which one it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The node, its ancestors and its descendants: the tree operation,
    /// [`LockBackend::try_grant`].
    Tree,
    /// The node's own key only: the stepwise algorithm's primitive,
    /// [`LockBackend::try_lock_key`].
    KeyOnly,
}

/// A background task that lives exactly as long as this value: dropping
/// it aborts the task. A store keeps one for each task it runs for a
/// backend (a subscription, a watch, a listening connection), in the state
/// its clones share, so the task ends when the last clone is dropped
/// rather than running on for nobody.
#[derive(Debug)]
pub struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// Takes charge of `task`.
    pub fn new(task: JoinHandle<()>) -> Self {
        AbortOnDrop(task)
    }

    /// Whether the task has ended (finished, panicked, or its runtime shut
    /// down), so that it must be started again to run.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_abort_on_drop_ends_its_task() {
        let (alive, ended) = tokio::sync::oneshot::channel::<()>();
        let task = AbortOnDrop::new(tokio::spawn(async move {
            let _alive = alive;
            std::future::pending::<()>().await;
        }));
        assert!(!task.is_finished());
        drop(task);
        // The sender goes only when the aborted task's future is dropped.
        assert!(ended.await.is_err(), "the task ended without sending");
    }
}
