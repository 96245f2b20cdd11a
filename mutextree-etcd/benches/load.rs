//! The etcd store under the workspace's load generator
//! (`mutextree_load`), next to etcd's own ceiling measured in the same
//! run with the same client library: a plain `put` loop.
//!
//! `cargo bench -p mutextree-etcd --bench load` starts a single-member etcd
//! on loopback (or uses `MUTEXTREE_ETCD_URL`) and prints:
//!
//! * the requests one acquire (granted and refused), one release and one
//!   refresh send, counted by the server itself: the difference in its
//!   Prometheus counter `grpc_server_handled_total` (per gRPC method) over
//!   many sequential operations, divided by their number. Background lease
//!   revocations are counted too, once they have arrived;
//! * a Markdown table of acquire+release pairs per second for 1 and 16
//!   clients (each with its own connection), depth 1 and 3, siblings and
//!   contended, and the same for the plain put loop.
//!
//! * 16 waiting clients under contention, fair against barging, alternating
//!   (`MUTEXTREE_BENCH_RUNS` runs of each).
//!
//! `MUTEXTREE_BENCH_SECS` sets the seconds per row (default 3).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance::random_namespace;
use conformance::servers::etcd;
use etcd_client::Client;
use mutextree_core::backend::LockRequest;
use mutextree_core::{LockBackend, LockPath, Owner, Ttl};
use mutextree_etcd::EtcdConfig;
use mutextree_load::{self as load, BenchSettings, LoadSpec, Scenario};

/// Sequential operations per round-trip count.
const COUNTED: usize = 200;

fn main() {
    let secs: f64 = std::env::var("MUTEXTREE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let duration = Duration::from_secs_f64(secs);
    let url = etcd::url();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        println!("## mutextree-etcd: load\n");
        println!("* command: `cargo bench -p mutextree-etcd --bench load`");
        println!("* server: {} (single member, loopback, data on tmpfs where the machine has one)", etcd_version());
        println!(
            "* {secs} s per row; one tokio runtime with 2 workers; each simulated client has its own connection\n"
        );
        round_trips(&url).await;
        throughput(&url, duration).await;
    });
    let settings = BenchSettings::from_env().with_duration(duration);
    print!(
        "\n{}",
        load::fair_against_barging(&settings, |spec| {
            runtime.block_on(async {
                let namespace = random_namespace();
                let mut backends = Vec::new();
                for _ in 0..spec.clients {
                    backends.push(backend(&url, &namespace).await);
                }
                load::run(&backends, spec).await.unwrap_or_else(|e| panic!("{spec:?}: {e}"))
            })
        })
    );
}

/// A client of `namespace` on its own connection.
async fn backend(url: &str, namespace: &str) -> Arc<dyn LockBackend> {
    let store = EtcdConfig::new([url.to_owned()]).connect().await.expect("connect");
    Arc::new(store.backend(namespace).expect("a valid namespace"))
}

/// Requests per operation, from the server's own counters.
async fn round_trips(url: &str) {
    let store = backend(url, &random_namespace()).await;
    let owner = Owner::new("bench").expect("owner");
    let ttl = Ttl::new(Duration::from_secs(30)).expect("ttl");
    let requests: Vec<LockRequest> = (0..COUNTED)
        .map(|i| LockRequest::new(LockPath::new(["rt".to_owned(), format!("n{i}")]).expect("path"), owner.clone(), ttl))
        .collect();
    let mut grants = Vec::new();
    let mut rows = Vec::new();

    let before = settled_counts(url).await;
    for request in &requests {
        grants.push(store.try_grant(request).await.expect("grant").granted().expect("free"));
    }
    rows.push(("acquire, granted", per_op(&before, &settled_counts(url).await)));

    let before = settled_counts(url).await;
    for request in &requests {
        assert!(store.try_grant(request).await.expect("attempt").granted().is_none(), "held");
    }
    rows.push(("acquire, refused", per_op(&before, &settled_counts(url).await)));

    let before = settled_counts(url).await;
    for grant in &mut grants {
        *grant = store.refresh(grant, ttl).await.expect("refresh");
    }
    rows.push(("refresh", per_op(&before, &settled_counts(url).await)));

    let before = settled_counts(url).await;
    for grant in &grants {
        store.release(grant).await.expect("release");
    }
    rows.push(("release", per_op(&before, &settled_counts(url).await)));

    println!("### Requests per operation (server-side counts over {COUNTED} sequential operations)\n");
    println!("| operation | awaited | in the background | by gRPC method |\n| --- | ---: | ---: | --- |");
    for (name, counts) in rows {
        let revokes = counts.get("LeaseRevoke").copied().unwrap_or(0.0);
        let total: f64 = counts.values().sum();
        let methods: Vec<String> = counts.iter().map(|(method, n)| format!("{method} {n:.2}")).collect();
        println!("| {name} | {:.2} | {revokes:.2} | {} |", total - revokes, methods.join(", "));
    }
    println!();
}

/// The server's handled-request counters once background requests have
/// arrived (two reads 200 ms apart agree).
async fn settled_counts(url: &str) -> BTreeMap<String, f64> {
    let mut last = handled_requests(url);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = handled_requests(url);
        if now == last {
            return now;
        }
        last = now;
    }
}

fn per_op(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(method, n)| (method.clone(), (n - before.get(method).copied().unwrap_or(0.0)) / COUNTED as f64))
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

/// `grpc_server_handled_total` by method, from etcd's `/metrics`.
fn handled_requests(url: &str) -> BTreeMap<String, f64> {
    let address = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).expect("metrics endpoint");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("metrics");
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|line| line.starts_with("grpc_server_handled_total{")) {
        let method = line.split("grpc_method=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("?");
        let value: f64 = line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
        *counts.entry(method.to_owned()).or_insert(0.0) += value;
    }
    counts
}

async fn throughput(url: &str, duration: Duration) {
    let mut rows = Vec::new();
    let mut puts = Vec::new();
    for clients in [1, 16] {
        for depth in [1, 3] {
            for scenario in [Scenario::Siblings, Scenario::Contended] {
                // One fresh namespace per row, shared by its clients.
                let namespace = random_namespace();
                let mut backends = Vec::new();
                for _ in 0..clients {
                    backends.push(backend(url, &namespace).await);
                }
                let spec = LoadSpec { clients, depth, scenario, duration, ..LoadSpec::default() };
                let report = load::run(&backends, &spec).await.unwrap_or_else(|e| panic!("{spec:?}: {e}"));
                eprintln!("clients {clients:>2} depth {depth} {scenario:<9}: {:>8.0} pairs/s", report.pairs_per_sec);
                rows.push((spec, report));
            }
        }
        puts.push((clients, put_loop(url, clients, duration).await));
    }
    println!("### Acquire+release pairs\n");
    print!("{}", load::markdown_table(&rows));
    println!("\n### Ceiling: a plain put loop, same client library, same run\n");
    println!("| clients | puts/s |\n| ---: | ---: |");
    for (clients, rate) in puts {
        println!("| {clients} | {rate:.0} |");
    }
}

/// Puts per second: each of `clients` tasks, on its own connection, puts
/// its own key back to back.
async fn put_loop(url: &str, clients: usize, duration: Duration) -> f64 {
    let mut tasks = Vec::new();
    let started = Instant::now();
    let deadline = started + duration;
    for task in 0..clients {
        let mut client = Client::connect([url], None).await.expect("connect");
        let key = format!("bench-put/{}/{task}", random_namespace());
        tasks.push(tokio::spawn(async move {
            let mut puts = 0u64;
            while Instant::now() < deadline {
                client.put(key.as_str(), "x", None).await.expect("put");
                puts += 1;
            }
            puts
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("put task");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "etcd (version unknown)".to_owned())
}
