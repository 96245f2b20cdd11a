//! Fair waiting on the PostgreSQL store, on a real server, each test in a
//! schema of its own: a try refused by a waiter's reservation and naming
//! it, while siblings and barging requests go ahead; a joining request
//! writing one row per item with a ticket above every token before it; a
//! waiter going ahead of later tickets only, renewing its reservation,
//! writing it again once lapsed, and its grant removing it; a dead
//! waiter's reservation lapsing within its life and then swept; withdrawal
//! and the wake-up it sends; the listing of waiters; a waiter's time in
//! line kept through renewals; schemas of versions 5 and 6 with live locks
//! (and a waiter) migrated; crossing multi-path waiters that never
//! deadlock; and an uncontended grant that reads no reservation.

use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{deadlocks_once_sessions_end, fresh_name, inspector, install_released, migrated, released, RELEASED};
use conformance::cancel::Gated;
use conformance::oracle::Oracle;
use conformance::servers::postgres;
use futures::future::join_all;
use mutextree_core::backend::{acquire, Attempt, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::{Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Owner, TreeLock, Ttl, Wait};
use mutextree_postgres::{PostgresBackend, PostgresConfig};
use tokio::time::Instant;
use Mode::{Exclusive, Shared};

const LONG: Duration = Duration::from_secs(60);

fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("path")
}

/// A request for `items`, each `(path, mode)`, at `queue`.
fn request(items: &[(&str, Mode)], owner: &str, queue: Queue) -> LockRequest {
    let items = LockItems::new(items.iter().map(|(text, mode)| (path(text), *mode))).expect("items");
    LockRequest::of(items, Owner::new(owner).expect("owner"), Ttl::new(LONG).expect("ttl")).in_queue(queue)
}

/// A backend on a schema of its own, and a plain connection to look at
/// the schema's tables.
struct Fixture {
    backend: PostgresBackend,
    client: tokio_postgres::Client,
    schema: String,
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        Self::on(&postgres::url(), prefix).await
    }

    async fn on(url: &str, prefix: &str) -> Self {
        let schema = fresh_name(prefix);
        let config = PostgresConfig::from_url(url).expect("url").schema(schema.clone()).pool_size(2);
        let backend = config.connect().await.expect("connect").backend("fair").expect("namespace");
        Fixture { backend, client: inspector(url).await, schema }
    }

    async fn attempt(&self, items: &[(&str, Mode)], owner: &str, queue: Queue) -> Attempt {
        self.backend.try_grant(&request(items, owner, queue)).await.expect("attempt")
    }

    /// Every row of `reservations`, expired ones included: (key, ticket,
    /// mode, owner), in key and ticket order.
    async fn rows(&self) -> Vec<(String, u64, String, String)> {
        let sql = format!("SELECT key, ticket, mode, owner FROM \"{}\".reservations ORDER BY key, ticket", self.schema);
        let rows = self.client.query(&sql, &[]).await.expect("reservations");
        rows.iter().map(|row| (row.get(0), row.get::<_, i64>(1) as u64, row.get(2), row.get(3))).collect()
    }

    /// The expiry of the reservation `ticket` on `key`, in seconds since
    /// the epoch by the server's clock.
    async fn expiry(&self, key: &str, ticket: u64) -> f64 {
        let sql = format!(
            "SELECT extract(epoch FROM expires_at)::float8 FROM \"{}\".reservations WHERE key = $1 AND ticket = $2",
            self.schema
        );
        self.client.query_one(&sql, &[&key, &(ticket as i64)]).await.expect("one reservation").get(0)
    }

    async fn drop_schema(self) {
        self.client.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema)).await.expect("drop");
    }
}

fn granted(attempt: Attempt) -> Grant {
    match attempt {
        Attempt::Granted(grant) => grant,
        refused => panic!("refused: {refused:?}"),
    }
}

fn blocked(attempt: Attempt) -> Vec<HeldLock> {
    match attempt {
        Attempt::Blocked(blockers) => blockers.into_vec(),
        other => panic!("not a plain refusal: {other:?}"),
    }
}

fn queued(attempt: Attempt) -> (u64, Vec<HeldLock>) {
    match attempt {
        Attempt::Queued { ticket, blockers } => (ticket, blockers.into_vec()),
        other => panic!("not queued: {other:?}"),
    }
}

/// A blocker as (path, mode, owner, token, waiting).
fn described(held: &HeldLock) -> (String, Mode, String, u64, bool) {
    (held.path.to_string(), held.mode, held.owner.as_str().to_owned(), held.token, held.waiting)
}

fn row(key: &str, ticket: u64, mode: &str, owner: &str) -> (String, u64, String, String) {
    (key.to_owned(), ticket, mode.to_owned(), owner.to_owned())
}

#[tokio::test]
async fn a_try_is_refused_by_a_waiter_and_names_it_while_siblings_and_bargers_go_ahead() {
    let f = Fixture::new("fair_try").await;
    assert_eq!(f.backend.fairness(), mutextree_core::Fairness::Fair);
    let holder = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Try).await);
    let (ticket, blockers) = queued(f.attempt(&[("A/B", Exclusive)], "waiter", Queue::Join).await);
    assert_eq!(
        blockers.iter().map(described).collect::<Vec<_>>(),
        [("A".into(), Exclusive, "holder".into(), holder.token, false)]
    );
    f.backend.release(&holder).await.expect("release");

    // On the node, below it, above it, in either mode, the same owner too.
    let cases: [(&[(&str, Mode)], &str); 4] = [
        (&[("A/B", Exclusive)], "other"),
        (&[("A/B/C", Shared)], "other"),
        (&[("A", Shared)], "other"),
        (&[("A", Exclusive)], "waiter"),
    ];
    for (items, owner) in cases {
        let blockers = blocked(f.attempt(items, owner, Queue::Try).await);
        assert_eq!(
            blockers.iter().map(described).collect::<Vec<_>>(),
            [("A/B".into(), Exclusive, "waiter".into(), ticket, true)],
            "{items:?}"
        );
        assert!(!blockers[0].transient);
        assert!(blockers[0].remaining > Duration::ZERO && blockers[0].remaining <= RESERVATION_TTL, "{blockers:?}");
    }
    // A joining request queues behind it.
    let (later, blockers) = queued(f.attempt(&[("A/B/C", Exclusive)], "late", Queue::Join).await);
    assert!(later > ticket);
    assert_eq!(described(&blockers[0]), ("A/B".into(), Exclusive, "waiter".into(), ticket, true));
    // The tries wrote nothing.
    assert_eq!(f.rows().await, [row("A/B/", ticket, "exclusive", "waiter"), row("A/B/C/", later, "exclusive", "late")]);

    // A blocker for each blocked item: the grant rather than the
    // reservation where both are in the way.
    let other = granted(f.attempt(&[("Q", Exclusive)], "other", Queue::Try).await);
    let blockers =
        blocked(f.attempt(&[("A/B/x", Shared), ("Q/1", Exclusive), ("Z", Exclusive)], "me", Queue::Try).await);
    assert_eq!(
        blockers.iter().map(described).collect::<Vec<_>>(),
        [
            ("A/B".into(), Exclusive, "waiter".into(), ticket, true),
            ("Q".into(), Exclusive, "other".into(), other.token, false)
        ]
    );

    // Siblings are never delayed, and barging ignores the queue.
    granted(f.attempt(&[("A/C", Exclusive)], "sibling", Queue::Try).await);
    granted(f.attempt(&[("A/B2", Exclusive)], "sibling", Queue::Join).await);
    let barger = granted(f.attempt(&[("A/B", Exclusive)], "barger", Queue::Barge).await);
    let blockers = blocked(f.attempt(&[("A/B/C/D", Exclusive)], "me", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("A/B".into(), Exclusive, "barger".into(), barger.token, false));

    // A Shared waiter keeps writers out, not readers.
    let writer = granted(f.attempt(&[("S", Exclusive)], "writer", Queue::Try).await);
    let (reader, _) = queued(f.attempt(&[("S/r", Shared)], "reader", Queue::Join).await);
    f.backend.release(&writer).await.expect("release");
    let reading = granted(f.attempt(&[("S", Shared)], "another reader", Queue::Try).await);
    f.backend.release(&reading).await.expect("release");
    let blockers = blocked(f.attempt(&[("S/r/x", Exclusive)], "writer", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("S/r".into(), Shared, "reader".into(), reader, true));
    f.drop_schema().await;
}

#[tokio::test]
async fn joining_writes_one_row_per_item_with_a_ticket_above_every_token_before() {
    let f = Fixture::new("fair_join").await;
    let mut highest = 0;
    for name in ["x", "y", "z"] {
        let grant = granted(f.attempt(&[(name, Exclusive)], "me", Queue::Join).await);
        highest = highest.max(grant.token);
        f.backend.release(&grant).await.expect("release");
    }
    let holder = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Join).await);
    highest = highest.max(holder.token);
    assert_eq!(f.rows().await, [], "granted joins write nothing");

    let (ticket, blockers) = queued(f.attempt(&[("A/B", Exclusive)], "waiter", Queue::Join).await);
    assert!(ticket > highest, "ticket {ticket} after token {highest}");
    assert_eq!(blockers.len(), 1);
    assert_eq!(f.rows().await, [row("A/B/", ticket, "exclusive", "waiter")]);

    // A multi-path request: a row per item, one ticket, whichever items
    // were blocked.
    let (many, blockers) = queued(f.attempt(&[("A", Shared), ("Z/1", Exclusive)], "many", Queue::Join).await);
    assert!(many > ticket);
    assert_eq!(
        blockers.iter().map(described).collect::<Vec<_>>(),
        [("A".into(), Exclusive, "holder".into(), holder.token, false)]
    );
    assert_eq!(
        f.rows().await,
        [
            row("A/", many, "shared", "many"),
            row("A/B/", ticket, "exclusive", "waiter"),
            row("Z/1/", many, "exclusive", "many")
        ]
    );
    // Tickets and tokens are one sequence.
    let next = granted(f.attempt(&[("elsewhere", Exclusive)], "me", Queue::Try).await);
    assert!(next.token > many);
    f.drop_schema().await;
}

#[tokio::test]
async fn a_waiter_passes_later_tickets_only_renews_its_reservation_and_its_grant_removes_it() {
    let f = Fixture::new("fair_wait").await;
    let holder = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Try).await);
    let (first, _) = queued(f.attempt(&[("A", Exclusive)], "first", Queue::Join).await);
    let (second, blockers) = queued(f.attempt(&[("A/B", Exclusive)], "second", Queue::Join).await);
    assert!(second > first);
    // A grant in the way is reported rather than an earlier waiter.
    assert_eq!(described(&blockers[0]), ("A".into(), Exclusive, "holder".into(), holder.token, false));

    // A refused waiter renews its reservation: the same row, a later expiry.
    let before = f.expiry("A/", first).await;
    let (again, blockers) = queued(f.attempt(&[("A", Exclusive)], "first", Queue::Waiting(first)).await);
    assert_eq!(again, first);
    assert_eq!(described(&blockers[0]), ("A".into(), Exclusive, "holder".into(), holder.token, false));
    assert!(f.expiry("A/", first).await > before, "not renewed");
    // One that lapsed and was swept is written again, with its ticket.
    f.client
        .execute(&format!("DELETE FROM \"{}\".reservations WHERE ticket = $1", f.schema), &[&(first as i64)])
        .await
        .expect("delete");
    assert_eq!(queued(f.attempt(&[("A", Exclusive)], "first", Queue::Waiting(first)).await).0, first);
    assert_eq!(f.rows().await, [row("A/", first, "exclusive", "first"), row("A/B/", second, "exclusive", "second")]);

    f.backend.release(&holder).await.expect("release");
    // The later ticket waits for the earlier one; the earlier one is
    // neither held back by its own reservation nor by a later one.
    let (again, blockers) = queued(f.attempt(&[("A/B", Exclusive)], "second", Queue::Waiting(second)).await);
    assert_eq!(again, second);
    assert_eq!(described(&blockers[0]), ("A".into(), Exclusive, "first".into(), first, true));
    let grant = granted(f.attempt(&[("A", Exclusive)], "first", Queue::Waiting(first)).await);
    assert!(grant.token > second);
    assert_eq!(f.rows().await, [row("A/B/", second, "exclusive", "second")], "the grant removed its reservation");

    let blockers = queued(f.attempt(&[("A/B", Exclusive)], "second", Queue::Waiting(second)).await).1;
    assert_eq!(described(&blockers[0]), ("A".into(), Exclusive, "first".into(), grant.token, false));
    f.backend.release(&grant).await.expect("release");
    granted(f.attempt(&[("A/B", Exclusive)], "second", Queue::Waiting(second)).await);
    assert_eq!(f.rows().await, []);
    f.drop_schema().await;
}

/// A waiter that stops renewing (its process died) blocks the requests
/// behind it until its reservation lapses, by the server's clock, and no
/// longer; the sweep then removes the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_waiters_reservation_lapses_within_its_life_and_is_swept() {
    let f = Fixture::new("fair_dead").await;
    let holder = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Try).await);
    let joined_at = Instant::now();
    let (ticket, _) = queued(f.attempt(&[("A/B", Exclusive)], "dead", Queue::Join).await);
    f.backend.release(&holder).await.expect("release");
    let blockers = blocked(f.attempt(&[("A", Exclusive)], "next", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("A/B".into(), Exclusive, "dead".into(), ticket, true));

    let backend: Arc<dyn LockBackend> = Arc::new(f.backend.clone());
    let next =
        TreeLock::builder(backend, "A").owner("next").wait(Wait::For(RESERVATION_TTL * 2)).build().expect("lock");
    let grant = next.acquire().await.expect("granted once the reservation lapsed");
    let waited = joined_at.elapsed();
    assert!(waited >= RESERVATION_TTL - Duration::from_millis(200), "granted after {waited:?}, before the lapse");
    assert!(waited <= RESERVATION_TTL + Duration::from_secs(1), "granted only after {waited:?}");
    assert_eq!(f.backend.waiters(None).await.expect("waiters"), []);
    f.backend.release(&grant).await.expect("release");
    assert_eq!(f.rows().await.len(), 1, "the lapsed row is there until swept");

    for _ in 0..300 {
        let grant = granted(f.attempt(&[("elsewhere", Exclusive)], "me", Queue::Join).await);
        f.backend.release(&grant).await.expect("release");
    }
    assert_eq!(f.rows().await, [], "the sweep left a lapsed reservation");
    f.drop_schema().await;
}

/// A withdrawal removes its owner's reservation only, succeeds whether or
/// not it is there, and wakes the waiters behind it at once, not at their
/// next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_removes_the_owners_reservation_and_wakes_the_waiters_behind_it() {
    let f = Fixture::new("fair_withdraw").await;
    let holder = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Try).await);
    let (ticket, _) = queued(f.attempt(&[("A", Exclusive)], "first", Queue::Join).await);
    f.backend.release(&holder).await.expect("release");
    f.backend.withdraw(&Owner::new("someone else").expect("owner"), ticket).await.expect("withdraw");
    f.backend.withdraw(&Owner::new("first").expect("owner"), ticket + 1).await.expect("withdraw");
    f.backend.withdraw(&Owner::new("first").expect("owner"), u64::MAX).await.expect("withdraw");
    assert_eq!(f.rows().await, [row("A/", ticket, "exclusive", "first")]);

    let gated = Gated::new(Arc::new(f.backend.clone()));
    let behind = TreeLock::builder(gated.clone(), "A/B").owner("behind").wait(Wait::For(LONG)).build().expect("lock");
    let refused = gated.blocked();
    let waiting = tokio::spawn(async move { behind.acquire().await.map(|grant| (grant, Instant::now())) });
    tokio::time::timeout(Duration::from_secs(10), refused).await.expect("queued behind the reservation");
    let started = Instant::now();
    while !f.backend.is_listening() {
        assert!(started.elapsed() < Duration::from_secs(10), "the listening connection never came up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Right after a refusal, the waiter's next attempt of its own is a
    // third of a reservation's life away.
    tokio::time::timeout(Duration::from_secs(10), gated.blocked()).await.expect("refused again");
    let withdrawn_at = Instant::now();
    f.backend.withdraw(&Owner::new("first").expect("owner"), ticket).await.expect("withdraw");
    let (grant, granted_at) = waiting.await.expect("task").expect("granted");
    let delay = granted_at - withdrawn_at;
    assert!(delay < RESERVATION_TTL / 6, "granted {delay:?} after the withdrawal");
    assert_eq!(f.rows().await, [], "withdrawn, and the waiter's own removed by its grant");
    f.backend.withdraw(&Owner::new("first").expect("owner"), ticket).await.expect("again");
    f.backend.release(&grant).await.expect("release");
    f.drop_schema().await;
}

#[tokio::test]
async fn waiters_lists_live_reservations_one_entry_per_item_in_key_order() {
    let f = Fixture::new("fair_list").await;
    let a = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Try).await);
    let m = granted(f.attempt(&[("M", Exclusive)], "holder", Queue::Try).await);
    let (one, _) = queued(f.attempt(&[("A/x", Exclusive), ("M", Shared)], "one", Queue::Join).await);
    let (two, _) = queued(f.attempt(&[("A", Shared)], "two", Queue::Join).await);
    let (three, _) = queued(f.attempt(&[("A/x", Exclusive)], "three", Queue::Join).await);

    let all = f.backend.waiters(None).await.expect("waiters");
    assert_eq!(
        all.iter().map(described).collect::<Vec<_>>(),
        [
            ("A".into(), Shared, "two".into(), two, true),
            ("A/x".into(), Exclusive, "one".into(), one, true),
            ("A/x".into(), Exclusive, "three".into(), three, true),
            ("M".into(), Shared, "one".into(), one, true),
        ]
    );
    assert!(
        all.iter().all(|held| !held.transient && held.remaining > Duration::ZERO && held.remaining <= RESERVATION_TTL),
        "{all:?}"
    );
    let tokens = |held: Vec<HeldLock>| held.iter().map(|held| held.token).collect::<Vec<_>>();
    assert_eq!(tokens(f.backend.waiters(Some(&path("A"))).await.expect("waiters")), [two, one, three]);
    assert_eq!(tokens(f.backend.waiters(Some(&path("A/x"))).await.expect("waiters")), [one, three]);
    assert_eq!(tokens(f.backend.waiters(Some(&path("M/q"))).await.expect("waiters")), [], "only on and below");
    assert_eq!(tokens(f.backend.list(None).await.expect("list")), [a.token, m.token], "the locks list no waiter");

    f.backend.withdraw(&Owner::new("one").expect("owner"), one).await.expect("withdraw");
    assert_eq!(tokens(f.backend.waiters(None).await.expect("waiters")), [two, three]);
    f.drop_schema().await;
}

/// A reservation reports how long its waiter has been in line, by the
/// server's clock: in the listing of waiters and as a blocker, from either
/// grant function (one Exclusive item, or several items). A renewal keeps
/// the time it joined: what it reports grows across renewals, and never
/// exceeds the real time since the join.
#[tokio::test]
async fn a_waiters_time_in_line_grows_through_renewals_and_is_bounded_by_the_time_since_it_joined() {
    const APART: Duration = Duration::from_millis(300);
    let f = Fixture::new("fair_waited").await;
    let holder = granted(f.attempt(&[("A", Exclusive)], "holder", Queue::Try).await);
    let before_joins = Instant::now();
    let (one, _) = queued(f.attempt(&[("A/B", Exclusive)], "one", Queue::Join).await);
    let (many, _) = queued(f.attempt(&[("A/C", Exclusive), ("Q", Shared)], "many", Queue::Join).await);
    let waited = |held: Vec<HeldLock>| held.iter().map(|held| (held.token, held.waited)).collect::<Vec<_>>();
    let first = waited(f.backend.waiters(None).await.expect("waiters"));
    let bound = before_joins.elapsed();
    assert_eq!(first.iter().map(|(ticket, _)| *ticket).collect::<Vec<_>>(), [one, many, many]);
    assert!(first.iter().all(|(_, waited)| *waited <= bound), "{first:?} after {bound:?}");

    // Time passes; each waiter renews (with either function), and keeps
    // the time it joined.
    tokio::time::sleep(APART).await;
    queued(f.attempt(&[("A/B", Exclusive)], "one", Queue::Waiting(one)).await);
    queued(f.attempt(&[("A/C", Exclusive), ("Q", Shared)], "many", Queue::Waiting(many)).await);
    let renewed = waited(f.backend.waiters(None).await.expect("waiters"));
    let bound = before_joins.elapsed();
    for ((ticket, before), (again, after)) in first.iter().zip(&renewed) {
        assert_eq!(ticket, again);
        assert!(*after >= *before + APART, "ticket {ticket}: {before:?}, then {after:?} after a renewal");
        assert!(*after <= bound, "ticket {ticket}: {after:?} after {bound:?}");
    }

    // As a blocker, from either function.
    f.backend.release(&holder).await.expect("release");
    for items in [&[("A/B/x", Exclusive)][..], &[("A/B/x", Exclusive), ("Z", Shared)]] {
        let blockers = blocked(f.attempt(items, "other", Queue::Try).await);
        let bound = before_joins.elapsed();
        assert_eq!(described(&blockers[0]), ("A/B".into(), Exclusive, "one".into(), one, true));
        assert!(blockers[0].waited >= renewed[0].1 && blockers[0].waited <= bound, "{blockers:?} after {bound:?}");
    }
    // A grant reports none.
    let grant = granted(f.attempt(&[("A/B", Exclusive)], "one", Queue::Waiting(one)).await);
    let blockers = blocked(f.attempt(&[("A/B/x", Exclusive)], "other", Queue::Try).await);
    assert_eq!((blockers[0].token, blockers[0].waited), (grant.token, Duration::ZERO));
    f.drop_schema().await;
}

/// A schema made by versions 1 to 6 exactly as released, holding a lock
/// and a waiter's reservation written by version 6's function, is migrated
/// by the next client: the lock refuses requests and the reservation
/// queues them, and reports its waiter's time in line from the upgrade
/// on; a client of version 6 still running keeps granting, queueing,
/// renewing (which keeps the time its waiter joined) and honouring the new
/// client's reservations; and the step to version 7 can run again without
/// changing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_6_schema_with_a_live_lock_and_waiter_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("six");
    let client = inspector(&url).await;
    install_released(&client, &schema, 6).await;
    // Version 6's grant of one Exclusive item: (owner, key, range end,
    // ancestors, queue, ticket) to (outcome, token, blocker tokens,
    // blockers waiting).
    let old_grant = format!(
        "SELECT outcome, token, blocker_tokens, blocker_waiting FROM \"{schema}\".try_grant_queued('app', $1, \
         60000, true, false, 0, ARRAY[$2::text], ARRAY['exclusive'], ARRAY[$3::text], \
         ARRAY[cardinality($4::text[]) + 1], $4::text[], $4::text[] || $2::text, \
         array_fill('shared'::text, ARRAY[cardinality($4::text[])]) || 'exclusive'::text, $5, $6, 3000)"
    );
    let old_grant = |owner: &'static str, key: &'static str, end: &'static str, ancestors: &'static [&'static str]| {
        let (client, sql) = (&client, &old_grant);
        move |queue: &'static str, ticket: i64| async move {
            let row = client
                .query_one(sql, &[&owner, &key, &end, &ancestors, &queue, &ticket])
                .await
                .expect("version 6's grant");
            let tokens: Option<Vec<i64>> = row.get(2);
            let waiting: Option<Vec<bool>> = row.get(3);
            (row.get::<_, String>(0), row.get::<_, Option<i64>>(1), tokens.unwrap_or_default(), waiting)
        }
    };
    let (outcome, lock, _, _) = old_grant("old", "a/", "a0", &[])("try", 0).await;
    assert_eq!(outcome, "granted");
    let lock = lock.expect("token");
    let old_waiter = old_grant("old waiter", "a/x/", "a/x0", &["a/"]);
    let (outcome, ticket, tokens, _) = old_waiter("join", 0).await;
    assert_eq!((outcome.as_str(), tokens.as_slice()), ("queued", &[lock][..]));
    let ticket = ticket.expect("ticket");

    let before_upgrade = Instant::now();
    let (backend, held) = migrated(&url, &schema, &client).await;
    assert_eq!(held, [("a".into(), Exclusive, lock as u64)]);
    let attempt = |items: &'static [(&'static str, Mode)], owner: &'static str, queue: Queue| {
        let backend = &backend;
        async move { backend.try_grant(&request(items, owner, queue)).await.expect("attempt") }
    };
    assert_eq!(blocked(attempt(&[("a/x/y", Exclusive)], "new", Queue::Try).await)[0].token, lock as u64);
    let waited = || async {
        let waiters = backend.waiters(None).await.expect("waiters");
        waiters.iter().map(|held| (held.token, held.waited)).collect::<Vec<_>>()
    };
    let first = waited().await;
    assert_eq!(first.len(), 1);
    assert!(first[0].1 <= before_upgrade.elapsed(), "{first:?}");

    // The client of version 6 renews its waiter's reservation, which
    // keeps the time it joined.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(old_waiter("waiting", ticket).await.0, "queued");
    let renewed = waited().await;
    assert!(renewed[0].1 >= first[0].1 + Duration::from_millis(200), "{first:?}, then {renewed:?}");

    let released_old =
        client.query_one(&format!("SELECT \"{schema}\".release_items('app', ARRAY['a/'], 'old', $1)"), &[&lock]).await;
    assert!(released_old.expect("version 6's release").get::<_, bool>(0));
    let blockers = blocked(attempt(&[("a/x/y", Exclusive)], "new", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("a/x".into(), Exclusive, "old waiter".into(), ticket as u64, true));
    assert!(blockers[0].waited >= renewed[0].1 && blockers[0].waited <= before_upgrade.elapsed(), "{blockers:?}");
    assert_eq!(old_waiter("waiting", ticket).await.0, "granted", "nothing is in the way now");
    assert_eq!(waited().await, [], "its grant removed its reservation");

    // It honours the new client's reservations, and the new client its.
    let holder = granted(attempt(&[("b", Exclusive)], "new", Queue::Try).await);
    let (new_ticket, _) = queued(attempt(&[("b/c", Exclusive)], "new waiter", Queue::Join).await);
    let old_reader = old_grant("old", "b/c/d/", "b/c/d0", &["b/", "b/c/"]);
    let (outcome, _, tokens, waiting) = old_reader("try", 0).await;
    assert_eq!((outcome.as_str(), tokens.as_slice()), ("blocked", &[holder.token as i64][..]));
    assert_eq!(waiting, Some(vec![false]));
    backend.release(&holder).await.expect("release");
    let (outcome, _, tokens, waiting) = old_reader("try", 0).await;
    assert_eq!((outcome.as_str(), tokens.as_slice()), ("blocked", &[new_ticket as i64][..]));
    assert_eq!(waiting, Some(vec![true]));
    let (outcome, old_ticket, _, _) = old_reader("join", 0).await;
    assert_eq!(outcome, "queued");
    let old_ticket = old_ticket.expect("ticket") as u64;
    assert!(old_ticket > new_ticket);

    // The step to version 7 again changes nothing: both reservations stay,
    // with the times their waiters joined.
    let before = waited().await;
    client.batch_execute(&released(RELEASED[6], &schema)).await.expect("again");
    let after = waited().await;
    assert_eq!(after.iter().map(|(ticket, _)| *ticket).collect::<Vec<_>>(), [new_ticket, old_ticket]);
    for ((_, before), (_, after)) in before.iter().zip(&after) {
        assert!(after >= before, "{before:?}, then {after:?}");
    }
    let blockers = blocked(attempt(&[("b/c", Exclusive)], "someone", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("b/c".into(), Exclusive, "new waiter".into(), new_ticket, true));
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// A schema made by versions 1 to 5 exactly as released, holding locks
/// granted by version 5's function, is migrated by the next client: the
/// locks are kept and refuse requests, waiters queue behind them; a client
/// of version 5 still running keeps granting and refusing as before
/// (barging); and the step to version 6 can run again without changing
/// anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_5_schema_with_live_locks_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("five");
    let client = inspector(&url).await;
    install_released(&client, &schema, 5).await;
    // Version 5's grant of one item: (key, mode, range end, ancestors).
    let old_grant = format!(
        "SELECT outcome, token FROM \"{schema}\".try_grant_items('app', 'old', 60000, true, false, 0, \
         ARRAY[$1::text], ARRAY[$2::text], ARRAY[$3::text], ARRAY[cardinality($4::text[]) + 1], $4::text[], \
         $4::text[] || $1::text, array_fill('shared'::text, ARRAY[cardinality($4::text[])]) || 'exclusive'::text)"
    );
    let old_grant = |key: &'static str, mode: &'static str, end: &'static str, ancestors: Vec<&'static str>| {
        let (client, sql) = (&client, &old_grant);
        async move {
            let row = client.query_one(sql, &[&key, &mode, &end, &ancestors]).await.expect("version 5's grant");
            (row.get::<_, String>(0), row.get::<_, Option<i64>>(1))
        }
    };
    let (outcome, exclusive) = old_grant("a/", "exclusive", "a0", vec![]).await;
    assert_eq!(outcome, "granted");
    let (outcome, shared) = old_grant("b/c/", "shared", "b/c0", vec!["b/"]).await;
    assert_eq!(outcome, "granted");
    let (exclusive, shared) = (exclusive.expect("token") as u64, shared.expect("token") as u64);

    let (backend, held) = migrated(&url, &schema, &client).await;
    assert_eq!(held, [("a".into(), Exclusive, exclusive), ("b/c".into(), Shared, shared)]);
    let attempt = |items: &'static [(&'static str, Mode)], queue: Queue| {
        let backend = &backend;
        async move { backend.try_grant(&request(items, "new", queue)).await.expect("attempt") }
    };
    let (ticket, blockers) = queued(attempt(&[("a/x", Exclusive)], Queue::Join).await);
    assert_eq!(blockers[0].token, exclusive);
    assert_eq!(blocked(attempt(&[("b", Exclusive)], Queue::Try).await)[0].token, shared);
    granted(attempt(&[("b/c/d", Shared)], Queue::Try).await);

    // A client of version 5 still running: refused by a live lock, and it
    // barges past a waiter.
    assert_eq!(old_grant("b/", "exclusive", "b0", vec![]).await.0, "blocked");
    let released_old = client
        .query_one(&format!("SELECT \"{schema}\".release_items('app', ARRAY['a/'], 'old', $1)"), &[&(exclusive as i64)])
        .await;
    assert!(released_old.expect("version 5's release").get::<_, bool>(0));
    assert_eq!(old_grant("a/x/", "exclusive", "a/x0", vec!["a/"]).await.0, "granted");

    // The step to version 6 again changes nothing.
    client.batch_execute(&released(RELEASED[5], &schema)).await.expect("again");
    let waiters = backend.waiters(None).await.expect("waiters");
    assert_eq!(
        waiters.iter().map(described).collect::<Vec<_>>(),
        [("a/x".into(), Exclusive, "new".into(), ticket, true)]
    );
    assert_eq!(backend.list(None).await.expect("list").len(), 3);
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// Clients wait fairly for requests of one or two items that cross each
/// other ({A, B} against {B/1, A/2}, ancestors against descendants, in
/// both modes), with some tries and barging requests among them: every
/// wait ends in a grant, no two conflicting items are ever held at once,
/// the server never had to break a deadlock, and no reservation is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crossing_fair_waiters_never_deadlock_nor_overlap() {
    const CLIENTS: usize = 12;
    const ROUNDS: usize = 25;
    let settings = postgres::Settings { extra: vec!["deadlock_timeout=20ms".to_owned()], ..Default::default() };
    let server = postgres::Postgres::create(&settings).unwrap_or_else(|message| panic!("{message}"));
    let url = server.url();
    let requests: [&[(&str, Mode)]; 7] = [
        &[("A", Exclusive), ("B", Exclusive)],
        &[("B/1", Exclusive), ("A/2", Exclusive)],
        &[("A/2", Shared), ("B", Shared)],
        &[("A", Shared)],
        &[("B/1/x", Exclusive)],
        &[("A/2/y", Exclusive), ("B/1", Shared)],
        &[("B", Exclusive), ("A/2/y", Shared)],
    ];
    let f = Fixture::on(&url, "fair_cross").await;
    let oracle = Arc::new(Oracle::new());
    let tasks = (0..CLIENTS).map(|client| {
        let (url, schema, oracle) = (url.clone(), f.schema.clone(), oracle.clone());
        tokio::spawn(async move {
            let config = PostgresConfig::from_url(&url).expect("url").schema(schema).pool_size(1);
            let backend: Arc<dyn LockBackend> =
                Arc::new(config.connect().await.expect("connect").backend("fair").expect("namespace"));
            let owner = format!("client-{client}");
            for round in 0..ROUNDS {
                let items = requests[fastrand::usize(..requests.len())];
                let grant = match round % 5 {
                    0 => match backend.try_grant(&request(items, &owner, Queue::Try)).await.expect("try") {
                        Attempt::Granted(grant) => grant,
                        Attempt::Blocked(_) => continue,
                        queued => panic!("a try was queued: {queued:?}"),
                    },
                    1 => match backend.try_grant(&request(items, &owner, Queue::Barge)).await.expect("barge") {
                        Attempt::Granted(grant) => grant,
                        Attempt::Blocked(_) => continue,
                        queued => panic!("a barging request was queued: {queued:?}"),
                    },
                    _ => acquire(&backend, &request(items, &owner, Queue::Try), Wait::For(Duration::from_secs(60)))
                        .await
                        .unwrap_or_else(|error| panic!("client {client}: {error}")),
                };
                oracle.enter(&grant);
                for _ in 0..fastrand::usize(1..4) {
                    tokio::task::yield_now().await;
                }
                oracle.exit(&grant);
                backend.release(&grant).await.expect("release of a held grant");
            }
        })
    });
    for task in join_all(tasks).await {
        task.expect("client task");
    }
    oracle.assert_clean();
    assert!(oracle.grants() > (CLIENTS * ROUNDS / 2) as u64, "only {} grants", oracle.grants());
    let live = f.backend.waiters(None).await.expect("waiters");
    assert_eq!(live, [], "every wait ended in a grant, which removed its reservation");

    // Besides the inspector, only the fixture's pool (two at most) is left.
    let deadlocks = deadlocks_once_sessions_end(&f.client, 2).await;
    assert_eq!(deadlocks, 0, "the server broke {deadlocks} deadlocks between grants");
    drop(f);
    drop(server);
}

/// While nobody waits in the namespace, a grant reads its queue's mark
/// (one lookup) and no reservation; once a waiter's reservation lives
/// anywhere in it, grants look for reservations in their way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_grant_reads_the_mark_and_no_reservation() {
    const PAIRS: i64 = 50;
    let url = postgres::url();
    let f = Fixture::new("fair_cost").await;
    let counters = format!(
        "SELECT coalesce(sum(idx_scan) FILTER (WHERE relname = 'reservations'), 0)::bigint, \
                coalesce(sum(idx_scan) FILTER (WHERE relname = 'queues'), 0)::bigint, \
                coalesce(sum(n_tup_ins) FILTER (WHERE relname = 'locks'), 0)::bigint \
         FROM pg_stat_user_tables WHERE schemaname = '{}'",
        f.schema
    );
    // A session reports its statistics when it ends: each round runs on a
    // backend of its own, dropped before the counts are read.
    let round = |waiter: bool| {
        let (url, schema, counters, client) = (url.clone(), f.schema.clone(), counters.clone(), &f.client);
        async move {
            let read = || async {
                let row = client.query_one(&counters, &[]).await.expect("statistics");
                (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2))
            };
            let (reservations, marks, inserted) = read().await;
            let config = PostgresConfig::from_url(&url).expect("url").schema(schema).pool_size(1);
            let backend = config.connect().await.expect("connect").backend("fair").expect("namespace");
            let mut held = None;
            if waiter {
                let holder = granted(
                    backend.try_grant(&request(&[("far", Exclusive)], "holder", Queue::Try)).await.expect("grant"),
                );
                queued(backend.try_grant(&request(&[("far", Exclusive)], "waiter", Queue::Join)).await.expect("join"));
                held = Some(holder);
            }
            for _ in 0..PAIRS {
                let grant = granted(
                    backend.try_grant(&request(&[("x/y/z", Exclusive)], "me", Queue::Join)).await.expect("grant"),
                );
                backend.release(&grant).await.expect("release");
            }
            if let Some(holder) = held {
                backend.release(&holder).await.expect("release");
            }
            drop(backend);
            let started = Instant::now();
            loop {
                let (now_reservations, now_marks, now_inserted) = read().await;
                if now_inserted - inserted >= PAIRS {
                    return (now_reservations - reservations, now_marks - marks);
                }
                assert!(started.elapsed() < Duration::from_secs(30), "the statistics never came");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (reservations, marks) = round(false).await;
    // The sweep's look at the oldest reservations, after one grant in 128,
    // is all: a look for reservations in a grant's way is at least one
    // scan per grant.
    assert!(reservations <= 2, "{reservations} scans of reservations with nobody waiting");
    assert!(marks >= PAIRS, "{marks} lookups of the mark for {PAIRS} grants");
    let (reservations, _) = round(true).await;
    assert!(reservations >= PAIRS, "{reservations} scans of reservations for {PAIRS} grants beside a waiter");
    f.drop_schema().await;
}
