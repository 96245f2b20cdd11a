#![doc = include_str!("../../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use mutextree_core::*;

pub mod blocking;
mod connect;
pub mod guide;

pub use connect::{connect, connect_with};

/// The in-process store (feature `memory`, on by default).
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory {
    pub use mutextree_memory::{MemoryBackend, MemoryStore};
}

/// The Redis store, standalone or cluster (feature `redis`; `redis-tls` for
/// `rediss://`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis {
    pub use mutextree_redis::{RedisBackend, RedisConfig, RedisStore};
}

/// The PostgreSQL store (feature `postgres`; `postgres-tls` adds TLS).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    pub use mutextree_postgres::{PostgresBackend, PostgresConfig, PostgresStore, SchemaName};
}

/// The etcd store (feature `etcd`; TLS with `etcd-tls`).
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd {
    /// TLS settings for [`EtcdConfig::tls`].
    #[cfg(feature = "etcd-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "etcd-tls")))]
    pub use mutextree_etcd::{Certificate, Identity, TlsOptions};
    pub use mutextree_etcd::{EtcdBackend, EtcdConfig, EtcdStore, MIN_LEASE_TTL};
}
