//! What only the etcd store promises: how leases carry ttls, how release
//! and refresh treat a lease that is gone, the key layout, the transaction
//! size at the depth limit, and configuration errors.

mod common;

use std::time::Duration;

use conformance::servers::etcd;
use etcd_client::Client;
use mutextree_core::backend::{Attempt, LockRequest};
use mutextree_core::{Error, Grant, LockBackend, LockPath, Owner, Ttl, MAX_DEPTH};
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
        Attempt::Blocked(blocker) => panic!("{at} should be free, blocked by {blocker}"),
    }
}

async fn raw_client() -> Client {
    Client::connect([etcd::url()], None).await.expect("a plain etcd client")
}

/// The key a lock is stored under, read with a plain client.
async fn stored(namespace: &str, at: &str) -> Option<etcd_client::KeyValue> {
    let key = format!("{}/{namespace}/{}", EtcdConfig::DEFAULT_PREFIX, path(at).key());
    raw_client().await.get(key, None).await.expect("get").take_kvs().into_iter().next()
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
        Attempt::Blocked(held) => {
            assert_eq!(held.path, path("short"));
            assert!(held.remaining <= short.ttl && !held.remaining.is_zero(), "{held:?}");
        }
        Attempt::Granted(grant) => panic!("a 1 ms lock lives its applied {:?}, but {grant:?}", short.ttl),
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

/// One key per lock, on a lease (never lease 0, which would never expire),
/// holding the kind and the owner; the fencing token is the key's create
/// revision, the revision of the granting transaction.
#[tokio::test]
async fn keys_are_laid_out_as_documented() {
    let (backend, namespace) = fresh().await;
    let held = grant(&backend, "a\\/b/c d", Duration::from_secs(30)).await;
    let record = stored(&namespace, "a\\/b/c d").await.expect("stored");
    assert_eq!(record.key_str().expect("utf-8"), format!("mutextree/{namespace}/a%2Fb/c d/"));
    assert_eq!(record.value(), b"Letcd-test");
    assert_ne!(record.lease(), 0);
    assert_eq!(record.create_revision() as u64, held.token);
    let next = grant(&backend, "x", Duration::from_secs(30)).await;
    assert!(next.token > held.token);
    let mut client = raw_client().await;
    let all = client.get(format!("mutextree/{namespace}/"), Some(etcd_client::GetOptions::new().with_prefix()));
    assert_eq!(all.await.expect("get").kvs().len(), 2, "one key per lock, nothing else");
}

/// The deepest path with the longest names is one transaction within
/// etcd's default limits (128 operations, 1.5 MiB), granted or refused.
#[tokio::test]
async fn the_deepest_path_fits_one_transaction() {
    let (backend, _) = fresh().await;
    let name = |i: usize| format!("{i:02}{}", "x".repeat(mutextree_core::MAX_PATH_BYTES / MAX_DEPTH - 2));
    let deepest = LockPath::new((0..MAX_DEPTH).map(name)).expect("the deepest path");
    let parent = deepest.parent().expect("parent");
    let ttl = Duration::from_secs(30);
    let granted = backend.try_grant(&request(&deepest, ttl)).await.expect("grant").granted().expect("free");
    match backend.try_grant(&request(&parent, ttl)).await.expect("attempt") {
        Attempt::Blocked(held) => assert_eq!(held.path, deepest),
        other => panic!("{other:?}"),
    }
    backend.release(&granted).await.expect("release");
    let top = backend.try_grant(&request(&parent, ttl)).await.expect("grant").granted().expect("free");
    match backend.try_grant(&request(&deepest, ttl)).await.expect("attempt") {
        Attempt::Blocked(held) => assert_eq!(held.path, parent),
        other => panic!("{other:?}"),
    }
    backend.release(&top).await.expect("release");
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
