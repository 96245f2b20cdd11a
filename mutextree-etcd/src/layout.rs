//! The keys and values this store writes, shared by native grants and the
//! stepwise primitives so that both kinds of client see each other's locks.
//!
//! # Two key spaces
//!
//! Every live item of a grant is one key, in the space of its mode, under
//! the namespace's prefix `<prefix>/<namespace>/`:
//!
//! ```text
//! x/<path key>/<owner>\x1f            an Exclusive item (or a stepwise lock)
//! x/<path key>/<owner>\x1f<nonce>     an Exclusive item whose key a mode change replaced
//! s/<path key>/<owner>\x1f<nonce>     a Shared item
//! ```
//!
//! The path key ([`LockPath::key`]) ends every segment with `/` and never
//! holds an empty segment, so after it a second `/` can only mean "the node
//! itself": three distinct ranges fall out of one key space:
//!
//! * the **subtree** of `[A, B]`, `[x/A/B/, x/A/B0)`: its holders and every
//!   descendant's, never `[A, BC]`'s;
//! * the **holders** of `[A, B]` itself, `[x/A/B//, x/A/B/0)`: never a
//!   descendant's (whose key goes on with a segment, not a `/`);
//! * **one owner's** holders of `[A, B]`, `x/A/B//<owner>\x1f` and on:
//!   the owner id has no control character, so the unit separator (`0x1F`)
//!   ends it. (No NUL: keys stay text every store and tool can show.)
//!
//! Several Shared holders coexist on one node, so a key cannot be just the
//! node: the owner and a random nonce make it unique. An Exclusive item has
//! its node to itself, so its key needs no nonce, and the owner's next
//! Exclusive grant on the node writes the same key again. That matters to
//! etcd: a deleted key stays in its index until a compaction (which is off
//! by default), and a range compare walks every key of its range, deleted
//! ones too; a new key per grant would make each grant on a node slower
//! than the last. (A mode change that keeps an item Exclusive cannot put
//! and delete one key in one transaction, so it takes a nonce.) The fencing token
//! cannot be in the key (it is the revision of the transaction that writes
//! the key), so release, refresh and mode changes find a grant's key through
//! its owner's range and its create revision (see the backend module).
//!
//! Prefix and namespace cannot contain `/`, so two namespaces (or prefixes)
//! never share a key.
//!
//! # Reservations
//!
//! A fair waiter's reservation is one key per item in a third space, and
//! one more per Exclusive item in a fourth:
//!
//! ```text
//! r/<path key>/x<owner>\x1f<tag>     an Exclusive item awaited
//! r/<path key>/s<owner>\x1f<tag>     a Shared item awaited
//! rx/<path key>/<owner>\x1f<tag>     an Exclusive item awaited (the index below)
//! ```
//!
//! The mode letter comes right after the node's `//`, so the reservations
//! on a node that conflict with a request are one range whatever its mode
//! (`r/A//` for an Exclusive request, `r/A//x` for a Shared one), and the
//! subtree of `r/` holds every reservation at or below a node. A Shared
//! request must not wait for Shared reservations below it, which the
//! subtree of `r/` mixes in: the `rx/` space holds the Exclusive ones alone.
//! So a request needs one range per item and ancestor, never two.
//!
//! The ticket cannot be in the key: it is the revision of the refused
//! transaction that writes the key (its create revision). The tag (16 hex
//! digits) tells apart the waits of one owner on one node. A backend takes
//! a new tag only when none of its ended waits' tags is free, and a tag is
//! free once its keys are gone: etcd's range compares walk deleted keys too
//! (until a compaction), and a new key per wait would make every request on
//! a busy node slower than the last, as a new key per grant would.
//!
//! One more key, `q` (the rewrite mark), is put whenever a reservation is
//! written again after its keys were gone: its ticket is then older than
//! its keys, which waiters cannot tell from the keys alone (see the
//! backend module's `Fair`). It is outside every space above.
//!
//! # Values and leases
//!
//! The value is one byte for the kind (`L` a lock, `T` a stepwise client's
//! transient parent lock), then the owner id. It never changes while the
//! grant lives (a refresh re-puts the same bytes on a new lease). Each key is
//! on a lease, its ttl the grant's; all the keys of one grant are on one
//! lease. Expiry, revocation and deletion all remove a key, which is what
//! etcd's watch reports.
//!
//! A reservation's value is `Q`, its ticket in decimal where it is not the
//! key's create revision (a reservation written again after it lapsed),
//! `@` and the time its waiter joined the queue, the unit separator, then
//! the owner id. Reservations are on short leases of their own (see the
//! backend module).
//!
//! etcd keeps no time, so the join time is the waiter's own clock's (unix
//! milliseconds, rounded up), read by the attempt that took the ticket;
//! its renewals and rewrites put it again unchanged, so that a listing can
//! say how long the waiter has been in line, by the reading client's clock
//! (a skew between the two clocks shows in it). A value without one,
//! written before join times were kept, still reads (as a waiter that has
//! not waited); the other way round, that version cannot read a value
//! with one.
//!
//! # Revocations
//!
//! A forced release announces itself to its holder with one key in a
//! fifth space, on a short lease of its own:
//!
//! ```text
//! v/<token>     its value: "<token> <owner>" (a revocation's message)
//! ```
//!
//! Holders watch the puts of this space alone: a key per revocation, since
//! the token is unique, gone with its lease. No other range of the store
//! covers it, and the waiters' watch of the namespace ignores it.

use mutextree_core::backend::LockKind;
use mutextree_core::{Error, LockPath, Mode, Owner};

use crate::error::STORE;

/// A half-open key range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Range {
    pub(crate) start: String,
    pub(crate) end: String,
}

impl Range {
    /// The range of the keys that start with `prefix` (which ends with an
    /// ASCII character below `0x7F`).
    fn prefixed(prefix: String) -> Self {
        let mut end = prefix.clone();
        let last = end.pop().expect("a prefix is not empty");
        end.push(char::from(last as u8 + 1));
        Range { start: prefix, end }
    }

    /// The range of exactly one key.
    pub(crate) fn key(key: &[u8]) -> Self {
        let start = String::from_utf8_lossy(key).into_owned();
        let mut end = start.clone();
        end.push('\0');
        Range { start, end }
    }

    /// This range without `key`: up to two ranges, either possibly empty
    /// (and then left out).
    pub(crate) fn without(&self, key: &str) -> Vec<Range> {
        let mut after = key.to_owned();
        after.push('\0');
        let below = Range { start: self.start.clone(), end: key.min(&self.end).to_owned() };
        let above = Range { start: after.max(self.start.clone()), end: self.end.clone() };
        [below, above].into_iter().filter(|range| range.start < range.end).collect()
    }
}

/// The key spaces of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// `<prefix>/<namespace>/`: every key of the namespace starts with it.
    namespace_prefix: String,
}

impl Layout {
    pub(crate) fn new(prefix: &str, namespace: &str) -> Self {
        Layout { namespace_prefix: format!("{prefix}/{namespace}/") }
    }

    /// The key of a new item in `mode` on `path` for `owner`: for an
    /// Exclusive item, the owner's one key on the node (nothing else of the
    /// space is on the node while it lives); for a Shared one, a key unique
    /// by a random nonce.
    pub(crate) fn new_key(&self, mode: Mode, path: &LockPath, owner: &Owner) -> String {
        match mode {
            Mode::Exclusive => self.owned(mode, path, owner).start,
            Mode::Shared => self.fresh_key(mode, path, owner),
        }
    }

    /// A key in `mode` on `path` for `owner` unique by a random nonce,
    /// whichever the mode: for an item whose new key must differ from the
    /// one it has.
    pub(crate) fn fresh_key(&self, mode: Mode, path: &LockPath, owner: &Owner) -> String {
        let mut key = self.owned(mode, path, owner).start;
        key.push_str(&format!("{:016x}", fastrand::u64(..)));
        key
    }

    /// The keys of `path` and of all its descendants, in `mode`'s space.
    pub(crate) fn subtree(&self, mode: Mode, path: &LockPath) -> Range {
        let mut start = self.space(mode);
        start.push_str(path.key());
        Range::prefixed(start)
    }

    /// The keys of the items on `path` itself (not its descendants), in
    /// `mode`'s space.
    pub(crate) fn holders(&self, mode: Mode, path: &LockPath) -> Range {
        Range::prefixed(self.node_prefix(mode, path))
    }

    /// The keys of `owner`'s items on `path` itself, in `mode`'s space.
    pub(crate) fn owned(&self, mode: Mode, path: &LockPath, owner: &Owner) -> Range {
        let mut start = self.node_prefix(mode, path);
        start.push_str(owner.as_str());
        start.push(OWNER_END);
        Range::prefixed(start)
    }

    /// The keys of every grant's items: the Exclusive and the Shared space.
    pub(crate) fn grants(&self) -> [Range; 2] {
        [Range::prefixed(self.space(Mode::Exclusive)), Range::prefixed(self.space(Mode::Shared))]
    }

    /// The keys of a reservation of an item in `mode` on `path` for
    /// `owner`'s wait with `tag`: one in the space of all reservations, and
    /// for an Exclusive item one in the space of the Exclusive ones.
    pub(crate) fn reservation_keys(&self, mode: Mode, path: &LockPath, owner: &Owner, tag: &str) -> Vec<String> {
        let mut awaited = self.awaited_prefix(path);
        awaited.push(mode_letter(mode));
        let mut keys = vec![awaited];
        if mode == Mode::Exclusive {
            keys.push(self.node_prefix_in(EXCLUSIVE_AWAITED, path));
        }
        for key in &mut keys {
            key.push_str(owner.as_str());
            key.push(OWNER_END);
            key.push_str(tag);
        }
        keys
    }

    /// The tag of a reservation's key.
    pub(crate) fn reservation_tag<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let end = key.iter().rposition(|byte| *byte == OWNER_END as u8)?;
        std::str::from_utf8(&key[end + 1..]).ok()
    }

    /// The reservations on `path` itself that conflict with a request in
    /// `mode`: all of them for an Exclusive request, the Exclusive ones for
    /// a Shared one.
    pub(crate) fn awaited_on(&self, path: &LockPath, mode: Mode) -> Range {
        let mut prefix = self.awaited_prefix(path);
        if mode == Mode::Shared {
            prefix.push(mode_letter(Mode::Exclusive));
        }
        Range::prefixed(prefix)
    }

    /// The reservations on `path` and below it that conflict with a request
    /// in `mode` (as [`Self::awaited_on`]).
    pub(crate) fn awaited_below(&self, path: &LockPath, mode: Mode) -> Range {
        let space = match mode {
            Mode::Exclusive => AWAITED,
            Mode::Shared => EXCLUSIVE_AWAITED,
        };
        Range::prefixed(format!("{}{space}{}", self.namespace_prefix, path.key()))
    }

    /// Every reservation's keys: both reservation spaces.
    pub(crate) fn reservations(&self) -> [Range; 2] {
        [AWAITED, EXCLUSIVE_AWAITED].map(|space| Range::prefixed(format!("{}{space}", self.namespace_prefix)))
    }

    /// The key a reservation written again puts (see the backend module's
    /// `Fair`): its mod revision says when a reservation last came back
    /// with a ticket older than its keys. Not a lock's nor a reservation's
    /// key (no space of theirs starts with `q`).
    pub(crate) fn rewrite_mark(&self) -> String {
        format!("{}{REWRITE_MARK}", self.namespace_prefix)
    }

    /// Whether a key of this namespace is a reservation's.
    pub(crate) fn is_reservation(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.namespace_prefix.as_bytes()).is_some_and(|rest| rest.starts_with(b"r"))
    }

    /// The key announcing the revocation of the grant with `token`.
    pub(crate) fn revocation_key(&self, token: u64) -> String {
        format!("{}{REVOKED}{token}", self.namespace_prefix)
    }

    /// The prefix of every revocation's key (for the holders' watch).
    pub(crate) fn revocations(&self) -> String {
        format!("{}{REVOKED}", self.namespace_prefix)
    }

    /// The prefix every key of the namespace starts with (for the watch).
    pub(crate) fn namespace_prefix(&self) -> &str {
        &self.namespace_prefix
    }

    /// The node and mode of a key of this namespace.
    pub(crate) fn item_of(&self, key: &[u8]) -> Result<(LockPath, Mode), Error> {
        let key = std::str::from_utf8(key).map_err(|_| foreign("a key that is not UTF-8"))?;
        let (path_key, mode) = self.path_key_of(key).ok_or_else(|| foreign(&format!("the key {key:?}")))?;
        let path = LockPath::from_key(path_key).map_err(|_| foreign(&format!("the key {key:?}")))?;
        Ok((path, mode))
    }

    /// The path key ([`LockPath::key`], unchecked) and mode a key of this
    /// namespace names: a grant's item or a reservation's.
    pub(crate) fn path_key_of<'k>(&self, key: &'k str) -> Option<(&'k str, Mode)> {
        let in_namespace = key.strip_prefix(&*self.namespace_prefix)?;
        let (mode, rest) = if let Some(rest) = in_namespace.strip_prefix("x/") {
            (Some(Mode::Exclusive), rest)
        } else if let Some(rest) = in_namespace.strip_prefix(EXCLUSIVE_AWAITED) {
            (Some(Mode::Exclusive), rest)
        } else if let Some(rest) = in_namespace.strip_prefix(AWAITED) {
            (None, rest)
        } else {
            (Some(Mode::Shared), in_namespace.strip_prefix("s/")?)
        };
        // The first `//` ends the path key: an encoded segment is never empty.
        let end = rest.find("//")? + 1;
        let mode = match mode {
            Some(mode) => mode,
            // In the space of all reservations, the letter after the `//`.
            None => match rest.as_bytes().get(end + 1)? {
                b'x' => Mode::Exclusive,
                b's' => Mode::Shared,
                _ => return None,
            },
        };
        Some((&rest[..end], mode))
    }

    /// `<namespace prefix>x/` or `…s/`.
    fn space(&self, mode: Mode) -> String {
        let mut space = String::with_capacity(self.namespace_prefix.len() + 2);
        space.push_str(&self.namespace_prefix);
        space.push_str(match mode {
            Mode::Exclusive => "x/",
            Mode::Shared => "s/",
        });
        space
    }

    /// What every key of an item on `path` in `mode` starts with: the
    /// path key and one more `/`.
    fn node_prefix(&self, mode: Mode, path: &LockPath) -> String {
        let mut prefix = self.space(mode);
        prefix.push_str(path.key());
        prefix.push('/');
        prefix
    }

    /// What every key of a reservation on `path` starts with, before the
    /// mode letter.
    fn awaited_prefix(&self, path: &LockPath) -> String {
        self.node_prefix_in(AWAITED, path)
    }

    /// `<namespace prefix><space><path key>/`.
    fn node_prefix_in(&self, space: &str, path: &LockPath) -> String {
        format!("{}{space}{}/", self.namespace_prefix, path.key())
    }
}

/// The space of all reservations, and that of the Exclusive ones.
const AWAITED: &str = "r/";
/// The space of revocations' keys.
const REVOKED: &str = "v/";
const EXCLUSIVE_AWAITED: &str = "rx/";
/// The key of [`Layout::rewrite_mark`], after the namespace's prefix.
const REWRITE_MARK: &str = "q";

/// The letter of a mode in a reservation's key.
fn mode_letter(mode: Mode) -> char {
    match mode {
        Mode::Exclusive => 'x',
        Mode::Shared => 's',
    }
}

/// Ends the owner id in a key: a control character, which no owner id has.
const OWNER_END: char = '\x1f';

const LOCK: u8 = b'L';
const TRANSIENT: u8 = b'T';

/// The value stored under an item's key.
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

const RESERVATION: u8 = b'Q';
/// Starts the join time in a reservation's value.
const JOINED: u8 = b'@';

/// What a reservation's keys hold: its ticket, its owner, and when its
/// waiter joined the queue, in unix milliseconds by the waiter's clock
/// (`None` in a value written before join times were kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reservation {
    pub(crate) ticket: u64,
    pub(crate) owner: Owner,
    pub(crate) joined: Option<u64>,
}

/// The value stored under a reservation's keys: its ticket where it is not
/// the keys' create revision, the time its waiter joined, and its owner.
pub(crate) fn encode_reservation(ticket: Option<u64>, joined: u64, owner: &Owner) -> Vec<u8> {
    let mut value = vec![RESERVATION];
    if let Some(ticket) = ticket {
        value.extend_from_slice(ticket.to_string().as_bytes());
    }
    value.push(JOINED);
    value.extend_from_slice(joined.to_string().as_bytes());
    value.push(OWNER_END as u8);
    value.extend_from_slice(owner.as_str().as_bytes());
    value
}

/// A stored reservation whose key was created at `create_revision`.
pub(crate) fn decode_reservation(value: &[u8], create_revision: i64) -> Result<Reservation, Error> {
    let malformed = || foreign("a value that is not a reservation record");
    let number = |digits: &[u8]| std::str::from_utf8(digits).ok().and_then(|digits| digits.parse::<u64>().ok());
    let rest = value.strip_prefix(&[RESERVATION]).ok_or_else(malformed)?;
    let end = rest.iter().position(|byte| *byte == OWNER_END as u8).ok_or_else(malformed)?;
    let (ticket, joined) = match rest[..end].iter().position(|byte| *byte == JOINED) {
        Some(at) => (&rest[..at], Some(number(&rest[at + 1..end]).ok_or_else(malformed)?)),
        None => (&rest[..end], None),
    };
    let ticket = match ticket {
        [] => u64::try_from(create_revision).map_err(|_| malformed())?,
        digits => number(digits).ok_or_else(malformed)?,
    };
    let owner = std::str::from_utf8(&rest[end + 1..]).map_err(|_| foreign("an owner id that is not UTF-8"))?;
    let owner = Owner::new(owner).map_err(|_| foreign("an invalid owner id"))?;
    Ok(Reservation { ticket, owner, joined })
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

    fn owner(text: &str) -> Owner {
        Owner::new(text).expect("owner")
    }

    fn contains(range: &Range, key: &str) -> bool {
        range.start.as_str() <= key && key < range.end.as_str()
    }

    #[test]
    fn subtree_holders_and_owned_ranges_are_distinct() {
        let layout = Layout::new("mt", "app");
        let me = owner("web-1");
        let key = |mode, at: &str, who: &str| layout.new_key(mode, &path(at), &owner(who));
        let x = Mode::Exclusive;
        assert_eq!(key(x, "A/B", "web-1"), "mt/app/x/A/B//web-1\x1f", "one Exclusive key per owner and node");
        let s = Mode::Shared;
        assert!(key(s, "A/B", "web-1").starts_with("mt/app/s/A/B//web-1\x1f"));
        assert_eq!(key(s, "A/B", "web-1").len(), "mt/app/s/A/B//web-1\x1f".len() + 16);
        assert_ne!(key(s, "A/B", "web-1"), key(s, "A/B", "web-1"), "a nonce each");
        let fresh = layout.fresh_key(x, &path("A/B"), &me);
        assert!(fresh.starts_with("mt/app/x/A/B//web-1\x1f") && fresh.len() == "mt/app/x/A/B//web-1\x1f".len() + 16);
        assert_ne!(fresh, layout.fresh_key(x, &path("A/B"), &me), "a nonce each");

        let subtree = layout.subtree(x, &path("A/B"));
        let holders = layout.holders(x, &path("A/B"));
        let owned = layout.owned(x, &path("A/B"), &me);
        for (at, who, in_subtree, in_holders, in_owned) in [
            ("A/B", "web-1", true, true, true),
            ("A/B", "web-10", true, true, false),
            ("A/B", "web", true, true, false),
            ("A/B", " web-1", true, true, false),
            ("A/B/C", "web-1", true, false, false),
            ("A/B/ C", "web-1", true, false, false),
            ("A/B/!", "web-1", true, false, false),
            ("A/B/%2F", "web-1", true, false, false),
            ("A/BC", "web-1", false, false, false),
            ("A/B C", "web-1", false, false, false),
            ("A", "web-1", false, false, false),
        ] {
            let key = key(x, at, who);
            assert_eq!(contains(&subtree, &key), in_subtree, "{key:?} in the subtree");
            assert_eq!(contains(&holders, &key), in_holders, "{key:?} among the holders");
            assert_eq!(contains(&owned, &key), in_owned, "{key:?} among web-1's");
        }
        let shared = key(Mode::Shared, "A/B", "web-1");
        assert!(!contains(&subtree, &shared), "the spaces are apart");
        assert!(contains(&layout.subtree(Mode::Shared, &path("A")), &shared));
        let [exclusive, shared_space] = layout.grants();
        assert_eq!((exclusive.start.as_str(), exclusive.end.as_str()), ("mt/app/x/", "mt/app/x0"));
        assert!(contains(&shared_space, &shared) && !contains(&exclusive, &shared));
        assert!(!contains(&exclusive, &Layout::new("mt", "app2").new_key(x, &path("A"), &me)));
        let awaited = layout.reservation_keys(x, &path("A"), &me, "0123456789abcdef");
        assert!(awaited.iter().all(|key| !contains(&exclusive, key) && !contains(&shared_space, key)));
    }

    /// A request's reservation ranges hold exactly the reservations that
    /// conflict with it: on the node itself and below it, any mode for an
    /// Exclusive request and Exclusive ones for a Shared request; never a
    /// sibling's, nor a node's whose name extends this one's.
    #[test]
    fn reservation_ranges_hold_the_conflicting_reservations() {
        let layout = Layout::new("mt", "app");
        let (x, s) = (Mode::Exclusive, Mode::Shared);
        let keys = |mode, at: &str| layout.reservation_keys(mode, &path(at), &owner("w"), "t1");
        assert_eq!(keys(x, "A/B"), ["mt/app/r/A/B//xw\x1ft1", "mt/app/rx/A/B//w\x1ft1"]);
        assert_eq!(keys(s, "A/B"), ["mt/app/r/A/B//sw\x1ft1"]);
        assert_eq!(layout.reservation_tag(keys(s, "A/B")[0].as_bytes()), Some("t1"));
        let holds = |range: &Range, mode, at: &str| keys(mode, at).iter().any(|key| contains(range, key));
        for asked in [x, s] {
            let on_node = layout.awaited_on(&path("A/B"), asked);
            let at_or_below = layout.awaited_below(&path("A/B"), asked);
            for (mode, at, is_on, is_below) in [
                (x, "A/B", true, true),
                (s, "A/B", asked == x, asked == x),
                (x, "A/B/C", false, true),
                (s, "A/B/C", false, asked == x),
                (x, "A/B/ C", false, true),
                (x, "A/BC", false, false),
                (x, "A/B C", false, false),
                (x, "A", false, false),
                (x, "A/C", false, false),
            ] {
                assert_eq!(holds(&on_node, mode, at), is_on, "{asked:?} asks: {mode:?} on {at} on the node");
                assert_eq!(holds(&at_or_below, mode, at), is_below, "{asked:?} asks: {mode:?} on {at} below");
            }
        }
        for mode in [x, s] {
            for key in keys(mode, "a\\/b/ü c") {
                assert_eq!(layout.item_of(key.as_bytes()).expect("ours"), (path("a\\/b/ü c"), mode));
                assert!(layout.is_reservation(key.as_bytes()));
                assert!(layout.reservations().iter().any(|range| contains(range, &key)));
            }
        }
        assert!(!layout.is_reservation(layout.new_key(x, &path("r"), &owner("w")).as_bytes()));
        let reservation = |ticket, joined| Reservation { ticket, owner: owner("w 1"), joined };
        let value = encode_reservation(None, 1_733_400_000_123, &owner("w 1"));
        assert_eq!(decode_reservation(&value, 42).expect("ours"), reservation(42, Some(1_733_400_000_123)));
        let value = encode_reservation(Some(7), 0, &owner("w 1"));
        assert_eq!(decode_reservation(&value, 42).expect("ours"), reservation(7, Some(0)));
        assert!(decode_value(&value).is_err(), "not a grant's value");
        // Written before join times were kept.
        assert_eq!(decode_reservation(b"Q\x1fw 1", 42).expect("ours"), reservation(42, None));
        assert_eq!(decode_reservation(b"Q7\x1fw 1", 42).expect("ours"), reservation(7, None));
        for foreign in [&b"Lw"[..], b"Q7w", b"Q7@\x1fw", b"Q@x\x1fw", b"Q7@1@2\x1fw", b"Qx@1\x1fw"] {
            assert!(decode_reservation(foreign, 42).is_err(), "{foreign:?}");
        }
    }

    #[test]
    fn a_range_without_a_key() {
        let range = Range { start: "b".into(), end: "d".into() };
        let starts = |ranges: Vec<Range>| ranges.into_iter().map(|r| (r.start, r.end)).collect::<Vec<_>>();
        assert_eq!(starts(range.without("c")), [("b".into(), "c".into()), ("c\0".into(), "d".into())]);
        assert_eq!(starts(range.without("a")), [("b".into(), "d".into())]);
        assert_eq!(starts(range.without("e")), [("b".into(), "d".into())]);
        assert_eq!(starts(Range::key(b"c").without("e")), [("c".into(), "c\0".into())]);
        assert_eq!(starts(Range::key(b"c").without("c")), Vec::<(String, String)>::new());
    }

    /// The Exclusive space of this store's layout, for the property checks
    /// core's fuzz targets run: a node's key is where its subtree starts
    /// (its holders' keys go on from there, as the test above checks).
    struct Exclusive(Layout);

    impl mutextree_core::checks::KeyLayout for Exclusive {
        fn key(&self, path: &LockPath) -> String {
            self.0.subtree(Mode::Exclusive, path).start
        }

        fn ancestor_keys(&self, path: &LockPath) -> Vec<String> {
            path.ancestors().iter().map(|ancestor| self.key(ancestor)).collect()
        }

        fn subtree(&self, path: &LockPath) -> (String, String) {
            let range = self.0.subtree(Mode::Exclusive, path);
            (range.start, range.end)
        }

        fn path_of(&self, key: &str) -> Option<LockPath> {
            let holder = format!("{key}/owner{OWNER_END}");
            self.0.item_of(holder.as_bytes()).ok().map(|(path, _)| path)
        }
    }

    /// The prefix and the spaces keep every property of the path keys: the
    /// fuzz seeds of `path_keys`, through this layout.
    #[test]
    fn the_layout_keeps_the_key_properties() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/path_keys");
        let layout = Exclusive(Layout::new("mt", "app"));
        mutextree_core::checks::replay_seeds(&corpus, |data| mutextree_core::checks::path_keys_with(&layout, data));
    }

    #[test]
    fn revocations_are_in_no_other_space() {
        let layout = Layout::new("mt", "app");
        let key = layout.revocation_key(42);
        assert_eq!(key, "mt/app/v/42");
        assert!(key.starts_with(&layout.revocations()));
        let others = layout.grants().into_iter().chain(layout.reservations());
        assert!(others.into_iter().all(|range| !contains(&range, &key)), "a revocation seen as a lock");
        assert!(layout.path_key_of(&key).is_none(), "the waiters' watch reads it as a node");
        assert!(!layout.is_reservation(key.as_bytes()));
    }

    #[test]
    fn keys_and_values_round_trip() {
        let layout = Layout::new("mt", "app");
        for text in ["A", "a\\/b/c", "%2F/;*?[", "🔒/名前"] {
            let node = path(text);
            for mode in [Mode::Shared, Mode::Exclusive] {
                for key in
                    [layout.new_key(mode, &node, &owner("o//x/")), layout.fresh_key(mode, &node, &owner("o//x/"))]
                {
                    assert_eq!(layout.item_of(key.as_bytes()).expect("ours"), (node.clone(), mode));
                }
            }
        }
        assert!(layout.item_of(b"mt/other/x/A//o\x1f").is_err());
        assert!(layout.item_of(b"mt/app/A//o\x1f").is_err(), "no space");
        assert!(layout.item_of(b"mt/app/x/A/").is_err(), "no holder");
        let owner = owner("web-1 (pid 7)");
        assert_eq!(decode_value(&encode_value(LockKind::Lock, &owner)).expect("ours"), (false, owner.clone()));
        assert_eq!(decode_value(&encode_value(LockKind::Transient, &owner)).expect("ours"), (true, owner));
        assert!(decode_value(b"").is_err());
        assert!(decode_value(b"Xowner").is_err());
        assert!(decode_value(b"L").is_err(), "empty owner");
    }
}
