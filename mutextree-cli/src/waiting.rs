//! What `run` shows while it waits for a lock: on a terminal, one line
//! that updates in place, naming the lock in the way, how long that lock
//! has left and how long `--timeout` has left.
//!
//! The lock in the way is learnt from the acquisition itself (each refusal
//! it is about to wait behind), not from a second listing of the store: a
//! listing could name a lock the store no longer weighs, or miss a
//! stepwise client's passing parent lock.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mutextree::backend::human;
use mutextree::{HeldLock, LockPath, Wait};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::show::{describe, relation, shown};

/// How often the line is redrawn: often enough that the counts look alive.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// The waiting line of one acquisition; nothing is drawn without a
/// terminal on stderr, for an acquisition that does not wait, or before
/// the first refusal.
pub(crate) struct WaitingLine {
    seen: Arc<Mutex<Option<Seen>>>,
    drawer: Option<(ProgressBar, JoinHandle<()>)>,
}

/// The last lock the acquisition was refused by, and when.
struct Seen {
    blocker: HeldLock,
    at: Instant,
}

impl WaitingLine {
    /// Starts drawing, for an acquisition of `path` that waits as `wait` says.
    pub(crate) fn start(path: &LockPath, wait: Wait) -> Self {
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let drawer = (wait != Wait::No && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(ProgressStyle::with_template("{spinner} {wide_msg}").expect("a valid progress template"));
            let started = Instant::now();
            let deadline = match wait {
                Wait::For(limit) => started.checked_add(limit),
                Wait::No | Wait::Forever => None,
            };
            let task = tokio::spawn({
                let (bar, seen, path) = (bar.clone(), seen.clone(), path.clone());
                async move {
                    loop {
                        let message = seen
                            .lock()
                            .expect("the waiting line's state is never poisoned")
                            .as_ref()
                            .map(|seen| line(&path, seen, deadline));
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
        WaitingLine { seen, drawer }
    }

    /// Records a lock the acquisition is about to wait behind: the
    /// handle's `on_wait`.
    pub(crate) fn observer(&self) -> impl Fn(&HeldLock) + Send + Sync + 'static {
        let seen = self.seen.clone();
        move |blocker: &HeldLock| {
            *seen.lock().expect("the waiting line's state is never poisoned") =
                Some(Seen { blocker: blocker.clone(), at: Instant::now() });
        }
    }

    /// Removes the line, leaving the terminal as it was.
    pub(crate) fn clear(self) {
        if let Some((bar, task)) = self.drawer {
            task.abort();
            bar.finish_and_clear();
        }
    }
}

/// `waiting for A/B (gives up in 4 min 3 s): A (an ancestor) held by
/// "web-1" for 12.3 s more, fencing token 7`: the times first, so that a
/// narrow terminal cuts off the least telling part.
fn line(path: &LockPath, seen: &Seen, deadline: Option<Instant>) -> String {
    let now = Instant::now();
    let mut blocker = seen.blocker.clone();
    blocker.remaining = blocker.remaining.saturating_sub(now - seen.at);
    let limit = match deadline {
        Some(deadline) => format!("gives up in {}", human(deadline.saturating_duration_since(now))),
        None => "no time limit".to_owned(),
    };
    format!(
        "waiting for {} ({limit}): {} ({}) {}",
        shown(path),
        shown(&blocker.path),
        relation(&blocker.path, path),
        describe(&blocker)
    )
}

#[cfg(test)]
mod tests {
    use mutextree::Owner;

    use super::*;

    #[test]
    fn the_line_names_the_blocker_and_both_times_left() {
        let path = LockPath::parse("eu/rack-1/host-2").expect("path");
        let blocker = HeldLock {
            path: LockPath::parse("eu/rack-1").expect("path"),
            owner: Owner::new("web-1").expect("owner"),
            token: 7,
            remaining: Duration::from_secs(20),
            transient: false,
        };
        let now = Instant::now();
        let seen = Seen { blocker, at: now };
        let timed = line(&path, &seen, Some(now + Duration::from_secs(90)));
        let blocker = "eu/rack-1 (an ancestor) held by \"web-1\" for 20.0 s more, fencing token 7";
        assert_eq!(timed, format!("waiting for eu/rack-1/host-2 (gives up in 90.0 s): {blocker}"));
        let forever = line(&path, &seen, None);
        assert_eq!(forever, format!("waiting for eu/rack-1/host-2 (no time limit): {blocker}"));
    }
}
