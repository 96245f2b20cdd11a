//! The handle against the memory store with faults injected on its calls
//! (slow, failed, or lost replies): what the handle believes must never
//! outlive what the store holds, and a release is never reported as a loss
//! (a forced release is, at once).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::{async_trait, Attempt, LockKind, LockRequest};
use mutextree_core::{Error, Grant, HeldLock, LockBackend, LockPath, Mode, Owner, TreeLock, Ttl};
use mutextree_memory::MemoryBackend;
use tokio::time::sleep;

/// The memory store, with faults on refresh and release.
#[derive(Debug, Default)]
struct Faulty {
    inner: MemoryBackend,
    /// Delay (ms) of the next refresh's reply, once, after it was applied.
    slow_refresh_reply_once: AtomicU64,
    /// Delay (ms) of every refresh before it reaches the store.
    refresh_delay: AtomicU64,
    /// Refresh replies are lost after the store applied them.
    lose_refresh_replies: AtomicBool,
    /// Releases fail before reaching the store.
    fail_releases: AtomicBool,
    /// Delay (ms) of every release's reply, after it was applied.
    slow_release_reply: AtomicU64,
    refreshes: AtomicU64,
}

fn millis(counter: &AtomicU64) -> Duration {
    Duration::from_millis(counter.load(SeqCst))
}

#[async_trait]
impl LockBackend for Faulty {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.inner.try_lock_key(request, kind).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        if self.fail_releases.load(SeqCst) {
            return Err(Error::store_message("memory", true, "injected: unreachable"));
        }
        let outcome = self.inner.release(grant).await;
        sleep(millis(&self.slow_release_reply)).await;
        outcome
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        self.refreshes.fetch_add(1, SeqCst);
        sleep(millis(&self.refresh_delay)).await;
        let outcome = self.inner.refresh(grant, ttl).await;
        sleep(Duration::from_millis(self.slow_refresh_reply_once.swap(0, SeqCst))).await;
        if self.lose_refresh_replies.load(SeqCst) {
            return Err(Error::store_message("memory", true, "injected: reply lost"));
        }
        outcome
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.inner.list(under).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        self.inner.try_grant(request).await
    }

    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        self.inner.change_mode(grant, mode).await
    }

    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        self.inner.withdraw(owner, ticket).await
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.inner.waiters(under).await
    }
}

fn lock(store: &Arc<Faulty>, ttl: Duration, auto_refresh: bool) -> TreeLock {
    TreeLock::builder(store.clone(), "x").ttl(ttl).auto_refresh(auto_refresh).build().expect("lock")
}

#[tokio::test(start_paused = true)]
async fn a_stale_guard_cannot_refresh_or_release_a_newer_grant() {
    let store = Arc::new(Faulty::default());
    let first = lock(&store, Duration::from_secs(1), false);
    let second = first.clone();
    let mut stale = first.lock().await.expect("free");
    sleep(Duration::from_secs(2)).await;
    let newer = second.lock().await.expect("the stale grant expired");
    assert!(matches!(stale.refresh().await, Err(Error::NotHeld { .. })));
    drop(stale);
    sleep(Duration::from_millis(1)).await;
    assert!(second.is_held() && second.locked().await.expect("locked"), "the newer grant was released");
    newer.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn a_shortening_refresh_whose_reply_is_lost_shortens_the_local_expiry() {
    let store = Arc::new(Faulty::default());
    let lock = lock(&store, Duration::from_secs(30), false);
    lock.acquire().await.expect("free");
    store.lose_refresh_replies.store(true, SeqCst);
    assert!(lock.refresh_to(Duration::from_millis(100)).await.is_err());
    sleep(Duration::from_secs(1)).await;
    assert!(!lock.locked().await.expect("locked"), "the store applied the shorter ttl");
    assert!(!lock.is_held(), "the handle still believes in the old expiry");
}

#[tokio::test(start_paused = true)]
async fn a_failed_release_in_run_lets_the_lock_expire() {
    let store = Arc::new(Faulty::default());
    let lock = lock(&store, Duration::from_secs(3), true);
    store.fail_releases.store(true, SeqCst);
    assert!(matches!(lock.run(|_| async {}).await, Err(Error::Store { .. })));
    sleep(Duration::from_secs(10)).await;
    let refreshes = store.refreshes.load(SeqCst);
    sleep(Duration::from_secs(10)).await;
    assert_eq!(store.refreshes.load(SeqCst), refreshes, "still refreshing a lock nobody can release");
    assert!(!lock.locked().await.expect("locked"));
    store.fail_releases.store(false, SeqCst);
    lock.run(|_| async {}).await.expect("the next run works");
}

/// A refresh that the store applied but confirms only after the lock's
/// confirmed expiry: the handle cannot count on the lock past that expiry,
/// so it reports the loss then, and not a moment before.
#[tokio::test(start_paused = true)]
async fn an_unconfirmed_refresh_is_a_loss_at_the_confirmed_expiry_not_before() {
    let store = Arc::new(Faulty::default());
    store.refresh_delay.store(1, SeqCst);
    let lock = lock(&store, Duration::from_secs(3), true);
    let grant = lock.acquire().await.expect("free");
    let lost = tokio::spawn(lock.lost());
    sleep(Duration::from_millis(900)).await;
    store.slow_refresh_reply_once.store(2500, SeqCst);
    let refreshing = lock.clone();
    let refresh = tokio::spawn(async move { refreshing.refresh().await });
    tokio::time::sleep_until(grant.expires_at - Duration::from_millis(1)).await;
    assert!(!lost.is_finished(), "a loss was reported before the confirmed expiry");
    tokio::time::sleep_until(grant.expires_at + Duration::from_millis(1)).await;
    assert!(lost.is_finished(), "no loss reported past the confirmed expiry");
    let error = lost.await.expect("task");
    assert!(matches!(error, Error::Lost { .. }), "{error:?}");
    let _ = refresh.await.expect("task");
}

#[tokio::test(start_paused = true)]
async fn a_release_racing_a_refresh_is_not_a_loss() {
    let store = Arc::new(Faulty::default());
    let lock = lock(&store, Duration::from_secs(3), true);
    lock.acquire().await.expect("free");
    let lost = tokio::spawn(lock.lost());
    store.refresh_delay.store(10, SeqCst);
    store.slow_release_reply.store(20, SeqCst);
    sleep(Duration::from_millis(1005)).await; // the keeper's refresh is under way
    lock.release().await.expect("release");
    sleep(Duration::from_secs(5)).await;
    assert!(!lost.is_finished(), "a release was reported as a loss");
}

/// `lost()` follows a mode change: it hears the forced release of the
/// changed grant (its new token), and only of its own grant.
#[tokio::test(start_paused = true)]
async fn a_forced_release_after_a_mode_change_is_heard() {
    let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let ttl = Duration::from_secs(300);
    let lock = TreeLock::builder(store.clone(), "A").ttl(ttl).auto_refresh(true).build().expect("lock");
    let other = TreeLock::builder(store.clone(), "B").ttl(ttl).build().expect("lock");
    lock.try_acquire().await.expect("free");
    let elsewhere = other.try_acquire().await.expect("free");
    let lost = tokio::spawn(lock.lost());
    let changed = lock.downgrade().await.expect("downgraded");
    // On this one-thread runtime the woken `lost` task runs first, and
    // listens for the new token.
    tokio::task::yield_now().await;
    store.revoke(&elsewhere).await.expect("another grant revoked");
    store.revoke(&changed).await.expect("revoked");
    let error = tokio::time::timeout(Duration::from_secs(10), lost).await.expect("heard at once").expect("task");
    assert!(error.to_string().contains("forcibly released"), "{error}");
    assert!(!lock.is_held());
}
