//! The memory store under the workspace's load generator
//! (`conformance::load`): acquire+release pairs per second and their
//! latency, for depth 1, 3 and 8, one client on one core and 16 clients on
//! two worker threads, siblings and contended, with 0, 10k and 100k other
//! locks held.
//!
//! `cargo bench -p mutextree-memory --bench load` prints the machine and a
//! Markdown table. `MUTEXTREE_BENCH_SECS` sets the seconds per row (default
//! 1, fractions allowed). `MUTEXTREE_BENCH_ROWS` runs only the rows whose
//! label `c{clients}/d{depth}/{scenario}/b{background}` contains one of its
//! comma-separated parts (`c1/d3/siblings/b0,c16/`), for profiling.
//! `MUTEXTREE_BENCH_RUNS=N` runs each row N times (each on a fresh store)
//! and reports the run with the median pairs/s, for noisy machines.

use std::sync::Arc;
use std::time::Duration;

use conformance::load::{self, LoadReport, LoadSpec, Scenario};
use mutextree_core::LockBackend;
use mutextree_memory::MemoryBackend;

fn main() {
    let duration = row_duration();
    let repeats: usize = std::env::var("MUTEXTREE_BENCH_RUNS").map_or(1, |text| {
        text.trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("MUTEXTREE_BENCH_RUNS={text:?} is not a positive integer"))
    });
    let only: Option<Vec<String>> =
        std::env::var("MUTEXTREE_BENCH_ROWS").ok().map(|rows| rows.split(',').map(str::to_owned).collect());
    let mut rows: Vec<(LoadSpec, LoadReport)> = Vec::new();
    for clients in [1, 16] {
        for depth in [1, 3, 8] {
            for scenario in [Scenario::Siblings, Scenario::Contended] {
                for background in [0, 10_000, 100_000] {
                    let spec = LoadSpec { clients, depth, scenario, background, duration, ..LoadSpec::default() };
                    let label = format!("c{clients}/d{depth}/{scenario}/b{background}");
                    if only.as_ref().is_some_and(|only| !only.iter().any(|part| label.contains(part.as_str()))) {
                        continue;
                    }
                    let mut runs: Vec<LoadReport> = (0..repeats).map(|_| run_row(&spec)).collect();
                    runs.sort_by(|a, b| a.pairs_per_sec.total_cmp(&b.pairs_per_sec));
                    let spread = format!("{:.0}..{:.0}", runs[0].pairs_per_sec, runs[runs.len() - 1].pairs_per_sec);
                    let report = runs.swap_remove(runs.len() / 2);
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
    println!("* machine: {}", machine());
    println!("* date: {}", date());
    println!(
        "* {} s per row, median of {repeats} run(s); 1 client on a current-thread runtime (one core), 16 clients on a \
         multi-thread runtime with 2 workers; one fresh store per row, shared by all clients\n",
        duration.as_secs_f64()
    );
    print!("{}", load::markdown_table(&rows));
}

/// One row on a fresh store and a fresh runtime: one core for one client,
/// two worker threads for more.
fn run_row(spec: &LoadSpec) -> LoadReport {
    let runtime = if spec.clients == 1 {
        tokio::runtime::Builder::new_current_thread().enable_time().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build()
    }
    .expect("a tokio runtime");
    let backend: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    runtime.block_on(load::run(&[backend], spec)).unwrap_or_else(|error| panic!("load run {spec:?} failed: {error}"))
}

fn row_duration() -> Duration {
    match std::env::var("MUTEXTREE_BENCH_SECS") {
        Ok(text) => {
            let secs: f64 =
                text.trim().parse().unwrap_or_else(|_| panic!("MUTEXTREE_BENCH_SECS={text:?} is not a number"));
            assert!(secs > 0.0 && secs.is_finite(), "MUTEXTREE_BENCH_SECS must be positive");
            Duration::from_secs_f64(secs)
        }
        Err(_) => Duration::from_secs(1),
    }
}

/// `N cores, CPU model`, from the OS.
fn machine() -> String {
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

/// Today in UTC, from `date`, or the Unix time if it is missing.
fn date() -> String {
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
