//! The keys and values this store writes, shared by native grants and the
//! stepwise primitives so that both kinds of client see each other's locks.
//!
//! * **Key**: `<prefix>/<namespace>/` followed by [`LockPath::key`]. The
//!   path key ends every segment with `/`, so the subtree of `[A, B]` is the
//!   range `[…/A/B/, …/A/B0)` and never holds `[A, BC]`; prefix and
//!   namespace cannot contain `/`, so two namespaces (or prefixes) never
//!   share a key.
//! * **Value**: one byte for the kind (`L` a lock, `T` a stepwise client's
//!   transient parent lock), then the owner id. It never changes while the
//!   grant lives (a refresh re-puts the same bytes on a new lease), so
//!   release and refresh compare it exactly, together with the key's create
//!   revision (the fencing token), in one transaction.
//! * **Lease**: one per lock, its ttl the lock's. Expiry, revocation and
//!   deletion all remove the key, which is what etcd's watch reports.

use mutextree_core::backend::LockKind;
use mutextree_core::{Error, LockPath, Owner};

use crate::error::STORE;

/// The key space of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// `<prefix>/<namespace>/`: every key of the namespace starts with it.
    namespace_prefix: String,
}

impl Layout {
    pub(crate) fn new(prefix: &str, namespace: &str) -> Self {
        Layout { namespace_prefix: format!("{prefix}/{namespace}/") }
    }

    /// The key of a node's lock.
    pub(crate) fn key(&self, path: &LockPath) -> String {
        self.with_prefix(path.key())
    }

    /// The keys of a node's strict ancestors, root first.
    pub(crate) fn ancestor_keys(&self, path: &LockPath) -> Vec<String> {
        path.ancestor_keys().map(|key| self.with_prefix(key)).collect()
    }

    /// The half-open key range of a node and all its descendants.
    pub(crate) fn subtree(&self, path: &LockPath) -> (String, String) {
        (self.key(path), self.with_prefix(&path.key_range_end()))
    }

    /// The half-open key range of the whole namespace (its prefix, whose
    /// final `/` becomes `0`, the next character).
    pub(crate) fn namespace(&self) -> (String, String) {
        let start = self.namespace_prefix.clone();
        let mut end = start.clone();
        end.pop();
        end.push('0');
        (start, end)
    }

    /// The prefix every key of the namespace starts with (for the watch).
    pub(crate) fn namespace_prefix(&self) -> &str {
        &self.namespace_prefix
    }

    /// The path a key of this namespace names.
    pub(crate) fn path_of(&self, key: &[u8]) -> Result<LockPath, Error> {
        let key = std::str::from_utf8(key).map_err(|_| foreign("a key that is not UTF-8"))?;
        let path_key = key.strip_prefix(&*self.namespace_prefix).ok_or_else(|| foreign(&format!("the key {key:?}")))?;
        LockPath::from_key(path_key).map_err(|_| foreign(&format!("the key {key:?}")))
    }

    fn with_prefix(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.namespace_prefix.len() + key.len());
        full.push_str(&self.namespace_prefix);
        full.push_str(key);
        full
    }
}

const LOCK: u8 = b'L';
const TRANSIENT: u8 = b'T';

/// The value stored under a lock's key.
pub(crate) fn encode_value(kind: LockKind, owner: &Owner) -> Vec<u8> {
    let tag = match kind {
        LockKind::Lock => LOCK,
        LockKind::Transient => TRANSIENT,
    };
    let mut value = Vec::with_capacity(1 + owner.as_str().len());
    value.push(tag);
    value.extend_from_slice(owner.as_str().as_bytes());
    value
}

/// Whether a stored lock is transient, and its owner.
pub(crate) fn decode_value(value: &[u8]) -> Result<(bool, Owner), Error> {
    let (transient, owner) = match value.split_first() {
        Some((&LOCK, owner)) => (false, owner),
        Some((&TRANSIENT, owner)) => (true, owner),
        _ => return Err(foreign("a value that is not a lock record")),
    };
    let owner = std::str::from_utf8(owner).map_err(|_| foreign("an owner id that is not UTF-8"))?;
    let owner = Owner::new(owner).map_err(|_| foreign("an invalid owner id"))?;
    Ok((transient, owner))
}

/// Something under the namespace's prefix that this store did not write.
fn foreign(what: &str) -> Error {
    Error::store_message(
        STORE,
        false,
        format!("found {what} under the namespace's key prefix; another program writes there, choose another prefix"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> LockPath {
        LockPath::parse(text).expect("path")
    }

    #[test]
    fn keys_keep_prefixes_apart() {
        let layout = Layout::new("mt", "app");
        assert_eq!(layout.key(&path("A/B")), "mt/app/A/B/");
        assert_eq!(layout.ancestor_keys(&path("A/B/C")), ["mt/app/A/", "mt/app/A/B/"]);
        let (start, end) = layout.subtree(&path("A/B"));
        let inside = |key: &str| start.as_str() <= key && key < end.as_str();
        assert!(inside(&layout.key(&path("A/B"))));
        assert!(inside(&layout.key(&path("A/B/C/D"))));
        assert!(!inside(&layout.key(&path("A/BC"))));
        assert!(!inside(&layout.key(&path("A/B C"))));
        assert!(!inside(&layout.key(&path("A"))));
        let (start, end) = layout.namespace();
        assert_eq!((start.as_str(), end.as_str()), ("mt/app/", "mt/app0"));
        assert!(!(start.as_str()..end.as_str()).contains(&Layout::new("mt", "app2").key(&path("A")).as_str()));
    }

    /// This store's layout, for the property checks core's fuzz targets run.
    impl mutextree_core::checks::KeyLayout for Layout {
        fn key(&self, path: &LockPath) -> String {
            Layout::key(self, path)
        }

        fn ancestor_keys(&self, path: &LockPath) -> Vec<String> {
            Layout::ancestor_keys(self, path)
        }

        fn subtree(&self, path: &LockPath) -> (String, String) {
            Layout::subtree(self, path)
        }

        fn path_of(&self, key: &str) -> Option<LockPath> {
            Layout::path_of(self, key.as_bytes()).ok()
        }
    }

    /// The prefix keeps every property of the path keys: the fuzz seeds of
    /// `path_keys`, through this layout.
    #[test]
    fn the_layout_keeps_the_key_properties() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/path_keys");
        let layout = Layout::new("mt", "app");
        mutextree_core::checks::replay_seeds(&corpus, |data| mutextree_core::checks::path_keys_with(&layout, data));
    }

    #[test]
    fn keys_and_values_round_trip() {
        let layout = Layout::new("mt", "app");
        for text in ["A", "a\\/b/c", "%2F/;*?[", "🔒/名前"] {
            let node = path(text);
            assert_eq!(layout.path_of(layout.key(&node).as_bytes()).expect("ours"), node);
        }
        assert!(layout.path_of(b"mt/other/A/").is_err());
        let owner = Owner::new("web-1 (pid 7)").expect("owner");
        assert_eq!(decode_value(&encode_value(LockKind::Lock, &owner)).expect("ours"), (false, owner.clone()));
        assert_eq!(decode_value(&encode_value(LockKind::Transient, &owner)).expect("ours"), (true, owner));
        assert!(decode_value(b"").is_err());
        assert!(decode_value(b"Xowner").is_err());
        assert!(decode_value(b"L").is_err(), "empty owner");
    }
}
