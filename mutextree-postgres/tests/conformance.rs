//! The conformance suite on a real PostgreSQL that the harness starts
//! (initdb + postgres on a free port), or on `MUTEXTREE_POSTGRES_URL`:
//! natively, through the stepwise algorithm, and with both kinds of client
//! on one namespace.

mod common;

conformance::suite!(store: common::Store, clock: real);
