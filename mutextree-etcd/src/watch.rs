//! Wake-ups: one etcd watch per backend on its namespace's prefix.
//!
//! Waiters listen on the backend's [`ChangeFeed`]; this task turns every
//! delete event under the prefix (a release, a lease that expired or was
//! revoked) into one notification, however many waiters there are. Puts
//! are filtered out by the server: a new or refreshed lock never unblocks
//! anyone.
//!
//! The watch starts on the first `listen`, so a backend that never waits
//! opens no stream. Until the server confirms it (and whenever the stream
//! breaks, e.g. its member died) the feed is marked not live and listeners
//! poll; once a new stream is confirmed the feed is live again and every
//! listener wakes to retry, which also covers any delete missed while it
//! was down. No start revision is needed: a missed event costs a retry,
//! never a lost wake-up.

use std::time::Duration;

use std::sync::Arc;

use etcd_client::{WatchClient, WatchFilterType, WatchOptions};
use mutextree_core::ChangeFeed;
use tokio::time::sleep;

use crate::members::Members;

/// First pause before re-opening a broken watch; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Runs until aborted (the backend's drop aborts it).
pub(crate) async fn run(members: Arc<Members>, prefix: String, feed: ChangeFeed) {
    let mut pause = FIRST_PAUSE;
    loop {
        let (member, mut client) = members.watch();
        watch_once(&mut client, &prefix, &feed, &mut pause).await;
        feed.set_live(false);
        members.failed(member);
        // Jittered, so that many clients do not reconnect in step.
        sleep(pause / 2 + pause.mul_f64(fastrand::f64()) / 2).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// One watch stream, from creation to its end (an error, a cancellation by
/// the server, or the connection closing).
async fn watch_once(client: &mut WatchClient, prefix: &str, feed: &ChangeFeed, pause: &mut Duration) {
    let options = WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoPut]);
    let Ok(mut stream) = client.watch(prefix, Some(options)).await else {
        return;
    };
    while let Ok(Some(response)) = stream.message().await {
        if response.created() {
            feed.set_live(true);
            *pause = FIRST_PAUSE;
        }
        if response.canceled() {
            return;
        }
        if !response.events().is_empty() {
            feed.notify();
        }
    }
}
