//! The blocking handle from plain threads, on the memory store and on each
//! store this build's features name: the same tests, one module per store,
//! each store connected by its URL through `mutextree::blocking::connect`.
//!
//! They live here rather than in the facade because they need every
//! store's client and test servers, which the facade's own build (its
//! example, on a machine without protoc) must not pull in.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mutextree::{blocking, Error, LockBackend, TreeLock};

/// Each store's module: its `store()` (a fresh namespace) and every test.
macro_rules! on_store {
    ($name:ident, $store:expr) => {
        mod $name {
            fn store() -> std::sync::Arc<dyn mutextree::LockBackend> {
                $store
            }

            #[test]
            fn the_guard_releases_when_dropped() {
                super::the_guard_releases_when_dropped(store());
            }

            #[test]
            fn run_releases_after_the_work_and_after_a_panic() {
                super::run_releases_after_the_work_and_after_a_panic(store());
            }

            #[test]
            fn a_waiter_on_another_thread_gets_the_lock_on_release() {
                super::a_waiter_on_another_thread_gets_the_lock_on_release(store());
            }

            #[test]
            fn a_timed_wait_cut_at_its_deadline_leaves_nothing() {
                super::a_timed_wait_cut_at_its_deadline_leaves_nothing(store());
            }
        }
    };
}

/// A store's URL with a fresh namespace.
#[allow(dead_code)] // Unused when no network store is enabled.
fn fresh(url: &str) -> Arc<dyn LockBackend> {
    blocking::connect_with(url, &format!("blocking-{:016x}", fastrand::u64(..))).expect("connect")
}

on_store!(memory, std::sync::Arc::new(mutextree::memory::MemoryBackend::new()));
#[cfg(feature = "redis")]
on_store!(redis, super::fresh(&conformance::servers::redis::url()));
#[cfg(feature = "postgres")]
on_store!(postgres, super::fresh(&conformance::servers::postgres::url()));
#[cfg(feature = "etcd")]
on_store!(etcd, super::fresh(&conformance::servers::etcd::connect_url()));

fn the_guard_releases_when_dropped(store: Arc<dyn LockBackend>) {
    let rack = blocking::TreeLock::new(store.clone(), "dc/rack").expect("lock");
    let host = blocking::TreeLock::new(store, "dc/rack/host").expect("lock");
    {
        let guard = rack.lock().expect("free");
        assert!(guard.token() > 0);
        assert!(matches!(host.try_acquire(), Err(Error::Refused { .. })));
    }
    host.try_acquire().expect("released by the drop");
    host.release().expect("release");
    assert!(matches!(host.release(), Err(Error::NotHeld { .. })));
}

fn run_releases_after_the_work_and_after_a_panic(store: Arc<dyn LockBackend>) {
    let lock = blocking::TreeLock::new(store.clone(), "a").expect("lock");
    assert_eq!(lock.run(|_| 7).expect("run"), 7);
    assert!(!lock.locked().expect("locked"));
    let panicking = lock.clone();
    assert!(thread::spawn(move || panicking.run(|_| panic!("work failed"))).join().is_err());
    assert!(!lock.locked().expect("locked"), "released while unwinding");
}

fn a_waiter_on_another_thread_gets_the_lock_on_release(store: Arc<dyn LockBackend>) {
    let holder = blocking::TreeLock::new(store.clone(), "a/b").expect("lock");
    let guard = holder.lock().expect("free");
    let waiter: blocking::TreeLock =
        TreeLock::builder(store, "a").timeout(Duration::from_secs(30)).build().expect("lock").into();
    let (refused, was_refused) = mpsc::channel();
    let waiting = thread::spawn(move || {
        refused.send(matches!(waiter.try_acquire(), Err(Error::Refused { .. }))).expect("send");
        let started = Instant::now();
        waiter.acquire().map(|_| started.elapsed())
    });
    assert!(was_refused.recv().expect("recv"), "the waiter should find the lock held first");
    guard.release().expect("release");
    let waited = waiting.join().expect("thread").expect("granted after the release");
    assert!(waited < Duration::from_secs(15), "woke on the release, not at a timeout: {waited:?}");
}

/// The blocking face of the conformance race: a holder on another thread
/// releases within 5 ms either side of a timed wait's deadline, 200 times;
/// the wait returns a live grant or times out holding nothing, and nothing
/// is ever left in the store.
fn a_timed_wait_cut_at_its_deadline_leaves_nothing(store: Arc<dyn LockBackend>) {
    let patience = Duration::from_millis(20);
    // The blocking API lists nothing, so the store is asked on a runtime of this test's own.
    let inspect = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (mut granted, mut timed_out) = (0, 0);
    for trial in 0..200 {
        let holder = blocking::TreeLock::new(store.clone(), format!("race-{trial}/A").as_str()).expect("lock");
        holder.try_acquire().expect("a fresh path is free");
        let waiter = blocking::TreeLock::new(store.clone(), format!("race-{trial}").as_str()).expect("lock");
        let release_after = patience - Duration::from_millis(5) + Duration::from_millis(10).mul_f64(fastrand::f64());
        let started = Instant::now();
        let releasing = thread::spawn(move || {
            thread::sleep(release_after.saturating_sub(started.elapsed()));
            holder.release().expect("the holder releases");
        });
        match waiter.acquire_timeout(patience) {
            Ok(_) => {
                granted += 1;
                waiter.release().expect("a grant returned to the waiter is live");
            }
            Err(Error::Timeout { .. }) => timed_out += 1,
            Err(other) => panic!("trial {trial}: {other}"),
        }
        releasing.join().expect("holder thread");
        waiter.settled();
        let left = inspect.block_on(store.list(None)).expect("list");
        assert!(left.is_empty(), "trial {trial}: left {left:?}");
    }
    assert!(granted > 0 && timed_out > 0, "{granted} granted, {timed_out} timed out: the race was not run");
}
