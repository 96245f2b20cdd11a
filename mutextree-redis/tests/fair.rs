//! Fair waiting on the Redis store, on a standalone server and on the
//! cluster: what the grant scripts decide with waiters' reservations in the
//! namespace, what they write in its keys, what a withdrawal and the list
//! of waiters do (how long each waiter has been in line, too), and that a
//! namespace without a live reservation pays nothing for the queue.

mod common;

use std::time::{Duration, Instant};

use common::{announced, answer, command_calls, heard, raw, raw_members, script, Redis};
use mutextree_core::backend::{Attempt, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::{
    Blockers, Fairness, Grant, HeldLock, LockBackend, LockItem, LockItems, LockPath, Mode, Owner, Ttl,
};
use mutextree_redis::{RedisBackend, RedisConfig};

const LONG: Duration = Duration::from_secs(60);
const EXCLUSIVE: Mode = Mode::Exclusive;
const SHARED: Mode = Mode::Shared;

fn path(text: &str) -> LockPath {
    LockPath::parse(text).expect("path")
}

fn request(of: &[(&str, Mode)], queue: Queue) -> LockRequest {
    let items =
        LockItems::new(of.iter().map(|(text, mode)| LockItem { path: path(text), mode: *mode })).expect("items");
    LockRequest::of(items, Owner::random(), Ttl::new(LONG).expect("ttl")).in_queue(queue)
}

async fn backend(store: &Redis) -> RedisBackend {
    store.backend(&format!("fair-{:016x}", fastrand::u64(..))).await.expect("connect")
}

async fn attempt(backend: &RedisBackend, request: &LockRequest) -> Attempt {
    backend.try_grant(request).await.expect("the store answers")
}

async fn granted(backend: &RedisBackend, request: &LockRequest) -> Grant {
    match attempt(backend, request).await {
        Attempt::Granted(grant) => grant,
        other => panic!("{} refused: {other:?}", request.items),
    }
}

/// The blockers of a plain refusal (a try's).
fn blocked(attempt: Attempt) -> Blockers {
    match attempt {
        Attempt::Blocked(blockers) => blockers,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The ticket and blockers of a refusal that queued.
fn queued(attempt: Attempt) -> (u64, Blockers) {
    match attempt {
        Attempt::Queued { ticket, blockers } => (ticket, blockers),
        other => panic!("expected to wait in the queue, got {other:?}"),
    }
}

/// A blocker as `path mode owner token waiting`.
fn shown(blocker: &HeldLock) -> String {
    format!("{} {} {} {} {}", blocker.path, blocker.mode, blocker.owner, blocker.token, blocker.waiting)
}

fn reservation(request: &LockRequest, item: usize, ticket: u64) -> String {
    let item = request.items.iter().nth(item).expect("item");
    format!("{} {} {} {ticket} true", item.path, item.mode, request.owner)
}

/// The live reservations of the namespace, as `shown`.
async fn waiting(backend: &RedisBackend, under: Option<&str>) -> Vec<String> {
    let under = under.map(path);
    backend.waiters(under.as_ref()).await.expect("waiters").iter().map(shown).collect()
}

/// The fields of the namespace's reservations' hash whose name starts with
/// `prefix`.
async fn queue_fields(store: &Redis, backend: &RedisBackend, prefix: &str) -> Vec<String> {
    raw_members(store, &backend.keys()[5]).await.into_iter().filter(|field| field.starts_with(prefix)).collect()
}

async fn a_try_is_refused_by_a_reservation_and_names_it(store: Redis) {
    let backend = backend(&store).await;
    assert_eq!(backend.fairness(), Fairness::Fair);
    let holder = granted(&backend, &request(&[("A/x", EXCLUSIVE)], Queue::Try)).await;
    let waiter = request(&[("A", EXCLUSIVE)], Queue::Join);
    let (ticket, blockers) = queued(attempt(&backend, &waiter).await);
    assert_eq!(shown(blockers.first()), format!("A/x exclusive {} {} false", holder.owner, holder.token));

    // No grant is in the way of A/y, but the waiter on A is: a try is
    // refused by it, whatever its mode, and names it.
    for mode in [EXCLUSIVE, SHARED] {
        let blockers = blocked(attempt(&backend, &request(&[("A/y", mode)], Queue::Try)).await);
        assert_eq!(blockers.iter().map(shown).collect::<Vec<_>>(), [reservation(&waiter, 0, ticket)], "{mode}");
        let left = blockers.first().remaining;
        assert!(left > Duration::ZERO && left <= RESERVATION_TTL, "{left:?}");
    }
    // A multi-path try: a blocker for the item in the waiter's way, the
    // grant for the item a grant is in the way of, none for the free one.
    let many = request(&[("A/x/1", SHARED), ("A/z", SHARED), ("B", EXCLUSIVE)], Queue::Try);
    let blockers = blocked(attempt(&backend, &many).await);
    let expected = [format!("A/x exclusive {} {} false", holder.owner, holder.token), reservation(&waiter, 0, ticket)];
    assert_eq!(blockers.iter().map(shown).collect::<Vec<_>>(), expected);

    // Siblings of the waiter's path are never refused, and a barging
    // request does not look at the queue.
    let sibling = granted(&backend, &request(&[("B/y", EXCLUSIVE)], Queue::Try)).await;
    let barging = granted(&backend, &request(&[("A/y", EXCLUSIVE)], Queue::Barge)).await;
    for grant in [holder, sibling, barging] {
        backend.release(&grant).await.expect("release");
    }
}

async fn a_shared_reservation_delays_writers_only(store: Redis) {
    let backend = backend(&store).await;
    let holder = granted(&backend, &request(&[("P/C/x", EXCLUSIVE)], Queue::Try)).await;
    let reader = request(&[("P/C", SHARED)], Queue::Join);
    let (ticket, _) = queued(attempt(&backend, &reader).await);
    // The reservation lives on until the waiter's next attempt.
    backend.release(&holder).await.expect("release");
    // Writers on its node, above it and below it come after it.
    for asked in ["P", "P/C", "P/C/w"] {
        let blockers = blocked(attempt(&backend, &request(&[(asked, EXCLUSIVE)], Queue::Try)).await);
        assert_eq!(shown(blockers.first()), reservation(&reader, 0, ticket), "{asked}");
    }
    // Readers there, and writers beside it, do not.
    for (asked, mode) in [("P", SHARED), ("P/C/w", SHARED), ("P/D", EXCLUSIVE)] {
        let grant = granted(&backend, &request(&[(asked, mode)], Queue::Try)).await;
        backend.release(&grant).await.expect("release");
    }
}

async fn a_join_writes_one_reservation_with_a_ticket_above_every_token(store: Redis) {
    let backend = backend(&store).await;
    let mut tokens = Vec::new();
    for held in [("X/1", EXCLUSIVE), ("X/2", SHARED), ("Y", SHARED)] {
        tokens.push(granted(&backend, &request(&[held], Queue::Try)).await.token);
    }
    let waiter = request(&[("X", EXCLUSIVE), ("Z", SHARED)], Queue::Join);
    let (ticket, blockers) = queued(attempt(&backend, &waiter).await);
    assert!(tokens.iter().all(|token| *token < ticket), "ticket {ticket} after tokens {tokens:?}");
    assert_eq!(blockers.len(), 1, "Z is free: {blockers:?}");
    assert_eq!(
        waiting(&backend, None).await,
        [reservation(&waiter, 0, ticket), reservation(&waiter, 1, ticket)],
        "one reservation, one entry per item"
    );
    assert_eq!(queue_fields(&store, &backend, "ticket ").await, [format!("ticket {ticket}")]);
    assert_eq!(raw_members(&store, &backend.keys()[6]).await.len(), 2, "an index entry per item");
    // Tickets and tokens are one sequence.
    let next = granted(&backend, &request(&[("W", EXCLUSIVE)], Queue::Try)).await;
    assert!(next.token > ticket);
    // A try writes nothing.
    blocked(attempt(&backend, &request(&[("X/1", EXCLUSIVE)], Queue::Try)).await);
    assert_eq!(queue_fields(&store, &backend, "ticket ").await.len(), 1);
}

async fn waiting_renews_the_reservation_and_a_grant_removes_it(store: Redis) {
    // One Exclusive item (its own script) and several items.
    for of in [&[("A/b", EXCLUSIVE)][..], &[("A/b", SHARED), ("C", EXCLUSIVE)][..]] {
        let backend = backend(&store).await;
        let holder = granted(&backend, &request(&[("A", EXCLUSIVE)], Queue::Try)).await;
        let waiter = request(of, Queue::Join);
        let (ticket, _) = queued(attempt(&backend, &waiter).await);
        let again = waiter.in_queue(Queue::Waiting(ticket));
        // Time passing has no event.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let before = backend.waiters(None).await.expect("waiters")[0].remaining;
        assert!(before < RESERVATION_TTL - Duration::from_secs(1), "{before:?}");
        assert_eq!(queued(attempt(&backend, &again).await).0, ticket, "the same ticket");
        let after = backend.waiters(None).await.expect("waiters")[0].remaining;
        assert!(after > before + Duration::from_secs(1), "renewed: {before:?}, then {after:?}");

        // Gone (withdrawn here, lapsed alike): written again, same ticket.
        backend.withdraw(&waiter.owner, ticket).await.expect("withdraw");
        assert!(waiting(&backend, None).await.is_empty());
        assert_eq!(queued(attempt(&backend, &again).await).0, ticket);
        let expected: Vec<String> = (0..of.len()).map(|item| reservation(&waiter, item, ticket)).collect();
        assert_eq!(waiting(&backend, None).await, expected);

        backend.release(&holder).await.expect("release");
        let grant = granted(&backend, &again).await;
        assert!(grant.token > ticket);
        assert!(waiting(&backend, None).await.is_empty(), "the grant took the reservation away");
        assert!(queue_fields(&store, &backend, "ticket ").await.is_empty());
        assert!(raw_members(&store, &backend.keys()[6]).await.is_empty());
        backend.release(&grant).await.expect("release");
    }
}

/// How long the namespace's one waiter has been in line, as the list of
/// waiters says it for each of its items.
async fn waited(backend: &RedisBackend) -> Duration {
    let listed = backend.waiters(None).await.expect("waiters");
    assert!(!listed.is_empty() && listed.iter().all(|held| held.waited == listed[0].waited), "{listed:?}");
    listed[0].waited
}

async fn a_reservation_says_how_long_its_waiter_has_been_in_line(store: Redis) {
    // One Exclusive item (its own script) and several items.
    for of in [&[("A/b", EXCLUSIVE)][..], &[("A/b", SHARED), ("C", EXCLUSIVE)][..]] {
        let backend = backend(&store).await;
        let holder = granted(&backend, &request(&[("A/b/held", EXCLUSIVE)], Queue::Try)).await;
        let waiter = request(of, Queue::Join);
        let joining = Instant::now();
        let (ticket, _) = queued(attempt(&backend, &waiter).await);
        let first = waited(&backend).await;
        assert!(first <= joining.elapsed(), "{first:?}");
        // Time passing has no event.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let renewing = Instant::now();
        assert_eq!(queued(attempt(&backend, &waiter.in_queue(Queue::Waiting(ticket))).await).0, ticket);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = waited(&backend).await;
        let (since_join, since_renewal) = (joining.elapsed(), renewing.elapsed());
        assert!(second > first && second <= since_join, "{first:?}, then {second:?} ({since_join:?} since the join)");
        assert!(
            second > since_renewal,
            "{second:?}: in line since the join, not since the renewal {since_renewal:?} ago"
        );

        // A refusal by the reservation says it too; a grant has not waited.
        let blocker =
            blocked(attempt(&backend, &request(&[("A/b/other", EXCLUSIVE)], Queue::Try)).await).first().clone();
        assert_eq!((blocker.token, blocker.waiting), (ticket, true));
        assert!(blocker.waited >= second && blocker.waited <= joining.elapsed(), "{blocker:?}");
        let blocker =
            blocked(attempt(&backend, &request(&[("A/b/held", EXCLUSIVE)], Queue::Try)).await).first().clone();
        assert_eq!((blocker.token, blocker.waited), (holder.token, Duration::ZERO));
        let held = backend.list(None).await.expect("list");
        assert!(held.len() == 1 && held[0].waited.is_zero(), "{held:?}");
        backend.withdraw(&waiter.owner, ticket).await.expect("withdraw");
        backend.release(&holder).await.expect("release");
    }
}

async fn a_lapsed_reservation_written_again_keeps_when_its_waiter_joined(store: Redis) {
    let backend = backend(&store).await;
    let holder = granted(&backend, &request(&[("L", EXCLUSIVE)], Queue::Try)).await;
    let slow = request(&[("L/slow", EXCLUSIVE)], Queue::Join);
    let joining = Instant::now();
    let (ticket, _) = queued(attempt(&backend, &slow).await);
    // Another waiter joins later and keeps the queue alive; it attempts
    // nothing more (the sweep of a later write would remove the lapsed
    // reservation).
    tokio::time::sleep(RESERVATION_TTL / 2).await;
    let other = request(&[("L/other", EXCLUSIVE)], Queue::Join);
    queued(attempt(&backend, &other).await);
    let left = backend.waiters(Some(&path("L/slow"))).await.expect("waiters")[0].remaining;
    // Expiry has no event: past the slow waiter's reported life.
    tokio::time::sleep(left + Duration::from_millis(20)).await;
    let listed = backend.waiters(None).await.expect("waiters");
    assert!(listed.len() == 1 && listed[0].owner == other.owner, "lapsed: {listed:?}");

    let renewing = Instant::now();
    assert_eq!(queued(attempt(&backend, &slow.in_queue(Queue::Waiting(ticket))).await).0, ticket);
    let listed = backend.waiters(Some(&path("L/slow"))).await.expect("waiters");
    let (since_join, since_renewal) = (joining.elapsed(), renewing.elapsed());
    assert_eq!(listed.len(), 1);
    let waited = listed[0].waited;
    assert!(waited > since_renewal && waited <= since_join, "{waited:?}: {since_join:?} since the join");
    backend.release(&holder).await.expect("release");
}

async fn a_dead_waiters_reservation_lapses_and_then_blocks_nobody(store: Redis) {
    let backend = backend(&store).await;
    let holder = granted(&backend, &request(&[("A/x", EXCLUSIVE)], Queue::Try)).await;
    // A waiter that joins and never comes back.
    let joined_at = Instant::now();
    let (ticket, _) = queued(attempt(&backend, &request(&[("A", EXCLUSIVE)], Queue::Join)).await);
    backend.release(&holder).await.expect("release");
    let later = request(&[("A/y", EXCLUSIVE)], Queue::Try);
    let blocker = blocked(attempt(&backend, &later).await).first().clone();
    assert_eq!((blocker.token, blocker.waiting), (ticket, true));
    // Expiry has no event: past the reservation's reported life.
    tokio::time::sleep(blocker.remaining + Duration::from_millis(20)).await;
    let grant = granted(&backend, &later).await;
    assert!(joined_at.elapsed() < RESERVATION_TTL + Duration::from_millis(500), "{:?}", joined_at.elapsed());
    assert!(waiting(&backend, None).await.is_empty());
    // The grant found the namespace's queue dead and dropped it whole.
    let keys = backend.keys();
    for key in &keys[5..] {
        assert!(raw_members(&store, key).await.is_empty(), "{key} is left");
    }
    assert!(!raw_members(&store, &keys[0]).await.contains(&"queue until".to_owned()));
    backend.release(&grant).await.expect("release");
}

async fn dead_reservations_are_swept_while_others_wait(store: Redis) {
    let backend = backend(&store).await;
    let holder = granted(&backend, &request(&[("H", EXCLUSIVE)], Queue::Try)).await;
    // Ten waiters that join and never come back, then one that stays.
    for n in 0..10 {
        queued(attempt(&backend, &request(&[(&format!("H/dead-{n}"), EXCLUSIVE)], Queue::Join)).await);
    }
    let live = request(&[("H/live", EXCLUSIVE)], Queue::Join);
    let (ticket, _) = queued(attempt(&backend, &live).await);
    let renewal = live.in_queue(Queue::Waiting(ticket));
    // Time passing has no event: renewed once before the dead ones lapse,
    // then after.
    tokio::time::sleep(RESERVATION_TTL * 2 / 3).await;
    queued(attempt(&backend, &renewal).await);
    tokio::time::sleep(RESERVATION_TTL / 2).await;
    // Each renewal sweeps a few of the expired entries.
    for _ in 0..3 {
        queued(attempt(&backend, &renewal).await);
    }
    assert_eq!(waiting(&backend, None).await, [reservation(&live, 0, ticket)]);
    let keys = backend.keys();
    let left = [raw_members(&store, &keys[5]).await, raw_members(&store, &keys[7]).await].concat();
    assert!(left.iter().all(|field| !field.contains("dead")), "{left:?}");
    assert_eq!(queue_fields(&store, &backend, "ticket ").await, [format!("ticket {ticket}")]);
    assert_eq!(raw_members(&store, &keys[6]).await.len(), 1);
    backend.release(&holder).await.expect("release");
}

async fn waiters_lists_live_reservations_in_key_order(store: Redis) {
    let backend = backend(&store).await;
    let holder = granted(&backend, &request(&[("R", EXCLUSIVE)], Queue::Try)).await;
    let mut expected = Vec::new();
    for of in [&[("R/b", EXCLUSIVE)][..], &[("R/a", SHARED), ("S", SHARED)][..], &[("R", SHARED)][..]] {
        let waiter = request(of, Queue::Join);
        let (ticket, _) = queued(attempt(&backend, &waiter).await);
        expected.extend((0..of.len()).map(|item| reservation(&waiter, item, ticket)));
    }
    // R, R/a, R/b, S: key order, whatever the tickets'.
    expected.sort_by_key(|line| path(line.split(' ').next().expect("path")));
    assert_eq!(waiting(&backend, None).await, expected);
    assert_eq!(waiting(&backend, Some("R/a")).await, expected[1..2]);
    assert_eq!(waiting(&backend, Some("R")).await, expected[..3]);
    assert!(waiting(&backend, Some("T")).await.is_empty());
    let listed = backend.waiters(None).await.expect("waiters");
    assert!(listed.iter().all(|held| held.remaining <= RESERVATION_TTL && !held.transient), "{listed:?}");
    // Reservations are not locks.
    let locks = backend.list(None).await.expect("list");
    assert_eq!(locks.len(), 1);
    backend.release(&holder).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_removes_its_owners_reservation_and_tells_waiters() {
    let store = Redis::standalone();
    let backend = backend(&store).await;
    let mut messages = announced(&store, backend.keys()).await;

    let holder = granted(&backend, &request(&[("A", EXCLUSIVE)], Queue::Try)).await;
    let waiter = request(&[("A/b", EXCLUSIVE), ("C", SHARED)], Queue::Join);
    let (ticket, _) = queued(attempt(&backend, &waiter).await);
    let listed = waiting(&backend, None).await;
    assert_eq!(listed.len(), 2);
    backend.withdraw(&Owner::random(), ticket).await.expect("someone else's: nothing to do");
    backend.withdraw(&waiter.owner, ticket + 1).await.expect("another ticket: nothing to do");
    assert_eq!(waiting(&backend, None).await, listed, "only its owner withdraws it");

    backend.withdraw(&waiter.owner, ticket).await.expect("withdraw");
    assert!(waiting(&backend, None).await.is_empty());
    granted(&backend, &request(&[("C", EXCLUSIVE)], Queue::Try)).await;
    backend.withdraw(&waiter.owner, ticket).await.expect("gone already: fine");
    backend.release(&holder).await.expect("release");
    // In order, and nothing else: the withdrawal's items, then the
    // release's (the second withdrawal removed nothing).
    assert_eq!(heard(&mut messages, 2).await, ["A/b/\nC/", "A/"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_stored_without_its_join_time_reads_as_just_joined() {
    let store = Redis::standalone();
    let backend = backend(&store).await;
    let mut raw = raw(store.url()).await;
    let holder = granted(&backend, &request(&[("A", EXCLUSIVE)], Queue::Try)).await;
    let waiter = request(&[("A/b", EXCLUSIVE), ("C", SHARED)], Queue::Join);
    let (ticket, _) = queued(attempt(&backend, &waiter).await);
    let (queue, field) = (&backend.keys()[5], format!("ticket {ticket}"));
    let value: String = redis::cmd("HGET").arg(queue).arg(&field).query_async(&mut raw).await.expect("hget");
    // As the version before join times wrote it: no line of digits after
    // the first.
    let mut lines: Vec<&str> = value.lines().collect();
    assert!(lines.len() == 4 && lines[1].parse::<u64>().is_ok(), "{value:?}");
    lines.remove(1);
    let _: () =
        redis::cmd("HSET").arg(queue).arg(&field).arg(lines.join("\n")).query_async(&mut raw).await.expect("hset");
    // Time passing has no event: long enough to show in a join time.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listed = backend.waiters(None).await.expect("waiters");
    let expected: Vec<String> = (0..2).map(|item| reservation(&waiter, item, ticket)).collect();
    assert_eq!(listed.iter().map(shown).collect::<Vec<_>>(), expected);
    assert!(listed.iter().all(|held| held.waited.is_zero()), "{listed:?}");
    // Its renewal writes the join time again, from then on.
    queued(attempt(&backend, &waiter.in_queue(Queue::Waiting(ticket))).await);
    let value: String = redis::cmd("HGET").arg(queue).arg(&field).query_async(&mut raw).await.expect("hget");
    assert_eq!(value.lines().count(), 4, "{value:?}");
    backend.withdraw(&waiter.owner, ticket).await.expect("withdraw");
    backend.release(&holder).await.expect("release");
}

/// The commands (the scripts' own included) that `requests` cost, each
/// granted, in that order.
async fn cost(backend: &RedisBackend, raw: &mut redis::aio::MultiplexedConnection, requests: &[LockRequest]) -> u64 {
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(raw).await.expect("resetstat");
    for request in requests {
        granted(backend, request).await;
    }
    command_calls(raw, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_costs_nothing_while_no_reservation_is_alive() {
    // A server of its own: command counts are server-wide.
    let data = conformance::harness::temp_dir("redis-data").expect("temp dir");
    let server = conformance::servers::redis::own_server(None, &[], &data).expect("redis-server");
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let store = RedisConfig::from_url(&url).expect("url").connect().await.expect("connect");
    let backend = store.backend("fair").expect("namespace");
    let mut raw = raw(&url).await;
    // Sixteen grants of one Exclusive item take sixteen tokens in a row, so
    // each batch holds one periodic sweep.
    let batch = |round: &str, queue: Queue, of: &[Mode]| -> Vec<LockRequest> {
        (0..16)
            .map(|n| {
                let paths: Vec<String> = (0..of.len()).map(|i| format!("{round}-{}/{n}/item-{i}", of.len())).collect();
                let items: Vec<(&str, Mode)> = paths.iter().map(String::as_str).zip(of.iter().copied()).collect();
                request(&items, queue)
            })
            .collect()
    };
    // The scripts known to the server first.
    cost(&backend, &mut raw, &batch("warm", Queue::Barge, &[EXCLUSIVE])).await;
    cost(&backend, &mut raw, &batch("warm-2", Queue::Barge, &[EXCLUSIVE, SHARED])).await;
    for of in [&[EXCLUSIVE][..], &[EXCLUSIVE, SHARED][..]] {
        let barging = cost(&backend, &mut raw, &batch("barge", Queue::Barge, of)).await;
        for (round, queue) in [("try", Queue::Try), ("join", Queue::Join), ("waiting", Queue::Waiting(1))] {
            let fair = cost(&backend, &mut raw, &batch(round, queue, of)).await;
            assert_eq!(fair, barging, "{queue:?} {of:?}: as many commands as a barging grant");
        }
    }

    // A waiter elsewhere: fair grants look for reservations in their way.
    let holder = granted(&backend, &request(&[("elsewhere", EXCLUSIVE)], Queue::Try)).await;
    let (ticket, _) = queued(attempt(&backend, &request(&[("elsewhere/below", EXCLUSIVE)], Queue::Join)).await);
    let barging = cost(&backend, &mut raw, &batch("barge-again", Queue::Barge, &[EXCLUSIVE])).await;
    let fair = cost(&backend, &mut raw, &batch("fair-again", Queue::Try, &[EXCLUSIVE])).await;
    assert!(fair > barging, "{fair} commands, {barging} barging, with a live reservation {ticket}");
    // Once no reservation can be alive, they stop looking.
    tokio::time::sleep(RESERVATION_TTL).await;
    backend.release(&holder).await.expect("release");
    granted(&backend, &request(&[("sweeper", EXCLUSIVE)], Queue::Try)).await;
    let barging = cost(&backend, &mut raw, &batch("barge-last", Queue::Barge, &[EXCLUSIVE])).await;
    let fair = cost(&backend, &mut raw, &batch("fair-last", Queue::Try, &[EXCLUSIVE])).await;
    assert_eq!(fair, barging);
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_requests_sent_twice_get_the_first_answer() {
    let store = Redis::standalone();
    let backend = backend(&store).await;
    let keys = backend.keys().to_vec();
    let raw = raw(store.url()).await;
    // One Exclusive item, by its own script; two items, by the other.
    let cases = [
        (script(include_str!("../src/lua/grant_one.lua")), &[("exclusive", "one")][..]),
        (script(include_str!("../src/lua/grant.lua")), &[("exclusive", "many"), ("shared", "other")][..]),
    ];
    for (script, items) in &cases {
        for round in ["resent", "late"] {
            let call = |nonce: &str, standing: &str| {
                let mut call = script.prepare_invoke();
                call.key(&keys).arg("tree").arg(30_000).arg(0).arg(format!("{round}-{}-{nonce}", items[0].1));
                call.arg("me").arg(standing);
                for (mode, node) in *items {
                    call.arg(format!("{round}-{node}/")).arg(*mode);
                }
                call
            };
            let send = |nonce: &'static str, standing: String| {
                let call = call(nonce, &standing);
                let mut raw = raw.clone();
                async move { answer(&call.invoke_async::<redis::Value>(&mut raw).await.expect("answered")) }
            };
            let first_node = format!("{round}-{}", items[0].1);
            let holder = granted(&backend, &request(&[(first_node.as_str(), EXCLUSIVE)], Queue::Try)).await;
            let (kind, ticket) = send("join", "join".to_owned()).await;
            assert_eq!(kind, 2, "queued");
            if round == "resent" {
                assert_eq!(send("join", "join".to_owned()).await, (2, ticket), "the same request keeps its ticket");
                assert_eq!(queue_fields(&store, &backend, "ticket ").await, [format!("ticket {ticket}")]);
                backend.release(&holder).await.expect("release");
                let (kind, token) = send("wait", ticket.to_string()).await;
                assert_eq!(kind, 1, "granted");
                assert_eq!(send("wait", ticket.to_string()).await, (1, token), "the same grant");
                let held = backend.list(None).await.expect("list");
                assert_eq!(held.iter().filter(|h| h.token == token as u64).count(), items.len(), "granted once");
            } else {
                // The join's answer was lost, and it is sent again once it
                // can be granted: the grant of its ticket, which goes.
                backend.release(&holder).await.expect("release");
                let (kind, token) = send("join", "join".to_owned()).await;
                assert_eq!(kind, 1, "granted");
                assert!(token > ticket);
                assert_eq!(send("join", "join".to_owned()).await, (1, token), "the same grant");
            }
            assert!(queue_fields(&store, &backend, "ticket ").await.is_empty(), "the grant took the reservation");
            assert!(waiting(&backend, None).await.is_empty());
        }
    }
}

common::on_both!(
    a_try_is_refused_by_a_reservation_and_names_it,
    a_shared_reservation_delays_writers_only,
    a_join_writes_one_reservation_with_a_ticket_above_every_token,
    waiting_renews_the_reservation_and_a_grant_removes_it,
    a_reservation_says_how_long_its_waiter_has_been_in_line,
    a_lapsed_reservation_written_again_keeps_when_its_waiter_joined,
    a_dead_waiters_reservation_lapses_and_then_blocks_nobody,
    dead_reservations_are_swept_while_others_wait,
    waiters_lists_live_reservations_in_key_order,
);
