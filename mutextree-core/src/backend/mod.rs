//! The implementer's face of the core: what a store needs to plug in, kept
//! apart from the user's API at the crate root (as OpenDAL keeps its `raw`
//! API apart).
//!
//! * [`LockBackend`] ([`contract`]): the contract a store implements.
//! * [`ChangeFeed`] and [`Listener`] ([`feed`]): how a store wakes waiters;
//!   [`Revocations`] and [`RevocationListener`]: how it tells a holder that
//!   its grant was released by force.
//! * [`stepwise`]: the seed's tree algorithm over a store's primitives, and
//!   [`Stepwise`], a store seen through it.
//! * [`url`]: store URLs, read alike by every store's configuration, and
//!   the `connect_timeout` every store puts on opening its connection.
//! * The values a store receives and answers with ([`LockRequest`],
//!   [`Attempt`], [`LockKind`]), and the helpers stores share.
//! * [`Acquisition`] (and [`acquire`]): the waiting loop the handle runs,
//!   for stores' and tools' own loops, and [`Background`], the work it
//!   leaves to finish when its caller moves on.
//!
//! The modules here depend on the values and the error at the crate root,
//! never on the handle or the waiting loop (which uses them), and on each
//! other only downwards: `feed` at the bottom, `contract` on it, `stepwise`
//! on both.

pub mod contract;
pub mod feed;
pub mod stepwise;
pub mod url;

pub use contract::{AbortOnDrop, Check, LockBackend, StoreLabels};
pub use feed::{ChangeFeed, Listener, Revocation, RevocationListener, Revocations};
pub use stepwise::{Stepwise, TRANSIENT_PATIENCE, TRANSIENT_TTL};
pub use url::{parse_duration, StoreUrl};

pub use crate::lock::{Attempt, LockKind, LockRequest, Queue, RESERVATION_TTL};
pub use crate::text::{human, quote};
pub use crate::wait::{acquire, Acquisition, Background, OnWait};

/// Re-exported so that stores implement [`LockBackend`] with the same macro.
pub use async_trait::async_trait;
