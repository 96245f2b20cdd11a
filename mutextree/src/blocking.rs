//! The same handle for programs without an async runtime, like the seed's
//! Python users: every call blocks the calling thread until it is done.
//!
//! Calls run on one small tokio runtime shared by the whole process (one
//! worker thread, started on first use), which also runs automatic refresh.
//! Do not call these from async code: use [`crate::TreeLock`] there.
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use mutextree::{blocking, memory::MemoryBackend, Error, LockBackend};
//!
//! let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
//! let lock = blocking::TreeLock::new(store.clone(), "eu-west/rack-12")?;
//! {
//!     let guard = lock.lock()?;
//!     println!("fencing token {}", guard.token());
//! } // released here, and the release is done when the block ends
//!
//! let host = blocking::TreeLock::new(store, ["eu-west", "rack-12", "host-7"])?;
//! let token = host.run(|grant| grant.token)?;
//! assert!(token > 1);
//! # Ok::<(), Error>(())
//! ```

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mutextree_core::{Error, Grant, IntoLockPath, LockBackend, LockItems, Mode, TreeLockBuilder, Wait};
use tokio::runtime::Runtime;

/// The process's runtime for blocking calls.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mutextree-blocking")
            .enable_all()
            .build()
            .expect("the blocking API's tokio runtime can be built")
    })
}

fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// Connects to the store a URL names (see [`crate::connect`]), on the
/// blocking API's runtime, which then also runs the store's background
/// work (its subscription for wake-ups, reconnection).
pub fn connect(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    block_on(crate::connect(url))
}

/// [`crate::connect_with`]: [`connect`] in the namespace `namespace`,
/// whatever the URL says.
pub fn connect_with(url: &str, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
    block_on(crate::connect_with(url, namespace))
}

/// A blocking [`crate::TreeLock`]: same configuration, same defaults (30 s
/// ttl, a `hostname:pid:random` owner, [`lock`](TreeLock::lock) waits until
/// granted), same errors.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use mutextree::{blocking, memory::MemoryBackend, Error, LockBackend};
///
/// let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
/// let rack = blocking::TreeLock::builder(store, "eu-west/rack-12")
///     .ttl(Duration::from_secs(60))
///     .timeout(Duration::from_secs(5))
///     .owner("patcher-1")
///     .build()?;
/// let guard = rack.lock()?;
/// assert_eq!(guard.grant().owner.as_str(), "patcher-1");
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TreeLock {
    inner: crate::TreeLock,
}

impl TreeLock {
    /// A handle with the defaults.
    pub fn new(backend: Arc<dyn LockBackend>, path: impl IntoLockPath) -> Result<Self, Error> {
        TreeLock::builder(backend, path).build()
    }

    /// Configures a handle: the async handle's builder, building this one
    /// (`.shared()` for a reader, `.and(path, mode)` for more paths).
    pub fn builder(backend: Arc<dyn LockBackend>, path: impl IntoLockPath) -> TreeLockBuilder<TreeLock> {
        TreeLockBuilder::new(backend, path)
    }

    /// A handle on several paths, each with its mode, granted all or
    /// nothing (see [`crate::TreeLock::many`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use mutextree::{blocking, memory::MemoryBackend, Error, LockBackend, Mode};
    ///
    /// let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    /// let hosts = [("dc/rack-1/host-3", Mode::Exclusive), ("dc/rack-4/host-8", Mode::Exclusive)];
    /// let moving = blocking::TreeLock::many(store.clone(), hosts)?;
    /// let guard = moving.lock()?;
    /// assert_eq!(guard.grant().items.len(), 2);
    /// // Nobody locks either host, nor a rack or the datacenter above them.
    /// assert!(blocking::TreeLock::new(store, "dc/rack-4")?.try_lock().is_err());
    /// # Ok::<(), Error>(())
    /// ```
    pub fn many<P: IntoLockPath>(
        backend: Arc<dyn LockBackend>,
        items: impl IntoIterator<Item = (P, Mode)>,
    ) -> Result<Self, Error> {
        TreeLockBuilder::many(backend, items).build()
    }

    /// The locked nodes and their modes, as asked for.
    pub fn items(&self) -> &LockItems {
        self.inner.items()
    }

    /// The async handle underneath.
    pub fn as_async(&self) -> &crate::TreeLock {
        &self.inner
    }

    /// Acquires, waiting as configured (by default until granted).
    pub fn acquire(&self) -> Result<Grant, Error> {
        block_on(self.inner.acquire())
    }

    /// Acquires without waiting for a held lock.
    pub fn try_acquire(&self) -> Result<Grant, Error> {
        block_on(self.inner.try_acquire())
    }

    /// Acquires, waiting up to `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Grant, Error> {
        block_on(self.inner.acquire_timeout(timeout))
    }

    /// Acquires, waiting as `wait` says.
    pub fn acquire_with(&self, wait: Wait) -> Result<Grant, Error> {
        block_on(self.inner.acquire_with(wait))
    }

    /// Releases the held grant.
    pub fn release(&self) -> Result<(), Error> {
        block_on(self.inner.release())
    }

    /// Sets the remaining life to exactly the configured ttl.
    pub fn refresh(&self) -> Result<Grant, Error> {
        block_on(self.inner.refresh())
    }

    /// Sets the remaining life to exactly `ttl`.
    pub fn refresh_to(&self, ttl: Duration) -> Result<Grant, Error> {
        block_on(self.inner.refresh_to(ttl))
    }

    /// Upgrades the held grant's Shared items to Exclusive, without
    /// waiting (see [`crate::TreeLock::upgrade`]).
    pub fn upgrade(&self) -> Result<Grant, Error> {
        block_on(self.inner.upgrade())
    }

    /// Downgrades the held grant's Exclusive items to Shared (see
    /// [`crate::TreeLock::downgrade`]).
    pub fn downgrade(&self) -> Result<Grant, Error> {
        block_on(self.inner.downgrade())
    }

    /// Whether anyone holds a live lock on exactly this path.
    pub fn locked(&self) -> Result<bool, Error> {
        block_on(self.inner.locked())
    }

    /// Whether this handle believes it holds its lock. Asks nothing.
    pub fn is_held(&self) -> bool {
        self.inner.is_held()
    }

    /// Returns once the work this handle left in the background is done
    /// (see [`crate::TreeLock::settled`]).
    pub fn settled(&self) {
        block_on(self.inner.settled())
    }

    /// Acquires (waiting as configured) and returns a guard that releases
    /// when dropped, before the drop returns.
    pub fn lock(&self) -> Result<TreeLockGuard, Error> {
        block_on(self.inner.lock()).map(|guard| TreeLockGuard { guard: Some(guard) })
    }

    /// [`lock`](TreeLock::lock) without waiting for a held lock.
    pub fn try_lock(&self) -> Result<TreeLockGuard, Error> {
        block_on(self.inner.try_lock()).map(|guard| TreeLockGuard { guard: Some(guard) })
    }

    /// [`lock`](TreeLock::lock), waiting as `wait` says.
    pub fn lock_with(&self, wait: Wait) -> Result<TreeLockGuard, Error> {
        block_on(self.inner.lock_with(wait)).map(|guard| TreeLockGuard { guard: Some(guard) })
    }

    /// Runs `work` under the lock and releases it whatever the outcome (the
    /// seed's decorator); see [`crate::TreeLock::run`].
    pub fn run<T>(&self, work: impl FnOnce(Grant) -> T) -> Result<T, Error> {
        let guard = self.lock()?;
        let value = work(guard.grant().clone());
        guard.release()?;
        Ok(value)
    }
}

impl From<crate::TreeLock> for TreeLock {
    /// The blocking face of a configured async handle (for the builder's
    /// options: `TreeLock::builder(..).ttl(..).build()?.into()`).
    fn from(inner: crate::TreeLock) -> Self {
        TreeLock { inner }
    }
}

/// Holds a lock until [`release`](TreeLockGuard::release) or drop; drop
/// releases before it returns (errors are discarded: call `release` to see
/// them). A panic inside the guarded code releases on unwinding.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct TreeLockGuard {
    guard: Option<crate::TreeLockGuard>,
}

impl TreeLockGuard {
    fn inner(&self) -> &crate::TreeLockGuard {
        self.guard.as_ref().expect("a guard holds its grant until released")
    }

    /// The grant, with its fencing token.
    pub fn grant(&self) -> &Grant {
        self.inner().grant()
    }

    /// The fencing token to hand to the protected resource.
    pub fn token(&self) -> u64 {
        self.inner().token()
    }

    /// Upgrades this guard's grant to Exclusive, without waiting (see
    /// [`crate::TreeLock::upgrade`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use mutextree::{blocking, memory::MemoryBackend, Error, LockBackend};
    ///
    /// let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    /// let config = blocking::TreeLock::builder(store, "tenant-1/config").shared().build()?;
    /// let mut guard = config.lock()?;
    /// let read_under = guard.token();
    /// guard.upgrade()?; // no other reader: now a writer, with a newer token
    /// assert!(guard.token() > read_under);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn upgrade(&mut self) -> Result<&Grant, Error> {
        let guard = self.guard.as_mut().expect("a guard holds its grant until released");
        block_on(guard.upgrade())
    }

    /// Downgrades this guard's grant to Shared (see
    /// [`crate::TreeLock::downgrade`]).
    pub fn downgrade(&mut self) -> Result<&Grant, Error> {
        let guard = self.guard.as_mut().expect("a guard holds its grant until released");
        block_on(guard.downgrade())
    }

    /// Releases this guard's grant and reports the outcome.
    pub fn release(mut self) -> Result<(), Error> {
        match self.guard.take() {
            Some(guard) => block_on(guard.release()),
            None => Ok(()),
        }
    }
}

impl Drop for TreeLockGuard {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            let _ = block_on(guard.release());
        }
    }
}
