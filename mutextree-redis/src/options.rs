//! Where the store is, how the namespace's keys are named, and how long to
//! wait for the server: from a URL or built in code, checked before
//! anything connects.

use std::fmt;
use std::time::Duration;

use mutextree_core::{Error, Namespace};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::io::tcp::socket2::TcpKeepalive;
use redis::io::tcp::TcpSettings;
use redis::IntoConnectionInfo;

use crate::{store_error, Connection, RedisBackend, STORE};

/// How to reach a Redis server or cluster, and which namespace to lock in.
///
/// ```
/// # fn main() -> Result<(), mutextree_core::Error> {
/// use std::time::Duration;
/// use mutextree_redis::RedisOptions;
///
/// let options = RedisOptions::from_url("redis://127.0.0.1:6379/?namespace=billing")?
///     .response_timeout(Duration::from_secs(1))?;
/// assert_eq!(options.namespace_name(), "billing");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisOptions {
    /// Connection URLs: the server, or the cluster's seed nodes.
    nodes: Vec<String>,
    cluster: bool,
    namespace: Namespace,
    key_prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
}

/// The longest timeout accepted: longer ones are surely a unit mistake.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

impl RedisOptions {
    /// Options from a URL:
    ///
    /// * `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS,
    ///   with the `tls` feature), `redis+unix:///path/to/socket`: one
    ///   server;
    /// * `redis+cluster://[user:password@]host:port[,host:port...]` (or
    ///   `rediss+cluster://`): a cluster, from one or more of its nodes;
    ///
    /// and these query parameters, all optional:
    ///
    /// | parameter | default | meaning |
    /// | --- | --- | --- |
    /// | `namespace` | `mutextree` | whose locks: 1–100 of `A-Z a-z 0-9 _ . : -` |
    /// | `key_prefix` | `mutextree` | the start of every key, same characters |
    /// | `cluster` | `false` | `true`: a cluster, as with `redis+cluster://` |
    /// | `connection_timeout` | `5s` | to open a connection, e.g. `500ms`, `2s` |
    /// | `response_timeout` | `5s` | for each reply |
    /// | `protocol` | `resp2` | passed to the redis crate (`resp3`) |
    ///
    /// Anything else is an error, so that a misspelt option is not ignored.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        // Messages never repeat the URL: it may hold a password.
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| invalid("this is not a URL: write redis://host:port".to_owned()))?;
        let (address, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut options = RedisOptions {
            nodes: Vec::new(),
            cluster: false,
            namespace: Namespace::default(),
            key_prefix: "mutextree".to_owned(),
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
        };
        let mut passed_on = Vec::new();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "namespace" => options = options.namespace(&value)?,
                "key_prefix" => options = options.key_prefix(&value)?,
                "cluster" => {
                    options.cluster = match &*value {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(invalid(format!("cluster={value:?}: write true or false"))),
                    }
                }
                "connection_timeout" => options = options.connection_timeout(timeout(&name, &value)?)?,
                "response_timeout" => options = options.response_timeout(timeout(&name, &value)?)?,
                "protocol" => match &*value {
                    "resp2" | "resp3" => passed_on.push(format!("protocol={value}")),
                    _ => return Err(invalid(format!("protocol={value:?}: write resp2 or resp3"))),
                },
                _ => {
                    return Err(invalid(
                        "unknown URL parameter: the known ones are namespace, key_prefix, cluster, \
                         connection_timeout, response_timeout and protocol"
                            .to_owned(),
                    ))
                }
            }
        }
        let query = if passed_on.is_empty() { String::new() } else { format!("?{}", passed_on.join("&")) };
        let plain_scheme = match scheme {
            "redis+cluster" | "rediss+cluster" => {
                options.cluster = true;
                &scheme[..scheme.len() - "+cluster".len()]
            }
            "redis" | "rediss" | "redis+unix" | "unix" => scheme,
            _ => {
                return Err(invalid(format!(
                    "unknown scheme {scheme:?}: use redis://, rediss://, redis+unix:// or redis+cluster://"
                )))
            }
        };
        if plain_scheme == "rediss" && !cfg!(feature = "tls") {
            return Err(invalid(
                "rediss:// needs TLS: enable the `tls` feature of mutextree-redis (`redis-tls` of mutextree)"
                    .to_owned(),
            ));
        }
        let (authority, path) = match address.find('/') {
            Some(at) if !scheme.contains("unix") => address.split_at(at),
            _ => (address, ""),
        };
        let (user, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (format!("{user}@"), hosts),
            None => (String::new(), authority),
        };
        options.nodes = if scheme.contains("unix") {
            vec![format!("{scheme}://{address}{query}")]
        } else {
            hosts.split(',').map(|host| format!("{plain_scheme}://{user}{host}{path}{query}")).collect()
        };
        if options.cluster && scheme.contains("unix") {
            return Err(invalid("a cluster is reached over TCP, not a Unix socket".to_owned()));
        }
        for node in &options.nodes {
            let parsed = url::Url::parse(node).map_err(|e| invalid(format!("{}: {e}", redacted(node))))?;
            if !scheme.contains("unix") && parsed.host_str().is_none_or(str::is_empty) {
                return Err(invalid(format!("{} names no host", redacted(node))));
            }
        }
        if options.nodes.len() > 1 && !options.cluster {
            return Err(invalid("several hosts are for a cluster: use redis+cluster://".to_owned()));
        }
        Ok(options)
    }

    /// The namespace to lock in (`mutextree` by default).
    pub fn namespace(mut self, name: &str) -> Result<Self, Error> {
        self.namespace = Namespace::new(name)?;
        Ok(self)
    }

    /// The start of every key (`mutextree` by default): keys are
    /// `<prefix>:{<namespace>}:locks` and so on.
    pub fn key_prefix(mut self, prefix: &str) -> Result<Self, Error> {
        // The namespace's rules keep braces (the hash tag) out.
        Namespace::new(prefix).map_err(|_| {
            invalid(format!(
                "key prefix {prefix:?} must be 1 to 100 of A-Z a-z 0-9 _ . : - (braces would break the namespace's \
                 hash tag)"
            ))
        })?;
        self.key_prefix = prefix.to_owned();
        Ok(self)
    }

    /// How long opening a connection may take (5 s by default), from 1 ms
    /// to an hour.
    pub fn connection_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        self.connection_timeout = checked_timeout("connection_timeout", timeout)?;
        Ok(self)
    }

    /// How long each reply may take (5 s by default), from 1 ms to an hour;
    /// a call that times out fails with a retryable store error. It also
    /// bounds how long a connection may leave a request unanswered before
    /// it is dropped and opened again (a server gone without closing it).
    pub fn response_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        self.response_timeout = checked_timeout("response_timeout", timeout)?;
        Ok(self)
    }

    /// The namespace's name.
    pub fn namespace_name(&self) -> &str {
        self.namespace.as_str()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Whether the store is a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Connects: one multiplexed connection for the scripts (reconnecting
    /// by itself), and a subscription for wake-ups opened in the
    /// background while a waiter waits.
    pub async fn connect(&self) -> Result<RedisBackend, Error> {
        RedisBackend::open(self.clone()).await
    }

    /// One plain client per node, for the subscription (in a cluster, a
    /// plain `PUBLISH` reaches the subscribers of every node).
    pub(crate) fn node_clients(&self) -> Result<Vec<redis::Client>, Error> {
        install_tls_provider();
        self.nodes.iter().map(|node| self.client(node)).collect()
    }

    fn client(&self, node: &str) -> Result<redis::Client, Error> {
        let info = node.into_connection_info().map_err(store_error)?.set_tcp_settings(self.tcp_settings());
        redis::Client::open(info).map_err(store_error)
    }

    /// No Nagle delay (requests are small and answered at once); a
    /// connection that leaves a request unacknowledged for the response
    /// timeout, or goes silent, is dropped and opened again, so a server
    /// that vanished without closing it (a host lost, an address moved)
    /// costs one timeout, not the kernel's quarter of an hour.
    fn tcp_settings(&self) -> TcpSettings {
        // Keep-alive times are whole seconds.
        let idle = Duration::from_secs(self.response_timeout.as_secs_f64().ceil() as u64);
        let keepalive = TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(1)).with_retries(3);
        TcpSettings::default().set_nodelay(true).set_keepalive(keepalive).set_user_timeout(self.response_timeout)
    }

    pub(crate) fn connection_timeout_value(&self) -> Duration {
        self.connection_timeout
    }

    pub(crate) fn response_timeout_value(&self) -> Duration {
        self.response_timeout
    }

    pub(crate) async fn connection(&self) -> Result<Connection, Error> {
        install_tls_provider();
        let opened = async {
            if self.cluster {
                let client = ClusterClientBuilder::new(self.nodes.clone())
                    .connection_timeout(self.connection_timeout)
                    .response_timeout(self.response_timeout)
                    .tcp_settings(self.tcp_settings())
                    .build()
                    .map_err(store_error)?;
                client.get_async_connection().await.map(Connection::Cluster).map_err(store_error)
            } else {
                let client = self.client(&self.nodes[0])?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_response_timeout(Some(self.response_timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map(Connection::Standalone)
                    .map_err(store_error)
            }
        };
        // Bounds the client's own retries, so an unreachable server is an
        // error within a few connection timeouts.
        tokio::time::timeout(self.connection_timeout * 3, opened).await.unwrap_or_else(|_| {
            Err(Error::store_message(
                STORE,
                true,
                format!("could not connect to {} within {:?}", self.describe_nodes(), self.connection_timeout * 3),
            ))
        })
    }

    fn describe_nodes(&self) -> String {
        self.nodes.iter().map(|node| redacted(node)).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("nodes", &self.describe_nodes())
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace.as_str())
            .field("key_prefix", &self.key_prefix)
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

/// A URL with its password hidden, for messages.
fn redacted(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?))) {
        Some((scheme, (user, rest))) => {
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{scheme}://{user}:***@{rest}")
        }
        None => url.to_owned(),
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidConfig { store: STORE, reason }
}

/// A URL's duration parameter.
fn timeout(name: &str, text: &str) -> Result<Duration, Error> {
    mutextree_core::parse_duration(text)
        .ok_or_else(|| invalid(format!("{name}={text:?}: write a duration such as 500ms or 2s")))
}

fn checked_timeout(name: &str, timeout: Duration) -> Result<Duration, Error> {
    if timeout >= Duration::from_millis(1) && timeout <= MAX_TIMEOUT {
        Ok(timeout)
    } else {
        Err(invalid(format!("{name} of {timeout:?}: write a duration between 1ms and 3600s")))
    }
}

/// rustls needs a process-wide crypto provider; ring is the one this crate
/// builds with. Installing twice is harmless (the first one stays).
fn install_tls_provider() {
    #[cfg(feature = "tls")]
    {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let options =
            RedisOptions::from_url("redis://127.0.0.1:6379/2?namespace=app&response_timeout=250ms").expect("valid");
        assert_eq!(options.nodes, ["redis://127.0.0.1:6379/2"]);
        assert_eq!(options.namespace_name(), "app");
        assert_eq!(options.response_timeout, Duration::from_millis(250));
        assert!(!options.is_cluster());

        let cluster =
            RedisOptions::from_url("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001?key_prefix=locks&protocol=resp3")
                .expect("valid");
        assert!(cluster.is_cluster());
        assert_eq!(
            cluster.nodes,
            ["redis://u:pw@10.0.0.1:7000?protocol=resp3", "redis://u:pw@10.0.0.2:7001?protocol=resp3"]
        );
        assert_eq!(cluster.prefix(), "locks");
        assert!(!format!("{cluster:?}").contains("pw"), "{cluster:?}");
        assert_eq!(redacted("redis://u:p@ss@h:1"), "redis://u:***@h:1");

        let seeded = RedisOptions::from_url("redis://h:7000?cluster=true&connection_timeout=1.5s").expect("valid");
        assert!(seeded.is_cluster());
        assert_eq!(seeded.connection_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("localhost:6379", "not a URL"),
            ("user:secret@localhost:6379", "not a URL"),
            ("http://h", "unknown scheme"),
            ("redis://h?namespace=a{b}", "namespace"),
            ("redis://h?namespace=", "namespace"),
            ("redis://h?key_prefix=%7Bx%7D", "hash tag"),
            ("redis://h?namepsace=x", "unknown URL parameter"),
            ("redis://h?response_timeout=5", "500ms or 2s"),
            ("redis://h?protocol=resp3%26db%3D5", "resp2 or resp3"),
            ("redis+unix:///tmp/r.sock?cluster=true", "Unix socket"),
            ("redis://h?connection_timeout=0ms", "between 1ms"),
            ("redis://h?cluster=maybe", "true or false"),
            ("redis://a:1,b:2", "redis+cluster://"),
            ("redis+cluster://", "no host"),
        ] {
            let error = RedisOptions::from_url(url).expect_err(url);
            assert!(error.to_string().contains(says), "{url}: {error}");
            assert!(!error.to_string().contains("secret"), "{url}: {error}");
        }
        #[cfg(not(feature = "tls"))]
        assert!(RedisOptions::from_url("rediss://h").expect_err("no tls").to_string().contains("`tls` feature"));
    }
}
