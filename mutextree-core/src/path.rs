//! Lock paths: validation, the `A/B/D` text form and the key encoding.
//!
//! A [`LockPath`] names a node of the tree by its segments from the root:
//! node D under B under A is `[A, B, D]`. Every store keeps one key per locked
//! node, and every store needs the same two things from those keys:
//!
//! * two different paths never share a key, whatever characters the segments
//!   hold (`/ ; * ? [ ] : % \ { }`, spaces, unicode, control characters);
//! * "is a descendant of" in the tree is exactly "has a longer key that starts
//!   with this key", so a descendant check is one range query over sorted keys
//!   (Redis `ZRANGEBYLEX`, a B-tree range in PostgreSQL, an etcd range).
//!
//! The encoding that gives both: each segment, with `%`, `/` and the ASCII
//! control characters percent-escaped (`%25`, `%2F`, `%00`…), followed by a
//! `/`. `[A]` is `A/`, `[AB]` is `AB/` and `[A, B]` is `A/B/`: `A/` is a prefix
//! of `A/B/` but not of `AB/`. An encoded segment never contains `/`, so the
//! key splits back into its segments. Keys are valid UTF-8 with no NUL byte
//! (PostgreSQL `text` refuses NUL) and never contain the byte `0xFF` (the
//! upper bound of a Redis lexicographic range). The descendants of a key are
//! exactly the keys in the half-open range `[key, key with its last "/"
//! replaced by "0")`, because `0` is the character after `/`.
//!
//! # Limits
//!
//! | limit | value | why |
//! | --- | --- | --- |
//! | [`MAX_DEPTH`] | 32 segments | an etcd transaction holds at most 128 operations; a grant compares the node, each ancestor and the subtree |
//! | [`MAX_SEGMENT_BYTES`] | 255 bytes | a file name's limit; long enough for any resource name |
//! | [`MAX_PATH_BYTES`] | 768 bytes of segments | the escaped key stays under 2.4 KB, inside a PostgreSQL B-tree entry (about 2.7 KB) |
//!
//! Segments are compared byte for byte: no Unicode normalisation (NFC `é`
//! and NFD `é` are two different segments), no case folding, and `.` or `..`
//! are ordinary names.

use std::fmt;
use std::sync::Arc;

use crate::text::quote_within;

/// Most segments a path may have.
pub const MAX_DEPTH: usize = 32;
/// Most UTF-8 bytes one segment may have.
pub const MAX_SEGMENT_BYTES: usize = 255;
/// Most UTF-8 bytes all the segments of a path may have together.
pub const MAX_PATH_BYTES: usize = 768;

/// The byte that ends every encoded segment in a key.
const KEY_SEPARATOR: char = '/';
/// The escape of the text form (`A\/B` is the one segment `A/B`).
const TEXT_ESCAPE: char = '\\';

/// A validated path naming one node of the tree, root first.
///
/// Cheap to clone (the segments and the key are shared). Equality, ordering
/// and hashing follow the encoded key, which is one-to-one with the segments.
///
/// ```
/// use mutextree_core::LockPath;
///
/// let host = LockPath::new(["eu-west", "rack-12", "host-7"])?;
/// assert_eq!(host.to_string(), "eu-west/rack-12/host-7");
/// assert_eq!(host, "eu-west/rack-12/host-7".parse()?);
///
/// let rack = host.parent().expect("a host has a rack");
/// assert!(rack.is_ancestor_of(&host));
/// assert!(!LockPath::new(["eu"])?.is_ancestor_of(&LockPath::new(["eu-west"])?));
///
/// // `/` inside a segment is escaped in the text form.
/// let odd = LockPath::new(["a/b", "c"])?;
/// assert_eq!(odd.to_string(), r"a\/b/c");
/// # Ok::<(), mutextree_core::Error>(())
/// ```
#[derive(Clone)]
pub struct LockPath(Arc<Inner>);

struct Inner {
    segments: Box<[Box<str>]>,
    /// The encoded key: each escaped segment followed by `/`.
    key: Box<str>,
    /// `key[..ends[i]]` is the key of the path made of the first `i + 1` segments.
    ends: Box<[usize]>,
}

impl LockPath {
    pub(crate) fn from_checked(segments: Vec<String>) -> Self {
        let mut key = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum());
        let mut ends = Vec::with_capacity(segments.len());
        for segment in &segments {
            encode_segment(segment, &mut key);
            key.push(KEY_SEPARATOR);
            ends.push(key.len());
        }
        LockPath(Arc::new(Inner {
            segments: segments.into_iter().map(String::into_boxed_str).collect(),
            key: key.into_boxed_str(),
            ends: ends.into_boxed_slice(),
        }))
    }

    /// The segments, root first.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &str> + DoubleEndedIterator + '_ {
        self.0.segments.iter().map(|s| &**s)
    }

    /// How many segments the path has (1 for a root node).
    pub fn depth(&self) -> usize {
        self.0.segments.len()
    }

    /// The last segment: the node's own name.
    pub fn name(&self) -> &str {
        self.0.segments.last().map(|s| &**s).unwrap_or_default()
    }

    /// The encoded key of this node (see the module docs). Every store keys
    /// its lock records by it.
    pub fn key(&self) -> &str {
        &self.0.key
    }

    /// The exclusive upper bound of the key range holding this node and all
    /// its descendants: the key with its final `/` replaced by `0`.
    pub fn key_range_end(&self) -> String {
        let key = self.key();
        let mut end = String::with_capacity(key.len());
        end.push_str(&key[..key.len() - 1]);
        end.push('0');
        end
    }

    /// The keys of the strict ancestors, root first, as prefixes of
    /// [`LockPath::key`] (no allocation).
    pub fn ancestor_keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        let key = self.key();
        self.0.ends[..self.0.ends.len() - 1].iter().map(move |&end| &key[..end])
    }

    /// The path one level up, or `None` for a root node.
    pub fn parent(&self) -> Option<LockPath> {
        (self.depth() > 1).then(|| self.prefix(self.depth() - 1))
    }

    /// The strict ancestors, root first.
    pub fn ancestors(&self) -> Vec<LockPath> {
        (1..self.depth()).map(|depth| self.prefix(depth)).collect()
    }

    fn prefix(&self, depth: usize) -> LockPath {
        LockPath::from_checked(self.0.segments[..depth].iter().map(|s| s.to_string()).collect())
    }

    /// Whether `self` is a strict ancestor of `other` (`[A]` of `[A, B]`,
    /// never of `[AB]`).
    pub fn is_ancestor_of(&self, other: &LockPath) -> bool {
        other.key().len() > self.key().len() && other.key().starts_with(self.key())
    }

    /// Whether `self` is a strict descendant of `other`.
    pub fn is_descendant_of(&self, other: &LockPath) -> bool {
        other.is_ancestor_of(self)
    }

    /// Whether locks on the two paths exclude each other: equal paths, or one
    /// an ancestor of the other.
    pub fn overlaps(&self, other: &LockPath) -> bool {
        let (a, b) = (self.key(), other.key());
        a.starts_with(b) || b.starts_with(a)
    }
}

impl PartialEq for LockPath {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.key() == other.key()
    }
}

impl Eq for LockPath {}

impl std::hash::Hash for LockPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for LockPath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LockPath {
    /// Key order: a node sorts right before its descendants.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}

impl fmt::Display for LockPath {
    /// The text form, `A/B/D`, with `/` and `\` inside a segment escaped by `\`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, segment) in self.segments().enumerate() {
            if index > 0 {
                f.write_str("/")?;
            }
            for c in segment.chars() {
                if c == KEY_SEPARATOR || c == TEXT_ESCAPE {
                    write!(f, "{TEXT_ESCAPE}{c}")?;
                } else {
                    write!(f, "{c}")?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for LockPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.segments()).finish()
    }
}

pub(crate) fn check_segments(segments: &[String]) -> Result<(), PathRule> {
    if segments.is_empty() {
        return Err(PathRule::NoSegments);
    }
    if segments.len() > MAX_DEPTH {
        return Err(PathRule::TooDeep { depth: segments.len() });
    }
    let mut total = 0;
    for (index, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(PathRule::EmptySegment { index });
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return Err(PathRule::SegmentTooLong { index, bytes: segment.len() });
        }
        total += segment.len();
    }
    if total > MAX_PATH_BYTES {
        return Err(PathRule::TooLong { bytes: total });
    }
    Ok(())
}

pub(crate) fn split_text(text: &str) -> Result<Vec<String>, PathRule> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            TEXT_ESCAPE => match chars.next() {
                Some(escaped @ (KEY_SEPARATOR | TEXT_ESCAPE)) => current.push(escaped),
                Some(other) => return Err(PathRule::UnknownEscape { found: other }),
                None => return Err(PathRule::DanglingEscape),
            },
            KEY_SEPARATOR => segments.push(std::mem::take(&mut current)),
            other => current.push(other),
        }
        if segments.len() > MAX_DEPTH {
            // Stop early on absurd inputs; the exact depth is not needed.
            return Err(PathRule::TooDeep { depth: segments.len() });
        }
    }
    if !text.is_empty() {
        segments.push(current);
    }
    Ok(segments)
}

fn needs_escape(c: char) -> bool {
    c == '%' || c == KEY_SEPARATOR || c.is_ascii_control()
}

fn encode_segment(segment: &str, key: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for c in segment.chars() {
        if needs_escape(c) {
            // Only ASCII characters are escaped: one byte each.
            let byte = c as u8;
            key.push('%');
            key.push(HEX[usize::from(byte >> 4)] as char);
            key.push(HEX[usize::from(byte & 0xF)] as char);
        } else {
            key.push(c);
        }
    }
}

pub(crate) fn decode_key(key: &str) -> Option<Vec<String>> {
    let body = key.strip_suffix(KEY_SEPARATOR)?;
    body.split(KEY_SEPARATOR).map(decode_segment).collect()
}

fn decode_segment(encoded: &str) -> Option<String> {
    let mut out = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(at) = rest.find('%') {
        // Plain text between escapes must not hold what the encoder
        // escapes either, or two keys would decode to one path.
        if rest[..at].chars().any(needs_escape) {
            return None;
        }
        out.push_str(&rest[..at]);
        let hex = rest.get(at + 1..at + 3)?;
        if !hex.bytes().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h)) {
            return None;
        }
        let byte = u8::from_str_radix(hex, 16).ok()?;
        let c = char::from(byte);
        // Only what the encoder escapes may appear escaped, so that each path
        // has exactly one key.
        if !byte.is_ascii() || !needs_escape(c) {
            return None;
        }
        out.push(c);
        rest = &rest[at + 3..];
    }
    if rest.chars().any(needs_escape) {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

pub(crate) fn describe_segments(segments: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut out = String::from("[");
    for (index, segment) in segments.iter().take(SHOWN).enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        out.push_str(&quote_within(segment, 40));
    }
    if segments.len() > SHOWN {
        out.push_str(&format!(", … {} segments in all", segments.len()));
    }
    out.push(']');
    out
}

/// The rule a rejected [`LockPath`] broke.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathRule {
    /// A path needs at least one segment.
    NoSegments,
    /// More than [`MAX_DEPTH`] segments.
    TooDeep {
        /// How many segments were given (counting stops early past the limit).
        depth: usize,
    },
    /// A segment is the empty string (`a//b` in the text form).
    EmptySegment {
        /// Its position, from 0.
        index: usize,
    },
    /// A segment longer than [`MAX_SEGMENT_BYTES`].
    SegmentTooLong {
        /// Its position, from 0.
        index: usize,
        /// Its length in UTF-8 bytes.
        bytes: usize,
    },
    /// Segments longer than [`MAX_PATH_BYTES`] together.
    TooLong {
        /// Their total length in UTF-8 bytes.
        bytes: usize,
    },
    /// The text form ends with a `\` that escapes nothing.
    DanglingEscape,
    /// The text form has `\` before something other than `/` or `\`.
    UnknownEscape {
        /// The character after the `\`.
        found: char,
    },
    /// A key that [`LockPath::key`] did not make.
    NotAKey,
}

impl fmt::Display for PathRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathRule::NoSegments => write!(f, "a path needs at least one segment"),
            PathRule::TooDeep { depth } => {
                write!(f, "{depth} segments, but a path may have at most {MAX_DEPTH}")
            }
            PathRule::EmptySegment { index } => write!(
                f,
                "segment {} is empty; segments must have at least one character (in the text form, \
                 `a//b` and a leading or trailing `/` make empty segments)",
                index + 1
            ),
            PathRule::SegmentTooLong { index, bytes } => write!(
                f,
                "segment {} has {bytes} bytes, but a segment may have at most {MAX_SEGMENT_BYTES} bytes",
                index + 1
            ),
            PathRule::TooLong { bytes } => write!(
                f,
                "the segments have {bytes} bytes together, but a path may have at most {MAX_PATH_BYTES} bytes"
            ),
            PathRule::DanglingEscape => {
                write!(f, "the text ends with a lone `\\`; write `\\\\` for a backslash")
            }
            PathRule::UnknownEscape { found } => write!(
                f,
                "unknown escape: `\\` before {found:?}; only `\\/` (a slash inside a segment) and `\\\\` (a \
                 backslash) exist"
            ),
            PathRule::NotAKey => write!(f, "not a key made by LockPath::key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use proptest::prelude::*;

    fn path(segments: &[&str]) -> LockPath {
        LockPath::new(segments.iter().copied()).expect("valid path")
    }

    #[test]
    fn keys_end_every_segment_with_a_separator() {
        assert_eq!(path(&["A"]).key(), "A/");
        assert_eq!(path(&["A", "B", "D"]).key(), "A/B/D/");
        assert_eq!(path(&["a/b", "%", "\0"]).key(), "a%2Fb/%25/%00/");
        assert_eq!(path(&["A", "B"]).key_range_end(), "A/B0");
        assert_eq!(path(&["A", "B", "D"]).ancestor_keys().collect::<Vec<_>>(), ["A/", "A/B/"]);
    }

    #[test]
    fn a_is_not_an_ancestor_of_ab() {
        assert!(!path(&["A"]).is_ancestor_of(&path(&["AB"])));
        assert!(!path(&["A"]).overlaps(&path(&["AB"])));
        assert!(path(&["A"]).is_ancestor_of(&path(&["A", "B"])));
        assert!(!path(&["A", "B"]).is_ancestor_of(&path(&["A", "BC"])));
        assert!(path(&["A", "B"]).overlaps(&path(&["A", "B"])));
    }

    #[test]
    fn text_form_escapes_slash_and_backslash() {
        let p = path(&["a/b", r"c\d", "e"]);
        assert_eq!(p.to_string(), r"a\/b/c\\d/e");
        assert_eq!(LockPath::parse(r"a\/b/c\\d/e").expect("parses"), p);
    }

    #[test]
    fn bad_paths_name_the_rule() {
        let cases: Vec<(Result<LockPath, Error>, &str)> = vec![
            (LockPath::new(Vec::<String>::new()), "at least one segment"),
            (LockPath::parse(""), "at least one segment"),
            (LockPath::parse("/"), "segment 1 is empty"),
            (LockPath::parse("a//b"), "segment 2 is empty"),
            (LockPath::parse("a/"), "segment 2 is empty"),
            (LockPath::parse(r"a\"), "ends with a lone"),
            (LockPath::parse(r"a\n"), "unknown escape"),
            (LockPath::new(vec!["x"; MAX_DEPTH + 1]), "at most 32"),
            (LockPath::new(["x".repeat(MAX_SEGMENT_BYTES + 1)]), "at most 255 bytes"),
            (LockPath::new(vec!["x".repeat(200); 4]), "at most 768 bytes"),
            (LockPath::from_key("A"), "not a key"),
            (LockPath::from_key("A%2f/"), "not a key"),
            (LockPath::from_key("A%41/"), "not a key"),
            (LockPath::from_key("%+1/"), "not a key"),
            // A control character left plain before an escape: the key of
            // `["\0/"]` is `%00%2F/`, and it must be its only key.
            (LockPath::from_key("\0%2F/"), "not a key"),
            (LockPath::from_key("a\n%25/"), "not a key"),
        ];
        for (result, expected) in cases {
            let message = result.expect_err("must be refused").to_string();
            assert!(message.contains(expected), "{message:?} should mention {expected:?}");
        }
    }

    #[test]
    fn a_megabyte_name_gives_a_short_message() {
        let error = LockPath::new(["x".repeat(1 << 20)]).expect_err("too long");
        assert!(error.to_string().len() < 300, "{error}");
    }

    #[test]
    fn escaped_characters_count_towards_the_message_length() {
        // Each control character is escaped to several bytes: sixty-four of
        // them once made a message of over 400 bytes.
        let controls = "\u{1f}".repeat(100);
        let errors = [
            LockPath::parse(&format!("a\\\u{1}{controls}")).expect_err("unknown escape"),
            LockPath::parse(&format!("{controls}//")).expect_err("empty segment"),
            LockPath::new([controls.as_str(), "", controls.as_str(), controls.as_str(), "x"]).expect_err("empty"),
            LockPath::from_key(&controls).expect_err("not a key"),
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.len() < 400, "{} bytes: {message}", message.len());
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
    }

    #[test]
    fn an_unknown_escape_shows_the_character_escaped() {
        let message = LockPath::parse("a\\\n").expect_err("unknown escape").to_string();
        assert!(message.contains(r"before '\n'"), "{message}");
    }

    #[test]
    fn dots_and_unnormalised_unicode_are_plain_names() {
        assert_ne!(path(&["."]), path(&[".."]));
        assert_ne!(path(&["\u{e9}"]), path(&["e\u{301}"]));
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            // Characters that broke the seed, escapes and separators.
            proptest::collection::vec(
                prop::sample::select(vec![
                    'A', 'B', '/', ';', '*', '?', '[', ']', ':', '%', '\\', '{', '}', ' ', '\0', '\n', 'é', '0', '2',
                    'F'
                ]),
                1..6
            )
            .prop_map(|chars| chars.into_iter().collect()),
            "\\PC{1,12}",
            any::<String>().prop_filter("non-empty", |s| !s.is_empty() && s.len() <= MAX_SEGMENT_BYTES),
        ]
    }

    fn lock_path() -> impl Strategy<Value = LockPath> {
        proptest::collection::vec(segment(), 1..5).prop_map(|segments| LockPath::new(segments).expect("valid"))
    }

    proptest! {
        #[test]
        fn text_form_round_trips(p in lock_path()) {
            prop_assert_eq!(LockPath::parse(&p.to_string())?, p);
        }

        #[test]
        fn key_round_trips(p in lock_path()) {
            let decoded = LockPath::from_key(p.key())?;
            prop_assert!(decoded.segments().eq(p.segments()));
        }

        #[test]
        fn keys_are_utf8_without_nul_or_ff(p in lock_path()) {
            prop_assert!(!p.key().contains('\0'));
            prop_assert!(!p.key().as_bytes().contains(&0xFF));
        }

        #[test]
        fn descendant_is_exactly_a_longer_key_with_the_prefix(a in lock_path(), b in lock_path()) {
            let segment_wise = b.depth() > a.depth() && b.segments().take(a.depth()).eq(a.segments());
            let key_wise = b.key().len() > a.key().len() && b.key().starts_with(a.key());
            prop_assert_eq!(segment_wise, key_wise);
            prop_assert_eq!(segment_wise, a.is_ancestor_of(&b));
            let in_range = b.key() > a.key() && *b.key() < *a.key_range_end();
            prop_assert_eq!(segment_wise, in_range);
            prop_assert_eq!(a.segments().eq(b.segments()), a.key() == b.key());
        }

        #[test]
        fn extending_a_path_makes_a_descendant(a in lock_path(), extra in proptest::collection::vec(segment(), 1..3)) {
            let segments: Vec<String> = a.segments().map(str::to_owned).chain(extra).collect();
            if let Ok(b) = LockPath::new(segments) {
                prop_assert!(a.is_ancestor_of(&b));
                let ancestors = b.ancestors();
                prop_assert_eq!(ancestors.get(a.depth() - 1), Some(&a));
            }
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,40}") {
            if let Ok(p) = LockPath::parse(&text) {
                prop_assert_eq!(p.to_string(), text);
            }
        }
    }
}
