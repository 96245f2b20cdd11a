//! Faults on the wire and on the server, for the PostgreSQL store: a chaos
//! run through a fault proxy with the server killed (`kill -9`) and
//! restarted, a grant whose reply is lost, and an ancestor waiter under
//! churn.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::chaos::CrashableServer;
use conformance::servers::postgres::{self, Postgres, Settings};
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_postgres::PostgresConfig;

const TTL: Duration = Duration::from_millis(1500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection's timeout and a request's, a retry after a deadlock, and
/// margin.
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// A server of the test's own, restartable on its data.
struct Server {
    running: Mutex<Option<Postgres>>,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let settings = Settings { restartable: true, ..Settings::default() };
        let running = Postgres::create(&settings).expect("postgres");
        Server { port: running.port, running: Mutex::new(Some(running)) }
    }
}

#[async_trait]
impl CrashableServer for Server {
    fn name(&self) -> String {
        "postgres".to_owned()
    }

    fn port(&self) -> u16 {
        self.port
    }

    async fn connect_to(&self, port: u16, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let config = PostgresConfig::from_url(&postgres::url_for(port))?
            .pool_size(2)
            .connect_timeout(REQUEST_TIMEOUT)
            .request_timeout(REQUEST_TIMEOUT);
        Ok(Arc::new(config.connect().await?.backend(namespace)?))
    }

    fn crash_and_restart(&self) {
        let mut running = self.running.lock().expect("server");
        let server = running.take().expect("the server runs");
        *running = Some(server.crash_and_restart().expect("restart"));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(server) = self.running.lock().expect("server").take() {
            let base = server.base.clone();
            server.stop();
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

conformance::behind_proxy_tests!(server: Server::start(), ttl: TTL, call_limit: CALL_LIMIT, slack: conformance::Timing::REAL.slack);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_waiter_under_descendant_churn() {
    conformance::churn::measure("postgres", &common::Store, 16).await;
}
