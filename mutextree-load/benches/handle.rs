//! The cost of what the lock handle reports: acquire+release pairs per
//! second through [`TreeLock`] (the acquisition loop, the handle's state,
//! its spans and metrics) on the memory store, one client on one core and
//! 16 clients on two worker threads, each on its own depth-3 path.
//!
//! `cargo bench -p mutextree-load --bench handle` measures with no
//! `tracing` subscriber and without the `metrics` feature; `--features
//! metrics` with `MUTEXTREE_BENCH_RECORDER=prometheus` measures with the
//! metrics on and a Prometheus recorder installed (without its HTTP
//! listener). Rows last `MUTEXTREE_BENCH_SECS` seconds (default 3);
//! `MUTEXTREE_BENCH_CLIENTS` picks them (default `1,16`). BENCHMARKS.md
//! compares the builds, alternating, in one run.
//!
//! It lives in this crate because nothing here turns the `metrics`
//! feature on behind its back: a benchmark of a store's crate is built
//! with that crate's dev-dependencies, and the conformance suite turns it
//! on in the core for its tests of the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mutextree_core::{LockBackend, TreeLock};
use mutextree_memory::MemoryStore;

fn main() {
    let seconds: f64 = std::env::var("MUTEXTREE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let duration = Duration::from_secs_f64(seconds);
    let recorder = install_recorder();
    let rows = std::env::var("MUTEXTREE_BENCH_CLIENTS").unwrap_or_else(|_| "1,16".to_owned());
    for clients in rows.split(',').map(|clients| clients.trim().parse::<usize>().expect("a number of clients")) {
        let pairs = pairs_per_second(clients, duration);
        println!("| {clients} | {recorder} | {pairs:.0} |");
    }
}

/// Installs the recorder `MUTEXTREE_BENCH_RECORDER` names; what it is.
fn install_recorder() -> &'static str {
    #[cfg(feature = "metrics")]
    if std::env::var("MUTEXTREE_BENCH_RECORDER").as_deref() == Ok("prometheus") {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(recorder).expect("the only recorder");
        return "metrics, Prometheus recorder";
    }
    "no subscriber, no recorder"
}

/// Pairs per second of `clients` handles, each on its own path, for
/// `duration`, on one core for one client and two worker threads for more.
fn pairs_per_second(clients: usize, duration: Duration) -> f64 {
    let runtime = if clients == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .expect("runtime");
    runtime.block_on(async move {
        let store: Arc<dyn LockBackend> = Arc::new(MemoryStore::new().backend("bench").expect("namespace"));
        let started = Instant::now();
        let clients: Vec<_> = (0..clients)
            .map(|client| {
                let lock = TreeLock::new(store.clone(), ["dc", "rack", &format!("host-{client}")]).expect("lock");
                tokio::spawn(async move {
                    let mut pairs = 0_u64;
                    while started.elapsed() < duration {
                        lock.acquire().await.expect("granted");
                        lock.release().await.expect("released");
                        pairs += 1;
                    }
                    pairs
                })
            })
            .collect();
        let mut pairs = 0;
        for client in clients {
            pairs += client.await.expect("client");
        }
        pairs as f64 / started.elapsed().as_secs_f64()
    })
}
