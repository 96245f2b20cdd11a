//! How stores tell waiters that something changed: a [`ChangeFeed`] per
//! namespace and process, and a [`Listener`] per waiter.
//!
//! Stores publish changes (a release, a purged expired lock) into their
//! feed, however many waiters there are. A store whose notification channel
//! is down marks the feed not live, and its listeners poll with jittered
//! backoff until it is back (and retry at once when it is): a lost
//! notification costs latency, never progress.
//!
//! A feed also tells its store whether anyone waits
//! ([`ChangeFeed::wanted`], [`ChangeFeed::still_wanted`]), so that a store
//! whose notifications cost every writer something (Redis publishes each
//! release to every subscribed connection) can keep its channel up only
//! while a waiter needs it. An acquisition that does not wait never asks.
//!
//! A holder hears of a forced release of its grant the same way, through
//! a [`Revocations`] feed per namespace and process and a
//! [`RevocationListener`] per held grant: without it, the holder would
//! learn of the loss only at its next refresh (a third of its ttl later,
//! with automatic refresh), working unprotected meanwhile. Revocations are
//! rare, so a store may always send them; but it subscribes to them only
//! while a holder listens, and a missed one costs latency only (the next
//! refresh still finds the grant gone).
//!
//! Wake-ups know nothing of locks: the waiting loop
//! ([`super::Acquisition`]) decides what one means. A revocation names its
//! grant's owner and token, so that only that grant's holder reacts.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};

use crate::lock::{Grant, Owner};
use tokio::time::sleep;

/// Where a store publishes the changes its waiters care about.
///
/// Cheap to clone; all clones are one feed.
#[derive(Clone, Debug)]
pub struct ChangeFeed {
    state: watch::Sender<FeedState>,
    demand: Arc<Demand>,
}

/// Who waits on a feed, or listens for revocations (see
/// [`ChangeFeed::wanted`]).
#[derive(Debug, Default)]
struct Demand {
    /// Listeners inside [`Listener::changed`] right now (or revocation
    /// listeners alive).
    waiting: AtomicUsize,
    /// Whether a listener waited since [`Demand::still_wanted`] last asked
    /// (set when one starts and when one stops waiting).
    waited: AtomicBool,
    /// Wakes [`Demand::wanted`].
    arrived: Notify,
}

impl Demand {
    /// Counts a waiter until the returned guard is dropped.
    fn enter(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.waited.store(true, Ordering::SeqCst);
        self.arrived.notify_one();
        Waiting(Arc::clone(self))
    }

    async fn wanted(&self) {
        while self.waiting.load(Ordering::SeqCst) == 0 {
            self.arrived.notified().await;
        }
    }

    fn still_wanted(&self) -> bool {
        self.waited.swap(false, Ordering::SeqCst) || self.waiting.load(Ordering::SeqCst) > 0
    }
}

/// One waiter counted by a [`Demand`].
#[derive(Debug)]
struct Waiting(Arc<Demand>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waited.store(true, Ordering::SeqCst);
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug)]
struct FeedState {
    /// Bumped by every change.
    changes: u64,
    /// Whether notifications are arriving; listeners poll while not.
    live: bool,
}

impl ChangeFeed {
    /// A live feed.
    pub fn new() -> Self {
        ChangeFeed { state: watch::Sender::new(FeedState { changes: 0, live: true }), demand: Arc::default() }
    }

    /// Wakes every listener: something was released or removed.
    pub fn notify(&self) {
        // No receivers, no work: keeps the uncontended path free of a shared write.
        if self.state.receiver_count() > 0 {
            self.state.send_modify(|state| state.changes = state.changes.wrapping_add(1));
        }
    }

    /// Marks the feed live or not (a store's subscription connection went
    /// down or came back). Either way listeners wake and retry once.
    /// A change is a DEBUG event (target `mutextree`) in the span the
    /// store runs its channel in.
    pub fn set_live(&self, live: bool) {
        self.state.send_modify(|state| {
            if state.live != live {
                tracing::debug!(target: "mutextree", live, "change notifications {}", if live { "up" } else { "down" });
            }
            state.live = live;
            state.changes = state.changes.wrapping_add(1);
        });
    }

    /// A listener that wakes on the changes published after this call.
    pub fn listen(&self) -> Listener {
        Listener { feed: Some(self.state.subscribe()), demand: Some(self.demand.clone()), backoff: Backoff::new() }
    }

    /// Resolves as soon as a listener waits for a change (at once if one
    /// waits already): the moment a store that keeps its notification
    /// channel up only on demand should bring it up. Listeners poll
    /// meanwhile, and retry as soon as the feed is marked live.
    pub async fn wanted(&self) {
        self.demand.wanted().await
    }

    /// Whether a listener waits now or waited since the last call: false
    /// means the store may take its notification channel down (marking the
    /// feed not live) until [`ChangeFeed::wanted`] resolves again.
    pub fn still_wanted(&self) -> bool {
        self.demand.still_wanted()
    }
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed::new()
    }
}

/// Wakes a waiter when something may have changed. See the module docs.
#[derive(Debug)]
pub struct Listener {
    feed: Option<watch::Receiver<FeedState>>,
    demand: Option<Arc<Demand>>,
    backoff: Backoff,
}

impl Listener {
    /// A listener for a store without notifications: every wait is one step
    /// of a jittered exponential backoff.
    pub fn polling() -> Self {
        Listener { feed: None, demand: None, backoff: Backoff::new() }
    }

    /// Whether this listener hears a store's notifications right now
    /// (instead of polling).
    pub fn is_notified(&self) -> bool {
        self.feed.as_ref().is_some_and(|feed| feed.borrow().live)
    }

    /// Resolves at the next change published since the last call (or since
    /// the listener was made), or after a backoff step when the store sends
    /// no notifications (sooner if its feed comes back meanwhile).
    pub async fn changed(&mut self) {
        let _waiting = self.demand.as_ref().map(Demand::enter);
        if let Some(feed) = &mut self.feed {
            let closed = if feed.borrow().live {
                feed.changed().await.is_err()
            } else {
                feed.borrow_and_update();
                let step = self.backoff.next_delay();
                tokio::select! {
                    // Marked live again (or gone): the caller retries now.
                    back = feed.changed() => back.is_err(),
                    () = sleep(step) => false,
                }
            };
            if !closed {
                return;
            }
            // The store is gone: nothing will ever be sent again.
            self.feed = None;
        }
        sleep(self.backoff.next_delay()).await;
    }

    /// Sleeps one backoff step, each longer than the last (up to 250 ms),
    /// whatever the store publishes meanwhile: for a waiter that was woken
    /// but found the same lock in its way, so that changes which do not
    /// concern it (or its own stepwise attempts' releases) cannot make it
    /// spin.
    pub async fn pause(&mut self) {
        sleep(self.backoff.next_delay()).await;
    }

    /// Starts the backoff over: the waiter made progress.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }
}

/// A forced release as its store announces it: the grant's owner and
/// token, so that only the holder of exactly that grant reacts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The owner the grant was made for.
    pub owner: Owner,
    /// The grant's fencing token (unique in its namespace).
    pub token: u64,
}

impl Revocation {
    /// The revocation of `grant`.
    pub fn of(grant: &Grant) -> Self {
        Revocation { owner: grant.owner.clone(), token: grant.token }
    }

    /// The text a store sends on its channel: the token, a space, the
    /// owner (an owner id may hold spaces, the token none).
    pub fn to_message(&self) -> String {
        format!("{} {}", self.token, self.owner.as_str())
    }

    /// Reads [`Revocation::to_message`]'s text; `None` for anything else.
    pub fn from_message(message: &str) -> Option<Self> {
        let (token, owner) = message.split_once(' ')?;
        Some(Revocation { owner: Owner::new(owner).ok()?, token: token.parse().ok()? })
    }
}

/// Where a store announces the revocations it hears, to the holders in
/// this process ([`RevocationListener`]s), per namespace and process like
/// a [`ChangeFeed`].
///
/// It tells its store whether anyone listens ([`Revocations::wanted`],
/// [`Revocations::still_wanted`]: a listener counts for as long as it
/// lives), so that the store subscribes only while a holder wants to hear,
/// and whether the store's channel is up ([`Revocations::set_live`]), so
/// that a caller can wait until a revocation would be heard. A revocation
/// announced while the channel is down is missed: its holder learns of the
/// loss at its next refresh, as it would without this.
///
/// Cheap to clone; all clones are one feed.
#[derive(Clone, Debug)]
pub struct Revocations {
    announced: broadcast::Sender<Revocation>,
    live: watch::Sender<bool>,
    demand: Arc<Demand>,
}

impl Revocations {
    /// How many revocations a listener that has not looked yet may fall
    /// behind before it misses some (and learns of its own loss at its
    /// next refresh instead).
    const BACKLOG: usize = 64;

    /// A feed whose channel is live (a store in this process needs none).
    pub fn new() -> Self {
        Revocations {
            announced: broadcast::Sender::new(Self::BACKLOG),
            live: watch::Sender::new(true),
            demand: Arc::default(),
        }
    }

    /// A feed whose store is not subscribed yet: a network store's, which
    /// subscribes once a holder listens and marks it live then.
    pub fn not_live() -> Self {
        let revocations = Revocations::new();
        revocations.set_live(false);
        revocations
    }

    /// Tells the listeners of this process: `revocation` was forced.
    pub fn announce(&self, revocation: Revocation) {
        // No listener, nobody to tell.
        let _ = self.announced.send(revocation);
    }

    /// Marks the store's channel up or down.
    /// A change is a DEBUG event (target `mutextree`) in the span the
    /// store runs its channel in.
    pub fn set_live(&self, live: bool) {
        if self.live.send_replace(live) != live {
            tracing::debug!(target: "mutextree", live, "revocation notices {}", if live { "up" } else { "down" });
        }
    }

    /// A listener for the revocation of `grant`, announced from now on.
    pub fn listen(&self, grant: &Grant) -> RevocationListener {
        RevocationListener {
            heard: Some(Heard {
                announced: self.announced.subscribe(),
                live: self.live.subscribe(),
                revocation: Revocation::of(grant),
                _listening: self.demand.enter(),
            }),
        }
    }

    /// Resolves as soon as a listener exists (at once if one does): the
    /// moment a store that subscribes only on demand should subscribe.
    pub async fn wanted(&self) {
        self.demand.wanted().await
    }

    /// Whether a listener exists now or existed since the last call: false
    /// means the store may unsubscribe (marking the feed not live) until
    /// [`Revocations::wanted`] resolves again.
    pub fn still_wanted(&self) -> bool {
        self.demand.still_wanted()
    }
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::new()
    }
}

/// Hears the revocation of one grant, for its holder. See [`Revocations`].
#[derive(Debug)]
pub struct RevocationListener {
    /// `None` for a store that announces no revocations.
    heard: Option<Heard>,
}

#[derive(Debug)]
struct Heard {
    announced: broadcast::Receiver<Revocation>,
    live: watch::Receiver<bool>,
    revocation: Revocation,
    /// Keeps the store's subscription wanted while this listener lives.
    _listening: Waiting,
}

impl RevocationListener {
    /// The listener of a store that announces no revocations: it never
    /// hears one.
    pub fn unannounced() -> Self {
        RevocationListener { heard: None }
    }

    /// Resolves when the store announces the revocation of this grant;
    /// never if it does not (released by its holder, expired, a store
    /// without announcements, or the announcement missed).
    pub async fn revoked(&mut self) {
        let Some(heard) = &mut self.heard else { return std::future::pending().await };
        loop {
            match heard.announced.recv().await {
                Ok(revocation) if revocation == heard.revocation => return,
                // Another grant's, or fallen behind: this one may be
                // missed, which costs latency only.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
            }
        }
    }

    /// Resolves once the store's channel is up, so that a revocation
    /// announced from then on is heard; at once for a store that announces
    /// none (there is nothing to wait for).
    pub async fn ready(&mut self) {
        if let Some(heard) = &mut self.heard {
            // The feed gone (its store dropped): nothing will come.
            let _ = heard.live.wait_for(|live| *live).await;
        }
    }
}

/// Jittered exponential backoff: 2 ms doubling to 250 ms, each step a random
/// point in its upper half so that waiters do not retry in lockstep.
#[derive(Debug, Clone)]
struct Backoff {
    step: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(2);
    const LAST: Duration = Duration::from_millis(250);

    fn new() -> Self {
        Backoff { step: Self::FIRST }
    }

    fn reset(&mut self) {
        self.step = Self::FIRST;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(Self::LAST);
        step / 2 + step.mul_f64(fastrand::f64()) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_listener_hears_changes_made_before_it_waits() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        assert!(listener.is_notified());
        feed.notify();
        let started = Instant::now();
        listener.changed().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_that_is_down_falls_back_to_polling() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        feed.set_live(false);
        listener.changed().await; // the state change itself
        assert!(!listener.is_notified());
        let started = Instant::now();
        listener.changed().await;
        let waited = started.elapsed();
        assert!(waited >= Backoff::FIRST / 2 && waited <= Backoff::LAST, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_polling_listener_retries_as_soon_as_the_feed_is_back() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        feed.set_live(false);
        listener.changed().await; // the state change itself
        for _ in 0..6 {
            listener.changed().await; // backoff steps, up to 64 ms and more
        }
        let back = {
            let feed = feed.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                feed.set_live(true);
            })
        };
        let started = Instant::now();
        listener.changed().await;
        assert_eq!(started.elapsed(), Duration::from_millis(10), "woken by the feed, not by the backoff");
        assert!(listener.is_notified());
        back.await.expect("the feed came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_is_wanted_only_while_listeners_wait() {
        let feed = ChangeFeed::new();
        let mut listener = feed.listen();
        assert!(!feed.still_wanted(), "listening is not waiting: a try never asks for the channel");
        let wanted = tokio::spawn({
            let feed = feed.clone();
            async move { feed.wanted().await }
        });
        tokio::task::yield_now().await;
        assert!(!wanted.is_finished());

        let waiter = tokio::spawn(async move {
            listener.changed().await;
            listener
        });
        wanted.await.expect("wanted once a listener waits");
        assert!(feed.still_wanted());
        assert!(feed.still_wanted(), "still wanted while the listener waits");
        feed.notify();
        let listener = waiter.await.expect("woken by the change");
        assert!(feed.still_wanted(), "it waited since the last question");
        assert!(!feed.still_wanted(), "nobody waited since");
        tokio::time::timeout(Duration::from_secs(1), feed.wanted()).await.expect_err("nobody waits");
        drop(listener);
    }

    fn grant(owner: &str, token: u64) -> Grant {
        let path = crate::LockPath::parse("A/B").expect("path");
        let request = crate::lock::LockRequest::new(
            path,
            Owner::new(owner).expect("owner"),
            crate::Ttl::new(Duration::from_secs(30)).expect("ttl"),
        );
        Grant::new(&request, crate::lock::LockKind::Lock, token, Duration::from_secs(30), Instant::now())
    }

    #[test]
    fn a_revocation_reads_back_from_its_message() {
        let revocation = Revocation::of(&grant("web 1 \"quoted\"", 42));
        assert_eq!(revocation.to_message(), "42 web 1 \"quoted\"");
        assert_eq!(Revocation::from_message(&revocation.to_message()), Some(revocation));
        for foreign in ["", "42", "x owner", "42 ", "-1 owner"] {
            assert_eq!(Revocation::from_message(foreign), None, "{foreign:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_holder_of_the_revoked_grant_hears_it() {
        let revocations = Revocations::new();
        let mut ours = revocations.listen(&grant("web-1", 7));
        let mut same_owner = revocations.listen(&grant("web-1", 8));
        let mut same_token = revocations.listen(&grant("web-2", 7));
        ours.ready().await;
        revocations.announce(Revocation::of(&grant("web-1", 7)));
        ours.revoked().await;
        let others = async {
            tokio::join!(same_owner.revoked(), same_token.revoked());
        };
        tokio::time::timeout(Duration::from_secs(60), others).await.expect_err("only the holder reacts");
        let mut unannounced = RevocationListener::unannounced();
        unannounced.ready().await;
        tokio::time::timeout(Duration::from_secs(60), unannounced.revoked()).await.expect_err("never heard");
    }

    #[tokio::test(start_paused = true)]
    async fn revocations_are_wanted_while_a_listener_lives() {
        let revocations = Revocations::not_live();
        assert!(!revocations.still_wanted());
        let mut listener = revocations.listen(&grant("web-1", 7));
        revocations.wanted().await;
        let ready = tokio::spawn(async move {
            listener.ready().await;
            listener
        });
        tokio::task::yield_now().await;
        assert!(!ready.is_finished(), "ready before the store subscribed");
        revocations.set_live(true);
        let listener = ready.await.expect("ready once live");
        assert!(revocations.still_wanted());
        drop(listener);
        assert!(revocations.still_wanted(), "it lived since the last question");
        assert!(!revocations.still_wanted(), "nobody listens");
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(1) && delays[0] <= Duration::from_millis(2));
        assert!(delays.iter().all(|d| *d <= Backoff::LAST));
        assert!(delays[11] >= Backoff::LAST / 2);
    }
}
