#![doc = include_str!("../README.md")]
//!
//! # Layout
//!
//! The same files in the same roles as every store crate, each using only
//! those listed before it:
//!
//! * `error.rs`: client errors as [`Error::Store`](mutextree_core::Error::Store),
//!   and which are worth retrying.
//! * `config.rs`: [`EtcdConfig`], read from a URL or set in code.
//! * `layout.rs` and `members.rs`: the keys and values the store writes
//!   (two key spaces of grants, one per mode, two of waiters' reservations,
//!   and the ranges a transaction compares),
//!   and the failover between the cluster's members (this store's own parts).
//! * `feed.rs`: the watch on the namespace that wakes waiters.
//! * `backend.rs`: [`EtcdStore`] (with [`EtcdConfig::connect`]) and the
//!   [`LockBackend`](mutextree_core::LockBackend), [`EtcdBackend`]: the
//!   transactions, each counted against `--max-txn-ops` before it is sent.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod config;
mod error;
mod feed;
mod layout;
mod members;

pub use backend::{EtcdBackend, EtcdStore, MIN_LEASE_TTL};
pub use config::EtcdConfig;

/// etcd-client's TLS settings, for [`EtcdConfig::tls`] (feature `tls`).
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
#[cfg(feature = "tls")]
pub use etcd_client::{Certificate, Identity, TlsOptions};
