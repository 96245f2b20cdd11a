//! The store: a map of namespaces, each a [`MemoryBackend`], whose grants
//! follow the scheme described in the crate docs (one tree per namespace,
//! under one mutex, with per-mode counts of the items below each node).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use mutextree_core::backend::{async_trait, Attempt, ChangeFeed, Check, Listener, LockKind, LockRequest};
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
        self.space.tree().nodes.len()
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
        let outcome = self.tree().release(grant, Instant::now());
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

/// The locks of one namespace.
#[derive(Default)]
struct Tree {
    /// One entry per node with items on it or counted below it (and the
    /// empty ones left for the next sweep, so that the next grant on the
    /// same nodes allocates nothing).
    nodes: HashMap<Box<str>, Node, Hasher>,
    /// Every grant not yet removed (live, or expired and not yet purged),
    /// by token.
    grants: HashMap<u64, Record, Hasher>,
    last_token: u64,
    /// The token counter's value at the last sweep.
    last_sweep_token: u64,
}

/// A grant as the store keeps it.
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
        }
    }
}

#[derive(Default)]
struct Node {
    /// The items on this node: their grant's token and their mode.
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

impl Tree {
    /// Grants every item of `request` or none. Returns whether expired
    /// grants were purged on the way (waiters may want to hear it).
    fn grant(&mut self, request: &LockRequest, kind: LockKind, check: Check, now: Instant) -> (Attempt, bool) {
        let mut expired = Vec::new();
        let mut blockers = Vec::new();
        for item in &request.items {
            let blocker = match check {
                Check::Tree => self.blocker(item, None, now, &mut expired),
                Check::KeyOnly => self.holder_of_key(item.path.key(), now, &mut expired),
            };
            blockers.extend(blocker);
        }
        let purged = !expired.is_empty();
        for token in expired {
            self.purge(token, now);
        }
        let mut blockers = blockers.into_iter();
        if let Some(first) = blockers.next() {
            return (Attempt::Blocked(Blockers::new(first, blockers)), purged);
        }
        self.last_token += 1;
        let token = self.last_token;
        for item in &request.items {
            self.place(item, token);
        }
        let ttl = request.ttl.get();
        self.grants.insert(
            token,
            Record {
                items: request.items.clone(),
                owner: request.owner.clone(),
                expires_at: now + ttl,
                transient: kind == LockKind::Transient,
            },
        );
        self.maybe_sweep(now);
        (Attempt::Granted(Grant::new(request, kind, token, ttl, now)), purged)
    }

    /// A live item of another grant (not `skip`) in the way of `item`: on
    /// an ancestor, on the node, or below it. Expired grants met on the
    /// way are pushed to `expired` and not counted.
    fn blocker(&self, item: &LockItem, skip: Option<u64>, now: Instant, expired: &mut Vec<u64>) -> Option<HeldLock> {
        let key = item.path.key();
        for level in Levels::of(key).iter() {
            let Some(node) = self.nodes.get(*level) else { continue };
            if let Some(held) = self.conflicting_on(level, node, item.mode, skip, now, expired) {
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
            |mode| mode.conflicts_with(item.mode),
        )
    }

    /// The first live item on `node` (at `key`) that conflicts with `mode`.
    fn conflicting_on(
        &self,
        key: &str,
        node: &Node,
        mode: Mode,
        skip: Option<u64>,
        now: Instant,
        expired: &mut Vec<u64>,
    ) -> Option<HeldLock> {
        for &(token, held_mode) in &node.items {
            if Some(token) == skip || !held_mode.conflicts_with(mode) {
                continue;
            }
            let record = &self.grants[&token];
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
        self.conflicting_on(key, node, Mode::Exclusive, None, now, expired)
    }

    /// The first live item strictly below `key` in key order whose mode
    /// `wanted` accepts, descending only into children whose counts
    /// `worth` accepts. Expired grants met are pushed to `expired`.
    fn find_below(
        &self,
        key: &str,
        now: Instant,
        expired: &mut Vec<u64>,
        worth: impl Fn(&[u32; 2]) -> bool,
        wanted: impl Fn(Mode) -> bool,
    ) -> Option<HeldLock> {
        let mut stack: Vec<&str> = self.children(key, &worth);
        while let Some(next) = stack.pop() {
            let Some(node) = self.nodes.get(next) else { continue };
            for &(token, mode) in &node.items {
                if !wanted(mode) {
                    continue;
                }
                let record = &self.grants[&token];
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

    /// Puts `item` of grant `token` on its node and counts it above.
    fn place(&mut self, item: &LockItem, token: u64) {
        let key = item.path.key();
        self.count(key, item.mode, 1);
        self.node_mut(key).items.push((token, item.mode));
    }

    /// Takes `item` of grant `token` off its node and uncounts it above.
    fn unplace(&mut self, item: &LockItem, token: u64) {
        let key = item.path.key();
        if let Some(node) = self.nodes.get_mut(key) {
            node.items.retain(|&(held, _)| held != token);
        }
        self.count(key, item.mode, -1);
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

    /// Removes grant `token` and its items, if it is still there.
    fn purge(&mut self, token: u64, now: Instant) {
        if self.grants.get(&token).is_some_and(|record| !record.is_live(now)) {
            self.remove(token);
        }
    }

    fn remove(&mut self, token: u64) -> Option<Record> {
        let record = self.grants.remove(&token)?;
        for item in &record.items {
            self.unplace(item, token);
        }
        Some(record)
    }

    /// Releases `grant`: `Some(true)` if it was live, `Some(false)` if it
    /// had expired (and is purged now), `None` if it is not here.
    fn release(&mut self, grant: &Grant, now: Instant) -> Option<bool> {
        if !self.grants.get(&grant.token).is_some_and(|record| record.is(grant)) {
            return None;
        }
        self.remove(grant.token).map(|record| record.is_live(now))
    }

    fn refresh(&mut self, grant: &Grant, ttl: Ttl, now: Instant) -> Result<Grant, Error> {
        match self.grants.get_mut(&grant.token) {
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

    fn change_mode(&mut self, grant: &Grant, mode: Mode, now: Instant) -> Result<Attempt, Error> {
        let Some(record) = self.grants.get(&grant.token).filter(|record| record.is(grant)) else {
            return Err(Error::not_held(grant));
        };
        if !record.is_live(now) {
            self.purge(grant.token, now);
            return Err(Error::not_held(grant));
        }
        // A downgrade is checked too: among live grants only a stepwise
        // client's lock in progress can conflict with it (see the contract).
        let changed = record.items.with_mode(mode);
        let mut expired = Vec::new();
        let blockers: Vec<HeldLock> =
            changed.iter().filter_map(|item| self.blocker(item, Some(grant.token), now, &mut expired)).collect();
        for token in expired {
            self.purge(token, now);
        }
        let mut blockers = blockers.into_iter();
        if let Some(first) = blockers.next() {
            return Ok(Attempt::Blocked(Blockers::new(first, blockers)));
        }
        let mut record = self.remove(grant.token).expect("checked above");
        self.last_token += 1;
        let token = self.last_token;
        for item in &changed {
            self.place(item, token);
        }
        record.items = changed.clone();
        let expires_at = record.expires_at;
        self.grants.insert(token, record);
        // The handle's expiry stays its own (never later than the store's).
        let expires_at = grant.expires_at.min(expires_at);
        Ok(Attempt::Granted(Grant { items: changed, token, expires_at, ..grant.clone() }))
    }

    /// The live items on `under` and below (everywhere for `None`), in
    /// key order, then token order.
    fn list(&mut self, under: Option<&LockPath>, now: Instant) -> Vec<HeldLock> {
        let mut held = Vec::new();
        let mut expired = Vec::new();
        let mut visit = |key: &str, node: &Node| {
            for &(token, mode) in &node.items {
                let record = &self.grants[&token];
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

    /// Every time as many grants were made as there are entries, remove the
    /// expired locks and the empty entries of the whole map: amortised O(1)
    /// per grant. Looks only every 1024th token, so the hot path pays one
    /// comparison.
    fn maybe_sweep(&mut self, now: Instant) {
        const CHECK_EVERY: u64 = 1024;
        const MIN_GRANTS: u64 = 4096;
        if !self.last_token.is_multiple_of(CHECK_EVERY) {
            return;
        }
        let grants = self.last_token - self.last_sweep_token;
        if grants >= MIN_GRANTS && grants >= self.nodes.len() as u64 {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.last_sweep_token = self.last_token;
        let expired: Vec<u64> =
            self.grants.iter().filter(|(_, record)| !record.is_live(now)).map(|(&token, _)| token).collect();
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
        assert_eq!(tree.nodes[LockPath::parse("a").expect("a").key()].below_total, [1, 0]);
        let Ok(Attempt::Granted(upgraded)) = tree.change_mode(&grant, Mode::Exclusive, now) else { panic!("upgrade") };
        assert!(upgraded.token > grant.token);
        assert_eq!(tree.nodes[LockPath::parse("a").expect("a").key()].below_total, [0, 1]);
        assert_eq!(tree.release(&upgraded, now), Some(true));
        tree.sweep(now);
        assert!(tree.nodes.is_empty() && tree.grants.is_empty());
    }
}
