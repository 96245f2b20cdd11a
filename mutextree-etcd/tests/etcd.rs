//! What only the etcd store promises: how leases carry ttls, how release
//! and refresh treat a lease that is gone, the key layout, the transaction
//! size at the depth limit and its refusal beyond `--max-txn-ops`, modes and
//! multi-path grants at the store level (one transaction each), and
//! configuration errors.

mod common;

use std::time::Duration;

use conformance::servers::etcd;
use etcd_client::Client;
use mutextree_core::backend::{Attempt, LockKind, LockRequest, Queue};
use mutextree_core::{Error, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Owner, Ttl, MAX_DEPTH};
use mutextree_etcd::{EtcdBackend, EtcdConfig, MIN_LEASE_TTL};
use tokio::time::{sleep, sleep_until, Instant};

use common::TIMING;

fn request(path: &LockPath, ttl: Duration) -> LockRequest {
    LockRequest::new(path.clone(), Owner::new("etcd-test").expect("owner"), Ttl::new(ttl).expect("ttl"))
}

fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("path")
}

async fn fresh() -> (EtcdBackend, String) {
    let namespace = conformance::random_namespace();
    let backend = common::backend(&[etcd::url()], &namespace).await.expect("connect");
    (backend, namespace)
}

async fn grant(backend: &EtcdBackend, at: &str, ttl: Duration) -> Grant {
    match backend.try_grant(&request(&path(at), ttl)).await.expect("grant") {
        Attempt::Granted(grant) => grant,
        other => panic!("{at} should be free, but {other:?}"),
    }
}

async fn raw_client() -> Client {
    Client::connect([etcd::url()], None).await.expect("a plain etcd client")
}

/// The key an Exclusive lock is stored under, read with a plain client.
async fn stored(namespace: &str, at: &str) -> Option<etcd_client::KeyValue> {
    stored_all(namespace, "x", at).await.into_iter().next()
}

/// The keys of the items on `at` itself in the key space `space` (`x` or
/// `s`), read with a plain client.
async fn stored_all(namespace: &str, space: &str, at: &str) -> Vec<etcd_client::KeyValue> {
    let holders = format!("{}/{namespace}/{space}/{}/", EtcdConfig::DEFAULT_PREFIX, path(at).key());
    let options = Some(etcd_client::GetOptions::new().with_prefix());
    raw_client().await.get(holders, options).await.expect("get").take_kvs()
}

/// Shorter ttls than etcd's minimum lease are rounded up to it, fractions
/// of a second up to whole seconds, and the grant says so; the lock then
/// lives the applied ttl, not the requested one.
#[tokio::test]
async fn short_ttls_are_rounded_up_to_whole_lease_seconds() {
    let (backend, _) = fresh().await;
    let short = grant(&backend, "short", Duration::from_millis(1)).await;
    assert_eq!(short.ttl, MIN_LEASE_TTL, "1 ms becomes the lease minimum");
    let fraction = grant(&backend, "fraction", Duration::from_millis(2_001)).await;
    assert_eq!(fraction.ttl, Duration::from_secs(3), "2.001 s becomes 3 s");
    let granted_at = Instant::now();

    // Held well past the 1 ms asked for, until just before its applied ttl.
    sleep_until(short.expires_at - TIMING.slack).await;
    let blocked = backend.try_grant(&request(&path("short/child"), Duration::from_secs(5))).await.expect("attempt");
    match blocked {
        Attempt::Blocked(blockers) => {
            let held = blockers.first();
            assert_eq!(held.path, path("short"));
            assert!(held.remaining <= short.ttl && !held.remaining.is_zero(), "{held:?}");
        }
        other => panic!("a 1 ms lock lives its applied {:?}, but {other:?}", short.ttl),
    }
    sleep_until(granted_at + short.ttl + TIMING.slack).await;
    grant(&backend, "short/child", Duration::from_secs(5)).await;
}

/// A refresh moves the lock to a lease of its own with exactly the new
/// ttl, shorter or longer than what was left, and keeps the token; the old
/// lease (which other locks may share) no longer holds the key.
#[tokio::test]
async fn refresh_sets_the_remaining_life_to_the_new_ttl() {
    let (backend, namespace) = fresh().await;
    let long = grant(&backend, "A", Duration::from_secs(60)).await;
    let old_lease = stored(&namespace, "A").await.expect("stored").lease();
    let refreshed_at = Instant::now();
    let shorter = backend.refresh(&long, Ttl::new(Duration::from_secs(3)).expect("ttl")).await.expect("refresh");
    assert_eq!((shorter.ttl, shorter.token), (Duration::from_secs(3), long.token));
    let record = stored(&namespace, "A").await.expect("stored");
    assert_ne!(record.lease(), old_lease, "moved to a new lease");
    assert_eq!(record.create_revision() as u64, long.token, "same key, same token");
    let mut client = raw_client().await;
    let lease = client.lease_time_to_live(record.lease(), None).await.expect("lookup");
    assert_eq!(lease.granted_ttl(), 3);
    assert!((1..=3).contains(&lease.ttl()), "{} s left", lease.ttl());
    let with_keys = Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys());
    let old = client.lease_time_to_live(old_lease, with_keys).await.expect("lookup");
    assert!(old.keys().is_empty(), "the old lease still holds {:?}", old.keys());
    sleep_until(refreshed_at + Duration::from_secs(3) + TIMING.slack).await;
    assert!(backend.list(None).await.expect("list").is_empty(), "the 3 s refresh replaced the 60 s life");

    let short = grant(&backend, "B", Duration::from_secs(2)).await;
    let longer = backend.refresh(&short, Ttl::new(Duration::from_secs(30)).expect("ttl")).await.expect("refresh");
    assert_eq!(longer.ttl, Duration::from_secs(30));
    sleep(Duration::from_secs(2) + TIMING.slack).await;
    let held = backend.list(None).await.expect("list");
    assert_eq!(held.len(), 1, "refreshed past its first ttl");
    assert!(held[0].remaining > Duration::from_secs(25) && held[0].remaining <= longer.ttl, "{:?}", held[0]);
}

/// A lease revoked behind the holder's back (an operator, or expiry)
/// takes the lock with it: release and refresh then find nothing and say
/// NotHeld, and a refresh does not bring the lock back (a keep-alive of a
/// revoked lease can report success in etcd 3.4; a refresh here never
/// relies on one).
#[tokio::test]
async fn release_and_refresh_on_a_revoked_lease_are_not_held() {
    let (backend, namespace) = fresh().await;
    let held = grant(&backend, "A/B", Duration::from_secs(60)).await;
    let lease = stored(&namespace, "A/B").await.expect("stored").lease();
    raw_client().await.lease_revoke(lease).await.expect("revoke");
    let ttl = Ttl::new(Duration::from_secs(60)).expect("ttl");
    assert!(matches!(backend.refresh(&held, ttl).await, Err(Error::NotHeld { .. })));
    assert!(matches!(backend.release(&held).await, Err(Error::NotHeld { .. })));
    assert!(stored(&namespace, "A/B").await.is_none(), "nothing resurrected");
    assert!(backend.list(None).await.expect("list").is_empty());
    // The revoked lease was the one this backend shares between grants of
    // that ttl: the next grant notices and takes a new one.
    let again = grant(&backend, "A/C", Duration::from_secs(60)).await;
    assert_ne!(stored(&namespace, "A/C").await.expect("stored").lease(), lease);
    backend.release(&again).await.expect("release");

    // And on a lease that expired by itself.
    let short = grant(&backend, "A", Duration::from_secs(2)).await;
    sleep_until(short.expires_at + TIMING.slack).await;
    assert!(matches!(backend.refresh(&short, ttl).await, Err(Error::NotHeld { .. })));
    assert!(matches!(backend.release(&short).await, Err(Error::NotHeld { .. })));
    grant(&backend, "A", Duration::from_secs(2)).await;
}

/// A mode change that keeps an Exclusive item Exclusive moves it to a new
/// key (the owner's one key on the node cannot be deleted and put again in
/// one transaction), so the key's create revision is the new token, and
/// release, refresh and the owner's next grant on the node all work.
#[tokio::test]
async fn an_exclusive_item_changed_to_exclusive_gets_a_new_key() {
    let (backend, namespace) = fresh().await;
    let first = grant(&backend, "m/n", Duration::from_secs(30)).await;
    let Attempt::Granted(changed) = backend.change_mode(&first, Mode::Exclusive).await.expect("change") else {
        panic!("nothing is in the way of the grant's own item");
    };
    assert!(changed.token > first.token);
    let record = stored(&namespace, "m/n").await.expect("stored");
    assert_eq!(record.create_revision() as u64, changed.token, "the key was written anew");
    assert_ne!(record.key_str().expect("utf-8"), format!("mutextree/{namespace}/x/m/n//etcd-test\x1f"));
    let refreshed = backend.refresh(&changed, Ttl::new(Duration::from_secs(20)).expect("ttl")).await.expect("refresh");
    backend.release(&refreshed).await.expect("release");
    assert!(stored(&namespace, "m/n").await.is_none());
    let again = grant(&backend, "m/n", Duration::from_secs(30)).await;
    backend.release(&again).await.expect("release");
}

/// One key per item, in the key space of its mode, named by its node and
/// its owner (and for a Shared item a nonce), on a lease (never lease 0,
/// which would never expire), holding the kind and the owner; the fencing
/// token is the key's create revision, the revision of the granting
/// transaction. The owner's next Exclusive grant on the node writes the
/// same key again, so that deleted keys do not pile up in etcd's index.
#[tokio::test]
async fn keys_are_laid_out_as_documented() {
    let (backend, namespace) = fresh().await;
    let exclusive_key = format!("mutextree/{namespace}/x/a%2Fb/c d//etcd-test\x1f");
    let first = grant(&backend, "a\\/b/c d", Duration::from_secs(30)).await;
    let record = stored(&namespace, "a\\/b/c d").await.expect("stored");
    assert_eq!(record.key_str().expect("utf-8"), exclusive_key);
    backend.release(&first).await.expect("release");
    let held = grant(&backend, "a\\/b/c d", Duration::from_secs(30)).await;
    let record = stored(&namespace, "a\\/b/c d").await.expect("stored");
    assert_eq!(record.key_str().expect("utf-8"), exclusive_key, "the same key again");
    assert!(held.token > first.token);
    assert_eq!(record.value(), b"Letcd-test");
    assert_ne!(record.lease(), 0);
    assert_eq!(record.create_revision() as u64, held.token);
    let shared = granted(&backend, &[("y/z", Mode::Shared), ("x", Mode::Exclusive)], "etcd-test").await;
    assert!(shared.token > held.token);
    let record = stored_all(&namespace, "s", "y/z").await;
    assert_eq!(record.len(), 1);
    let key = record[0].key_str().expect("utf-8");
    let nonce = key.strip_prefix(&format!("mutextree/{namespace}/s/y/z//etcd-test\x1f")).expect("owner, separator");
    assert!(nonce.len() == 16 && nonce.chars().all(|c| c.is_ascii_hexdigit()), "{nonce:?}");
    assert_eq!(record[0].create_revision() as u64, shared.token, "one revision for all the items");
    let other = stored(&namespace, "x").await.expect("stored");
    assert_eq!(other.lease(), record[0].lease(), "one lease for all the items");
    let mut client = raw_client().await;
    let all = client.get(format!("mutextree/{namespace}/"), Some(etcd_client::GetOptions::new().with_prefix()));
    assert_eq!(all.await.expect("get").kvs().len(), 3, "one key per item, nothing else");
}

/// The deepest path with the longest names is one transaction within
/// etcd's default limits (128 operations, 1.5 MiB), granted or refused,
/// Exclusive (64 compares) or Shared.
#[tokio::test]
async fn the_deepest_path_fits_one_transaction() {
    let (backend, _) = fresh().await;
    let name = |i: usize| format!("{i:02}{}", "x".repeat(mutextree_core::MAX_PATH_BYTES / MAX_DEPTH - 2));
    let deepest = LockPath::new((0..MAX_DEPTH).map(name)).expect("the deepest path");
    let parent = deepest.parent().expect("parent");
    let ttl = Duration::from_secs(30);
    let granted = backend.try_grant(&request(&deepest, ttl)).await.expect("grant").granted().expect("free");
    assert_eq!(blockers(backend.try_grant(&request(&parent, ttl)).await)[0].path, deepest);
    backend.release(&granted).await.expect("release");
    let top = backend.try_grant(&request(&parent, ttl)).await.expect("grant").granted().expect("free");
    assert_eq!(blockers(backend.try_grant(&request(&deepest, ttl)).await)[0].path, parent);
    let shared = LockRequest::of(LockItems::one(deepest.clone(), Mode::Shared), owner("reader"), long());
    assert_eq!(blockers(backend.try_grant(&shared).await)[0].path, parent);
    backend.release(&top).await.expect("release");
    let read = backend.try_grant(&shared).await.expect("grant").granted().expect("free");
    let upgraded = backend.change_mode(&read, Mode::Exclusive).await.expect("upgrade").granted().expect("alone");
    backend.release(&upgraded).await.expect("release");
}

/// Unusable settings are refused before anything is sent, naming the
/// option; a namespace follows core's rules.
#[tokio::test]
async fn bad_configuration_is_refused_before_connecting() {
    for config in [
        EtcdConfig::new(Vec::<String>::new()),
        EtcdConfig::new(["localhost:2379"]),
        EtcdConfig::new([etcd::url()]).prefix("a/b"),
        EtcdConfig::new([etcd::url()]).connect_timeout(Duration::ZERO),
    ] {
        let error = config.connect().await.expect_err("refused");
        assert!(matches!(error, Error::InvalidConfig { store: "etcd", .. }), "{error:?}");
    }
    let store = EtcdConfig::new([etcd::url()]).connect().await.expect("connect");
    assert!(matches!(store.backend("{x}"), Err(Error::InvalidNamespace { .. })));
}

/// A server that is not there is a retryable store error when connecting,
/// naming the address, not a hang.
#[tokio::test]
async fn an_unreachable_server_is_a_retryable_error() {
    let port = conformance::harness::free_port();
    let config = EtcdConfig::new([etcd::client_url(port)])
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let error = config.connect().await.expect_err("nobody answers");
    assert!(matches!(error, Error::Store { retryable: true, .. }), "{error:?}");
    assert!(error.to_string().contains(&format!("could not connect to etcd at 127.0.0.1:{port}")), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// Prefixes keep applications apart like namespaces do.
#[tokio::test]
async fn prefixes_are_isolated() {
    let url = etcd::url();
    let one = EtcdConfig::new([url.clone()]).prefix("one").connect().await.expect("connect");
    let two = EtcdConfig::new([url]).prefix("two").connect().await.expect("connect");
    let namespace = conformance::random_namespace();
    let (one, two) = (one.backend(&namespace).expect("ns"), two.backend(&namespace).expect("ns"));
    grant(&one, "A", Duration::from_secs(30)).await;
    grant(&two, "A/B", Duration::from_secs(30)).await;
    assert_eq!(one.list(None).await.expect("list").len(), 1);
}

/// With etcd's auth on, the configured user's credentials are used (and
/// checked when connecting); without them, a lock request is refused by
/// the server as a permission error that retrying cannot fix.
#[tokio::test]
async fn credentials_reach_a_cluster_with_auth_on() {
    let cluster = etcd::Cluster::start(1).unwrap_or_else(|message| panic!("{message}"));
    let urls = cluster.urls();
    let mut admin = Client::connect(&urls, None).await.expect("connect");
    admin.user_add("root", "root-password", None).await.expect("user");
    admin.user_grant_role("root", "root").await.expect("role");
    admin.user_add("locker", "locker-password", None).await.expect("user");
    admin.role_add("locks").await.expect("role");
    let everything = etcd_client::Permission::read_write("mutextree/").with_prefix();
    admin.role_grant_permission("locks", everything).await.expect("permission");
    admin.user_grant_role("locker", "locks").await.expect("role");
    admin.auth_enable().await.expect("auth on");

    let config = EtcdConfig::new(urls.clone()).user("locker", "locker-password");
    let backend = config.connect().await.expect("right credentials").backend("auth").expect("ns");
    let held = grant(&backend, "A/B", Duration::from_secs(30)).await;
    backend.release(&held).await.expect("release");

    let wrong = EtcdConfig::new(urls.clone()).user("locker", "guess").connect().await;
    assert!(matches!(wrong, Err(Error::Store { retryable: false, .. })), "{wrong:?}");
    // Connecting asks for the members' status, which needs no user.
    let anonymous = EtcdConfig::new(urls).connect().await.expect("status needs no credentials");
    let anonymous = anonymous.backend("auth").expect("ns");
    let refused = anonymous.try_grant(&request(&path("A"), Duration::from_secs(30))).await;
    assert!(matches!(refused, Err(Error::Store { retryable: false, .. })), "{refused:?}");
}

/// Durations in a URL read like `--ttl`: `1m`, `1500ms`, `2s`.
#[tokio::test]
async fn a_url_with_every_duration_grammar_connects() {
    for (connect, request) in [("1m", "1500ms"), ("2s", "2"), ("1500ms", "1m")] {
        let url = format!("{}?connect_timeout={connect}&request_timeout={request}", etcd::connect_url());
        let store = EtcdConfig::from_url(&url).expect("url").connect().await.expect("connect");
        store.backend(&conformance::random_namespace()).expect("namespace").list(None).await.expect("answered");
    }
}

fn owner(name: &str) -> Owner {
    Owner::new(name).expect("owner")
}

fn long() -> Ttl {
    Ttl::new(Duration::from_secs(60)).expect("ttl")
}

fn items(list: &[(&str, Mode)]) -> LockItems {
    LockItems::new(list.iter().map(|(at, mode)| (path(at), *mode))).expect("items")
}

/// A request for `list` by `who`, as the store answers it.
async fn attempt(backend: &EtcdBackend, list: &[(&str, Mode)], who: &str) -> Result<Attempt, Error> {
    backend.try_grant(&LockRequest::of(items(list), owner(who), long())).await
}

async fn granted(backend: &EtcdBackend, list: &[(&str, Mode)], who: &str) -> Grant {
    match attempt(backend, list, who).await.expect("attempt") {
        Attempt::Granted(grant) => grant,
        other => panic!("{list:?} should be free, but {other:?}"),
    }
}

fn blockers(outcome: Result<Attempt, Error>) -> Vec<HeldLock> {
    match outcome.expect("attempt") {
        Attempt::Blocked(blockers) => blockers.into_vec(),
        other => panic!("should be refused, but {other:?}"),
    }
}

/// The blockers' paths, modes and owners, in order.
fn named(blockers: &[HeldLock]) -> Vec<(String, Mode, String)> {
    blockers.iter().map(|held| (held.path.to_string(), held.mode, held.owner.as_str().to_owned())).collect()
}

/// What `list` shows: path, mode, owner, token of each live item.
async fn listed(backend: &EtcdBackend) -> Vec<(String, Mode, String, u64)> {
    let held = backend.list(None).await.expect("list");
    held.iter().map(|h| (h.path.to_string(), h.mode, h.owner.as_str().to_owned(), h.token)).collect()
}

const S: Mode = Mode::Shared;
const X: Mode = Mode::Exclusive;

/// Shared holders coexist on one node, the same owner's two grants
/// included; each is released and refreshed on its own, and an Exclusive
/// request on the node names one of them.
#[tokio::test]
async fn shared_holders_coexist_on_one_node() {
    let (backend, _) = fresh().await;
    let one = granted(&backend, &[("A", S)], "one").await;
    let two = granted(&backend, &[("A", S)], "two").await;
    let again = granted(&backend, &[("A", S)], "two").await;
    assert!(one.token < two.token && two.token < again.token);
    let listed_now = listed(&backend).await;
    assert_eq!(listed_now.len(), 3, "{listed_now:?}");
    assert!(listed_now.iter().all(|(at, mode, _, _)| at == "A" && *mode == S), "{listed_now:?}");
    let refused = blockers(attempt(&backend, &[("A", X)], "writer").await);
    assert_eq!(refused.len(), 1);
    assert!(refused[0].path == path("A") && refused[0].mode == S, "{refused:?}");

    // Of the same owner's two grants on one node, exactly the one asked.
    backend.release(&two).await.expect("release");
    assert!(matches!(backend.release(&two).await, Err(Error::NotHeld { .. })));
    let refreshed = backend.refresh(&again, Ttl::new(Duration::from_secs(30)).expect("ttl")).await.expect("refresh");
    assert_eq!(refreshed.token, again.token);
    let tokens: Vec<u64> = listed(&backend).await.iter().map(|(_, _, _, token)| *token).collect();
    assert_eq!(tokens, [one.token, again.token]);
    backend.release(&one).await.expect("release");
    backend.release(&again).await.expect("release");
    granted(&backend, &[("A", X)], "writer").await;
}

/// Shared on a node covers its subtree: an Exclusive descendant is
/// refused, and so is an Exclusive ancestor; Shared descendants and
/// ancestors are not. The reverse too: an Exclusive node refuses Shared
/// above and below it.
#[tokio::test]
async fn shared_and_exclusive_across_ancestors_and_descendants() {
    let (backend, _) = fresh().await;
    let reader = granted(&backend, &[("A", S)], "reader").await;
    for at in ["A", "A/B", "A/B/C"] {
        assert_eq!(named(&blockers(attempt(&backend, &[(at, X)], "writer").await)), [("A".into(), S, "reader".into())]);
    }
    let below = granted(&backend, &[("A/B/C", S)], "reader-2").await;
    granted(&backend, &[("A/B", S)], "reader-3").await;
    backend.release(&reader).await.expect("release");
    // Shared below refuses Exclusive above it.
    assert_eq!(blockers(attempt(&backend, &[("A", X)], "writer").await)[0].mode, S);
    backend.release(&below).await.expect("release");

    let (backend, _) = fresh().await;
    granted(&backend, &[("P/Q", X)], "writer").await;
    for at in ["P", "P/Q", "P/Q/R"] {
        assert_eq!(
            named(&blockers(attempt(&backend, &[(at, S)], "reader").await)),
            [("P/Q".into(), X, "writer".into())]
        );
    }
}

/// Siblings never conflict, whatever their modes, nor do nodes whose keys
/// share a prefix.
#[tokio::test]
async fn siblings_in_every_mode_combination() {
    let (backend, _) = fresh().await;
    for (n, (first, second)) in [(S, S), (S, X), (X, S), (X, X)].into_iter().enumerate() {
        let (left, right, near) = (format!("R{n}/a"), format!("R{n}/b"), format!("R{n}/a b"));
        granted(&backend, &[(&left, first)], "left").await;
        granted(&backend, &[(&right, second)], "right").await;
        granted(&backend, &[(&near, second)], "near").await;
    }
}

/// A multi-path request is granted whole or not at all: with two of its
/// three items blocked, nothing of it appears in the store, and the
/// refusal names a blocker for each blocked item, in item order; once they
/// are gone, one transaction grants all three under one token.
#[tokio::test]
async fn multi_path_is_all_or_nothing_with_a_blocker_per_item() {
    let (backend, _) = fresh().await;
    let rack = granted(&backend, &[("eu/rack-1", S)], "reader").await;
    let host = granted(&backend, &[("eu/rack-2/host-9", X)], "patcher").await;
    let wanted = [("eu/rack-1/host-3", X), ("eu/rack-2", X), ("us/rack-7", S)];
    let refused = blockers(attempt(&backend, &wanted, "mover").await);
    assert_eq!(
        named(&refused),
        [("eu/rack-1".into(), S, "reader".into()), ("eu/rack-2/host-9".into(), X, "patcher".into())]
    );
    assert_eq!(listed(&backend).await.len(), 2, "nothing of the refused request was written");

    backend.release(&rack).await.expect("release");
    assert_eq!(named(&blockers(attempt(&backend, &wanted, "mover").await)).len(), 1, "one item blocked");
    backend.release(&host).await.expect("release");
    let before = backend.round_trips().expect("counted");
    let moved = granted(&backend, &wanted, "mover").await;
    assert_eq!(backend.round_trips().expect("counted") - before, 1, "one transaction (the lease is shared)");
    let shown = listed(&backend).await;
    assert_eq!(shown.len(), 3);
    assert!(shown.iter().all(|(_, _, who, token)| who == "mover" && *token == moved.token), "{shown:?}");
    let modes: Vec<Mode> = shown.iter().map(|(_, mode, _, _)| *mode).collect();
    assert_eq!(modes, [X, X, S]);
}

/// An upgrade is refused while another Shared holder lives above or below
/// one of its items (naming it, and leaving the grant as it was), and
/// granted once none is left, with a new token: the old one no longer
/// releases anything.
#[tokio::test]
async fn upgrade_waits_for_no_one_and_takes_a_new_token() {
    let (backend, _) = fresh().await;
    let mine = granted(&backend, &[("A/B", S), ("C", S)], "upgrader").await;
    let other = granted(&backend, &[("A", S)], "other").await;
    let refused = blockers(backend.change_mode(&mine, X).await);
    assert_eq!(named(&refused), [("A".into(), S, "other".into())]);
    let unchanged = listed(&backend).await;
    assert_eq!(
        unchanged
            .iter()
            .filter(|(_, mode, who, token)| *mode == S && who == "upgrader" && *token == mine.token)
            .count(),
        2
    );

    backend.release(&other).await.expect("release");
    // A reader below one of the items is in the way too.
    let below = granted(&backend, &[("A/B/c", S)], "below").await;
    assert_eq!(named(&blockers(backend.change_mode(&mine, X).await)), [("A/B/c".into(), S, "below".into())]);
    backend.release(&below).await.expect("release");
    let before = backend.round_trips().expect("counted");
    let upgraded = backend.change_mode(&mine, X).await.expect("upgrade").granted().expect("alone now");
    assert_eq!(backend.round_trips().expect("counted") - before, 1, "one transaction");
    assert!(upgraded.token > mine.token);
    assert_eq!((upgraded.items.clone(), upgraded.expires_at), (items(&[("A/B", X), ("C", X)]), mine.expires_at));
    let shown = listed(&backend).await;
    assert_eq!(
        shown,
        [("A/B".into(), X, "upgrader".into(), upgraded.token), ("C".into(), X, "upgrader".into(), upgraded.token)]
    );
    assert!(attempt(&backend, &[("A", S)], "other").await.expect("attempt").granted().is_none());
    assert!(matches!(backend.release(&mine).await, Err(Error::NotHeld { .. })));
    assert!(matches!(backend.change_mode(&mine, X).await, Err(Error::NotHeld { .. })));
    backend.release(&upgraded).await.expect("release");
    assert!(listed(&backend).await.is_empty());
}

/// Two Shared grants of one owner on one node: neither can upgrade past
/// the other.
#[tokio::test]
async fn the_same_owners_other_shared_grant_blocks_an_upgrade() {
    let (backend, _) = fresh().await;
    let first = granted(&backend, &[("A", S)], "twice").await;
    let second = granted(&backend, &[("A", S)], "twice").await;
    let refused = blockers(backend.change_mode(&first, X).await);
    assert_eq!(refused[0].token, second.token);
    backend.release(&second).await.expect("release");
    backend.change_mode(&first, X).await.expect("upgrade").granted().expect("alone now");
}

/// A downgrade lets readers in (not writers), with a new token, at once;
/// and a mixed grant changes every item.
#[tokio::test]
async fn downgrade_lets_a_reader_in() {
    let (backend, _) = fresh().await;
    let writer = granted(&backend, &[("A", X), ("B", S)], "writer").await;
    assert_eq!(named(&blockers(attempt(&backend, &[("A/x", S)], "reader").await))[0].0, "A");
    let before = backend.round_trips().expect("counted");
    let reading = backend.change_mode(&writer, S).await.expect("downgrade").granted().expect("always");
    assert_eq!(backend.round_trips().expect("counted") - before, 1, "one transaction");
    assert!(reading.token > writer.token);
    granted(&backend, &[("A/x", S)], "reader").await;
    assert_eq!(blockers(attempt(&backend, &[("A", X)], "other").await)[0].mode, S, "no writer");
    let shown = listed(&backend).await;
    assert!(shown.contains(&("A".into(), S, "writer".into(), reading.token)), "{shown:?}");
    assert!(shown.contains(&("B".into(), S, "writer".into(), reading.token)), "{shown:?}");
    // Back up past nothing but its own keys is refused while the reader lives.
    assert_eq!(named(&blockers(backend.change_mode(&reading, X).await)), [("A/x".into(), S, "reader".into())]);
    backend.release(&reading).await.expect("release");
    assert!(matches!(backend.change_mode(&reading, S).await, Err(Error::NotHeld { .. })));
}

/// Release and refresh act on every item of a grant: a refresh moves all
/// its keys to one new lease with the new ttl, keeping the token; a mode
/// change keeps that lease; a release removes them all.
#[tokio::test]
async fn release_and_refresh_cover_every_item() {
    let (backend, namespace) = fresh().await;
    let held = granted(&backend, &[("A/B", X), ("C", S), ("D/E", S)], "many").await;
    let refreshed = backend.refresh(&held, Ttl::new(Duration::from_secs(45)).expect("ttl")).await.expect("refresh");
    assert_eq!((refreshed.token, refreshed.ttl), (held.token, Duration::from_secs(45)));
    let keys = [
        stored_all(&namespace, "x", "A/B").await,
        stored_all(&namespace, "s", "C").await,
        stored_all(&namespace, "s", "D/E").await,
    ];
    let leases: Vec<i64> = keys.iter().map(|found| found[0].lease()).collect();
    assert!(leases.iter().all(|lease| *lease == leases[0]), "{leases:?}");
    let lease = raw_client().await.lease_time_to_live(leases[0], None).await.expect("lookup");
    assert_eq!(lease.granted_ttl(), 45);
    assert!(keys.iter().all(|found| found[0].create_revision() as u64 == held.token));
    // A mode change keeps them all on that lease, the Exclusive item that
    // stays Exclusive included, under the new token.
    let upgraded = backend.change_mode(&refreshed, X).await.expect("upgrade").granted().expect("alone");
    let keys = [
        stored_all(&namespace, "x", "A/B").await,
        stored_all(&namespace, "x", "C").await,
        stored_all(&namespace, "x", "D/E").await,
    ];
    assert!(keys.iter().all(|found| found.len() == 1 && found[0].lease() == leases[0]), "{keys:?}");
    assert!(keys.iter().all(|found| found[0].create_revision() as u64 == upgraded.token));
    assert!(stored_all(&namespace, "s", "C").await.is_empty());
    backend.release(&upgraded).await.expect("release");
    assert!(listed(&backend).await.is_empty());
    assert!(matches!(backend.refresh(&upgraded, long()).await, Err(Error::NotHeld { .. })));
}

/// One request per grant (single or multi-path, Shared or Exclusive), per
/// refusal by a lock on a lease this backend knows, per upgrade, per
/// downgrade and per release, once the backend has a young lease.
#[tokio::test]
async fn one_round_trip_per_operation() {
    let (backend, _) = fresh().await;
    granted(&backend, &[("warm", X)], "counter").await;
    let count = || backend.round_trips().expect("the etcd store counts its requests");
    let mut last = count();
    let mut sent = || {
        let now = count();
        let delta = now - last;
        last = now;
        delta
    };
    let deep = granted(&backend, &[("a/b/c/d/e/f", X)], "counter").await;
    assert_eq!(sent(), 1, "an exclusive grant at depth 6");
    let shared = granted(&backend, &[("g/h/i", S)], "counter").await;
    assert_eq!(sent(), 1, "a shared grant");
    blockers(attempt(&backend, &[("a/b", S)], "other").await);
    assert_eq!(sent(), 1, "a refusal");
    let many = granted(&backend, &[("m/1", X), ("m/2", S), ("n/3/4", X)], "counter").await;
    assert_eq!(sent(), 1, "a 3-path grant");
    let down = backend.change_mode(&many, S).await.expect("downgrade").granted().expect("granted");
    assert_eq!(sent(), 1, "a downgrade");
    let up = backend.change_mode(&down, X).await.expect("upgrade").granted().expect("granted");
    assert_eq!(sent(), 1, "an upgrade");
    for grant in [deep, shared, up] {
        backend.release(&grant).await.expect("release");
        assert_eq!(sent(), 1, "a release");
    }
}

/// A request whose transaction would exceed the server's `--max-txn-ops`
/// is refused before anything is sent, naming the limit and the
/// parameter; a configured limit is the one applied.
#[tokio::test]
async fn requests_beyond_max_txn_ops_are_refused_unsent() {
    let (backend, _) = fresh().await;
    // 16 Exclusive items at depth 5 with no common ancestor: 160 compares,
    // and 80 more for the waiters in their way unless the request barges.
    let deep: Vec<String> = (0..16).map(|i| format!("r{i}/a/b/c/d")).collect();
    let deep: Vec<(&str, Mode)> = deep.iter().map(|at| (at.as_str(), X)).collect();
    let before = backend.round_trips().expect("counted");
    for (queue, needed) in [(Queue::Barge, "160 operations"), (Queue::Try, "240 operations")] {
        let error = backend.try_grant(&LockRequest::of(items(&deep), owner("big"), long()).in_queue(queue)).await;
        let error = error.expect_err("too big");
        assert!(matches!(error, Error::Unsupported { store: "etcd", .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(needed) && message.contains("--max-txn-ops") && message.contains("max_txn_ops parameter"),
            "{message}"
        );
    }
    assert_eq!(backend.round_trips().expect("counted"), before, "nothing sent, not even a lease");
    // Shared, the same items need half as many compares: they fit barging,
    // not with the waiters' 80 more.
    let shared: Vec<(&str, Mode)> = deep.iter().map(|(at, _)| (*at, S)).collect();
    assert!(matches!(attempt(&backend, &shared, "big").await, Err(Error::Unsupported { .. })), "160 compares");
    let barging = LockRequest::of(items(&shared), owner("big"), long()).in_queue(Queue::Barge);
    let readers = backend.try_grant(&barging).await.expect("attempt").granted().expect("free");
    // An upgrade needs the exclusive compares and more.
    assert!(matches!(backend.change_mode(&readers, X).await, Err(Error::Unsupported { .. })));

    let small = EtcdConfig::new([etcd::url()]).max_txn_ops(4).connect().await.expect("connect");
    let small = small.backend(&conformance::random_namespace()).expect("namespace");
    assert!(matches!(attempt(&small, &[("a/b/c", X)], "x").await, Err(Error::Unsupported { .. })), "9 compares");
    assert!(matches!(attempt(&small, &[("a/b/c", S)], "x").await, Err(Error::Unsupported { .. })), "6 compares");
    for list in [&[("a/b/c", S)][..], &[("q/r", X)][..]] {
        let barging = LockRequest::of(items(list), owner("x"), long()).in_queue(Queue::Barge);
        small.try_grant(&barging).await.expect("attempt").granted().expect("free");
    }
    granted(&small, &[("w", X)], "x").await;
}

/// The stepwise primitive refuses a key with any live lock on it, a Shared
/// one included.
#[tokio::test]
async fn the_key_primitive_refuses_a_shared_holder() {
    let (backend, _) = fresh().await;
    granted(&backend, &[("A", S)], "reader").await;
    let request = LockRequest::new(path("A"), owner("stepwise"), long());
    for kind in [LockKind::Lock, LockKind::Transient] {
        let outcome = backend.try_lock_key(&request, kind).await;
        assert_eq!(named(&blockers(outcome)), [("A".into(), S, "reader".into())]);
    }
    // A descendant's key is free for it: the stepwise algorithm checks below itself.
    let below = LockRequest::new(path("A/B"), owner("stepwise"), long());
    backend.try_lock_key(&below, LockKind::Transient).await.expect("attempt").granted().expect("own key free");
}

/// A listener for several items wakes on a delete concerning any of them.
#[tokio::test]
async fn a_listener_wakes_for_any_of_its_items() {
    let (backend, _) = fresh().await;
    let second = granted(&backend, &[("B/x", X)], "holder").await;
    let wanted = items(&[("A", X), ("B", S)]);
    common::until_watched(&mut backend.listen(&wanted)).await;
    let mut listener = backend.listen(&wanted);
    backend.release(&second).await.expect("release");
    tokio::time::timeout(Duration::from_secs(5), listener.changed()).await.expect("woken by the release under B");
}

/// A downgrade of a mixed grant whose Shared item sits beside the same
/// owner's other Shared grant on that node: the grant's keys are read and
/// changed exactly, and the other grant is left alone.
#[tokio::test]
async fn a_downgrade_beside_the_same_owners_other_grant_changes_only_its_own() {
    let (backend, _) = fresh().await;
    let first = granted(&backend, &[("A", S)], "twice").await;
    let second = granted(&backend, &[("A", S), ("B", X)], "twice").await;
    let down = backend.change_mode(&second, S).await.expect("downgrade").granted().expect("always");
    let shown = listed(&backend).await;
    assert_eq!(
        shown,
        [
            ("A".into(), S, "twice".into(), first.token),
            ("A".into(), S, "twice".into(), down.token),
            ("B".into(), S, "twice".into(), down.token)
        ]
    );
    backend.release(&first).await.expect("release");
    backend.release(&down).await.expect("release");
    assert!(listed(&backend).await.is_empty());
}

/// A downgrade is refused while a stepwise client's lock in progress
/// covers one of its items (its node locked, its subtree not yet looked
/// at), so that its token cannot rise past that lock's; then granted.
#[tokio::test]
async fn a_downgrade_waits_out_a_stepwise_lock_in_progress() {
    let (backend, _) = fresh().await;
    let writer = granted(&backend, &[("A/B", X)], "writer").await;
    let stepwise = LockRequest::new(path("A"), owner("stepwise"), long());
    let above = backend.try_lock_key(&stepwise, LockKind::Lock).await.expect("attempt").granted().expect("its own key");
    assert_eq!(named(&blockers(backend.change_mode(&writer, S).await)), [("A".into(), X, "stepwise".into())]);
    backend.release(&above).await.expect("release");
    let reading = backend.change_mode(&writer, S).await.expect("downgrade").granted().expect("nothing in the way");
    assert!(reading.token > writer.token);
}
