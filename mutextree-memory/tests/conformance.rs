//! The conformance suite on the memory store on tokio's paused clock (ttls
//! pass instantly): natively, through the stepwise algorithm, and with both
//! kinds of client on one namespace.

mod common;

conformance::suite!(store: common::Memory::new(conformance::Timing::PAUSED), clock: paused);
