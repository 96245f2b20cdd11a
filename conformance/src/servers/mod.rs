//! Each store's test servers, as every crate's tests and benchmarks start
//! them (a store's own tests, the blocking API's, the command line's): one
//! of each per test binary on free loopback ports, or the one named by the
//! store's `MUTEXTREE_<STORE>_URL` variable; and servers of a test's own,
//! to crash and restart.
//!
//! Each store's module is behind the feature of its name, so that a crate
//! testing one store builds nothing of the others (the etcd module needs
//! etcd's client library). Each has a `SPEC` and a `url()` that the store's
//! own configuration understands; the stores under test (their
//! [`TestStore`](crate::TestStore)s) live in each store crate's
//! `tests/common/`, beside the client they connect with.

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
