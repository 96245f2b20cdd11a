#![doc = include_str!("../../README.md")]

pub use mutextree_core::*;

pub mod blocking;

/// The in-process store (feature `memory`, on by default).
#[cfg(feature = "memory")]
pub mod memory {
    pub use mutextree_memory::{MemoryBackend, MemoryStore};
}

/// The PostgreSQL store (feature `postgres`; `postgres-tls` adds TLS).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use mutextree_postgres::{PostgresBackend, PostgresConfig, PostgresStore, SchemaName};
}
