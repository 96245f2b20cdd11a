//! The conformance suite on a real three-master Redis Cluster: every key of
//! a namespace in one slot, so the same scripts run unchanged.

mod common;

conformance::suite!(store: common::Redis::cluster(), clock: real);
