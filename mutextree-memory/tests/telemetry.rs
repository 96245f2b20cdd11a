//! What a lock's life reports on the memory store, through a test
//! subscriber and a test recorder (the cases are in
//! `conformance::telemetry`; the conformance suite runs the first), on
//! tokio's paused clock.

use std::sync::Arc;

use conformance::telemetry;
use mutextree_core::LockBackend;
use mutextree_memory::MemoryStore;

fn store() -> Arc<dyn LockBackend> {
    Arc::new(MemoryStore::new().backend("telemetry").expect("namespace"))
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
