//! Waiting for a lock: notifications first, the blocker's expiry always,
//! polling only as the fallback.
//!
//! A blocked acquisition sleeps until the first of:
//!
//! * a change the store reports (a release, a purged expired lock) through
//!   the [`Listener`] taken *before* the attempt, so a release that lands
//!   between the refusal and the sleep still wakes it;
//! * the blocker's expiry, as the store reported its remaining life (expiry
//!   sends no notification in any store);
//! * the caller's deadline.
//!
//! Stores publish changes into a [`ChangeFeed`](crate::backend::ChangeFeed)
//! (see [`crate::backend::feed`]); a store without notifications gives polling
//! listeners.
//!
//! A waiter woken by a change that then finds the same lock in its way
//! (the change concerned someone else, or was its own stepwise attempt
//! releasing the node it had just locked) waits one backoff step before
//! listening again, so unrelated churn cannot make it spin.
//!
//! A fair acquisition (see [`Fairness`]) that has to wait joins the
//! queue: its first refused attempt writes a reservation with a ticket,
//! and each later attempt renews it; it wakes at least every third of
//! [`RESERVATION_TTL`] to do so. The reservation goes with the grant, and
//! is withdrawn (in the background) when the wait ends any other way.
//!
//! Nothing here holds a lock in the store between attempts, and no
//! attempt is abandoned once sent: a timed wait awaits the reply of an
//! attempt in flight at its deadline, and a dropped acquisition leaves its
//! attempt to finish in the background, where a late grant is released
//! ([`Acquisition`] has the details). Only a reply lost to a fault leaves a
//! grant behind, and it expires at its ttl.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};

use crate::backend::contract::LockBackend;
use crate::backend::feed::Listener;
use crate::backend::stepwise::TRANSIENT_PATIENCE;
use crate::error::Error;
use crate::lock::{Attempt, Blockers, Fairness, Grant, HeldLock, LockRequest, Owner, Queue, RESERVATION_TTL};
use crate::path::LockPath;
use crate::telemetry::{self, in_span, Acquiring, Instruments};

/// How long an acquisition may wait for a held lock.
///
/// The default is [`Wait::Forever`], as `Mutex::lock` and
/// `threading.Lock.acquire()` wait; [`TreeLock::try_lock`](crate::TreeLock::try_lock)
/// never waits.
///
/// ```
/// # use std::{sync::Arc, time::Duration};
/// # use mutextree_core::{Error, LockBackend, TreeLock, Wait};
/// # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
/// let rack = TreeLock::new(store, "eu-west/rack-12")?;
/// let guard = rack.lock_with(Wait::For(Duration::from_secs(5))).await?;
/// # drop(guard); Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Wait {
    /// Do not wait: a held lock is an immediate [`Error::Refused`] (the
    /// seed's `timeout=0`).
    No,
    /// Wait up to this long, then fail with [`Error::Timeout`].
    For(Duration),
    /// Wait until granted.
    #[default]
    Forever,
}

/// Called each time an acquisition is refused and is about to wait behind
/// a lock (for a progress line: what blocks, and for how long).
pub type OnWait = Arc<dyn Fn(&HeldLock) + Send + Sync>;

/// Acquires `request` on `backend`, waiting as `wait` allows (see the module
/// docs). The lock handle is built on this; it is public for stores' and
/// tools' own loops. [`Acquisition`] gives the same with more choices.
pub async fn acquire(backend: &Arc<dyn LockBackend>, request: &LockRequest, wait: Wait) -> Result<Grant, Error> {
    Acquisition::new(backend, request, wait).run().await
}

/// One acquisition: its attempts, its deadline, and how it waits between
/// them. Each rule is one method; [`Acquisition::run`] strings them
/// together.
///
/// # Deadlines and replies
///
/// No attempt is *started* once the deadline has passed, and an attempt
/// started before it is always seen through to its reply (each store bounds
/// its own requests), so a timed wait may end a little after its deadline.
/// A grant that arrives then is returned, not thrown away: it was asked for
/// in time, it is valid, and releasing it would only make a waiter behind
/// it wait longer.
///
/// # Cancellation
///
/// Dropping the future of [`Acquisition::run`] never leaves a live grant
/// behind. An attempt that may have reached the store when the future is
/// dropped is finished in the background (on the [`Background`] given, or
/// one of its own), and a grant it brings back is released there, with a
/// few retries. Only a reply lost to a fault leaves a grant, which expires
/// at its ttl.
pub struct Acquisition<'a> {
    backend: &'a Arc<dyn LockBackend>,
    request: &'a LockRequest,
    wait: Wait,
    started: Instant,
    deadline: Option<Instant>,
    listener: Listener,
    /// Where a cancelled attempt finishes; one of its own if none is given.
    background: Option<&'a Background>,
    on_wait: Option<OnWait>,
    /// The metric handles to report into, if the caller keeps some.
    instruments: Option<&'a Instruments>,
    /// The blocker met last, by path and token.
    last_blocker: Option<(LockPath, u64)>,
    /// Whether the last wake-up was a change the store reported.
    woken_by_change: bool,
    /// The transient blocker seen last, and since when.
    transient_since: Option<((LockPath, u64), Instant)>,
    /// Whether to queue behind earlier waiters.
    fairness: Fairness,
    /// The ticket of this acquisition's reservation, while it may have
    /// one in the store.
    ticket: Option<u64>,
}

impl fmt::Debug for Acquisition<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquisition")
            .field("request", self.request)
            .field("wait", &self.wait)
            .field("started", &self.started)
            .field("last_blocker", &self.last_blocker)
            .finish_non_exhaustive()
    }
}

impl<'a> Acquisition<'a> {
    /// An acquisition of `request` that waits as `wait` says; its clock
    /// starts now.
    pub fn new(backend: &'a Arc<dyn LockBackend>, request: &'a LockRequest, wait: Wait) -> Self {
        let started = Instant::now();
        let deadline = match wait {
            Wait::No => Some(started),
            Wait::For(limit) => started.checked_add(limit),
            Wait::Forever => None,
        };
        Acquisition {
            backend,
            request,
            wait,
            started,
            deadline,
            listener: backend.listen(&request.items),
            background: None,
            on_wait: None,
            last_blocker: None,
            woken_by_change: false,
            transient_since: None,
            fairness: backend.fairness(),
            ticket: None,
            instruments: None,
        }
    }

    /// Whether to queue behind earlier waiters (default: the store's
    /// [`LockBackend::fairness`]).
    pub fn fairness(mut self, fairness: Fairness) -> Self {
        self.fairness = fairness;
        self
    }

    /// Where attempts cut off by a dropped future finish (see
    /// [`Background::settled`]).
    pub fn in_background(mut self, background: &'a Background) -> Self {
        self.background = Some(background);
        self
    }

    /// Reports into `instruments` (a lock handle's) rather than registering
    /// its metrics anew.
    pub(crate) fn reporting_to(mut self, instruments: &'a Instruments) -> Self {
        self.instruments = Some(instruments);
        self
    }

    /// Calls `on_wait` each time the acquisition is about to wait behind a
    /// lock.
    pub fn on_wait(mut self, on_wait: Option<OnWait>) -> Self {
        self.on_wait = on_wait;
        self
    }

    /// Attempts until granted, refused or out of time. A blocker that is a
    /// stepwise client's transient parent lock is waited out even with
    /// [`Wait::No`] (one such lock for at most [`TRANSIENT_PATIENCE`]): it
    /// is gone in a moment, and treating it as held would make siblings
    /// refuse each other. A timed wait never goes past its own deadline
    /// for it.
    ///
    /// Observed (see [`telemetry`](crate::telemetry)) only if a subscriber
    /// or the metrics can see it: otherwise the attempts run bare, with no
    /// span layer and no observer in their future.
    pub async fn run(mut self) -> Result<Grant, Error> {
        if !telemetry::watched() {
            return self.attempts(None).await;
        }
        let mut observed =
            Acquiring::start(self.backend.as_ref(), self.request, self.wait, self.started, self.instruments);
        let outcome = in_span(observed.span(), self.attempts(Some(&mut observed))).await;
        observed.finish(&outcome);
        outcome
    }

    /// The attempts and waits of [`Acquisition::run`], told to `observed`
    /// if anything listens.
    async fn attempts(&mut self, mut observed: Option<&mut Acquiring<'_>>) -> Result<Grant, Error> {
        loop {
            let blockers = match self.attempt().await? {
                Attempt::Granted(grant) => {
                    // A grant takes the reservation away with it.
                    self.ticket = None;
                    return Ok(grant);
                }
                Attempt::Blocked(blockers) => blockers,
                Attempt::Queued { ticket, blockers } => {
                    self.ticket = Some(ticket);
                    blockers
                }
            };
            // A multi-path request waits for its blockers one at a time: the
            // first, then whichever is in the way at the next attempt.
            let blocker = blockers.first();
            if let Some(observed) = &observed {
                observed.refused(blocker, self.ticket);
            }
            let spurious = self.note_blocker(blocker);
            let give_up_at = self.give_up_at(blocker);
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                return Err(self.gave_up(blockers));
            }
            if let Some(on_wait) = &self.on_wait {
                on_wait(blocker);
            }
            if let Some(observed) = observed.as_deref_mut() {
                observed.waits();
            }
            self.sleep(blocker, give_up_at, spurious).await;
            if let Some(observed) = &observed {
                observed.woken(blocker, self.woken_by_change);
            }
            // No attempt starts once the deadline has passed.
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                return Err(self.gave_up(blockers));
            }
        }
    }

    /// Where the next attempt stands in the waiters' queue.
    fn queue(&self) -> Queue {
        match (self.fairness, self.wait, self.ticket) {
            (Fairness::Barging, _, _) => Queue::Barge,
            (Fairness::Fair, Wait::No, _) => Queue::Try,
            (Fairness::Fair, _, None) => Queue::Join,
            (Fairness::Fair, _, Some(ticket)) => Queue::Waiting(ticket),
        }
    }

    /// One attempt, seen through to its reply even if this future is
    /// dropped (see [`InFlight`]).
    async fn attempt(&mut self) -> Result<Attempt, Error> {
        let backend = Arc::clone(self.backend);
        let request = self.request.in_queue(self.queue());
        let call = Box::pin(async move { backend.try_grant(&request).await });
        InFlight {
            call: Some(call),
            backend: self.backend,
            background: self.background,
            owner: &self.request.owner,
            ticket: &mut self.ticket,
        }
        .await
    }

    /// Remembers `blocker`; whether the wake-up that led here was spurious
    /// (a change that did not move this blocker).
    fn note_blocker(&mut self, blocker: &HeldLock) -> bool {
        let this_blocker = Some((blocker.path.clone(), blocker.token));
        let same_blocker = self.last_blocker == this_blocker;
        if !same_blocker {
            self.listener.reset();
        }
        self.last_blocker = this_blocker;
        self.woken_by_change && same_blocker
    }

    /// When to stop waiting behind `blocker`: the deadline, or for a try
    /// that met a transient lock, a while past it.
    fn give_up_at(&mut self, blocker: &HeldLock) -> Option<Instant> {
        match (self.wait, self.deadline) {
            (Wait::No, Some(deadline)) if blocker.transient => {
                let key = (blocker.path.clone(), blocker.token);
                let since = match &self.transient_since {
                    Some((seen, since)) if *seen == key => *since,
                    _ => Instant::now(),
                };
                self.transient_since = Some((key, since));
                Some(deadline.max(since + TRANSIENT_PATIENCE))
            }
            (_, deadline) => deadline,
        }
    }

    /// The error for an acquisition that stops waiting behind `blockers`.
    fn gave_up(&self, blockers: Blockers) -> Error {
        let items = self.request.items.clone();
        match self.wait {
            Wait::No => Error::Refused { items, blockers },
            _ => Error::Timeout { items, waited: self.started.elapsed(), blockers },
        }
    }

    /// Sleeps until a change the store reports, the blocker's expiry or
    /// `give_up_at`, whichever comes first; after a spurious wake-up, one
    /// backoff step instead of a change, unless the waiter is queued.
    async fn sleep(&mut self, blocker: &HeldLock, give_up_at: Option<Instant>, spurious: bool) {
        // Expiry sends no notification: retry just after the blocker's.
        let mut wake_at = Instant::now() + blocker.remaining + Duration::from_millis(1);
        if self.ticket.is_some() {
            // Each attempt renews the reservation.
            wake_at = wake_at.min(Instant::now() + RESERVATION_TTL / 3);
        }
        let wake_at = give_up_at.map_or(wake_at, |at| at.min(wake_at));
        let listener = &mut self.listener;
        // A queued waiter never backs off: nobody may take its turn, so a
        // backoff step that outlasts the lock's release leaves the lock
        // idle (and every waiter queued behind it).
        let back_off = spurious && self.ticket.is_none();
        let woken = async {
            if back_off {
                listener.pause().await;
                false
            } else {
                // A polling listener's wake is a backoff step, not news.
                let notified = listener.is_notified();
                listener.changed().await;
                notified
            }
        };
        self.woken_by_change = tokio::select! {
            woken = woken => woken,
            () = sleep_until(wake_at) => false,
        };
    }
}

/// A store call, owned so that it can outlive the acquisition that made it.
type Call = Pin<Box<dyn Future<Output = Result<Attempt, Error>> + Send>>;

impl Drop for Acquisition<'_> {
    /// A wait that ends without a grant (timed out, failed, cancelled)
    /// withdraws its reservation, in the background. (If an attempt was in
    /// flight, its `InFlight` took the ticket and withdraws once the
    /// attempt is answered, so that the attempt cannot renew the
    /// reservation after the withdrawal.)
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let background = self.background.cloned().unwrap_or_default();
            background.withdraw(self.backend, &self.request.owner, ticket);
        }
    }
}

/// One attempt, polled in place. If it is dropped before the store
/// answered (its acquisition was cancelled), the call is handed to the
/// background, which sees it through and undoes what it brings: it
/// releases a grant (see [`Background::release_now`]) and withdraws a
/// reservation. A request already sent is never abandoned, and only a
/// cancelled attempt pays for a task.
struct InFlight<'a> {
    call: Option<Call>,
    backend: &'a Arc<dyn LockBackend>,
    background: Option<&'a Background>,
    owner: &'a Owner,
    /// The acquisition's ticket: taken over if the attempt is cancelled.
    ticket: &'a mut Option<u64>,
}

impl Future for InFlight<'_> {
    type Output = Result<Attempt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(call) = self.call.as_mut() else {
            return Poll::Ready(Err(Error::store_message("wait", true, "an attempt's reply was polled twice")));
        };
        let outcome = ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(outcome)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        // Outside a runtime nothing can finish it: a grant expires at its ttl.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let background = self.background.cloned().unwrap_or_default();
        let backend = Arc::clone(self.backend);
        let (owner, sent_with) = (self.owner.clone(), self.ticket.take());
        background.clone().spawn(async move {
            match call.await {
                Ok(Attempt::Granted(grant)) => background.release_now(&backend, grant).await,
                Ok(Attempt::Queued { ticket, .. }) => background.withdraw_now(&backend, &owner, ticket).await,
                _ => {
                    if let Some(ticket) = sent_with {
                        background.withdraw_now(&backend, &owner, ticket).await;
                    }
                }
            }
        });
    }
}

/// Work left to finish after the caller moved on: the releases of dropped
/// guards and of grants that arrived for dropped acquisitions. Cheap to
/// clone; all clones count the same work.
///
/// Each [`TreeLock`](crate::TreeLock) has one, so that a program (or a test)
/// can wait until whatever it dropped is cleaned up:
/// [`TreeLock::settled`](crate::TreeLock::settled).
#[derive(Clone, Debug)]
pub struct Background {
    pending: Arc<watch::Sender<usize>>,
}

impl Default for Background {
    fn default() -> Self {
        Background { pending: Arc::new(watch::Sender::new(0)) }
    }
}

impl Background {
    /// How many times a background release is tried before the grant is
    /// left to expire at its ttl.
    pub const RELEASE_TRIES: u32 = 3;

    /// Runs `work` as a task, counted until it ends (or is cancelled with
    /// its runtime).
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let counted = Counted::new(self);
        tokio::spawn(async move {
            work.await;
            drop(counted);
        });
    }

    /// Releases `grant` in the background (see [`Background::release_now`]).
    /// Outside a tokio runtime nothing can run, and the grant expires at its
    /// ttl.
    pub fn release(&self, backend: &Arc<dyn LockBackend>, grant: Grant) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let backend = Arc::clone(backend);
        let this = self.clone();
        self.spawn(async move { this.release_now(&backend, grant).await });
    }

    /// Releases `grant`, trying again after a store error up to
    /// [`Background::RELEASE_TRIES`] times in all, and never once the grant
    /// has expired anyway.
    pub async fn release_now(&self, backend: &Arc<dyn LockBackend>, grant: Grant) {
        let mut pause = Duration::from_millis(50);
        for _ in 0..Self::RELEASE_TRIES {
            match backend.release(&grant).await {
                Ok(()) | Err(Error::NotHeld { .. }) => return,
                Err(_) if grant.is_expired() => return,
                Err(_) => {
                    sleep(pause.min(grant.remaining())).await;
                    pause *= 4;
                }
            }
        }
    }

    /// Withdraws the reservation `ticket` of `owner` in the background
    /// (see [`Background::withdraw_now`]); outside a tokio runtime it
    /// lapses by itself within [`RESERVATION_TTL`].
    pub fn withdraw(&self, backend: &Arc<dyn LockBackend>, owner: &Owner, ticket: u64) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (backend, owner, this) = (Arc::clone(backend), owner.clone(), self.clone());
        self.spawn(async move { this.withdraw_now(&backend, &owner, ticket).await });
    }

    /// Withdraws the reservation `ticket` of `owner`, trying again after a
    /// store error up to [`Background::RELEASE_TRIES`] times in all; it
    /// lapses by itself within [`RESERVATION_TTL`] otherwise.
    pub async fn withdraw_now(&self, backend: &Arc<dyn LockBackend>, owner: &Owner, ticket: u64) {
        let mut pause = Duration::from_millis(50);
        for _ in 0..Self::RELEASE_TRIES {
            if backend.withdraw(owner, ticket).await.is_ok() {
                return;
            }
            sleep(pause).await;
            pause *= 4;
        }
    }

    /// Resolves once no background work is left (at once if there is
    /// none).
    pub async fn settled(&self) {
        let mut pending = self.pending.subscribe();
        // The sender lives in `self`, so the channel cannot close.
        let _ = pending.wait_for(|count| *count == 0).await;
    }
}

/// Counts one piece of background work while it lives.
struct Counted(Arc<watch::Sender<usize>>);

impl Counted {
    fn new(background: &Background) -> Self {
        background.pending.send_modify(|count| *count += 1);
        Counted(Arc::clone(&background.pending))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{LockItems, LockKind, Mode, Owner, Ttl};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Refuses every tree grant with a stepwise client's transient parent
    /// lock until `free_at`: a new one each time, or always the same.
    #[derive(Debug)]
    struct TransientParents {
        free_at: Instant,
        same_lock: bool,
        attempts: AtomicU64,
    }

    #[async_trait::async_trait]
    impl LockBackend for TransientParents {
        async fn try_lock_key(&self, _request: &LockRequest, _kind: LockKind) -> Result<Attempt, Error> {
            unreachable!("only tree grants are asked")
        }
        async fn release(&self, grant: &Grant) -> Result<(), Error> {
            Err(Error::not_held(grant))
        }
        async fn refresh(&self, grant: &Grant, _ttl: Ttl) -> Result<Grant, Error> {
            Err(Error::not_held(grant))
        }
        async fn list(&self, _under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
            Ok(Vec::new())
        }
        async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
            if Instant::now() >= self.free_at {
                return Ok(Attempt::Granted(Grant::new(request, LockKind::Lock, 1, request.ttl.get(), Instant::now())));
            }
            Ok(Attempt::Blocked(Blockers::from(HeldLock {
                path: request.path().parent().expect("a child"),
                mode: Mode::Exclusive,
                owner: Owner::new("stepwise sibling").expect("owner"),
                token: if self.same_lock { 7 } else { attempt + 100 },
                remaining: Duration::from_millis(50),
                transient: true,
                waiting: false,
                waited: Duration::ZERO,
            })))
        }
        async fn change_mode(&self, grant: &Grant, _mode: Mode) -> Result<Attempt, Error> {
            Err(Error::not_held(grant))
        }
        async fn withdraw(&self, _owner: &Owner, _ticket: u64) -> Result<(), Error> {
            Ok(())
        }
        async fn waiters(&self, _under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
            Ok(Vec::new())
        }
        fn fairness(&self) -> crate::lock::Fairness {
            crate::lock::Fairness::Barging
        }
        fn listen(&self, _items: &LockItems) -> Listener {
            Listener::polling()
        }
    }

    fn sibling() -> LockRequest {
        let path = LockPath::parse("dc/rack/host").expect("path");
        LockRequest::new(path, Owner::new("me").expect("owner"), Ttl::new(Duration::from_secs(5)).expect("ttl"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_waits_out_other_clients_transient_locks_for_as_long_as_they_come() {
        let started = Instant::now();
        let backend: Arc<dyn LockBackend> = Arc::new(TransientParents {
            free_at: started + TRANSIENT_PATIENCE * 3,
            same_lock: false,
            attempts: AtomicU64::new(0),
        });
        let grant = acquire(&backend, &sibling(), Wait::No).await.expect("granted once the parents are free");
        assert_eq!(grant.token, 1);
        assert!(started.elapsed() >= TRANSIENT_PATIENCE * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_gives_up_on_one_transient_lock_that_stays() {
        let started = Instant::now();
        let backend: Arc<dyn LockBackend> = Arc::new(TransientParents {
            free_at: started + TRANSIENT_PATIENCE * 3,
            same_lock: true,
            attempts: AtomicU64::new(0),
        });
        match acquire(&backend, &sibling(), Wait::No).await {
            Err(Error::Refused { blockers, .. }) => {
                assert!(blockers.first().transient && blockers.first().token == 7, "{blockers:?}")
            }
            other => panic!("refused by the stuck lock, got {other:?}"),
        }
        let waited = started.elapsed();
        assert!(waited >= TRANSIENT_PATIENCE && waited < TRANSIENT_PATIENCE * 2, "{waited:?}");
    }
}
