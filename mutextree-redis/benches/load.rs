//! The Redis store under the workspace's load generator, beside Redis's own
//! `redis-benchmark` on the same server in the same run.
//!
//! `cargo bench -p mutextree-redis --bench load` starts a `redis-server` (or
//! uses `MUTEXTREE_REDIS_URL`) and prints, as Markdown:
//!
//! 1. the round trips per acquire+release pair at depth 1, 3 and 8: the
//!    script calls the server executed (`INFO commandstats`, `fcall`, `eval*`), and
//!    the requests the client sent (`LockBackend::round_trips`);
//! 2. `redis-benchmark -c 1` and `-c 16` for `SET k v NX PX 10000`: one
//!    round trip per request, the ceiling (a pair is two round trips, so
//!    half of it is the physical limit);
//! 3. pairs/s and latency of the load generator with 1 client and with 16
//!    clients, with 0, 10k and 100k unrelated locks held, and each row's
//!    share of the ceiling. The 16 clients run twice: each with its own
//!    backend (16 connections, like `redis-benchmark -c 16`), and all on
//!    one backend (its one multiplexed connection, as an application's
//!    tasks share a backend's clones);
//! 4. 16 waiting clients under contention, fair against barging,
//!    alternating (rows `.../fair-wait` and `.../barging-wait`).
//!
//! The `MUTEXTREE_BENCH_*` variables of
//! [`BenchSettings`](mutextree_load::BenchSettings) apply; a row's label
//! is `c{clients}/d{depth}/{scenario}/b{background}`, with `c16-shared`
//! for the 16 clients on one backend.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::url::StoreUrl;
use mutextree_core::backend::LockRequest;
use mutextree_core::{LockBackend, LockPath, Owner, Ttl};
use mutextree_load::{self as load, BenchSettings, LoadReport, LoadSpec, Scenario};
use mutextree_redis::RedisConfig;

/// Pairs run to count commands.
const COUNTED_PAIRS: u64 = 1000;

/// Requests of the `redis-benchmark` runs in the ceiling table.
const CEILING_REQUESTS: u64 = 200_000;

/// Requests of the `redis-benchmark` run before each run of a row: a
/// second or two here.
fn adjacent_ceiling_requests(clients: usize) -> u64 {
    if clients == 1 {
        30_000
    } else {
        120_000
    }
}

fn main() {
    let settings = BenchSettings::from_env();
    let url = conformance::servers::redis::url();
    let address = StoreUrl::parse("redis", &url).expect("a redis:// URL").hosts()[0].clone();
    let host = address.name;
    let port = address.port.unwrap_or(6379);
    let runtime = load::runtime_for(1);
    let connect = |namespace: String| {
        let url = url.clone();
        async move { RedisConfig::from_url(&url)?.connect().await?.backend(&namespace) }
    };

    println!("## mutextree-redis: load\n");
    println!("* command: `cargo bench -p mutextree-redis --bench load`");
    println!("* machine: {}", load::machine());
    println!("* date: {}", load::date());
    println!("* server: {} on {host}:{port}, same machine, loopback", server_version(&runtime, &url));
    println!(
        "* {} s per row, median of {} run(s); 1 client on a current-thread runtime, 16 clients on a multi-thread \
         runtime with 2 workers\n",
        settings.duration.as_secs_f64(),
        settings.repeats
    );

    println!("### Round trips per acquire+release pair\n");
    println!("| depth | scripts run by the server | requests sent by the client |\n| ---: | ---: | ---: |");
    for depth in [1, 3, 8] {
        let (scripts, sent) = runtime.block_on(async {
            let backend = connect(format!("bench-rt-{depth}")).await.expect("connect");
            count_round_trips(&url, &backend, depth).await
        });
        let per_pair = |n: u64| n as f64 / COUNTED_PAIRS as f64;
        println!("| {depth} | {:.2} | {:.2} |", per_pair(scripts), per_pair(sent));
        eprintln!("depth {depth}: {:.2} scripts, {:.2} requests per pair", per_pair(scripts), per_pair(sent));
    }

    let ceiling_1 = redis_benchmark(&host, port, 1, CEILING_REQUESTS);
    let ceiling_16 = redis_benchmark(&host, port, 16, CEILING_REQUESTS);
    println!("\n### Ceiling: `redis-benchmark -q -n 200000 -c N SET k v NX PX 10000`\n");
    println!("| connections | requests/s |\n| ---: | ---: |\n| 1 | {ceiling_1:.0} |\n| 16 | {ceiling_16:.0} |\n");
    let floor = runtime.block_on(client_round_trips(&url));
    println!(
        "The same `SET`, one at a time, through the redis crate's multiplexed connection (the backend's, on \
         the 1-client runtime): {floor:.0} requests/s, {:.0}% of `redis-benchmark -c 1`. A pair of round trips \
         through it can reach at most half of that: {:.0}% of `redis-benchmark -c 1`, before any script runs.\n",
        floor / ceiling_1 * 100.0,
        floor / ceiling_1 * 50.0
    );
    eprintln!("redis crate, 1 connection: {floor:.0} SET/s");

    let mut shares = Vec::new();
    let mut round = 0;
    for (clients, connections) in [(1, 1), (16, 16), (16, 1)] {
        let mut rows: Vec<(LoadSpec, LoadReport)> = Vec::new();
        let shared = if connections < clients { "-shared" } else { "" };
        for (depth, scenario, background) in [
            (3, Scenario::Siblings, 0),
            (3, Scenario::Siblings, 10_000),
            (3, Scenario::Siblings, 100_000),
            (1, Scenario::Siblings, 0),
            (8, Scenario::Siblings, 0),
            (3, Scenario::Contended, 0),
        ] {
            if !settings.includes(&format!("c{clients}{shared}/d{depth}/{scenario}/b{background}")) {
                continue;
            }
            let spec =
                LoadSpec { clients, depth, scenario, background, duration: settings.duration, ..LoadSpec::default() };
            // Each run's share is against a `redis-benchmark` run just before
            // it: this machine's speed drifts between minutes, and a ratio
            // of two runs minutes apart would measure the drift.
            let mut run_shares = Vec::new();
            let (report, spread) = settings.median(|| {
                round += 1;
                let ceiling = redis_benchmark(&host, port, clients, adjacent_ceiling_requests(clients));
                let runtime = load::runtime_for(clients);
                runtime.block_on(async {
                    let namespace = format!("bench-{round}-{:08x}", fastrand::u32(..));
                    let mut backends: Vec<Arc<dyn LockBackend>> = Vec::new();
                    for _ in 0..connections {
                        backends.push(Arc::new(connect(namespace.clone()).await.expect("connect")));
                    }
                    let report =
                        load::run(&backends, &spec).await.unwrap_or_else(|error| panic!("load run {spec:?}: {error}"));
                    run_shares.push(report.pairs_per_sec / ceiling * 100.0);
                    report
                })
            });
            run_shares.sort_by(f64::total_cmp);
            let share = run_shares[run_shares.len() / 2];
            let share_spread = format!("{:.0}..{:.0}%", run_shares[0], run_shares[run_shares.len() - 1]);
            eprintln!(
                "clients {clients:>2} connections {connections:>2} depth {depth} {scenario:<9} background \
                 {background:>6}: {:>8.0} pairs/s (runs: {spread}), {share:.0}% of redis-benchmark (runs: \
                 {share_spread})",
                report.pairs_per_sec
            );
            shares.push(format!(
                "| {clients} | {connections} | {depth} | {scenario} | {background} | {share:.0}% | {share_spread} |"
            ));
            rows.push((spec, report));
        }
        if !rows.is_empty() {
            println!("### Load generator: {clients} client(s), {connections} connection(s)\n");
            println!("{}", load::markdown_table(&rows));
        }
    }
    println!("### Pairs/s as a share of `redis-benchmark -c <clients>`\n");
    println!(
        "Each run of a row against a `redis-benchmark -c <clients>` run ({} requests with 1 client, {} with 16) \
         just before it; the median run's share and the spread of all runs.\n",
        adjacent_ceiling_requests(1),
        adjacent_ceiling_requests(16)
    );
    println!(
        "| clients | connections | depth | scenario | background | share | runs |\n\
         | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
    );
    for share in shares {
        println!("{share}");
    }
    print!(
        "\n{}",
        load::fair_against_barging(&settings, |spec| {
            load::runtime_for(spec.clients).block_on(async {
                let namespace = format!("bench-wait-{:08x}", fastrand::u32(..));
                let mut backends: Vec<Arc<dyn LockBackend>> = Vec::new();
                for _ in 0..spec.clients {
                    backends.push(Arc::new(connect(namespace.clone()).await.expect("connect")));
                }
                load::run(&backends, spec).await.unwrap_or_else(|error| panic!("load run {spec:?}: {error}"))
            })
        })
    );
}

/// Runs [`COUNTED_PAIRS`] pairs at `depth` and returns how many scripts
/// the server ran meanwhile (`fcall*` and `eval*` in `INFO commandstats`; the commands
/// a script runs inside are counted apart, as their own names) and how many
/// requests the client sent.
async fn count_round_trips(url: &str, backend: &mutextree_redis::RedisBackend, depth: usize) -> (u64, u64) {
    let path = LockPath::new((0..depth).map(|level| format!("n{level}"))).expect("path");
    let request = LockRequest::new(path, Owner::random(), Ttl::new(Duration::from_secs(30)).expect("ttl"));
    let pair = || async {
        let grant = backend.try_grant(&request).await.expect("grant").granted().expect("free");
        backend.release(&grant).await.expect("release");
    };
    // Loads the library (or caches the scripts) outside the count.
    pair().await;
    let mut raw = redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("connect");
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut raw).await.expect("resetstat");
    let sent_before = backend.round_trips().expect("the Redis store counts its requests");
    for _ in 0..COUNTED_PAIRS {
        pair().await;
    }
    let sent = backend.round_trips().expect("counted") - sent_before;
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut raw).await.expect("info");
    let scripts = stats
        .lines()
        .filter_map(|line| line.strip_prefix("cmdstat_fcall").or_else(|| line.strip_prefix("cmdstat_eval")))
        .filter_map(|line| line.split_once(':'))
        .map(|(_, fields)| {
            fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|calls| calls.parse::<u64>().ok())
                .expect("calls= in commandstats")
        })
        .sum();
    (scripts, sent)
}

/// Requests/s of `SET k v NX PX 10000`, one at a time, through the redis
/// crate's multiplexed connection: what this client library costs a round
/// trip.
async fn client_round_trips(url: &str) -> f64 {
    const REQUESTS: u32 = 20_000;
    let mut raw = redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("connect");
    let set = redis::cmd("SET").arg("k").arg("v").arg("NX").arg("PX").arg(10_000).clone();
    let started = std::time::Instant::now();
    for _ in 0..REQUESTS {
        let _: redis::Value = set.query_async(&mut raw).await.expect("set");
    }
    f64::from(REQUESTS) / started.elapsed().as_secs_f64()
}

/// `redis-benchmark`'s requests/s for `requests` of `SET k v NX PX 10000`
/// over `connections` connections.
fn redis_benchmark(host: &str, port: u16, connections: usize, requests: u64) -> f64 {
    let output = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string(), "-q", "-n", &requests.to_string()])
        .args(["-c", &connections.to_string()])
        .args(["SET", "k", "v", "NX", "PX", "10000"])
        .output()
        .expect("redis-benchmark (Debian package redis-tools) runs");
    let text = String::from_utf8_lossy(&output.stdout);
    // The last report line: "SET k v NX PX 10000: 45045.05 requests per second, p50=..."
    text.rsplit(['\r', '\n'])
        .find_map(|line| line.split_once(": ").and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok()))
        .unwrap_or_else(|| panic!("no requests/s in redis-benchmark's output:\n{text}"))
}

fn server_version(runtime: &tokio::runtime::Runtime, url: &str) -> String {
    runtime.block_on(async {
        let mut raw = redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("connect");
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut raw).await.expect("info");
        info.lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .map_or_else(|| "redis".to_owned(), |version| format!("Redis {}", version.trim()))
    })
}
