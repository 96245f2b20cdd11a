//! The change feed: one etcd watch per backend on its namespace's prefix,
//! fanned out to the waiters whose paths a change concerns. It needs only
//! the members (to open the watch) and the layout (to read a key's node),
//! which the backend passes in when its first waiter listens.
//!
//! Waiters listen on a [`ChangeFeed`] per set of paths they wait for (the
//! items of one request); this task turns every delete event under the
//! prefix (a release, a lease that expired or was revoked, the old key of a
//! mode change) into one notification of the feeds with a path that is the
//! deleted node, one of its ancestors or one of its descendants: a delete
//! elsewhere in the namespace cannot unblock them, and waking them would
//! only cost a transaction each. The server filters out puts: a new or
//! refreshed lock never unblocks anyone.
//!
//! The watch starts on the first `listen`, so a backend that never waits
//! opens no stream. Until the server confirms it (and whenever the stream
//! breaks, e.g. its member died) the feeds are marked not live and
//! listeners poll; once a new stream is confirmed they are live again and
//! every listener wakes to retry, which also covers any delete missed while
//! it was down. No start revision is needed: a missed event costs a retry,
//! never a lost wake-up.
//!
//! A feed is kept while its paths are listened to; once there are
//! [`MAX_FEEDS`] of them, those not listened to for [`FORGET_AFTER`] are
//! dropped (a waiter that still holds one then wakes only at its blocker's
//! expiry).
//!
//! Holders hear of forced releases through a second watch stream (on the
//! same connection), on the revocations' space alone (see the layout
//! module), open only while a holder listens ([`Revocations::wanted`]):
//! each put there is one revocation, announced to the backend's holders.
//! Its [`Revocations`] are live from the server's confirmation of the
//! watch until the stream ends; a revocation put meanwhile is missed, and
//! its holder finds the grant gone at its next refresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{EventType, WatchClient, WatchFilterType, WatchOptions};
use mutextree_core::backend::{ChangeFeed, Listener, Revocation, Revocations};
use tokio::time::{sleep, Instant};

use crate::layout::Layout;
use crate::members::Members;

/// First pause before re-opening a broken watch; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);
const MAX_FEEDS: usize = 10_000;
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How often the revocations' watch checks that a holder still listens.
const STILL_WANTED_EVERY: Duration = Duration::from_secs(5);

/// The feeds of one backend's waiters, by the keys of the paths they wait
/// for.
#[derive(Default)]
pub(crate) struct Feeds {
    state: Mutex<FeedsState>,
}

#[derive(Default)]
struct FeedsState {
    /// Whether the watch is confirmed and running.
    live: bool,
    by_paths: HashMap<Vec<String>, Waited>,
}

struct Waited {
    feed: ChangeFeed,
    listened_at: Instant,
}

impl Feeds {
    /// A listener for changes that may unblock a request for `path_keys`
    /// ([`LockPath::key`](mutextree_core::LockPath::key)s).
    pub(crate) fn listen(&self, path_keys: Vec<String>) -> Listener {
        let mut state = self.locked();
        let now = Instant::now();
        if state.by_paths.len() >= MAX_FEEDS {
            state.by_paths.retain(|_, waited| now.saturating_duration_since(waited.listened_at) < FORGET_AFTER);
        }
        let live = state.live;
        let waited = state.by_paths.entry(path_keys).or_insert_with(|| {
            let feed = ChangeFeed::new();
            feed.set_live(live);
            Waited { feed, listened_at: now }
        });
        waited.listened_at = now;
        waited.feed.listen()
    }

    fn set_live(&self, live: bool) {
        let mut state = self.locked();
        state.live = live;
        for waited in state.by_paths.values() {
            waited.feed.set_live(live);
        }
    }

    /// Wakes the waiters of `path_key`, its ancestors and its descendants.
    fn deleted(&self, path_key: &str) {
        for (waited_keys, waited) in &self.locked().by_paths {
            let concerned =
                |waited_key: &String| waited_key.starts_with(path_key) || path_key.starts_with(waited_key.as_str());
            if waited_keys.iter().any(concerned) {
                waited.feed.notify();
            }
        }
    }

    fn locked(&self) -> MutexGuard<'_, FeedsState> {
        // No code panics while holding it, so its data stays consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Runs until aborted: the backend holds it in an `AbortOnDrop`, so it
/// ends with the backend's last clone.
pub(crate) async fn run(members: Arc<Members>, layout: Layout, feeds: Arc<Feeds>) {
    let mut pause = FIRST_PAUSE;
    loop {
        let (member, mut client) = members.watch();
        watch_once(&mut client, &layout, &feeds, &mut pause).await;
        feeds.set_live(false);
        members.failed(member);
        // Jittered, so that many clients do not reconnect in step.
        sleep(pause / 2 + pause.mul_f64(fastrand::f64()) / 2).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// One watch stream, from creation to its end (an error, a cancellation by
/// the server, or the connection closing).
async fn watch_once(client: &mut WatchClient, layout: &Layout, feeds: &Feeds, pause: &mut Duration) {
    let options = WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoPut]);
    let Ok(mut stream) = client.watch(layout.namespace_prefix(), Some(options)).await else {
        return;
    };
    while let Ok(Some(response)) = stream.message().await {
        if response.created() {
            feeds.set_live(true);
            *pause = FIRST_PAUSE;
        }
        if response.canceled() {
            return;
        }
        for event in response.events() {
            let path_key = event
                .kv()
                .filter(|_| event.event_type() == EventType::Delete)
                .and_then(|kv| kv.key_str().ok())
                .and_then(|key| layout.path_key_of(key));
            if let Some((path_key, _)) = path_key {
                feeds.deleted(path_key);
            }
        }
    }
}

/// Keeps the revocations' watch open while holders listen, announcing
/// each revocation put under the namespace; runs until aborted (the
/// backend holds it in an `AbortOnDrop`). `revocations` starts not live.
pub(crate) async fn hear_revocations(members: Arc<Members>, layout: Layout, revocations: Revocations) {
    let mut pause = FIRST_PAUSE;
    loop {
        revocations.wanted().await;
        let (member, mut client) = members.watch();
        let unwanted = hear_once(&mut client, &layout, &revocations, &mut pause).await;
        revocations.set_live(false);
        if !unwanted {
            members.failed(member);
            sleep(pause / 2 + pause.mul_f64(fastrand::f64()) / 2).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// One watch stream on the revocations' space, until it ends (false) or no
/// holder listens any more (true).
async fn hear_once(client: &mut WatchClient, layout: &Layout, revocations: &Revocations, pause: &mut Duration) -> bool {
    let options = WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoDelete]);
    let Ok(mut stream) = client.watch(layout.revocations(), Some(options)).await else {
        return false;
    };
    loop {
        tokio::select! {
            message = stream.message() => {
                let Ok(Some(response)) = message else { return false };
                if response.created() {
                    revocations.set_live(true);
                    *pause = FIRST_PAUSE;
                }
                if response.canceled() {
                    return false;
                }
                let announced = response.events().iter().filter_map(|event| event.kv()?.value_str().ok());
                for revocation in announced.filter_map(Revocation::from_message) {
                    revocations.announce(revocation);
                }
            }
            () = sleep(STILL_WANTED_EVERY) => {
                if !revocations.still_wanted() {
                    return true;
                }
            }
        }
    }
}
