//! Faults on the wire and on the server, for the Redis store: a chaos run
//! through a fault proxy with the server killed (`kill -9`) and restarted,
//! and a grant whose reply is lost.
//!
//! The server runs with `appendfsync always`: without it a restart may
//! forget granted locks and the token counter, and two holders, or a
//! falling token, would be Redis's documented behaviour rather than a
//! fault of this store (see the crate docs).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::chaos::{self, ChaosSettings, ChaosStore};
use conformance::harness::{temp_dir, RunningServer};
use conformance::proxy::FaultProxy;
use conformance::servers;
use mutextree_core::{async_trait, Error, LockBackend};
use mutextree_redis::RedisOptions;

const TTL: Duration = Duration::from_millis(1500);
/// Two replies' timeouts (the backend sends a request again once after a
/// dropped connection), a connection's, and margin.
const CALL_LIMIT: Duration = Duration::from_secs(4);
const TIMEOUTS: &str = "response_timeout=500ms&connection_timeout=500ms";

/// A server of the test's own, with its data kept across restarts.
struct Server {
    running: Mutex<Option<RunningServer>>,
    port: u16,
    data: PathBuf,
}

impl Server {
    fn start() -> Server {
        let data = temp_dir("redis-data").expect("temp dir");
        let running = persistent(None, &data);
        Server { port: running.port, running: Mutex::new(Some(running)), data }
    }

    /// `kill -9`, then a new server on the same port and data.
    fn crash_and_restart(&self) {
        let mut running = self.running.lock().expect("server");
        if let Some(server) = running.take() {
            server.stop();
        }
        *running = Some(persistent(Some(self.port), &self.data));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(server) = self.running.lock().expect("server").take() {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn persistent(port: Option<u16>, data: &std::path::Path) -> RunningServer {
    servers::own_redis(port, &["--appendonly", "yes", "--appendfsync", "always"], data).expect("redis-server")
}

struct Faulty {
    server: Arc<Server>,
    proxy: FaultProxy,
}

impl Faulty {
    async fn start() -> Faulty {
        let server = Arc::new(Server::start());
        let proxy = FaultProxy::to_port(server.port).await.expect("proxy");
        Faulty { server, proxy }
    }

    async fn backend(&self, port: u16, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let url = format!("redis://127.0.0.1:{port}/?{TIMEOUTS}");
        Ok(Arc::new(RedisOptions::from_url(&url)?.namespace(namespace)?.connect().await?))
    }
}

#[async_trait]
impl ChaosStore for Faulty {
    fn name(&self) -> String {
        "redis (appendfsync always)".to_owned()
    }

    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        self.backend(self.proxy.port(), namespace).await
    }

    async fn inject(&self, round: usize, rng: &mut chaos::Rng) -> String {
        if round % 5 == 4 {
            let server = self.server.clone();
            tokio::task::spawn_blocking(move || server.crash_and_restart()).await.expect("restart");
            return "kill -9 and restart".to_owned();
        }
        chaos::proxy_fault(&[&self.proxy], rng).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_proxy_faults_crashes_and_pauses() {
    let store = Faulty::start().await;
    let settings = ChaosSettings::from_env(16, TTL, CALL_LIMIT);
    chaos::run(Arc::new(store), settings).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_grant_reply_leaves_at_most_an_orphan() {
    let store = Faulty::start().await;
    let namespace = format!("t-{:016x}", fastrand::u64(..));
    let proxied = store.connect(&namespace).await.expect("connect");
    let observer = store.backend(store.server.port, &namespace).await.expect("connect");
    let slack = conformance::Timing::REAL.slack;
    chaos::lost_grant_reply_leaves_at_most_an_orphan(proxied, &store.proxy, observer, TTL, slack, CALL_LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_waiter_under_descendant_churn() {
    conformance::churn::measure("redis", &common::Redis::standalone(), 4).await;
}
