//! The conformance suite on the memory store in real time, as the network
//! stores run it: tokio's clock is not paused, ttls pass for real, and the
//! cases use the network stores' time scales (`Timing::REAL`). This keeps
//! the suite's own real-time path honest before any server is involved.

mod common;

conformance::suite!(store: common::Memory::new(conformance::Timing::REAL), clock: real);
