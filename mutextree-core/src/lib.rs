//! Tree-shaped distributed locks: the core every store builds on.
//!
//! A resource is a node of a tree named by its path (`[A, B, D]` is D under
//! B under A). Locking a node protects it and its whole subtree: the lock is
//! refused while the node, an ancestor or a descendant is held; siblings are
//! independent. Locks expire, carry an owner id and a fencing token, and are
//! refreshed and released only by their holder.
//!
//! A lock is [`Mode::Exclusive`] (the default) or [`Mode::Shared`]: two
//! locks on one branch conflict unless both are Shared, and a Shared lock
//! covers its whole subtree as an Exclusive one does (the conflict table is
//! in the docs of [`Mode`]'s module, [here](crate::Mode#modes)). One grant
//! may hold up to [`LockItems::MAX`] paths, each with its mode, all or
//! nothing, under one fencing token; a held grant can change its mode
//! ([`TreeLock::upgrade`], [`TreeLock::downgrade`]).
//!
//! Waiters queue across the tree by default ([`Fairness::Fair`]): a request
//! that must wait takes a ticket and a reservation of its paths, and a
//! request is granted only when no grant and no earlier conflicting
//! reservation is in its way, so a waiter for `[A]` is never starved by a
//! stream of locks under `[A]` (the rule and its guarantees are in the docs
//! of [`Fairness`]).
//!
//! Most applications depend on the `mutextree` facade crate instead, which
//! re-exports this one with the stores behind cargo features.
//!
//! # Two faces
//!
//! The crate root is the user's API: [`TreeLock`] and its guard, [`Wait`],
//! [`Error`], paths, owners, ttls and grants. [`backend`] is the
//! implementer's: the store contract, wake-ups, the stepwise algorithm,
//! store URLs. [`LockBackend`] is in both, because a user holds a store as
//! `Arc<dyn LockBackend>` and lists its locks through it.
//!
//! # Map
//!
//! * [`path`]: [`LockPath`], its text form `A/B/D` and its key encoding.
//! * The values crossing the store contract ([`Grant`], [`HeldLock`],
//!   [`Owner`], [`Ttl`], [`Namespace`]), each checked when it is made.
//! * The one public [`Error`].
//! * [`handle`]: [`TreeLock`], [`TreeLockGuard`] and [`TreeLock::run`];
//!   how an acquisition waits is [`Wait`] (the loop itself, for stores' and
//!   tools' own use, is [`backend::Acquisition`]).
//! * [`telemetry`]: the spans, events and metrics an application can
//!   collect (who waits for what, how holds end), and [`LostReason`].
//! * [`backend`]: the implementer's face (see above).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
#[cfg(feature = "checks")]
pub mod checks;
mod error;
pub mod handle;
mod lock;
pub mod path;
pub mod telemetry;
mod text;
mod validate;
mod wait;

pub use backend::LockBackend;
pub use error::Error;
pub use handle::{IntoLockPath, TreeLock, TreeLockBuilder, TreeLockGuard, DEFAULT_TTL};
pub use lock::{Blockers, Fairness, Grant, HeldLock, LockItem, LockItems, Mode, Namespace, Owner, Ttl};
pub use path::{LockPath, PathRule, MAX_DEPTH, MAX_PATH_BYTES, MAX_SEGMENT_BYTES};
pub use telemetry::LostReason;
pub use wait::Wait;
