//! The values that cross the [`LockBackend`](crate::LockBackend) contract:
//! validated inputs ([`Owner`], [`Ttl`], [`Namespace`], [`Mode`],
//! [`LockItems`], [`LockRequest`]) and the store's answers ([`Grant`],
//! [`HeldLock`], [`Blockers`], [`Attempt`]).
//!
//! # Modes and items
//!
//! A grant is a set of items, each a path and a [`Mode`]. Two live items of
//! different grants conflict iff their paths are comparable (equal, or one
//! an ancestor of the other) and not both [`Mode::Shared`]:
//!
//! | held \ asked, comparable paths | Shared | Exclusive |
//! | --- | --- | --- |
//! | Shared | granted | refused |
//! | Exclusive | refused | refused |
//!
//! This is Gray's multi-granularity matrix with the intention modes implicit
//! on the ancestors: a Shared lock on `[A]` covers the whole subtree, so it
//! refuses an Exclusive lock on `[A, B, C]` as well as on `[A]`. Siblings
//! never conflict, whatever their modes. The same owner conflicts too: tree
//! locks are not re-entrant.
//!
//! Inputs can only be built through constructors that check them, so a store
//! never sees an empty owner, a zero ttl or an over-long path: bad input is
//! refused before anything is sent.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::path::LockPath;
use crate::text::human;

/// Who holds a lock: an id chosen by the caller, or `hostname:pid:random`
/// ([`Owner::random`]).
///
/// 1 to [`Owner::MAX_BYTES`] bytes of UTF-8 with no control characters, so
/// it prints on one line and fits every store. Release and refresh need the
/// fencing token as well, so two handles sharing an owner id still cannot
/// release each other's grants.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub(crate) Arc<str>);

impl Owner {
    /// Longest accepted owner id, in bytes.
    pub const MAX_BYTES: usize = 255;

    /// A fresh id that says where it was made: `hostname:pid:random`, with
    /// 8 random hex digits (e.g. `build-7:4121:9f3a0c12`), so that a
    /// listing of who holds what points at a machine and a process. The
    /// host name is cut to 200 bytes and cleared of control characters.
    pub fn random() -> Self {
        // The host part, read once per process.
        static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let host = HOST.get_or_init(|| {
            let host: String = hostname().chars().filter(|c| !c.is_control()).collect();
            let mut cut = host.len().min(200);
            while !host.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 {
                "localhost".to_owned()
            } else {
                host[..cut].to_owned()
            }
        });
        Owner(format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..)).into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner({:?})", &*self.0)
    }
}

/// How long a lock lives unless refreshed or released: from 1 ms to
/// [`Ttl::MAX`], counted in whole milliseconds (finer values round up).
///
/// A store with a coarser clock (etcd leases count whole seconds from 2 s)
/// may round it up further; the [`Grant`] says which ttl was applied.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ttl(pub(crate) Duration);

impl Ttl {
    /// The shortest ttl.
    pub const MIN: Duration = Duration::from_millis(1);
    /// The longest ttl: one day. Longer work keeps a shorter lock refreshed.
    pub const MAX: Duration = Duration::from_secs(24 * 60 * 60);

    /// The ttl as a duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// The ttl in whole milliseconds.
    pub fn as_millis(self) -> u64 {
        self.0.as_millis() as u64
    }
}

impl fmt::Debug for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ttl({})", human(self.0))
    }
}

/// The name that keeps one application's locks apart from another's on a
/// shared store: 1 to [`Namespace::MAX_BYTES`] ASCII letters, digits and
/// `_ - . :`.
///
/// The character set is narrow on purpose: the name becomes part of Redis
/// keys (inside a `{hash tag}`, so braces are out), of etcd key prefixes and
/// of PostgreSQL values, and must mean the same thing in all of them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(pub(crate) Arc<str>);

impl Namespace {
    /// Longest accepted namespace, in bytes.
    pub const MAX_BYTES: usize = 100;

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Namespace {
    /// `mutextree`.
    fn default() -> Self {
        Namespace("mutextree".into())
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({:?})", &*self.0)
    }
}

/// How an item of a grant holds its subtree.
///
/// # Modes
///
/// Two live items of different grants conflict iff their paths are
/// comparable (equal, or one an ancestor of the other) and not both
/// Shared; the same owner conflicts too (tree locks are not re-entrant):
///
/// | held \ asked, comparable paths | Shared | Exclusive |
/// | --- | --- | --- |
/// | Shared | granted | refused |
/// | Exclusive | refused | refused |
///
/// A Shared item on `[A]` covers the whole subtree: it refuses an Exclusive
/// item on `[A]`, on an ancestor and on any descendant such as `[A, B, C]`.
/// Siblings never conflict, whatever their modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Readers: any number of Shared items coexist on comparable paths, and
    /// keep every Exclusive item off the node, its ancestors and its whole
    /// subtree.
    Shared,
    /// A writer (the default): no other item on the node, an ancestor or a
    /// descendant.
    #[default]
    Exclusive,
}

impl Mode {
    /// Whether an item in this mode and one in `other` on comparable paths
    /// of different grants conflict: unless both are Shared.
    pub fn conflicts_with(self, other: Mode) -> bool {
        self == Mode::Exclusive || other == Mode::Exclusive
    }

    /// `shared` or `exclusive`, as stores record it and the command line
    /// prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One part of a grant: a node and how it is held.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockItem {
    /// The node; the item covers its whole subtree.
    pub path: LockPath,
    /// How.
    pub mode: Mode,
}

impl fmt::Display for LockItem {
    /// `A/B` for an Exclusive item, `A/B (shared)` for a Shared one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            Mode::Exclusive => write!(f, "{}", self.path),
            Mode::Shared => write!(f, "{} (shared)", self.path),
        }
    }
}

/// The items of one request or grant, normalised: 1 to
/// [`LockItems::MAX`], in key order, no two on comparable paths. Made by
/// [`LockItems::new`] (which normalises and checks) or
/// [`LockItems::one`].
///
/// Because no two items are comparable, each path of the tree is covered by
/// at most one item, and a store can check and place the items one by one
/// within its atomic step.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LockItems(pub(crate) Arc<[LockItem]>);

impl LockItems {
    /// The most items one request may have.
    pub const MAX: usize = 16;

    /// A single item.
    pub fn one(path: LockPath, mode: Mode) -> Self {
        LockItems(Arc::new([LockItem { path, mode }]))
    }

    /// The items, in key order.
    pub fn iter(&self) -> std::slice::Iter<'_, LockItem> {
        self.0.iter()
    }

    /// How many items (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a request has at least one item. (For clippy's sake.)
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first item in key order: the only one of a single-path request.
    pub fn first(&self) -> &LockItem {
        &self.0[0]
    }

    /// Whether this is one Exclusive item: what the seed's locks were, and
    /// all the stepwise algorithm can grant.
    pub fn is_single_exclusive(&self) -> bool {
        self.0.len() == 1 && self.0[0].mode == Mode::Exclusive
    }

    /// Whether any item is in `mode`.
    pub fn any(&self, mode: Mode) -> bool {
        self.0.iter().any(|item| item.mode == mode)
    }

    /// The same paths, every item in `mode` (an upgrade or a downgrade).
    pub fn with_mode(&self, mode: Mode) -> Self {
        LockItems(self.0.iter().map(|item| LockItem { path: item.path.clone(), mode }).collect())
    }

    /// The first item, in key order, that an item of another grant on
    /// `path` held in `mode` conflicts with.
    pub fn blocked_by(&self, path: &LockPath, mode: Mode) -> Option<&LockItem> {
        self.0.iter().find(|item| item.path.overlaps(path) && item.mode.conflicts_with(mode))
    }
}

impl<'a> IntoIterator for &'a LockItems {
    type Item = &'a LockItem;
    type IntoIter = std::slice::Iter<'a, LockItem>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for LockItems {
    /// `A/B`, or `A/B (shared)`, or several joined by `, `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, item) in self.0.iter().enumerate() {
            if at > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for LockItems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

/// Whether a request that has to wait queues behind the waiters before it.
///
/// # Fair waiting
///
/// A [`Fair`](Fairness::Fair) request that has to wait takes a *ticket*
/// (from the namespace's token counter) and a *reservation*: its items,
/// owner and ticket, which live [`RESERVATION_TTL`] unless the waiter
/// renews them (each of its attempts does). A request is granted iff no
/// live grant conflicts with it *and* no live reservation with a smaller
/// ticket conflicts with it. A request that does not wait has no ticket (it
/// comes after every waiter): it never passes a conflicting waiter. A
/// reservation that does not conflict delays nobody; a dead waiter's
/// reservation is gone within [`RESERVATION_TTL`]. Wait-for edges point
/// only at grants or at smaller tickets, so waiting never deadlocks.
///
/// [`Barging`](Fairness::Barging) is the older rule: reservations are
/// neither written nor looked at, and whoever asks first after a release
/// gets the lock, which is faster under contention but can starve a waiter
/// on an ancestor behind a stream of locks below it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fairness {
    /// First come, first served across the tree (the default).
    #[default]
    Fair,
    /// No queue: the first attempt after a release wins.
    Barging,
}

/// How long a waiter's reservation lives unless the waiter renews it: how
/// long a waiter that died blocks the requests behind it at most.
pub const RESERVATION_TTL: Duration = Duration::from_secs(3);

/// Where one attempt stands with respect to the waiters' queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Barging: reservations are neither looked at nor written.
    Barge,
    /// Fair, without waiting: refused by a conflicting live reservation
    /// (whatever its ticket); nothing is written on a refusal.
    #[default]
    Try,
    /// Fair, the first attempt of a wait: as [`Queue::Try`], but a refusal
    /// takes a ticket and writes a reservation, in the same atomic step,
    /// and answers [`Attempt::Queued`].
    Join,
    /// Fair, a later attempt of the wait that holds this ticket: refused
    /// only by conflicting reservations with smaller tickets. A refusal
    /// renews the reservation for [`RESERVATION_TTL`] (writing it again if
    /// it lapsed) and answers [`Attempt::Queued`]; a grant removes it, in
    /// the same atomic step.
    Waiting(u64),
}

/// A request to lock `items` for `owner` during `ttl`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRequest {
    /// The nodes to lock, and how.
    pub items: LockItems,
    /// Who will hold them.
    pub owner: Owner,
    /// How long the grant lives unless refreshed or released.
    pub ttl: Ttl,
    /// Where this attempt stands in the waiters' queue (default
    /// [`Queue::Try`]).
    pub queue: Queue,
}

impl LockRequest {
    /// A request for one Exclusive item, from already-validated parts.
    pub fn new(path: LockPath, owner: Owner, ttl: Ttl) -> Self {
        LockRequest { items: LockItems::one(path, Mode::Exclusive), owner, ttl, queue: Queue::default() }
    }

    /// A request for `items`, from already-validated parts.
    pub fn of(items: LockItems, owner: Owner, ttl: Ttl) -> Self {
        LockRequest { items, owner, ttl, queue: Queue::default() }
    }

    /// This request at another place in the queue.
    pub fn in_queue(&self, queue: Queue) -> Self {
        LockRequest { queue, ..self.clone() }
    }

    /// The first item's path: the only one of a single-path request.
    pub fn path(&self) -> &LockPath {
        &self.items.first().path
    }
}

/// What a single-key lock is for, in the stepwise algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// A lock the owner holds on its node until release or expiry.
    Lock,
    /// A parent lock the stepwise algorithm holds for a moment on its way to
    /// the node below; others retry past it instead of giving up.
    Transient,
}

/// A granted lock: what release and refresh need, and the fencing token to
/// hand to the resource it protects. All its items share the token, the
/// owner and the expiry: release, refresh and loss apply to every item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The locked nodes and their modes.
    pub items: LockItems,
    /// Its holder.
    pub owner: Owner,
    /// Strictly greater than every token granted before in the namespace:
    /// a protected resource that remembers the highest token it has seen can
    /// refuse a holder that lost its lock without knowing it.
    pub token: u64,
    /// The ttl the store applied (a store may round the requested one up).
    pub ttl: Duration,
    /// When the lock expires at the latest, on this process's clock: the
    /// moment the request was sent plus the ttl. The store may drop it
    /// earlier (never later) from this process's point of view.
    pub expires_at: Instant,
    /// Whether this is a stepwise algorithm's transient parent lock.
    pub kind: LockKind,
}

impl Grant {
    /// A grant made by a store for `request`, which was sent at `sent_at`.
    pub fn new(request: &LockRequest, kind: LockKind, token: u64, ttl: Duration, sent_at: Instant) -> Self {
        Grant {
            items: request.items.clone(),
            owner: request.owner.clone(),
            token,
            ttl,
            expires_at: sent_at + ttl,
            kind,
        }
    }

    /// The first item's path: the only one of a single-path grant.
    pub fn path(&self) -> &LockPath {
        &self.items.first().path
    }

    /// How long this process can still count on the lock.
    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Whether the lock has certainly expired by now.
    pub fn is_expired(&self) -> bool {
        self.remaining().is_zero()
    }
}

/// A live item of a grant as a store reports it: in a listing (one entry
/// per item; the items of one grant share its token), or as the reason an
/// acquisition was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The locked node.
    pub path: LockPath,
    /// How it is held.
    pub mode: Mode,
    /// Its holder.
    pub owner: Owner,
    /// Its fencing token.
    pub token: u64,
    /// Its remaining life by the store's clock when the store answered.
    pub remaining: Duration,
    /// Whether it is a stepwise client's transient parent lock.
    pub transient: bool,
    /// Whether this is a waiter's reservation rather than a grant: then
    /// `token` is its ticket, and `remaining` the life of the reservation
    /// unless the waiter renews it.
    pub waiting: bool,
    /// For a reservation, how long its waiter had been in line when the
    /// store answered (since the attempt that took its ticket, by the
    /// store's clock; etcd, which keeps no time, reports the waiter's own).
    /// Zero for a grant.
    pub waited: Duration,
}

impl fmt::Display for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = if self.mode == Mode::Shared { " shared" } else { "" };
        if self.waiting {
            return write!(f, "{} awaited{shared} by {} (ticket {})", self.path, self.owner, self.token);
        }
        write!(
            f,
            "{} held{shared} by {} for {} more (fencing token {})",
            self.path,
            self.owner,
            human(self.remaining),
            self.token
        )?;
        if self.transient {
            f.write_str(", transient")?;
        }
        Ok(())
    }
}

/// What refused a request: a live item in the way of each blocked item of
/// the request (at least one), in the request's item order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blockers(Vec<HeldLock>);

impl Blockers {
    /// One blocker, then those of the request's other blocked items.
    pub fn new(first: HeldLock, rest: impl IntoIterator<Item = HeldLock>) -> Self {
        let mut all = vec![first];
        all.extend(rest);
        Blockers(all)
    }

    /// The blocker of the first blocked item.
    pub fn first(&self) -> &HeldLock {
        &self.0[0]
    }

    /// Every blocker, in the request's item order.
    pub fn iter(&self) -> std::slice::Iter<'_, HeldLock> {
        self.0.iter()
    }

    /// How many items were blocked (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a refusal has a blocker. (For clippy's sake.)
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The blockers, in the request's item order.
    pub fn into_vec(self) -> Vec<HeldLock> {
        self.0
    }
}

impl From<HeldLock> for Blockers {
    fn from(blocker: HeldLock) -> Self {
        Blockers(vec![blocker])
    }
}

impl<'a> IntoIterator for &'a Blockers {
    type Item = &'a HeldLock;
    type IntoIter = std::slice::Iter<'a, HeldLock>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The answer to one attempt at a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The lock is held now.
    Granted(Grant),
    /// Live items (grants, or for a fair request earlier waiters'
    /// reservations) are in the way: one for each blocked item.
    Blocked(Blockers),
    /// Refused, as [`Attempt::Blocked`], and the request now waits in the
    /// queue with this ticket: the answer to a [`Queue::Join`] or
    /// [`Queue::Waiting`] request that was refused.
    Queued {
        /// The request's ticket: its place in the queue.
        ticket: u64,
        /// What is in the way.
        blockers: Blockers,
    },
}

impl Attempt {
    /// The grant, if the attempt succeeded.
    pub fn granted(self) -> Option<Grant> {
        match self {
            Attempt::Granted(grant) => Some(grant),
            Attempt::Blocked(_) | Attempt::Queued { .. } => None,
        }
    }
}

/// This machine's name, as `hostname` prints it, or empty if it cannot be
/// told (the caller falls back to `localhost`).
fn hostname() -> String {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let from_env = || std::env::var("HOSTNAME").or_else(|_| std::env::var("COMPUTERNAME")).ok();
    from_kernel.or_else(from_env).map(|name| name.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_owner_names_the_host_and_the_process() {
        let owner = Owner::random();
        let mut parts = owner.as_str().rsplitn(3, ':');
        let (random, pid, host) = (parts.next(), parts.next(), parts.next());
        assert_eq!(pid, Some(std::process::id().to_string().as_str()), "{owner}");
        assert!(random.is_some_and(|r| r.len() == 8 && r.chars().all(|c| c.is_ascii_hexdigit())), "{owner}");
        assert!(host.is_some_and(|h| !h.is_empty()), "{owner}");
        assert_ne!(Owner::random(), owner, "two handles of one process get different ids");
        assert!(Owner::new(owner.as_str()).is_ok(), "it passes the owner rules");
    }

    #[test]
    fn ttl_rules() {
        assert!(Ttl::new(Duration::ZERO).expect_err("zero").to_string().contains("greater than zero"));
        assert!(Ttl::new(Duration::MAX).expect_err("huge").to_string().contains("at most"));
        assert_eq!(Ttl::new(Duration::from_micros(1)).expect("1 µs").get(), Duration::from_millis(1));
        assert_eq!(Ttl::new(Duration::from_micros(1_500)).expect("1.5 ms").as_millis(), 2);
        assert_eq!(Ttl::new(Ttl::MAX).expect("max").get(), Ttl::MAX);
    }

    #[test]
    fn owner_rules() {
        assert!(Owner::new("").is_err());
        assert!(Owner::new("a\nb").is_err());
        assert!(Owner::new("x".repeat(1 << 20)).expect_err("1 MiB").to_string().len() < 300);
        assert_eq!(Owner::new("web-1 (pid 7)").expect("ok").as_str(), "web-1 (pid 7)");
        assert_ne!(Owner::random(), Owner::random());
    }

    #[test]
    fn namespace_rules() {
        for bad in ["", "{x}", "a}b", "a b", "é", "{"] {
            assert!(Namespace::new(bad).is_err(), "{bad:?}");
        }
        assert!(Namespace::new("x".repeat(101)).is_err());
        assert_eq!(Namespace::new("app:locks-1.2_b").expect("ok").as_str(), "app:locks-1.2_b");
    }
}
