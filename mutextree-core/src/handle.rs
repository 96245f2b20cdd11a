//! The handle a user holds: [`TreeLock`], its guard and its closure wrapper.
//!
//! It mirrors the seed's `TreeLock(backend, nodes, expire=30, holder_id=None,
//! timeout=0)`, itself modelled on Python's `threading.Lock`:
//!
//! | seed | here |
//! | --- | --- |
//! | `TreeLock(backend, nodes, expire, id, timeout)` | [`TreeLock::builder`]`(backend, path).ttl(..).owner(..).timeout(..).build()` |
//! | `acquire()` | [`TreeLock::acquire`] (waits as configured), [`TreeLock::try_acquire`], [`TreeLock::acquire_timeout`] |
//! | `release()` | [`TreeLock::release`] |
//! | `refresh(expire=None)` | [`TreeLock::refresh`], [`TreeLock::refresh_to`] |
//! | `with lock:` | [`TreeLock::lock`] (or [`try_lock`](TreeLock::try_lock), [`lock_with`](TreeLock::lock_with)) returning a [`TreeLockGuard`] |
//! | `@tree_lock(...)` | [`TreeLock::run`] |
//!
//! Beyond the seed, a handle can hold its path in [`Mode::Shared`]
//! ([`TreeLockBuilder::shared`]: readers that coexist, and keep writers off
//! the whole subtree), several paths at once, all or nothing
//! ([`TreeLock::many`], [`TreeLockBuilder::and`]), and change a held
//! grant's mode ([`TreeLock::upgrade`], [`TreeLock::downgrade`]).
//!
//! ```
//! # use std::sync::Arc;
//! # use mutextree_core::{Error, LockBackend, Mode, TreeLock};
//! # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
//! // Many readers of a tenant's configuration at once...
//! let reader = TreeLock::builder(store.clone(), "tenant-1").shared().build()?;
//! let reading = reader.lock().await?;
//! // ...keep a writer off the tenant and everything under it.
//! let writer = TreeLock::new(store.clone(), "tenant-1/project-9")?;
//! assert!(matches!(writer.try_lock().await, Err(Error::Refused { .. })));
//! reading.release().await?;
//!
//! // Moving a VM: both hosts, all or nothing, one fencing token.
//! let both = TreeLock::many(store, [("dc/rack-1/host-3", Mode::Exclusive), ("dc/rack-4/host-8", Mode::Exclusive)])?;
//! both.run(|grant| async move { println!("moving under token {}", grant.token) }).await?;
//! # Ok(()) }
//! ```
//!
//! # Defaults
//!
//! A 30 s ttl ([`DEFAULT_TTL`]) as the seed had; an owner id that says
//! where the lock is held, `hostname:pid:random` ([`Owner::random`]); and
//! waiting as a mutex waits: [`TreeLock::lock`] and [`TreeLock::acquire`]
//! wait up to the handle's timeout, which by default is no limit
//! ([`Wait::Forever`]), while [`TreeLock::try_lock`] and
//! [`TreeLock::try_acquire`] never wait (the seed's `timeout=0`).
//! Automatic refresh is off.
//!
//! # Cancellation
//!
//! Every future here may be dropped at any await point (in a
//! `tokio::select!`, under `tokio::time::timeout`) without leaving a live
//! grant behind: an attempt already sent is finished in the background and
//! a grant it brings back is released there (see [`Acquisition`]).
//! [`TreeLock::settled`] resolves once that work is done.
//!
//! # Drop in async Rust
//!
//! `Drop` cannot await, so dropping a [`TreeLockGuard`] cannot release the
//! lock and report the outcome. What it does: it forgets the grant at once
//! (the handle no longer believes it holds the lock) and, when dropped
//! inside a tokio runtime, spawns the release as a background task (tried
//! up to [`Background::RELEASE_TRIES`] times; [`TreeLock::settled`] awaits
//! it) whose error is discarded. Outside a runtime, or if the runtime shuts
//! down first, or if the store stays unreachable, the lock stays until its
//! ttl runs out. Call [`TreeLockGuard::release`] to release for certain and
//! see the error.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::backend::{AbortOnDrop, LockBackend};
use crate::error::Error;
use crate::lock::{Attempt, Fairness, Grant, HeldLock, LockItems, LockRequest, Mode, Owner, Ttl};
use crate::path::LockPath;
use crate::telemetry::{self, Instruments, LostReason};
use crate::wait::{Acquisition, Background, OnWait, Wait};

/// Why [`TreeLock::lost`] reports a grant revoked ([`LockBackend::revoke`]).
const FORCIBLY_RELEASED: &str = "it was forcibly released";

/// The seed's default ttl: 30 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Anything that names a lock path: a [`LockPath`], its text form (`"A/B/D"`)
/// or its segments (`["A", "B", "D"]`, a `Vec` or a slice of strings).
pub trait IntoLockPath {
    /// Validates and converts.
    fn into_lock_path(self) -> Result<LockPath, Error>;
}

impl IntoLockPath for LockPath {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        Ok(self)
    }
}

impl IntoLockPath for &LockPath {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        Ok(self.clone())
    }
}

impl IntoLockPath for &str {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        LockPath::parse(self)
    }
}

impl IntoLockPath for &String {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        LockPath::parse(self)
    }
}

impl<S: Into<String>, const N: usize> IntoLockPath for [S; N] {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        LockPath::new(self)
    }
}

impl<S: Into<String>> IntoLockPath for Vec<S> {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        LockPath::new(self)
    }
}

impl<S: Into<String> + Clone> IntoLockPath for &[S] {
    fn into_lock_path(self) -> Result<LockPath, Error> {
        LockPath::new(self.iter().cloned())
    }
}

/// Configures a [`TreeLock`] (or a handle made from one, such as the
/// facade's blocking handle: `H`); nothing is checked or sent until
/// [`build`](TreeLockBuilder::build).
#[must_use = "a builder does nothing until build() is called"]
pub struct TreeLockBuilder<H = TreeLock> {
    backend: Arc<dyn LockBackend>,
    /// The paths and modes asked for; the first is the builder's own path.
    items: Vec<(Result<LockPath, Error>, Mode)>,
    ttl: Duration,
    owner: Option<String>,
    wait: Wait,
    fairness: Option<Fairness>,
    auto_refresh: bool,
    on_wait: Option<OnWait>,
    handle: PhantomData<fn() -> H>,
}

impl<H> fmt::Debug for TreeLockBuilder<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeLockBuilder")
            .field("backend", &self.backend)
            .field("items", &self.items)
            .field("ttl", &self.ttl)
            .field("owner", &self.owner)
            .field("wait", &self.wait)
            .field("auto_refresh", &self.auto_refresh)
            .field("on_wait", &self.on_wait.is_some())
            .finish()
    }
}

impl<H: From<TreeLock>> TreeLockBuilder<H> {
    /// A builder with the defaults (see the [module docs](self#defaults)).
    pub fn new(backend: Arc<dyn LockBackend>, path: impl IntoLockPath) -> Self {
        Self::many(backend, [(path, Mode::Exclusive)])
    }

    /// A builder for several paths, each with its mode, granted all or
    /// nothing with one token (see [`TreeLock::many`]).
    pub fn many<P: IntoLockPath>(backend: Arc<dyn LockBackend>, items: impl IntoIterator<Item = (P, Mode)>) -> Self {
        TreeLockBuilder {
            backend,
            items: items.into_iter().map(|(path, mode)| (path.into_lock_path(), mode)).collect(),
            ttl: DEFAULT_TTL,
            owner: None,
            wait: Wait::default(),
            fairness: None,
            auto_refresh: false,
            on_wait: None,
            handle: PhantomData,
        }
    }

    /// Locks the builder's path in `mode` (default [`Mode::Exclusive`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        if let Some((_, first)) = self.items.first_mut() {
            *first = mode;
        }
        self
    }

    /// Locks the builder's path in [`Mode::Shared`]: other Shared holders
    /// of comparable paths may hold at the same time, Exclusive ones may
    /// not, anywhere in the subtree or above it.
    pub fn shared(self) -> Self {
        self.mode(Mode::Shared)
    }

    /// Locks `path` in `mode` too, in the same grant: all or nothing, one
    /// fencing token, released, refreshed and lost together.
    pub fn and(mut self, path: impl IntoLockPath, mode: Mode) -> Self {
        self.items.push((path.into_lock_path(), mode));
        self
    }

    /// How long the lock lives unless refreshed or released (default 30 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The owner id (default: `hostname:pid:random`, see [`Owner::random`]).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// How long [`TreeLock::acquire`] and [`TreeLock::lock`] wait for a held
    /// lock (default: no limit).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.wait = Wait::For(timeout);
        self
    }

    /// How [`TreeLock::acquire`] waits, in full.
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Whether a wait queues behind earlier waiters ([`Fairness::Fair`]) or
    /// barges (default: the store's, which is fair unless its
    /// configuration says otherwise).
    pub fn fairness(mut self, fairness: Fairness) -> Self {
        self.fairness = Some(fairness);
        self
    }

    /// Refresh the lock in the background while it is held, every third of
    /// its ttl; [`TreeLock::lost`] tells when that fails (default: off).
    pub fn auto_refresh(mut self, on: bool) -> Self {
        self.auto_refresh = on;
        self
    }

    /// Calls `on_wait` each time an acquisition is refused and is about to
    /// wait behind a lock, with that lock (its path, owner and remaining
    /// life): for a progress line, or a log of who waited behind whom.
    pub fn on_wait(mut self, on_wait: impl Fn(&HeldLock) + Send + Sync + 'static) -> Self {
        self.on_wait = Some(Arc::new(on_wait));
        self
    }

    /// Checks the paths (see [`LockItems::new`]), ttl and owner id and
    /// makes the handle.
    pub fn build(self) -> Result<H, Error> {
        let mut items = Vec::with_capacity(self.items.len());
        for (path, mode) in self.items {
            items.push((path?, mode));
        }
        let items = LockItems::new(items)?;
        let ttl = Ttl::new(self.ttl)?;
        let owner = match self.owner {
            Some(owner) => Owner::new(owner)?,
            None => Owner::random(),
        };
        Ok(TreeLock {
            shared: Arc::new(Shared {
                backend: self.backend,
                request: LockRequest::of(items, owner, ttl),
                wait: self.wait,
                fairness: self.fairness,
                auto_refresh: self.auto_refresh,
                on_wait: self.on_wait,
                background: Background::default(),
                refreshing: tokio::sync::Mutex::new(()),
                instruments: Instruments::default(),
                state: Watched::new(State::default()),
            }),
        }
        .into())
    }
}

/// A lock on one node of the tree (and so its whole subtree), like the
/// seed's `TreeLock`, or on several at once. See the [module docs](self)
/// for the defaults.
///
/// Clones share one state: a grant taken through one clone is released
/// through any. A handle holds at most one grant at a time.
///
/// ```
/// # use std::{sync::Arc, time::Duration};
/// # use mutextree_core::{Error, LockBackend, TreeLock, Wait};
/// # async fn demo(backend: Arc<dyn LockBackend>) -> Result<(), Error> {
/// let lock = TreeLock::builder(backend, ["eu-west", "rack-12", "host-7"])
///     .ttl(Duration::from_secs(60))
///     .timeout(Duration::from_secs(5))
///     .build()?;
/// let grant = lock.acquire().await?;
/// println!("fencing token {}", grant.token);
/// lock.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TreeLock {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn LockBackend>,
    request: LockRequest,
    wait: Wait,
    fairness: Option<Fairness>,
    auto_refresh: bool,
    on_wait: Option<OnWait>,
    /// Releases and attempts left to finish after their caller moved on.
    background: Background,
    /// Serialises refreshes (explicit ones and the keeper's), so that their
    /// replies are installed in the order the store applied them.
    refreshing: tokio::sync::Mutex<()>,
    /// The metrics this handle reports into.
    instruments: Instruments,
    /// What the handle believes, in one place, followed by
    /// [`TreeLock::lost`]. Never borrowed across an `.await`.
    state: Watched<State>,
}

/// A value that tasks can follow, as through a `watch` channel, but whose
/// changes cost a mutex and no more while nobody follows: a lock handle
/// changes its state at every grant and release, and a `watch` channel
/// wakes eight wait lists (eight more mutexes) at every change, whether
/// anyone waits or not: a quarter of a fast store's handle.
struct Watched<T> {
    value: std::sync::Mutex<T>,
    /// Ticks at each change while anyone follows.
    changes: watch::Sender<()>,
}

impl<T> Watched<T> {
    fn new(value: T) -> Self {
        Watched { value: std::sync::Mutex::new(value), changes: watch::Sender::new(()) }
    }

    /// The value, locked. No code panics while holding it; if one did, the
    /// value is still what its last change left.
    fn borrow(&self) -> std::sync::MutexGuard<'_, T> {
        self.value.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the value with `modify`, which says whether it changed it;
    /// followers hear of a change. Whether it changed.
    fn send_if_modified(&self, modify: impl FnOnce(&mut T) -> bool) -> bool {
        let mut value = self.borrow();
        let modified = modify(&mut value);
        // Asked under the lock: a follower subscribes before it reads the
        // value, so it either reads this change or is counted here.
        if modified && self.changes.receiver_count() > 0 {
            self.changes.send_replace(());
        }
        modified
    }

    /// Follows the changes from now on: read the value after subscribing,
    /// and again after each tick.
    fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }
}

/// The grant a handle holds, or the one it just lost and why.
#[derive(Debug, Default)]
struct State {
    /// With the expiry the handle believes in (never later than the
    /// store's).
    grant: Option<Grant>,
    /// Why `grant` was lost, in words; `None` while it is held.
    lost: Option<String>,
    /// When the hold of `grant`'s acquisition began (its granting request
    /// was sent; a mode change keeps it), if anything can see how long
    /// holds take, until the end of its hold was reported ([`Shared::report_end`]):
    /// each hold is reported once, by whoever sees its end first.
    granted_at: Option<Instant>,
    /// The automatic refresh of `grant`, while it is held.
    keeper: Option<AbortOnDrop>,
    /// Which acquisition `grant` comes from: a mode change replaces the
    /// grant (new token) but not the acquisition, and [`TreeLock::lost`]
    /// follows the acquisition.
    acquisition: u64,
}

impl State {
    /// The grant with `token`, if it is the one held (lost or not).
    fn is(&self, token: u64) -> bool {
        self.grant.as_ref().is_some_and(|grant| grant.token == token)
    }

    /// The grant held, if not lost and not expired by the local clock.
    fn held(&self) -> Option<&Grant> {
        self.grant.as_ref().filter(|grant| self.lost.is_none() && !grant.is_expired())
    }
}

impl Shared {
    /// Changes the state if it is still about the held (not lost) grant
    /// with `token`; whether it was.
    fn update(&self, token: u64, change: impl FnOnce(&mut State)) -> bool {
        self.state.send_if_modified(|state| {
            let ours = state.is(token) && state.lost.is_none();
            if ours {
                change(state);
            }
            ours
        })
    }

    /// The grant the handle holds unless it was lost, even if its
    /// believed expiry has passed (the store may still have it).
    fn current(&self) -> Option<Grant> {
        let state = self.state.borrow();
        state.grant.clone().filter(|_| state.lost.is_none())
    }

    /// [`Shared::current`], if it is the grant with `token`.
    fn grant_with(&self, token: u64) -> Option<Grant> {
        self.current().filter(|grant| grant.token == token)
    }

    /// Installs a new grant, unless another live one is held (a clone of
    /// the handle won a race); whether it was installed.
    fn install(self: &Arc<Self>, grant: &Grant) -> bool {
        self.state.send_if_modified(|state| {
            if state.held().is_some() {
                return false;
            }
            *state = State {
                grant: Some(grant.clone()),
                lost: None,
                granted_at: telemetry::hold_started(grant),
                keeper: self.auto_refresh.then(|| keep_refreshed(self, grant)),
                acquisition: state.acquisition + 1,
            };
            true
        })
    }

    /// Forgets the grant with `token`, returning it: its hold ended,
    /// released, or found no longer held (`lost` says why).
    fn forget(&self, token: u64, lost: Option<(LostReason, &str)>) -> Option<Grant> {
        let mut forgotten = None;
        self.update(token, |state| {
            let acquisition = state.acquisition;
            let ended = std::mem::take(state);
            state.acquisition = acquisition;
            let mut ended = ended;
            self.report_end(&mut ended, lost);
            forgotten = ended.grant;
        });
        forgotten
    }

    /// Reports the end of the hold of `state`'s grant, released or lost
    /// (`lost` says why), unless it was reported already.
    fn report_end(&self, state: &mut State, lost: Option<(LostReason, &str)>) {
        let (Some(grant), Some(granted_at)) = (&state.grant, state.granted_at.take()) else { return };
        let held = granted_at.elapsed();
        let backend = self.backend.as_ref();
        match lost {
            Some((reason, detail)) => telemetry::lost(backend, grant, reason, detail, held),
            None => telemetry::released(backend, &self.instruments, &grant.items, held),
        }
    }

    /// What a grant the store no longer has was lost to, judged by the
    /// local clock: its expiry, or else `otherwise` (a refresh refused,
    /// someone else's release).
    fn gone(grant: &Grant, otherwise: LostReason) -> LostReason {
        if grant.is_expired() {
            LostReason::Expired
        } else {
            otherwise
        }
    }

    /// Replaces the grant with `token` by `changed`, the same acquisition
    /// in another mode under a new token; its automatic refresh follows.
    fn replace(self: &Arc<Self>, token: u64, changed: &Grant) {
        self.update(token, |state| {
            state.grant = Some(changed.clone());
            if state.keeper.is_some() {
                state.keeper = Some(keep_refreshed(self, changed));
            }
        });
    }

    /// Marks the grant with `token` lost, for `reason` (`detail` in
    /// words).
    fn mark_lost(&self, token: u64, reason: LostReason, detail: String) {
        self.update(token, |state| {
            self.report_end(state, Some((reason, &detail)));
            state.lost = Some(detail);
            state.keeper = None;
        });
    }

    /// Reports the hold of the grant with `token` lost for `reason` if its
    /// expiry has passed by the local clock and nobody reported its end
    /// yet. The grant is not marked lost: the store may still have it
    /// (its clock is the one that counts), and a release is still sent.
    fn report_expiry(&self, token: u64, reason: LostReason, detail: &str) {
        self.state.send_if_modified(|state| {
            if state.is(token) && state.lost.is_none() && state.grant.as_ref().is_some_and(Grant::is_expired) {
                self.report_end(state, Some((reason, detail)));
            }
            // Only the report changed: nobody needs to hear of it.
            false
        });
    }

    /// Stops the automatic refresh of the grant with `token`; whether one
    /// was running.
    fn stop_keeper(&self, token: u64) -> bool {
        let mut stopped = false;
        self.update(token, |state| stopped = state.keeper.take().is_some());
        stopped
    }

    fn restart_keeper(self: &Arc<Self>, token: u64) {
        self.update(token, |state| {
            if let Some(grant) = &state.grant {
                state.keeper = Some(keep_refreshed(self, grant));
            }
        });
    }

    /// Lowers the believed expiry of the grant with `token` to `at`, if
    /// later.
    fn shorten_expiry(&self, token: u64, at: Instant) {
        self.state.send_if_modified(|state| match state.grant.as_mut() {
            Some(grant) if grant.token == token && state.lost.is_none() && grant.expires_at > at => {
                grant.expires_at = at;
                true
            }
            _ => false,
        });
    }

    /// Sends a refresh and installs its reply; the caller holds
    /// `refreshing`, so replies are installed in the order sent.
    ///
    /// Before sending, the believed expiry is lowered to what the new ttl
    /// would give if the store applied it now: if the reply is lost, or
    /// this future is dropped, the handle must not go on believing in the
    /// old, longer expiry.
    async fn refresh_in_order(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        self.shorten_expiry(grant.token, Instant::now() + ttl.get());
        let backend = self.backend.as_ref();
        let refreshed = telemetry::on_grant("refresh", backend, grant, backend.refresh(grant, ttl)).await?;
        telemetry::refreshed(backend, grant.remaining());
        self.update(refreshed.token, |state| state.grant = Some(refreshed.clone()));
        Ok(refreshed)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeLock")
            .field("backend", &self.backend)
            .field("request", &self.request)
            .field("wait", &self.wait)
            .field("auto_refresh", &self.auto_refresh)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl TreeLock {
    /// A handle with the defaults (see the [module docs](self#defaults)).
    pub fn new(backend: Arc<dyn LockBackend>, path: impl IntoLockPath) -> Result<TreeLock, Error> {
        TreeLock::builder(backend, path).build()
    }

    /// Configures a handle.
    pub fn builder(backend: Arc<dyn LockBackend>, path: impl IntoLockPath) -> TreeLockBuilder {
        TreeLockBuilder::new(backend, path)
    }

    /// A handle on several paths, each with its mode, granted all or
    /// nothing with one fencing token; with the defaults otherwise.
    ///
    /// The items are normalised ([`LockItems::new`]): duplicates merge to
    /// the stronger mode, items of one mode on one branch collapse to the
    /// ancestor, and items of different modes on one branch are refused
    /// with [`Error::InvalidRequest`]. Nothing is held while waiting, so
    /// no two handles can deadlock, whatever order they name their paths
    /// in.
    pub fn many<P: IntoLockPath>(
        backend: Arc<dyn LockBackend>,
        items: impl IntoIterator<Item = (P, Mode)>,
    ) -> Result<TreeLock, Error> {
        TreeLockBuilder::many(backend, items).build()
    }

    /// The locked node (the first in key order, for a handle on several).
    pub fn path(&self) -> &LockPath {
        self.shared.request.path()
    }

    /// The locked nodes and their modes, as asked for (a held grant's
    /// modes may differ after [`upgrade`](TreeLock::upgrade) or
    /// [`downgrade`](TreeLock::downgrade): see [`Grant::items`]).
    pub fn items(&self) -> &LockItems {
        &self.shared.request.items
    }

    /// The owner id grants are made for.
    pub fn owner(&self) -> &Owner {
        &self.shared.request.owner
    }

    /// The ttl of each grant and refresh.
    pub fn ttl(&self) -> Duration {
        self.shared.request.ttl.get()
    }

    /// The store.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.shared.backend
    }

    /// Acquires, waiting as configured (by default until granted).
    pub async fn acquire(&self) -> Result<Grant, Error> {
        self.acquire_with(self.shared.wait).await
    }

    /// Acquires without waiting for a held lock: [`Error::Refused`] names it.
    pub async fn try_acquire(&self) -> Result<Grant, Error> {
        self.acquire_with(Wait::No).await
    }

    /// Acquires, waiting up to `timeout`: [`Error::Timeout`] names the last
    /// lock in the way.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Grant, Error> {
        self.acquire_with(Wait::For(timeout)).await
    }

    /// Acquires, waiting as `wait` says.
    ///
    /// Cancel safe: dropping the future leaves nothing held. An attempt in
    /// flight is finished in the background and a late grant released
    /// there ([`settled`](TreeLock::settled) tells when); only a reply lost
    /// to a fault leaves a grant, which expires at its ttl. A timed wait
    /// starts no attempt past its deadline, but sees one in flight through
    /// to its reply, and returns the grant it brings.
    pub async fn acquire_with(&self, wait: Wait) -> Result<Grant, Error> {
        self.ensure_not_held()?;
        let mut acquisition = Acquisition::new(&self.shared.backend, &self.shared.request, wait);
        if let Some(fairness) = self.shared.fairness {
            acquisition = acquisition.fairness(fairness);
        }
        let grant = acquisition
            .in_background(&self.shared.background)
            .on_wait(self.shared.on_wait.clone())
            .reporting_to(&self.shared.instruments)
            .run()
            .await?;
        if !self.shared.install(&grant) {
            // Another acquisition through a clone of this handle won the race.
            self.shared.background.release(&self.shared.backend, grant);
            return Err(Error::AlreadyHeld { items: self.items().clone() });
        }
        Ok(grant)
    }

    /// Releases the grant this handle holds. [`Error::NotHeld`] if it holds
    /// none, or if the store no longer has it (expired, or released by an
    /// administrator); the handle forgets it then.
    ///
    /// The handle forgets the grant only once the store has answered: if the
    /// store cannot be reached, or the call is cancelled, the handle still
    /// holds it (and keeps refreshing it, with automatic refresh), so the
    /// release can be tried again.
    pub async fn release(&self) -> Result<(), Error> {
        let grant = self.shared.current().ok_or_else(|| self.not_held())?;
        self.release_grant(&grant).await
    }

    async fn release_grant(&self, grant: &Grant) -> Result<(), Error> {
        // Stop refreshing first: a refresh racing the release would find the
        // lock gone and report a loss that is only the release.
        let stopped_keeper = self.shared.stop_keeper(grant.token);
        let backend = self.shared.backend.as_ref();
        let outcome = telemetry::on_grant("release", backend, grant, backend.release(grant)).await;
        match &outcome {
            Ok(()) => {
                self.shared.forget(grant.token, None);
            }
            Err(error @ Error::NotHeld { .. }) => {
                let reason = Shared::gone(grant, LostReason::ForcedRelease);
                self.shared.forget(grant.token, Some((reason, &error.to_string())));
            }
            Err(_) if stopped_keeper => self.shared.restart_keeper(grant.token),
            Err(_) => {}
        }
        outcome
    }

    /// Sets the remaining life of the held lock to exactly the configured
    /// ttl (the seed's `refresh()`).
    pub async fn refresh(&self) -> Result<Grant, Error> {
        self.refresh_to(self.ttl()).await
    }

    /// Sets the remaining life of the held lock to exactly `ttl` (the seed's
    /// `refresh(expire)`); later refreshes go back to the configured ttl.
    pub async fn refresh_to(&self, ttl: Duration) -> Result<Grant, Error> {
        let ttl = Ttl::new(ttl)?;
        let token = self.grant().ok_or_else(|| self.not_held())?.token;
        self.refresh_grant(token, ttl).await
    }

    /// Refreshes the grant with this token, if it is still the one held.
    async fn refresh_grant(&self, token: u64, ttl: Ttl) -> Result<Grant, Error> {
        let _in_order = self.shared.refreshing.lock().await;
        let grant = self.grant().filter(|g| g.token == token).ok_or_else(|| self.not_held())?;
        match self.shared.refresh_in_order(&grant, ttl).await {
            Err(error @ Error::NotHeld { .. }) => {
                let reason = Shared::gone(&grant, LostReason::RefreshRefused);
                self.shared.forget(grant.token, Some((reason, &error.to_string())));
                Err(error)
            }
            other => other,
        }
    }

    /// Upgrades the held grant's Shared items to Exclusive, in one atomic
    /// step with a new fencing token (the expiry stays). Never waits: if
    /// another live item conflicts (another reader, say), it fails with
    /// [`Error::Refused`] naming it and the grant stays as it was. Of two
    /// readers upgrading at once, at most one succeeds.
    ///
    /// [`Error::InvalidRequest`] if every item is Exclusive already;
    /// [`Error::NotHeld`] if nothing is held.
    pub async fn upgrade(&self) -> Result<Grant, Error> {
        self.change_mode(Mode::Exclusive).await
    }

    /// Downgrades the held grant's Exclusive items to Shared, in one atomic
    /// step with a new fencing token: readers may join at once, no writer
    /// can slip in between. Succeeds while the grant is live, unless a
    /// stepwise client shares the namespace and is halfway through a lock
    /// above it: then [`Error::Refused`] for that moment (see
    /// [`LockBackend::change_mode`]).
    ///
    /// [`Error::InvalidRequest`] if every item is Shared already;
    /// [`Error::NotHeld`] if nothing is held.
    pub async fn downgrade(&self) -> Result<Grant, Error> {
        self.change_mode(Mode::Shared).await
    }

    /// Changes the held grant's items to `mode`. The call runs as a task
    /// of its own and installs its reply there, so cancelling this future
    /// does not leave the handle behind the store (holding a token the
    /// store replaced).
    async fn change_mode(&self, mode: Mode) -> Result<Grant, Error> {
        let held = self.grant().ok_or_else(|| self.not_held())?;
        if !held.items.iter().any(|item| item.mode != mode) {
            return Err(Error::InvalidRequest { reason: format!("{} is held {mode} already", held.items) });
        }
        let shared = Arc::clone(&self.shared);
        let change = tokio::spawn(async move {
            // In order with refreshes: a refresh of the old token sent
            // after the change would find it gone and report a loss.
            let _in_order = shared.refreshing.lock().await;
            let grant = shared.grant_with(held.token).ok_or_else(|| Error::not_held(&held))?;
            match shared.backend.change_mode(&grant, mode).await {
                Ok(Attempt::Granted(changed)) => {
                    shared.replace(grant.token, &changed);
                    Ok(changed)
                }
                Ok(Attempt::Blocked(blockers) | Attempt::Queued { blockers, .. }) => {
                    Err(Error::Refused { items: grant.items.with_mode(mode), blockers })
                }
                Err(error @ Error::NotHeld { .. }) => {
                    let reason = Shared::gone(&grant, LostReason::RefreshRefused);
                    shared.forget(grant.token, Some((reason, &error.to_string())));
                    Err(error)
                }
                Err(error) => Err(error),
            }
        });
        change
            .await
            .map_err(|failed| Error::store_message("handle", false, format!("a mode change failed: {failed}")))?
    }

    /// Whether anyone (this handle included) holds a live lock on exactly
    /// this path (on one of them, for a handle on several), as
    /// `threading.Lock.locked()`. Asks the store.
    pub async fn locked(&self) -> Result<bool, Error> {
        for item in self.items() {
            let held = self.shared.backend.list(Some(&item.path)).await?;
            if held.iter().any(|lock| lock.path == item.path) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The grant this handle holds, if it believes it holds one (its local
    /// expiry has not passed). Asks nothing.
    pub fn grant(&self) -> Option<Grant> {
        self.shared.state.borrow().held().cloned()
    }

    /// Whether this handle believes it holds its lock. Asks nothing.
    pub fn is_held(&self) -> bool {
        self.grant().is_some()
    }

    /// Resolves once the work this handle left in the background is done:
    /// the releases of dropped guards, and the attempts of dropped
    /// acquisitions with the release of whatever they were granted. Await
    /// it before a program exits, so that nothing it dropped stays locked
    /// until its ttl.
    pub async fn settled(&self) {
        self.shared.background.settled().await
    }

    /// Acquires (waiting as configured: by default until granted) and
    /// returns a guard that releases on
    /// [`release`](TreeLockGuard::release) or, in the background, on drop.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use mutextree_core::{Error, LockBackend, TreeLock};
    /// # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
    /// let rack = TreeLock::new(store, "eu-west/rack-12")?;
    /// let guard = rack.lock().await?; // waits while anyone holds the rack, a host in it or the region
    /// println!("fencing token {}", guard.token());
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn lock(&self) -> Result<TreeLockGuard, Error> {
        self.lock_with(self.shared.wait).await
    }

    /// [`lock`](TreeLock::lock) without waiting for a held lock: a held
    /// lock is [`Error::Refused`], which names it.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use mutextree_core::{Error, LockBackend, TreeLock};
    /// # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
    /// let host = TreeLock::new(store, ["eu-west", "rack-12", "host-7"])?;
    /// match host.try_lock().await {
    ///     Ok(guard) => guard.release().await?,
    ///     Err(Error::Refused { blockers, .. }) => println!("busy: {}", blockers.first()),
    ///     Err(other) => return Err(other),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_lock(&self) -> Result<TreeLockGuard, Error> {
        self.lock_with(Wait::No).await
    }

    /// [`lock`](TreeLock::lock), waiting as `wait` says.
    pub async fn lock_with(&self, wait: Wait) -> Result<TreeLockGuard, Error> {
        let grant = self.acquire_with(wait).await?;
        Ok(TreeLockGuard { lock: self.clone(), grant, released: false })
    }

    /// Runs `work` under the lock (the seed's `@tree_lock` decorator):
    /// acquires as configured, runs `work` with the grant (for its fencing
    /// token), releases whatever the outcome, and returns `work`'s value.
    ///
    /// If the release fails (the lock expired while `work` ran), the error is
    /// returned instead of the value: the work was not protected to its end.
    /// With automatic refresh on, losing the lock stops `work` at its next
    /// await point (the future is dropped) and returns [`Error::Lost`]. If
    /// `work` panics, the guard's drop releases the lock in the background.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use mutextree_core::{Error, LockBackend, TreeLock};
    /// # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
    /// let host = TreeLock::new(store, ["eu-west", "rack-12", "host-7"])?;
    /// let report = host.run(|grant| async move { format!("patched under token {}", grant.token) }).await?;
    /// # let _ = report; Ok(()) }
    /// ```
    pub async fn run<F, Fut, T>(&self, work: F) -> Result<T, Error>
    where
        F: FnOnce(Grant) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock().await?;
        let work = work(guard.grant().clone());
        let value = if self.shared.auto_refresh {
            let lost = self.lost();
            tokio::select! {
                value = work => value,
                error = lost => return Err(error),
            }
        } else {
            work.await
        };
        guard.release().await?;
        Ok(value)
    }

    /// Resolves with [`Error::Lost`] when the grant held now is lost: with
    /// automatic refresh, when a refresh is refused, or when no refresh was
    /// confirmed before the lock's expiry (the store is unreachable or does
    /// not answer); without, when its ttl runs out. Either way, as soon as
    /// it is released by force ([`LockBackend::revoke`]) on a store that
    /// announces that: this future listens for it from this call on, and
    /// the handle then counts the grant lost (its automatic refresh stops).
    /// Follows refreshes.
    /// Resolves at once if nothing is held; never resolves once the grant is
    /// released (or replaced by a new one).
    ///
    /// The future owns what it needs: keep it beside the work it guards, as
    /// in `tokio::select!`.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let items = self.items().clone();
        let mut changes = self.shared.state.subscribe();
        // The acquisition held when `lost()` is called, not when it is
        // first polled; it is followed through mode changes.
        let held = {
            let now = self.shared.state.borrow();
            now.grant.as_ref().map(|grant| (now.acquisition, grant.token, self.shared.backend.listen_revocation(grant)))
        };
        let auto_refresh = self.shared.auto_refresh;
        let (backend, shared) = (Arc::clone(&self.shared.backend), Arc::downgrade(&self.shared));
        async move {
            let Some((acquisition, mut heard, mut revocation)) = held else {
                return Error::Lost { items, reason: "it is not held".into() };
            };
            // Released, replaced by a newer grant, or the handle is gone:
            // nothing was lost, and this never resolves.
            let never = std::future::pending::<Error>;
            loop {
                changes.borrow_and_update();
                let Some(following) = shared.upgrade() else { return never().await };
                let ours = {
                    let now = following.state.borrow();
                    now.grant
                        .as_ref()
                        .filter(|_| now.acquisition == acquisition)
                        .map(|grant| (grant.items.clone(), grant.token, grant.expires_at, now.lost.clone()))
                };
                let Some((items, token, expires_at, lost)) = ours else { return never().await };
                if let Some(reason) = lost {
                    return Error::Lost { items, reason };
                }
                // A mode change replaced the grant: listen for the new token.
                if let Some(grant) = following.state.borrow().grant.as_ref().filter(|grant| grant.token != heard) {
                    (heard, revocation) = (grant.token, backend.listen_revocation(grant));
                }
                drop(following);
                tokio::select! {
                    () = revocation.revoked() => {
                        if let Some(shared) = shared.upgrade() {
                            shared.mark_lost(heard, LostReason::ForcedRelease, FORCIBLY_RELEASED.to_owned());
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return never().await;
                        }
                    }
                    () = sleep_until(expires_at) => {
                        let (reason, detail) = if auto_refresh {
                            (
                                LostReason::StoreUnreachable,
                                "no refresh was confirmed before its ttl ran out (the store did not answer in time)",
                            )
                        } else {
                            (LostReason::Expired, "its ttl ran out without a refresh")
                        };
                        if let Some(shared) = shared.upgrade() {
                            shared.report_expiry(token, reason, detail);
                        }
                        return Error::Lost { items, reason: detail.to_owned() };
                    }
                }
            }
        }
    }

    fn ensure_not_held(&self) -> Result<(), Error> {
        let mut held = false;
        self.shared.state.send_if_modified(|state| {
            held = state.held().is_some();
            // Forget an expired or lost grant: a new one replaces it. One
            // that expired unnoticed (no automatic refresh) is reported
            // lost now; a lost one was reported when it was marked.
            let stale = !held && state.grant.is_some();
            if stale {
                self.shared.report_end(state, Some((LostReason::Expired, "its ttl ran out without a refresh")));
                *state = State { acquisition: state.acquisition, ..State::default() };
            }
            stale
        });
        if held {
            return Err(Error::AlreadyHeld { items: self.items().clone() });
        }
        Ok(())
    }

    fn not_held(&self) -> Error {
        Error::NotHeld { items: self.items().clone(), owner: None, token: None }
    }
}

/// Refreshes when a third of the ttl has passed; each refresh must be
/// confirmed before the grant's expiry (as held now, whoever refreshed it
/// last). On a refusal, or when no refresh is confirmed in time, reports
/// the loss and stops. Stops quietly when the grant is released.
fn keep_refreshed(shared: &Arc<Shared>, grant: &Grant) -> AbortOnDrop {
    let shared: Weak<Shared> = Arc::downgrade(shared);
    let token = grant.token;
    let mut next_at = grant.expires_at - grant.ttl * 2 / 3;
    let task = tokio::spawn(async move {
        let (reason, detail) = loop {
            sleep_until(next_at).await;
            let Some(shared) = shared.upgrade() else { return };
            let Some(deadline) = shared.grant_with(token).map(|g| g.expires_at) else { return };
            let attempt = timeout_at(deadline, async {
                let _in_order = shared.refreshing.lock().await;
                let current = shared.grant_with(token)?;
                let outcome = shared.refresh_in_order(&current, shared.request.ttl).await;
                Some((current, outcome))
            });
            match attempt.await {
                Err(_) => {
                    break (
                        LostReason::StoreUnreachable,
                        "the store did not answer a refresh before the lock expired".to_owned(),
                    )
                }
                Ok(None) => return,
                Ok(Some((_, Ok(refreshed)))) => next_at = refreshed.expires_at - refreshed.ttl * 2 / 3,
                Ok(Some((_, Err(error @ Error::NotHeld { .. })))) => {
                    break (LostReason::RefreshRefused, format!("the store refused a refresh: {error}"))
                }
                Ok(Some((current, Err(error)))) if current.is_expired() => {
                    let detail = format!("the store stayed unreachable until the lock expired: {error}");
                    break (LostReason::StoreUnreachable, detail);
                }
                // Retry soon, but not in a tight loop, and once more at
                // the expiry at the latest.
                Ok(Some((current, Err(_)))) => {
                    next_at = Instant::now() + (current.ttl / 10).min(Duration::from_secs(1)).min(current.remaining())
                }
            }
        };
        if let Some(shared) = shared.upgrade() {
            shared.mark_lost(token, reason, detail);
        }
    });
    AbortOnDrop::new(task)
}

/// Holds a lock until [`release`](TreeLockGuard::release) or drop. See the
/// [module docs](self#drop-in-async-rust) for what drop can do.
///
/// ```
/// # use std::sync::Arc;
/// # use mutextree_core::{Error, LockBackend, TreeLock};
/// # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
/// let rack = TreeLock::new(store, "eu-west/rack-12")?;
/// {
///     let guard = rack.lock().await?;
///     // Hand the fencing token to the resource, so it can turn away a
///     // holder that lost the lock without knowing it.
///     let _token = guard.token();
/// } // dropped: released in the background
/// rack.settled().await; // the release is done
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct TreeLockGuard {
    lock: TreeLock,
    grant: Grant,
    released: bool,
}

impl TreeLockGuard {
    /// The grant, with its fencing token.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// The fencing token to hand to the protected resource.
    pub fn token(&self) -> u64 {
        self.grant.token
    }

    /// The handle this guard came from.
    pub fn lock(&self) -> &TreeLock {
        &self.lock
    }

    /// Sets the remaining life of this guard's grant to exactly the
    /// handle's ttl; [`Error::NotHeld`] if that grant is no longer held.
    pub async fn refresh(&mut self) -> Result<&Grant, Error> {
        self.grant = self.lock.refresh_grant(self.grant.token, self.lock.shared.request.ttl).await?;
        Ok(&self.grant)
    }

    /// [`TreeLock::upgrade`] for this guard's grant; the guard follows
    /// the new token.
    pub async fn upgrade(&mut self) -> Result<&Grant, Error> {
        self.change_mode(Mode::Exclusive).await
    }

    /// [`TreeLock::downgrade`] for this guard's grant; the guard follows
    /// the new token.
    pub async fn downgrade(&mut self) -> Result<&Grant, Error> {
        self.change_mode(Mode::Shared).await
    }

    async fn change_mode(&mut self, mode: Mode) -> Result<&Grant, Error> {
        if self.lock.grant().is_none_or(|held| held.token != self.grant.token) {
            return Err(Error::not_held(&self.grant));
        }
        self.grant = self.lock.change_mode(mode).await?;
        Ok(&self.grant)
    }

    /// See [`TreeLock::lost`].
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        self.lock.lost()
    }

    /// Releases the lock and reports the outcome. If the store could not be
    /// reached, or this future is dropped before it answers, the guard's drop
    /// forgets the grant (no more refreshes) and retries the release in the
    /// background; the lock expires at its ttl at the latest.
    pub async fn release(mut self) -> Result<(), Error> {
        let outcome = self.lock.release_grant(&self.grant).await;
        self.released = matches!(outcome, Ok(()) | Err(Error::NotHeld { .. }));
        outcome
    }
}

impl Drop for TreeLockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Some(grant) = self.lock.shared.forget(self.grant.token, None) else { return };
        self.lock.shared.background.release(self.lock.backend(), grant);
    }
}
