//! Failing over between the cluster's members.
//!
//! etcd-client spreads requests over all its endpoints, a dead one
//! included: with one member of three killed, about a third of all
//! requests fail, and a grant needs several in a row. Like etcd's own Go
//! client, this store instead sends every request to one member at a time
//! (each member has its own connection) and moves on to the next as soon as
//! a request to it fails in a way another member may not (a lost
//! connection, a timeout, no leader). The failed request is still an error
//! to its caller, because a write may have been applied before the reply was
//! lost; the next one goes elsewhere.
//!
//! The backend and its watch (the feed module) both send through here;
//! this module knows neither of them.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_client::{Client, KvClient, LeaseClient, WatchClient};

use crate::error::is_retryable;

/// One connection per member, and the member in use.
pub(crate) struct Members {
    clients: Vec<Client>,
    current: AtomicUsize,
}

impl Members {
    /// `clients` must not be empty.
    pub(crate) fn new(clients: Vec<Client>) -> Self {
        assert!(!clients.is_empty(), "a cluster has at least one member");
        // Clients of one store start on different members, spreading load.
        let current = AtomicUsize::new(fastrand::usize(..clients.len()));
        Members { clients, current }
    }

    /// A key-value request to the member in use.
    pub(crate) async fn kv<T, F, Fut>(&self, call: F) -> Result<T, etcd_client::Error>
    where
        F: FnOnce(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.request(Client::kv_client, call).await
    }

    /// A lease request to the member in use.
    pub(crate) async fn lease<T, F, Fut>(&self, call: F) -> Result<T, etcd_client::Error>
    where
        F: FnOnce(LeaseClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.request(Client::lease_client, call).await
    }

    /// `call` with the service `service` picks from the member in use; a
    /// retryable failure moves on to the next member.
    async fn request<S, T, F, Fut>(&self, service: fn(&Client) -> S, call: F) -> Result<T, etcd_client::Error>
    where
        F: FnOnce(S) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let member = self.current();
        let outcome = call(service(&self.clients[member])).await;
        if outcome.as_ref().is_err_and(is_retryable) {
            self.failed(member);
        }
        outcome
    }

    /// A watch client of the member in use, and the member, for
    /// [`Members::failed`] when the stream breaks.
    pub(crate) fn watch(&self) -> (usize, WatchClient) {
        let member = self.current();
        (member, self.clients[member].watch_client())
    }

    /// Moves on from `member` to the next one, unless another request
    /// already did.
    pub(crate) fn failed(&self, member: usize) {
        let next = (member + 1) % self.clients.len();
        let _ = self.current.compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
}
