//! The objects the store keeps in its schema, and the migrations that
//! create them.
//!
//! # Why functions
//!
//! Every tree operation must be one round trip and atomic. A single SQL
//! statement cannot do it safely: a statement takes its snapshot before it
//! waits on a lock, so a check in the statement (or in a CTE of it, or
//! anywhere in a REPEATABLE READ transaction) that waited for a concurrent
//! grant's advisory lock reads the rows as they were *before* that grant
//! committed, and grants again. A `VOLATILE` plpgsql function under READ
//! COMMITTED runs each statement with a fresh snapshot: it takes its advisory
//! locks in statements of their own, and only then reads, so it sees every
//! grant that held those locks before it.
//!
//! # Why these advisory locks
//!
//! A grant first tries its advisory locks without waiting. When every one
//! of them is free at once, which is the common case, it looks once, with
//! the locks held, and writes. Otherwise it first looks without waiting for
//! the rest: a live lock in the way refuses it at once, since it was live
//! at that instant, so refusals never queue behind the grants holding the
//! advisory locks. Only then does it wait for its locks, and look again
//! before it writes. (Until version 4 a grant always looked twice, once
//! before the locks and once after: three of the eleven statements of an
//! uncontended grant at depth 3.)
//!
//! For each of its items, whatever the item's mode, a grant takes a
//! *shared* transaction-scoped advisory lock on each ancestor's key and an
//! *exclusive* one on the item's node's key. (Both grant functions do: the
//! one for a single Exclusive item, see "One Exclusive item", takes
//! exactly the locks the general one would take for it.) Two items on comparable paths,
//! `P` an ancestor of `Q` or equal to it, always meet on `P`'s key: the
//! grant of `P` holds it exclusively, the grant of `Q` wants it shared (or
//! exclusively, for `P = Q`), so one grant commits (or gives up) before
//! the other takes the key, and that other one reads afterwards, in
//! statements of their own: it sees the first one's rows. Two *conflicting*
//! items are on comparable paths, so the second grant sees the first and
//! refuses. The argument does not depend on the modes: a Shared item takes
//! the same locks as an Exclusive one, and only its check counts fewer
//! rows as in the way (see "Modes and multi-path grants"). Nor on where a
//! Shared item's rows live (since version 7 a holder in `shared_holders`
//! and its node's marker in `locks`): both are written by the grant, under
//! the exclusive lock on the node's key, and an Exclusive check reads both
//! under the locks of its own items. Releases and refreshes take no
//! advisory lock: a release only removes rows, so a check that saw them
//! just before was right to refuse; a refresh only extends a live row,
//! which a check under the same locks would count in the way anyway; and
//! a marker left behind by its last holder's release is in nobody's way
//! (see "Modes and multi-path grants"). The price is
//! that two Shared grants of one
//! node, or of a node and its descendant, take turns for the moment of
//! their calls (both succeed); a Shared item could not take its node's key
//! shared, since a Shared `[A]` and an Exclusive `[A, B]` would then both
//! hold `A` shared, and check at once. Siblings only share their parents'
//! locks, so they never wait for each other. A stepwise client's
//! single-key lock takes the exclusive lock on its key too, so it
//! serialises with every native grant that passes through that key, which
//! is what the stepwise algorithm's argument needs (see
//! `mutextree_core::backend::stepwise`).
//!
//! A grant takes its locks in one global order, by key (bytewise, as the
//! table sorts them), each key once, exclusive if any of its items needs
//! it so: an ancestor's key sorts before its descendants', so a single
//! path still goes root first. Every call holds the locks it took until
//! it ends and only ever waits for a key after those it holds, so no set
//! of calls can wait for each other in a circle, however their items
//! cross.
//!
//! The keys are 64-bit hashes of namespace and key. A collision merges two
//! unrelated keys into one lock: that only serialises more than needed, but
//! it breaks the order (two keys sorted one way may hash the other way), so
//! two grants can then wait for each other; PostgreSQL aborts one with a
//! deadlock (SQLSTATE 40P01), which the client retries.
//!
//! # Modes and multi-path grants
//!
//! A grant has items, each a node in a mode, and one owner, token and
//! expiry. Since version 7 (as in the Redis store) a node has at most one
//! row in `locks`, whose primary key is (namespace, key): either its
//! Exclusive item (`mode` `exclusive`; a stepwise client's locks are
//! Exclusive rows), or the *marker* of its Shared holders (`mode`
//! `holders`, no owner, token 0), while each Shared item is a row of
//! `shared_holders`, whose primary key is (namespace, key, token). A Shared
//! grant writes its holder and its node's marker, or moves the marker's
//! expiry to its own if that is later: a marker lives at least as long as
//! its holders. A release removes the holder only, so a marker may outlive
//! its holders: it is in the way only while it has a live holder, and an
//! Exclusive grant over it, or the sweep once it expires, removes it.
//!
//! `try_grant_general` (in versions 5 and 6 `try_grant_items` and
//! `try_grant_queued`) checks the items one by one, under the locks of all
//! of them: an Exclusive item is blocked by any live Exclusive row on an
//! ancestor, on its node or below, and by any marker there with a live
//! holder; a Shared item only by an Exclusive row, so its cost does not
//! grow with the Shared holders around it (one marker per node). Every
//! lookup is by the primary key of `locks`, unique by key: an insert marks
//! the index entries of the key's earlier rows dead, so later lookups skip
//! them. A look that finds a marker first calls `first_in_the_way`, which
//! looks again counting only markers with a live holder and reports that
//! holder, in one snapshot (it is `STABLE`): the plain look of an
//! uncontended grant stays one index lookup. A refusal reports a blocker
//! for every blocked item; a grant (one token, one expiry, a row per item)
//! happens only if none is blocked. A single-key lock (the stepwise
//! primitive) is blocked by any live row on its key, Shared holders
//! included.
//!
//! Until version 6 every item was a row of `locks`, whose primary key was
//! (namespace, key, token), with a partial index on the Exclusive rows.
//! Measured with `pgbench` calling the functions, every lookup of a key
//! then walked the index entries of that key's earlier grants not yet
//! vacuumed, and every grant wrote one more index (see BENCHMARKS.md).
//!
//! A mode change is a call of the same function with the grant's token: it
//! takes the locks and runs the checks of a grant of the same items in
//! their new mode, not counting the grant's own rows, and on success gives
//! the items the new mode and a new token, with the same expiry (an
//! upgraded item's holder becomes its node's row in place of the marker,
//! which had no other live holder; a downgraded one's row becomes a holder
//! and its node's marker). Natively
//! nothing can be in the way of a downgrade; beside stepwise clients, a
//! key lock on an ancestor whose client has not yet looked below it is
//! (see `LockBackend::change_mode`), and the downgrade's locks meet that
//! key lock's on the ancestor's key, so the downgrade either sees its row
//! and is refused, or commits first, and the key lock's token is newer.
//! Release and refresh act on the rows of the grant's keys with its owner
//! and token, in `locks` or in `shared_holders`: every item at once (a
//! Shared holder's refresh also moves its marker's expiry).
//!
//! # Fair waiting
//!
//! Since version 6 the grant function (`try_grant_queued`, since version 7
//! `try_grant_general` and `try_grant_exclusive`) also honours the waiters'
//! queue (see `mutextree_core::Fairness`). A waiter's *reservation* is a
//! row of `reservations` per item of its request: key, mode, owner, ticket
//! (a value of the same sequence as the tokens), expiry
//! (`clock_timestamp()` plus `RESERVATION_TTL`) and, since version 7, the
//! time its waiter joined the queue (`joined_at`), which a renewal keeps:
//! listings and refusals report a reservation's time in line
//! (`HeldLock::waited`) as the present minus that, by the server's clock.
//! (A reservation that lapsed and was swept is written again with a new
//! one.) Its items conflict
//! with a request's exactly as a grant's would, and they are checked the
//! same way, after the grants: for an item that no grant is in the way
//! of, each ancestor's key by equality (the head of its queue: the
//! primary key is (namespace, key, ticket)) and the subtree by a range,
//! through a partial index on the Exclusive rows for a Shared item;
//! a try and a joining request count every live reservation, a waiter only
//! those with smaller tickets, so its own never blocks it. The refusal of a
//! joining request takes its ticket (`nextval`) and writes its reservation;
//! a waiter's refusal renews it (writing it again if it lapsed); a waiter's
//! grant deletes it: all in the same call. A grant that replaces its
//! reservation wakes nobody, since its items refuse exactly what the
//! reservation refused; `withdraw` (a wait that ends otherwise) does, as a
//! release does.
//!
//! The advisory-lock argument above covers reservations: a request that
//! writes a reservation when refused (a joining request or a waiter) never
//! takes the shortcut of looking without its locks, so a reservation's rows
//! are written, like a grant's, while its call holds the locks of its
//! items, and read by every check under the locks of the checking
//! request's items. A reservation and a request that conflict are on
//! comparable paths, so their calls meet on the upper path's key and one
//! commits before the other looks: every check sees every conflicting
//! reservation committed before it, and a ticket (drawn under the locks)
//! is never passed by a request whose check could not see it. Refusals that
//! write nothing (tries, barging requests) still look without waiting
//! first. Withdrawals take no advisory lock: removing a reservation only
//! lets requests through, and a check that saw it just before was right
//! to refuse.
//!
//! So that the queue costs nothing while nobody waits, `queues` holds per
//! namespace a mark that no reservation of the namespace lives past: a
//! call that writes a reservation moves the mark to twice the
//! reservation's life ahead, if the reservation would outlive it (once per
//! reservation's life in a namespace with waiters, not at every attempt;
//! the mark is written in the reservation's transaction, so a check that
//! sees the reservation sees the mark). A fair request first reads the
//! mark, one lookup of that small table's primary key, and looks for
//! reservations only while it lies ahead: an uncontended grant pays that
//! one lookup, which finds no row in a namespace that never queued, and a
//! mark in the past in one whose waiters have gone. Barging requests, the
//! stepwise primitive and mode changes do not read it.
//!
//! Since version 9 the schema has a mark of its own, which no reservation
//! of the schema outlives: the last value of the sequence `queue_mark`, in
//! seconds since the epoch, which the single Exclusive grant reads with one
//! function call (`pg_sequence_last_value`, no statement) before it reads
//! its namespace's: while nobody waits anywhere in the schema, that grant
//! reads no table for the queue at all (the lookup of `queues` was about
//! 4 % of the instructions the server ran for a grant and release). A
//! refusal that writes a reservation moves it to twice the reservation's
//! life ahead if the reservation would outlive it, under an advisory lock
//! of its own (seed 1), so that two moves never lower it. `setval` is not
//! transactional: the mark moves before the reservation commits (and
//! stays if that rolls back, which costs only lookups), so a check that
//! sees the reservation sees the mark. A mark that reads null (a role that
//! may not read the sequence, on a server that answers null rather than
//! refuse) counts as ahead. The step to version 9 starts it at the latest
//! namespace mark, or, on a schema that had a version before, ten minutes
//! ahead if that is later (see "Versions"). Clients need the same
//! privileges on `queue_mark` as on `tokens`: to read it, and to move it.
//!
//! Expired reservations are removed by the grants' bounded sweep (see
//! "Keeping the table small"); checks and listings ignore them until then.
//!
//! # One Exclusive item
//!
//! Most requests are one Exclusive item: since version 7 they call
//! `try_grant_exclusive` (since version 9 `grant_exclusive`), made for
//! that request, and every other one
//! (several items, a Shared item, a stepwise client's single-key lock, a
//! mode change) calls `try_grant_general`. Both answer in the same
//! columns. The single-item function does what the general one does for
//! such an item, without its loops over items, advisory keys and the
//! arrays that describe them, and without the branches for the other
//! modes and for mode changes: the same advisory locks in the same order
//! (each ancestor's key shared, root first, then the node's exclusively:
//! that is their order by key), the same look without waiting first
//! unless the refusal writes a reservation, the same checks of the grants
//! and of the queue (Barge, Try, Join, Waiting), the same reservation
//! written, renewed or removed, and the same bounded sweep. It reads the
//! namespace's queue mark only when no grant is in the way, or when the
//! refusal writes a reservation (to move the mark only when it must). On
//! a server measured with `pgbench` calling the functions, the general
//! function spent 15 to 20 µs more on such a request than one made for
//! it.
//!
//! PL/pgSQL prepares every expression it evaluates again in every
//! transaction, and every call is a transaction of its own: measured with
//! `cachegrind` on the server, ten more `IF`s cost a grant and release
//! about 5 % more instructions. So `grant_exclusive` (version 9) is
//! written for the fewest on its way to a grant: its look takes the first
//! live row on an ancestor's key or in the subtree as the blocker when it
//! is a held Exclusive row, and leaves the rest (a stepwise client's
//! transient row, a marker, which counts only with a live holder) to
//! `exclusive_blocker`, which checks the long way; it keeps no flags its
//! rows can answer, and builds the refusal's arrays only on a refusal. It
//! answers a `grant_answer`, a named composite type in the columns of the
//! other grant functions: PostgreSQL finds a named type's columns in its
//! cache, where a function with `OUT` parameters builds them at every
//! call. And a grant of one Exclusive item is released by `release`
//! (version 3's function, kept for older clients), which removes one
//! key's row, where `release_items` walks an array of keys and looks in
//! `shared_holders` for what it did not find: 2 % of a grant and release,
//! in instructions.
//!
//! # Why the server's clock, read at the call
//!
//! Expiry is judged by `clock_timestamp()` (the present), read once after
//! the locks were taken, never by `now()` (the start of the transaction) nor
//! by a client's clock.
//!
//! # Keeping the table small
//!
//! A grant removes the expired rows of the subtree of each Exclusive item,
//! and the markers there (none has a live holder, or the grant would have
//! been refused), and the expired Exclusive rows under each Shared item
//! (its holders stay unread: a node's marker stands for them); and one grant in
//! 128 for each of its items, on average (the token modulo 128 below the
//! number of items), also removes up to 256 expired rows anywhere, oldest
//! first, through the index on `expires_at` (and since version 6 up to 256
//! expired reservations, since version 7 up to 256 expired Shared holders,
//! through theirs): a bounded amount of work per
//! grant, and the tables hold little more than the live locks and waiters.
//!
//! # Plans
//!
//! A statement in a plpgsql function is planned once per connection
//! (generic plan) or at every call for the values of that call (custom
//! plans); PostgreSQL picks custom plans when they look cheaper, which is
//! a matter of the table's statistics. Version 1 left that choice open,
//! and once `ANALYZE` had seen locks held with long ttls, the planner
//! estimated `expires_at <= now` (the subtree's cleanup) to match nothing:
//! it planned that `DELETE` at every call, read the index on `expires_at`
//! from its lowest entry instead of the subtree's range of the primary key,
//! and, to estimate, also looked up the index's actual lowest entry at every
//! plan. Both walk the entries of released rows that vacuum has not removed
//! yet, so a grant cost 2–3× more as soon as the table had statistics,
//! however many locks were held (10k or 100k alike).
//!
//! So, since version 2, the statements of a grant or a refresh that find
//! rows by their primary key test expiry as a difference
//! (`expires_at - now > interval '0'`), which no index serves and no
//! statistics describe, and the grant and refresh functions run with
//! `plan_cache_mode = force_generic_plan`: each statement is planned once
//! per connection (and again when the table's statistics change), never
//! for the values of a call. The sweep alone reads the index on
//! `expires_at`, on purpose. Since version 5 the rows of a grant's items
//! are found one key at a time (`key = keys[i]`), never by
//! `key = ANY (keys)`: for that one, depending on the statistics, the
//! planner may scan the namespace's whole range of the primary key and
//! filter the keys. A test reads the index pages each operation costs.
//!
//! # Wake-ups
//!
//! A release that removed a live grant sends `NOTIFY` on the schema's
//! channel, but only if a live session listens for its namespace: a
//! notifying commit holds a database-wide lock from before its commit
//! record until that record is flushed, so with `fsync` on, releases that
//! notify get no group commit (they flush one at a time), and most releases
//! have nobody waiting. Since version 3 the table `listeners` holds a row
//! (namespace, pid) for each listening connection, which a client opens the
//! first time one of its acquisitions in the namespace waits (see the
//! feed module). A release notifies if a row of its namespace names a
//! session that still runs (`pg_stat_get_activity(pid)`). Clients never
//! remove their row: when the session ends, the row is ignored (it costs a
//! look at the server's list of sessions, not a `NOTIFY`), and removed by
//! the next listening connection to open. A pid reused by another session
//! only costs a needless `NOTIFY`.
//!
//! A release that looked for listeners just before a new row committed
//! would not notify, and could commit after that listener's waiters looked
//! again; they would then sleep until the blocker's expiry. So a release
//! looks for listeners holding, until its commit, a *shared* advisory lock
//! on a key of the namespace (`hashtextextended` with seed 1, apart from
//! the grants' keys, seed 0), taken in a statement of its own before the
//! look; a listening connection adds its row in a transaction that first
//! takes that lock *exclusively*, and only then `LISTEN`s. Every release
//! then either looks after the row was committed, and notifies, or
//! committed before the row did. A release that commits after the
//! `LISTEN` has notified, and is heard; one that committed before it is
//! seen by the waiters, which all look again once the `LISTEN` is
//! confirmed. The exclusive lock is taken once per connection: the
//! namespace's releases wait for it for a moment, only then.
//!
//! # Versions
//!
//! 1. The table, its indexes, the token sequence and the three functions.
//! 2. `try_grant` and `refresh` replaced, with the same arguments and
//!    results, for the plans above.
//! 3. The table `listeners`, and `release` replaced, with the same
//!    arguments and result, to notify only when a session listens (see
//!    "Wake-ups").
//! 4. `try_grant` replaced, with the same arguments and results, to try
//!    its advisory locks before it looks (see "Why these advisory locks").
//! 5. Items and modes (see "Modes and multi-path grants"): the column
//!    `mode`, the primary key (namespace, key, token), the partial index
//!    `locks_exclusive`, and the functions `try_grant_items`,
//!    `release_items` and `refresh_items`. Rows already there become
//!    Exclusive items. The functions of version 4 stay, so that clients of
//!    that version still running while their schema is upgraded keep
//!    working: their grants take the same advisory locks and count every
//!    row as in the way, Shared ones included, so they never grant what
//!    the new rules refuse; only their single-key lock fails (its
//!    `ON CONFLICT` names the old primary key). Every statement of this
//!    step can run again on a schema it already changed.
//! 6. Fair waiting (see "Fair waiting"): the tables `reservations` and
//!    `queues`, and the functions `try_grant_queued` and `withdraw`. The
//!    grant functions of versions 4 and 5 stay, for clients of those
//!    versions still running while their schema is upgraded (until
//!    version 7): they neither
//!    read nor write reservations (they barge), and count the same grants
//!    as in the way as before. Every statement of this step can run again
//!    on a schema it already changed.
//! 7. A node's row unique by key again (see "Modes and multi-path
//!    grants"): the table `shared_holders`, the primary key of `locks`
//!    (namespace, key), the marker mode `holders`, the partial index
//!    `locks_exclusive` dropped. Under an exclusive lock on both tables,
//!    the Shared rows move to `shared_holders`, each node with holders
//!    gets its marker, and of a key's Exclusive rows (one live at most)
//!    the one that expires last stays. The grant function for one
//!    Exclusive item, `try_grant_exclusive` (see "One Exclusive item");
//!    the column `joined_at` of `reservations` (reservations already there
//!    count their time in line from the upgrade); `try_grant_general`,
//!    `try_grant_queued` for the new layout, reporting each reservation in
//!    the way with its time in line; the functions they call,
//!    `keep_reservation` (a refusal's reservation and mark),
//!    `sweep_expired` (the bounded sweep), `mark_holders` and
//!    `first_in_the_way`; and `release_items` and `refresh_items` for the
//!    new layout. The grant functions of versions 4 to 6 (`try_grant`,
//!    `try_grant_items`, `try_grant_queued`) would write Shared rows where
//!    no check looks for them: they are replaced by functions that raise
//!    an error (SQLSTATE 0A000) saying that grants need a client of
//!    schema version 7. Clients of those versions still running can still
//!    release and refresh what they hold (`release` and `refresh` touch
//!    Exclusive rows only, `release_items` and `refresh_items` know both
//!    tables), and a grant of theirs that was already running when the
//!    step began finishes before it (the step's table locks wait for it);
//!    their listings refuse a marker as unexpected (versions 5 and 6 by
//!    its mode `holders`, version 4 by its empty owner) rather than list a
//!    node's Shared holders wrongly. Every
//!    statement of this step can run again on a schema it already changed.
//! 8. The same work for less of the server's time, every argument and
//!    result unchanged, so clients of version 7 already connected keep
//!    working (one that connects afterwards refuses the newer schema, as
//!    every client does): the CHECK constraint on `locks.mode` dropped (PostgreSQL
//!    prepares a table's CHECK expressions again for every `INSERT` it
//!    runs: a third of an Exclusive grant's insert; only these functions
//!    write the table), and `try_grant_exclusive` and `release_items`
//!    replaced by versions that evaluate fewer PL/pgSQL expressions (each
//!    is prepared again in every transaction, and every call is a
//!    transaction of its own): what only a refusal needs is worked out on
//!    the refusal. Every statement of this step can run again.
//! 9. The same work again for less of the server's time: the type
//!    `grant_answer` and the functions `grant_exclusive` and
//!    `exclusive_blocker` (see "One Exclusive item"), which the client
//!    calls for one Exclusive item in place of `try_grant_exclusive`; the
//!    schema's queue mark, the sequence `queue_mark` (see "Fair waiting"),
//!    and `keep_reservation` replaced to move it too. The client releases
//!    a grant of one Exclusive item with `release`. `try_grant_exclusive`
//!    stays, so clients of version 8 already connected keep working: it
//!    reads the namespace's mark as before, and its refusals move both
//!    marks (through the new `keep_reservation`). A refusal of version 8
//!    that was already running when the step committed writes its
//!    namespace's mark only; on a schema that had a version before the
//!    step, the schema's mark starts ten minutes ahead, and that refusal's
//!    waiter renews its reservation (which moves the schema's mark)
//!    within a reservation's life of 3 s. Every statement of this step
//!    can run again.
//!
//! Each version is a fixed file in `src/migrations/`, its text exactly as
//! it was released, with only the schema's name spliced in. Installed
//! databases ran that text under its version number and never run it
//! again, so editing a released file would give fresh installs objects
//! that upgraded ones never get. A test pins every file's checksum; a
//! change is a new version, even when it repeats most of an older one
//! (versions 2 and 4 each restate all of `try_grant`, version 6 all of
//! `try_grant_items`, version 7 all of `try_grant_queued`).
//!
//! `schema_version` holds the version of the objects. A client migrates an
//! older schema step by step inside one transaction, under a transaction-
//! scoped advisory lock on the schema's name, so processes that start at
//! once wait for each other instead of failing; one that finds the current
//! version does nothing but read it. A schema migrated by a newer version
//! of this crate is refused rather than misused.

use std::fmt;

use mutextree_core::backend::quote;
use mutextree_core::Error;

/// The version of the objects this crate creates and uses.
pub(crate) const VERSION: i32 = 9;

/// The name of a PostgreSQL schema the store keeps its objects in.
///
/// 1 to [`SchemaName::MAX_BYTES`] lowercase ASCII letters, digits and `_`,
/// starting with a letter or `_`, and not starting with `pg_` (PostgreSQL
/// reserves those). Narrow on purpose: the name is spliced into SQL (always
/// quoted as well) and into the notification channel, whose name is limited
/// to 63 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Longest accepted schema name, in bytes.
    pub const MAX_BYTES: usize = 48;

    /// Checks a schema name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        let reason = if name.is_empty() {
            Some("a schema name needs at least one character".to_owned())
        } else if name.len() > Self::MAX_BYTES {
            Some(format!("{} bytes, but a schema name may have at most {}", name.len(), Self::MAX_BYTES))
        } else if let Some(bad) = name.chars().find(|c| !valid_char(*c)) {
            Some(format!("{bad:?} is not allowed; a schema name uses lowercase ASCII letters, digits and `_` only"))
        } else if name.starts_with(|c: char| c.is_ascii_digit()) {
            Some("a schema name may not start with a digit".to_owned())
        } else if name.starts_with("pg_") {
            Some("names starting with `pg_` are reserved by PostgreSQL".to_owned())
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidConfig {
                store: crate::error::STORE,
                reason: format!("schema name {}: {reason}", quote(&name)),
            }),
            None => Ok(SchemaName(name)),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub(crate) fn quoted(&self) -> String {
        // The accepted characters need no escaping inside the quotes.
        format!("\"{}\"", self.0)
    }

    /// The channel releases are announced on.
    pub(crate) fn channel(&self) -> String {
        format!("{}_changes", self.0)
    }

    /// The channel forced releases are announced on, to their holders.
    pub(crate) fn revocation_channel(&self) -> String {
        format!("{}_revoked", self.0)
    }
}

impl Default for SchemaName {
    /// `mutextree`.
    fn default() -> Self {
        SchemaName("mutextree".to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaName({:?})", self.0)
    }
}

/// The statements the store runs, with the schema spliced in.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    pub(crate) read_version: String,
    pub(crate) grant: String,
    pub(crate) grant_exclusive: String,
    pub(crate) release: String,
    /// The release of a grant of one Exclusive item: its key, not an array.
    pub(crate) release_exclusive: String,
    /// The release, then at commit a `NOTIFY` on the revocation channel
    /// with the payload `$5` if it released a live grant: one statement,
    /// one round trip, no function of its own (so no migration).
    pub(crate) revoke: String,
    pub(crate) refresh: String,
    pub(crate) list_all: String,
    pub(crate) list_under: String,
    pub(crate) withdraw: String,
    pub(crate) waiters_all: String,
    pub(crate) waiters_under: String,
}

impl Statements {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        // A node's Exclusive row, and its Shared holders (never its marker).
        let list = format!(
            "SELECT l.key, l.owner, l.token, \
                    (extract(epoch FROM l.expires_at - n.now) * 1000000)::bigint, l.transient, l.mode, 0::bigint \
             FROM (SELECT e.namespace, e.key, e.owner, e.token, e.expires_at, e.transient, e.mode \
                   FROM {s}.locks e WHERE e.mode = 'exclusive' \
                   UNION ALL \
                   SELECT h.namespace, h.key, h.owner, h.token, h.expires_at, h.transient, 'shared' \
                   FROM {s}.shared_holders h) l, \
                  (SELECT clock_timestamp() AS now) n \
             WHERE l.namespace = $1 AND l.expires_at > n.now"
        );
        let waiters = format!(
            "SELECT r.key, r.owner, r.ticket, \
                    (extract(epoch FROM r.expires_at - n.now) * 1000000)::bigint, false, r.mode, \
                    greatest((extract(epoch FROM n.now - r.joined_at) * 1000000)::bigint, 0) \
             FROM {s}.reservations r, (SELECT clock_timestamp() AS now) n \
             WHERE r.namespace = $1 AND r.expires_at > n.now"
        );
        Statements {
            read_version: format!("SELECT version FROM {s}.schema_version"),
            grant: format!(
                "SELECT * FROM {s}.try_grant_general($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
            ),
            grant_exclusive: format!("SELECT * FROM {s}.grant_exclusive($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
            release: format!("SELECT {s}.release_items($1, $2, $3, $4)"),
            release_exclusive: format!("SELECT {s}.release($1, $2, $3, $4)"),
            // OFFSET 0 keeps the subquery from being pulled up, so that the
            // release runs exactly once, before the CASE looks at it.
            revoke: format!(
                "SELECT r.released, CASE WHEN r.released THEN pg_notify('{}', $5)::text END \
                 FROM (SELECT {s}.release_items($1, $2, $3, $4) AS released OFFSET 0) r",
                schema.revocation_channel()
            ),
            refresh: format!("SELECT {s}.refresh_items($1, $2, $3, $4, $5)"),
            list_all: format!("{list} ORDER BY l.key, l.token"),
            list_under: format!("{list} AND l.key >= $2 AND l.key < $3 ORDER BY l.key, l.token"),
            withdraw: format!("SELECT {s}.withdraw($1, $2, $3)"),
            waiters_all: format!("{waiters} ORDER BY r.key, r.ticket"),
            waiters_under: format!("{waiters} AND r.key >= $2 AND r.key < $3 ORDER BY r.key, r.ticket"),
        }
    }
}

/// The released migrations, in order: `MIGRATIONS[n - 1]` takes the schema
/// from version `n - 1` to `n`. Each is a fixed file, with placeholders for
/// the schema (see [`with_schema`]): a released file never changes, since
/// installed databases ran its old text under the same version number; a
/// change is a new version. A test pins each file's checksum.
const MIGRATIONS: [&str; VERSION as usize] = [
    include_str!("migrations/0001_locks_and_functions.sql"),
    include_str!("migrations/0002_generic_plans.sql"),
    include_str!("migrations/0003_listeners.sql"),
    include_str!("migrations/0004_try_locks_first.sql"),
    include_str!("migrations/0005_modes_and_items.sql"),
    include_str!("migrations/0006_fair_waiting.sql"),
    include_str!("migrations/0007_one_exclusive_item_and_waited.sql"),
    include_str!("migrations/0008_leaner_grant_and_release.sql"),
    include_str!("migrations/0009_grant_exclusive.sql"),
];

/// The statements that take the schema from `version - 1` to `version`.
pub(crate) fn migration_step(schema: &SchemaName, version: i32) -> Option<String> {
    let index = usize::try_from(version).ok()?.checked_sub(1)?;
    MIGRATIONS.get(index).map(|template| with_schema(template, schema))
}

/// A migration's text for `schema`: `{schema}` is the quoted schema,
/// `{channel}` its notification channel, `{schema_name}` the bare name (in
/// the listeners' advisory key). A [`SchemaName`] holds no braces, so
/// nothing spliced in is read as a placeholder.
fn with_schema(template: &str, schema: &SchemaName) -> String {
    template
        .replace("{schema}", &schema.quoted())
        .replace("{channel}", &schema.channel())
        .replace("{schema_name}", schema.as_str())
}

/// The advisory key a listening session's registration takes exclusively
/// and a release shared, for the namespace in the SQL expression
/// `namespace`. Seed 1, so that it is independent of the grants' keys
/// (seed 0).
fn listeners_lock(schema: &SchemaName, namespace: &str) -> String {
    format!("hashtextextended('mutextree listeners {schema} ' || {namespace}, 1)")
}

/// The statements a listening connection runs, in this order, before it
/// marks its feed live (see "Wake-ups" in the module docs).
#[derive(Debug, Clone)]
pub(crate) struct ListenerStatements {
    /// Removes the rows of sessions that have ended.
    pub(crate) forget_ended: String,
    /// In a transaction of its own with [`ListenerStatements::register`]:
    /// waits for the releases of the namespace `$1` that may have looked
    /// for listeners before this session's row existed, and keeps new ones
    /// from looking until the row is committed.
    pub(crate) barrier: String,
    /// Adds this session's row for the namespace `$1`.
    pub(crate) register: String,
    /// `LISTEN` on the channel.
    pub(crate) listen: String,
    /// `LISTEN` on the revocation channel: no row in `listeners` (nothing
    /// that makes releases notify), as a revocation always notifies.
    pub(crate) listen_revocations: String,
}

impl ListenerStatements {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        ListenerStatements {
            forget_ended: format!("DELETE FROM {s}.listeners WHERE pid NOT IN (SELECT pid FROM pg_stat_activity)"),
            barrier: format!("SELECT pg_advisory_xact_lock({})", listeners_lock(schema, "$1::text")),
            register: format!(
                "INSERT INTO {s}.listeners (namespace, pid) VALUES ($1::text, pg_backend_pid()) ON CONFLICT DO NOTHING"
            ),
            listen: format!("LISTEN \"{}\"", schema.channel()),
            listen_revocations: format!("LISTEN \"{}\"", schema.revocation_channel()),
        }
    }
}

/// The statements that migrate, in one transaction: the schema-wide lock,
/// then the version table.
pub(crate) fn migration_prelude(schema: &SchemaName) -> String {
    let s = schema.quoted();
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s}; \
         CREATE TABLE IF NOT EXISTS {s}.schema_version ( \
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
             version integer NOT NULL);"
    )
}

/// Records `version` as the schema's.
pub(crate) fn record_version(schema: &SchemaName, version: i32) -> String {
    let s = schema.quoted();
    format!(
        "INSERT INTO {s}.schema_version (version) VALUES ({version}) \
         ON CONFLICT (singleton) DO UPDATE SET version = excluded.version;"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["mutextree", "_x", "a1_b", &"x".repeat(SchemaName::MAX_BYTES)] {
            assert_eq!(SchemaName::new(good).expect(good).as_str(), good);
        }
        for (bad, rule) in [
            ("", "at least one"),
            ("Upper", "'U'"),
            ("a-b", "'-'"),
            ("a\"b", "'\"'"),
            ("a;drop", "';'"),
            ("1abc", "digit"),
            ("pg_locks", "reserved"),
            ("é", "'é'"),
        ] {
            let message = SchemaName::new(bad).expect_err(bad).to_string();
            assert!(message.contains(rule), "{bad:?}: {message}");
        }
        let long = "x".repeat(SchemaName::MAX_BYTES + 1);
        assert!(SchemaName::new(long).is_err());
        assert!(SchemaName::default().channel().len() < 64);
        let longest = SchemaName::new("s".repeat(SchemaName::MAX_BYTES)).expect("valid");
        assert!(longest.channel().len() < 64 && longest.revocation_channel().len() < 64);
    }

    /// The SHA-256 of each released migration's file, as
    /// `sha256sum src/migrations/*.sql` prints it.
    const RELEASED: [&str; 9] = [
        "306db937814fdbdcd85009cb7f375c47657aa5f39d2ec457290f798a0aa1f2f0",
        "7ff07ddb8ef729a3d9efad66f4ca0131390636808011c7654cd9dec06784014c",
        "41c72b29fb91f23992a317c63464abb3ba36f0ac5e06c82c909477625e18b1ea",
        "5f4edc589e89479fdca77c188b39d77396d1232893736f6da7144abfe61b7351",
        "d7e5ad45dded0bb7b80fc01e7e36cf0264bb89c21e8ec5e12fdf924aeb302e48",
        "4369596d7c06a677f251d1934887f2c4e0efa875d2d0885bdad77dfe590435da",
        "74f20dec5a269d7b01c34f07509e0fc21ed4786b109b2384c90d99c64a756c84",
        "29e13e27b039bf62d62114af3be3ea47215e99547b8b35a80a01608249e71ed3",
        "c076f202d9c4a5f316ec4f428c1754b8ada2d556bb8a6df6db2e0f2962ec8d6f",
    ];

    #[test]
    fn released_migrations_never_change() {
        use sha2::{Digest, Sha256};
        for (index, (template, pinned)) in MIGRATIONS.iter().zip(RELEASED).enumerate() {
            let digest: String = Sha256::digest(template.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect();
            assert_eq!(
                digest,
                pinned,
                "migration {} was edited after its release. Databases already at that version ran its old text and \
                 will never run it again, so they would keep the old objects under the same version number. Restore \
                 the file and put the change in a new version: a new file in src/migrations/, VERSION raised.",
                index + 1
            );
        }
        assert_eq!(
            MIGRATIONS.len(),
            RELEASED.len(),
            "a new migration is released with its checksum: add `sha256sum` of its file to RELEASED"
        );
    }

    #[test]
    fn migrations_name_the_schema_everywhere() {
        let schema = SchemaName::new("other_9").expect("valid");
        for version in 1..=VERSION {
            let text = migration_step(&schema, version).expect("every version has a step");
            assert!(!text.contains('{') && !text.contains('}'), "a placeholder is left in version {version}");
            assert!(!text.contains("mutextree\"") && !text.contains("mutextree_"), "version {version}: {text}");
            assert!(text.contains("\"other_9\"."), "version {version} names no object in the schema");
        }
        assert!(migration_step(&schema, 0).is_none());
        assert!(migration_step(&schema, VERSION + 1).is_none());
    }

    #[test]
    fn releases_and_withdrawals_take_the_listeners_key_that_listening_sessions_take() {
        let schema = SchemaName::new("other_9").expect("valid");
        let listeners = migration_step(&schema, 3).expect("version 3");
        let key = listeners_lock(&schema, "p_namespace");
        assert!(listeners.contains(&format!("pg_advisory_xact_lock_shared({key})")), "{listeners}");
        assert!(listeners.contains(&format!("pg_notify('{}', p_namespace)", schema.channel())), "{listeners}");
        // And so do withdrawals, which wake waiters as releases do.
        let withdrawals = migration_step(&schema, 6).expect("version 6");
        assert!(withdrawals.contains(&format!("pg_advisory_xact_lock_shared({key})")), "{withdrawals}");
        assert!(withdrawals.contains(&format!("pg_notify('{}', p_namespace)", schema.channel())), "{withdrawals}");
    }
}
