//! The PostgreSQL store under test, on the servers of
//! `conformance::servers::postgres`, and helpers of the store's own tests.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::sync::Arc;

use conformance::servers::postgres;
use conformance::TestStore;
use mutextree_core::backend::async_trait;
use mutextree_core::{Error, LockBackend};
use mutextree_postgres::PostgresConfig;

/// The PostgreSQL store as the conformance suite's store under test: a
/// fresh backend (its own pool and listening connection) per client.
pub(crate) struct Store;

#[async_trait]
impl TestStore for Store {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        let config = PostgresConfig::from_url(&postgres::url()).expect("url").pool_size(4);
        Ok(Arc::new(config.connect().await?.backend(namespace)?))
    }
}

/// A name no other test uses: `prefix_` and 48 random bits in hex.
pub(crate) fn fresh_name(prefix: &str) -> String {
    format!("{prefix}_{:012x}", fastrand::u64(..1 << 48))
}

/// A plain connection for looking at the server's side of things.
pub(crate) async fn inspector(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}
