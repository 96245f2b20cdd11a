//! The judge of concurrency runs: a shadow of who holds what.
//!
//! Clients report each grant when its reply arrives and each release before
//! they send it, so the interval the oracle sees always lies inside the
//! interval the store holds the lock. If the store is right, no two
//! intervals on overlapping paths ever intersect; the oracle records every
//! case where they do. It also plays the protected resource of the fencing
//! scheme: every node remembers the highest token it accepted, and a holder
//! whose token is not higher than that of an earlier holder of an
//! overlapping path is a violation too.

use std::collections::HashMap;
use std::sync::Mutex;

use mutextree_core::{Grant, LockPath};

/// See the module docs.
#[derive(Debug, Default)]
pub struct Oracle {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    holders: Vec<(LockPath, u64)>,
    highest_token: HashMap<LockPath, u64>,
    violations: Vec<String>,
    grants: u64,
}

impl Oracle {
    /// An oracle with no holders.
    pub fn new() -> Self {
        Oracle::default()
    }

    /// A client now holds `grant`.
    pub fn enter(&self, grant: &Grant) {
        let mut state = self.state.lock().expect("oracle lock");
        state.grants += 1;
        let overlapping: Vec<String> = state
            .holders
            .iter()
            .filter(|(path, _)| path.overlaps(grant.path()))
            .map(|(path, token)| format!("{path} (token {token})"))
            .collect();
        if !overlapping.is_empty() {
            let violation =
                format!("{} granted (token {}) while {} held", grant.path(), grant.token, overlapping.join(", "));
            state.violations.push(violation);
        }
        let stale: Vec<String> = state
            .highest_token
            .iter()
            .filter(|(path, token)| path.overlaps(grant.path()) && **token >= grant.token)
            .map(|(path, token)| format!("{path} had token {token}"))
            .collect();
        if !stale.is_empty() {
            let violation = format!("{} accepted stale token {}: {}", grant.path(), grant.token, stale.join(", "));
            state.violations.push(violation);
        }
        state.highest_token.insert(grant.path().clone(), grant.token);
        state.holders.push((grant.path().clone(), grant.token));
    }

    /// The client holding `grant` is about to release it.
    pub fn exit(&self, grant: &Grant) {
        let mut state = self.state.lock().expect("oracle lock");
        let before = state.holders.len();
        state.holders.retain(|(path, token)| !(path == grant.path() && *token == grant.token));
        if state.holders.len() == before {
            let violation = format!("{} (token {}) left without having entered", grant.path(), grant.token);
            state.violations.push(violation);
        }
    }

    /// How many grants were reported.
    pub fn grants(&self) -> u64 {
        self.state.lock().expect("oracle lock").grants
    }

    /// Panics with every violation seen, if any.
    pub fn assert_clean(&self) {
        let state = self.state.lock().expect("oracle lock");
        assert!(
            state.violations.is_empty(),
            "{} violations in {} grants, first ones:\n{}",
            state.violations.len(),
            state.grants,
            state.violations.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mutextree_core::backend::{LockKind, LockRequest};
    use mutextree_core::{Owner, Ttl};
    use std::time::Duration;
    use tokio::time::Instant;

    fn grant(path: &str, token: u64) -> Grant {
        let request = LockRequest::new(
            LockPath::parse(path).expect("path"),
            Owner::new("o").expect("owner"),
            Ttl::new(Duration::from_secs(1)).expect("ttl"),
        );
        Grant::new(&request, LockKind::Lock, token, Duration::from_secs(1), Instant::now())
    }

    #[test]
    fn overlapping_holders_are_violations() {
        let oracle = Oracle::new();
        oracle.enter(&grant("A/B", 1));
        oracle.enter(&grant("A/C", 2));
        oracle.assert_clean();
        oracle.enter(&grant("A", 3));
        assert!(std::panic::catch_unwind(|| oracle.assert_clean()).is_err());
    }

    #[test]
    fn stale_tokens_are_violations() {
        let oracle = Oracle::new();
        let first = grant("A", 5);
        oracle.enter(&first);
        oracle.exit(&first);
        oracle.enter(&grant("A/B", 4));
        assert!(std::panic::catch_unwind(|| oracle.assert_clean()).is_err());
    }
}
