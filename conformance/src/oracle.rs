//! The judge of concurrency runs: a shadow of who holds what.
//!
//! Clients report each grant when its reply arrives and each release before
//! they send it, so the interval the oracle sees always lies inside the
//! interval the store holds the lock. It judges items, not grants: if the
//! store is right, no item of one grant ever coexists with a conflicting
//! item of another (comparable paths, not both Shared); the oracle records
//! every case where one does. It also plays the protected resource of the
//! fencing scheme: every (path, mode) remembers the highest token it
//! accepted, and a grant whose token is not above that of an earlier grant
//! with a conflicting item is a violation too. Shared grants on one path
//! may arrive in any order, so their tokens are not compared.
//!
//! A mode change is reported like a release and a grant: a client changing
//! its grant reports the old one as left before it sends a downgrade (so
//! a reader let in by the downgrade never meets the old Exclusive item in
//! the shadow), and the new one as entered when the reply arrives.

use std::collections::HashMap;
use std::sync::Mutex;

use mutextree_core::{Grant, LockItem, LockPath, Mode};

/// Whether two items of different grants conflict: comparable paths, not
/// both Shared.
pub fn items_conflict(one: &LockItem, other: &LockItem) -> bool {
    one.path.overlaps(&other.path) && one.mode.conflicts_with(other.mode)
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Oracle {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Every item held, with its grant's token.
    holders: Vec<(LockItem, u64)>,
    highest_token: HashMap<(LockPath, Mode), u64>,
    violations: Vec<String>,
    grants: u64,
    /// Grants that entered while another grant held a Shared item on a
    /// comparable path of one of their Shared items.
    shared_overlaps: u64,
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
        let mut conflicting = Vec::new();
        let mut shared_beside = false;
        for item in &grant.items {
            for (held, token) in state.holders.iter().filter(|(held, _)| held.path.overlaps(&item.path)) {
                if items_conflict(held, item) {
                    conflicting.push(format!("{held} (token {token})"));
                } else {
                    shared_beside = true;
                }
            }
        }
        if !conflicting.is_empty() {
            let violation =
                format!("{} granted (token {}) while {} held", grant.items, grant.token, conflicting.join(", "));
            state.violations.push(violation);
        }
        state.shared_overlaps += u64::from(shared_beside);
        let stale: Vec<String> = state
            .highest_token
            .iter()
            .filter(|((path, mode), token)| {
                **token >= grant.token
                    && grant
                        .items
                        .iter()
                        .any(|item| items_conflict(item, &LockItem { path: path.clone(), mode: *mode }))
            })
            .map(|((path, mode), token)| format!("{path} ({mode}) had token {token}"))
            .collect();
        if !stale.is_empty() {
            let violation = format!("{} accepted stale token {}: {}", grant.items, grant.token, stale.join(", "));
            state.violations.push(violation);
        }
        for item in &grant.items {
            let highest = state.highest_token.entry((item.path.clone(), item.mode)).or_default();
            *highest = (*highest).max(grant.token);
            state.holders.push((item.clone(), grant.token));
        }
    }

    /// The client holding `grant` is about to release it (or to change
    /// its mode).
    pub fn exit(&self, grant: &Grant) {
        let mut state = self.state.lock().expect("oracle lock");
        let before = state.holders.len();
        state.holders.retain(|(_, token)| *token != grant.token);
        if before - state.holders.len() != grant.items.len() {
            let violation = format!("{} (token {}) left without having entered", grant.items, grant.token);
            state.violations.push(violation);
        }
    }

    /// How many grants were reported.
    pub fn grants(&self) -> u64 {
        self.state.lock().expect("oracle lock").grants
    }

    /// How many grants entered beside a Shared holder of a comparable
    /// path: evidence that a run let readers share.
    pub fn shared_overlaps(&self) -> u64 {
        self.state.lock().expect("oracle lock").shared_overlaps
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
    use mutextree_core::{LockItems, Owner, Ttl};
    use std::time::Duration;
    use tokio::time::Instant;

    fn grant_of(items: &[(&str, Mode)], token: u64) -> Grant {
        let items = LockItems::new(items.iter().map(|(path, mode)| (LockPath::parse(path).expect("path"), *mode)))
            .expect("items");
        let request =
            LockRequest::of(items, Owner::new("o").expect("owner"), Ttl::new(Duration::from_secs(1)).expect("ttl"));
        Grant::new(&request, LockKind::Lock, token, Duration::from_secs(1), Instant::now())
    }

    fn grant(path: &str, token: u64) -> Grant {
        grant_of(&[(path, Mode::Exclusive)], token)
    }

    fn violates(oracle: &Oracle) -> bool {
        std::panic::catch_unwind(|| oracle.assert_clean()).is_err()
    }

    #[test]
    fn overlapping_holders_are_violations() {
        let oracle = Oracle::new();
        oracle.enter(&grant("A/B", 1));
        oracle.enter(&grant("A/C", 2));
        oracle.assert_clean();
        oracle.enter(&grant("A", 3));
        assert!(violates(&oracle));
    }

    #[test]
    fn stale_tokens_are_violations() {
        let oracle = Oracle::new();
        let first = grant("A", 5);
        oracle.enter(&first);
        oracle.exit(&first);
        oracle.enter(&grant("A/B", 4));
        assert!(violates(&oracle));
    }

    #[test]
    fn shared_holders_share_and_keep_exclusive_ones_out() {
        let oracle = Oracle::new();
        let (reader, below) = (grant_of(&[("A", Mode::Shared)], 2), grant_of(&[("A/B/C", Mode::Shared)], 1));
        oracle.enter(&reader);
        oracle.enter(&below);
        oracle.assert_clean();
        assert_eq!(oracle.shared_overlaps(), 1);
        oracle.exit(&reader);
        oracle.exit(&below);
        oracle.enter(&grant_of(&[("A/B/C", Mode::Exclusive)], 3));
        oracle.assert_clean();

        let oracle = Oracle::new();
        oracle.enter(&grant_of(&[("A", Mode::Shared)], 1));
        oracle.enter(&grant_of(&[("A/B/C", Mode::Exclusive)], 2));
        assert!(violates(&oracle), "Shared on A keeps an Exclusive A/B/C out");
    }

    #[test]
    fn every_item_of_a_grant_is_judged() {
        let oracle = Oracle::new();
        let both = grant_of(&[("A", Mode::Exclusive), ("B", Mode::Shared)], 1);
        oracle.enter(&both);
        oracle.enter(&grant_of(&[("B/x", Mode::Shared)], 2));
        oracle.assert_clean();
        oracle.enter(&grant_of(&[("C", Mode::Exclusive), ("B", Mode::Exclusive)], 3));
        assert!(violates(&oracle), "the second item of a grant conflicts");

        // Tokens rise across conflicting grants, whichever item conflicts.
        let oracle = Oracle::new();
        oracle.enter(&both);
        oracle.exit(&both);
        oracle.enter(&grant_of(&[("B/x", Mode::Shared)], 0));
        oracle.assert_clean();
        oracle.enter(&grant_of(&[("A/y", Mode::Shared)], 0));
        assert!(violates(&oracle), "a token not above the earlier Exclusive A");
    }
}
