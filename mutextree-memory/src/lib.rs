//! The in-process mutextree store, on [`dashmap`].
//!
//! For unit tests and single-process programs: it behaves like the network
//! stores (same contract, same conformance suite, fencing tokens, expiry,
//! wake-ups), with no server.
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use mutextree_core::{Error, LockBackend, TreeLock};
//! use mutextree_memory::MemoryBackend;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
//! let rack = TreeLock::new(store.clone(), ["eu-west", "rack-12"])?;
//! let host = TreeLock::new(store, ["eu-west", "rack-12", "host-7"])?;
//! rack.acquire().await?;
//! assert!(matches!(host.try_acquire().await, Err(Error::Refused { .. })));
//! # Ok(()) }
//! ```
//!
//! # How a grant stays O(depth) without a global lock
//!
//! Each node of the tree that is locked, or has locks below it, is one map
//! entry: its own lock, and how many locks lie below it through each child.
//! A grant for `[A, B, D]` works like a database's multi-granularity locking
//! (intention locks), touching one entry at a time, root first:
//!
//! 1. at `[A]` and `[A, B]`: refuse if the entry's own lock is live;
//!    otherwise count one more lock below it (an *intention*);
//! 2. at `[A, B, D]`: refuse if its own lock is live, or if locks are counted
//!    below it and a search finds a live one; otherwise take the lock.
//!
//! A refusal takes back the intentions. Two overlapping grants always meet on
//! the upper node's entry (one's intention against the other's lock), so one
//! of them sees the other; two siblings only both bump their parent's count,
//! in parallel. Each entry is changed under its shard's lock, and no code
//! ever holds two entries at once (dashmap's locks are not re-entrant).
//!
//! An intention whose grant is still under way on another thread shows as a
//! count with no live lock below: the grant retries for the microseconds that
//! grant takes (no `.await` happens inside one). Expired locks are removed
//! when a grant, release or listing comes across them, and by a sweep of the
//! whole map every time as many grants were made as there are entries, so
//! memory stays bounded by the live locks at an amortised O(1) per grant.
//! Entries and counts that become empty are left for that sweep too: the
//! next grant on the same nodes then allocates nothing.
//!
//! # Sharing the runtime
//!
//! A call never waits for anything, so without help a loop of refused
//! attempts would never yield, and on a runtime with few workers it could
//! keep every other task (a holder's automatic refresh among them) from
//! running until locks expire. Every call therefore spends one unit of
//! tokio's cooperative budget first, *before* it touches the map: when the
//! budget is spent the call yields, having done nothing, so dropping it
//! there is harmless.
//!
//! Expiry is judged on tokio's clock ([`tokio::time::Instant`]), so tests can
//! pause and advance time. Waiters wake through a
//! [`ChangeFeed`](mutextree_core::backend::feed::ChangeFeed) on every release and
//! purge.
//!
//! # Layout
//!
//! `lib.rs` holds these docs and the re-exports, `backend.rs` the store,
//! its [`LockBackend`](mutextree_core::backend::LockBackend) and the map
//! above. No settings, no server to hear changes from and no client
//! errors: none of the other stores' `config.rs`, `feed.rs`, `error.rs`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;

pub use backend::{MemoryBackend, MemoryStore};
