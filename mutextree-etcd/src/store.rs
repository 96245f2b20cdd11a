//! The backend: every lock operation as etcd requests. See the crate docs
//! for the design; the comments here say what each request is for.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, KvClient, LeaseClient, PutOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use futures::stream::{self, StreamExt, TryStreamExt};
use mutextree_core::{
    async_trait, Attempt, ChangeFeed, Error, Grant, HeldLock, Listener, LockBackend, LockKind, LockPath, LockRequest,
    Namespace, Ttl,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{EtcdConfig, STORE};
use crate::layout::{decode_value, encode_value, Layout};
use crate::watch;

/// etcd's minimum lease ttl with its default timing (`--election-timeout`
/// 1000 ms: one and a half election timeouts, in whole seconds). A server
/// may apply a larger one; the grant reports what it applied.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Locks listed per range request; pages are read at one revision.
const LIST_PAGE: i64 = 1000;
/// Lease lookups in flight at once when listing.
const LOOKUPS_IN_FLIGHT: usize = 32;
/// How often a grant is retried when the lock in its way vanished (its
/// lease expired) between the transaction and the lookup of its lease.
const VANISHED_BLOCKER_RETRIES: usize = 3;

/// A connection to an etcd cluster, from which namespaces are opened.
///
/// Cheap to clone; clones and the backends made from it share the
/// connection (one multiplexed gRPC channel per endpoint).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
}

impl EtcdStore {
    /// Checks the configuration and connects. Without credentials this
    /// sends nothing (the connection is made on first use, and re-made by
    /// itself after a failure); with credentials it authenticates, so wrong
    /// ones fail here.
    pub async fn connect(config: EtcdConfig) -> Result<Self, Error> {
        config.check()?;
        let client = Client::connect(config.endpoints(), Some(config.connect_options())).await.map_err(store_error)?;
        Ok(EtcdStore { client, config })
    }

    /// A backend for one namespace on this connection.
    pub fn namespace(&self, name: &str) -> Result<EtcdBackend, Error> {
        let name = Namespace::new(name)?;
        let feed = ChangeFeed::new();
        // Not live until the watch is confirmed: listeners poll until then.
        feed.set_live(false);
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                kv: self.client.kv_client(),
                lease: self.client.lease_client(),
                watch_client: self.client.watch_client(),
                layout: Layout::new(self.config.key_prefix(), name.as_str()),
                namespace: name,
                feed,
                watch: Mutex::new(None),
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
    kv: KvClient,
    lease: LeaseClient,
    watch_client: etcd_client::WatchClient,
    layout: Layout,
    namespace: Namespace,
    feed: ChangeFeed,
    /// The watch task, started by the first `listen`.
    watch: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.watch.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("namespace", &self.inner.namespace)
            .field("key_prefix", &self.inner.layout.namespace_prefix())
            .finish()
    }
}

/// What a grant transaction checks before it puts the node's key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// No key on the node, an ancestor or a descendant (the tree operation).
    Tree,
    /// No key on the node itself (the stepwise algorithm's primitive).
    KeyOnly,
}

/// A lease granted for one lock: its id and the ttl etcd applied.
struct Lease {
    id: i64,
    ttl: Duration,
}

#[async_trait]
impl LockBackend for EtcdBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.grant(request, kind, Check::KeyOnly).await
    }

    /// One transaction: if the key still has this grant's create revision
    /// (the token) and value (kind and owner), delete it. Its lease is then
    /// revoked in the background: it holds nothing any more, and revoking
    /// spares the server from tracking it until its ttl.
    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        let key = self.inner.layout.key(&grant.path);
        let txn = Txn::new()
            .when(is_grant(&key, grant))
            .and_then([TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()))]);
        let response = self.inner.kv.clone().txn(txn).await.map_err(store_error)?;
        if !response.succeeded() {
            return Err(not_held(grant));
        }
        if let Some(TxnOpResponse::Delete(deleted)) = response.op_responses().first() {
            for previous in deleted.prev_kvs() {
                self.revoke_in_background(previous.lease());
            }
        }
        Ok(())
    }

    /// A new lease with the new ttl, then one transaction that re-puts the
    /// key (same value, same create revision, so the same token) on it if
    /// the key is still this grant's; the old lease is revoked in the
    /// background. A keep-alive would restore the lease's *original* ttl,
    /// and etcd 3.4 can answer a keep-alive of a revoked lease with success.
    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let sent_at = Instant::now();
        let lease = self.grant_lease(ttl).await?;
        let key = self.inner.layout.key(&grant.path);
        let value = encode_value(grant.kind, &grant.owner);
        let txn = Txn::new().when(is_grant(&key, grant)).and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease.id).with_prev_key()),
        )]);
        let response = match self.inner.kv.clone().txn(txn).await {
            Ok(response) => response,
            Err(error) => {
                self.revoke_in_background(lease.id);
                return Err(store_error(error));
            }
        };
        if !response.succeeded() {
            self.revoke_in_background(lease.id);
            return Err(not_held(grant));
        }
        if let Some(TxnOpResponse::Put(put)) = response.op_responses().first() {
            if let Some(previous) = put.prev_key() {
                self.revoke_in_background(previous.lease());
            }
        }
        Ok(Grant { ttl: lease.ttl, expires_at: sent_at + lease.ttl, ..grant.clone() })
    }

    /// Range requests of at most [`LIST_PAGE`] keys, all at the revision
    /// of the first, then one lease lookup per lock for its remaining life
    /// (a lock whose lease is gone by then is not listed).
    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let (start, end) = match under {
            Some(path) => self.inner.layout.subtree(path),
            None => self.inner.layout.namespace(),
        };
        let mut kv = self.inner.kv.clone();
        let mut found: Vec<KeyValue> = Vec::new();
        let mut from = start.into_bytes();
        let mut revision = 0;
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE).with_revision(revision);
            let mut page = kv.get(from.clone(), Some(options)).await.map_err(store_error)?;
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

    /// Every delete in the namespace wakes every waiter of this backend;
    /// `path` is not used to filter (a retry is one transaction).
    fn listen(&self, _path: &LockPath) -> Listener {
        let mut task = self.inner.watch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if task.is_none() {
            let prefix = self.inner.layout.namespace_prefix().to_owned();
            let watching = watch::run(self.inner.watch_client.clone(), prefix, self.inner.feed.clone());
            *task = Some(tokio::spawn(watching));
        }
        self.inner.feed.listen()
    }
}

impl EtcdBackend {
    /// The namespace this backend works in.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// A lease for a lock with `ttl` (then the transaction that puts the
    /// key), or the lock in the way.
    ///
    /// The transaction compares, for [`Check::Tree`], `version == 0` on
    /// each ancestor's key and on the range of the node and its descendants
    /// (an empty range passes); for [`Check::KeyOnly`], on the node's key.
    /// On success it puts the node's key on the lease; on failure it reads
    /// the keys it compared (the subtree's first key only), so a refusal
    /// names a blocker without another request for the key. Its lease is
    /// then looked up for the remaining life, and the unused lease revoked
    /// in the background.
    async fn grant(&self, request: &LockRequest, kind: LockKind, check: Check) -> Result<Attempt, Error> {
        let sent_at = Instant::now();
        let lease = self.grant_lease(request.ttl).await?;
        let txn = self.grant_txn(request, kind, check, lease.id);
        let mut kv = self.inner.kv.clone();
        let mut last_blocker = None;
        for _ in 0..VANISHED_BLOCKER_RETRIES {
            let response = match kv.txn(txn.clone()).await {
                Ok(response) => response,
                Err(error) => {
                    // Applied or not, nobody will hold what it granted.
                    self.revoke_in_background(lease.id);
                    return Err(store_error(error));
                }
            };
            if response.succeeded() {
                let token = revision(&response)?;
                return Ok(Attempt::Granted(Grant::new(request, kind, token, lease.ttl, sent_at)));
            }
            let blocker = first_blocker(&response).ok_or_else(|| {
                Error::store_message(STORE, false, "a refused grant transaction returned none of the keys it compared")
            })?;
            match self.describe(&blocker).await {
                Ok(Some(held)) => {
                    self.revoke_in_background(lease.id);
                    return Ok(Attempt::Blocked(held));
                }
                Ok(None) => last_blocker = Some(blocker),
                Err(error) => {
                    self.revoke_in_background(lease.id);
                    return Err(error);
                }
            }
        }
        self.revoke_in_background(lease.id);
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
        let seconds = lease_seconds(ttl);
        let granted = self.inner.lease.clone().grant(seconds, None).await.map_err(store_error)?;
        if granted.id() == 0 || !granted.error().is_empty() {
            let message = format!("etcd granted no lease: {:?}", granted.error());
            return Err(Error::store_message(STORE, true, message));
        }
        let applied = granted.ttl().max(seconds) as u64;
        Ok(Lease { id: granted.id(), ttl: Duration::from_secs(applied) })
    }

    /// A stored lock as a [`HeldLock`], with its remaining life from its
    /// lease; `None` if the lease is already gone (the lock expired).
    async fn describe(&self, kv: &KeyValue) -> Result<Option<HeldLock>, Error> {
        let path = self.inner.layout.path_of(kv.key())?;
        let (transient, owner) = decode_value(kv.value())?;
        let lookup = self.inner.lease.clone().time_to_live(kv.lease(), None).await.map_err(store_error)?;
        if lookup.ttl() < 0 {
            return Ok(None);
        }
        Ok(Some(HeldLock {
            path,
            owner,
            token: kv.create_revision() as u64,
            remaining: remaining_life(lookup.ttl(), lookup.granted_ttl()),
            transient,
        }))
    }

    fn revoke_in_background(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let mut client = self.inner.lease.clone();
        // If it fails, the lease lapses at its ttl.
        tokio::spawn(async move {
            let _ = client.revoke(lease).await;
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

fn not_held(grant: &Grant) -> Error {
    Error::NotHeld { path: grant.path.clone(), owner: Some(grant.owner.clone()), token: Some(grant.token) }
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

/// A client error as the workspace's error. Losing the connection, a
/// timeout, no leader (during an election) or an overloaded server can pass;
/// a refused permission or a malformed request cannot.
pub(crate) fn store_error(error: etcd_client::Error) -> Error {
    use tonic::Code;
    let retryable = match &error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) | etcd_client::Error::WatchError(_) => {
            true
        }
        _ => false,
    };
    Error::store(STORE, retryable, error)
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
