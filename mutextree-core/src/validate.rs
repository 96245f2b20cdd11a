//! The checked constructors of the values a user hands in: a path, an
//! owner id, a ttl, a namespace, the items of a request. Each rule lives beside its type; here each
//! broken rule becomes the [`Error`] that names it, before anything reaches
//! a store.
//!
//! They sit apart from their types so that the types (`path`, `lock`) do
//! not depend on the error that carries them: `text` at the bottom, the
//! values on it, `error` on the values, and this module on top.

use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;
use crate::lock::{LockItem, LockItems, Mode, Namespace, Owner, Ttl};
use crate::path::{check_segments, decode_key, describe_segments, split_text, LockPath, PathRule};
use crate::text::{human, quote};

impl LockPath {
    /// Builds a path from its segments, root first.
    ///
    /// Fails with [`Error::InvalidPath`] naming the broken rule: no segment,
    /// more than [`MAX_DEPTH`](crate::MAX_DEPTH) segments, an empty segment, a segment over
    /// [`MAX_SEGMENT_BYTES`](crate::MAX_SEGMENT_BYTES), or segments over [`MAX_PATH_BYTES`](crate::MAX_PATH_BYTES) together.
    pub fn new<I, S>(segments: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let segments: Vec<String> = segments.into_iter().map(Into::into).collect();
        if let Err(rule) = check_segments(&segments) {
            return Err(Error::invalid_path(&describe_segments(&segments), rule));
        }
        Ok(Self::from_checked(segments))
    }

    /// Parses the text form: segments separated by `/`, with `\/` standing
    /// for a `/` inside a segment and `\\` for a backslash.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let segments = split_text(text).map_err(|rule| Error::invalid_path(&quote(text), rule))?;
        if let Err(rule) = check_segments(&segments) {
            return Err(Error::invalid_path(&quote(text), rule));
        }
        Ok(Self::from_checked(segments))
    }

    /// Decodes a key made by [`LockPath::key`]; stores use it to turn the
    /// keys they list back into paths.
    pub fn from_key(key: &str) -> Result<Self, Error> {
        let segments = decode_key(key).ok_or_else(|| Error::invalid_path(&quote(key), PathRule::NotAKey))?;
        if let Err(rule) = check_segments(&segments) {
            return Err(Error::invalid_path(&quote(key), rule));
        }
        Ok(Self::from_checked(segments))
    }

    /// The path of a child of this node.
    pub fn child(&self, name: impl Into<String>) -> Result<LockPath, Error> {
        let mut segments: Vec<String> = self.segments().map(str::to_owned).collect();
        segments.push(name.into());
        LockPath::new(segments)
    }
}

impl FromStr for LockPath {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        LockPath::parse(text)
    }
}

impl TryFrom<&str> for LockPath {
    type Error = Error;

    fn try_from(text: &str) -> Result<Self, Error> {
        LockPath::parse(text)
    }
}

impl<S: Into<String>, const N: usize> TryFrom<[S; N]> for LockPath {
    type Error = Error;

    fn try_from(segments: [S; N]) -> Result<Self, Error> {
        LockPath::new(segments)
    }
}

impl<S: Into<String>> TryFrom<Vec<S>> for LockPath {
    type Error = Error;

    fn try_from(segments: Vec<S>) -> Result<Self, Error> {
        LockPath::new(segments)
    }
}

impl Owner {
    /// Checks and wraps an owner id.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("an owner id needs at least one character".to_owned())
        } else if id.len() > Self::MAX_BYTES {
            Some(format!("{} bytes, but an owner id may have at most {}", id.len(), Self::MAX_BYTES))
        } else if id.chars().any(char::is_control) {
            Some("an owner id may not contain control characters".to_owned())
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidOwner { owner: quote(&id), reason }),
            None => Ok(Owner(id.into())),
        }
    }
}

impl Ttl {
    /// Checks a ttl, rounding it up to whole milliseconds.
    pub fn new(ttl: Duration) -> Result<Self, Error> {
        if ttl.is_zero() {
            return Err(Error::InvalidTtl {
                ttl,
                reason: "a lock needs a ttl greater than zero; a ttl of zero would never be held".into(),
            });
        }
        if ttl > Self::MAX {
            return Err(Error::InvalidTtl {
                ttl,
                reason: format!("a ttl may be at most {}; keep a shorter lock refreshed instead", human(Self::MAX)),
            });
        }
        let whole_millis = ttl.as_nanos().div_ceil(1_000_000);
        Ok(Ttl(Duration::from_millis(whole_millis as u64)))
    }
}

impl TryFrom<Duration> for Ttl {
    type Error = Error;

    fn try_from(ttl: Duration) -> Result<Self, Error> {
        Ttl::new(ttl)
    }
}

impl Namespace {
    /// Checks and wraps a namespace name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:".contains(c);
        let reason = if name.is_empty() {
            Some("a namespace needs at least one character".to_owned())
        } else if name.len() > Self::MAX_BYTES {
            Some(format!("{} bytes, but a namespace may have at most {}", name.len(), Self::MAX_BYTES))
        } else {
            name.chars()
                .find(|c| !allowed(*c))
                .map(|bad| format!("{bad:?} is not allowed; a namespace uses ASCII letters, digits and `_ - . :` only"))
        };
        match reason {
            Some(reason) => Err(Error::InvalidNamespace { namespace: quote(&name), reason }),
            None => Ok(Namespace(name.into())),
        }
    }
}

impl From<(LockPath, Mode)> for LockItem {
    fn from((path, mode): (LockPath, Mode)) -> Self {
        LockItem { path, mode }
    }
}

impl LockItems {
    /// Normalises and checks the items of a request.
    ///
    /// 1 to [`LockItems::MAX`] items are accepted. Exact duplicates merge
    /// to the stronger mode; items of one mode on one branch (one the
    /// ancestor of the other) collapse to the ancestor, which covers the
    /// other; items of different modes on one branch are refused, since no
    /// grant could hold both. The result is in key order.
    ///
    /// Fails with [`Error::InvalidRequest`]; nothing is sent.
    pub fn new<I>(items: I) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: Into<LockItem>,
    {
        let mut items: Vec<LockItem> = items.into_iter().map(Into::into).collect();
        if items.is_empty() {
            return Err(Error::InvalidRequest { reason: "a lock request needs at least one path".into() });
        }
        if items.len() > Self::MAX {
            return Err(Error::InvalidRequest {
                reason: format!("{} paths, but one request may lock at most {}", items.len(), Self::MAX),
            });
        }
        // Stronger mode first among equal paths, so that the first of a run
        // of duplicates is the one kept.
        items.sort_by(|a, b| a.path.key().cmp(b.path.key()).then(b.mode.cmp(&a.mode)));
        items.dedup_by(|later, kept| later.path == kept.path);
        // In key order a node's descendants come right after it, so an item
        // can only be on a branch with the last one kept.
        let mut kept: Vec<LockItem> = Vec::with_capacity(items.len());
        for item in items {
            match kept.last() {
                Some(ancestor) if ancestor.path.is_ancestor_of(&item.path) => {
                    if ancestor.mode != item.mode {
                        return Err(Error::InvalidRequest {
                            reason: format!(
                                "{} and {} are on one branch with different modes; a grant cannot hold both \
                                 (ask for {} {} alone, which covers its subtree)",
                                describe(ancestor),
                                describe(&item),
                                ancestor.path,
                                Mode::Exclusive
                            ),
                        });
                    }
                }
                _ => kept.push(item),
            }
        }
        Ok(LockItems(kept.into()))
    }
}

/// `A/B (shared)`, `A/B/C (exclusive)`: an item with its mode spelt out.
fn describe(item: &LockItem) -> String {
    format!("{} ({})", item.path, item.mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(list: &[(&str, Mode)]) -> Result<LockItems, Error> {
        LockItems::new(list.iter().map(|(path, mode)| (LockPath::parse(path).expect("path"), *mode)))
    }

    fn shown(items: &LockItems) -> String {
        items.to_string()
    }

    #[test]
    fn items_are_normalised() {
        use Mode::{Exclusive as X, Shared as S};
        // Exact duplicates merge to the stronger mode, whatever their order.
        assert_eq!(shown(&items(&[("a", S), ("a", X)]).expect("ok")), "a");
        assert_eq!(shown(&items(&[("a", X), ("a", S)]).expect("ok")), "a");
        assert_eq!(shown(&items(&[("a", S), ("a", S)]).expect("ok")), "a (shared)");
        // One mode on one branch collapses to the ancestor.
        assert_eq!(shown(&items(&[("a/b/c", S), ("a", S), ("a/d", S)]).expect("ok")), "a (shared)");
        assert_eq!(shown(&items(&[("a/b", X), ("a/b/c", X), ("z", S)]).expect("ok")), "a/b, z (shared)");
        // Key order, siblings kept, `a` is not an ancestor of `ab`.
        assert_eq!(shown(&items(&[("b", X), ("ab", S), ("a", X)]).expect("ok")), "a, ab (shared), b");
        // A duplicate that becomes Exclusive, under a Shared ancestor: refused.
        let error = items(&[("a/b", S), ("a", S), ("a/b", X)]).expect_err("mixed modes on one branch");
        assert!(matches!(error, Error::InvalidRequest { .. }), "{error:?}");
        assert!(error.to_string().contains("a (shared) and a/b (exclusive)"), "{error}");
    }

    #[test]
    fn item_limits() {
        let none = LockItems::new(Vec::<LockItem>::new()).expect_err("empty");
        assert!(none.to_string().contains("at least one path"), "{none}");
        let seventeen: Vec<(LockPath, Mode)> =
            (0..17).map(|at| (LockPath::new([format!("n{at}")]).expect("path"), Mode::Shared)).collect();
        let error = LockItems::new(seventeen.clone()).expect_err("17");
        assert!(error.to_string().contains("17 paths, but one request may lock at most 16"), "{error}");
        assert_eq!(LockItems::new(seventeen[..16].to_vec()).expect("16").len(), 16);
        // Counted before duplicates merge: 17 names for one path are refused too.
        let same = vec![(LockPath::new(["a"]).expect("path"), Mode::Shared); 17];
        assert!(LockItems::new(same).is_err());
    }

    #[test]
    fn refusals_name_a_blocker_per_item() {
        use crate::lock::{Blockers, HeldLock};
        let asked = items(&[("a/b", Mode::Exclusive), ("c", Mode::Shared)]).expect("ok");
        let held = |path: &str, mode| HeldLock {
            path: LockPath::parse(path).expect("path"),
            mode,
            owner: Owner::new("w").expect("owner"),
            token: 7,
            remaining: Duration::from_secs(3),
            transient: false,
            waiting: false,
            waited: Duration::ZERO,
        };
        let error = Error::Refused {
            items: asked,
            blockers: Blockers::new(held("a", Mode::Shared), [held("c/d", Mode::Exclusive)]),
        };
        let message = error.to_string();
        assert!(message.starts_with("lock on a/b, c (shared) refused: "), "{message}");
        assert!(message.contains("a/b: its ancestor a is held shared by \"w\""), "{message}");
        assert!(message.contains("c: its descendant c/d is held by \"w\""), "{message}");
    }
}
