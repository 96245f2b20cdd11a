//! The store: a map of namespaces, each a [`MemoryBackend`], whose grants
//! follow the scheme described in the crate docs (intention counts on a
//! sharded map, one entry locked at a time).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::mapref::one::RefMut;
use dashmap::DashMap;
use mutextree_core::backend::Check;
use mutextree_core::backend::{async_trait, Attempt, ChangeFeed, Listener, LockKind, LockRequest};
use mutextree_core::{
    Error, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Namespace, Owner, Ttl, MAX_DEPTH,
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
        self.space.sweep(Instant::now());
    }

    /// How many map entries the namespace holds now: one per lock not yet
    /// removed and per node above one, and the empty ones left for the next
    /// [`sweep`](Self::sweep). Zero after a sweep once every lock is
    /// released or expired.
    pub fn entries(&self) -> usize {
        self.space.nodes.len()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("namespace", &self.space.name)
            .field("entries", &self.space.nodes.len())
            .finish()
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        consume_budget().await;
        self.space.grant(request, kind, Check::KeyOnly)
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        consume_budget().await;
        self.space.release(grant)
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        consume_budget().await;
        self.space.refresh(grant, ttl)
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        consume_budget().await;
        Ok(self.space.list(under))
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        consume_budget().await;
        self.space.grant(request, LockKind::Lock, Check::Tree)
    }

    /// Every release or purge in the namespace wakes every waiter (an
    /// in-process wake-up is cheap); `path` is not used to filter.
    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        mutextree_core::backend::stepwise::change_mode(self, grant, mode).await
    }

    fn listen(&self, _items: &LockItems) -> Listener {
        self.space.feed.listen()
    }
}

struct Space {
    name: Namespace,
    /// One entry per node that is locked or has locks counted below it.
    nodes: DashMap<Box<str>, Node, Hasher>,
    last_token: AtomicU64,
    feed: ChangeFeed,
    /// The token counter's value at the last sweep.
    last_sweep_token: AtomicU64,
    /// Whether a single-key lock (the stepwise algorithm's primitive) was
    /// ever taken here. Such a lock ignores intentions, so it can land on an
    /// ancestor after a tree grant's step 1 passed it; a stepwise client
    /// then checks descendants, and may miss the node the tree grant is
    /// about to lock. So, once key locks exist, a tree grant looks at its
    /// ancestors again after locking its node, and backs off if one was
    /// locked meanwhile: then either the stepwise client sees the node in
    /// its check, or the tree grant sees the stepwise client's lock.
    key_locks_seen: AtomicBool,
}

#[derive(Default)]
struct Node {
    lock: Option<Lock>,
    /// Locks counted below this node, by the key of the child they lie under.
    below: HashMap<Box<str>, u32, Hasher>,
    below_total: u32,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.lock.is_none() && self.below_total == 0
    }

    fn count_below(&mut self, child: &str) {
        self.below_total += 1;
        match self.below.get_mut(child) {
            Some(count) => *count += 1,
            None => {
                self.below.insert(child.into(), 1);
            }
        }
    }

    /// Counts that reach zero stay (the next grant reuses them without
    /// allocating); sweeps drop them.
    fn uncount_below(&mut self, child: &str) {
        if let Some(count) = self.below.get_mut(child) {
            *count -= 1;
            self.below_total -= 1;
        }
    }
}

struct Lock {
    path: LockPath,
    owner: Owner,
    token: u64,
    expires_at: Instant,
    transient: bool,
}

impl Lock {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn held(&self, now: Instant) -> HeldLock {
        HeldLock {
            path: self.path.clone(),
            owner: self.owner.clone(),
            token: self.token,
            mode: Mode::Exclusive,
            remaining: self.expires_at - now,
            transient: self.transient,
        }
    }

    fn is_grant(&self, grant: &Grant) -> bool {
        self.token == grant.token && self.owner == grant.owner
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

impl Space {
    fn new(name: Namespace) -> Self {
        Space {
            name,
            nodes: DashMap::default(),
            last_token: AtomicU64::new(0),
            feed: ChangeFeed::new(),
            last_sweep_token: AtomicU64::new(0),
            key_locks_seen: AtomicBool::new(false),
        }
    }

    fn node_mut(&self, key: &str) -> RefMut<'_, Box<str>, Node> {
        match self.nodes.get_mut(key) {
            Some(node) => node,
            None => self.nodes.entry(key.into()).or_default(),
        }
    }

    fn grant(&self, request: &LockRequest, kind: LockKind, check: Check) -> Result<Attempt, Error> {
        if check == Check::KeyOnly && !self.key_locks_seen.load(Ordering::Relaxed) {
            self.key_locks_seen.store(true, Ordering::SeqCst);
        }
        let levels = Levels::of(request.path().key());
        let (node_key, ancestors) = levels.split_last().expect("a path has at least one segment");
        let now = Instant::now();

        // 1. Intentions on the ancestors, root first.
        for (depth, ancestor) in ancestors.iter().enumerate() {
            let child = levels[depth + 1];
            loop {
                let mut node = self.node_mut(ancestor);
                if check == Check::Tree {
                    if let Some(lock) = &node.lock {
                        if lock.is_live(now) {
                            let blocker = lock.held(now);
                            drop(node);
                            self.uncount(&levels[..=depth]);
                            return Ok(Attempt::Blocked(blocker.into()));
                        }
                        let token = lock.token;
                        drop(node);
                        self.purge(ancestor, token, now);
                        continue;
                    }
                }
                node.count_below(child);
                break;
            }
        }

        // 2. The node itself.
        const MAX_WAITS_FOR_OTHERS: u32 = 1_000_000;
        let mut waited_for_others = 0;
        loop {
            let mut node = self.node_mut(node_key);
            if let Some(lock) = &node.lock {
                if lock.is_live(now) {
                    let blocker = lock.held(now);
                    drop(node);
                    self.uncount(&levels);
                    return Ok(Attempt::Blocked(blocker.into()));
                }
                let token = lock.token;
                drop(node);
                self.purge(node_key, token, now);
                continue;
            }
            if check == Check::Tree && node.below_total > 0 {
                drop(node);
                if let Some(blocker) = self.find_live_below(node_key, now) {
                    self.uncount(&levels);
                    return Ok(Attempt::Blocked(blocker.into()));
                }
                // Only expired locks (now purged) or a grant still under way
                // on another thread (it finishes in microseconds: no await
                // happens inside one): look again in a moment. Counts that
                // stay without a lock would be a bug of this store; say so
                // rather than spin forever.
                waited_for_others += 1;
                if waited_for_others > MAX_WAITS_FOR_OTHERS {
                    self.uncount(&levels);
                    return Err(Error::store_message(
                        "memory",
                        true,
                        format!("internal: locks are counted below {} but none was found", request.path()),
                    ));
                }
                std::thread::yield_now();
                continue;
            }
            let token = self.last_token.fetch_add(1, Ordering::Relaxed) + 1;
            // The lock lives from now, not from the start of the grant, if
            // the grant waited for another thread's.
            let placed_at = if waited_for_others == 0 { now } else { Instant::now() };
            node.lock = Some(Lock {
                path: request.path().clone(),
                owner: request.owner.clone(),
                token,
                expires_at: placed_at + request.ttl.get(),
                transient: kind == LockKind::Transient,
            });
            drop(node);
            self.maybe_sweep(token);
            if check == Check::Tree && self.key_locks_seen.load(Ordering::SeqCst) {
                if let Some(blocker) = self.ancestor_locked_meanwhile(ancestors, now) {
                    let removed = {
                        let mut node = self.node_mut(node_key);
                        let ours = node.lock.as_ref().is_some_and(|lock| lock.token == token);
                        if ours {
                            node.lock = None;
                        }
                        ours
                    };
                    if removed {
                        self.unlink(node_key);
                    }
                    return Ok(Attempt::Blocked(blocker.into()));
                }
            }
            return Ok(Attempt::Granted(Grant::new(request, kind, token, request.ttl.get(), placed_at)));
        }
    }

    /// A live lock on an ancestor, taken by a single-key lock after step 1
    /// passed that ancestor (see [`Space::key_locks_seen`]).
    fn ancestor_locked_meanwhile(&self, ancestors: &[&str], now: Instant) -> Option<HeldLock> {
        ancestors.iter().find_map(|ancestor| {
            let node = self.nodes.get(*ancestor)?;
            node.lock.as_ref().filter(|lock| lock.is_live(now)).map(|lock| lock.held(now))
        })
    }

    /// Takes back one counted lock from the ancestors among `levels` (the
    /// last level is the node the lock was, or would have been, on).
    fn uncount(&self, levels: &[&str]) {
        for pair in levels.windows(2).rev() {
            if let Some(mut node) = self.nodes.get_mut(pair[0]) {
                node.uncount_below(pair[1]);
            }
        }
    }

    /// Removes the lock on `key` with `token` if it is still there and
    /// expired; whoever removes a lock takes back its counts, exactly once.
    fn purge(&self, key: &str, token: u64, now: Instant) {
        let removed = match self.nodes.get_mut(key) {
            Some(mut node) => {
                let expired = node.lock.as_ref().is_some_and(|lock| lock.token == token && !lock.is_live(now));
                if expired {
                    node.lock = None;
                }
                expired
            }
            None => false,
        };
        if removed {
            self.unlink(key);
        }
    }

    /// After the lock on `key` was taken out: uncount it above, drop the
    /// entry if nothing is left in it, wake waiters.
    fn unlink(&self, key: &str) {
        self.uncount(&Levels::of(key));
        self.feed.notify();
    }

    /// A live lock strictly below `key`, purging the expired ones met on the
    /// way.
    /// A non-transient one if there is any: a transient lock is waited out
    /// even by a non-blocking acquisition, a held one is not.
    fn find_live_below(&self, key: &str, now: Instant) -> Option<HeldLock> {
        let (mut held_lock, mut transient) = (None, None);
        self.walk(key, now, |held| {
            if held.path.key() == key {
                return true;
            }
            if held.transient {
                transient.get_or_insert(held);
                true
            } else {
                held_lock = Some(held);
                false
            }
        });
        held_lock.or(transient)
    }

    /// Visits the live locks at `key` and below, in key order, until `visit`
    /// returns false; purges expired locks met on the way. One entry is
    /// locked at a time, so the walk sees each node as it is when visited.
    fn walk(&self, key: &str, now: Instant, mut visit: impl FnMut(HeldLock) -> bool) {
        let mut stack: Vec<Box<str>> = vec![key.into()];
        while let Some(next) = stack.pop() {
            let (live, expired) = {
                let Some(node) = self.nodes.get(&*next) else { continue };
                let first_child = stack.len();
                stack.extend(node.below.iter().filter(|(_, count)| **count > 0).map(|(child, _)| child.clone()));
                // Last pushed, first visited: children in descending order
                // make the walk visit keys in ascending order, so a refusal
                // names the first blocker in key order, as the network
                // stores' range queries do.
                stack[first_child..].sort_unstable_by(|a, b| b.cmp(a));
                match &node.lock {
                    Some(lock) if lock.is_live(now) => (Some(lock.held(now)), None),
                    Some(lock) => (None, Some(lock.token)),
                    None => (None, None),
                }
            };
            if let Some(token) = expired {
                self.purge(&next, token, now);
            }
            if let Some(held) = live {
                if !visit(held) {
                    return;
                }
            }
        }
    }

    fn release(&self, grant: &Grant) -> Result<(), Error> {
        let key = grant.path().key();
        let now = Instant::now();
        let outcome = match self.nodes.get_mut(key) {
            Some(mut node) => match node.lock.take() {
                Some(lock) if lock.is_grant(grant) => Some(lock.is_live(now)),
                other => {
                    node.lock = other;
                    None
                }
            },
            None => None,
        };
        match outcome {
            Some(was_live) => {
                self.unlink(key);
                if was_live {
                    Ok(())
                } else {
                    Err(Error::not_held(grant))
                }
            }
            None => Err(Error::not_held(grant)),
        }
    }

    fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let key = grant.path().key();
        let now = Instant::now();
        let expired_token = {
            let Some(mut node) = self.nodes.get_mut(key) else { return Err(Error::not_held(grant)) };
            match &mut node.lock {
                Some(lock) if lock.is_grant(grant) && lock.is_live(now) => {
                    lock.expires_at = now + ttl.get();
                    return Ok(Grant { ttl: ttl.get(), expires_at: now + ttl.get(), ..grant.clone() });
                }
                Some(lock) if lock.is_grant(grant) => Some(lock.token),
                _ => None,
            }
        };
        if let Some(token) = expired_token {
            self.purge(key, token, now);
        }
        Err(Error::not_held(grant))
    }

    fn list(&self, under: Option<&LockPath>) -> Vec<HeldLock> {
        let now = Instant::now();
        let mut held = Vec::new();
        match under {
            Some(path) => self.walk(path.key(), now, |lock| {
                held.push(lock);
                true
            }),
            None => {
                let mut expired = Vec::new();
                for node in self.nodes.iter() {
                    match &node.lock {
                        Some(lock) if lock.is_live(now) => held.push(lock.held(now)),
                        Some(lock) => expired.push((node.key().clone(), lock.token)),
                        None => {}
                    }
                }
                for (key, token) in expired {
                    self.purge(&key, token, now);
                }
            }
        }
        held.sort_by(|a, b| a.path.cmp(&b.path));
        held
    }

    /// Every time as many grants were made as there are entries, remove the
    /// expired locks and the empty entries of the whole map: amortised O(1)
    /// per grant. Looks only every 1024th token, so the hot path pays one
    /// comparison.
    fn maybe_sweep(&self, token: u64) {
        const CHECK_EVERY: u64 = 1024;
        const MIN_GRANTS: u64 = 4096;
        if !token.is_multiple_of(CHECK_EVERY) {
            return;
        }
        let grants = token - self.last_sweep_token.load(Ordering::Relaxed);
        if grants >= MIN_GRANTS && grants >= self.nodes.len() as u64 {
            self.last_sweep_token.store(token, Ordering::Relaxed);
            self.sweep(Instant::now());
        }
    }

    fn sweep(&self, now: Instant) {
        let expired: Vec<(Box<str>, u64)> = self
            .nodes
            .iter()
            .filter_map(|node| {
                let lock = node.lock.as_ref()?;
                (!lock.is_live(now)).then(|| (node.key().clone(), lock.token))
            })
            .collect();
        for (key, token) in expired {
            self.purge(&key, token, now);
        }
        // Counts at zero and entries with nothing in them are kept between
        // sweeps so that the next grant on the same nodes allocates nothing.
        self.nodes.retain(|_, node| {
            node.below.retain(|_, count| *count > 0);
            !node.is_empty()
        });
    }
}
