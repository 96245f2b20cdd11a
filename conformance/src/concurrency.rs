//! Many clients at once, judged by the [oracle](crate::oracle).
//!
//! Every task has its own client (its own connection on a network store)
//! and reports what it holds to the oracle, which fails the case if two
//! conflicting items are ever held at once or a token does not rise. Each
//! case also checks that every task made progress.
//!
//! The cases with modes (readers and writers, mode changes, multi-path
//! grants) need a store's atomic grant: under the stepwise algorithm they
//! only check that such a request is refused as unsupported.
//!
//! In a mixed run a downgrade can be refused: a stepwise grant takes its
//! token when it locks its node's key and only then checks the subtree,
//! and a downgrade below in between must not take a newer token (see
//! [`mutextree_core::LockBackend::change_mode`]).
//! The oracle would see the tokens fall across the two grants if a store
//! let it through.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use mutextree_core::{Error, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, TreeLock, TreeLockBuilder, Wait};

pub use crate::fair::{
    an_ancestor_waiter_is_not_starved_by_churn_below_it, crossing_waiters_never_deadlock,
    waiters_are_granted_in_ticket_order,
};
use crate::modes::unsupported_here;
use crate::oracle::Oracle;
use crate::Ctx;

const TASKS: usize = 16;
const ROUNDS: usize = 200;

/// Every node of a tree of the given depth and fan-out 2 (`a`, `b`).
fn small_deep_tree(depth: usize) -> Vec<LockPath> {
    let mut level = vec![Vec::<String>::new()];
    let mut all = Vec::new();
    for _ in 0..depth {
        level = level
            .into_iter()
            .flat_map(|parent| {
                ["a", "b"].map(|name| {
                    let mut child = parent.clone();
                    child.push(name.to_owned());
                    child
                })
            })
            .collect();
        all.extend(level.iter().map(|segments| LockPath::new(segments.clone()).expect("path")));
    }
    all
}

/// Tells the oracle, holds the lock for a few scheduler turns (so that
/// holders overlap in time), tells the oracle again and releases.
async fn hold_briefly(oracle: &Oracle, lock: &TreeLock, grant: &Grant) {
    oracle.enter(grant);
    for _ in 0..fastrand::usize(1..4) {
        tokio::task::yield_now().await;
    }
    oracle.exit(grant);
    lock.release().await.expect("release of a held lock");
}

/// Tasks lock random nodes of a small deep tree: never two overlapping
/// holders, tokens always rising, every task granted something.
pub async fn concurrent_overlapping_paths_never_overlap(ctx: Ctx) {
    let tree = Arc::new(small_deep_tree(4));
    let oracle = Arc::new(Oracle::new());
    let refused = Arc::new(AtomicU64::new(0));
    let ttl = ctx.timing().unit * 30;
    let tasks = (0..TASKS).map(|_| {
        let (ctx, tree, oracle, refused) = (ctx.clone(), tree.clone(), oracle.clone(), refused.clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            let mut granted = 0;
            for _ in 0..ROUNDS {
                let path = &tree[fastrand::usize(..tree.len())];
                let lock = TreeLock::builder(client.clone(), path).ttl(ttl).build().expect("lock");
                match lock.try_acquire().await {
                    Ok(grant) => {
                        hold_briefly(&oracle, &lock, &grant).await;
                        granted += 1;
                    }
                    Err(Error::Refused { .. }) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        // An in-process store answers without ever yielding:
                        // let the holders run before trying again.
                        tokio::task::yield_now().await;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            granted
        })
    });
    let granted: Vec<usize> = join_all(tasks).await.into_iter().map(|r| r.expect("task")).collect();
    oracle.assert_clean();
    assert!(granted.iter().all(|&n| n > 0), "a task was never granted anything: {granted:?}");
    assert!(refused.load(Ordering::Relaxed) > 0, "the tree is small enough that some requests must conflict");
}

/// Tasks lock sibling leaves under shared parents: no request is ever
/// refused (the seed refused siblings 95% of the time).
pub async fn concurrent_siblings_are_never_refused(ctx: Ctx) {
    let oracle = Arc::new(Oracle::new());
    let ttl = ctx.timing().unit * 30;
    let tasks = (0..TASKS).map(|task| {
        let (ctx, oracle) = (ctx.clone(), oracle.clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            let path = LockPath::new(["dc", "rack", &format!("host-{task}")]).expect("path");
            let lock = TreeLock::builder(client, path).ttl(ttl).build().expect("lock");
            let mut refusals = Vec::new();
            for _ in 0..ROUNDS / 2 {
                match lock.try_acquire().await {
                    Ok(grant) => hold_briefly(&oracle, &lock, &grant).await,
                    Err(error) => refusals.push(error.to_string()),
                }
            }
            refusals
        })
    });
    let refusals: Vec<String> = join_all(tasks).await.into_iter().flat_map(|r| r.expect("task")).collect();
    oracle.assert_clean();
    assert!(refusals.is_empty(), "{} sibling requests refused, e.g. {}", refusals.len(), refusals[0]);
}

/// Blocking waiters on overlapping paths all get their turn, none times out.
pub async fn concurrent_waiters_all_get_their_turn(ctx: Ctx) {
    let paths = ["A", "A/B", "A/B/C", "A/C", "A/B/D"].map(|p| LockPath::parse(p).expect("path"));
    let oracle = Arc::new(Oracle::new());
    let ttl = ctx.timing().unit * 30;
    let turns = 10;
    let tasks = (0..8).map(|task| {
        let (ctx, oracle, path) = (ctx.clone(), oracle.clone(), paths[task % paths.len()].clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            let lock = TreeLock::builder(client, path)
                .ttl(ttl)
                .wait(Wait::For(Duration::from_secs(60)))
                .build()
                .expect("lock");
            for _ in 0..turns {
                let grant = lock.acquire().await.unwrap_or_else(|e| panic!("waiter gave up: {e}"));
                hold_briefly(&oracle, &lock, &grant).await;
            }
        })
    });
    for task in join_all(tasks).await {
        task.expect("task");
    }
    oracle.assert_clean();
    assert_eq!(oracle.grants(), 8 * turns as u64);
}

/// Tasks on a root and tasks on paths 31 levels below it: the longest
/// grants against the shortest, never overlapping.
pub async fn concurrent_deep_and_shallow_never_overlap(ctx: Ctx) {
    let oracle = Arc::new(Oracle::new());
    let ttl = ctx.timing().unit * 30;
    let tasks = (0..8).map(|task| {
        let (ctx, oracle) = (ctx.clone(), oracle.clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            let path = if task % 2 == 0 {
                LockPath::new(["A"]).expect("path")
            } else {
                let mut segments: Vec<String> = std::iter::once("A".to_owned())
                    .chain((1..mutextree_core::MAX_DEPTH - 1).map(|level| format!("d{level}")))
                    .collect();
                segments.push(format!("t{task}"));
                LockPath::new(segments).expect("path")
            };
            let lock = TreeLock::builder(client, path).ttl(ttl).build().expect("lock");
            for _ in 0..ROUNDS {
                match lock.try_acquire().await {
                    Ok(grant) => hold_briefly(&oracle, &lock, &grant).await,
                    Err(Error::Refused { .. }) => tokio::task::yield_now().await,
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
        })
    });
    for task in join_all(tasks).await {
        task.expect("task");
    }
    oracle.assert_clean();
    assert!(oracle.grants() > 0);
}

/// One to `most` random nodes of `tree`, each Shared more often than not
/// (so that readers meet); `None` when two are on one branch in different
/// modes (invalid input, refused before anything is sent).
fn random_items(tree: &[LockPath], most: usize) -> Option<LockItems> {
    let items = (0..fastrand::usize(1..=most)).map(|_| {
        let mode = if fastrand::u8(..10) < 6 { Mode::Shared } else { Mode::Exclusive };
        (tree[fastrand::usize(..tree.len())].clone(), mode)
    });
    LockItems::new(items).ok()
}

/// A handle on `items` for `owner`.
fn lock_on(client: &Arc<dyn LockBackend>, items: &LockItems, ttl: Duration, owner: &str) -> TreeLock {
    TreeLockBuilder::<TreeLock>::many(client.clone(), items.iter().map(|item| (item.path.clone(), item.mode)))
        .ttl(ttl)
        .owner(owner)
        .build()
        .expect("valid lock")
}

/// What a holder did to its grant's mode while holding it.
#[derive(Debug, Default)]
struct Changes {
    upgrades: AtomicU64,
    upgrades_refused: AtomicU64,
    downgrades: AtomicU64,
    downgrades_refused: AtomicU64,
}

/// Holds `grant` for a few scheduler turns, sometimes upgrading or
/// downgrading it meanwhile, telling the oracle (a downgrade is reported as
/// a release before it is sent, so that a reader it lets in never meets
/// the old Exclusive item in the oracle); then releases.
async fn hold_and_change(oracle: &Oracle, lock: &TreeLock, grant: Grant, changes: &Changes) {
    oracle.enter(&grant);
    let mut grant = grant;
    for _ in 0..fastrand::usize(1..4) {
        tokio::task::yield_now().await;
    }
    let has = |grant: &Grant, mode: Mode| grant.items.iter().any(|item| item.mode == mode);
    match fastrand::u8(..4) {
        0 if has(&grant, Mode::Shared) => match lock.upgrade().await {
            Ok(upgraded) => {
                oracle.exit(&grant);
                oracle.enter(&upgraded);
                grant = upgraded;
                changes.upgrades.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::Refused { .. }) => {
                changes.upgrades_refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(other) => panic!("unexpected error from an upgrade: {other}"),
        },
        1 if has(&grant, Mode::Exclusive) => {
            oracle.exit(&grant);
            match lock.downgrade().await {
                Ok(downgraded) => {
                    grant = downgraded;
                    oracle.enter(&grant);
                    changes.downgrades.fetch_add(1, Ordering::Relaxed);
                }
                // A stepwise client's lock in progress (mixed runs): the
                // grant stays as it was, already reported as left.
                Err(Error::Refused { .. }) => {
                    changes.downgrades_refused.fetch_add(1, Ordering::Relaxed);
                    lock.release().await.expect("release of a held lock");
                    return;
                }
                Err(other) => panic!("unexpected error from a downgrade: {other}"),
            }
        }
        _ => {}
    }
    for _ in 0..fastrand::usize(0..3) {
        tokio::task::yield_now().await;
    }
    oracle.exit(&grant);
    lock.release().await.expect("release of a held lock");
}

/// Readers and writers of one or two random nodes of a small deep tree,
/// upgrading and downgrading while they hold: never two conflicting items
/// at once, tokens rising across conflicting grants, readers sharing.
pub async fn concurrent_readers_and_writers_never_conflict(ctx: Ctx) {
    if unsupported_here(&ctx, &[("a", Mode::Shared)]).await {
        return;
    }
    let tree = Arc::new(small_deep_tree(3));
    let oracle = Arc::new(Oracle::new());
    let changes = Arc::new(Changes::default());
    let ttl = ctx.timing().unit * 30;
    let tasks = (0..TASKS).map(|task| {
        let (ctx, tree, oracle, changes) = (ctx.clone(), tree.clone(), oracle.clone(), changes.clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            let mut granted = 0;
            for _ in 0..ROUNDS {
                let Some(items) = random_items(&tree, 2) else { continue };
                let lock = lock_on(&client, &items, ttl, &format!("task-{task}"));
                match lock.try_acquire().await {
                    Ok(grant) => {
                        hold_and_change(&oracle, &lock, grant, &changes).await;
                        granted += 1;
                    }
                    Err(Error::Refused { .. }) => tokio::task::yield_now().await,
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            granted
        })
    });
    let granted: Vec<usize> = join_all(tasks).await.into_iter().map(|r| r.expect("task")).collect();
    oracle.assert_clean();
    assert!(granted.iter().all(|&n| n > 0), "a task was never granted anything: {granted:?}");
    assert!(oracle.shared_overlaps() > 0, "readers never shared a branch in {} grants", oracle.grants());
    let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    assert!(count(&changes.upgrades) > 0 && count(&changes.downgrades) > 0, "{changes:?}");
}

/// Multi-path grants, mode changes and releases under contention, while a
/// lister lists the namespace again and again: it never sees some items
/// of a grant without the others (each holder's owner id says how many
/// items its grant has).
pub async fn concurrent_multi_path_grants_are_never_seen_half_granted(ctx: Ctx) {
    if unsupported_here(&ctx, &[("a", Mode::Exclusive), ("b", Mode::Exclusive)]).await {
        return;
    }
    let tree = Arc::new(small_deep_tree(3));
    let ttl = ctx.timing().unit * 30;
    let done = Arc::new(AtomicBool::new(false));
    let oracle = Arc::new(Oracle::new());
    let changes = Arc::new(Changes::default());
    let lister = {
        let (ctx, done) = (ctx.clone(), done.clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            let (mut listings, mut whole_multi) = (0u64, 0u64);
            while !done.load(Ordering::Relaxed) {
                let held = client.list(None).await.expect("list");
                listings += 1;
                let mut by_token: HashMap<u64, Vec<&HeldLock>> = HashMap::new();
                for item in &held {
                    by_token.entry(item.token).or_default().push(item);
                }
                for (token, items) in by_token {
                    let owner = items[0].owner.as_str();
                    let expected: usize = owner.split('-').nth(1).and_then(|n| n.parse().ok()).expect("owner id");
                    assert!(
                        items.len() == expected && items.iter().all(|item| item.owner.as_str() == owner),
                        "token {token}: listed {} of the {expected} items of {owner}: {items:?}",
                        items.len()
                    );
                    whole_multi += u64::from(expected > 1);
                }
                tokio::task::yield_now().await;
            }
            (listings, whole_multi)
        })
    };
    let tasks = (0..TASKS / 2).map(|task| {
        let (ctx, tree, oracle, changes) = (ctx.clone(), tree.clone(), oracle.clone(), changes.clone());
        tokio::spawn(async move {
            let client = ctx.client().await;
            for _ in 0..ROUNDS {
                let Some(items) = random_items(&tree, 3) else { continue };
                let lock = lock_on(&client, &items, ttl, &format!("items-{}-task-{task}", items.len()));
                match lock.try_acquire().await {
                    Ok(grant) => hold_and_change(&oracle, &lock, grant, &changes).await,
                    Err(Error::Refused { .. }) => tokio::task::yield_now().await,
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
        })
    });
    let outcomes = join_all(tasks).await;
    done.store(true, Ordering::Relaxed);
    let (listings, whole_multi) = lister.await.expect("the lister saw a grant half granted");
    for outcome in outcomes {
        outcome.expect("task");
    }
    oracle.assert_clean();
    assert!(listings > 10 && whole_multi > 0, "{listings} listings, {whole_multi} multi-path grants seen");
}
