//! The whole conformance suite against a real single-member etcd that the
//! harness starts on free loopback ports (or `MUTEXTREE_ETCD_URL`):
//! natively, through the stepwise algorithm, and with both kinds of client
//! on one namespace.

mod common;

conformance::suite!(store: common::Etcd::shared(), clock: real);
