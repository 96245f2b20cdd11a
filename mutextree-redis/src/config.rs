//! Where the store is, how its keys are named, and how long to wait for the
//! server: read from a URL by core's reader or set in code, checked before
//! anything connects. Connecting ([`RedisConfig::connect`]) is in the
//! backend module, which uses this one (never the other way round).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use mutextree_core::backend::url::{self, StoreUrl, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
use mutextree_core::{Error, Namespace};
use redis::io::tcp::socket2::TcpKeepalive;
use redis::io::tcp::TcpSettings;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo};

use crate::error::{store_error, STORE};

/// How to reach a Redis server or cluster.
///
/// ```
/// # fn main() -> Result<(), mutextree_core::Error> {
/// use std::time::Duration;
/// use mutextree_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://127.0.0.1:6379/?namespace=billing&connect_timeout=2s")?
///     .request_timeout(Duration::from_secs(1));
/// assert_eq!(config.namespace().as_str(), "billing");
/// // let store = config.connect().await?;
/// // let backend = store.backend("billing")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    /// The server, or the cluster's seed nodes.
    nodes: Vec<ConnectionInfo>,
    cluster: bool,
    namespace: Namespace,
    key_prefix: String,
    connect_timeout: Duration,
    request_timeout: Duration,
}

/// The URL parameters [`RedisConfig::from_url`] knows.
const PARAMETERS: &[&str] =
    &["namespace", "connect_timeout", "request_timeout", "key_prefix", "cluster", "protocol", "db"];

/// Redis's port.
const DEFAULT_PORT: u16 = 6379;

impl RedisConfig {
    /// A configuration from a URL:
    ///
    /// * `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS,
    ///   with the `tls` feature), `redis+unix:///path/to/socket[?db=N]`:
    ///   one server;
    /// * `redis+cluster://[user:password@]host[:port][,host[:port]...]` (or
    ///   `rediss+cluster://`): a cluster, from one or more of its nodes;
    ///
    /// and these query parameters, all optional:
    ///
    /// | parameter | default | meaning |
    /// | --- | --- | --- |
    /// | `namespace` | `mutextree` | [`namespace`](Self::namespace): the namespace `mutextree::connect` opens |
    /// | `connect_timeout` | `5s` | to open the connection, one attempt: `500ms`, `2s`, `1m`, a bare number is seconds |
    /// | `request_timeout` | `5s` | for each reply |
    /// | `key_prefix` | `mutextree` | the start of every key: 1–100 of `A-Z a-z 0-9 _ . : -` |
    /// | `cluster` | `false` | `true`: a cluster, as with `redis+cluster://` |
    /// | `protocol` | `resp2` | `resp3` |
    /// | `db` | `0` | the database of a `redis+unix://` URL (the path names it otherwise) |
    ///
    /// Anything else is an error naming it, so that a misspelt option is
    /// not ignored; so is a bad port or a URL without a host.
    pub fn from_url(text: &str) -> Result<Self, Error> {
        let mut url = StoreUrl::parse(STORE, text)?;
        let (tls, cluster_scheme, unix) = match url.scheme() {
            "redis" => (false, false, false),
            "rediss" => (true, false, false),
            "redis+cluster" => (false, true, false),
            "rediss+cluster" => (true, true, false),
            "redis+unix" | "unix" => (false, false, true),
            other => {
                return Err(url.invalid(format!(
                    "unknown scheme {other}://: use redis://, rediss://, redis+unix:// or redis+cluster://"
                )))
            }
        };
        if tls && !cfg!(feature = "tls") {
            return Err(url.invalid(
                "rediss:// needs TLS: enable the `tls` feature of mutextree-redis (`redis-tls` of mutextree)",
            ));
        }
        let namespace = url.take_namespace()?;
        let key_prefix = url.take("key_prefix").unwrap_or_else(|| "mutextree".to_owned());
        let cluster = url.take_bool("cluster")?.unwrap_or(false) || cluster_scheme;
        let connect_timeout = url.take_connect_timeout()?;
        let request_timeout = url.take_request_timeout()?;
        let protocol = match url.take("protocol").as_deref() {
            None | Some("resp2") => ProtocolVersion::RESP2,
            Some("resp3") => ProtocolVersion::RESP3,
            Some(other) => return Err(url.invalid(format!("protocol={other:?}: write resp2 or resp3"))),
        };
        let db_parameter: Option<i64> = url.take_parsed("db", "a database number")?;
        let database = |text: &str| text.parse::<i64>().ok().filter(|db| *db >= 0);
        let db = match (unix, url.path().trim_start_matches('/'), db_parameter) {
            (true, _, db) | (false, "", db) => db.unwrap_or(0),
            (false, path, None) => database(path).ok_or_else(|| {
                url.invalid(format!("database {path:?}: write redis://host:port/N with a database number N"))
            })?,
            (false, _, Some(_)) => return Err(url.invalid("the database is named twice: by the path and by db=")),
        };
        if cluster && db != 0 {
            return Err(url.invalid("a cluster has only database 0"));
        }
        let mut settings = RedisConnectionInfo::default().set_db(db).set_protocol(protocol);
        if let Some(user) = url.user() {
            settings = settings.set_username(user);
        }
        if let Some(password) = url.password() {
            settings = settings.set_password(password);
        }
        let addresses: Vec<ConnectionAddr> = if unix {
            if cluster {
                return Err(url.invalid("a cluster is reached over TCP, not a Unix socket"));
            }
            if !url.hosts().is_empty() || url.path().is_empty() {
                return Err(url.invalid("write the socket's path: redis+unix:///run/redis/redis.sock"));
            }
            vec![ConnectionAddr::Unix(PathBuf::from(url.path()))]
        } else {
            let hosts = url.require_hosts()?;
            if hosts.len() > 1 && !cluster {
                return Err(url.invalid("several hosts are for a cluster: use redis+cluster://"));
            }
            hosts
                .iter()
                .map(|host| {
                    let port = host.port.unwrap_or(DEFAULT_PORT);
                    if tls {
                        ConnectionAddr::TcpTls { host: host.name.clone(), port, insecure: false, tls_params: None }
                    } else {
                        ConnectionAddr::Tcp(host.name.clone(), port)
                    }
                })
                .collect()
        };
        url.finish(PARAMETERS)?;
        let nodes = addresses
            .into_iter()
            .map(|address| {
                Ok(address.into_connection_info().map_err(store_error)?.set_redis_settings(settings.clone()))
            })
            .collect::<Result<_, Error>>()?;
        Ok(RedisConfig { nodes, cluster, namespace, key_prefix, connect_timeout, request_timeout })
    }

    /// The start of every key (`mutextree` by default): keys are
    /// `<prefix>:{<namespace>}:locks` and so on. Checked by
    /// [`connect`](Self::connect): 1–100 of `A-Z a-z 0-9 _ . : -`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How long opening the connection may take (5 s by default), from 1
    /// ms to an hour: one attempt, and an error naming the address and this
    /// setting when it runs out.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long each reply may take (5 s by default), from 1 ms to an hour;
    /// a call that times out fails with a retryable store error. It also
    /// bounds how long a connection may leave a request unanswered before
    /// it is dropped and opened again (a server gone without closing it).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The namespace the URL names (`mutextree` if none): the one
    /// `mutextree::connect` opens. A store serves any namespace:
    /// [`RedisStore::backend`](crate::RedisStore::backend).
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Whether the store is a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        // The namespace's rules keep braces (the hash tag) out.
        Namespace::new(self.key_prefix.as_str()).map_err(|_| {
            invalid(format!(
                "key prefix {:?} must be 1 to 100 of A-Z a-z 0-9 _ . : - (braces would break the namespace's hash \
                 tag)",
                self.key_prefix
            ))
        })?;
        url::checked_timeout(STORE, "connect_timeout", self.connect_timeout)?;
        url::checked_timeout(STORE, "request_timeout", self.request_timeout)?;
        Ok(())
    }

    /// The nodes' connection settings, with this configuration's TCP
    /// settings.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = ConnectionInfo> + '_ {
        self.nodes.iter().map(|node| node.clone().set_tcp_settings(self.tcp_settings()))
    }

    /// No Nagle delay (requests are small and answered at once); a
    /// connection that leaves a request unacknowledged for the request
    /// timeout, or goes silent, is dropped and opened again, so a server
    /// that vanished without closing it (a host lost, an address moved)
    /// costs one timeout, not the kernel's quarter of an hour.
    pub(crate) fn tcp_settings(&self) -> TcpSettings {
        // Keep-alive times are whole seconds.
        let idle = Duration::from_secs(self.request_timeout.as_secs_f64().ceil() as u64);
        let keepalive = TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(1)).with_retries(3);
        TcpSettings::default().set_nodelay(true).set_keepalive(keepalive).set_user_timeout(self.request_timeout)
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn request_timeout_value(&self) -> Duration {
        self.request_timeout
    }

    /// The nodes' addresses, for messages: `127.0.0.1:6379, 10.0.0.2:6379`
    /// or the socket's path.
    pub(crate) fn addresses(&self) -> String {
        let address = |node: &ConnectionInfo| match node.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                url::Host { name: host.clone(), port: Some(*port) }.to_string()
            }
            ConnectionAddr::Unix(path) => path.display().to_string(),
            other => format!("{other:?}"),
        };
        self.nodes.iter().map(address).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Debug for RedisConfig {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("nodes", &self.addresses())
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace.as_str())
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl Default for RedisConfig {
    /// `redis://127.0.0.1:6379`.
    fn default() -> Self {
        RedisConfig {
            nodes: vec![ConnectionAddr::Tcp("127.0.0.1".to_owned(), DEFAULT_PORT)
                .into_connection_info()
                .expect("an address is a connection")],
            cluster: false,
            namespace: Namespace::default(),
            key_prefix: "mutextree".to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidConfig { store: STORE, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let config =
            RedisConfig::from_url("redis://127.0.0.1:6379/2?namespace=app&request_timeout=250ms").expect("valid");
        assert_eq!(config.addresses(), "127.0.0.1:6379");
        assert_eq!(config.nodes[0].redis_settings().db(), 2);
        assert_eq!(config.namespace().as_str(), "app");
        assert_eq!(config.request_timeout, Duration::from_millis(250));
        assert!(!config.is_cluster());

        let cluster = RedisConfig::from_url(
            "redis+cluster://u:p%40w@10.0.0.1:7000,[::1]:7001,node-3?key_prefix=locks&protocol=resp3",
        )
        .expect("valid");
        assert!(cluster.is_cluster());
        assert_eq!(cluster.addresses(), "10.0.0.1:7000, [::1]:7001, node-3:6379");
        assert_eq!(cluster.nodes[1].redis_settings().password(), Some("p@w"));
        assert_eq!(cluster.nodes[1].redis_settings().protocol(), ProtocolVersion::RESP3);
        assert_eq!(cluster.prefix(), "locks");
        assert!(!format!("{cluster:?}").contains("p@w"), "{cluster:?}");

        let seeded = RedisConfig::from_url("redis://h:7000?cluster=true&connect_timeout=1.5s").expect("valid");
        assert!(seeded.is_cluster());
        assert_eq!(seeded.connect_timeout, Duration::from_millis(1500));

        let unix = RedisConfig::from_url("redis+unix:///run/redis.sock?db=3").expect("valid");
        assert_eq!(unix.addresses(), "/run/redis.sock");
        assert_eq!(unix.nodes[0].redis_settings().db(), 3);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("localhost:6379", "not a URL"),
            ("user:secret@localhost:6379", "not a URL"),
            ("http://h", "unknown scheme"),
            ("redis://h?namespace=a{b}", "namespace"),
            ("redis://h?namespace=", "namespace"),
            ("redis://h?namepsace=x", "unknown URL parameter \"namepsace\"; the known ones are namespace,"),
            ("redis://h?request_timeout=5x", "1500ms"),
            ("redis://h?protocol=resp3%26db%3D5", "resp2 or resp3"),
            ("redis+unix:///tmp/r.sock?cluster=true", "Unix socket"),
            ("redis+unix://", "socket's path"),
            ("redis://h?connect_timeout=0ms", "from 1ms"),
            ("redis://h?cluster=maybe", "true or false"),
            ("redis://a:1,b:2", "redis+cluster://"),
            ("redis://h/x", "database \"x\""),
            ("redis://h/1?db=2", "named twice"),
            ("redis+cluster://h/1", "only database 0"),
            ("redis+cluster://", "no host"),
            ("redis://u:secret@h:notaport", "\"notaport\""),
            ("redis://u:secret@h:99999", "\"99999\""),
            ("redis://u:secret@h:", "nothing after ':'"),
        ] {
            let error = RedisConfig::from_url(url).expect_err(url);
            assert!(matches!(error, Error::InvalidConfig { .. } | Error::InvalidNamespace { .. }), "{url}: {error}");
            assert!(error.to_string().contains(says), "{url}: {error}");
            assert!(!error.to_string().contains("secret"), "{url}: {error}");
        }
        #[cfg(not(feature = "tls"))]
        assert!(RedisConfig::from_url("rediss://h").expect_err("no tls").to_string().contains("`tls` feature"));
    }

    #[test]
    fn settings_made_in_code_are_checked_before_connecting() {
        for (config, says) in [
            (RedisConfig::default().key_prefix("{x}"), "hash tag"),
            (RedisConfig::default().connect_timeout(Duration::ZERO), "connect_timeout"),
            (RedisConfig::default().request_timeout(Duration::from_secs(7200)), "request_timeout"),
        ] {
            let error = config.check().expect_err(says);
            assert!(error.to_string().contains(says), "{error}");
        }
        RedisConfig::default().check().expect("the defaults are valid");
    }
}
