//! What a store needs to know to connect: checked as a whole before
//! anything is sent.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use mutextree_core::{Error, Namespace};

use crate::schema::SchemaName;
use crate::STORE;

/// How to reach the server and where the locks live.
///
/// Every setter only records its value;
/// [`PostgresStore::connect`](crate::PostgresStore::connect) checks them all
/// before it connects, and refuses a bad one with [`Error::InvalidConfig`]
/// or [`Error::InvalidNamespace`].
#[derive(Clone)]
pub struct PostgresConfig {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) namespace: String,
    pub(crate) pool_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl PostgresConfig {
    /// The default number of pooled connections.
    pub const DEFAULT_POOL_SIZE: usize = 10;
    /// The default limit on opening one connection.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// The default limit on one call's round trip.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// A configuration for the server at `url`: a `postgres://` URL or a
    /// `key=value` connection string, as `tokio-postgres` reads them
    /// (`host` may be a Unix socket directory). The other settings start
    /// at their defaults: schema `mutextree`, namespace `mutextree`,
    /// [`DEFAULT_POOL_SIZE`](Self::DEFAULT_POOL_SIZE) connections.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: SchemaName::default().as_str().to_owned(),
            namespace: Namespace::default().as_str().to_owned(),
            pool_size: Self::DEFAULT_POOL_SIZE,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A configuration from one URL: a `postgres://` (or `postgresql://`)
    /// URL as `tokio-postgres` reads it, whose query may also name the
    /// `namespace`, the `schema`, the `pool_size` and the `request_timeout`
    /// (`500ms`, `5s`); every other parameter
    /// (`sslmode`, `connect_timeout`, `application_name`, …) goes to
    /// `tokio-postgres`, which refuses what it does not know.
    ///
    /// ```
    /// # use mutextree_postgres::PostgresConfig;
    /// let config = PostgresConfig::from_url(
    ///     "postgres://locker@db.internal/app?namespace=billing&schema=locks&pool_size=4&sslmode=require",
    /// )?;
    /// # Ok::<(), mutextree_core::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut config = PostgresConfig::new(String::new());
        let mut passed_on = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "namespace" => config.namespace = value.into_owned(),
                "schema" => config.schema = value.into_owned(),
                "pool_size" => {
                    config.pool_size = value
                        .parse()
                        .map_err(|_| invalid(format!("pool_size={value:?}: write a number of connections")))?;
                }
                "request_timeout" => {
                    config.request_timeout = mutextree_core::parse_duration(&value)
                        .ok_or_else(|| invalid(format!("request_timeout={value:?}: write a duration such as 5s")))?;
                }
                _ => {
                    passed_on.append_pair(&name, &value);
                }
            }
        }
        let passed_on = passed_on.finish();
        config.url = if passed_on.is_empty() { base.to_owned() } else { format!("{base}?{passed_on}") };
        Ok(config)
    }

    /// The PostgreSQL schema holding the store's table, sequence and
    /// functions, created if missing (see [`SchemaName`] for the rules).
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = name.into();
        self
    }

    /// The namespace of [`PostgresBackend::connect`](crate::PostgresBackend::connect):
    /// several applications can share one schema without seeing each
    /// other's locks.
    pub fn namespace(mut self, name: impl Into<String>) -> Self {
        self.namespace = name.into();
        self
    }

    /// How many connections the pool keeps at most (at least 1). A call
    /// holds one for its single round trip; waiting for a lock holds none.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long opening one connection may take, unless the connection
    /// string sets `connect_timeout` itself.
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// How long one call may wait for its answer (after it has a
    /// connection) before it fails with a retryable [`Error::Store`]; the
    /// connection is then closed, since its answer may still come.
    /// Whether a call that timed out took effect is unknown: a grant may
    /// have been made, and lives until its ttl.
    pub fn request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// The rustls configuration for TLS connections (feature `tls`). Without
    /// it, the server's certificate is checked against the webpki roots.
    /// TLS is used as the connection string's `sslmode` says (`prefer` by
    /// default, `require`, or `disable`).
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(std::sync::Arc::new(config));
        self
    }

    /// The checked parts, or the first rule broken.
    pub(crate) fn check(&self) -> Result<Checked, Error> {
        let schema = SchemaName::new(self.schema.clone())?;
        let namespace = Namespace::new(self.namespace.clone())?;
        if self.pool_size == 0 {
            return Err(invalid("the pool needs at least one connection"));
        }
        if self.request_timeout.is_zero() || self.request_timeout > MAX_TIMEOUT {
            return Err(invalid(format!(
                "request_timeout must be more than zero and at most {}",
                mutextree_core::human(MAX_TIMEOUT)
            )));
        }
        let mut pg = tokio_postgres::Config::from_str(&self.url)
            .map_err(|error| invalid(format!("the connection string cannot be read: {error}")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(self.connect_timeout);
        }
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
        Ok(Checked { schema, namespace, pg })
    }
}

/// The longest timeout accepted: a longer one is surely a unit mistake.
const MAX_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// The session option that makes READ COMMITTED the default isolation.
const READ_COMMITTED: &str = r"-c default_transaction_isolation=read\ committed";

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidConfig { store: STORE, reason: reason.into() }
}

/// A configuration that passed [`PostgresConfig::check`].
pub(crate) struct Checked {
    pub(crate) schema: SchemaName,
    pub(crate) namespace: Namespace,
    pub(crate) pg: tokio_postgres::Config,
}

impl fmt::Debug for PostgresConfig {
    /// Leaves out the connection string, which may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("schema", &self.schema)
            .field("namespace", &self.namespace)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_before_connecting() {
        let good = PostgresConfig::new("host=/nowhere user=x");
        assert!(good.check().is_ok());
        let cases = [
            (good.clone().schema("Bad-Name"), "schema name"),
            (good.clone().namespace("{x}"), "namespace"),
            (good.clone().pool_size(0), "at least one connection"),
            (good.clone().request_timeout(Duration::ZERO), "request_timeout"),
            (good.clone().request_timeout(Duration::MAX), "request_timeout"),
            (PostgresConfig::new("postgres://[::1"), "cannot be read"),
        ];
        for (config, expected) in cases {
            let message = config.check().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(expected), "{config:?}: {message:?}");
        }
    }

    #[test]
    fn the_password_is_not_printed() {
        let config = PostgresConfig::new("postgres://me:secret@db/app");
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn sessions_are_read_committed() {
        let checked = PostgresConfig::new("host=db options='-c work_mem=4MB'").check().expect("valid");
        let options = checked.pg.get_options().expect("options");
        assert!(options.starts_with("-c work_mem=4MB ") && options.ends_with(READ_COMMITTED), "{options}");
    }
}
