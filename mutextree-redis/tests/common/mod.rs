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
        include_str!("../../src/lua/queue.lua"),
    ];
    redis::Script::new(&format!("{}\nbegin(KEYS, ARGV)\n{body}", prelude.join("\n")))
}

/// The fields of a hash, or the members of a sorted set, of the namespace,
/// read behind the backend's back (from the cluster's node for its slot).
pub(crate) async fn raw_members(store: &Redis, key: &str) -> Vec<String> {
    let url = store.url();
    let command = |kind: &str| match kind {
        "hash" => redis::cmd("HKEYS").arg(key).clone(),
        _ => redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).clone(),
    };
    let mut members: Vec<String> = match url.strip_prefix("redis+cluster://") {
        Some(nodes) => {
            let nodes: Vec<String> = nodes.split(',').map(|node| format!("redis://{node}/")).collect();
            let client = redis::cluster::ClusterClient::new(nodes).expect("cluster");
            let mut raw = client.get_async_connection().await.expect("connect");
            let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut raw).await.expect("type");
            command(&kind).query_async(&mut raw).await.expect("members")
        }
        None => {
            let mut raw = raw(url).await;
            let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut raw).await.expect("type");
            command(&kind).query_async(&mut raw).await.expect("members")
        }
    };
    members.sort();
    members
}
