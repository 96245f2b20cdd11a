//! A chaos run on the memory store. There is no wire to break, so faults
//! are injected at the API, through the fault-gated wrapper: calls that
//! fail before reaching the store, replies lost after it acted, calls
//! slowed down; and holders pause past their ttl as in every chaos run.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::cancel::{Fault, Gated, Point};
use conformance::chaos::{self, ChaosSettings, ChaosStore};
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_memory::MemoryStore;

const TTL: Duration = Duration::from_millis(600);
const CALL_LIMIT: Duration = Duration::from_millis(500);

struct GatedMemory {
    store: MemoryStore,
    clients: Mutex<Vec<Arc<Gated>>>,
}

#[async_trait]
impl ChaosStore for GatedMemory {
    fn name(&self) -> String {
        "memory".to_owned()
    }

    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let gated = Gated::new(Arc::new(self.store.backend(namespace)?));
        self.clients.lock().expect("clients").push(gated.clone());
        Ok(gated)
    }

    async fn inject(&self, _round: usize, rng: &mut chaos::Rng) -> String {
        let target = {
            let clients = self.clients.lock().expect("clients");
            clients[rng.usize(..clients.len())].clone()
        };
        let point = if rng.bool() { Point::Before } else { Point::After };
        let (fault, name) =
            if rng.bool() { (Fault::Fail, "failed call") } else { (Fault::Slow(CALL_LIMIT / 3), "slow call") };
        target.arm(0, point, fault);
        tokio::time::sleep(Duration::from_millis(rng.u64(10..200))).await;
        target.disarm();
        let side = if point == Point::Before { "before the store" } else { "after the store (reply lost)" };
        format!("{name} {side}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_memory_api_faults_and_pauses() {
    let store = GatedMemory { store: MemoryStore::new(), clients: Mutex::new(Vec::new()) };
    let settings = ChaosSettings::from_env(16, TTL, CALL_LIMIT);
    chaos::run(Arc::new(store), settings).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ancestor_waiter_under_descendant_churn() {
    let store = common::Memory::new(conformance::Timing::REAL);
    conformance::churn::measure("memory", &store, 16).await;
}
