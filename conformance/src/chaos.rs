//! Chaos runs: many clients on overlapping paths while faults are
//! injected, judged afterwards from the history of what they were told.
//!
//! The trusted lock systems are judged by what survives faults, so ours
//! are too. A run has three phases:
//!
//! 1. **Faults.** Clients acquire (some waiting, in the store's queue or
//!    barging, some not), hold, refresh
//!    and release random nodes of a small deep tree, Exclusive or Shared,
//!    one or two at a time, upgrading or downgrading some while they hold
//!    them, while the store's
//!    [`ChaosStore::inject`] breaks things: the [proxy](crate::proxy)
//!    between clients and server, the server process itself (`kill -9` and
//!    a restart), a member of a cluster. Some clients also *pause* while
//!    holding, past their ttl, as a process stopped by `SIGSTOP` or a long
//!    garbage collection would, and then carry on as if they still held
//!    the lock.
//! 2. **Recovery.** Faults stop; every client must be granted something
//!    within a bounded time.
//! 3. **Settling.** Once every ttl has passed, the namespace must be empty,
//!    with no waiter's reservation left, and its roots lockable: no fault
//!    left a lock or a place in the queue behind for good.
//!
//! Every grant is recorded as the interval in which its client may
//! believe it holds the lock: from the reply to the release being sent,
//! cut at the grant's own `expires_at` (which counts from when the
//! request was *sent*, so it never outlives the store's expiry). A mode
//! change ends one interval and starts another with the new token: an
//! upgrade's Shared one ends at its reply (until then the store holds the
//! grant Shared or, stronger, Exclusive), a downgrade's Exclusive one ends
//! when it is sent (a reader may be let in at once). If the store is
//! right, no two such intervals with conflicting items (comparable paths,
//! not both Shared) intersect, whatever the faults. The history is checked
//! for that, and for fencing tokens that rise with every holder of a
//! conflicting item. A shadow resource plays the fenced service: each
//! holder writes its token when granted and before releasing, and paused
//! holders try to write after waking; a live holder's write must never be
//! refused, and the stale writes it refuses are counted. Every call runs under a limit, and a
//! call past it is a violation too (no call may hang).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use mutextree_core::backend::RESERVATION_TTL;
use mutextree_core::{
    Error, Fairness, Grant, LockBackend, LockItem, LockItems, LockPath, Mode, TreeLock, TreeLockBuilder,
};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::oracle::items_conflict;
use crate::proxy::{FaultProxy, NetFault};

/// The random source of a run's choices, seeded by [`ChaosSettings::seed`].
pub use fastrand::Rng;

/// How long and how hard a run is.
#[derive(Clone, Debug)]
pub struct ChaosSettings {
    /// Concurrent clients, each with its own connection.
    pub clients: usize,
    /// How long faults are injected.
    pub duration: Duration,
    /// The ttl of every lock.
    pub ttl: Duration,
    /// No call may take longer: the store's request timeout, its retries
    /// and some margin. Waiting acquisitions get their wait on top.
    pub call_limit: Duration,
    /// After faults stop, every client must be granted a lock within this.
    pub recovery: Duration,
    /// The seed of every random choice of the run (faults, paths, holds).
    pub seed: u64,
}

impl ChaosSettings {
    /// `clients` clients, faults for `MUTEXTREE_CHAOS_SECS` seconds (30 by
    /// default), the seed from `MUTEXTREE_CHAOS_SEED` or a random one.
    pub fn from_env(clients: usize, ttl: Duration, call_limit: Duration) -> Self {
        let number = |name: &str| std::env::var(name).ok().and_then(|value| value.trim().parse::<u64>().ok());
        ChaosSettings {
            clients,
            duration: Duration::from_secs(number("MUTEXTREE_CHAOS_SECS").unwrap_or(30)),
            ttl,
            call_limit,
            recovery: Duration::from_secs(60),
            seed: number("MUTEXTREE_CHAOS_SEED").unwrap_or_else(|| fastrand::u64(..)),
        }
    }
}

/// What a store gives a chaos run.
#[async_trait]
pub trait ChaosStore: Send + Sync {
    /// The store's name in the report.
    fn name(&self) -> String;

    /// A new client of `namespace` whose traffic meets the faults (through
    /// the proxies), with timeouts short enough for [`ChaosSettings::call_limit`].
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error>;

    /// Injects the run's `round`-th fault (counting from 0), chosen with
    /// `rng`: lets it last, heals it, and returns its name. The run calls
    /// it again and again during the fault phase. [`proxy_fault`] is the
    /// usual menu.
    async fn inject(&self, round: usize, rng: &mut Rng) -> String;

    /// Whether the store ends every lock at its ttl, so that a holder
    /// paused past it can never release it. etcd cannot: a new leader
    /// renews every lease, so a lock may outlive its ttl (never its
    /// holder's belief: `expires_at` still counts from the request).
    fn expiry_is_exact(&self) -> bool {
        true
    }
}

/// A store of one server, as the Redis and PostgreSQL tests start it: how
/// to reach it on a port, and how to crash it.
#[async_trait]
pub trait CrashableServer: Send + Sync + 'static {
    /// The store's name in the report.
    fn name(&self) -> String;

    /// The server's own port.
    fn port(&self) -> u16;

    /// A new client of `namespace` connecting to `port` (the server's or
    /// a proxy's), with short timeouts.
    async fn connect_to(&self, port: u16, namespace: &str) -> Result<Arc<dyn LockBackend>, Error>;

    /// Kills the server (`kill -9`) and starts it again on the same port
    /// and data; blocks until it accepts connections.
    fn crash_and_restart(&self);
}

/// A [`CrashableServer`] behind a [`FaultProxy`]: a [`ChaosStore`] whose
/// every fifth fault is a crash and a restart, the others the proxy's.
#[derive(Debug)]
pub struct BehindProxy<S> {
    /// The server.
    pub server: Arc<S>,
    /// The proxy its chaos clients go through.
    pub proxy: FaultProxy,
}

impl<S: CrashableServer> BehindProxy<S> {
    /// Puts a proxy in front of `server`.
    pub async fn start(server: S) -> Self {
        let proxy = FaultProxy::to_port(server.port()).await.expect("a proxy on loopback");
        BehindProxy { server: Arc::new(server), proxy }
    }

    /// [`lost_grant_reply_leaves_at_most_an_orphan`] through the proxy,
    /// observed on a direct connection.
    pub async fn lose_a_grant_reply(&self, ttl: Duration, slack: Duration, call_limit: Duration) {
        let namespace = crate::random_namespace();
        let proxied = self.connect(&namespace).await.expect("connect through the proxy");
        let observer = self.server.connect_to(self.server.port(), &namespace).await.expect("connect");
        lost_grant_reply_leaves_at_most_an_orphan(proxied, &self.proxy, observer, ttl, slack, call_limit).await;
    }
}

#[async_trait]
impl<S: CrashableServer> ChaosStore for BehindProxy<S> {
    fn name(&self) -> String {
        self.server.name()
    }

    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        self.server.connect_to(self.proxy.port(), namespace).await
    }

    async fn inject(&self, round: usize, rng: &mut Rng) -> String {
        if round % 5 == 4 {
            let server = self.server.clone();
            tokio::task::spawn_blocking(move || server.crash_and_restart()).await.expect("the restart panicked");
            return "kill -9 and restart".to_owned();
        }
        proxy_fault(&[&self.proxy], rng).await
    }
}

/// The chaos run and the lost-reply case of a [`CrashableServer`] behind a
/// proxy, as two named tests:
///
/// ```text
/// conformance::behind_proxy_tests!(server: Server::start(), ttl: TTL, call_limit: CALL_LIMIT, slack: SLACK);
/// ```
#[macro_export]
macro_rules! behind_proxy_tests {
    (server: $server:expr, ttl: $ttl:expr, call_limit: $limit:expr, slack: $slack:expr $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn chaos_proxy_faults_crashes_and_pauses() {
            let store = $crate::chaos::BehindProxy::start($server).await;
            let settings = $crate::chaos::ChaosSettings::from_env(16, $ttl, $limit);
            $crate::chaos::run(::std::sync::Arc::new(store), settings).await.assert_clean();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_lost_grant_reply_leaves_at_most_an_orphan() {
            let store = $crate::chaos::BehindProxy::start($server).await;
            store.lose_a_grant_reply($ttl, $slack, $limit).await;
        }
    };
}

/// One proxy fault, for 50 ms to 1.5 s, on one of `proxies` or on all of
/// them: a black hole, lost replies, a reset of every connection, a cut at
/// a random byte, a delay, or refused connections. Returns its name.
pub async fn proxy_fault(proxies: &[&FaultProxy], rng: &mut Rng) -> String {
    if proxies.is_empty() {
        return "none".to_owned();
    }
    let chosen: Vec<&FaultProxy> =
        if rng.bool() { proxies.to_vec() } else { vec![proxies[rng.usize(..proxies.len())]] };
    let lasting = Duration::from_millis(rng.u64(50..1500));
    let (fault, name) = match rng.u8(..6) {
        0 => (NetFault::BlackHole, "black hole"),
        1 => (NetFault::DropReplies, "lost replies"),
        2 => {
            chosen.iter().for_each(|proxy| proxy.reset_all());
            return "connections reset".to_owned();
        }
        3 => (NetFault::CutAfter(rng.usize(1..400)), "cut at a random byte"),
        4 => (NetFault::Delay(Duration::from_millis(rng.u64(1..300))), "delay"),
        _ => (NetFault::Refuse, "new connections refused"),
    };
    chosen.iter().for_each(|proxy| proxy.set(fault));
    sleep(lasting).await;
    chosen.iter().for_each(|proxy| proxy.set(NetFault::Pass));
    name.to_owned()
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// The store's name.
    pub store: String,
    /// The run's seed.
    pub seed: u64,
    /// How long faults were injected.
    pub duration: Duration,
    /// Calls made (acquire, refresh, release).
    pub calls: u64,
    /// Grants acknowledged to a client.
    pub grants: u64,
    /// Acquisitions refused or timed out on a held lock.
    pub refusals: u64,
    /// Calls that failed with a store error.
    pub errors: u64,
    /// Grants with a Shared item, and grants of several items.
    pub shared_grants: u64,
    /// Grants of several items.
    pub multi_path_grants: u64,
    /// Upgrades and downgrades granted.
    pub mode_changes: u64,
    /// Holders that paused past their ttl.
    pub pauses: u64,
    /// Writes of paused holders that the fenced resource refused.
    pub stale_writes_refused: u64,
    /// Releases by paused holders, after their ttl, that found the lock
    /// still there (only where expiry is not exact).
    pub late_releases: u64,
    /// Faults injected, by name.
    pub faults: BTreeMap<String, u64>,
    /// Everything that broke an invariant.
    pub violations: Vec<String>,
}

impl ChaosReport {
    /// Panics with the violations, if any.
    pub fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "{} violations (seed {}; rerun with MUTEXTREE_CHAOS_SEED={}), first ones:\n{}",
            self.violations.len(),
            self.seed,
            self.seed,
            self.violations.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

impl fmt::Display for ChaosReport {
    /// One line: the store, the figures, the faults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self.faults.iter().map(|(name, count)| format!("{name} ×{count}")).collect();
        write!(
            f,
            "chaos {}: {} s of faults, seed {}: {} calls, {} grants, {} refused, {} store errors, {} pauses past the \
             ttl ({} stale writes refused, {} late releases accepted), {} with a Shared item, {} multi-path, \
             {} mode changes, {} violations; faults: {}",
            self.store,
            self.duration.as_secs(),
            self.seed,
            self.calls,
            self.grants,
            self.refusals,
            self.errors,
            self.pauses,
            self.stale_writes_refused,
            self.late_releases,
            self.shared_grants,
            self.multi_path_grants,
            self.mode_changes,
            self.violations.len(),
            faults.join(", ")
        )
    }
}

/// Runs a chaos run on `store` and returns its report (printed too).
pub async fn run(store: Arc<dyn ChaosStore>, settings: ChaosSettings) -> ChaosReport {
    let namespace = format!("chaos-{:016x}", settings.seed);
    let mut clients = Vec::new();
    for _ in 0..settings.clients {
        clients.push(store.connect(&namespace).await.expect("a client connects before the faults"));
    }
    let run = Arc::new(Run::new(&settings, store.expiry_is_exact()));
    let started = Instant::now();
    let faults_end = started + settings.duration;
    let workers = clients.into_iter().enumerate().map(|(index, client)| {
        let run = run.clone();
        let seed = settings.seed.wrapping_add(index as u64 + 1);
        tokio::spawn(async move { run.worker(index, client, seed, faults_end).await })
    });
    let workers: Vec<_> = workers.collect();
    let mut faults = BTreeMap::new();
    let mut rng = Rng::with_seed(settings.seed);
    for round in 0.. {
        if Instant::now() >= faults_end {
            break;
        }
        let name = store.inject(round, &mut rng).await;
        *faults.entry(name).or_insert(0) += 1;
        sleep(Duration::from_millis(rng.u64(100..600))).await;
    }
    for worker in join_all(workers).await {
        worker.expect("a worker panicked");
    }
    // Settling: every lock and every reservation has expired or was
    // released.
    sleep(settings.ttl.max(RESERVATION_TTL) + settings.call_limit).await;
    let checker = store.connect(&namespace).await.expect("a client connects after the faults");
    match checker.list(None).await {
        Ok(left) if left.is_empty() => {}
        Ok(left) => run.violation(format!("{} locks left a ttl after the run, e.g. {}", left.len(), left[0].path)),
        Err(error) => run.violation(format!("cannot list after the run: {error}")),
    }
    match checker.waiters(None).await {
        Ok(left) if left.is_empty() => {}
        Ok(left) => run.violation(format!("{} reservations left after the run, e.g. {}", left.len(), left[0])),
        Err(error) => run.violation(format!("cannot list the waiters after the run: {error}")),
    }
    for root in ["a", "b", "c"] {
        let lock = TreeLock::builder(checker.clone(), root).ttl(settings.ttl).build().expect("lock");
        match lock.try_acquire().await {
            Ok(_) => {
                let _ = lock.release().await;
            }
            Err(error) => run.violation(format!("root {root} cannot be locked after the run: {error}")),
        }
    }
    let report = run.report(store.name(), &settings, faults);
    println!("{report}");
    report
}

/// A grant whose reply is lost on the wire: `proxied` sends it through
/// `proxy`, which forwards the request and throws the reply away.
///
/// The call must fail (within `call_limit`) and the handle must not
/// believe it holds anything; the store holds at most that one orphan,
/// owned by the handle's owner, which blocks overlapping paths (the handle
/// itself included: retrying never makes a second grant) and is gone at
/// its ttl: a waiting retry by the same handle is granted no earlier than
/// the orphan's expiry and no later than `slack` after it. `observer` is a
/// client that does not go through the proxy.
pub async fn lost_grant_reply_leaves_at_most_an_orphan(
    proxied: Arc<dyn LockBackend>,
    proxy: &FaultProxy,
    observer: Arc<dyn LockBackend>,
    ttl: Duration,
    slack: Duration,
    call_limit: Duration,
) {
    let path = LockPath::parse("lost/reply").expect("path");
    let lock = TreeLock::builder(proxied, path.clone()).ttl(ttl).owner("lost-reply").build().expect("lock");
    assert!(!lock.locked().await.expect("the proxy passes"), "a fresh namespace");
    // A first grant and release on the connection, so that what is lost
    // is the grant's answer, not a first exchange (loading a script,
    // preparing a statement) that would leave nothing behind.
    let warm = TreeLock::builder(lock.backend().clone(), "lost/warm").ttl(ttl).build().expect("lock");
    warm.try_acquire().await.expect("the proxy passes");
    warm.release().await.expect("the proxy passes");
    let dropped_before = proxy.stats().dropped_bytes;
    proxy.set(NetFault::DropReplies);
    let sent = Instant::now();
    let outcome = timeout(call_limit, lock.try_acquire()).await.expect("the call gives up by its limit");
    let sent_at_most = Instant::now();
    proxy.set(NetFault::Pass);
    assert!(outcome.is_err(), "no reply, yet the call says {outcome:?}");
    assert!(!lock.is_held(), "the handle believes it holds a lock it was never told of");
    assert!(proxy.stats().dropped_bytes > dropped_before, "no reply was lost: the request never reached the store");

    let listed_at = Instant::now();
    let orphans = observer.list(Some(&path)).await.expect("list");
    assert_eq!(orphans.len(), 1, "exactly one orphan: {orphans:?}");
    let orphan = &orphans[0];
    assert_eq!(orphan.owner, *lock.owner());
    assert!(orphan.remaining <= ttl, "the orphan outlives its ttl: {orphan:?}");
    let orphan_expiry = listed_at + orphan.remaining;

    // The same handle tries again, then waits: the orphan blocks it (a lock
    // is not re-entrant) until it expires, and it never holds two.
    match timeout(call_limit, lock.try_acquire()).await.expect("no hang") {
        Err(Error::Refused { blockers, .. }) => assert_eq!(blockers.first().token, orphan.token, "{blockers:?}"),
        other => panic!("the retry must be refused by the orphan, got {other:?}"),
    }
    let grant = timeout(call_limit + ttl * 2, lock.acquire_timeout(ttl * 2))
        .await
        .expect("no hang")
        .expect("granted once the orphan expired");
    let granted_at = Instant::now();
    assert_ne!(grant.token, orphan.token);
    assert!(granted_at + slack >= orphan_expiry, "granted {:?} before the orphan's expiry", orphan_expiry - granted_at);
    assert!(
        granted_at <= sent_at_most.max(sent) + ttl + slack + call_limit,
        "the orphan lived {:?}, its ttl is {ttl:?}",
        granted_at - sent
    );
    let held = observer.list(Some(&path)).await.expect("list");
    assert_eq!(held.iter().map(|lock| lock.token).collect::<Vec<_>>(), vec![grant.token], "one lock, the new one");
    lock.release().await.expect("release");
}

/// The nodes of the run's tree: depth 3, fan-out 3 (39 nodes, 3 roots).
fn tree() -> Vec<LockPath> {
    const NAMES: [&str; 3] = ["a", "b", "c"];
    let mut all = Vec::new();
    for a in NAMES {
        all.push(LockPath::new([a]).expect("path"));
        for b in NAMES {
            all.push(LockPath::new([a, b]).expect("path"));
            for c in NAMES {
                all.push(LockPath::new([a, b, c]).expect("path"));
            }
        }
    }
    all
}

/// A grant as its client saw it.
#[derive(Clone, Debug)]
struct Held {
    items: LockItems,
    token: u64,
    client: usize,
    from: Instant,
    until: Instant,
}

/// The state shared by a run's workers.
struct Run {
    tree: Vec<LockPath>,
    ttl: Duration,
    call_limit: Duration,
    recovery: Duration,
    exact_expiry: bool,
    history: Mutex<Vec<Held>>,
    fence: Mutex<HashMap<LockItem, u64>>,
    violations: Mutex<Vec<String>>,
    calls: AtomicU64,
    refusals: AtomicU64,
    errors: AtomicU64,
    pauses: AtomicU64,
    stale_writes_refused: AtomicU64,
    late_releases: AtomicU64,
    mode_changes: AtomicU64,
}

impl Run {
    fn new(settings: &ChaosSettings, exact_expiry: bool) -> Self {
        Run {
            tree: tree(),
            ttl: settings.ttl,
            call_limit: settings.call_limit,
            recovery: settings.recovery,
            exact_expiry,
            history: Mutex::new(Vec::new()),
            fence: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            stale_writes_refused: AtomicU64::new(0),
            late_releases: AtomicU64::new(0),
            mode_changes: AtomicU64::new(0),
        }
    }

    fn violation(&self, what: String) {
        self.violations.lock().expect("violations").push(what);
    }

    /// One call under the run's limit; a call past it is a violation, and
    /// comes back as `None`.
    async fn call<T>(&self, what: &str, limit: Duration, call: impl std::future::Future<Output = T>) -> Option<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        match timeout(limit, call).await {
            Ok(outcome) => Some(outcome),
            Err(_) => {
                self.violation(format!("{what} hung: no answer {:?} after it started", started.elapsed()));
                None
            }
        }
    }

    /// The fenced resource: a write is accepted if its token is above
    /// every token written by a conflicting item (or is the writer's own
    /// last one). Readers write too: a stale reader must be refused as
    /// well.
    fn write(&self, grant: &Grant) -> bool {
        let mut fence = self.fence.lock().expect("fence");
        let accepted = fence.iter().all(|(written, &token)| {
            token <= grant.token || !grant.items.iter().any(|item| items_conflict(item, written))
        });
        if accepted {
            for item in &grant.items {
                let highest = fence.entry(item.clone()).or_default();
                *highest = (*highest).max(grant.token);
            }
        }
        accepted
    }

    /// A live holder writes; being refused means a later token was already
    /// given to an overlapping holder.
    fn write_live(&self, grant: &Grant) {
        if !self.write(grant) && !grant.is_expired() {
            self.violation(format!("the fenced resource refused live holder {} token {}", grant.items, grant.token));
        }
    }

    async fn worker(&self, index: usize, client: Arc<dyn LockBackend>, seed: u64, faults_end: Instant) {
        let mut rng = Rng::with_seed(seed);
        let owner = format!("client-{index}");
        while Instant::now() < faults_end {
            self.round(index, &client, &owner, &mut rng, faults_end).await;
        }
        // Recovery: faults have stopped, so a grant must come.
        let deadline = Instant::now() + self.recovery;
        loop {
            if self.round(index, &client, &owner, &mut rng, Instant::now()).await {
                return;
            }
            if Instant::now() >= deadline {
                self.violation(format!("client {index} got no grant within {:?} after the faults", self.recovery));
                return;
            }
        }
    }

    /// One acquisition and what follows it; whether it was granted. Pauses
    /// only before `pause_before`, so recovery is not one.
    async fn round(
        &self,
        index: usize,
        client: &Arc<dyn LockBackend>,
        owner: &str,
        rng: &mut Rng,
        pause_before: Instant,
    ) -> bool {
        let items = self.random_items(rng);
        // Waiters queue as the store does by default, or barge now and then.
        let fairness = if rng.u8(..4) == 0 { Fairness::Barging } else { client.fairness() };
        let lock = TreeLockBuilder::<TreeLock>::many(client.clone(), items.iter().map(|i| (i.path.clone(), i.mode)))
            .ttl(self.ttl)
            .owner(owner)
            .fairness(fairness)
            .build()
            .expect("the run's locks are valid");
        let waiting = rng.bool();
        let acquired = if waiting {
            let wait = self.ttl / 2;
            self.call("a waiting acquire", self.call_limit + wait, lock.acquire_timeout(wait)).await
        } else {
            self.call("an acquire", self.call_limit, lock.try_acquire()).await
        };
        let mut grant = match acquired {
            Some(Ok(grant)) => grant,
            Some(Err(Error::Refused { .. } | Error::Timeout { .. })) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Some(Err(Error::Unsupported { reason, .. })) => {
                self.violation(format!("{} is unsupported: {reason}", lock.items()));
                return false;
            }
            Some(Err(_)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                // A client backs off a little before trying a failing
                // store again.
                sleep(Duration::from_millis(rng.u64(10..50))).await;
                return false;
            }
            None => return false,
        };
        let from = Instant::now();
        self.write_live(&grant);
        let mut held = Held { items, token: grant.token, client: index, from, until: grant.expires_at };
        let choice = rng.u8(..10);
        if choice == 0 && Instant::now() + self.ttl * 2 < pause_before {
            // Stopped past the ttl, then carrying on. The store granted
            // the lock at the latest when its reply came, so its expiry is
            // at most a ttl after that (a delayed request starts the
            // store's ttl later than the client's `expires_at` says).
            self.pauses.fetch_add(1, Ordering::Relaxed);
            sleep_until(from + grant.ttl + self.ttl / 2).await;
            if !self.write(&grant) {
                self.stale_writes_refused.fetch_add(1, Ordering::Relaxed);
            }
            match self.call("a release after a pause", self.call_limit, client.release(&grant)).await {
                Some(Ok(())) if self.exact_expiry => self.violation(format!(
                    "{} token {} was released by its holder a ttl after it expired",
                    grant.items, grant.token
                )),
                Some(Ok(())) => {
                    self.late_releases.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(error)) if !error.is_retryable() && !matches!(error, Error::NotHeld { .. }) => {
                    self.violation(format!("a release after a pause failed: {error}"));
                }
                _ => {}
            }
            self.record(held);
            return true;
        }
        sleep(Duration::from_millis(rng.u64(0..=self.ttl.as_millis() as u64 / 16))).await;
        if choice == 1 {
            match self.call("a refresh", self.call_limit, lock.refresh()).await {
                Some(Ok(refreshed)) => {
                    grant = refreshed;
                    held.until = held.until.max(grant.expires_at);
                }
                Some(Err(Error::NotHeld { .. })) => {}
                Some(Err(_)) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            sleep(Duration::from_millis(rng.u64(0..=self.ttl.as_millis() as u64 / 16))).await;
        }
        if choice == 2 {
            match self.change_mode(&lock, grant, held).await {
                Some((changed, now_held)) => (grant, held) = (changed, now_held),
                None => {
                    self.release(&lock).await;
                    return true;
                }
            }
            sleep(Duration::from_millis(rng.u64(0..=self.ttl.as_millis() as u64 / 16))).await;
        }
        self.write_live(&grant);
        held.until = held.until.min(Instant::now());
        self.record(held);
        self.release(&lock).await;
        true
    }

    async fn release(&self, lock: &TreeLock) {
        match self.call("a release", self.call_limit, lock.release()).await {
            Some(Ok(()) | Err(Error::NotHeld { .. })) | None => {}
            Some(Err(_)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One, two or three random nodes of the tree: Exclusive alone as
    /// often as anything else, otherwise in random modes.
    fn random_items(&self, rng: &mut Rng) -> LockItems {
        loop {
            let count = if rng.bool() { 1 } else { rng.usize(1..=3) };
            let exclusive_only = rng.u8(..3) == 0;
            let items = (0..count).map(|_| {
                let mode = if exclusive_only || rng.bool() { Mode::Exclusive } else { Mode::Shared };
                (self.tree[rng.usize(..self.tree.len())].clone(), mode)
            });
            // Two items on one branch in different modes are invalid
            // input: draw again.
            if let Ok(items) = LockItems::new(items.collect::<Vec<_>>()) {
                return items;
            }
        }
    }

    /// Upgrades a grant with a Shared item, or downgrades one without:
    /// records the interval the old grant was believed held and returns the
    /// new grant with its interval, or `None` if the grant may be lost (the
    /// old interval is recorded then too).
    async fn change_mode(&self, lock: &TreeLock, grant: Grant, mut held: Held) -> Option<(Grant, Held)> {
        let upgrade = grant.items.any(Mode::Shared);
        let sent = Instant::now();
        let changed = if upgrade {
            self.call("an upgrade", self.call_limit, lock.upgrade()).await
        } else {
            self.call("a downgrade", self.call_limit, lock.downgrade()).await
        };
        let replied = Instant::now();
        let believed = held.until;
        // Until an upgrade's reply the grant is Shared or stronger; a
        // downgrade may let readers in as soon as it is sent.
        held.until = held.until.min(if upgrade { replied } else { sent });
        match changed {
            Some(Ok(new)) => {
                self.mode_changes.fetch_add(1, Ordering::Relaxed);
                self.record(held.clone());
                self.write_live(&new);
                let now_held =
                    Held { items: new.items.clone(), token: new.token, from: replied, until: new.expires_at, ..held };
                Some((new, now_held))
            }
            Some(Err(Error::Refused { .. })) if upgrade => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                held.until = believed;
                Some((grant, held))
            }
            Some(Err(Error::Unsupported { reason, .. })) => {
                self.violation(format!("a mode change of {} is unsupported: {reason}", grant.items));
                self.record(held);
                None
            }
            Some(Err(Error::NotHeld { .. })) | None => {
                self.record(held);
                None
            }
            Some(Err(_)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.record(held);
                None
            }
        }
    }

    fn record(&self, held: Held) {
        self.history.lock().expect("history").push(held);
    }

    fn report(&self, store: String, settings: &ChaosSettings, faults: BTreeMap<String, u64>) -> ChaosReport {
        let history = self.history.lock().expect("history");
        let mut violations = self.violations.lock().expect("violations").clone();
        violations.extend(check_history(&history));
        ChaosReport {
            store,
            seed: settings.seed,
            duration: settings.duration,
            calls: self.calls.load(Ordering::Relaxed),
            grants: history.len() as u64,
            shared_grants: history.iter().filter(|held| held.items.any(Mode::Shared)).count() as u64,
            multi_path_grants: history.iter().filter(|held| held.items.len() > 1).count() as u64,
            mode_changes: self.mode_changes.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            pauses: self.pauses.load(Ordering::Relaxed),
            stale_writes_refused: self.stale_writes_refused.load(Ordering::Relaxed),
            late_releases: self.late_releases.load(Ordering::Relaxed),
            faults,
            violations,
        }
    }
}

/// The history's violations: two overlapping intervals with conflicting
/// items, or a holder whose token is not above that of every earlier
/// holder of a conflicting item.
fn check_history(history: &[Held]) -> Vec<String> {
    // Ends sort before starts at the same instant: touching is not
    // overlapping.
    let mut events: Vec<(Instant, bool, usize)> = Vec::new();
    for (index, held) in history.iter().enumerate() {
        if held.from < held.until {
            events.push((held.from, true, index));
            events.push((held.until, false, index));
        }
    }
    events.sort_by_key(|&(at, is_start, _)| (at, is_start));
    let conflict = |items: &LockItems, other: &LockItem| items.iter().any(|item| items_conflict(item, other));
    let mut live: Vec<usize> = Vec::new();
    let mut highest_ended: HashMap<&LockItem, u64> = HashMap::new();
    let mut violations = Vec::new();
    for (_, is_start, index) in events {
        let held = &history[index];
        if !is_start {
            live.retain(|&other| other != index);
            for item in &held.items {
                let highest = highest_ended.entry(item).or_insert(0);
                *highest = (*highest).max(held.token);
            }
            continue;
        }
        for &other in &live {
            let other = &history[other];
            if other.items.iter().any(|item| conflict(&held.items, item)) {
                violations.push(format!(
                    "client {} held {} (token {}) while client {} held {} (token {})",
                    held.client, held.items, held.token, other.client, other.items, other.token
                ));
            }
        }
        for (item, earlier) in
            highest_ended.iter().filter(|&(item, &token)| token >= held.token && conflict(&held.items, item))
        {
            violations.push(format!(
                "client {} got token {} on {} after token {earlier} on {item} had been held",
                held.client, held.token, held.items
            ));
        }
        live.push(index);
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use mutextree_core::backend::{Attempt, Listener, LockKind, LockRequest};
    use mutextree_core::{HeldLock, LockItems, Mode, Ttl};

    /// A store that grants everything: a run on it must find violations.
    #[derive(Debug, Default)]
    struct Liar {
        tokens: AtomicU64,
    }

    #[async_trait]
    impl LockBackend for Liar {
        async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
            let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Attempt::Granted(Grant::new(request, kind, token, request.ttl.get(), Instant::now())))
        }
        async fn release(&self, _grant: &Grant) -> Result<(), Error> {
            Ok(())
        }
        async fn refresh(&self, grant: &Grant, _ttl: Ttl) -> Result<Grant, Error> {
            Ok(grant.clone())
        }
        async fn list(&self, _under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
            Ok(Vec::new())
        }
        async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
            self.try_lock_key(request, LockKind::Lock).await
        }
        async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
            let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Attempt::Granted(Grant { items: grant.items.with_mode(mode), token, ..grant.clone() }))
        }
        async fn withdraw(&self, _owner: &mutextree_core::Owner, _ticket: u64) -> Result<(), Error> {
            Ok(())
        }
        async fn waiters(&self, _under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
            Ok(Vec::new())
        }
        fn fairness(&self) -> mutextree_core::Fairness {
            mutextree_core::Fairness::Barging
        }
        fn listen(&self, _items: &LockItems) -> Listener {
            Listener::polling()
        }
    }

    struct LyingStore(Arc<Liar>);

    #[async_trait]
    impl ChaosStore for LyingStore {
        fn name(&self) -> String {
            "liar".to_owned()
        }
        async fn connect(&self, _namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
            Ok(self.0.clone())
        }
        async fn inject(&self, _round: usize, _rng: &mut Rng) -> String {
            sleep(Duration::from_millis(50)).await;
            "none".to_owned()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_on_a_store_that_grants_everything_finds_violations() {
        let settings = ChaosSettings {
            clients: 8,
            duration: Duration::from_secs(1),
            ttl: Duration::from_millis(400),
            call_limit: Duration::from_millis(200),
            recovery: Duration::from_secs(1),
            seed: 7,
        };
        let report = run(Arc::new(LyingStore(Arc::default())), settings).await;
        assert!(report.violations.iter().any(|v| v.contains("while client")), "{:?}", report.violations);
        assert!(report.violations.iter().any(|v| v.contains("released by its holder")), "{:?}", report.violations);
        assert!(report.shared_grants > 0 && report.multi_path_grants > 0 && report.mode_changes > 0, "{report}");
        let shared_beside_exclusive = |v: &&String| v.contains("(shared)") && v.contains("while client");
        assert!(report.violations.iter().any(|v| shared_beside_exclusive(&v)), "{:?}", report.violations);
        assert!(std::panic::catch_unwind(|| report.assert_clean()).is_err());
    }

    fn held_items(items: &[(&str, Mode)], token: u64, from_ms: u64, until_ms: u64, origin: Instant) -> Held {
        Held {
            items: LockItems::new(items.iter().map(|&(path, mode)| (LockPath::parse(path).expect("path"), mode)))
                .expect("items"),
            token,
            client: token as usize,
            from: origin + Duration::from_millis(from_ms),
            until: origin + Duration::from_millis(until_ms),
        }
    }

    fn held(path: &str, token: u64, from_ms: u64, until_ms: u64, origin: Instant) -> Held {
        held_items(&[(path, Mode::Exclusive)], token, from_ms, until_ms, origin)
    }

    #[test]
    fn the_history_check_finds_overlaps_and_stale_tokens() {
        let origin = Instant::now();
        let clean = [held("a", 1, 0, 10, origin), held("a/b", 2, 10, 20, origin), held("b", 3, 5, 30, origin)];
        assert_eq!(check_history(&clean), Vec::<String>::new());
        let overlapping = [held("a", 1, 0, 10, origin), held("a/b/a", 2, 9, 20, origin)];
        assert_eq!(check_history(&overlapping).len(), 1);
        let stale = [held("a/a", 5, 0, 10, origin), held("a", 4, 11, 20, origin)];
        assert_eq!(check_history(&stale).len(), 1);
        // A grant its client got after its expiry is an empty interval.
        let empty = [held("a", 1, 0, 10, origin), held("a", 2, 5, 5, origin)];
        assert_eq!(check_history(&empty), Vec::<String>::new());
    }

    #[test]
    fn the_history_check_judges_every_item_by_its_mode() {
        let origin = Instant::now();
        let shared = |path, token, from, until| held_items(&[(path, Mode::Shared)], token, from, until, origin);
        // Readers overlap, in any token order; a writer after them is clean.
        let readers = [shared("a", 2, 0, 10), shared("a/b/c", 1, 5, 15), held("a/c", 3, 15, 20, origin)];
        assert_eq!(check_history(&readers), Vec::<String>::new());
        // A Shared ancestor and an Exclusive descendant overlap.
        let subtree = [shared("a", 1, 0, 10), held("a/b/c", 2, 5, 15, origin)];
        assert_eq!(check_history(&subtree).len(), 1);
        // The second item of a grant conflicts; and a later token.
        let second = [
            held_items(&[("b", Mode::Exclusive), ("c", Mode::Shared)], 1, 0, 10, origin),
            held_items(&[("a", Mode::Exclusive), ("c/x", Mode::Exclusive)], 2, 5, 15, origin),
        ];
        assert_eq!(check_history(&second).len(), 1);
        let stale =
            [held_items(&[("b", Mode::Exclusive), ("c", Mode::Shared)], 5, 0, 10, origin), shared("c/x", 4, 11, 20)];
        assert_eq!(check_history(&stale), Vec::<String>::new(), "Shared after Shared: no order");
        let stale =
            [held_items(&[("b", Mode::Shared), ("c", Mode::Exclusive)], 5, 0, 10, origin), shared("c/x", 4, 11, 20)];
        assert_eq!(check_history(&stale).len(), 1, "Shared after Exclusive: a later token");
        // An upgrade: the Shared interval ends where the Exclusive one starts.
        let upgrade = [shared("a", 1, 0, 10), held("a", 2, 10, 20, origin), shared("a/b", 3, 20, 30)];
        assert_eq!(check_history(&upgrade), Vec::<String>::new());
    }
}
