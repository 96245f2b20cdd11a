//! The one public error type.
//!
//! Every fallible call of every crate in the workspace returns [`Error`].
//! Stores keep their own client errors private and map them into
//! [`Error::Store`], saying whether a retry can help. Messages are meant to
//! be read by a person: what blocked and for how long, or which rule an input
//! broke.

use std::error::Error as StdError;
use std::time::Duration;

use crate::lock::{Blockers, Grant, HeldLock, LockItems, Mode, Owner};
use crate::path::PathRule;
use crate::text::human;

/// What can go wrong with a tree lock.
///
/// Every message names what went wrong and, where there is one, the lock in
/// the way; [`Error::is_retryable`] tells a busy lock or a store hiccup from
/// bad input.
///
/// ```
/// # use std::sync::Arc;
/// # use mutextree_core::{Error, LockBackend, TreeLock};
/// # async fn demo(store: Arc<dyn LockBackend>) -> Result<(), Error> {
/// let host = TreeLock::new(store, ["eu-west", "rack-12", "host-7"])?;
/// match host.try_acquire().await {
///     Ok(grant) => println!("patching under token {}", grant.token),
///     Err(Error::Refused { blockers, .. }) => {
///         let blocker = blockers.first();
///         println!("{} holds {} for {:?} more", blocker.owner, blocker.path, blocker.remaining)
///     }
///     Err(error) if error.is_retryable() => println!("try again later: {error}"),
///     Err(error) => return Err(error),
/// }
/// assert!(matches!(TreeLock::new(host.backend().clone(), ""), Err(Error::InvalidPath { .. })));
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A path broke one of the rules of [`LockPath`](crate::LockPath); nothing was sent.
    #[error("invalid lock path {input}: {rule}")]
    InvalidPath {
        /// The rejected input, shortened for display.
        input: String,
        /// The rule it broke.
        rule: PathRule,
    },

    /// A ttl outside the accepted range; nothing was sent.
    #[error("invalid ttl {}: {reason}", human(*.ttl))]
    InvalidTtl {
        /// The rejected ttl.
        ttl: Duration,
        /// The rule it broke.
        reason: String,
    },

    /// An owner id that is empty, too long or not printable; nothing was sent.
    #[error("invalid owner id {owner}: {reason}")]
    InvalidOwner {
        /// The rejected owner id, shortened for display.
        owner: String,
        /// The rule it broke.
        reason: String,
    },

    /// A namespace name a store cannot use; nothing was sent.
    #[error("invalid namespace {namespace}: {reason}")]
    InvalidNamespace {
        /// The rejected name, shortened for display.
        namespace: String,
        /// The rule it broke.
        reason: String,
    },

    /// A store's configuration (URL, option) is unusable.
    #[error("invalid {store} configuration: {reason}")]
    InvalidConfig {
        /// The store: `memory`, `redis`, `postgres`, `etcd`.
        store: &'static str,
        /// What is wrong, and what would be right.
        reason: String,
    },

    /// The items of a request are unusable together (none, too many, or
    /// two on one branch with different modes); nothing was sent.
    #[error("invalid lock request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },

    /// The store cannot grant this request in one atomic step (Shared or
    /// multi-path items on a store seen through the stepwise algorithm, or
    /// a request larger than the store accepts); nothing was sent.
    #[error("the {store} store cannot do this: {reason}")]
    Unsupported {
        /// The store: `stepwise`, `etcd`, ...
        store: &'static str,
        /// What it cannot do, and what would work instead.
        reason: String,
    },

    /// A non-blocking acquisition found a conflicting live item on a path,
    /// an ancestor or a descendant of one of its items.
    #[error("lock on {items} refused: {}", describe_blockers(items, blockers))]
    Refused {
        /// What was asked for.
        items: LockItems,
        /// A live item in the way of each blocked item.
        blockers: Blockers,
    },

    /// A blocking acquisition waited as long as it was allowed to.
    #[error("lock on {items} not granted after waiting {}: {}", human(*waited), describe_blockers(items, blockers))]
    Timeout {
        /// What was asked for.
        items: LockItems,
        /// How long the acquisition waited.
        waited: Duration,
        /// The last live items seen in the way.
        blockers: Blockers,
    },

    /// The handle already holds its lock; tree locks are not re-entrant.
    #[error("this handle already holds {items}; tree locks are not re-entrant, release it first")]
    AlreadyHeld {
        /// What the handle holds.
        items: LockItems,
    },

    /// Release, refresh or a mode change of a grant that is not live: it
    /// expired, was released, was taken over, or was never granted. Nothing
    /// was changed.
    #[error("{}", describe_not_held(items, owner.as_ref(), *token))]
    NotHeld {
        /// The items of the grant.
        items: LockItems,
        /// Its owner id, if a grant existed.
        owner: Option<Owner>,
        /// Its fencing token, if a grant existed.
        token: Option<u64>,
    },

    /// Automatic refresh could not keep the lock: the store refused the
    /// refresh, or stayed unreachable until the lock's ttl ran out; or the
    /// lock was released by force ([`LockBackend::revoke`](crate::LockBackend::revoke)).
    #[error("lock on {items} was lost: {reason}")]
    Lost {
        /// The items of the lost grant.
        items: LockItems,
        /// Why it was lost.
        reason: String,
    },

    /// The store failed: unreachable, timed out, or answered something
    /// unexpected. Whether the operation took effect is unknown unless the
    /// message says otherwise; a grant it may have made expires at its ttl.
    #[error("{store} store error: {message}")]
    Store {
        /// The store: `memory`, `redis`, `postgres`, `etcd`.
        store: &'static str,
        /// What failed.
        message: String,
        /// Whether trying again later can succeed (connection loss, timeout)
        /// or not (a protocol or permission error).
        retryable: bool,
        /// The client library's error, if any.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },
}

impl Error {
    pub(crate) fn invalid_path(input: &str, rule: PathRule) -> Self {
        Error::InvalidPath { input: input.to_owned(), rule }
    }

    /// A store error from a client library's error.
    pub fn store(store: &'static str, retryable: bool, source: impl StdError + Send + Sync + 'static) -> Self {
        Error::Store { store, message: source.to_string(), retryable, source: Some(Box::new(source)) }
    }

    /// A store error with a message only.
    pub fn store_message(store: &'static str, retryable: bool, message: impl Into<String>) -> Self {
        Error::Store { store, message: message.into(), retryable, source: None }
    }

    /// [`Error::NotHeld`] for a grant the store found not live: what a
    /// store's release or refresh returns.
    pub fn not_held(grant: &Grant) -> Self {
        Error::NotHeld { items: grant.items.clone(), owner: Some(grant.owner.clone()), token: Some(grant.token) }
    }

    /// Whether trying the same call again later may succeed: a lock that
    /// was held (refused, timed out) or a store that was unreachable.
    /// Invalid input never becomes valid.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Refused { .. } | Error::Timeout { .. } => true,
            Error::Store { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The live items that blocked an acquisition, for refusals and
    /// timeouts.
    pub fn blockers(&self) -> Option<&Blockers> {
        match self {
            Error::Refused { blockers, .. } | Error::Timeout { blockers, .. } => Some(blockers),
            _ => None,
        }
    }

    /// The first live item that blocked an acquisition, for refusals and
    /// timeouts.
    pub fn blocker(&self) -> Option<&HeldLock> {
        self.blockers().map(Blockers::first)
    }
}

/// "its ancestor A/B is held by "web-1" for 29.8 s more (fencing token
/// 17)", and for a multi-path request, one such clause per blocked item.
fn describe_blockers(items: &LockItems, blockers: &Blockers) -> String {
    let clauses: Vec<String> = blockers.iter().map(|blocker| describe_blocker(items, blocker)).collect();
    clauses.join("; ")
}

fn describe_blocker(items: &LockItems, blocker: &HeldLock) -> String {
    let asked = items.blocked_by(&blocker.path, blocker.mode).unwrap_or(items.first());
    let path = &asked.path;
    let which = if items.len() > 1 { format!("{path}: ") } else { String::new() };
    let whose = if blocker.path == *path {
        format!("{which}it is held")
    } else if blocker.path.is_ancestor_of(path) {
        format!("{which}its ancestor {} is held", blocker.path)
    } else {
        format!("{which}its descendant {} is held", blocker.path)
    };
    let mode = if blocker.mode == Mode::Shared { " shared" } else { "" };
    if blocker.waiting {
        let whose = whose.replace(" is held", " is awaited");
        return format!("{whose}{mode} by {}, who queued first (ticket {})", blocker.owner, blocker.token);
    }
    let transient = if blocker.transient { ", a parent lock a stepwise client holds for a moment" } else { "" };
    format!(
        "{whose}{mode} by {} for {} more (fencing token {}{transient})",
        blocker.owner,
        human(blocker.remaining),
        blocker.token
    )
}

fn describe_not_held(items: &LockItems, owner: Option<&Owner>, token: Option<u64>) -> String {
    match (owner, token) {
        (Some(owner), Some(token)) => format!(
            "{items} is not held by owner {owner} with fencing token {token}: the lock expired, \
             was released, or belongs to someone else"
        ),
        _ => format!("{items} is not held by this handle: acquire it first"),
    }
}
