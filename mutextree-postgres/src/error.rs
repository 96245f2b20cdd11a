//! How the client's failures become [`Error::Store`]: connection trouble
//! and the server's transient states are retryable, the rest is not.

use deadpool_postgres::PoolError;
use mutextree_core::Error;
use tokio_postgres::error::SqlState;

/// The store's name in errors.
pub(crate) const STORE: &str = "postgres";

/// A failure of one call, before it is mapped.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No connection could be had from the pool.
    Pool(PoolError),
    /// The statement failed, or the connection broke while it ran.
    Query(tokio_postgres::Error),
    /// No answer within the request timeout.
    Timeout(std::time::Duration),
}

impl From<PoolError> for CallError {
    fn from(error: PoolError) -> Self {
        CallError::Pool(error)
    }
}

impl From<tokio_postgres::Error> for CallError {
    fn from(error: tokio_postgres::Error) -> Self {
        CallError::Query(error)
    }
}

impl CallError {
    /// A deadlock between two grants whose advisory keys collided: the
    /// server rolled one back, and the same call can simply be sent again.
    pub(crate) fn is_deadlock(&self) -> bool {
        matches!(self, CallError::Query(error) if error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
    }
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Query(error) => query_error(error),
            CallError::Pool(PoolError::Backend(error)) => query_error(error),
            CallError::Pool(error @ PoolError::Timeout(_)) => Error::store(STORE, true, error),
            CallError::Pool(error) => Error::store(STORE, false, error),
            CallError::Timeout(limit) => Error::store_message(
                STORE,
                true,
                format!("no answer within the request timeout of {}", mutextree_core::backend::human(limit)),
            ),
        }
    }
}

/// A statement's failure: retryable unless the server rejected it for a
/// reason that does not go away by itself.
fn query_error(error: tokio_postgres::Error) -> Error {
    // The client's own text is "db error"; the server's words are one
    // `source()` down.
    let message = mutextree_core::backend::url::with_sources(&error);
    Error::Store { store: STORE, message, retryable: is_retryable(&error), source: Some(Box::new(error)) }
}

/// Whether a statement or connection failure can pass: no answer at all
/// (the connection broke, or never was) or a transient server state.
pub(crate) fn is_retryable(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        None => true,
        Some(code) => is_transient(code),
    }
}

/// SQLSTATEs of a server that is restarting, overloaded or shedding work,
/// and of conflicts that a new attempt resolves.
fn is_transient(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(
        class,
        "08" // connection exception
            | "40" // transaction rollback: serialization failure, deadlock
            | "53" // insufficient resources: too many connections, out of memory
            | "57" // operator intervention: shutdown, cannot connect now, query canceled
            | "58" // system error: I/O error
    ) || *code == SqlState::LOCK_NOT_AVAILABLE
}

/// An answer the store's functions never give: a schema changed by hand,
/// or a server that is not what it seems.
pub(crate) fn unexpected(what: String) -> Error {
    Error::store_message(STORE, false, format!("unexpected answer from the server: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_states_are_retryable() {
        for code in [
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::CONNECTION_FAILURE,
            SqlState::QUERY_CANCELED,
        ] {
            assert!(is_transient(&code), "{code:?}");
        }
        for code in [SqlState::UNDEFINED_FUNCTION, SqlState::INSUFFICIENT_PRIVILEGE, SqlState::SYNTAX_ERROR] {
            assert!(!is_transient(&code), "{code:?}");
        }
    }
}
