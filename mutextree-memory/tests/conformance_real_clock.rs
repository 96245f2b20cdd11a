//! The conformance suite on the memory store in real time, as the network
//! stores run it: tokio's clock is not paused, ttls pass for real, and the
//! cases use the network stores' time scales ([`Timing::REAL`]). This keeps
//! the suite's own real-time path honest before any server is involved.

use std::sync::Arc;

use conformance::{TestStore, Timing};
use mutextree_core::{async_trait, Error, LockBackend};
use mutextree_memory::MemoryStore;

#[derive(Default)]
struct RealTimeMemory(MemoryStore);

#[async_trait]
impl TestStore for RealTimeMemory {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(self.0.namespace(namespace)?))
    }

    fn timing(&self) -> Timing {
        Timing::REAL
    }
}

conformance::suite!(store: RealTimeMemory::default(), clock: real);
