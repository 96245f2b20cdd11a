//! What the lock handle tells the outside world: spans and events through
//! [`tracing`], and, with the `metrics` feature, metrics through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! Every acquisition of every store goes through one waiting loop
//! ([`Acquisition`](crate::backend::Acquisition)) and every hold through
//! one handle, so this is where contention is seen whole: who waited for
//! what, behind whom, for how long, and how each hold ended. Stores add
//! events only for what they alone see (a notification channel lost and
//! back).
//!
//! Nothing is printed or counted unless the application installs a
//! `tracing` subscriber or builds with the `metrics` feature. With
//! neither, an acquisition or a store call on a held grant checks one
//! flag and runs bare: no span, no observer, no clock read. With the
//! feature, every acquisition and hold is timed and reported to the
//! installed recorder (the no-op one if none); BENCHMARKS.md measures both.
//! Labels are few and bounded (store, mode, outcome, reason): paths,
//! owners and namespaces are span fields, never metric labels, so a
//! recorder's series do not grow with the tree.
//!
//! # Spans and events
//!
//! All under the target `mutextree`:
//!
//! | span | level | fields |
//! | --- | --- | --- |
//! | `acquire` | DEBUG | `store`, `namespace`, `path`, `mode`, `owner`, `wait`; recorded at the end: `outcome`, `token`, `waited` (seconds), `error` |
//! | `refresh` | DEBUG | `store`, `namespace`, `path`, `owner`, `token`; `outcome`, `error` |
//! | `release` | DEBUG | `store`, `namespace`, `path`, `owner`, `token`; `outcome`, `error` |
//! | `lost` | WARN | `store`, `namespace`, `path`, `owner`, `token`, `reason`, `held` (seconds) |
//! | `notifications` | DEBUG | `store`, `namespace` (not for PostgreSQL, whose channel serves every namespace) |
//!
//! Inside `acquire`: a DEBUG event `refused` for each refusal, naming the
//! `blocker` (and the `ticket` of a queued waiter), and a TRACE event
//! `woken` for each wake-up (`by_change`: a change the store reported, or a
//! timer), naming the blocker waited for. Inside `lost`, a WARN event with
//! the reason in words. A store runs its notification channels (releases
//! for waiters, forced releases for holders) in a `notifications` span, in
//! which each channel's coming up and going down is a DEBUG event.
//!
//! # Metrics (feature `metrics`)
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `mutextree_acquire_seconds` | histogram | `store`, `mode`, `outcome` (`granted`, `refused`, `timed_out`, `error`, `cancelled`) |
//! | `mutextree_hold_seconds` | histogram | `store`, `mode`: from the moment the granting request was sent (where the expiry counts from) to the release or loss |
//! | `mutextree_waiters` | gauge | `store` |
//! | `mutextree_lost_total` | counter | `store`, `reason` ([`LostReason`]) |
//! | `mutextree_refresh_margin_seconds` | histogram | `store`: the life a lock had left when its refresh was confirmed |
//! | `mutextree_store_errors_total` | counter | `store`, `operation` (`acquire`, `refresh`, `release`) |
//!
//! `mode` is `exclusive`, `shared`, or `mixed` for a grant of several paths
//! in both modes.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::future::Either;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::instrument::Instrumented;
use tracing::{Instrument, Level, Span};

use crate::backend::LockBackend;
use crate::lock::LockRequest;
use crate::{Error, Grant, HeldLock, LockItems, Mode, Wait};

/// Why a held lock was lost, as [`Error::Lost`] tells it in words and the
/// `mutextree_lost_total` metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// Its ttl ran out with no refresh sent.
    Expired,
    /// The store answered a refresh that the lock was not held (it had
    /// expired there, or was released by someone else).
    RefreshRefused,
    /// An administrator released it (`release --force`), and the store
    /// said so.
    ForcedRelease,
    /// No refresh was confirmed before the lock's expiry: the store did
    /// not answer, or failed, until then.
    StoreUnreachable,
}

impl LostReason {
    /// The metric label: `expired`, `refresh_refused`, `forced_release`,
    /// `store_unreachable`.
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::Expired => "expired",
            LostReason::RefreshRefused => "refresh_refused",
            LostReason::ForcedRelease => "forced_release",
            LostReason::StoreUnreachable => "store_unreachable",
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `mode` label of a set of items.
fn mode_label(items: &LockItems) -> &'static str {
    let mut modes = items.iter().map(|item| item.mode);
    let first = modes.next().unwrap_or(Mode::Exclusive);
    if modes.all(|mode| mode == first) {
        first.as_str()
    } else {
        "mixed"
    }
}

/// The labels every span and metric of one backend carries.
fn store_of(backend: &dyn LockBackend) -> &'static str {
    backend.labels().store
}

/// Whether anything can see how long things take: the `metrics` feature
/// is on, or a subscriber listens at `level`. Reading the clock for
/// nobody costs a fast lock's handle a tenth of its speed.
fn timed(level: Level) -> bool {
    cfg!(feature = "metrics") || tracing::level_enabled!(level)
}

/// Whether anything listens to an acquisition or a store call on a held
/// grant: a subscriber at DEBUG, or the metrics. When nothing does, they
/// run bare: with a fast store, even a disabled span's layer and an
/// observer nobody reads cost the handle a tenth of its speed (the copies
/// of a larger future at every call).
pub(crate) fn watched() -> bool {
    timed(Level::DEBUG)
}

/// `work` in `span`, or bare when the span is disabled (the metrics
/// alone, no subscriber: no span to enter at every poll). A plain function
/// rather than an `async fn`: that would be one layer of futures more,
/// and a copy of `work` into it at every call.
pub(crate) fn in_span<F: Future>(span: Span, work: F) -> Either<F, Instrumented<F>> {
    if span.is_disabled() {
        Either::Left(work)
    } else {
        Either::Right(work.instrument(span))
    }
}

/// When the hold of `grant` started, if anything can see how long holds
/// take (see [`timed`]): when its granting request was sent (the earliest
/// moment the store may have granted it, and where its expiry counts
/// from), read off the grant rather than the clock.
pub(crate) fn hold_started(grant: &Grant) -> Option<Instant> {
    timed(Level::WARN).then(|| grant.expires_at.checked_sub(grant.ttl).unwrap_or(grant.expires_at))
}

/// The metric handles of one lock handle, registered on first use and
/// kept (with the `metrics` feature; nothing without), so that an
/// acquisition or a hold costs a recorder no lookup. A handle made before
/// the application installs its recorder counts into no recorder: install
/// it first, as the `metrics` crate advises.
#[derive(Debug, Default)]
pub(crate) struct Instruments {
    #[cfg(feature = "metrics")]
    kept: metrics::Kept,
}

/// One acquisition, observed from its start to its outcome; an
/// acquisition dropped before it ended is reported `cancelled`.
pub(crate) struct Acquiring<'a> {
    span: Span,
    store: &'static str,
    mode: &'static str,
    started: Instant,
    instruments: Option<&'a Instruments>,
    /// Whether it is counted among the waiters now.
    waiting: bool,
    finished: bool,
}

impl<'a> Acquiring<'a> {
    /// An acquisition that started at `started`, observed because
    /// something listens ([`watched`]).
    pub(crate) fn start(
        backend: &dyn LockBackend,
        request: &LockRequest,
        wait: Wait,
        started: Instant,
        instruments: Option<&'a Instruments>,
    ) -> Self {
        let labels = backend.labels();
        let mode = mode_label(&request.items);
        let span = tracing::debug_span!(
            target: "mutextree",
            "acquire",
            store = labels.store,
            namespace = labels.namespace,
            path = %request.items,
            mode,
            owner = %request.owner,
            wait = ?wait,
            outcome = Empty,
            token = Empty,
            waited = Empty,
            error = Empty,
        );
        Acquiring { span, store: labels.store, mode, started, instruments, waiting: false, finished: false }
    }

    /// The acquisition's span, for its attempts and waits.
    pub(crate) fn span(&self) -> Span {
        self.span.clone()
    }

    /// An attempt was refused by `blocker` (queued with `ticket`).
    pub(crate) fn refused(&self, blocker: &HeldLock, ticket: Option<u64>) {
        tracing::debug!(target: "mutextree", blocker = %blocker, ticket, "refused");
    }

    /// The acquisition is about to wait (counted among the waiters until
    /// it ends).
    pub(crate) fn waits(&mut self) {
        if !self.waiting {
            self.waiting = true;
            metrics::waiters(self.instruments, self.store, 1.0);
        }
    }

    /// A wait behind `blocker` ended: a change the store reported, or a
    /// timer.
    pub(crate) fn woken(&self, blocker: &HeldLock, by_change: bool) {
        tracing::trace!(target: "mutextree", blocker = %blocker, by_change, "woken");
    }

    /// The acquisition ended with `outcome`.
    pub(crate) fn finish(&mut self, outcome: &Result<Grant, Error>) {
        let label = match outcome {
            Ok(grant) => {
                self.span.record("token", grant.token);
                "granted"
            }
            Err(Error::Refused { .. }) => "refused",
            Err(Error::Timeout { .. }) => "timed_out",
            Err(error) => {
                if matches!(error, Error::Store { .. }) {
                    metrics::store_error(self.store, "acquire");
                }
                self.span.record("error", tracing::field::display(error));
                "error"
            }
        };
        self.end(label);
    }

    fn end(&mut self, outcome: &'static str) {
        self.finished = true;
        if std::mem::take(&mut self.waiting) {
            metrics::waiters(self.instruments, self.store, -1.0);
        }
        let waited = self.started.elapsed();
        self.span.record("outcome", outcome);
        self.span.record("waited", waited.as_secs_f64());
        metrics::acquired(self.instruments, self.store, self.mode, outcome, waited);
    }
}

impl Drop for Acquiring<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.end("cancelled");
        }
    }
}

/// `call`, a store call on a held grant (`operation`: `refresh` or
/// `release`): in its span, its outcome recorded, if anything listens
/// ([`watched`]); else bare.
pub(crate) fn on_grant<'f, T: 'f>(
    operation: &'static str,
    backend: &'f dyn LockBackend,
    grant: &'f Grant,
    call: impl Future<Output = Result<T, Error>> + 'f,
) -> impl Future<Output = Result<T, Error>> + 'f {
    if !watched() {
        return Either::Left(call);
    }
    Either::Right(async move {
        let labels = backend.labels();
        // A span's name is part of its static metadata: one macro per name.
        let span = if operation == "refresh" {
            tracing::debug_span!(target: "mutextree", "refresh", store = labels.store, namespace = labels.namespace,
                path = %grant.items, owner = %grant.owner, token = grant.token, outcome = Empty, error = Empty)
        } else {
            tracing::debug_span!(target: "mutextree", "release", store = labels.store, namespace = labels.namespace,
                path = %grant.items, owner = %grant.owner, token = grant.token, outcome = Empty, error = Empty)
        };
        let outcome = in_span(span.clone(), call).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(Error::NotHeld { .. }) => "not_held",
            Err(error) => {
                if matches!(error, Error::Store { .. }) {
                    metrics::store_error(labels.store, operation);
                }
                span.record("error", tracing::field::display(error));
                "error"
            }
        };
        span.record("outcome", label);
        outcome
    })
}

/// A refresh of a lock that had `margin` of life left was confirmed.
pub(crate) fn refreshed(backend: &dyn LockBackend, margin: Duration) {
    metrics::refresh_margin(store_of(backend), margin);
}

/// A hold of `items` that lasted `held` ended by a release.
pub(crate) fn released(backend: &dyn LockBackend, instruments: &Instruments, items: &LockItems, held: Duration) {
    metrics::held(Some(instruments), store_of(backend), mode_label(items), held);
}

/// A hold of `grant` that lasted `held` was lost for `reason` (`detail`
/// in words).
pub(crate) fn lost(backend: &dyn LockBackend, grant: &Grant, reason: LostReason, detail: &str, held: Duration) {
    let labels = backend.labels();
    let span = tracing::warn_span!(
        target: "mutextree",
        "lost",
        store = labels.store,
        namespace = labels.namespace,
        path = %grant.items,
        owner = %grant.owner,
        token = grant.token,
        reason = reason.as_str(),
        held = held.as_secs_f64(),
    );
    span.in_scope(|| tracing::warn!(target: "mutextree", "{detail}"));
    metrics::lost(labels.store, reason);
    metrics::held(None, labels.store, mode_label(&grant.items), held);
}

/// The metrics, or nothing without the `metrics` feature.
#[cfg(feature = "metrics")]
mod metrics {
    use std::sync::OnceLock;
    use std::time::Duration;

    use ::metrics::{Gauge, Histogram};

    use super::{Instruments, LostReason};

    /// The outcomes of an acquisition, in the order [`Kept`] keeps them.
    const OUTCOMES: [&str; 5] = ["granted", "refused", "timed_out", "error", "cancelled"];
    /// The modes of a hold, likewise.
    const MODES: [&str; 3] = ["exclusive", "shared", "mixed"];

    /// The handles of [`Instruments`]: one lock handle has one store and
    /// one requested mode, so an outcome or a held mode is enough to tell
    /// its series.
    #[derive(Debug, Default)]
    pub(super) struct Kept {
        acquired: [OnceLock<Histogram>; OUTCOMES.len()],
        held: [OnceLock<Histogram>; MODES.len()],
        waiters: OnceLock<Gauge>,
    }

    /// Uses the handle kept in `slot` (made on first use), or `make()`'s;
    /// a kept handle is borrowed, not cloned (no reference count moved).
    fn with_kept<T>(slot: Option<&OnceLock<T>>, make: impl FnOnce() -> T, use_it: impl FnOnce(&T)) {
        match slot {
            Some(slot) => use_it(slot.get_or_init(make)),
            None => use_it(&make()),
        }
    }

    fn index(all: &[&str], one: &str) -> Option<usize> {
        all.iter().position(|each| *each == one)
    }

    pub(super) fn acquired(
        instruments: Option<&Instruments>,
        store: &'static str,
        mode: &'static str,
        outcome: &'static str,
        waited: Duration,
    ) {
        let make = || ::metrics::histogram!("mutextree_acquire_seconds", "store" => store, "mode" => mode, "outcome" => outcome);
        let slot = instruments.zip(index(&OUTCOMES, outcome)).map(|(kept, at)| &kept.kept.acquired[at]);
        with_kept(slot, make, |histogram| histogram.record(waited.as_secs_f64()));
    }

    pub(super) fn waiters(instruments: Option<&Instruments>, store: &'static str, change: f64) {
        let make = || ::metrics::gauge!("mutextree_waiters", "store" => store);
        with_kept(instruments.map(|kept| &kept.kept.waiters), make, |gauge| gauge.increment(change));
    }

    pub(super) fn held(instruments: Option<&Instruments>, store: &'static str, mode: &'static str, held: Duration) {
        let make = || ::metrics::histogram!("mutextree_hold_seconds", "store" => store, "mode" => mode);
        let slot = instruments.zip(index(&MODES, mode)).map(|(kept, at)| &kept.kept.held[at]);
        with_kept(slot, make, |histogram| histogram.record(held.as_secs_f64()));
    }

    pub(super) fn lost(store: &'static str, reason: LostReason) {
        ::metrics::counter!("mutextree_lost_total", "store" => store, "reason" => reason.as_str()).increment(1);
    }

    pub(super) fn refresh_margin(store: &'static str, margin: Duration) {
        ::metrics::histogram!("mutextree_refresh_margin_seconds", "store" => store).record(margin.as_secs_f64());
    }

    pub(super) fn store_error(store: &'static str, operation: &'static str) {
        ::metrics::counter!("mutextree_store_errors_total", "store" => store, "operation" => operation).increment(1);
    }
}

/// Without the `metrics` feature: nothing is counted, and nothing costs.
#[cfg(not(feature = "metrics"))]
mod metrics {
    use std::time::Duration;

    use super::{Instruments, LostReason};

    pub(super) fn acquired(_: Option<&Instruments>, _: &'static str, _: &'static str, _: &'static str, _: Duration) {}
    pub(super) fn waiters(_: Option<&Instruments>, _: &'static str, _: f64) {}
    pub(super) fn held(_: Option<&Instruments>, _: &'static str, _: &'static str, _: Duration) {}
    pub(super) fn lost(_: &'static str, _: LostReason) {}
    pub(super) fn refresh_margin(_: &'static str, _: Duration) {}
    pub(super) fn store_error(_: &'static str, _: &'static str) {}
}
