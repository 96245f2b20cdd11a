//! One URL picks the store: configuration files and the command line name a
//! store without code that knows which one it is.

use std::sync::Arc;

use mutextree_core::{Error, LockBackend};

/// Connects to the store a URL names.
///
/// | URL | store | feature |
/// | --- | --- | --- |
/// | `memory://` | this process's memory store (all `memory://` connections of a process share it) | `memory` |
/// | `redis://`, `rediss://`, `redis+unix://`, `redis+cluster://`, `rediss+cluster://` | Redis, see `mutextree_redis::RedisOptions::from_url` | `redis` (`redis-tls` for TLS) |
/// | `postgres://`, `postgresql://` | PostgreSQL, see `mutextree_postgres::PostgresConfig::from_url` | `postgres` (`postgres-tls`) |
/// | `etcd://host:port[,host:port...]`, `etcds://` | etcd, see `mutextree_etcd::EtcdConfig::from_url` | `etcd` (`etcd-tls`) |
///
/// Every URL takes `?namespace=NAME` (default `mutextree`); each store's
/// own options come from the rest of the query, as its documentation says.
/// A URL for a store whose feature is off is an error naming the feature.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mutextree::Error> {
/// let store = mutextree::connect("memory://?namespace=tests").await?;
/// let lock = mutextree::TreeLock::new(store, "eu-west/rack-12")?;
/// lock.acquire().await?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme).ok_or_else(|| Error::InvalidConfig {
        store: "mutextree",
        // Not repeated: it may hold a password.
        reason: "this is not a store URL: write memory://, redis://host:port, ...".to_owned(),
    })?;
    match scheme {
        "memory" => memory(url),
        "redis" | "rediss" | "redis+unix" | "redis+cluster" | "rediss+cluster" => redis(url).await,
        "postgres" | "postgresql" => postgres(url).await,
        "etcd" | "etcds" => etcd(url).await,
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
fn memory(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    use std::sync::OnceLock;

    use mutextree_memory::MemoryStore;

    static STORE: OnceLock<MemoryStore> = OnceLock::new();
    let invalid = |reason: String| Error::InvalidConfig { store: "memory", reason };
    let rest = url.strip_prefix("memory://").unwrap_or_default();
    let (place, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !place.is_empty() && place != "/" {
        return Err(invalid(format!("memory:// names no place ({place:?}): write memory://?namespace=NAME")));
    }
    let mut namespace = mutextree_core::Namespace::default().as_str().to_owned();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "namespace" => namespace = value.into_owned(),
            _ => return Err(invalid(format!("unknown URL parameter {name:?}: memory:// takes only namespace"))),
        }
    }
    Ok(Arc::new(STORE.get_or_init(MemoryStore::new).namespace(&namespace)?))
}

#[cfg(not(feature = "memory"))]
fn memory(_url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    Err(feature_off("memory"))
}

#[cfg(feature = "redis")]
async fn redis(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    Ok(Arc::new(mutextree_redis::RedisBackend::connect(url).await?))
}

#[cfg(not(feature = "redis"))]
async fn redis(_url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    Err(feature_off("redis"))
}

#[cfg(feature = "postgres")]
async fn postgres(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    let config = mutextree_postgres::PostgresConfig::from_url(url)?;
    Ok(Arc::new(mutextree_postgres::PostgresBackend::connect(&config).await?))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    Err(feature_off("postgres"))
}

#[cfg(feature = "etcd")]
async fn etcd(url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    let (config, namespace) = mutextree_etcd::EtcdConfig::from_url(url)?;
    Ok(Arc::new(mutextree_etcd::EtcdStore::connect(config).await?.namespace(&namespace)?))
}

#[cfg(not(feature = "etcd"))]
async fn etcd(_url: &str) -> Result<Arc<dyn LockBackend>, Error> {
    Err(feature_off("etcd"))
}

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
