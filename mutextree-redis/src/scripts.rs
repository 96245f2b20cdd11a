//! The Lua scripts (`src/lua/`) and how they are run: each lock operation
//! is one script, one atomic step in one round trip, on the namespace's
//! keys over the command connection. The backend and its change feed both
//! run scripts, so this sits below both of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mutextree_core::{Error, LockItems, Namespace};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind, ToRedisArgs, Value};

use crate::error::{store_error, unexpected};

/// One Lua script: the shared prelude (`lua/common.lua`), the parts of
/// the prelude it uses, and its body, joined in this order. (Redis runs the
/// whole text on every call, so a script carries only the functions it may
/// use.)
/// Called by `EVALSHA`; after `NOSCRIPT` (a restart, a failover, `SCRIPT
/// FLUSH`) by `EVAL` with its source, which caches it again. (Not `SCRIPT
/// LOAD`: in a cluster that goes to every node and fails while one is down.)
pub(crate) struct Lua {
    source: String,
    sha: String,
}

// The parts of the prelude after `lua/common.lua`, in the order they are
// joined (each may use the ones before it).
const ITEMS: &str = include_str!("lua/items.lua");
const THE_WAY: &str = include_str!("lua/the_way.lua");
const CHECKS: &str = include_str!("lua/checks.lua");
const QUEUE: &str = include_str!("lua/queue.lua");

impl Lua {
    fn new(parts: &[&str], body: &str) -> Self {
        let source = [&[include_str!("lua/common.lua")], parts, &[body]].concat().join("\n");
        let sha = Script::new(&source).get_hash().to_owned();
        Lua { source, sha }
    }

    fn command(&self, keys: &[String], args: &[Vec<u8>], by_source: bool) -> Cmd {
        let mut command = if by_source { redis::cmd("EVAL") } else { redis::cmd("EVALSHA") };
        command.arg(if by_source { &self.source } else { &self.sha }).arg(keys.len()).arg(keys).arg(args);
        command
    }
}

/// The scripts, each one atomic step in one round trip.
pub(crate) struct Scripts {
    /// Any request but one Exclusive item.
    pub(crate) grant: Lua,
    /// One Exclusive item, what most requests are, by a script that
    /// defines far fewer functions.
    pub(crate) grant_one: Lua,
    pub(crate) change_mode: Lua,
    pub(crate) release: Lua,
    pub(crate) refresh: Lua,
    pub(crate) list: Lua,
    /// Removes a waiter's reservation.
    pub(crate) withdraw: Lua,
    /// Lists the waiters' reservations.
    pub(crate) waiters: Lua,
    listen: Lua,
}

pub(crate) static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    grant: Lua::new(&[ITEMS, THE_WAY, CHECKS, QUEUE], include_str!("lua/grant.lua")),
    grant_one: Lua::new(&[THE_WAY, QUEUE], include_str!("lua/grant_one.lua")),
    change_mode: Lua::new(&[ITEMS, THE_WAY, CHECKS], include_str!("lua/change_mode.lua")),
    release: Lua::new(&[ITEMS], include_str!("lua/release.lua")),
    refresh: Lua::new(&[ITEMS, THE_WAY, CHECKS], include_str!("lua/refresh.lua")),
    list: Lua::new(&[], include_str!("lua/list.lua")),
    withdraw: Lua::new(&[ITEMS, THE_WAY, QUEUE], include_str!("lua/withdraw.lua")),
    waiters: Lua::new(&[THE_WAY, QUEUE], include_str!("lua/waiters.lua")),
    listen: Lua::new(&[], include_str!("lua/listen.lua")),
});

/// A script's arguments, each as the bytes sent.
#[derive(Default)]
pub(crate) struct Args(Vec<Vec<u8>>);

impl Args {
    pub(crate) fn with(mut self, value: impl ToRedisArgs) -> Self {
        self.0.extend(value.to_redis_args());
        self
    }

    /// Each item's key and mode, last: the scripts read them from here to
    /// the end.
    pub(crate) fn with_items(self, items: &LockItems) -> Self {
        items.iter().fold(self, |args, item| args.with(item.path.key()).with(item.mode.as_str()))
    }
}

/// Runs the scripts on the namespace's keys over the command connection;
/// shared by the backend and its subscriber.
pub(crate) struct ScriptRunner {
    connection: Connection,
    pub(crate) keys: Keys,
    /// Script calls sent, for
    /// [`LockBackend::round_trips`](mutextree_core::LockBackend::round_trips).
    pub(crate) sent: AtomicU64,
}

/// The namespace's keys, all with the hash tag `{<namespace>}` so that they
/// share one cluster slot, and its release channel.
#[derive(Debug)]
pub(crate) struct Keys {
    /// Declared to every script, in this order (see `lua/common.lua`).
    pub(crate) declared: [String; 8],
    pub(crate) channel: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, namespace: &Namespace) -> Self {
        let base = format!("{prefix}:{{{namespace}}}");
        Keys {
            declared: ["locks", "index", "expiry", "token", "shared", "queue", "queued", "queue-expiry"]
                .map(|name| format!("{base}:{name}")),
            channel: format!("{base}:released"),
        }
    }
}

/// The multiplexed, self-reconnecting connection of a standalone server or
/// of a cluster.
#[derive(Clone)]
pub(crate) enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ScriptRunner {
    pub(crate) fn new(connection: Connection, keys: Keys) -> Self {
        ScriptRunner { connection, keys, sent: AtomicU64::new(0) }
    }

    /// Runs a script on the namespace's keys: by its hash, by its source
    /// if the server does not know it, and once more if the connection
    /// turned out to be dead (the server restarted since the last call; the
    /// client reconnects). Every script is safe to run twice: a grant
    /// or a mode change carries its request id, a release is remembered for
    /// a few seconds, and a refresh sets the same deadline again.
    pub(crate) async fn run(&self, script: &Lua, args: Args) -> Result<Value, Error> {
        let keys = &self.keys.declared;
        let mut by_source = false;
        let mut retried = false;
        loop {
            self.sent.fetch_add(1, Ordering::Relaxed);
            match self.connection.query(&script.command(keys, &args.0, by_source)).await {
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) && !by_source => {
                    by_source = true;
                }
                Err(error) if error.is_connection_dropped() && !retried => retried = true,
                done => return done.map_err(store_error),
            }
        }
    }

    /// Tells releases to publish for the next `lifetime`: this backend's
    /// subscription is up (see `lua/listen.lua`).
    pub(crate) async fn announce_listener(&self, lifetime: Duration) -> Result<(), Error> {
        match self.run(&SCRIPTS.listen, Args::default().with(lifetime.as_millis() as u64)).await? {
            Value::Int(1) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The namespace's release channel.
    pub(crate) fn channel(&self) -> &str {
        &self.keys.channel
    }
}

impl Connection {
    async fn query(&self, command: &Cmd) -> Result<Value, RedisError> {
        match self {
            Connection::Standalone(connection) => command.query_async(&mut connection.clone()).await,
            Connection::Cluster(connection) => command.query_async(&mut connection.clone()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use mutextree_core::backend::RESERVATION_TTL;

    use super::{QUEUE, SCRIPTS};

    fn functions(script: &super::Lua) -> usize {
        script.source.matches("local function ").count()
    }

    /// Redis runs a script's whole text on every call: the grant of one
    /// Exclusive item, half of most pairs, defines a handful of functions,
    /// far fewer than the grant of anything else.
    #[test]
    fn the_single_exclusive_grant_defines_only_what_it_uses() {
        assert!(functions(&SCRIPTS.grant_one) <= 13, "{} functions", functions(&SCRIPTS.grant_one));
        assert!(functions(&SCRIPTS.grant_one) * 3 < functions(&SCRIPTS.grant) * 2);
        assert!(functions(&SCRIPTS.release) <= 14, "{} functions", functions(&SCRIPTS.release));
    }

    /// The scripts' life of a reservation is core's, which waiters renew
    /// theirs by.
    #[test]
    fn reservations_live_as_long_as_core_says() {
        let line = format!("\nlocal RESERVATION = {}\n", RESERVATION_TTL.as_micros());
        assert!(QUEUE.contains(&line), "queue.lua lacks {line:?}");
    }
}
