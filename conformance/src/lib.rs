//! The conformance suite every mutextree store runs, unchanged.
//!
//! Every case is a plain `async fn(Ctx)` in [`cases`]; [`suite!`] turns
//! them into one named `#[tokio::test]` per case, so each can be run alone
//! and a failure hides nothing else. A store's crate calls it once, in a
//! test file, with an expression that makes its [`TestStore`]:
//!
//! ```text
//! conformance::suite!(store: MemoryStoreUnderTest::default(), clock: paused);
//! ```
//!
//! This expands into three modules, `native`, `stepwise` and `mixed`, each
//! with every case: the store's own tree operation, core's stepwise
//! algorithm over the store's primitives, and both kinds of client on one
//! namespace (every tree grant alternates between them).
//!
//! `clock: paused` runs the timing cases on tokio's paused clock (the memory
//! store expires locks on it, so ttls pass instantly); `clock: real` runs
//! them in real time with the store's [`Timing`]. Concurrency cases always
//! run in real time on several threads. The calling crate needs `tokio`
//! (with `macros`, `rt-multi-thread`, `test-util`) as a dev-dependency.
//!
//! Each case works in a fresh random namespace, so cases run in parallel
//! against one server without seeing each other.
//!
//! # Adding a store
//!
//! Each store crate has the same few files in the same roles, so knowing
//! one means knowing all:
//!
//! * `src/lib.rs`: only the crate docs
//!   (`#![doc = include_str!("../README.md")]`, its configuration
//!   documented and compiled, and a short map of the files), the `mod`
//!   lines and the `pub use` of the public types.
//! * `src/backend.rs`: the store (`XStore`, opened by `XConfig::connect`,
//!   which is defined here so that the configuration does not depend on
//!   the store) and its [`LockBackend`], `XBackend`: a `try_grant` that is
//!   the store's own one-round-trip atomic operation, and primitives
//!   (`try_lock_key`, `list`) on the same key layout so that stepwise and
//!   native clients interoperate; one grant routine serves both, told
//!   which by core's [`Check`](mutextree_core::backend::Check).
//!   Release and refresh answer a grant that is not live with
//!   [`Error::not_held`].
//! * `src/config.rs`: `XConfig`, read from a URL by core's reader
//!   ([`mutextree_core::backend::url`]) or set in code, checked before anything
//!   connects.
//! * `src/feed.rs`: the store's notifications feeding a
//!   [`ChangeFeed`](mutextree_core::backend::ChangeFeed) for `listen` (one
//!   subscription per backend, marked not live while it is down), in a
//!   task the backend holds in an
//!   [`AbortOnDrop`](mutextree_core::backend::AbortOnDrop), so it ends
//!   with the backend's last clone; likewise the revocations a holder
//!   listens for ([`Revocations`](mutextree_core::backend::Revocations),
//!   for `listen_revocation`; `revoke` announces them), subscribed only
//!   while one listens. It is passed what it needs and does not use the
//!   backend module.
//! * `src/error.rs`: the store's name in errors and the mapping of client
//!   errors into [`Error::Store`] with `retryable` set.
//! * What only this store has keeps files of its own beside these (the
//!   Redis store's `scripts.rs` and `lua/`, PostgreSQL's `schema.rs` and
//!   `migrations/`, etcd's `layout.rs` and `members.rs`). The memory store,
//!   with no settings, server or client errors, has only `lib.rs` and
//!   `backend.rs`.
//! * Its test servers go in a module of [`servers`], behind this crate's
//!   feature of the store's name: a [`harness::ServerSpec`], and a `url()`
//!   that starts the server once per test binary with a
//!   [`harness::SharedServer`].
//! * `tests/common/mod.rs` implements [`TestStore`] on that server (a fresh
//!   connection per `connect`, the namespace given), and
//!   `tests/conformance.rs` calls
//!   `conformance::suite!(store: common::..., clock: real)`.
//! * The facade crate gets a feature for it, and `tests/blocking.rs` here a
//!   module running the blocking API on it; `scripts/test-all` gets the
//!   Debian package of its server in its `needs`; its benchmark runs
//!   `mutextree-load` and its figures go into `BENCHMARKS.md`.
//!
//! # Map
//!
//! * [`cases`]: the behaviour cases (the seed's table, ownership, expiry,
//!   refresh, forced release, fencing, waiting, special names, namespaces,
//!   inspection, bad input).
//! * [`modes`]: the cases of Shared and multi-path grants and of mode
//!   changes (re-exported by [`cases`]).
//! * [`fair`]: the cases of fair waiting: reservations and tickets, FIFO
//!   order, no starvation, no deadlock, nothing left behind, dead waiters
//!   (re-exported by [`cases`] and [`concurrency`]); natively only.
//! * [`concurrency`]: many clients at once, checked by an [`oracle`].
//! * [`model`]: a pure reference model and the proptest comparing a store
//!   with it.
//! * [`segments`]: the proptest over arbitrary segment strings, comparing a
//!   store's grants and listings with the reference.
//! * [`cancel`]: every await point of acquire, release and refresh cancelled
//!   or failed, through a fault-gated backend.
//! * [`proxy`]: a TCP proxy between a client and a real server that
//!   delays, black-holes, cuts and resets the connection, or loses replies.
//! * [`chaos`]: many clients under injected faults (the proxy's, server
//!   crashes, pauses past the ttl), judged from their history.
//! * [`churn`]: how long a waiter for an ancestor waits while its
//!   descendants churn.
//! * [`harness`]: starting real store servers for the tests.
//! * [`servers`]: each store's servers as every crate's tests and
//!   benchmarks start them, behind the store's feature (`redis`,
//!   `postgres`, `etcd`).
//!
//! The load generator behind the benchmarks and `mutextree bench` is the
//! crate `mutextree-load`: the command line ships it, and this crate is
//! only ever a dev-dependency.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cancel::Gated;
use mutextree_core::backend::{Attempt, Listener, LockKind, LockRequest, RevocationListener, Stepwise};
use mutextree_core::{Error, Fairness, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Owner, Ttl};

pub mod cancel;
pub mod cases;
pub mod chaos;
pub mod churn;
pub mod concurrency;
pub mod fair;
#[cfg(test)]
mod flawed;
pub mod harness;
pub mod model;
pub mod modes;
pub mod oracle;
pub mod proxy;
pub mod segments;
pub mod servers;
pub mod telemetry;

/// The store under test, as the suite needs it.
#[async_trait]
pub trait TestStore: Send + Sync + 'static {
    /// A new client (connection) of the namespace `namespace`; clients of
    /// the same name see the same locks, clients of different names none of
    /// each other's.
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error>;

    /// The store's time scales, for cases that wait for ttls.
    fn timing(&self) -> Timing {
        Timing::REAL
    }
}

/// Time scales for the cases that wait for locks to expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The base ttl of timing cases; expiry is checked at `ttl ± slack`.
    pub unit: Duration,
    /// How far from its ttl a lock may be seen expiring: network and clock
    /// granularity. Judged against the ttl the grant reports.
    pub slack: Duration,
}

impl Timing {
    /// For a store on tokio's paused clock: exact.
    pub const PAUSED: Timing = Timing { unit: Duration::from_secs(10), slack: Duration::from_millis(1) };
    /// For a network store on loopback.
    pub const REAL: Timing = Timing { unit: Duration::from_millis(400), slack: Duration::from_millis(150) };
}

/// Which tree operation the clients of a case use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// The store's own atomic tree operation.
    Native,
    /// Core's stepwise algorithm over the store's primitives.
    Stepwise,
    /// Both on one namespace: each client alternates its tree grants
    /// between a native connection and a stepwise one.
    Mixed,
}

impl Algorithm {
    /// Whether clients of this run can hold Shared or multi-path grants
    /// and change a grant's mode. The stepwise algorithm grants single
    /// Exclusive items only and refuses the rest with
    /// [`Error::Unsupported`]; a mixed client sends what the stepwise half
    /// cannot do to its native half.
    pub fn grants_modes(self) -> bool {
        self != Algorithm::Stepwise
    }
}

/// What a case gets: clients of its own fresh namespace.
#[derive(Clone)]
pub struct Ctx {
    store: Arc<dyn TestStore>,
    algorithm: Algorithm,
    namespace: String,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("algorithm", &self.algorithm).field("namespace", &self.namespace).finish()
    }
}

impl Ctx {
    /// A context on a fresh random namespace.
    pub fn new(store: Arc<dyn TestStore>, algorithm: Algorithm) -> Self {
        Ctx { store, algorithm, namespace: random_namespace() }
    }

    /// The algorithm of this run.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The store's time scales.
    pub fn timing(&self) -> Timing {
        self.store.timing()
    }

    /// A new client of this case's namespace, through this run's algorithm.
    pub async fn client(&self) -> Arc<dyn LockBackend> {
        self.client_of(&self.namespace).await
    }

    /// A client of another fresh namespace on the same store.
    pub async fn other_namespace(&self) -> Arc<dyn LockBackend> {
        self.client_of(&random_namespace()).await
    }

    /// A new client of this case's namespace, through this run's algorithm, with
    /// fault gates on its connection (under the stepwise algorithm, if any).
    pub async fn gated_client(&self) -> (Arc<dyn LockBackend>, Arc<Gated>) {
        let gated = Gated::new(self.connect(&self.namespace).await);
        let connection: Arc<dyn LockBackend> = gated.clone();
        (self.in_mode(connection.clone(), connection), gated)
    }

    async fn client_of(&self, namespace: &str) -> Arc<dyn LockBackend> {
        let native = self.connect(namespace).await;
        let second = match self.algorithm {
            Algorithm::Mixed => self.connect(namespace).await,
            _ => native.clone(),
        };
        self.in_mode(native, second)
    }

    /// Puts connections behind this run's tree operation; `second` serves
    /// the stepwise half of a mixed client.
    fn in_mode(&self, native: Arc<dyn LockBackend>, second: Arc<dyn LockBackend>) -> Arc<dyn LockBackend> {
        match self.algorithm {
            Algorithm::Native => native,
            Algorithm::Stepwise => Arc::new(Stepwise::new(native)),
            Algorithm::Mixed => Arc::new(Mixed {
                native,
                stepwise: Stepwise::new(second),
                turn: AtomicUsize::new(fastrand::usize(..2)),
            }),
        }
    }

    async fn connect(&self, namespace: &str) -> Arc<dyn LockBackend> {
        match self.store.connect(namespace).await {
            Ok(client) => client,
            Err(error) => panic!("cannot connect to the store under test: {error}"),
        }
    }
}

/// A fresh random namespace, `t-` and 16 hex digits: each case works in
/// one, and so do a store's own tests and benchmarks.
pub fn random_namespace() -> String {
    format!("t-{:016x}", fastrand::u64(..))
}

/// Runs one case: the body of each test [`suite!`] writes.
pub async fn run_case<S, F, Fut>(store: S, algorithm: Algorithm, case: F)
where
    S: TestStore,
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let store: Arc<dyn TestStore> = Arc::new(store);
    // A hang is a failure, not a stuck test run. On a paused clock the limit
    // passes as soon as the case waits for something that never comes.
    let limit = store.timing().unit * 1000;
    if tokio::time::timeout(limit, case(Ctx::new(store, algorithm))).await.is_err() {
        panic!("the case did not finish within {limit:?}: something it waited for never happened");
    }
}

/// A native and a stepwise client of one namespace behind one face: single
/// Exclusive tree grants alternate between them; Shared and multi-path
/// grants (which the stepwise algorithm refuses), mode changes and
/// everything else go to the native one. So a mixed run still has stepwise
/// Exclusive holders beside native Shared ones.
#[derive(Debug)]
struct Mixed {
    native: Arc<dyn LockBackend>,
    stepwise: Stepwise<dyn LockBackend>,
    turn: AtomicUsize,
}

#[async_trait]
impl LockBackend for Mixed {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.native.try_lock_key(request, kind).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        self.native.release(grant).await
    }

    async fn revoke(&self, grant: &Grant) -> Result<(), Error> {
        self.native.revoke(grant).await
    }

    fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        self.native.listen_revocation(grant)
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        self.native.refresh(grant, ttl).await
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.native.list(under).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        if !request.items.is_single_exclusive() || self.turn.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            self.native.try_grant(request).await
        } else {
            self.stepwise.try_grant(request).await
        }
    }

    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        self.native.change_mode(grant, mode).await
    }

    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        self.native.withdraw(owner, ticket).await
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.native.waiters(under).await
    }

    /// Barging: the stepwise half cannot queue.
    fn fairness(&self) -> Fairness {
        Fairness::Barging
    }

    fn listen(&self, items: &LockItems) -> Listener {
        self.native.listen(items)
    }
}

/// Expands into one named test per case and mode; see the crate docs.
#[macro_export]
macro_rules! suite {
    (store: $store:expr, clock: $clock:ident $(,)?) => {
        fn __conformance_store() -> impl $crate::TestStore {
            $store
        }
        $crate::suite!(@mode native, Native, $clock);
        $crate::suite!(@mode stepwise, Stepwise, $clock);
        $crate::suite!(@mode mixed, Mixed, $clock);
    };
    (@mode $module:ident, $mode:ident, $clock:ident) => {
        mod $module {
            $crate::suite!(@cases $mode, $clock;
                timed seed_node_held_refuses_itself_and_descendants,
                timed seed_child_held_refuses_parent,
                timed seed_grandchild_held_refuses_ancestors,
                timed seed_ancestor_held_refuses_grandchild,
                timed seed_parent_held_refuses_child,
                timed seed_disjoint_roots_coexist,
                timed seed_siblings_coexist,
                timed not_reentrant_for_the_same_owner,
                timed prefix_is_not_an_ancestor,
                timed guard_releases_on_release_and_on_drop,
                timed run_releases_after_success_error_and_panic,
                timed release_and_refresh_of_nothing_held_are_not_held,
                timed only_the_owners_grant_is_released,
                timed stale_grant_cannot_touch_its_successor,
                timed an_expired_grant_stays_expired,
                timed a_slow_grant_never_overlaps_a_faster_one,
                timed expiry_frees_a_crashed_holder,
                timed refresh_sets_the_exact_ttl,
                timed fencing_tokens_strictly_increase,
                timed waiter_wakes_on_release_before_the_ttl,
                timed waiter_wakes_at_the_blockers_expiry,
                timed timeout_reports_the_blocker,
                timed special_names_are_distinct_and_exact,
                timed namespaces_are_isolated,
                timed inspection_lists_exactly_the_live_locks,
                timed bad_input_is_rejected_before_the_store,
                timed extreme_ttls_are_kept_and_never_immortal,
                timed auto_refresh_keeps_the_lock_and_reports_its_loss,
                timed lost_follows_refreshes_and_ignores_releases,
                timed a_forced_release_reaches_its_holder_at_once,
                timed cancellation_leaves_nothing_beyond_the_ttl,
                timed a_timed_wait_cut_at_its_deadline_leaves_nothing,
                timed a_dropped_acquisition_leaves_nothing,
                timed lock_waits_by_default_and_try_lock_does_not,
                timed shared_holders_coexist_on_one_path,
                timed shared_ancestor_refuses_exclusive_descendant,
                timed exclusive_ancestor_refuses_shared_descendant,
                timed siblings_never_conflict_in_any_mode,
                timed racing_upgrades_never_both_win,
                timed a_downgrade_lets_readers_in_and_keeps_writers_out,
                timed a_downgrade_is_refused_under_a_stepwise_lock_in_progress,
                timed a_mode_change_takes_a_new_token_and_keeps_the_expiry,
                timed a_multi_path_refusal_names_every_blocked_item,
                timed a_multi_path_grant_shares_one_token_and_one_fate,
                timed requests_are_normalised_before_the_store,
                timed sixteen_deep_items_or_a_typed_refusal,
                timed a_reservation_refuses_later_requests_and_names_its_waiter,
                timed waiters_defer_only_to_earlier_tickets,
                timed reservations_never_refuse_what_they_do_not_conflict_with,
                timed a_dead_waiters_reservation_lapses_within_its_ttl,
                timed a_wait_that_ends_without_a_grant_leaves_no_reservation,
                timed a_waiter_says_how_long_it_has_been_in_line,
                threaded concurrent_overlapping_paths_never_overlap,
                threaded concurrent_siblings_are_never_refused,
                threaded concurrent_waiters_all_get_their_turn,
                threaded concurrent_deep_and_shallow_never_overlap,
                threaded concurrent_readers_and_writers_never_conflict,
                threaded concurrent_multi_path_grants_are_never_seen_half_granted,
                threaded waiters_are_granted_in_ticket_order,
                threaded an_ancestor_waiter_is_not_starved_by_churn_below_it,
                threaded crossing_waiters_never_deadlock,
                model model_agrees_with_the_reference,
                segments arbitrary_segments_agree_with_the_reference,
            );
        }
    };
    (@paused paused) => { true };
    (@paused real) => { false };
    (@cases $mode:ident, $clock:ident; $($kind:ident $case:ident),* $(,)?) => {
        $( $crate::suite!(@test $kind, $clock, $mode, $case); )*
    };
    (@test timed, paused, $mode:ident, $case:ident) => {
        #[tokio::test(start_paused = true)]
        async fn $case() {
            $crate::run_case(super::__conformance_store(), $crate::Algorithm::$mode, $crate::cases::$case).await;
        }
    };
    (@test timed, real, $mode:ident, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::run_case(super::__conformance_store(), $crate::Algorithm::$mode, $crate::cases::$case).await;
        }
    };
    (@test threaded, $clock:ident, $mode:ident, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            $crate::run_case(super::__conformance_store(), $crate::Algorithm::$mode, $crate::concurrency::$case).await;
        }
    };
    (@test model, $clock:ident, $mode:ident, $case:ident) => {
        #[test]
        fn $case() {
            $crate::model::check(super::__conformance_store, $crate::Algorithm::$mode, $crate::suite!(@paused $clock));
        }
    };
    (@test segments, $clock:ident, $mode:ident, $case:ident) => {
        #[test]
        fn $case() {
            $crate::segments::check(super::__conformance_store, $crate::Algorithm::$mode, $crate::suite!(@paused $clock));
        }
    };
}
