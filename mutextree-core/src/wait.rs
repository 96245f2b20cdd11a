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
//! Stores publish changes into a [`ChangeFeed`] (one per namespace and
//! process, however many waiters). A store whose notification channel is
//! down marks the feed not live, and its listeners poll with jittered
//! backoff until it is back (and retry at once when it is): a lost
//! notification costs latency, never progress.
//!
//! A feed also tells its store whether anyone waits
//! ([`ChangeFeed::wanted`], [`ChangeFeed::still_wanted`]), so that a store
//! whose notifications cost every writer something (Redis publishes each
//! release to every subscribed connection) can keep its channel up only
//! while a waiter needs it. An acquisition that does not wait never asks.
//!
//! A waiter woken by a change that then finds the same lock in its way
//! (the change concerned someone else, or was its own stepwise attempt
//! releasing the node it had just locked) waits one backoff step before
//! listening again, so unrelated churn cannot make it spin.
//!
//! Nothing here holds anything in the store between attempts: dropping an
//! acquisition at any await point leaves at most a grant whose reply never
//! arrived, which expires at its ttl.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::{sleep, sleep_until, timeout_at, Instant};

use crate::backend::LockBackend;
use crate::error::Error;
use crate::lock::{Attempt, Grant, HeldLock, LockRequest};
use crate::path::LockPath;
use crate::stepwise::TRANSIENT_TTL;

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

/// How long an acquisition may wait for a held lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Wait {
    /// Do not wait: a held lock is an immediate [`Error::Refused`] (the
    /// seed's default, `timeout=0`).
    #[default]
    No,
    /// Wait up to this long, then fail with [`Error::Timeout`].
    For(Duration),
    /// Wait until granted.
    Forever,
}

/// Where a store publishes the changes its waiters care about.
///
/// Cheap to clone; all clones are one feed.
#[derive(Clone, Debug)]
pub struct ChangeFeed {
    state: watch::Sender<FeedState>,
    demand: Arc<Demand>,
}

/// Who waits on a feed (see [`ChangeFeed::wanted`]).
#[derive(Debug, Default)]
struct Demand {
    /// Listeners inside [`Listener::changed`] right now.
    waiting: AtomicUsize,
    /// Whether a listener waited since [`ChangeFeed::still_wanted`] last
    /// asked (set when one starts and when one stops waiting).
    waited: AtomicBool,
    /// Wakes [`ChangeFeed::wanted`].
    arrived: Notify,
}

impl Demand {
    /// Counts a waiter until the returned guard is dropped.
    fn enter(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.waited.store(true, Ordering::SeqCst);
        self.arrived.notify_one();
        Waiting(self)
    }
}

/// One listener inside [`Listener::changed`].
struct Waiting<'a>(&'a Demand);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waited.store(true, Ordering::SeqCst);
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug)]
struct FeedState {
    /// Bumped by every change.
    changes: u64,
    /// Whether notifications are arriving; listeners poll while not.
    live: bool,
}

impl ChangeFeed {
    /// A live feed.
    pub fn new() -> Self {
        ChangeFeed { state: watch::Sender::new(FeedState { changes: 0, live: true }), demand: Arc::default() }
    }

    /// Wakes every listener: something was released or removed.
    pub fn notify(&self) {
        // No receivers, no work: keeps the uncontended path free of a shared write.
        if self.state.receiver_count() > 0 {
            self.state.send_modify(|state| state.changes = state.changes.wrapping_add(1));
        }
    }

    /// Marks the feed live or not (a store's subscription connection went
    /// down or came back). Either way listeners wake and retry once.
    pub fn set_live(&self, live: bool) {
        self.state.send_modify(|state| {
            state.live = live;
            state.changes = state.changes.wrapping_add(1);
        });
    }

    /// A listener that wakes on the changes published after this call.
    pub fn listen(&self) -> Listener {
        Listener { feed: Some(self.state.subscribe()), demand: Some(self.demand.clone()), backoff: Backoff::new() }
    }

    /// Resolves as soon as a listener waits for a change (at once if one
    /// waits already): the moment a store that keeps its notification
    /// channel up only on demand should bring it up. Listeners poll
    /// meanwhile, and retry as soon as the feed is marked live.
    pub async fn wanted(&self) {
        while self.demand.waiting.load(Ordering::SeqCst) == 0 {
            self.demand.arrived.notified().await;
        }
    }

    /// Whether a listener waits now or waited since the last call: false
    /// means the store may take its notification channel down (marking the
    /// feed not live) until [`ChangeFeed::wanted`] resolves again.
    pub fn still_wanted(&self) -> bool {
        self.demand.waited.swap(false, Ordering::SeqCst) || self.demand.waiting.load(Ordering::SeqCst) > 0
    }
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed::new()
    }
}

/// Wakes a waiter when something may have changed. See the module docs.
#[derive(Debug)]
pub struct Listener {
    feed: Option<watch::Receiver<FeedState>>,
    demand: Option<Arc<Demand>>,
    backoff: Backoff,
}

impl Listener {
    /// A listener for a store without notifications: every wait is one step
    /// of a jittered exponential backoff.
    pub fn polling() -> Self {
        Listener { feed: None, demand: None, backoff: Backoff::new() }
    }

    /// Whether this listener hears a store's notifications right now
    /// (instead of polling).
    pub fn is_notified(&self) -> bool {
        self.feed.as_ref().is_some_and(|feed| feed.borrow().live)
    }

    /// Resolves at the next change published since the last call (or since
    /// the listener was made), or after a backoff step when the store sends
    /// no notifications (sooner if its feed comes back meanwhile).
    pub async fn changed(&mut self) {
        let _waiting = self.demand.as_deref().map(Demand::enter);
        if let Some(feed) = &mut self.feed {
            let closed = if feed.borrow().live {
                feed.changed().await.is_err()
            } else {
                feed.borrow_and_update();
                let step = self.backoff.next_delay();
                tokio::select! {
                    // Marked live again (or gone): the caller retries now.
                    back = feed.changed() => back.is_err(),
                    () = sleep(step) => false,
                }
            };
            if !closed {
                return;
            }
            // The store is gone: nothing will ever be sent again.
            self.feed = None;
        }
        sleep(self.backoff.next_delay()).await;
    }

    /// Sleeps one backoff step, each longer than the last (up to 250 ms),
    /// whatever the store publishes meanwhile: for a waiter that was woken
    /// but found the same lock in its way, so that changes which do not
    /// concern it (or its own stepwise attempts' releases) cannot make it
    /// spin.
    pub async fn pause(&mut self) {
        sleep(self.backoff.next_delay()).await;
    }

    /// Starts the backoff over: the waiter made progress.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }
}

/// Jittered exponential backoff: 2 ms doubling to 250 ms, each step a random
/// point in its upper half so that waiters do not retry in lockstep.
#[derive(Debug, Clone)]
struct Backoff {
    step: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(2);
    const LAST: Duration = Duration::from_millis(250);

    fn new() -> Self {
        Backoff { step: Self::FIRST }
    }

    fn reset(&mut self) {
        self.step = Self::FIRST;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(Self::LAST);
        step / 2 + step.mul_f64(fastrand::f64()) / 2
    }
}

/// Acquires `request` on `backend`, waiting as `wait` allows (see the module
/// docs). The lock handle is built on this; it is public for stores' and
/// tools' own loops.
///
/// A blocker that is a stepwise client's transient parent lock is waited out
/// even with [`Wait::No`] (one such lock for at most [`TRANSIENT_PATIENCE`]):
/// it is gone in a moment, and treating it as held would make siblings
/// refuse each other. A timed wait never goes past its own deadline for it.
pub async fn acquire(backend: &dyn LockBackend, request: &LockRequest, wait: Wait) -> Result<Grant, Error> {
    let started = Instant::now();
    let deadline = match wait {
        Wait::No => Some(started),
        Wait::For(limit) => started.checked_add(limit),
        Wait::Forever => None,
    };
    let mut listener = backend.listen(&request.path);
    let mut last_blocker: Option<(LockPath, u64)> = None;
    let mut woken_by_change = false;
    let mut last_seen: Option<HeldLock> = None;
    // The transient blocker seen last, and since when.
    let mut transient_since: Option<((LockPath, u64), Instant)> = None;
    loop {
        let attempt = backend.try_grant(request);
        // After the first refusal, an attempt that outlasts the deadline
        // (a store that does not answer) ends the wait on time; the grant it
        // may still make expires at its ttl.
        let attempt = match (&last_seen, deadline, wait) {
            (Some(blocker), Some(deadline), Wait::For(_)) => match timeout_at(deadline, attempt).await {
                Ok(attempt) => attempt,
                Err(_) => {
                    let waited = Instant::now() - started;
                    return Err(Error::Timeout { path: request.path.clone(), waited, blocker: blocker.clone() });
                }
            },
            _ => attempt.await,
        };
        let blocker = match attempt? {
            Attempt::Granted(grant) => return Ok(grant),
            Attempt::Blocked(blocker) => blocker,
        };
        last_seen = Some(blocker.clone());
        let now = Instant::now();
        let this_blocker = Some((blocker.path.clone(), blocker.token));
        let same_blocker = last_blocker == this_blocker;
        let spurious = woken_by_change && same_blocker;
        if !same_blocker {
            listener.reset();
        }
        last_blocker = this_blocker;
        let give_up_at = match (wait, deadline) {
            (Wait::No, Some(deadline)) if blocker.transient => {
                let key = (blocker.path.clone(), blocker.token);
                let since = match &transient_since {
                    Some((seen, since)) if *seen == key => *since,
                    _ => now,
                };
                transient_since = Some((key, since));
                Some(deadline.max(since + TRANSIENT_PATIENCE))
            }
            (_, other) => other,
        };
        if give_up_at.is_some_and(|at| now >= at) {
            let path = request.path.clone();
            return Err(match wait {
                Wait::No => Error::Refused { path, blocker },
                _ => Error::Timeout { path, waited: now - started, blocker },
            });
        }
        // Expiry sends no notification: retry just after the blocker's.
        let blocker_gone_at = now + blocker.remaining + Duration::from_millis(1);
        let wake_at = give_up_at.map_or(blocker_gone_at, |at| at.min(blocker_gone_at));
        let woken = async {
            if spurious {
                listener.pause().await;
                false
            } else {
                // A polling listener's wake is a backoff step, not news.
                let notified = listener.is_notified();
                listener.changed().await;
                notified
            }
        };
        woken_by_change = tokio::select! {
            woken = woken => woken,
            () = sleep_until(wake_at) => false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{LockKind, Owner, Ttl};
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
            Ok(Attempt::Blocked(HeldLock {
                path: request.path.parent().expect("a child"),
                owner: Owner::new("stepwise sibling").expect("owner"),
                token: if self.same_lock { 7 } else { attempt + 100 },
                remaining: Duration::from_millis(50),
                transient: true,
            }))
        }
        fn listen(&self, _path: &LockPath) -> Listener {
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
        let backend = TransientParents {
            free_at: started + TRANSIENT_PATIENCE * 3,
            same_lock: false,
            attempts: AtomicU64::new(0),
        };
        let grant = acquire(&backend, &sibling(), Wait::No).await.expect("granted once the parents are free");
        assert_eq!(grant.token, 1);
        assert!(started.elapsed() >= TRANSIENT_PATIENCE * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_gives_up_on_one_transient_lock_that_stays() {
        let started = Instant::now();
        let backend = TransientParents {
            free_at: started + TRANSIENT_PATIENCE * 3,
            same_lock: true,
            attempts: AtomicU64::new(0),
        };
        match acquire(&backend, &sibling(), Wait::No).await {
            Err(Error::Refused { blocker, .. }) => assert!(blocker.transient && blocker.token == 7, "{blocker:?}"),
            other => panic!("refused by the stuck lock, got {other:?}"),
        }
        let waited = started.elapsed();
        assert!(waited >= TRANSIENT_PATIENCE && waited < TRANSIENT_PATIENCE * 2, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_hears_changes_made_before_it_waits() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        assert!(listener.is_notified());
        feed.notify();
        let started = Instant::now();
        listener.changed().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_that_is_down_falls_back_to_polling() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        feed.set_live(false);
        listener.changed().await; // the state change itself
        assert!(!listener.is_notified());
        let started = Instant::now();
        listener.changed().await;
        let waited = started.elapsed();
        assert!(waited >= Backoff::FIRST / 2 && waited <= Backoff::LAST, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_polling_listener_retries_as_soon_as_the_feed_is_back() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        feed.set_live(false);
        listener.changed().await; // the state change itself
        for _ in 0..6 {
            listener.changed().await; // backoff steps, up to 64 ms and more
        }
        let back = {
            let feed = feed.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                feed.set_live(true);
            })
        };
        let started = Instant::now();
        listener.changed().await;
        assert_eq!(started.elapsed(), Duration::from_millis(10), "woken by the feed, not by the backoff");
        assert!(listener.is_notified());
        back.await.expect("the feed came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_is_wanted_only_while_listeners_wait() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        assert!(!feed.still_wanted(), "listening is not waiting: a try never asks for the channel");
        let wanted = tokio::spawn({
            let feed = feed.clone();
            async move { feed.wanted().await }
        });
        tokio::task::yield_now().await;
        assert!(!wanted.is_finished());

        let waiter = tokio::spawn(async move {
            listener.changed().await;
            listener
        });
        wanted.await.expect("wanted once a listener waits");
        assert!(feed.still_wanted());
        assert!(feed.still_wanted(), "still wanted while the listener waits");
        feed.notify();
        let listener = waiter.await.expect("woken by the change");
        assert!(feed.still_wanted(), "it waited since the last question");
        assert!(!feed.still_wanted(), "nobody waited since");
        tokio::time::timeout(Duration::from_secs(1), feed.wanted()).await.expect_err("nobody waits");
        drop(listener);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(1) && delays[0] <= Duration::from_millis(2));
        assert!(delays.iter().all(|d| *d <= Backoff::LAST));
        assert!(delays[11] >= Backoff::LAST / 2);
    }
}
