//! How long a waiter for an ancestor waits while its descendants churn.
//!
//! A tree lock is a compare-and-set over a subtree: without a queue, a
//! waiter for `[A]` is granted only at an instant when no lock under `[A]`
//! is held, and clients that keep locking and releasing descendants can
//! leave it no such instant for a long time. A fair store queues the
//! waiter: once its reservation is written, every later conflicting
//! request is refused, so the waiter is granted as soon as the holders it
//! found are gone.
//!
//! This measures it: clients churn on the leaves under `[A]` (each tries a
//! leaf, holds it a moment, releases it, and tries another), one client
//! waits for `[A]` again and again, and the report gives the waits' p50,
//! p99 and maximum, and how many gave up at their limit. Meanwhile an
//! oracle checks that the waiter and the churners never overlap, and every
//! churner's grant is checked against the waiter's: a churner that asked
//! after the waiter had queued and was granted before it *overtook* it.
//! [`ChurnReport::assert_fair`] asserts none did and no wait gave up;
//! [`crate::fair`] bounds the wait itself.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use mutextree_core::{Error, Fairness, LockBackend, LockPath, TreeLock};
use tokio::time::{sleep, Instant};

use crate::oracle::Oracle;
use crate::TestStore;

/// The shape of a measurement.
#[derive(Clone, Debug)]
pub struct ChurnSettings {
    /// How many times the waiter waits for `[A]`.
    pub waits: usize,
    /// How long one wait may last before the waiter gives up.
    pub wait_limit: Duration,
    /// How long a churner holds a leaf.
    pub hold: Duration,
    /// The ttl of every lock.
    pub ttl: Duration,
    /// How the waiter waits (`None`: as its store does by default).
    pub fairness: Option<Fairness>,
}

impl Default for ChurnSettings {
    fn default() -> Self {
        ChurnSettings {
            waits: 8,
            wait_limit: Duration::from_secs(3),
            hold: Duration::from_millis(20),
            ttl: Duration::from_secs(5),
            fairness: None,
        }
    }
}

/// What a measurement found.
#[derive(Debug)]
pub struct ChurnReport {
    /// The store's name.
    pub store: String,
    /// Churning clients.
    pub churners: usize,
    /// The waits that ended in a grant, shortest first.
    pub granted: Vec<Duration>,
    /// Waits that gave up at the limit.
    pub gave_up: usize,
    /// The limit of one wait.
    pub wait_limit: Duration,
    /// Grants of leaves during the measurement.
    pub churn_grants: u64,
    /// Churners' grants asked for after the waiter had queued and granted
    /// before it.
    pub overtaken: usize,
}

impl ChurnReport {
    /// The `q`-quantile (0 to 1) of the granted waits, counting the waits
    /// that gave up as longer than any.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.granted.len() + self.gave_up;
        let rank = ((total as f64 * q).ceil() as usize).clamp(1, total.max(1)) - 1;
        self.granted.get(rank).copied()
    }

    /// Panics unless every wait was granted and no churner overtook the
    /// waiter: what a fair store guarantees.
    pub fn assert_fair(&self) {
        assert_eq!(self.gave_up, 0, "a queued waiter gave up: {self}");
        assert_eq!(self.overtaken, 0, "later requests overtook a queued waiter: {self}");
    }
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |q: f64| match self.quantile(q) {
            Some(wait) => format!("{:.0} ms", wait.as_secs_f64() * 1000.0),
            None => format!("> {} s (gave up)", self.wait_limit.as_secs()),
        };
        write!(
            f,
            "ancestor wait under churn, {} ({} churners): {} waits, p50 {}, p99 {}, max {}; {} gave up after {} s; {} \
             leaf grants meanwhile, {} overtaking the waiter",
            self.store,
            self.churners,
            self.granted.len() + self.gave_up,
            show(0.5),
            show(0.99),
            show(1.0),
            self.gave_up,
            self.wait_limit.as_secs(),
            self.churn_grants,
            self.overtaken
        )
    }
}

/// Measures on `store`, in a fresh namespace, with `churners` churning
/// clients and the default settings; see [`ancestor_waits_under_churn`].
///
/// On a fair store it measures twice, the second time with a barging
/// waiter (the rule of stores without a queue), to show what the queue
/// changes; it returns the first.
pub async fn measure(name: &str, store: &dyn TestStore, churners: usize) -> ChurnReport {
    let once = |fairness: Option<Fairness>| async move {
        let namespace = crate::random_namespace();
        let mut clients = Vec::new();
        for _ in 0..=churners {
            clients.push(store.connect(&namespace).await.expect("connect to the store"));
        }
        let waiter = clients.pop().expect("one client more than the churners");
        let fair = waiter.fairness() == Fairness::Fair;
        let settings = ChurnSettings { fairness, ..ChurnSettings::default() };
        (fair, ancestor_waits_under_churn(name, clients, waiter, settings).await)
    };
    let (fair, report) = once(None).await;
    if fair {
        once(Some(Fairness::Barging)).await;
    }
    report
}

/// Measures on `churners` (one client each) and `waiter`, all of one fresh
/// namespace; prints the report and returns it. Panics if the oracle saw
/// an overlap, or, when the waiter's store is fair, if a wait gave up or
/// was overtaken ([`ChurnReport::assert_fair`]).
pub async fn ancestor_waits_under_churn(
    store: &str,
    churners: Vec<Arc<dyn LockBackend>>,
    waiter: Arc<dyn LockBackend>,
    settings: ChurnSettings,
) -> ChurnReport {
    let oracle = Arc::new(Oracle::new());
    let stop = Arc::new(AtomicBool::new(false));
    let churn_grants = Arc::new(AtomicU64::new(0));
    // Each churner grant: when it was asked for, and its token.
    let asked: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let count = churners.len();
    let churning: Vec<_> = churners
        .into_iter()
        .map(|client| {
            let (oracle, stop, churn_grants, asked, settings) =
                (oracle.clone(), stop.clone(), churn_grants.clone(), asked.clone(), settings.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let leaf = LockPath::new(["A", &fastrand::u8(..4).to_string(), &fastrand::u8(..4).to_string()])
                        .expect("path");
                    let lock = TreeLock::builder(client.clone(), leaf).ttl(settings.ttl).build().expect("lock");
                    let asking = Instant::now();
                    match lock.try_acquire().await {
                        Ok(grant) => {
                            oracle.enter(&grant);
                            asked.lock().expect("never poisoned").push((asking, grant.token));
                            churn_grants.fetch_add(1, Ordering::Relaxed);
                            sleep(settings.hold).await;
                            oracle.exit(&grant);
                            lock.release().await.expect("a churner releases");
                        }
                        Err(Error::Refused { .. }) => tokio::task::yield_now().await,
                        Err(error) => panic!("a churner failed: {error}"),
                    }
                }
            })
        })
        .collect();

    let fairness = settings.fairness.unwrap_or(waiter.fairness());
    let fair = fairness == Fairness::Fair;
    let (mut granted, mut gave_up, mut overtaken) = (Vec::new(), 0, 0);
    // When the waiter first heard it must wait, in the current wait: its
    // reservation is written by then on a fair store.
    let queued_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let ancestor = TreeLock::builder(waiter, "A")
        .ttl(settings.ttl)
        .fairness(fairness)
        .on_wait({
            let queued_at = queued_at.clone();
            move |_| {
                queued_at.lock().expect("never poisoned").get_or_insert_with(Instant::now);
            }
        })
        .build()
        .expect("lock");
    for _ in 0..settings.waits {
        // Churn resumes between waits (the pause is the waiter's own
        // pacing, not a synchronisation).
        sleep(settings.hold * 5).await;
        *queued_at.lock().expect("never poisoned") = None;
        let started = Instant::now();
        match ancestor.acquire_timeout(settings.wait_limit).await {
            Ok(grant) => {
                granted.push(started.elapsed());
                oracle.enter(&grant);
                oracle.exit(&grant);
                if let Some(queued) = *queued_at.lock().expect("never poisoned") {
                    let asked = asked.lock().expect("never poisoned");
                    overtaken += asked.iter().filter(|&&(at, token)| at > queued && token < grant.token).count();
                }
                ancestor.release().await.expect("the waiter releases");
            }
            Err(Error::Timeout { .. }) => gave_up += 1,
            Err(error) => panic!("the waiter failed: {error}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for churner in join_all(churning).await {
        churner.expect("a churner panicked");
    }
    oracle.assert_clean();
    granted.sort();
    let report = ChurnReport {
        store: if fair { store.to_owned() } else { format!("{store}, barging waiter") },
        churners: count,
        granted,
        gave_up,
        wait_limit: settings.wait_limit,
        churn_grants: churn_grants.load(Ordering::Relaxed),
        overtaken,
    };
    println!("{report}");
    if fair {
        report.assert_fair();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_count_the_waits_that_gave_up_as_longest() {
        let report = ChurnReport {
            store: "s".to_owned(),
            churners: 1,
            granted: (1..=8).map(Duration::from_millis).collect(),
            gave_up: 2,
            wait_limit: Duration::from_secs(1),
            churn_grants: 0,
            overtaken: 0,
        };
        assert_eq!(report.quantile(0.5), Some(Duration::from_millis(5)));
        assert_eq!(report.quantile(0.8), Some(Duration::from_millis(8)));
        assert_eq!(report.quantile(0.99), None);
        assert!(report.to_string().contains("p99 > 1 s (gave up)"), "{report}");
    }
}
