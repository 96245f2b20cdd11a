#![doc = include_str!("../README.md")]
//!
//! # Layout
//!
//! The same files in the same roles as every store crate, each using only
//! those listed before it:
//!
//! * `error.rs`: client errors as [`Error::Store`](mutextree_core::Error::Store),
//!   and which are worth retrying.
//! * `schema.rs` and `migrations/`: the tables and functions in the schema,
//!   each version a fixed SQL file (this store's own part).
//! * `config.rs`: [`PostgresConfig`], read from a URL or set in code, and
//!   its TLS connector.
//! * `feed.rs`: the `LISTEN` connection that wakes waiters.
//! * `backend.rs`: [`PostgresStore`] (with [`PostgresConfig::connect`] and
//!   the migration) and the [`LockBackend`](mutextree_core::LockBackend),
//!   [`PostgresBackend`].
#![cfg_attr(docsrs, feature(doc_cfg))]
// The TLS connector is cloned for every connection: `Clone` with the `tls`
// feature, `Copy` (so the clones are trivial) without it.
#![cfg_attr(not(feature = "tls"), allow(clippy::clone_on_copy))]

mod backend;
mod config;
mod error;
mod feed;
mod schema;

pub use backend::{PostgresBackend, PostgresStore};
pub use config::PostgresConfig;
pub use schema::SchemaName;
