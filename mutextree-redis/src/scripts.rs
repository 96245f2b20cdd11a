//! The Lua scripts (`src/lua/`) and how they are run: each lock operation
//! is one script, one atomic step in one round trip, on the namespace's
//! keys over the command connection. The backend and its change feed both
//! run scripts, so this sits below both of them.
//!
//! On Redis 7 and later the scripts are the functions of one library,
//! loaded once per server and called by `FCALL`: the prelude every script
//! shares (`lua/common.lua` and its parts) is defined when the library is
//! loaded, not on every call, as `EVAL` would. The library's name carries a
//! hash of its text, so clients of different versions never call each
//! other's functions. Older servers, and users whose ACL forbids functions,
//! get the scripts by `EVALSHA`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mutextree_core::backend::Revocation;
use mutextree_core::{Error, LockItems, Namespace};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind, ToRedisArgs, Value};

use crate::error::{store_error, unexpected};

/// One Lua script: a function of the library, and for servers without
/// functions its text for `EVAL`: the prelude (`lua/common.lua`), the parts
/// of it the script uses, and its body, joined in this order. (`EVAL` runs
/// the whole text on every call, so that text carries only the functions the
/// script may use.)
/// Called by `EVALSHA`; after `NOSCRIPT` (a restart, a failover, `SCRIPT
/// FLUSH`) by `EVAL` with its source, which caches it again. (Not `SCRIPT
/// LOAD`: in a cluster that goes to every node and fails while one is down.)
pub(crate) struct Lua {
    /// Its name in the library.
    function: String,
    source: String,
    sha: String,
}

/// Every script, as one library of functions (`FUNCTION LOAD`).
struct Library {
    source: String,
}

// The prelude, then its parts in the order they are joined (each may use
// the ones before it).
const COMMON: &str = include_str!("lua/common.lua");
const ITEMS: &str = include_str!("lua/items.lua");
const THE_WAY: &str = include_str!("lua/the_way.lua");
const CHECKS: &str = include_str!("lua/checks.lua");
const QUEUE: &str = include_str!("lua/queue.lua");

/// Every script starts by reading its call's keys, arguments and time.
const BEGIN: &str = "begin(KEYS, ARGV)";

impl Lua {
    fn new(library: &str, name: &str, parts: &[&str], body: &str) -> Self {
        let source = [&[COMMON], parts, &[BEGIN, body]].concat().join("\n");
        let sha = Script::new(&source).get_hash().to_owned();
        Lua { function: format!("{library}_{name}"), source, sha }
    }

    fn command(&self, keys: &[String], args: &[Vec<u8>], call: Call) -> Cmd {
        let (mut command, script) = match call {
            Call::Function => (redis::cmd("FCALL"), &self.function),
            Call::Hash => (redis::cmd("EVALSHA"), &self.sha),
            Call::Source => (redis::cmd("EVAL"), &self.source),
        };
        command.arg(script).arg(keys.len()).arg(keys).arg(args);
        command
    }
}

/// How a script is called.
#[derive(Clone, Copy, PartialEq)]
enum Call {
    /// `FCALL`, the library loaded once per server.
    Function,
    /// `EVALSHA`, the script cached by the server.
    Hash,
    /// `EVAL` with its text, which caches it.
    Source,
}

/// The scripts, each one atomic step in one round trip.
pub(crate) struct Scripts {
    /// Any request but one Exclusive item.
    pub(crate) grant: Lua,
    /// One Exclusive item, what most requests are, by a script that
    /// defines far fewer functions when sent by `EVAL`.
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
    library: Library,
}

/// Each script: its name, the parts of the prelude it uses, its body.
const BODIES: [(&str, &[&str], &str); 9] = [
    ("grant", &[ITEMS, THE_WAY, CHECKS, QUEUE], include_str!("lua/grant.lua")),
    ("grant_one", &[THE_WAY, QUEUE], include_str!("lua/grant_one.lua")),
    ("change_mode", &[ITEMS, THE_WAY, CHECKS], include_str!("lua/change_mode.lua")),
    ("release", &[ITEMS], include_str!("lua/release.lua")),
    ("refresh", &[ITEMS, THE_WAY, CHECKS], include_str!("lua/refresh.lua")),
    ("list", &[], include_str!("lua/list.lua")),
    ("withdraw", &[ITEMS, THE_WAY, QUEUE], include_str!("lua/withdraw.lua")),
    ("waiters", &[THE_WAY, QUEUE], include_str!("lua/waiters.lua")),
    ("listen", &[], include_str!("lua/listen.lua")),
];

pub(crate) static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| {
    // Every body as a function of the library, which defines the prelude once.
    let register = |library: &str| {
        BODIES
            .iter()
            .map(|(name, _, body)| {
                format!("redis.register_function('{library}_{name}', function(KEYS, ARGV)\n{BEGIN}\n{body}\nend)\n")
            })
            .collect::<String>()
    };
    let prelude = [COMMON, ITEMS, THE_WAY, CHECKS, QUEUE].join("\n");
    let version = Script::new(&format!("{prelude}\n{}", register("mutextree"))).get_hash().to_owned();
    let name = format!("mutextree_{}", &version[..16]);
    let library = Library { source: format!("#!lua name={name}\n{prelude}\n{}", register(&name)) };
    let [grant, grant_one, change_mode, release, refresh, list, withdraw, waiters, listen] =
        BODIES.map(|(script, parts, body)| Lua::new(&name, script, parts, body));
    Scripts { grant, grant_one, change_mode, release, refresh, list, withdraw, waiters, listen, library }
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
    /// Whether to call the library's functions: until the server turns out
    /// not to have them (before Redis 7) or not to let this user call or
    /// load them (an ACL).
    functions: AtomicBool,
}

/// The namespace's keys, all with the hash tag `{<namespace>}` so that they
/// share one cluster slot, and its release and revocation channels.
#[derive(Debug)]
pub(crate) struct Keys {
    /// Declared to every script, in this order (see `lua/common.lua`).
    pub(crate) declared: [String; 8],
    pub(crate) channel: String,
    pub(crate) revocations: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, namespace: &Namespace) -> Self {
        let base = format!("{prefix}:{{{namespace}}}");
        Keys {
            declared: ["locks", "index", "expiry", "token", "shared", "queue", "queued", "queue-expiry"]
                .map(|name| format!("{base}:{name}")),
            channel: format!("{base}:released"),
            revocations: format!("{base}:revoked"),
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
        ScriptRunner { connection, keys, sent: AtomicU64::new(0), functions: AtomicBool::new(true) }
    }

    /// Runs a script on the namespace's keys: as a function of the library,
    /// which is loaded first if the server does not have it (a first call,
    /// a restart, `FUNCTION FLUSH`); on servers without functions by its
    /// hash, or by its source if the server does not know it; and once more
    /// if the connection turned out to be dead (the server restarted since
    /// the last call; the client reconnects). Every script is safe to run
    /// twice: a grant or a mode change carries its request id, a release is
    /// remembered for a few seconds, and a refresh sets the same deadline
    /// again.
    pub(crate) async fn run(&self, script: &Lua, args: Args) -> Result<Value, Error> {
        let keys = &self.keys.declared;
        let mut by_source = false;
        let mut loaded = false;
        let mut retried = false;
        loop {
            let call = match (self.functions.load(Ordering::Relaxed), by_source) {
                (true, _) => Call::Function,
                (false, false) => Call::Hash,
                (false, true) => Call::Source,
            };
            self.sent.fetch_add(1, Ordering::Relaxed);
            match self.connection.query(&script.command(keys, &args.0, call)).await {
                Err(error) if call == Call::Function && function_missing(&error) && !loaded => {
                    loaded = true;
                    self.load_library().await?;
                }
                Err(error) if call == Call::Function && functions_unavailable(&error) => {
                    self.functions.store(false, Ordering::Relaxed);
                }
                Err(error) if call == Call::Hash && error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    by_source = true;
                }
                Err(error) if error.is_connection_dropped() && !retried => retried = true,
                done => return done.map_err(store_error),
            }
        }
    }

    /// Loads the library on the server of the namespace's slot. Another
    /// client may have loaded it meanwhile; a server that refuses (no
    /// functions, or an ACL) gets the scripts by `EVAL` from now on.
    async fn load_library(&self) -> Result<(), Error> {
        let mut command = redis::cmd("FUNCTION");
        command.arg("LOAD").arg(&SCRIPTS.library.source);
        self.sent.fetch_add(1, Ordering::Relaxed);
        match self.connection.query_on_slot_of(&self.keys.declared[0], command).await {
            Ok(_) => Ok(()),
            Err(error) if error.detail().is_some_and(|detail| detail.contains("already exists")) => Ok(()),
            Err(error) if functions_unavailable(&error) => {
                self.functions.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => Err(store_error(error)),
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

    /// Publishes `revocation` on the namespace's revocation channel, to
    /// every subscriber (of every node, in a cluster). A plain command, not
    /// a script: the release before it was the atomic step.
    pub(crate) async fn publish_revocation(&self, revocation: &Revocation) -> Result<(), Error> {
        let mut command = redis::cmd("PUBLISH");
        command.arg(&self.keys.revocations).arg(revocation.to_message());
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.connection.query(&command).await.map(drop).map_err(store_error)
    }

    /// The namespace's release channel.
    pub(crate) fn channel(&self) -> &str {
        &self.keys.channel
    }
}

/// `FCALL` of a function the server does not have.
fn function_missing(error: &RedisError) -> bool {
    error.detail().is_some_and(|detail| detail.starts_with("Function not found"))
}

/// A server without functions (before Redis 7: an unknown command) or a
/// user whose ACL forbids them.
fn functions_unavailable(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || error.detail().is_some_and(|detail| detail.starts_with("unknown command"))
}

impl Connection {
    async fn query(&self, command: &Cmd) -> Result<Value, RedisError> {
        match self {
            Connection::Standalone(connection) => command.query_async(&mut connection.clone()).await,
            Connection::Cluster(connection) => command.query_async(&mut connection.clone()).await,
        }
    }

    /// Sends `command` to the primary of `key`'s slot (in a cluster; the
    /// one server otherwise).
    async fn query_on_slot_of(&self, key: &str, command: Cmd) -> Result<Value, RedisError> {
        match self {
            Connection::Standalone(_) => self.query(&command).await,
            Connection::Cluster(connection) => {
                let primary = SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
                connection.clone().route_command(command, RoutingInfo::SingleNode(primary)).await
            }
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

    /// `EVAL` (servers without functions) runs a script's whole text on
    /// every call: the grant of one Exclusive item, half of most pairs,
    /// defines a handful of functions besides the queue's, far fewer than
    /// the grant of anything else. (Every grant carries the queue's
    /// functions: any refusal may write a reservation.)
    #[test]
    fn the_single_exclusive_grant_defines_only_what_it_uses() {
        let queue = QUEUE.matches("local function ").count();
        let own = |script: &super::Lua| functions(script) - queue;
        assert!(own(&SCRIPTS.grant_one) <= 16, "{} functions", own(&SCRIPTS.grant_one));
        assert!(own(&SCRIPTS.grant_one) * 3 < own(&SCRIPTS.grant) * 2);
        assert!(functions(&SCRIPTS.release) <= 15, "{} functions", functions(&SCRIPTS.release));
    }

    /// The library defines every script once, under names that carry its
    /// version, and reads nothing of a call while it is loaded.
    #[test]
    fn the_library_registers_every_script_under_its_version() {
        let library = &SCRIPTS.library.source;
        let name = library.lines().next().and_then(|line| line.strip_prefix("#!lua name=")).expect("a library header");
        assert!(name.starts_with("mutextree_") && name.len() == "mutextree_".len() + 16, "{name}");
        let scripts = [&SCRIPTS.grant, &SCRIPTS.grant_one, &SCRIPTS.change_mode, &SCRIPTS.release, &SCRIPTS.list];
        for script in scripts.into_iter().chain([&SCRIPTS.withdraw, &SCRIPTS.waiters]) {
            assert!(script.function.starts_with(name));
            assert_eq!(library.matches(&format!("redis.register_function('{}',", script.function)).count(), 1);
        }
        let prelude = &library[..library.find("redis.register_function").expect("functions")];
        let code = prelude.lines().filter(|line| !line.trim_start().starts_with("--"));
        for line in code {
            assert!(!line.contains("KEYS") && !line.contains("ARGV"), "per-call state read at load: {line}");
        }
    }

    /// The scripts' life of a reservation is core's, which waiters renew
    /// theirs by.
    #[test]
    fn reservations_live_as_long_as_core_says() {
        let line = format!("\nlocal RESERVATION = {}\n", RESERVATION_TTL.as_micros());
        assert!(QUEUE.contains(&line), "queue.lua lacks {line:?}");
    }
}
