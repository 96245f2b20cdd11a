//! What a lock's life reports on the PostgreSQL store, through a test
//! subscriber and recorder (`conformance::telemetry`), in a test binary of
//! its own (see there why).

mod common;

#[test]
fn granted_refused_and_released() {
    conformance::telemetry::granted_refused_and_released(common::Store, false);
}
