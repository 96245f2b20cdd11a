//! The reference model of tree locks, and the property comparing a store
//! with it.
//!
//! [`Model`] is the contract of SPEC §3 and §8 in plain code: a grant is a
//! set of items (path, mode) with one owner, one token and one expiry; a
//! request succeeds iff no item of a live grant conflicts with one of its
//! items (comparable paths, not both Shared, the same owner included), and
//! a refusal names, for each blocked item in the request's order, a live
//! item in its way; a mode change gets a new token and keeps the expiry,
//! and an upgrade is refused (grant unchanged) while another grant's item
//! is in the way; release, refresh and changes act only on a live grant
//! with the same owner and token, on all its items; a grant lives until
//! its ttl. Requests of one to three items are normalised by the model
//! itself, in its own words (merge duplicates, refuse a branch with two
//! modes, keep the topmost items), and must agree with core's
//! [`LockItems::new`], invalid ones included, which never reach a store.
//!
//! A fair store's queue is in the model too: a waiter's reservation (its
//! items, owner and ticket, from the token counter) lives
//! [`RESERVATION_TTL`] unless renewed; a try is refused by any live
//! conflicting reservation, a queued attempt only by those with a smaller
//! ticket; a refused join takes a ticket and a reservation, a refused
//! queued attempt renews its reservation (or writes it again), a granted
//! one removes it, and a withdrawal removes it. A refusal names a grant's
//! item where one is in the way of an item, else a reservation's.
//!
//! Proptest generates sequences of acquisitions, releases, refreshes, mode
//! changes, joins of the queue, queued attempts, withdrawals and time
//! advances; each step runs on the store and on the
//! model, and the outcomes and the live items must agree. Under the
//! stepwise algorithm, which grants single Exclusive items only, a Shared
//! or multi-path request and every mode change must be refused with
//! [`Error::Unsupported`], changing nothing.
//!
//! Time: the model's clock is virtual and the store's is tokio's (paused for
//! the memory store) or real. Advances are whole units and ttls are
//! `(k + ½)` units (and [`RESERVATION_TTL`] is 7½ units of the real
//! clock's, and less than one of the paused clock's), so no expiry ever
//! falls within half a unit of an operation: real-time jitter smaller than that cannot change an outcome.
//! A history whose steps fall more than a quarter unit behind the virtual
//! schedule (a slow machine) stops there. Each proptest case runs on its
//! own runtime and a fresh namespace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::acquire;
use mutextree_core::backend::{Attempt, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::{Blockers, Error, Fairness, Grant, LockBackend, LockItem, LockItems, LockPath, Mode, Owner, Ttl};
use mutextree_core::{HeldLock, Wait};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::time::{sleep_until, Instant};

use crate::oracle::items_conflict;
use crate::{Algorithm, Ctx, TestStore};

/// The paths of the model's tree: parents, children, a grandchild and
/// names that share a prefix without being related.
const PATHS: [&str; 8] = ["A", "A/B", "A/B/C", "A/C", "AB", "B", "B/A", "A/BC"];
const CLIENTS: usize = 2;

/// One step of a generated history.
#[derive(Clone, Debug)]
pub enum Op {
    /// `client` tries the items (indexes into the model's paths, with a
    /// mode) without waiting, for `ttl_units + ½` units.
    Acquire {
        /// Which client.
        client: usize,
        /// One to three items, as asked (before normalisation).
        items: Vec<(usize, Mode)>,
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
    /// `client` changes every item of one of the grants it ever got to
    /// `mode` (skipped if that changes nothing, which the handle never
    /// asks).
    ChangeMode {
        /// Which client.
        client: usize,
        /// Which of its grants, modulo how many it has.
        slot: usize,
        /// The new mode.
        mode: Mode,
    },
    /// `client` asks for the items as the first attempt of a wait: granted,
    /// or queued with a new ticket (fair clients only).
    Join {
        /// Which client.
        client: usize,
        /// One to three items, as asked (before normalisation).
        items: Vec<(usize, Mode)>,
        /// Whole units of the ttl (half a unit is added).
        ttl_units: u32,
    },
    /// `client` attempts again as the holder of one of the tickets it ever
    /// got (its reservation live, lapsed or withdrawn).
    Retry {
        /// Which client.
        client: usize,
        /// Which of its tickets, modulo how many it has.
        slot: usize,
    },
    /// `client` withdraws one of the tickets it ever got.
    Withdraw {
        /// Which client.
        client: usize,
        /// Which of its tickets, modulo how many it has.
        slot: usize,
    },
    /// Time passes.
    Advance {
        /// Whole units.
        units: u32,
    },
    /// The live items are listed and compared with the model's. Only at
    /// these steps: a listing may clean up expired locks, which would hide a
    /// store that wrongly revives them on release or refresh.
    Inspect,
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Exclusive), Just(Mode::Shared)]
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..CLIENTS;
    let items = proptest::collection::vec((0..PATHS.len(), mode()), 1..=3);
    prop_oneof![
        4 => (client.clone(), items, 1..4u32).prop_map(|(client, items, ttl_units)| Op::Acquire { client, items, ttl_units }),
        2 => (client.clone(), any::<usize>()).prop_map(|(client, slot)| Op::Release { client, slot }),
        1 => (client.clone(), any::<usize>(), 1..4u32).prop_map(|(client, slot, ttl_units)| Op::Refresh { client, slot, ttl_units }),
        2 => (client.clone(), any::<usize>(), mode()).prop_map(|(client, slot, mode)| Op::ChangeMode { client, slot, mode }),
        2 => (client.clone(), proptest::collection::vec((0..PATHS.len(), mode()), 1..=3), 1..4u32)
            .prop_map(|(client, items, ttl_units)| Op::Join { client, items, ttl_units }),
        2 => (client.clone(), any::<usize>()).prop_map(|(client, slot)| Op::Retry { client, slot }),
        1 => (client, any::<usize>()).prop_map(|(client, slot)| Op::Withdraw { client, slot }),
        1 => (1..3u32).prop_map(|units| Op::Advance { units }),
        1 => Just(Op::Inspect),
    ]
}

/// A live grant in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelGrant {
    items: Vec<LockItem>,
    owner: Owner,
    token: u64,
    expires: Duration,
}

/// A live reservation in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelReservation {
    items: Vec<LockItem>,
    owner: Owner,
    ticket: u64,
    expires: Duration,
}

/// What is in the way of one item: a live item and its grant's token (or
/// its reservation's ticket), and whether it is a reservation.
type InTheWay = Vec<(LockItem, u64, bool)>;

/// The reference: live grants and reservations on a virtual clock.
#[derive(Debug, Default)]
pub struct Model {
    now: Duration,
    grants: Vec<ModelGrant>,
    reservations: Vec<ModelReservation>,
}

impl Model {
    fn expire(&mut self) {
        let now = self.now;
        self.grants.retain(|grant| grant.expires > now);
        self.reservations.retain(|reservation| reservation.expires > now);
    }

    /// For each item of `items` in order, what is in the way: the live
    /// items of grants that conflict with it, or if there are none, those
    /// of the reservations that come before `ticket` (all of them for
    /// `None`, a try); only the blocked items'.
    fn queue_blockers(&self, items: &[LockItem], ticket: Option<u64>) -> Vec<InTheWay> {
        items
            .iter()
            .filter_map(|asked| {
                let held: InTheWay = self
                    .grants
                    .iter()
                    .flat_map(|grant| grant.items.iter().map(move |item| (item.clone(), grant.token, false)))
                    .filter(|(item, _, _)| items_conflict(asked, item))
                    .collect();
                if !held.is_empty() {
                    return Some(held);
                }
                let queued: InTheWay = self
                    .reservations
                    .iter()
                    .filter(|reservation| ticket.is_none_or(|ticket| reservation.ticket < ticket))
                    .flat_map(|reservation| {
                        reservation.items.iter().map(move |item| (item.clone(), reservation.ticket, true))
                    })
                    .filter(|(item, _, _)| items_conflict(asked, item))
                    .collect();
                (!queued.is_empty()).then_some(queued)
            })
            .collect()
    }

    /// For each item of `items` in order, the live items of grants other
    /// than `except` that conflict with it; only the blocked items'.
    fn blockers(&self, items: &[LockItem], except: Option<u64>) -> Vec<Vec<(LockItem, u64)>> {
        let others = || self.grants.iter().filter(|grant| Some(grant.token) != except);
        items
            .iter()
            .map(|asked| {
                others()
                    .flat_map(|grant| grant.items.iter().map(move |item| (item.clone(), grant.token)))
                    .filter(|(item, _)| items_conflict(asked, item))
                    .collect::<Vec<_>>()
            })
            .filter(|in_the_way| !in_the_way.is_empty())
            .collect()
    }

    fn find(&self, grant: &Grant) -> Option<usize> {
        self.grants.iter().position(|live| live.owner == grant.owner && live.token == grant.token)
    }
}

/// The model's own normalisation of a request: exact duplicates merge to
/// the stronger mode; two items on one branch with different modes are
/// invalid; of items on one branch, only the topmost stays.
fn normalise(asked: &[(LockPath, Mode)]) -> Option<Vec<LockItem>> {
    let mut merged: Vec<LockItem> = Vec::new();
    for (path, mode) in asked {
        match merged.iter_mut().find(|item| item.path == *path) {
            Some(item) if *mode == Mode::Exclusive => item.mode = Mode::Exclusive,
            Some(_) => {}
            None => merged.push(LockItem { path: path.clone(), mode: *mode }),
        }
    }
    let mixed_branch = merged
        .iter()
        .any(|one| merged.iter().any(|other| one.path.is_ancestor_of(&other.path) && one.mode != other.mode));
    if mixed_branch {
        return None;
    }
    let mut topmost: Vec<LockItem> = merged
        .iter()
        .filter(|item| !merged.iter().any(|other| other.path.is_ancestor_of(&item.path)))
        .cloned()
        .collect();
    topmost.sort_by(|a, b| a.path.key().cmp(b.path.key()));
    Some(topmost)
}

/// Whether a store's refusal names, for each blocked item in order, one
/// of the live items the model has in its way (grants only).
fn check_blockers(blockers: &Blockers, expected: &[Vec<(LockItem, u64)>]) -> Result<(), String> {
    let expected: Vec<InTheWay> = expected
        .iter()
        .map(|in_the_way| in_the_way.iter().map(|(item, token)| (item.clone(), *token, false)).collect())
        .collect();
    check_queue_blockers(blockers, &expected)
}

/// Whether a store's refusal names, for each blocked item in order, one
/// of the live items (a grant's or a reservation's, as marked) the model
/// has in its way.
fn check_queue_blockers(blockers: &Blockers, expected: &[InTheWay]) -> Result<(), String> {
    if blockers.len() != expected.len() {
        return Err(format!("{} blockers named, but {} items blocked: {blockers:?}", blockers.len(), expected.len()));
    }
    for (blocker, in_the_way) in blockers.iter().zip(expected) {
        let known = in_the_way.iter().any(|(item, token, waiting)| {
            item.path == blocker.path
                && item.mode == blocker.mode
                && *token == blocker.token
                && *waiting == blocker.waiting
        });
        if !known {
            return Err(format!("refused by {blocker}, which the model does not have in the way: {in_the_way:?}"));
        }
    }
    Ok(())
}

/// Runs the property for a store; the body of the `model` test of [`suite!`](crate::suite).
pub fn check<S: TestStore>(store: fn() -> S, algorithm: Algorithm, paused: bool) {
    let config = Config {
        cases: if paused { 256 } else { 12 },
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

/// One history on a store and on the model.
struct History {
    algorithm: Algorithm,
    unit: Duration,
    clients: Vec<Arc<dyn LockBackend>>,
    owners: Vec<Owner>,
    paths: Vec<LockPath>,
    /// Every grant each client got, live or not, changed ones included.
    granted: HashMap<usize, Vec<Grant>>,
    /// Every ticket each client got, with the request it queued.
    tickets: HashMap<usize, Vec<(u64, LockRequest)>>,
    model: Model,
    last_token: u64,
}

async fn run_history(store: Arc<dyn TestStore>, algorithm: Algorithm, ops: Vec<Op>) -> Result<(), String> {
    let ctx = Ctx::new(store, algorithm);
    let mut clients: Vec<Arc<dyn LockBackend>> = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(ctx.client().await);
    }
    let mut history = History {
        algorithm,
        unit: ctx.timing().unit,
        clients,
        owners: (0..CLIENTS).map(|c| Owner::new(format!("client-{c}")).expect("owner")).collect(),
        paths: PATHS.iter().map(|p| LockPath::parse(p).expect("path")).collect(),
        granted: HashMap::new(),
        tickets: HashMap::new(),
        model: Model::default(),
        last_token: 0,
    };
    let start = Instant::now();
    for (step, op) in ops.iter().enumerate() {
        // On a real clock the steps take time: once the store's clock runs
        // a quarter unit ahead of the model's, an expiry could fall on the
        // wrong side of a step, so the rest of the history proves nothing.
        if Instant::now() > start + history.model.now + history.unit / 4 {
            return Ok(());
        }
        history.step(op, start).await.map_err(|what| format!("step {step} {op:?}: {what}"))?;
    }
    // Always compare once at the end.
    history.inspect().await.map_err(|what| format!("at the end: {what}"))
}

impl History {
    fn ttl(&self, units: u32) -> Ttl {
        Ttl::new(self.unit * units + self.unit / 2).expect("ttl")
    }

    fn slot(&self, client: usize, slot: usize) -> Option<Grant> {
        let grants = self.granted.get(&client)?;
        Some(grants[slot % grants.len()].clone())
    }

    fn new_token(&mut self, token: u64) -> Result<(), String> {
        if token <= self.last_token {
            return Err(format!("token {token} not above {}", self.last_token));
        }
        self.last_token = token;
        Ok(())
    }

    async fn step(&mut self, op: &Op, start: Instant) -> Result<(), String> {
        match *op {
            Op::Acquire { client, ref items, ttl_units } => self.acquire(client, items, ttl_units).await,
            Op::Release { client, slot } => {
                let Some(grant) = self.slot(client, slot) else { return Ok(()) };
                let outcome = self.clients[client].release(&grant).await;
                match (outcome, self.model.find(&grant)) {
                    (Ok(()), Some(index)) => {
                        self.model.grants.remove(index);
                        Ok(())
                    }
                    (Err(Error::NotHeld { .. }), None) => Ok(()),
                    (outcome, live) => Err(format!("store said {outcome:?}, model live: {live:?}")),
                }
            }
            Op::Refresh { client, slot, ttl_units } => {
                let Some(grant) = self.slot(client, slot) else { return Ok(()) };
                let outcome = self.clients[client].refresh(&grant, self.ttl(ttl_units)).await;
                match (outcome, self.model.find(&grant)) {
                    (Ok(refreshed), Some(index)) => {
                        if refreshed.token != grant.token || refreshed.items != grant.items {
                            return Err(format!("a refresh changed the grant: {refreshed:?}"));
                        }
                        self.model.grants[index].expires = self.model.now + refreshed.ttl;
                        Ok(())
                    }
                    (Err(Error::NotHeld { .. }), None) => Ok(()),
                    (outcome, live) => Err(format!("store said {outcome:?}, model live: {live:?}")),
                }
            }
            Op::ChangeMode { client, slot, mode } => self.change_mode(client, slot, mode).await,
            Op::Join { client, ref items, ttl_units } => self.join(client, items, ttl_units).await,
            Op::Retry { client, slot } => {
                let Some((ticket, request)) = self.ticket(client, slot) else { return Ok(()) };
                self.queued_attempt(client, request.in_queue(Queue::Waiting(ticket))).await
            }
            Op::Withdraw { client, slot } => {
                let Some((ticket, request)) = self.ticket(client, slot) else { return Ok(()) };
                self.clients[client].withdraw(&request.owner, ticket).await.map_err(|e| format!("withdraw: {e}"))?;
                self.model.reservations.retain(|reservation| reservation.ticket != ticket);
                Ok(())
            }
            Op::Advance { units } => {
                self.model.now += self.unit * units;
                self.model.expire();
                sleep_until(start + self.model.now).await;
                Ok(())
            }
            Op::Inspect => self.inspect().await,
        }
    }

    fn ticket(&self, client: usize, slot: usize) -> Option<(u64, LockRequest)> {
        let tickets = self.tickets.get(&client)?;
        Some(tickets[slot % tickets.len()].clone())
    }

    /// Whether `client` waits in the store's queue (a stepwise or mixed
    /// client barges, and sends no queued attempt).
    fn fair(&self, client: usize) -> bool {
        self.clients[client].fairness() == Fairness::Fair
    }

    /// The request of `client` for `asked`, normalised by core and checked
    /// against the model's own normalisation; `None` for an invalid one
    /// (which both refuse).
    fn request(&self, client: usize, asked: &[(usize, Mode)], ttl_units: u32) -> Result<Option<LockRequest>, String> {
        let asked: Vec<(LockPath, Mode)> = asked.iter().map(|&(path, mode)| (self.paths[path].clone(), mode)).collect();
        let (expected, items) = match (normalise(&asked), LockItems::new(asked.clone())) {
            (Some(expected), Ok(items)) => (expected, items),
            (None, Err(Error::InvalidRequest { .. })) => return Ok(None),
            (model, core) => return Err(format!("the model normalises {asked:?} to {model:?}, core to {core:?}")),
        };
        if items.iter().cloned().collect::<Vec<_>>() != expected {
            return Err(format!("the model normalises {asked:?} to {expected:?}, core to {items:?}"));
        }
        Ok(Some(LockRequest::of(items, self.owners[client].clone(), self.ttl(ttl_units))))
    }

    /// Records a grant the model expected.
    fn granted(&mut self, client: usize, request: &LockRequest, grant: Grant) -> Result<(), String> {
        self.new_token(grant.token)?;
        if grant.items != request.items || grant.owner != request.owner {
            return Err(format!("asked for {:?}, granted {grant:?}", request.items));
        }
        self.model.grants.push(ModelGrant {
            items: request.items.iter().cloned().collect(),
            owner: grant.owner.clone(),
            token: grant.token,
            expires: self.model.now + grant.ttl,
        });
        self.granted.entry(client).or_default().push(grant);
        Ok(())
    }

    async fn join(&mut self, client: usize, asked: &[(usize, Mode)], ttl_units: u32) -> Result<(), String> {
        if !self.fair(client) {
            return Ok(());
        }
        let Some(request) = self.request(client, asked, ttl_units)? else { return Ok(()) };
        self.queued_attempt(client, request.in_queue(Queue::Join)).await
    }

    /// A join of the queue, or an attempt of a ticket's holder.
    async fn queued_attempt(&mut self, client: usize, request: LockRequest) -> Result<(), String> {
        let ticket = match request.queue {
            Queue::Waiting(ticket) => Some(ticket),
            _ => None,
        };
        let items: Vec<LockItem> = request.items.iter().cloned().collect();
        // Its own reservation is never in its way: it comes after itself.
        let in_the_way = self.model.queue_blockers(&items, Some(ticket.unwrap_or(u64::MAX)));
        let outcome = self.clients[client].try_grant(&request).await.map_err(|e| format!("the store failed: {e}"))?;
        match (outcome, in_the_way.is_empty()) {
            (Attempt::Granted(grant), true) => {
                self.model.reservations.retain(|reservation| Some(reservation.ticket) != ticket);
                self.granted(client, &request, grant)
            }
            (Attempt::Queued { ticket: queued, blockers }, false) => {
                check_queue_blockers(&blockers, &in_the_way)?;
                match ticket {
                    Some(ticket) if queued != ticket => return Err(format!("ticket {ticket} came back as {queued}")),
                    Some(_) => {}
                    None => {
                        self.new_token(queued)?;
                        let asked = request.in_queue(Queue::Try);
                        self.tickets.entry(client).or_default().push((queued, asked));
                    }
                }
                let expires = self.model.now + RESERVATION_TTL;
                match self.model.reservations.iter_mut().find(|reservation| reservation.ticket == queued) {
                    Some(reservation) => reservation.expires = expires,
                    None => self.model.reservations.push(ModelReservation {
                        items,
                        owner: request.owner.clone(),
                        ticket: queued,
                        expires,
                    }),
                }
                Ok(())
            }
            (outcome, _) => Err(format!("store said {outcome:?}, model's blockers {in_the_way:?}")),
        }
    }

    async fn acquire(&mut self, client: usize, asked: &[(usize, Mode)], ttl_units: u32) -> Result<(), String> {
        let Some(request) = self.request(client, asked, ttl_units)? else { return Ok(()) };
        let expected: Vec<LockItem> = request.items.iter().cloned().collect();
        let outcome = acquire(&self.clients[client], &request, Wait::No).await;
        if !self.algorithm.grants_modes() && !request.items.is_single_exclusive() {
            return match outcome {
                Err(Error::Unsupported { .. }) => Ok(()),
                other => {
                    Err(format!("the stepwise algorithm should refuse {:?} as unsupported: {other:?}", request.items))
                }
            };
        }
        // A fair try comes after every waiter; a barging one sees none.
        let in_the_way = if self.fair(client) {
            self.model.queue_blockers(&expected, None)
        } else {
            let held = self.model.blockers(&expected, None);
            held.iter()
                .map(|in_the_way| in_the_way.iter().map(|(item, token)| (item.clone(), *token, false)).collect())
                .collect()
        };
        match (outcome, in_the_way.is_empty()) {
            (Ok(grant), true) => self.granted(client, &request, grant),
            (Err(Error::Refused { blockers, .. }), false) => check_queue_blockers(&blockers, &in_the_way),
            (outcome, _) => Err(format!("store said {outcome:?}, model's blockers {in_the_way:?}")),
        }
    }

    async fn change_mode(&mut self, client: usize, slot: usize, mode: Mode) -> Result<(), String> {
        let Some(grant) = self.slot(client, slot) else { return Ok(()) };
        if grant.items.iter().all(|item| item.mode == mode) {
            return Ok(());
        }
        let outcome = self.clients[client].change_mode(&grant, mode).await;
        if !self.algorithm.grants_modes() {
            return match outcome {
                Err(Error::Unsupported { .. }) => Ok(()),
                other => Err(format!("the stepwise algorithm should refuse a mode change as unsupported: {other:?}")),
            };
        }
        let Some(index) = self.model.find(&grant) else {
            return match outcome {
                Err(Error::NotHeld { .. }) => Ok(()),
                other => Err(format!("a change of a grant the model does not hold: {other:?}")),
            };
        };
        let changed: Vec<LockItem> =
            self.model.grants[index].items.iter().map(|item| LockItem { path: item.path.clone(), mode }).collect();
        let in_the_way = self.model.blockers(&changed, Some(grant.token));
        match (outcome, in_the_way.is_empty()) {
            (Ok(Attempt::Granted(new)), true) => {
                self.new_token(new.token)?;
                if new.items != grant.items.with_mode(mode) || new.owner != grant.owner {
                    return Err(format!("{grant:?} changed to {mode}, became {new:?}"));
                }
                let live = &mut self.model.grants[index];
                live.items = changed;
                live.token = new.token;
                self.granted.entry(client).or_default().push(new);
                Ok(())
            }
            (Ok(Attempt::Blocked(blockers)), false) if mode == Mode::Exclusive => {
                check_blockers(&blockers, &in_the_way)
            }
            (outcome, _) => Err(format!("store said {outcome:?}, model's blockers {in_the_way:?}")),
        }
    }

    async fn inspect(&self) -> Result<(), String> {
        let listed = self.clients[0].list(None).await.map_err(|e| format!("list failed: {e}"))?;
        let mut expected: Vec<(String, Mode, String, u64)> = self
            .model
            .grants
            .iter()
            .flat_map(|grant| {
                grant
                    .items
                    .iter()
                    .map(|item| (item.path.key().to_owned(), item.mode, grant.owner.to_string(), grant.token))
            })
            .collect();
        let mut actual: Vec<(String, Mode, String, u64)> =
            listed.iter().map(|l| (l.path.key().to_owned(), l.mode, l.owner.to_string(), l.token)).collect();
        expected.sort();
        actual.sort();
        if expected != actual {
            return Err(format!("store holds {actual:?}, model holds {expected:?}"));
        }
        let waiters = self.clients[0].waiters(None).await.map_err(|e| format!("waiters failed: {e}"))?;
        let mut expected: Vec<(String, Mode, String, u64)> = self
            .model
            .reservations
            .iter()
            .flat_map(|reservation| {
                reservation.items.iter().map(|item| {
                    (item.path.key().to_owned(), item.mode, reservation.owner.to_string(), reservation.ticket)
                })
            })
            .collect();
        let mut actual: Vec<(String, Mode, String, u64)> = waiters.iter().map(queued_item).collect::<Result<_, _>>()?;
        expected.sort();
        actual.sort();
        if expected != actual {
            return Err(format!("store has the waiters {actual:?}, model {expected:?}"));
        }
        Ok(())
    }
}

/// A listed reservation as the model compares it; it must say it waits.
fn queued_item(waiter: &HeldLock) -> Result<(String, Mode, String, u64), String> {
    if !waiter.waiting {
        return Err(format!("a listed waiter that does not say it waits: {waiter:?}"));
    }
    Ok((waiter.path.key().to_owned(), waiter.mode, waiter.owner.to_string(), waiter.token))
}
