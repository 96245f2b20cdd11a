//! Tree locks at work in a small datacenter, on the in-process memory store.
//!
//! The datacenter is a tree of regions, racks and hosts:
//!
//! ```text
//! eu-west ── rack-1 ── host-1 host-2 host-3
//!        └── rack-2 ── host-1 host-2 host-3
//! us-east ── rack-1 ── host-1 host-2
//! ```
//!
//! Locking a node protects it and its whole subtree: a lock on
//! `eu-west/rack-1` covers its three hosts. It is refused while the node, an
//! ancestor or a descendant is held; siblings are independent. Every lock
//! has an owner id, a ttl after which the store drops it, and a fencing
//! token higher than every token granted before it.
//!
//! Six workers run concurrently on one [`MemoryBackend`], each with its own
//! owner id and job:
//!
//! * `kernel-patcher` patches the hosts of `eu-west/rack-1` one after
//!   another (the guard form: `lock.lock().await?`, then
//!   `guard.release().await?`), then finds a host blocked by a lock on the
//!   rack *above* it;
//! * `disk-scrubber` works on the sibling rack `eu-west/rack-2` at the same
//!   time (the closure form: `lock.run(|grant| async move { .. })`);
//! * `flaky-agent` takes `eu-west/rack-2/host-2` and crashes without
//!   releasing it: the lock expires at its ttl, and `disk-scrubber`, which
//!   was waiting for it, gets it then;
//! * `rack-firmware` wants the whole of `eu-west/rack-1` and waits, up to a
//!   time limit, until no host under it is held;
//! * `region-failover` tries the whole of `eu-west` without waiting and is
//!   refused while anything under it is held (the error names the blocker,
//!   its owner and its remaining life), then waits for it;
//! * `cert-renewer` works in `us-east`, a sibling region, while `eu-west` is
//!   locked whole.
//!
//! It prints a timeline (milliseconds since the start, actor, event,
//! details), then what each actor got, waited for or was refused. Small
//! delays put the events in the same order on every run; the whole run takes
//! about two seconds of real time. Run it with:
//!
//! ```text
//! cargo run --example datacenter
//! ```

use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mutextree::backend::human;
use mutextree::memory::MemoryBackend;
use mutextree::{Error, Grant, HeldLock, IntoLockPath, LockBackend, LockPath, TreeLock, Wait};
use tokio::time::{sleep, sleep_until, Instant};

/// How long a worker's lock lives unless it is released first.
const TTL: Duration = Duration::from_secs(2);
/// How long `flaky-agent`'s lock lives: how long its host stays locked
/// after the crash.
const CRASH_TTL: Duration = Duration::from_millis(1200);
/// How long a worker waits for a held lock before giving up.
const PATIENCE: Duration = Duration::from_secs(2);

/// The actors and their jobs, in the order the summary lists them.
const ACTORS: [(&str, &str); 6] = [
    ("kernel-patcher", "patches the eu-west/rack-1 hosts one by one, then re-checks host-1"),
    ("disk-scrubber", "scrubs the eu-west/rack-2 hosts, beside kernel-patcher's rack"),
    ("flaky-agent", "takes eu-west/rack-2/host-2 and crashes without releasing it"),
    ("rack-firmware", "flashes all of eu-west/rack-1: needs every host under it free"),
    ("region-failover", "drains all of eu-west: needs everything under it free"),
    ("cert-renewer", "renews certificates in us-east, the sibling region of eu-west"),
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let timeline = Arc::new(Timeline::new());

    println!("mutextree: tree locks in a small datacenter (in-process memory store)\n");
    println!("The tree; locking a node locks its whole subtree:");
    println!("  eu-west ── rack-1 ── host-1 host-2 host-3");
    println!("         └── rack-2 ── host-1 host-2 host-3");
    println!("  us-east ── rack-1 ── host-1 host-2\n");
    println!("The actors (they run concurrently, each with its own owner id):");
    for (actor, job) in ACTORS {
        println!("  {actor:<16} {job}");
    }
    println!("\nLocks live {} (flaky-agent's {}) unless released.\n", human(TTL), human(CRASH_TTL));
    println!("{:>6}     {:<16} {:<9} details", "time", "actor", "event");

    // The six actors run concurrently; the first error, if any, ends the run.
    // Each actor is a task of its own: they really run at once.
    let actors = [
        tokio::spawn(kernel_patcher(Arc::clone(&store), Arc::clone(&timeline))),
        tokio::spawn(disk_scrubber(Arc::clone(&store), Arc::clone(&timeline))),
        tokio::spawn(flaky_agent(Arc::clone(&store), Arc::clone(&timeline))),
        tokio::spawn(rack_firmware(Arc::clone(&store), Arc::clone(&timeline))),
        tokio::spawn(region_failover(Arc::clone(&store), Arc::clone(&timeline))),
        tokio::spawn(cert_renewer(Arc::clone(&store), Arc::clone(&timeline))),
    ];
    for actor in actors {
        actor.await.expect("an actor panicked")?;
    }

    let left = store.list(None).await?;
    println!("\nLocks left in the store: {}", if left.is_empty() { "none".to_owned() } else { left.len().to_string() });
    timeline.summary();
    Ok(())
}

/// Patches the rack-1 hosts in turn with the guard form, then re-checks
/// host-1 while rack-firmware holds the rack above it.
async fn kernel_patcher(store: Arc<dyn LockBackend>, timeline: Arc<Timeline>) -> Result<(), Error> {
    const ME: &str = "kernel-patcher";
    for (host, start) in [("host-1", 0), ("host-2", 300), ("host-3", 600)] {
        timeline.at(start).await;
        let lock = lock_for(&store, ME, ["eu-west", "rack-1", host])?;
        let guard = lock.lock().await?;
        timeline.got(ME, guard.grant(), "guard form: lock().await; patching the kernel");
        sleep(ms(280)).await;
        guard.release().await?;
        timeline.released(ME, lock.path(), "patched");
    }

    // A last reboot check of host-1, while rack-firmware holds its rack.
    timeline.at(1000).await;
    let lock = lock_for(&store, ME, "eu-west/rack-1/host-1")?;
    hold_for(&timeline, ME, &lock, "reboot check", ms(100), "the host came back fine").await?;
    Ok(())
}

/// Scrubs the rack-2 hosts, two with the closure form; host-2 is held by
/// the crashed flaky-agent, so it waits for that lock to expire.
async fn disk_scrubber(store: Arc<dyn LockBackend>, timeline: Arc<Timeline>) -> Result<(), Error> {
    const ME: &str = "disk-scrubber";
    for (host, start) in [("host-1", 10), ("host-3", 310)] {
        timeline.at(start).await;
        let lock = lock_for(&store, ME, ["eu-west", "rack-2", host])?;
        let during = Arc::clone(&timeline);
        // `run` acquires, runs the closure with the grant (for its fencing
        // token), and releases whatever the closure's outcome.
        lock.run(|grant| async move {
            during.got(ME, &grant, "closure form: run(|grant| ..); scrubbing disks");
            sleep(ms(280)).await;
        })
        .await?;
        timeline.released(ME, lock.path(), "scrubbed; run released it on return");
    }

    timeline.at(610).await;
    let lock = lock_for(&store, ME, "eu-west/rack-2/host-2")?;
    hold_for(&timeline, ME, &lock, "scrubbing disks", ms(280), "scrubbed").await?;
    Ok(())
}

/// Takes a host and crashes: no release, no refresh. The store drops the
/// lock when its ttl runs out; whoever waits for it reports that.
async fn flaky_agent(store: Arc<dyn LockBackend>, timeline: Arc<Timeline>) -> Result<(), Error> {
    const ME: &str = "flaky-agent";
    timeline.at(20).await;
    let lock = TreeLock::builder(store, ["eu-west", "rack-2", "host-2"]).owner(ME).ttl(CRASH_TTL).build()?;
    let guard = lock.lock().await?;
    timeline.got(ME, guard.grant(), "guard form; upgrading the agent");
    sleep(ms(30)).await;
    timeline.event(ME, "crashed", format!("{}: still locked, and nobody will release it", lock.path()));
    timeline.note(ME, format!("crashed holding {}", lock.path()));
    // A crash runs no destructors. Dropping the guard would release the lock
    // in the background; forgetting it leaves the lock to its ttl.
    std::mem::forget(guard);
    Ok(())
}

/// Wants the whole rack-1: waits until kernel-patcher's host under it is free.
async fn rack_firmware(store: Arc<dyn LockBackend>, timeline: Arc<Timeline>) -> Result<(), Error> {
    const ME: &str = "rack-firmware";
    timeline.at(700).await;
    let lock = lock_for(&store, ME, "eu-west/rack-1")?;
    hold_for(&timeline, ME, &lock, "flashing the rack's firmware", ms(400), "firmware flashed").await?;
    Ok(())
}

/// Tries the whole region without waiting (refused while anything under it
/// is held), then later waits for it.
async fn region_failover(store: Arc<dyn LockBackend>, timeline: Arc<Timeline>) -> Result<(), Error> {
    const ME: &str = "region-failover";
    let lock = lock_for(&store, ME, "eu-west")?;
    timeline.at(400).await;
    match lock.try_acquire().await {
        Ok(_) => {
            lock.release().await?;
            timeline.event(ME, "released", "eu-west: it was free after all; nothing to show");
            return Ok(());
        }
        Err(refused @ Error::Refused { .. }) => timeline.refused(ME, lock.path(), &refused),
        Err(other) => return Err(other),
    }

    timeline.at(1050).await;
    hold_for(&timeline, ME, &lock, "draining eu-west: its traffic goes to us-east", ms(300), "eu-west drained").await?;
    Ok(())
}

/// Works in us-east while region-failover holds all of eu-west.
async fn cert_renewer(store: Arc<dyn LockBackend>, timeline: Arc<Timeline>) -> Result<(), Error> {
    const ME: &str = "cert-renewer";
    timeline.at(1600).await;
    for host in ["host-1", "host-2"] {
        let lock = lock_for(&store, ME, ["us-east", "rack-1", host])?;
        let during = Arc::clone(&timeline);
        lock.run(|grant| async move {
            during.got(ME, &grant, "closure form; eu-west is locked whole, but us-east is not under it");
            sleep(ms(150)).await;
        })
        .await?;
        timeline.released(ME, lock.path(), "certificate renewed");
    }
    Ok(())
}

/// A lock for `actor` with the demo's ttl and patience.
fn lock_for(store: &Arc<dyn LockBackend>, actor: &str, path: impl IntoLockPath) -> Result<TreeLock, Error> {
    TreeLock::builder(Arc::clone(store), path).owner(actor).ttl(TTL).timeout(PATIENCE).build()
}

/// Takes `lock` (telling what it waits for), works on it for `work`, then
/// releases it.
async fn hold_for(
    timeline: &Timeline,
    actor: &'static str,
    lock: &TreeLock,
    job: &str,
    work: Duration,
    done: &str,
) -> Result<(), Error> {
    if take(timeline, actor, lock, job).await?.is_some() {
        sleep(work).await;
        lock.release().await?;
        timeline.released(actor, lock.path(), done);
    }
    Ok(())
}

/// Acquires through the handle; if the lock is held, says what is in the
/// way and waits up to [`PATIENCE`] for it. `None` if the wait timed out.
/// The handle holds the grant; the caller releases it.
async fn take(timeline: &Timeline, actor: &'static str, lock: &TreeLock, job: &str) -> Result<Option<Grant>, Error> {
    let refused = match lock.try_acquire().await {
        Ok(grant) => {
            timeline.got(actor, &grant, job);
            return Ok(Some(grant));
        }
        Err(refused @ Error::Refused { .. }) => refused,
        Err(other) => return Err(other),
    };
    timeline.event_why(actor, "waiting", format!("for {}, up to {}", lock.path(), human(PATIENCE)), &refused);

    let started = Instant::now();
    match lock.acquire_with(Wait::For(PATIENCE)).await {
        Ok(grant) => {
            let waited = human(started.elapsed());
            if let Some(blocker) = refused.blocker() {
                // The blocker's remaining life was measured before `started`:
                // if that much time has passed, its ttl has certainly run out.
                if started.elapsed() >= blocker.remaining {
                    timeline.expired(blocker);
                }
                timeline
                    .note(actor, format!("waited {waited} for {}: {}", lock.path(), in_the_way(lock.path(), blocker)));
            }
            timeline.got(actor, &grant, &format!("after waiting {waited}; {job}"));
            Ok(Some(grant))
        }
        Err(timeout @ Error::Timeout { .. }) => {
            timeline.event(actor, "gave up", &timeout);
            timeline.note(actor, format!("gave up waiting for {}", lock.path()));
            Ok(None)
        }
        Err(other) => Err(other),
    }
}

/// "kernel-patcher held its descendant eu-west/rack-1/host-3", "flaky-agent
/// held it".
fn in_the_way(path: &LockPath, blocker: &HeldLock) -> String {
    let owner = blocker.owner.as_str();
    if blocker.path == *path {
        format!("{owner} held it")
    } else if blocker.path.is_ancestor_of(path) {
        format!("{owner} held its ancestor {}", blocker.path)
    } else {
        format!("{owner} held its descendant {}", blocker.path)
    }
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Prints events as they happen and remembers, for the summary, what each
/// actor got, waited for or was refused.
struct Timeline {
    start: Instant,
    /// `(actor, what happened)`, in order.
    notes: Mutex<Vec<(&'static str, String)>>,
    /// Every fencing token granted.
    tokens: Mutex<Vec<u64>>,
    /// The tokens of the expired locks already reported.
    expired: Mutex<Vec<u64>>,
}

impl Timeline {
    fn new() -> Self {
        Timeline { start: Instant::now(), notes: Mutex::default(), tokens: Mutex::default(), expired: Mutex::default() }
    }

    /// Sleeps until `millis` after the start: it orders the story.
    async fn at(&self, millis: u64) {
        sleep_until(self.start + ms(millis)).await;
    }

    fn line(&self, actor: &str, event: &str, details: impl Display) -> String {
        format!("{:>6} ms  {actor:<16} {event:<9} {details}", self.start.elapsed().as_millis())
    }

    fn event(&self, actor: &str, event: &str, details: impl Display) {
        println!("{}", self.line(actor, event, details));
    }

    /// An event and, on the next line, why. One `println!`, so that no
    /// other actor's line comes between them.
    fn event_why(&self, actor: &str, event: &str, details: impl Display, why: impl Display) {
        println!("{}\n{:40}{why}", self.line(actor, event, details), "");
    }

    fn note(&self, actor: &'static str, note: String) {
        lock(&self.notes).push((actor, note));
    }

    fn got(&self, actor: &'static str, grant: &Grant, how: &str) {
        self.event(actor, "got", format!("{}  token {}  ({how})", grant.items, grant.token));
        self.note(actor, format!("got {} (token {})", grant.items, grant.token));
        lock(&self.tokens).push(grant.token);
    }

    fn released(&self, actor: &'static str, path: &LockPath, done: &str) {
        self.event(actor, "released", format!("{path}  ({done})"));
    }

    /// A lock whose ttl ran out while someone waited for it (reported
    /// once, by the first waiter to get past it).
    fn expired(&self, blocker: &HeldLock) {
        let Some(actor) = ACTORS.iter().map(|(actor, _)| *actor).find(|actor| *actor == blocker.owner.as_str()) else {
            return;
        };
        {
            let mut reported = lock(&self.expired);
            if reported.contains(&blocker.token) {
                return;
            }
            reported.push(blocker.token);
        }
        self.event(actor, "expired", format!("{}  (its ttl ran out; it was never released)", blocker.path));
        self.note(actor, format!("its lock on {} expired at its ttl, unreleased", blocker.path));
    }

    fn refused(&self, actor: &'static str, path: &LockPath, refused: &Error) {
        self.event_why(actor, "refused", format!("{path}  (non-blocking try_acquire)"), refused);
        if let Some(blocker) = refused.blocker() {
            self.note(actor, format!("refused {path}: {}", in_the_way(path, blocker)));
        }
    }

    /// What each actor got, waited for or was refused, and the tokens.
    fn summary(&self) {
        let notes = lock(&self.notes);
        println!("\nWhat each actor got, waited for or was refused:");
        for (actor, _) in ACTORS {
            let mine = notes.iter().filter(|(who, _)| *who == actor);
            for (index, (_, note)) in mine.enumerate() {
                println!("  {:<16} {note}", if index == 0 { actor } else { "" });
            }
        }

        let mut tokens = lock(&self.tokens).clone();
        tokens.sort_unstable();
        let tokens: Vec<String> = tokens.iter().map(u64::to_string).collect();
        println!("\nFencing tokens, one per grant: {}.", tokens.join(" < "));
        println!("Each is higher than every token granted before it, so a host that remembers");
        println!("the highest token it has seen can turn away a late write from a holder whose");
        println!("lock expired (flaky-agent, had it only been frozen and woken up again).");
    }
}

/// Locks one of the timeline's lists; a panic elsewhere cannot leave them
/// half-written, so a poisoned one is fine to use.
fn lock<T>(list: &Mutex<T>) -> MutexGuard<'_, T> {
    list.lock().unwrap_or_else(PoisonError::into_inner)
}
