//! The conformance suite on the memory store: natively, through the
//! stepwise algorithm, and with both kinds of client on one namespace.

use std::sync::Arc;

use conformance::{TestStore, Timing};
use mutextree_core::{async_trait, Error, LockBackend};
use mutextree_memory::MemoryStore;

/// A fresh store per test; namespaces of one test share it.
#[derive(Default)]
struct Memory(MemoryStore);

#[async_trait]
impl TestStore for Memory {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(self.0.namespace(namespace)?))
    }

    fn timing(&self) -> Timing {
        Timing::PAUSED
    }
}

conformance::suite!(store: Memory::default(), clock: paused);
