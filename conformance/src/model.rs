//! The reference model of tree locks, and the property comparing a store
//! with it.
//!
//! [`Model`] is the contract of SPEC §3 in a few lines of plain code: a
//! grant succeeds iff no live lock overlaps; release and refresh act only on
//! a live grant with the same path, owner and token; a lock lives until its
//! ttl. Proptest generates sequences of acquire, release, refresh and time
//! advances; each step runs on the store and on the model, and the outcomes
//! and the set of live locks must agree after every step.
//!
//! Time: the model's clock is virtual and the store's is tokio's (paused for
//! the memory store) or real. Advances are whole units and ttls are
//! `(k + ½)` units, so no expiry ever falls within half a unit of an
//! operation: real-time jitter smaller than that cannot change an outcome.
//! A history whose steps fall more than a quarter unit behind the virtual
//! schedule (a slow machine) stops there. Each proptest case runs on its
//! own runtime and a fresh namespace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::acquire;
use mutextree_core::backend::LockRequest;
use mutextree_core::Wait;
use mutextree_core::{Error, Grant, LockBackend, LockPath, Owner, Ttl};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::time::{sleep_until, Instant};

use crate::{Algorithm, Ctx, TestStore};

/// The paths of the model's tree: parents, children, a grandchild and
/// names that share a prefix without being related.
const PATHS: [&str; 8] = ["A", "A/B", "A/B/C", "A/C", "AB", "B", "B/A", "A/BC"];
const CLIENTS: usize = 2;

/// One step of a generated history.
#[derive(Clone, Debug)]
pub enum Op {
    /// `client` tries `PATHS[path]` without waiting, for `ttl_units + ½` units.
    Acquire {
        /// Which client.
        client: usize,
        /// Index into the model's paths.
        path: usize,
        /// Whole units of the ttl (half a unit is added).
        ttl_units: u32,
    },
    /// `client` releases one of the grants it ever got (live or not).
    Release {
        /// Which client.
        client: usize,
        /// Which of its grants, modulo how many it has.
        slot: usize,
    },
    /// `client` refreshes one of the grants it ever got to `ttl_units + ½`.
    Refresh {
        /// Which client.
        client: usize,
        /// Which of its grants, modulo how many it has.
        slot: usize,
        /// Whole units of the new ttl (half a unit is added).
        ttl_units: u32,
    },
    /// Time passes.
    Advance {
        /// Whole units.
        units: u32,
    },
    /// The live locks are listed and compared with the model's. Only at
    /// these steps: a listing may clean up expired locks, which would hide a
    /// store that wrongly revives them on release or refresh.
    Inspect,
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..CLIENTS;
    prop_oneof![
        4 => (client.clone(), 0..PATHS.len(), 1..4u32).prop_map(|(client, path, ttl_units)| Op::Acquire { client, path, ttl_units }),
        2 => (client.clone(), any::<usize>()).prop_map(|(client, slot)| Op::Release { client, slot }),
        1 => (client, any::<usize>(), 1..4u32).prop_map(|(client, slot, ttl_units)| Op::Refresh { client, slot, ttl_units }),
        1 => (1..3u32).prop_map(|units| Op::Advance { units }),
        1 => Just(Op::Inspect),
    ]
}

/// A live lock in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelLock {
    path: LockPath,
    owner: Owner,
    token: u64,
    expires: Duration,
}

/// The reference: live locks on a virtual clock.
#[derive(Debug, Default)]
pub struct Model {
    now: Duration,
    locks: Vec<ModelLock>,
}

impl Model {
    fn expire(&mut self) {
        let now = self.now;
        self.locks.retain(|lock| lock.expires > now);
    }

    fn blockers(&self, path: &LockPath) -> Vec<&ModelLock> {
        self.locks.iter().filter(|lock| lock.path.overlaps(path)).collect()
    }

    fn find(&self, grant: &Grant) -> Option<usize> {
        self.locks
            .iter()
            .position(|lock| lock.path == *grant.path() && lock.owner == grant.owner && lock.token == grant.token)
    }
}

/// Runs the property for a store; the body of the `model` test of [`suite!`](crate::suite).
pub fn check<S: TestStore>(store: fn() -> S, algorithm: Algorithm, paused: bool) {
    let config = Config {
        cases: if paused { 128 } else { 12 },
        failure_persistence: None,
        max_shrink_iters: if paused { 2048 } else { 64 },
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(op(), 1..40);
    let outcome = runner.run(&strategy, |ops| {
        let runtime = if paused {
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        }
        .expect("runtime");
        runtime.block_on(run_history(Arc::new(store()), algorithm, ops)).map_err(TestCaseError::fail)
    });
    if let Err(error) = outcome {
        panic!("the store disagrees with the reference model: {error}");
    }
}

async fn run_history(store: Arc<dyn TestStore>, algorithm: Algorithm, ops: Vec<Op>) -> Result<(), String> {
    let ctx = Ctx::new(store, algorithm);
    let unit = ctx.timing().unit;
    let mut clients: Vec<Arc<dyn LockBackend>> = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(ctx.client().await);
    }
    let owners: Vec<Owner> = (0..CLIENTS).map(|c| Owner::new(format!("client-{c}")).expect("owner")).collect();
    let paths: Vec<LockPath> = PATHS.iter().map(|p| LockPath::parse(p).expect("path")).collect();
    let mut history: HashMap<usize, Vec<Grant>> = HashMap::new();
    let mut model = Model::default();
    let mut last_token = 0;
    let start = Instant::now();
    let half_units = |units: u32| unit * units + unit / 2;

    for (step, op) in ops.iter().enumerate() {
        let fail = |what: String| format!("step {step} {op:?}: {what}");
        // On a real clock the steps take time: once the store's clock runs
        // a quarter unit ahead of the model's, an expiry could fall on the
        // wrong side of a step, so the rest of the history proves nothing.
        if Instant::now() > start + model.now + unit / 4 {
            return Ok(());
        }
        match *op {
            Op::Acquire { client, path, ttl_units } => {
                let ttl = Ttl::new(half_units(ttl_units)).expect("ttl");
                let request = LockRequest::new(paths[path].clone(), owners[client].clone(), ttl);
                let outcome = acquire(&clients[client], &request, Wait::No).await;
                let blockers = model.blockers(&paths[path]);
                match (outcome, blockers.is_empty()) {
                    (Ok(grant), true) => {
                        if grant.token <= last_token {
                            return Err(fail(format!("token {} not above {last_token}", grant.token)));
                        }
                        last_token = grant.token;
                        model.locks.push(ModelLock {
                            path: grant.path().clone(),
                            owner: grant.owner.clone(),
                            token: grant.token,
                            expires: model.now + grant.ttl,
                        });
                        history.entry(client).or_default().push(grant);
                    }
                    (Err(Error::Refused { blockers, .. }), false) => {
                        let blocker = blockers.first();
                        let known =
                            blockers.iter().any(|lock| lock.path == blocker.path && lock.token == blocker.token);
                        if !known {
                            return Err(fail(format!("refused by {blocker}, which the model does not hold")));
                        }
                    }
                    (outcome, _) => {
                        return Err(fail(format!("store said {outcome:?}, model's blockers {blockers:?}")));
                    }
                }
            }
            Op::Release { client, slot } => {
                let Some(grants) = history.get(&client) else { continue };
                let grant = grants[slot % grants.len()].clone();
                let outcome = clients[client].release(&grant).await;
                match (outcome, model.find(&grant)) {
                    (Ok(()), Some(index)) => {
                        model.locks.remove(index);
                    }
                    (Err(Error::NotHeld { .. }), None) => {}
                    (outcome, live) => return Err(fail(format!("store said {outcome:?}, model live: {live:?}"))),
                }
            }
            Op::Refresh { client, slot, ttl_units } => {
                let Some(grants) = history.get(&client) else { continue };
                let grant = grants[slot % grants.len()].clone();
                let ttl = Ttl::new(half_units(ttl_units)).expect("ttl");
                let outcome = clients[client].refresh(&grant, ttl).await;
                match (outcome, model.find(&grant)) {
                    (Ok(refreshed), Some(index)) => {
                        if refreshed.token != grant.token {
                            return Err(fail("a refresh changed the token".into()));
                        }
                        model.locks[index].expires = model.now + refreshed.ttl;
                    }
                    (Err(Error::NotHeld { .. }), None) => {}
                    (outcome, live) => return Err(fail(format!("store said {outcome:?}, model live: {live:?}"))),
                }
            }
            Op::Advance { units } => {
                model.now += unit * units;
                model.expire();
                sleep_until(start + model.now).await;
            }
            Op::Inspect => inspect(&*clients[0], &model).await.map_err(fail)?,
        }
    }
    // Always compare once at the end.
    inspect(&*clients[0], &model).await.map_err(|what| format!("at the end: {what}"))
}

async fn inspect(client: &dyn LockBackend, model: &Model) -> Result<(), String> {
    let listed = client.list(None).await.map_err(|e| format!("list failed: {e}"))?;
    let mut expected: Vec<(String, String, u64)> =
        model.locks.iter().map(|l| (l.path.key().to_owned(), l.owner.to_string(), l.token)).collect();
    let mut actual: Vec<(String, String, u64)> =
        listed.iter().map(|l| (l.path.key().to_owned(), l.owner.to_string(), l.token)).collect();
    expected.sort();
    actual.sort();
    if expected != actual {
        return Err(format!("store holds {actual:?}, model holds {expected:?}"));
    }
    Ok(())
}
