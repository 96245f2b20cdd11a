//! What a store needs to know to connect: read from a URL by core's reader
//! or set in code, checked as a whole before anything is sent, and the
//! TLS connector it makes. Connecting ([`PostgresConfig::connect`]) is in
//! the backend module, which uses this one (never the other way round).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use mutextree_core::backend::url::{self, StoreUrl};
use mutextree_core::{Error, Namespace};

use crate::error::STORE;
use crate::schema::SchemaName;

/// How to reach the server and where the locks live.
///
/// Every setter only records its value; [`connect`](Self::connect) checks
/// them all before it connects, and refuses a bad one with
/// [`Error::InvalidConfig`].
///
/// ```
/// # use mutextree_postgres::PostgresConfig;
/// let config = PostgresConfig::from_url(
///     "postgres://locker@db.internal/app?namespace=billing&schema=locks&pool_size=4&sslmode=require",
/// )?;
/// assert_eq!(config.namespace().as_str(), "billing");
/// // let store = config.connect().await?;
/// // let backend = store.backend("billing")?;
/// # Ok::<(), mutextree_core::Error>(())
/// ```
#[derive(Clone)]
pub struct PostgresConfig {
    /// Hosts, credentials, database and the parameters passed on.
    pg: tokio_postgres::Config,
    /// The hosts, for messages.
    addresses: String,
    hosts: usize,
    schema: String,
    namespace: Namespace,
    pool_size: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The URL parameters this store reads itself.
const PARAMETERS: &[&str] = &["namespace", "connect_timeout", "request_timeout", "schema", "pool_size"];

/// libpq's parameters that `tokio-postgres` understands, passed on to it.
const PASSED_ON: &[&str] = &[
    "sslmode",
    "sslnegotiation",
    "application_name",
    "options",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "hostaddr",
    "keepalives",
    "keepalives_retries",
];

/// libpq's duration parameters, read with the store's duration grammar
/// (`30s`, `1m`, a bare number is seconds) and handed to `tokio-postgres`.
const DURATIONS: &[&str] = &["tcp_user_timeout", "keepalives_idle", "keepalives_interval"];

/// PostgreSQL's port.
const DEFAULT_PORT: u16 = 5432;

impl PostgresConfig {
    /// The default number of pooled connections.
    pub const DEFAULT_POOL_SIZE: usize = 10;

    /// A configuration from a URL:
    /// `postgres://user[:password]@host[:port][,host[:port]...][/database]`
    /// (or `postgresql://`; a host starting with `/`, percent-encoded as
    /// `%2Fvar%2Frun%2Fpostgresql`, is a Unix socket directory), with these
    /// optional query parameters:
    ///
    /// | parameter | default | meaning |
    /// | --- | --- | --- |
    /// | `namespace` | `mutextree` | [`namespace`](Self::namespace): the namespace `mutextree::connect` opens |
    /// | `connect_timeout` | `5s` | to open a connection, per host, one attempt: `500ms`, `2s`, `1m`, a bare number is seconds |
    /// | `request_timeout` | `5s` | for each call's answer |
    /// | `schema` | `mutextree` | where the store's table, sequence and functions live ([`SchemaName`]) |
    /// | `pool_size` | 10 | most pooled connections |
    ///
    /// and libpq's `sslmode`, `sslnegotiation`, `application_name`,
    /// `options`, `target_session_attrs`, `channel_binding`,
    /// `load_balance_hosts`, `hostaddr`, `keepalives` and
    /// `keepalives_retries`, passed on to `tokio-postgres`, and its
    /// `tcp_user_timeout`, `keepalives_idle` and `keepalives_interval`,
    /// read as durations like the others. Anything else is an
    /// error naming it; so is a bad port, a URL without a host or without a
    /// user.
    pub fn from_url(text: &str) -> Result<Self, Error> {
        let mut url = StoreUrl::parse(STORE, text)?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(url.invalid(format!("unknown scheme {}://: write postgres://user@host/database", url.scheme())));
        }
        let namespace = url.take_namespace()?;
        let connect_timeout = url.take_connect_timeout()?;
        let request_timeout = url.take_request_timeout()?;
        let schema = url.take("schema").unwrap_or_else(|| SchemaName::default().as_str().to_owned());
        let pool_size = url.take_parsed("pool_size", "a number of connections")?.unwrap_or(Self::DEFAULT_POOL_SIZE);
        // Passed on as a `key=value` string, which `tokio-postgres` reads
        // (and checks) the way libpq does.
        let passed_on: Vec<String> = PASSED_ON
            .iter()
            .filter_map(|name| url.take(name).map(|value| format!("{name}='{}'", quoted(&value))))
            .collect();
        let tcp_user_timeout = url.take_duration("tcp_user_timeout")?;
        let keepalives_idle = url.take_duration("keepalives_idle")?;
        let keepalives_interval = url.take_duration("keepalives_interval")?;
        let hosts = url.require_hosts()?.to_vec();
        let user =
            url.user().ok_or_else(|| url.invalid("the URL names no user: write postgres://user@host/database"))?;
        let mut pg = tokio_postgres::Config::from_str(&passed_on.join(" "))
            .map_err(|error| url.invalid(url::with_sources(&error)))?;
        if let Some(limit) = tcp_user_timeout {
            pg.tcp_user_timeout(limit);
        }
        if let Some(idle) = keepalives_idle {
            pg.keepalives_idle(idle);
        }
        if let Some(interval) = keepalives_interval {
            pg.keepalives_interval(interval);
        }
        pg.user(user);
        if let Some(password) = url.password() {
            pg.password(password);
        }
        let database = url.path().trim_start_matches('/');
        if !database.is_empty() {
            pg.dbname(database);
        }
        for host in &hosts {
            if host.name.starts_with('/') {
                pg.host_path(&host.name);
            } else {
                pg.host(&host.name);
            }
            pg.port(host.port.unwrap_or(DEFAULT_PORT));
        }
        let addresses = hosts.iter().map(|host| host.address(DEFAULT_PORT)).collect::<Vec<_>>().join(", ");
        let mut known = PARAMETERS.to_vec();
        known.extend(PASSED_ON);
        known.extend(DURATIONS);
        url.finish(&known)?;
        Ok(PostgresConfig {
            pg,
            addresses,
            hosts: hosts.len(),
            schema,
            namespace,
            pool_size,
            connect_timeout,
            request_timeout,
            #[cfg(feature = "tls")]
            tls: None,
        })
    }

    /// The PostgreSQL schema holding the store's table, sequence and
    /// functions, created if missing (see [`SchemaName`] for the rules).
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = name.into();
        self
    }

    /// How many connections the pool keeps at most (at least 1). A call
    /// holds one for its single round trip; waiting for a lock holds none.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long opening one connection may take, per host (5 s by
    /// default), from 1 ms to an hour.
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// How long one call may wait for its answer (after it has a
    /// connection) before it fails with a retryable [`Error::Store`]; the
    /// connection is then closed, since its answer may still come.
    /// Whether a call that timed out took effect is unknown: a grant may
    /// have been made, and lives until its ttl. 5 s by default, from 1 ms
    /// to an hour.
    pub fn request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// The rustls configuration for TLS connections (feature `tls`). Without
    /// it, the server's certificate is checked against the webpki roots.
    /// TLS is used as the URL's `sslmode` says (`prefer` by default,
    /// `require`, or `disable`).
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(std::sync::Arc::new(config));
        self
    }

    /// The namespace the URL names (`mutextree` if none): the one
    /// `mutextree::connect` opens. A store serves any namespace:
    /// [`PostgresStore::backend`](crate::PostgresStore::backend).
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The checked parts, or the first rule broken.
    pub(crate) fn check(&self) -> Result<Checked, Error> {
        let schema = SchemaName::new(self.schema.clone())?;
        if self.pool_size == 0 {
            return Err(invalid("the pool needs at least one connection"));
        }
        url::checked_timeout(STORE, "connect_timeout", self.connect_timeout)?;
        url::checked_timeout(STORE, "request_timeout", self.request_timeout)?;
        let mut pg = self.pg.clone();
        pg.connect_timeout(self.connect_timeout);
        // A connection whose peer stopped acknowledging fails within the
        // request timeout instead of the kernel's quarter of an hour.
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(self.request_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("mutextree");
        }
        // The grant function needs READ COMMITTED (see the schema module);
        // whatever the server's default, this session gets it.
        let options = match pg.get_options() {
            Some(given) => format!("{given} {READ_COMMITTED}"),
            None => READ_COMMITTED.to_owned(),
        };
        pg.options(options);
        Ok(Checked {
            schema,
            pg,
            pool_size: self.pool_size,
            // One attempt per host, each within the connect timeout.
            connect_limit: self.connect_timeout * self.hosts.max(1) as u32,
            request_timeout: self.request_timeout,
            addresses: self.addresses.clone(),
        })
    }
}

/// A value inside single quotes of a `key=value` connection string.
fn quoted(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The session option that makes READ COMMITTED the default isolation.
const READ_COMMITTED: &str = r"-c default_transaction_isolation=read\ committed";

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidConfig { store: STORE, reason: reason.into() }
}

/// A configuration that passed [`PostgresConfig::check`].
pub(crate) struct Checked {
    pub(crate) schema: SchemaName,
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) pool_size: usize,
    /// How long opening a connection may take, every host tried.
    pub(crate) connect_limit: Duration,
    pub(crate) request_timeout: Duration,
    /// The hosts, for messages.
    pub(crate) addresses: String,
}

impl fmt::Debug for PostgresConfig {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("hosts", &self.addresses)
            .field("user", &self.pg.get_user())
            .field("database", &self.pg.get_dbname())
            .field("schema", &self.schema)
            .field("namespace", &self.namespace)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for PostgresConfig {
    /// `postgres://postgres@127.0.0.1:5432/postgres`.
    fn default() -> Self {
        Self::from_url("postgres://postgres@127.0.0.1/postgres").expect("a valid URL")
    }
}

/// How TLS is negotiated: with the feature `tls`, as the connection
/// string's `sslmode` says; without it, never.
#[cfg(feature = "tls")]
pub(crate) type Tls = tokio_postgres_rustls::MakeRustlsConnect;
/// How TLS is negotiated: with the feature `tls`, as the connection
/// string's `sslmode` says; without it, never.
#[cfg(not(feature = "tls"))]
pub(crate) type Tls = tokio_postgres::NoTls;

#[cfg(feature = "tls")]
pub(crate) fn tls(config: &PostgresConfig) -> Tls {
    let client_config = match &config.tls {
        Some(given) => (**given).clone(),
        None => {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    tokio_postgres_rustls::MakeRustlsConnect::new(client_config)
}

#[cfg(not(feature = "tls"))]
pub(crate) fn tls(_config: &PostgresConfig) -> Tls {
    tokio_postgres::NoTls
}

#[cfg(test)]
mod tests {
    use mutextree_core::backend::url::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};

    use super::*;

    #[test]
    fn urls() {
        let config = PostgresConfig::from_url(
            "postgresql://me:p%40ss@db-1,[::1]:5433/app?namespace=billing&schema=locks&pool_size=4\
             &connect_timeout=1m&request_timeout=1500ms&sslmode=disable&application_name=it's",
        )
        .expect("valid");
        assert_eq!(config.addresses, "db-1:5432, [::1]:5433");
        assert_eq!(config.pg.get_ports(), [5432, 5433]);
        assert_eq!(config.pg.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(config.pg.get_dbname(), Some("app"));
        assert_eq!(config.pg.get_application_name(), Some("it's"));
        assert_eq!(config.namespace().as_str(), "billing");
        assert_eq!((config.schema.as_str(), config.pool_size), ("locks", 4));
        assert_eq!(config.connect_timeout, Duration::from_secs(60));
        assert_eq!(config.request_timeout, Duration::from_millis(1500));
        assert_eq!(config.check().expect("valid").connect_limit, Duration::from_secs(120));
        assert!(!format!("{config:?}").contains("p@ss"));
        let socket = PostgresConfig::from_url("postgres://me@%2Frun%2Fpostgresql/app").expect("valid");
        assert!(matches!(socket.pg.get_hosts(), [tokio_postgres::config::Host::Unix(_)]));
        assert_eq!(PostgresConfig::default().connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(PostgresConfig::default().request_timeout, DEFAULT_REQUEST_TIMEOUT);
    }

    #[test]
    fn libpq_durations_read_like_every_other_duration() {
        let config = PostgresConfig::from_url(
            "postgres://u@db?tcp_user_timeout=1m&keepalives_idle=1500ms&keepalives_interval=2",
        )
        .expect("valid");
        assert_eq!(config.pg.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
        assert_eq!(config.pg.get_keepalives_idle(), Duration::from_millis(1500));
        assert_eq!(config.pg.get_keepalives_interval(), Some(Duration::from_secs(2)));
        let refused = PostgresConfig::from_url("postgres://u@db?keepalives_idle=soon").expect_err("not a duration");
        assert!(refused.to_string().contains("keepalives_idle"), "{refused}");
    }

    #[test]
    fn bad_urls_are_refused_naming_the_culprit() {
        for (url, says) in [
            ("postgres://", "no host"),
            ("postgres://h/db", "no user"),
            ("postgres://u:secret@h:notaport/db", "\"notaport\""),
            ("postgres://u:secret@h:99999/db", "\"99999\""),
            ("postgres://u:secret@h:/db", "nothing after ':'"),
            ("postgres://u@h/db?namesapce=x", "unknown URL parameter \"namesapce\"; the known ones are namespace,"),
            ("postgres://u@h/db?sslmode=sometimes", "sslmode"),
            ("postgres://u@h/db?pool_size=many", "number of connections"),
            ("postgres://u@h/db?request_timeout=5x", "1500ms"),
            ("host=h user=u", "not a URL"),
            ("mysql://u@h/db", "unknown scheme"),
        ] {
            let error = PostgresConfig::from_url(url).expect_err(url);
            assert!(matches!(error, Error::InvalidConfig { .. }), "{url}: {error:?}");
            assert!(error.to_string().contains(says), "{url}: {error}");
            assert!(!error.to_string().contains("secret"), "{url}: {error}");
        }
    }

    #[test]
    fn bad_settings_are_refused_before_connecting() {
        let good = PostgresConfig::default();
        assert!(good.check().is_ok());
        let cases = [
            (good.clone().schema("Bad-Name"), "schema name"),
            (good.clone().pool_size(0), "at least one connection"),
            (good.clone().request_timeout(Duration::ZERO), "request_timeout"),
            (good.clone().connect_timeout(Duration::MAX), "connect_timeout"),
        ];
        for (config, expected) in cases {
            let message = config.check().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(expected), "{config:?}: {message:?}");
        }
    }

    #[test]
    fn sessions_are_read_committed() {
        let config = PostgresConfig::from_url("postgres://u@db?options=-c%20work_mem%3D4MB").expect("valid");
        let checked = config.check().expect("valid");
        let options = checked.pg.get_options().expect("options");
        assert!(options.starts_with("-c work_mem=4MB ") && options.ends_with(READ_COMMITTED), "{options}");
    }
}
