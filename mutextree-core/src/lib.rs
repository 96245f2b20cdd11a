//! Tree-shaped distributed locks: the core every store builds on.
//!
//! A resource is a node of a tree named by its path (`[A, B, D]` is D under
//! B under A). Locking a node protects it and its whole subtree: the lock is
//! refused while the node, an ancestor or a descendant is held; siblings are
//! independent. Locks expire, carry an owner id and a fencing token, and are
//! refreshed and released only by their holder.
//!
//! Most applications depend on the `mutextree` facade crate instead, which
//! re-exports this one with the stores behind cargo features.
//!
//! # Map
//!
//! * [`path`]: [`LockPath`], its text form `A/B/D` and its key encoding.
//! * [`lock`]: the values crossing the store contract ([`LockRequest`],
//!   [`Grant`], [`HeldLock`], [`Owner`], [`Ttl`], [`Namespace`]).
//! * [`backend`]: the [`LockBackend`] contract and [`Stepwise`].
//! * [`stepwise`]: the seed's algorithm over a store's primitives.
//! * [`url`]: store URLs, read alike by every store's configuration, and
//!   the `connect_timeout` every store puts on opening its connection.
//! * [`wait`]: how acquisitions wait (notifications, expiry, backoff).
//! * [`handle`]: [`TreeLock`], [`TreeLockGuard`] and [`TreeLock::run`].
//! * [`error`]: the one public [`Error`].
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
#[doc(hidden)]
pub mod checks;
pub mod error;
pub mod feed;
pub mod handle;
pub mod lock;
pub mod path;
pub mod stepwise;
pub mod url;
pub mod wait;

pub use backend::LockBackend;
pub use error::{human, Error, PathRule};
pub use feed::{ChangeFeed, Listener};
pub use handle::{IntoLockPath, TreeLock, TreeLockBuilder, TreeLockGuard, DEFAULT_TTL};
pub use lock::{Attempt, Grant, HeldLock, LockKind, LockRequest, Namespace, Owner, Ttl};
pub use path::{LockPath, MAX_DEPTH, MAX_PATH_BYTES, MAX_SEGMENT_BYTES};
pub use stepwise::Stepwise;
pub use url::parse_duration;
pub use wait::{Acquisition, Background, OnWait, Wait, TRANSIENT_PATIENCE};

/// Re-exported so that stores implement [`LockBackend`] with the same macro.
pub use async_trait::async_trait;
