//! The Redis store under test, on the servers of `conformance::servers::redis`.

#![allow(dead_code)] // Each test binary uses part of this.

use std::sync::Arc;
use std::time::Duration;

use conformance::servers;
use conformance::TestStore;
use futures::{Stream, StreamExt};
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

/// The calls of `commands` (of every command for `None`; the scripts' own
/// included) the server ran since its last `CONFIG RESETSTAT`.
pub(crate) async fn command_calls(raw: &mut redis::aio::MultiplexedConnection, commands: Option<&[&str]>) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await.expect("info");
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_")?.split_once(":calls="))
        .filter(|(command, _)| commands.is_none_or(|wanted| wanted.contains(command)))
        .map(|(_, rest)| rest.split(',').next().and_then(|n| n.parse::<u64>().ok()).expect("calls"))
        .sum()
}

/// The messages of the release channel of the namespace of `keys`, on
/// which its releases (and downgrades, withdrawals) publish from now on,
/// as they do while a subscribed backend says it listens (see the listen
/// script).
pub(crate) async fn announced(store: &Redis, keys: &[String]) -> impl Stream<Item = redis::Msg> {
    let mut raw = raw(store.url()).await;
    let forever = u64::MAX / 4096;
    let _: () =
        redis::cmd("HSET").arg(&keys[0]).arg("listened").arg(forever).query_async(&mut raw).await.expect("hset");
    let mut subscription = redis::Client::open(store.url()).expect("url").get_async_pubsub().await.expect("pubsub");
    subscription.subscribe(keys[0].replace(":locks", ":released")).await.expect("subscribe");
    subscription.into_on_message()
}

/// The next `count` messages' texts.
pub(crate) async fn heard(messages: &mut (impl Stream<Item = redis::Msg> + Unpin), count: usize) -> Vec<String> {
    let mut heard = Vec::new();
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.expect("a message");
        heard.push(message.expect("subscribed").get_payload::<String>().expect("text"));
    }
    heard
}

/// `{1, token, ttl}`, `{0, rows...}` or `{2, ticket, rows...}` as (kind,
/// token or ticket).
pub(crate) fn answer(reply: &redis::Value) -> (i64, i64) {
    match reply {
        redis::Value::Array(fields) => match fields.as_slice() {
            [redis::Value::Int(kind @ (1 | 2)), redis::Value::Int(number), ..] => (*kind, *number),
            [redis::Value::Int(0), ..] => (0, 0),
            other => panic!("unexpected reply {other:?}"),
        },
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Each case as a test on the standalone server and on the cluster.
#[allow(unused_macros)] // Each test binary uses part of this.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Redis::standalone()).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Redis::cluster()).await
                }
            )*
        }
    };
}

#[allow(unused_imports)] // Each test binary uses part of this.
pub(crate) use on_both;
