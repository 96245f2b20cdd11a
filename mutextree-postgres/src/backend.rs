//! The store and its namespaces' [`LockBackend`]: a pool of connections
//! to one migrated schema ([`PostgresStore`], opened by
//! [`PostgresConfig::connect`]), and per namespace a [`PostgresBackend`]
//! whose every operation is one call of a function of the schema (see the
//! schema module), with the backend's listening connection (the feed
//! module) beside it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, QueueMode, RecyclingMethod, Runtime};
use mutextree_core::backend::url::{connect_failed, connect_timed_out, connect_within};
use mutextree_core::backend::RevocationListener;
use mutextree_core::backend::{async_trait, Attempt, Listener, LockKind, LockRequest, Queue, RESERVATION_TTL};
use mutextree_core::backend::{Check, StoreLabels};
use mutextree_core::{
    Blockers, Error, Fairness, Grant, HeldLock, LockBackend, LockItems, LockPath, Mode, Namespace, Owner, Ttl,
};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::config::{tls, PostgresConfig, Tls};
use crate::error::{self, unexpected, CallError, STORE};
use crate::feed::{revocation_payload, Notifications};
use crate::schema::{self, SchemaName, Statements};

/// How many times a call is sent again after the server broke a deadlock
/// between advisory keys that collided.
const DEADLOCK_RETRIES: usize = 5;

/// How long a call waits for a pooled connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

impl PostgresConfig {
    /// Checks the settings, opens the pool (its first connection in one
    /// attempt within the connect timeout) and brings the schema to this
    /// version (creating it if needed; see the crate docs). Namespaces'
    /// backends share the pool: [`PostgresStore::backend`].
    ///
    /// Fails with [`Error::InvalidConfig`] before connecting if a setting is
    /// bad, and with [`Error::Store`] if the server cannot be reached or
    /// refuses the connection (with the server's own words: `role "x" does
    /// not exist`) or the migration.
    pub async fn connect(&self) -> Result<PostgresStore, Error> {
        PostgresStore::open(self).await
    }
}

/// A connection pool to one schema, migrated: the namespaces' backends
/// share it.
///
/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    statements: Statements,
    schema: SchemaName,
    pg: tokio_postgres::Config,
    tls: Tls,
    request_timeout: Duration,
}

impl PostgresStore {
    /// See [`PostgresConfig::connect`].
    pub(crate) async fn open(config: &PostgresConfig) -> Result<Self, Error> {
        let checked = config.check()?;
        let tls = tls(config);
        let manager = Manager::from_config(
            checked.pg.clone(),
            tls.clone(),
            // A broken connection is dropped when it is handed back, without
            // the extra round trip a verifying check would cost every call.
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(checked.pool_size)
            // The connection handed back last is handed out first. In the
            // default order (the oldest first) a caller alone on a pool of
            // 8 went through all 8 in turn, each call waking a server
            // process idle for 7 calls: twice the time per call on 2 cores,
            // once anything had made the pool grow.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(checked.connect_limit))
            .build()
            .map_err(|error| Error::InvalidConfig { store: STORE, reason: error.to_string() })?;
        let shared = Shared {
            pool,
            statements: Statements::new(&checked.schema),
            schema: checked.schema,
            pg: checked.pg,
            tls,
            request_timeout: checked.request_timeout,
        };
        // The first connection, in one attempt: its failure names the hosts
        // and says the server's own words.
        let first = async {
            shared.pool.get().await.map_err(|error| match error {
                PoolError::Timeout(_) => connect_timed_out(STORE, &checked.addresses, checked.connect_limit),
                PoolError::Backend(error) => {
                    let retryable = error::is_retryable(&error);
                    connect_failed(STORE, &checked.addresses, retryable, error)
                }
                other => connect_failed(STORE, &checked.addresses, false, other),
            })
        };
        let client = connect_within(STORE, &checked.addresses, checked.connect_limit, first).await?;
        shared.migrate(client).await?;
        Ok(PostgresStore { shared: Arc::new(shared) })
    }

    /// The backend of the namespace `name`, on this store's pool. Its
    /// listening connection for wake-ups is its own, opened the first time
    /// one of its acquisitions waits.
    pub fn backend(&self, name: &str) -> Result<PostgresBackend, Error> {
        Ok(PostgresBackend::new(self.shared.clone(), Namespace::new(name)?))
    }

    /// The schema the store's objects are in.
    pub fn schema(&self) -> &SchemaName {
        &self.shared.schema
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.shared.pool.status();
        f.debug_struct("PostgresStore")
            .field("schema", &self.shared.schema)
            .field("connections", &status.size)
            .field("max_connections", &status.max_size)
            .finish()
    }
}

impl Shared {
    /// Brings the schema to [`schema::VERSION`]; see the schema module.
    async fn migrate(&self, mut client: deadpool_postgres::Object) -> Result<(), Error> {
        let found = match client.query_opt(&self.statements.read_version, &[]).await {
            Ok(row) => row.map_or(0, |row| row.get::<_, i32>(0)),
            Err(error) if is_missing(error.code()) => 0,
            Err(error) => return Err(CallError::from(error).into()),
        };
        if found == schema::VERSION {
            return Ok(());
        }
        if found > schema::VERSION {
            return Err(newer_schema(&self.schema, found));
        }
        let transaction = client.transaction().await.map_err(CallError::from)?;
        let lock_name = format!("mutextree migrate {}", self.schema);
        transaction
            .execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&lock_name])
            .await
            .map_err(CallError::from)?;
        // After the lock, in statements of their own: they see what an
        // earlier migrator committed.
        transaction.batch_execute(&schema::migration_prelude(&self.schema)).await.map_err(CallError::from)?;
        let current = transaction
            .query_opt(&self.statements.read_version, &[])
            .await
            .map_err(CallError::from)?
            .map_or(0, |row| row.get::<_, i32>(0));
        if current > schema::VERSION {
            return Err(newer_schema(&self.schema, current));
        }
        for version in current + 1..=schema::VERSION {
            let step = schema::migration_step(&self.schema, version).expect("every version up to VERSION has a step");
            transaction.batch_execute(&step).await.map_err(CallError::from)?;
        }
        transaction
            .batch_execute(&schema::record_version(&self.schema, schema::VERSION))
            .await
            .map_err(CallError::from)?;
        transaction.commit().await.map_err(CallError::from)?;
        Ok(())
    }

    /// One statement on a pooled connection: one round trip (plus one to
    /// prepare it, the first time on each connection), each counted in
    /// `sent`, within the request timeout. A connection whose answer did
    /// not come in time is closed, not handed back: the answer may still
    /// arrive on it.
    async fn query(&self, sent: &AtomicU64, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, CallError> {
        let client = self.pool.get().await?;
        let call = async {
            let prepared = client.statement_cache.size();
            let statement = client.prepare_cached(sql).await?;
            let round_trips = if client.statement_cache.size() > prepared { 2 } else { 1 };
            sent.fetch_add(round_trips, Ordering::Relaxed);
            client.query(&statement, params).await
        };
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(answer) => Ok(answer?),
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(CallError::Timeout(self.request_timeout))
            }
        }
    }

    /// [`Shared::query`] for a statement that returns exactly one row, sent
    /// again if the server broke a deadlock.
    async fn query_one(&self, sent: &AtomicU64, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        let mut retries = 0;
        loop {
            match self.query(sent, sql, params).await {
                Ok(mut rows) if rows.len() == 1 => return Ok(rows.remove(0)),
                Ok(rows) => return Err(unexpected(format!("{} rows where one was expected", rows.len()))),
                Err(error) if error.is_deadlock() && retries < DEADLOCK_RETRIES => retries += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// The schema or its version table does not exist yet.
fn is_missing(code: Option<&SqlState>) -> bool {
    code == Some(&SqlState::UNDEFINED_TABLE) || code == Some(&SqlState::INVALID_SCHEMA_NAME)
}

fn newer_schema(schema: &SchemaName, found: i32) -> Error {
    Error::InvalidConfig {
        store: STORE,
        reason: format!(
            "schema {schema} is at version {found}, newer than the {} this version of mutextree-postgres knows; \
             upgrade mutextree-postgres",
            schema::VERSION
        ),
    }
}

/// One namespace of a [`PostgresStore`]: the [`LockBackend`].
///
/// Cheap to clone; clones share the pool and the listening connection.
#[derive(Clone)]
pub struct PostgresBackend {
    shared: Arc<Shared>,
    namespace: Namespace,
    notifications: Arc<Notifications>,
    /// Statements sent (and prepared) by this backend and its clones, for
    /// [`LockBackend::round_trips`].
    sent: Arc<AtomicU64>,
}

impl PostgresBackend {
    fn new(shared: Arc<Shared>, namespace: Namespace) -> Self {
        let notifications = Notifications::new(
            shared.pg.clone(),
            shared.tls.clone(),
            schema::ListenerStatements::new(&shared.schema),
            namespace.as_str().to_owned(),
        );
        PostgresBackend { shared, namespace, notifications: Arc::new(notifications), sent: Arc::default() }
    }

    /// The namespace of this backend.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// Whether this backend's listening connection is up, so that waiters
    /// wake on releases (it opens with the first wait, and is reopened when
    /// lost; until then waiters poll).
    pub fn is_listening(&self) -> bool {
        self.notifications.is_live()
    }

    /// One call of the grant function: `items` for `owner` during `ttl`,
    /// as `call` says (see [`GrantCall`]).
    async fn grant(
        &self,
        items: &LockItems,
        owner: &Owner,
        ttl: Duration,
        kind: LockKind,
        call: GrantCall<'_>,
    ) -> Result<Attempt, Error> {
        let (check, queue, changing) = match call {
            GrantCall::Tree(queue) => (Check::Tree, queue, None),
            GrantCall::KeyOnly => (Check::KeyOnly, Queue::Barge, None),
            GrantCall::Change(grant) => (Check::Tree, Queue::Barge, Some(grant)),
        };
        let (queue, ticket) = queue_arguments(queue)?;
        let reservation_ms = millis(RESERVATION_TTL);
        let ttl_ms = millis(ttl);
        let (tree, transient) = (check == Check::Tree, kind == LockKind::Transient);
        let changing_token = match changing {
            None => 0,
            Some(grant) => stored_token(grant).ok_or_else(|| Error::not_held(grant))?,
        };
        let (namespace, owner_text) = (self.namespace.as_str(), owner.as_str());
        let sent_at = Instant::now();
        // The common request, one Exclusive item of a new tree grant, has
        // a function of its own (see "One Exclusive item" in the schema
        // module); it answers in the same columns.
        let row = if one_exclusive(items) && tree && !transient && changing.is_none() {
            let path = &items.first().path;
            let ancestors: Vec<&str> = path.ancestor_keys().collect();
            let statement = &self.shared.statements.grant_exclusive;
            let range_end = path.key_range_end();
            let params: [&(dyn ToSql + Sync); 9] = [
                &namespace,
                &owner_text,
                &ttl_ms,
                &path.key(),
                &range_end,
                &ancestors,
                &queue,
                &ticket,
                &reservation_ms,
            ];
            self.query_one(statement, &params).await?
        } else {
            let arrays = GrantItems::new(items, check);
            let params: [&(dyn ToSql + Sync); 16] = [
                &namespace,
                &owner_text,
                &ttl_ms,
                &tree,
                &transient,
                &changing_token,
                &arrays.keys,
                &arrays.modes,
                &arrays.range_ends,
                &arrays.depths,
                &arrays.ancestors,
                &arrays.lock_keys,
                &arrays.lock_modes,
                &queue,
                &ticket,
                &reservation_ms,
            ];
            self.query_one(&self.shared.statements.grant, &params).await?
        };
        match (column::<&str>(&row, 0)?, changing) {
            ("granted", None) => {
                let (items, owner, token) = (items.clone(), owner.clone(), token(column(&row, 1)?)?);
                Ok(Attempt::Granted(Grant { items, owner, token, ttl, expires_at: sent_at + ttl, kind }))
            }
            // The same expiry, the items in their new mode.
            ("granted", Some(grant)) => {
                let token = token(column(&row, 1)?)?;
                Ok(Attempt::Granted(Grant { items: items.clone(), token, ..grant.clone() }))
            }
            ("blocked", _) => self.blockers(&row, items.len()).map(Attempt::Blocked),
            ("queued", None) => {
                let ticket = token(column(&row, 1)?)?;
                Ok(Attempt::Queued { ticket, blockers: self.blockers(&row, items.len())? })
            }
            ("not held", Some(grant)) => Err(Error::not_held(grant)),
            (other, _) => Err(unexpected(format!("the grant function's outcome {other:?}"))),
        }
    }

    /// The blockers of a refused grant, one for each blocked item, in the
    /// request's item order.
    fn blockers(&self, row: &Row, items: usize) -> Result<Blockers, Error> {
        let blocked: Vec<i32> = column(row, 2)?;
        let keys: Vec<String> = column(row, 3)?;
        let modes: Vec<String> = column(row, 4)?;
        let owners: Vec<String> = column(row, 5)?;
        let tokens: Vec<i64> = column(row, 6)?;
        let remaining_us: Vec<i64> = column(row, 7)?;
        let transient: Vec<bool> = column(row, 8)?;
        let waiting: Vec<bool> = column(row, 9)?;
        let waited_us: Vec<i64> = column(row, 10)?;
        let in_order = blocked.windows(2).all(|pair| pair[0] < pair[1]);
        let in_range = blocked.iter().all(|&item| item >= 1 && item as usize <= items);
        let lengths = [
            keys.len(),
            modes.len(),
            owners.len(),
            tokens.len(),
            remaining_us.len(),
            transient.len(),
            waiting.len(),
            waited_us.len(),
        ];
        let same_length = lengths.iter().all(|&length| length == blocked.len());
        if !(in_order && in_range && same_length) {
            return Err(unexpected(format!("blockers of items {blocked:?} for a request of {items}")));
        }
        let described = keys.into_iter().zip(modes).zip(owners).zip(tokens);
        let times = remaining_us.into_iter().zip(waited_us);
        let mut held = described.zip(times).zip(transient).zip(waiting).map(
            |((((((key, mode), owner), token), times), transient), waiting)| -> Result<HeldLock, Error> {
                let held = self.held(key, &mode, owner, token, times, transient)?;
                Ok(HeldLock { waiting, ..held })
            },
        );
        let first = held.next().ok_or_else(|| unexpected("a refusal without a blocker".to_owned()))??;
        Ok(Blockers::new(first, held.collect::<Result<Vec<_>, Error>>()?))
    }

    /// A lock (or, with `waiting` set afterwards, a reservation, its
    /// ticket as `token_value`) as the server described it; `times` are
    /// its remaining life and, for a reservation, its waiter's time in the
    /// queue, in microseconds.
    fn held(
        &self,
        key: String,
        mode: &str,
        owner: String,
        token_value: i64,
        times: (i64, i64),
        transient: bool,
    ) -> Result<HeldLock, Error> {
        let (remaining_us, waited_us) = times;
        let path = LockPath::from_key(&key).map_err(|error| unexpected(format!("a lock row's key: {error}")))?;
        let owner = Owner::new(owner).map_err(|error| unexpected(format!("a lock row's owner: {error}")))?;
        let mode = match mode {
            "shared" => Mode::Shared,
            "exclusive" => Mode::Exclusive,
            other => return Err(unexpected(format!("a lock row's mode {other:?}"))),
        };
        Ok(HeldLock {
            path,
            mode,
            owner,
            token: token(token_value)?,
            remaining: Duration::from_micros(remaining_us.max(0) as u64),
            transient,
            waiting: false,
            waited: Duration::from_micros(waited_us.max(0) as u64),
        })
    }

    /// The rows of a listing statement, as held locks: `all` for the
    /// namespace, or `below` for `under` and below it (its key range).
    /// Each row is key, owner, token (or ticket), remaining microseconds,
    /// transient, mode, and the microseconds a reservation's waiter has
    /// been in the queue (0 for a lock).
    async fn listing(&self, all: &str, below: &str, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let namespace = self.namespace.as_str();
        let rows = match under {
            None => self.query(all, &[&namespace]).await,
            Some(path) => {
                let range_end = path.key_range_end();
                self.query(below, &[&namespace, &path.key(), &range_end]).await
            }
        }
        .map_err(Error::from)?;
        rows.iter()
            .map(|row| {
                let (mode, times) = (column::<&str>(row, 5)?, (column(row, 3)?, column(row, 6)?));
                self.held(column(row, 0)?, mode, column(row, 1)?, column(row, 2)?, times, column(row, 4)?)
            })
            .collect()
    }

    /// [`Shared::query`], counted in [`LockBackend::round_trips`].
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, CallError> {
        self.shared.query(&self.sent, sql, params).await
    }

    /// [`Shared::query_one`], counted in [`LockBackend::round_trips`].
    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        self.shared.query_one(&self.sent, sql, params).await
    }

    /// One call of the release function on `grant`; with a `revocation`
    /// payload, in the statement that also announces it at commit.
    async fn remove(&self, grant: &Grant, revocation: Option<String>) -> Result<(), Error> {
        let Some(token) = stored_token(grant) else { return Err(Error::not_held(grant)) };
        let (namespace, owner) = (self.namespace.as_str(), grant.owner.as_str());
        let statements = &self.shared.statements;
        let row = match &revocation {
            // One Exclusive item has a function of its own, which removes
            // one key's row (see "One Exclusive item" in the schema module).
            None if one_exclusive(&grant.items) => {
                let key = grant.items.first().path.key();
                self.query_one(&statements.release_exclusive, &[&namespace, &key, &owner, &token]).await?
            }
            None => self.query_one(&statements.release, &[&namespace, &grant_keys(grant), &owner, &token]).await?,
            Some(payload) => {
                let keys = grant_keys(grant);
                self.query_one(&statements.revoke, &[&namespace, &keys, &owner, &token, payload]).await?
            }
        };
        if column::<bool>(&row, 0)? {
            Ok(())
        } else {
            Err(Error::not_held(grant))
        }
    }
}

/// What one call of the grant function does.
#[derive(Clone, Copy, Debug)]
enum GrantCall<'a> {
    /// The tree operation, at this place in the waiters' queue.
    Tree(Queue),
    /// The single-key primitive of the stepwise algorithm, which ignores
    /// the queue.
    KeyOnly,
    /// This grant of the owner (with the same paths) changed to the modes
    /// of the items, with its expiry. A change never waits, and ignores
    /// the queue.
    Change(&'a Grant),
}

/// A request's items as the grant function takes them (see the schema
/// module): per item its key, mode, the end of its subtree's key range and
/// its depth; the items' strict ancestors, item after item; and the
/// advisory locks to take, in key order.
#[derive(Debug)]
struct GrantItems<'a> {
    keys: Vec<&'a str>,
    modes: Vec<&'static str>,
    range_ends: Vec<String>,
    depths: Vec<i32>,
    ancestors: Vec<&'a str>,
    lock_keys: Vec<&'a str>,
    lock_modes: Vec<&'static str>,
}

impl<'a> GrantItems<'a> {
    fn new(items: &'a LockItems, check: Check) -> Self {
        let tree = check == Check::Tree;
        // Each key once, in its strongest mode: an item's node Exclusive,
        // its ancestors Shared (a tree grant only), whatever the item's
        // mode (see "Modes and multi-path grants" in the schema module).
        let mut locks: BTreeMap<&str, Mode> = BTreeMap::new();
        let mut ancestors = Vec::new();
        for item in items {
            locks.insert(item.path.key(), Mode::Exclusive);
            if tree {
                for ancestor in item.path.ancestor_keys() {
                    ancestors.push(ancestor);
                    locks.entry(ancestor).or_insert(Mode::Shared);
                }
            }
        }
        GrantItems {
            keys: items.iter().map(|item| item.path.key()).collect(),
            modes: items.iter().map(|item| item.mode.as_str()).collect(),
            range_ends: items.iter().map(|item| item.path.key_range_end()).collect(),
            // At most MAX_DEPTH: always fits.
            depths: items.iter().map(|item| item.path.depth() as i32).collect(),
            ancestors,
            lock_keys: locks.keys().copied().collect(),
            lock_modes: locks.values().map(|mode| mode.as_str()).collect(),
        }
    }
}

/// A column of the expected type, or an error saying which was not.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, Error> {
    row.try_get(index).map_err(|error| unexpected(format!("column {index}: {error}")))
}

fn token(value: i64) -> Result<u64, Error> {
    u64::try_from(value).map_err(|_| unexpected(format!("fencing token {value}")))
}

fn millis(ttl: Duration) -> i64 {
    // At most a day: always fits.
    ttl.as_millis() as i64
}

/// A place in the queue as the grant function takes it: `barge`, `try`,
/// `join` or `waiting` with the ticket (0 for the others). A ticket beyond
/// `i64::MAX` was never issued by this store.
fn queue_arguments(queue: Queue) -> Result<(&'static str, i64), Error> {
    Ok(match queue {
        Queue::Barge => ("barge", 0),
        Queue::Try => ("try", 0),
        Queue::Join => ("join", 0),
        Queue::Waiting(ticket) => {
            let ticket = i64::try_from(ticket).map_err(|_| unexpected(format!("a waiter's ticket {ticket}")))?;
            ("waiting", ticket)
        }
    })
}

/// Whether `items` are one Exclusive item: the common request, which the
/// schema serves with functions of its own.
fn one_exclusive(items: &LockItems) -> bool {
    items.len() == 1 && items.first().mode == Mode::Exclusive
}

/// The keys of a grant's items, as release and refresh match them.
fn grant_keys(grant: &Grant) -> Vec<&str> {
    grant.items.iter().map(|item| item.path.key()).collect()
}

/// A grant's token as the server stores it; a token beyond `i64::MAX` was
/// never granted by this store, so it names no lock.
fn stored_token(grant: &Grant) -> Option<i64> {
    i64::try_from(grant.token).ok()
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("schema", &self.shared.schema)
            .field("namespace", &self.namespace)
            .field("listening", &self.is_listening())
            .finish()
    }
}

#[async_trait]
impl LockBackend for PostgresBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.grant(&request.items, &request.owner, request.ttl.get(), kind, GrantCall::KeyOnly).await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        self.remove(grant, None).await
    }

    /// The release and, at its commit, a `NOTIFY` on the schema's
    /// revocation channel, in one statement (see the schema module).
    async fn revoke(&self, grant: &Grant) -> Result<(), Error> {
        self.remove(grant, Some(revocation_payload(self.namespace.as_str(), grant))).await
    }

    /// Heard on this backend's connection listening for revocations (see
    /// the feed module), open while a listener lives.
    fn listen_revocation(&self, grant: &Grant) -> RevocationListener {
        self.notifications.listen_revocation(grant)
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let Some(token) = stored_token(grant) else { return Err(Error::not_held(grant)) };
        let ttl_ms = millis(ttl.get());
        let keys = grant_keys(grant);
        let (namespace, owner) = (self.namespace.as_str(), grant.owner.as_str());
        let sent_at = Instant::now();
        let row =
            self.query_one(&self.shared.statements.refresh, &[&namespace, &keys, &owner, &token, &ttl_ms]).await?;
        if column::<bool>(&row, 0)? {
            Ok(Grant { ttl: ttl.get(), expires_at: sent_at + ttl.get(), ..grant.clone() })
        } else {
            Err(Error::not_held(grant))
        }
    }

    /// One entry per live item, in key order (the items of one grant share
    /// its token).
    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let statements = &self.shared.statements;
        self.listing(&statements.list_all, &statements.list_under, under).await
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        let call = GrantCall::Tree(request.queue);
        self.grant(&request.items, &request.owner, request.ttl.get(), LockKind::Lock, call).await
    }

    /// One call of the grant function, as a grant of the same items in
    /// `mode` that does not count the grant's own rows as in the way (see
    /// the schema module).
    async fn change_mode(&self, grant: &Grant, mode: Mode) -> Result<Attempt, Error> {
        let items = grant.items.with_mode(mode);
        self.grant(&items, &grant.owner, grant.ttl, grant.kind, GrantCall::Change(grant)).await
    }

    /// One call of the withdrawal function, which wakes the namespace's
    /// waiters if the reservation was live (see the schema module).
    async fn withdraw(&self, owner: &Owner, ticket: u64) -> Result<(), Error> {
        // A ticket beyond i64::MAX was never issued: nothing to remove.
        let Ok(ticket) = i64::try_from(ticket) else { return Ok(()) };
        let (namespace, owner) = (self.namespace.as_str(), owner.as_str());
        self.query_one(&self.shared.statements.withdraw, &[&namespace, &owner, &ticket]).await?;
        Ok(())
    }

    /// One entry per item of each live reservation, in key order (then by
    /// ticket), its ticket as the token.
    async fn waiters(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let statements = &self.shared.statements;
        let reservations = self.listing(&statements.waiters_all, &statements.waiters_under, under).await?;
        Ok(reservations.into_iter().map(|held| HeldLock { waiting: true, ..held }).collect())
    }

    /// Fair: a grant honours the queue (see "Fair waiting" in the schema
    /// module).
    fn fairness(&self) -> Fairness {
        Fairness::Fair
    }

    /// Every release in the namespace wakes every waiter of this backend,
    /// through its one listening connection (see the feed module); `items`
    /// are not used to filter.
    fn listen(&self, _items: &LockItems) -> Listener {
        self.notifications.listen()
    }

    /// Statements this backend (and its clones) sent so far: one per
    /// operation, one more the first time a statement is prepared on a
    /// pooled connection, and one more for each call sent again after the
    /// server broke a deadlock.
    fn labels(&self) -> StoreLabels<'_> {
        StoreLabels { store: STORE, namespace: self.namespace().as_str() }
    }

    fn round_trips(&self) -> Option<u64> {
        Some(self.sent.load(Ordering::Relaxed))
    }
}
