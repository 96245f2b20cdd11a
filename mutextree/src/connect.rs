//! One URL picks the store: configuration files and the command line name a
//! store without code that knows which one it is.

use std::sync::Arc;

use mutextree_core::{Error, LockBackend, Namespace};

/// Connects to the store a URL names, and returns the backend of the
/// namespace the URL's `namespace` parameter names (`mutextree` if none).
///
/// | URL | store | feature |
/// | --- | --- | --- |
/// | `memory://` | this process's memory store (all `memory://` connections of a process share it) | `memory` |
/// | `redis://`, `rediss://`, `redis+unix://`, `redis+cluster://`, `rediss+cluster://` | Redis, see `mutextree_redis::RedisConfig::from_url` | `redis` (`redis-tls` for TLS) |
/// | `postgres://`, `postgresql://` | PostgreSQL, see `mutextree_postgres::PostgresConfig::from_url` | `postgres` (`postgres-tls`) |
/// | `etcd://host:port[,host:port...]`, `etcds://` | etcd, see `mutextree_etcd::EtcdConfig::from_url` | `etcd` (`etcd-tls`) |
///
/// Every URL takes `?namespace=NAME`; the network stores also take
/// `connect_timeout` (5 s by default: one attempt to connect, and an error
/// naming the address and this setting when it runs out) and
/// `request_timeout` (5 s), and their own options, as their documentation
/// says. Durations read like `1500ms`, `2s` or `1m`; a bare number is
/// seconds. An unknown parameter, a bad port or a missing host is an
/// [`Error::InvalidConfig`] naming it, before anything is dialled. A URL
/// for a store whose feature is off is an error naming the feature.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
/// let store = mutextree::connect("memory://?namespace=tests").await?;
/// let lock = mutextree::TreeLock::new(store, "eu-west/rack-12")?;
/// lock.acquire().await?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    open(url, None).await
}

/// [`connect`], in the namespace `namespace` whatever the URL's
/// `namespace` parameter says: for programs that take the store's URL
/// from their configuration and the namespace from elsewhere (a command
/// line option, the application's name).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
/// let store = mutextree::connect_with("memory://", "billing").await?;
/// # Ok(()) }
/// ```
pub async fn connect_with(url: &str, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
    // Checked first: a bad name never dials.
    open(url, Some(Namespace::new(namespace)?)).await
}

async fn open(url: &str, namespace: Option<Namespace>) -> Result<Arc<dyn LockBackend>, Error> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme).ok_or_else(|| Error::InvalidConfig {
        store: "mutextree",
        // Not repeated: it may hold a password.
        reason: "this is not a store URL: write memory://, redis://host:port, ...".to_owned(),
    })?;
    match scheme {
        "memory" => memory(url, namespace),
        "redis" | "rediss" | "redis+unix" | "redis+cluster" | "rediss+cluster" => redis(url, namespace).await,
        "postgres" | "postgresql" => postgres(url, namespace).await,
        "etcd" | "etcds" => etcd(url, namespace).await,
        other => Err(Error::InvalidConfig {
            store: "mutextree",
            reason: format!(
                "unknown store {other}://: the stores are memory://, redis:// (rediss://, redis+cluster://), \
                 postgres:// and etcd://"
            ),
        }),
    }
}

#[cfg(feature = "memory")]
fn memory(url: &str, namespace: Option<Namespace>) -> Result<Arc<dyn LockBackend>, Error> {
    use std::sync::OnceLock;

    use mutextree_core::backend::url::StoreUrl;
    use mutextree_memory::MemoryStore;

    static STORE: OnceLock<MemoryStore> = OnceLock::new();
    let mut read = StoreUrl::parse("memory", url)?;
    if !read.hosts().is_empty() || read.user().is_some() || !matches!(read.path(), "" | "/") {
        return Err(read.invalid("memory:// names no place: write memory://?namespace=NAME"));
    }
    let named = read.take_namespace()?;
    read.finish(&["namespace"])?;
    Ok(Arc::new(STORE.get_or_init(MemoryStore::new).backend(namespace.unwrap_or(named).as_str())?))
}

#[cfg(not(feature = "memory"))]
fn memory(_url: &str, _namespace: Option<Namespace>) -> Result<Arc<dyn LockBackend>, Error> {
    Err(feature_off("memory"))
}

/// `async fn $name(url, namespace)` for a network store: its config from
/// the URL, connected, and the backend of `namespace` (or of the URL's);
/// an error naming the feature when the store is not in the build.
macro_rules! network_store {
    ($name:ident, $feature:literal, $config:path) => {
        #[cfg(feature = $feature)]
        async fn $name(url: &str, namespace: Option<Namespace>) -> Result<Arc<dyn LockBackend>, Error> {
            use $config as Config;
            let config = Config::from_url(url)?;
            let namespace = namespace.unwrap_or_else(|| config.namespace().clone());
            Ok(Arc::new(config.connect().await?.backend(namespace.as_str())?))
        }

        #[cfg(not(feature = $feature))]
        async fn $name(_url: &str, _namespace: Option<Namespace>) -> Result<Arc<dyn LockBackend>, Error> {
            Err(feature_off($feature))
        }
    };
}

network_store!(redis, "redis", mutextree_redis::RedisConfig);
network_store!(postgres, "postgres", mutextree_postgres::PostgresConfig);
network_store!(etcd, "etcd", mutextree_etcd::EtcdConfig);

#[allow(dead_code)] // Used only when some store's feature is off.
fn feature_off(store: &'static str) -> Error {
    Error::InvalidConfig {
        store,
        reason: format!("this build has no {store} store: enable the `{store}` feature of the mutextree crate"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn urls_that_name_no_store_say_so() {
        for (url, says) in [
            ("localhost:6379", "not a store URL"),
            ("mysql://h", "unknown store mysql://"),
            ("memory://elsewhere", "names no place"),
            ("memory://?nmespace=x", "unknown URL parameter"),
            ("memory://?namespace=a%20b", "namespace"),
        ] {
            let error = connect(url).await.expect_err(url);
            assert!(error.to_string().contains(says), "{url}: {error}");
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_urls_of_one_namespace_share_locks() {
        let one = connect("memory://?namespace=shared").await.expect("connect");
        let two = connect("memory:///?namespace=shared").await.expect("connect");
        let other = connect("memory://").await.expect("connect");
        let held = crate::TreeLock::new(one, "a").expect("lock");
        held.acquire().await.expect("free");
        assert!(crate::TreeLock::new(two, "a/b").expect("lock").try_acquire().await.is_err());
        crate::TreeLock::new(other, "a/b").expect("lock").try_acquire().await.expect("another namespace");
    }

    /// How each network store of this build starts a URL, and its name.
    #[allow(dead_code)] // Empty when no network store is enabled.
    fn network_stores() -> Vec<(&'static str, &'static str)> {
        let mut stores = Vec::new();
        if cfg!(feature = "redis") {
            stores.push(("redis://", "redis"));
        }
        if cfg!(feature = "postgres") {
            stores.push(("postgres://someone@", "postgres"));
        }
        if cfg!(feature = "etcd") {
            stores.push(("etcd://", "etcd"));
        }
        stores
    }

    #[tokio::test]
    async fn bad_urls_are_refused_naming_the_culprit_before_dialling() {
        let known = "the known ones are namespace, connect_timeout, request_timeout, ";
        for (start, _) in network_stores() {
            for (rest, says) in [
                ("127.0.0.1:notaport", "port \"notaport\" of host \"127.0.0.1\""),
                ("127.0.0.1:99999", "port \"99999\""),
                ("127.0.0.1:", "nothing after ':'"),
                ("", "the URL names no host"),
                ("127.0.0.1:1?namesapce=x", &format!("unknown URL parameter \"namesapce\"; {known}")),
                ("127.0.0.1:1?connect_timeout=5x", "connect_timeout=\"5x\": write a duration such as 1500ms"),
                ("127.0.0.1:1?namespace=a%20b", "invalid namespace"),
            ] {
                let url = format!("{start}{rest}");
                let error = connect(&url).await.expect_err(&url);
                assert!(
                    matches!(error, Error::InvalidConfig { .. } | Error::InvalidNamespace { .. }),
                    "{url}: {error:?}"
                );
                assert!(!error.is_retryable(), "{url}");
                assert!(error.to_string().contains(says), "{url}: {error}");
            }
        }
        if cfg!(feature = "postgres") {
            let error = connect("postgres://").await.expect_err("no host");
            assert!(matches!(error, Error::InvalidConfig { .. }) && !error.is_retryable(), "{error:?}");
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_within_connect_timeout_naming_it() {
        // Accepts connections, holds them open, and never says a word.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = silent.local_addr().expect("address");
        std::thread::spawn(move || silent.incoming().collect::<Vec<_>>());
        for (start, store) in network_stores() {
            let url = format!("{start}{address}?connect_timeout=300ms");
            let started = std::time::Instant::now();
            let error = connect(&url).await.expect_err(&url);
            let expected = format!("could not connect to {store} at {address} within 300 ms (connect_timeout)");
            assert!(error.to_string().contains(&expected), "{url}: {error}");
            assert!(error.is_retryable(), "{url}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "{url}: {:?}", started.elapsed());
        }
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_address() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address");
        for (start, store) in network_stores() {
            let url = format!("{start}{closed}?connect_timeout=2s");
            let error = connect(&url).await.expect_err(&url);
            assert!(error.to_string().contains(&format!("could not connect to {store} at {closed}")), "{url}: {error}");
            assert!(error.is_retryable(), "{url}: {error:?}");
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn the_namespace_given_replaces_the_urls() {
        let named = connect_with("memory://?namespace=theirs", "mine").await.expect("connect");
        let mine = connect("memory://?namespace=mine").await.expect("connect");
        crate::TreeLock::new(named, "a").expect("lock").acquire().await.expect("free");
        assert!(crate::TreeLock::new(mine, "a/b").expect("lock").try_acquire().await.is_err());
        let error = connect_with("redis://127.0.0.1:notaport", "a b").await.expect_err("bad name");
        assert!(matches!(error, Error::InvalidNamespace { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn a_store_left_out_of_the_build_names_its_feature() {
        for (url, feature, enabled) in [
            ("memory://", "memory", cfg!(feature = "memory")),
            ("redis://127.0.0.1:1", "redis", cfg!(feature = "redis")),
        ] {
            if !enabled {
                let error = connect(url).await.expect_err("feature off");
                assert!(error.to_string().contains(&format!("enable the `{feature}` feature")), "{error}");
            }
        }
    }
}
