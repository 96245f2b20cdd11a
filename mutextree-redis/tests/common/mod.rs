//! The Redis store under test, on the servers of `conformance::servers::redis`.

#![allow(dead_code)] // Each test binary uses part of this.

use std::sync::Arc;

use conformance::servers;
use conformance::TestStore;
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_redis::{RedisBackend, RedisConfig};

/// The store under test: a server (or cluster) URL; every `connect` opens
/// new connections.
pub(crate) struct Redis {
    url: String,
}

impl Redis {
    pub(crate) fn standalone() -> Self {
        Redis { url: servers::redis::url() }
    }

    pub(crate) fn cluster() -> Self {
        Redis { url: servers::redis::cluster_url() }
    }

    pub(crate) async fn backend(&self, namespace: &str) -> Result<RedisBackend, Error> {
        RedisConfig::from_url(&self.url)?.connect().await?.backend(namespace)
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

#[async_trait]
impl TestStore for Redis {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(self.backend(namespace).await?))
    }
}

/// A plain connection to a server, to look behind the backend's back.
pub(crate) async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("connect")
}

/// A script after every part of the prelude (which a script that uses
/// fewer of them may carry as well), for calls by hand.
pub(crate) fn script(body: &str) -> redis::Script {
    let prelude = [
        include_str!("../../src/lua/common.lua"),
        include_str!("../../src/lua/items.lua"),
        include_str!("../../src/lua/the_way.lua"),
        include_str!("../../src/lua/checks.lua"),
    ];
    redis::Script::new(&format!("{}\nbegin(KEYS, ARGV)\n{body}", prelude.join("\n")))
}
