//! What is particular to Redis: the script cache, the index of held locks,
//! many locks held, a restart, and the cluster's hash slots.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{raw, script, Redis};
use conformance::harness::{temp_dir, RunningServer};
use conformance::oracle::Oracle;
use conformance::servers;
use futures::{stream, StreamExt};
use mutextree_core::backend::{Attempt, LockRequest};
use mutextree_core::{Error, LockBackend, LockPath, Owner, TreeLock, Ttl, Wait};
use mutextree_redis::{RedisBackend, RedisConfig};
use tokio::sync::Notify;

fn namespace() -> String {
    format!("test-{:016x}", fastrand::u64(..))
}

fn request(path: &str, ttl: Duration) -> LockRequest {
    LockRequest::new(LockPath::parse(path).expect("path"), Owner::random(), Ttl::new(ttl).expect("ttl"))
}

async fn grant(backend: &RedisBackend, path: &str, ttl: Duration) -> Attempt {
    backend.try_grant(&request(path, ttl)).await.expect("the store answers")
}

/// The scripts calls the server ran since the last `CONFIG RESETSTAT`, by
/// command (`fcall`, `evalsha`, `eval`).
async fn script_calls(raw: &mut redis::aio::MultiplexedConnection) -> [u64; 3] {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await.expect("info");
    ["fcall", "evalsha", "eval"].map(|command| {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .map_or(0, |rest| rest.split(',').next().and_then(|n| n.parse::<u64>().ok()).expect("calls"))
    })
}

/// Grants, checks and releases across `flush`es of what the server keeps
/// of the scripts: each call after a flush must load or send its script
/// again and still see the namespace as it is.
async fn grants_across_flushes(backend: &RedisBackend, raw: &mut redis::aio::MultiplexedConnection, flush: &[&str]) {
    let flush_all = || {
        let mut raw = raw.clone();
        let command = redis::cmd(flush[0]).arg(&flush[1..]).clone();
        async move {
            let _: () = command.query_async(&mut raw).await.expect("flush");
        }
    };
    for round in 0..3 {
        let held = grant(backend, "A/B", Duration::from_secs(30)).await.granted().expect("free");
        flush_all().await;
        assert!(
            matches!(grant(backend, "A", Duration::from_secs(30)).await, Attempt::Blocked(ref b) if b.first().path == *held.path()),
            "round {round}: the grant script, sent again, still sees A/B"
        );
        flush_all().await;
        backend.release(&held).await.expect("the release script is sent again too");
        flush_all().await;
        assert!(backend.list(None).await.expect("list").is_empty());
    }
}

/// Redis 7 has functions: the scripts are one library, loaded once and
/// loaded again after `FUNCTION FLUSH`; no call is sent by `EVAL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_functions_are_loaded_again() {
    // A server of its own: command counts are server-wide.
    let data = temp_dir("redis-functions").expect("temp dir");
    let server = servers::redis::own_server(None, &[], &data).expect("redis-server");
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let backend = RedisConfig::from_url(&url).expect("url").connect().await.expect("connect").backend("f").expect("ns");
    let mut raw = raw(&url).await;
    grants_across_flushes(&backend, &mut raw, &["FUNCTION", "FLUSH"]).await;
    let [fcall, evalsha, eval] = script_calls(&mut raw).await;
    assert!(fcall >= 12, "every call is a function call: {fcall}");
    assert_eq!((evalsha, eval), (0, 0), "nothing by EVAL while the server has functions");
    drop(server);
}

/// A user whose ACL forbids functions (as a server before Redis 7 has
/// none) gets every script by `EVALSHA`, and by `EVAL` after `SCRIPT
/// FLUSH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_functions_flushed_scripts_are_sent_again() {
    let data = temp_dir("redis-scripts").expect("temp dir");
    let server = servers::redis::own_server(None, &[], &data).expect("redis-server");
    let mut raw = raw(&format!("redis://127.0.0.1:{}/", server.port)).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "scripts", "on", ">secret", "~*", "&*", "+@all", "-fcall", "-function"])
        .query_async(&mut raw)
        .await
        .expect("acl");
    let url = format!("redis://scripts:secret@127.0.0.1:{}/", server.port);
    let backend = RedisConfig::from_url(&url).expect("url").connect().await.expect("connect").backend("s").expect("ns");
    grants_across_flushes(&backend, &mut raw, &["SCRIPT", "FLUSH"]).await;
    let [_, evalsha, eval] = script_calls(&mut raw).await;
    assert!(evalsha > 0 && eval >= 9, "by hash, and by source after each flush: {evalsha}, {eval}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_entries_of_expired_locks_never_block_and_are_removed() {
    let store = Redis::standalone();
    let backend = store.backend(&namespace()).await.expect("connect");
    let [locks, index, expiry, ..] = <[String; 8]>::try_from(backend.keys().to_vec()).expect("eight keys");
    let mut raw = raw(store.url()).await;
    // All at once, so that none expires before the last is granted (each
    // grant sweeps expired locks).
    let short = Duration::from_secs(2);
    let paths = (0..40).map(|leaf| format!("A/B/leaf-{leaf}")).chain(["X".to_owned()]);
    let granted = futures::future::join_all(paths.map(|path| {
        let backend = backend.clone();
        async move { grant(&backend, &path, short).await.granted() }
    }))
    .await;
    assert!(granted.iter().all(Option::is_some));
    // Nothing removes them before someone looks: they are past their
    // deadline, still in the index.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    let indexed: usize = redis::cmd("ZCARD").arg(&index).query_async(&mut raw).await.expect("zcard");
    assert_eq!(indexed, 41);

    // The subtree check meets the expired descendants, ignores and removes them.
    let root = grant(&backend, "A", Duration::from_secs(30)).await.granted().expect("expired locks do not block");
    let under_a: Vec<String> =
        redis::cmd("ZRANGEBYLEX").arg(&index).arg("[A/").arg("(A0").query_async(&mut raw).await.expect("range");
    assert_eq!(under_a, ["A/"], "only the new lock is left under A");
    // The bounded sweep (every 16th grant) removes the other expired lock,
    // X, within the next 16 grants.
    let mut others = Vec::new();
    for n in 0..16 {
        others.push(grant(&backend, &format!("Y{n}"), Duration::from_secs(30)).await.granted().expect("free"));
    }
    let mut live = vec!["A/".to_owned()];
    live.extend((0..16).map(|n| format!("Y{n}/")));
    live.sort();
    for key in [&locks, &expiry, &index] {
        let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut raw).await.expect("type");
        let mut members: Vec<String> = if kind == "hash" {
            redis::cmd("HKEYS").arg(key).query_async(&mut raw).await.expect("hkeys")
        } else {
            redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).query_async(&mut raw).await.expect("zrange")
        };
        members.sort();
        assert_eq!(members, live, "{key} holds only the live locks");
    }
    backend.release(&root).await.expect("release");
    for other in others {
        backend.release(&other).await.expect("release");
    }
}

/// The outcomes of a fixed sequence of grants and releases on one
/// namespace, as text.
async fn scripted_outcomes(backend: &RedisBackend) -> Vec<String> {
    let ttl = Duration::from_secs(60);
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for path in ["work/a", "work/a/b", "work", "work/c/d", "work/c", "work/e", "bg", "bg/g0/new", "bg/g0/n0"] {
        match grant(backend, path, ttl).await {
            Attempt::Granted(grant) => {
                outcomes.push(format!("{path}: granted"));
                held.push(grant);
            }
            Attempt::Blocked(blocker) | Attempt::Queued { blockers: blocker, .. } => {
                outcomes.push(format!("{path}: blocked by {}", blocker.first().path))
            }
        }
    }
    for grant in held {
        backend.release(&grant).await.expect("release");
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_held_locks_change_no_outcome() {
    const HELD: usize = 100_000;
    let store = Redis::standalone();
    let quiet = store.backend(&namespace()).await.expect("connect");
    // The same background in both namespaces but one: bg/g0/n0 alone, and
    // then 100k of them.
    grant(&quiet, "bg/g0/n0", Duration::from_secs(600)).await.granted().expect("free");
    let expected = scripted_outcomes(&quiet).await;

    let busy = store.backend(&namespace()).await.expect("connect");
    let granted = stream::iter(0..HELD)
        .map(|n| {
            let busy = busy.clone();
            async move { grant(&busy, &format!("bg/g{}/n{}", n / 1000, n % 1000), Duration::from_secs(600)).await }
        })
        .buffer_unordered(256)
        .filter(|attempt| std::future::ready(matches!(attempt, Attempt::Granted(_))))
        .count()
        .await;
    assert_eq!(granted, HELD);
    assert_eq!(scripted_outcomes(&busy).await, expected);
    assert_eq!(busy.list(Some(&LockPath::parse("bg/g99").expect("path"))).await.expect("list").len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_keys_share_one_cluster_slot() {
    let store = Redis::cluster();
    let mut slots = Vec::new();
    for namespace in ["a", "b", "app:locks-1.2_b", "x.y"] {
        let backend = store.backend(namespace).await.expect("connect");
        let url = format!(
            "redis://{}/",
            store.url().trim_start_matches("redis+cluster://").split(',').next().expect("a node")
        );
        let mut raw = raw(&url).await;
        let mut of_namespace = Vec::new();
        for key in backend.keys() {
            let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut raw).await.expect("slot");
            of_namespace.push(slot);
        }
        assert!(of_namespace.iter().all(|slot| *slot == of_namespace[0]), "{namespace}: {of_namespace:?}");
        slots.push(of_namespace[0]);
        // And the scripts run there: no CROSSSLOT.
        let held = grant(&backend, "A/B", Duration::from_secs(5)).await.granted().expect("free");
        backend.release(&held).await.expect("release");
    }
    assert!(slots.windows(2).any(|pair| pair[0] != pair[1]), "namespaces spread over slots: {slots:?}");
    for bad in ["", "{", "}", "a}b", "{x}"] {
        let connected = RedisConfig::from_url(store.url()).expect("url").connect().await.expect("connect");
        let error = connected.backend(bad).expect_err(bad);
        assert!(matches!(error, Error::InvalidNamespace { .. }), "{bad:?}: {error}");
        assert!(error.to_string().contains("namespace"), "{error}");
    }
}

/// Outcomes of the workers of the restart test.
#[derive(Default)]
struct Tally {
    granted: AtomicU64,
    errors: AtomicU64,
    changed: Notify,
}

impl Tally {
    async fn wait_until(&self, condition: impl Fn(&Tally) -> bool) {
        loop {
            let changed = self.changed.notified();
            if condition(self) {
                return;
            }
            changed.await;
        }
    }
}

fn persistent_server(port: Option<u16>, data: &Path) -> RunningServer {
    servers::redis::own_server(port, &["--appendonly", "yes", "--appendfsync", "always"], data).expect("redis-server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_gives_errors_then_recovery_and_never_two_holders() {
    tokio::time::timeout(Duration::from_secs(120), restart_run()).await.expect("recovered within two minutes");
}

async fn restart_run() {
    let data = temp_dir("redis-data").expect("temp dir");
    let server = persistent_server(None, &data);
    let port = server.port;
    let url = format!("redis://127.0.0.1:{port}/?request_timeout=500ms&connect_timeout=500ms");
    let namespace = namespace();
    let connect = || async { RedisConfig::from_url(&url)?.connect().await?.backend(&namespace) };
    let keeper: Arc<dyn LockBackend> = Arc::new(connect().await.expect("connect"));
    let kept = TreeLock::builder(keeper.clone(), "site/rack-1").ttl(Duration::from_secs(60)).build().expect("lock");
    kept.try_acquire().await.expect("free");

    let oracle = Arc::new(Oracle::new());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let paths: Vec<LockPath> = ["site", "site/rack-2", "site/rack-2/host-1", "site/rack-2/host-2", "site/rack-3"]
        .iter()
        .map(|p| LockPath::parse(p).expect("path"))
        .collect();
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (oracle, tally, stop, paths) = (oracle.clone(), tally.clone(), stop.clone(), paths.clone());
        let backend: Arc<dyn LockBackend> = Arc::new(connect().await.expect("connect"));
        workers.push(tokio::spawn(async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                let path = &paths[fastrand::usize(..paths.len())];
                let lock = TreeLock::builder(backend.clone(), path).ttl(Duration::from_secs(5)).build().expect("lock");
                let attempt = tokio::select! {
                    () = &mut stopped => return,
                    attempt = lock.try_acquire() => attempt,
                };
                match attempt {
                    Ok(grant) => {
                        oracle.enter(&grant);
                        tokio::task::yield_now().await;
                        oracle.exit(&grant);
                        // A release lost in the outage leaves the lock to its ttl.
                        let _ = lock.release().await;
                        tally.granted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(Error::Refused { .. }) => tokio::task::yield_now().await,
                    Err(Error::Store { retryable: true, .. }) => {
                        tally.errors.fetch_add(1, Ordering::SeqCst);
                        // A pause between attempts while the server is down, not a spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
                tally.changed.notify_waiters();
            }
        }));
    }

    tally.wait_until(|t| t.granted.load(Ordering::SeqCst) >= 200).await;
    server.stop();
    tally.wait_until(|t| t.errors.load(Ordering::SeqCst) >= 6).await;
    let server = persistent_server(Some(port), &data);
    let granted_before = tally.granted.load(Ordering::SeqCst);
    tally.wait_until(|t| t.granted.load(Ordering::SeqCst) >= granted_before + 200).await;
    stop.notify_waiters();
    for worker in workers {
        worker.await.expect("worker");
    }
    oracle.assert_clean();

    // The lock granted before the restart is still there (appendfsync
    // always), still refuses overlapping paths, and is released by its holder.
    let other = connect().await.expect("connect");
    assert!(
        matches!(grant(&other, "site", Duration::from_secs(1)).await, Attempt::Blocked(b) if b.first().path == *kept.path())
    );
    kept.release().await.expect("the holder releases after the restart");
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_twice_get_the_first_answer() {
    let store = Redis::standalone();
    let backend = store.backend(&namespace()).await.expect("connect");
    let keys = backend.keys().to_vec();
    let mut raw = raw(store.url()).await;
    let grant_script = script(include_str!("../src/lua/grant_one.lua"));
    let release_script = script(include_str!("../src/lua/release.lua"));
    let call_grant = |nonce: &'static str| {
        let mut call = grant_script.prepare_invoke();
        call.key(&keys).arg("tree").arg(30_000).arg(0).arg(nonce).arg("me").arg("try").arg("A/").arg("exclusive");
        call
    };
    let first: Vec<redis::Value> = call_grant("g1").invoke_async(&mut raw).await.expect("grant");
    let again: Vec<redis::Value> = call_grant("g1").invoke_async(&mut raw).await.expect("grant");
    assert_eq!(first[..2], again[..2], "the same request gets the same grant (token)");
    let other: Vec<redis::Value> = call_grant("g2").invoke_async(&mut raw).await.expect("grant");
    assert_eq!(other[0], redis::Value::Int(0), "another request is refused");

    let token = match &first[1] {
        redis::Value::Int(token) => *token,
        other => panic!("token: {other:?}"),
    };
    let call_release = |nonce: &'static str| {
        let mut call = release_script.prepare_invoke();
        call.key(&keys).arg("channel").arg(nonce).arg("me").arg(token).arg("A/").arg("exclusive");
        call
    };
    let released: i64 = call_release("r1").invoke_async(&mut raw).await.expect("release");
    let again: i64 = call_release("r1").invoke_async(&mut raw).await.expect("release");
    let other: i64 = call_release("r2").invoke_async(&mut raw).await.expect("release");
    assert_eq!((released, again, other), (1, 1, 0), "the same release is answered twice, another one is not");
    assert!(backend.list(None).await.expect("list").is_empty(), "a released lock is not listed");
    grant(&backend, "A/B", Duration::from_secs(5)).await.granted().expect("a released lock blocks nothing");

    // Through the backend, a second release is a second request.
    let held = grant(&backend, "C", Duration::from_secs(5)).await.granted().expect("free");
    backend.release(&held).await.expect("release");
    assert!(matches!(backend.release(&held).await, Err(Error::NotHeld { .. })));
}

/// How many connections are subscribed to `channel`.
async fn subscribers(mut raw: redis::aio::MultiplexedConnection, channel: String) -> u64 {
    let command = redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).clone();
    let (_, count): (String, u64) = command.query_async(&mut raw).await.expect("pubsub numsub");
    count
}

/// How many `PUBLISH` calls the server ran, scripts' included.
async fn publishes(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await.expect("info");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_publish:calls="))
        .map_or(0, |rest| rest.split(',').next().and_then(|n| n.parse::<u64>().ok()).expect("calls"))
}

/// A holder that listens for revocations subscribes to the revocation
/// channel alone: ordinary releases still publish nothing, and only the
/// revocation is published (once), which the holder hears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holders_subscription_makes_only_revocations_publish() {
    let data = temp_dir("redis-data").expect("temp dir");
    let server = servers::redis::own_server(None, &[], &data).expect("redis-server");
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let backend =
        RedisConfig::from_url(&url).expect("url").connect().await.expect("connect").backend("mt").expect("ns");
    let mut raw = raw(&url).await;
    let channel = |suffix: &str| backend.keys()[0].replace(":locks", suffix);

    let store: Arc<dyn LockBackend> = Arc::new(backend.clone());
    let holder = TreeLock::builder(store, "A").ttl(Duration::from_secs(300)).auto_refresh(true).build().expect("lock");
    let held = holder.try_acquire().await.expect("free");
    let lost = holder.lost();
    backend.listen_revocation(&held).ready().await;
    assert_eq!(subscribers(raw.clone(), channel(":revoked")).await, 1, "the holder's process is subscribed");
    assert_eq!(subscribers(raw.clone(), channel(":released")).await, 0, "waiters' channel untouched");
    let other = grant(&backend, "B", Duration::from_secs(60)).await.granted().expect("free");
    backend.release(&other).await.expect("release");
    assert_eq!(publishes(&mut raw).await, 0, "an ordinary release publishes nothing while a holder listens");

    backend.revoke(&held).await.expect("revoke");
    let error = tokio::time::timeout(Duration::from_secs(10), lost).await.expect("heard at once");
    assert!(error.to_string().contains("forcibly released"), "{error}");
    assert_eq!(publishes(&mut raw).await, 1, "the revocation, once");
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_is_up_while_waiters_wait_and_only_then() {
    let data = temp_dir("redis-data").expect("temp dir");
    let server = servers::redis::own_server(None, &[], &data).expect("redis-server");
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let backend = RedisConfig::from_url(&url)
        .expect("url")
        .connect()
        .await
        .expect("connect")
        .backend("mutextree")
        .expect("namespace");
    let channel = backend.keys()[0].replace(":locks", ":released");
    let mut raw = raw(&url).await;
    let subscribers = |raw: &mut redis::aio::MultiplexedConnection| subscribers(raw.clone(), channel.clone());
    // The server's state has no event to wait for: look until it shows.
    let until_subscribers = |raw: &mut redis::aio::MultiplexedConnection, wanted: u64| {
        let mut raw = raw.clone();
        async move {
            let started = std::time::Instant::now();
            while subscribers(&mut raw).await != wanted {
                assert!(started.elapsed() < Duration::from_secs(20), "{wanted} subscriber(s) expected by now");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let connections = |info: String| {
        info.lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("total_connections_received")
    };

    let held = grant(&backend, "A", Duration::from_secs(60)).await.granted().expect("free");
    backend.release(&held).await.expect("release");
    assert_eq!(subscribers(&mut raw).await, 0, "grants and releases alone subscribe nothing");
    assert_eq!(publishes(&mut raw).await, 0, "a release nobody listens for publishes nothing");

    let held = grant(&backend, "A", Duration::from_secs(60)).await.granted().expect("free");
    let waiter = tokio::spawn({
        let backend = backend.clone();
        async move {
            let request = request("A/B", Duration::from_secs(5));
            let backend: Arc<dyn LockBackend> = Arc::new(backend);
            mutextree_core::backend::acquire(&backend, &request, Wait::For(Duration::from_secs(60))).await
        }
    });
    until_subscribers(&mut raw, 1).await;
    let before = connections(redis::cmd("INFO").arg("stats").query_async(&mut raw).await.expect("info"));
    // Past the subscription's 5 s ping: there is no event for "nothing
    // happened", only time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = connections(redis::cmd("INFO").arg("stats").query_async(&mut raw).await.expect("info"));
    assert_eq!(before, after, "nothing reconnected while the waiter waited");
    assert_eq!(subscribers(&mut raw).await, 1, "still subscribed while the waiter waits");
    assert!(format!("{backend:?}").contains("notified: true"), "{backend:?}");
    assert!(!waiter.is_finished());

    let record: u64 =
        redis::cmd("HGET").arg(&backend.keys()[0]).arg("listened").query_async(&mut raw).await.expect("hget");
    assert!(record > 0, "the subscribed backend said it listens");
    backend.release(&held).await.expect("release");
    let granted = waiter.await.expect("the waiter ran").expect("granted once released");
    assert_eq!(publishes(&mut raw).await, 1, "the release a backend listened for was published");
    backend.release(&granted).await.expect("release");
    until_subscribers(&mut raw, 0).await;
    assert!(format!("{backend:?}").contains("notified: false"), "{backend:?}");
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// Durations in a URL read like `--ttl`: `1m`, `1500ms`, `2s`.
#[tokio::test]
async fn a_url_with_every_duration_grammar_connects() {
    let url = servers::redis::url();
    let separator = if url.contains('?') { '&' } else { '?' };
    for (connect, request) in [("1m", "1500ms"), ("2s", "2"), ("1500ms", "1m")] {
        let url = format!("{url}{separator}connect_timeout={connect}&request_timeout={request}");
        let backend = RedisConfig::from_url(&url).expect("url").connect().await.expect("connect");
        let backend = backend.backend(&namespace()).expect("namespace");
        backend.list(None).await.expect("answered");
    }
}
