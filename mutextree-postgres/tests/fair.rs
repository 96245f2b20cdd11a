//! Fair waiting on the PostgreSQL store, on a real server, each test in a
//! schema of its own: a try refused by a waiter's reservation and naming
//! it, while siblings and barging requests go ahead; a joining request
//! writing one row per item with a ticket above every token before it; a
//! waiter going ahead of later tickets only, renewing its reservation,
//! writing it again once lapsed, and its grant removing it; a dead
//! waiter's reservation lapsing within its life and then swept; withdrawal
//! and the wake-up it sends; the listing of waiters; a waiter's time in
//! line kept through renewals; schemas of versions 5 and 6 with live locks
//! (Exclusive, Shared, multi-path) and a waiter migrated, their clients'
//! grants refused; crossing multi-path waiters that never deadlock; and an
//! uncontended grant that reads no reservation.

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

/// A schema made by versions 1 to 6 exactly as released, holding locks
/// granted by version 6's function (Exclusive, two Shared holders of one
/// node, and a multi-path grant of a Shared and an Exclusive item) and a
/// waiter's reservation, is migrated by the next client: the Shared rows
/// move to their holders' table behind their node's marker, every lock
/// refuses what it refused and lets through what it let through, the
/// reservation queues requests and reports its waiter's time in line from
/// the upgrade on; a client of version 6 still running releases and
/// refreshes its grants, Shared and multi-path ones included, but its
/// grants are refused with the version they need; and the step to version
/// 7 can run again without changing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_6_schema_with_live_locks_and_a_waiter_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("six");
    let client = inspector(&url).await;
    install_released(&client, &schema, 6).await;
    // Version 6's grant: (owner, keys, modes, range ends, depths,
    // ancestors, advisory keys and modes, queue, ticket) to (outcome,
    // token, blocker tokens).
    let old_grant_sql = format!(
        "SELECT outcome, token, blocker_tokens FROM \"{schema}\".try_grant_queued('app', $1, 60000, true, false, 0, \
         $2::text[], $3::text[], $4::text[], $5::integer[], $6::text[], $7::text[], $8::text[], $9, $10, 3000)"
    );
    let old_grant = |owner: &'static str,
                     items: &'static [(&'static str, &'static str, &'static str, i32)],
                     ancestors: &'static [&'static str],
                     locks: &'static [(&'static str, &'static str)]| {
        let (client, sql) = (&client, &old_grant_sql);
        move |queue: &'static str, ticket: i64| async move {
            let keys: Vec<&str> = items.iter().map(|item| item.0).collect();
            let modes: Vec<&str> = items.iter().map(|item| item.1).collect();
            let ends: Vec<&str> = items.iter().map(|item| item.2).collect();
            let depths: Vec<i32> = items.iter().map(|item| item.3).collect();
            let lock_keys: Vec<&str> = locks.iter().map(|lock| lock.0).collect();
            let lock_modes: Vec<&str> = locks.iter().map(|lock| lock.1).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] =
                [&owner, &keys, &modes, &ends, &depths, &ancestors, &lock_keys, &lock_modes, &queue, &ticket];
            client.query_one(sql, &params).await
        }
    };
    let outcome = |row: Result<tokio_postgres::Row, tokio_postgres::Error>| {
        let row = row.expect("version 6's grant");
        let tokens: Option<Vec<i64>> = row.get(2);
        (row.get::<_, String>(0), row.get::<_, Option<i64>>(1).map(|token| token as u64), tokens.unwrap_or_default())
    };
    let lock = outcome(old_grant("old", &[("a/", "exclusive", "a0", 1)], &[], &[("a/", "exclusive")])("try", 0).await);
    assert_eq!(lock.0, "granted");
    let lock = lock.1.expect("token");
    let mut reader_tokens = Vec::new();
    for owner in ["old reader", "old reader 2"] {
        let reader =
            old_grant(owner, &[("b/c/", "shared", "b/c0", 2)], &["b/"], &[("b/", "shared"), ("b/c/", "exclusive")]);
        let (result, token, _) = outcome(reader("try", 0).await);
        assert_eq!(result, "granted");
        reader_tokens.push(token.expect("token"));
    }
    let multi = old_grant(
        "old multi",
        &[("m/1/", "shared", "m/10", 2), ("m/2/", "exclusive", "m/20", 2)],
        &["m/", "m/"],
        &[("m/", "shared"), ("m/1/", "exclusive"), ("m/2/", "exclusive")],
    );
    let (result, multi, _) = outcome(multi("try", 0).await);
    assert_eq!(result, "granted");
    let multi = multi.expect("token");
    let old_waiter = old_grant(
        "old waiter",
        &[("a/x/", "exclusive", "a/x0", 2)],
        &["a/"],
        &[("a/", "shared"), ("a/x/", "exclusive")],
    );
    let (result, ticket, tokens) = outcome(old_waiter("join", 0).await);
    assert_eq!((result.as_str(), tokens.as_slice()), ("queued", &[lock as i64][..]));
    let ticket = ticket.expect("ticket");

    let before_upgrade = Instant::now();
    let (backend, held) = migrated(&url, &schema, &client).await;
    assert_eq!(
        held,
        [
            ("a".into(), Exclusive, lock),
            ("b/c".into(), Shared, reader_tokens[0]),
            ("b/c".into(), Shared, reader_tokens[1]),
            ("m/1".into(), Shared, multi),
            ("m/2".into(), Exclusive, multi),
        ]
    );
    let markers = client
        .query(&format!("SELECT key, owner, token FROM \"{schema}\".locks WHERE mode = 'holders' ORDER BY key"), &[])
        .await
        .expect("markers");
    let markers: Vec<(String, String, i64)> = markers.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect();
    assert_eq!(markers, [("b/c/".into(), "".into(), 0), ("m/1/".into(), "".into(), 0)]);
    let attempt = |items: &'static [(&'static str, Mode)], owner: &'static str, queue: Queue| {
        let backend = &backend;
        async move { backend.try_grant(&request(items, owner, queue)).await.expect("attempt") }
    };
    assert_eq!(blocked(attempt(&[("a/x/y", Exclusive)], "new", Queue::Try).await)[0].token, lock);
    let blockers = blocked(attempt(&[("b", Exclusive)], "new", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("b/c".into(), Shared, "old reader".into(), reader_tokens[0], false));
    assert_eq!(blocked(attempt(&[("b/c", Exclusive)], "new", Queue::Try).await)[0].token, reader_tokens[0]);
    let new_reader = granted(attempt(&[("b/c/d", Shared)], "new", Queue::Try).await);
    let blockers = blocked(attempt(&[("m", Shared)], "new", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("m/2".into(), Exclusive, "old multi".into(), multi, false));
    granted(attempt(&[("m/1/z", Shared)], "new", Queue::Barge).await);
    let waited = || async {
        let waiters = backend.waiters(None).await.expect("waiters");
        waiters.iter().map(|held| (held.token, held.waited)).collect::<Vec<_>>()
    };
    let first = waited().await;
    assert_eq!(first.iter().map(|(ticket, _)| *ticket).collect::<Vec<_>>(), [ticket]);
    assert!(first[0].1 <= before_upgrade.elapsed(), "{first:?}");

    // A client of version 6 still running: its grants are refused, with
    // the version they need, whatever they ask for.
    for refused in [
        old_waiter("waiting", ticket as i64).await,
        old_grant("old", &[("z/", "shared", "z0", 1)], &[], &[("z/", "exclusive")])("try", 0).await,
    ] {
        let error = refused.expect_err("version 6's grant");
        let message = error.as_db_error().expect("from the server").message();
        assert!(message.contains("need a client of schema version 7"), "{message}");
    }
    // Its refreshes and releases work, on Shared holders and multi-path
    // grants too.
    let refresh = format!("SELECT \"{schema}\".refresh_items('app', $1::text[], $2, $3, 120000)");
    let release = format!("SELECT \"{schema}\".release_items('app', $1::text[], $2, $3)");
    let call = |sql: &str, keys: &'static [&'static str], owner: &'static str, token: u64| {
        let (client, sql) = (&client, sql.to_owned());
        async move {
            let row = client.query_one(&sql, &[&keys, &owner, &(token as i64)]).await.expect("version 6's call");
            row.get::<_, bool>(0)
        }
    };
    assert!(call(&refresh, &["b/c/"], "old reader", reader_tokens[0]).await);
    let listed = backend.list(None).await.expect("list");
    let refreshed = listed.iter().find(|held| held.token == reader_tokens[0]).expect("the reader");
    assert!(refreshed.remaining > LONG, "{refreshed:?}");
    assert!(call(&release, &["m/1/", "m/2/"], "old multi", multi).await);
    assert!(!call(&release, &["m/1/", "m/2/"], "old multi", multi).await, "released once");
    assert!(call(&release, &["a/"], "old", lock).await);

    // The reservation, written by version 6, queues requests until its
    // waiter (here through the new client) is granted.
    let blockers = blocked(attempt(&[("a/x/y", Exclusive)], "new", Queue::Try).await);
    assert_eq!(described(&blockers[0]), ("a/x".into(), Exclusive, "old waiter".into(), ticket, true));
    assert!(blockers[0].waited >= first[0].1 && blockers[0].waited <= before_upgrade.elapsed(), "{blockers:?}");
    granted(attempt(&[("a/x", Exclusive)], "old waiter", Queue::Waiting(ticket)).await);
    assert_eq!(waited().await, [], "its grant removed its reservation");
    let (new_ticket, _) = queued(attempt(&[("b/c", Exclusive)], "new waiter", Queue::Join).await);

    // The step to version 7 again changes nothing.
    let listed = |held: Vec<HeldLock>| held.iter().map(described).collect::<Vec<_>>();
    let (before, waiting) = (listed(backend.list(None).await.expect("list")), waited().await);
    client.batch_execute(&released(RELEASED[6], &schema)).await.expect("again");
    assert_eq!(listed(backend.list(None).await.expect("list")), before);
    assert_eq!(waited().await.iter().map(|(ticket, _)| *ticket).collect::<Vec<_>>(), [new_ticket]);
    assert!(waited().await[0].1 >= waiting[0].1);

    // Once the Shared holders of a node are gone, an Exclusive grant takes
    // the node in the place of their marker.
    backend.release(&new_reader).await.expect("release");
    assert!(call(&release, &["b/c/"], "old reader", reader_tokens[0]).await);
    assert_eq!(blocked(attempt(&[("b", Exclusive)], "new", Queue::Barge).await)[0].token, reader_tokens[1]);
    assert!(call(&release, &["b/c/"], "old reader 2", reader_tokens[1]).await);
    granted(attempt(&[("b/c", Exclusive)], "new waiter", Queue::Waiting(new_ticket)).await);
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// A schema made by versions 1 to 5 exactly as released, holding locks
/// granted by version 5's function, is migrated by the next client: the
/// locks are kept and refuse requests, waiters queue behind them; a client
/// of version 5 still running releases, but its grants are refused with
/// the version they need; and the step to version 7 can run again without
/// changing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_5_schema_with_live_locks_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("five");
    let client = inspector(&url).await;
    install_released(&client, &schema, 5).await;
    // Version 5's grant of one item: (key, mode, range end, ancestors).
    let old_grant_sql = format!(
        "SELECT outcome, token FROM \"{schema}\".try_grant_items('app', 'old', 60000, true, false, 0, \
         ARRAY[$1::text], ARRAY[$2::text], ARRAY[$3::text], ARRAY[cardinality($4::text[]) + 1], $4::text[], \
         $4::text[] || $1::text, array_fill('shared'::text, ARRAY[cardinality($4::text[])]) || 'exclusive'::text)"
    );
    let old_grant = |key: &'static str, mode: &'static str, end: &'static str, ancestors: Vec<&'static str>| {
        let (client, sql) = (&client, &old_grant_sql);
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

    // A client of version 5 still running: its release works, its grants
    // are refused with the version they need.
    let released_old = client
        .query_one(&format!("SELECT \"{schema}\".release_items('app', ARRAY['a/'], 'old', $1)"), &[&(exclusive as i64)])
        .await;
    assert!(released_old.expect("version 5's release").get::<_, bool>(0));
    let refused = client.query_one(&old_grant_sql, &[&"c/", &"exclusive", &"c0", &Vec::<&str>::new()]).await;
    let message = refused.expect_err("version 5's grant").as_db_error().expect("from the server").message().to_owned();
    assert!(message.contains("need a client of schema version 7"), "{message}");

    // The step to version 7 again changes nothing.
    client.batch_execute(&released(RELEASED[6], &schema)).await.expect("again");
    let waiters = backend.waiters(None).await.expect("waiters");
    assert_eq!(
        waiters.iter().map(described).collect::<Vec<_>>(),
        [("a/x".into(), Exclusive, "new".into(), ticket, true)]
    );
    assert_eq!(backend.list(None).await.expect("list").len(), 2, "the Shared holders, old and new");
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

/// While nobody waits in the schema, a grant reads neither its
/// namespace's queue mark nor any reservation: the schema's mark (a
/// sequence) lies in the past. Once a waiter's reservation lives anywhere
/// in the namespace, its refusal has moved the schema's mark ahead, and
/// grants read the namespace's mark and look for reservations in their
/// way; so they do while the schema's mark reads null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_grant_reads_no_mark_and_no_reservation() {
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
    // A new schema's mark starts in the past.
    let (reservations, marks) = round(false).await;
    // The sweep's look at the oldest reservations, after one grant in 128,
    // is all: a look for reservations in a grant's way is at least one
    // scan per grant.
    assert!(reservations <= 2, "{reservations} scans of reservations with nobody waiting");
    assert_eq!(marks, 0, "lookups of the namespace's mark with nobody waiting");
    let (reservations, marks) = round(true).await;
    assert!(marks >= PAIRS, "{marks} lookups of the namespace's mark for {PAIRS} grants beside a waiter");
    assert!(reservations >= PAIRS, "{reservations} scans of reservations for {PAIRS} grants beside a waiter");
    // A schema's mark that reads null (never set) counts as ahead.
    let unknown = format!("ALTER SEQUENCE \"{}\".queue_mark RESTART", f.schema);
    f.client.batch_execute(&unknown).await.expect("the schema's mark unknown");
    let (_, marks) = round(false).await;
    assert!(marks >= PAIRS, "{marks} lookups of the namespace's mark for {PAIRS} grants, the schema's unknown");
    f.drop_schema().await;
}

/// A version 8 schema with a waiter is migrated to version 9. The new
/// grant function reads the namespace's mark only while the schema's lies
/// ahead, and the step starts that one ahead of every reservation: a try
/// in the waiter's way is refused and names it. A client of version 8
/// still connected joins the queue as before; the step can run again.
#[tokio::test]
async fn a_version_8_schema_with_a_waiter_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("eight");
    let client = inspector(&url).await;
    install_released(&client, &schema, 8).await;
    let old_grant_sql = format!(
        "SELECT outcome, token FROM \"{schema}\".try_grant_exclusive('app', $1, 60000, $2, $3, $4, $5, 0, 5000)"
    );
    let old_grant = |owner: &'static str, key: &'static str, end: &'static str, queue: &'static str| {
        let (client, sql) = (&client, &old_grant_sql);
        async move {
            let ancestors: Vec<&str> = if key == "a/b/c/" { vec!["a/", "a/b/"] } else { vec!["a/"] };
            let row =
                client.query_one(sql, &[&owner, &key, &end, &ancestors, &queue]).await.expect("version 8's grant");
            (row.get::<_, String>(0), row.get::<_, Option<i64>>(1).expect("token or ticket") as u64)
        }
    };
    let (outcome, holder) = old_grant("holder", "a/b/", "a/b0", "try").await;
    assert_eq!(outcome, "granted");
    let (outcome, ticket) = old_grant("waiter", "a/b/", "a/b0", "join").await;
    assert_eq!(outcome, "queued");
    let release_sql = format!("SELECT \"{schema}\".release_items('app', ARRAY['a/b/'], 'holder', $1)");
    client.query_one(&release_sql, &[&(holder as i64)]).await.expect("version 8's release");

    let (backend, held) = migrated(&url, &schema, &client).await;
    assert!(held.is_empty(), "{held:?}");
    let try_parent = request(&[("a", Exclusive)], "new", Queue::Try);
    let refused = blocked(backend.try_grant(&try_parent).await.expect("attempt"));
    assert_eq!(refused.iter().map(described).collect::<Vec<_>>(), [described_waiter(ticket)]);

    // The version 8 client still connected joins behind the waiter.
    let (outcome, _) = old_grant("late", "a/b/c/", "a/b/c0", "join").await;
    assert_eq!(outcome, "queued");

    // The step to version 9 again changes nothing.
    client.batch_execute(&released(RELEASED[8], &schema)).await.expect("again");
    let refused = blocked(backend.try_grant(&try_parent).await.expect("attempt"));
    assert_eq!(refused.iter().map(described).collect::<Vec<_>>(), [described_waiter(ticket)]);
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// The waiter of the version 8 schema, as a blocker.
fn described_waiter(ticket: u64) -> (String, Mode, String, u64, bool) {
    ("a/b".to_owned(), Exclusive, "waiter".to_owned(), ticket, true)
}
