//! Faults on the wire and on the server, for the PostgreSQL store: a chaos
//! run through a fault proxy with the server killed (`kill -9`) and
//! restarted, and a grant whose reply is lost.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Postgres, Settings};
use conformance::chaos::{self, ChaosSettings, ChaosStore};
use conformance::proxy::FaultProxy;
use mutextree_core::{async_trait, Error, LockBackend};
use mutextree_postgres::{PostgresBackend, PostgresConfig};

const TTL: Duration = Duration::from_millis(1500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection's timeout and a request's, a retry after a deadlock, and
/// margin.
const CALL_LIMIT: Duration = Duration::from_secs(5);

struct Faulty {
    server: Arc<Mutex<Option<Postgres>>>,
    port: u16,
    proxy: FaultProxy,
}

impl Faulty {
    async fn start() -> Faulty {
        let settings = Settings { restartable: true, ..Settings::default() };
        let server = Postgres::create(&settings).expect("postgres");
        let port = server.port;
        let proxy = FaultProxy::to_port(port).await.expect("proxy");
        Faulty { server: Arc::new(Mutex::new(Some(server))), port, proxy }
    }

    async fn backend(&self, port: u16, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let config = PostgresConfig::new(common::url_for(port))
            .namespace(namespace)
            .pool_size(2)
            .connect_timeout(REQUEST_TIMEOUT)
            .request_timeout(REQUEST_TIMEOUT);
        Ok(Arc::new(PostgresBackend::connect(&config).await?))
    }
}

#[async_trait]
impl ChaosStore for Faulty {
    fn name(&self) -> String {
        "postgres".to_owned()
    }

    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        self.backend(self.proxy.port(), namespace).await
    }

    async fn inject(&self, round: usize, rng: &mut chaos::Rng) -> String {
        if round % 5 == 4 {
            let server = self.server.clone();
            tokio::task::spawn_blocking(move || {
                let mut server = server.lock().expect("server");
                let running = server.take().expect("the server runs");
                *server = Some(running.crash_and_restart().expect("restart"));
            })
            .await
            .expect("restart");
            return "kill -9 and restart".to_owned();
        }
        chaos::proxy_fault(&[&self.proxy], rng).await
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().expect("server").take() {
            let base = server.base.clone();
            server.stop();
            let _ = std::fs::remove_dir_all(base);
        }
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
    let observer = store.backend(store.port, &namespace).await.expect("connect");
    let slack = conformance::Timing::REAL.slack;
    chaos::lost_grant_reply_leaves_at_most_an_orphan(proxied, &store.proxy, observer, TTL, slack, CALL_LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_waiter_under_descendant_churn() {
    conformance::churn::measure("postgres", &common::Store, 4).await;
}
