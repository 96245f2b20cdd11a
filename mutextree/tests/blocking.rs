//! The blocking handle from plain threads, on every store this build has:
//! the same tests, one module per store.

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
        }
    };
}

/// A store's URL with a fresh namespace.
#[allow(dead_code)] // Unused when no network store is enabled.
fn fresh(url: &str) -> Arc<dyn LockBackend> {
    let separator = if url.contains('?') { '&' } else { '?' };
    blocking::connect(&format!("{url}{separator}namespace=blocking-{:016x}", fastrand::u64(..))).expect("connect")
}

on_store!(memory, std::sync::Arc::new(mutextree::memory::MemoryBackend::new()));
#[cfg(feature = "redis")]
on_store!(redis, super::fresh(&conformance::servers::redis_url()));
#[cfg(feature = "postgres")]
on_store!(postgres, super::fresh(&super::postgres_server::connect_url()));
#[cfg(feature = "etcd")]
on_store!(etcd, super::fresh(&super::etcd_server::connect_url()));

// The servers as the stores' own tests start them.
#[cfg(feature = "etcd")]
#[path = "../../mutextree-etcd/tests/common/mod.rs"]
mod etcd_server;
#[cfg(feature = "postgres")]
#[path = "../../mutextree-postgres/tests/common/mod.rs"]
mod postgres_server;
