//! What only the memory store promises: its map stays as small as what is
//! held, whatever is released, refused or left to expire.

use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::{Attempt, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::{LockBackend, LockPath, Owner, TreeLock, Ttl, Wait};
use mutextree_memory::{MemoryBackend, MemoryStore};

fn request(path: &str, ttl: Duration) -> LockRequest {
    LockRequest::new(
        LockPath::parse(path).expect("path"),
        Owner::new("test").expect("owner"),
        Ttl::new(ttl).expect("ttl"),
    )
}

#[tokio::test(start_paused = true)]
async fn released_and_refused_locks_leave_no_entries() {
    let store = MemoryBackend::new();
    let long = Duration::from_secs(60);
    let mut grants = Vec::new();
    for host in 0..100 {
        let attempt = store.try_grant(&request(&format!("dc/rack-{}/host-{host}", host % 7), long)).await;
        grants.push(attempt.expect("grant").granted().expect("free"));
    }
    // Refusals at every level take their intentions back.
    for refused in ["dc", "dc/rack-1", "dc/rack-1/host-1"] {
        let attempt = store.try_grant(&request(refused, long)).await.expect("attempt");
        assert!(matches!(attempt, Attempt::Blocked(_)), "{refused}");
    }
    for grant in &grants {
        store.release(grant).await.expect("release");
    }
    store.sweep();
    assert_eq!(store.entries(), 0, "{store:?}");
    store.try_grant(&request("dc", long)).await.expect("grant").granted().expect("everything below was released");
}

#[tokio::test(start_paused = true)]
async fn expired_locks_are_swept_without_being_touched() {
    let store = MemoryBackend::new();
    for host in 0..5_000 {
        let old = request(&format!("old/rack-{}/host-{host}", host % 50), Duration::from_secs(1));
        store.try_grant(&old).await.expect("grant").granted().expect("free");
    }
    assert!(store.entries() > 5_000);
    tokio::time::advance(Duration::from_secs(2)).await;
    // Enough grants elsewhere trigger a sweep of the whole map by themselves.
    let ttl = Duration::from_secs(60);
    for round in 0..10_000 {
        let grant = store.try_grant(&request(&format!("new/{}", round % 10), ttl)).await.expect("grant").granted();
        store.release(&grant.expect("free")).await.expect("release");
    }
    assert!(store.entries() <= 11, "expired locks were left behind: {store:?}");
}

/// `request` for `owner` at `queue`.
fn queued(path: &str, owner: &str, queue: Queue) -> LockRequest {
    let request = request(path, Duration::from_secs(60));
    LockRequest { owner: Owner::new(owner).expect("owner"), ..request }.in_queue(queue)
}

/// The ticket of an attempt that must have queued.
fn ticket(attempt: Attempt) -> u64 {
    match attempt {
        Attempt::Queued { ticket, .. } => ticket,
        other => panic!("the request should have queued, got {other:?}"),
    }
}

/// Reservations leave with their waiters, whichever way the wait ends
/// (granted, withdrawn, lapsed), and the map is empty again after a sweep.
#[tokio::test(start_paused = true)]
async fn reservations_leave_no_entries() {
    let store = MemoryBackend::new();
    let holder = store.try_grant(&queued("dc/rack", "holder", Queue::Try)).await.expect("attempt");
    let holder = holder.granted().expect("free");
    let mut tickets = Vec::new();
    for (waiter, path) in ["dc", "dc/rack/host-1", "dc/rack"].into_iter().enumerate() {
        let attempt = store.try_grant(&queued(path, &format!("w{waiter}"), Queue::Join)).await.expect("attempt");
        tickets.push(ticket(attempt));
    }
    assert_eq!(store.waiters(None).await.expect("waiters").len(), 3);
    store.withdraw(&Owner::new("w1").expect("owner"), tickets[1]).await.expect("withdraw");
    store.release(&holder).await.expect("release");
    let first = store.try_grant(&queued("dc", "w0", Queue::Waiting(tickets[0]))).await.expect("attempt");
    let first = first.granted().expect("the first waiter is next");
    let left = store.waiters(None).await.expect("waiters");
    assert_eq!(left.iter().map(|held| held.token).collect::<Vec<_>>(), [tickets[2]], "{left:?}");
    store.release(&first).await.expect("release");
    // The last waiter dies: its reservation lapses and is swept untouched.
    tokio::time::advance(RESERVATION_TTL + Duration::from_millis(1)).await;
    store.sweep();
    assert_eq!(store.entries(), 0, "{store:?}");
    assert!(store.waiters(None).await.expect("waiters").is_empty());
    let after = store.try_grant(&queued("dc/rack/host-2", "late", Queue::Try)).await.expect("attempt");
    store.release(&after.granted().expect("nothing is in the way")).await.expect("release");
}

/// Lapsed reservations met by a check are purged on the spot, like
/// expired locks, and the sweep that enough tokens trigger takes the rest.
#[tokio::test(start_paused = true)]
async fn lapsed_reservations_are_purged_and_swept() {
    let store = MemoryBackend::new();
    let holder = store.try_grant(&queued("a", "holder", Queue::Try)).await.expect("attempt").granted();
    for waiter in 0..100 {
        let path = format!("a/{}/{waiter}", waiter % 10);
        ticket(store.try_grant(&queued(&path, &format!("w{waiter}"), Queue::Join)).await.expect("attempt"));
    }
    store.release(&holder.expect("free")).await.expect("release");
    tokio::time::advance(RESERVATION_TTL + Duration::from_millis(1)).await;
    let grant = store.try_grant(&queued("a/1", "late", Queue::Try)).await.expect("attempt").granted();
    store.release(&grant.expect("lapsed reservations do not block")).await.expect("release");
    for round in 0..10_000 {
        let grant = store.try_grant(&queued(&format!("b/{}", round % 10), "churn", Queue::Try)).await;
        store.release(&grant.expect("attempt").granted().expect("free")).await.expect("release");
    }
    assert!(store.entries() <= 11, "lapsed reservations were left behind: {store:?}");
}

#[tokio::test(start_paused = true)]
async fn an_expired_descendant_does_not_block_and_is_removed() {
    let store = MemoryBackend::new();
    store.try_grant(&request("a/b/c", Duration::from_secs(1))).await.expect("grant").granted().expect("free");
    tokio::time::advance(Duration::from_secs(2)).await;
    let grant = store.try_grant(&request("a", Duration::from_secs(60))).await.expect("grant").granted();
    store.release(&grant.expect("the expired lock below does not block")).await.expect("release");
    store.sweep();
    assert_eq!(store.entries(), 0);
}

#[tokio::test]
async fn backends_of_one_namespace_share_locks_and_others_do_not() {
    let store = MemoryStore::new();
    let (one, same, other) = (
        store.backend("app").expect("namespace"),
        store.backend("app").expect("namespace"),
        store.backend("other").expect("namespace"),
    );
    let ttl = Duration::from_secs(60);
    one.try_grant(&request("a", ttl)).await.expect("grant").granted().expect("free");
    assert!(same.try_grant(&request("a/b", ttl)).await.expect("attempt").granted().is_none());
    assert!(other.try_grant(&request("a/b", ttl)).await.expect("attempt").granted().is_some());
    assert!(store.backend("{bad}").is_err());
}

/// The memory store, seen through a client without notifications: waiting
/// falls back to the default polling listener.
#[derive(Debug)]
struct Polling {
    inner: MemoryBackend,
    attempts: std::sync::atomic::AtomicUsize,
}

#[mutextree_core::backend::async_trait]
impl LockBackend for Polling {
    async fn try_lock_key(
        &self,
        request: &LockRequest,
        kind: mutextree_core::backend::LockKind,
    ) -> Result<Attempt, mutextree_core::Error> {
        self.inner.try_lock_key(request, kind).await
    }
    async fn release(&self, grant: &mutextree_core::Grant) -> Result<(), mutextree_core::Error> {
        self.inner.release(grant).await
    }
    async fn refresh(
        &self,
        grant: &mutextree_core::Grant,
        ttl: Ttl,
    ) -> Result<mutextree_core::Grant, mutextree_core::Error> {
        self.inner.refresh(grant, ttl).await
    }
    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<mutextree_core::HeldLock>, mutextree_core::Error> {
        self.inner.list(under).await
    }
    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, mutextree_core::Error> {
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.try_grant(request).await
    }
    async fn change_mode(
        &self,
        grant: &mutextree_core::Grant,
        mode: mutextree_core::Mode,
    ) -> Result<Attempt, mutextree_core::Error> {
        self.inner.change_mode(grant, mode).await
    }
    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), mutextree_core::Error> {
        self.inner.withdraw(owner, ticket).await
    }
    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<mutextree_core::HeldLock>, mutextree_core::Error> {
        self.inner.waiters(under).await
    }
}

#[tokio::test(start_paused = true)]
async fn polling_backs_off_to_its_cap() {
    let inner = MemoryBackend::new();
    inner.try_grant(&request("a", Duration::from_secs(60))).await.expect("grant").granted().expect("free");
    let polling = Arc::new(Polling { inner, attempts: Default::default() });
    let backend: Arc<dyn LockBackend> = polling.clone();
    let outcome = mutextree_core::backend::acquire(
        &backend,
        &request("a/b", Duration::from_secs(1)),
        mutextree_core::Wait::For(Duration::from_secs(10)),
    )
    .await;
    assert!(matches!(outcome, Err(mutextree_core::Error::Timeout { .. })), "{outcome:?}");
    let attempts = polling.attempts.load(std::sync::atomic::Ordering::Relaxed);
    // 2 ms doubling to 250 ms (each step jittered to its upper half): about
    // 50 attempts in 10 s; a backoff that never grows makes thousands.
    assert!(attempts < 100, "{attempts} attempts in 10 s");
}

/// Tasks retrying refused attempts in a tight loop on a runtime with two
/// workers leave room for the rest of the runtime: a holder's automatic
/// refresh still runs, so its lock never expires under it. (A memory call
/// never waits, so without spending tokio's budget such a loop would never
/// yield and the refresh would never be polled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_loops_do_not_starve_the_runtime() {
    use futures::FutureExt;
    use mutextree_core::{Error, TreeLock};

    let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let ttl = Duration::from_millis(300);
    let holder = TreeLock::builder(store.clone(), "A").ttl(ttl).auto_refresh(true).build().expect("lock");
    let grant = holder.try_acquire().await.expect("free");
    let lost = holder.lost();
    let spin_until = std::time::Instant::now() + ttl * 5;
    let spinners: Vec<_> = (0..16)
        .map(|spinner| {
            let lock = TreeLock::new(store.clone(), format!("A/{spinner}").as_str()).expect("lock");
            tokio::spawn(async move {
                let mut refusals = 0u64;
                while std::time::Instant::now() < spin_until {
                    match lock.try_acquire().await {
                        Err(Error::Refused { .. }) => refusals += 1,
                        other => panic!("the holder's lock should be in the way, got {other:?}"),
                    }
                }
                refusals
            })
        })
        .collect();
    let mut refusals = 0;
    for spinner in spinners {
        refusals += spinner.await.expect("spinner");
    }
    assert!(refusals > 0);
    assert!(lost.now_or_never().is_none(), "the holder lost its lock while others spun");
    let refreshed = holder.refresh().await.expect("still held after the spinning");
    assert_eq!(refreshed.token, grant.token);
}

/// A mode change replaces the grant's token; the handle follows it: the
/// automatic refresh keeps the new token alive, `lost()` taken before the
/// change still tells of a loss after it, and the old token is dead.
#[tokio::test(start_paused = true)]
async fn the_handle_follows_its_grant_through_mode_changes() {
    use mutextree_core::{Error, Mode, TreeLock};
    let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let ttl = Duration::from_secs(3);
    let reader =
        TreeLock::builder(store.clone(), "tenant/config").shared().ttl(ttl).auto_refresh(true).build().expect("ok");
    let mut guard = reader.lock().await.expect("free");
    let shared = guard.grant().clone();
    let lost = guard.lost();
    let exclusive = guard.upgrade().await.expect("no other reader").clone();
    assert!(exclusive.token > shared.token);
    assert_eq!(exclusive.items.first().mode, Mode::Exclusive);
    assert!(matches!(store.refresh(&shared, Ttl::new(ttl).expect("ttl")).await, Err(Error::NotHeld { .. })));
    // Many ttls later the upgraded grant is still held, kept by the refresh.
    tokio::time::sleep(ttl * 5).await;
    let listed = store.list(None).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].mode, listed[0].token), (Mode::Exclusive, reader.grant().expect("held").token));
    // The downgrade lets a reader in, and the refresh follows again.
    let downgraded = guard.downgrade().await.expect("live").clone();
    assert!(downgraded.token > exclusive.token);
    let other = TreeLock::builder(store.clone(), "tenant").shared().build().expect("ok");
    let other_guard = other.try_lock().await.expect("readers share");
    tokio::time::sleep(ttl * 5).await;
    assert!(reader.is_held());
    // An administrator's release is a loss that `lost()` hears, though it
    // was taken two mode changes ago.
    store.release(&reader.grant().expect("held")).await.expect("forced release");
    let error = tokio::time::timeout(ttl * 2, lost).await.expect("the loss is heard");
    assert!(matches!(error, Error::Lost { .. }), "{error:?}");
    other_guard.release().await.expect("release");
}

/// Shared items of many readers below a node are not looked at by a
/// Shared request above them, and do not linger once released.
#[tokio::test(start_paused = true)]
async fn readers_leave_no_entries_either() {
    use mutextree_core::{LockItems, Mode};
    let store = MemoryBackend::new();
    let ttl = Ttl::new(Duration::from_secs(60)).expect("ttl");
    let owner = Owner::new("reader").expect("owner");
    let mut grants = Vec::new();
    for reader in 0..50 {
        let items = LockItems::new([
            (LockPath::parse(&format!("t/p-{}", reader % 5)).expect("path"), Mode::Shared),
            (LockPath::parse(&format!("u/h-{reader}")).expect("path"), Mode::Exclusive),
        ])
        .expect("items");
        let attempt = store.try_grant(&LockRequest::of(items, owner.clone(), ttl)).await.expect("attempt");
        grants.push(attempt.granted().expect("readers share, hosts differ"));
    }
    let above = LockRequest::of(LockItems::one(LockPath::parse("t").expect("path"), Mode::Shared), owner.clone(), ttl);
    let above = store.try_grant(&above).await.expect("attempt").granted().expect("a reader above readers");
    let writer = LockRequest::new(LockPath::parse("t/p-3/x").expect("path"), owner, ttl);
    match store.try_grant(&writer).await.expect("attempt") {
        Attempt::Blocked(blockers) => assert_eq!(blockers.first().path.to_string(), "t", "{blockers:?}"),
        granted => panic!("a writer under readers: {granted:?}"),
    }
    for grant in grants.iter().chain([&above]) {
        store.release(grant).await.expect("release");
    }
    store.sweep();
    assert_eq!(store.entries(), 0, "{store:?}");
}

/// A handle that waits as long as it takes for `path`, and the event of
/// its first refusal: from then on it is queued.
fn waiting_lock(store: &Arc<dyn LockBackend>, path: &str) -> (TreeLock, Arc<tokio::sync::Notify>) {
    let queued = Arc::new(tokio::sync::Notify::new());
    let lock = TreeLock::builder(store.clone(), path)
        .wait(Wait::Forever)
        .on_wait({
            let queued = queued.clone();
            move |_| queued.notify_one()
        })
        .build()
        .expect("lock");
    (lock, queued)
}

/// A queue drains without idle time: nobody may take a queued waiter's
/// turn, so it must never sleep through it. 16 waiters queued behind one
/// holder are granted one after the other, each releasing at once, with
/// no time passing on the paused clock (a waiter asleep in a backoff step
/// would make the clock jump to its wake-up).
#[tokio::test(start_paused = true)]
async fn a_queue_drains_without_idle_time() {
    let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let holder = TreeLock::new(store.clone(), "A").expect("lock");
    let held = holder.lock().await.expect("free");
    let mut waiters = Vec::new();
    for _ in 0..16 {
        let (lock, queued) = waiting_lock(&store, "A");
        waiters.push(tokio::spawn(async move {
            let guard = lock.lock().await.expect("granted in turn");
            let granted = tokio::time::Instant::now();
            guard.release().await.expect("release");
            granted
        }));
        queued.notified().await;
    }
    let released = tokio::time::Instant::now();
    held.release().await.expect("release");
    for waiter in waiters {
        let granted = waiter.await.expect("a waiter");
        assert_eq!(granted - released, Duration::ZERO, "the queue stood idle");
    }
}

/// A queued waiter woken by releases elsewhere, which do not free it,
/// keeps listening instead of backing off: a backoff step would outlast
/// the release that is its turn, and nobody else may take that turn. On
/// the paused clock no time passes between that release and its grant.
#[tokio::test(start_paused = true)]
async fn a_queued_waiter_woken_in_vain_still_takes_its_turn_at_once() {
    let store: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let holder = TreeLock::new(store.clone(), "A/x").expect("lock");
    let held = holder.lock().await.expect("free");
    let (ancestor, queued) = waiting_lock(&store, "A");
    let waiter = tokio::spawn(async move {
        let guard = ancestor.lock().await.expect("granted in turn");
        let granted = tokio::time::Instant::now();
        guard.release().await.expect("release");
        granted
    });
    queued.notified().await;
    // Releases elsewhere in the namespace wake the waiter, in vain.
    let elsewhere = TreeLock::new(store.clone(), "B").expect("lock");
    for _ in 0..20 {
        elsewhere.lock().await.expect("free").release().await.expect("release");
        tokio::task::yield_now().await;
    }
    let released = tokio::time::Instant::now();
    held.release().await.expect("release");
    let granted = waiter.await.expect("the waiter");
    assert_eq!(granted - released, Duration::ZERO, "the waiter slept through its turn");
}
