//! Faults at every await point, and cancellation.
//!
//! [`Gated`] wraps a store's client and puts a gate before and after each
//! call it forwards (deadpool's fault-gate idea): the gate passes, fails
//! with a store error, is slow, or never opens. The cancellation case drives
//! acquire, release and refresh through every gate on every call they make,
//! dropping the operation's future when a gate never opens, and then checks
//! that nothing is left held once the ttls have run out.
//!
//! In stepwise mode the gates sit under the stepwise algorithm, on the
//! primitives, so every step of it is cut too.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use mutextree_core::backend::stepwise::TRANSIENT_TTL;
use mutextree_core::backend::{Attempt, Listener, LockKind, LockRequest, StoreLabels};
use mutextree_core::{
    Error, Fairness, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode as LockMode, Owner, TreeLock, Ttl,
};
use tokio::sync::Notify;
use tokio::time::{sleep, timeout};

use crate::{Algorithm, Ctx};

/// What a gate does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails the call with a retryable store error.
    Fail,
    /// Delays the call by this much.
    Slow(Duration),
    /// Never opens: the call hangs until its future is dropped.
    Hang,
}

/// Where a gate stands around a forwarded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Before the request reaches the store: the store sees nothing.
    Before,
    /// After the store answered: the call took effect, the caller does not
    /// learn it (a lost reply).
    After,
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    call: usize,
    point: Point,
    fault: Fault,
}

/// A client wrapper with gates around every call; see the module docs. It
/// also counts calls and tells when an attempt was blocked.
#[derive(Debug)]
pub struct Gated {
    inner: Arc<dyn LockBackend>,
    plan: Mutex<Option<Plan>>,
    unreachable: AtomicBool,
    calls: AtomicUsize,
    blocked: Notify,
}

impl Gated {
    /// Wraps a client; every gate passes until [`Gated::arm`].
    pub fn new(inner: Arc<dyn LockBackend>) -> Arc<Self> {
        Arc::new(Gated {
            inner,
            plan: Mutex::new(None),
            unreachable: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            blocked: Notify::new(),
        })
    }

    /// From now on, the `call`-th call (counting from 0 from now) meets
    /// `fault` at `point`; every other call passes.
    pub fn arm(&self, call: usize, point: Point, fault: Fault) {
        let start = self.calls.load(Ordering::SeqCst);
        *self.plan.lock().expect("plan lock") = Some(Plan { call: start + call, point, fault });
    }

    /// Every gate passes again.
    pub fn disarm(&self) {
        *self.plan.lock().expect("plan lock") = None;
        self.unreachable.store(false, Ordering::SeqCst);
    }

    /// From now on every call fails before reaching the store, as if it
    /// were down, until [`Gated::disarm`].
    pub fn cut_off(&self) {
        self.unreachable.store(true, Ordering::SeqCst);
    }

    /// How many calls reached this wrapper so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Resolves the next time, after this call, that an attempt comes back
    /// blocked.
    pub fn blocked(&self) -> tokio::sync::futures::Notified<'_> {
        self.blocked.notified()
    }

    async fn gate(&self, call: usize, point: Point) -> Result<(), Error> {
        if point == Point::Before && self.unreachable.load(Ordering::SeqCst) {
            return Err(Error::store_message("gated", true, "injected: the store is unreachable"));
        }
        let plan = *self.plan.lock().expect("plan lock");
        match plan {
            Some(plan) if plan.call == call && plan.point == point => match plan.fault {
                Fault::Fail => {
                    Err(Error::store_message("gated", true, format!("injected fault {point:?} call {call}")))
                }
                Fault::Slow(delay) => {
                    sleep(delay).await;
                    Ok(())
                }
                Fault::Hang => std::future::pending().await,
            },
            _ => Ok(()),
        }
    }

    async fn around<T>(&self, call: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
        let number = self.calls.fetch_add(1, Ordering::SeqCst);
        self.gate(number, Point::Before).await?;
        let outcome = call.await;
        self.gate(number, Point::After).await?;
        outcome
    }
}

#[async_trait]
impl LockBackend for Gated {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.around(self.inner.try_lock_key(request, kind)).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        self.around(self.inner.release(grant)).await
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        self.around(self.inner.refresh(grant, ttl)).await
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.around(self.inner.list(under)).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        let attempt = self.around(self.inner.try_grant(request)).await;
        if let Ok(Attempt::Blocked(_) | Attempt::Queued { .. }) = attempt {
            self.blocked.notify_waiters();
        }
        attempt
    }

    async fn change_mode(&self, grant: &Grant, mode: LockMode) -> Result<Attempt, Error> {
        self.around(self.inner.change_mode(grant, mode)).await
    }

    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        self.around(self.inner.withdraw(owner, ticket)).await
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.around(self.inner.waiters(under)).await
    }

    fn fairness(&self) -> Fairness {
        self.inner.fairness()
    }

    fn listen(&self, items: &LockItems) -> Listener {
        self.inner.listen(items)
    }

    fn labels(&self) -> StoreLabels<'_> {
        self.inner.labels()
    }

    fn round_trips(&self) -> Option<u64> {
        self.inner.round_trips()
    }
}

#[derive(Clone, Copy, Debug)]
enum Operation {
    Acquire,
    Release,
    Refresh,
}

/// Acquire, release and refresh, each with every fault at every point of
/// every call it makes, all at once on separate paths; then, once the ttls
/// have passed, nothing is held and every path can be locked again.
pub async fn cancellation_leaves_nothing_beyond_the_ttl(ctx: Ctx) {
    let unit = ctx.timing().unit;
    let ttl = unit;
    // Up to depth + 2 calls for a stepwise grant at depth 2 (two at once
    // after the node is locked), plus a retry.
    let calls = 0..6;
    let mut runs = Vec::new();
    for operation in [Operation::Acquire, Operation::Release, Operation::Refresh] {
        for call in calls.clone() {
            for point in [Point::Before, Point::After] {
                for fault in [Fault::Fail, Fault::Hang, Fault::Slow(unit / 4)] {
                    runs.push((operation, call, point, fault));
                }
            }
        }
    }
    let probe = ctx.client().await;
    let outcomes = join_all(runs.iter().enumerate().map(|(index, &(operation, call, point, fault))| {
        let ctx = ctx.clone();
        async move {
            let (client, gated) = ctx.gated_client().await;
            let path = LockPath::new([format!("run-{index}"), "leaf".to_owned()]).expect("path");
            let lock = TreeLock::builder(client, &path).ttl(ttl).build().expect("lock");
            if !matches!(operation, Operation::Acquire) {
                lock.try_acquire().await.expect("a fresh path is free");
            }
            let calls_before = gated.calls();
            gated.arm(call, point, fault);
            let limit = unit / 2;
            let outcome = match operation {
                Operation::Acquire => timeout(limit, lock.try_acquire()).await.map(|r| r.map(drop)),
                Operation::Release => timeout(limit, lock.release()).await,
                Operation::Refresh => timeout(limit, lock.refresh()).await.map(|r| r.map(drop)),
            };
            gated.disarm();
            if fault == Fault::Fail && ctx.algorithm() == Algorithm::Native {
                // A native operation is one call: an injected failure on it
                // must reach the caller. (The stepwise algorithm ignores
                // failed releases of its transient parents by design.)
                if let Ok(Ok(())) = &outcome {
                    assert!(
                        gated.calls() - calls_before <= call,
                        "{operation:?}: fault at call {call} {point:?} was swallowed"
                    );
                }
            }
            (path, lock)
        }
    }))
    .await;
    // The wait itself: an acquisition blocked by a held lock, dropped while
    // it sleeps, holds nothing.
    // The blocker outlives the wait however slow the machine, and is
    // released after it.
    let waiter = TreeLock::builder(ctx.client().await, "waited").ttl(ttl).build().expect("lock");
    let blocker = TreeLock::builder(probe.clone(), "waited/on").ttl(unit * 30).build().expect("lock");
    blocker.try_acquire().await.expect("free");
    assert!(timeout(unit / 2, waiter.acquire_timeout(unit * 10)).await.is_err(), "still waiting");
    assert!(!waiter.is_held());
    // Natively an attempt that finds a lock in the way writes nothing. A
    // stepwise attempt locks the node before it looks below, so one cut off
    // mid-way (a wake-up came just before the cancellation) may leave the
    // node locked until its ttl, which the check below covers.
    if ctx.algorithm() == Algorithm::Native {
        let now_held = probe.list(Some(waiter.path())).await.expect("list");
        assert!(now_held.iter().all(|lock| lock.path != *waiter.path()), "the cancelled waiter holds {now_held:?}");
    }
    blocker.release().await.expect("the blocker releases");

    // Everything granted expires within its ttl (transient parents within
    // theirs); then every path is free and the namespace is empty.
    sleep(ttl.max(TRANSIENT_TTL) + ctx.timing().slack).await;
    let left = probe.list(None).await.expect("list");
    assert!(left.is_empty(), "locks left after their ttl: {left:?}");
    for (path, _lock) in outcomes {
        let again = TreeLock::builder(probe.clone(), &path).ttl(ttl).build().expect("lock");
        again.try_acquire().await.unwrap_or_else(|e| panic!("{path} still blocked: {e}"));
    }
    waiter.try_acquire().await.expect("the cancelled waiter left nothing behind");
}

/// A grant whose steps reach the store slowly (here: past the life of a
/// stepwise client's transient parent lock) never ends up beside a faster
/// grant of an overlapping path.
pub async fn a_slow_grant_never_overlaps_a_faster_one(ctx: Ctx) {
    let unit = ctx.timing().unit;
    let long = unit * 30;
    let (slow_client, gated) = ctx.gated_client().await;
    let fast_client = ctx.client().await;
    // Natively the grant is call 0; stepwise, call 0 locks the parent and
    // call 1 the node, which is what arrives late.
    let late_call = if ctx.algorithm() == Algorithm::Native { 0 } else { 1 };
    gated.arm(late_call, Point::Before, Fault::Slow(TRANSIENT_TTL + unit));
    let slow_lock = TreeLock::builder(slow_client, "A/B").ttl(long).build().expect("lock");
    let slow = tokio::spawn(async move { slow_lock.try_acquire().await });
    sleep(TRANSIENT_TTL + unit / 2).await;
    let fast = TreeLock::builder(fast_client, "A").ttl(long).build().expect("lock").try_acquire().await;
    let slow = slow.await.expect("task");
    assert!(!(fast.is_ok() && slow.is_ok()), "both A and A/B were granted: {fast:?} {slow:?}");
    assert!(fast.is_ok() || slow.is_ok(), "neither was granted: {fast:?} {slow:?}");
}

/// How many times each race of a cut-off acquisition is tried.
const RACE_TRIALS: usize = 200;

/// Race trial `trial`: a holder (on `holders`) that holds its lock now and
/// releases it `release_after` from now, in a task; and a waiter (on
/// `waiters`) in its way, on the same node, an ancestor or a descendant, in
/// turn.
async fn race(
    ctx: &Ctx,
    (holders, waiters): (&Arc<dyn LockBackend>, &Arc<dyn LockBackend>),
    trial: usize,
    release_after: Duration,
) -> (tokio::task::JoinHandle<()>, TreeLock) {
    let (waiter, holder) = match trial % 3 {
        0 => ("A/B", "A/B"),
        1 => ("A", "A/B"),
        _ => ("A/B/C", "A/B"),
    };
    let at = |rest: &str| LockPath::parse(&format!("race-{trial}/{rest}")).expect("path");
    let holder = TreeLock::builder(holders.clone(), at(holder)).ttl(ctx.timing().unit * 30).build().expect("lock");
    holder.try_acquire().await.expect("a fresh path is free");
    let release_at = tokio::time::Instant::now() + release_after;
    let releasing = tokio::spawn(async move {
        tokio::time::sleep_until(release_at).await;
        holder.release().await.expect("the holder releases");
    });
    (releasing, TreeLock::builder(waiters.clone(), at(waiter)).build().expect("lock"))
}

/// A uniformly random duration in `[0, limit]`.
fn random_up_to(limit: Duration) -> Duration {
    limit.mul_f64(fastrand::f64())
}

/// Nothing is left in the namespace after race trial `trial`.
async fn assert_nothing_left(probe: &Arc<dyn LockBackend>, trial: usize, what: &str) {
    let left = probe.list(None).await.expect("list");
    assert!(left.is_empty(), "trial {trial}: {what} left {left:?}");
    let waiting = probe.waiters(None).await.expect("waiters");
    assert!(waiting.is_empty(), "trial {trial}: {what} left the reservations {waiting:?}");
}

/// A timed wait whose blocker is released at random moments within 5 ms
/// either side of its deadline never leaves a grant behind: it returns the
/// grant (which is then released here) or times out holding nothing.
pub async fn a_timed_wait_cut_at_its_deadline_leaves_nothing(ctx: Ctx) {
    let patience = Duration::from_millis(20);
    let around = Duration::from_millis(5);
    let probe = ctx.client().await;
    let (holders, waiters) = (ctx.client().await, ctx.client().await);
    let (mut granted, mut timed_out) = (0, 0);
    for trial in 0..RACE_TRIALS {
        let release_after = patience - around + random_up_to(around * 2);
        let (releasing, waiter) = race(&ctx, (&holders, &waiters), trial, release_after).await;
        match waiter.acquire_timeout(patience).await {
            Ok(_) => {
                granted += 1;
                waiter.release().await.expect("a grant returned to the waiter is live");
            }
            Err(Error::Timeout { .. }) => timed_out += 1,
            Err(other) => panic!("trial {trial}: {other}"),
        }
        releasing.await.expect("holder task");
        waiter.settled().await;
        assert_nothing_left(&probe, trial, "a timed wait").await;
    }
    // Both outcomes were met, or the race was not run where it matters. (A
    // stepwise waiter hears its own attempts' releases and backs off, so on
    // a stepwise client most trials time out: only native ones must mix.)
    if ctx.algorithm() == Algorithm::Native {
        assert!(granted > 0 && timed_out > 0, "{granted} granted, {timed_out} timed out: the race was not run");
    }
}

/// An acquisition dropped at a random moment, while its blocker is released
/// at another, never leaves a grant behind once its handle has settled,
/// whether the drop came before, during or after an attempt.
pub async fn a_dropped_acquisition_leaves_nothing(ctx: Ctx) {
    let window = Duration::from_millis(10);
    let probe = ctx.client().await;
    let (holders, waiters) = (ctx.client().await, ctx.client().await);
    let (mut granted, mut dropped) = (0, 0);
    for trial in 0..RACE_TRIALS {
        let (releasing, waiter) = race(&ctx, (&holders, &waiters), trial, random_up_to(window)).await;
        match timeout(random_up_to(window), waiter.acquire()).await {
            Ok(grant) => {
                grant.unwrap_or_else(|e| panic!("trial {trial}: {e}"));
                granted += 1;
                waiter.release().await.expect("release");
            }
            Err(_) => dropped += 1,
        }
        releasing.await.expect("holder task");
        waiter.settled().await;
        assert!(!waiter.is_held(), "trial {trial}: a dropped acquisition installed its grant");
        assert_nothing_left(&probe, trial, "a dropped acquisition").await;
    }
    assert!(granted > 0 && dropped > 0, "{granted} granted, {dropped} dropped: the race was not run");
}
