//! What a lock's life reports, checked with a test subscriber and a test
//! recorder: [`observe`] runs some work on a runtime of its own with both
//! installed for that work alone, and returns what was [`Seen`]. The
//! cases below are the lives every store must report alike; the memory
//! store runs all of them, each network store at least one.
//!
//! The subscriber and recorder are local to the runtime's one thread (not
//! global), so tests running at once never see each other's spans. Run
//! them in a test binary of their own: `tracing` caches per call site
//! whether anyone listens, and a test without a subscriber on another
//! thread that reaches a call site first, while a subscriber is being
//! installed here, can leave it cached as unheard.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder};
use metrics::{SharedString, Unit};
use mutextree_core::{Error, LockBackend, TreeLock, Wait};

use crate::TestStore;
use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span as it was closed or last seen: its name and every field
/// recorded, as text.
#[derive(Clone, Debug)]
pub struct SpanSeen {
    /// The span's name: `acquire`, `refresh`, `release`, `lost`.
    pub name: &'static str,
    /// Its fields, as `Debug` text without quotes for strings.
    pub fields: BTreeMap<String, String>,
}

impl SpanSeen {
    /// Field `name`, or `""` if not recorded.
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

/// An event: its level, message, fields, and the span it happened in.
#[derive(Clone, Debug)]
pub struct EventSeen {
    /// Its level.
    pub level: Level,
    /// The name of the span it happened in, if any.
    pub span: Option<&'static str>,
    /// Its fields; the message is `message`.
    pub fields: BTreeMap<String, String>,
}

impl EventSeen {
    /// Field `name`, or `""`.
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

/// Everything seen: the spans (in the order they were created) and the
/// events (in order), and every change to every metric.
#[derive(Debug)]
pub struct Seen {
    /// The spans.
    pub spans: Vec<SpanSeen>,
    /// The events.
    pub events: Vec<EventSeen>,
    /// Every change to every metric, in order.
    pub metrics: Vec<MetricSeen>,
}

/// One change to a metric: its key and what was done to it.
#[derive(Clone, Debug)]
pub struct MetricSeen {
    /// The metric's name and labels.
    pub key: Key,
    /// What was done.
    pub change: Change,
}

/// What was done to a metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// A counter went up by this much.
    Counted(u64),
    /// A gauge went up (or down, negative) by this much.
    Moved(f64),
    /// A gauge was set to this value.
    Set(f64),
    /// A histogram recorded this value.
    Recorded(f64),
}

impl Seen {
    /// The spans named `name`.
    pub fn spans(&self, name: &str) -> Vec<&SpanSeen> {
        self.spans.iter().filter(|span| span.name == name).collect()
    }

    /// The one span named `name`.
    pub fn span(&self, name: &str) -> &SpanSeen {
        let spans = self.spans(name);
        assert_eq!(spans.len(), 1, "one {name} span expected in {self:#?}");
        spans[0]
    }

    /// The events whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<&EventSeen> {
        self.events.iter().filter(|event| event.field("message") == message).collect()
    }

    /// The changes to metric `name` in the series whose labels include
    /// every one of `labels`, in order.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Vec<Change> {
        let wanted = |key: &Key| {
            key.name() == name
                && labels
                    .iter()
                    .all(|(label, value)| key.labels().any(|found| found.key() == *label && found.value() == *value))
        };
        self.metrics.iter().filter(|seen| wanted(&seen.key)).map(|seen| seen.change).collect()
    }

    /// The sum of counter `name` over the series with `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.metric(name, labels).iter().map(|change| if let Change::Counted(n) = change { *n } else { 0 }).sum()
    }

    /// The values recorded by histogram `name` in the series with `labels`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let changes = self.metric(name, labels);
        changes
            .into_iter()
            .filter_map(|change| if let Change::Recorded(value) = change { Some(value) } else { None })
            .collect()
    }

    /// The values gauge `name` took in the series with `labels`, from 0.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let mut now = 0.0;
        let changes = self.metric(name, labels).into_iter();
        changes
            .map(|change| {
                now = match change {
                    Change::Moved(by) => now + by,
                    Change::Set(to) => to,
                    _ => now,
                };
                now
            })
            .collect()
    }
}

/// A recorder that keeps every change to every metric, in order.
#[derive(Clone, Default)]
struct Keep(Arc<Mutex<Vec<MetricSeen>>>);

/// One metric of [`Keep`].
struct Kept {
    key: Key,
    all: Arc<Mutex<Vec<MetricSeen>>>,
}

impl Kept {
    fn push(&self, change: Change) {
        self.all.lock().expect("metrics").push(MetricSeen { key: self.key.clone(), change });
    }
}

impl CounterFn for Kept {
    fn increment(&self, value: u64) {
        self.push(Change::Counted(value));
    }

    fn absolute(&self, value: u64) {
        self.push(Change::Counted(value));
    }
}

impl GaugeFn for Kept {
    fn increment(&self, value: f64) {
        self.push(Change::Moved(value));
    }

    fn decrement(&self, value: f64) {
        self.push(Change::Moved(-value));
    }

    fn set(&self, value: f64) {
        self.push(Change::Set(value));
    }
}

impl HistogramFn for Kept {
    fn record(&self, value: f64) {
        self.push(Change::Recorded(value));
    }
}

impl Keep {
    fn kept(&self, key: &Key) -> Arc<Kept> {
        Arc::new(Kept { key: key.clone(), all: self.0.clone() })
    }
}

impl Recorder for Keep {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.kept(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.kept(key))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.kept(key))
    }
}

/// Captures spans and events into [`Seen`].
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

#[derive(Default)]
struct Captured {
    spans: Vec<SpanSeen>,
    ids: BTreeMap<u64, usize>,
    events: Vec<EventSeen>,
}

/// Writes fields as text.
struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut captured = self.0.lock().expect("capture");
        let at = captured.spans.len();
        captured.spans.push(SpanSeen { name: attrs.metadata().name(), fields });
        captured.ids.insert(id.into_u64(), at);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut captured = self.0.lock().expect("capture");
        let Some(&at) = captured.ids.get(&id.into_u64()) else { return };
        values.record(&mut Fields(&mut captured.spans[at].fields));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let span = ctx.event_span(event).map(|span| span.name());
        let level = *event.metadata().level();
        self.0.lock().expect("capture").events.push(EventSeen { level, span, fields });
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        // Ids are reused once closed: forget this one, keep what it said.
        self.0.lock().expect("capture").ids.remove(&id.into_u64());
    }
}

/// Runs `work` on a runtime of its own (one thread; its clock paused if
/// `paused`) with a subscriber that captures every span and event at every
/// level and a recorder that keeps every change to every metric, for that
/// work alone.
pub fn observe<Fut: Future<Output = ()>>(paused: bool, work: impl FnOnce() -> Fut) -> Seen {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let recorder = Keep::default();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(paused).build().expect("runtime");
    tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&recorder, || runtime.block_on(work()));
    });
    drop(runtime);
    let captured = std::mem::take(&mut *capture.0.lock().expect("capture"));
    let metrics = std::mem::take(&mut *recorder.0.lock().expect("metrics"));
    Seen { spans: captured.spans, events: captured.events, metrics }
}

/// A handle on `path` with a ttl of `ttl`, owned by `owner`.
fn lock(store: &Arc<dyn LockBackend>, path: &str, owner: &str, ttl: Duration) -> TreeLock {
    TreeLock::builder(store.clone(), path).owner(owner).ttl(ttl).build().expect("lock")
}

/// A lock granted, then another refused on it, then released: the
/// `acquire` spans say who asked for what and how it ended, the refusal
/// names the holder, the `release` span its outcome; the acquisition
/// histogram counts one of each outcome, the hold histogram one hold.
/// Every store runs it in its telemetry tests (`paused` for a store on
/// tokio's paused clock).
pub fn granted_refused_and_released<S: TestStore>(store: S, paused: bool) {
    let name = Arc::new(Mutex::new(""));
    let store_label = name.clone();
    let seen = observe(paused, || async move {
        let namespace = format!("telemetry-{:012x}", fastrand::u64(..1 << 48));
        let store = store.connect(&namespace).await.expect("connect");
        *store_label.lock().expect("name") = store.labels().store;
        let holder = lock(&store, "dc/rack", "holder", Duration::from_secs(30));
        holder.try_acquire().await.expect("granted");
        let late = lock(&store, "dc", "late", Duration::from_secs(30));
        assert!(matches!(late.try_acquire().await, Err(Error::Refused { .. })));
        holder.release().await.expect("released");
    });
    let store_name = *name.lock().expect("name");
    assert!(!["", "custom"].contains(&store_name), "a store names itself: {store_name:?}");
    let acquires = seen.spans("acquire");
    assert_eq!(acquires.len(), 2, "{seen:#?}");
    let (granted, refused) = (acquires[0], acquires[1]);
    for (span, owner, path, outcome) in [(granted, "holder", "dc/rack", "granted"), (refused, "late", "dc", "refused")]
    {
        assert_eq!(span.field("store"), store_name, "{span:?}");
        assert_eq!(span.field("owner"), format!("\"{owner}\""), "{span:?}");
        assert_eq!(span.field("path"), path, "{span:?}");
        assert_eq!(span.field("mode"), "exclusive", "{span:?}");
        assert_eq!(span.field("outcome"), outcome, "{span:?}");
        assert!(span.field("waited").parse::<f64>().is_ok(), "{span:?}");
        assert!(!span.field("namespace").is_empty(), "{span:?}");
    }
    let token = granted.field("token");
    assert!(token.parse::<u64>().is_ok(), "the granted span records its token: {granted:?}");
    assert_eq!(refused.field("token"), "", "a refusal has no token");
    let refusals = seen.events("refused");
    assert_eq!(refusals.len(), 1, "{seen:#?}");
    assert_eq!(refusals[0].span, Some("acquire"));
    let blocker = refusals[0].field("blocker");
    assert!(blocker.contains("dc/rack") && blocker.contains("holder") && blocker.contains(token), "{blocker}");
    let release = seen.span("release");
    assert_eq!((release.field("outcome"), release.field("token")), ("ok", token), "{release:?}");

    let store = [("store", store_name)];
    for outcome in ["granted", "refused"] {
        let labels = [("store", store_name), ("mode", "exclusive"), ("outcome", outcome)];
        assert_eq!(seen.histogram("mutextree_acquire_seconds", &labels).len(), 1, "{outcome}: {seen:#?}");
    }
    assert_eq!(seen.histogram("mutextree_hold_seconds", &store).len(), 1, "{seen:#?}");
    assert_eq!(seen.counter("mutextree_lost_total", &store), 0);
}

/// A wait that times out behind a holder: each refusal and each wake-up is
/// an event inside the `acquire` span, the acquisition counts among the
/// waiters while it waits and no longer after, and its outcome is
/// `timed_out`.
pub fn a_timed_out_wait_is_traced(paused: bool, store_name: &str, store: Arc<dyn LockBackend>) {
    let seen = observe(paused, || async move {
        let holder = lock(&store, "dc", "holder", Duration::from_secs(60));
        holder.try_acquire().await.expect("granted");
        let waiting = Arc::new(Notify::new());
        let told = waiting.clone();
        let waiter = TreeLock::builder(store.clone(), "dc/rack")
            .owner("waiter")
            .on_wait(move |_| told.notify_one())
            .build()
            .expect("lock");
        let wait = tokio::spawn(async move { waiter.acquire_with(Wait::For(Duration::from_secs(2))).await });
        waiting.notified().await;
        assert!(matches!(wait.await.expect("task"), Err(Error::Timeout { .. })));
        holder.release().await.expect("released");
    });
    let acquire = &seen.spans("acquire")[1];
    assert_eq!(acquire.field("outcome"), "timed_out", "{acquire:?}");
    assert!(acquire.field("waited").parse::<f64>().expect("waited") >= 2.0, "{acquire:?}");
    assert!(!seen.events("refused").is_empty() && !seen.events("woken").is_empty(), "{seen:#?}");
    assert!(seen.events("woken").iter().all(|event| event.field("blocker").contains("\"holder\"")), "{seen:#?}");
    let labels = [("store", store_name), ("outcome", "timed_out")];
    assert_eq!(seen.histogram("mutextree_acquire_seconds", &labels).len(), 1, "{seen:#?}");
    let waiters = seen.gauge("mutextree_waiters", &[("store", store_name)]);
    assert_eq!(waiters, [1.0, 0.0], "one waiter while it waited, none after: {seen:#?}");
}

/// A kept lock whose refresh is refused (someone else released it behind
/// its back) is lost at its next refresh: a WARN `lost` span with the
/// reason, the token and how long it was held, a WARN event in words, and
/// the loss counted by reason with its hold. An unkept lock whose ttl ran
/// out is reported `expired` once its handle finds out (at its next
/// acquisition); a lock forcibly released, `forced_release` at once.
pub fn losses_are_traced_with_their_reason(paused: bool, store_name: &str, store: Arc<dyn LockBackend>) {
    let ttl = Duration::from_secs(3);
    let seen = observe(paused, || async move {
        let kept = TreeLock::builder(store.clone(), "dc/kept").owner("kept").ttl(ttl).auto_refresh(true).build();
        let kept = kept.expect("lock");
        let grant = kept.try_acquire().await.expect("granted");
        store.release(&grant).await.expect("released behind its back");
        assert!(matches!(kept.lost().await, Error::Lost { .. }));

        let unkept = lock(&store, "dc/unkept", "unkept", ttl);
        unkept.try_acquire().await.expect("granted");
        tokio::time::sleep(ttl * 2).await;
        unkept.try_acquire().await.expect("granted again");
        unkept.release().await.expect("released");

        let revoked = lock(&store, "dc/revoked", "revoked", ttl);
        let grant = revoked.try_acquire().await.expect("granted");
        let lost = revoked.lost();
        tokio::time::sleep(ttl / 2).await;
        store.revoke(&grant).await.expect("revoked");
        assert!(matches!(lost.await, Error::Lost { .. }));
    });
    let losses = seen.spans("lost");
    assert_eq!(losses.len(), 3, "{seen:#?}");
    let granted = seen.spans("acquire");
    for (loss, owner, reason, acquire) in [
        (losses[0], "kept", "refresh_refused", granted[0]),
        (losses[1], "unkept", "expired", granted[1]),
        (losses[2], "revoked", "forced_release", granted[3]),
    ] {
        assert_eq!(loss.field("store"), store_name, "{loss:?}");
        assert_eq!(loss.field("owner"), format!("\"{owner}\""), "{loss:?}");
        assert_eq!(loss.field("reason"), reason, "{loss:?}");
        assert_eq!(loss.field("token"), acquire.field("token"), "{loss:?}");
        assert!(loss.field("held").parse::<f64>().expect("held") >= ttl.as_secs_f64() / 3.0, "{loss:?}");
        let labels = [("store", store_name), ("reason", reason)];
        assert_eq!(seen.counter("mutextree_lost_total", &labels), 1, "{reason}: {seen:#?}");
    }
    let told: Vec<_> = seen.events.iter().filter(|event| event.span == Some("lost")).collect();
    assert_eq!(told.len(), 3, "{seen:#?}");
    assert!(told.iter().all(|event| event.level == Level::WARN && !event.field("message").is_empty()), "{told:?}");
    // Three losses and one release: four holds.
    assert_eq!(seen.histogram("mutextree_hold_seconds", &[("store", store_name)]).len(), 4, "{seen:#?}");
    let margins = seen.histogram("mutextree_refresh_margin_seconds", &[("store", store_name)]);
    assert!(margins.is_empty(), "the kept lock's only refresh was refused: {margins:?}");
}

/// A kept lock is refreshed when a third of its ttl has passed: each
/// `refresh` span says `ok`, and the margin histogram records the life it
/// had left (two thirds of the ttl).
pub fn refreshes_are_traced_with_their_margin(paused: bool, store_name: &str, store: Arc<dyn LockBackend>) {
    let ttl = Duration::from_secs(3);
    let seen = observe(paused, || async move {
        let kept = TreeLock::builder(store.clone(), "dc").owner("kept").ttl(ttl).auto_refresh(true).build();
        let kept = kept.expect("lock");
        kept.try_acquire().await.expect("granted");
        tokio::time::sleep(ttl + ttl / 2).await;
        kept.release().await.expect("released");
    });
    let refreshes = seen.spans("refresh");
    assert!(refreshes.len() >= 2, "{seen:#?}");
    assert!(refreshes.iter().all(|span| span.field("outcome") == "ok"), "{refreshes:?}");
    let margins = seen.histogram("mutextree_refresh_margin_seconds", &[("store", store_name)]);
    assert_eq!(margins.len(), refreshes.len(), "{seen:#?}");
    let expected = ttl.as_secs_f64() * 2.0 / 3.0;
    assert!(margins.iter().all(|margin| (margin - expected).abs() < 0.5), "about {expected} s left each: {margins:?}");
}
