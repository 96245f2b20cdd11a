//! The conformance suite (placeholder while being written).
pub mod load;
