//! The store and its namespaces' [`LockBackend`]: a connection to a server
//! or cluster ([`RedisStore`], opened by [`RedisConfig::connect`]), and per
//! namespace a [`RedisBackend`] whose every operation is one script call
//! (see the scripts module), with the backend's subscription (the feed
//! module) started beside it and ended with its last clone.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mutextree_core::backend::url::{connect_failed, connect_timed_out, connect_within};
use mutextree_core::backend::{async_trait, Attempt, ChangeFeed, Listener, LockKind, LockRequest, Queue};
use mutextree_core::backend::{AbortOnDrop, Check, StoreLabels};
use mutextree_core::backend::{Revocation, RevocationListener, Revocations};
use mutextree_core::{
    Blockers, Error, Fairness, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Namespace, Owner, Ttl,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{RedisError, Value};
use tokio::time::Instant;

use tracing::Instrument;

use crate::config::RedisConfig;
use crate::error::{is_retryable, unexpected, STORE};
use crate::feed;
use crate::scripts::{Args, Connection, Keys, Lua, ScriptRunner, SCRIPTS};

impl RedisConfig {
    /// Checks the settings and connects: one multiplexed connection for the
    /// scripts (reconnecting by itself later), in one attempt within the
    /// connect timeout. Namespaces' backends share it:
    /// [`RedisStore::backend`].
    pub async fn connect(&self) -> Result<RedisStore, Error> {
        self.check()?;
        RedisStore::open(self.clone()).await
    }
}

/// A connection to a Redis server or cluster, from which namespaces are
/// opened: [`RedisConfig::connect`], then [`backend`](Self::backend).
///
/// Cheap to clone; clones and the backends made from it share the
/// connection.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    config: RedisConfig,
    connection: Connection,
    /// One plain client per node, for the backends' subscriptions (in a
    /// cluster, a plain `PUBLISH` reaches the subscribers of every node).
    clients: Arc<[redis::Client]>,
}

impl RedisStore {
    /// One attempt to open the command connection, within the connect
    /// timeout.
    async fn open(config: RedisConfig) -> Result<Self, Error> {
        install_tls_provider();
        let addresses = config.addresses();
        let failed = |error: RedisError| {
            if error.is_timeout() {
                connect_timed_out(STORE, &addresses, config.connect_timeout_value())
            } else {
                connect_failed(STORE, &addresses, is_retryable(&error), error)
            }
        };
        let clients =
            config.nodes().map(|node| redis::Client::open(node).map_err(failed)).collect::<Result<Vec<_>, _>>()?;
        let opening = async {
            if config.is_cluster() {
                let client = ClusterClientBuilder::new(config.nodes())
                    .connection_timeout(config.connect_timeout_value())
                    .response_timeout(config.request_timeout_value())
                    .tcp_settings(config.tcp_settings())
                    .build()
                    .map_err(failed)?;
                client.get_async_connection().await.map(Connection::Cluster).map_err(failed)
            } else {
                // No retry here: one attempt, whose failure names the
                // address. Later, a lost connection is opened again by the
                // next call.
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout_value()))
                    .set_response_timeout(Some(config.request_timeout_value()))
                    .set_number_of_retries(0);
                ConnectionManager::new_with_config(clients[0].clone(), manager)
                    .await
                    .map(Connection::Standalone)
                    .map_err(failed)
            }
        };
        let connection = connect_within(STORE, &addresses, config.connect_timeout_value(), opening).await?;
        Ok(RedisStore { shared: Arc::new(Shared { config, connection, clients: clients.into() }) })
    }

    /// The backend of one namespace, on this store's connection. Its
    /// subscription for wake-ups is its own, opened while its waiters wait;
    /// call this within a tokio runtime.
    pub fn backend(&self, namespace: &str) -> Result<RedisBackend, Error> {
        let namespace = Namespace::new(namespace)?;
        let keys = Keys::new(self.shared.config.prefix(), &namespace);
        let scripts = Arc::new(ScriptRunner::new(self.shared.connection.clone(), keys));
        let feed = ChangeFeed::new();
        // Until a waiter needs it and it is confirmed, there is no
        // subscription, and a release could go unheard: waiters poll
        // meanwhile.
        feed.set_live(false);
        let subscription = feed::run(
            self.shared.clients.clone(),
            self.shared.config.connect_timeout_value(),
            self.shared.config.request_timeout_value(),
            scripts.clone(),
            feed.clone(),
        );
        let subscriber = AbortOnDrop::new(tokio::spawn(subscription.instrument(notifications(namespace.as_str()))));
        // Likewise subscribed only while a holder listens.
        let revocations = Revocations::not_live();
        let hearing = feed::hear_revocations(
            self.shared.clients.clone(),
            self.shared.config.connect_timeout_value(),
            self.shared.config.request_timeout_value(),
            scripts.keys.revocations.clone(),
            revocations.clone(),
        );
        let revocation_subscriber =
            AbortOnDrop::new(tokio::spawn(hearing.instrument(notifications(namespace.as_str()))));
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                store: self.clone(),
                namespace,
                scripts,
                feed,
                revocations,
                _subscribers: [subscriber, revocation_subscriber],
            }),
        })
    }

    /// The configuration this store was connected with.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore").field("config", &self.shared.config).finish()
    }
}

/// One namespace of a [`RedisStore`]: the [`LockBackend`]. Cheap to
/// clone; clones share the connection and the subscription.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    store: RedisStore,
    namespace: Namespace,
    scripts: Arc<ScriptRunner>,
    feed: ChangeFeed,
    revocations: Revocations,
    /// The subscriptions to releases (for waiters) and revocations (for
    /// holders).
    _subscribers: [AbortOnDrop; 2],
}

impl RedisBackend {
    /// The namespace of this backend.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// The store this backend is a namespace of.
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    /// The eight keys that hold the namespace (locks, index of Exclusive
    /// items, expiry, token counter, index of Shared items; the waiters'
    /// reservations, their index and their expiry), all in one cluster
    /// slot.
    pub fn keys(&self) -> &[String] {
        &self.inner.scripts.keys.declared
    }

    async fn grant(&self, request: &LockRequest, kind: LockKind, check: Check) -> Result<Attempt, Error> {
        // The grant script's names for what it checks and where the request
        // stands in the queue; the stepwise primitive locks one key,
        // Exclusive, and ignores the queue.
        let (scope, items, standing) = match check {
            Check::Tree => ("tree", request.items.clone(), standing(request.queue)),
            Check::KeyOnly => ("key", LockItems::one(request.path().clone(), Mode::Exclusive), standing(Queue::Barge)),
        };
        let transient = u8::from(kind == LockKind::Transient);
        // The request id lets a resent request (a lost reply, the client
        // library's retry) be recognised as the same grant, not refused.
        let args = Args::default()
            .with(scope)
            .with(request.ttl.as_millis())
            .with(transient)
            .with(nonce())
            .with(request.owner.as_str())
            .with(standing)
            .with_items(&items);
        let script = if items.is_single_exclusive() { &SCRIPTS.grant_one } else { &SCRIPTS.grant };
        let sent_at = Instant::now();
        Reply::new(self.inner.scripts.run(script, args).await?)?
            .attempt(|token, ttl| Grant::new(request, kind, token, ttl, sent_at))
    }

    /// The rows a listing script (list, waiters) answers for the key
    /// range of `under` (the whole namespace for `None`), in key order,
    /// then token order.
    async fn rows_in(&self, script: &Lua, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let (from, to) = match under {
            Some(path) => (format!("[{}", path.key()), format!("({}", path.key_range_end())),
            None => ("-".to_owned(), "+".to_owned()),
        };
        let mut held = match self.inner.scripts.run(script, Args::default().with(from).with(to)).await? {
            Value::Array(rows) => rows.into_iter().map(held_lock).collect::<Result<Vec<_>, _>>()?,
            other => return Err(unexpected(&other)),
        };
        held.sort_by(|a, b| a.path.cmp(&b.path).then(a.token.cmp(&b.token)));
        Ok(held)
    }

    /// Runs a script on every item of `grant` (`head`, then its owner,
    /// token and items) that answers 1 if the grant was live (and
    /// changed), 0 if not.
    async fn on_grant(&self, script: &Lua, grant: &Grant, head: Args) -> Result<(), Error> {
        let args = head.with(grant.owner.as_str()).with(grant.token).with_items(&grant.items);
        match self.inner.scripts.run(script, args).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(Error::not_held(grant)),
            other => Err(unexpected(&other)),
        }
    }
}

/// The span a namespace's notification connections run in: their
/// comings and goings are events in it.
fn notifications(namespace: &str) -> tracing::Span {
    tracing::debug_span!(target: "mutextree", "notifications", store = STORE, namespace)
}

#[async_trait]
impl LockBackend for RedisBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.grant(request, kind, Check::KeyOnly).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        let head = Args::default().with(self.inner.scripts.channel()).with(nonce());
        self.on_grant(&SCRIPTS.release, grant, head).await
    }

    /// The release script, then a `PUBLISH` on the namespace's revocation
    /// channel (a second round trip, paid by revocations only). If the
    /// publish fails, the lock is released all the same and its holder
    /// learns of it at its next refresh.
    async fn revoke(&self, grant: &Grant) -> Result<(), Error> {
        self.release(grant).await?;
        let _ = self.inner.scripts.publish_revocation(&Revocation::of(grant)).await;
        Ok(())
    }

    /// Heard by this backend's one revocation subscription (see the feed
    /// module), up while a listener lives.
    fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        self.inner.revocations.listen(grant)
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let sent_at = Instant::now();
        self.on_grant(&SCRIPTS.refresh, grant, Args::default().with(ttl.as_millis())).await?;
        Ok(Grant { ttl: ttl.get(), expires_at: sent_at + ttl.get(), ..grant.clone() })
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.rows_in(&SCRIPTS.list, under).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        self.grant(request, LockKind::Lock, Check::Tree).await
    }

    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        // A request id, like a grant's: the change sent twice is answered
        // with the same new token.
        let args = Args::default()
            .with(mode.as_str())
            .with(grant.owner.as_str())
            .with(grant.token)
            .with(nonce())
            .with(self.inner.scripts.channel())
            .with_items(&grant.items);
        let reply = match self.inner.scripts.run(&SCRIPTS.change_mode, args).await? {
            Value::Int(0) => return Err(Error::not_held(grant)),
            reply => Reply::new(reply)?,
        };
        // Same expiry: the change does not touch the deadline.
        reply.attempt(|token, _| Grant { items: grant.items.with_mode(mode), token, ..grant.clone() })
    }

    /// One script call; a withdrawal that removed a live reservation tells
    /// waiters, as a release does.
    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        let args = Args::default().with(self.inner.scripts.channel()).with(owner.as_str()).with(ticket);
        match self.inner.scripts.run(&SCRIPTS.withdraw, args).await? {
            Value::Int(0 | 1) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        self.rows_in(&SCRIPTS.waiters, under).await
    }

    fn fairness(&self) -> Fairness {
        Fairness::Fair
    }

    /// Every release (and downgrade) in the namespace, published by its
    /// script and heard by this backend's one subscription, wakes every
    /// waiter of the backend; `items` are not used to filter.
    fn listen(&self, _items: &LockItems) -> Listener {
        self.inner.feed.listen()
    }

    /// Script calls this backend (and its clones) sent so far: one per
    /// operation, two when a dead connection was retried. (Loading the
    /// library, once per server start, adds two more: the call that found
    /// no function, and `FUNCTION LOAD`; on servers without functions a
    /// `NOSCRIPT` reply, once per script, adds one.)
    fn labels(&self) -> StoreLabels<'_> {
        StoreLabels { store: STORE, namespace: self.namespace().as_str() }
    }

    fn round_trips(&self) -> Option<u64> {
        Some(self.inner.scripts.sent.load(Ordering::Relaxed))
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("config", &self.inner.store.shared.config)
            .field("namespace", &self.inner.namespace)
            .field("keys", &self.inner.scripts.keys)
            .field("notified", &self.inner.feed.listen().is_notified())
            .finish()
    }
}

/// A grant or mode change script's array reply: `{1, token, ttl ms}`;
/// `{0, row...}` with a row per blocked item; or, for a request that waits
/// in the queue, `{2, ticket, row...}`.
struct Reply(Vec<Value>);

impl Reply {
    fn new(value: Value) -> Result<Self, Error> {
        match value {
            Value::Array(items) => Ok(Reply(items)),
            other => Err(unexpected(&other)),
        }
    }

    /// The attempt answered: a grant made by `grant(token, ttl)`, or the
    /// blockers (in the request's item order) of a refusal.
    fn attempt(self, grant: impl FnOnce(u64, Duration) -> Grant) -> Result<Attempt, Error> {
        match self.0.as_slice() {
            [Value::Int(1), token, ttl] => Ok(Attempt::Granted(grant(int(token)?, Duration::from_millis(int(ttl)?)))),
            [Value::Int(0), rows @ ..] => Ok(Attempt::Blocked(blockers(rows)?)),
            [Value::Int(2), ticket, rows @ ..] => {
                Ok(Attempt::Queued { ticket: int(ticket)?, blockers: blockers(rows)? })
            }
            other => Err(unexpected(&Value::Array(other.to_vec()))),
        }
    }
}

/// The blockers of a refusal: its rows, at least one.
fn blockers(rows: &[Value]) -> Result<Blockers, Error> {
    let mut held = rows.iter().cloned().map(held_lock);
    let first = held.next().ok_or_else(|| unexpected(&Value::Nil))??;
    Ok(Blockers::new(first, held.collect::<Result<Vec<_>, _>>()?))
}

fn int(value: &Value) -> Result<u64, Error> {
    match value {
        Value::Int(n) if *n >= 0 => Ok(*n as u64),
        other => Err(unexpected(other)),
    }
}

fn text(value: &Value) -> Result<&str, Error> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).map_err(|_| unexpected(value)),
        other => Err(unexpected(other)),
    }
}

/// The states in a script's row of a stepwise client's transient lock and
/// of a waiter's reservation (see `lua/queue.lua`); 0 is a held lock.
const TRANSIENT: u64 = 1;
const RESERVED: u64 = 4;

/// A script's row `{key, owner, token, remaining ms, state, mode}` as the
/// live item it describes; a reservation's row ends with the milliseconds
/// its waiter has been in line.
fn held_lock(row: Value) -> Result<HeldLock, Error> {
    let stored = |error: Error| {
        Error::store_message(STORE, false, format!("the namespace holds a lock this client cannot read: {error}"))
    };
    let Value::Array(fields) = &row else { return Err(unexpected(&row)) };
    let (fields, waited) = match fields.as_slice() {
        [fields @ .., waited] if fields.len() == 6 => (fields, Duration::from_millis(int(waited)?)),
        fields => (fields, Duration::ZERO),
    };
    let [key, owner, token, remaining, state, mode] = fields else { return Err(unexpected(&row)) };
    Ok(HeldLock {
        path: LockPath::from_key(text(key)?).map_err(stored)?,
        mode: match text(mode)? {
            "shared" => Mode::Shared,
            "exclusive" => Mode::Exclusive,
            _ => return Err(unexpected(mode)),
        },
        owner: Owner::new(text(owner)?).map_err(stored)?,
        token: int(token)?,
        remaining: Duration::from_millis(int(remaining)?),
        transient: int(state)? == TRANSIENT,
        waiting: int(state)? == RESERVED,
        waited,
    })
}

/// Where a grant request stands in the waiters' queue, as the grant
/// scripts read it.
fn standing(queue: Queue) -> String {
    match queue {
        Queue::Barge => "barge".to_owned(),
        Queue::Try => "try".to_owned(),
        Queue::Join => "join".to_owned(),
        Queue::Waiting(ticket) => ticket.to_string(),
    }
}

/// Identifies one request, so that the same request sent twice (after a
/// lost reply) gets the answer the first one got.
fn nonce() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// rustls needs a process-wide crypto provider; ring is the one this crate
/// builds with. Installing twice is harmless (the first one stays).
fn install_tls_provider() {
    #[cfg(feature = "tls")]
    {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
