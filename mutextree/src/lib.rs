#![doc = include_str!("../../README.md")]

pub use mutextree_core::*;

pub mod blocking;

/// The in-process store (feature `memory`, on by default).
#[cfg(feature = "memory")]
pub mod memory {
    pub use mutextree_memory::{MemoryBackend, MemoryStore};
}
