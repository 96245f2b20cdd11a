//! `mutextree bench`: the workspace's load generator against any store.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance::load::{self, LoadSpec, Scenario};
use indicatif::{ProgressBar, ProgressStyle};
use mutextree::{Error, LockBackend};

use crate::parse_duration;

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
  mutextree --store memory:// bench --scenario contended --depth 4 --fan-out 3 --background 100000")]
pub(crate) struct Bench {
    /// Simulated clients, each with its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    clients: u16,

    /// Depth of the locked paths.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    depth: u8,

    /// siblings (one leaf each, shared parents, no conflicts) or contended
    /// (random nodes of one small tree).
    #[arg(long, default_value = "siblings", value_parser = parse_scenario)]
    scenario: Scenario,

    /// Children per node of the contended tree.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=1000))]
    fan_out: u16,

    /// Unrelated locks held during the run.
    #[arg(long, default_value_t = 0)]
    background: usize,

    /// How long the clients run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
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
        let namespace = format!("bench-{:08x}", fastrand::u32(..));
        let mut clients: Vec<Arc<dyn LockBackend>> = Vec::new();
        for _ in 0..self.clients {
            clients.push(crate::connect_in(url, &namespace).await?);
        }
        let spec = LoadSpec {
            clients: usize::from(self.clients),
            depth: usize::from(self.depth),
            scenario: self.scenario,
            background: self.background,
            duration: self.duration,
            fan_out: usize::from(self.fan_out),
            ..LoadSpec::default()
        };
        let sent_before: Option<u64> = clients.iter().map(|client| client.round_trips()).sum();
        let progress = progress_bar(self.duration);
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

        // Without the query, and the password hidden.
        let place = mutextree::url::StoreUrl::parse("mutextree", url)?;
        println!("store: {place}, namespace {namespace}");
        print!("{}", load::markdown_table(&[(spec, report.clone())]));
        match sent_before.zip(sent_after) {
            Some((before, after)) if report.pairs > 0 => {
                // Background grants and releases, and refused attempts, cost
                // their own requests.
                let other = 2 * self.background as u64 + report.refused;
                let per_pair = after.saturating_sub(before).saturating_sub(other) as f64 / report.pairs as f64;
                println!("round trips per pair: {per_pair:.2}");
            }
            _ => println!("round trips per pair: not counted by this store"),
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn progress_bar(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {elapsed}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    bar.set_message("holding the background, then running");
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn parse_scenario(text: &str) -> Result<Scenario, String> {
    match text {
        "siblings" => Ok(Scenario::Siblings),
        "contended" => Ok(Scenario::Contended),
        _ => Err("write siblings or contended".to_owned()),
    }
}
