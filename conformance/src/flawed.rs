//! The suite's own checks, run against deliberately broken stores: each
//! flaw must make the case written for it fail. A suite that passes a
//! broken store proves nothing about a right one.
//!
//! Each broken store is the memory store behind a [`Flawed`] wrapper that
//! breaks one rule of the modes or of fair waiting, the way a real store
//! could get it wrong.

use std::any::Any;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mutextree::memory::MemoryStore;
use mutextree_core::backend::{Attempt, Listener, LockKind, LockRequest, Queue, StoreLabels};
use mutextree_core::{
    Blockers, Error, Fairness, Grant, HeldLock, LockBackend, LockItem, LockItems, LockPath, Mode, Owner, Ttl,
};
use tokio::time::Instant;

use crate::oracle::items_conflict;
use crate::{cases, concurrency, model, modes, Algorithm, Ctx, TestStore, Timing};

/// How a [`Flawed`] store breaks the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flaw {
    /// A request with a Shared item is granted whatever is held, as if a
    /// reader conflicted with nothing (the grant is not recorded).
    SharedIgnoresConflicts,
    /// A Shared item keeps Exclusive items off its own path but not off
    /// its subtree, as read/write tree locks that read-lock only the
    /// ancestors do: an Exclusive request refused only by Shared items
    /// above it is granted.
    SharedCoversOnlyItsNode,
    /// An upgrade is granted whatever is held.
    UpgradeIgnoresConflicts,
    /// A listing leaves out the last item of every multi-path grant, as a
    /// store that writes or reads a grant's items one by one might show.
    ListsHalfGrants,
    /// Fair requests are served as barging ones: no reservation is ever
    /// written or looked at, and whoever asks first after a release wins.
    QueueIgnored,
    /// A waiter defers to every conflicting reservation, later tickets
    /// included, as a queue that forgot its order would.
    EveryReservationBlocks,
    /// A reservation refuses every fair request of another owner under its
    /// path's root, whatever the modes, as a store that reserved the root
    /// would.
    ReservationsOverreach,
    /// Withdrawals are lost: a wait that ends leaves its reservation to
    /// lapse.
    WithdrawIgnored,
    /// Every reservation is renewed whenever any client asks for a lock,
    /// as if its life depended on the store's clients rather than on its
    /// own waiter.
    ReservationsOutliveWaiters,
}

/// The memory store with a flaw; grants it made up (which the memory store
/// never saw) are released and refreshed without complaint.
#[derive(Debug)]
struct Flawed {
    inner: Arc<dyn LockBackend>,
    flaw: Flaw,
    made_up: Mutex<HashSet<u64>>,
    tokens: Arc<AtomicU64>,
    /// The waiting requests of every client of the store, for
    /// [`Flaw::ReservationsOutliveWaiters`].
    kept: Arc<Mutex<Vec<LockRequest>>>,
}

impl Flawed {
    /// A grant of `items` nobody checked, with a token of its own range.
    fn make_up(&self, template: &Grant, items: LockItems) -> Attempt {
        let token = (1 << 40) + self.tokens.fetch_add(1, Ordering::SeqCst);
        self.made_up.lock().expect("made up").insert(token);
        Attempt::Granted(Grant { items, token, ..template.clone() })
    }

    fn is_made_up(&self, grant: &Grant) -> bool {
        self.made_up.lock().expect("made up").contains(&grant.token)
    }

    /// What a flaw of the queue answers instead of the store, if anything,
    /// and the request the store is sent otherwise.
    async fn queue_flaw(&self, request: &LockRequest) -> Result<Result<LockRequest, Attempt>, Error> {
        match (self.flaw, request.queue) {
            (Flaw::QueueIgnored, _) => return Ok(Ok(request.in_queue(Queue::Barge))),
            (Flaw::EveryReservationBlocks, Queue::Waiting(ticket)) => {
                let later = self.reservation_in_way(request, |held| held.token != ticket).await?;
                if let Some(blocker) = later {
                    return Ok(Err(Attempt::Queued { ticket, blockers: Blockers::from(blocker) }));
                }
            }
            (Flaw::ReservationsOverreach, Queue::Try | Queue::Join | Queue::Waiting(_)) => {
                let root = |path: &LockPath| path.segments().next().map(str::to_owned);
                let roots: Vec<_> = request.items.iter().map(|item| root(&item.path)).collect();
                let waiters = self.inner.waiters(None).await?;
                let over =
                    waiters.into_iter().find(|held| held.owner != request.owner && roots.contains(&root(&held.path)));
                if let Some(blocker) = over {
                    return Ok(Err(Attempt::Blocked(Blockers::from(blocker))));
                }
            }
            (Flaw::ReservationsOutliveWaiters, _) => {
                let kept = self.kept.lock().expect("kept").clone();
                for waiting in kept {
                    if let Attempt::Granted(grant) = self.inner.try_grant(&waiting).await? {
                        self.inner.release(&grant).await?;
                        self.kept.lock().expect("kept").retain(|other| *other != waiting);
                    }
                }
            }
            _ => {}
        }
        Ok(Ok(request.clone()))
    }

    /// A live reservation that `counts`, of another waiter or not, in the
    /// way of an item of `request`.
    async fn reservation_in_way(
        &self,
        request: &LockRequest,
        counts: impl Fn(&HeldLock) -> bool,
    ) -> Result<Option<HeldLock>, Error> {
        let waiters = self.inner.waiters(None).await?;
        Ok(waiters.into_iter().find(|held| {
            let reserved = LockItem { path: held.path.clone(), mode: held.mode };
            counts(held) && request.items.iter().any(|item| items_conflict(item, &reserved))
        }))
    }
}

#[async_trait]
impl LockBackend for Flawed {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.inner.try_lock_key(request, kind).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        if self.is_made_up(grant) {
            return Ok(());
        }
        self.inner.release(grant).await
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        if self.is_made_up(grant) {
            return Ok(grant.clone());
        }
        self.inner.refresh(grant, ttl).await
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let mut held = self.inner.list(under).await?;
        if self.flaw == Flaw::ListsHalfGrants {
            let last_of_each: Vec<usize> = (0..held.len())
                .filter(|&at| {
                    let token = held[at].token;
                    held[..at].iter().any(|other| other.token == token)
                        && !held[at + 1..].iter().any(|other| other.token == token)
                })
                .collect();
            for at in last_of_each.into_iter().rev() {
                held.remove(at);
            }
        }
        Ok(held)
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        let request = match self.queue_flaw(request).await? {
            Ok(request) => request,
            Err(answer) => return Ok(answer),
        };
        let request = &request;
        let attempt = self.inner.try_grant(request).await?;
        if let (Flaw::ReservationsOutliveWaiters, Attempt::Queued { ticket, .. }) = (self.flaw, &attempt) {
            let waiting = request.in_queue(Queue::Waiting(*ticket));
            let mut kept = self.kept.lock().expect("kept");
            if !kept.contains(&waiting) {
                kept.push(waiting);
            }
        }
        let made_up = match &attempt {
            Attempt::Blocked(_) if self.flaw == Flaw::SharedIgnoresConflicts => request.items.any(Mode::Shared),
            Attempt::Blocked(blockers) if self.flaw == Flaw::SharedCoversOnlyItsNode => {
                blockers.iter().all(|blocker| {
                    blocker.mode == Mode::Shared
                        && request.items.iter().all(|item| blocker.path.is_ancestor_of(&item.path))
                })
            }
            _ => false,
        };
        if made_up {
            let template = Grant::new(request, LockKind::Lock, 0, request.ttl.get(), Instant::now());
            return Ok(self.make_up(&template, request.items.clone()));
        }
        Ok(attempt)
    }

    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        if self.is_made_up(grant) {
            return Ok(self.make_up(grant, grant.items.with_mode(mode)));
        }
        match self.inner.change_mode(grant, mode).await? {
            Attempt::Blocked(_) if self.flaw == Flaw::UpgradeIgnoresConflicts => {
                Ok(self.make_up(grant, grant.items.with_mode(mode)))
            }
            attempt => Ok(attempt),
        }
    }

    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        if self.flaw == Flaw::WithdrawIgnored {
            return Ok(());
        }
        self.inner.withdraw(owner, ticket).await
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.inner.waiters(under).await
    }

    fn labels(&self) -> StoreLabels<'_> {
        self.inner.labels()
    }

    fn fairness(&self) -> Fairness {
        self.inner.fairness()
    }

    fn listen(&self, items: &LockItems) -> Listener {
        self.inner.listen(items)
    }
}

/// A memory store whose clients all have `flaw`.
struct FlawedStore {
    store: MemoryStore,
    flaw: Flaw,
    tokens: Arc<AtomicU64>,
    kept: Arc<Mutex<Vec<LockRequest>>>,
    timing: Timing,
}

impl FlawedStore {
    /// In real time, for the cases.
    fn new(flaw: Flaw) -> Self {
        FlawedStore {
            store: MemoryStore::new(),
            flaw,
            tokens: Arc::default(),
            kept: Arc::default(),
            timing: Timing::REAL,
        }
    }

    /// On tokio's paused clock, for the model's histories.
    fn paused(flaw: Flaw) -> Self {
        FlawedStore { timing: Timing::PAUSED, ..FlawedStore::new(flaw) }
    }
}

#[async_trait]
impl TestStore for FlawedStore {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(Flawed {
            inner: Arc::new(self.store.backend(namespace)?),
            flaw: self.flaw,
            made_up: Mutex::default(),
            tokens: self.tokens.clone(),
            kept: self.kept.clone(),
        }))
    }

    fn timing(&self) -> Timing {
        self.timing
    }
}

/// The panic message of a case run on `flaw`, which must fail.
async fn failure<F, Fut>(flaw: Flaw, case: F) -> String
where
    F: FnOnce(Ctx) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let run = tokio::spawn(crate::run_case(FlawedStore::new(flaw), Algorithm::Native, case));
    let error = run.await.expect_err("the case passed on a broken store");
    message(error.into_panic())
}

fn message(panic: Box<dyn Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(text) => *text,
        Err(panic) => panic.downcast::<&str>().map(|text| text.to_string()).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_oracle_catches_readers_that_ignore_writers() {
    let text = failure(Flaw::SharedIgnoresConflicts, concurrency::concurrent_readers_and_writers_never_conflict).await;
    assert!(text.contains("violations") && text.contains("while"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_past_a_writer_fail_the_branch_case() {
    let text = failure(Flaw::SharedIgnoresConflicts, modes::exclusive_ancestor_refuses_shared_descendant).await;
    assert!(text.contains("should be refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_ancestor_that_covers_only_its_node_fails_the_branch_case() {
    let text = failure(Flaw::SharedCoversOnlyItsNode, modes::shared_ancestor_refuses_exclusive_descendant).await;
    assert!(text.contains("A/B/C") && text.contains("should be refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_upgrades_that_both_win_fail_the_case() {
    let text = failure(Flaw::UpgradeIgnoresConflicts, modes::racing_upgrades_never_both_win).await;
    assert!(text.contains("both upgrades won"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_past_readers_fails_the_downgrade_case() {
    let text = failure(Flaw::UpgradeIgnoresConflicts, modes::a_downgrade_lets_readers_in_and_keeps_writers_out).await;
    assert!(text.contains("must be refused"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listing_of_half_a_grant_fails_the_lister() {
    let text =
        failure(Flaw::ListsHalfGrants, concurrency::concurrent_multi_path_grants_are_never_seen_half_granted).await;
    assert!(text.contains("half granted"), "{text}");
}

#[test]
fn the_model_catches_readers_that_ignore_writers_and_upgrades_past_readers() {
    let shared: fn() -> FlawedStore = || FlawedStore::paused(Flaw::SharedIgnoresConflicts);
    let upgrade: fn() -> FlawedStore = || FlawedStore::paused(Flaw::UpgradeIgnoresConflicts);
    for store in [shared, upgrade] {
        let outcome = std::panic::catch_unwind(|| model::check(store, Algorithm::Native, true));
        let text = message(outcome.expect_err("the model passed a broken store"));
        assert!(text.contains("disagrees with the reference model"), "{}", text);
    }
}

#[test]
fn the_model_catches_queues_that_are_ignored_overreach_or_defer_to_later_tickets() {
    let ignored: fn() -> FlawedStore = || FlawedStore::paused(Flaw::QueueIgnored);
    let overreach: fn() -> FlawedStore = || FlawedStore::paused(Flaw::ReservationsOverreach);
    let every: fn() -> FlawedStore = || FlawedStore::paused(Flaw::EveryReservationBlocks);
    for store in [ignored, overreach, every] {
        let outcome = std::panic::catch_unwind(|| model::check(store, Algorithm::Native, true));
        let text = message(outcome.expect_err("the model passed a broken queue"));
        assert!(text.contains("disagrees with the reference model"), "{}", text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churners_that_overtake_the_ancestor_waiter_fail_the_churn_measurement() {
    let run = tokio::spawn(async { crate::churn::measure("flawed", &FlawedStore::new(Flaw::QueueIgnored), 16).await });
    let text = message(run.await.expect_err("the measurement passed a store that ignores its queue").into_panic());
    assert!(text.contains("overtook a queued waiter") || text.contains("a queued waiter gave up"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_is_ignored_fails_the_contract_and_the_order() {
    let text = failure(Flaw::QueueIgnored, cases::a_reservation_refuses_later_requests_and_names_its_waiter).await;
    assert!(text.contains("should be refused and queued"), "{text}");
    let text = failure(Flaw::QueueIgnored, cases::a_dead_waiters_reservation_lapses_within_its_ttl).await;
    assert!(text.contains("should be refused and queued"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_that_barge_fail_the_ticket_order() {
    let text = failure(Flaw::QueueIgnored, concurrency::waiters_are_granted_in_ticket_order).await;
    assert!(text.contains("out of ticket order"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_starved_by_barging_churn_fails_the_churn_case() {
    let text = failure(Flaw::QueueIgnored, concurrency::an_ancestor_waiter_is_not_starved_by_churn_below_it).await;
    assert!(text.contains("starved"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_that_defer_to_later_tickets_deadlock_and_fail() {
    let text = failure(Flaw::EveryReservationBlocks, concurrency::crossing_waiters_never_deadlock).await;
    assert!(text.contains("not all granted"), "{text}");
    // Its renewal is refused by the later waiter instead of the holder.
    let text = failure(Flaw::EveryReservationBlocks, cases::waiters_defer_only_to_earlier_tickets).await;
    assert!(text.contains("the holder is still in the way"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_that_refuse_their_neighbours_fail_the_collateral_case() {
    let text =
        failure(Flaw::ReservationsOverreach, cases::reservations_never_refuse_what_they_do_not_conflict_with).await;
    assert!(text.contains("beside the waiters"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_withdrawals_fail_the_case_of_waits_that_end() {
    let text = failure(Flaw::WithdrawIgnored, cases::a_wait_that_ends_without_a_grant_leaves_no_reservation).await;
    assert!(text.contains("a timed-out wait left"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_that_outlive_their_waiter_fail_the_dead_waiter_case() {
    let text = failure(Flaw::ReservationsOutliveWaiters, cases::a_dead_waiters_reservation_lapses_within_its_ttl).await;
    assert!(text.contains("once the dead waiter's reservation lapsed"), "{text}");
}
