//! Shared and Exclusive items, multi-path grants and mode changes on the
//! Redis store, on a standalone server and on the cluster: what each
//! script decides, what the namespace's keys hold after it, and that each
//! is one script call.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{announced, answer, command_calls, heard, raw, raw_members, script, Redis};
use futures::StreamExt;
use mutextree_core::backend::{Attempt, LockKind, LockRequest};
use mutextree_core::{Error, Grant, LockBackend, LockItem, LockItems, LockPath, Mode, Owner, Ttl};
use mutextree_redis::RedisBackend;

const LONG: Duration = Duration::from_secs(60);

fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("path")
}

fn items(items: &[(&str, Mode)]) -> LockItems {
    LockItems::new(items.iter().map(|(text, mode)| LockItem { path: path(text), mode: *mode })).expect("items")
}

fn request(of: &[(&str, Mode)], ttl: Duration) -> LockRequest {
    LockRequest::of(items(of), Owner::random(), Ttl::new(ttl).expect("ttl"))
}

async fn attempt(backend: &RedisBackend, of: &[(&str, Mode)]) -> Attempt {
    backend.try_grant(&request(of, LONG)).await.expect("the store answers")
}

async fn granted(backend: &RedisBackend, of: &[(&str, Mode)]) -> Grant {
    match attempt(backend, of).await {
        Attempt::Granted(grant) => grant,
        Attempt::Blocked(blockers) | Attempt::Queued { blockers, .. } => panic!("{of:?} refused: {blockers:?}"),
    }
}

/// The blockers of a refused attempt as `path mode`, in item order.
fn blockers(attempt: Attempt) -> Vec<String> {
    match attempt {
        Attempt::Granted(grant) => panic!("{} granted, expected a refusal", grant.items),
        Attempt::Blocked(blockers) | Attempt::Queued { blockers, .. } => {
            blockers.iter().map(|b| format!("{} {}", b.path, b.mode)).collect()
        }
    }
}

/// Every live item as `path mode token`, in key order.
async fn listed(backend: &RedisBackend) -> Vec<String> {
    let held = backend.list(None).await.expect("list");
    held.iter().map(|h| format!("{} {} {}", h.path, h.mode, h.token)).collect()
}

fn shown(grant: &Grant) -> Vec<String> {
    grant.items.iter().map(|item| format!("{} {} {}", item.path, item.mode, grant.token)).collect()
}

async fn backend(store: &Redis) -> RedisBackend {
    store.backend(&format!("modes-{:016x}", fastrand::u64(..))).await.expect("connect")
}

async fn shared_holders_coexist_on_one_path(store: Redis) {
    let backend = backend(&store).await;
    let first = granted(&backend, &[("A", Mode::Shared)]).await;
    let second = granted(&backend, &[("A", Mode::Shared)]).await;
    // The same owner's second Shared grant on the node is another grant too.
    let same_owner = LockRequest::of(items(&[("A", Mode::Shared)]), first.owner.clone(), Ttl::new(LONG).expect("ttl"));
    let third = backend.try_grant(&same_owner).await.expect("answered").granted().expect("Shared beside Shared");
    assert!(first.token < second.token && second.token < third.token);
    let mut expected = [shown(&first), shown(&second), shown(&third)].concat();
    expected.sort_by_key(|line| line.rsplit(' ').next().map(|t| t.parse::<u64>().expect("token")));
    assert_eq!(listed(&backend).await, expected, "one entry per holder, in token order");
    assert_eq!(blockers(attempt(&backend, &[("A", Mode::Exclusive)]).await), ["A shared"]);

    // Each release takes its own holder only; the last one frees the node.
    backend.release(&second).await.expect("release");
    assert_eq!(listed(&backend).await, [shown(&first), shown(&third)].concat());
    assert_eq!(blockers(attempt(&backend, &[("A/B", Mode::Exclusive)]).await), ["A shared"]);
    backend.release(&first).await.expect("release");
    backend.release(&third).await.expect("release");
    let writer = granted(&backend, &[("A/B", Mode::Exclusive)]).await;
    backend.release(&writer).await.expect("release");
}

async fn shared_covers_its_subtree_and_its_ancestors(store: Redis) {
    let backend = backend(&store).await;
    // Held Shared above, asked Exclusive below, on the node and above.
    let reader = granted(&backend, &[("A/B", Mode::Shared)]).await;
    for asked in ["A/B/C", "A/B", "A"] {
        assert_eq!(blockers(attempt(&backend, &[(asked, Mode::Exclusive)]).await), ["A/B shared"], "{asked}");
    }
    let below = granted(&backend, &[("A/B/C", Mode::Shared)]).await;
    let above = granted(&backend, &[("A", Mode::Shared)]).await;
    for grant in [reader, below, above] {
        backend.release(&grant).await.expect("release");
    }
    // Held Exclusive, asked Shared on the node, above and below.
    let writer = granted(&backend, &[("A/B", Mode::Exclusive)]).await;
    for asked in ["A/B/C", "A/B", "A"] {
        assert_eq!(blockers(attempt(&backend, &[(asked, Mode::Shared)]).await), ["A/B exclusive"], "{asked}");
    }
    backend.release(&writer).await.expect("release");
    assert!(listed(&backend).await.is_empty());
}

async fn siblings_never_conflict(store: Redis) {
    let backend = backend(&store).await;
    for held in [Mode::Shared, Mode::Exclusive] {
        for asked in [Mode::Shared, Mode::Exclusive] {
            let left = granted(&backend, &[("A/B", held)]).await;
            let right = granted(&backend, &[("A/C", asked)]).await;
            // Nor a sibling whose key starts with the other's name.
            let longer = granted(&backend, &[("A/BC", asked)]).await;
            for grant in [left, right, longer] {
                backend.release(&grant).await.expect("release");
            }
        }
    }
}

async fn a_multi_path_grant_is_all_or_nothing(store: Redis) {
    let backend = backend(&store).await;
    let writer = granted(&backend, &[("X/1", Mode::Exclusive)]).await;
    let reader = granted(&backend, &[("Y/z", Mode::Shared)]).await;
    let before = listed(&backend).await;
    let wanted = [("A", Mode::Exclusive), ("X/1/sub", Mode::Shared), ("Y", Mode::Exclusive), ("Z", Mode::Shared)];
    // Two of four items blocked: a blocker for each, in item order, and
    // nothing of the request held.
    assert_eq!(blockers(attempt(&backend, &wanted).await), ["X/1 exclusive", "Y/z shared"]);
    assert_eq!(listed(&backend).await, before, "nothing of a refused request is held");
    let free = granted(&backend, &[("Z", Mode::Exclusive)]).await;
    backend.release(&free).await.expect("the refused request's Shared item on Z is not held");

    backend.release(&writer).await.expect("release");
    assert_eq!(blockers(attempt(&backend, &wanted).await), ["Y/z shared"]);
    backend.release(&reader).await.expect("release");
    let grant = granted(&backend, &wanted).await;
    assert_eq!(listed(&backend).await, shown(&grant), "every item, one token");
    backend.release(&grant).await.expect("release");
    assert!(listed(&backend).await.is_empty());
}

async fn release_and_refresh_cover_every_item(store: Redis) {
    let backend = backend(&store).await;
    let request =
        request(&[("A", Mode::Shared), ("B/C", Mode::Exclusive), ("D", Mode::Shared)], Duration::from_secs(2));
    let grant = backend.try_grant(&request).await.expect("answered").granted().expect("free");
    let refreshed = backend.refresh(&grant, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
    let held = backend.list(None).await.expect("list");
    assert_eq!(held.len(), 3);
    assert!(held.iter().all(|h| h.remaining > Duration::from_secs(30) && h.token == grant.token), "{held:?}");
    backend.release(&refreshed).await.expect("release");
    assert!(listed(&backend).await.is_empty(), "every item released");
    for (what, result) in [
        ("release", backend.release(&refreshed).await),
        ("refresh", backend.refresh(&refreshed, Ttl::new(LONG).expect("ttl")).await.map(drop)),
    ] {
        assert!(matches!(result, Err(Error::NotHeld { .. })), "{what} after release: {result:?}");
    }
    // A grant one of whose items is someone else's is not this grant.
    let mine = granted(&backend, &[("E", Mode::Shared), ("F", Mode::Shared)]).await;
    let other = granted(&backend, &[("F", Mode::Shared)]).await;
    let forged = Grant { items: items(&[("E", Mode::Shared), ("F", Mode::Shared)]), ..other.clone() };
    assert!(matches!(backend.release(&forged).await, Err(Error::NotHeld { .. })));
    assert_eq!(listed(&backend).await.len(), 3, "a release that is refused changes nothing");
    for grant in [mine, other] {
        backend.release(&grant).await.expect("release");
    }
}

async fn an_upgrade_waits_for_no_one_and_takes_a_new_token(store: Redis) {
    let backend = backend(&store).await;
    let first = granted(&backend, &[("A", Mode::Shared), ("B", Mode::Shared)]).await;
    let second = granted(&backend, &[("A/x", Mode::Shared)]).await;
    match backend.change_mode(&first, Mode::Exclusive).await.expect("answered") {
        Attempt::Blocked(blockers) => {
            let blockers: Vec<String> = blockers.iter().map(|b| format!("{} {}", b.path, b.mode)).collect();
            assert_eq!(blockers, ["A/x shared"], "the other holder, not the grant's own item");
        }
        other => panic!("upgraded past another holder, or queued: {other:?}"),
    }
    let mut unchanged = [shown(&first), shown(&second)].concat();
    unchanged.sort();
    assert_eq!(listed(&backend).await, unchanged, "a refused upgrade changes nothing");

    backend.release(&second).await.expect("release");
    let upgraded = backend.change_mode(&first, Mode::Exclusive).await.expect("answered").granted().expect("alone now");
    assert!(upgraded.token > second.token, "a new token from the counter");
    assert_eq!((upgraded.expires_at, &upgraded.owner), (first.expires_at, &first.owner));
    assert_eq!(listed(&backend).await, shown(&upgraded));
    assert_eq!(blockers(attempt(&backend, &[("A/x", Mode::Shared)]).await), ["A exclusive"]);
    assert!(matches!(backend.release(&first).await, Err(Error::NotHeld { .. })), "the old token is gone");
    assert!(matches!(backend.change_mode(&first, Mode::Exclusive).await, Err(Error::NotHeld { .. })));
    backend.release(&upgraded).await.expect("release");
}

async fn two_upgraders_never_both_win(store: Redis) {
    let backend = backend(&store).await;
    for _ in 0..10 {
        let one = granted(&backend, &[("A", Mode::Shared)]).await;
        let two = granted(&backend, &[("A/B", Mode::Shared)]).await;
        let (a, b) =
            tokio::join!(backend.change_mode(&one, Mode::Exclusive), backend.change_mode(&two, Mode::Exclusive));
        let won: Vec<Grant> = [a, b].into_iter().filter_map(|result| result.expect("answered").granted()).collect();
        assert!(won.is_empty(), "each saw the other's Shared item: {won:?}");
        for grant in [one, two] {
            backend.release(&grant).await.expect("release");
        }
    }
}

async fn a_downgrade_lets_readers_in(store: Redis) {
    let backend = backend(&store).await;
    let writer = granted(&backend, &[("A", Mode::Exclusive), ("C", Mode::Shared)]).await;
    assert_eq!(blockers(attempt(&backend, &[("A/B", Mode::Shared)]).await), ["A exclusive"]);
    let downgraded = backend.change_mode(&writer, Mode::Shared).await.expect("answered").granted().expect("live");
    assert!(downgraded.token > writer.token);
    assert_eq!(downgraded.items, items(&[("A", Mode::Shared), ("C", Mode::Shared)]));
    let reader = granted(&backend, &[("A/B", Mode::Shared)]).await;
    assert_eq!(blockers(attempt(&backend, &[("A", Mode::Exclusive)]).await), ["A shared"]);
    backend.release(&downgraded).await.expect("release");
    backend.release(&reader).await.expect("release");
    assert!(listed(&backend).await.is_empty());
}

async fn each_grant_and_change_is_one_script_call(store: Redis) {
    let backend = backend(&store).await;
    // Once each first: a script the server does not know yet costs one
    // more call, once.
    let warm = granted(&backend, &[("W", Mode::Shared)]).await;
    let warm = backend.change_mode(&warm, Mode::Exclusive).await.expect("answered").granted().expect("alone");
    backend.refresh(&warm, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
    backend.release(&warm).await.expect("release");
    let single = granted(&backend, &[("V", Mode::Exclusive)]).await;
    backend.release(&single).await.expect("release");
    backend.list(None).await.expect("list");

    let calls = || backend.round_trips().expect("counted");
    let sixteen: Vec<(String, Mode)> = (0..16).map(|n| (format!("deep/{n}/a/b/c"), Mode::Shared)).collect();
    let sixteen: Vec<(&str, Mode)> = sixteen.iter().map(|(p, m)| (p.as_str(), *m)).collect();
    let before = calls();
    let exclusive = granted(&backend, &[("E/a/b/c/d/e", Mode::Exclusive)]).await;
    let shared = granted(&backend, &[("S/a/b/c", Mode::Shared)]).await;
    let many = granted(&backend, &sixteen).await;
    let refused = attempt(&backend, &[("E", Mode::Shared), ("S", Mode::Exclusive)]).await;
    let upgraded = backend.change_mode(&shared, Mode::Exclusive).await.expect("answered").granted().expect("alone");
    let downgraded = backend.change_mode(&upgraded, Mode::Shared).await.expect("answered").granted().expect("live");
    let refreshed = backend.refresh(&many, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
    assert_eq!(calls() - before, 7, "one call for each of the seven operations");
    assert_eq!(blockers(refused).len(), 2);
    for grant in [exclusive, downgraded, refreshed] {
        let before = calls();
        backend.release(&grant).await.expect("release");
        assert_eq!(calls() - before, 1);
    }
}

async fn the_stepwise_primitive_refuses_a_key_with_shared_holders(store: Redis) {
    let backend = backend(&store).await;
    let reader = granted(&backend, &[("A", Mode::Shared)]).await;
    let key = |text: &str| LockRequest::new(path(text), Owner::random(), Ttl::new(LONG).expect("ttl"));
    for kind in [LockKind::Lock, LockKind::Transient] {
        let refused = backend.try_lock_key(&key("A"), kind).await.expect("answered");
        assert_eq!(blockers(refused), ["A shared"], "{kind:?}");
    }
    // Only the key: the node below is another key.
    let below =
        backend.try_lock_key(&key("A/B"), LockKind::Transient).await.expect("answered").granted().expect("free");
    // And a stepwise client's transient lock counts as Exclusive.
    assert_eq!(blockers(attempt(&backend, &[("A/B/C", Mode::Shared)]).await), ["A/B exclusive"]);
    for grant in [reader, below] {
        backend.release(&grant).await.expect("release");
    }
}

async fn dead_shared_holders_block_nothing_and_leave_nothing(store: Redis) {
    let backend = backend(&store).await;
    let short = Duration::from_millis(300);
    let mut readers = Vec::new();
    for _ in 0..3 {
        let request = request(&[("A", Mode::Shared), ("B/C", Mode::Shared)], short);
        readers.push(backend.try_grant(&request).await.expect("answered").granted().expect("free"));
    }
    let released = granted(&backend, &[("D", Mode::Shared)]).await;
    backend.release(&released).await.expect("release");
    // Expiry has no event: past the deadline is the only way.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert!(listed(&backend).await.is_empty(), "expired holders are not listed");
    let writer = granted(&backend, &[("A/x", Mode::Exclusive), ("B", Mode::Exclusive), ("D", Mode::Exclusive)]).await;
    assert_eq!(listed(&backend).await, shown(&writer));
    // The grant met the dead holders and their nodes' markers on its way,
    // or swept them: nothing is left of them.
    let keys = backend.keys().to_vec();
    let fields: Vec<String> = raw_members(&store, &keys[0])
        .await
        .into_iter()
        .filter(|field| field.starts_with("A/") || field.starts_with("B/"))
        .collect();
    assert_eq!(fields, ["A/x/", "B/"]);
    assert!(raw_members(&store, &keys[4]).await.is_empty(), "no Shared entry indexed");
    backend.release(&writer).await.expect("release");
    for reader in &readers {
        assert!(matches!(backend.release(reader).await, Err(Error::NotHeld { .. })));
    }
}

async fn a_refreshed_reader_keeps_writers_out_past_its_first_ttl(store: Redis) {
    let backend = backend(&store).await;
    let short = Duration::from_millis(300);
    let request = request(&[("A", Mode::Shared), ("R/S", Mode::Shared)], short);
    let reader = backend.try_grant(&request).await.expect("answered").granted().expect("free");
    let reader = backend.refresh(&reader, Ttl::new(LONG).expect("ttl")).await.expect("refresh");
    // Past the first ttl (no event for it): the node still tells writers
    // below it that a reader holds it, and the namespace still tells
    // writers above a reader to look for it.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(blockers(attempt(&backend, &[("A/B", Mode::Exclusive)]).await), ["A shared"]);
    assert_eq!(blockers(attempt(&backend, &[("R", Mode::Exclusive)]).await), ["R/S shared"]);
    backend.release(&reader).await.expect("release");
}

async fn expired_shared_entries_are_swept(store: Redis) {
    let backend = backend(&store).await;
    let short = Duration::from_millis(300);
    // Each adds two holders, two nodes' markers and its request's record.
    for n in 0..30 {
        let request = request(&[(&format!("old-{n}/a"), Mode::Shared), (&format!("old-{n}/b"), Mode::Shared)], short);
        backend.try_grant(&request).await.expect("answered").granted().expect("free");
    }
    // Expiry has no event: past the deadline is the only way.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    // Nobody looks at the old paths again; grants elsewhere sweep them.
    for n in 0..10 {
        granted(&backend, &[(&format!("new-{n}/a"), Mode::Shared), (&format!("new-{n}/b"), Mode::Shared)]).await;
    }
    let keys = backend.keys().to_vec();
    for key in [&keys[0], &keys[2], &keys[4]] {
        let left: Vec<String> = raw_members(&store, key).await.into_iter().filter(|m| m.starts_with("old-")).collect();
        assert!(left.is_empty(), "{key} still holds {left:?}");
    }
    let records = raw_members(&store, &keys[0]).await.into_iter().filter(|m| m.starts_with("request ")).count();
    assert_eq!(records, 10, "the live grants' records only");
}

async fn multi_path_grants_are_never_seen_half_granted(store: Redis) {
    let backend = backend(&store).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (backend, done) = (backend.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut granted = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mode = if worker % 2 == 0 { Mode::Shared } else { Mode::Exclusive };
                let picked = ["h/1", "h/2", "h/3", "h/4"][fastrand::usize(..4)];
                let of = [("h/0/vm", Mode::Shared), (picked, mode), ("net", Mode::Shared)];
                if let Attempt::Granted(grant) = attempt(&backend, &of).await {
                    granted += 1;
                    backend.release(&grant).await.expect("release");
                }
            }
            granted
        }));
    }
    for _ in 0..200 {
        let mut by_token: BTreeMap<u64, usize> = BTreeMap::new();
        for held in backend.list(None).await.expect("list") {
            *by_token.entry(held.token).or_default() += 1;
        }
        assert!(by_token.values().all(|items| *items == 3), "a grant listed with some of its items: {by_token:?}");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("worker");
    }
    assert!(total > 0, "the workers got grants");
    assert!(listed(&backend).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_changes_sent_twice_get_the_first_answer() {
    let store = Redis::standalone();
    let backend = backend(&store).await;
    let keys = backend.keys().to_vec();
    let mut raw = raw(store.url()).await;
    let grant_script = script(include_str!("../src/lua/grant.lua"));
    let change_script = script(include_str!("../src/lua/change_mode.lua"));
    let release_script = script(include_str!("../src/lua/release.lua"));
    // All Shared (nothing of its own would refuse a resend) and multi-path.
    let call_grant = |nonce: &'static str| {
        let mut call = grant_script.prepare_invoke();
        call.key(&keys).arg("tree").arg(30_000).arg(0).arg(nonce).arg("me").arg("try");
        call.arg("A/").arg("shared").arg("B/").arg("shared");
        call
    };
    let first: redis::Value = call_grant("g1").invoke_async(&mut raw).await.expect("grant");
    let again: redis::Value = call_grant("g1").invoke_async(&mut raw).await.expect("grant");
    let (granted, token) = answer(&first);
    assert_eq!(granted, 1);
    assert_eq!(answer(&again), (1, token), "the same request gets the same grant");
    assert_eq!(backend.list(None).await.expect("list").len(), 2, "granted once: one holder on each node");
    let other: redis::Value = call_grant("g2").invoke_async(&mut raw).await.expect("grant");
    assert!(answer(&other).1 > token, "another request is another grant");

    let call_change = |nonce: &'static str| {
        let mut call = change_script.prepare_invoke();
        call.key(&keys).arg("shared").arg("me").arg(token).arg(nonce).arg("channel");
        call.arg("A/").arg("shared").arg("B/").arg("shared");
        call
    };
    let changed: redis::Value = call_change("c1").invoke_async(&mut raw).await.expect("change");
    let again: redis::Value = call_change("c1").invoke_async(&mut raw).await.expect("change");
    let (_, new_token) = answer(&changed);
    assert!(new_token > token);
    assert_eq!(answer(&again), (1, new_token), "the same change gets the same new token");
    let later: redis::Value = call_change("c2").invoke_async(&mut raw).await.expect("change");
    assert_eq!(later, redis::Value::Int(0), "another change of the old token finds it gone");

    let call_release = |nonce: &'static str| {
        let mut call = release_script.prepare_invoke();
        call.key(&keys).arg("channel").arg(nonce).arg("me").arg(new_token);
        call.arg("A/").arg("shared").arg("B/").arg("shared");
        call
    };
    let released: i64 = call_release("r1").invoke_async(&mut raw).await.expect("release");
    let again: i64 = call_release("r1").invoke_async(&mut raw).await.expect("release");
    let other: i64 = call_release("r2").invoke_async(&mut raw).await.expect("release");
    assert_eq!((released, again, other), (1, 1, 0), "the same release is answered twice, another one is not");
    assert_eq!(backend.list(None).await.expect("list").len(), 2, "only the second request's holders are left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_is_announced_to_waiters_and_an_upgrade_is_not() {
    let store = Redis::standalone();
    let backend = backend(&store).await;
    let mut messages = announced(&store, backend.keys()).await;

    let grant = granted(&backend, &[("A", Mode::Exclusive), ("B", Mode::Shared)]).await;
    let downgraded = backend.change_mode(&grant, Mode::Shared).await.expect("answered").granted().expect("live");
    let upgraded = backend.change_mode(&downgraded, Mode::Exclusive).await.expect("answered").granted().expect("alone");
    backend.release(&upgraded).await.expect("release");
    let last = granted(&backend, &[("Z", Mode::Shared)]).await;
    backend.release(&last).await.expect("release");
    // In order, and nothing else: nothing for the grants and the upgrade;
    // the downgrade's freed item; each release's items.
    assert_eq!(heard(&mut messages, 3).await, ["A/", "A/\nB/", "Z/"]);
}

/// The reads of the namespace's keys made by scripts since the last reset
/// (the server's command counts: `HGET`, `HMGET`, `ZRANGEBYLEX`).
async fn reads(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    command_calls(raw, Some(&["hget", "hmget", "zrangebylex"])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_are_never_read_one_by_one() {
    const READERS: usize = 2000;
    // A server of its own: command counts are server-wide.
    let data = conformance::harness::temp_dir("redis-data").expect("temp dir");
    let server = conformance::servers::redis::own_server(None, &[], &data).expect("redis-server");
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let backend = mutextree_redis::RedisConfig::from_url(&url)
        .expect("url")
        .connect()
        .await
        .expect("connect")
        .backend("readers")
        .expect("namespace");
    // Readers on one node, and readers on every leaf of another subtree.
    let holding = futures::stream::iter(0..READERS)
        .map(|n| {
            let backend = backend.clone();
            async move {
                let path = if n % 2 == 0 { "on".to_owned() } else { format!("under/leaf-{n}") };
                backend.try_grant(&request(&[(&path, Mode::Shared)], LONG)).await.expect("answered").granted()
            }
        })
        .buffer_unordered(64)
        .filter(|grant| std::future::ready(grant.is_some()))
        .count()
        .await;
    assert_eq!(holding, READERS);

    let mut raw = raw(&url).await;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut raw).await.expect("resetstat");
    // A reader of the whole subtree looks for Exclusive entries only; a
    // writer stops at the first live reader; neither reads them all.
    let whole = granted(&backend, &[("under", Mode::Shared), ("on/x", Mode::Shared)]).await;
    assert_eq!(blockers(attempt(&backend, &[("on/x/y", Mode::Exclusive)]).await), ["on shared"]);
    assert_eq!(blockers(attempt(&backend, &[("under", Mode::Exclusive)]).await).len(), 1);
    assert_eq!(blockers(attempt(&backend, &[("under/leaf-1", Mode::Exclusive)]).await), ["under/leaf-1 shared"]);
    let upgrade = backend.change_mode(&whole, Mode::Exclusive).await.expect("answered");
    assert_eq!(blockers(upgrade).len(), 2, "both items have readers in the way");
    let counted = reads(&mut raw).await;
    assert!(counted < 60, "{counted} reads for five requests among {READERS} readers");
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
}

common::on_both!(
    shared_holders_coexist_on_one_path,
    shared_covers_its_subtree_and_its_ancestors,
    siblings_never_conflict,
    a_multi_path_grant_is_all_or_nothing,
    release_and_refresh_cover_every_item,
    an_upgrade_waits_for_no_one_and_takes_a_new_token,
    two_upgraders_never_both_win,
    a_downgrade_lets_readers_in,
    each_grant_and_change_is_one_script_call,
    the_stepwise_primitive_refuses_a_key_with_shared_holders,
    dead_shared_holders_block_nothing_and_leave_nothing,
    a_refreshed_reader_keeps_writers_out_past_its_first_ttl,
    expired_shared_entries_are_swept,
    multi_path_grants_are_never_seen_half_granted,
);
