//! The store and its namespaces' [`LockBackend`]: connections to the
//! cluster's members ([`EtcdStore`], opened by [`EtcdConfig::connect`]),
//! and per namespace an [`EtcdBackend`] doing every lock operation as etcd
//! requests, with its watch (the feed module) started by its first waiter.
//! See the crate docs for the design; the comments here say what each
//! request is for.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use futures::future::{join, try_join_all};
use futures::stream::{self, StreamExt, TryStreamExt};
use mutextree_core::backend::url::connect_within;
use mutextree_core::backend::{async_trait, stepwise::TRANSIENT_TTL, Attempt, Listener, LockKind, LockRequest};
use mutextree_core::backend::{
    AbortOnDrop, Check, Queue, Revocation, RevocationListener, Revocations, StoreLabels, RESERVATION_TTL,
};
use mutextree_core::{
    Blockers, Error, Fairness, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Namespace, Owner, Ttl,
};
use tokio::time::Instant;

use tracing::Instrument;

use crate::config::EtcdConfig;
use crate::error::{connect_error, is_lease_not_found, store_error, STORE};
use crate::feed::{self, Feeds};
use crate::layout::{decode_reservation, decode_value, encode_reservation, encode_value, Layout, Range, Reservation};
use crate::members::Members;

/// etcd's minimum lease ttl with its default timing (`--election-timeout`
/// 1000 ms: one and a half election timeouts, in whole seconds). A server
/// may apply a larger one; the grant reports what it applied.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Locks listed per range request; pages are read at one revision.
const LIST_PAGE: i64 = 1000;
/// Lease lookups in flight at once when listing.
const LOOKUPS_IN_FLIGHT: usize = 32;
/// How long after its grant a lease may still take new locks: a
/// twentieth of its ttl, at most [`MAX_SHARING`]. A lock on a shared lease
/// lives that much less than its ttl at most, and its grant says so.
const SHARING_SHARE: u32 = 20;
const MAX_SHARING: Duration = Duration::from_millis(500);
/// How often a grant or an upgrade is retried when a lock in its way
/// vanished (its lease expired) between the transaction and the lookup of
/// its lease; and how often a mode change is sent again after learning
/// where the grant's keys are.
const ROUNDS: usize = 3;
/// Grants whose lease a backend remembers before it forgets the expired ones.
const REMEMBERED_LEASES: usize = 4096;
/// The ttl of the leases reservations are on: a reservation lives
/// [`RESERVATION_TTL`] after it was written at most, as a grant lives its
/// ttl (then etcd's sweep of expired leases, every 500 ms, deletes it).
const RESERVATION_LEASE: Duration = RESERVATION_TTL;

/// How long a revocation's key stays: long enough for every watch to see
/// its put, short enough to leave nothing behind.
const REVOCATION_TTL: Duration = Duration::from_secs(10);
/// How long after its grant a lease may still take a waiter's renewal: a
/// renewed reservation lives at least 2.5 s more, and its waiter renews it
/// at least every third of [`RESERVATION_TTL`] (1 s).
const RESERVATION_LEASE_YOUTH: Duration = Duration::from_millis(500);
/// Reservations a transaction reads per range: the waiters before a
/// request that it learns at once. With more, it learns them as they go.
const AWAITED_PER_RANGE: i64 = 128;
/// Free tags a backend keeps for its next waits.
const FREE_TAGS: usize = 64;

impl EtcdConfig {
    /// Checks the configuration and connects, one connection per endpoint
    /// (see [the failover](crate#how-it-works)): one attempt to reach the
    /// members within the connect timeout, which succeeds when one of them
    /// answers. With credentials, it authenticates with every endpoint, so
    /// wrong ones fail here. Namespaces' backends share the connections:
    /// [`EtcdStore::backend`].
    pub async fn connect(&self) -> Result<EtcdStore, Error> {
        EtcdStore::open(self.clone()).await
    }
}

/// A connection to an etcd cluster, from which namespaces are opened.
///
/// Cheap to clone; clones and the backends made from it share the
/// connection (one multiplexed gRPC channel per endpoint).
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
    config: EtcdConfig,
}

impl EtcdStore {
    /// See [`EtcdConfig::connect`]. The clients connect lazily (and
    /// reconnect by themselves after a failure); asking every member for
    /// its status at once is the one attempt that shows a member answers.
    pub(crate) async fn open(config: EtcdConfig) -> Result<Self, Error> {
        config.check()?;
        let addresses = config.addresses();
        let limit = config.connect_timeout_value();
        let opening = async {
            let mut clients = Vec::with_capacity(config.endpoints().len());
            for endpoint in config.endpoints() {
                let client = Client::connect([endpoint], Some(config.connect_options()))
                    .await
                    .map_err(|error| connect_error(&addresses, limit, error))?;
                clients.push(client);
            }
            let status = |client: &Client| {
                let mut client = client.clone();
                async move { client.status().await }
            };
            let answers = futures::future::join_all(clients.iter().map(status)).await;
            // One member that answers is enough: the others may be down
            // for now, and the store fails over to them when they are back.
            let mut failure = None;
            for answer in answers {
                match answer {
                    Ok(_) => return Ok(clients),
                    Err(error) => failure = failure.or(Some(error)),
                }
            }
            Err(connect_error(&addresses, limit, failure.expect("a configuration has at least one endpoint")))
        };
        let clients = connect_within(STORE, &addresses, limit, opening).await?;
        Ok(EtcdStore { members: Arc::new(Members::new(clients)), config })
    }

    /// The backend of one namespace, on this store's connections.
    pub fn backend(&self, name: &str) -> Result<EtcdBackend, Error> {
        let name = Namespace::new(name)?;
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                members: self.members.clone(),
                layout: Layout::new(self.config.key_prefix(), name.as_str()),
                namespace: name,
                max_txn_ops: self.config.max_txn_ops_value(),
                feeds: Arc::new(Feeds::default()),
                watch: Mutex::new(None),
                revocations: Revocations::not_live(),
                revocation_watch: Mutex::new(None),
                shared_leases: Mutex::new(HashMap::new()),
                grant_leases: Mutex::new(HashMap::new()),
                reservation_lease: Mutex::new(None),
                queued: Mutex::new(HashMap::new()),
                free_tags: Mutex::new(Vec::new()),
                sent: AtomicU64::new(0),
            }),
        })
    }
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore").field("config", &self.config).finish()
    }
}

/// One namespace of an [`EtcdStore`]: the [`LockBackend`].
///
/// Cheap to clone; clones share the connection and the watch.
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    members: Arc<Members>,
    layout: Layout,
    namespace: Namespace,
    /// The server's `--max-txn-ops`, as configured.
    max_txn_ops: usize,
    /// The waiters' feeds, fed by the watch.
    feeds: Arc<Feeds>,
    /// The watch task, started by the first `listen`; it ends with the
    /// backend's last clone.
    watch: Mutex<Option<AbortOnDrop>>,
    /// The holders' revocations, fed by a second watch.
    revocations: Revocations,
    /// That watch's task, started by the first `listen_revocation`.
    revocation_watch: Mutex<Option<AbortOnDrop>>,
    /// The lease new grants of each ttl (in seconds) go on, while young.
    shared_leases: Mutex<HashMap<i64, Lease>>,
    /// The lease of each grant this backend made or refreshed, by token:
    /// the lease a mode change puts the grant's new keys on.
    grant_leases: Mutex<HashMap<u64, Lease>>,
    /// The lease this backend puts reservations on, while it lives.
    reservation_lease: Mutex<Option<Lease>>,
    /// This backend's waiters, by ticket: what each waits for.
    queued: Mutex<HashMap<u64, Queued>>,
    /// Tags of this backend's ended waits whose keys are gone, for its next
    /// waits (see the layout module).
    free_tags: Mutex<Vec<String>>,
    /// Requests sent, for [`LockBackend::round_trips`].
    sent: AtomicU64,
}

/// A mutex that outlives a panic elsewhere: its data stays consistent
/// because no code panics while holding it.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("namespace", &self.inner.namespace)
            .field("key_prefix", &self.inner.layout.namespace_prefix())
            .finish()
    }
}

/// A granted lease: its id, the ttl etcd applied, and when it was asked
/// for (its life counts from a moment after that).
#[derive(Clone, Copy)]
struct Lease {
    id: i64,
    ttl: Duration,
    sent_at: Instant,
}

impl Lease {
    /// Whether new locks may still go on it.
    fn is_young(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.sent_at) <= (self.ttl / SHARING_SHARE).min(MAX_SHARING)
    }

    /// Whether it has run out by this side's reckoning.
    fn is_over(&self, now: Instant) -> bool {
        now >= self.sent_at + self.ttl
    }

    /// Whether it was asked for at most `age` ago.
    fn is_younger_than(&self, age: Duration) -> bool {
        Instant::now().saturating_duration_since(self.sent_at) <= age
    }
}

/// A waiter of this backend, by its ticket: its reservation's keys, the
/// keys of the conflicting reservations with smaller tickets it saw last,
/// with their create revisions, and the revision it saw them at. Its next
/// attempt is held up by no earlier waiter if each of those keys is gone or
/// created anew since, and no reservation came back since with its old
/// ticket (see [`Fair`]): a transaction can check exactly that, key by key
/// and on the rewrite mark. (A range compare cannot check "no key created
/// before the ticket": an empty range compares as create revision 0.)
struct Queued {
    owner: Owner,
    tag: String,
    /// When it joined the queue (see [`Fair`]).
    joined: u64,
    keys: Vec<String>,
    earlier: Earlier,
    /// Whether `earlier` holds all of them (a read stops at
    /// [`AWAITED_PER_RANGE`] per range).
    complete: bool,
    noted_at: Instant,
}

/// The earlier waiters' keys a waiter saw, with their create revisions,
/// and the revision it saw them at.
#[derive(Clone, Default)]
struct Earlier {
    keys: Vec<(Vec<u8>, i64)>,
    seen_at: i64,
}

impl Earlier {
    fn seen(kvs: &[KeyValue], seen_at: i64) -> Self {
        Earlier { keys: kvs.iter().map(|kv| (kv.key().to_vec(), kv.create_revision())).collect(), seen_at }
    }
}

#[async_trait]
impl LockBackend for EtcdBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.grant(request, kind, Check::KeyOnly).await
    }

    /// One transaction: if each item's owner range holds only keys of this
    /// grant (create revision = token), delete the range. Its lease is left
    /// to lapse: other grants may share it. If that finds more than the
    /// grant's keys (the same owner's other Shared grant on a node), the
    /// grant's keys are read and deleted exactly, in two more.
    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        let owned: Vec<Range> = self.owned_ranges(grant).collect();
        if self.send(release_txn(&owned, grant.token)).await?.succeeded() {
            self.forget_grant_lease(grant.token);
            return Ok(());
        }
        let Some(own) = self.locate(grant).await? else {
            return Err(Error::not_held(grant));
        };
        let exact: Vec<Range> = own.iter().map(|kv| Range::key(kv.key())).collect();
        if !self.send(release_txn(&exact, grant.token)).await?.succeeded() {
            return Err(Error::not_held(grant));
        }
        self.forget_grant_lease(grant.token);
        Ok(())
    }

    /// The release, then the revocation's key (see the layout module) on
    /// a short lease of its own, taken while the release runs. If the key
    /// cannot be written, the lock is released all the same and its holder
    /// learns of it at its next refresh.
    async fn revoke(&self, grant: &Grant) -> Result<(), Error> {
        let announcing = Ttl::new(REVOCATION_TTL).expect("a valid ttl");
        let (released, lease) = join(self.release(grant), self.grant_lease(announcing)).await;
        let lease = lease.ok();
        if let (Ok(()), Some(lease)) = (&released, lease) {
            let key = self.inner.layout.revocation_key(grant.token);
            let message = Revocation::of(grant).to_message();
            let put = PutOptions::new().with_lease(lease.id);
            let _ = self.counted().kv(|mut kv| async move { kv.put(key, message, Some(put)).await }).await;
        } else if let Some(lease) = lease {
            self.revoke_in_background(lease.id);
        }
        released
    }

    /// Heard by this backend's watch of the revocations' space, open while
    /// a listener lives.
    fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        let mut task = locked(&self.inner.revocation_watch);
        if task.is_none() {
            let hearing = feed::hear_revocations(
                self.inner.members.clone(),
                self.inner.layout.clone(),
                self.inner.revocations.clone(),
            );
            *task = Some(AbortOnDrop::new(tokio::spawn(hearing.instrument(self.notifications()))));
        }
        self.inner.revocations.listen(grant)
    }

    /// A new lease of its own with the new ttl (so the remaining life is
    /// exactly that) while the grant's keys are read, then one transaction
    /// that re-puts each key (same value, same create revision, so the same
    /// token) on it if it is still this grant's. The old lease is left to
    /// lapse: other grants may share it. A keep-alive would restore the
    /// lease's *original* ttl, and etcd 3.4 can answer a keep-alive of a
    /// revoked lease with success.
    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let (lease, own) = join(self.grant_lease(ttl), self.locate(grant)).await;
        let lease = lease?;
        let own = match own {
            Ok(Some(own)) => own,
            // Nothing went on the new lease.
            Ok(None) => {
                self.revoke_in_background(lease.id);
                return Err(Error::not_held(grant));
            }
            Err(error) => {
                self.revoke_in_background(lease.id);
                return Err(error);
            }
        };
        let compares: Vec<Compare> = own.iter().map(|kv| is_grant(&Range::key(kv.key()), grant.token)).collect();
        let puts: Vec<TxnOp> = own
            .iter()
            .map(|kv| TxnOp::put(kv.key(), kv.value(), Some(PutOptions::new().with_lease(lease.id))))
            .collect();
        // On an error the puts may have been applied: the lease then holds
        // the lock, and is not revoked.
        if !self.send(Txn::new().when(compares).and_then(puts)).await?.succeeded() {
            self.revoke_in_background(lease.id);
            return Err(Error::not_held(grant));
        }
        self.remember_grant_lease(grant.token, lease);
        Ok(Grant { ttl: lease.ttl, expires_at: lease.sent_at + lease.ttl, ..grant.clone() })
    }

    /// Range requests of at most 1000 keys over both key spaces, all at the
    /// revision of the first, then the remaining lives, with a lease lookup
    /// where one is needed (a lock whose lease is gone by then is not
    /// listed); in path order.
    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let layout = &self.inner.layout;
        let ranges = match under {
            Some(path) => [layout.subtree(Mode::Exclusive, path), layout.subtree(Mode::Shared, path)],
            None => layout.grants(),
        };
        self.listed(ranges.to_vec()).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        self.grant(request, LockKind::Lock, Check::Tree).await
    }

    /// One transaction that deletes each item's key and puts a new one in
    /// the new mode's key space, on the grant's lease (so the expiry stays),
    /// if the grant is live and nothing of another grant is in the way of
    /// the changed items (for a downgrade, only a stepwise client's lock in
    /// progress can be); the new keys' create revision is the new token. (etcd
    /// refuses a put and a delete of one key in one transaction, so an item
    /// that keeps its mode gets a new key too.) See the crate docs.
    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        let layout = &self.inner.layout;
        let changed = grant.items.with_mode(mode);
        // A downgrade is checked too: natively nothing can be in its way,
        // but a stepwise client's lock in progress can (see the contract).
        let mut checks = Checks::default();
        for (item, now) in changed.iter().zip(grant.items.iter()) {
            checks.require_free(layout, &item.path, mode, Some((now.mode, grant.token)));
        }
        // An item that keeps its mode needs a key other than the one it has.
        let new_keys: Vec<String> = changed
            .iter()
            .zip(grant.items.iter())
            .map(|(item, now)| {
                if now.mode == mode {
                    layout.fresh_key(mode, &item.path, &grant.owner)
                } else {
                    layout.new_key(mode, &item.path, &grant.owner)
                }
            })
            .collect();
        // Per item: two compares, a read and up to three operations.
        let items = grant.items.len();
        self.check_size(&changed, checks.len() + 2 * items, 3 * items, checks.len() + items)?;
        let value = encode_value(grant.kind, &grant.owner);
        // First the owner's ranges on the lease this backend put the grant
        // on; after a refusal that shows the keys elsewhere, those exactly.
        let mut own: Option<Vec<(Range, i64)>> = self
            .remembered_grant_lease(grant.token)
            .map(|lease| self.owned_ranges(grant).map(|range| (range, lease.id)).collect());
        for round in 1..=ROUNDS {
            let own_now = match own.take() {
                Some(own) => own,
                None => match self.locate(grant).await? {
                    Some(kvs) => kvs.iter().map(|kv| (Range::key(kv.key()), kv.lease())).collect(),
                    None => return Err(Error::not_held(grant)),
                },
            };
            let mut compares = checks.compares();
            let mut ops = Vec::with_capacity(3 * items);
            let mut reads = checks.reads();
            for (((range, lease), item), new_key) in own_now.iter().zip(grant.items.iter()).zip(&new_keys) {
                compares.push(is_grant(range, grant.token));
                compares
                    .push(Compare::lease(range.start.clone(), CompareOp::Equal, *lease).with_range(range.end.clone()));
                // A key of the same space must stay out of the deleted range.
                let deleted = if item.mode == mode { range.without(new_key) } else { vec![range.clone()] };
                ops.extend(deleted.into_iter().map(|range| TxnOp::delete(range.start, Some(delete_range(range.end)))));
                ops.push(TxnOp::put(new_key.clone(), value.clone(), Some(PutOptions::new().with_lease(*lease))));
                reads.push(read_all(range));
            }
            let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
            let response = match self.send_raw(txn).await {
                Ok(response) => response,
                // The lease is not where this backend thought: look.
                Err(error) if is_lease_not_found(&error) => continue,
                Err(error) => return Err(store_error(error)),
            };
            if response.succeeded() {
                let token = revision(&response)?;
                self.forget_grant_lease(grant.token);
                // All the keys of a grant are on one lease, which ends when the grant does.
                if let (Some((_, id)), Some(sent_at)) = (own_now.first(), grant.expires_at.checked_sub(grant.ttl)) {
                    self.remember_grant_lease(token, Lease { id: *id, ttl: grant.ttl, sent_at });
                }
                return Ok(Attempt::Granted(Grant { items: changed, token, ..grant.clone() }));
            }
            let found = read_keys(response);
            let located = self.own_keys(grant, &found);
            let Some(located) = located else {
                return Err(Error::not_held(grant));
            };
            if let Some((blockers, alive)) = self.blockers(&changed, Some(grant.token), &found).await? {
                if alive || round == ROUNDS {
                    return Ok(Attempt::Blocked(blockers));
                }
                own = Some(own_now);
                continue;
            }
            // Live and unopposed: the keys are not all where this round
            // looked for them (another lease, or the same owner's other
            // Shared grant on a node); the next round names them exactly.
            own = Some(located.iter().map(|kv| (Range::key(kv.key()), kv.lease())).collect());
        }
        Err(Error::store_message(
            STORE,
            true,
            format!("the keys of the grant on {} kept changing while its mode was changed", grant.items),
        ))
    }

    /// Reads the reservation's keys (those this backend wrote for the
    /// ticket, or for a ticket it does not know, every reservation of the
    /// namespace), then deletes those of this owner and ticket in one
    /// transaction, if none changed in between (a renewal); the deletes
    /// wake the waiters behind it.
    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        let known = {
            let mut queued = locked(&self.inner.queued);
            match queued.get(&ticket) {
                Some(waiter) if &waiter.owner == owner => {
                    queued.remove(&ticket).map(|waiter| (waiter.keys, waiter.tag))
                }
                _ => None,
            }
        };
        let (keys, tag) = known.unzip();
        for _ in 0..ROUNDS {
            let theirs = self.reservation_of(owner, ticket, keys.clone()).await?;
            if theirs.is_empty() {
                if let Some(tag) = tag {
                    self.give_back_tag(tag);
                }
                return Ok(());
            }
            let unchanged: Vec<Compare> =
                theirs.iter().map(|kv| Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision())).collect();
            let deletes: Vec<TxnOp> = theirs.iter().map(|kv| TxnOp::delete(kv.key(), None)).collect();
            if self.send(Txn::new().when(unchanged).and_then(deletes)).await?.succeeded() {
                if let Some(tag) = tag {
                    self.give_back_tag(tag);
                }
                return Ok(());
            }
        }
        Err(Error::store_message(STORE, true, format!("the reservation with ticket {ticket} kept changing")))
    }

    /// The space of all reservations under `under`, read like
    /// [`list`](LockBackend::list) reads the grants.
    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let layout = &self.inner.layout;
        let range = match under {
            // Every mode conflicts with an Exclusive request.
            Some(path) => layout.awaited_below(path, Mode::Exclusive),
            None => {
                let [all, _exclusive_again] = layout.reservations();
                all
            }
        };
        self.listed(vec![range]).await
    }

    fn fairness(&self) -> Fairness {
        Fairness::Fair
    }

    /// Wakes on deletes of the items' paths, their ancestors and their
    /// descendants, as this backend's watch reports them.
    fn listen(&self, items: &LockItems) -> Listener {
        let mut task = locked(&self.inner.watch);
        if task.is_none() {
            let watching = feed::run(self.inner.members.clone(), self.inner.layout.clone(), self.inner.feeds.clone());
            *task = Some(AbortOnDrop::new(tokio::spawn(watching.instrument(self.notifications()))));
        }
        self.inner.feeds.listen(items.iter().map(|item| item.path.key().to_owned()).collect())
    }

    /// Requests this backend (and its clones) sent so far: transactions,
    /// reads and lease requests, not the watch.
    fn labels(&self) -> StoreLabels<'_> {
        StoreLabels { store: STORE, namespace: self.namespace().as_str() }
    }

    fn round_trips(&self) -> Option<u64> {
        Some(self.inner.sent.load(Ordering::Relaxed))
    }
}

impl EtcdBackend {
    /// The span this backend's watches run in: their comings and goings
    /// are events in it.
    fn notifications(&self) -> tracing::Span {
        tracing::debug_span!(target: "mutextree", "notifications", store = STORE, namespace = self.namespace().as_str())
    }

    /// The namespace this backend works in.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// One transaction that puts each item's key on a young shared lease
    /// of the request's ttl, or reports what is in the way of each blocked
    /// item; and, for a fair request, keeps its place in the queue.
    ///
    /// The transaction compares, for [`Check::Tree`], the ranges each item
    /// needs free ([`Checks::require_free`]); for [`Check::KeyOnly`], the
    /// node's holders in both spaces. On failure it reads the ranges it
    /// compared (their first key only), so a refusal names a blocker for
    /// each blocked item without another request for the keys; their
    /// leases are then looked up for the remaining lives.
    ///
    /// A fair request (see [`Fair`]) also compares the reservations in its
    /// way, and reads them on failure: a refusal of [`Queue::Join`] writes
    /// its reservation in the same transaction (whose revision is its
    /// ticket), one of [`Queue::Waiting`] writes it again on a young lease
    /// (renewing it, or if it was gone putting the rewrite mark too), and a
    /// grant of `Waiting` deletes it. After a `Join`
    /// on a lease that is no longer young, the next round renews at once.
    async fn grant(&self, request: &LockRequest, kind: LockKind, check: Check) -> Result<Attempt, Error> {
        let layout = &self.inner.layout;
        let mut checks = Checks::default();
        let mut queue = match check {
            Check::Tree => {
                for item in &request.items {
                    checks.require_free(layout, &item.path, item.mode, None);
                }
                request.queue
            }
            // The stepwise primitive ignores the queue.
            Check::KeyOnly => {
                for mode in [Mode::Exclusive, Mode::Shared] {
                    checks.require(layout.holders(mode, request.path()), Expect::Empty);
                }
                Queue::Barge
            }
        };
        let keys: Vec<String> =
            request.items.iter().map(|item| layout.new_key(item.mode, &item.path, &request.owner)).collect();
        let (tag, joined) = match queue {
            Queue::Barge | Queue::Try => (String::new(), join_time()),
            Queue::Join => (self.take_tag(), join_time()),
            Queue::Waiting(ticket) => self.wait_of(&request.owner, ticket).await?,
        };
        let fair = Fair::new(layout, request, &tag, joined);
        let (compares, then, otherwise) = match queue {
            Queue::Barge => (checks.len(), keys.len(), checks.len()),
            Queue::Try => (checks.len() + fair.ranges.len(), keys.len(), checks.len() + fair.ranges.len()),
            // A refused `Join` waits on: a waiter's refusal also reads the
            // reservations written again and may put the rewrite mark.
            Queue::Join | Queue::Waiting(_) => {
                let reads = checks.len() + fair.ranges.len();
                (reads, keys.len() + fair.keys.len(), reads + 2 + fair.keys.len())
            }
        };
        self.check_size(&request.items, compares, then, otherwise)?;
        let value = encode_value(kind, &request.owner);
        let (compares, reads) = (checks.compares(), checks.reads());
        let mut lease = self.shared_lease(request.ttl).await?;
        let mut lease_replaced = false;
        let mut round = 0;
        loop {
            let puts: Vec<TxnOp> = keys
                .iter()
                .map(|key| TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease.id))))
                .collect();
            let room = self.inner.max_txn_ops.saturating_sub(compares.len());
            let in_queue = self.queue_part(queue, &fair, request, room).await?;
            let txn = Txn::new()
                .when([compares.clone(), in_queue.compares].concat())
                .and_then([puts, in_queue.then].concat())
                .or_else([reads.clone(), in_queue.otherwise].concat());
            let response = match self.send_raw(txn).await {
                Ok(response) => response,
                Err(error) if is_lease_not_found(&error) && !lease_replaced => {
                    // Someone revoked the shared lease, or the
                    // reservations' one: the put named a lease that is
                    // gone, so nothing was written.
                    self.forget_shared_lease(&lease);
                    locked(&self.inner.reservation_lease).take();
                    lease = self.shared_lease(request.ttl).await?;
                    lease_replaced = true;
                    continue;
                }
                // Applied or not, what it granted lapses with the lease.
                Err(error) => return Err(store_error(error)),
            };
            if response.succeeded() {
                let token = revision(&response)?;
                if let Queue::Waiting(ticket) = queue {
                    locked(&self.inner.queued).remove(&ticket);
                }
                // Its keys are gone, or were never written.
                if queue != Queue::Try && queue != Queue::Barge {
                    self.give_back_tag(fair.tag.clone());
                }
                self.remember_grant_lease(token, lease);
                return Ok(Attempt::Granted(Grant::new(request, kind, token, lease.ttl, lease.sent_at)));
            }
            round += 1;
            let before = match queue {
                Queue::Waiting(ticket) => Some(ticket),
                _ => None,
            };
            let ticket = match queue {
                Queue::Barge | Queue::Try => None,
                Queue::Join => Some(revision(&response)?),
                Queue::Waiting(ticket) => Some(ticket),
            };
            let in_the_way = self.refused_by(&response, reads.len(), ticket, before, request, &fair);
            let renew_now = in_queue.lease.is_some_and(|on| !on.is_younger_than(RESERVATION_LEASE_YOUTH));
            if let Some(ticket) = ticket {
                queue = Queue::Waiting(ticket);
            }
            let Some((blockers, alive)) = self.blockers(&request.items, None, &in_the_way).await? else {
                // A waiter whose earlier waiters were gone, but not all
                // where it looked: the next round knows where they are.
                if ticket.is_some() && round < ROUNDS {
                    continue;
                }
                return Err(Error::store_message(
                    STORE,
                    ticket.is_some(),
                    "a refused grant transaction read nothing in the way of the request",
                ));
            };
            // A blocker whose lease is gone by now may let the next round
            // through; after a few, it is reported as ending now and a
            // waiter retries at once.
            if (alive && !renew_now) || round == ROUNDS {
                return Ok(match ticket {
                    Some(ticket) => Attempt::Queued { ticket, blockers },
                    None => Attempt::Blocked(blockers),
                });
            }
        }
    }

    /// Range requests of at most [`LIST_PAGE`] keys over `ranges`, all at
    /// the revision of the first, then the remaining lives, with a lease
    /// lookup where one is needed (an item whose lease is gone by then is
    /// not listed); in path order, then token order.
    async fn listed(&self, ranges: Vec<Range>) -> Result<Vec<HeldLock>, Error> {
        let mut found: Vec<KeyValue> = Vec::new();
        let mut revision = 0;
        for range in ranges {
            let mut from = range.start.into_bytes();
            loop {
                let options =
                    GetOptions::new().with_range(range.end.clone()).with_limit(LIST_PAGE).with_revision(revision);
                let key = from.clone();
                let page = self.counted().kv(|mut kv| async move { kv.get(key, Some(options)).await });
                let mut page = page.await.map_err(store_error)?;
                if revision == 0 {
                    revision = page.header().map_or(0, |header| header.revision());
                }
                let more = page.more();
                found.extend(page.take_kvs());
                match found.last() {
                    Some(last) if more => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
        }
        let described: Vec<Option<HeldLock>> = stream::iter(found)
            .map(|kv| {
                let backend = self.clone();
                async move { backend.describe(&kv).await }
            })
            .buffered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut held: Vec<HeldLock> = described.into_iter().flatten().collect();
        held.sort_by(|a, b| a.path.cmp(&b.path).then(a.token.cmp(&b.token)));
        Ok(held)
    }

    /// The earlier waiters in the way of the waiter with `ticket`, if all
    /// of them are known: remembered from its last attempt, or read now
    /// (one request more) for a ticket this backend does not know.
    async fn earlier(&self, fair: &Fair<'_>, request: &LockRequest, ticket: u64) -> Result<Option<Earlier>, Error> {
        if let Some(waiter) = locked(&self.inner.queued).get(&ticket) {
            return Ok(waiter.complete.then(|| waiter.earlier.clone()));
        }
        let response = self.send(Txn::new().and_then(fair.reads(Some(ticket), AWAITED_PER_RANGE))).await?;
        let (earlier, complete) = fair.earlier(read_ranges(&response), Some(ticket));
        let earlier = Earlier::seen(&earlier, seen_at(&response));
        self.note_queued(ticket, request, fair, earlier.clone(), complete);
        Ok(complete.then_some(earlier))
    }

    /// A tag for a new wait: a free one of this backend's, or a new one.
    fn take_tag(&self) -> String {
        locked(&self.inner.free_tags).pop().unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)))
    }

    /// Frees the tag of a wait whose keys are gone (a few are kept).
    fn give_back_tag(&self, tag: String) {
        let mut free = locked(&self.inner.free_tags);
        if free.len() < FREE_TAGS && !free.contains(&tag) {
            free.push(tag);
        }
    }

    /// The tag of the wait of `owner` with `ticket` and when it joined the
    /// queue: remembered, else read from its keys if they are there (one
    /// request more), else a new tag, joined now (its reservation lapsed:
    /// it is written again). A value without a join time (written before
    /// they were kept) is taken as joined now too.
    async fn wait_of(&self, owner: &Owner, ticket: u64) -> Result<(String, u64), Error> {
        if let Some(waiter) = locked(&self.inner.queued).get(&ticket) {
            return Ok((waiter.tag.clone(), waiter.joined));
        }
        let found = self.reservation_of(owner, ticket, None).await?;
        let Some(kv) = found.first() else { return Ok((self.take_tag(), join_time())) };
        let tag = self.inner.layout.reservation_tag(kv.key()).map_or_else(|| self.take_tag(), str::to_owned);
        let joined = decode_reservation(kv.value(), kv.create_revision())?.joined;
        Ok((tag, joined.unwrap_or_else(join_time)))
    }

    /// The keys of the reservation of `owner` with `ticket`, read: among
    /// `known` keys, or among all the namespace's reservations.
    async fn reservation_of(
        &self,
        owner: &Owner,
        ticket: u64,
        known: Option<Vec<String>>,
    ) -> Result<Vec<KeyValue>, Error> {
        let reads: Vec<TxnOp> = match known {
            Some(keys) => keys.into_iter().map(|key| TxnOp::get(key, None)).collect(),
            None => self.inner.layout.reservations().into_iter().map(|range| read_all(&range)).collect(),
        };
        let found = read_keys(self.send(Txn::new().and_then(reads)).await?);
        let theirs = |kv: &KeyValue| {
            decode_reservation(kv.value(), kv.create_revision())
                .is_ok_and(|found| found.ticket == ticket && &found.owner == owner)
        };
        Ok(found.into_iter().filter(|kv| theirs(kv)).collect())
    }

    /// Remembers the waiter with `ticket` and the earlier waiters it saw;
    /// forgets the waiters not heard of for longer than a reservation lives.
    fn note_queued(&self, ticket: u64, request: &LockRequest, fair: &Fair<'_>, earlier: Earlier, complete: bool) {
        let now = Instant::now();
        let mut queued = locked(&self.inner.queued);
        queued.retain(|_, waiter| now.saturating_duration_since(waiter.noted_at) < RESERVATION_TTL * 2);
        let (owner, tag, keys) = (request.owner.clone(), fair.tag.clone(), fair.keys.clone());
        queued.insert(ticket, Queued { owner, tag, joined: fair.joined, keys, earlier, complete, noted_at: now });
    }

    /// The lease to put a reservation on: the one this backend put its
    /// last on, if `young` only while it is younger than
    /// [`RESERVATION_LEASE_YOUTH`], else a new one. A first attempt (which
    /// is usually granted, and then writes no reservation) takes the last
    /// one at any age, so that it costs no lease: should it be refused, the
    /// next round renews the reservation on a young lease, and should that
    /// lease be gone, etcd refuses the write and the round is sent again.
    async fn reservation_lease(&self, young: bool) -> Result<Lease, Error> {
        let last = *locked(&self.inner.reservation_lease);
        if let Some(lease) = last.filter(|lease| !young || lease.is_younger_than(RESERVATION_LEASE_YOUTH)) {
            return Ok(lease);
        }
        let lease = self.grant_lease(Ttl::new(RESERVATION_LEASE)?).await?;
        *locked(&self.inner.reservation_lease) = Some(lease);
        Ok(lease)
    }

    /// The queue's part of one round of a grant (see [`Fair`]), given
    /// `room` for compares.
    async fn queue_part(
        &self,
        queue: Queue,
        fair: &Fair<'_>,
        request: &LockRequest,
        room: usize,
    ) -> Result<InQueue, Error> {
        Ok(match queue {
            Queue::Barge => InQueue::default(),
            Queue::Try => {
                InQueue { compares: fair.none_compares(), otherwise: fair.reads(None, 1), ..InQueue::default() }
            }
            Queue::Join => {
                let on = self.reservation_lease(false).await?;
                let otherwise = [fair.reads(None, AWAITED_PER_RANGE), fair.puts(on.id, None)].concat();
                InQueue { compares: fair.none_compares(), then: Vec::new(), otherwise, lease: Some(on) }
            }
            Queue::Waiting(ticket) => {
                let on = self.reservation_lease(true).await?;
                let earlier = self.earlier(fair, request, ticket).await?;
                let reads = fair.reads(Some(ticket), AWAITED_PER_RANGE);
                let otherwise = [reads, vec![fair.mark_if_written_again()], fair.puts(on.id, Some(ticket))].concat();
                InQueue {
                    compares: fair.gone_compares(earlier.as_ref(), room),
                    then: fair.deletes(),
                    otherwise,
                    lease: Some(on),
                }
            }
        })
    }

    /// What a refused round read in the way: the grants' keys (the first
    /// `grant_reads` reads), then the reservations' (read as
    /// [`Fair::reads`] does for `before`). For a waiter with a ticket,
    /// those are the earlier ones, remembered for its next round.
    fn refused_by(
        &self,
        response: &TxnResponse,
        grant_reads: usize,
        ticket: Option<u64>,
        before: Option<u64>,
        request: &LockRequest,
        fair: &Fair<'_>,
    ) -> Vec<KeyValue> {
        let mut found = read_ranges(response);
        let awaited = found.split_off(grant_reads.min(found.len()));
        let mut in_the_way: Vec<KeyValue> = found.into_iter().flat_map(|(kvs, _)| kvs).collect();
        match ticket {
            Some(ticket) => {
                let (earlier, complete) = fair.earlier(awaited, before);
                let seen = Earlier::seen(&earlier, seen_at(response));
                self.note_queued(ticket, request, fair, seen, complete);
                in_the_way.extend(earlier);
            }
            None => in_the_way.extend(awaited.into_iter().flat_map(|(kvs, _)| kvs)),
        }
        in_the_way
    }

    /// For each item of `items`, in order, a live key among `found` (other
    /// than those of the grant with token `own`) in its way, described; and
    /// whether all of them still had their lease when described (one that
    /// did not is reported with 1 ms left). `None` if no item has one.
    async fn blockers(
        &self,
        items: &LockItems,
        own: Option<u64>,
        found: &[KeyValue],
    ) -> Result<Option<(Blockers, bool)>, Error> {
        let layout = &self.inner.layout;
        let mut candidates = Vec::with_capacity(found.len());
        for kv in found.iter().filter(|kv| Some(kv.create_revision() as u64) != own) {
            let (path, mode) = layout.item_of(kv.key())?;
            // A held lock before a transient one (a transient one is waited
            // out even without waiting), and both before a reservation.
            let rank = match layout.is_reservation(kv.key()) {
                true => 2,
                false => u8::from(decode_value(kv.value())?.0),
            };
            candidates.push((path, mode, rank, kv));
        }
        candidates.sort_by_key(|(_, _, rank, _)| *rank);
        let in_the_way: Vec<&KeyValue> = items
            .iter()
            .filter_map(|item| {
                candidates
                    .iter()
                    .find(|(path, mode, _, _)| path.overlaps(&item.path) && mode.conflicts_with(item.mode))
                    .map(|(_, _, _, kv)| *kv)
            })
            .collect();
        if in_the_way.is_empty() {
            return Ok(None);
        }
        let described = try_join_all(in_the_way.iter().map(|kv| self.describe(kv))).await?;
        let alive = described.iter().all(Option::is_some);
        let mut held = Vec::with_capacity(described.len());
        for (kv, described) in in_the_way.into_iter().zip(described) {
            let held_lock = match described {
                Some(held_lock) => held_lock,
                None => HeldLock { remaining: Duration::from_millis(1), ..self.describe_with(kv, Duration::ZERO)? },
            };
            held.push(held_lock);
        }
        let mut held = held.into_iter();
        let first = held.next().expect("at least one item is blocked");
        Ok(Some((Blockers::new(first, held), alive)))
    }

    /// The ranges where the grant's items keep their keys: one per item,
    /// its owner's keys on its node, in its mode's space.
    fn owned_ranges<'g>(&'g self, grant: &'g Grant) -> impl Iterator<Item = Range> + 'g {
        grant.items.iter().map(|item| self.inner.layout.owned(item.mode, &item.path, &grant.owner))
    }

    /// The grant's keys, one per item in item order, read in one
    /// transaction; `None` if one of them is gone.
    async fn locate(&self, grant: &Grant) -> Result<Option<Vec<KeyValue>>, Error> {
        let reads: Vec<TxnOp> = self.owned_ranges(grant).map(|range| read_all(&range)).collect();
        let found = read_keys(self.send(Txn::new().and_then(reads)).await?);
        Ok(self.own_keys(grant, &found))
    }

    /// The grant's key of each item among `found`, in item order; `None`
    /// if one of them is not there.
    fn own_keys(&self, grant: &Grant, found: &[KeyValue]) -> Option<Vec<KeyValue>> {
        self.owned_ranges(grant)
            .map(|range| {
                found
                    .iter()
                    .find(|kv| {
                        kv.create_revision() as u64 == grant.token
                            && range.start.as_bytes() <= kv.key()
                            && kv.key() < range.end.as_bytes()
                    })
                    .cloned()
            })
            .collect()
    }

    /// Refuses, before anything is sent, a transaction larger than the
    /// server accepts: `compares` compares, `then` operations on success,
    /// `otherwise` on failure.
    fn check_size(&self, items: &LockItems, compares: usize, then: usize, otherwise: usize) -> Result<(), Error> {
        let needed = compares.max(then).max(otherwise);
        let max = self.inner.max_txn_ops;
        if needed <= max {
            return Ok(());
        }
        Err(Error::Unsupported {
            store: STORE,
            reason: format!(
                "{items} needs one transaction of {needed} operations, and etcd accepts {max} \
                 (its --max-txn-ops, 128 by default, which the store's max_txn_ops parameter must match): \
                 ask for fewer or shallower items, or raise both"
            ),
        })
    }

    /// A young lease for locks of `ttl`: the one this backend granted
    /// last for that many seconds if it is young enough, else a new one.
    /// Sharing saves a request per grant; a refused grant wastes nothing.
    async fn shared_lease(&self, ttl: Ttl) -> Result<Lease, Error> {
        let seconds = lease_seconds(ttl);
        let now = Instant::now();
        if let Some(lease) = locked(&self.inner.shared_leases).get(&seconds).filter(|lease| lease.is_young(now)) {
            return Ok(*lease);
        }
        let lease = self.grant_lease(ttl).await?;
        locked(&self.inner.shared_leases).insert(seconds, lease);
        Ok(lease)
    }

    fn forget_shared_lease(&self, gone: &Lease) {
        locked(&self.inner.shared_leases).retain(|_, lease| lease.id != gone.id);
    }

    fn remember_grant_lease(&self, token: u64, lease: Lease) {
        let mut leases = locked(&self.inner.grant_leases);
        if leases.len() >= REMEMBERED_LEASES {
            let now = Instant::now();
            leases.retain(|_, lease| !lease.is_over(now));
        }
        leases.insert(token, lease);
    }

    fn remembered_grant_lease(&self, token: u64) -> Option<Lease> {
        locked(&self.inner.grant_leases).get(&token).copied()
    }

    fn forget_grant_lease(&self, token: u64) {
        locked(&self.inner.grant_leases).remove(&token);
    }

    /// A lease of `ttl` in whole seconds, rounded up; etcd raises it to its
    /// minimum ([`MIN_LEASE_TTL`] by default) and says what it applied.
    async fn grant_lease(&self, ttl: Ttl) -> Result<Lease, Error> {
        let sent_at = Instant::now();
        let seconds = lease_seconds(ttl);
        let granted = self.counted().lease(|mut lease| async move { lease.grant(seconds, None).await });
        let granted = granted.await.map_err(store_error)?;
        if granted.id() == 0 || !granted.error().is_empty() {
            let message = format!("etcd granted no lease: {:?}", granted.error());
            return Err(Error::store_message(STORE, true, message));
        }
        let applied = granted.ttl().max(seconds) as u64;
        Ok(Lease { id: granted.id(), ttl: Duration::from_secs(applied), sent_at })
    }

    /// A stored item as a [`HeldLock`]; `None` if its lease is already
    /// gone (the lock expired since it was read).
    ///
    /// The remaining life costs a lease lookup, except where it is known
    /// without one: a lease this backend shares (its life counts from when
    /// it was asked for, so this errs short), and a stepwise client's
    /// transient parent lock, which core gives [`TRANSIENT_TTL`] and which a
    /// waiter waits out anyway (reported as that, an upper bound). Stepwise
    /// rounds and their refusals then cost one request less.
    async fn describe(&self, kv: &KeyValue) -> Result<Option<HeldLock>, Error> {
        let known = match self.inner.layout.is_reservation(kv.key()) {
            true => self.reservation_lease_life(kv.lease()),
            false if decode_value(kv.value())?.0 => Some(TRANSIENT_TTL),
            false => self.shared_lease_life(kv.lease()),
        };
        let remaining = match known {
            Some(remaining) => remaining,
            None => {
                let id = kv.lease();
                let lookup = self.counted().lease(|mut lease| async move { lease.time_to_live(id, None).await });
                let lookup = lookup.await.map_err(store_error)?;
                if lookup.ttl() < 0 {
                    return Ok(None);
                }
                remaining_life(lookup.ttl(), lookup.granted_ttl())
            }
        };
        self.describe_with(kv, remaining).map(Some)
    }

    /// A stored item as a [`HeldLock`] with `remaining` life.
    /// A reservation is described with its ticket as the token, and how
    /// long its waiter has been in line by this client's clock against
    /// the waiter's (zero where this one is behind, or for a value without
    /// a join time).
    fn describe_with(&self, kv: &KeyValue, remaining: Duration) -> Result<HeldLock, Error> {
        let (path, mode) = self.inner.layout.item_of(kv.key())?;
        if self.inner.layout.is_reservation(kv.key()) {
            let Reservation { ticket, owner, joined } = decode_reservation(kv.value(), kv.create_revision())?;
            let waited = joined.map_or(0, |joined| unix_millis().saturating_sub(joined));
            return Ok(HeldLock {
                path,
                mode,
                owner,
                token: ticket,
                remaining,
                transient: false,
                waiting: true,
                waited: Duration::from_millis(waited),
            });
        }
        let (transient, owner) = decode_value(kv.value())?;
        Ok(HeldLock {
            path,
            mode,
            owner,
            token: kv.create_revision() as u64,
            remaining,
            transient,
            waiting: false,
            waited: Duration::ZERO,
        })
    }

    /// What is left of a lease this backend shares, if it is one and not
    /// run out by this side's reckoning.
    fn shared_lease_life(&self, id: i64) -> Option<Duration> {
        let now = Instant::now();
        locked(&self.inner.shared_leases)
            .values()
            .find(|lease| lease.id == id)
            .map(|lease| (lease.sent_at + lease.ttl).saturating_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    /// What is left of the lease this backend puts reservations on, if it
    /// is that one and not run out by this side's reckoning.
    fn reservation_lease_life(&self, id: i64) -> Option<Duration> {
        let now = Instant::now();
        locked(&self.inner.reservation_lease)
            .filter(|lease| lease.id == id)
            .map(|lease| (lease.sent_at + lease.ttl).saturating_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    fn revoke_in_background(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let backend = self.clone();
        // If it fails, the lease lapses at its ttl.
        tokio::spawn(async move {
            let _ = backend.counted().lease(|mut client| async move { client.revoke(lease).await }).await;
        });
    }

    /// A transaction, counted; a refusal is a response, not an error.
    async fn send(&self, txn: Txn) -> Result<TxnResponse, Error> {
        self.send_raw(txn).await.map_err(store_error)
    }

    /// [`Self::send`] with the client's error, for callers that tell
    /// errors apart.
    async fn send_raw(&self, txn: Txn) -> Result<TxnResponse, etcd_client::Error> {
        self.counted().kv(|mut kv| async move { kv.txn(txn).await }).await
    }

    /// The members, for one request more of this backend's count.
    fn counted(&self) -> &Members {
        self.inner.sent.fetch_add(1, Ordering::Relaxed);
        &self.inner.members
    }
}

/// What a transaction requires of a key range.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// No key: nothing live there.
    Empty,
    /// Keys of the grant with this token only, at least one: the grant is
    /// live there and nothing else is.
    Only(u64),
}

impl Expect {
    /// The compare that holds iff `range` is as expected.
    fn compare(&self, range: &Range) -> Compare {
        match self {
            Expect::Empty => Compare::version(range.start.clone(), CompareOp::Equal, 0).with_range(range.end.clone()),
            Expect::Only(token) => is_grant(range, *token),
        }
    }
}

/// The compares of one transaction, without repeats (two items of a
/// request share ancestors), and the reads its else branch makes to show
/// what failed them.
#[derive(Debug, Default)]
struct Checks {
    required: Vec<(Range, Expect)>,
}

impl Checks {
    /// Requires `range` to be as `expect` says.
    fn require(&mut self, range: Range, expect: Expect) {
        let check = (range, expect);
        if !self.required.contains(&check) {
            self.required.push(check);
        }
    }

    /// The ranges an item on `path` in `mode` needs free of conflicting
    /// items: for each strict ancestor, its Exclusive holders (and, for an
    /// Exclusive item, its Shared ones: never their subtrees, which hold
    /// the item's siblings); and the node's subtree in the Exclusive space
    /// (and, for an Exclusive item, in the Shared one).
    ///
    /// `own` is the mode and token of the grant's item that already lies on
    /// `path` (an upgrade): the subtree of its space may hold that key and
    /// no other.
    fn require_free(&mut self, layout: &Layout, path: &LockPath, mode: Mode, own: Option<(Mode, u64)>) {
        for ancestor in path.ancestors() {
            self.require(layout.holders(Mode::Exclusive, &ancestor), Expect::Empty);
            if mode == Mode::Exclusive {
                self.require(layout.holders(Mode::Shared, &ancestor), Expect::Empty);
            }
        }
        for space in [Mode::Exclusive, Mode::Shared] {
            if !space.conflicts_with(mode) {
                continue;
            }
            let expect = match own {
                Some((own_space, token)) if own_space == space => Expect::Only(token),
                _ => Expect::Empty,
            };
            self.require(layout.subtree(space, path), expect);
        }
    }

    fn len(&self) -> usize {
        self.required.len()
    }

    fn compares(&self) -> Vec<Compare> {
        self.required.iter().map(|(range, expect)| expect.compare(range)).collect()
    }

    /// A read of each range: its first key for an empty one, its first two
    /// where the grant's own key may be one of them.
    fn reads(&self) -> Vec<TxnOp> {
        self.required
            .iter()
            .map(|(range, expect)| {
                let limit = if *expect == Expect::Empty { 1 } else { 2 };
                TxnOp::get(range.start.clone(), Some(GetOptions::new().with_range(range.end.clone()).with_limit(limit)))
            })
            .collect()
    }
}

/// The queue's part of one round of a grant: what its transaction also
/// compares, does on a grant and on a refusal, and the lease a refusal puts
/// the reservation on.
#[derive(Default)]
struct InQueue {
    compares: Vec<Compare>,
    then: Vec<TxnOp>,
    otherwise: Vec<TxnOp>,
    lease: Option<Lease>,
}

/// What a fair request compares, reads and writes of the queue: the
/// reservation ranges its items must find without earlier waiters (per
/// item, the conflicting reservations on each strict ancestor, and on the
/// node and below it: one range each, shared between items), and its own
/// reservation's keys, owner, and when its waiter joined the queue (unix
/// ms by this side's clock at its `Join`, see [`join_time`]; every
/// rewrite keeps it).
///
/// # Reservations written again
///
/// A ticket is the create revision of the reservation's keys until they
/// are written again (after a lapse or a withdrawal, its next attempt
/// writes them with the ticket in the value): the new keys are created
/// after later tickets, yet the reservation keeps its place before them,
/// as on every store. So a waiter cannot find the earlier ones by create
/// revision alone, nor take "created anew" for "gone":
///
/// * its reads of the ranges (the keys created before its ticket, all
///   earlier) go with one read of the namespace's reservations created
///   after it, sorted by value: those written again (a ticket in the value,
///   whose digits sort before the `@` of a first write) come first, and the
///   ones with a smaller ticket that conflict with the request are earlier
///   waiters too;
/// * a rewrite also puts the namespace's rewrite mark, in the same
///   transaction (a nested one, which puts it only if the keys were gone);
///   a waiter compares that the mark did not change since its last look
///   besides each earlier key's create revision. A key created anew since
///   is then a later `Join`'s (a tag is reused), not in the way.
///
/// Rewrites are rare, so the mark rarely changes; when it does, each
/// waiter of the namespace looks once more. A request without a ticket
/// compares that no conflicting reservation exists at all, so none of this
/// costs it anything: the uncontended grant is the same transaction as
/// before; only a waiter's refusal reads one range more and puts the mark
/// when it writes its keys again, and its attempts compare one key more.
/// The mark is one key per namespace, without a lease: a reservation
/// written again may outlive any lease the mark could have.
struct Fair<'a> {
    layout: &'a Layout,
    items: &'a LockItems,
    ranges: Vec<Range>,
    tag: String,
    keys: Vec<String>,
    owner: Owner,
    joined: u64,
}

impl<'a> Fair<'a> {
    fn new(layout: &'a Layout, request: &'a LockRequest, tag: &str, joined: u64) -> Self {
        let mut ranges: Vec<Range> = Vec::new();
        for item in &request.items {
            let on_ancestors =
                item.path.ancestors().into_iter().map(|ancestor| layout.awaited_on(&ancestor, item.mode));
            for range in on_ancestors.chain([layout.awaited_below(&item.path, item.mode)]) {
                if !ranges.contains(&range) {
                    ranges.push(range);
                }
            }
        }
        let keys = request
            .items
            .iter()
            .flat_map(|item| layout.reservation_keys(item.mode, &item.path, &request.owner, tag))
            .collect();
        Fair { layout, items: &request.items, ranges, tag: tag.to_owned(), keys, owner: request.owner.clone(), joined }
    }

    /// No reservation in the way at all: what a request without a ticket
    /// compares.
    fn none_compares(&self) -> Vec<Compare> {
        self.ranges.iter().map(|range| Expect::Empty.compare(range)).collect()
    }

    /// Each earlier waiter's keys gone or created anew since (a create
    /// revision other than the one seen), and no reservation written again
    /// since the look (the rewrite mark unchanged): what a waiter compares,
    /// if all of them are known and `room` compares are enough. Otherwise a
    /// compare that never holds: an earlier waiter is in the way (or was at
    /// the last look), and the refusal reads them again.
    fn gone_compares(&self, earlier: Option<&Earlier>, room: usize) -> Vec<Compare> {
        match earlier {
            Some(earlier) if earlier.keys.len() < room => earlier
                .keys
                .iter()
                .map(|(key, created)| Compare::create_revision(key.clone(), CompareOp::NotEqual, *created))
                .chain([Compare::mod_revision(self.layout.rewrite_mark(), CompareOp::Less, earlier.seen_at + 1)])
                .collect(),
            _ => vec![Compare::version(self.keys[0].clone(), CompareOp::Less, 0)],
        }
    }

    /// A read of each range, earliest waiter first: for a waiter with a
    /// ticket, of the keys created before it (all earlier), then of those
    /// written again after it (see [`Fair`]).
    fn reads(&self, before: Option<u64>, limit: i64) -> Vec<TxnOp> {
        let read = |range: &Range, options: GetOptions| {
            TxnOp::get(range.start.clone(), Some(options.with_range(range.end.clone()).with_limit(limit)))
        };
        let by_creation = GetOptions::new().with_sort(SortTarget::Create, SortOrder::Ascend);
        let mut reads: Vec<TxnOp> = self
            .ranges
            .iter()
            .map(|range| match before {
                // Tickets are revisions of writes: at least 2.
                Some(ticket) => read(range, by_creation.clone().with_max_create_revision((ticket as i64 - 1).max(1))),
                None => read(range, by_creation.clone()),
            })
            .collect();
        if let Some(ticket) = before {
            let written_after = GetOptions::new()
                .with_min_create_revision(ticket as i64 + 1)
                .with_sort(SortTarget::Value, SortOrder::Ascend);
            // Every reservation's key is in the first space.
            let [all, _exclusive_again] = self.layout.reservations();
            reads.push(read(&all, written_after));
        }
        reads
    }

    /// Puts the rewrite mark if the reservation's keys are gone: what a
    /// waiter's refusal does before it writes them (again).
    fn mark_if_written_again(&self) -> TxnOp {
        let gone = Compare::version(self.keys[0].clone(), CompareOp::Equal, 0);
        TxnOp::txn(Txn::new().when([gone]).and_then([TxnOp::put(self.layout.rewrite_mark(), Vec::new(), None)]))
    }

    /// The reservation's keys on `lease`; with the ticket in the value
    /// unless the keys are new (their create revision is the ticket then).
    fn puts(&self, lease: i64, ticket: Option<u64>) -> Vec<TxnOp> {
        let value = encode_reservation(ticket, self.joined, &self.owner);
        self.keys
            .iter()
            .map(|key| TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease))))
            .collect()
    }

    fn deletes(&self) -> Vec<TxnOp> {
        self.keys.iter().map(|key| TxnOp::delete(key.clone(), None)).collect()
    }

    /// The earlier waiters among the reads [`Self::reads`] made (`before`
    /// as given to it), and whether the reads saw all of them.
    fn earlier(&self, mut awaited: Vec<(Vec<KeyValue>, bool)>, before: Option<u64>) -> (Vec<KeyValue>, bool) {
        let written_after = before.and_then(|ticket| Some((ticket, awaited.pop()?)));
        let mut complete = awaited.iter().all(|(_, more)| !more);
        let mut earlier: Vec<KeyValue> = awaited.into_iter().flat_map(|(kvs, _)| kvs).collect();
        if let Some((ticket, (kvs, more))) = written_after {
            // Sorted by value: past the first key written once, none was
            // written again.
            complete &= !more || kvs.last().is_some_and(|kv| !is_written_again(kv));
            earlier.extend(kvs.into_iter().filter(|kv| self.is_earlier_in_the_way(kv, ticket)));
        }
        (earlier, complete)
    }

    /// Whether a reservation's key has a ticket before `ticket` and
    /// conflicts with one of the request's items.
    fn is_earlier_in_the_way(&self, kv: &KeyValue, ticket: u64) -> bool {
        let earlier = decode_reservation(kv.value(), kv.create_revision()).is_ok_and(|found| found.ticket < ticket);
        earlier
            && self.layout.item_of(kv.key()).is_ok_and(|(path, mode)| {
                self.items.iter().any(|item| path.overlaps(&item.path) && mode.conflicts_with(item.mode))
            })
    }
}

/// Whether a reservation's key was written again: its ticket is not its
/// create revision.
fn is_written_again(kv: &KeyValue) -> bool {
    decode_reservation(kv.value(), kv.create_revision())
        .is_ok_and(|found| i64::try_from(found.ticket).ok() != Some(kv.create_revision()))
}

/// The compare that holds iff every key in `range` was created by the
/// grant with this token, and there is one (an empty range compares as a
/// key with create revision 0).
fn is_grant(range: &Range, token: u64) -> Compare {
    let token = i64::try_from(token).unwrap_or(i64::MAX);
    Compare::create_revision(range.start.clone(), CompareOp::Equal, token).with_range(range.end.clone())
}

/// Deletes the grant's keys in `ranges` if each holds only keys of the
/// grant with this token.
fn release_txn(ranges: &[Range], token: u64) -> Txn {
    let compares: Vec<Compare> = ranges.iter().map(|range| is_grant(range, token)).collect();
    let deletes: Vec<TxnOp> =
        ranges.iter().map(|range| TxnOp::delete(range.start.clone(), Some(delete_range(range.end.clone())))).collect();
    Txn::new().when(compares).and_then(deletes)
}

fn delete_range(end: String) -> etcd_client::DeleteOptions {
    etcd_client::DeleteOptions::new().with_range(end)
}

/// This side's clock, in unix milliseconds rounded down (zero before
/// 1970).
fn unix_millis() -> u64 {
    unix_time().as_millis() as u64
}

/// This side's clock as a join time: in unix milliseconds rounded up, so
/// that the whole milliseconds from it to [`unix_millis`] later never
/// exceed the time between them.
fn join_time() -> u64 {
    unix_time().as_nanos().div_ceil(1_000_000) as u64
}

fn unix_time() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The revision a successful transaction created: the fencing token (and
/// the create revision of the keys it put).
fn revision(response: &TxnResponse) -> Result<u64, Error> {
    response
        .header()
        .map(|header| header.revision())
        .filter(|revision| *revision > 0)
        .map(|revision| revision as u64)
        .ok_or_else(|| Error::store_message(STORE, false, "a transaction's reply carried no revision"))
}

/// The revision a transaction's reads saw (zero if the reply carried none:
/// the rewrite mark then holds a waiter up until it looks again).
fn seen_at(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |header| header.revision())
}

/// Every key the reads of a transaction's branch returned, in order.
fn read_keys(response: TxnResponse) -> Vec<KeyValue> {
    read_ranges(&response).into_iter().flat_map(|(kvs, _)| kvs).collect()
}

/// What each read of a transaction's branch returned, in order, and
/// whether it stopped at its limit.
fn read_ranges(response: &TxnResponse) -> Vec<(Vec<KeyValue>, bool)> {
    response
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(mut get) => Some((get.take_kvs(), get.more())),
            _ => None,
        })
        .collect()
}

/// A read of every key in `range`.
fn read_all(range: &Range) -> TxnOp {
    TxnOp::get(range.start.clone(), Some(GetOptions::new().with_range(range.end.clone())))
}

/// A ttl as a lease's whole seconds, rounded up.
fn lease_seconds(ttl: Ttl) -> i64 {
    ttl.as_millis().div_ceil(1000) as i64
}

/// etcd reports a lease's remaining life in whole seconds, rounded down:
/// the life left is below one more second, and never above the lease's ttl.
fn remaining_life(seconds_left: i64, granted_seconds: i64) -> Duration {
    let upper = Duration::from_secs(seconds_left.max(0) as u64 + 1);
    upper.min(Duration::from_secs(granted_seconds.max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        let seconds = |millis| lease_seconds(Ttl::new(Duration::from_millis(millis)).expect("ttl"));
        assert_eq!(seconds(1), 1);
        assert_eq!(seconds(1000), 1);
        assert_eq!(seconds(1001), 2);
        assert_eq!(seconds(2500), 3);
        assert_eq!(lease_seconds(Ttl::new(Ttl::MAX).expect("ttl")), 86_400);
    }

    #[test]
    fn remaining_life_is_an_upper_bound_within_the_ttl() {
        assert_eq!(remaining_life(0, 2), Duration::from_secs(1));
        assert_eq!(remaining_life(1, 2), Duration::from_secs(2));
        assert_eq!(remaining_life(5, 5), Duration::from_secs(5));
        assert_eq!(remaining_life(-1, 0), Duration::from_secs(1));
    }

    fn path(text: &str) -> LockPath {
        LockPath::parse(text).expect("path")
    }

    /// The compares of a grant: an Exclusive item at depth d costs 2d, a
    /// Shared one d, and items share their ancestors' compares.
    #[test]
    fn compares_per_item() {
        let layout = Layout::new("mt", "app");
        let count = |items: &[(&str, Mode)]| {
            let mut checks = Checks::default();
            for (at, mode) in items {
                checks.require_free(&layout, &path(at), *mode, None);
            }
            checks.len()
        };
        assert_eq!(count(&[("A", Mode::Exclusive)]), 2);
        assert_eq!(count(&[("A/B/C", Mode::Exclusive)]), 6);
        assert_eq!(count(&[("A/B/C", Mode::Shared)]), 3);
        assert_eq!(count(&[("A/B/C", Mode::Exclusive), ("A/B/D", Mode::Exclusive)]), 8);
        assert_eq!(count(&[("A/B/C", Mode::Shared), ("A/B/D", Mode::Exclusive)]), 7);
    }
}
