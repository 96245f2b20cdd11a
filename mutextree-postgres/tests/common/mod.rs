//! The PostgreSQL store under test, on the servers of
//! `conformance::servers::postgres`.

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
