//! The memory store as the conformance suite's store under test.

use std::sync::Arc;

use conformance::{TestStore, Timing};
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_memory::MemoryStore;

/// A fresh store per test, on the given time scales; namespaces of one test
/// share it.
pub(crate) struct Memory {
    store: MemoryStore,
    timing: Timing,
}

impl Memory {
    pub(crate) fn new(timing: Timing) -> Self {
        Memory { store: MemoryStore::new(), timing }
    }
}

#[async_trait]
impl TestStore for Memory {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(self.store.backend(namespace)?))
    }

    fn timing(&self) -> Timing {
        self.timing
    }
}
