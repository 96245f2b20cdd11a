//! Which call to use when, each with an example that runs as it is.
//!
//! The examples use the in-process store so that they run anywhere; a
//! network store behaves the same: only the URL given to
//! [`connect`](crate::connect) changes.
//!
//! # [`lock`](crate::TreeLock::lock): wait for the lock, hold it in a guard
//!
//! [`TreeLock::lock`](crate::TreeLock::lock) (and
//! [`acquire`](crate::TreeLock::acquire), which returns the bare grant)
//! waits while an overlapping lock is held, up to the handle's timeout:
//! without [`TreeLockBuilder::timeout`](crate::TreeLockBuilder::timeout) or
//! [`wait`](crate::TreeLockBuilder::wait), as long as it takes, as
//! `std::sync::Mutex::lock` and flock(1) do. A waiter wakes on the store's
//! notification of a release, not by polling.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use std::time::Duration;
//! use mutextree::TreeLock;
//!
//! let store = mutextree::connect("memory://?namespace=guide-lock").await?;
//! let rack = TreeLock::new(store.clone(), "eu-west/rack-12")?;
//! let host = TreeLock::builder(store, "eu-west/rack-12/host-7")
//!     .timeout(Duration::from_secs(10))
//!     .build()?;
//!
//! let rack_guard = rack.lock().await?;
//! // The host is inside the rack: its lock waits for the rack's release.
//! let waiter = tokio::spawn(async move {
//!     let host_guard = host.lock().await?;
//!     let token = host_guard.token();
//!     host_guard.release().await?;
//!     Ok::<_, mutextree::Error>(token)
//! });
//! rack_guard.release().await?;
//! let host_token = waiter.await.expect("the waiter ran to its end")?;
//! assert!(host_token > 1, "every grant's token is above the ones before");
//! # Ok(()) }
//! ```
//!
//! # [`try_lock`](crate::TreeLock::try_lock): never wait
//!
//! [`TreeLock::try_lock`](crate::TreeLock::try_lock) (and
//! [`try_acquire`](crate::TreeLock::try_acquire)) ask once: a held lock is
//! an [`Error::Refused`](crate::Error::Refused) naming the lock in the way,
//! whatever the handle's timeout.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use mutextree::{Error, TreeLock};
//!
//! let store = mutextree::connect("memory://?namespace=guide-try-lock").await?;
//! let region = TreeLock::new(store.clone(), "eu-west")?;
//! let host = TreeLock::new(store, ["eu-west", "rack-12", "host-7"])?;
//!
//! let _region_guard = region.lock().await?;
//! match host.try_lock().await {
//!     Err(Error::Refused { blockers, .. }) => {
//!         let blocker = blockers.first();
//!         assert_eq!(blocker.path.to_string(), "eu-west");
//!         println!("busy: {} holds it for {:?} more", blocker.owner, blocker.remaining);
//!     }
//!     other => panic!("an ancestor is held, so this is refused: {other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! # [`run`](crate::TreeLock::run): work under the lock
//!
//! [`TreeLock::run`](crate::TreeLock::run) acquires as
//! [`lock`](crate::TreeLock::lock) does, runs the work with the grant (its
//! fencing token is for the resource the work changes), releases whatever
//! the work returns, and returns the work's value.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use mutextree::TreeLock;
//!
//! let store = mutextree::connect("memory://?namespace=guide-run").await?;
//! let rack = TreeLock::new(store, "eu-west/rack-12")?;
//! let patched: Result<u32, String> = rack
//!     .run(|grant| async move {
//!         println!("patching with fencing token {}", grant.token);
//!         Ok(12)
//!     })
//!     .await?;
//! assert_eq!(patched, Ok(12));
//! assert!(!rack.is_held(), "released after the work");
//! # Ok(()) }
//! ```
//!
//! # [`shared`](crate::TreeLockBuilder::shared): readers and a writer
//!
//! A Shared lock lets other Shared holders in and keeps every Exclusive
//! one out, on the node, above it and anywhere below it:
//!
//! | held \\ asked, on the same branch | Shared | Exclusive |
//! | --- | --- | --- |
//! | Shared | granted | refused |
//! | Exclusive | refused | refused |
//!
//! Siblings never conflict, whatever their modes. A reader can
//! [`upgrade`](crate::TreeLockGuard::upgrade) to a writer when no one else
//! reads (it never waits: two readers upgrading would wait for each other
//! forever), and a writer can [`downgrade`](crate::TreeLockGuard::downgrade)
//! to let readers in without letting a writer slip in between. Both give
//! the grant a new fencing token.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use mutextree::{Error, TreeLock};
//!
//! let store = mutextree::connect("memory://?namespace=guide-shared").await?;
//! let reader = |name: &str| TreeLock::builder(store.clone(), "tenant-1").shared().owner(name).build();
//! let (a, b) = (reader("report-a")?, reader("report-b")?);
//! let a_reads = a.lock().await?;
//! let mut b_reads = b.lock().await?; // readers share the tenant
//!
//! // A writer anywhere in the tenant waits for both readers.
//! let writer = TreeLock::new(store.clone(), "tenant-1/project-9")?;
//! assert!(matches!(writer.try_lock().await, Err(Error::Refused { .. })));
//!
//! // b cannot upgrade while a reads; it can once a is done.
//! assert!(matches!(b_reads.upgrade().await, Err(Error::Refused { .. })));
//! a_reads.release().await?;
//! b_reads.upgrade().await?;
//! assert!(matches!(a.try_lock().await, Err(Error::Refused { .. })));
//! b_reads.release().await?;
//! writer.lock().await?.release().await?;
//! # Ok(()) }
//! ```
//!
//! # [`many`](crate::TreeLock::many): several paths, all or nothing
//!
//! Moving a VM from one host to another needs both hosts.
//! [`TreeLock::many`](crate::TreeLock::many) (or
//! [`TreeLockBuilder::and`](crate::TreeLockBuilder::and)) asks for up to
//! 16 paths, each with its mode, granted together in one atomic step with
//! one fencing token, or not at all. Nothing is held while waiting, so two
//! movers naming the hosts in opposite orders cannot deadlock. A refusal
//! names a blocker for each path in the way.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use mutextree::{Error, Mode, TreeLock};
//!
//! let store = mutextree::connect("memory://?namespace=guide-many").await?;
//! let source = "dc-1/rack-1/host-3";
//! let target = "dc-1/rack-4/host-8";
//! let mover = TreeLock::many(store.clone(), [(source, Mode::Exclusive), (target, Mode::Exclusive)])?;
//! let back = TreeLock::many(store.clone(), [(target, Mode::Exclusive), (source, Mode::Exclusive)])?;
//!
//! let moving = mover.lock().await?;
//! assert_eq!(moving.grant().items.len(), 2);
//! match back.try_lock().await {
//!     Err(Error::Refused { blockers, .. }) => assert_eq!(blockers.len(), 2, "one blocker per host"),
//!     other => panic!("both hosts are held: {other:?}"),
//! }
//! moving.release().await?; // both hosts at once
//! back.lock().await?.release().await?;
//! # Ok(()) }
//! ```
//!
//! # [`Wait`](crate::Wait): how long to wait
//!
//! A handle's [`Wait`](crate::Wait) is what [`lock`](crate::TreeLock::lock),
//! [`acquire`](crate::TreeLock::acquire) and [`run`](crate::TreeLock::run)
//! use; [`acquire_with`](crate::TreeLock::acquire_with) and
//! [`lock_with`](crate::TreeLock::lock_with) take one per call.
//! [`Wait::No`](crate::Wait::No) refuses at once,
//! [`Wait::For`](crate::Wait::For) gives up with
//! [`Error::Timeout`](crate::Error::Timeout), and
//! [`Wait::Forever`](crate::Wait::Forever) waits until granted.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use std::time::Duration;
//! use mutextree::{Error, TreeLock, Wait};
//!
//! let store = mutextree::connect("memory://?namespace=guide-wait").await?;
//! let _held = TreeLock::new(store.clone(), "db/orders")?.lock().await?;
//!
//! let migration = TreeLock::builder(store, "db")
//!     .wait(Wait::For(Duration::from_millis(50)))
//!     .build()?;
//! assert!(matches!(migration.acquire().await, Err(Error::Timeout { .. })));
//! assert!(matches!(migration.acquire_with(Wait::No).await, Err(Error::Refused { .. })));
//! # Ok(()) }
//! ```
//!
//! While it waits, a handle holds a place in the store's queue
//! ([`Fairness::Fair`](crate::Fairness::Fair), the default): later requests
//! that conflict with it wait behind it, a try included, so a lock on a
//! busy subtree's root is granted as soon as the holders it found are gone.
//! A wait that ends without a grant gives its place up.
//! [`fairness(Fairness::Barging)`](crate::TreeLockBuilder::fairness) waits
//! without a place: more grants per second under contention, and no bound
//! on the wait.
//!
//! # [`Error`](crate::Error): what went wrong, and whether to try again
//!
//! One error type for every store. Bad input (an empty path segment, a zero
//! ttl, an unknown URL) is refused before anything reaches the store;
//! [`Error::is_retryable`](crate::Error::is_retryable) says whether trying
//! again later may succeed, and [`Error::blocker`](crate::Error::blocker)
//! names the lock in the way of a refusal or a timeout.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use mutextree::{Error, TreeLock};
//!
//! let store = mutextree::connect("memory://?namespace=guide-error").await?;
//! let invalid = TreeLock::new(store.clone(), "eu-west//rack-12");
//! assert!(matches!(invalid, Err(Error::InvalidPath { .. })));
//!
//! let _held = TreeLock::new(store.clone(), "eu-west")?.lock().await?;
//! match TreeLock::new(store, "eu-west/rack-12")?.try_acquire().await {
//!     Ok(grant) => println!("granted with token {}", grant.token),
//!     Err(error) if error.is_retryable() => {
//!         let blocker = error.blocker().expect("a refusal names its blocker");
//!         println!("{error}; try again in {:?} at the latest", blocker.remaining);
//!     }
//!     Err(error) => return Err(error),
//! }
//! # Ok(()) }
//! ```
//!
//! # [`TreeLockGuard`](crate::TreeLockGuard): release it, or let it drop
//!
//! [`TreeLockGuard::release`](crate::TreeLockGuard::release) releases and
//! reports the outcome (an [`Error::NotHeld`](crate::Error::NotHeld) means
//! the lock expired or an administrator released it: the work was not
//! protected to its end). Dropping a guard cannot wait for the store: it
//! releases in the background inside a tokio runtime, and the lock expires
//! at its ttl otherwise.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
//! use mutextree::TreeLock;
//!
//! let store = mutextree::connect("memory://?namespace=guide-guard").await?;
//! let rack = TreeLock::new(store, "eu-west/rack-12")?;
//!
//! let guard = rack.lock().await?;
//! println!("fencing token {}", guard.token());
//! guard.release().await?; // the outcome, for certain
//!
//! {
//!     let _guard = rack.lock().await?;
//!     // An early return or a `?` here still releases, in the background.
//! }
//! # Ok(()) }
//! ```
