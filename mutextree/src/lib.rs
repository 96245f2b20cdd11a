#![doc = include_str!("../../README.md")]

pub use mutextree_core::*;

pub mod blocking;

/// The in-process store (feature `memory`, on by default).
#[cfg(feature = "memory")]
pub mod memory {
    pub use mutextree_memory::{MemoryBackend, MemoryStore};
}

/// The etcd store (feature `etcd`; TLS with `etcd-tls`).
#[cfg(feature = "etcd")]
pub mod etcd {
    /// TLS settings for [`EtcdConfig::tls`].
    #[cfg(feature = "etcd-tls")]
    pub use mutextree_etcd::{Certificate, Identity, TlsOptions};
    pub use mutextree_etcd::{EtcdBackend, EtcdConfig, EtcdStore, MIN_LEASE_TTL};
}
