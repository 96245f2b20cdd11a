//! `mutextree bench`: the workspace's load generator against any store.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use mutextree::backend::human;
use mutextree::{Error, Fairness, LockBackend};
use mutextree_load::{self as load, LoadSpec, Scenario};

use crate::parse_duration;
use crate::show::plural;

/// Measure a store: simulated clients doing acquire+release pairs as fast
/// as they can, with a progress bar, then a table (pairs/s, latency
/// percentiles, refusals, round trips per pair where the store counts
/// them).
///
/// It runs in a fresh namespace of its own (bench-RANDOM), so it never
/// meets real locks, and releases everything it took.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  mutextree --store redis://127.0.0.1:6379 bench --clients 16 --duration 10s
  mutextree --store memory:// bench --scenario contended --depth 4 --fan-out 3 --background 100000
  mutextree bench --clients 16 --scenario read-heavy --duration 2s
  mutextree bench --clients 16 --scenario contended --wait fair
  mutextree bench --clients 4 --duration 3 --json | jq .pairs_per_sec")]
pub(crate) struct Bench {
    /// Simulated clients, each with its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    clients: u16,

    /// Depth of the locked paths.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    depth: u8,

    /// siblings (one leaf each, shared parents, no conflicts), contended
    /// (random nodes of one small tree), read-heavy (one client writes a
    /// leaf exclusively, the others read its parent shared: 16 clients are
    /// 15 readers and a writer) or two-paths (two random hosts per grant,
    /// exclusive; 8 hosts per client).
    #[arg(long, default_value = "siblings", value_parser = clap::value_parser!(Scenario))]
    scenario: Scenario,

    /// Children per node of the contended tree.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=1000))]
    fan_out: u16,

    /// Unrelated locks held during the run.
    #[arg(long, default_value_t = 0)]
    background: usize,

    /// Clients wait for their locks instead of trying once and counting a
    /// refusal: fair (queued behind earlier waiters) or barging (first
    /// attempt after a release wins). A pair's latency is then its wait
    /// plus its release, and the round trips per pair count the attempts
    /// of the wait.
    #[arg(long, value_name = "fair|barging", value_parser = parse_fairness)]
    wait: Option<Fairness>,

    /// How long the clients run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,

    /// One JSON object instead of the table: the run's settings and
    /// figures (latencies in microseconds).
    #[arg(long)]
    json: bool,
}

impl Bench {
    pub(crate) async fn execute(self, url: &str) -> Result<ExitCode, Error> {
        let nodes = (0..u32::from(self.depth)).try_fold(0u64, |total, level| {
            u64::from(self.fan_out).checked_pow(level).and_then(|n| total.checked_add(n))
        });
        if self.scenario == Scenario::Contended && nodes.is_none_or(|nodes| nodes > 1_000_000) {
            return Err(Error::InvalidConfig {
                store: "mutextree",
                reason: format!(
                    "a contended tree of depth {} and fan-out {} has over a million nodes: make one smaller",
                    self.depth, self.fan_out
                ),
            });
        }
        if self.scenario == Scenario::ReadHeavy && self.clients < 2 {
            return Err(Error::InvalidConfig {
                store: "mutextree",
                reason: "the read-heavy scenario needs --clients 2 or more: a writer and readers".to_owned(),
            });
        }
        let namespace = format!("bench-{:08x}", fastrand::u32(..));
        let progress = progress_bar(self.duration);
        progress.set_message(format!("connecting {}", plural(self.clients.into(), "client")));
        let mut clients: Vec<Arc<dyn LockBackend>> = Vec::new();
        for _ in 0..self.clients {
            clients.push(crate::connect(url, &namespace).await?);
        }
        let spec = LoadSpec {
            clients: usize::from(self.clients),
            depth: usize::from(self.depth),
            scenario: self.scenario,
            background: self.background,
            duration: self.duration,
            fan_out: usize::from(self.fan_out),
            waiting: self.wait,
            ..LoadSpec::default()
        };
        let measuring = format!(
            "measuring {} ({}, depth {}) for {}",
            plural(spec.clients, "client"),
            spec.scenario,
            spec.depth,
            human(spec.duration)
        );
        progress.set_message(if spec.background == 0 {
            measuring
        } else {
            format!("taking {}, then {measuring}", plural(spec.background, "background lock"))
        });
        let sent_before: Option<u64> = clients.iter().map(|client| client.round_trips()).sum();
        let started = Instant::now();
        let ticker = {
            let progress = progress.clone();
            tokio::spawn(async move {
                loop {
                    progress.set_position(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let report = load::run(&clients, &spec).await;
        ticker.abort();
        progress.finish_and_clear();
        let report = report?;
        let sent_after: Option<u64> = clients.iter().map(|client| client.round_trips()).sum();
        let round_trips_per_pair = match sent_before.zip(sent_after) {
            Some((before, after)) if report.pairs > 0 => {
                // Background grants and releases, and refused attempts, cost
                // their own requests.
                let other = 2 * self.background as u64 + report.refused;
                Some(after.saturating_sub(before).saturating_sub(other) as f64 / report.pairs as f64)
            }
            _ => None,
        };

        // Without the query, and the password hidden.
        let place = mutextree::backend::url::StoreUrl::parse("mutextree", url)?;
        if self.json {
            let micros = |duration: Duration| u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
            let figures = serde_json::json!({
                "store": place.to_string(),
                "namespace": namespace,
                "clients": spec.clients,
                "depth": spec.depth,
                "scenario": spec.scenario.to_string(),
                "wait": spec.waiting.map(|fairness| match fairness {
                    Fairness::Fair => "fair",
                    Fairness::Barging => "barging",
                }),
                "fan_out": spec.fan_out,
                "background": spec.background,
                "duration_ms": u64::try_from(spec.duration.as_millis()).unwrap_or(u64::MAX),
                "pairs": report.pairs,
                "refused": report.refused,
                "refused_percent": report.refused_percent(),
                "elapsed_ms": u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
                "pairs_per_sec": report.pairs_per_sec,
                "p50_us": micros(report.p50),
                "p99_us": micros(report.p99),
                "p999_us": micros(report.p999),
                "max_us": micros(report.max),
                "round_trips_per_pair": round_trips_per_pair,
            });
            println!("{figures}");
            return Ok(ExitCode::SUCCESS);
        }
        println!("store: {place}, namespace {namespace}");
        print!("{}", load::markdown_table(&[(spec, report)]));
        match round_trips_per_pair {
            Some(per_pair) => println!("round trips per pair: {per_pair:.2}"),
            None => println!("round trips per pair: not counted by this store"),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `fair` or `barging`.
fn parse_fairness(text: &str) -> Result<Fairness, String> {
    match text {
        "fair" => Ok(Fairness::Fair),
        "barging" => Ok(Fairness::Barging),
        other => Err(format!("{other:?} is neither fair nor barging")),
    }
}

fn progress_bar(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {elapsed}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
