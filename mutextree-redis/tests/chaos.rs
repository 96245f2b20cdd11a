//! Faults on the wire and on the server, for the Redis store: a chaos run
//! through a fault proxy with the server killed (`kill -9`) and restarted,
//! a grant whose reply is lost, and an ancestor waiter under churn.
//!
//! The server runs with `appendfsync always`: without it a restart may
//! forget granted locks and the token counter, and two holders, or a
//! falling token, would be Redis's documented behaviour rather than a
//! fault of this store (see the crate docs).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::chaos::CrashableServer;
use conformance::harness::{temp_dir, RunningServer};
use conformance::servers;
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_redis::RedisConfig;

const TTL: Duration = Duration::from_millis(1500);
/// Two replies' timeouts (the backend sends a request again once after a
/// dropped connection), a connection's, and margin.
const CALL_LIMIT: Duration = Duration::from_secs(4);

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
}

fn persistent(port: Option<u16>, data: &Path) -> RunningServer {
    servers::redis::own_server(port, &["--appendonly", "yes", "--appendfsync", "always"], data).expect("redis-server")
}

#[async_trait]
impl CrashableServer for Server {
    fn name(&self) -> String {
        "redis (appendfsync always)".to_owned()
    }

    fn port(&self) -> u16 {
        self.port
    }

    async fn connect_to(&self, port: u16, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let url = format!("redis://127.0.0.1:{port}/?request_timeout=500ms&connect_timeout=500ms");
        Ok(Arc::new(RedisConfig::from_url(&url)?.connect().await?.backend(namespace)?))
    }

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

conformance::behind_proxy_tests!(server: Server::start(), ttl: TTL, call_limit: CALL_LIMIT, slack: conformance::Timing::REAL.slack);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_waiter_under_descendant_churn() {
    conformance::churn::measure("redis", &common::Redis::standalone(), 16).await;
}
