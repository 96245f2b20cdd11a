//! What only the PostgreSQL store promises, on a real server: migrations
//! racing each other, older schemas (a version 4 one with its locks)
//! migrated, the READ COMMITTED snapshot race on parent/child
//! paths, a server crash and restart, the table staying small, grants
//! planned the same way whatever the statistics say, calls one at a time
//! on one pooled connection, one listening connection per backend,
//! releases that notify only when a backend of the namespace listens, and
//! bad schema names. (Modes and multi-path grants: `tests/modes.rs`.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{fresh_name, inspector, install_released, migrated, released, RELEASED};
use conformance::cancel::Gated;
use conformance::oracle::Oracle;
use conformance::servers::postgres;
use futures::future::join_all;
use mutextree_core::backend::{Attempt, LockRequest, Stepwise};
use mutextree_core::{Error, Grant, LockBackend, LockItems, LockPath, Mode, Owner, TreeLock, Ttl, Wait};
use mutextree_postgres::{PostgresBackend, PostgresConfig, PostgresStore};
use tokio::time::Instant;

fn request(path: &str, owner: &str, ttl: Duration) -> LockRequest {
    LockRequest::new(
        LockPath::parse(path).expect("path"),
        Owner::new(owner).expect("owner"),
        Ttl::new(ttl).expect("ttl"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_of_a_fresh_schema_all_succeed() {
    let url = postgres::url();
    for _ in 0..4 {
        let schema = fresh_name("migrate");
        let starts = (0..8).map(|_| {
            let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone()).pool_size(1);
            tokio::spawn(async move { config.connect().await })
        });
        let stores: Vec<PostgresStore> = join_all(starts)
            .await
            .into_iter()
            .map(|joined| joined.expect("task").unwrap_or_else(|e| panic!("a concurrent migration failed: {e}")))
            .collect();
        let backend = stores[3].backend("app").expect("namespace");
        let grant = backend.try_grant(&request("a/b", "me", Duration::from_secs(30))).await.expect("grant");
        let grant = grant.granted().expect("a fresh schema holds no lock");
        let other = stores[5].backend("app").expect("namespace");
        let refused = other.try_grant(&request("a", "you", Duration::from_secs(30))).await.expect("attempt");
        assert!(matches!(refused, Attempt::Blocked(ref held) if held.first().token == grant.token), "{refused:?}");

        let client = inspector(&url).await;
        let versions = client.query(&format!("SELECT version FROM \"{schema}\".schema_version"), &[]).await;
        let versions: Vec<i32> = versions.expect("version table").iter().map(|row| row.get(0)).collect();
        assert_eq!(versions, [9], "one version row");
        // A later start finds the current version and changes nothing.
        PostgresConfig::from_url(&url).expect("url").schema(schema.clone()).connect().await.expect("again");
        client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
    }
}

/// Many clients grant [A], [A, B], [A, B, C] and [A, B, D] at once and
/// hold them for a moment: the oracle sees every grant and release and
/// fails on any two overlapping holders. This is the race a statement that
/// waits for an advisory lock and then checks with its old snapshot loses.
async fn parent_child_race(stepwise_every: usize) {
    const CLIENTS: usize = 24;
    const ROUNDS: usize = 150;
    let url = postgres::url();
    let namespace = fresh_name("race");
    let paths = ["A", "A/B", "A/B/C", "A/B/D"].map(|p| LockPath::parse(p).expect("path"));
    let oracle = Arc::new(Oracle::new());
    let refused = Arc::new(AtomicU64::new(0));
    let tasks = (0..CLIENTS).map(|client| {
        let (url, namespace, paths, oracle, refused) =
            (url.clone(), namespace.clone(), paths.clone(), oracle.clone(), refused.clone());
        tokio::spawn(async move {
            let config = PostgresConfig::from_url(&url).expect("url").pool_size(1);
            let native: Arc<dyn LockBackend> =
                Arc::new(config.connect().await.expect("connect").backend(&namespace).expect("namespace"));
            let backend: Arc<dyn LockBackend> = if stepwise_every > 0 && client % stepwise_every == 0 {
                Arc::new(Stepwise::new(native))
            } else {
                native
            };
            let owner = Owner::new(format!("client-{client}")).expect("owner");
            let ttl = Ttl::new(Duration::from_secs(60)).expect("ttl");
            for round in 0..ROUNDS {
                let path = paths[(client + round * 7) % paths.len()].clone();
                match backend.try_grant(&LockRequest::new(path, owner.clone(), ttl)).await.expect("attempt") {
                    Attempt::Granted(grant) => {
                        oracle.enter(&grant);
                        for _ in 0..fastrand::usize(1..4) {
                            tokio::task::yield_now().await;
                        }
                        oracle.exit(&grant);
                        backend.release(&grant).await.expect("release of a held lock");
                    }
                    Attempt::Blocked(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    queued @ Attempt::Queued { .. } => panic!("client {client}: a try was queued: {queued:?}"),
                }
            }
        })
    });
    for task in join_all(tasks).await {
        task.expect("client task");
    }
    oracle.assert_clean();
    let (grants, refused) = (oracle.grants(), refused.load(Ordering::Relaxed));
    assert!(grants > CLIENTS as u64, "only {grants} grants");
    assert!(refused > 0, "{CLIENTS} clients on four overlapping paths must run into each other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_committed_parent_child_race_never_grants_twice() {
    parent_child_race(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parent_child_race_with_stepwise_clients_never_grants_twice() {
    parent_child_race(3).await;
}

/// The server is killed mid-run and started again on the same data: calls
/// fail (retryably) while it is down, the pool recovers by itself, the
/// granted locks are still there with their tokens, tokens keep rising, and
/// waiters hear releases again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_yields_errors_then_recovery_and_keeps_the_locks() {
    let settings = postgres::Settings { fsync: true, restartable: true, ..postgres::Settings::default() };
    let server = postgres::Postgres::create(&settings).unwrap_or_else(|message| panic!("{message}"));
    let config = PostgresConfig::from_url(&server.url()).expect("url").pool_size(2);
    let backend = config.connect().await.expect("connect").backend("restart").expect("namespace");
    let long = Duration::from_secs(600);
    let parent = backend.try_grant(&request("A", "holder", long)).await.expect("grant").granted().expect("free");
    let other = backend.try_grant(&request("X/Y", "holder", long)).await.expect("grant").granted().expect("free");

    let stopped = server.stop();
    let error = backend.try_grant(&request("B", "me", long)).await.expect_err("the server is down");
    assert!(matches!(error, Error::Store { retryable: true, .. }), "{error:?}");
    let error = backend.list(None).await.expect_err("the server is down");
    assert!(error.is_retryable(), "{error:?}");

    let server = stopped.start_again().unwrap_or_else(|message| panic!("{message}"));
    // The first calls may still meet connections broken by the crash;
    // within a bounded number of calls the pool has replaced them.
    let mut recovered = None;
    for _ in 0..50 {
        match backend.list(None).await {
            Ok(held) => {
                recovered = Some(held);
                break;
            }
            Err(error) => assert!(error.is_retryable(), "{error:?}"),
        }
    }
    let held = recovered.expect("the pool recovers once the server is back");
    let tokens: Vec<u64> = held.iter().map(|lock| lock.token).collect();
    assert_eq!(tokens, [parent.token, other.token], "the granted locks survived the restart");

    let refused = backend.try_grant(&request("A/B", "me", long)).await.expect("attempt");
    assert!(matches!(refused, Attempt::Blocked(ref held) if held.first().token == parent.token), "{refused:?}");
    let next = backend.try_grant(&request("C", "me", long)).await.expect("grant").granted().expect("free");
    assert!(next.token > other.token, "tokens rise across the restart: {} after {}", next.token, other.token);

    backend.release(&other).await.expect("release");
    backend.release(&next).await.expect("release");

    // Waiters hear releases again: the listening connection came back.
    let waiter_backend = Arc::new(config.connect().await.expect("connect").backend("restart").expect("namespace"));
    let gated = Gated::new(waiter_backend);
    let waiter = TreeLock::builder(gated.clone(), "A/B").wait(Wait::For(long)).build().expect("lock");
    let refused = gated.blocked();
    let waiting = tokio::spawn(async move { waiter.acquire().await.map(|_| Instant::now()) });
    tokio::time::timeout(Duration::from_secs(30), refused).await.expect("the waiter is refused first");
    let released_at = Instant::now();
    backend.release(&parent).await.expect("the old grant is still releasable");
    let granted_at = waiting.await.expect("task").expect("granted after the release");
    let delay = granted_at - released_at;
    assert!(delay < Duration::from_secs(2), "woke {delay:?} after the release, the blocker had 10 min left");
    drop(server);
}

/// Locks that are never released (their holders died) expire, and grants
/// elsewhere sweep them: the table stays about as small as what is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_swept_so_the_table_stays_small() {
    let url = postgres::url();
    let schema = fresh_name("sweep");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone());
    let backend = config.connect().await.expect("connect").backend("sweep").expect("namespace");
    let client = inspector(&url).await;
    let sql = format!("SELECT count(*) FROM \"{schema}\".locks");
    let count = || async { client.query_one(&sql, &[]).await.expect("count").get::<_, i64>(0) };
    // 2000 holders that never release, each lock gone after 1 ms: without
    // the sweep the table would hold all 2000.
    let short = Duration::from_millis(1);
    let mut largest = 0;
    for i in 0..2000 {
        backend.try_grant(&request(&format!("dead/n{i}"), "gone", short)).await.expect("grant");
        if i % 100 == 99 {
            largest = largest.max(count().await);
        }
    }
    assert!(largest > 0, "the rows are there until swept");
    assert!(largest <= 400, "{largest} rows for locks that expired long ago");
    // Once they have all expired, a few hundred grants elsewhere remove them.
    tokio::time::sleep(short * 2).await;
    let long = Duration::from_secs(60);
    for _ in 0..300 {
        let grant = backend.try_grant(&request("live/x", "me", long)).await.expect("grant").granted().expect("free");
        backend.release(&grant).await.expect("release");
    }
    let left = count().await;
    assert_eq!(left, 0, "{left} expired rows were left behind");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// A schema left at version 1 is brought to the current version by the
/// next client, and its functions get their planning setting. (The table
/// version 3 adds stays: the step from 2 is tested below; so do version
/// 5's changes, which its step finds made: the step from 4 is tested
/// below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("older");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone());
    config.connect().await.expect("connect");
    let client = inspector(&url).await;
    // What version 1 left: the same functions, without the setting.
    client
        .batch_execute(&format!(
            "UPDATE \"{schema}\".schema_version SET version = 1; \
             ALTER FUNCTION \"{schema}\".try_grant RESET ALL; ALTER FUNCTION \"{schema}\".refresh RESET ALL; \
             DROP TABLE \"{schema}\".listeners; {release_before}",
            release_before = RELEASE_BEFORE_3.replace("{schema}", &schema)
        ))
        .await
        .expect("back to version 1");
    let backend = config.connect().await.expect("migrate").backend("older").expect("namespace");
    let version = client.query_one(&format!("SELECT version FROM \"{schema}\".schema_version"), &[]).await;
    assert_eq!(version.expect("version").get::<_, i32>(0), 9);
    let settings = client
        .query(
            "SELECT p.proname::text, array_to_string(p.proconfig, ',') FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .expect("functions");
    let settings: Vec<(String, Option<String>)> = settings.iter().map(|row| (row.get(0), row.get(1))).collect();
    let generic = Some("plan_cache_mode=force_generic_plan".to_owned());
    let expected = [
        ("exclusive_blocker", generic.clone()),
        ("first_in_the_way", generic.clone()),
        ("grant_exclusive", generic.clone()),
        ("keep_reservation", generic.clone()),
        ("mark_holders", generic.clone()),
        ("refresh", generic.clone()),
        ("refresh_items", generic.clone()),
        ("release", None),
        ("release_items", None),
        ("sweep_expired", generic.clone()),
        ("try_grant", None),
        ("try_grant_exclusive", generic.clone()),
        ("try_grant_general", generic.clone()),
        ("try_grant_items", None),
        ("try_grant_queued", None),
        ("withdraw", generic),
    ];
    assert_eq!(settings, expected.map(|(name, setting)| (name.to_owned(), setting)));
    let grant = backend.try_grant(&request("a/b", "me", Duration::from_secs(30))).await.expect("grant");
    let grant = grant.granted().expect("free");
    backend.refresh(&grant, Ttl::new(Duration::from_secs(30)).expect("ttl")).await.expect("refresh");
    backend.release(&grant).await.expect("release");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// `release` as versions 1 and 2 left it: it notifies at every release of
/// a live grant. `{schema}` and `{channel}` are to be filled in.
const RELEASE_BEFORE_3: &str = r#"
CREATE OR REPLACE FUNCTION "{schema}".release(p_namespace text, p_key text, p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_live boolean;
BEGIN
    DELETE FROM "{schema}".locks l
     WHERE l.namespace = p_namespace AND l.key = p_key AND l.owner = p_owner AND l.token = p_token
    RETURNING l.expires_at > clock_timestamp() INTO v_live;
    IF v_live THEN
        PERFORM pg_notify('{schema}_changes', p_namespace);
    END IF;
    RETURN coalesce(v_live, false);
END
$fn$;
"#;

/// A schema left at version 2 (no table of listeners, a release that
/// always notifies) is brought to the current version: the table is there, a release
/// nobody listens for no longer notifies, and a waiter still wakes on a
/// release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_schema_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("older");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone());
    config.connect().await.expect("connect");
    let client = inspector(&url).await;
    let release_before = RELEASE_BEFORE_3.replace("{schema}", &schema);
    client
        .batch_execute(&format!(
            "UPDATE \"{schema}\".schema_version SET version = 2; DROP TABLE \"{schema}\".listeners; {release_before}"
        ))
        .await
        .expect("back to version 2");
    let mut raw = RawListener::new(&url, &schema).await;
    // Version 2's release notifies with nobody listening (the row is the
    // one version 2's grant wrote; the schema's grant function is the
    // current version's, which refuses the arguments of version 2's).
    let grant = client
        .query_one(
            &format!(
                "INSERT INTO \"{schema}\".locks (namespace, key, owner, token, expires_at, transient) \
                 VALUES ('older', 'x/', 'me', nextval('\"{schema}\".tokens'), clock_timestamp() + interval '1 minute', \
                         false) RETURNING token"
            ),
            &[],
        )
        .await
        .expect("grant");
    let token: i64 = grant.get(0);
    client
        .query_one(&format!("SELECT \"{schema}\".release('older', 'x/', 'me', $1)"), &[&token])
        .await
        .expect("release");
    assert_eq!(raw.until_sentinel(&client).await.len(), 2, "version 2 notified");

    let backend = Arc::new(config.connect().await.expect("migrate").backend("older").expect("namespace"));
    let version = client.query_one(&format!("SELECT version FROM \"{schema}\".schema_version"), &[]).await;
    assert_eq!(version.expect("version").get::<_, i32>(0), 9);
    let rows = client.query_one(&format!("SELECT count(*) FROM \"{schema}\".listeners"), &[]).await;
    assert_eq!(rows.expect("listeners table").get::<_, i64>(0), 0);
    let long = Duration::from_secs(60);
    let grant = backend.try_grant(&request("a/b", "me", long)).await.expect("grant").granted().expect("free");
    backend.release(&grant).await.expect("release");
    assert_eq!(raw.until_sentinel(&client).await.len(), 1, "the current version notified with nobody listening");

    let holder = backend.try_grant(&request("a", "holder", long)).await.expect("grant").granted().expect("free");
    let waiter = waiter(&backend, "a/b");
    wait_until_listening(&backend).await;
    let released_at = Instant::now();
    backend.release(&holder).await.expect("release");
    let (grant, granted_at) = waiter.await.expect("task").expect("granted");
    assert!(granted_at - released_at < Duration::from_secs(2), "the waiter woke late");
    backend.release(&grant).await.expect("release");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// A connection that listens on a store's channel as any client could,
/// without adding a row to the store's table of listeners.
struct RawListener {
    channel: String,
    notifications: tokio::sync::mpsc::UnboundedReceiver<String>,
    _client: tokio_postgres::Client,
}

impl RawListener {
    async fn new(url: &str, schema: &str) -> Self {
        let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
        let (sender, notifications) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
                if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                    let _ = sender.send(notification.payload().to_owned());
                }
            }
        });
        let channel = format!("{schema}_changes");
        client.batch_execute(&format!("LISTEN \"{channel}\"")).await.expect("listen");
        RawListener { channel, notifications, _client: client }
    }

    /// Sends a sentinel notification through `sender` and returns the
    /// payloads received up to it, the sentinel last.
    async fn until_sentinel(&mut self, sender: &tokio_postgres::Client) -> Vec<String> {
        let sentinel = fresh_name("sentinel");
        sender.execute("SELECT pg_notify($1, $2)", &[&self.channel, &sentinel]).await.expect("sentinel");
        let mut received = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.notifications.recv()).await;
            let payload = next.expect("the sentinel never came").expect("listening connection");
            let last = payload == sentinel;
            received.push(payload);
            if last {
                return received;
            }
        }
    }
}

/// A task waiting for `path` on `backend`: the grant, and when it came.
fn waiter(backend: &Arc<PostgresBackend>, path: &str) -> tokio::task::JoinHandle<Result<(Grant, Instant), Error>> {
    let lock = TreeLock::builder(backend.clone() as Arc<dyn LockBackend>, path)
        .owner("waiter")
        .wait(Wait::For(Duration::from_secs(60)))
        .build()
        .expect("lock");
    tokio::spawn(async move { lock.acquire().await.map(|grant| (grant, Instant::now())) })
}

async fn wait_until_listening(backend: &PostgresBackend) {
    let started = Instant::now();
    while !backend.is_listening() {
        assert!(started.elapsed() < Duration::from_secs(10), "the listening connection never came up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A release in a namespace no session listens for sends no notification:
/// a connection listening on the channel without registering hears only
/// the sentinel sent after the releases, even with a row left by a session
/// that has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_nobody_listens_for_sends_no_notification() {
    let url = postgres::url();
    let schema = fresh_name("quiet");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone());
    let backend = config.connect().await.expect("connect").backend("quiet").expect("namespace");
    let client = inspector(&url).await;
    let mut raw = RawListener::new(&url, &schema).await;
    // A row of a listening session that has ended without removing it.
    let ended = inspector(&url).await;
    let pid: i32 = ended.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0);
    drop(ended);
    let started = Instant::now();
    loop {
        let alive = client.query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid]).await;
        if alive.expect("activity").get::<_, i64>(0) == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the session never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .execute(&format!("INSERT INTO \"{schema}\".listeners VALUES ('quiet', $1)"), &[&pid])
        .await
        .expect("stale row");
    for i in 0..3 {
        let grant = backend.try_grant(&request(&format!("a/n{i}"), "me", Duration::from_secs(60))).await;
        backend.release(&grant.expect("grant").granted().expect("free")).await.expect("release");
    }
    assert!(!backend.is_listening(), "this backend never waited");
    let received = raw.until_sentinel(&client).await;
    assert_eq!(received.len(), 1, "the releases notified: {received:?}");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// Once a backend of the namespace has waited, its listening connection
/// is registered and a release notifies, before the sentinel sent after
/// it; a release in another namespace of the same schema still does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_notifies_once_a_backend_of_the_namespace_listens() {
    let url = postgres::url();
    let schema = fresh_name("loud");
    let store = PostgresConfig::from_url(&url).expect("url").schema(schema.clone()).connect().await.expect("store");
    let backend = Arc::new(store.backend("loud").expect("namespace"));
    let other = store.backend("other").expect("namespace");
    let client = inspector(&url).await;
    let mut raw = RawListener::new(&url, &schema).await;
    let long = Duration::from_secs(60);
    let holder = backend.try_grant(&request("a", "holder", long)).await.expect("grant").granted().expect("free");
    let waiter = waiter(&backend, "a/b");
    wait_until_listening(&backend).await;
    let rows = client.query(&format!("SELECT namespace FROM \"{schema}\".listeners"), &[]).await.expect("listeners");
    let rows: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(rows, ["loud"], "one row, the listening connection's");

    backend.release(&holder).await.expect("release");
    let received = raw.until_sentinel(&client).await;
    assert_eq!(received.first().map(String::as_str), Some("loud"), "{received:?}");
    let (grant, _) = waiter.await.expect("task").expect("granted");
    backend.release(&grant).await.expect("release");

    let grant = other.try_grant(&request("a", "me", long)).await.expect("grant").granted().expect("free");
    other.release(&grant).await.expect("release");
    let received = raw.until_sentinel(&client).await;
    assert!(!received.contains(&"other".to_owned()), "a release nobody listens for notified: {received:?}");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// Grants look rows up by the primary key, however the statistics of the
/// table look: with many locks held for long, analyzed, a grant and release
/// on one connection never read the index on `expires_at` (only the sweep
/// does, every 128th token). Version 1 planned its subtree cleanup for each
/// call and read that index twice per grant, from its lowest entry, through
/// every released row not yet vacuumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_read_only_the_primary_key_whatever_the_statistics() {
    const PAIRS: i64 = 300;
    let url = postgres::url();
    let schema = fresh_name("plans");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone()).pool_size(1);
    let backend = config.connect().await.expect("connect").backend("plans").expect("namespace");
    let client = inspector(&url).await;
    client
        .batch_execute(&format!(
            "INSERT INTO \"{schema}\".locks \
             SELECT 'plans', 'background/g' || (i / 1000) || '/n' || i || '/', 'holder', nextval('\"{schema}\".tokens'), \
                    clock_timestamp() + interval '1 hour', false \
             FROM generate_series(1, 10000) i; \
             ANALYZE \"{schema}\".locks;"
        ))
        .await
        .expect("locks held");
    let sql = "SELECT idx_scan FROM pg_stat_user_indexes WHERE schemaname = $1 AND indexrelname = 'locks_expires_at'";
    let scans = || async { client.query_one(sql, &[&schema]).await.expect("index statistics").get::<_, i64>(0) };
    let before = scans().await;
    let request = request("bench/r1/c0", "me", Duration::from_secs(30));
    for _ in 0..PAIRS {
        let grant = backend.try_grant(&request).await.expect("grant").granted().expect("free");
        backend.release(&grant).await.expect("release");
    }
    // A session reports all its statistics when it ends.
    drop(backend);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = scans().await - before;
    assert!(read <= PAIRS / 128 + 2, "{read} scans of the index on expires_at in {PAIRS} grants");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// Once concurrent calls have opened every pooled connection, calls one
/// at a time keep going to the one used last, not to each in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_one_at_a_time_reuse_one_connection() {
    let url = postgres::url();
    let schema = fresh_name("reuse");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone()).pool_size(8);
    let backend = config.connect().await.expect("connect").backend("reuse").expect("namespace");
    let long = Duration::from_secs(60);
    let opened = join_all((0..32).map(|i| {
        let backend = backend.clone();
        async move { backend.try_grant(&request(&format!("many/n{i}"), "me", long)).await.expect("grant") }
    }))
    .await;
    let client = inspector(&url).await;
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND query_start > $2::text::timestamptz";
    let pattern = format!("%\"{schema}\".%");
    let count = |since: String| {
        let (client, pattern) = (&client, &pattern);
        async move { client.query_one(sessions, &[pattern, &since]).await.expect("activity").get::<_, i64>(0) }
    };
    let since: String = client.query_one("SELECT clock_timestamp()::text", &[]).await.expect("clock").get(0);
    assert!(count(String::from("-infinity")).await > 1, "the concurrent calls opened several connections");
    for _ in 0..50 {
        let grant = backend.try_grant(&request("one/x", "me", long)).await.expect("grant").granted().expect("free");
        backend.release(&grant).await.expect("release");
    }
    assert_eq!(count(since).await, 1, "calls one at a time went to several connections");
    for grant in opened {
        backend.release(&grant.granted().expect("free")).await.expect("release");
    }
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_share_one_listening_connection() {
    let url = postgres::url();
    let schema = fresh_name("listen");
    let config = PostgresConfig::from_url(&url).expect("url").schema(schema.clone());
    let backend = Arc::new(config.connect().await.expect("connect").backend("listen").expect("namespace"));
    let holder = backend.try_grant(&request("A", "holder", Duration::from_secs(60))).await.expect("grant");
    let holder = holder.granted().expect("free");
    let waiters: Vec<_> = (0..10)
        .map(|i| {
            let lock = TreeLock::builder(backend.clone() as Arc<dyn LockBackend>, &format!("A/w{i}"))
                .wait(Wait::For(Duration::from_secs(60)))
                .build()
                .expect("lock");
            tokio::spawn(async move { lock.acquire().await.map(|_| Instant::now()) })
        })
        .collect();
    let client = inspector(&url).await;
    let listening = format!("LISTEN \"{schema}_changes\"");
    let connections = || async {
        let row = client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query = $1", &[&listening])
            .await
            .expect("activity");
        row.get::<_, i64>(0)
    };
    let started = Instant::now();
    while !backend.is_listening() {
        assert!(started.elapsed() < Duration::from_secs(10), "the listening connection never came up");
        tokio::task::yield_now().await;
    }
    assert_eq!(connections().await, 1, "one LISTEN connection for ten waiters");
    let released_at = Instant::now();
    backend.release(&holder).await.expect("release");
    for waiter in waiters {
        let granted_at = waiter.await.expect("task").expect("granted");
        assert!(granted_at - released_at < Duration::from_secs(2));
    }
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

#[tokio::test]
async fn bad_schema_names_are_rejected_before_connecting() {
    // Nothing listens on port 1: a connection attempt would be a store error.
    let unreachable = "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=1";
    for (schema, rule) in [
        ("", "at least one character"),
        ("Locks", "lowercase"),
        ("locks; DROP TABLE x", "lowercase"),
        ("\"quoted\"", "lowercase"),
        ("pg_locks", "reserved"),
        ("9lives", "digit"),
    ] {
        let config = PostgresConfig::from_url(unreachable).expect("url").schema(schema);
        match config.connect().await {
            Err(error @ Error::InvalidConfig { .. }) => {
                let message = error.to_string();
                assert!(message.contains("schema name") && message.contains(rule), "{schema:?}: {message}");
            }
            other => panic!("{schema:?} should be refused before connecting, got {other:?}"),
        }
    }
    let too_long = "x".repeat(mutextree_postgres::SchemaName::MAX_BYTES + 1);
    let refused = PostgresConfig::from_url(unreachable).expect("url").schema(too_long).connect().await;
    assert!(matches!(refused, Err(Error::InvalidConfig { .. })), "{refused:?}");
    let refused = PostgresConfig::from_url(&format!("{unreachable}&namespace=a%20b"));
    assert!(matches!(refused, Err(Error::InvalidNamespace { .. })), "{refused:?}");
    // And a good name against the unreachable server is a retryable store error.
    let down = PostgresConfig::from_url(unreachable).expect("url").connect().await;
    assert!(matches!(down, Err(Error::Store { retryable: true, .. })), "{down:?}");
}

/// The server's own words reach the error's text; durations in the URL
/// read like `--ttl`.
#[tokio::test]
async fn connection_errors_say_what_the_server_said() {
    let url = postgres::url();
    let port =
        mutextree_core::backend::url::StoreUrl::parse("postgres", &url).expect("url").hosts()[0].port.expect("port");
    for (url, says) in [
        (format!("postgres://nobody@127.0.0.1:{port}/postgres"), "role \"nobody\" does not exist"),
        (format!("postgres://postgres@127.0.0.1:{port}/x"), "database \"x\" does not exist"),
    ] {
        let error = PostgresConfig::from_url(&url).expect("url").connect().await.expect_err(&url);
        let message = error.to_string();
        assert!(message.contains(says), "{url}: {message}");
        assert!(message.contains(&format!("could not connect to postgres at 127.0.0.1:{port}")), "{message}");
        assert!(!error.is_retryable(), "{url}: {error:?}");
    }
    for (connect, request) in [("1m", "1500ms"), ("2s", "2"), ("1500ms", "1m")] {
        let url = format!("{url}?connect_timeout={connect}&request_timeout={request}");
        let store = PostgresConfig::from_url(&url).expect("url").connect().await.expect("connect");
        store.backend("durations").expect("namespace").list(None).await.expect("answered");
    }
}

/// A schema made by versions 1 to 4 exactly as released, holding locks
/// granted by version 4's functions, is migrated by the next client: the
/// locks are kept, listed as Exclusive, and keep Shared requests out;
/// a client of version 4 still running can release, but its grants are
/// refused with the version they need; and the step to version 7 can run
/// again without changing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_4_schema_with_locks_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("four");
    let client = inspector(&url).await;
    install_released(&client, &schema, 4).await;
    let old_grant_sql = format!("SELECT * FROM \"{schema}\".try_grant('app', $1, $2, $3, 'old', 60000, true, false)");
    let old_grant = |key: &'static str, ancestors: Vec<&'static str>, end: &'static str| {
        let (client, sql) = (&client, &old_grant_sql);
        async move {
            let row = client.query_one(sql, &[&key, &ancestors, &end]).await.expect("version 4's grant");
            (row.get::<_, bool>(0), row.get::<_, Option<i64>>(1))
        }
    };
    let (granted, parent) = old_grant("a/", vec![], "a0").await;
    assert!(granted);
    let (granted, child) = old_grant("b/c/", vec!["b/"], "b/c0").await;
    assert!(granted);

    let (backend, held) = migrated(&url, &schema, &client).await;
    let (parent, child) = (parent.expect("token") as u64, child.expect("token") as u64);
    assert_eq!(held, [("a".to_owned(), Mode::Exclusive, parent), ("b/c".to_owned(), Mode::Exclusive, child)]);
    let shared = |path: &str, owner: &str| {
        let items = LockItems::one(LockPath::parse(path).expect("path"), Mode::Shared);
        LockRequest::of(items, Owner::new(owner).expect("owner"), Ttl::new(Duration::from_secs(60)).expect("ttl"))
    };
    let refused = backend.try_grant(&shared("a/x", "new")).await.expect("attempt");
    assert!(matches!(refused, Attempt::Blocked(ref held) if held.first().token == parent), "{refused:?}");
    let reader = backend.try_grant(&shared("b", "new")).await.expect("attempt");
    assert!(matches!(reader, Attempt::Blocked(ref held) if held.first().token == child), "{reader:?}");

    // A client of version 4 still running: its release works; its grant,
    // which knows nothing of Shared holders, is refused with the version
    // it needs.
    let released_old =
        client.query_one(&format!("SELECT \"{schema}\".release('app', 'a/', 'old', $1)"), &[&(parent as i64)]).await;
    assert!(released_old.expect("version 4's release").get::<_, bool>(0));
    let reader = backend.try_grant(&shared("a/x", "new")).await.expect("attempt").granted().expect("free");
    let refused = client.query_one(&old_grant_sql, &[&"c/", &Vec::<&str>::new(), &"c0"]).await;
    let message = refused.expect_err("version 4's grant").as_db_error().expect("from the server").message().to_owned();
    assert!(message.contains("need a client of schema version 7"), "{message}");

    // The step to version 7 again changes nothing.
    client.batch_execute(&released(RELEASED[6], &schema)).await.expect("again");
    let held_again = backend.list(None).await.expect("list");
    assert_eq!(held_again.iter().map(|lock| lock.token).collect::<Vec<_>>(), [reader.token, child]);
    backend.release(&reader).await.expect("release");
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}

/// A version 7 schema with a live lock is migrated to version 8: the lock
/// is kept, the CHECK constraint on the mode is gone, a version 7 client
/// still connected grants and releases as before (the arguments and
/// results are unchanged), and the step to version 8 can run again.
#[tokio::test]
async fn a_version_7_schema_with_a_lock_is_migrated() {
    let url = postgres::url();
    let schema = fresh_name("seven");
    let client = inspector(&url).await;
    install_released(&client, &schema, 7).await;
    let old_grant_sql = format!(
        "SELECT outcome, token FROM \"{schema}\".try_grant_exclusive('app', 'old', 60000, $1, $2, $3, 'try', 0, 5000)"
    );
    let old_grant = |key: &'static str, end: &'static str, ancestors: Vec<&'static str>| {
        let (client, sql) = (&client, &old_grant_sql);
        async move {
            let row = client.query_one(sql, &[&key, &end, &ancestors]).await.expect("version 7's grant");
            (row.get::<_, String>(0), row.get::<_, Option<i64>>(1))
        }
    };
    let (outcome, held_before) = old_grant("a/b/", "a/b0", vec!["a/"]).await;
    assert_eq!(outcome, "granted");
    let held_before = held_before.expect("token") as u64;

    let (backend, held) = migrated(&url, &schema, &client).await;
    assert_eq!(held, [("a/b".to_owned(), Mode::Exclusive, held_before)]);
    let constraints = client
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'locks_mode' AND connamespace = $1::text::regnamespace",
            &[&format!("\"{schema}\"")],
        )
        .await
        .expect("constraints");
    assert_eq!(constraints.get::<_, i64>(0), 0, "the CHECK constraint on the mode is gone");

    // The version 7 client still connected: its grant is refused by the
    // lock it holds, and granted elsewhere; its release works.
    assert_eq!(old_grant("a/", "a0", vec![]).await.0, "blocked");
    let (outcome, other) = old_grant("c/", "c0", vec![]).await;
    assert_eq!(outcome, "granted");
    let release_sql = format!("SELECT \"{schema}\".release_items('app', $1, 'old', $2)");
    let released_old = client.query_one(&release_sql, &[&vec!["c/"], &other.expect("token")]).await;
    assert!(released_old.expect("release").get::<_, bool>(0));
    let again = client.query_one(&release_sql, &[&vec!["c/"], &other.expect("token")]).await;
    assert!(!again.expect("release").get::<_, bool>(0), "a grant is released once");

    // The step to version 8 again changes nothing.
    client.batch_execute(&released(RELEASED[7], &schema)).await.expect("again");
    let held_again = backend.list(None).await.expect("list");
    assert_eq!(held_again.iter().map(|lock| lock.token).collect::<Vec<_>>(), [held_before]);
    client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("drop");
}
