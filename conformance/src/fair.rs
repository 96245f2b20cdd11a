//! The cases of fair waiting, each a plain `async fn(Ctx)`: the timed ones
//! are re-exported by [`cases`](crate::cases), the ones with many clients
//! at once by [`concurrency`](crate::concurrency).
//!
//! The rule under test: a request that has to wait takes a ticket (the
//! namespace's next token) and a reservation of its items; a request is
//! granted iff no live grant conflicts with it and no live reservation
//! with a smaller ticket does. A try without waiting comes after every
//! waiter. So waiters are served in ticket order across the tree, an
//! ancestor is no longer starved by churn below it, requests that do not
//! conflict with a reservation are never delayed by it, and waiting never
//! deadlocks, because every wait-for edge points at a grant or at a
//! smaller ticket. A reservation lives [`RESERVATION_TTL`] unless its
//! waiter renews it, and leaves with the wait however it ends.
//!
//! Only a store's own atomic grant can queue. Under the stepwise algorithm
//! each case checks instead that a request that would join the queue is
//! refused with [`Error::Unsupported`], writing nothing, and stops there;
//! a mixed client reports [`Fairness::Barging`] and the case stops too
//! (`queues_here`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use mutextree_core::backend::{human, Attempt, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::{
    Blockers, Error, Fairness, Grant, HeldLock, LockBackend, LockItems, Mode, Owner, TreeLock, TreeLockBuilder, Ttl,
    Wait,
};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::cases::{long, path};
use crate::churn::ChurnReport;
use crate::modes::Asked;
use crate::oracle::Oracle;
use crate::{Algorithm, Ctx, Timing};

use Mode::{Exclusive, Shared};

/// Whether this run's clients queue waiters. Natively they must: the store
/// reports [`Fairness::Fair`]. The stepwise algorithm cannot, and must say
/// so: a request that would join the queue, raw or through a fair handle
/// that waits, is refused with [`Error::Unsupported`] and writes nothing.
/// A mixed client (half of its grants stepwise) reports
/// [`Fairness::Barging`]. Under both, the case stops there.
pub(crate) async fn queues_here(ctx: &Ctx) -> bool {
    let client = ctx.client().await;
    match ctx.algorithm() {
        Algorithm::Native => {
            assert_eq!(client.fairness(), Fairness::Fair, "a store's own tree operation queues its waiters");
            return true;
        }
        Algorithm::Stepwise => {
            let join = asking(ctx, &[("A", Exclusive)], "joiner", Queue::Join);
            match client.try_grant(&join).await {
                Err(Error::Unsupported { .. }) => {}
                other => panic!("the stepwise algorithm cannot queue a waiter, yet answered {other:?}"),
            }
            let fair = TreeLock::builder(client.clone(), path("A"))
                .fairness(Fairness::Fair)
                .ttl(long(ctx))
                .build()
                .expect("lock");
            match fair.acquire_timeout(ctx.timing().unit).await {
                Err(Error::Unsupported { .. }) => {}
                other => panic!("a fair wait through the stepwise algorithm should be unsupported, got {other:?}"),
            }
        }
        Algorithm::Mixed => {}
    }
    assert_eq!(client.fairness(), Fairness::Barging, "{:?} clients cannot queue", ctx.algorithm());
    assert!(client.list(None).await.expect("list").is_empty(), "nothing may be held");
    assert!(client.waiters(None).await.expect("waiters").is_empty(), "nothing may be queued");
    false
}

/// A request of `owner` for `items` at `queue`, with a ttl no case
/// outlives.
fn asking(ctx: &Ctx, items: Asked<'_>, owner: &str, queue: Queue) -> LockRequest {
    let items = LockItems::new(items.iter().map(|&(at, mode)| (path(at), mode))).expect("valid items");
    LockRequest::of(items, Owner::new(owner).expect("owner"), Ttl::new(long(ctx)).expect("ttl")).in_queue(queue)
}

/// One raw attempt of `owner` for `items` at `queue`.
async fn attempt(ctx: &Ctx, client: &Arc<dyn LockBackend>, items: Asked<'_>, owner: &str, queue: Queue) -> Attempt {
    client.try_grant(&asking(ctx, items, owner, queue)).await.unwrap_or_else(|e| panic!("{items:?}: {e}"))
}

fn granted(attempt: Attempt, what: &str) -> Grant {
    match attempt {
        Attempt::Granted(grant) => grant,
        other => panic!("{what} should be granted, got {other:?}"),
    }
}

fn blocked(attempt: Attempt, what: &str) -> Blockers {
    match attempt {
        Attempt::Blocked(blockers) => blockers,
        other => panic!("{what} should be refused without queueing, got {other:?}"),
    }
}

fn queued(attempt: Attempt, what: &str) -> (u64, Blockers) {
    match attempt {
        Attempt::Queued { ticket, blockers } => (ticket, blockers),
        other => panic!("{what} should be refused and queued, got {other:?}"),
    }
}

/// Asserts that `blocker` is the reservation of `owner` with `ticket` on
/// `at`.
fn assert_reservation(blocker: &HeldLock, at: &str, owner: &str, ticket: u64, what: &str) {
    assert!(
        blocker.waiting && blocker.token == ticket && blocker.owner.as_str() == owner && blocker.path == path(at),
        "{what} should be held back by {owner}'s reservation on {at} (ticket {ticket}), got {blocker}"
    );
}

/// Asserts that a try on `asked` is refused, held back by the reservation
/// `(path, owner, ticket)` and by no grant.
async fn assert_try_held_back(
    ctx: &Ctx,
    client: &Arc<dyn LockBackend>,
    asked: (&str, Mode),
    (at, owner, ticket): (&str, &str, u64),
    what: &str,
) {
    let blockers = blocked(attempt(ctx, client, &[asked], "late", Queue::Try).await, what);
    assert_reservation(blockers.first(), at, owner, ticket, what);
}

/// `owner` withdraws its reservation `ticket`.
async fn withdraw(client: &Arc<dyn LockBackend>, owner: &str, ticket: u64) {
    client.withdraw(&Owner::new(owner).expect("owner"), ticket).await.expect("withdraw");
}

/// The tickets of the live reservations on `under` and below, in the
/// order listed.
async fn tickets(client: &Arc<dyn LockBackend>, under: Option<&str>) -> Vec<u64> {
    let under = under.map(path);
    let waiters = client.waiters(under.as_ref()).await.expect("waiters");
    waiters.iter().map(|held| held.token).collect()
}

/// A waiter's reservation refuses every later conflicting request (a try,
/// or a waiter that comes after it) and is named as the blocker, unless a
/// grant is in the way of that item too. A refused try writes nothing; a
/// request that joins the queue gets a ticket after every token granted
/// before it, and later tokens come after the ticket. The reservation is
/// listed by `waiters`, on its path and above, never by `list`.
pub async fn a_reservation_refuses_later_requests_and_names_its_waiter(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let client = ctx.client().await;
    let holder = granted(attempt(&ctx, &client, &[("A/B", Exclusive)], "holder", Queue::Try).await, "A/B");
    let (ticket, blockers) = queued(attempt(&ctx, &client, &[("A", Exclusive)], "waiter", Queue::Join).await, "A");
    assert!(ticket > holder.token, "ticket {ticket} after the holder's token {}", holder.token);
    let first = blockers.first();
    assert!(!first.waiting && first.token == holder.token, "the holder is in the way, got {first}");

    let listed = client.waiters(None).await.expect("waiters");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let reservation = &listed[0];
    assert_reservation(reservation, "A", "waiter", ticket, "the listing");
    assert_eq!(reservation.mode, Exclusive);
    assert!(!reservation.remaining.is_zero() && reservation.remaining <= RESERVATION_TTL, "{reservation:?}");
    assert_eq!(tickets(&client, Some("A")).await, [ticket], "listed under its own path");
    assert!(tickets(&client, Some("A/B")).await.is_empty(), "not listed below its path");
    assert!(tickets(&client, Some("C")).await.is_empty(), "not listed elsewhere");
    let held: Vec<u64> = client.list(None).await.expect("list").iter().map(|held| held.token).collect();
    assert_eq!(held, [holder.token], "a reservation is not a grant");

    for asked in [("A/C", Exclusive), ("A/C/D", Shared), ("A", Shared)] {
        let what = format!("a try on {asked:?}");
        if asked.0 == "A" {
            // Shared on A meets the holder's Exclusive item below first.
            let blockers = blocked(attempt(&ctx, &client, &[asked], "late", Queue::Try).await, &what);
            assert_eq!(blockers.first().token, holder.token, "{what}: a grant is named first");
        } else {
            assert_try_held_back(&ctx, &client, asked, ("A", "waiter", ticket), &what).await;
        }
    }
    let what = "a try on A/B/C and Z";
    let blockers =
        blocked(attempt(&ctx, &client, &[("A/B/C", Exclusive), ("Z", Exclusive)], "late", Queue::Try).await, what);
    assert_eq!(blockers.len(), 1, "{what}: Z is free, got {blockers:?}");
    assert!(!blockers.first().waiting && blockers.first().token == holder.token, "{what}: the grant is named first");
    assert_eq!(tickets(&client, None).await, [ticket], "a refused try writes nothing");

    let handle = TreeLock::builder(client.clone(), path("A/C")).ttl(long(&ctx)).build().expect("lock");
    match handle.try_acquire().await {
        Err(error @ Error::Refused { .. }) => {
            let message = error.to_string();
            assert!(message.contains("waiter") && message.contains(&ticket.to_string()), "{message}");
        }
        other => panic!("a handle's try on A/C should be refused by the waiter, got {other:?}"),
    }

    let (second, blockers) = queued(attempt(&ctx, &client, &[("A/C", Exclusive)], "second", Queue::Join).await, "A/C");
    assert!(second > ticket, "tickets rise: {second} after {ticket}");
    assert_reservation(blockers.first(), "A", "waiter", ticket, "the second waiter");
    let elsewhere = granted(attempt(&ctx, &client, &[("Z", Exclusive)], "elsewhere", Queue::Try).await, "Z");
    assert!(elsewhere.token > second, "tickets and tokens are one sequence: token {} after {second}", elsewhere.token);
    assert_eq!(tickets(&client, None).await, [ticket, second], "in key order");

    for (owner, ticket) in [("waiter", ticket), ("second", second)] {
        withdraw(&client, owner, ticket).await;
    }
    for grant in [&holder, &elsewhere] {
        client.release(grant).await.expect("release");
    }
    assert!(tickets(&client, None).await.is_empty());
    let last = granted(attempt(&ctx, &client, &[("A", Exclusive)], "late", Queue::Try).await, "A, once everyone left");
    client.release(&last).await.expect("release");
}

/// A waiter's later attempts are refused only by grants and by
/// reservations with smaller tickets, renew its reservation while refused,
/// and remove it with the grant; a withdrawal by its owner removes it, and
/// by anyone else changes nothing.
pub async fn waiters_defer_only_to_earlier_tickets(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let client = ctx.client().await;
    let holder = granted(attempt(&ctx, &client, &[("A/B", Exclusive)], "holder", Queue::Try).await, "A/B");
    let (first, _) = queued(attempt(&ctx, &client, &[("A", Exclusive)], "first", Queue::Join).await, "A");
    let (second, _) = queued(attempt(&ctx, &client, &[("A/C", Exclusive)], "second", Queue::Join).await, "A/C");

    // A refused attempt renews: the first waiter renews a third of the
    // reservation's life later, the second does not.
    sleep(RESERVATION_TTL / 3).await;
    let (renewed, blockers) =
        queued(attempt(&ctx, &client, &[("A", Exclusive)], "first", Queue::Waiting(first)).await, "A");
    assert_eq!(renewed, first, "a waiter keeps its ticket");
    assert_eq!(blockers.first().token, holder.token, "the holder is still in the way");
    let slack = ctx.timing().slack;
    let remaining = |listed: &[HeldLock], ticket: u64| {
        listed.iter().find(|held| held.token == ticket).map(|held| held.remaining).expect("listed")
    };
    let listed = client.waiters(None).await.expect("waiters");
    assert!(remaining(&listed, first) + slack >= RESERVATION_TTL, "renewed to its full life: {listed:?}");
    assert!(remaining(&listed, second) <= RESERVATION_TTL * 2 / 3 + slack, "not renewed: {listed:?}");

    let later = attempt(&ctx, &client, &[("A/C", Exclusive)], "second", Queue::Waiting(second)).await;
    let (ticket, blockers) = queued(later, "the second waiter, behind the first");
    assert_eq!(ticket, second);
    assert_reservation(blockers.first(), "A", "first", first, "the second waiter");

    client.release(&holder).await.expect("release");
    let later = attempt(&ctx, &client, &[("A/C", Exclusive)], "second", Queue::Waiting(second)).await;
    let (_, blockers) = queued(later, "the second waiter, with no grant in the way");
    assert_reservation(blockers.first(), "A", "first", first, "the second waiter, with no grant in the way");
    blocked(attempt(&ctx, &client, &[("A/D", Exclusive)], "late", Queue::Try).await, "a try on A/D");

    let grant = attempt(&ctx, &client, &[("A", Exclusive)], "first", Queue::Waiting(first)).await;
    let grant = granted(grant, "the first waiter, ahead of a later ticket");
    assert!(grant.token > second, "token {} after every ticket so far", grant.token);
    assert_eq!(tickets(&client, None).await, [second], "the grant took the first reservation away");
    let later = attempt(&ctx, &client, &[("A/C", Exclusive)], "second", Queue::Waiting(second)).await;
    let (_, blockers) = queued(later, "the second waiter, behind the first's grant");
    assert!(!blockers.first().waiting && blockers.first().token == grant.token, "{blockers:?}");

    withdraw(&client, "first", second).await;
    assert_eq!(tickets(&client, None).await, [second], "only its owner withdraws a reservation");
    for _ in 0..2 {
        withdraw(&client, "second", second).await;
    }
    assert!(tickets(&client, None).await.is_empty(), "withdrawn");
    client.release(&grant).await.expect("release");
    let last =
        granted(attempt(&ctx, &client, &[("A/D", Exclusive)], "late", Queue::Try).await, "A/D, once everyone left");
    client.release(&last).await.expect("release");
}

/// Reservations delay only what conflicts with them: siblings of a
/// waiter's path, its cousins and Shared requests beside a Shared waiter
/// are granted at once, without waiting and by waiting handles alike.
pub async fn reservations_never_refuse_what_they_do_not_conflict_with(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let client = ctx.client().await;
    let holder = [("A/B/C", Exclusive), ("S/x", Exclusive)];
    let holder = granted(attempt(&ctx, &client, &holder, "holder", Queue::Try).await, "A/B/C and S/x");
    let (writer, _) = queued(attempt(&ctx, &client, &[("A/B", Exclusive)], "writer", Queue::Join).await, "A/B");
    let (reader, _) = queued(attempt(&ctx, &client, &[("S", Shared)], "reader", Queue::Join).await, "S");

    let beside: [Asked<'_>; 6] = [
        &[("A/C", Exclusive)],
        &[("A/Bx", Exclusive)],
        &[("A/C/D", Shared), ("B", Exclusive)],
        &[("S/y", Shared)],
        &[("S/y/z", Shared), ("T", Exclusive)],
        &[("A/BB/C", Exclusive), ("S/w", Shared)],
    ];
    for items in beside {
        for queue in [Queue::Try, Queue::Join] {
            let what = format!("{items:?} ({queue:?}) beside the waiters");
            let grant = granted(attempt(&ctx, &client, items, "neighbour", queue).await, &what);
            client.release(&grant).await.expect("release");
        }
        let handle = crate::modes::handle_of(&ctx, &client, items);
        let guard = handle.lock_with(Wait::For(ctx.timing().unit)).await.unwrap_or_else(|e| panic!("{items:?}: {e}"));
        guard.release().await.expect("release");
    }
    // While the reservations are live: conflicting requests are refused.
    let what = "a try on A/B/D";
    assert_try_held_back(&ctx, &client, ("A/B/D", Shared), ("A/B", "writer", writer), what).await;
    let what = "a try on S/y, exclusive";
    assert_try_held_back(&ctx, &client, ("S/y", Exclusive), ("S", "reader", reader), what).await;
    assert_eq!(tickets(&client, None).await.len(), 2, "no request beside them wrote a reservation");

    for (owner, ticket) in [("writer", writer), ("reader", reader)] {
        withdraw(&client, owner, ticket).await;
    }
    client.release(&holder).await.expect("release");
}

/// A waiter that stops renewing (it died) blocks the requests behind it
/// for at most [`RESERVATION_TTL`], by the store's clock alone: still at
/// half of it, no longer once it is over. A waiter that was only slow
/// writes its reservation again with its next attempt.
pub async fn a_dead_waiters_reservation_lapses_within_its_ttl(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let (client, dead) = (ctx.client().await, ctx.client().await);
    let holder = granted(attempt(&ctx, &client, &[("A/x", Exclusive)], "holder", Queue::Try).await, "A/x");
    let joined_at = Instant::now();
    let (ticket, _) = queued(attempt(&ctx, &dead, &[("A", Exclusive)], "dead", Queue::Join).await, "A");
    drop(dead);
    let what = "a try on A/y behind a dead waiter";
    assert_try_held_back(&ctx, &client, ("A/y", Exclusive), ("A", "dead", ticket), what).await;

    sleep_until(joined_at + RESERVATION_TTL / 2).await;
    let what = "a try on A/y, half a reservation's life later";
    assert_try_held_back(&ctx, &client, ("A/y", Exclusive), ("A", "dead", ticket), what).await;

    sleep_until(joined_at + RESERVATION_TTL + ctx.timing().slack).await;
    let grant = attempt(&ctx, &client, &[("A/y", Exclusive)], "probe", Queue::Try).await;
    let grant = granted(grant, "a try on A/y once the dead waiter's reservation lapsed");
    assert!(tickets(&client, None).await.is_empty(), "a lapsed reservation is not listed");
    client.release(&grant).await.expect("release");

    let again = attempt(&ctx, &client, &[("A", Exclusive)], "dead", Queue::Waiting(ticket)).await;
    let (again, _) = queued(again, "a slow waiter's next attempt");
    assert_eq!(again, ticket, "it keeps its ticket");
    assert_eq!(tickets(&client, None).await, [ticket], "its reservation is written again");
    withdraw(&client, "dead", ticket).await;
    client.release(&holder).await.expect("release");
}

/// A reservation says how long its waiter has been in line: since the
/// attempt that took its ticket, through its renewals (a renewal does not
/// send it back to the start), never longer than the time since, in the
/// listing and as a blocker alike. A grant says nothing of the kind.
pub async fn a_waiter_says_how_long_it_has_been_in_line(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let client = ctx.client().await;
    let slack = ctx.timing().slack;
    // Steps well inside a reservation's life, so that it never lapses.
    let step = RESERVATION_TTL / 3;
    let holder = granted(attempt(&ctx, &client, &[("A/x", Exclusive)], "holder", Queue::Try).await, "A/x");
    let before_join = Instant::now();
    let (ticket, _) = queued(attempt(&ctx, &client, &[("A", Exclusive)], "waiter", Queue::Join).await, "A");
    sleep_until(before_join + step).await;
    let renewal = attempt(&ctx, &client, &[("A", Exclusive)], "waiter", Queue::Waiting(ticket)).await;
    assert_eq!(queued(renewal, "a renewal").0, ticket);
    sleep_until(before_join + 2 * step).await;

    let listed = client.waiters(None).await.expect("waiters");
    let blockers = blocked(attempt(&ctx, &client, &[("A/y", Exclusive)], "late", Queue::Try).await, "a try on A/y");
    let since_join = before_join.elapsed();
    let held = client.list(None).await.expect("list");
    for (reservation, seen) in [(&listed[0], "listed"), (blockers.first(), "as a blocker")] {
        assert_reservation(reservation, "A", "waiter", ticket, seen);
        assert!(
            reservation.waited + slack >= 2 * step && reservation.waited <= since_join + slack,
            "{seen}, the waiter has been in line since its join, {} ago at most and renewed {} after it: it says {}",
            human(since_join),
            human(step),
            human(reservation.waited)
        );
    }
    assert_eq!(held.iter().map(|held| held.waited).collect::<Vec<_>>(), [Duration::ZERO], "a grant waits for nothing");
    withdraw(&client, "waiter", ticket).await;
    client.release(&holder).await.expect("release");
}

/// How many times a case repeats what it does when the outcome depends on
/// timing.
const ROUNDS: usize = 10;

/// A handle on `items` that waits as long as any case lasts, and tells on
/// `moved` once it has joined the queue (its first refusal) or, if it
/// never had to, once it is granted.
fn waiting_handle(
    ctx: &Ctx,
    client: &Arc<dyn LockBackend>,
    items: Asked<'_>,
    moved: Arc<watch::Sender<bool>>,
) -> TreeLock {
    TreeLockBuilder::<TreeLock>::many(client.clone(), items.iter().map(|&(at, mode)| (path(at), mode)))
        .ttl(long(ctx))
        .wait(Wait::For(long(ctx)))
        .on_wait(move |_| {
            moved.send_replace(true);
        })
        .build()
        .expect("valid items")
}

/// Waits (timed out, cancelled before or during an attempt) that end
/// without a grant leave no reservation once their background withdrawal
/// ran ([`TreeLock::settled`]), and nothing is held.
pub async fn a_wait_that_ends_without_a_grant_leaves_no_reservation(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let (client, probe) = (ctx.client().await, ctx.client().await);
    let holder = granted(attempt(&ctx, &client, &[("A", Exclusive)], "holder", Queue::Try).await, "A");
    for round in 0..ROUNDS {
        let lock = TreeLock::builder(client.clone(), path("A/B")).ttl(long(&ctx)).build().expect("lock");
        match lock.acquire_timeout(ctx.timing().unit / 10).await {
            Err(Error::Timeout { .. }) => {}
            other => panic!("round {round}: a wait under a holder should time out, got {other:?}"),
        }
        lock.settled().await;
        let left = probe.waiters(None).await.expect("waiters");
        assert!(left.is_empty(), "round {round}: a timed-out wait left {left:?}");

        let moved = Arc::new(watch::Sender::new(false));
        let lock = waiting_handle(&ctx, &client, &[("A/B", Exclusive)], moved.clone());
        let mut queued = moved.subscribe();
        tokio::select! {
            outcome = lock.acquire() => panic!("round {round}: granted under a holder: {outcome:?}"),
            _ = queued.wait_for(|moved| *moved) => {}
        }
        lock.settled().await;
        let left = probe.waiters(None).await.expect("waiters");
        assert!(left.is_empty(), "round {round}: a cancelled wait left {left:?}");

        // Cut at a random moment of its first attempts instead.
        let lock = TreeLock::builder(client.clone(), path("A/B")).ttl(long(&ctx)).build().expect("lock");
        let cut = Duration::from_micros(fastrand::u64(..2_000));
        let cancelled = timeout(cut, lock.acquire()).await;
        assert!(cancelled.is_err(), "round {round}: granted under a holder: {cancelled:?}");
        lock.settled().await;
        let left = probe.waiters(None).await.expect("waiters");
        assert!(left.is_empty(), "round {round}: a wait cut after {cut:?} left {left:?}");
    }
    let held: Vec<u64> = probe.list(None).await.expect("list").iter().map(|held| held.token).collect();
    assert_eq!(held, [holder.token], "only the holder holds anything");
    client.release(&holder).await.expect("release");
}

/// Conflicting waiters, queued one after the other behind a holder, are
/// granted in the order they queued once it leaves, although each could
/// have been granted before the one ahead of it: they alternate between
/// `[A]` and a leaf of their own under it, so a leaf's waiter has no grant
/// in its way, only the reservation of the waiter before it.
pub async fn waiters_are_granted_in_ticket_order(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    const WAITERS: usize = 6;
    let holders = ctx.client().await;
    let mut clients = Vec::new();
    for _ in 0..WAITERS {
        clients.push(ctx.client().await);
    }
    let leaves: Vec<String> =
        (0..WAITERS).map(|at| if at % 2 == 0 { "A".to_owned() } else { format!("A/w{at}") }).collect();
    let oracle = Arc::new(Oracle::new());
    for round in 0..ROUNDS {
        let holder = granted(attempt(&ctx, &holders, &[("A/h", Exclusive)], "holder", Queue::Try).await, "A/h");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for (at, client) in clients.iter().enumerate() {
            let moved = Arc::new(watch::Sender::new(false));
            let lock = waiting_handle(&ctx, client, &[(leaves[at].as_str(), Exclusive)], moved.clone());
            let (order, oracle, mut queued) = (order.clone(), oracle.clone(), moved.subscribe());
            waiting.push(tokio::spawn(async move {
                let grant = lock.acquire().await.unwrap_or_else(|e| panic!("waiter {at}: {e}"));
                order.lock().expect("order").push(at);
                moved.send_replace(true);
                oracle.enter(&grant);
                tokio::task::yield_now().await;
                oracle.exit(&grant);
                lock.release().await.expect("release");
            }));
            // The next waiter starts only once this one has queued.
            queued.wait_for(|moved| *moved).await.expect("the waiter tells");
        }
        holders.release(&holder).await.expect("release");
        for task in join_all(waiting).await {
            task.expect("a waiter failed");
        }
        let order = order.lock().expect("order").clone();
        assert_eq!(order, (0..WAITERS).collect::<Vec<_>>(), "round {round}: granted out of ticket order");
    }
    oracle.assert_clean();
}

/// An Exclusive waiter on `[A]` while 16 clients keep locking leaves under
/// it (two per leaf, each waiting for its turn, holding it for a while,
/// releasing and asking again) is granted as soon as the holders it found
/// and the waiters queued before it are gone: within two hold times, and
/// two more and the store's slack for the hand-offs (a waiter woken by
/// releases that do not free it backs off a little). Without a queue it
/// would wait for an instant when no leaf is held, which churn need never
/// leave. Prints the waits (p50, p99, max).
pub async fn an_ancestor_waiter_is_not_starved_by_churn_below_it(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    ancestor_waits_under_fair_churn(&ctx, 16, 8).await;
}

/// The measurement behind
/// [`an_ancestor_waiter_is_not_starved_by_churn_below_it`], with
/// `churners` clients churning and `waits` waits for `[A]`.
pub async fn ancestor_waits_under_fair_churn(ctx: &Ctx, churners: usize, waits: usize) -> ChurnReport {
    let hold = Duration::from_millis(50);
    let bound = hold * 4 + ctx.timing().slack.max(Timing::REAL.slack);
    let oracle = Arc::new(Oracle::new());
    let stop = Arc::new(watch::Sender::new(false));
    let churn_grants = Arc::new(AtomicU64::new(0));
    let mut churning = Vec::new();
    for churner in 0..churners {
        let client = ctx.client().await;
        let leaf = format!("A/leaf-{}", churner % (churners / 2).max(1));
        let lock =
            TreeLock::builder(client, path(&leaf)).ttl(long(ctx)).wait(Wait::For(long(ctx))).build().expect("lock");
        let (oracle, mut stopped, churn_grants) = (oracle.clone(), stop.subscribe(), churn_grants.clone());
        churning.push(tokio::spawn(async move {
            while !*stopped.borrow_and_update() {
                let grant = tokio::select! {
                    grant = lock.acquire() => grant.unwrap_or_else(|e| panic!("churner {churner}: {e}")),
                    _ = stopped.changed() => break,
                };
                oracle.enter(&grant);
                churn_grants.fetch_add(1, Ordering::Relaxed);
                sleep(hold).await;
                oracle.exit(&grant);
                lock.release().await.expect("a churner releases");
            }
        }));
    }
    let waiter = ctx.client().await;
    let ancestor = TreeLock::builder(waiter, path("A")).ttl(long(ctx)).build().expect("lock");
    let mut granted = Vec::new();
    for wait in 0..waits {
        // The churn resumes between waits (pacing, not synchronisation).
        sleep(hold * 2).await;
        let started = Instant::now();
        let grant = ancestor
            .acquire_timeout(bound)
            .await
            .unwrap_or_else(|e| panic!("wait {wait}: the ancestor waiter starved under churn beyond {bound:?}: {e}"));
        granted.push(started.elapsed());
        oracle.enter(&grant);
        oracle.exit(&grant);
        ancestor.release().await.expect("the waiter releases");
    }
    stop.send_replace(true);
    for churner in join_all(churning).await {
        churner.expect("a churner failed");
    }
    oracle.assert_clean();
    granted.sort();
    let report = ChurnReport {
        store: format!("fair waiting, {:?}", ctx.algorithm()),
        churners,
        granted,
        gave_up: 0,
        wait_limit: bound,
        churn_grants: churn_grants.load(Ordering::Relaxed),
        overtaken: 0,
    };
    println!("{report}");
    report
}

/// Waiters whose items cross (`{A, B}` and `{B, A}`; `{A, B/x}` and
/// `{B, A/y}`, ancestors of each other's items), all queued behind one
/// holder of `{A, B}`, are all granted once it leaves: the smaller ticket
/// goes first, so no two wait for each other. A deadlock that only the
/// lapse of a reservation would break counts as one: all must be granted
/// within half of [`RESERVATION_TTL`].
pub async fn crossing_waiters_never_deadlock(ctx: Ctx) {
    if !queues_here(&ctx).await {
        return;
    }
    let crossing: [Asked<'static>; 5] = [
        &[("A", Exclusive), ("B", Exclusive)],
        &[("B", Exclusive), ("A", Exclusive)],
        &[("A", Exclusive), ("B/x", Exclusive)],
        &[("B", Exclusive), ("A/y", Exclusive)],
        &[("A/z", Shared), ("B", Shared)],
    ];
    let holders = ctx.client().await;
    let mut clients = Vec::new();
    for _ in 0..crossing.len() {
        clients.push(ctx.client().await);
    }
    let oracle = Arc::new(Oracle::new());
    let patience = RESERVATION_TTL / 2;
    for round in 0..ROUNDS * 2 {
        let holder = [("A", Exclusive), ("B", Exclusive)];
        let holder = granted(attempt(&ctx, &holders, &holder, "holder", Queue::Try).await, "A and B");
        let mut waiting = Vec::new();
        let mut all_queued = Vec::new();
        for (&items, client) in crossing.iter().zip(&clients) {
            let moved = Arc::new(watch::Sender::new(false));
            let lock = waiting_handle(&ctx, client, items, moved.clone());
            all_queued.push(moved.subscribe());
            let oracle = oracle.clone();
            // They race to queue.
            waiting.push(tokio::spawn(async move {
                let grant = lock.acquire().await.unwrap_or_else(|e| panic!("{items:?}: {e}"));
                moved.send_replace(true);
                oracle.enter(&grant);
                tokio::task::yield_now().await;
                oracle.exit(&grant);
                lock.release().await.expect("release");
            }));
        }
        for queued in &mut all_queued {
            queued.wait_for(|moved| *moved).await.expect("the waiter tells");
        }
        holders.release(&holder).await.expect("release");
        let all = timeout(patience, join_all(waiting)).await;
        let all = all.unwrap_or_else(|_| panic!("round {round}: crossing waiters not all granted within {patience:?}"));
        for task in all {
            task.expect("a waiter failed");
        }
    }
    oracle.assert_clean();
    assert_eq!(oracle.grants(), (ROUNDS * 2 * crossing.len()) as u64);
}
