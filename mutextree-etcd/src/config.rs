//! How to reach etcd: endpoints, key prefix, credentials, TLS and timeouts.
//!
//! Read from a URL by core's reader or set in code. Everything is checked
//! by [`EtcdConfig::connect`] before a connection is made, so a bad value
//! is an [`Error::InvalidConfig`] that names the option, never a
//! half-working client. Connecting ([`EtcdConfig::connect`]) is in the
//! backend module, which uses this one (never the other way round).

use std::fmt;
use std::time::Duration;

use etcd_client::ConnectOptions;
use mutextree_core::backend::url::{self, StoreUrl, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
use mutextree_core::{Error, Namespace};

use crate::error::STORE;

/// Where and how to connect. See the crate docs for an example.
///
/// ```
/// use std::time::Duration;
/// use mutextree_etcd::EtcdConfig;
///
/// let config = EtcdConfig::from_url("etcd://locker:secret@10.0.0.1,10.0.0.2:2379,10.0.0.3?prefix=billing-locks")?
///     .request_timeout(Duration::from_secs(2));
/// assert_eq!(config.endpoints(), ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]);
/// // let store = config.connect().await?;
/// // let backend = store.backend("billing")?;
/// # Ok::<(), mutextree_core::Error>(())
/// ```
#[derive(Clone)]
pub struct EtcdConfig {
    endpoints: Vec<String>,
    namespace: Namespace,
    prefix: String,
    user: Option<(String, String)>,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_txn_ops: usize,
    #[cfg(feature = "tls")]
    tls: Option<etcd_client::TlsOptions>,
}

impl EtcdConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "mutextree";

    /// etcd's default `--max-txn-ops`: the most compares, and the most
    /// operations in each branch, of one transaction.
    pub const DEFAULT_MAX_TXN_OPS: usize = 128;

    /// A configuration for these endpoints (`http://host:port`, or
    /// `https://host:port` with the `tls` feature): every member of the
    /// cluster you want the client to fail over to. Requests are spread
    /// over the endpoints that answer.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: Namespace::default(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            user: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_txn_ops: Self::DEFAULT_MAX_TXN_OPS,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A configuration from a URL:
    /// `etcd://[user:password@]host[:port][,host[:port]...]` (plain HTTP
    /// endpoints, port 2379 unless given) or `etcds://...` (HTTPS, with the
    /// `tls` feature and the system's roots unless the method `tls` sets
    /// others), with these optional query parameters:
    ///
    /// | parameter | default | meaning |
    /// | --- | --- | --- |
    /// | `namespace` | `mutextree` | [`namespace`](Self::namespace): the namespace `mutextree::connect` opens |
    /// | `connect_timeout` | `5s` | to reach a first member, one attempt: `500ms`, `2s`, `1m`, a bare number is seconds |
    /// | `request_timeout` | `5s` | for each request |
    /// | `prefix` | `mutextree` | the first part of every key |
    /// | `max_txn_ops` | `128` | [`max_txn_ops`](Self::max_txn_ops): the server's `--max-txn-ops` |
    ///
    /// Anything else is an error naming it; so is a bad port or a URL
    /// without a host.
    ///
    /// ```
    /// # use mutextree_etcd::EtcdConfig;
    /// let config = EtcdConfig::from_url("etcd://10.0.0.1:2379,10.0.0.2?namespace=fleet&request_timeout=2s")?;
    /// assert_eq!(config.endpoints(), ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
    /// assert_eq!(config.namespace().as_str(), "fleet");
    /// # Ok::<(), mutextree_core::Error>(())
    /// ```
    pub fn from_url(text: &str) -> Result<Self, Error> {
        let mut url = StoreUrl::parse(STORE, text)?;
        let http = match url.scheme() {
            "etcd" => "http",
            "etcds" => "https",
            other => return Err(url.invalid(format!("unknown scheme {other}://: write etcd:// or etcds://"))),
        };
        if !url.path().trim_start_matches('/').is_empty() {
            return Err(url.invalid("etcd URLs have no path: write etcd://host:port[,host:port...]?parameters"));
        }
        let endpoints = url.require_hosts()?.iter().map(|host| format!("{http}://{}", host.address(DEFAULT_PORT)));
        let mut config = EtcdConfig::new(endpoints);
        config.namespace = url.take_namespace()?;
        config.connect_timeout = url.take_connect_timeout()?;
        config.request_timeout = url.take_request_timeout()?;
        if let Some(prefix) = url.take("prefix") {
            config.prefix = prefix;
        }
        if let Some(max) = url.take_parsed("max_txn_ops", "a whole number of operations, like 128")? {
            config.max_txn_ops = max;
        }
        match (url.user(), url.password()) {
            (Some(user), Some(password)) => config = config.user(user, password),
            (None, None) => {}
            _ => return Err(url.invalid("give both user and password, or neither: etcd://user:password@host")),
        }
        url.finish(PARAMETERS)?;
        Ok(config)
    }

    /// The first part of every key (default [`Self::DEFAULT_PREFIX`]): lock
    /// keys are `<prefix>/<namespace>/<path key>`. ASCII letters, digits and
    /// `_ - . :`, like a namespace, so that no prefix and namespace pair can
    /// spell another's keys.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Authenticates as this etcd user (etcd's auth must be enabled).
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// The time allowed to connect (5 s by default, from 1 ms to an hour):
    /// to each endpoint, and for a first member to answer when the store
    /// connects, in one attempt.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The time allowed for each request (5 s by default, from 1 ms to an
    /// hour). A request that runs out of it fails with a retryable
    /// [`Error::Store`]; whatever it granted expires at its ttl.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The server's `--max-txn-ops` (etcd's default, 128, unless set): the
    /// most compares, and the most operations in each branch, that one
    /// transaction may have. A request whose transaction would be larger (a
    /// multi-path request of many deep items) is refused before anything is
    /// sent with [`Error::Unsupported`], rather than by the server; raise it
    /// together with the server's setting.
    pub fn max_txn_ops(mut self, max: usize) -> Self {
        self.max_txn_ops = max;
        self
    }

    /// TLS for `https://` endpoints: the CA to trust and, for mutual TLS,
    /// the client's identity (feature `tls`).
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: etcd_client::TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix, as given.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace the URL names (`mutextree` if none, or made by
    /// [`new`](Self::new)): the one `mutextree::connect` opens. A store
    /// serves any namespace: [`EtcdStore::backend`](crate::EtcdStore::backend).
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The members' addresses, for messages.
    pub(crate) fn addresses(&self) -> String {
        let address = |endpoint: &String| match endpoint.split_once("://") {
            Some((_, rest)) => rest.to_owned(),
            None => endpoint.clone(),
        };
        self.endpoints.iter().map(address).collect::<Vec<_>>().join(", ")
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn max_txn_ops_value(&self) -> usize {
        self.max_txn_ops
    }

    /// Checks every option; the error names the first bad one.
    pub(crate) fn check(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidConfig { store: STORE, reason });
        if self.endpoints.is_empty() {
            return invalid("no endpoint given; name at least one, e.g. http://127.0.0.1:2379".into());
        }
        for endpoint in &self.endpoints {
            let usage = || {
                format!(
                    "endpoint {endpoint:?} is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:2379"
                )
            };
            if !endpoint.contains("://") {
                return invalid(usage());
            }
            // Names a bad port.
            let read = StoreUrl::parse(STORE, endpoint)?;
            if !matches!(read.scheme(), "http" | "https") || read.hosts().len() != 1 {
                return invalid(usage());
            }
            if endpoint.starts_with("https://") && !cfg!(feature = "tls") {
                return invalid(format!("endpoint {endpoint:?} needs TLS: enable the `tls` feature of mutextree-etcd"));
            }
        }
        // The namespace's rules, so that no prefix and namespace pair can
        // spell another's keys.
        if Namespace::new(self.prefix.as_str()).is_err() {
            return invalid(format!(
                "key prefix {:?}: 1 to 100 ASCII letters, digits and `_ - . :` are allowed",
                self.prefix
            ));
        }
        if let Some((name, _)) = &self.user {
            if name.is_empty() {
                return invalid("the user name is empty".into());
            }
        }
        if self.max_txn_ops < MIN_TXN_OPS {
            return invalid(format!(
                "max_txn_ops {}: at least {MIN_TXN_OPS}, what an exclusive lock on a root node needs; \
                 etcd's default --max-txn-ops is {}",
                self.max_txn_ops,
                Self::DEFAULT_MAX_TXN_OPS
            ));
        }
        url::checked_timeout(STORE, "connect_timeout", self.connect_timeout)?;
        url::checked_timeout(STORE, "request_timeout", self.request_timeout)?;
        Ok(())
    }

    /// etcd-client's options for this configuration.
    pub(crate) fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            // A member cut off from the leader refuses at once instead of
            // holding the request, so the client moves on to another one.
            .with_require_leader(true)
            // A dead member's connection is noticed even when it sends no
            // reset (a frozen host, a cut cable).
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.clone()).with_auto_token_refresh(true);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        options
    }
}

impl fmt::Debug for EtcdConfig {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("EtcdConfig");
        debug
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_txn_ops", &self.max_txn_ops);
        #[cfg(feature = "tls")]
        debug.field("tls", &self.tls.is_some());
        debug.finish()
    }
}

/// The URL parameters [`EtcdConfig::from_url`] knows.
const PARAMETERS: &[&str] = &["namespace", "connect_timeout", "request_timeout", "prefix", "max_txn_ops"];

/// The smallest `max_txn_ops` accepted: an exclusive lock on a root node
/// compares its subtree in both key spaces.
const MIN_TXN_OPS: usize = 2;

/// etcd's client port.
const DEFAULT_PORT: u16 = 2379;

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(config: EtcdConfig) -> String {
        match config.check() {
            Err(Error::InvalidConfig { reason, .. }) => reason,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn bad_options_are_named() {
        assert!(reason(EtcdConfig::new(Vec::<String>::new())).contains("no endpoint"));
        assert!(reason(EtcdConfig::new(["127.0.0.1:2379"])).contains("http://"));
        assert!(reason(EtcdConfig::new(["http://"])).contains("http://"));
        assert!(reason(EtcdConfig::new(["http://a"]).prefix("a/b")).contains("key prefix"));
        assert!(reason(EtcdConfig::new(["http://a"]).prefix("")).contains("key prefix"));
        assert!(reason(EtcdConfig::new(["http://a"]).user("", "x")).contains("user name"));
        assert!(reason(EtcdConfig::new(["http://a"]).request_timeout(Duration::ZERO)).contains("request_timeout"));
        assert!(reason(EtcdConfig::new(["http://a"]).max_txn_ops(1)).contains("max_txn_ops 1: at least 2"));
        assert!(reason(EtcdConfig::new(["http://a:99999"])).contains("\"99999\""));
        #[cfg(not(feature = "tls"))]
        assert!(reason(EtcdConfig::new(["https://a:2379"])).contains("`tls` feature"));
        EtcdConfig::new(["http://127.0.0.1:2379", "http://[::1]:2379"])
            .prefix("app:locks-1.2_b")
            .check()
            .expect("valid");
    }

    #[test]
    fn urls() {
        let config = EtcdConfig::from_url(
            "etcd://u:p%40w@a,[::1]:2380?namespace=n&prefix=p&connect_timeout=1m&request_timeout=1500ms&max_txn_ops=256",
        )
        .expect("valid");
        assert_eq!(config.endpoints(), ["http://a:2379", "http://[::1]:2380"]);
        assert_eq!(config.addresses(), "a:2379, [::1]:2380");
        assert_eq!(config.user, Some(("u".to_owned(), "p@w".to_owned())));
        assert_eq!((config.namespace().as_str(), config.key_prefix()), ("n", "p"));
        assert_eq!(config.max_txn_ops, 256);
        assert_eq!(EtcdConfig::from_url("etcd://a").expect("valid").max_txn_ops, 128);
        assert_eq!(
            (config.connect_timeout, config.request_timeout),
            (Duration::from_secs(60), Duration::from_millis(1500))
        );
        config.check().expect("valid");
        for (url, says) in [
            ("etcd://127.0.0.1:notaport", "\"notaport\""),
            ("etcd://127.0.0.1:99999", "\"99999\""),
            ("etcd://127.0.0.1:", "nothing after ':'"),
            ("etcd://", "no host"),
            ("etcd://?namespace=x", "no host"),
            ("etcd://h?namesapce=x", "unknown URL parameter \"namesapce\"; the known ones are namespace,"),
            ("etcd://u@h", "both user and password"),
            ("etcd://h?max_txn_ops=many", "max_txn_ops=\"many\": write a whole number"),
            ("etcd://h/x", "no path"),
            ("http://h", "unknown scheme"),
        ] {
            let error = EtcdConfig::from_url(url).expect_err(url);
            assert!(error.to_string().contains(says), "{url}: {error}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", EtcdConfig::new(["http://a"]).user("locker", "hunter2"));
        assert!(shown.contains("locker") && !shown.contains("hunter2"), "{shown}");
    }
}
