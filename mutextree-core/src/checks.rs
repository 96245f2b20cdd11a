//! The properties of paths and keys that the fuzz targets and the stable
//! tests both check. Not part of the API: hidden, and free to change.
//!
//! # Why this module exists
//!
//! SPEC §2 promises that every accepted segment works whatever it holds, that
//! two paths never share a key, and that "is a descendant of" is exactly "has
//! a longer key with this prefix". Every store leans on that encoding: Redis
//! finds a node's ancestors as the prefixes of its key that end at a `/` (in
//! Lua, byte by byte) and its descendants with one `ZRANGEBYLEX`; PostgreSQL
//! with one range over a `COLLATE "C"` primary key; etcd with one range
//! compare. A mistake there is a double grant, so it is checked on inputs no
//! person would write: by coverage-guided fuzzing (the `fuzz` crate at the
//! workspace root, on nightly) and by a proptest and a replay of the fuzz
//! seeds in `cargo test` (`tests/path_properties.rs`, on stable).
//!
//! Both call the functions here, so the two can never check different
//! things. Each function panics, with the input and the broken property in
//! the message, when a property fails: what a fuzzer reports as a crash and
//! a test as a failure.
//!
//! # The comparisons
//!
//! Every store compares keys as raw bytes (`ZRANGEBYLEX`, `COLLATE "C"`,
//! etcd's byte order), and Rust compares `str` as raw bytes too, so the
//! range checks below are the stores' own. The reference for "related" is
//! computed on the segments alone, never on keys, so that it cannot share a
//! mistake with the encoding it judges.

use std::fmt::Debug;

use crate::error::Error;
use crate::path::{LockPath, MAX_DEPTH, MAX_PATH_BYTES, MAX_SEGMENT_BYTES};

/// Most bytes an error message about a path may have: it is read by a
/// person, however absurd the input.
pub const MAX_MESSAGE_BYTES: usize = 400;

/// Separates two paths in the input of [`path_keys`]: never a byte of UTF-8.
pub const PATH_BREAK: u8 = 0xFF;
/// Separates two segments in the input of [`path_keys`]: never a byte of UTF-8.
pub const SEGMENT_BREAK: u8 = 0xFE;

/// How many paths of one input [`path_keys`] takes, and how many it compares
/// once their relatives are added: one input costs at most some fifteen
/// hundred pair checks, so the fuzzer stays fast.
const MAX_INPUT_PATHS: usize = 6;
const MAX_COMPARED_PATHS: usize = 40;

/// The text form and the key decoder on arbitrary bytes.
///
/// * Parsing never panics. An accepted text is canonical: its path displays
///   back to the very same text, parses to an equal path, rebuilds from its
///   segments and from its key, and obeys every limit.
/// * A refused text gets [`Error::InvalidPath`] with a short message free of
///   control characters.
/// * The same bytes read as a key: decoding never panics, and a decoded key
///   is the key of what it decodes to (each path has exactly one key).
pub fn path_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match LockPath::parse(text) {
        Ok(path) => {
            check_valid(&path);
            let shown = path.to_string();
            assert_eq!(shown, text, "an accepted text is not its path's text form");
            let again = LockPath::parse(&shown).unwrap_or_else(|e| panic!("{path:?} displays as {shown:?}: {e}"));
            assert_same(&again, &path, "the text form");
        }
        Err(error) => check_rejection(&error, text),
    }
    match LockPath::from_key(text) {
        Ok(path) => {
            check_valid(&path);
            assert_eq!(path.key(), text, "{path:?} was decoded from a key it does not have");
        }
        Err(error) => check_rejection(&error, text),
    }
}

/// The key encoding on arbitrary segments.
///
/// `data` holds paths separated by [`PATH_BREAK`], each of segments
/// separated by [`SEGMENT_BREAK`]; a segment that is not UTF-8 is read
/// lossily, so every string is reachable and a seed is readable text.
/// [`LockPath::new`] judges each path: a refusal is checked like any other,
/// and the accepted paths, with their ancestors and near misses (the last
/// segment cut or extended, as `[A, B]` has `[A, BC]`), are compared pair by
/// pair with [`key_layout`] over [`PathKeys`].
pub fn path_keys(data: &[u8]) {
    path_keys_with(&PathKeys, data);
}

/// [`path_keys`] over a store's own key layout.
pub fn path_keys_with<L: KeyLayout>(layout: &L, data: &[u8]) {
    let mut paths = Vec::new();
    for segments in segment_lists(data).into_iter().take(MAX_INPUT_PATHS) {
        let described = format!("{segments:?}");
        match LockPath::new(segments.iter().cloned()) {
            Ok(path) => {
                check_valid(&path);
                assert!(path.segments().eq(segments.iter().map(String::as_str)), "{path:?} from {described}");
                paths.push(path);
            }
            Err(error) => check_rejection(&error, &described),
        }
    }
    key_layout(layout, &with_relatives(&paths));
}

/// Runs `check` on each named seed in `dir` (a target's directory in the
/// fuzz crate's `corpus`), naming the seed when it fails. The inputs a
/// fuzzing run adds beside the seeds, named by their SHA-1, are left to the
/// fuzzer. Panics if there are fewer than ten seeds: a moved or emptied
/// corpus must fail, not pass with nothing checked.
pub fn replay_seeds(dir: &std::path::Path, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("the seed corpus {}: {e}", dir.display()));
    let mut seeds: Vec<(String, std::path::PathBuf)> = entries
        .map(|entry| entry.expect("a corpus entry").path())
        .filter_map(|path| Some((path.file_name()?.to_str()?.to_owned(), path)))
        .filter(|(name, _)| !(name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "only {} seeds in {}", seeds.len(), dir.display());
    for (name, path) in seeds {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("the seed {}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let what = panic.downcast_ref::<String>().map_or("", String::as_str);
            panic!("the seed {name} in {} fails: {what}", dir.display());
        }
    }
}

/// Splits the input of [`path_keys`] into segment lists.
pub fn segment_lists(data: &[u8]) -> Vec<Vec<String>> {
    data.split(|&b| b == PATH_BREAK)
        .map(|path| path.split(|&b| b == SEGMENT_BREAK).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
        .collect()
}

/// Writes segment lists as the input of [`path_keys`] (the inverse of
/// [`segment_lists`] for segments that are valid UTF-8).
pub fn encode_segment_lists<P, S>(paths: P) -> Vec<u8>
where
    P: IntoIterator,
    P::Item: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = Vec::new();
    for (p, segments) in paths.into_iter().enumerate() {
        if p > 0 {
            out.push(PATH_BREAK);
        }
        for (s, segment) in segments.into_iter().enumerate() {
            if s > 0 {
                out.push(SEGMENT_BREAK);
            }
            out.extend_from_slice(segment.as_ref().as_bytes());
        }
    }
    out
}

/// The paths, their ancestors, and for each a sibling whose last segment is
/// a prefix or an extension of its own: the pairs an encoding gets wrong.
fn with_relatives(paths: &[LockPath]) -> Vec<LockPath> {
    let mut all: Vec<LockPath> = Vec::new();
    for path in paths {
        all.push(path.clone());
        let parent: Vec<&str> = path.segments().take(path.depth() - 1).collect();
        let name = path.name();
        let mut near = vec![format!("{name}C"), format!("{name}/"), format!("{name}0"), format!("{name}%")];
        if let Some((cut, _)) = name.char_indices().last().filter(|&(at, _)| at > 0) {
            near.push(name[..cut].to_owned());
        }
        for name in near {
            if let Ok(sibling) = LockPath::new(parent.iter().map(|s| s.to_string()).chain([name])) {
                all.push(sibling);
            }
        }
        all.extend(path.ancestors());
    }
    let mut seen = std::collections::HashSet::new();
    all.retain(|path| seen.insert(path.clone()));
    all.truncate(MAX_COMPARED_PATHS);
    all
}

/// The key layout of a store: what it derives from a path.
pub trait KeyLayout {
    /// The key a node's lock is stored under.
    fn key(&self, path: &LockPath) -> String;
    /// The keys of the node's strict ancestors, root first.
    fn ancestor_keys(&self, path: &LockPath) -> Vec<String>;
    /// The half-open range of keys holding the node and its descendants.
    fn subtree(&self, path: &LockPath) -> (String, String);
    /// The path a key names, if it is one of this layout's keys.
    fn path_of(&self, key: &str) -> Option<LockPath>;
}

/// The layout every store builds on: [`LockPath::key`] itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathKeys;

impl KeyLayout for PathKeys {
    fn key(&self, path: &LockPath) -> String {
        path.key().to_owned()
    }

    fn ancestor_keys(&self, path: &LockPath) -> Vec<String> {
        path.ancestor_keys().map(str::to_owned).collect()
    }

    fn subtree(&self, path: &LockPath) -> (String, String) {
        (path.key().to_owned(), path.key_range_end())
    }

    fn path_of(&self, key: &str) -> Option<LockPath> {
        LockPath::from_key(key).ok()
    }
}

/// Whether `a`'s segments are a prefix of `b`'s (equal included): the
/// reference for "`a` is `b` or one of its ancestors".
pub fn is_segment_prefix(a: &LockPath, b: &LockPath) -> bool {
    a.depth() <= b.depth() && a.segments().zip(b.segments()).all(|(x, y)| x == y)
}

/// Every pair of `paths` against the segment reference, through `layout`:
///
/// * `overlaps` ⇔ one's segments are a prefix of the other's, and
///   `is_ancestor_of` ⇔ a strict prefix;
/// * equal ⇔ same segments ⇔ same key: distinct paths never share a key;
/// * `q`'s key lies in `p`'s subtree range ⇔ `p` is `q` or its ancestor;
/// * `p`'s key is among `q`'s ancestor keys ⇔ `p` is a strict ancestor;
/// * for each path: the ancestor keys are the keys of its ancestors, and
///   (for [`PathKeys`]) exactly the prefixes of its key that end at a `/`
///   byte, which is how the Redis script finds them; its key decodes back
///   to it; the key is UTF-8 without NUL or `0xFF`.
pub fn key_layout<L: KeyLayout>(layout: &L, paths: &[LockPath]) {
    let keys: Vec<String> = paths.iter().map(|p| layout.key(p)).collect();
    let ancestor_keys: Vec<Vec<String>> = paths.iter().map(|p| layout.ancestor_keys(p)).collect();
    for (p, path) in paths.iter().enumerate() {
        check_valid(path);
        let key = &keys[p];
        let expected: Vec<String> = path.ancestors().iter().map(|a| layout.key(a)).collect();
        assert_eq!(ancestor_keys[p], expected, "ancestor keys of {path:?}");
        if path.key() == key {
            let by_bytes: Vec<&str> = key
                .char_indices()
                .filter(|&(at, c)| c == '/' && at + 1 < key.len())
                .map(|(at, _)| &key[..=at])
                .collect();
            assert_eq!(by_bytes, ancestor_keys[p], "the prefixes of {key:?} ending at `/`");
        }
        let decoded = layout.path_of(key).unwrap_or_else(|| panic!("the key {key:?} of {path:?} does not decode"));
        assert_same(&decoded, path, "its key");
        assert!(!key.contains('\0'), "the key of {path:?} has a NUL: {key:?}");
    }
    for (p, a) in paths.iter().enumerate() {
        let (start, end) = layout.subtree(a);
        assert_eq!(start, keys[p], "the subtree of {a:?} starts elsewhere than at its key");
        assert!(start < end, "the subtree range of {a:?} is empty: {start:?}..{end:?}");
        for (q, b) in paths.iter().enumerate() {
            let a_over_b = is_segment_prefix(a, b);
            let b_over_a = is_segment_prefix(b, a);
            let same = a_over_b && b_over_a;
            let pair = || format!("{a:?} and {b:?} (keys {:?} and {:?})", keys[p], keys[q]);
            assert_eq!(a.overlaps(b), a_over_b || b_over_a, "overlaps: {}", pair());
            assert_eq!(a.is_ancestor_of(b), a_over_b && !same, "is_ancestor_of: {}", pair());
            assert_eq!(a.is_descendant_of(b), b_over_a && !same, "is_descendant_of: {}", pair());
            assert_eq!(a == b, same, "equality: {}", pair());
            assert_eq!(keys[p] == keys[q], same, "distinct paths share a key, or equal ones do not: {}", pair());
            assert_eq!(a.cmp(b), a.key().cmp(b.key()), "order: {}", pair());
            let in_range = start <= keys[q] && keys[q] < end;
            assert_eq!(in_range, a_over_b, "the subtree range of the first holds the second's key: {}", pair());
            let among_ancestors = ancestor_keys[q].contains(&keys[p]);
            assert_eq!(among_ancestors, a_over_b && !same, "ancestor keys: {}", pair());
        }
    }
}

/// The invariants of every path [`LockPath`] hands out.
fn check_valid(path: &LockPath) {
    assert!((1..=MAX_DEPTH).contains(&path.depth()), "{path:?} has depth {}", path.depth());
    let mut total = 0;
    for segment in path.segments() {
        assert!(!segment.is_empty(), "{path:?} has an empty segment");
        assert!(segment.len() <= MAX_SEGMENT_BYTES, "{path:?} has a segment over the limit");
        total += segment.len();
    }
    assert!(total <= MAX_PATH_BYTES, "{path:?} is over the limit");
    let key = path.key();
    assert!(key.ends_with('/'), "the key {key:?} does not end with `/`");
    assert_eq!(key.matches('/').count(), path.depth(), "the key {key:?} has a `/` inside a segment");
    assert!(!key.contains('\0'), "the key {key:?} has a NUL");
    assert!(!key.bytes().any(|b| b == 0xFF), "the key {key:?} has the byte 0xFF");
    assert_eq!(path.ancestor_keys().len(), path.depth() - 1);
    let rebuilt = LockPath::new(path.segments()).unwrap_or_else(|e| panic!("{path:?} does not rebuild: {e}"));
    assert_same(&rebuilt, path, "its segments");
    let decoded = LockPath::from_key(key).unwrap_or_else(|e| panic!("the key of {path:?} does not decode: {e}"));
    assert_same(&decoded, path, "its key");
}

/// `found`, rebuilt from `how`, is `path`: equal, with the same segments and key.
fn assert_same(found: &LockPath, path: &LockPath, how: &str) {
    assert!(
        found == path && found.segments().eq(path.segments()) && found.key() == path.key(),
        "{path:?} rebuilt from {how} is {found:?}"
    );
}

/// A refusal is a typed path error with a short message a terminal can show.
fn check_rejection(error: &Error, input: &(impl Debug + ?Sized)) {
    assert!(matches!(error, Error::InvalidPath { .. }), "{input:?} refused with {error:?}");
    let message = error.to_string();
    assert!(message.len() < MAX_MESSAGE_BYTES, "{input:?}: a message of {} bytes", message.len());
    assert!(!message.chars().any(char::is_control), "{input:?}: a control character in {message:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_lists_round_trip() {
        let paths = [vec!["A", "B"], vec!["a/b", "\u{e9}"], vec![""]];
        assert_eq!(segment_lists(&encode_segment_lists(paths.clone())), paths);
        assert_eq!(segment_lists(b""), [[""]]);
    }
}
