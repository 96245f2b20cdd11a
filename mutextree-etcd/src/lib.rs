#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod layout;
mod members;
mod store;
mod watch;

pub use config::EtcdConfig;
pub use store::{EtcdBackend, EtcdStore, MIN_LEASE_TTL};

/// etcd-client's TLS settings, for [`EtcdConfig::tls`] (feature `tls`).
#[cfg(feature = "tls")]
pub use etcd_client::{Certificate, Identity, TlsOptions};
