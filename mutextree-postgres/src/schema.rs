//! The objects the store keeps in its schema, and the migration that
//! creates them.
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
//! A tree grant takes a *shared* transaction-scoped advisory lock on each
//! ancestor's key and an *exclusive* one on its node's key, root first. Two
//! overlapping paths always meet on one key: for `[A]` and `[A, B]`, the
//! first holds `A` exclusively and the second wants it shared, so one
//! commits before the other reads. Siblings only share their parents'
//! locks, so they never wait for each other. A stepwise client's single-key
//! lock takes the exclusive lock on its key too, so it serialises with every
//! native grant that passes through that key, which is what the stepwise
//! algorithm's argument needs (see `mutextree_core::stepwise`).
//!
//! The keys are 64-bit hashes of namespace and key. A collision merges two
//! unrelated keys into one lock: that only serialises more than needed, but
//! can make two grants wait for each other in opposite orders; PostgreSQL
//! then aborts one with a deadlock (SQLSTATE 40P01), which the client
//! retries.
//!
//! # Why the server's clock, read at the call
//!
//! Expiry is judged by `clock_timestamp()` (the present), read once after
//! the locks were taken, never by `now()` (the start of the transaction) nor
//! by a client's clock.
//!
//! # Keeping the table small
//!
//! A grant removes the expired rows of the subtree it locks, and every
//! 128th token also removes up to 256 expired rows anywhere, oldest first,
//! through the index on `expires_at`: a bounded amount of work per grant, and the table holds little more than
//! the live locks.
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
//! statistics describe, and `try_grant` and `refresh` run with
//! `plan_cache_mode = force_generic_plan`: each statement is planned once
//! per connection (and again when the table's statistics change), never
//! for the values of a call. The sweep alone reads the index on
//! `expires_at`, on purpose.
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
//! notify module). A release notifies if a row of its namespace names a
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
//!
//! `schema_version` holds the version of the objects. A client migrates an
//! older schema step by step inside one transaction, under a transaction-
//! scoped advisory lock on the schema's name, so processes that start at
//! once wait for each other instead of failing; one that finds the current
//! version does nothing but read it. A schema migrated by a newer version
//! of this crate is refused rather than misused.

use std::fmt;

use mutextree_core::Error;

/// The version of the objects this crate creates and uses.
pub(crate) const VERSION: i32 = 4;

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
                store: crate::STORE,
                reason: format!("schema name {}: {reason}", crate::error::shorten(&name)),
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
    pub(crate) release: String,
    pub(crate) refresh: String,
    pub(crate) list_all: String,
    pub(crate) list_under: String,
}

impl Statements {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        let list = format!(
            "SELECT l.key, l.owner, l.token, \
                    (extract(epoch FROM l.expires_at - n.now) * 1000000)::bigint, l.transient \
             FROM {s}.locks l, (SELECT clock_timestamp() AS now) n \
             WHERE l.namespace = $1 AND l.expires_at > n.now"
        );
        Statements {
            read_version: format!("SELECT version FROM {s}.schema_version"),
            grant: format!("SELECT * FROM {s}.try_grant($1, $2, $3, $4, $5, $6, $7, $8)"),
            release: format!("SELECT {s}.release($1, $2, $3, $4)"),
            refresh: format!("SELECT {s}.refresh($1, $2, $3, $4, $5)"),
            list_all: format!("{list} ORDER BY l.key"),
            list_under: format!("{list} AND l.key >= $2 AND l.key < $3 ORDER BY l.key"),
        }
    }
}

/// The statements that take the schema from `version - 1` to `version`.
pub(crate) fn migration_step(schema: &SchemaName, version: i32) -> Option<String> {
    match version {
        1 => Some(version_1(schema)),
        2 => Some(version_2(schema)),
        3 => Some(version_3(schema)),
        4 => Some(version_4(schema)),
        _ => None,
    }
}

/// The first version: the lock table, its indexes, the token sequence and
/// the three functions.
fn version_1(schema: &SchemaName) -> String {
    let s = schema.quoted();
    let channel = schema.channel();
    let GrantParts { declarations, wait_for_locks, .. } = GrantParts::new(schema);
    let (isolation, two_passes, refusal) = (GRANT_ISOLATION, GRANT_TWO_PASSES, GRANT_REFUSAL);
    format!(
        r#"
CREATE SEQUENCE {s}.tokens AS bigint MINVALUE 1;

CREATE TABLE {s}.locks (
    namespace  text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    owner      text NOT NULL,
    token      bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    transient  boolean NOT NULL,
    PRIMARY KEY (namespace, key)
);

CREATE INDEX locks_expires_at ON {s}.locks (expires_at);

-- A tree grant (p_tree) or a single-key lock; see the crate's schema module.
CREATE FUNCTION {s}.try_grant(
    p_namespace text, p_key text, p_ancestors text[], p_range_end text,
    p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean,
    OUT granted boolean, OUT token bigint,
    OUT blocker_key text, OUT blocker_owner text, OUT blocker_token bigint,
    OUT blocker_remaining_us bigint, OUT blocker_transient boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
{declarations}BEGIN
{isolation}{two_passes}{wait_for_locks}        END IF;
        v_now := clock_timestamp();

        -- 2. The check: the node alone, or its ancestors (by equality) and
        --    its subtree (a range of the primary key). A held lock is
        --    reported rather than a stepwise client's transient one when
        --    both are there.
        IF p_tree THEN
            -- Each ancestor by one lookup of the whole primary key, and the
            -- subtree by one range of it: statements that leave the planner
            -- no other choice, whatever its statistics say, so the cost
            -- never depends on how many locks are held elsewhere.
            v_blocked := false;
            FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                SELECT * INTO v_row FROM {s}.locks l
                 WHERE l.namespace = p_namespace AND l.key = v_ancestor AND l.expires_at > v_now;
                IF FOUND AND (NOT v_blocked OR NOT v_row.transient) THEN
                    v_blocker := v_row;
                    v_blocked := true;
                    EXIT WHEN NOT v_row.transient;
                END IF;
            END LOOP;
            IF NOT v_blocked OR v_blocker.transient THEN
                SELECT * INTO v_row FROM {s}.locks l
                 WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                   AND l.expires_at > v_now
                 ORDER BY l.key LIMIT 1;
                IF FOUND THEN
                    IF v_row.transient THEN
                        SELECT * INTO v_held FROM {s}.locks l
                         WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                           AND l.expires_at > v_now AND NOT l.transient
                         ORDER BY l.key LIMIT 1;
                        IF FOUND THEN
                            v_row := v_held;
                        END IF;
                    END IF;
                    IF NOT v_blocked OR NOT v_row.transient THEN
                        v_blocker := v_row;
                    END IF;
                    v_blocked := true;
                END IF;
            END IF;
        ELSE
            SELECT * INTO v_blocker FROM {s}.locks l
             WHERE l.namespace = p_namespace AND l.key = p_key AND l.expires_at > v_now;
            v_blocked := FOUND;
        END IF;
        EXIT WHEN v_blocked;
    END LOOP;
{refusal}    -- 3. Nothing live is in the way: what is left in the subtree has expired. A
    --    stepwise client may have locked a descendant's key since the check
    --    (its key lock does not wait for this node's); that row is live and
    --    stays.
    IF p_tree THEN
        -- The subtree only (a range of the primary key); expired ancestors
        -- are left to the sweep.
        DELETE FROM {s}.locks l
         WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end AND l.expires_at <= v_now;
        INSERT INTO {s}.locks AS l VALUES
            (p_namespace, p_key, p_owner, nextval('{s}.tokens'), v_now + p_ttl_ms * interval '1 millisecond', p_transient)
        RETURNING l.token INTO token;
    ELSE
        INSERT INTO {s}.locks AS l VALUES
            (p_namespace, p_key, p_owner, nextval('{s}.tokens'), v_now + p_ttl_ms * interval '1 millisecond', p_transient)
        ON CONFLICT (namespace, key) DO UPDATE
            SET owner = excluded.owner, token = excluded.token, expires_at = excluded.expires_at,
                transient = excluded.transient
            WHERE l.expires_at <= v_now
        RETURNING l.token INTO token;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'mutextree: % was locked while its advisory lock was held', p_key;
        END IF;
    END IF;
    granted := true;

    -- 4. The bounded sweep of expired rows anywhere.
    IF token % 128 = 0 THEN
        DELETE FROM {s}.locks l
         USING (SELECT e.namespace, e.key FROM {s}.locks e WHERE e.expires_at <= v_now
                 ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
         WHERE l.namespace = old.namespace AND l.key = old.key AND l.expires_at <= v_now;
    END IF;
END
$fn$;

-- Removes exactly this grant; true if it was live. Waiters hear of it on
-- the channel (sent at commit); an expired grant is removed silently.
CREATE FUNCTION {s}.release(p_namespace text, p_key text, p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_live boolean;
BEGIN
    DELETE FROM {s}.locks l
     WHERE l.namespace = p_namespace AND l.key = p_key AND l.owner = p_owner AND l.token = p_token
    RETURNING l.expires_at > clock_timestamp() INTO v_live;
    IF v_live THEN
        PERFORM pg_notify('{channel}', p_namespace);
    END IF;
    RETURN coalesce(v_live, false);
END
$fn$;

-- Sets the remaining life of exactly this grant, if it is live.
CREATE FUNCTION {s}.refresh(p_namespace text, p_key text, p_owner text, p_token bigint, p_ttl_ms bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE {s}.locks l SET expires_at = v_now + p_ttl_ms * interval '1 millisecond'
     WHERE l.namespace = p_namespace AND l.key = p_key AND l.owner = p_owner AND l.token = p_token
       AND l.expires_at > v_now;
    RETURN FOUND;
END
$fn$;
"#
    )
}

/// The second version: `try_grant` and `refresh` again, with the same
/// arguments and results, planned the same way whatever the statistics say
/// (see "Plans" in the module docs).
fn version_2(schema: &SchemaName) -> String {
    let s = schema.quoted();
    let GrantParts { signature, declarations, wait_for_locks, check, write } = GrantParts::new(schema);
    let (isolation, two_passes, refusal) = (GRANT_ISOLATION, GRANT_TWO_PASSES, GRANT_REFUSAL);
    format!(
        r#"
-- A tree grant (p_tree) or a single-key lock; see the crate's schema module.
{signature}{declarations}BEGIN
{isolation}{two_passes}{wait_for_locks}        END IF;
{check}        EXIT WHEN v_blocked;
    END LOOP;
{refusal}{write}END
$fn$;

-- Sets the remaining life of exactly this grant, if it is live.
CREATE OR REPLACE FUNCTION {s}.refresh(p_namespace text, p_key text, p_owner text, p_token bigint, p_ttl_ms bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE {s}.locks l SET expires_at = v_now + p_ttl_ms * interval '1 millisecond'
     WHERE l.namespace = p_namespace AND l.key = p_key AND l.owner = p_owner AND l.token = p_token
       AND l.expires_at - v_now > interval '0';
    RETURN FOUND;
END
$fn$;
"#
    )
}

/// The parts of `try_grant` that its versions share, with the
/// schema spliced in.
struct GrantParts {
    /// Its arguments, results and settings, up to its declarations.
    signature: String,
    /// Its variables.
    declarations: String,
    /// The advisory locks, root first, shared on the ancestors and
    /// exclusive on the node, each in a statement of its own, waiting for
    /// each as long as it takes.
    wait_for_locks: String,
    /// Inside the loop over the passes, once the pass's locks are held:
    /// reads the clock, and sets `v_blocked` and `v_blocker`.
    check: String,
    /// Once nothing live is in the way: the expired rows of the subtree
    /// removed, the row inserted with a new token, and every 128th token
    /// the bounded sweep.
    write: String,
}

impl GrantParts {
    fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        GrantParts {
            signature: format!(
                r#"CREATE OR REPLACE FUNCTION {s}.try_grant(
    p_namespace text, p_key text, p_ancestors text[], p_range_end text,
    p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean,
    OUT granted boolean, OUT token bigint,
    OUT blocker_key text, OUT blocker_owner text, OUT blocker_token bigint,
    OUT blocker_remaining_us bigint, OUT blocker_transient boolean)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
"#
            ),
            declarations: format!(
                r#"DECLARE
    v_pass integer;
    v_blocked boolean;
    v_ancestor text;
    v_now timestamptz;
    v_blocker {s}.locks%ROWTYPE;
    v_held {s}.locks%ROWTYPE;
    v_row {s}.locks%ROWTYPE;
"#
            ),
            wait_for_locks: r#"            IF p_tree THEN
                FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0));
                END LOOP;
            END IF;
            PERFORM pg_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0));
"#
            .to_owned(),
            check: format!(
                r#"        v_now := clock_timestamp();

        -- 2. The check: the node alone, or its ancestors (by equality) and
        --    its subtree (a range of the primary key). A held lock is
        --    reported rather than a stepwise client's transient one when
        --    both are there.
        IF p_tree THEN
            -- Each ancestor by one lookup of the whole primary key, and the
            -- subtree by one range of it. Expiry is tested as a difference,
            -- which the index on expires_at cannot serve, so these
            -- statements leave the planner no other choice, whatever its
            -- statistics say, and the cost never depends on how many locks
            -- are held elsewhere (see "Plans" in the schema module).
            v_blocked := false;
            FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                SELECT * INTO v_row FROM {s}.locks l
                 WHERE l.namespace = p_namespace AND l.key = v_ancestor AND l.expires_at - v_now > interval '0';
                IF FOUND AND (NOT v_blocked OR NOT v_row.transient) THEN
                    v_blocker := v_row;
                    v_blocked := true;
                    EXIT WHEN NOT v_row.transient;
                END IF;
            END LOOP;
            IF NOT v_blocked OR v_blocker.transient THEN
                SELECT * INTO v_row FROM {s}.locks l
                 WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                   AND l.expires_at - v_now > interval '0'
                 ORDER BY l.key LIMIT 1;
                IF FOUND THEN
                    IF v_row.transient THEN
                        SELECT * INTO v_held FROM {s}.locks l
                         WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                           AND l.expires_at - v_now > interval '0' AND NOT l.transient
                         ORDER BY l.key LIMIT 1;
                        IF FOUND THEN
                            v_row := v_held;
                        END IF;
                    END IF;
                    IF NOT v_blocked OR NOT v_row.transient THEN
                        v_blocker := v_row;
                    END IF;
                    v_blocked := true;
                END IF;
            END IF;
        ELSE
            SELECT * INTO v_blocker FROM {s}.locks l
             WHERE l.namespace = p_namespace AND l.key = p_key AND l.expires_at - v_now > interval '0';
            v_blocked := FOUND;
        END IF;
"#
            ),
            write: format!(
                r#"    -- 3. Nothing live is in the way: what is left in the subtree has expired. A
    --    stepwise client may have locked a descendant's key since the check
    --    (its key lock does not wait for this node's); that row is live and
    --    stays.
    IF p_tree THEN
        -- The subtree only (a range of the primary key, the only index
        -- this statement can use); expired ancestors are left to the sweep.
        DELETE FROM {s}.locks l
         WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
           AND l.expires_at - v_now <= interval '0';
        INSERT INTO {s}.locks AS l VALUES
            (p_namespace, p_key, p_owner, nextval('{s}.tokens'), v_now + p_ttl_ms * interval '1 millisecond', p_transient)
        RETURNING l.token INTO token;
    ELSE
        INSERT INTO {s}.locks AS l VALUES
            (p_namespace, p_key, p_owner, nextval('{s}.tokens'), v_now + p_ttl_ms * interval '1 millisecond', p_transient)
        ON CONFLICT (namespace, key) DO UPDATE
            SET owner = excluded.owner, token = excluded.token, expires_at = excluded.expires_at,
                transient = excluded.transient
            WHERE l.expires_at <= v_now
        RETURNING l.token INTO token;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'mutextree: % was locked while its advisory lock was held', p_key;
        END IF;
    END IF;
    granted := true;

    -- 4. The bounded sweep of expired rows anywhere.
    IF token % 128 = 0 THEN
        DELETE FROM {s}.locks l
         USING (SELECT e.namespace, e.key FROM {s}.locks e WHERE e.expires_at <= v_now
                 ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
         WHERE l.namespace = old.namespace AND l.key = old.key AND l.expires_at <= v_now;
    END IF;
"#
            ),
        }
    }
}

/// The first statement of `try_grant`'s body in every version.
const GRANT_ISOLATION: &str = r#"    -- Under REPEATABLE READ or SERIALIZABLE every statement would read the
    -- snapshot taken before the advisory locks were granted.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mutextree grants need READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;

"#;

/// The head of `try_grant`'s loop over its two passes in versions 1 to 3,
/// up to the waiting locks of the second pass.
const GRANT_TWO_PASSES: &str = r#"    FOR v_pass IN 1..2 LOOP
        -- 1. On the second pass only: the advisory locks, each in a
        --    statement of its own, root first, so that every later
        --    statement reads with a snapshot taken after they were held.
        --    The first pass looks without them: a live lock it sees
        --    refuses the call at once (it was live at that instant), so
        --    refusals never queue behind the lock holders.
        IF v_pass = 2 THEN
"#;

/// How `try_grant` reports the lock in `v_blocker` as of `v_now`, in
/// every version.
const GRANT_REFUSAL: &str = r#"    IF v_blocked THEN
        granted := false;
        blocker_key := v_blocker.key;
        blocker_owner := v_blocker.owner;
        blocker_token := v_blocker.token;
        blocker_remaining_us := (extract(epoch FROM v_blocker.expires_at - v_now) * 1000000)::bigint;
        blocker_transient := v_blocker.transient;
        RETURN;
    END IF;

"#;

/// The third version: the table of listening sessions, and `release`
/// again, with the same arguments and result, sending `NOTIFY` only when a
/// session listens for the namespace (see "Wake-ups" in the module docs).
fn version_3(schema: &SchemaName) -> String {
    let s = schema.quoted();
    let channel = schema.channel();
    let barrier = listeners_lock(schema, "p_namespace");
    format!(
        r#"
-- The sessions listening for releases, by namespace: the listening
-- connection of a client that waits adds its own row. A row whose session
-- has ended is ignored, and removed when a listening connection opens.
CREATE TABLE {s}.listeners (
    namespace text COLLATE "C" NOT NULL,
    pid       integer NOT NULL,
    PRIMARY KEY (namespace, pid)
);

-- Removes exactly this grant; true if it was live. If a session listens
-- for the namespace, waiters hear of it on the channel (sent at commit);
-- an expired grant is removed silently.
CREATE OR REPLACE FUNCTION {s}.release(p_namespace text, p_key text, p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_live boolean;
BEGIN
    DELETE FROM {s}.locks l
     WHERE l.namespace = p_namespace AND l.key = p_key AND l.owner = p_owner AND l.token = p_token
    RETURNING l.expires_at > clock_timestamp() INTO v_live;
    IF v_live THEN
        -- Held until commit: a session registering as a listener waits for
        -- this release to commit, or this release, looking in a statement
        -- of its own (a snapshot taken after the lock), sees its row.
        PERFORM pg_advisory_xact_lock_shared({barrier});
        IF EXISTS (SELECT 1 FROM {s}.listeners r
                    WHERE r.namespace = p_namespace
                      AND EXISTS (SELECT 1 FROM pg_stat_get_activity(r.pid))) THEN
            PERFORM pg_notify('{channel}', p_namespace);
        END IF;
    END IF;
    RETURN coalesce(v_live, false);
END
$fn$;
"#
    )
}

/// The fourth version: `try_grant` again, with the same arguments and
/// results, trying its advisory locks before it looks (see "Why these
/// advisory locks" in the module docs).
fn version_4(schema: &SchemaName) -> String {
    let GrantParts { signature, declarations, wait_for_locks, check, write } = GrantParts::new(schema);
    let (isolation, refusal) = (GRANT_ISOLATION, GRANT_REFUSAL);
    format!(
        r#"
-- A tree grant (p_tree) or a single-key lock; see the crate's schema module.
{signature}{declarations}    v_free boolean;
BEGIN
{isolation}    -- 1. The advisory locks, root first, shared on the ancestors and
    --    exclusive on the node, each only if it is free at once. When they
    --    all are, the check below runs once, with a snapshot taken after
    --    they were held. Otherwise the ones taken so far stay held (they are
    --    the ones the waiting pass would take first anyway), and the call
    --    first looks without waiting: a live lock it sees refuses the call
    --    at once (it was live at that instant), so refusals never queue
    --    behind the lock holders. Only then does it wait for the locks,
    --    each in a statement of its own, and look again.
    v_free := true;
    IF p_tree THEN
        FOREACH v_ancestor IN ARRAY p_ancestors LOOP
            v_free := pg_try_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0));
            EXIT WHEN NOT v_free;
        END LOOP;
    END IF;
    IF v_free THEN
        v_free := pg_try_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0));
    END IF;

    FOR v_pass IN CASE WHEN v_free THEN 2 ELSE 1 END..2 LOOP
        IF v_pass = 2 AND NOT v_free THEN
{wait_for_locks}        END IF;
{check}        EXIT WHEN v_blocked;
    END LOOP;
{refusal}{write}END
$fn$;
"#
    )
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
    }
}
