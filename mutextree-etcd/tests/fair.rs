//! Fair waiting as the etcd store does it: each kind of attempt
//! (`Try`, `Join`, `Waiting`) in one transaction, a reservation's keys and
//! ticket as a plain client sees them, their renewal and their lapse on a
//! short lease of their own, `withdraw`, `waiters` (and how long each
//! waiter has been in line), and the transaction's size with the
//! reservation checks counted.

mod common;

use std::time::Duration;

use conformance::servers::etcd;
use etcd_client::{Client, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};
use mutextree_core::backend::{Attempt, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::{Error, Fairness, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Owner, Ttl};
use mutextree_etcd::{EtcdBackend, EtcdConfig};
use tokio::time::{sleep, timeout, Instant};

const S: Mode = Mode::Shared;
const X: Mode = Mode::Exclusive;

fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("path")
}

fn request(list: &[(&str, Mode)], who: &str, queue: Queue) -> LockRequest {
    let items = LockItems::new(list.iter().map(|(at, mode)| (path(at), *mode))).expect("items");
    let ttl = Ttl::new(Duration::from_secs(60)).expect("ttl");
    LockRequest::of(items, Owner::new(who).expect("owner"), ttl).in_queue(queue)
}

async fn fresh() -> (EtcdBackend, String) {
    let namespace = conformance::random_namespace();
    (common::backend(&[etcd::url()], &namespace).await.expect("connect"), namespace)
}

/// Another client (its own connection) on the same namespace.
async fn another(namespace: &str) -> EtcdBackend {
    common::backend(&[etcd::url()], namespace).await.expect("connect")
}

async fn attempt(backend: &EtcdBackend, list: &[(&str, Mode)], who: &str, queue: Queue) -> Attempt {
    backend.try_grant(&request(list, who, queue)).await.expect("attempt")
}

async fn granted(backend: &EtcdBackend, list: &[(&str, Mode)], who: &str, queue: Queue) -> Grant {
    match attempt(backend, list, who, queue).await {
        Attempt::Granted(grant) => grant,
        other => panic!("{list:?} should be granted, but {other:?}"),
    }
}

fn queued(outcome: Attempt) -> (u64, Vec<HeldLock>) {
    match outcome {
        Attempt::Queued { ticket, blockers } => (ticket, blockers.into_vec()),
        other => panic!("should be queued, but {other:?}"),
    }
}

fn blocked(outcome: Attempt) -> Vec<HeldLock> {
    match outcome {
        Attempt::Blocked(blockers) => blockers.into_vec(),
        other => panic!("should be refused without a ticket, but {other:?}"),
    }
}

/// Path, mode, owner, token and whether it is a reservation.
fn named(held: &[HeldLock]) -> Vec<(String, Mode, String, u64, bool)> {
    held.iter().map(|h| (h.path.to_string(), h.mode, h.owner.as_str().to_owned(), h.token, h.waiting)).collect()
}

async fn raw_client() -> Client {
    Client::connect([etcd::url()], None).await.expect("a plain etcd client")
}

/// Every reservation key of the namespace, read with a plain client.
async fn reservation_keys(namespace: &str) -> Vec<KeyValue> {
    let prefix = format!("{}/{namespace}/r", EtcdConfig::DEFAULT_PREFIX);
    raw_client().await.get(prefix, Some(GetOptions::new().with_prefix())).await.expect("get").take_kvs()
}

/// A store that queues waiters says so.
#[tokio::test]
async fn the_store_is_fair() {
    let (backend, _) = fresh().await;
    assert_eq!(backend.fairness(), Fairness::Fair);
}

/// A try is refused by a conflicting reservation, whatever its ticket,
/// naming it (as a waiter, its ticket as the token) and writing nothing;
/// a barging request and requests that do not conflict with it (a
/// sibling; a Shared request under a Shared waiter) are not delayed.
#[tokio::test]
async fn a_try_is_refused_by_a_reservation_and_names_it() {
    let (backend, namespace) = fresh().await;
    let holder = granted(&backend, &[("A/B", X)], "holder", Queue::Try).await;
    granted(&backend, &[("P/W", X)], "writer", Queue::Try).await;
    let (ticket, _) = queued(attempt(&backend, &[("A", X)], "waiter", Queue::Join).await);
    let (reader_ticket, _) = queued(attempt(&backend, &[("P", S)], "reader", Queue::Join).await);
    let before = reservation_keys(&namespace).await;
    for at in ["A/C", "A/C/D"] {
        let refused = blocked(attempt(&backend, &[(at, X)], "late", Queue::Try).await);
        assert_eq!(named(&refused), [("A".into(), X, "waiter".into(), ticket, true)], "{at}");
        assert!(refused[0].remaining <= Duration::from_secs(3) && !refused[0].remaining.is_zero());
    }
    // A Shared request is in the way of an Exclusive waiter above it too.
    assert_eq!(named(&blocked(attempt(&backend, &[("A/C", S)], "late", Queue::Try).await))[0].3, ticket);
    let after = reservation_keys(&namespace).await;
    assert_eq!(
        after.iter().map(|kv| (kv.key().to_vec(), kv.mod_revision())).collect::<Vec<_>>(),
        before.iter().map(|kv| (kv.key().to_vec(), kv.mod_revision())).collect::<Vec<_>>(),
        "a refused try writes nothing"
    );
    // Not in the waiter's way: granted.
    granted(&backend, &[("B", X)], "sibling", Queue::Try).await;
    granted(&backend, &[("A/C", X)], "barger", Queue::Barge).await;
    // A Shared waiter holds up writers, not readers.
    let refused = blocked(attempt(&backend, &[("P/Q", X)], "writer", Queue::Try).await);
    assert_eq!(named(&refused), [("P".into(), S, "reader".into(), reader_ticket, true)]);
    granted(&backend, &[("P/Q", S)], "another reader", Queue::Try).await;
    // A grant in the way is named before a reservation.
    let refused = blocked(attempt(&backend, &[("A/B/x", X)], "late", Queue::Try).await);
    assert_eq!(named(&refused), [("A/B".into(), X, "holder".into(), holder.token, false)]);
}

/// A refused `Join` writes its reservation in the same transaction: one
/// request, and the reservation's keys have that transaction's revision as
/// their create revision, which is the ticket: above every token granted
/// before, below every token granted after. The waiter is then listed.
#[tokio::test]
async fn join_writes_the_reservation_in_the_same_transaction() {
    let (backend, namespace) = fresh().await;
    let holder = granted(&backend, &[("A", X)], "holder", Queue::Try).await;
    // The backend's first wait takes the lease reservations go on.
    queued(attempt(&backend, &[("A/warm", X)], "warm", Queue::Join).await);
    let other = granted(&backend, &[("Z", X)], "other", Queue::Try).await;
    let sent = backend.round_trips().expect("counted");
    let (ticket, blockers) = queued(attempt(&backend, &[("A/B", X), ("C", S)], "waiter", Queue::Join).await);
    assert_eq!(backend.round_trips().expect("counted") - sent, 1, "one transaction");
    assert_eq!(named(&blockers), [("A".into(), X, "holder".into(), holder.token, false)]);
    assert!(ticket > holder.token && ticket > other.token, "{ticket} after every token before it");
    let keys: Vec<KeyValue> = reservation_keys(&namespace)
        .await
        .into_iter()
        .filter(|kv| kv.key_str().is_ok_and(|key| key.contains("waiter")))
        .collect();
    // Each key ends with the wait's tag, after the owner.
    let split: Vec<(&str, &str)> =
        keys.iter().map(|kv| kv.key_str().expect("utf-8").split_once('\x1f').expect("owner, tag")).collect();
    let tag = split[0].1;
    assert!(tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit()), "{tag:?}");
    assert!(split.iter().all(|(_, each)| *each == tag), "one tag: {split:?}");
    let names: Vec<String> = split.iter().map(|(name, _)| format!("{name}\x1f")).collect();
    assert_eq!(
        names,
        [
            format!("mutextree/{namespace}/r/A/B//xwaiter\x1f"),
            format!("mutextree/{namespace}/r/C//swaiter\x1f"),
            format!("mutextree/{namespace}/rx/A/B//waiter\x1f"),
        ]
    );
    assert!(keys.iter().all(|kv| kv.create_revision() as u64 == ticket), "written by the refused transaction");
    let lease = raw_client().await.lease_time_to_live(keys[0].lease(), None).await.expect("lookup");
    let reservation_ttl = RESERVATION_TTL.as_secs() as i64;
    assert!(keys.iter().all(|kv| kv.lease() == keys[0].lease()) && lease.granted_ttl() == reservation_ttl);
    let later = granted(&backend, &[("Y", X)], "later", Queue::Try).await;
    assert!(later.token > ticket, "tickets and tokens are one sequence");
    let waiting: Vec<_> = named(&backend.waiters(None).await.expect("waiters"))
        .into_iter()
        .filter(|(_, _, who, _, _)| who == "waiter")
        .collect();
    assert_eq!(
        waiting,
        [("A/B".into(), X, "waiter".into(), ticket, true), ("C".into(), S, "waiter".into(), ticket, true)]
    );
}

/// A `Waiting` attempt is held up only by earlier conflicting waiters (and
/// grants), never by later ones or its own reservation; its refusal renews
/// the reservation (a young lease, same ticket, same create revision) and
/// writes it again once it lapsed; its grant deletes it in the same
/// transaction.
#[tokio::test]
async fn waiting_renews_and_a_grant_deletes_it() {
    let (backend, namespace) = fresh().await;
    let holder = granted(&backend, &[("A/B", X)], "holder", Queue::Try).await;
    let (first, _) = queued(attempt(&backend, &[("A", X)], "first", Queue::Join).await);
    let (second, blockers) = queued(attempt(&backend, &[("A/C", X)], "second", Queue::Join).await);
    assert!(second > first);
    assert_eq!(named(&blockers), [("A".into(), X, "first".into(), first, true)]);
    let written = reservation_keys(&namespace).await;

    // Renewed on a younger lease: past the first lease's ttl, still there.
    // (The later one is renewed too: one written again would have every
    // waiter look once more, see the rewrite test below.)
    let started = Instant::now();
    while started.elapsed() < RESERVATION_TTL + Duration::from_secs(1) {
        sleep(RESERVATION_TTL / 3).await;
        let (again, _) = queued(attempt(&backend, &[("A", X)], "first", Queue::Waiting(first)).await);
        assert_eq!(again, first, "the same ticket");
        queued(attempt(&backend, &[("A/C", X)], "second", Queue::Waiting(second)).await);
    }
    let renewed = reservation_keys(&namespace).await;
    let mine = |kvs: &[KeyValue]| {
        kvs.iter().find(|kv| kv.key_str().is_ok_and(|key| key.contains("/r/A//xfirst\x1f"))).cloned().expect("there")
    };
    let (before, after) = (mine(&written), mine(&renewed));
    assert_eq!(after.create_revision(), before.create_revision(), "the same keys, kept");
    assert!(after.mod_revision() > before.mod_revision() && after.lease() != before.lease(), "{after:?}");

    // The later waiter is held up by the earlier one alone.
    backend.release(&holder).await.expect("release");
    let (again, blockers) = queued(attempt(&backend, &[("A/C", X)], "second", Queue::Waiting(second)).await);
    assert_eq!((again, named(&blockers)), (second, vec![("A".into(), X, "first".into(), first, true)]));
    let sent = backend.round_trips().expect("counted");
    let grant = granted(&backend, &[("A", X)], "first", Queue::Waiting(first)).await;
    assert_eq!(backend.round_trips().expect("counted") - sent, 1, "one transaction");
    let left: Vec<String> =
        reservation_keys(&namespace).await.iter().map(|kv| kv.key_str().expect("utf-8").to_owned()).collect();
    assert!(left.iter().all(|key| key.contains("second")) && left.len() == 2, "{left:?}");
    assert!(grant.token > second);
    // Now only the grant holds it up.
    let blockers = queued(attempt(&backend, &[("A/C", X)], "second", Queue::Waiting(second)).await).1;
    assert_eq!(named(&blockers), [("A".into(), X, "first".into(), grant.token, false)]);
    backend.release(&grant).await.expect("release");
    granted(&backend, &[("A/C", X)], "second", Queue::Waiting(second)).await;
    assert!(reservation_keys(&namespace).await.is_empty());

    // A reservation that lapsed is written again by the next refusal,
    // with its ticket and when its waiter joined.
    let holder = granted(&backend, &[("L", X)], "holder", Queue::Try).await;
    let joining = Instant::now();
    let (ticket, _) = queued(attempt(&backend, &[("L", X)], "slow", Queue::Join).await);
    wait_for_deletes(&namespace, Duration::from_secs(5)).await;
    assert!(backend.waiters(None).await.expect("waiters").is_empty(), "lapsed");
    let rewriting = Instant::now();
    let (again, _) = queued(attempt(&backend, &[("L", X)], "slow", Queue::Waiting(ticket)).await);
    assert_eq!(again, ticket);
    let listed = backend.waiters(None).await.expect("waiters");
    let (since_join, since_rewrite) = (joining.elapsed(), rewriting.elapsed());
    assert_eq!(named(&listed), [("L".into(), X, "slow".into(), ticket, true)]);
    let waited = listed[0].waited;
    assert!(waited > since_rewrite && waited <= since_join, "{waited:?}: {since_join:?} since the join");
    backend.release(&holder).await.expect("release");
}

/// How long the namespace's one waiter has been in line, as `waiters`
/// says it for each of its items: the least and the most (each item is
/// read against the clock on its own, so they may be a millisecond apart).
async fn waited(backend: &EtcdBackend) -> (Duration, Duration) {
    let listed = backend.waiters(None).await.expect("waiters");
    let least = listed.iter().map(|held| held.waited).min().expect("a waiter");
    let most = listed.iter().map(|held| held.waited).max().expect("a waiter");
    assert!(most - least <= Duration::from_millis(1), "{listed:?}");
    (least, most)
}

/// A reservation says how long its waiter has been in line since its
/// `Join` (by the clocks of the waiter and the reader, here one), through
/// its renewals by the backend that queued it and by another one that
/// reads its keys: in the list of waiters and in the refusals it causes.
/// A grant has not waited.
#[tokio::test]
async fn a_reservation_says_how_long_its_waiter_has_been_in_line() {
    let (backend, namespace) = fresh().await;
    let holder = granted(&backend, &[("A/B", X)], "holder", Queue::Try).await;
    let items = [("A", X), ("C", S)];
    let joining = Instant::now();
    let (ticket, _) = queued(attempt(&backend, &items, "waiter", Queue::Join).await);
    let first = waited(&backend).await;
    assert!(first.1 <= joining.elapsed(), "{first:?}");
    // Time passing has no event.
    sleep(Duration::from_millis(400)).await;
    let renewing = Instant::now();
    assert_eq!(queued(attempt(&backend, &items, "waiter", Queue::Waiting(ticket)).await).0, ticket);
    sleep(Duration::from_millis(100)).await;
    let second = waited(&backend).await;
    let (since_join, since_renewal) = (joining.elapsed(), renewing.elapsed());
    assert!(second.0 > first.1 && second.1 <= since_join, "{first:?}, then {second:?} ({since_join:?} since the join)");
    assert!(
        second.0 > since_renewal,
        "{second:?}: in line since the join, not since the renewal {since_renewal:?} ago"
    );
    let keys = reservation_keys(&namespace).await;
    assert!(keys.iter().all(|kv| kv.mod_revision() > kv.create_revision()), "renewed: {keys:?}");

    // Renewed by another client, which reads the join time from the keys.
    let other = another(&namespace).await;
    let renewing = Instant::now();
    assert_eq!(queued(attempt(&other, &items, "waiter", Queue::Waiting(ticket)).await).0, ticket);
    let third = waited(&other).await;
    let (since_join, since_renewal) = (joining.elapsed(), renewing.elapsed());
    assert!(
        third.0 >= second.1 && third.0 > since_renewal && third.1 <= since_join,
        "{third:?} ({since_join:?} since the join)"
    );

    // A refusal by the reservation says it too; a grant has not waited.
    let refused = blocked(attempt(&backend, &[("A/C", X)], "late", Queue::Try).await);
    assert_eq!(named(&refused), [("A".into(), X, "waiter".into(), ticket, true)]);
    assert!(refused[0].waited >= third.1 && refused[0].waited <= joining.elapsed(), "{refused:?}");
    let refused = blocked(attempt(&backend, &[("A/B/x", X)], "late", Queue::Try).await);
    assert_eq!((refused[0].token, refused[0].waited), (holder.token, Duration::ZERO));
    let held = backend.list(None).await.expect("list");
    assert!(held.len() == 1 && held[0].waited.is_zero(), "{held:?}");
}

/// A reservation's value as written before join times were kept (no
/// `@<ms>`) still reads, as a waiter that has not waited; a renewal by a
/// client that does not know the wait puts a join time in it.
#[tokio::test]
async fn a_reservation_stored_without_a_join_time_reads_as_not_waited() {
    let (backend, namespace) = fresh().await;
    granted(&backend, &[("A", X)], "holder", Queue::Try).await;
    let (ticket, _) = queued(attempt(&backend, &[("A/B", X)], "waiter", Queue::Join).await);
    let mut raw = raw_client().await;
    for kv in reservation_keys(&namespace).await {
        assert!(kv.value().contains(&b'@'), "{kv:?}");
        let options = PutOptions::new().with_lease(kv.lease());
        raw.put(kv.key(), b"Q\x1fwaiter".to_vec(), Some(options)).await.expect("put");
    }
    // Time passing has no event: long enough to show in a join time.
    sleep(Duration::from_millis(50)).await;
    let listed = backend.waiters(None).await.expect("waiters");
    assert_eq!(named(&listed), [("A/B".into(), X, "waiter".into(), ticket, true)]);
    assert!(listed[0].waited.is_zero(), "{listed:?}");
    queued(attempt(&another(&namespace).await, &[("A/B", X)], "waiter", Queue::Waiting(ticket)).await);
    let keys = reservation_keys(&namespace).await;
    assert!(!keys.is_empty() && keys.iter().all(|kv| kv.value().contains(&b'@')), "{keys:?}");
}

/// Waits for the next delete of a reservation key of the namespace (a
/// lapse, a withdrawal), at most `limit`; how long it took.
async fn wait_for_deletes(namespace: &str, limit: Duration) -> Duration {
    let mut client = raw_client().await;
    let prefix = format!("{}/{namespace}/r", EtcdConfig::DEFAULT_PREFIX);
    let mut stream = client.watch(prefix, Some(WatchOptions::new().with_prefix())).await.expect("watch");
    let started = Instant::now();
    timeout(limit, async {
        loop {
            let response = stream.message().await.expect("watch").expect("open");
            if response.events().iter().any(|event| event.event_type() == EventType::Delete) {
                return;
            }
        }
    })
    .await
    .expect("a reservation key deleted in time");
    started.elapsed()
}

/// A waiter that stops renewing (its process died: nothing renews a
/// reservation but its attempts) is gone within `RESERVATION_TTL` by
/// etcd's own expiry (then its sweep of expired leases and a commit, the
/// harness's slack, as for a grant's ttl), and then blocks nobody.
#[tokio::test]
async fn a_dead_waiters_reservation_lapses_within_the_reservation_ttl() {
    let (backend, namespace) = fresh().await;
    let holder = granted(&backend, &[("A/B", X)], "holder", Queue::Try).await;
    let dead = another(&namespace).await;
    let joined_at = Instant::now();
    let (ticket, _) = queued(attempt(&dead, &[("A", X)], "dead", Queue::Join).await);
    drop(dead);
    let refused = blocked(attempt(&backend, &[("A/C", X)], "late", Queue::Try).await);
    assert_eq!(named(&refused)[0].3, ticket);
    wait_for_deletes(&namespace, RESERVATION_TTL * 2).await;
    let gone_after = joined_at.elapsed();
    assert!(gone_after <= RESERVATION_TTL + common::TIMING.slack, "lapsed after {gone_after:?}");
    assert!(reservation_keys(&namespace).await.is_empty());
    granted(&backend, &[("A/C", X)], "late", Queue::Try).await;
    backend.release(&holder).await.expect("release");
}

/// `withdraw` deletes the reservation of that owner and ticket (from the
/// backend that queued it, or any other), and only that one; the delete
/// wakes the waiters behind it, which then pass.
#[tokio::test]
async fn withdraw_removes_the_reservation_and_wakes_the_waiters_behind() {
    let (backend, namespace) = fresh().await;
    let behind = request(&[("A/C", X)], "second", Queue::Join);
    // Once the watch is confirmed by the server, listeners wake on events.
    common::until_watched(&mut backend.listen(&behind.items)).await;
    granted(&backend, &[("A/B", X)], "holder", Queue::Try).await;
    let joined_at = Instant::now();
    let (first, _) = queued(attempt(&backend, &[("A", X)], "first", Queue::Join).await);
    let mut listener = backend.listen(&behind.items);
    let (second, blockers) = queued(backend.try_grant(&behind).await.expect("attempt"));
    assert_eq!(named(&blockers)[0].3, first);

    // Another owner, or another ticket: nothing changes.
    backend.withdraw(&Owner::new("second").expect("owner"), first).await.expect("withdraw");
    backend.withdraw(&Owner::new("first").expect("owner"), second).await.expect("withdraw");
    assert_eq!(backend.waiters(None).await.expect("waiters").len(), 2);

    backend.withdraw(&Owner::new("first").expect("owner"), first).await.expect("withdraw");
    let left = reservation_keys(&namespace).await;
    assert!(left.iter().all(|kv| kv.key_str().is_ok_and(|key| key.contains("second"))), "{left:?}");
    // Well before the reservation could have lapsed (it lives 2.5 s at least).
    assert!(joined_at.elapsed() < Duration::from_secs(2), "too slow to tell a withdrawal from a lapse");
    timeout(Duration::from_secs(1), listener.changed()).await.expect("woken by the withdrawal");
    granted(&backend, &[("A/C", X)], "second", Queue::Waiting(second)).await;
    backend.withdraw(&Owner::new("first").expect("owner"), first).await.expect("again: nothing to do");

    // A ticket this backend never queued: another client withdraws it.
    let (third, _) = queued(attempt(&backend, &[("A/B/x", S)], "third", Queue::Join).await);
    another(&namespace).await.withdraw(&Owner::new("third").expect("owner"), third).await.expect("withdraw");
    assert!(reservation_keys(&namespace).await.is_empty());
}

/// `waiters` lists each reservation's items (one entry per item, its
/// mode, owner and ticket, `waiting` set), in key order, under a path or
/// in the whole namespace; `list` shows grants only.
#[tokio::test]
async fn waiters_lists_one_entry_per_item_in_key_order() {
    let (backend, _) = fresh().await;
    let holder = granted(&backend, &[("A", X), ("C/D", S)], "holder", Queue::Try).await;
    let (one, _) = queued(attempt(&backend, &[("C", X), ("A/B", S)], "one", Queue::Join).await);
    let (two, _) = queued(attempt(&backend, &[("A", S)], "two", Queue::Join).await);
    let everyone = backend.waiters(None).await.expect("waiters");
    assert_eq!(
        named(&everyone),
        [
            ("A".into(), S, "two".into(), two, true),
            ("A/B".into(), S, "one".into(), one, true),
            ("C".into(), X, "one".into(), one, true),
        ]
    );
    assert!(everyone.iter().all(|h| !h.remaining.is_zero() && h.remaining <= RESERVATION_TTL && !h.transient));
    let under_a = backend.waiters(Some(&path("A/B"))).await.expect("waiters");
    assert_eq!(named(&under_a), [("A/B".into(), S, "one".into(), one, true)]);
    assert!(backend.waiters(Some(&path("B"))).await.expect("waiters").is_empty());
    let held = backend.list(None).await.expect("list");
    assert!(held.iter().all(|h| !h.waiting && h.token == holder.token) && held.len() == 2, "{held:?}");
}

/// The reservation checks count against `max_txn_ops` as the grant's own
/// do: a request whose transaction would need more is refused before
/// anything is sent; a barging one needs only the grant's.
#[tokio::test]
async fn max_txn_ops_counts_the_reservation_checks() {
    let small = EtcdConfig::new([etcd::url()]).max_txn_ops(7).connect().await.expect("connect");
    let small = small.backend(&conformance::random_namespace()).expect("namespace");
    granted(&small, &[("warm", X)], "x", Queue::Try).await;
    let sent = small.round_trips().expect("counted");
    // Exclusive at depth 3: 6 compares for the grant, 3 for the waiters.
    let error = small.try_grant(&request(&[("a/b/c", X)], "x", Queue::Try)).await.expect_err("too big");
    assert!(matches!(error, Error::Unsupported { store: "etcd", .. }), "{error:?}");
    assert!(error.to_string().contains("9 operations"), "{error}");
    assert_eq!(small.round_trips().expect("counted"), sent, "nothing sent");
    granted(&small, &[("a/b/c", X)], "x", Queue::Barge).await;
    // At depth 2: 6 to try; a refused waiter writes 2 keys beside its 6
    // reads, the read of the reservations written again and the rewrite
    // mark's put (counted for a `Join` too, which waits on).
    granted(&small, &[("p/q", X)], "x", Queue::Try).await;
    let error = small.try_grant(&request(&[("r/s", X)], "x", Queue::Join)).await.expect_err("too big");
    assert!(error.to_string().contains("10 operations"), "{error}");
    let error = small.try_grant(&request(&[("r/s", X)], "x", Queue::Waiting(2))).await.expect_err("too big");
    assert!(error.to_string().contains("10 operations"), "{error}");
    granted(&small, &[("u/v", S)], "x", Queue::Join).await;
    granted(&small, &[("t", X)], "x", Queue::Join).await;
}

/// One owner's two waits on one node are two reservations: the later one
/// waits behind the earlier one, and neither's grant or withdrawal takes
/// the other's away. A wait's tag is reused by the next once its keys are
/// gone, so a node's keys do not pile up.
#[tokio::test]
async fn one_owners_two_waits_are_two_reservations() {
    let (backend, namespace) = fresh().await;
    let holder = granted(&backend, &[("A", X)], "twice", Queue::Try).await;
    let (first, _) = queued(attempt(&backend, &[("A", X), ("B", X)], "twice", Queue::Join).await);
    let (second, blockers) = queued(attempt(&backend, &[("B", X)], "twice", Queue::Join).await);
    assert_eq!(named(&blockers), [("B".into(), X, "twice".into(), first, true)], "behind its own earlier wait");
    let tickets: Vec<u64> = backend.waiters(None).await.expect("waiters").iter().map(|h| h.token).collect();
    assert_eq!(tickets, [first, first, second]);
    // Still behind it, however often it asks.
    let (again, blockers) = queued(attempt(&backend, &[("B", X)], "twice", Queue::Waiting(second)).await);
    assert_eq!((again, named(&blockers)[0].3), (second, first));
    backend.withdraw(&Owner::new("twice").expect("owner"), first).await.expect("withdraw");
    let tickets: Vec<u64> = backend.waiters(None).await.expect("waiters").iter().map(|h| h.token).collect();
    assert_eq!(tickets, [second], "the later wait keeps its reservation");
    let second_tags = tags_of(&namespace).await;
    let grant = granted(&backend, &[("B", X)], "twice", Queue::Waiting(second)).await;
    assert!(reservation_keys(&namespace).await.is_empty());
    // The next wait takes a tag whose keys are gone: the same keys again.
    backend.release(&grant).await.expect("release");
    let (third, _) = queued(attempt(&backend, &[("A", X), ("B", X)], "twice", Queue::Join).await);
    let tags = tags_of(&namespace).await;
    assert!(tags.len() == 4 && tags.iter().all(|tag| tag == &second_tags[0]), "{tags:?} after {second_tags:?}");
    backend.withdraw(&Owner::new("twice").expect("owner"), third).await.expect("withdraw");
    backend.release(&holder).await.expect("release");
}

/// The tags of the namespace's reservation keys.
async fn tags_of(namespace: &str) -> Vec<String> {
    let keys = reservation_keys(namespace).await;
    keys.iter().map(|kv| kv.key_str().expect("utf-8").rsplit_once('\x1f').expect("tag").1.to_owned()).collect()
}

/// A reservation written again (after a withdrawal here, a lapse alike)
/// keeps its place in ticket order: a later waiter that saw it before is
/// still held up by it, although its keys are new (a new create revision,
/// after the later waiter's ticket), and the earlier waiter goes first.
#[tokio::test]
async fn a_reservation_written_again_still_holds_up_later_waiters() {
    let (backend, namespace) = fresh().await;
    let other = another(&namespace).await;
    let holder = granted(&backend, &[("A", X)], "holder", Queue::Try).await;
    let (first, _) = queued(attempt(&backend, &[("A", X)], "first", Queue::Join).await);
    let (second, blockers) = queued(attempt(&other, &[("A", X)], "second", Queue::Join).await);
    assert_eq!(named(&blockers), [("A".into(), X, "holder".into(), holder.token, false)]);

    backend.withdraw(&Owner::new("first").expect("owner"), first).await.expect("withdraw");
    let (again, _) = queued(attempt(&backend, &[("A", X)], "first", Queue::Waiting(first)).await);
    assert_eq!(again, first, "the same ticket");
    backend.release(&holder).await.expect("release");

    let (again, blockers) = queued(attempt(&other, &[("A", X)], "second", Queue::Waiting(second)).await);
    assert_eq!((again, named(&blockers)), (second, vec![("A".into(), X, "first".into(), first, true)]));
    let grant = granted(&backend, &[("A", X)], "first", Queue::Waiting(first)).await;
    backend.release(&grant).await.expect("release");
    granted(&other, &[("A", X)], "second", Queue::Waiting(second)).await;
}

/// A later waiter finds an earlier one written again after it joined (its
/// keys created after the later ticket): a refusal of two items names a
/// blocker for each, the grant in the way of one and the earlier waiter in
/// the way of the other; and once only that waiter is in the way, it holds
/// the later one up, even if it was written again after the later one's
/// last look, when it was not there.
#[tokio::test]
async fn a_waiter_finds_an_earlier_reservation_written_again_after_it_joined() {
    let (backend, namespace) = fresh().await;
    let other = another(&namespace).await;
    let on_z = granted(&backend, &[("Z", X)], "h1", Queue::Try).await;
    let on_b = granted(&backend, &[("B", X)], "h2", Queue::Try).await;
    let first_owner = Owner::new("first").expect("owner");
    let (first, _) = queued(attempt(&backend, &[("A/C", X), ("Z", X)], "first", Queue::Join).await);
    backend.withdraw(&first_owner, first).await.expect("withdraw");
    let (second, blockers) = queued(attempt(&other, &[("A", X), ("B", X)], "second", Queue::Join).await);
    assert_eq!(named(&blockers), [("B".into(), X, "h2".into(), on_b.token, false)]);
    queued(attempt(&backend, &[("A/C", X), ("Z", X)], "first", Queue::Waiting(first)).await);

    let blockers = queued(attempt(&other, &[("A", X), ("B", X)], "second", Queue::Waiting(second)).await).1;
    let in_the_way = [("A/C".into(), X, "first".into(), first, true), ("B".into(), X, "h2".into(), on_b.token, false)];
    assert_eq!(named(&blockers), in_the_way);

    // Gone at the later waiter's last look, written again after it.
    backend.withdraw(&first_owner, first).await.expect("withdraw");
    let blockers = queued(attempt(&other, &[("A", X), ("B", X)], "second", Queue::Waiting(second)).await).1;
    assert_eq!(named(&blockers), [("B".into(), X, "h2".into(), on_b.token, false)]);
    queued(attempt(&backend, &[("A/C", X), ("Z", X)], "first", Queue::Waiting(first)).await);
    backend.release(&on_b).await.expect("release");
    let blockers = queued(attempt(&other, &[("A", X), ("B", X)], "second", Queue::Waiting(second)).await).1;
    assert_eq!(named(&blockers), [("A/C".into(), X, "first".into(), first, true)]);

    backend.release(&on_z).await.expect("release");
    granted(&backend, &[("A/C", X), ("Z", X)], "first", Queue::Waiting(first)).await;
}
