//! The load generator of mutextree: acquire+release pairs from many
//! simulated clients on any [`LockBackend`], with optional background locks
//! held throughout.
//!
//! Every store's benchmark (`cargo bench -p mutextree-<store> --bench load`)
//! and the command line's `mutextree bench` run it, so that their figures
//! compare. It is a crate of its own rather than part of the test kit
//! (`conformance`, never published) because the command line ships it.
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use mutextree_core::LockBackend;
//! use mutextree_load::{LoadSpec, Scenario};
//! use mutextree_memory::MemoryBackend;
//!
//! let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
//! let spec = LoadSpec {
//!     clients: 4,
//!     scenario: Scenario::Contended,
//!     duration: Duration::from_millis(50),
//!     ..LoadSpec::default()
//! };
//! let report = mutextree_load::runtime_for(spec.clients).block_on(mutextree_load::run(&[store], &spec))?;
//! assert!(report.pairs > 0);
//! println!("{}", mutextree_load::markdown_table(&[(spec, report)]));
//! # Ok::<(), mutextree_core::Error>(())
//! ```
//!
//! # What is measured
//!
//! The unit is the **pair**: one [`LockBackend::try_grant`] that is granted,
//! then one [`LockBackend::release`] of that grant. A lock is worth nothing
//! until it is released again (held forever it is an outage, not a
//! throughput), so a store that grants fast and releases slowly must not look
//! fast. Each simulated client is one tokio task doing pairs back to back on
//! a prebuilt [`LockRequest`] until the run's deadline; nothing else happens
//! in the loop (no sleeps; no allocation besides the store's own, the boxed
//! futures of the trait and the growth of the latency buffer).
//!
//! * **Latency** is taken on every pair, through `&dyn LockBackend` as
//!   core's acquisition loop calls a store, so it includes the
//!   `async-trait` boxing of both calls (one boxed future each) and the
//!   dynamic dispatch. The
//!   samples of one client tile its run: a sample runs from the end of the
//!   previous one (one clock read per pair), so it also holds the few
//!   nanoseconds of picking the next request and storing the sample.
//!   Percentiles are over granted pairs only.
//! * **Refusals**: an attempt the store refuses (another client holds an
//!   overlapping lock) is counted in [`LoadReport::refused`] and is not a
//!   pair; its time still counts in the run's elapsed time.
//! * **Throughput** is pairs divided by the wall time from the first
//!   client's start to the last client's end.
//! * **Waiting clients** ([`LoadSpec::waiting`]): instead of trying once
//!   and counting a refusal, each client waits for its lock through a
//!   [`TreeLock`] handle (core's acquisition loop), fair or barging, so a pair's
//!   latency is the wait plus the release, and nothing is refused. Under
//!   contention this compares what queueing costs and what it buys: pairs/s
//!   against the spread of the waits (p99, max).
//!
//! The deadline is checked after every pair, on the clock read the latency
//! needs anyway. Every [`YIELD_EVERY`] iterations a client yields to the
//! runtime (outside any sample), so that clients sharing a worker thread take
//! turns even on a store whose calls never suspend (the memory store), and
//! "16 clients" means 16 interleaved clients rather than one per worker
//! running to the deadline.
//!
//! # Scenarios
//!
//! * [`Scenario::Siblings`]: client `i` locks its own leaf
//!   `bench/r1/…/r{depth-2}/c{i}` (just `c{i}` at depth 1). The leaves share
//!   every ancestor and never conflict: this is the cost of the tree
//!   bookkeeping on shared parents, with no refusal.
//! * [`Scenario::Contended`]: every client locks a node chosen at random in
//!   one full tree of `depth` levels and [`LoadSpec::fan_out`] children per
//!   node under `hot` (binary by default, `2^depth - 1` nodes: `hot`,
//!   `hot/0`, `hot/1`, `hot/0/1`, …), so clients keep running
//!   into each other's locks, on the node itself, an ancestor or a
//!   descendant. Each client draws from its own seeded generator, so a run is
//!   repeatable in what it asks for.
//! * [`Scenario::ReadHeavy`]: readers and one writer on one subtree, the
//!   shape of many jobs reading a tenant's configuration while one admin
//!   rewrites a part of it. Client 0 locks the leaf `read/r1/…/w` of
//!   `depth` segments, Exclusive; every other client locks its parent
//!   Shared (at depth 1, the leaf `w` itself). Readers never refuse each
//!   other; the writer and the readers refuse each other (a Shared lock
//!   covers its whole subtree). 16 clients are 15 readers and 1 writer.
//! * [`Scenario::TwoPaths`]: grants of two paths, the shape of moving a VM
//!   between two hosts. Every client locks two distinct hosts at once, both
//!   Exclusive, in one request (one grant, one release): hosts are the
//!   leaves `move/r1/…/h{n}` of `depth` segments, [`HOSTS_PER_CLIENT`]
//!   per client, and each client draws its pairs of hosts from its own
//!   seeded generator ([`TWO_PATH_REQUESTS`] of them, built before the
//!   clock starts). Clients meet on a host now and then.
//!
//! # Background locks
//!
//! [`LoadSpec::background`] unrelated locks are granted before the clock
//! starts, under another root (`background/g{i / 1000}/n{i}`), with a long
//! ttl, many at a time; they stay held during the run, so a store is measured
//! with that much state in it, and are released after it.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use mutextree_core::backend::{Attempt, LockRequest};
use mutextree_core::{
    Error, Fairness, Grant, LockBackend, LockItems, LockPath, Mode, Owner, TreeLock, TreeLockBuilder, Ttl, Wait,
};

/// A client yields to the runtime once per this many iterations (outside
/// the timed samples).
pub const YIELD_EVERY: u32 = 64;

/// Background grants (and releases) in flight at once.
const BACKGROUND_IN_FLIGHT: usize = 512;

/// Background locks per `background/g{n}` parent.
const BACKGROUND_FAN_OUT: usize = 1000;

/// Hosts per client in [`Scenario::TwoPaths`].
pub const HOSTS_PER_CLIENT: usize = 8;

/// Pairs of hosts each client of [`Scenario::TwoPaths`] draws before the
/// clock starts, and then picks from at random.
pub const TWO_PATH_REQUESTS: usize = 256;

/// What the clients lock (see the [module docs](crate#scenarios)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// One leaf per client, all siblings under the same ancestors: no
    /// conflicts, shared parents.
    Siblings,
    /// Random nodes of one small full subtree of the spec's depth and
    /// fan-out (2 by default): frequent refusals.
    Contended,
    /// Shared readers of one subtree and one Exclusive writer under it
    /// (client 0).
    ReadHeavy,
    /// Two random hosts at once per grant, both Exclusive.
    TwoPaths,
}

impl Scenario {
    /// Every scenario, in the order of the module docs.
    pub const ALL: [Scenario; 4] = [Scenario::Siblings, Scenario::Contended, Scenario::ReadHeavy, Scenario::TwoPaths];

    /// `siblings`, `contended`, `read-heavy`, `two-paths`: the name in
    /// tables, row labels and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Siblings => "siblings",
            Scenario::Contended => "contended",
            Scenario::ReadHeavy => "read-heavy",
            Scenario::TwoPaths => "two-paths",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;

    /// A scenario by [its name](Scenario::as_str).
    fn from_str(name: &str) -> Result<Self, String> {
        Scenario::ALL.into_iter().find(|scenario| scenario.as_str() == name).ok_or_else(|| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|scenario| scenario.as_str()).collect();
            format!("write one of {}", names.join(", "))
        })
    }
}

/// One run of the load generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    /// Simulated clients, each one tokio task.
    pub clients: usize,
    /// Depth of the locked paths (of the deepest ones for
    /// [`Scenario::Contended`]), from 1 to [`mutextree_core::MAX_DEPTH`].
    pub depth: usize,
    /// What the clients lock.
    pub scenario: Scenario,
    /// Unrelated locks held during the run.
    pub background: usize,
    /// How long the clients run.
    pub duration: Duration,
    /// The ttl of the measured locks (they are released at once; it only
    /// matters to a store that keeps it, or if a client dies).
    pub ttl: Duration,
    /// Children per node of the [`Scenario::Contended`] tree (2 or more);
    /// the tree has at most a million nodes.
    pub fan_out: usize,
    /// `None`: each attempt is one try, and a refusal is counted and
    /// followed at once by the next attempt. `Some(fairness)`: each client
    /// waits for its lock, queueing as `fairness` says (see the
    /// [module docs](crate#what-is-measured)).
    pub waiting: Option<Fairness>,
}

/// How long a waiting client waits at most before its run fails: far
/// longer than any wait a sound store makes it wait in a run of seconds.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Default for LoadSpec {
    /// One client, depth 3, siblings, no background, one second, ttl 30 s.
    fn default() -> Self {
        LoadSpec {
            clients: 1,
            depth: 3,
            scenario: Scenario::Siblings,
            background: 0,
            duration: Duration::from_secs(1),
            ttl: Duration::from_secs(30),
            fan_out: 2,
            waiting: None,
        }
    }
}

/// What a run measured. See the module docs for the definitions.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// Granted acquire+release pairs, all clients together.
    pub pairs: u64,
    /// Attempts refused because a live lock was in the way.
    pub refused: u64,
    /// Wall time from the clients' start to the last client's end.
    pub elapsed: Duration,
    /// `pairs / elapsed`.
    pub pairs_per_sec: f64,
    /// Median pair latency.
    pub p50: Duration,
    /// 99th percentile pair latency.
    pub p99: Duration,
    /// 99.9th percentile pair latency.
    pub p999: Duration,
    /// Slowest pair: the stalls (a store's housekeeping, a preempted
    /// thread) that percentiles hide.
    pub max: Duration,
}

impl LoadReport {
    /// Refused attempts as a share of all attempts, in percent.
    pub fn refused_percent(&self) -> f64 {
        let attempts = self.pairs + self.refused;
        if attempts == 0 {
            0.0
        } else {
            self.refused as f64 * 100.0 / attempts as f64
        }
    }
}

/// Runs `spec` against a store.
///
/// Simulated client `i` uses `clients[i % clients.len()]`: pass one shared
/// backend (the memory store, or a store whose client multiplexes), or one
/// connected client per simulated client. Must be called inside a tokio
/// runtime; the clients are spawned on it, so a multi-thread runtime runs
/// them in parallel and a current-thread runtime interleaves them on one
/// core.
///
/// Fails with the first error of the store, a release included (a pair
/// whose release fails is a failed run, not a slow pair), or with
/// [`Error::Refused`] if a background lock cannot be granted (the namespace
/// was not empty).
///
/// # Panics
///
/// If `clients` is empty, `spec.clients` is 0, `spec.depth` is 0, or the
/// contended tree is below a fan-out of 2 or above a million nodes.
pub async fn run(clients: &[Arc<dyn LockBackend>], spec: &LoadSpec) -> Result<LoadReport, Error> {
    assert!(!clients.is_empty(), "the load generator needs at least one backend");
    assert!(spec.clients > 0, "the load generator needs at least one client");
    assert!(spec.depth > 0, "a lock path has at least one segment");
    let ttl = Ttl::new(spec.ttl)?;
    let backend_of = |i: usize| Arc::clone(&clients[i % clients.len()]);

    // Everything a client asks for is built before the clock starts.
    let mut plans = Vec::with_capacity(spec.clients);
    for client in 0..spec.clients {
        let owner = Owner::new(format!("load-{client}"))?;
        let seed = client as u64;
        let requests: Vec<LockRequest> =
            items_of(spec, client, seed)?.into_iter().map(|items| LockRequest::of(items, owner.clone(), ttl)).collect();
        plans.push((backend_of(client), requests, seed));
    }

    let background = hold_background(clients, spec).await?;

    let started = Instant::now();
    let deadline = started + spec.duration;
    let tasks: Vec<_> = plans
        .into_iter()
        .map(|(backend, requests, seed)| tokio::spawn(client_loop(backend, requests, seed, deadline, spec.waiting)))
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(join) => panic!("a load client was cancelled: {join}"),
        }
    }
    let elapsed = started.elapsed();
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>, Error>>();

    // Release the background even if a client failed, then report.
    release_background(clients, background).await?;
    let outcomes = outcomes?;

    let refused = outcomes.iter().map(|o| o.refused).sum();
    let mut latencies = Vec::with_capacity(outcomes.iter().map(|o| o.latencies.len()).sum());
    for outcome in outcomes {
        latencies.extend_from_slice(&outcome.latencies);
    }
    latencies.sort_unstable();
    let pairs = latencies.len() as u64;
    Ok(LoadReport {
        pairs,
        refused,
        elapsed,
        pairs_per_sec: pairs as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        max: Duration::from_nanos(latencies.last().copied().unwrap_or(0)),
    })
}

/// What one client measured.
struct ClientOutcome {
    /// One sample per granted pair, in nanoseconds.
    latencies: Vec<u64>,
    refused: u64,
}

async fn client_loop(
    shared: Arc<dyn LockBackend>,
    requests: Vec<LockRequest>,
    seed: u64,
    deadline: Instant,
    waiting: Option<Fairness>,
) -> Result<ClientOutcome, Error> {
    // Called through `&dyn`: on `Arc<dyn LockBackend>` itself, method
    // resolution would pick core's `impl LockBackend for Arc<B>` and box every
    // call twice.
    let backend: &dyn LockBackend = &*shared;
    // Waiting clients wait through handles, built before the clock starts.
    let handles = match waiting {
        Some(fairness) => requests
            .iter()
            .map(|request| {
                TreeLockBuilder::<TreeLock>::many(
                    Arc::clone(&shared),
                    request.items.iter().map(|item| (&item.path, item.mode)),
                )
                .owner(request.owner.as_str())
                .ttl(request.ttl.get())
                .wait(Wait::For(WAIT_LIMIT))
                .fairness(fairness)
                .build()
            })
            .collect::<Result<Vec<TreeLock>, Error>>()?,
        None => Vec::new(),
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 16);
    let mut refused = 0;
    let mut since_yield = 0;
    let mut previous = Instant::now();
    loop {
        let pick = if requests.len() == 1 { 0 } else { rng.usize(..requests.len()) };
        let request = &requests[pick];
        let granted = match handles.get(pick) {
            Some(handle) => {
                handle.acquire().await?;
                handle.release().await?;
                true
            }
            None => match backend.try_grant(request).await? {
                Attempt::Granted(grant) => {
                    backend.release(&grant).await?;
                    true
                }
                Attempt::Blocked(_) | Attempt::Queued { .. } => false,
            },
        };
        let now = Instant::now();
        if granted {
            latencies.push((now - previous).as_nanos() as u64);
        } else {
            refused += 1;
        }
        previous = now;
        if now >= deadline {
            break;
        }
        since_yield += 1;
        if since_yield == YIELD_EVERY {
            since_yield = 0;
            tokio::task::yield_now().await;
            previous = Instant::now();
        }
    }
    Ok(ClientOutcome { latencies, refused })
}

/// What `client` of `spec` may ask for, one request each (the client
/// picks one at random per attempt when there are several).
fn items_of(spec: &LoadSpec, client: usize, seed: u64) -> Result<Vec<LockItems>, Error> {
    let exclusive = |path: LockPath| LockItems::one(path, Mode::Exclusive);
    Ok(match spec.scenario {
        Scenario::Siblings => vec![exclusive(sibling_path(spec.depth, client)?)],
        Scenario::Contended => contended_paths(spec.depth, spec.fan_out)?.into_iter().map(exclusive).collect(),
        Scenario::ReadHeavy => {
            let writer = below("read", spec.depth, "w")?;
            match (client, writer.parent()) {
                (0, _) => vec![exclusive(writer)],
                (_, Some(subtree)) => vec![LockItems::one(subtree, Mode::Shared)],
                (_, None) => vec![LockItems::one(writer, Mode::Shared)],
            }
        }
        Scenario::TwoPaths => {
            let hosts = (0..spec.clients * HOSTS_PER_CLIENT)
                .map(|host| below("move", spec.depth, &format!("h{host}")))
                .collect::<Result<Vec<_>, Error>>()?;
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..TWO_PATH_REQUESTS)
                .map(|_| {
                    let one = rng.usize(..hosts.len());
                    let other = (one + rng.usize(1..hosts.len())) % hosts.len();
                    LockItems::new([(hosts[one].clone(), Mode::Exclusive), (hosts[other].clone(), Mode::Exclusive)])
                })
                .collect::<Result<_, Error>>()?
        }
    })
}

/// `root/r1/…/r{depth-2}/leaf` of `depth` segments, or `leaf` at depth 1.
fn below(root: &str, depth: usize, leaf: &str) -> Result<LockPath, Error> {
    let mut segments: Vec<String> = Vec::with_capacity(depth);
    if depth > 1 {
        segments.push(root.to_owned());
        segments.extend((1..depth - 1).map(|level| format!("r{level}")));
    }
    segments.push(leaf.to_owned());
    LockPath::new(segments)
}

/// `bench/r1/…/r{depth-2}/c{client}`, or `c{client}` at depth 1.
fn sibling_path(depth: usize, client: usize) -> Result<LockPath, Error> {
    below("bench", depth, &format!("c{client}"))
}

/// Every node of the full binary tree of `depth` levels under `hot`.
fn contended_paths(depth: usize, fan_out: usize) -> Result<Vec<LockPath>, Error> {
    let nodes = (0..depth).try_fold(0usize, |total, level| {
        u32::try_from(level).ok().and_then(|level| fan_out.checked_pow(level)).and_then(|n| total.checked_add(n))
    });
    assert!(fan_out >= 2, "a contended tree needs a fan-out of 2 or more");
    assert!(nodes.is_some_and(|n| n <= 1_000_000), "the contended tree (fan-out {fan_out}, depth {depth}) is too big");
    let mut paths = Vec::new();
    let mut level = vec![vec!["hot".to_owned()]];
    for _ in 0..depth {
        let mut next = Vec::with_capacity(level.len() * fan_out);
        for segments in level {
            paths.push(LockPath::new(segments.iter().cloned())?);
            for branch in 0..fan_out {
                let mut child = segments.clone();
                child.push(branch.to_string());
                next.push(child);
            }
        }
        level = next;
    }
    Ok(paths)
}

/// Grants the background locks, many at a time, spread over the clients.
async fn hold_background(clients: &[Arc<dyn LockBackend>], spec: &LoadSpec) -> Result<Vec<Grant>, Error> {
    if spec.background == 0 {
        return Ok(Vec::new());
    }
    // Held through the setup, the run and the release, with a wide margin.
    let ttl = Ttl::new((spec.duration * 4 + Duration::from_secs(600)).min(Ttl::MAX))?;
    let owner = Owner::new("load-background")?;
    stream::iter(0..spec.background)
        .map(|i| {
            let backend = &clients[i % clients.len()];
            let owner = owner.clone();
            async move {
                let path =
                    LockPath::new(["background".to_owned(), format!("g{}", i / BACKGROUND_FAN_OUT), format!("n{i}")])?;
                let request = LockRequest::new(path, owner, ttl);
                match backend.try_grant(&request).await? {
                    Attempt::Granted(grant) => Ok(grant),
                    Attempt::Blocked(blockers) | Attempt::Queued { blockers, .. } => {
                        Err(Error::Refused { items: request.items, blockers })
                    }
                }
            }
        })
        .buffer_unordered(BACKGROUND_IN_FLIGHT)
        .try_collect()
        .await
}

async fn release_background(clients: &[Arc<dyn LockBackend>], grants: Vec<Grant>) -> Result<(), Error> {
    stream::iter(grants.into_iter().enumerate())
        .map(|(i, grant)| {
            let backend = &clients[i % clients.len()];
            async move { backend.release(&grant).await }
        })
        .buffer_unordered(BACKGROUND_IN_FLIGHT)
        .try_collect()
        .await
}

/// Nearest-rank percentile of sorted nanosecond samples.
fn percentile(sorted: &[u64], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Duration::from_nanos(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The rows as a Markdown table: clients, depth, scenario, background,
/// pairs/s, p50, p99, p99.9, max, refused %.
pub fn markdown_table(rows: &[(LoadSpec, LoadReport)]) -> String {
    let mut out = String::from(
        "| clients | depth | scenario | background | pairs/s | p50 | p99 | p99.9 | max | refused % |\n\
         | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (spec, report) in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            spec.clients,
            spec.depth,
            scenario_text(spec),
            thousands(spec.background as u64),
            thousands(report.pairs_per_sec.round() as u64),
            short(report.p50),
            short(report.p99),
            short(report.p999),
            short(report.max),
            report.refused_percent(),
        );
    }
    out
}

/// `contended`, or for waiting clients `contended, fair wait` or
/// `contended, barging wait`.
fn scenario_text(spec: &LoadSpec) -> String {
    match spec.waiting {
        None => spec.scenario.to_string(),
        Some(Fairness::Fair) => format!("{}, fair wait", spec.scenario),
        Some(Fairness::Barging) => format!("{}, barging wait", spec.scenario),
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency with three significant digits at most: `412 ns`, `1.35 µs`,
/// `12.4 ms`.
fn short(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (value, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    let decimals = if value < 10.0 && unit != "ns" {
        2
    } else if value < 100.0 && unit != "ns" {
        1
    } else {
        0
    };
    format!("{value:.decimals$} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_the_requested_depth() {
        assert_eq!(sibling_path(1, 7).expect("valid").to_string(), "c7");
        assert_eq!(sibling_path(3, 0).expect("valid").to_string(), "bench/r1/c0");
        assert_eq!(sibling_path(8, 15).expect("valid").depth(), 8);
        let tree = contended_paths(3, 2).expect("valid");
        assert_eq!(tree.len(), 7);
        assert_eq!(tree.iter().map(LockPath::depth).max(), Some(3));
        assert!(tree.iter().any(|p| p.to_string() == "hot/1/0"));
        assert_eq!(contended_paths(1, 2).expect("valid").len(), 1);
        assert_eq!(contended_paths(3, 10).expect("valid").len(), 111);
    }

    fn spec(scenario: Scenario, clients: usize, depth: usize) -> LoadSpec {
        LoadSpec { clients, depth, scenario, duration: Duration::from_millis(100), ..LoadSpec::default() }
    }

    #[test]
    fn read_heavy_is_readers_of_a_subtree_and_a_writer_under_it() {
        for depth in [1, 2, 3, 8] {
            let spec = spec(Scenario::ReadHeavy, 16, depth);
            let writer = items_of(&spec, 0, 0).expect("valid");
            assert_eq!(writer.len(), 1);
            let writer = writer[0].first();
            assert_eq!((writer.mode, writer.path.depth()), (Mode::Exclusive, depth));
            for client in 1..16 {
                let reader = items_of(&spec, client, client as u64).expect("valid");
                assert_eq!(reader.len(), 1);
                let reader = reader[0].first();
                assert_eq!(reader.mode, Mode::Shared);
                assert!(reader.path.overlaps(&writer.path), "the writer is in the readers' subtree at depth {depth}");
                assert_eq!(reader.path.depth(), depth.saturating_sub(1).max(1));
            }
        }
        assert_eq!(
            items_of(&spec(Scenario::ReadHeavy, 16, 3), 0, 0).expect("valid")[0].first().path.to_string(),
            "read/r1/w"
        );
    }

    #[test]
    fn two_paths_are_two_distinct_exclusive_hosts_drawn_per_client() {
        let spec = spec(Scenario::TwoPaths, 4, 3);
        let requests = items_of(&spec, 2, 2).expect("valid");
        assert_eq!(requests.len(), TWO_PATH_REQUESTS);
        for items in &requests {
            assert_eq!(items.len(), 2, "two distinct hosts: {items}");
            assert!(items.iter().all(|item| item.mode == Mode::Exclusive && item.path.depth() == 3), "{items}");
            assert!(items.iter().all(|item| item.path.to_string().starts_with("move/r1/h")), "{items}");
        }
        let hosts: std::collections::BTreeSet<&LockPath> =
            requests.iter().flat_map(|items| items.iter().map(|item| &item.path)).collect();
        assert_eq!(hosts.len(), 4 * HOSTS_PER_CLIENT, "256 pairs cover the pool of 32 hosts");
        assert_eq!(items_of(&spec, 2, 2).expect("valid"), requests, "a client's draws repeat with its seed");
        assert_ne!(items_of(&spec, 3, 3).expect("valid"), requests, "another client draws others");
    }

    #[test]
    fn readers_and_grants_of_two_paths_run_and_release_everything() {
        for scenario in [Scenario::ReadHeavy, Scenario::TwoPaths] {
            let store: Arc<dyn LockBackend> = Arc::new(mutextree_memory::MemoryBackend::new());
            let spec = LoadSpec { clients: 4, duration: Duration::from_millis(50), ..spec(scenario, 4, 3) };
            let runtime = runtime_for(spec.clients);
            let report = runtime.block_on(run(std::slice::from_ref(&store), &spec)).expect("the run succeeds");
            assert!(report.pairs > 0, "{scenario}: {report:?}");
            assert_eq!(runtime.block_on(store.list(None)).expect("list"), [], "{scenario}: all released");
        }
    }

    #[test]
    fn waiting_clients_are_never_refused_and_leave_nothing_behind() {
        for fairness in [Fairness::Fair, Fairness::Barging] {
            let store: Arc<dyn LockBackend> = Arc::new(mutextree_memory::MemoryBackend::new());
            let spec = LoadSpec {
                clients: 8,
                duration: Duration::from_millis(100),
                waiting: Some(fairness),
                ..spec(Scenario::Contended, 8, 3)
            };
            let runtime = runtime_for(spec.clients);
            let report = runtime.block_on(run(std::slice::from_ref(&store), &spec)).expect("the run succeeds");
            assert!(report.pairs > 0 && report.refused == 0, "{fairness:?}: {report:?}");
            assert_eq!(runtime.block_on(store.list(None)).expect("list"), [], "{fairness:?}: all released");
            assert_eq!(runtime.block_on(store.waiters(None)).expect("waiters"), [], "{fairness:?}: nobody queued");
            let table = markdown_table(&[(spec, report)]);
            let label =
                if fairness == Fairness::Fair { "| contended, fair wait |" } else { "| contended, barging wait |" };
            assert!(table.contains(label), "{table}");
        }
    }

    #[test]
    fn scenarios_read_back_from_their_names() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.to_string().parse::<Scenario>(), Ok(scenario));
        }
        assert!("hot".parse::<Scenario>().expect_err("unknown").contains("read-heavy, two-paths"));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_nanos(500));
        assert_eq!(percentile(&samples, 0.99), Duration::from_nanos(990));
        assert_eq!(percentile(&samples, 0.999), Duration::from_nanos(999));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(percentile(&[42], 0.999), Duration::from_nanos(42));
    }

    #[test]
    fn table_cells_are_short() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(short(Duration::from_nanos(412)), "412 ns");
        assert_eq!(short(Duration::from_nanos(1_350)), "1.35 µs");
        assert_eq!(short(Duration::from_micros(12_400)), "12.4 ms");
        let report = LoadReport {
            pairs: 3,
            refused: 1,
            elapsed: Duration::from_secs(1),
            pairs_per_sec: 3.0,
            p50: Duration::from_nanos(1),
            p99: Duration::from_nanos(2),
            p999: Duration::from_nanos(3),
            max: Duration::from_micros(40),
        };
        let table = markdown_table(&[(LoadSpec::default(), report)]);
        assert!(table.ends_with("| 1 | 3 | siblings | 0 | 3 | 1 ns | 2 ns | 3 ns | 40.0 µs | 25.0 |\n"), "{table}");
    }
}

/// What every store's benchmark reads from its environment:
///
/// * `MUTEXTREE_BENCH_SECS`: seconds per row (default 1, fractions allowed);
/// * `MUTEXTREE_BENCH_RUNS=N`: each row N times, the run with the median
///   pairs/s reported (for noisy machines);
/// * `MUTEXTREE_BENCH_ROWS`: only the rows whose label contains one of these
///   comma-separated parts (for profiling).
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// How long each row runs.
    pub duration: Duration,
    /// How many times each row runs.
    pub repeats: usize,
    only: Option<Vec<String>>,
}

impl BenchSettings {
    /// The settings from the environment; panics with a message naming a
    /// malformed variable.
    pub fn from_env() -> Self {
        let duration = match std::env::var("MUTEXTREE_BENCH_SECS") {
            Ok(text) => {
                let secs: f64 =
                    text.trim().parse().unwrap_or_else(|_| panic!("MUTEXTREE_BENCH_SECS={text:?} is not a number"));
                assert!(secs > 0.0 && secs.is_finite(), "MUTEXTREE_BENCH_SECS must be positive");
                Duration::from_secs_f64(secs)
            }
            Err(_) => Duration::from_secs(1),
        };
        let repeats = std::env::var("MUTEXTREE_BENCH_RUNS").map_or(1, |text| {
            text.trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("MUTEXTREE_BENCH_RUNS={text:?} is not a positive integer"))
        });
        let only = std::env::var("MUTEXTREE_BENCH_ROWS").ok().map(|rows| rows.split(',').map(str::to_owned).collect());
        BenchSettings { duration, repeats, only }
    }

    /// These settings with `duration` per row (for a benchmark that reads
    /// its own variable).
    pub fn with_duration(self, duration: Duration) -> Self {
        BenchSettings { duration, ..self }
    }

    /// These settings with `repeats` runs per row.
    pub fn with_repeats(self, repeats: usize) -> Self {
        BenchSettings { repeats, ..self }
    }

    /// Whether the row labelled `label` is to run.
    pub fn includes(&self, label: &str) -> bool {
        self.only.as_ref().is_none_or(|only| only.iter().any(|part| label.contains(part.as_str())))
    }

    /// Runs a row [`repeats`](Self::repeats) times and returns the run with
    /// the median pairs/s, with the spread of all runs (`min..max`).
    pub fn median(&self, mut run: impl FnMut() -> LoadReport) -> (LoadReport, String) {
        let mut runs: Vec<LoadReport> = (0..self.repeats).map(|_| run()).collect();
        runs.sort_by(|a, b| a.pairs_per_sec.total_cmp(&b.pairs_per_sec));
        let spread = format!("{:.0}..{:.0}", runs[0].pairs_per_sec, runs[runs.len() - 1].pairs_per_sec);
        (runs.swap_remove(runs.len() / 2), spread)
    }
}

/// Waiting clients under contention, fair against barging: 16 clients
/// wait for random nodes of the contended tree at depth 3, in runs of one
/// and then the other, alternating, [`BenchSettings::repeats`] each, so
/// that both meet the same machine. `run_row` runs one spec on the store
/// being measured. Returns a Markdown section: every run's pairs/s, and the
/// median run of each with its wait percentiles. The rows are labelled
/// `c16/d3/contended/b0/fair-wait` and `.../barging-wait` for
/// `MUTEXTREE_BENCH_ROWS`; nothing runs (and the section is empty) unless
/// one of them is included.
pub fn fair_against_barging(settings: &BenchSettings, mut run_row: impl FnMut(&LoadSpec) -> LoadReport) -> String {
    let sides = [(Fairness::Fair, "fair-wait"), (Fairness::Barging, "barging-wait")];
    let sides: Vec<(LoadSpec, &str)> = sides
        .into_iter()
        .filter(|(_, label)| settings.includes(&format!("c16/d3/contended/b0/{label}")))
        .map(|(fairness, label)| {
            let spec = LoadSpec {
                clients: 16,
                scenario: Scenario::Contended,
                duration: settings.duration,
                waiting: Some(fairness),
                ..LoadSpec::default()
            };
            (spec, label)
        })
        .collect();
    if sides.is_empty() {
        return String::new();
    }
    let mut runs: Vec<Vec<LoadReport>> = vec![Vec::new(); sides.len()];
    for _ in 0..settings.repeats {
        for ((spec, _), reports) in sides.iter().zip(&mut runs) {
            reports.push(run_row(spec));
        }
    }
    let mut out = String::from(
        "### Waiting under contention: fair against barging\n\n| wait | pairs/s of each run |\n| --- | --- |\n",
    );
    let mut medians = Vec::new();
    for ((spec, label), mut reports) in sides.into_iter().zip(runs) {
        let each: Vec<String> = reports.iter().map(|report| thousands(report.pairs_per_sec.round() as u64)).collect();
        let _ = writeln!(out, "| {label} | {} |", each.join(" / "));
        reports.sort_by(|a, b| a.pairs_per_sec.total_cmp(&b.pairs_per_sec));
        medians.push((spec, reports.swap_remove(reports.len() / 2)));
    }
    out.push_str("\nThe median run of each (a pair's latency is its wait plus its release):\n\n");
    out.push_str(&markdown_table(&medians));
    out
}

/// `N cores, CPU model`, from the OS: for the header of a benchmark's
/// report.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores (nproc), {model}")
}

/// Now in UTC, from `date`, or the Unix time if it is missing: for the
/// header of a benchmark's report.
pub fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|| {
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            format!("Unix time {secs}")
        })
}

/// The runtime a benchmark row runs on: a current-thread one (one core) for
/// one client, a multi-thread one with two workers for more.
pub fn runtime_for(clients: usize) -> tokio::runtime::Runtime {
    if clients == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .expect("a tokio runtime")
}
