//! The behaviour cases, each a plain `async fn(Ctx)`.
//!
//! They use the public handle ([`TreeLock`]) the way an application does,
//! and the [`LockBackend`] contract directly where a case needs to forge a
//! grant or look inside. Time is only ever waited for where time is the
//! thing under test (expiry, refresh, timeouts); everything else waits for
//! events.

use std::sync::Arc;
use std::time::Duration;

use mutextree_core::{Error, Grant, LockBackend, LockItem, LockItems, LockPath, Mode, Owner, TreeLock, Ttl, Wait};
use tokio::time::{sleep, sleep_until, Instant};

pub use crate::cancel::{
    a_dropped_acquisition_leaves_nothing, a_slow_grant_never_overlaps_a_faster_one,
    a_timed_wait_cut_at_its_deadline_leaves_nothing, cancellation_leaves_nothing_beyond_the_ttl,
};
use crate::cancel::{Fault, Gated, Point};
pub use crate::fair::{
    a_dead_waiters_reservation_lapses_within_its_ttl, a_reservation_refuses_later_requests_and_names_its_waiter,
    a_wait_that_ends_without_a_grant_leaves_no_reservation, a_waiter_says_how_long_it_has_been_in_line,
    reservations_never_refuse_what_they_do_not_conflict_with, waiters_defer_only_to_earlier_tickets,
};
pub use crate::modes::{
    a_downgrade_is_refused_under_a_stepwise_lock_in_progress, a_downgrade_lets_readers_in_and_keeps_writers_out,
    a_mode_change_takes_a_new_token_and_keeps_the_expiry, a_multi_path_grant_shares_one_token_and_one_fate,
    a_multi_path_refusal_names_every_blocked_item, exclusive_ancestor_refuses_shared_descendant,
    racing_upgrades_never_both_win, requests_are_normalised_before_the_store,
    shared_ancestor_refuses_exclusive_descendant, shared_holders_coexist_on_one_path,
    siblings_never_conflict_in_any_mode, sixteen_deep_items_or_a_typed_refusal,
};
use crate::{Algorithm, Ctx};

pub(crate) fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("test paths are valid")
}

/// A ttl no case outlives.
pub(crate) fn long(ctx: &Ctx) -> Duration {
    ctx.timing().unit * 30
}

fn handle(ctx: &Ctx, client: &Arc<dyn LockBackend>, at: &str) -> TreeLock {
    TreeLock::builder(client.clone(), path(at)).ttl(long(ctx)).build().expect("valid lock")
}

async fn hold(ctx: &Ctx, client: &Arc<dyn LockBackend>, at: &str) -> TreeLock {
    let lock = handle(ctx, client, at);
    lock.try_acquire().await.unwrap_or_else(|e| panic!("{at} should be free: {e}"));
    lock
}

/// Asserts that `at` is refused, blocked by a lock on `blocker` held by
/// `owner`, and that the message says so.
async fn assert_refused(ctx: &Ctx, client: &Arc<dyn LockBackend>, at: &str, blocker: &str, owner: &Owner) {
    let lock = handle(ctx, client, at);
    match lock.try_acquire().await {
        Err(Error::Refused { items: refused, blockers }) => {
            let held = blockers.first();
            assert_eq!(refused.first().path, path(at));
            assert_eq!(held.path, path(blocker), "{at} should be blocked by {blocker}");
            assert_eq!(&held.owner, owner, "blocker's owner");
            assert!(!held.remaining.is_zero() && held.remaining <= long(ctx));
            let message = Error::Refused { items: refused, blockers: blockers.clone() }.to_string();
            assert!(message.contains(blocker) && message.contains(owner.as_str()), "{message}");
        }
        other => panic!("{at} should be refused because of {blocker}, got {other:?}"),
    }
}

/// `[A]` held refuses `[A]` and `[A, B]`.
pub async fn seed_node_held_refuses_itself_and_descendants(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let a = hold(&ctx, &one, "A").await;
    assert_refused(&ctx, &two, "A", "A", a.owner()).await;
    assert_refused(&ctx, &two, "A/B", "A", a.owner()).await;
    assert_refused(&ctx, &one, "A/B", "A", a.owner()).await;
}

/// `[A, B]` held refuses `[A]`.
pub async fn seed_child_held_refuses_parent(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let ab = hold(&ctx, &one, "A/B").await;
    assert_refused(&ctx, &two, "A", "A/B", ab.owner()).await;
}

/// `[A, B, C]` held refuses `[A]` and `[A, B]`.
pub async fn seed_grandchild_held_refuses_ancestors(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let abc = hold(&ctx, &one, "A/B/C").await;
    assert_refused(&ctx, &two, "A", "A/B/C", abc.owner()).await;
    assert_refused(&ctx, &two, "A/B", "A/B/C", abc.owner()).await;
}

/// `[A]` held refuses `[A, B, C]`.
pub async fn seed_ancestor_held_refuses_grandchild(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let a = hold(&ctx, &one, "A").await;
    assert_refused(&ctx, &two, "A/B/C", "A", a.owner()).await;
}

/// `[A, B]` held refuses `[A, B, C]`.
pub async fn seed_parent_held_refuses_child(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let ab = hold(&ctx, &one, "A/B").await;
    assert_refused(&ctx, &two, "A/B/C", "A/B", ab.owner()).await;
}

/// `[A]` and `[B]` are held at once, and released independently.
pub async fn seed_disjoint_roots_coexist(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let a = hold(&ctx, &one, "A").await;
    let b = hold(&ctx, &two, "B").await;
    a.release().await.expect("release A");
    assert_refused(&ctx, &one, "B/x", "B", b.owner()).await;
    b.release().await.expect("release B");
}

/// `[A, B]` and `[A, C]` are held at once, and so are cousins below them;
/// their parent is refused while either is held.
pub async fn seed_siblings_coexist(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let ab = hold(&ctx, &one, "A/B").await;
    let ac = hold(&ctx, &two, "A/C").await;
    hold(&ctx, &one, "A/D/x").await.release().await.expect("release the cousin");
    ab.release().await.expect("release A/B");
    assert_refused(&ctx, &one, "A", "A/C", ac.owner()).await;
    ac.release().await.expect("release A/C");
    hold(&ctx, &two, "A/B/y").await;
}

/// Not re-entrant: the same owner is refused its own lock's path and
/// subtree, like `threading.Lock`; one handle refuses to acquire twice.
pub async fn not_reentrant_for_the_same_owner(ctx: Ctx) {
    let client = ctx.client().await;
    let first = TreeLock::builder(client.clone(), "A").owner("me").ttl(long(&ctx)).build().expect("lock");
    first.try_acquire().await.expect("free");
    for at in ["A", "A/B"] {
        let again = TreeLock::builder(client.clone(), at).owner("me").build().expect("lock");
        assert!(matches!(again.try_acquire().await, Err(Error::Refused { .. })), "{at}");
    }
    assert!(matches!(first.try_acquire().await, Err(Error::AlreadyHeld { .. })));
    first.release().await.expect("release");
}

/// `[A]` is not an ancestor of `[AB]`, nor `[A, B]` of `[A, BC]`.
pub async fn prefix_is_not_an_ancestor(ctx: Ctx) {
    let client = ctx.client().await;
    hold(&ctx, &client, "A").await;
    hold(&ctx, &client, "AB").await;
    hold(&ctx, &client, "X/B").await;
    hold(&ctx, &client, "X/BC").await;
    hold(&ctx, &client, "X/B C").await;
    let listed: Vec<LockPath> =
        client.list(Some(&path("A"))).await.expect("list").into_iter().map(|h| h.path).collect();
    assert_eq!(listed, [path("A")]);
}

/// The guard releases on `release()` with its outcome, and on drop in the
/// background: a waiter gets the lock long before the ttl.
pub async fn guard_releases_on_release_and_on_drop(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let lock = handle(&ctx, &one, "A/B");
    let guard = lock.lock().await.expect("lock");
    assert!(lock.is_held());
    assert_eq!(lock.grant().map(|g| g.token), Some(guard.token()));
    assert_refused(&ctx, &two, "A", "A/B", lock.owner()).await;
    guard.release().await.expect("release");
    assert!(!lock.is_held());
    hold(&ctx, &two, "A").await.release().await.expect("free again");

    let guard = lock.lock().await.expect("lock again");
    let waiter = handle(&ctx, &two, "A");
    let dropped_at = Instant::now();
    drop(guard);
    assert!(!lock.is_held(), "a dropped guard's handle holds nothing");
    waiter.acquire_timeout(long(&ctx)).await.expect("released by the drop");
    assert!(dropped_at.elapsed() < long(&ctx) / 4, "the drop released, not the ttl");
}

/// The closure wrapper releases after success, after an error value, and
/// after a panic.
pub async fn run_releases_after_success_error_and_panic(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let lock = handle(&ctx, &one, "A");
    let probe = handle(&ctx, &two, "A/B");

    let token = lock.run(|grant| async move { grant.token }).await.expect("run");
    assert!(token > 0);
    probe.try_acquire().await.expect("released after success");
    let impatient = TreeLock::builder(one.clone(), path("A")).wait(Wait::No).build().expect("lock");
    assert!(matches!(impatient.run(|_| async {}).await, Err(Error::Refused { .. })), "run refuses a held path");
    probe.release().await.expect("release");

    let failed: Result<(), &str> = lock.run(|_| async { Err("boom") }).await.expect("run");
    assert_eq!(failed, Err("boom"));
    probe.try_acquire().await.expect("released after an error");
    probe.release().await.expect("release");

    let panicking = lock.clone();
    let task = tokio::spawn(async move {
        let _: Result<(), Error> = panicking.run(|_| async { panic!("work failed") }).await;
    });
    assert!(task.await.is_err(), "the work panicked");
    let started = Instant::now();
    probe.acquire_timeout(long(&ctx)).await.expect("released after a panic");
    assert!(started.elapsed() < long(&ctx) / 4, "released by the guard, not the ttl");
}

/// Release and refresh of a lock that is not held fail with NotHeld.
pub async fn release_and_refresh_of_nothing_held_are_not_held(ctx: Ctx) {
    let client = ctx.client().await;
    let lock = handle(&ctx, &client, "A");
    assert!(matches!(lock.release().await, Err(Error::NotHeld { .. })));
    assert!(matches!(lock.refresh().await, Err(Error::NotHeld { .. })));

    let grant = lock.try_acquire().await.expect("free");
    lock.release().await.expect("release");
    assert!(matches!(lock.release().await, Err(Error::NotHeld { .. })), "double release");
    assert!(matches!(client.release(&grant).await, Err(Error::NotHeld { .. })), "released grant");
    let ttl = Ttl::new(long(&ctx)).expect("ttl");
    assert!(matches!(client.refresh(&grant, ttl).await, Err(Error::NotHeld { .. })), "released grant");
    let never = Grant { items: LockItems::one(path("never/granted"), Mode::Exclusive), ..grant };
    assert!(matches!(client.release(&never).await, Err(Error::NotHeld { .. })), "never granted");
    assert!(client.list(None).await.expect("list").is_empty(), "nothing resurrected");
}

/// Only the very grant (path, owner, token) is released or refreshed.
pub async fn only_the_owners_grant_is_released(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let lock = handle(&ctx, &one, "A");
    let grant = lock.try_acquire().await.expect("free");
    let ttl = Ttl::new(ctx.timing().unit).expect("ttl");
    let forgeries = [
        Grant { owner: Owner::new("intruder").expect("owner"), ..grant.clone() },
        Grant { token: grant.token + 1, ..grant.clone() },
        Grant { token: grant.token.wrapping_sub(1), ..grant.clone() },
    ];
    for forged in &forgeries {
        assert!(matches!(two.release(forged).await, Err(Error::NotHeld { .. })), "{forged:?}");
        assert!(matches!(two.refresh(forged, ttl).await, Err(Error::NotHeld { .. })), "{forged:?}");
    }
    let held = two.list(None).await.expect("list");
    assert_eq!(held.len(), 1);
    assert!(held[0].remaining > ctx.timing().unit, "a forged refresh changed nothing");
    assert_refused(&ctx, &two, "A", "A", lock.owner()).await;
    lock.release().await.expect("the owner releases");
}

/// A holder whose lock expired and was taken over cannot release or
/// refresh the new holder's lock.
pub async fn stale_grant_cannot_touch_its_successor(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let timing = ctx.timing();
    let stale = TreeLock::builder(one.clone(), "A").ttl(timing.unit).build().expect("lock");
    let old = stale.try_acquire().await.expect("free");
    sleep(old.ttl + timing.slack).await;
    let successor = hold(&ctx, &two, "A").await;
    assert!(matches!(one.release(&old).await, Err(Error::NotHeld { .. })));
    assert!(matches!(one.refresh(&old, Ttl::new(timing.unit).expect("ttl")).await, Err(Error::NotHeld { .. })));
    assert!(matches!(stale.release().await, Err(Error::NotHeld { .. })));
    assert_refused(&ctx, &one, "A/B", "A", successor.owner()).await;
    successor.release().await.expect("the successor still holds it");
}

/// A holder that dies without releasing blocks others until its ttl, and
/// not longer.
pub async fn expiry_frees_a_crashed_holder(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let timing = ctx.timing();
    let crashed = TreeLock::builder(one, "A/B").ttl(timing.unit * 2).build().expect("lock");
    let grant = crashed.try_acquire().await.expect("free");
    let granted_at = Instant::now();
    let owner = crashed.owner().clone();
    drop(crashed); // dies: a handle without a guard releases nothing

    // `expires_at` counts from when the request was sent, before the store
    // started the ttl; the reply came after. So: still held just before the
    // earliest, free just after the latest.
    sleep_until(grant.expires_at - timing.slack).await;
    assert_refused(&ctx, &two, "A", "A/B", &owner).await;
    sleep_until(granted_at + grant.ttl + timing.slack).await;
    hold(&ctx, &two, "A").await;
}

/// `refresh(ttl)` sets the remaining life to exactly `ttl`, shorter or
/// longer than what was left.
pub async fn refresh_sets_the_exact_ttl(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let timing = ctx.timing();

    // Shorter: from 3 units left down to 1.
    let lock = TreeLock::builder(one.clone(), "A").ttl(timing.unit * 3).build().expect("lock");
    lock.try_acquire().await.expect("free");
    let refreshed = lock.refresh_to(timing.unit).await.expect("refresh");
    let refreshed_at = Instant::now();
    assert_eq!(refreshed.token, lock.grant().expect("held").token, "a refresh keeps the token");
    let held = two.list(Some(&path("A"))).await.expect("list");
    assert!(held[0].remaining <= refreshed.ttl, "remaining {:?} > {:?}", held[0].remaining, refreshed.ttl);
    sleep_until(refreshed.expires_at - timing.slack).await;
    assert_refused(&ctx, &two, "A", "A", lock.owner()).await;
    sleep_until(refreshed_at + refreshed.ttl + timing.slack).await;
    hold(&ctx, &two, "A").await;

    // Longer: 1 unit, refreshed half way to 2 units.
    let lock = TreeLock::builder(one, "B").ttl(timing.unit).build().expect("lock");
    lock.try_acquire().await.expect("free");
    sleep(timing.unit / 2).await;
    let refreshed = lock.refresh_to(timing.unit * 2).await.expect("refresh");
    let refreshed_at = Instant::now();
    sleep_until(refreshed.expires_at - timing.slack).await;
    assert_refused(&ctx, &two, "B", "B", lock.owner()).await;
    sleep_until(refreshed_at + refreshed.ttl + timing.slack).await;
    hold(&ctx, &two, "B").await;
}

/// Every grant's token is greater than every token granted before in the
/// namespace, across paths and clients; a refresh keeps it.
pub async fn fencing_tokens_strictly_increase(ctx: Ctx) {
    let clients = [ctx.client().await, ctx.client().await];
    let mut last = 0;
    for round in 0..20 {
        let client = &clients[round % 2];
        let at = ["A", "A/B", "C/D/E", "A"][round % 4];
        let lock = handle(&ctx, client, at);
        let grant = lock.try_acquire().await.expect("free");
        assert!(grant.token > last, "token {} after {last}", grant.token);
        last = grant.token;
        assert_eq!(lock.refresh().await.expect("refresh").token, grant.token);
        lock.release().await.expect("release");
    }
}

/// A waiter wakes when the blocking lock is released, long before that
/// lock's ttl.
pub async fn waiter_wakes_on_release_before_the_ttl(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let holder = hold(&ctx, &one, "A/B").await;
    let gated = Gated::new(two);
    let waiter = TreeLock::builder(gated.clone(), "A").wait(Wait::For(long(&ctx))).build().expect("lock");
    let refused = gated.blocked();
    let waiting = tokio::spawn(async move { waiter.acquire().await.map(|_| Instant::now()) });
    tokio::time::timeout(long(&ctx), refused).await.expect("the waiter should have been refused first");
    let released_at = Instant::now();
    holder.release().await.expect("release");
    let granted_at = waiting.await.expect("waiter task").expect("granted after the release");
    let delay = granted_at - released_at;
    assert!(delay < ctx.timing().unit, "woke {delay:?} after the release, the blocker had {:?} left", long(&ctx));
}

/// `lock()` and `acquire()` wait by default (as `Mutex::lock` does), for as
/// long as it takes; `try_lock()` and `try_acquire()` never wait.
pub async fn lock_waits_by_default_and_try_lock_does_not(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let holder = hold(&ctx, &one, "A/B").await;
    let waiter = TreeLock::new(two, "A").expect("lock with the defaults");
    assert!(matches!(waiter.try_lock().await, Err(Error::Refused { .. })));
    assert!(matches!(waiter.try_acquire().await, Err(Error::Refused { .. })));
    let gated = Gated::new(waiter.backend().clone());
    let patient = TreeLock::new(gated.clone(), "A").expect("lock with the defaults");
    let refused = gated.blocked();
    let waiting = tokio::spawn(async move { patient.lock().await.map(|guard| guard.token()) });
    tokio::time::timeout(long(&ctx), refused).await.expect("the default lock() should find the lock held and wait");
    assert!(!waiting.is_finished(), "lock() gave up instead of waiting");
    let released = holder.release().await;
    released.expect("release");
    let token = waiting.await.expect("waiter task").expect("granted once released");
    assert!(token > 0);
}

/// A waiter blocked by a lock nobody releases wakes at that lock's expiry.
pub async fn waiter_wakes_at_the_blockers_expiry(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let timing = ctx.timing();
    let crashed = TreeLock::builder(one, "A").ttl(timing.unit * 2).build().expect("lock");
    let grant = crashed.try_acquire().await.expect("free");
    let granted_at = Instant::now();
    let waiter = TreeLock::builder(two, "A/B").build().expect("lock");
    waiter.acquire_with(Wait::Forever).await.expect("granted at the expiry");
    assert!(Instant::now() + timing.slack >= grant.expires_at, "granted before the blocker's ttl {:?}", grant.ttl);
    let waited = granted_at.elapsed();
    assert!(waited <= grant.ttl + timing.slack * 2, "granted after {waited:?}, ttl {:?}", grant.ttl);
}

/// A timed-out acquisition names the lock in the way and how long it waited.
pub async fn timeout_reports_the_blocker(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let holder = hold(&ctx, &one, "A/B/C").await;
    let unit = ctx.timing().unit;
    let waiter = TreeLock::builder(two, "A").timeout(unit).build().expect("lock");
    match waiter.acquire().await {
        Err(error @ Error::Timeout { .. }) => {
            let message = error.to_string();
            let Error::Timeout { items: asked, waited, blockers } = error else { unreachable!() };
            let blocker = blockers.first();
            assert_eq!(*asked.first(), LockItem { path: path("A"), mode: Mode::Exclusive });
            assert_eq!(blocker.path, path("A/B/C"));
            assert_eq!(&blocker.owner, holder.owner());
            assert!(waited >= unit && waited < unit * 3, "waited {waited:?}");
            assert!(message.contains("A/B/C") && message.contains(holder.owner().as_str()), "{message}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// Names full of separators, wildcards, escapes, braces, control and
/// unicode characters are distinct nodes with exact tree semantics.
pub async fn special_names_are_distinct_and_exact(ctx: Ctx) {
    let client = ctx.client().await;
    let names = [
        "a", "a/b", "a\\", "a\\/b", ";", "a;b", "*", "a*", "?", "[", "[a]", "]", ":", "%", "%25", "%2F", "{", "}",
        "{x}", " ", "a b", "\0", "\n", "\t\x7f", ".", "..", "\u{e9}", "e\u{301}", "🔒", "名前", "_", "0",
    ];
    let mut held = Vec::new();
    for name in names {
        let lock = TreeLock::builder(client.clone(), [name]).ttl(long(&ctx)).build().expect("valid");
        lock.try_acquire().await.unwrap_or_else(|e| panic!("[{name:?}] should be free: {e}"));
        held.push(lock);
    }
    for (lock, name) in held.iter().zip(names) {
        let child = TreeLock::builder(client.clone(), [name, "child"]).build().expect("valid");
        match child.try_acquire().await {
            Err(Error::Refused { blockers, .. }) => {
                assert_eq!(&blockers.first().path, lock.path(), "[{name:?}, child]")
            }
            other => panic!("[{name:?}, child] should be refused by [{name:?}], got {other:?}"),
        }
        let listed = client.list(Some(lock.path())).await.expect("list");
        assert_eq!(listed.len(), 1, "under [{name:?}]: {listed:?}");
        assert_eq!(&listed[0].path, lock.path());
    }
    // `[a, b]` is not `[a/b]`: `[a]` is held, so it is refused by `[a]` only.
    let two_segments = TreeLock::builder(client.clone(), ["a", "b"]).build().expect("valid");
    match two_segments.try_acquire().await {
        Err(Error::Refused { blockers, .. }) => assert_eq!(blockers.first().path, path("a")),
        other => panic!("[a, b] should be refused by [a], got {other:?}"),
    }
    assert_eq!(client.list(None).await.expect("list").len(), names.len());
}

/// Two namespaces on one store never see each other's locks.
pub async fn namespaces_are_isolated(ctx: Ctx) {
    let here = ctx.client().await;
    let there = ctx.other_namespace().await;
    hold(&ctx, &here, "A").await;
    hold(&ctx, &there, "A").await;
    let below = handle(&ctx, &there, "A/B").try_acquire().await;
    assert!(matches!(below, Err(Error::Refused { .. })), "A is held there: {below:?}");
    let listed = there.list(None).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(here.list(None).await.expect("list").len(), 1);
}

/// Listing shows exactly the live locks, with owner, token and remaining
/// life; not the released ones, not the expired ones.
pub async fn inspection_lists_exactly_the_live_locks(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let timing = ctx.timing();
    let short = TreeLock::builder(one.clone(), "E").ttl(timing.unit).build().expect("lock");
    let expired = short.try_acquire().await.expect("free");
    let a = hold(&ctx, &one, "A").await;
    let bc = hold(&ctx, &two, "B/C").await;
    let bde = hold(&ctx, &one, "B/D/E").await;
    hold(&ctx, &two, "B/F").await.release().await.expect("release");
    sleep(expired.ttl + timing.slack).await;

    let listed = two.list(None).await.expect("list");
    let answered = Instant::now();
    let expected = [&a, &bc, &bde];
    assert_eq!(listed.len(), expected.len(), "{listed:?}");
    for (held, lock) in listed.iter().zip(expected) {
        let grant = lock.grant().expect("held");
        assert_eq!(&held.path, grant.path());
        assert_eq!(held.owner, grant.owner);
        assert_eq!(held.token, grant.token);
        assert!(!held.transient);
        // The store's remaining life is at most the ttl, and at least what
        // the client still counts on (its expiry is conservative) when the
        // answer arrived, give or take the store's granularity.
        let counted = grant.expires_at.saturating_duration_since(answered);
        assert!(held.remaining <= grant.ttl && held.remaining + timing.slack >= counted, "{held:?} vs {counted:?}");
    }
    let under = |at: &str| {
        let two = two.clone();
        let at = path(at);
        async move { two.list(Some(&at)).await.expect("list").into_iter().map(|h| h.path.to_string()).collect::<Vec<_>>() }
    };
    assert_eq!(under("B").await, ["B/C", "B/D/E"]);
    assert_eq!(under("B/D").await, ["B/D/E"]);
    assert_eq!(under("B/D/E").await, ["B/D/E"]);
    assert!(under("Z").await.is_empty());
    assert!(under("E").await.is_empty(), "expired");
    assert!(under("B/F").await.is_empty(), "released");
    assert!(a.locked().await.expect("locked"));
    assert!(!handle(&ctx, &two, "B").locked().await.expect("locked"), "B itself is not locked");
}

/// Bad paths, ttls and owner ids get typed errors naming the rule, and
/// nothing reaches the store; what is held is untouched.
pub async fn bad_input_is_rejected_before_the_store(ctx: Ctx) {
    let gated = Gated::new(ctx.client().await);
    let client: Arc<dyn LockBackend> = gated.clone();
    let held = hold(&ctx, &client, "A").await;
    let calls = gated.calls();

    let huge = "x".repeat(1 << 20);
    let deep: Vec<String> = (0..=mutextree_core::MAX_DEPTH).map(|i| i.to_string()).collect();
    let builds = [
        (TreeLock::builder(client.clone(), "").build(), "at least one segment"),
        (TreeLock::builder(client.clone(), "A//B").build(), "is empty"),
        (TreeLock::builder(client.clone(), "/A").build(), "is empty"),
        (TreeLock::builder(client.clone(), deep).build(), "at most"),
        (TreeLock::builder(client.clone(), [huge.as_str()]).build(), "bytes"),
        (TreeLock::builder(client.clone(), "A\\x").build(), "unknown escape"),
        (TreeLock::builder(client.clone(), "B").ttl(Duration::ZERO).build(), "greater than zero"),
        (TreeLock::builder(client.clone(), "B").ttl(Duration::MAX).build(), "at most"),
        (TreeLock::builder(client.clone(), "B").ttl(Ttl::MAX + Duration::from_millis(1)).build(), "at most"),
        (TreeLock::builder(client.clone(), "B").owner("").build(), "at least one character"),
        (TreeLock::builder(client.clone(), "B").owner(huge.clone()).build(), "at most"),
        (TreeLock::builder(client.clone(), "B").owner("a\nb").build(), "control"),
    ];
    for (index, (built, rule)) in builds.into_iter().enumerate() {
        let error = built.expect_err("must be refused");
        let message = error.to_string();
        assert!(message.contains(rule), "case {index}: {message:?} should mention {rule:?}");
        assert!(message.len() < 400, "case {index}: message of {} bytes", message.len());
        assert!(
            matches!(error, Error::InvalidPath { .. } | Error::InvalidTtl { .. } | Error::InvalidOwner { .. }),
            "case {index}: {error:?}"
        );
    }
    assert!(matches!(held.refresh_to(Duration::ZERO).await, Err(Error::InvalidTtl { .. })));
    assert!(matches!(held.refresh_to(Duration::MAX).await, Err(Error::InvalidTtl { .. })));
    assert_eq!(gated.calls(), calls, "bad input reached the store");
    assert!(held.grant().expect("still held").remaining() > long(&ctx) / 2);
    held.release().await.expect("untouched");
}

/// The extreme ttls. The shortest (1 ms) is granted, possibly raised by
/// the store (etcd's leases last at least 2 s; the grant says so), and is
/// gone within that ttl and the store's slack. The longest (a day) is kept
/// as asked, listed with at most a day left, refreshed and released:
/// nothing overflows, and nothing becomes immortal.
pub async fn extreme_ttls_are_kept_and_never_immortal(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let slack = ctx.timing().slack;

    let shortest = TreeLock::builder(one.clone(), path("S")).ttl(Ttl::MIN).build().expect("the shortest ttl");
    let sent = Instant::now();
    let grant = shortest.try_acquire().await.expect("free");
    assert!(grant.ttl >= Ttl::MIN, "{grant:?}");
    assert!(grant.expires_at >= sent + grant.ttl && grant.expires_at <= Instant::now() + grant.ttl, "{grant:?}");
    let next = TreeLock::builder(two.clone(), path("S")).ttl(long(&ctx)).build().expect("lock");
    next.acquire_timeout(grant.ttl + slack * 4).await.expect("free once the shortest ttl has passed");
    next.release().await.expect("release");

    let longest = TreeLock::builder(one, path("D")).ttl(Ttl::MAX).build().expect("the longest ttl");
    let grant = longest.try_acquire().await.expect("free");
    assert_eq!(grant.ttl, Ttl::MAX, "a day is kept as asked");
    let listed = two.list(Some(&path("D"))).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        listed[0].remaining <= Ttl::MAX && listed[0].remaining > Ttl::MAX - long(&ctx),
        "{:?} left of a day",
        listed[0].remaining
    );
    let below = TreeLock::builder(two.clone(), path("D/x")).ttl(long(&ctx)).build().expect("lock");
    assert!(matches!(below.try_acquire().await, Err(Error::Refused { .. })), "the day-long lock holds");
    longest.refresh_to(Ttl::MAX).await.expect("refreshed to a day again");
    longest.release().await.expect("release");
    assert!(two.list(Some(&path("D"))).await.expect("list").is_empty(), "released, not immortal");
}

/// Automatic refresh keeps a short lock alive past its ttl, and reports
/// the loss when the store refuses a refresh.
pub async fn auto_refresh_keeps_the_lock_and_reports_its_loss(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let unit = ctx.timing().unit;
    let lock = TreeLock::builder(one, "A").ttl(unit * 3).auto_refresh(true).build().expect("lock");
    let first = lock.try_acquire().await.expect("free");
    sleep(first.ttl * 4).await;
    assert_refused(&ctx, &two, "A/B", "A", lock.owner()).await;
    let current = lock.grant().expect("still held");
    assert_eq!(current.token, first.token);

    // An administrator takes the lock away: the next refresh is refused.
    two.release(&current).await.expect("forced release");
    let lost = lock.lost();
    let error = tokio::time::timeout(unit * 4, lost).await.expect("the loss is reported within a ttl");
    assert!(matches!(error, Error::Lost { .. }), "{error:?}");
    assert!(error.to_string().contains("refused"), "{error}");
    assert!(!lock.is_held());

    // `run` keeps the lock for work longer than its ttl.
    let worked = lock
        .run(|grant| async move {
            sleep(grant.ttl * 3).await;
            grant.token
        })
        .await
        .expect("run");
    assert!(worked > first.token);
    hold(&ctx, &two, "A").await;

    // The store becomes unreachable: the loss is reported once the lock may
    // have expired, not before, and the work under `run` is stopped.
    let (cut, gated) = ctx.gated_client().await;
    let lock = TreeLock::builder(cut, "U").ttl(unit).auto_refresh(true).build().expect("lock");
    let outcome = lock
        .run(|grant| {
            gated.cut_off();
            async move {
                sleep(grant.ttl * 10).await;
                grant
            }
        })
        .await;
    match outcome {
        Err(error @ Error::Lost { .. }) => assert!(!error.to_string().contains("refused"), "{error}"),
        other => panic!("the work should have been stopped by the loss, got {other:?}"),
    }
    gated.disarm();
    // Reported at the lock's expiry as this side reckons it, which is never
    // after the store's: a moment later (the store's clock started a little
    // later) the store holds nothing.
    sleep(ctx.timing().slack).await;
    let held = two.list(Some(&path("U"))).await.expect("list");
    assert!(held.is_empty(), "the loss was reported long before the store let go: {held:?}");
    hold(&ctx, &two, "U").await;
}

/// `lost()` follows refreshes, never fires for a release, and fires at the
/// expiry when an automatic refresh gets no answer at all.
pub async fn lost_follows_refreshes_and_ignores_releases(ctx: Ctx) {
    let timing = ctx.timing();
    let unit = timing.unit;
    let client = ctx.client().await;

    // Without automatic refresh: lost at the expiry, which a refresh moves.
    let lock = TreeLock::builder(client.clone(), "A").ttl(unit).build().expect("lock");
    lock.try_acquire().await.expect("free");
    let lost = tokio::spawn(lock.lost());
    let refreshed = lock.refresh_to(unit * 3).await.expect("refresh");
    let error = lost.await.expect("task");
    assert!(matches!(error, Error::Lost { .. }), "{error:?}");
    assert!(Instant::now() >= refreshed.expires_at, "lost before the refreshed expiry");

    // A release is not a loss.
    let lock = TreeLock::builder(client, "B").ttl(unit).build().expect("lock");
    lock.try_acquire().await.expect("free");
    let lost = lock.lost();
    lock.release().await.expect("release");
    assert!(tokio::time::timeout(unit * 3, lost).await.is_err(), "a release was reported as a loss");

    // With automatic refresh, a refresh that never answers is a loss at the
    // expiry, not never.
    let (hanging, gated) = ctx.gated_client().await;
    let lock = TreeLock::builder(hanging, "C").ttl(unit * 3).auto_refresh(true).build().expect("lock");
    let grant = lock.try_acquire().await.expect("free");
    gated.arm(0, Point::Before, Fault::Hang);
    let error = tokio::time::timeout(unit * 6, lock.lost()).await.expect("the loss is reported");
    assert!(matches!(error, Error::Lost { .. }), "{error:?}");
    assert!(Instant::now() + timing.slack >= grant.expires_at, "reported before the expiry");
    assert!(!lock.is_held());
}

/// A forced release reaches its holder at once where the store announces
/// it: a holder with a 5-minute ttl and automatic refresh (its first
/// refresh 100 s away) hears of it through `lost()` within seconds, and
/// counts the lock lost; another holder in the same process does not
/// react. Through the stepwise algorithm, which announces nothing, it is a
/// plain release.
pub async fn a_forced_release_reaches_its_holder_at_once(ctx: Ctx) {
    let (one, two) = (ctx.client().await, ctx.client().await);
    let ttl = Duration::from_secs(300);
    let holder = TreeLock::builder(one.clone(), "A").ttl(ttl).auto_refresh(true).build().expect("lock");
    let bystander = TreeLock::builder(one.clone(), "B").ttl(ttl).auto_refresh(true).build().expect("lock");
    let grant = holder.try_acquire().await.expect("free");
    bystander.try_acquire().await.expect("free");
    let (lost, bystander_lost) = (holder.lost(), bystander.lost());
    // The holder's process is subscribed: a revocation sent now is heard.
    one.listen_revocation(&grant).ready().await;

    // An administrator on another connection takes the lock away.
    two.revoke(&grant).await.expect("revoked");
    assert!(two.list(Some(&path("A"))).await.expect("list").is_empty(), "revoked but still held");
    assert!(matches!(two.revoke(&grant).await, Err(Error::NotHeld { .. })), "revoked twice");
    if ctx.algorithm() == Algorithm::Stepwise {
        return;
    }
    let limit = Duration::from_secs(10);
    let error = tokio::time::timeout(limit, lost)
        .await
        .expect("the holder hears of the forced release within seconds, not at its refresh 100 s later");
    assert!(matches!(error, Error::Lost { .. }) && error.to_string().contains("forcibly released"), "{error}");
    assert!(!holder.is_held());
    assert!(tokio::time::timeout(ctx.timing().unit, bystander_lost).await.is_err(), "another grant was lost");
    assert!(bystander.is_held());
    hold(&ctx, &two, "A").await;
}

/// A grant whose ttl ran out cannot be refreshed back to life or released,
/// even when nothing else touched the store in between.
pub async fn an_expired_grant_stays_expired(ctx: Ctx) {
    let client = ctx.client().await;
    let timing = ctx.timing();
    let first = TreeLock::builder(client.clone(), "A/B").ttl(timing.unit).build().expect("lock");
    let second = TreeLock::builder(client.clone(), "C").ttl(timing.unit).build().expect("lock");
    let (first, second) = (first.try_acquire().await.expect("free"), second.try_acquire().await.expect("free"));
    let granted_at = Instant::now();
    sleep_until(granted_at + first.ttl.max(second.ttl) + timing.slack).await;
    // Each grant is touched once, so no earlier call can have cleaned it up.
    assert!(matches!(client.release(&first).await, Err(Error::NotHeld { .. })), "released after expiry");
    let ttl = Ttl::new(long(&ctx)).expect("ttl");
    assert!(matches!(client.refresh(&second, ttl).await, Err(Error::NotHeld { .. })), "refreshed after expiry");
    assert!(client.list(None).await.expect("list").is_empty());
    hold(&ctx, &client, "A").await;
}
