//! The memory store under the workspace's load generator
//! (`mutextree_load`): acquire+release pairs per second and their
//! latency, for depth 1, 3 and 8, one client on one core and 16 clients on
//! two worker threads, siblings and contended, with 0, 10k and 100k other
//! locks held.
//!
//! `cargo bench -p mutextree-memory --bench load` prints the machine and a
//! Markdown table. The `MUTEXTREE_BENCH_*` variables of
//! [`BenchSettings`](mutextree_load::BenchSettings) set the seconds per
//! row, the runs per row and which rows run; a row's label is
//! `c{clients}/d{depth}/{scenario}/b{background}`. Then 16 waiting clients
//! under contention, fair against barging (rows `.../fair-wait` and
//! `.../barging-wait`).

use std::sync::Arc;

use mutextree_core::LockBackend;
use mutextree_load::{self as load, BenchSettings, LoadReport, LoadSpec, Scenario};
use mutextree_memory::MemoryBackend;

fn main() {
    let settings = BenchSettings::from_env();
    let mut rows: Vec<(LoadSpec, LoadReport)> = Vec::new();
    for clients in [1, 16] {
        for depth in [1, 3, 8] {
            for scenario in [Scenario::Siblings, Scenario::Contended] {
                for background in [0, 10_000, 100_000] {
                    let duration = settings.duration;
                    let spec = LoadSpec { clients, depth, scenario, background, duration, ..LoadSpec::default() };
                    if !settings.includes(&format!("c{clients}/d{depth}/{scenario}/b{background}")) {
                        continue;
                    }
                    let (report, spread) = settings.median(|| run_row(&spec));
                    eprintln!(
                        "clients {clients:>2} depth {depth} {scenario:<9} background {background:>6}: {:>10.0} pairs/s (runs: {spread})",
                        report.pairs_per_sec
                    );
                    rows.push((spec, report));
                }
            }
        }
    }

    println!("## mutextree-memory: load\n");
    println!("* command: `cargo bench -p mutextree-memory --bench load`");
    println!("* machine: {}", load::machine());
    println!("* date: {}", load::date());
    println!(
        "* {} s per row, median of {} run(s); 1 client on a current-thread runtime (one core), 16 clients on a \
         multi-thread runtime with 2 workers; one fresh store per row, shared by all clients\n",
        settings.duration.as_secs_f64(),
        settings.repeats
    );
    print!("{}", load::markdown_table(&rows));
    print!("\n{}", load::fair_against_barging(&settings, run_row));
}

/// One row on a fresh store and a fresh runtime: one core for one client,
/// two worker threads for more.
fn run_row(spec: &LoadSpec) -> LoadReport {
    let runtime = load::runtime_for(spec.clients);
    let backend: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    runtime.block_on(load::run(&[backend], spec)).unwrap_or_else(|error| panic!("load run {spec:?} failed: {error}"))
}
