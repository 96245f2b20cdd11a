//! The in-process mutextree store: one tree per namespace, the namespaces
//! in a [`dashmap`].
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
//! # How a grant works
//!
//! Each namespace is one tree under one mutex. Each node with items on it,
//! or below it, is one map entry: its items (grant token and mode), and
//! how many items lie below it through each child, counted per mode. A
//! request is checked and placed inside one critical section, so every
//! grant, multi-path or not, is all or nothing at one instant, and no
//! other call sees it half done. For an item `(path, mode)`:
//!
//! 1. each ancestor's entry and the node's own: is a live item there that
//!    conflicts with `mode` (any item for Exclusive, an Exclusive one for
//!    Shared)?
//! 2. below the node: the counts say at once whether a conflicting item
//!    could be there (Exclusive counts only, for a Shared request); only
//!    then does a walk descend, into the children whose counts say so, to
//!    name the first live one in key order.
//!
//! Step 1 counts the item below each ancestor as it passes it (one lookup
//! for both), and a refusal takes the counts back, all inside the critical
//! section. So a grant costs O(depth) map lookups per item whatever is held
//! elsewhere, plus a walk only when something below may be in the way. A
//! Shared request on a subtree full of readers looks at no reader. Each
//! item keeps its grant's whole description (reference counted), so a
//! single-path grant is one entry and no table beside the tree.
//!
//! A mode change is the same check for the grant's items with its own
//! items left out, then a re-placing under a new token.
//!
//! An earlier version locked one entry of a sharded map at a time, with
//! intention counts, and no global lock. All-or-nothing grants of several
//! items do not fit that scheme: placing items one entry at a time makes a
//! half-placed grant visible, and two half-placed grants waiting on each
//! other's intentions could deadlock. The critical section here does no
//! allocation on the hot path (entries emptied by a release stay for the
//! next grant until a sweep) and never waits, so it stays short; the
//! benchmarks compare both (see BENCHMARKS.md).
//!
//! Expired locks are removed when a grant, release or listing comes across
//! them, and by a sweep of the whole map every time as many tokens were
//! taken as there are entries, so memory stays bounded by the live locks at
//! an amortised O(1) per grant.
//!
//! # Fair waiting
//!
//! A waiter's reservation (its items, owner, ticket and a
//! [`RESERVATION_TTL`](mutextree_core::backend::RESERVATION_TTL) of life)
//! lies on a second tree of the same shape beside the grants', with the
//! same per-mode counts, so its conflicts are found exactly like a grant's.
//! A fair request is checked against the grants as above and then, for
//! each item no grant blocks, against the reservations that come before it
//! (all of them for a request that does not wait, the smaller tickets for
//! a waiter); a refusal takes its ticket from the token counter and writes
//! or renews the reservation, and a grant removes it, all in the same
//! critical section. Reservations are kept off the grants' tree so that
//! the grants' counts and walks never meet them, and the check of the
//! second tree is skipped while the namespace has no reservation at all
//! (one comparison): an uncontended grant costs what it did before fair
//! waiting. A table by ticket beside the second tree serves withdrawals,
//! which name only the ticket. Lapsed reservations are purged like expired
//! locks: when a check or a listing meets them, and by the sweep.
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
