//! Shared and Exclusive items, multi-path grants and mode changes on the
//! PostgreSQL store, on a real server: the conflict table on one path,
//! ancestors, descendants and siblings; all or nothing with a blocker per
//! blocked item; upgrades and downgrades with new tokens; release and
//! refresh of every item; one round trip each; multi-path grants racing
//! without deadlocks or conflicting holders; and a schema of version 4,
//! with its locks, migrated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{deadlocks_once_sessions_end, fresh_name, inspector};
use conformance::oracle::Oracle;
use conformance::servers::postgres;
use futures::future::join_all;
use mutextree_core::backend::{Attempt, LockKind, LockRequest};
use mutextree_core::{Error, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Owner, Ttl};
use mutextree_postgres::{PostgresBackend, PostgresConfig};
use Mode::{Exclusive, Shared};

const LONG: Duration = Duration::from_secs(60);

fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("path")
}

/// A request for `items`, each `(path, mode)`.
fn request(items: &[(&str, Mode)], owner: &str) -> LockRequest {
    let items = LockItems::new(items.iter().map(|(text, mode)| (path(text), *mode))).expect("items");
    LockRequest::of(items, Owner::new(owner).expect("owner"), Ttl::new(LONG).expect("ttl"))
}

/// A backend on a namespace of its own, on a pool of one connection.
async fn backend() -> PostgresBackend {
    let config = PostgresConfig::from_url(&postgres::url()).expect("url").pool_size(1);
    config.connect().await.expect("connect").backend(&fresh_name("modes")).expect("namespace")
}

async fn granted(backend: &PostgresBackend, items: &[(&str, Mode)], owner: &str) -> Grant {
    match backend.try_grant(&request(items, owner)).await.expect("attempt") {
        Attempt::Granted(grant) => grant,
        refusal @ (Attempt::Blocked(_) | Attempt::Queued { .. }) => {
            panic!("{items:?} for {owner} refused: {refusal:?}")
        }
    }
}

/// The blockers of a refused request, as (path, mode, token).
async fn refused(backend: &PostgresBackend, items: &[(&str, Mode)], owner: &str) -> Vec<(String, Mode, u64)> {
    match backend.try_grant(&request(items, owner)).await.expect("attempt") {
        Attempt::Granted(grant) => panic!("{items:?} for {owner} granted: {grant:?}"),
        Attempt::Blocked(blockers) => blockers.iter().map(described).collect(),
        queued @ Attempt::Queued { .. } => panic!("a try of {items:?} for {owner} was queued: {queued:?}"),
    }
}

fn described(held: &HeldLock) -> (String, Mode, u64) {
    (held.path.to_string(), held.mode, held.token)
}

/// Everything live, as (path, mode, token).
async fn listed(backend: &PostgresBackend) -> Vec<(String, Mode, u64)> {
    backend.list(None).await.expect("list").iter().map(described).collect()
}

#[tokio::test]
async fn shared_holders_share_one_path_and_keep_a_writer_out() {
    let backend = backend().await;
    let first = granted(&backend, &[("A", Shared)], "r1").await;
    let second = granted(&backend, &[("A", Shared)], "r2").await;
    assert!(second.token > first.token);
    assert_eq!(listed(&backend).await, [("A".into(), Shared, first.token), ("A".into(), Shared, second.token)]);
    // The same owner is not re-entrant, but Shared with Shared never
    // conflicts, whoever holds it.
    granted(&backend, &[("A", Shared)], "r1").await;
    let blockers = refused(&backend, &[("A", Exclusive)], "w").await;
    assert_eq!(blockers.len(), 1, "one item, one blocker: {blockers:?}");
    assert_eq!((blockers[0].0.as_str(), blockers[0].1), ("A", Shared));
}

#[tokio::test]
async fn a_shared_ancestor_refuses_an_exclusive_descendant_and_the_reverse() {
    let backend = backend().await;
    let reader = granted(&backend, &[("A", Shared)], "r").await;
    // Shared on [A] covers its whole subtree.
    assert_eq!(refused(&backend, &[("A/B/C", Exclusive)], "w").await, [("A".into(), Shared, reader.token)]);
    let deep_reader = granted(&backend, &[("A/B/C", Shared)], "r2").await;
    backend.release(&reader).await.expect("release");
    backend.release(&deep_reader).await.expect("release");

    let writer = granted(&backend, &[("A/B/C", Exclusive)], "w").await;
    for above in ["A", "A/B", "A/B/C"] {
        let blockers = refused(&backend, &[(above, Shared)], "r").await;
        assert_eq!(blockers, [("A/B/C".into(), Exclusive, writer.token)], "{above}");
    }
    assert_eq!(refused(&backend, &[("A/B/C/D", Shared)], "r").await, [("A/B/C".into(), Exclusive, writer.token)]);
    backend.release(&writer).await.expect("release");

    // A Shared descendant refuses an Exclusive ancestor.
    let deep_reader = granted(&backend, &[("A/B/C", Shared)], "r").await;
    assert_eq!(refused(&backend, &[("A", Exclusive)], "w").await, [("A/B/C".into(), Shared, deep_reader.token)]);
}

#[tokio::test]
async fn siblings_never_conflict_whatever_their_modes() {
    let backend = backend().await;
    for (held, asked) in [(Shared, Shared), (Shared, Exclusive), (Exclusive, Shared), (Exclusive, Exclusive)] {
        let first = granted(&backend, &[("A/B", held)], "one").await;
        let second = granted(&backend, &[("A/C", asked)], "two").await;
        backend.release(&first).await.expect("release");
        backend.release(&second).await.expect("release");
    }
}

#[tokio::test]
async fn a_multi_path_request_is_all_or_nothing_with_a_blocker_per_blocked_item() {
    let backend = backend().await;
    let writer = granted(&backend, &[("X", Exclusive)], "w").await;
    let reader = granted(&backend, &[("Y", Shared)], "r").await;
    let items = [("X/1", Shared), ("Y", Exclusive), ("Z", Exclusive), ("Y2", Shared)];
    let blockers = refused(&backend, &items, "me").await;
    assert_eq!(blockers, [("X".into(), Exclusive, writer.token), ("Y".into(), Shared, reader.token)]);
    let before = listed(&backend).await;
    assert_eq!(before.len(), 2, "nothing of the refused request is held: {before:?}");

    backend.release(&writer).await.expect("release");
    assert_eq!(refused(&backend, &items, "me").await, [("Y".into(), Shared, reader.token)]);
    backend.release(&reader).await.expect("release");
    let grant = granted(&backend, &items, "me").await;
    let token = grant.token;
    assert_eq!(
        listed(&backend).await,
        [
            ("X/1".into(), Shared, token),
            ("Y".into(), Exclusive, token),
            ("Y2".into(), Shared, token),
            ("Z".into(), Exclusive, token)
        ],
        "every item, one token"
    );
    // Each item blocks on its own.
    assert_eq!(refused(&backend, &[("Z/q", Shared)], "you").await, [("Z".into(), Exclusive, token)]);
    granted(&backend, &[("X", Shared)], "you").await;
}

#[tokio::test]
async fn release_and_refresh_act_on_every_item() {
    let backend = backend().await;
    let grant = granted(&backend, &[("A/1", Exclusive), ("B", Shared), ("C/2/3", Exclusive)], "me").await;
    let short = Ttl::new(Duration::from_secs(5)).expect("ttl");
    let refreshed = backend.refresh(&grant, short).await.expect("refresh");
    assert_eq!(refreshed.ttl, short.get());
    let remaining: Vec<Duration> = backend.list(None).await.expect("list").iter().map(|held| held.remaining).collect();
    assert_eq!(remaining.len(), 3);
    assert!(remaining.iter().all(|left| *left <= short.get() && *left > Duration::from_secs(4)), "{remaining:?}");

    backend.release(&refreshed).await.expect("release");
    assert_eq!(listed(&backend).await, [], "every item released");
    assert!(matches!(backend.release(&refreshed).await, Err(Error::NotHeld { .. })));
    assert!(matches!(backend.refresh(&refreshed, short).await, Err(Error::NotHeld { .. })));
    // And every path is free again, for an Exclusive holder of each.
    granted(&backend, &[("A", Exclusive), ("B", Exclusive), ("C", Exclusive)], "you").await;
}

#[tokio::test]
async fn an_upgrade_is_refused_while_another_reader_lives_and_granted_after() {
    let backend = backend().await;
    let mine = granted(&backend, &[("A", Shared), ("B/1", Shared)], "me").await;
    let other = granted(&backend, &[("A/x", Shared)], "you").await;
    let Attempt::Blocked(blockers) = backend.change_mode(&mine, Exclusive).await.expect("attempt") else {
        panic!("upgraded while another reader holds A/x");
    };
    assert_eq!(blockers.iter().map(described).collect::<Vec<_>>(), [("A/x".into(), Shared, other.token)]);
    assert_eq!(
        listed(&backend).await,
        [("A".into(), Shared, mine.token), ("A/x".into(), Shared, other.token), ("B/1".into(), Shared, mine.token)],
        "a refused upgrade leaves the grant as it was"
    );

    backend.release(&other).await.expect("release");
    let upgraded = backend.change_mode(&mine, Exclusive).await.expect("attempt").granted().expect("nobody else");
    assert!(upgraded.token > other.token, "a new token: {} after {}", upgraded.token, other.token);
    assert_eq!(upgraded.items, mine.items.with_mode(Exclusive));
    assert_eq!(upgraded.expires_at, mine.expires_at, "the same expiry");
    assert_eq!(
        listed(&backend).await,
        [("A".into(), Exclusive, upgraded.token), ("B/1".into(), Exclusive, upgraded.token)]
    );
    assert_eq!(refused(&backend, &[("B/1/q", Shared)], "you").await, [("B/1".into(), Exclusive, upgraded.token)]);
    // The old token names nothing any more.
    assert!(matches!(backend.release(&mine).await, Err(Error::NotHeld { .. })));
    assert!(matches!(backend.change_mode(&mine, Exclusive).await, Err(Error::NotHeld { .. })));
    backend.release(&upgraded).await.expect("release");
    assert!(matches!(backend.change_mode(&upgraded, Shared).await, Err(Error::NotHeld { .. })));
}

#[tokio::test]
async fn a_downgrade_lets_a_reader_in_and_keeps_writers_out() {
    let backend = backend().await;
    let writer = granted(&backend, &[("A", Exclusive)], "w").await;
    refused(&backend, &[("A/B", Shared)], "r").await;
    let reading = backend.change_mode(&writer, Shared).await.expect("attempt").granted().expect("always granted");
    assert!(reading.token > writer.token);
    assert_eq!(reading.expires_at, writer.expires_at, "the same expiry");
    let reader = granted(&backend, &[("A/B", Shared)], "r").await;
    assert_eq!(refused(&backend, &[("A/C", Exclusive)], "w2").await, [("A".into(), Shared, reading.token)]);
    // A downgrade is granted with another reader in: Shared items do not
    // conflict.
    let again = backend.change_mode(&reading, Shared).await.expect("attempt").granted().expect("granted");
    assert!(again.token > reader.token);
}

/// A stepwise client's lock on an ancestor, taken before it looks below
/// it, refuses a downgrade meanwhile: the downgrade's token would be newer
/// than the stepwise grant's, which may yet be granted.
#[tokio::test]
async fn a_stepwise_lock_in_progress_above_refuses_a_downgrade() {
    let backend = backend().await;
    let writer = granted(&backend, &[("A/B", Exclusive)], "w").await;
    let above = LockRequest::new(path("A"), Owner::new("stepwise").expect("owner"), Ttl::new(LONG).expect("ttl"));
    let stepwise = backend.try_lock_key(&above, LockKind::Lock).await.expect("attempt").granted().expect("key free");
    let Attempt::Blocked(blockers) = backend.change_mode(&writer, Shared).await.expect("attempt") else {
        panic!("downgraded under a stepwise lock in progress");
    };
    assert_eq!(blockers.iter().map(described).collect::<Vec<_>>(), [("A".into(), Exclusive, stepwise.token)]);
    assert_eq!(
        listed(&backend).await,
        [("A".into(), Exclusive, stepwise.token), ("A/B".into(), Exclusive, writer.token)],
        "a refused downgrade leaves the grant as it was"
    );
    backend.release(&stepwise).await.expect("release");
    let reading = backend.change_mode(&writer, Shared).await.expect("attempt").granted().expect("nothing above");
    assert!(reading.token > stepwise.token);
}

#[tokio::test]
async fn a_key_lock_is_refused_by_a_shared_holder_and_blocks_a_shared_request() {
    let backend = backend().await;
    let reader = granted(&backend, &[("A/B", Shared)], "r").await;
    let key_lock = LockRequest::new(path("A/B"), Owner::new("stepwise").expect("owner"), Ttl::new(LONG).expect("ttl"));
    match backend.try_lock_key(&key_lock, LockKind::Lock).await.expect("attempt") {
        Attempt::Blocked(blockers) => assert_eq!(described(blockers.first()), ("A/B".into(), Shared, reader.token)),
        Attempt::Granted(grant) => panic!("a key with a live Shared lock was locked: {grant:?}"),
        queued @ Attempt::Queued { .. } => panic!("a key lock was queued: {queued:?}"),
    }
    backend.release(&reader).await.expect("release");
    let parent = LockRequest::new(path("A"), Owner::new("stepwise").expect("owner"), Ttl::new(LONG).expect("ttl"));
    let transient = backend.try_lock_key(&parent, LockKind::Transient).await.expect("attempt").granted().expect("free");
    let blockers = refused(&backend, &[("A/B", Shared)], "r").await;
    assert_eq!(blockers, [("A".into(), Exclusive, transient.token)], "a stepwise lock counts as Exclusive");
}

/// One statement per grant, refusal, multi-path grant, mode change,
/// refresh and release, once each statement is prepared on the pooled
/// connection.
#[tokio::test]
async fn every_operation_is_one_round_trip() {
    let backend = backend().await;
    // Each grant and release function prepared: one Exclusive item has
    // its own.
    let alone = granted(&backend, &[("alone", Exclusive)], "me").await;
    backend.release(&alone).await.expect("release");
    let reading = granted(&backend, &[("reading", Shared)], "me").await;
    backend.release(&reading).await.expect("release");
    let warm = granted(&backend, &[("warm", Shared)], "me").await;
    let warm = backend.change_mode(&warm, Exclusive).await.expect("upgrade").granted().expect("free");
    let warm = backend.refresh(&warm, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
    backend.release(&warm).await.expect("release");
    backend.list(None).await.expect("list");
    let count = || backend.round_trips().expect("counted");

    let mut sent = count();
    let mut one_more = |what: &str, now: u64| {
        assert_eq!(now - sent, 1, "{what}");
        sent = now;
    };
    let deep = granted(&backend, &[("a/b/c/d/e/f", Exclusive)], "me").await;
    one_more("an Exclusive grant at depth 6", count());
    let reader = granted(&backend, &[("r/s/t", Shared)], "me").await;
    one_more("a Shared grant", count());
    let many = [("m/1/x", Shared), ("m/2", Exclusive), ("m/3/y/z", Shared), ("n", Exclusive)];
    let multi = granted(&backend, &many, "me").await;
    one_more("a grant of 4 items", count());
    refused(&backend, &[("a/b", Shared), ("m/2/q", Shared), ("r", Exclusive)], "you").await;
    one_more("a refusal of 3 blocked items", count());
    let upgraded = backend.change_mode(&reader, Exclusive).await.expect("upgrade").granted().expect("free");
    one_more("an upgrade", count());
    let downgraded = backend.change_mode(&upgraded, Shared).await.expect("downgrade").granted().expect("live");
    one_more("a downgrade", count());
    let multi = backend.refresh(&multi, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
    one_more("a refresh of 4 items", count());
    backend.release(&multi).await.expect("release");
    one_more("a release of 4 items", count());
    backend.release(&deep).await.expect("release");
    backend.release(&downgraded).await.expect("release");
    backend.list(None).await.expect("list");
    assert_eq!(count() - sent, 3, "two releases and a listing");
}

/// Clients race with requests of one to three items over one small tree,
/// in random modes, each a different subset in its own order before
/// normalisation, and upgrade or downgrade what they hold: no two
/// conflicting items are ever held at once, tokens rise across conflicting
/// grants, and the server never had to break a deadlock (which the client
/// would hide by retrying).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_multi_path_grants_never_deadlock_nor_overlap() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 120;
    // A server of its own, so that its count of deadlocks is this test's.
    let settings = postgres::Settings { extra: vec!["deadlock_timeout=20ms".to_owned()], ..Default::default() };
    let server = postgres::Postgres::create(&settings).unwrap_or_else(|message| panic!("{message}"));
    let url = server.url();
    let namespace = fresh_name("race");
    let paths = ["A", "A/B", "A/B/C", "A/D", "E", "E/F", "G", "G/H/I"];
    let oracle = Arc::new(Oracle::new());
    let (grants, changes, refusals) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = (0..CLIENTS).map(|client| {
        let (url, namespace, oracle) = (url.clone(), namespace.clone(), oracle.clone());
        let (grants, changes, refusals) = (grants.clone(), changes.clone(), refusals.clone());
        tokio::spawn(async move {
            let config = PostgresConfig::from_url(&url).expect("url").pool_size(1);
            let backend = config.connect().await.expect("connect").backend(&namespace).expect("namespace");
            let owner = Owner::new(format!("client-{client}")).expect("owner");
            let ttl = Ttl::new(LONG).expect("ttl");
            let mut rounds = 0;
            while rounds < ROUNDS {
                let count = fastrand::usize(1..=3);
                let chosen = (0..count).map(|_| {
                    let mode = if fastrand::bool() { Shared } else { Exclusive };
                    (path(paths[fastrand::usize(..paths.len())]), mode)
                });
                // Comparable paths in different modes are not a request.
                let Ok(items) = LockItems::new(chosen) else { continue };
                rounds += 1;
                let mut grant = match backend.try_grant(&LockRequest::of(items, owner.clone(), ttl)).await {
                    Ok(Attempt::Granted(grant)) => grant,
                    Ok(Attempt::Blocked(_)) => {
                        refusals.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(queued @ Attempt::Queued { .. }) => panic!("client {client}: a try was queued: {queued:?}"),
                    Err(error) => panic!("client {client}: {error}"),
                };
                grants.fetch_add(1, Ordering::Relaxed);
                oracle.enter(&grant);
                tokio::task::yield_now().await;
                if fastrand::u8(..4) == 0 {
                    let mode = if grant.items.any(Exclusive) { Shared } else { Exclusive };
                    // A downgrade weakens the grant as it is sent, an
                    // upgrade strengthens it once granted.
                    if mode == Shared {
                        oracle.exit(&grant);
                    }
                    match backend.change_mode(&grant, mode).await.expect("change") {
                        Attempt::Granted(changed) => {
                            changes.fetch_add(1, Ordering::Relaxed);
                            if mode == Exclusive {
                                oracle.exit(&grant);
                            }
                            oracle.enter(&changed);
                            grant = changed;
                        }
                        // Only a stepwise client's lock refuses a downgrade.
                        Attempt::Blocked(_) => assert_eq!(mode, Exclusive, "a downgrade was refused"),
                        queued @ Attempt::Queued { .. } => panic!("a mode change was queued: {queued:?}"),
                    }
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
    let (grants, changes, refusals) =
        (grants.load(Ordering::Relaxed), changes.load(Ordering::Relaxed), refusals.load(Ordering::Relaxed));
    let shared = oracle.shared_overlaps();
    assert!(
        grants > CLIENTS as u64 && changes > 0 && refusals > 0 && shared > 0,
        "{grants} grants, {changes} changes, {refusals} refusals, {shared} beside readers"
    );

    let deadlocks = deadlocks_once_sessions_end(&inspector(&url).await, 0).await;
    assert_eq!(deadlocks, 0, "the server broke {deadlocks} deadlocks between grants");
}

/// Every operation finds its rows by whole keys of the primary key (or of
/// the partial index on Exclusive rows), however many locks the namespace
/// holds and whatever the table's statistics say: with 10,000 locks held
/// around them, first while the statistics still describe an empty table,
/// then once they are up to date, Shared, Exclusive and multi-path grants,
/// refusals, mode changes, refreshes and releases read a few index pages
/// each, never the namespace's whole range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_read_a_few_index_pages_whatever_the_namespace_holds() {
    const ROUNDS: i64 = 20;
    let url = postgres::url();
    let schema = fresh_name("reads");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone()).pool_size(1);
    let backend = config.connect().await.expect("connect").backend("reads").expect("namespace");
    let client = inspector(&url).await;
    client
        .batch_execute(&format!(
            "ANALYZE \"{schema}\".locks; ANALYZE \"{schema}\".shared_holders; \
             ALTER TABLE \"{schema}\".locks SET (autovacuum_enabled = false); \
             ALTER TABLE \"{schema}\".shared_holders SET (autovacuum_enabled = false); \
             INSERT INTO \"{schema}\".locks \
             SELECT 'reads', 'background/g' || (i / 1000) || '/n' || i || '/', CASE WHEN i % 3 = 0 THEN 'holder' ELSE '' END, \
                    CASE WHEN i % 3 = 0 THEN nextval('\"{schema}\".tokens') ELSE 0 END, \
                    clock_timestamp() + interval '1 hour', false, CASE WHEN i % 3 = 0 THEN 'exclusive' ELSE 'holders' END \
             FROM generate_series(1, 10000) i; \
             INSERT INTO \"{schema}\".shared_holders \
             SELECT 'reads', 'background/g' || (i / 1000) || '/n' || i || '/', nextval('\"{schema}\".tokens'), 'holder', \
                    clock_timestamp() + interval '1 hour', false \
             FROM generate_series(1, 10000) i WHERE i % 3 <> 0; \
             INSERT INTO \"{schema}\".locks VALUES \
                 ('reads', 'background/g0/', 'holder', nextval('\"{schema}\".tokens'), clock_timestamp() + interval '1 hour', \
                  false, 'exclusive');"
        ))
        .await
        .expect("locks held");
    let counters = format!(
        "SELECT sum(s.idx_scan)::bigint, sum(b.idx_blks_hit + b.idx_blks_read)::bigint \
         FROM pg_stat_user_indexes s JOIN pg_statio_user_indexes b USING (indexrelid) \
         WHERE s.schemaname = '{schema}' AND s.relname IN ('locks', 'shared_holders') \
           AND s.indexrelname NOT IN ('locks_expires_at', 'shared_holders_expires_at')"
    );
    let read =
        || async { client.query_one(&counters, &[]).await.map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1))) };
    let (scans_before, pages_before) = read().await.expect("index statistics");

    let mut operations = 0;
    for round in 0..ROUNDS {
        if round == ROUNDS / 2 {
            let analyze = format!("ANALYZE \"{schema}\".locks; ANALYZE \"{schema}\".shared_holders");
            client.batch_execute(&analyze).await.expect("analyze");
        }
        let single = granted(&backend, &[("work/a/b", Exclusive)], "me").await;
        backend.release(&single).await.expect("release");
        let reader = granted(&backend, &[("work/r/s", Shared)], "me").await;
        let writer = backend.change_mode(&reader, Exclusive).await.expect("upgrade").granted().expect("free");
        let reader = backend.change_mode(&writer, Shared).await.expect("downgrade").granted().expect("live");
        let reader = backend.refresh(&reader, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
        backend.release(&reader).await.expect("release");
        let many = granted(&backend, &[("work/m/1", Shared), ("work/m/2", Exclusive), ("work/n", Shared)], "me").await;
        backend.release(&many).await.expect("release");
        refused(&backend, &[("background/g0/n5", Shared), ("background/g1", Exclusive)], "me").await;
        operations += 10;
    }
    drop(backend);
    // The backend's session reports its statistics when it ends: at least
    // one index scan per operation.
    let started = tokio::time::Instant::now();
    let (scans, pages) = loop {
        let (scans, pages) = read().await.expect("index statistics");
        if scans - scans_before >= operations {
            break (scans - scans_before, pages - pages_before);
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the statistics never came: {scans} scans");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // About 10 per operation (2 or 3 per lookup, and the inserts); a single
    // statement that read the namespace's range would add 60 at each call.
    assert!(
        pages <= 15 * operations,
        "{pages} index pages read in {scans} scans for {operations} operations, with 10,000 locks around"
    );
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}
