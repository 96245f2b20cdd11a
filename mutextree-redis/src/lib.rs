#![doc = include_str!("../README.md")]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mutextree_core::{
    async_trait, Attempt, ChangeFeed, Error, Grant, HeldLock, Listener, LockBackend, LockKind, LockPath, LockRequest,
    Owner, Ttl,
};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, RetryMethod, Script, ScriptInvocation, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod options;
mod subscriber;

pub use options::RedisOptions;

/// The store's name in errors.
const STORE: &str = "redis";

/// The scripts, each one atomic step in one round trip. `EVALSHA` first;
/// the redis crate sends the source again after `NOSCRIPT` (a restart, a
/// failover, `SCRIPT FLUSH`).
struct Scripts {
    grant: Script,
    release: Script,
    refresh: Script,
    list: Script,
}

static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| {
    const COMMON: &str = include_str!("lua/common.lua");
    let script = |body: &str| Script::new(&format!("{COMMON}\n{body}"));
    Scripts {
        grant: script(include_str!("lua/grant.lua")),
        release: script(include_str!("lua/release.lua")),
        refresh: script(include_str!("lua/refresh.lua")),
        list: script(include_str!("lua/list.lua")),
    }
});

/// A client of one namespace on a Redis server or cluster: the
/// [`LockBackend`]. Cheap to clone; clones share the connection and the
/// subscription.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    options: RedisOptions,
    connection: Connection,
    keys: Keys,
    feed: ChangeFeed,
    subscriber: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// The namespace's keys, all with the hash tag `{<namespace>}` so that they
/// share one cluster slot, and its release channel.
#[derive(Debug)]
struct Keys {
    /// Declared to every script, in this order (see `lua/common.lua`).
    declared: [String; 4],
    channel: String,
}

impl Keys {
    fn new(options: &RedisOptions) -> Self {
        let base = format!("{}:{{{}}}", options.prefix(), options.namespace_name());
        Keys {
            declared: ["locks", "index", "expiry", "token"].map(|name| format!("{base}:{name}")),
            channel: format!("{base}:released"),
        }
    }
}

/// The multiplexed, self-reconnecting connection of a standalone server or
/// of a cluster.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Runs a script, once more if the connection turned out to be dead
    /// (the server restarted since the last call: the client reconnects).
    /// Every script is safe to run twice: a grant carries its request id,
    /// release and refresh change nothing the second time.
    async fn run(&self, call: &ScriptInvocation<'_>) -> Result<Value, Error> {
        match self.run_once(call).await {
            Err(error) if error.is_connection_dropped() => self.run_once(call).await,
            done => done,
        }
        .map_err(store_error)
    }

    async fn run_once(&self, call: &ScriptInvocation<'_>) -> Result<Value, RedisError> {
        match self {
            Connection::Standalone(connection) => call.invoke_async(&mut connection.clone()).await,
            Connection::Cluster(connection) => call.invoke_async(&mut connection.clone()).await,
        }
    }
}

impl RedisBackend {
    /// Connects with the options of a URL: see [`RedisOptions::from_url`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        RedisOptions::from_url(url)?.connect().await
    }

    pub(crate) async fn open(options: RedisOptions) -> Result<Self, Error> {
        let connection = options.connection().await?;
        let keys = Keys::new(&options);
        let feed = ChangeFeed::new();
        // Until the subscription is confirmed a release could go unheard:
        // waiters poll meanwhile.
        feed.set_live(false);
        let (subscribed, first_attempt) = tokio::sync::oneshot::channel();
        let subscriber = tokio::spawn(subscriber::run(options.clone(), keys.channel.clone(), feed.clone(), subscribed));
        // A backend is ready to wake its waiters when it is returned,
        // unless the subscription fails: then they poll until it is up.
        let _ = first_attempt.await;
        Ok(RedisBackend { inner: Arc::new(Inner { options, connection, keys, feed, subscriber }) })
    }

    /// The options this backend was made with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// The four keys that hold the namespace (locks, index, expiry, token
    /// counter), all in one cluster slot.
    pub fn keys(&self) -> &[String] {
        &self.inner.keys.declared
    }

    async fn grant(&self, request: &LockRequest, kind: LockKind, mode: &str) -> Result<Attempt, Error> {
        let transient = u8::from(kind == LockKind::Transient);
        // Identifies this request, so that a resent one (a lost reply, a
        // client retry) is recognised as the same grant, not refused.
        let nonce = format!("{:016x}", fastrand::u64(..));
        let mut call = SCRIPTS.grant.prepare_invoke();
        self.declare(&mut call)
            .arg(mode)
            .arg(request.path.key())
            .arg(request.ttl.as_millis())
            .arg(transient)
            .arg(nonce)
            .arg(request.owner.as_str());
        let sent_at = Instant::now();
        let reply = Reply::new(self.inner.connection.run(&call).await?)?;
        if reply.int(0)? == 1 {
            let ttl = Duration::from_millis(reply.int(2)?);
            Ok(Attempt::Granted(Grant::new(request, kind, reply.int(1)?, ttl, sent_at)))
        } else {
            Ok(Attempt::Blocked(reply.held_lock(1)?))
        }
    }

    fn declare<'a, 'b>(&self, call: &'b mut ScriptInvocation<'a>) -> &'b mut ScriptInvocation<'a> {
        for key in &self.inner.keys.declared {
            call.key(key);
        }
        call
    }

    /// Runs a script that answers 1 if `grant` was live (and changed), 0
    /// if not.
    async fn on_grant(&self, script: &Script, grant: &Grant, last: impl redis::ToRedisArgs) -> Result<(), Error> {
        let mut call = script.prepare_invoke();
        self.declare(&mut call).arg(grant.path.key()).arg(grant.owner.as_str()).arg(grant.token).arg(last);
        match self.inner.connection.run(&call).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(Error::not_held(grant)),
            other => Err(unexpected(&other)),
        }
    }
}

#[async_trait]
impl LockBackend for RedisBackend {
    async fn try_lock_key(&self, request: &LockRequest, kind: LockKind) -> Result<Attempt, Error> {
        self.grant(request, kind, "key").await
    }

    async fn release(&self, grant: &Grant) -> Result<(), Error> {
        self.on_grant(&SCRIPTS.release, grant, &self.inner.keys.channel).await
    }

    async fn refresh(&self, grant: &Grant, ttl: Ttl) -> Result<Grant, Error> {
        let sent_at = Instant::now();
        self.on_grant(&SCRIPTS.refresh, grant, ttl.as_millis()).await?;
        Ok(Grant { ttl: ttl.get(), expires_at: sent_at + ttl.get(), ..grant.clone() })
    }

    async fn list(&self, under: Option<&LockPath>) -> Result<Vec<HeldLock>, Error> {
        let (from, to) = match under {
            Some(path) => (format!("[{}", path.key()), format!("({}", path.key_range_end())),
            None => ("-".to_owned(), "+".to_owned()),
        };
        let mut call = SCRIPTS.list.prepare_invoke();
        self.declare(&mut call).arg(from).arg(to);
        match self.inner.connection.run(&call).await? {
            Value::Array(rows) => rows.into_iter().map(|row| Reply::new(row)?.held_lock(0)).collect(),
            other => Err(unexpected(&other)),
        }
    }

    async fn try_grant(&self, request: &LockRequest) -> Result<Attempt, Error> {
        self.grant(request, LockKind::Lock, "tree").await
    }

    /// Every release in the namespace, published by the release script and
    /// heard by this backend's one subscription, wakes every waiter of the
    /// backend; `path` is not used to filter.
    fn listen(&self, _path: &LockPath) -> Listener {
        self.inner.feed.listen()
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("options", &self.inner.options)
            .field("keys", &self.inner.keys)
            .field("notified", &self.inner.feed.listen().is_notified())
            .finish()
    }
}

/// A script's array reply.
struct Reply(Vec<Value>);

impl Reply {
    fn new(value: Value) -> Result<Self, Error> {
        match value {
            Value::Array(items) => Ok(Reply(items)),
            other => Err(unexpected(&other)),
        }
    }

    fn int(&self, at: usize) -> Result<u64, Error> {
        match self.0.get(at) {
            Some(Value::Int(n)) if *n >= 0 => Ok(*n as u64),
            other => Err(unexpected(other.unwrap_or(&Value::Nil))),
        }
    }

    fn text(&self, at: usize) -> Result<&str, Error> {
        match self.0.get(at) {
            Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).map_err(|_| unexpected(&self.0[at])),
            other => Err(unexpected(other.unwrap_or(&Value::Nil))),
        }
    }

    /// `key, owner, token, remaining ms, transient` from `at` on.
    fn held_lock(&self, at: usize) -> Result<HeldLock, Error> {
        let stored = |error: Error| {
            Error::store_message(STORE, false, format!("the namespace holds a lock this client cannot read: {error}"))
        };
        Ok(HeldLock {
            path: LockPath::from_key(self.text(at)?).map_err(stored)?,
            owner: Owner::new(self.text(at + 1)?).map_err(stored)?,
            token: self.int(at + 2)?,
            remaining: Duration::from_millis(self.int(at + 3)?),
            transient: self.int(at + 4)? == 1,
        })
    }
}

fn unexpected(value: &Value) -> Error {
    Error::store_message(STORE, false, format!("unexpected reply from a mutextree script: {value:?}"))
}

/// A client library error as the public one: connection trouble, timeouts
/// and cluster redirections are worth retrying; script and protocol errors
/// are not.
fn store_error(error: RedisError) -> Error {
    let retryable = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || !matches!(error.retry_method(), RetryMethod::NoRetry);
    Error::store(STORE, retryable, error)
}
