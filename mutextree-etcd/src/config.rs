//! How to reach etcd: endpoints, key prefix, credentials, TLS and timeouts.
//!
//! Everything is checked by [`EtcdStore::connect`](crate::EtcdStore::connect)
//! before a connection is made, so a bad value is an
//! [`Error::InvalidConfig`] that names the option, never a half-working
//! client.

use std::fmt;
use std::time::Duration;

use etcd_client::ConnectOptions;
use mutextree_core::{Error, Namespace};

/// The store's name in errors.
pub(crate) const STORE: &str = "etcd";

/// Where and how to connect. See the crate docs for an example.
///
/// ```
/// use std::time::Duration;
/// use mutextree_etcd::EtcdConfig;
///
/// let config = EtcdConfig::new(["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"])
///     .prefix("billing-locks")
///     .user("locker", "secret")
///     .request_timeout(Duration::from_secs(2));
/// assert_eq!(config.endpoints().len(), 3);
/// ```
#[derive(Clone)]
pub struct EtcdConfig {
    endpoints: Vec<String>,
    prefix: String,
    user: Option<(String, String)>,
    connect_timeout: Duration,
    request_timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<etcd_client::TlsOptions>,
}

impl EtcdConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "mutextree";
    /// The default time allowed to open a connection to one endpoint.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default time allowed for one request, the wait for a leader
    /// included.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            user: None,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A configuration, and the namespace, from one URL:
    /// `etcd://host:port[,host:port...]` (plain HTTP endpoints) or
    /// `etcds://...` (HTTPS, with the `tls` feature and the system's roots
    /// unless [`tls`](Self::tls) says otherwise), with the optional query
    /// parameters `namespace` (default `mutextree`), `prefix`, `user` and
    /// `password`, `connect_timeout` and `request_timeout` (`500ms`, `2s`).
    ///
    /// ```
    /// # use mutextree_etcd::EtcdConfig;
    /// let (config, namespace) =
    ///     EtcdConfig::from_url("etcd://10.0.0.1:2379,10.0.0.2:2379?namespace=fleet&request_timeout=2s")?;
    /// assert_eq!(config.endpoints(), ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
    /// assert_eq!(namespace, "fleet");
    /// # Ok::<(), mutextree_core::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<(Self, String), Error> {
        let invalid = |reason: String| Error::InvalidConfig { store: STORE, reason };
        // Messages never repeat the URL: it may hold a password.
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| invalid("this is not a URL: write etcd://host:port".to_owned()))?;
        let http = match scheme {
            "etcd" => "http",
            "etcds" => "https",
            _ => return Err(invalid(format!("unknown scheme {scheme}://: write etcd:// or etcds://"))),
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() || hosts.contains(['/', '@']) {
            return Err(invalid(
                "write the endpoints as etcd://host:port[,host:port...], credentials as ?user=&password=".to_owned(),
            ));
        }
        let mut config = EtcdConfig::new(hosts.split(',').map(|host| format!("{http}://{host}")));
        let mut namespace = Namespace::default().as_str().to_owned();
        let (mut user, mut password) = (None, None);
        let duration = |name: &str, value: &str| {
            mutextree_core::parse_duration(value)
                .ok_or_else(|| invalid(format!("{name}={value:?}: write a duration such as 500ms or 2s")))
        };
        for (name, value) in form_urlencoded_pairs(query) {
            match &*name {
                "namespace" => namespace = value,
                "prefix" => config = config.prefix(value),
                "user" => user = Some(value),
                "password" => password = Some(value),
                "connect_timeout" => config = config.connect_timeout(duration(&name, &value)?),
                "request_timeout" => config = config.request_timeout(duration(&name, &value)?),
                _ => {
                    return Err(invalid(
                        "unknown URL parameter: the known ones are namespace, prefix, user, password, \
                         connect_timeout and request_timeout"
                            .to_owned(),
                    ))
                }
            }
        }
        match (user, password) {
            (Some(user), Some(password)) => config = config.user(user, password),
            (None, None) => {}
            _ => return Err(invalid("give both user and password, or neither".to_owned())),
        }
        Ok((config, namespace))
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

    /// The time allowed to open a connection to one endpoint.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The time allowed for each request. A request that runs out of it
    /// fails with a retryable [`Error::Store`]; whatever it granted expires
    /// at its ttl.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// TLS for `https://` endpoints: the CA to trust and, for mutual TLS,
    /// the client's identity (feature `tls`).
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

    /// Checks every option; the error names the first bad one.
    pub(crate) fn check(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidConfig { store: STORE, reason });
        if self.endpoints.is_empty() {
            return invalid("no endpoint given; name at least one, e.g. http://127.0.0.1:2379".into());
        }
        for endpoint in &self.endpoints {
            let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
            match rest {
                Some(authority) if !authority.is_empty() && !authority.contains(char::is_whitespace) => {}
                _ => {
                    return invalid(format!(
                    "endpoint {endpoint:?} is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:2379"
                ))
                }
            }
            if endpoint.starts_with("https://") && !cfg!(feature = "tls") {
                return invalid(format!("endpoint {endpoint:?} needs TLS: enable the `tls` feature of mutextree-etcd"));
            }
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:".contains(c);
        if self.prefix.is_empty() || self.prefix.len() > 100 || !self.prefix.chars().all(allowed) {
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
        for (what, timeout) in [("connect", self.connect_timeout), ("request", self.request_timeout)] {
            if timeout.is_zero() {
                return invalid(format!("the {what} timeout is zero; nothing could ever succeed"));
            }
        }
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
            .field("request_timeout", &self.request_timeout);
        #[cfg(feature = "tls")]
        debug.field("tls", &self.tls.is_some());
        debug.finish()
    }
}

/// A URL query's `name=value` pairs, percent-decoded.
fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes()).map(|(name, value)| (name.into_owned(), value.into_owned())).collect()
}

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
        assert!(reason(EtcdConfig::new(["http://a"]).request_timeout(Duration::ZERO)).contains("request timeout"));
        #[cfg(not(feature = "tls"))]
        assert!(reason(EtcdConfig::new(["https://a:2379"])).contains("`tls` feature"));
        EtcdConfig::new(["http://127.0.0.1:2379", "http://[::1]:2379"])
            .prefix("app:locks-1.2_b")
            .check()
            .expect("valid");
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", EtcdConfig::new(["http://a"]).user("locker", "hunter2"));
        assert!(shown.contains("locker") && !shown.contains("hunter2"), "{shown}");
    }
}
