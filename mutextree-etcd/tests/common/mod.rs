//! The etcd store under test, on the servers of `conformance::servers::etcd`.

#![allow(dead_code)] // Each test binary uses part of this.

use std::sync::Arc;
use std::time::Duration;

use conformance::servers::etcd;
use conformance::{TestStore, Timing};
use mutextree_core::backend::{async_trait, Listener};
use mutextree_core::{Error, LockBackend};
use mutextree_etcd::{EtcdBackend, EtcdConfig};

/// etcd's time scales. Lease ttls are whole seconds from 2 s, and expired
/// leases are revoked by a sweep about every 500 ms, then committed through
/// raft: a second of slack covers that. A unit of 2 s keeps every ttl the
/// suite asks for a whole number of seconds (the model's `(k + ½)` units
/// are 3, 5 and 7 s), so nothing is rounded.
pub(crate) const TIMING: Timing = Timing { unit: Duration::from_secs(2), slack: Duration::from_secs(1) };

/// A backend on its own connection to `urls`, in `namespace`.
pub(crate) async fn backend(urls: &[String], namespace: &str) -> Result<EtcdBackend, Error> {
    EtcdConfig::new(urls.iter().cloned()).connect().await?.backend(namespace)
}

/// Waits (10 s at most) until the watch behind `listener` is confirmed by
/// the server: from then on, listeners wake on its events, not by polling.
pub(crate) async fn until_watched(listener: &mut Listener) {
    let confirmed = async {
        while !listener.is_notified() {
            listener.changed().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), confirmed).await.expect("the watch starts");
}

/// The store under the conformance suite: a fresh connection per client.
pub(crate) struct Etcd {
    url: String,
}

impl Etcd {
    pub(crate) fn shared() -> Self {
        Etcd { url: etcd::url() }
    }
}

#[async_trait]
impl TestStore for Etcd {
    async fn connect(&self, namespace: &str) -> Result<Arc<dyn LockBackend>, Error> {
        Ok(Arc::new(backend(std::slice::from_ref(&self.url), namespace).await?))
    }

    fn timing(&self) -> Timing {
        TIMING
    }
}
