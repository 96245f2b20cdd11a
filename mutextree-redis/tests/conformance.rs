//! The conformance suite on a real standalone `redis-server`.

mod common;

conformance::suite!(store: common::Redis::standalone(), clock: real);
