//! A real 3-member etcd cluster on loopback, its leader killed with
//! SIGKILL while many clients lock and release: no two overlapping live
//! holders ever (judged by the conformance oracle, fencing tokens
//! included), and every client, configured with all three endpoints, fails
//! over and keeps getting locks.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conformance::oracle::Oracle;
use conformance::servers::etcd;
use mutextree_core::backend::{Attempt, LockRequest};
use mutextree_core::{Error, LockBackend, LockPath, Owner, Ttl};
use mutextree_etcd::EtcdConfig;
use tokio::time::{sleep, Instant};

const CLIENTS: usize = 12;
/// Grants every client must make after the kill.
const PROGRESS_AFTER_KILL: u64 = 20;

/// A node, its children and grandchildren, and an unrelated root: clients
/// keep running into each other on nodes, ancestors and descendants.
const PATHS: [&str; 14] =
    ["a", "a/a", "a/b", "a/a/a", "a/a/b", "a/b/a", "a/b/b", "b", "b/a", "b/b", "b/a/a", "b/a/b", "b/b/a", "c"];

#[derive(Default)]
struct Counts {
    grants: AtomicU64,
    errors: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_never_double_grants_and_clients_fail_over() {
    let mut cluster = etcd::Cluster::start(3).unwrap_or_else(|message| panic!("{message}"));
    let urls = cluster.urls();
    let leading = etcd::leader(&urls).await;

    let namespace = conformance::random_namespace();
    let paths: Arc<Vec<LockPath>> = Arc::new(PATHS.iter().map(|p| LockPath::parse(p).expect("path")).collect());
    let oracle = Arc::new(Oracle::new());
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<Counts>> = Arc::new((0..CLIENTS).map(|_| Counts::default()).collect());
    let after_kill: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());

    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let config = EtcdConfig::new(urls.clone())
            .connect_timeout(Duration::from_millis(500))
            .request_timeout(Duration::from_secs(2));
        let backend = config.connect().await.expect("connect").backend(&namespace).expect("namespace");
        let (paths, oracle, killed, stop, counts, after_kill) =
            (paths.clone(), oracle.clone(), killed.clone(), stop.clone(), counts.clone(), after_kill.clone());
        tasks.push(tokio::spawn(async move {
            let owner = Owner::new(format!("client-{client}")).expect("owner");
            let ttl = Ttl::new(Duration::from_secs(5)).expect("ttl");
            while !stop.load(Ordering::Relaxed) {
                let path = &paths[fastrand::usize(..paths.len())];
                let request = LockRequest::new(path.clone(), owner.clone(), ttl);
                match backend.try_grant(&request).await {
                    Ok(Attempt::Granted(grant)) => {
                        oracle.enter(&grant);
                        for _ in 0..fastrand::usize(1..4) {
                            tokio::task::yield_now().await;
                        }
                        oracle.exit(&grant);
                        counts[client].grants.fetch_add(1, Ordering::Relaxed);
                        if killed.load(Ordering::Relaxed) {
                            after_kill[client].fetch_add(1, Ordering::Relaxed);
                        }
                        match backend.release(&grant).await {
                            // A release lost in the failover leaves the lock
                            // to its ttl; the oracle already saw it end.
                            Ok(()) | Err(Error::Store { retryable: true, .. }) => {}
                            Err(Error::NotHeld { .. }) => {} // applied before a lost reply
                            Err(other) => panic!("release: {other}"),
                        }
                    }
                    Ok(Attempt::Blocked(_) | Attempt::Queued { .. }) => tokio::task::yield_now().await,
                    Err(Error::Store { retryable: true, .. }) => {
                        counts[client].errors.fetch_add(1, Ordering::Relaxed);
                        sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("grant: {other}"),
                }
            }
        }));
    }

    // Everyone makes progress on the healthy cluster first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts.iter().any(|c| c.grants.load(Ordering::Relaxed) < 5) {
        assert!(Instant::now() < deadline, "no progress before the kill");
        sleep(Duration::from_millis(50)).await;
    }

    let before: Vec<u64> = counts.iter().map(|c| c.grants.load(Ordering::Relaxed)).collect();
    eprintln!("before the kill: grants {before:?}");
    let killed_at = Instant::now();
    cluster.members[leading].take().expect("the leader runs").stop();
    killed.store(true, Ordering::Relaxed);

    let deadline = killed_at + Duration::from_secs(60);
    let mut report_at = Instant::now();
    while after_kill.iter().any(|n| n.load(Ordering::Relaxed) < PROGRESS_AFTER_KILL) {
        let made: Vec<u64> = after_kill.iter().map(|n| n.load(Ordering::Relaxed)).collect();
        let errors: u64 = counts.iter().map(|c| c.errors.load(Ordering::Relaxed)).sum();
        if Instant::now() >= report_at {
            eprintln!("{:?} after the kill: grants since {made:?}, {errors} retryable errors", killed_at.elapsed());
            report_at += Duration::from_secs(5);
        }
        assert!(
            Instant::now() < deadline,
            "clients did not fail over within 60 s; grants since the kill: {made:?}, {errors} retryable errors"
        );
        sleep(Duration::from_millis(50)).await;
    }
    let recovered_in = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client task");
    }

    oracle.assert_clean();
    let grants: u64 = counts.iter().map(|c| c.grants.load(Ordering::Relaxed)).sum();
    let errors: u64 = counts.iter().map(|c| c.errors.load(Ordering::Relaxed)).sum();
    eprintln!(
        "killed member {leading} (the leader); every client had {PROGRESS_AFTER_KILL} grants since after {recovered_in:?}; \
         {grants} grants, {errors} retryable errors in all; oracle judged {} grants",
        oracle.grants()
    );
    let new_leader = etcd::leader(&[urls[(leading + 1) % 3].clone(), urls[(leading + 2) % 3].clone()]).await;
    assert!(new_leader < 2, "the survivors agree on a leader");
}
