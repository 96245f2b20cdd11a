//! The PostgreSQL store under the workspace's load generator
//! (`mutextree_load`), next to `pgbench` on the same server in the same
//! run.
//!
//! `cargo bench -p mutextree-postgres --bench load` starts a server the way
//! the tests do (initdb + postgres on a free port, `fsync` off unless asked), or uses
//! `MUTEXTREE_POSTGRES_URL`, and prints a Markdown report:
//!
//! 1. **round trips**: 1000 acquire+release pairs, counted on the server
//!    (`pg_stat_user_functions` calls and committed transactions);
//! 2. **one client against `pgbench -c 1`**: pgbench runs a script of one
//!    `INSERT ... ON CONFLICT DO NOTHING` and one `DELETE` of the same row
//!    (two statements, each its own transaction, like a grant and a
//!    release), prepared; its transactions/s count scripts, so one of them
//!    compares with one of our pairs. Runs alternate, and each row is the
//!    median of `MUTEXTREE_BENCH_RUNS` (default 3);
//! 3. **scaling** with clients (1, 2, 4, 8 on one backend whose pool has a
//!    connection per client), with pgbench at the same client counts;
//! 4. **locks held**: 0, 10k and 100k unrelated locks held during the run
//!    (one run per row: setting up 100k locks takes a while).
//!
//! 5. 16 waiting clients under contention, fair against barging,
//!    alternating.
//!
//! `MUTEXTREE_BENCH_ONLY=scaling` runs part 3 only, `MUTEXTREE_BENCH_ONLY=held`
//! part 4 (and 5) only, `MUTEXTREE_BENCH_ONLY=queue` part 5 only. `MUTEXTREE_BENCH_SECS` sets the seconds per row (default 3). The server
//! runs with `fsync` off unless `MUTEXTREE_BENCH_FSYNC=on`: with it on, this
//! machine's disk (a few ms per flush) is all that is measured.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use conformance::servers::postgres;
use mutextree_core::backend::LockRequest;
use mutextree_core::{LockBackend, LockPath, Owner, Ttl};
use mutextree_load::{self as load, BenchSettings, LoadReport, LoadSpec, Scenario};
use mutextree_postgres::PostgresConfig;

fn main() {
    let secs: f64 = env_number("MUTEXTREE_BENCH_SECS", 3.0);
    let runs = env_number("MUTEXTREE_BENCH_RUNS", 3.0) as usize;
    let duration = Duration::from_secs_f64(secs);
    let fsync = std::env::var("MUTEXTREE_BENCH_FSYNC").is_ok_and(|value| value == "on");
    let settings = postgres::Settings { fsync, extra: vec!["track_functions=all".to_owned()], ..Default::default() };
    let server = match SPEC_URL.as_deref() {
        Some(_) => None,
        None => Some(postgres::Postgres::create(&settings).unwrap_or_else(|message| panic!("{message}"))),
    };
    let url = SPEC_URL.clone().unwrap_or_else(|| server.as_ref().expect("started").url());

    println!("## PostgreSQL store: load\n");
    println!("* command: `cargo bench -p mutextree-postgres --bench load`");
    println!("* machine: {}", machine());
    println!("* server: {}", block_on(server_version(&url)));
    println!("* date: {}", date());
    println!("* fsync {}", if fsync { "on" } else { "off (`MUTEXTREE_BENCH_FSYNC=on` turns it on)" });
    println!(
        "* {secs} s per row, median of {runs} run(s) (one run for the rows with locks held), runs of ours and of \
         pgbench alternating\n"
    );

    // `MUTEXTREE_BENCH_ONLY=held` runs the last part only,
    // `MUTEXTREE_BENCH_ONLY=scaling` the third only.
    let only = std::env::var("MUTEXTREE_BENCH_ONLY").unwrap_or_default();
    if only == "queue" {
        print!("{}", fair_against_barging(&url, duration, runs));
        drop(server);
        return;
    }
    if only == "scaling" {
        scaling(&url, &Pgbench::new(&url, duration), duration, runs);
        drop(server);
        return;
    }
    if only != "held" {
        compare_with_pgbench(&url, duration, runs);
    }

    println!("\n### Unrelated locks held\n");
    let mut rows = Vec::new();
    for (clients, scenario) in [(1, Scenario::Siblings), (4, Scenario::Contended)] {
        for background in [0, 10_000, 100_000] {
            let spec = spec(clients, 3, scenario, background, duration);
            let report = run_row(&url, &spec);
            rows.push((spec, report));
        }
    }
    print!("{}", load::markdown_table(&rows));
    print!("\n{}", fair_against_barging(&url, duration, runs));
    drop(server);
}

/// 16 waiting clients under contention, fair against barging, alternating.
fn fair_against_barging(url: &str, duration: Duration, runs: usize) -> String {
    let settings = BenchSettings::from_env().with_duration(duration).with_repeats(runs);
    load::fair_against_barging(&settings, |spec| run_row(url, spec))
}

/// Parts 1 to 3: round trips, one client against pgbench, scaling.
fn compare_with_pgbench(url: &str, duration: Duration, runs: usize) {
    let pgbench = Pgbench::new(url, duration);
    println!("### Round trips\n");
    println!("{}\n", block_on(count_round_trips(url)));

    println!("### One client, against pgbench -c 1\n");
    println!("| what | per second | runs |\n| --- | ---: | --- |");
    let mut pgbench_runs = Vec::new();
    let mut ours_d1 = Vec::new();
    let mut ours_d3 = Vec::new();
    for _ in 0..runs {
        pgbench_runs.push(pgbench.run(1));
        ours_d1.push(run_row(url, &spec(1, 1, Scenario::Siblings, 0, duration)).pairs_per_sec);
        ours_d3.push(run_row(url, &spec(1, 3, Scenario::Siblings, 0, duration)).pairs_per_sec);
    }
    let base = median(&pgbench_runs);
    println!(
        "| pgbench -c 1: INSERT ON CONFLICT DO NOTHING + DELETE, transactions (scripts) | {base:.0} | {} |",
        list(&pgbench_runs)
    );
    for (label, values) in [("mutextree depth 1: pairs", &ours_d1), ("mutextree depth 3: pairs", &ours_d3)] {
        let ours = median(values);
        println!("| {label} ({:.0} % of pgbench) | {ours:.0} | {} |", ours * 100.0 / base, list(values));
    }
    scaling(url, &pgbench, duration, runs);
}

/// Part 3: scaling with clients, against pgbench at the same counts.
fn scaling(url: &str, pgbench: &Pgbench, duration: Duration, runs: usize) {
    println!("\n### Scaling with clients (siblings, depth 3)\n");
    println!("| clients | mutextree pairs/s | pgbench scripts/s | ratio |\n| ---: | ---: | ---: | ---: |");
    for clients in [1, 2, 4, 8] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..runs {
            theirs.push(pgbench.run(clients));
            ours.push(run_row(url, &spec(clients, 3, Scenario::Siblings, 0, duration)).pairs_per_sec);
        }
        let (ours, theirs) = (median(&ours), median(&theirs));
        println!("| {clients} | {ours:.0} | {theirs:.0} | {:.0} % |", ours * 100.0 / theirs);
    }
}

static SPEC_URL: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| postgres::SPEC.url_from_env());

fn spec(clients: usize, depth: usize, scenario: Scenario, background: usize, duration: Duration) -> LoadSpec {
    LoadSpec { clients, depth, scenario, background, duration, ..LoadSpec::default() }
}

/// One row on a fresh namespace and a fresh backend whose pool has a
/// connection per client (at least 8, for the background setup): one core
/// for one client, two worker threads for more.
fn run_row(url: &str, spec: &LoadSpec) -> LoadReport {
    let runtime = runtime(spec.clients);
    runtime.block_on(async {
        let namespace = format!("bench-{:016x}", fastrand::u64(..));
        let config = PostgresConfig::from_url(url).expect("url").pool_size(spec.clients.max(8));
        let backend: Arc<dyn LockBackend> =
            Arc::new(config.connect().await.expect("connect").backend(&namespace).expect("namespace"));
        load::run(&[backend], spec).await.unwrap_or_else(|error| panic!("load run {spec:?} failed: {error}"))
    })
}

fn runtime(clients: usize) -> tokio::runtime::Runtime {
    if clients == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .expect("a tokio runtime")
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime(1).block_on(future)
}

async fn inspector(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn server_version(url: &str) -> String {
    let client = inspector(url).await;
    client.query_one("SHOW server_version", &[]).await.map(|row| row.get::<_, String>(0)).unwrap_or_default()
}

/// 1000 pairs on one backend, counted by the server: calls of each
/// function and transactions committed in the database. The backend is
/// dropped before reading, so that its sessions end and report their
/// statistics.
async fn count_round_trips(url: &str) -> String {
    const PAIRS: i64 = 1000;
    let config = PostgresConfig::from_url(url).expect("url").pool_size(1);
    // Connected (and migrated) before counting.
    let backend = config.connect().await.expect("connect").backend("round-trips").expect("namespace");
    let request = LockRequest::new(
        LockPath::parse("bench/r1/c0").expect("path"),
        Owner::new("counter").expect("owner"),
        Ttl::new(Duration::from_secs(30)).expect("ttl"),
    );
    // The first pair prepares the statements on the connection.
    let warm = backend.try_grant(&request).await.expect("grant").granted().expect("free");
    backend.release(&warm).await.expect("release");
    let read = || async {
        // A session of its own, ended before the next reading, so that its
        // own transactions are counted once, between the readings.
        let client = inspector(url).await;
        let row = client
            .query_one(
                "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), \
                        coalesce((SELECT sum(calls) FROM pg_stat_user_functions WHERE funcname = 'try_grant_items'), 0)::bigint, \
                        coalesce((SELECT sum(calls) FROM pg_stat_user_functions WHERE funcname = 'release_items'), 0)::bigint",
                &[],
            )
            .await
            .expect("statistics");
        (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2))
    };
    settle().await;
    let before = read().await;
    for _ in 0..PAIRS {
        let grant = backend.try_grant(&request).await.expect("grant").granted().expect("free");
        backend.release(&grant).await.expect("release");
    }
    drop(backend);
    settle().await;
    let after = read().await;
    // The first reading's own transaction is counted too.
    let commits = after.0 - before.0 - 1;
    format!(
        "{PAIRS} pairs: {} calls of the grant function and {} of the release function; {} transactions committed \
         in the database meanwhile, autovacuum's included ({:.2} per pair). Each call is one statement, sent and \
         answered in one round trip, in a transaction of its own.",
        after.1 - before.1,
        after.2 - before.2,
        commits,
        commits as f64 / PAIRS as f64
    )
}

/// Lets ended sessions' statistics reach the shared counters.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// `pgbench` on the same server: the same two-statement shape as a pair.
struct Pgbench {
    program: std::path::PathBuf,
    url: String,
    script: std::path::PathBuf,
    duration: Duration,
}

impl Pgbench {
    fn new(url: &str, duration: Duration) -> Self {
        let script = std::env::temp_dir().join(format!("mutextree-pgbench-{}.sql", std::process::id()));
        std::fs::write(
            &script,
            "INSERT INTO mutextree_pgbench (k) VALUES (:client_id) ON CONFLICT DO NOTHING;\n\
             DELETE FROM mutextree_pgbench WHERE k = :client_id;\n",
        )
        .expect("write the pgbench script");
        block_on(async {
            inspector(url)
                .await
                .batch_execute("CREATE TABLE IF NOT EXISTS mutextree_pgbench (k bigint PRIMARY KEY)")
                .await
                .expect("pgbench table")
        });
        let program = postgres::bin_dir().map(|dir| dir.join("pgbench")).unwrap_or_else(|_| "pgbench".into());
        Pgbench { program, url: url.to_owned(), script, duration }
    }

    /// Scripts per second with `clients` connections.
    fn run(&self, clients: usize) -> f64 {
        let output = Command::new(&self.program)
            .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", &clients.min(2).to_string()])
            .args(["-T", &self.duration.as_secs().max(1).to_string(), "-f"])
            .arg(&self.script)
            .arg(&self.url)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program.display()));
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .find_map(|line| line.strip_prefix("tps = ").and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
            .unwrap_or_else(|| {
                panic!("no tps in pgbench's output:\n{text}\n{}", String::from_utf8_lossy(&output.stderr))
            })
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn list(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
}

fn env_number(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(text) => {
            let value: f64 = text.trim().parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a number"));
            assert!(value > 0.0 && value.is_finite(), "{name} must be positive");
            value
        }
        Err(_) => default,
    }
}

/// The cores and how busy they were: on a shared machine the load
/// average says more about the figures than the CPU model.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_owned();
    format!("{cores} cores (nproc); load average {load} at the start")
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}
