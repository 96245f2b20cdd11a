//! The store: a map of namespaces, each a [`MemoryBackend`], whose grants
//! follow the scheme described in the crate docs (one tree per namespace,
//! under one mutex, with per-mode counts of the items below each node, and
//! the waiters' reservations on a second tree beside it).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use hashbrown::hash_map::Entry as Slot;
use mutextree_core::backend::{
    async_trait, Attempt, ChangeFeed, Check, Listener, LockKind, LockRequest, Queue, Revocation, RevocationListener,
    Revocations, StoreLabels, RESERVATION_TTL,
};
use mutextree_core::{
    Blockers, Error, Grant, HeldLock, LockBackend, LockItem, LockItems, LockPath, Mode, Namespace, Owner, Ttl,
    MAX_DEPTH,
};
use tokio::task::coop::consume_budget;
use tokio::time::Instant;

/// A fast hasher that is still seeded per map (paths come from users).
type Hasher = foldhash::fast::RandomState;

/// hashbrown's map rather than std's for `entry_ref`: one lookup finds an
/// entry or makes it, allocating its key only when it is new.
type HashMap<K, V> = hashbrown::HashMap<K, V, Hasher>;

/// A store: independent namespaces, each a [`MemoryBackend`].
///
/// Cheap to clone; clones share the namespaces. Backends for the same
/// namespace name share their locks, like two clients of one server.
#[derive(Clone, Default)]
pub struct MemoryStore {
    namespaces: Arc<DashMap<Namespace, Arc<Space>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// The backend of one namespace (made on first use).
    pub fn backend(&self, name: &str) -> Result<MemoryBackend, Error> {
        let name = Namespace::new(name)?;
        let space = self.namespaces.entry(name.clone()).or_insert_with(|| Arc::new(Space::new(name))).clone();
        Ok(MemoryBackend { space })
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").field("namespaces", &self.namespaces.len()).finish()
    }
}

/// One namespace of a [`MemoryStore`]: the [`LockBackend`].
#[derive(Clone)]
pub struct MemoryBackend {
    space: Arc<Space>,
}

impl MemoryBackend {
    /// A backend on a fresh store of its own, namespace `mutextree`.
    pub fn new() -> Self {
        MemoryBackend { space: Arc::new(Space::new(Namespace::default())) }
    }

    /// Removes every expired lock and reservation and every empty entry
    /// now (it also happens by itself, every time as many tokens were taken
    /// as there are entries).
    pub fn sweep(&self) {
        self.space.tree().sweep(Instant::now());
    }

    /// How many map entries the namespace holds now: one per node with
    /// items of grants on it or below it, one per node with items of
    /// reservations on it or below it, and the empty ones left for the next
    /// [`sweep`](Self::sweep). Zero after a sweep once every lock is
    /// released or expired and every reservation is gone (granted,
    /// withdrawn or lapsed).
    pub fn entries(&self) -> usize {
        self.space.tree().entries()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend").field("namespace", &self.space.name).field("entries", &self.entries()).finish()
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        consume_budget().await;
        Ok(self.space.grant(request, kind, Check::KeyOnly))
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        consume_budget().await;
        self.space.release(grant)
    }

    /// Released, then announced to the holders of this store in this
    /// process (the only place its locks are held).
    async fn revoke(&self, grant: &Grant) -> Result<(), Error> {
        consume_budget().await;
        self.space.release(grant)?;
        self.space.revocations.announce(Revocation::of(grant));
        Ok(())
    }

    fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        self.space.revocations.listen(grant)
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        consume_budget().await;
        self.space.tree().refresh(grant, ttl, Instant::now())
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        consume_budget().await;
        Ok(self.space.tree().list(under, Instant::now()))
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        consume_budget().await;
        Ok(self.space.grant(request, LockKind::Lock, Check::Tree))
    }

    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        consume_budget().await;
        self.space.change_mode(grant, mode)
    }

    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        consume_budget().await;
        self.space.withdraw(owner, ticket);
        Ok(())
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        consume_budget().await;
        Ok(self.space.tree().queue.list(under, Instant::now()))
    }

    fn labels(&self) -> StoreLabels<'_> {
        StoreLabels { store: "memory", namespace: self.space.name.as_str() }
    }

    /// Every release or purge in the namespace wakes every waiter (an
    /// in-process wake-up is cheap); `items` are not used to filter.
    fn listen(&self, _items: &LockItems) -> Listener {
        self.space.feed.listen()
    }
}

/// One namespace: its tree, the wake-ups of its waiters, and the
/// revocations its holders listen for.
struct Space {
    name: Namespace,
    tree: Mutex<Tree>,
    feed: ChangeFeed,
    revocations: Revocations,
}

impl Space {
    fn new(name: Namespace) -> Self {
        Space { name, tree: Mutex::new(Tree::default()), feed: ChangeFeed::new(), revocations: Revocations::new() }
    }

    /// The tree, locked. No code panics while holding it (a panic would be
    /// a bug of this store); if one did, the tree it left is still used
    /// rather than failing every later call.
    fn tree(&self) -> MutexGuard<'_, Tree> {
        self.tree.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn grant(&self, request: &LockRequest, kind: LockKind, check: Check) -> Attempt {
        let (attempt, purged) = self.tree().grant(request, kind, check, Instant::now());
        if purged {
            self.feed.notify();
        }
        attempt
    }

    fn release(&self, grant: &Grant) -> Result<(), Error> {
        let outcome = self.tree().release(grant, Instant::now());
        if outcome.is_some() {
            self.feed.notify();
        }
        match outcome {
            Some(true) => Ok(()),
            _ => Err(Error::not_held(grant)),
        }
    }

    fn withdraw(&self, owner: &Owner, ticket: u64) {
        let withdrawn = self.tree().queue.remove(owner, ticket);
        // The requests it held back may go now.
        if withdrawn {
            self.feed.notify();
        }
    }

    fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        let changed = self.tree().change_mode(grant, mode, Instant::now());
        // A downgrade lets readers in.
        if mode == Mode::Shared && matches!(changed, Ok(Attempt::Granted(_))) {
            self.feed.notify();
        }
        changed
    }
}

/// Which of a node's per-mode counts.
fn slot(mode: Mode) -> usize {
    match mode {
        Mode::Shared => 0,
        Mode::Exclusive => 1,
    }
}

/// The locks of one namespace, and its waiters' reservations.
#[derive(Default)]
struct Tree {
    /// The items of the grants.
    grants: Layer,
    /// The reservations of fair waiters.
    queue: Reservations,
    last_token: u64,
    /// The token counter's value at the last sweep.
    last_sweep_token: u64,
}

/// Items on the nodes of one tree: the grants', or the reservations'.
#[derive(Default)]
struct Layer {
    /// One entry per node with items on it or counted below it (and the
    /// empty ones left for the next sweep, so that the next grant on the
    /// same nodes allocates nothing).
    nodes: HashMap<String, Node>,
}

/// The waiters' reservations: their items on a layer of their own, so
/// that the grants' checks and counts never meet them and a namespace
/// without waiters pays nothing for them, and each reservation by ticket,
/// for a withdrawal, which names only the ticket.
#[derive(Default)]
struct Reservations {
    layer: Layer,
    by_ticket: HashMap<u64, Waiter>,
}

/// Whose a reservation is, and what it reserves.
struct Waiter {
    items: LockItems,
    owner: Owner,
}

/// What an entry belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A grant.
    Lock,
    /// A stepwise client's transient parent lock.
    Transient,
    /// A waiter's reservation; its token is the ticket.
    Reservation,
}

impl From<LockKind> for Kind {
    fn from(kind: LockKind) -> Self {
        match kind {
            LockKind::Lock => Kind::Lock,
            LockKind::Transient => Kind::Transient,
        }
    }
}

/// An item of a grant or a reservation, on its node. Each item carries
/// the whole of what it belongs to (shared, not copied: `LockItems` and
/// `Owner` are reference counted), so that any item found leads to the
/// others, and a grant of one item (the common case) costs one entry and
/// no table beside the tree.
struct Entry {
    token: u64,
    mode: Mode,
    items: LockItems,
    owner: Owner,
    expires_at: Instant,
    /// When the grant or reservation was written (a reservation's
    /// renewals keep it: its waiter is in line since then).
    placed_at: Instant,
    kind: Kind,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn is(&self, grant: &Grant) -> bool {
        self.token == grant.token && self.owner == grant.owner
    }

    fn held(&self, key: &str, now: Instant) -> HeldLock {
        let path = self
            .items
            .iter()
            .find(|item| item.path.key() == key)
            .map_or_else(|| self.items.first().path.clone(), |item| item.path.clone());
        HeldLock {
            path,
            mode: self.mode,
            owner: self.owner.clone(),
            token: self.token,
            remaining: self.expires_at.saturating_duration_since(now),
            transient: self.kind == Kind::Transient,
            waiting: self.kind == Kind::Reservation,
            waited: match self.kind {
                Kind::Reservation => now.saturating_duration_since(self.placed_at),
                _ => Duration::ZERO,
            },
        }
    }
}

#[derive(Default)]
struct Node {
    /// The items on this node.
    items: Vec<Entry>,
    /// Items below this node, per mode, by the key of the child they lie
    /// under.
    below: HashMap<String, [u32; 2]>,
    below_total: [u32; 2],
}

impl Node {
    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.below_total == [0, 0]
    }

    /// How many items below could conflict with an item in `mode`.
    fn conflicting_below(counts: &[u32; 2], mode: Mode) -> u32 {
        match mode {
            Mode::Shared => counts[slot(Mode::Exclusive)],
            Mode::Exclusive => counts[0] + counts[1],
        }
    }

    fn entry(&self, token: u64) -> Option<&Entry> {
        self.items.iter().find(|entry| entry.token == token)
    }
}

/// The keys from the root down to the node a key names: `a/b/` gives
/// `a/`, `a/b/` (encoded segments never contain `/`). On the stack: a grant
/// allocates nothing it does not keep.
struct Levels<'k> {
    keys: [&'k str; MAX_DEPTH],
    len: usize,
}

impl<'k> Levels<'k> {
    fn of(key: &'k str) -> Self {
        let mut levels = Levels { keys: [""; MAX_DEPTH], len: 0 };
        for (at, _) in key.match_indices('/') {
            levels.keys[levels.len] = &key[..=at];
            levels.len += 1;
        }
        levels
    }
}

impl<'k> std::ops::Deref for Levels<'k> {
    type Target = [&'k str];

    fn deref(&self) -> &[&'k str] {
        &self.keys[..self.len]
    }
}

/// An expired grant or reservation met on the way: the key of one of its
/// items, and its token.
type Expired = (Box<str>, u64);

/// Which entries a check counts.
#[derive(Clone, Copy)]
struct Among {
    /// A grant left out (one changing its mode).
    skip: Option<u64>,
    /// Only tokens below this one: a waiter defers to earlier tickets only.
    before: u64,
}

impl Among {
    /// Every entry.
    const ALL: Among = Among { skip: None, before: u64::MAX };

    fn counts(self, token: u64) -> bool {
        token < self.before && Some(token) != self.skip
    }
}

impl Tree {
    /// Grants every item of `request` or none, and keeps the request's
    /// reservation as its queue says, in the same step. Returns whether
    /// expired grants or reservations were purged on the way (waiters may
    /// want to hear it).
    fn grant(&mut self, request: &LockRequest, kind: LockKind, check: Check, now: Instant) -> (Attempt, bool) {
        let mut expired = Vec::new();
        let mut lapsed = Vec::new();
        // The reservations this request defers to: none when it barges, for
        // the stepwise primitive, or while there are none, so that a grant
        // in a namespace without waiters looks no further than today.
        let behind = match (check, request.queue) {
            (Check::KeyOnly, _) | (Check::Tree, Queue::Barge) => None,
            _ if self.queue.is_empty() => None,
            (Check::Tree, Queue::Try | Queue::Join) => Some(Among::ALL),
            (Check::Tree, Queue::Waiting(ticket)) => Some(Among { skip: None, before: ticket }),
        };
        let mut blockers = Vec::new();
        // Each item is checked and counted above in one pass over its
        // ancestors; the counts are taken back if any item is refused.
        // Which items were counted: a bit each (at most 16 items).
        let mut counted = 0u32;
        for (at, item) in request.items.iter().enumerate() {
            let blocker = match check {
                // A grant in the way is named before a reservation.
                Check::Tree => self.grants.check_and_count(item, now, &mut expired).or_else(|| {
                    let waiter = self.queue.layer.blocker(item, behind?, now, &mut lapsed)?;
                    self.grants.count(item.path.key(), item.mode, -1);
                    Some(waiter)
                }),
                Check::KeyOnly => self.grants.holder_of_key(item.path.key(), now, &mut expired).or_else(|| {
                    self.grants.count(item.path.key(), item.mode, 1);
                    None
                }),
            };
            match blocker {
                Some(blocker) => blockers.push(blocker),
                None => counted |= 1 << at,
            }
        }
        let purged = !expired.is_empty() || !lapsed.is_empty();
        let refused = !blockers.is_empty();
        if refused {
            for (at, item) in request.items.iter().enumerate() {
                if counted & (1 << at) != 0 {
                    self.grants.count(item.path.key(), item.mode, -1);
                }
            }
        }
        // Purged after the counts are settled: a purge uncounts too.
        for (key, token) in expired {
            self.grants.purge(&key, token, now);
        }
        for (key, ticket) in lapsed {
            self.queue.purge(&key, ticket, now);
        }
        let mut blockers = blockers.into_iter();
        if let Some(first) = blockers.next() {
            let blockers = Blockers::new(first, blockers);
            let ticket = match (check, request.queue) {
                (Check::Tree, Queue::Join) => self.next_token(),
                (Check::Tree, Queue::Waiting(ticket)) => ticket,
                _ => return (Attempt::Blocked(blockers), purged),
            };
            self.queue.keep(ticket, request, now);
            self.maybe_sweep(now);
            return (Attempt::Queued { ticket, blockers }, purged);
        }
        if let (Check::Tree, Queue::Waiting(ticket)) = (check, request.queue) {
            self.queue.remove(&request.owner, ticket);
        }
        let token = self.next_token();
        let ttl = request.ttl.get();
        let (owner, expires_at) = (&request.owner, now + ttl);
        for item in &request.items {
            let entry = Entry {
                token,
                mode: item.mode,
                items: request.items.clone(),
                owner: owner.clone(),
                expires_at,
                placed_at: now,
                kind: kind.into(),
            };
            self.grants.node_mut(item.path.key()).items.push(entry);
        }
        self.maybe_sweep(now);
        (Attempt::Granted(Grant::new(request, kind, token, ttl, now)), purged)
    }

    /// The next token of the namespace: a grant's, or a waiter's ticket.
    fn next_token(&mut self) -> u64 {
        self.last_token += 1;
        self.last_token
    }

    fn entries(&self) -> usize {
        self.grants.nodes.len() + self.queue.layer.nodes.len()
    }

    /// Releases `grant`: `Some(true)` if it was live, `Some(false)` if it
    /// had expired (and is purged now), `None` if it is not here.
    fn release(&mut self, grant: &Grant, now: Instant) -> Option<bool> {
        self.grants.release(grant, now)
    }

    fn refresh(&mut self, grant: &Grant, ttl: Ttl, now: Instant) -> Result<Grant, Error> {
        self.grants.refresh(grant, ttl, now)
    }

    /// The live items of grants on `under` and below (everywhere for
    /// `None`), in key order, then token order.
    fn list(&mut self, under: Option<&LockPath>, now: Instant) -> Vec<HeldLock> {
        let mut expired = Vec::new();
        let held = self.grants.list(under, now, &mut expired);
        for (key, token) in expired {
            self.grants.purge(&key, token, now);
        }
        held
    }

    fn change_mode(&mut self, grant: &Grant, mode: Mode, now: Instant) -> Result<Attempt, Error> {
        let Some(entry) = self.grants.entry_of(grant) else { return Err(Error::not_held(grant)) };
        let (items, expires_at, placed_at, kind) = (entry.items.clone(), entry.expires_at, entry.placed_at, entry.kind);
        if !entry.is_live(now) {
            self.grants.unplace(&items, grant.token);
            return Err(Error::not_held(grant));
        }
        // A downgrade is checked too: among live grants only a stepwise
        // client's lock in progress can conflict with it (see the contract).
        // Reservations are not: a mode change never waits.
        let changed = items.with_mode(mode);
        let others = Among { skip: Some(grant.token), ..Among::ALL };
        let mut expired = Vec::new();
        let blockers: Vec<HeldLock> =
            changed.iter().filter_map(|item| self.grants.blocker(item, others, now, &mut expired)).collect();
        for (key, token) in expired {
            self.grants.purge(&key, token, now);
        }
        let mut blockers = blockers.into_iter();
        if let Some(first) = blockers.next() {
            return Ok(Attempt::Blocked(Blockers::new(first, blockers)));
        }
        self.grants.unplace(&items, grant.token);
        let token = self.next_token();
        self.grants.place(&changed, token, &grant.owner, (placed_at, expires_at), kind);
        // The handle's expiry stays its own (never later than the store's).
        let expires_at = grant.expires_at.min(expires_at);
        Ok(Attempt::Granted(Grant { items: changed, token, expires_at, ..grant.clone() }))
    }

    /// Every time as many tokens were taken as there are entries, remove
    /// the expired grants and reservations and the empty entries of both
    /// trees: amortised O(1) per grant. Looks only every 1024th token, so
    /// the hot path pays one comparison.
    fn maybe_sweep(&mut self, now: Instant) {
        const CHECK_EVERY: u64 = 1024;
        const MIN_GRANTS: u64 = 4096;
        if !self.last_token.is_multiple_of(CHECK_EVERY) {
            return;
        }
        let grants = self.last_token - self.last_sweep_token;
        if grants >= MIN_GRANTS && grants >= self.entries() as u64 {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.last_sweep_token = self.last_token;
        self.grants.sweep(now);
        self.queue.sweep(now);
    }
}

impl Reservations {
    /// Whether there is no reservation, live or lapsed.
    fn is_empty(&self) -> bool {
        self.by_ticket.is_empty()
    }

    /// Keeps reservation `ticket` of `request` for [`RESERVATION_TTL`]
    /// from `now`: renews it, or writes it (again, if it lapsed and was
    /// purged). Another owner's reservation with that ticket is left alone.
    fn keep(&mut self, ticket: u64, request: &LockRequest, now: Instant) {
        let expires_at = now + RESERVATION_TTL;
        match self.by_ticket.entry(ticket) {
            Slot::Occupied(found) => {
                if found.get().owner == request.owner {
                    self.layer.set_expiry(&found.get().items, ticket, expires_at);
                }
            }
            Slot::Vacant(free) => {
                free.insert(Waiter { items: request.items.clone(), owner: request.owner.clone() });
                self.layer.place(&request.items, ticket, &request.owner, (now, expires_at), Kind::Reservation);
            }
        }
    }

    /// Removes reservation `ticket` if `owner` has it; whether it was
    /// there.
    fn remove(&mut self, owner: &Owner, ticket: u64) -> bool {
        let Slot::Occupied(found) = self.by_ticket.entry(ticket) else { return false };
        if found.get().owner != *owner {
            return false;
        }
        let waiter = found.remove();
        self.layer.unplace(&waiter.items, ticket);
        true
    }

    /// Removes reservation `ticket`, which has an item on `key`, if it is
    /// still there and lapsed.
    fn purge(&mut self, key: &str, ticket: u64, now: Instant) {
        if self.layer.purge(key, ticket, now) {
            self.by_ticket.remove(&ticket);
        }
    }

    /// The live reservations on `under` and below (everywhere for
    /// `None`), in key order, then ticket order; lapsed ones met are
    /// purged.
    fn list(&mut self, under: Option<&LockPath>, now: Instant) -> Vec<HeldLock> {
        let mut lapsed = Vec::new();
        let held = self.layer.list(under, now, &mut lapsed);
        for (key, ticket) in lapsed {
            self.purge(&key, ticket, now);
        }
        held
    }

    fn sweep(&mut self, now: Instant) {
        for ticket in self.layer.sweep(now) {
            self.by_ticket.remove(&ticket);
        }
    }
}

impl Layer {
    /// A live item `among` counts in the way of `item`: on an ancestor, on
    /// the node, or below it. Expired ones met on the way are pushed to
    /// `expired` and not counted.
    fn blocker(&self, item: &LockItem, among: Among, now: Instant, expired: &mut Vec<Expired>) -> Option<HeldLock> {
        let key = item.path.key();
        let levels = Levels::of(key);
        let mut own = None;
        for (depth, level) in levels.iter().enumerate() {
            let Some(node) = self.nodes.get(*level) else { continue };
            if let Some(held) = conflicting_on(level, node, item.mode, among, now, expired) {
                return Some(held);
            }
            if depth + 1 == levels.len() {
                own = Some(node);
            }
        }
        // The last level is the node itself; without an entry, nothing
        // lies below it.
        self.blocker_below(key, own?, item.mode, among, now, expired)
    }

    /// The first live item `among` counts below `node` (at `key`) that
    /// conflicts with `mode`; the counts say at once when there can be
    /// none.
    fn blocker_below(
        &self,
        key: &str,
        node: &Node,
        mode: Mode,
        among: Among,
        now: Instant,
        expired: &mut Vec<Expired>,
    ) -> Option<HeldLock> {
        if Node::conflicting_below(&node.below_total, mode) == 0 {
            return None;
        }
        self.find_below(
            key,
            now,
            expired,
            |counts| Node::conflicting_below(counts, mode) > 0,
            |entry| among.counts(entry.token) && entry.mode.conflicts_with(mode),
        )
    }

    /// [`Layer::blocker`] among all items for a request's `item`, counting
    /// it below each ancestor on the way (one lookup per ancestor for
    /// both); if it is blocked, the counts it made are taken back and the
    /// blocker returned.
    fn check_and_count(&mut self, item: &LockItem, now: Instant, expired: &mut Vec<Expired>) -> Option<HeldLock> {
        let key = item.path.key();
        let levels = Levels::of(key);
        let (own_key, ancestors) = levels.split_last().expect("a path has at least one segment");
        let slot = slot(item.mode);
        for (depth, ancestor) in ancestors.iter().enumerate() {
            let node = self.nodes.entry_ref(*ancestor).or_default();
            if let Some(blocker) = conflicting_on(ancestor, node, item.mode, Among::ALL, now, expired) {
                self.add_below(&levels[..=depth], item.mode, -1);
                return Some(blocker);
            }
            node.below.entry_ref(levels[depth + 1]).or_default()[slot] += 1;
            node.below_total[slot] += 1;
        }
        let blocker = self.nodes.get(*own_key).and_then(|node| {
            conflicting_on(own_key, node, item.mode, Among::ALL, now, expired)
                .or_else(|| self.blocker_below(own_key, node, item.mode, Among::ALL, now, expired))
        });
        if blocker.is_some() {
            self.add_below(&levels, item.mode, -1);
        }
        blocker
    }

    /// The stepwise primitive's check: any live item on exactly `key`.
    fn holder_of_key(&self, key: &str, now: Instant, expired: &mut Vec<Expired>) -> Option<HeldLock> {
        let node = self.nodes.get(key)?;
        conflicting_on(key, node, Mode::Exclusive, Among::ALL, now, expired)
    }

    /// The first live item strictly below `key` in key order that `wanted`
    /// accepts, descending only into children whose counts `worth`
    /// accepts. Expired ones met are pushed to `expired`.
    fn find_below(
        &self,
        key: &str,
        now: Instant,
        expired: &mut Vec<Expired>,
        worth: impl Fn(&[u32; 2]) -> bool,
        wanted: impl Fn(&Entry) -> bool,
    ) -> Option<HeldLock> {
        let mut stack: Vec<&str> = self.children(key, &worth);
        while let Some(next) = stack.pop() {
            let Some(node) = self.nodes.get(next) else { continue };
            for entry in node.items.iter().filter(|entry| wanted(entry)) {
                if entry.is_live(now) {
                    return Some(entry.held(next, now));
                }
                expired.push((next.into(), entry.token));
            }
            stack.extend(self.children(next, &worth));
        }
        None
    }

    /// The children of `key` worth a visit, in descending key order: the
    /// last pushed is visited first, so a walk visits keys in ascending
    /// order and names the first blocker in key order, as the network
    /// stores' range queries do.
    fn children(&self, key: &str, worth: &impl Fn(&[u32; 2]) -> bool) -> Vec<&str> {
        let Some(node) = self.nodes.get(key) else { return Vec::new() };
        let mut children: Vec<&str> =
            node.below.iter().filter(|(_, counts)| worth(counts)).map(|(child, _)| &**child).collect();
        children.sort_unstable_by(|a, b| b.cmp(a));
        children
    }

    /// Puts every item of a grant or reservation on its node and counts it
    /// above; `life` is when it was first written and when it expires.
    fn place(&mut self, items: &LockItems, token: u64, owner: &Owner, life: (Instant, Instant), kind: Kind) {
        let (placed_at, expires_at) = life;
        for item in items {
            let key = item.path.key();
            self.count(key, item.mode, 1);
            let entry = Entry {
                token,
                mode: item.mode,
                items: items.clone(),
                owner: owner.clone(),
                expires_at,
                placed_at,
                kind,
            };
            self.node_mut(key).items.push(entry);
        }
    }

    /// Takes every item of `token` (whose items are `items`) off its node
    /// and uncounts it above.
    fn unplace(&mut self, items: &LockItems, token: u64) {
        for item in items {
            let key = item.path.key();
            if let Some(node) = self.nodes.get_mut(key) {
                node.items.retain(|entry| entry.token != token);
            }
            self.count(key, item.mode, -1);
        }
    }

    /// Sets the expiry of every item of `token` (whose items are `items`).
    fn set_expiry(&mut self, items: &LockItems, token: u64, expires_at: Instant) {
        for item in items {
            let Some(node) = self.nodes.get_mut(item.path.key()) else { continue };
            node.items.iter_mut().filter(|entry| entry.token == token).for_each(|entry| entry.expires_at = expires_at);
        }
    }

    /// Adds `delta` to the count of `mode` below each ancestor of `key`.
    fn count(&mut self, key: &str, mode: Mode, delta: i32) {
        self.add_below(&Levels::of(key), mode, delta);
    }

    /// Adds `delta` to the count of `mode` below each of `levels` but the
    /// last, through the next level.
    fn add_below(&mut self, levels: &[&str], mode: Mode, delta: i32) {
        for pair in levels.windows(2) {
            let node = self.node_mut(pair[0]);
            let counts = node.below.entry_ref(pair[1]).or_default();
            counts[slot(mode)] = counts[slot(mode)].wrapping_add_signed(delta);
            node.below_total[slot(mode)] = node.below_total[slot(mode)].wrapping_add_signed(delta);
        }
    }

    fn node_mut(&mut self, key: &str) -> &mut Node {
        self.nodes.entry_ref(key).or_default()
    }

    /// The grant's entry on its first item's node: it is there iff the
    /// grant was made and not yet removed (items come and go together).
    fn entry_of(&self, grant: &Grant) -> Option<&Entry> {
        self.nodes.get(grant.path().key())?.entry(grant.token).filter(|entry| entry.is(grant))
    }

    /// Removes what has `token` and an item on `key`, if it is still there
    /// and expired; whether it was.
    fn purge(&mut self, key: &str, token: u64, now: Instant) -> bool {
        let Some(entry) = self.nodes.get(key).and_then(|node| node.entry(token)) else { return false };
        if entry.is_live(now) {
            return false;
        }
        let items = entry.items.clone();
        self.unplace(&items, token);
        true
    }

    /// Releases `grant`: `Some(true)` if it was live, `Some(false)` if it
    /// had expired (and is purged now), `None` if it is not here.
    fn release(&mut self, grant: &Grant, now: Instant) -> Option<bool> {
        let key = grant.path().key();
        let node = self.nodes.get_mut(key)?;
        let at = node.items.iter().position(|entry| entry.is(grant))?;
        let entry = node.items.swap_remove(at);
        for item in &entry.items {
            if item.path.key() != key {
                if let Some(node) = self.nodes.get_mut(item.path.key()) {
                    node.items.retain(|other| other.token != grant.token);
                }
            }
            self.count(item.path.key(), item.mode, -1);
        }
        Some(entry.is_live(now))
    }

    fn refresh(&mut self, grant: &Grant, ttl: Ttl, now: Instant) -> Result<Grant, Error> {
        let Some(entry) = self.entry_of(grant) else { return Err(Error::not_held(grant)) };
        let items = entry.items.clone();
        if !entry.is_live(now) {
            self.unplace(&items, grant.token);
            return Err(Error::not_held(grant));
        }
        let expires_at = now + ttl.get();
        self.set_expiry(&items, grant.token, expires_at);
        Ok(Grant { ttl: ttl.get(), expires_at, ..grant.clone() })
    }

    /// The live items on `under` and below (everywhere for `None`), in
    /// key order, then token order. Expired ones are pushed to `expired`.
    fn list(&self, under: Option<&LockPath>, now: Instant, expired: &mut Vec<Expired>) -> Vec<HeldLock> {
        let mut held = Vec::new();
        let mut visit = |key: &str, node: &Node| {
            for entry in &node.items {
                if entry.is_live(now) {
                    held.push(entry.held(key, now));
                } else {
                    expired.push((Box::<str>::from(key), entry.token));
                }
            }
        };
        match under {
            None => self.nodes.iter().for_each(|(key, node)| visit(key, node)),
            Some(path) => {
                let mut stack = vec![path.key()];
                while let Some(key) = stack.pop() {
                    let Some(node) = self.nodes.get(key) else { continue };
                    visit(key, node);
                    stack.extend(node.below.iter().filter(|(_, counts)| **counts != [0, 0]).map(|(child, _)| &**child));
                }
            }
        }
        held.sort_by(|a, b| a.path.cmp(&b.path).then(a.token.cmp(&b.token)));
        held
    }

    /// Removes every expired item and every empty entry; returns the
    /// tokens removed.
    fn sweep(&mut self, now: Instant) -> Vec<u64> {
        let expired: Vec<Expired> = self
            .nodes
            .iter()
            .flat_map(|(key, node)| {
                node.items.iter().filter(|entry| !entry.is_live(now)).map(|entry| (key.as_str().into(), entry.token))
            })
            .collect();
        let mut removed = Vec::new();
        for (key, token) in expired {
            if self.purge(&key, token, now) {
                removed.push(token);
            }
        }
        for node in self.nodes.values_mut() {
            node.below.retain(|_, counts| *counts != [0, 0]);
        }
        self.nodes.retain(|_, node| !node.is_empty());
        removed
    }
}

/// The first live item on `node` (at `key`) that `among` counts and that
/// conflicts with `mode`.
fn conflicting_on(
    key: &str,
    node: &Node,
    mode: Mode,
    among: Among,
    now: Instant,
    expired: &mut Vec<Expired>,
) -> Option<HeldLock> {
    for entry in &node.items {
        if !among.counts(entry.token) || !entry.mode.conflicts_with(mode) {
            continue;
        }
        if entry.is_live(now) {
            return Some(entry.held(key, now));
        }
        expired.push((key.into(), entry.token));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(items: &[(&str, Mode)], owner: &str) -> LockRequest {
        let items = LockItems::new(items.iter().map(|(path, mode)| (LockPath::parse(path).expect("path"), *mode)))
            .expect("items");
        LockRequest::of(items, Owner::new(owner).expect("owner"), Ttl::new(Duration::from_secs(10)).expect("ttl"))
    }

    #[test]
    fn counts_follow_grants_releases_and_mode_changes() {
        let now = Instant::now();
        let mut tree = Tree::default();
        let (attempt, _) = tree.grant(
            &request(&[("a/b/c", Mode::Shared), ("d", Mode::Exclusive)], "x"),
            LockKind::Lock,
            Check::Tree,
            now,
        );
        let grant = attempt.granted().expect("free");
        assert_eq!(tree.grants.nodes[LockPath::parse("a").expect("a").key()].below_total, [1, 0]);
        let Ok(Attempt::Granted(upgraded)) = tree.change_mode(&grant, Mode::Exclusive, now) else { panic!("upgrade") };
        assert!(upgraded.token > grant.token);
        assert_eq!(tree.grants.nodes[LockPath::parse("a").expect("a").key()].below_total, [0, 1]);
        assert_eq!(tree.release(&upgraded, now), Some(true));
        tree.sweep(now);
        assert_eq!(tree.entries(), 0);
    }
}
