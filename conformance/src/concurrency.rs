//! Many clients at once, judged by the [oracle](crate::oracle).
//!
//! Every task has its own client (its own connection on a network store)
//! and reports what it holds to the oracle, which fails the case if two
//! overlapping paths are ever held at once or a token does not rise. Each
//! case also checks that every task made progress.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use mutextree_core::{Error, Grant, LockPath, TreeLock, Wait};

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
