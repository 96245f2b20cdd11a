//! Faults on the wire and in the cluster, for the etcd store: a chaos run
//! on a 3-member cluster, each member behind a fault proxy, with members
//! (the leader among them) killed (`kill -9`) and restarted; and a grant
//! whose reply is lost.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::chaos::{self, ChaosSettings, ChaosStore};
use conformance::proxy::FaultProxy;
use conformance::servers::etcd::{self, Cluster};
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_etcd::EtcdConfig;

/// Whole seconds, at etcd's minimum lease.
const TTL: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a new cluster may take to serve.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// A request's and a connection's timeout on each of the three members
/// (the client moves on after a failure), and margin.
const CALL_LIMIT: Duration = Duration::from_secs(8);

struct Faulty {
    cluster: Arc<Mutex<Cluster>>,
    urls: Vec<String>,
    proxies: Vec<FaultProxy>,
}

impl Faulty {
    async fn start(members: usize) -> Faulty {
        let cluster = Cluster::start(members).unwrap_or_else(|message| panic!("{message}"));
        let mut proxies = Vec::new();
        for port in &cluster.client_ports {
            proxies.push(FaultProxy::to_port(*port).await.expect("proxy"));
        }
        let urls = cluster.urls();
        // A member listens before it serves: a new cluster answers once it
        // has elected a leader, which can take a few seconds. The faults
        // start only once it answers (waiting up to a generous limit).
        let serving = EtcdConfig::new(urls.clone()).connect_timeout(READY_LIMIT).request_timeout(READY_LIMIT);
        serving.connect().await.unwrap_or_else(|error| panic!("the new cluster never served: {error}"));
        Faulty { cluster: Arc::new(Mutex::new(cluster)), urls, proxies }
    }

    async fn backend(&self, endpoints: Vec<String>, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let config = EtcdConfig::new(endpoints).connect_timeout(REQUEST_TIMEOUT).request_timeout(REQUEST_TIMEOUT);
        Ok(Arc::new(config.connect().await?.backend(namespace)?))
    }

    fn proxied(&self) -> Vec<String> {
        self.proxies.iter().map(|proxy| etcd::client_url(proxy.port())).collect()
    }
}

#[async_trait]
impl ChaosStore for Faulty {
    fn name(&self) -> String {
        format!("etcd ({} members)", self.urls.len())
    }

    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        self.backend(self.proxied(), namespace).await
    }

    async fn inject(&self, round: usize, rng: &mut chaos::Rng) -> String {
        if self.urls.len() > 1 && round % 5 == 4 {
            let leader = etcd::leader(&self.urls).await;
            let (member, name) = if round % 10 == 4 {
                (leader, "kill -9 and restart of the leader")
            } else {
                ((leader + 1 + rng.usize(..self.urls.len() - 1)) % self.urls.len(), "kill -9 and restart of a follower")
            };
            let cluster = self.cluster.clone();
            tokio::task::spawn_blocking(move || cluster.lock().expect("cluster").crash_and_restart(member))
                .await
                .expect("restart")
                .unwrap_or_else(|message| panic!("{message}"));
            return name.to_owned();
        }
        let proxies: Vec<&FaultProxy> = self.proxies.iter().collect();
        chaos::proxy_fault(&proxies, rng).await
    }

    /// A new leader renews every lease (see the crate docs).
    fn expiry_is_exact(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_proxy_faults_member_crashes_and_pauses() {
    let store = Faulty::start(3).await;
    let settings = ChaosSettings::from_env(16, TTL, CALL_LIMIT);
    chaos::run(Arc::new(store), settings).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_grant_reply_leaves_at_most_an_orphan() {
    let store = Faulty::start(1).await;
    let namespace = conformance::random_namespace();
    let proxied = store.connect(&namespace).await.expect("connect");
    let observer = store.backend(store.urls.clone(), &namespace).await.expect("connect");
    let slack = common::TIMING.slack;
    chaos::lost_grant_reply_leaves_at_most_an_orphan(proxied, &store.proxies[0], observer, TTL, slack, CALL_LIMIT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_waiter_under_descendant_churn() {
    conformance::churn::measure("etcd", &common::Etcd::shared(), 16).await;
}
