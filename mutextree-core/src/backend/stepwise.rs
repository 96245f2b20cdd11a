//! The seed's stepwise algorithm, over a store's primitives only.
//!
//! For a store that offers just expiring single-key locks and "the locks
//! under this prefix", a tree grant for `[A, B, D]` goes:
//!
//! 1. lock each strict ancestor's key, root first (`[A]`, then `[A, B]`) as a
//!    *transient* lock that lives [`TRANSIENT_TTL`] at most;
//! 2. lock the node's own key with the requested ttl;
//! 3. release the ancestors' transient locks, all at once, and meanwhile
//!    list the locks under the node: if there is one, release the node and
//!    report it.
//!
//! Any refusal releases what was taken and reports the lock in the way.
//!
//! # Why this order, and why it is safe
//!
//! The seed checked descendants *before* locking the node (its steps 2 and
//! 3), which lets a client locking `[A]` check, then a client locking
//! `[A, B]` pass through `[A]` and lock `[A, B]`, then the first lock `[A]`:
//! two holders. Checking after locking the node closes that window: of two
//! clients locking overlapping paths X (above) and N (below), either the
//! N-client passed through X before the X-client locked it, and then the
//! X-client's check finds N; or the X-client held X first, and then the
//! N-client cannot pass through it. Native grants (one atomic step that
//! looks at ancestors, the node and descendants) interleave with the steps
//! the same way, so stepwise and native clients can share a namespace.
//!
//! That argument needs the transient parent locks alive until the node is
//! locked, and no longer: they are released as soon as it is, so siblings
//! (who all pass through the same parents) queue behind each other for a
//! few round trips only. Their expiry is known on this side conservatively (the moment the
//! request was sent plus the ttl); if the node's grant arrives after the
//! earliest of them, the protection may have lapsed: the node is released
//! and the round starts again.
//!
//! # What it cannot do
//!
//! It costs `depth + 1` round trips (one more to undo a refused node), and
//! a client that dies (or an attempt that is cancelled) midway
//! leaves transient parent locks for at most [`TRANSIENT_TTL`] (the seed left
//! them for `timeout + 5` s) and its node lock for its ttl. A parent held
//! transiently by someone else is reported with
//! [`HeldLock::transient`](crate::HeldLock::transient) set; the acquisition
//! loop retries past it instead of failing, even when it was asked not to
//! wait, so siblings never refuse each other.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use futures::future::{join, join_all};
use tokio::time::Instant;

use super::contract::{LockBackend, StoreLabels};
use super::feed::Listener;
use crate::error::Error;
use crate::lock::HeldLock;
use crate::lock::{Attempt, Fairness, Grant, LockItems, LockKind, LockRequest, Mode, Owner, Queue, Ttl};
use crate::path::LockPath;

/// The life of a transient parent lock: how long a client that dies midway
/// can keep others out of a parent.
pub const TRANSIENT_TTL: Duration = Duration::from_secs(2);

/// How long an acquisition that was asked not to wait retries past one and
/// the same stepwise client's transient parent lock before it gives up.
///
/// Such a lock lives [`TRANSIENT_TTL`] at most, so in practice it is gone
/// first. Transient locks of *different* clients are waited out for as long
/// as they keep coming: siblings of stepwise clients all pass through the
/// same parents, one at a time, and each wake-up is a race among them; a
/// fixed limit from the start made siblings refuse each other on a loaded
/// machine, which is exactly what tree locks promise not to do. Each new
/// transient blocker is another client's progress, so the wait ends.
pub const TRANSIENT_PATIENCE: Duration = Duration::from_secs(5 * TRANSIENT_TTL.as_secs());

/// How many times a grant is retried when the store answered so slowly that
/// the transient parent locks may have expired before the node was locked.
const SLOW_ROUNDS: usize = 3;

/// A tree grant by the stepwise algorithm (see the module docs): of a
/// single Exclusive item only. Shared and multi-path requests are refused
/// with [`Error::Unsupported`] before anything is sent: a sequence of
/// single-key locks cannot grant them all-or-nothing, nor let Shared
/// holders coexist on one key. It cannot queue a waiter either: a request
/// that would join the queue is refused the same way, and one that does
/// not is served as barging (it does not see other clients'
/// reservations).
pub async fn try_grant<B: LockBackend + ?Sized>(backend: &B, request: &LockRequest) -> Result<Attempt, Error> {
    if matches!(request.queue, Queue::Join | Queue::Waiting(_)) {
        return Err(Error::Unsupported {
            store: "stepwise",
            reason: "the stepwise algorithm cannot queue a waiter (fair waiting needs a store's atomic grant); \
                     wait with Fairness::Barging"
                .into(),
        });
    }
    if !request.items.is_single_exclusive() {
        return Err(Error::Unsupported {
            store: "stepwise",
            reason: format!(
                "the stepwise algorithm grants one exclusive path at a time, not {}: \
                 Shared and multi-path locks need a store's atomic grant",
                request.items
            ),
        });
    }
    for _ in 0..SLOW_ROUNDS {
        if let Some(attempt) = one_round(backend, request).await? {
            return Ok(attempt);
        }
    }
    Err(Error::store_message(
        "stepwise",
        true,
        format!(
            "the store answered too slowly to lock {} stepwise: its parent locks expired \
             (after {TRANSIENT_TTL:?}) before the node was locked, {SLOW_ROUNDS} times",
            request.path()
        ),
    ))
}

/// A mode change through the stepwise algorithm: [`Error::Unsupported`],
/// since it grants Exclusive locks only.
pub async fn change_mode<B: LockBackend + ?Sized>(backend: &B, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
    let _ = backend;
    Err(Error::Unsupported {
        store: "stepwise",
        reason: format!("the stepwise algorithm holds exclusive locks only, so {} cannot become {mode}", grant.items),
    })
}

/// One pass of the algorithm; `None` when the parent locks may have lapsed.
async fn one_round<B: LockBackend + ?Sized>(backend: &B, request: &LockRequest) -> Result<Option<Attempt>, Error> {
    let transient_ttl = Ttl::new(TRANSIENT_TTL)?;
    let mut parents: Vec<Grant> = Vec::with_capacity(request.path().depth() - 1);
    let locked = lock_parents_then_node(backend, request, transient_ttl, &mut parents).await;
    let parents_alive_until = parents.iter().map(|p| p.expires_at).min();
    // The parents only have to stand until the node is locked: they are
    // released now, all at once, while the subtree is checked. A parent that
    // cannot be released expires within TRANSIENT_TTL.
    let release_parents = join_all(parents.iter().map(|parent| backend.release(parent)));
    let node = match locked {
        Ok(Attempt::Granted(node)) => node,
        other => {
            release_parents.await;
            return other.map(Some);
        }
    };
    if parents_alive_until.is_some_and(|until| Instant::now() >= until) {
        release_parents.await;
        let _ = backend.release(&node).await;
        return Ok(None);
    }
    let (_, below) = join(release_parents, backend.list(Some(request.path()))).await;
    let below = match below {
        Ok(below) => below,
        Err(error) => {
            let _ = backend.release(&node).await;
            return Err(error);
        }
    };
    // Prefer a held lock to a transient one: a transient one is waited out
    // even by a non-blocking acquisition.
    match below.into_iter().filter(|held| held.path != *request.path()).min_by_key(|held| held.transient) {
        Some(descendant) => {
            let _ = backend.release(&node).await;
            Ok(Some(Attempt::Blocked(descendant.into())))
        }
        None => Ok(Some(Attempt::Granted(node))),
    }
}

/// Steps 1 and 2: the ancestors' transient locks (pushed to `parents` as
/// they are granted), then the node's.
async fn lock_parents_then_node<B: LockBackend + ?Sized>(
    backend: &B,
    request: &LockRequest,
    transient_ttl: Ttl,
    parents: &mut Vec<Grant>,
) -> Result<Attempt, Error> {
    for ancestor in request.path().ancestors() {
        let parent = LockRequest::new(ancestor, request.owner.clone(), transient_ttl);
        match backend.try_lock_key(&parent, LockKind::Transient).await? {
            Attempt::Granted(grant) => parents.push(grant),
            blocked => return Ok(blocked),
        }
    }
    backend.try_lock_key(request, LockKind::Lock).await
}

/// A store seen through the seed's stepwise algorithm: tree grants go
/// through [`try_grant`] over the store's primitives instead of its
/// native atomic operation; everything else is the store's own, except
/// forced release: like the seed's clients, a stepwise client neither
/// announces one nor hears one (the contract's defaults: a plain release,
/// and a holder that finds its grant gone at its next refresh).
///
/// Useful to check that a store's primitives are enough for tree locks, and
/// to run old-style clients beside native ones on one namespace (they
/// interoperate: native grants respect the stepwise client's transient
/// parent locks, and the stepwise client sees native locks as keys).
#[derive(Debug, Clone)]
pub struct Stepwise<B: ?Sized> {
    inner: Arc<B>,
}

impl<B: LockBackend + ?Sized> Stepwise<B> {
    /// Wraps a store.
    pub fn new(inner: Arc<B>) -> Self {
        Stepwise { inner }
    }
}

#[async_trait]
impl<B: LockBackend + ?Sized> LockBackend for Stepwise<B> {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.inner.try_lock_key(request, kind).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        self.inner.release(grant).await
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        self.inner.refresh(grant, ttl).await
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.inner.list(under).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        try_grant(&*self.inner, request).await
    }

    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        change_mode(&*self.inner, grant, mode).await
    }

    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        self.inner.withdraw(owner, ticket).await
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.inner.waiters(under).await
    }

    /// Barging: the stepwise algorithm cannot queue a waiter.
    fn fairness(&self) -> Fairness {
        Fairness::Barging
    }

    fn listen(&self, items: &LockItems) -> Listener {
        self.inner.listen(items)
    }

    fn round_trips(&self) -> Option<u64> {
        self.inner.round_trips()
    }

    fn labels(&self) -> StoreLabels<'_> {
        self.inner.labels()
    }
}
