//! The store: a map of namespaces, each a [`MemoryBackend`], whose grants
//! follow the scheme described in the crate docs (one tree per namespace,
//! under one mutex, with per-mode counts of the items below each node).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use mutextree_core::backend::{
    async_trait, Attempt, ChangeFeed, Check, Listener, LockKind, LockRequest, Queue, RESERVATION_TTL,
};
use mutextree_core::{
    Blockers, Error, Grant, HeldLock, LockBackend, LockItem, LockItems, LockPath, Mode, Namespace, Owner, Ttl,
    MAX_DEPTH,
};
use tokio::task::coop::consume_budget;
use tokio::time::Instant;

/// A fast hasher that is still seeded per map (paths come from users).
type Hasher = foldhash::fast::RandomState;

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

    /// Removes every expired lock and every empty entry now (it also
    /// happens by itself, every time as many grants were made as there are
    /// entries).
    pub fn sweep(&self) {
        self.space.tree().sweep(Instant::now());
    }

    /// How many map entries the namespace holds now: one per node with
    /// items on it or below it, and the empty ones left for the next
    /// [`sweep`](Self::sweep). Zero after a sweep once every lock is
    /// released or expired.
    pub fn entries(&self) -> usize {
        let tree = self.space.tree();
        tree.grants.nodes.len() + tree.queue.nodes.len()
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

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        consume_budget().await;
        self.space.tree().grants.refresh(grant, ttl, Instant::now())
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        consume_budget().await;
        Ok(self.space.tree().grants.list(under, Instant::now()))
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
        if self.space.tree().withdraw(owner, ticket) {
            self.space.feed.notify();
        }
        Ok(())
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        consume_budget().await;
        let mut tree = self.space.tree();
        let now = Instant::now();
        let waiters = tree.queue.list(under, now);
        Ok(waiters.into_iter().map(|held| HeldLock { waiting: true, ..held }).collect())
    }

    /// Every release or purge in the namespace wakes every waiter (an
    /// in-process wake-up is cheap); `items` are not used to filter.
    fn listen(&self, _items: &LockItems) -> Listener {
        self.space.feed.listen()
    }
}

/// One namespace: its tree, and the wake-ups of its waiters.
struct Space {
    name: Namespace,
    tree: Mutex<Tree>,
    feed: ChangeFeed,
}

impl Space {
    fn new(name: Namespace) -> Self {
        Space { name, tree: Mutex::new(Tree::default()), feed: ChangeFeed::new() }
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
        let outcome = self.tree().grants.release(grant, Instant::now());
        if outcome.is_some() {
            self.feed.notify();
        }
        match outcome {
            Some(true) => Ok(()),
            _ => Err(Error::not_held(grant)),
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
    grants: Layer,
    /// The reservations of fair waiters, by ticket.
    queue: Layer,
    last_token: u64,
    /// The token counter's value at the last sweep.
    last_sweep_token: u64,
}

/// Items on the tree, by the token of the grant (or the ticket of the
/// reservation) they belong to.
#[derive(Default)]
struct Layer {
    /// One entry per node with items on it or counted below it (and the
    /// empty ones left for the next sweep, so that the next grant on the
    /// same nodes allocates nothing).
    nodes: HashMap<Box<str>, Node, Hasher>,
    /// Every record not yet removed (live, or expired and not yet purged).
    records: HashMap<u64, Record, Hasher>,
}

/// A grant or a reservation as the store keeps it.
struct Record {
    items: LockItems,
    owner: Owner,
    expires_at: Instant,
    transient: bool,
}

impl Record {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn is(&self, grant: &Grant) -> bool {
        self.owner == grant.owner
    }

    fn held(&self, path: &LockPath, mode: Mode, token: u64, now: Instant) -> HeldLock {
        HeldLock {
            path: path.clone(),
            mode,
            owner: self.owner.clone(),
            token,
            remaining: self.expires_at.saturating_duration_since(now),
            transient: self.transient,
            waiting: false,
        }
    }
}

#[derive(Default)]
struct Node {
    /// The items on this node: their record's token and their mode.
    items: Vec<(u64, Mode)>,
    /// Items below this node, per mode, by the key of the child they lie
    /// under.
    below: HashMap<Box<str>, [u32; 2], Hasher>,
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

/// Which records of a layer count in a check.
#[derive(Clone, Copy)]
struct Among {
    /// A record left out (a grant changing its mode).
    skip: Option<u64>,
    /// Only records with a smaller token (a waiter's earlier tickets).
    before: Option<u64>,
}

impl Among {
    const ALL: Among = Among { skip: None, before: None };

    fn counts(self, token: u64) -> bool {
        Some(token) != self.skip && self.before.is_none_or(|limit| token < limit)
    }
}

impl Tree {
    /// Grants every item of `request` or none, and keeps the request's
    /// reservation as its queue says. Returns whether expired records were
    /// purged on the way (waiters may want to hear it).
    fn grant(&mut self, request: &LockRequest, kind: LockKind, check: Check, now: Instant) -> (Attempt, bool) {
        let mut expired = Vec::new();
        let mut expired_reservations = Vec::new();
        let queue_from = match request.queue {
            Queue::Barge => None,
            Queue::Try | Queue::Join => Some(Among::ALL),
            Queue::Waiting(ticket) => Some(Among { skip: None, before: Some(ticket) }),
        };
        let mut blockers = Vec::new();
        for item in &request.items {
            let blocker = match check {
                Check::Tree => self.grants.blocker(item, Among::ALL, now, &mut expired).or_else(|| {
                    let among = queue_from?;
                    let waiter = self.queue.blocker(item, among, now, &mut expired_reservations)?;
                    Some(HeldLock { waiting: true, ..waiter })
                }),
                Check::KeyOnly => self.grants.holder_of_key(item.path.key(), now, &mut expired),
            };
            blockers.extend(blocker);
        }
        let purged = !expired.is_empty() || !expired_reservations.is_empty();
        expired.into_iter().for_each(|token| self.grants.purge(token, now));
        expired_reservations.into_iter().for_each(|ticket| self.queue.purge(ticket, now));
        let mut blockers = blockers.into_iter();
        if let Some(first) = blockers.next() {
            let blockers = Blockers::new(first, blockers);
            let ticket = match request.queue {
                Queue::Join => self.next_token(),
                Queue::Waiting(ticket) => ticket,
                Queue::Barge | Queue::Try => return (Attempt::Blocked(blockers), purged),
            };
            self.queue.keep(ticket, request, now + RESERVATION_TTL);
            return (Attempt::Queued { ticket, blockers }, purged);
        }
        if let Queue::Waiting(ticket) = request.queue {
            self.queue.remove_of(&request.owner, ticket);
        }
        let token = self.next_token();
        let ttl = request.ttl.get();
        let record = Record {
            items: request.items.clone(),
            owner: request.owner.clone(),
            expires_at: now + ttl,
            transient: kind == LockKind::Transient,
        };
        self.grants.insert(token, record);
        self.maybe_sweep(now);
        (Attempt::Granted(Grant::new(request, kind, token, ttl, now)), purged)
    }

    fn next_token(&mut self) -> u64 {
        self.last_token += 1;
        self.last_token
    }

    /// Removes the reservation `ticket` of `owner`; whether it was there.
    fn withdraw(&mut self, owner: &Owner, ticket: u64) -> bool {
        self.queue.remove_of(owner, ticket)
    }

    fn change_mode(&mut self, grant: &Grant, mode: Mode, now: Instant) -> Result<Attempt, Error> {
        let grants = &mut self.grants;
        let Some(record) = grants.records.get(&grant.token).filter(|record| record.is(grant)) else {
            return Err(Error::not_held(grant));
        };
        if !record.is_live(now) {
            grants.purge(grant.token, now);
            return Err(Error::not_held(grant));
        }
        let changed = record.items.with_mode(mode);
        if mode == Mode::Exclusive {
            let mut expired = Vec::new();
            let others = Among { skip: Some(grant.token), before: None };
            let blockers: Vec<HeldLock> =
                changed.iter().filter_map(|item| grants.blocker(item, others, now, &mut expired)).collect();
            expired.into_iter().for_each(|token| grants.purge(token, now));
            let mut blockers = blockers.into_iter();
            if let Some(first) = blockers.next() {
                return Ok(Attempt::Blocked(Blockers::new(first, blockers)));
            }
        }
        let mut record = self.grants.remove(grant.token).expect("checked above");
        let token = self.next_token();
        record.items = changed.clone();
        let expires_at = record.expires_at;
        self.grants.insert(token, record);
        // The handle's expiry stays its own (never later than the store's).
        let expires_at = grant.expires_at.min(expires_at);
        Ok(Attempt::Granted(Grant { items: changed, token, expires_at, ..grant.clone() }))
    }

    /// Every time as many grants were made as there are entries, remove the
    /// expired records and the empty entries of the whole map: amortised
    /// O(1) per grant. Looks only every 1024th token, so the hot path pays
    /// one comparison.
    fn maybe_sweep(&mut self, now: Instant) {
        const CHECK_EVERY: u64 = 1024;
        const MIN_GRANTS: u64 = 4096;
        if !self.last_token.is_multiple_of(CHECK_EVERY) {
            return;
        }
        let grants = self.last_token - self.last_sweep_token;
        if grants >= MIN_GRANTS && grants >= (self.grants.nodes.len() + self.queue.nodes.len()) as u64 {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.last_sweep_token = self.last_token;
        self.grants.sweep(now);
        self.queue.sweep(now);
    }
}

impl Layer {
    /// A live item of a record `among` counts that is in the way of `item`:
    /// on an ancestor, on the node, or below it. Expired records met on
    /// the way are pushed to `expired` and not counted.
    fn blocker(&self, item: &LockItem, among: Among, now: Instant, expired: &mut Vec<u64>) -> Option<HeldLock> {
        let key = item.path.key();
        for level in Levels::of(key).iter() {
            let Some(node) = self.nodes.get(*level) else { continue };
            if let Some(held) = self.conflicting_on(level, node, item.mode, among, now, expired) {
                return Some(held);
            }
        }
        let node = self.nodes.get(key)?;
        if Node::conflicting_below(&node.below_total, item.mode) == 0 {
            return None;
        }
        self.find_below(
            key,
            now,
            expired,
            |counts| Node::conflicting_below(counts, item.mode) > 0,
            |token, mode| among.counts(token) && mode.conflicts_with(item.mode),
        )
    }

    /// The first live item on `node` (at `key`) of a record `among` counts
    /// that conflicts with `mode`.
    fn conflicting_on(
        &self,
        key: &str,
        node: &Node,
        mode: Mode,
        among: Among,
        now: Instant,
        expired: &mut Vec<u64>,
    ) -> Option<HeldLock> {
        for &(token, held_mode) in &node.items {
            if !among.counts(token) || !held_mode.conflicts_with(mode) {
                continue;
            }
            let record = &self.records[&token];
            if !record.is_live(now) {
                expired.push(token);
                continue;
            }
            return Some(record.held(&path_of(record, key), held_mode, token, now));
        }
        None
    }

    /// The stepwise primitive's check: any live item on exactly `key`.
    fn holder_of_key(&self, key: &str, now: Instant, expired: &mut Vec<u64>) -> Option<HeldLock> {
        let node = self.nodes.get(key)?;
        self.conflicting_on(key, node, Mode::Exclusive, Among::ALL, now, expired)
    }

    /// The first live item strictly below `key` in key order that `wanted`
    /// accepts, descending only into children whose counts `worth`
    /// accepts. Expired records met are pushed to `expired`.
    fn find_below(
        &self,
        key: &str,
        now: Instant,
        expired: &mut Vec<u64>,
        worth: impl Fn(&[u32; 2]) -> bool,
        wanted: impl Fn(u64, Mode) -> bool,
    ) -> Option<HeldLock> {
        let mut stack: Vec<&str> = self.children(key, &worth);
        while let Some(next) = stack.pop() {
            let Some(node) = self.nodes.get(next) else { continue };
            for &(token, mode) in &node.items {
                if !wanted(token, mode) {
                    continue;
                }
                let record = &self.records[&token];
                if record.is_live(now) {
                    return Some(record.held(&path_of(record, next), mode, token, now));
                }
                expired.push(token);
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

    /// Adds `record` under `token`, its items on their nodes.
    fn insert(&mut self, token: u64, record: Record) {
        for item in &record.items {
            let key = item.path.key();
            self.count(key, item.mode, 1);
            self.node_mut(key).items.push((token, item.mode));
        }
        self.records.insert(token, record);
    }

    /// Keeps the reservation `ticket` of `request` until `expires_at`:
    /// renews it, or writes it (again, if it lapsed).
    fn keep(&mut self, ticket: u64, request: &LockRequest, expires_at: Instant) {
        match self.records.get_mut(&ticket) {
            Some(record) => record.expires_at = expires_at,
            None => {
                let record =
                    Record { items: request.items.clone(), owner: request.owner.clone(), expires_at, transient: false };
                self.insert(ticket, record);
            }
        }
    }

    /// Adds `delta` to the count of `mode` below each ancestor of `key`.
    fn count(&mut self, key: &str, mode: Mode, delta: i32) {
        let levels = Levels::of(key);
        for pair in levels.windows(2) {
            let node = self.node_mut(pair[0]);
            let counts = match node.below.get_mut(pair[1]) {
                Some(counts) => counts,
                None => node.below.entry(pair[1].into()).or_default(),
            };
            counts[slot(mode)] = counts[slot(mode)].wrapping_add_signed(delta);
            node.below_total[slot(mode)] = node.below_total[slot(mode)].wrapping_add_signed(delta);
        }
    }

    fn node_mut(&mut self, key: &str) -> &mut Node {
        if !self.nodes.contains_key(key) {
            self.nodes.insert(key.into(), Node::default());
        }
        self.nodes.get_mut(key).expect("just inserted")
    }

    /// Removes record `token` if it is still there and expired.
    fn purge(&mut self, token: u64, now: Instant) {
        if self.records.get(&token).is_some_and(|record| !record.is_live(now)) {
            self.remove(token);
        }
    }

    /// Removes record `token` and its items.
    fn remove(&mut self, token: u64) -> Option<Record> {
        let record = self.records.remove(&token)?;
        for item in &record.items {
            let key = item.path.key();
            if let Some(node) = self.nodes.get_mut(key) {
                node.items.retain(|&(held, _)| held != token);
            }
            self.count(key, item.mode, -1);
        }
        Some(record)
    }

    /// Removes record `token` if `owner` has it; whether it was there.
    fn remove_of(&mut self, owner: &Owner, token: u64) -> bool {
        if !self.records.get(&token).is_some_and(|record| record.owner == *owner) {
            return false;
        }
        self.remove(token).is_some()
    }

    /// Releases `grant`: `Some(true)` if it was live, `Some(false)` if it
    /// had expired (and is purged now), `None` if it is not here.
    fn release(&mut self, grant: &Grant, now: Instant) -> Option<bool> {
        if !self.records.get(&grant.token).is_some_and(|record| record.is(grant)) {
            return None;
        }
        self.remove(grant.token).map(|record| record.is_live(now))
    }

    fn refresh(&mut self, grant: &Grant, ttl: Ttl, now: Instant) -> Result<Grant, Error> {
        match self.records.get_mut(&grant.token) {
            Some(record) if record.is(grant) && record.is_live(now) => {
                record.expires_at = now + ttl.get();
                Ok(Grant { ttl: ttl.get(), expires_at: now + ttl.get(), ..grant.clone() })
            }
            Some(record) if record.is(grant) => {
                self.purge(grant.token, now);
                Err(Error::not_held(grant))
            }
            _ => Err(Error::not_held(grant)),
        }
    }

    /// The live items on `under` and below (everywhere for `None`), in
    /// key order, then token order.
    fn list(&mut self, under: Option<&LockPath>, now: Instant) -> Vec<HeldLock> {
        let mut held = Vec::new();
        let mut expired = Vec::new();
        let mut visit = |key: &str, node: &Node| {
            for &(token, mode) in &node.items {
                let record = &self.records[&token];
                if record.is_live(now) {
                    held.push(record.held(&path_of(record, key), mode, token, now));
                } else {
                    expired.push(token);
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
        expired.sort_unstable();
        expired.dedup();
        for token in expired {
            self.purge(token, now);
        }
        held.sort_by(|a, b| a.path.cmp(&b.path).then(a.token.cmp(&b.token)));
        held
    }

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<u64> =
            self.records.iter().filter(|(_, record)| !record.is_live(now)).map(|(&token, _)| token).collect();
        for token in expired {
            self.remove(token);
        }
        for node in self.nodes.values_mut() {
            node.below.retain(|_, counts| *counts != [0, 0]);
        }
        self.nodes.retain(|_, node| !node.is_empty());
    }
}

/// The path of the item of `record` on `key`.
fn path_of(record: &Record, key: &str) -> LockPath {
    record.items.iter().find(|item| item.path.key() == key).map(|item| item.path.clone()).expect("an item on its node")
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
        assert_eq!(tree.grants.release(&upgraded, now), Some(true));
        tree.sweep(now);
        assert!(tree.grants.nodes.is_empty() && tree.grants.records.is_empty());
    }
}
