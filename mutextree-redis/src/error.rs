//! How the client library's failures become the public
//! [`Error::Store`]: which are worth retrying, and a reply this crate's
//! scripts never give.

use mutextree_core::Error;
use redis::{ErrorKind, RedisError, Value};

/// The store's name in errors.
pub(crate) const STORE: &str = "redis";

/// A client library error as the public one: connection trouble, timeouts,
/// a cluster moving slots and a server busy or starting are worth retrying;
/// wrong credentials, script and protocol errors are not.
pub(crate) fn store_error(error: RedisError) -> Error {
    Error::store(STORE, is_retryable(&error), error)
}

pub(crate) fn is_retryable(error: &RedisError) -> bool {
    match error.kind() {
        ErrorKind::AuthenticationFailed | ErrorKind::Parse | ErrorKind::InvalidClientConfig => false,
        _ => {
            error.is_io_error()
                || error.is_timeout()
                || error.is_connection_dropped()
                || error.is_connection_refusal()
                || error.is_cluster_error()
                || matches!(error.code(), Some("BUSY" | "LOADING" | "MASTERDOWN" | "READONLY"))
        }
    }
}

/// A reply no script of this crate gives: a server or proxy that is not
/// what it seems, or a key of the namespace written by something else.
pub(crate) fn unexpected(value: &Value) -> Error {
    Error::store_message(STORE, false, format!("unexpected reply from a mutextree script: {value:?}"))
}
