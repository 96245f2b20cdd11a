//! The store and its namespaces' [`LockBackend`]: connections to the
//! cluster's members ([`EtcdStore`], opened by [`EtcdConfig::connect`]),
//! and per namespace an [`EtcdBackend`] doing every lock operation as etcd
//! requests, with its watch (the feed module) started by its first waiter.
//! See the crate docs for the design; the comments here say what each
//! request is for.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use futures::stream::{self, StreamExt, TryStreamExt};
use mutextree_core::backend::url::connect_within;
use mutextree_core::backend::{async_trait, stepwise::TRANSIENT_TTL, Attempt, Listener, LockKind, LockRequest};
use mutextree_core::backend::{AbortOnDrop, Check};
use mutextree_core::{Error, Grant, HeldLock, LockBackend, LockPath, Namespace, Ttl};
use tokio::time::Instant;

use crate::config::EtcdConfig;
use crate::error::{connect_error, is_lease_not_found, store_error, STORE};
use crate::feed::{self, Feeds};
use crate::layout::{decode_value, encode_value, Layout};
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
/// How often a grant is retried when the lock in its way vanished (its
/// lease expired) between the transaction and the lookup of its lease.
const VANISHED_BLOCKER_RETRIES: usize = 3;

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
                feeds: Arc::new(Feeds::default()),
                watch: Mutex::new(None),
                shared_leases: Mutex::new(HashMap::new()),
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
    /// The waiters' feeds, fed by the watch.
    feeds: Arc<Feeds>,
    /// The watch task, started by the first `listen`; it ends with the
    /// backend's last clone.
    watch: Mutex<Option<AbortOnDrop>>,
    /// The lease new grants of each ttl (in seconds) go on, while young.
    shared_leases: Mutex<HashMap<i64, Lease>>,
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
}

#[async_trait]
impl LockBackend for EtcdBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.grant(request, kind, Check::KeyOnly).await
    }

    /// One transaction: if the key still has this grant's create revision
    /// (the token) and value (kind and owner), delete it. Its lease is left
    /// to lapse: other locks may share it.
    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        let key = self.inner.layout.key(&grant.path);
        let txn = Txn::new().when(is_grant(&key, grant)).and_then([TxnOp::delete(key, None)]);
        let response = self.inner.members.kv(|mut kv| async move { kv.txn(txn).await }).await.map_err(store_error)?;
        if !response.succeeded() {
            return Err(Error::not_held(grant));
        }
        Ok(())
    }

    /// A new lease of its own with the new ttl (so the remaining life is
    /// exactly that), then one transaction that re-puts the key (same
    /// value, same create revision, so the same token) on it if the key is
    /// still this grant's. The old lease is left to lapse: other locks may
    /// share it. A keep-alive would restore the lease's *original* ttl, and
    /// etcd 3.4 can answer a keep-alive of a revoked lease with success.
    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let lease = self.grant_lease(ttl).await?;
        let key = self.inner.layout.key(&grant.path);
        let value = encode_value(grant.kind, &grant.owner);
        let txn = Txn::new().when(is_grant(&key, grant)).and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease.id)),
        )]);
        // On an error the put may have been applied: the lease then holds
        // the lock, and is not revoked.
        let response = self.inner.members.kv(|mut kv| async move { kv.txn(txn).await }).await.map_err(store_error)?;
        if !response.succeeded() {
            // Nothing went on it.
            self.revoke_in_background(lease.id);
            return Err(Error::not_held(grant));
        }
        Ok(Grant { ttl: lease.ttl, expires_at: lease.sent_at + lease.ttl, ..grant.clone() })
    }

    /// Range requests of at most 1000 keys, all at the revision of the
    /// first, then the remaining lives, with a lease lookup where one is
    /// needed (a lock whose lease is gone by then is not listed).
    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let (start, end) = match under {
            Some(path) => self.inner.layout.subtree(path),
            None => self.inner.layout.namespace(),
        };
        let mut found: Vec<KeyValue> = Vec::new();
        let mut from = start.into_bytes();
        let mut revision = 0;
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE).with_revision(revision);
            let key = from.clone();
            let page = self.inner.members.kv(|mut kv| async move { kv.get(key, Some(options)).await });
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
        let described: Vec<Option<HeldLock>> = stream::iter(found)
            .map(|kv| {
                let backend = self.clone();
                async move { backend.describe(&kv).await }
            })
            .buffered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(described.into_iter().flatten().collect())
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        self.grant(request, LockKind::Lock, Check::Tree).await
    }

    /// Wakes on deletes of `path`, its ancestors and its descendants, as
    /// this backend's watch reports them.
    fn listen(&self, path: &LockPath) -> Listener {
        let mut task = locked(&self.inner.watch);
        if task.is_none() {
            let prefix = self.inner.layout.namespace_prefix().to_owned();
            let watching = feed::run(self.inner.members.clone(), prefix, self.inner.feeds.clone());
            *task = Some(AbortOnDrop::new(tokio::spawn(watching)));
        }
        self.inner.feeds.listen(path.key())
    }
}

impl EtcdBackend {
    /// The namespace this backend works in.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// One transaction that puts the node's key on a young shared lease
    /// of the request's ttl, or reports the lock in the way.
    ///
    /// The transaction compares, for [`Check::Tree`], `version == 0` on
    /// each ancestor's key and on the range of the node and its descendants
    /// (an empty range passes); for [`Check::KeyOnly`], on the node's key.
    /// On failure it reads the keys it compared (the subtree's first key
    /// only), so a refusal names a blocker without another request for the
    /// key; its lease is then looked up for the remaining life.
    async fn grant(&self, request: &LockRequest, kind: LockKind, check: Check) -> Result<Attempt, Error> {
        let mut lease = self.shared_lease(request.ttl).await?;
        let mut lease_replaced = false;
        let mut last_blocker = None;
        let mut refusals = 0;
        while refusals < VANISHED_BLOCKER_RETRIES {
            let txn = self.grant_txn(request, kind, check, lease.id);
            let response = match self.inner.members.kv(|mut kv| async move { kv.txn(txn).await }).await {
                Ok(response) => response,
                Err(error) if is_lease_not_found(&error) && !lease_replaced => {
                    // Someone revoked the shared lease: the put named a
                    // lease that is gone, so nothing was written.
                    self.forget_shared_lease(&lease);
                    lease = self.shared_lease(request.ttl).await?;
                    lease_replaced = true;
                    continue;
                }
                // Applied or not, what it granted lapses with the lease.
                Err(error) => return Err(store_error(error)),
            };
            if response.succeeded() {
                let token = revision(&response)?;
                return Ok(Attempt::Granted(Grant::new(request, kind, token, lease.ttl, lease.sent_at)));
            }
            refusals += 1;
            let blocker = first_blocker(&response).ok_or_else(|| {
                Error::store_message(STORE, false, "a refused grant transaction returned none of the keys it compared")
            })?;
            match self.describe(&blocker).await? {
                Some(held) => return Ok(Attempt::Blocked(held)),
                None => last_blocker = Some(blocker),
            }
        }
        // The blocker kept expiring under our eyes: report the last one as
        // ending now; a waiter retries at once.
        let blocker = last_blocker.expect("the loop ran at least once");
        let (transient, owner) = decode_value(blocker.value())?;
        Ok(Attempt::Blocked(HeldLock {
            path: self.inner.layout.path_of(blocker.key())?,
            owner,
            token: blocker.create_revision() as u64,
            remaining: Duration::from_millis(1),
            transient,
        }))
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

    fn grant_txn(&self, request: &LockRequest, kind: LockKind, check: Check, lease: i64) -> Txn {
        let layout = &self.inner.layout;
        let key = layout.key(&request.path);
        let value = encode_value(kind, &request.owner);
        let put = TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(lease)));
        match check {
            Check::KeyOnly => Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([put])
                .or_else([TxnOp::get(key, None)]),
            Check::Tree => {
                let ancestors = layout.ancestor_keys(&request.path);
                let (start, end) = layout.subtree(&request.path);
                let mut compares: Vec<Compare> =
                    ancestors.iter().map(|key| Compare::version(key.clone(), CompareOp::Equal, 0)).collect();
                compares.push(Compare::version(start.clone(), CompareOp::Equal, 0).with_range(end.clone()));
                let mut reads: Vec<TxnOp> = ancestors.into_iter().map(|key| TxnOp::get(key, None)).collect();
                reads.push(TxnOp::get(start, Some(GetOptions::new().with_range(end).with_limit(1))));
                Txn::new().when(compares).and_then([put]).or_else(reads)
            }
        }
    }

    /// A lease of `ttl` in whole seconds, rounded up; etcd raises it to its
    /// minimum ([`MIN_LEASE_TTL`] by default) and says what it applied.
    async fn grant_lease(&self, ttl: Ttl) -> Result<Lease, Error> {
        let sent_at = Instant::now();
        let seconds = lease_seconds(ttl);
        let granted = self.inner.members.lease(|mut lease| async move { lease.grant(seconds, None).await });
        let granted = granted.await.map_err(store_error)?;
        if granted.id() == 0 || !granted.error().is_empty() {
            let message = format!("etcd granted no lease: {:?}", granted.error());
            return Err(Error::store_message(STORE, true, message));
        }
        let applied = granted.ttl().max(seconds) as u64;
        Ok(Lease { id: granted.id(), ttl: Duration::from_secs(applied), sent_at })
    }

    /// A stored lock as a [`HeldLock`]; `None` if its lease is already
    /// gone (the lock expired since it was read).
    ///
    /// The remaining life costs a lease lookup, except where it is known
    /// without one: a lease this backend shares (its life counts from when
    /// it was asked for, so this errs short), and a stepwise client's
    /// transient parent lock, which core gives [`TRANSIENT_TTL`] and which a
    /// waiter waits out anyway (reported as that, an upper bound). Stepwise
    /// rounds and their refusals then cost one request less.
    async fn describe(&self, kv: &KeyValue) -> Result<Option<HeldLock>, Error> {
        let path = self.inner.layout.path_of(kv.key())?;
        let (transient, owner) = decode_value(kv.value())?;
        let known = if transient { Some(TRANSIENT_TTL) } else { self.shared_lease_life(kv.lease()) };
        let remaining = match known {
            Some(remaining) => remaining,
            None => {
                let id = kv.lease();
                let lookup = self.inner.members.lease(|mut lease| async move { lease.time_to_live(id, None).await });
                let lookup = lookup.await.map_err(store_error)?;
                if lookup.ttl() < 0 {
                    return Ok(None);
                }
                remaining_life(lookup.ttl(), lookup.granted_ttl())
            }
        };
        Ok(Some(HeldLock { path, owner, token: kv.create_revision() as u64, remaining, transient }))
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

    fn revoke_in_background(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let members = self.inner.members.clone();
        // If it fails, the lease lapses at its ttl.
        tokio::spawn(async move {
            let _ = members.lease(|mut client| async move { client.revoke(lease).await }).await;
        });
    }
}

/// The compares that make a transaction act only on this very grant: the
/// key was created by it (its token is the create revision, unique in the
/// store's history) and still holds its kind and owner.
fn is_grant(key: &str, grant: &Grant) -> [Compare; 2] {
    let token = i64::try_from(grant.token).unwrap_or(i64::MAX);
    [
        Compare::create_revision(key, CompareOp::Equal, token),
        Compare::value(key, CompareOp::Equal, encode_value(grant.kind, &grant.owner)),
    ]
}

/// The revision a successful transaction created: the fencing token (and
/// the create revision of the key it put).
fn revision(response: &TxnResponse) -> Result<u64, Error> {
    response
        .header()
        .map(|header| header.revision())
        .filter(|revision| *revision > 0)
        .map(|revision| revision as u64)
        .ok_or_else(|| Error::store_message(STORE, false, "a transaction's reply carried no revision"))
}

/// The lock a refused grant transaction read: a held one before a
/// transient one (a transient one is waited out even without waiting),
/// root first.
fn first_blocker(response: &TxnResponse) -> Option<KeyValue> {
    let found: Vec<KeyValue> = response
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(mut get) => Some(get.take_kvs()),
            _ => None,
        })
        .flatten()
        .collect();
    let held = found.iter().position(|kv| decode_value(kv.value()).is_ok_and(|(transient, _)| !transient));
    let index = held.unwrap_or(0);
    found.into_iter().nth(index)
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
}
