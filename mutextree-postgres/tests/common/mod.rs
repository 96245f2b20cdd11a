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

/// The released migrations, in order, as the crate's files hold them.
pub(crate) const RELEASED: [&str; 9] = [
    include_str!("../../src/migrations/0001_locks_and_functions.sql"),
    include_str!("../../src/migrations/0002_generic_plans.sql"),
    include_str!("../../src/migrations/0003_listeners.sql"),
    include_str!("../../src/migrations/0004_try_locks_first.sql"),
    include_str!("../../src/migrations/0005_modes_and_items.sql"),
    include_str!("../../src/migrations/0006_fair_waiting.sql"),
    include_str!("../../src/migrations/0007_one_exclusive_item_and_waited.sql"),
    include_str!("../../src/migrations/0008_leaner_grant_and_release.sql"),
    include_str!("../../src/migrations/0009_grant_exclusive.sql"),
];

/// A released migration's text for `schema`, as the crate fills it in.
pub(crate) fn released(template: &str, schema: &str) -> String {
    template
        .replace("{schema}", &format!("\"{schema}\""))
        .replace("{channel}", &format!("{schema}_changes"))
        .replace("{schema_name}", schema)
}

/// Creates `schema` as versions 1 to `version` made it, each step's text
/// exactly as released, and records that version.
pub(crate) async fn install_released(client: &tokio_postgres::Client, schema: &str, version: usize) {
    let mut install = format!(
        "CREATE SCHEMA \"{schema}\"; CREATE TABLE \"{schema}\".schema_version ( \
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), version integer NOT NULL); \
         INSERT INTO \"{schema}\".schema_version (version) VALUES ({version});"
    );
    for step in &RELEASED[..version] {
        install.push_str(&released(step, schema));
    }
    client.batch_execute(&install).await.unwrap_or_else(|error| panic!("version {version}: {error}"));
}

/// How many deadlocks the server of `client` broke, once every other
/// client session but `kept` has ended (a session reports its statistics
/// when it ends).
pub(crate) async fn deadlocks_once_sessions_end(client: &tokio_postgres::Client, kept: i64) -> i64 {
    let others =
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
    let started = tokio::time::Instant::now();
    while client.query_one(others, &[]).await.expect("activity").get::<_, i64>(0) > kept {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the clients' sessions never ended");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    client
        .query_one("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()", &[])
        .await
        .expect("statistics")
        .get::<_, i64>(0)
}

/// The backend of the namespace `app` of `schema`, once its first client
/// has migrated the schema, which is then at the current version; and the
/// locks it lists, as (path, mode, token).
pub(crate) async fn migrated(
    url: &str,
    schema: &str,
    client: &tokio_postgres::Client,
) -> (mutextree_postgres::PostgresBackend, Vec<(String, mutextree_core::Mode, u64)>) {
    let config = PostgresConfig::from_url(url).expect("url").schema(schema);
    let backend = config.connect().await.expect("migrate").backend("app").expect("namespace");
    let version = client.query_one(&format!("SELECT version FROM \"{schema}\".schema_version"), &[]).await;
    assert_eq!(version.expect("version").get::<_, i32>(0), 9);
    let held = backend.list(None).await.expect("list");
    let held = held.iter().map(|lock| (lock.path.to_string(), lock.mode, lock.token)).collect();
    (backend, held)
}
