//! How the client's failures become the public [`Error::Store`]: the
//! server's own words with their gRPC code, and which failures are worth
//! retrying (and so worth trying another member for).

use std::time::Duration;

use mutextree_core::backend::url::connect_timed_out;
use mutextree_core::Error;

/// The store's name in errors.
pub(crate) const STORE: &str = "etcd";

/// etcd's answer to a put naming a lease that does not exist (any more).
pub(crate) fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::NotFound && status.message().contains("lease not found"))
}

/// A client error as the workspace's error.
pub(crate) fn store_error(error: etcd_client::Error) -> Error {
    Error::Store {
        store: STORE,
        message: describe(&error),
        retryable: is_retryable(&error),
        source: Some(Box::new(error)),
    }
}

/// A failure to reach the members at `addresses`: the connect timeout's
/// message if the client ran out of time, the cause otherwise.
pub(crate) fn connect_error(addresses: &str, limit: Duration, error: etcd_client::Error) -> Error {
    let text = describe(&error);
    let timed_out = matches!(&error, etcd_client::Error::GRpcStatus(status)
        if matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled))
        || ["timed out", "Timeout expired", "deadline has elapsed"].iter().any(|said| text.contains(said));
    if timed_out {
        return connect_timed_out(STORE, addresses, limit);
    }
    let retryable = is_retryable(&error);
    Error::Store {
        store: STORE,
        message: format!("could not connect to {STORE} at {addresses}: {text}"),
        retryable,
        source: Some(Box::new(error)),
    }
}

/// What went wrong, in words: the server's message and its gRPC code
/// (`etcdserver: user name not found (InvalidArgument)`) rather than the
/// status's debug form, or the transport error with its causes.
fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            // Then the transport's own words: `Connection refused`.
            let said = format!("{} ({:?})", status.message(), status.code());
            mutextree_core::backend::url::append_sources(said, std::error::Error::source(status))
        }
        other => mutextree_core::backend::url::with_sources(other),
    }
}

/// Whether an error can pass: a lost connection, a timeout, no leader
/// (during an election) or an overloaded server can; a refused permission or
/// a malformed request cannot.
pub(crate) fn is_retryable(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) | etcd_client::Error::WatchError(_) => {
            true
        }
        _ => false,
    }
}
