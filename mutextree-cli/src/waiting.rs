//! What `run` shows while it waits for a lock: on a terminal, one line
//! that updates in place, naming the lock in the way, how long that lock
//! has left and how long `--timeout` has left; with `--verbose`, one line
//! per lock it comes to wait behind, terminal or not (a request of several
//! paths waits behind its blockers one after the other).
//!
//! The lock in the way is learnt from the acquisition itself (each refusal
//! it is about to wait behind), not from a second listing of the store: a
//! listing could name a lock the store no longer weighs, or miss a
//! stepwise client's passing parent lock. Its place in the queue of a fair
//! store is another matter: the acquisition knows its ticket, not how many
//! conflicting waiters came before it, so the line reads the store's
//! waiters once a second ([`WaitingLine::watch_queue`]).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mutextree::backend::human;
use mutextree::{HeldLock, LockBackend, LockItems, Owner, Wait};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::show::{describe, in_the_way, shown_items};

/// How often the line is redrawn: often enough that the counts look alive.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// How often the store's waiters are read for the place in the queue.
const QUEUE_READ_EVERY: Duration = Duration::from_secs(1);

/// The waiting line of one acquisition; nothing is drawn without a
/// terminal on stderr, for an acquisition that does not wait, or before
/// the first refusal.
pub(crate) struct WaitingLine {
    seen: Arc<Mutex<Option<Seen>>>,
    /// How many conflicting waiters are ahead in the queue, once known.
    ahead: Arc<Mutex<Option<usize>>>,
    drawer: Option<(ProgressBar, JoinHandle<()>)>,
    /// The task that reads the queue, while the line is drawn.
    reader: Option<JoinHandle<()>>,
    /// With `--verbose`: what is waited for, to say it.
    verbose: Option<LockItems>,
}

/// The last lock the acquisition was refused by, and when.
struct Seen {
    blocker: HeldLock,
    at: Instant,
}

impl WaitingLine {
    /// Starts drawing, for an acquisition of `items` that waits as `wait`
    /// says; with `verbose`, each lock it comes to wait behind is also
    /// said on a line of its own.
    pub(crate) fn start(items: &LockItems, wait: Wait, verbose: bool) -> Self {
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let ahead: Arc<Mutex<Option<usize>>> = Arc::default();
        let drawer = (wait != Wait::No && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(ProgressStyle::with_template("{spinner} {wide_msg}").expect("a valid progress template"));
            let started = Instant::now();
            let deadline = match wait {
                Wait::For(limit) => started.checked_add(limit),
                Wait::No | Wait::Forever => None,
            };
            let task = tokio::spawn({
                let (bar, seen, ahead, items) = (bar.clone(), seen.clone(), ahead.clone(), items.clone());
                async move {
                    loop {
                        let ahead = *ahead.lock().expect("the waiting line's state is never poisoned");
                        let message = seen
                            .lock()
                            .expect("the waiting line's state is never poisoned")
                            .as_ref()
                            .map(|seen| line(&items, seen, deadline, ahead));
                        if let Some(message) = message {
                            bar.set_message(message);
                            bar.tick();
                        }
                        tokio::time::sleep(REDRAW_EVERY).await;
                    }
                }
            });
            (bar, task)
        });
        WaitingLine { seen, ahead, drawer, reader: None, verbose: verbose.then(|| items.clone()) }
    }

    /// While the line is drawn, reads `store`'s waiters once a second and
    /// counts the conflicting ones queued before `owner`'s reservation for
    /// `items` (nothing is shown before that reservation is listed: a
    /// barging store has none).
    pub(crate) fn watch_queue(&mut self, store: Arc<dyn LockBackend>, owner: Owner, items: LockItems) {
        if self.drawer.is_none() {
            return;
        }
        let ahead = self.ahead.clone();
        self.reader = Some(tokio::spawn(async move {
            loop {
                if let Ok(waiters) = store.waiters(None).await {
                    *ahead.lock().expect("the waiting line's state is never poisoned") =
                        queued_before(&waiters, &owner, &items);
                }
                tokio::time::sleep(QUEUE_READ_EVERY).await;
            }
        }));
    }

    /// Records a lock the acquisition is about to wait behind: the
    /// handle's `on_wait`. With `--verbose`, says so when it is not the
    /// lock waited behind just before (above the line, on a terminal).
    pub(crate) fn observer(&self) -> impl Fn(&HeldLock) + Send + Sync + 'static {
        let seen = self.seen.clone();
        let verbose = self.verbose.clone();
        let bar = self.drawer.as_ref().map(|(bar, _)| bar.clone());
        move |blocker: &HeldLock| {
            let mut seen = seen.lock().expect("the waiting line's state is never poisoned");
            let same = seen
                .as_ref()
                .is_some_and(|seen| seen.blocker.path == blocker.path && seen.blocker.token == blocker.token);
            if let (false, Some(items)) = (same, &verbose) {
                let said = format!("mutextree: {}", waiting_behind(items, blocker));
                match &bar {
                    Some(bar) => bar.println(said),
                    None => eprintln!("{said}"),
                }
            }
            *seen = Some(Seen { blocker: blocker.clone(), at: Instant::now() });
        }
    }

    /// Removes the line, leaving the terminal as it was.
    pub(crate) fn clear(self) {
        if let Some(reader) = self.reader {
            reader.abort();
        }
        if let Some((bar, task)) = self.drawer {
            task.abort();
            bar.finish_and_clear();
        }
    }
}

/// How many waiters whose reservations conflict with `items` are queued
/// before `owner`'s: `None` while `owner` has no reservation listed.
fn queued_before(waiters: &[HeldLock], owner: &Owner, items: &LockItems) -> Option<usize> {
    let ticket = waiters.iter().filter(|waiter| waiter.owner == *owner).map(|waiter| waiter.token).min()?;
    let earlier = waiters.iter().filter(|waiter| {
        waiter.token < ticket && waiter.owner != *owner && items.blocked_by(&waiter.path, waiter.mode).is_some()
    });
    Some(earlier.map(|waiter| waiter.token).collect::<BTreeSet<u64>>().len())
}

/// `waiting for A/B (gives up in 4 min 3 s, queued behind 2): A (an
/// ancestor) held exclusively by "web-1" for 12.3 s more, fencing token 7`:
/// the times and the place in the queue first, so that a narrow terminal
/// cuts off the least telling part.
fn line(items: &LockItems, seen: &Seen, deadline: Option<Instant>, ahead: Option<usize>) -> String {
    let now = Instant::now();
    let mut blocker = seen.blocker.clone();
    if !blocker.waiting {
        blocker.remaining = blocker.remaining.saturating_sub(now - seen.at);
    }
    let limit = match deadline {
        Some(deadline) => format!("gives up in {}", human(deadline.saturating_duration_since(now))),
        None => "no time limit".to_owned(),
    };
    let place = match ahead {
        Some(0) => ", first in the queue".to_owned(),
        Some(ahead) => format!(", queued behind {ahead}"),
        None => String::new(),
    };
    format!(
        "waiting for {} ({limit}{place}): {} {}",
        shown_items(items),
        in_the_way(items, &blocker),
        describe(&blocker)
    )
}

/// `waiting for A/B, C/D behind C (an ancestor of C/D) held ...`: what
/// `--verbose` says of each lock waited behind.
fn waiting_behind(items: &LockItems, blocker: &HeldLock) -> String {
    format!("waiting for {} behind {} {}", shown_items(items), in_the_way(items, blocker), describe(blocker))
}

#[cfg(test)]
mod tests {
    use mutextree::{LockPath, Mode, Owner};

    use super::*;

    fn blocker(path: &str, mode: Mode) -> HeldLock {
        HeldLock {
            path: LockPath::parse(path).expect("path"),
            mode,
            owner: Owner::new("web-1").expect("owner"),
            token: 7,
            remaining: Duration::from_secs(20),
            transient: false,
            waiting: false,
            waited: Duration::ZERO,
        }
    }

    #[test]
    fn the_line_names_the_blocker_and_both_times_left() {
        let items = LockItems::one(LockPath::parse("eu/rack-1/host-2").expect("path"), Mode::Exclusive);
        let now = Instant::now();
        let seen = Seen { blocker: blocker("eu/rack-1", Mode::Exclusive), at: now };
        let timed = line(&items, &seen, Some(now + Duration::from_secs(90)), None);
        let blocker = "eu/rack-1 (an ancestor) held exclusively by \"web-1\" for 20.0 s more, fencing token 7";
        assert_eq!(timed, format!("waiting for eu/rack-1/host-2 (gives up in 90.0 s): {blocker}"));
        let forever = line(&items, &seen, None, None);
        assert_eq!(forever, format!("waiting for eu/rack-1/host-2 (no time limit): {blocker}"));
    }

    #[test]
    fn the_place_in_the_queue_counts_earlier_conflicting_waiters() {
        let path = |text| LockPath::parse(text).expect("path");
        let owner = Owner::new("me").expect("owner");
        let items = LockItems::one(path("eu/rack-1"), Mode::Exclusive);
        let waiter = crate::show::tests::awaited_by;
        let waiters = [
            waiter("eu", Mode::Shared, "audit", 3),
            waiter("eu/rack-1/host-2", Mode::Exclusive, "patch", 4),
            waiter("eu/rack-1/host-3", Mode::Exclusive, "patch", 4),
            waiter("eu/rack-2", Mode::Exclusive, "sibling", 5),
            waiter("eu/rack-1", Mode::Exclusive, "me", 6),
            waiter("eu", Mode::Exclusive, "later", 7),
        ];
        assert_eq!(queued_before(&waiters, &owner, &items), Some(2), "one per earlier waiter in the way");
        assert_eq!(queued_before(&waiters[..4], &owner, &items), None, "not queued yet");
        let seen = Seen { blocker: blocker("eu/rack-1/host-2", Mode::Exclusive), at: Instant::now() };
        assert!(
            line(&items, &seen, None, Some(2)).starts_with("waiting for eu/rack-1 (no time limit, queued behind 2): ")
        );
        assert!(line(&items, &seen, None, Some(0)).contains("(no time limit, first in the queue): "));
    }

    #[test]
    fn a_request_of_several_paths_names_the_one_blocked() {
        let path = |text| LockPath::parse(text).expect("path");
        let items = LockItems::new([(path("dc/a/h1"), Mode::Exclusive), (path("dc/b"), Mode::Shared)]).expect("valid");
        let seen = Seen { blocker: blocker("dc/b/h2", Mode::Exclusive), at: Instant::now() };
        assert_eq!(
            line(&items, &seen, None, None),
            "waiting for dc/a/h1, dc/b (shared) (no time limit): dc/b/h2 (a descendant of dc/b) held exclusively by \
             \"web-1\" for 20.0 s more, fencing token 7"
        );
        assert_eq!(
            waiting_behind(&items, &blocker("dc", Mode::Shared)),
            "waiting for dc/a/h1, dc/b (shared) behind dc (an ancestor of dc/a/h1) held shared by \"web-1\" for 20.0 s \
             more, fencing token 7"
        );
    }
}
