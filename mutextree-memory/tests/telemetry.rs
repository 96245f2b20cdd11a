//! What a lock's life reports on the memory store, through a test
//! subscriber and a test recorder (the cases are in
//! `conformance::telemetry`), on tokio's paused clock, in a test binary
//! of their own (see there why).

use std::sync::Arc;

use conformance::telemetry;
use mutextree_core::LockBackend;
use mutextree_memory::MemoryStore;

fn store() -> Arc<dyn LockBackend> {
    Arc::new(MemoryStore::new().backend("telemetry").expect("namespace"))
}

/// The memory store as the telemetry cases connect to it.
struct Memory;

#[mutextree_core::backend::async_trait]
impl conformance::TestStore for Memory {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, mutextree_core::Error> {
        Ok(Arc::new(MemoryStore::new().backend(namespace)?))
    }
}

#[test]
fn granted_refused_and_released() {
    telemetry::granted_refused_and_released(Memory, true);
}

#[test]
fn a_timed_out_wait_is_traced() {
    telemetry::a_timed_out_wait_is_traced(true, "memory", store());
}

#[test]
fn losses_are_traced_with_their_reason() {
    telemetry::losses_are_traced_with_their_reason(true, "memory", store());
}

#[test]
fn refreshes_are_traced_with_their_margin() {
    telemetry::refreshes_are_traced_with_their_margin(true, "memory", store());
}
