//! What a lock's life reports on the Redis store, through a test
//! subscriber and recorder (`conformance::telemetry`), in a test binary of
//! its own (see there why).

mod common;

use std::sync::Arc;
use std::time::Duration;

use conformance::harness::temp_dir;
use conformance::servers;
use mutextree_core::{Error, LockBackend, TreeLock};
use mutextree_redis::RedisConfig;

#[test]
fn granted_refused_and_released() {
    conformance::telemetry::granted_refused_and_released(common::Redis::standalone(), false);
}

/// A store that stops answering, seen from the telemetry: an acquisition
/// fails with a store error (outcome `error`, counted under `acquire`),
/// the kept lock's refreshes fail (counted under `refresh`) until it is
/// lost to the unreachable store (reason `store_unreachable`), and the
/// revocation channel its holder listened on goes down.
#[test]
fn a_store_that_stops_answering_is_counted_and_a_kept_lock_lost_to_it() {
    use conformance::telemetry::observe;

    let data = temp_dir("redis-telemetry").expect("temp dir");
    let server = servers::redis::own_server(None, &[], &data).expect("redis-server");
    let url = format!("redis://127.0.0.1:{}/?request_timeout=300ms&connect_timeout=300ms", server.port);
    let server = std::sync::Mutex::new(Some(server));
    let seen = observe(false, || async {
        let store: Arc<dyn LockBackend> = Arc::new(
            RedisConfig::from_url(&url).expect("url").connect().await.expect("connect").backend("t").expect("ns"),
        );
        let kept = TreeLock::builder(store.clone(), "site/kept").ttl(Duration::from_secs(3)).auto_refresh(true).build();
        let kept = kept.expect("lock");
        let grant = kept.try_acquire().await.expect("granted");
        // A holder that listens for revocations brings their channel up.
        store.listen_revocation(&grant).ready().await;
        server.lock().expect("server").take().expect("running").stop();
        let late = TreeLock::new(store.clone(), "site/late").expect("lock");
        assert!(matches!(late.try_acquire().await, Err(Error::Store { .. })));
        assert!(matches!(kept.lost().await, Error::Lost { .. }));
    });
    let labels = |operation| [("store", "redis"), ("operation", operation)];
    assert!(seen.counter("mutextree_store_errors_total", &labels("acquire")) >= 1, "{seen:#?}");
    assert!(seen.counter("mutextree_store_errors_total", &labels("refresh")) >= 1, "{seen:#?}");
    let failed = seen.spans("acquire")[1];
    assert_eq!(failed.field("outcome"), "error", "{failed:?}");
    assert!(failed.field("error").starts_with("redis store error"), "{failed:?}");
    assert!(seen.spans("refresh").iter().all(|span| span.field("outcome") == "error"), "{seen:#?}");
    let lost = seen.span("lost");
    assert_eq!(lost.field("reason"), "store_unreachable", "{lost:?}");
    // The store's own events: its notification channel came and went.
    let notices = seen.spans("notifications");
    assert!(notices.iter().all(|span| span.field("store") == "redis" && span.field("namespace") == "t"), "{notices:?}");
    let channel: Vec<_> = seen.events.iter().filter(|event| event.span == Some("notifications")).collect();
    let said: Vec<&str> = channel.iter().map(|event| event.field("message")).collect();
    assert!(said.contains(&"revocation notices up") && said.contains(&"revocation notices down"), "{said:?}");
    assert_eq!(seen.counter("mutextree_lost_total", &[("store", "redis"), ("reason", "store_unreachable")]), 1);
}
