-- Shared holders in a table of their own, so that a node's row in `locks`
-- is unique by key again; a grant function made for the common request,
-- one Exclusive item; the time a waiter joined the queue, kept by its
-- reservation; and the general grant function again, reporting how long a
-- waiter in the way has waited. See "Modes and multi-path grants", "One
-- Exclusive item" and "Fair waiting" in the crate's schema module. Every
-- statement can run again on a schema it already changed.

-- No grant of an older client runs while the rows move: one that started
-- before finishes first, one that starts later waits for this commit and
-- then meets the functions below.
LOCK TABLE {schema}.locks, {schema}.reservations IN ACCESS EXCLUSIVE MODE;

-- When the waiter took its ticket (a renewal keeps it). Reservations
-- written before this version count from the upgrade.
ALTER TABLE {schema}.reservations ADD COLUMN IF NOT EXISTS joined_at timestamptz NOT NULL
    DEFAULT clock_timestamp();

-- The Shared holders of a node: one row per Shared item of a grant, with
-- the grant's owner, token and expiry. Their node's row in `locks` is the
-- marker `holders`, which lives at least as long as the holders do.
CREATE TABLE IF NOT EXISTS {schema}.shared_holders (
    namespace  text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    token      bigint NOT NULL,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL,
    transient  boolean NOT NULL,
    CONSTRAINT shared_holders_pkey PRIMARY KEY (namespace, key, token)
);
-- The sweep, oldest first.
CREATE INDEX IF NOT EXISTS shared_holders_expires_at ON {schema}.shared_holders (expires_at);

-- The Shared rows of version 6 move there; of the Exclusive rows of a key
-- (one live at most, and expired ones a mode change left), the one that
-- expires last stays; a node's row is unique by key again; and each node
-- with holders gets its marker, expiring with the last of them, in place
-- of an Exclusive row that expired before them (a live one outlives them
-- all: none of them is live).
INSERT INTO {schema}.shared_holders (namespace, key, token, owner, expires_at, transient)
SELECT l.namespace, l.key, l.token, l.owner, l.expires_at, l.transient FROM {schema}.locks l WHERE l.mode = 'shared'
ON CONFLICT (namespace, key, token) DO NOTHING;
DELETE FROM {schema}.locks l WHERE l.mode = 'shared';
DELETE FROM {schema}.locks l
 WHERE EXISTS (SELECT FROM {schema}.locks o
                WHERE o.namespace = l.namespace AND o.key = l.key AND (o.expires_at, o.token) > (l.expires_at, l.token));
DROP INDEX IF EXISTS {schema}.locks_exclusive;
ALTER TABLE {schema}.locks DROP CONSTRAINT IF EXISTS locks_pkey;
ALTER TABLE {schema}.locks ADD CONSTRAINT locks_pkey PRIMARY KEY (namespace, key);
ALTER TABLE {schema}.locks DROP CONSTRAINT IF EXISTS locks_mode;
ALTER TABLE {schema}.locks ADD CONSTRAINT locks_mode CHECK (mode IN ('exclusive', 'holders'));
INSERT INTO {schema}.locks AS l (namespace, key, owner, token, expires_at, transient, mode)
SELECT h.namespace, h.key, '', 0, max(h.expires_at), false, 'holders'
  FROM {schema}.shared_holders h GROUP BY h.namespace, h.key
ON CONFLICT (namespace, key) DO UPDATE
   SET owner = '', token = 0, expires_at = excluded.expires_at, transient = false, mode = 'holders'
 WHERE l.mode = 'exclusive' AND l.expires_at < excluded.expires_at;

-- The grant functions of versions 4 to 6 know Shared rows in `locks` only:
-- a client of those versions still running is refused, with the version
-- it needs, rather than misled. (Their releases and refreshes go on
-- working: `release` and `refresh` touch Exclusive rows only, and
-- `release_items` and `refresh_items` below know both tables.)
CREATE OR REPLACE FUNCTION {schema}.try_grant(
    p_namespace text, p_key text, p_ancestors text[], p_range_end text,
    p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean,
    OUT granted boolean, OUT token bigint,
    OUT blocker_key text, OUT blocker_owner text, OUT blocker_token bigint,
    OUT blocker_remaining_us bigint, OUT blocker_transient boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    RAISE EXCEPTION 'this mutextree schema is at version 7, whose grants need a client of schema version 7'
        USING ERRCODE = '0A000', HINT = 'upgrade the client; its releases and refreshes still work';
END
$fn$;
CREATE OR REPLACE FUNCTION {schema}.try_grant_items(
    p_namespace text, p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean, p_changing bigint,
    p_keys text[], p_modes text[], p_range_ends text[], p_depths integer[], p_ancestors text[],
    p_lock_keys text[], p_lock_modes text[],
    OUT outcome text, OUT token bigint,
    OUT blocked_items integer[], OUT blocker_keys text[], OUT blocker_modes text[], OUT blocker_owners text[],
    OUT blocker_tokens bigint[], OUT blocker_remaining_us bigint[], OUT blocker_transient boolean[])
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    RAISE EXCEPTION 'this mutextree schema is at version 7, whose grants need a client of schema version 7'
        USING ERRCODE = '0A000', HINT = 'upgrade the client; its releases and refreshes still work';
END
$fn$;
CREATE OR REPLACE FUNCTION {schema}.try_grant_queued(
    p_namespace text, p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean, p_changing bigint,
    p_keys text[], p_modes text[], p_range_ends text[], p_depths integer[], p_ancestors text[],
    p_lock_keys text[], p_lock_modes text[], p_queue text, p_ticket bigint, p_reservation_ms bigint,
    OUT outcome text, OUT token bigint,
    OUT blocked_items integer[], OUT blocker_keys text[], OUT blocker_modes text[], OUT blocker_owners text[],
    OUT blocker_tokens bigint[], OUT blocker_remaining_us bigint[], OUT blocker_transient boolean[],
    OUT blocker_waiting boolean[])
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    RAISE EXCEPTION 'this mutextree schema is at version 7, whose grants need a client of schema version 7'
        USING ERRCODE = '0A000', HINT = 'upgrade the client; its releases and refreshes still work';
END
$fn$;

-- The bounded sweep of both grant functions: up to 256 expired rows, 256
-- expired Shared holders and 256 expired reservations anywhere, oldest
-- first, through the indexes on expires_at. (A marker expires with the
-- last of its holders, or later.)
CREATE OR REPLACE FUNCTION {schema}.sweep_expired(p_now timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
BEGIN
    DELETE FROM {schema}.locks l
     USING (SELECT e.namespace, e.key FROM {schema}.locks e WHERE e.expires_at <= p_now
             ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
     WHERE l.namespace = old.namespace AND l.key = old.key AND l.expires_at <= p_now;
    DELETE FROM {schema}.shared_holders h
     USING (SELECT e.namespace, e.key, e.token FROM {schema}.shared_holders e WHERE e.expires_at <= p_now
             ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
     WHERE h.namespace = old.namespace AND h.key = old.key AND h.token = old.token AND h.expires_at <= p_now;
    DELETE FROM {schema}.reservations r
     USING (SELECT e.namespace, e.key, e.ticket FROM {schema}.reservations e WHERE e.expires_at <= p_now
             ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
     WHERE r.namespace = old.namespace AND r.key = old.key AND r.ticket = old.ticket AND r.expires_at <= p_now;
END
$fn$;

-- A refused request's reservation, for both grant functions; returns its
-- ticket. A joining request (p_queue 'join') takes its ticket now; a
-- waiter ('waiting') has p_ticket. A row per item (p_keys, p_modes),
-- living p_reservation from p_now and joined at p_now; a row already
-- there of the same owner (a waiter's renewal) only gets the new expiry,
-- and keeps the time its waiter joined. The namespace's mark (p_live_until
-- as the caller read it) is moved past the reservation's expiry if it was
-- not already: to twice the reservation's life, so that a namespace's
-- waiters move it once per reservation's life rather than at every
-- attempt.
CREATE OR REPLACE FUNCTION {schema}.keep_reservation(
    p_namespace text, p_owner text, p_queue text, p_ticket bigint, p_keys text[], p_modes text[],
    p_now timestamptz, p_reservation interval, p_live_until timestamptz)
RETURNS bigint LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_ticket bigint := CASE WHEN p_queue = 'join' THEN nextval('{schema}.tokens') ELSE p_ticket END;
BEGIN
    INSERT INTO {schema}.reservations AS r (namespace, key, ticket, mode, owner, expires_at, joined_at)
    SELECT p_namespace, i.key, v_ticket, i.mode, p_owner, p_now + p_reservation, p_now
      FROM unnest(p_keys, p_modes) AS i(key, mode)
    ON CONFLICT (namespace, key, ticket) DO UPDATE SET expires_at = excluded.expires_at
     WHERE r.owner = excluded.owner;
    IF NOT coalesce(p_live_until - p_now >= p_reservation, false) THEN
        INSERT INTO {schema}.queues AS q (namespace, live_until) VALUES (p_namespace, p_now + 2 * p_reservation)
        ON CONFLICT (namespace) DO UPDATE SET live_until = greatest(q.live_until, excluded.live_until);
    END IF;
    RETURN v_ticket;
END
$fn$;

-- A node's marker, written or kept alive until at least p_expires_at: by
-- a Shared grant or a downgrade (whose check found no live Exclusive row
-- there: an expired one becomes the marker), and by a Shared holder's
-- refresh (p_written false: an existing marker only).
CREATE OR REPLACE FUNCTION {schema}.mark_holders(
    p_namespace text, p_key text, p_expires_at timestamptz, p_written boolean)
RETURNS void LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
BEGIN
    IF NOT p_written THEN
        UPDATE {schema}.locks l SET expires_at = greatest(l.expires_at, p_expires_at)
         WHERE l.namespace = p_namespace AND l.key = p_key AND l.mode = 'holders';
        RETURN;
    END IF;
    INSERT INTO {schema}.locks AS l (namespace, key, owner, token, expires_at, transient, mode)
    VALUES (p_namespace, p_key, '', 0, p_expires_at, false, 'holders')
    ON CONFLICT (namespace, key) DO UPDATE
       SET owner = '', token = 0, transient = false, mode = 'holders',
           expires_at = CASE WHEN l.mode = 'holders' THEN greatest(l.expires_at, excluded.expires_at)
                             ELSE excluded.expires_at END;
END
$fn$;

-- For an Exclusive item's check whose plain look found a marker first:
-- the first row in the way in key order, on the key p_from (p_to null) or
-- in the range from p_from to p_to, not of the grant p_changing, and only
-- held rows if p_held: an Exclusive row, or for a marker with a live
-- holder, that holder (a held one rather than a transient one, then the
-- oldest), in its place. Null if nothing is in the way. A marker is read
-- here only: it may outlive its holders (a release leaves it), so it is
-- in the way only with a live holder, which these statements see in one
-- snapshot (the function is STABLE), taken after the caller's look.
CREATE OR REPLACE FUNCTION {schema}.first_in_the_way(
    p_namespace text, p_from text, p_to text, p_now timestamptz, p_changing bigint, p_held boolean)
RETURNS {schema}.locks LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_row {schema}.locks;
BEGIN
    IF p_to IS NULL THEN
        SELECT * INTO v_row FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key = p_from AND l.expires_at - p_now > interval '0'
           AND NOT (p_held AND l.transient)
           AND (l.mode = 'exclusive' AND l.token <> p_changing OR l.mode = 'holders' AND EXISTS (
               SELECT FROM {schema}.shared_holders h
                WHERE h.namespace = l.namespace AND h.key = l.key AND h.expires_at - p_now > interval '0'
                  AND h.token <> p_changing AND NOT (p_held AND h.transient)));
    ELSE
        SELECT * INTO v_row FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key >= p_from AND l.key < p_to AND l.expires_at - p_now > interval '0'
           AND NOT (p_held AND l.transient)
           AND (l.mode = 'exclusive' AND l.token <> p_changing OR l.mode = 'holders' AND EXISTS (
               SELECT FROM {schema}.shared_holders h
                WHERE h.namespace = l.namespace AND h.key = l.key AND h.expires_at - p_now > interval '0'
                  AND h.token <> p_changing AND NOT (p_held AND h.transient)))
         ORDER BY l.key LIMIT 1;
    END IF;
    IF v_row.mode = 'holders' THEN
        SELECT h.namespace, h.key, h.owner, h.token, h.expires_at, h.transient, 'shared' INTO v_row
          FROM {schema}.shared_holders h
         WHERE h.namespace = v_row.namespace AND h.key = v_row.key AND h.expires_at - p_now > interval '0'
           AND h.token <> p_changing AND NOT (p_held AND h.transient)
         ORDER BY h.transient, h.token LIMIT 1;
    END IF;
    RETURN v_row;
END
$fn$;

-- try_grant_queued for a tree request of one Exclusive item p_key (not a
-- mode change), whose strict ancestors are p_ancestors (root first) and
-- whose subtree's keys end before p_range_end. It takes the same advisory
-- locks (each ancestor's key shared, then the node's exclusively: that is
-- their order by key), honours the queue the same way (p_queue, p_ticket,
-- p_reservation_ms) and answers in the same columns, with
-- blocker_waited_us beside them (a reservation's time in the queue, 0 for
-- a grant).
CREATE OR REPLACE FUNCTION {schema}.try_grant_exclusive(
    p_namespace text, p_owner text, p_ttl_ms bigint, p_key text, p_range_end text, p_ancestors text[],
    p_queue text, p_ticket bigint, p_reservation_ms bigint,
    OUT outcome text, OUT token bigint,
    OUT blocked_items integer[], OUT blocker_keys text[], OUT blocker_modes text[], OUT blocker_owners text[],
    OUT blocker_tokens bigint[], OUT blocker_remaining_us bigint[], OUT blocker_transient boolean[],
    OUT blocker_waiting boolean[], OUT blocker_waited_us bigint[])
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_pass integer;
    v_free boolean := true;
    v_ancestor text;
    v_found boolean;
    v_waiting boolean := false;
    v_now timestamptz;
    v_writes boolean := p_queue IN ('join', 'waiting');
    -- Only tickets below this one are ahead of the request.
    v_before bigint := CASE WHEN p_queue = 'waiting' THEN p_ticket ELSE 9223372036854775807 END;
    v_reservation interval := p_reservation_ms * interval '1 millisecond';
    v_live_until timestamptz;
    v_joined_at timestamptz;
    v_blocker {schema}.locks%ROWTYPE;
    v_held {schema}.locks%ROWTYPE;
    v_row {schema}.locks%ROWTYPE;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE every statement would read the
    -- snapshot taken before the advisory locks were granted.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mutextree grants need READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;

    -- 1. The advisory locks, as in try_grant_queued: each only if it is
    --    free at once; otherwise a look without waiting first (unless the
    --    refusal writes a reservation), then the locks waited for, each in
    --    a statement of its own, and a second look.
    FOREACH v_ancestor IN ARRAY p_ancestors LOOP
        v_free := pg_try_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0));
        EXIT WHEN NOT v_free;
    END LOOP;
    IF v_free THEN
        v_free := pg_try_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0));
    END IF;

    FOR v_pass IN CASE WHEN v_free OR v_writes THEN 2 ELSE 1 END..2 LOOP
        IF v_pass = 2 AND NOT v_free THEN
            FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0));
            END LOOP;
            PERFORM pg_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0));
        END IF;
        v_now := clock_timestamp();

        -- 2. The check: each ancestor by one lookup of the primary key,
        --    root first, until a held lock; then the subtree by a range of
        --    it. Every live Exclusive row is in the way, and every marker
        --    with a live holder (see first_in_the_way). A held lock is
        --    reported rather than a stepwise client's transient one when
        --    both are there. Expiry is tested as a difference (see "Plans"
        --    in the schema module).
        v_found := false;
        FOREACH v_ancestor IN ARRAY p_ancestors LOOP
            SELECT * INTO v_row FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key = v_ancestor AND l.expires_at - v_now > interval '0'
             LIMIT 1;
            IF v_row.mode = 'holders' THEN
                v_row := {schema}.first_in_the_way(p_namespace, v_ancestor, NULL, v_now, 0, false);
            END IF;
            IF v_row.key IS NOT NULL AND (NOT v_found OR NOT v_row.transient) THEN
                v_blocker := v_row;
                v_found := true;
                EXIT WHEN NOT v_row.transient;
            END IF;
        END LOOP;
        IF NOT v_found OR v_blocker.transient THEN
            SELECT * INTO v_row FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
               AND l.expires_at - v_now > interval '0'
             ORDER BY l.key LIMIT 1;
            IF v_row.mode = 'holders' THEN
                v_row := {schema}.first_in_the_way(p_namespace, p_key, p_range_end, v_now, 0, false);
            END IF;
            IF v_row.key IS NOT NULL THEN
                IF v_row.transient THEN
                    SELECT * INTO v_held FROM {schema}.locks l
                     WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                       AND l.expires_at - v_now > interval '0' AND NOT l.transient
                     ORDER BY l.key LIMIT 1;
                    IF v_held.mode = 'holders' THEN
                        v_held := {schema}.first_in_the_way(p_namespace, p_key, p_range_end, v_now, 0, true);
                    END IF;
                    IF v_held.key IS NOT NULL THEN
                        v_row := v_held;
                    END IF;
                END IF;
                IF NOT v_found OR NOT v_row.transient THEN
                    v_blocker := v_row;
                END IF;
                v_found := true;
            END IF;
        END IF;

        -- A waiter ahead, if no grant is in the way and a reservation of
        -- the namespace may be live (the mark: one lookup, which a refusal
        -- that writes its reservation reads too, to move the mark only
        -- when it must): a live reservation with a smaller ticket on an
        -- ancestor (the head of its key's queue) or in the subtree, in
        -- either mode.
        IF p_queue <> 'barge' AND (v_writes OR NOT v_found) THEN
            SELECT q.live_until INTO v_live_until FROM {schema}.queues q WHERE q.namespace = p_namespace;
        END IF;
        IF NOT v_found AND v_live_until - v_now > interval '0' THEN
            FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, r.joined_at
                  INTO v_blocker.key, v_blocker.mode, v_blocker.owner, v_blocker.token, v_blocker.expires_at,
                       v_joined_at
                  FROM {schema}.reservations r
                 WHERE r.namespace = p_namespace AND r.key = v_ancestor AND r.ticket < v_before
                   AND r.expires_at - v_now > interval '0'
                 ORDER BY r.ticket LIMIT 1;
                v_found := FOUND;
                EXIT WHEN v_found;
            END LOOP;
            IF NOT v_found THEN
                SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, r.joined_at
                  INTO v_blocker.key, v_blocker.mode, v_blocker.owner, v_blocker.token, v_blocker.expires_at,
                       v_joined_at
                  FROM {schema}.reservations r
                 WHERE r.namespace = p_namespace AND r.key >= p_key AND r.key < p_range_end
                   AND r.ticket < v_before AND r.expires_at - v_now > interval '0'
                 ORDER BY r.key, r.ticket LIMIT 1;
                v_found := FOUND;
            END IF;
            v_blocker.transient := false;
            v_waiting := v_found;
        END IF;
        EXIT WHEN v_found;
    END LOOP;

    IF v_found THEN
        blocked_items := ARRAY[1];
        blocker_keys := ARRAY[v_blocker.key];
        blocker_modes := ARRAY[v_blocker.mode];
        blocker_owners := ARRAY[v_blocker.owner];
        blocker_tokens := ARRAY[v_blocker.token];
        blocker_remaining_us := ARRAY[(extract(epoch FROM v_blocker.expires_at - v_now) * 1000000)::bigint];
        blocker_transient := ARRAY[v_blocker.transient];
        blocker_waiting := ARRAY[v_waiting];
        blocker_waited_us := ARRAY[CASE WHEN v_waiting
                                        THEN greatest((extract(epoch FROM v_now - v_joined_at) * 1000000)::bigint, 0)
                                        ELSE 0 END];
        IF NOT v_writes THEN
            outcome := 'blocked';
            RETURN;
        END IF;
        -- 3. Refused in the queue: the reservation written (or, for a
        --    waiter, renewed, or written again if it lapsed), and the
        --    namespace's mark moved if needed (see keep_reservation).
        outcome := 'queued';
        token := {schema}.keep_reservation(p_namespace, p_owner, p_queue, p_ticket, ARRAY[p_key],
                                           ARRAY['exclusive'], v_now, v_reservation, v_live_until);
        RETURN;
    END IF;

    -- 4. The grant: the expired rows of the subtree removed, and its
    --    markers, which have no live holder (a stepwise client may have
    --    locked a descendant's key since the check: that row is live and
    --    stays), the row written.
    DELETE FROM {schema}.locks l
     WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
       AND (l.expires_at - v_now <= interval '0' OR l.mode = 'holders');
    INSERT INTO {schema}.locks (namespace, key, owner, token, expires_at, transient, mode)
    VALUES (p_namespace, p_key, p_owner, nextval('{schema}.tokens'), v_now + p_ttl_ms * interval '1 millisecond',
            false, 'exclusive')
    RETURNING locks.token INTO token;
    outcome := 'granted';

    -- A waiter's grant takes its reservation's place.
    IF p_queue = 'waiting' THEN
        DELETE FROM {schema}.reservations r
         WHERE r.namespace = p_namespace AND r.ticket = p_ticket AND r.owner = p_owner;
    END IF;

    -- 5. The bounded sweep (see sweep_expired), after one grant in 128.
    IF token % 128 = 0 THEN
        PERFORM {schema}.sweep_expired(v_now);
    END IF;
END
$fn$;

-- try_grant_queued again, for every other request (several items, a
-- Shared one, a single-key lock, a mode change), with blocker_waited_us:
-- how long each reservation in the way has been in the queue (0 for a
-- grant). A reservation it writes records when its waiter joined; a
-- renewal keeps that.
CREATE OR REPLACE FUNCTION {schema}.try_grant_general(
    p_namespace text, p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean, p_changing bigint,
    p_keys text[], p_modes text[], p_range_ends text[], p_depths integer[], p_ancestors text[],
    p_lock_keys text[], p_lock_modes text[], p_queue text, p_ticket bigint, p_reservation_ms bigint,
    OUT outcome text, OUT token bigint,
    OUT blocked_items integer[], OUT blocker_keys text[], OUT blocker_modes text[], OUT blocker_owners text[],
    OUT blocker_tokens bigint[], OUT blocker_remaining_us bigint[], OUT blocker_transient boolean[],
    OUT blocker_waiting boolean[], OUT blocker_waited_us bigint[])
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_pass integer;
    v_free boolean := true;
    v_lock integer;
    v_item integer;
    v_at integer;
    v_first integer;
    v_from integer;
    v_found boolean;
    v_waiting boolean;
    v_exclusive boolean;
    v_now timestamptz;
    v_fair boolean := p_tree AND p_changing = 0 AND p_queue <> 'barge';
    v_writes boolean := p_tree AND p_changing = 0 AND p_queue IN ('join', 'waiting');
    -- Only tickets below this one are ahead of the request.
    v_before bigint := CASE WHEN p_queue = 'waiting' THEN p_ticket ELSE 9223372036854775807 END;
    v_reservation interval := p_reservation_ms * interval '1 millisecond';
    v_live_until timestamptz;
    v_joined_at timestamptz;
    v_queued boolean := false;
    v_expires_at timestamptz;
    v_transient boolean;
    v_blocker {schema}.locks%ROWTYPE;
    v_held {schema}.locks%ROWTYPE;
    v_row {schema}.locks%ROWTYPE;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE every statement would read the
    -- snapshot taken before the advisory locks were granted.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mutextree grants need READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;

    -- 1. The advisory locks, in the order of p_lock_keys, each only if it
    --    is free at once. When they all are, the check below runs once,
    --    with a snapshot taken after they were held. Otherwise the ones
    --    taken so far stay held (the waiting pass takes them first anyway),
    --    and the call first looks without waiting: a live lock it sees
    --    refuses the call at once (it was live at that instant), so
    --    refusals never queue behind the lock holders. Only then does it
    --    wait for the locks, each in a statement of its own, and look again.
    --    A request that writes its reservation when refused ('join',
    --    'waiting') always waits for its locks before it looks: a
    --    reservation is written under the locks of its items, as a grant is.
    FOR v_lock IN 1..cardinality(p_lock_keys) LOOP
        IF p_lock_modes[v_lock] = 'exclusive' THEN
            v_free := pg_try_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_lock_keys[v_lock], 0));
        ELSE
            v_free := pg_try_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || p_lock_keys[v_lock], 0));
        END IF;
        EXIT WHEN NOT v_free;
    END LOOP;

    FOR v_pass IN CASE WHEN v_free OR v_writes THEN 2 ELSE 1 END..2 LOOP
        IF v_pass = 2 AND NOT v_free THEN
            FOR v_lock IN 1..cardinality(p_lock_keys) LOOP
                IF p_lock_modes[v_lock] = 'exclusive' THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_lock_keys[v_lock], 0));
                ELSE
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || p_lock_keys[v_lock], 0));
                END IF;
            END LOOP;
        END IF;
        v_now := clock_timestamp();

        -- A change needs its grant live (each item's row by one lookup of
        -- a primary key: its node's row if it is Exclusive, its holder if
        -- it is Shared).
        IF p_changing <> 0 THEN
            v_found := false;
            FOR v_item IN 1..cardinality(p_keys) LOOP
                PERFORM FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner
                   AND l.token = p_changing AND l.mode = 'exclusive' AND l.expires_at - v_now > interval '0';
                v_found := FOUND;
                EXIT WHEN v_found;
                PERFORM FROM {schema}.shared_holders h
                 WHERE h.namespace = p_namespace AND h.key = p_keys[v_item] AND h.token = p_changing
                   AND h.owner = p_owner AND h.expires_at - v_now > interval '0';
                v_found := FOUND;
                EXIT WHEN v_found;
            END LOOP;
            IF NOT v_found THEN
                outcome := 'not held';
                RETURN;
            END IF;
        END IF;

        -- Whether a reservation of the namespace may be live: one lookup,
        -- which finds nothing, or a mark in the past, while nobody waits.
        IF v_fair THEN
            SELECT q.live_until INTO v_live_until FROM {schema}.queues q WHERE q.namespace = p_namespace;
            v_queued := coalesce(v_live_until - v_now > interval '0', false);
        END IF;

        -- 2. The check, item by item: the node alone, or its ancestors (by
        --    equality) and its subtree (a range of the primary key). Every
        --    live Exclusive row in the way blocks an Exclusive item, and
        --    every marker with a live holder (see first_in_the_way); only
        --    Exclusive rows block a Shared one. The grant being changed is
        --    not in the way. A held
        --    lock is reported rather than a stepwise client's transient one
        --    when both are there. Expiry is tested as a difference, which
        --    the index on expires_at cannot serve, so these statements leave
        --    the planner no other choice, whatever its statistics say (see
        --    "Plans" in the schema module). The blockers' arrays stay null
        --    until an item is blocked.
        v_first := 1;
        FOR v_item IN 1..cardinality(p_keys) LOOP
            v_found := false;
            v_waiting := false;
            v_from := v_first;
            v_exclusive := p_modes[v_item] = 'exclusive';
            IF NOT p_tree THEN
                SELECT * INTO v_blocker FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.expires_at - v_now > interval '0'
                 LIMIT 1;
                IF v_blocker.mode = 'holders' THEN
                    v_blocker := {schema}.first_in_the_way(p_namespace, p_keys[v_item], NULL, v_now, 0, false);
                END IF;
                v_found := v_blocker.key IS NOT NULL;
            ELSE
                -- Each ancestor by one lookup of the primary key, root
                -- first, until a held lock.
                FOR v_at IN v_first..v_first + p_depths[v_item] - 2 LOOP
                    IF v_exclusive THEN
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key = p_ancestors[v_at]
                           AND l.expires_at - v_now > interval '0' AND (l.token <> p_changing OR l.mode = 'holders')
                         LIMIT 1;
                        IF v_row.mode = 'holders' THEN
                            v_row := {schema}.first_in_the_way(p_namespace, p_ancestors[v_at], NULL, v_now, p_changing,
                                                               false);
                        END IF;
                    ELSE
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key = p_ancestors[v_at] AND l.mode = 'exclusive'
                           AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                         LIMIT 1;
                    END IF;
                    IF v_row.key IS NOT NULL AND (NOT v_found OR NOT v_row.transient) THEN
                        v_blocker := v_row;
                        v_found := true;
                        EXIT WHEN NOT v_row.transient;
                    END IF;
                END LOOP;
                v_first := v_first + p_depths[v_item] - 1;
                IF NOT v_found OR v_blocker.transient THEN
                    IF v_exclusive THEN
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
                           AND l.expires_at - v_now > interval '0' AND (l.token <> p_changing OR l.mode = 'holders')
                         ORDER BY l.key LIMIT 1;
                        IF v_row.mode = 'holders' THEN
                            v_row := {schema}.first_in_the_way(p_namespace, p_keys[v_item], p_range_ends[v_item], v_now,
                                                               p_changing, false);
                        END IF;
                    ELSE
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
                           AND l.mode = 'exclusive' AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                         ORDER BY l.key LIMIT 1;
                    END IF;
                    IF v_row.key IS NOT NULL THEN
                        IF v_row.transient THEN
                            IF v_exclusive THEN
                                SELECT * INTO v_held FROM {schema}.locks l
                                 WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item]
                                   AND l.key < p_range_ends[v_item] AND l.expires_at - v_now > interval '0'
                                   AND (l.token <> p_changing OR l.mode = 'holders') AND NOT l.transient
                                 ORDER BY l.key LIMIT 1;
                                IF v_held.mode = 'holders' THEN
                                    v_held := {schema}.first_in_the_way(p_namespace, p_keys[v_item],
                                                                        p_range_ends[v_item], v_now, p_changing, true);
                                END IF;
                            ELSE
                                SELECT * INTO v_held FROM {schema}.locks l
                                 WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item]
                                   AND l.key < p_range_ends[v_item] AND l.mode = 'exclusive'
                                   AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                                   AND NOT l.transient
                                 ORDER BY l.key LIMIT 1;
                            END IF;
                            IF v_held.key IS NOT NULL THEN
                                v_row := v_held;
                            END IF;
                        END IF;
                        IF NOT v_found OR NOT v_row.transient THEN
                            v_blocker := v_row;
                        END IF;
                        v_found := true;
                    END IF;
                END IF;
            END IF;

            -- An item no grant is in the way of may have a waiter ahead of
            -- it: a live reservation with a smaller ticket, on an ancestor
            -- (by equality, the head of each key's queue) or in the subtree
            -- (a range of the primary key), checked as a grant's rows are.
            -- Reported with its ticket as the token.
            IF NOT v_found AND v_queued THEN
                FOR v_at IN v_from..v_from + p_depths[v_item] - 2 LOOP
                    SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, r.joined_at
                      INTO v_blocker.key, v_blocker.mode, v_blocker.owner, v_blocker.token, v_blocker.expires_at,
                           v_joined_at
                      FROM {schema}.reservations r
                     WHERE r.namespace = p_namespace AND r.key = p_ancestors[v_at] AND r.ticket < v_before
                       AND (v_exclusive OR r.mode = 'exclusive') AND r.expires_at - v_now > interval '0'
                     ORDER BY r.ticket LIMIT 1;
                    v_found := FOUND;
                    EXIT WHEN v_found;
                END LOOP;
                IF NOT v_found THEN
                    IF v_exclusive THEN
                        SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, r.joined_at
                          INTO v_blocker.key, v_blocker.mode, v_blocker.owner, v_blocker.token, v_blocker.expires_at,
                               v_joined_at
                          FROM {schema}.reservations r
                         WHERE r.namespace = p_namespace AND r.key >= p_keys[v_item] AND r.key < p_range_ends[v_item]
                           AND r.ticket < v_before AND r.expires_at - v_now > interval '0'
                         ORDER BY r.key, r.ticket LIMIT 1;
                    ELSE
                        SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, r.joined_at
                          INTO v_blocker.key, v_blocker.mode, v_blocker.owner, v_blocker.token, v_blocker.expires_at,
                               v_joined_at
                          FROM {schema}.reservations r
                         WHERE r.namespace = p_namespace AND r.key >= p_keys[v_item] AND r.key < p_range_ends[v_item]
                           AND r.mode = 'exclusive' AND r.ticket < v_before AND r.expires_at - v_now > interval '0'
                         ORDER BY r.key, r.ticket LIMIT 1;
                    END IF;
                    v_found := FOUND;
                END IF;
                v_blocker.transient := false;
                v_waiting := v_found;
            END IF;

            IF v_found THEN
                blocked_items := blocked_items || v_item;
                blocker_keys := blocker_keys || v_blocker.key;
                blocker_modes := blocker_modes || v_blocker.mode;
                blocker_owners := blocker_owners || v_blocker.owner;
                blocker_tokens := blocker_tokens || v_blocker.token;
                blocker_remaining_us := blocker_remaining_us
                    || (extract(epoch FROM v_blocker.expires_at - v_now) * 1000000)::bigint;
                blocker_transient := blocker_transient || v_blocker.transient;
                blocker_waiting := blocker_waiting || v_waiting;
                blocker_waited_us := blocker_waited_us
                    || CASE WHEN v_waiting
                            THEN greatest((extract(epoch FROM v_now - v_joined_at) * 1000000)::bigint, 0)
                            ELSE 0 END;
            END IF;
        END LOOP;
        EXIT WHEN blocked_items IS NOT NULL;
    END LOOP;

    IF blocked_items IS NOT NULL THEN
        IF NOT v_writes THEN
            outcome := 'blocked';
            RETURN;
        END IF;
        -- 3. Refused in the queue: the reservation written (or, for a
        --    waiter, renewed, or written again if it lapsed), and the
        --    namespace's mark moved if needed (see keep_reservation).
        outcome := 'queued';
        token := {schema}.keep_reservation(p_namespace, p_owner, p_queue, p_ticket, p_keys, p_modes, v_now,
                                           v_reservation, v_live_until);
        RETURN;
    END IF;
    outcome := 'granted';
    token := nextval('{schema}.tokens');

    -- 4. A mode change: the grant's items get their new mode and the new
    --    token, with the same expiry. An item that stays in its mode keeps
    --    its row; an upgraded one's holder becomes its node's row, in place
    --    of the marker (the check found no other live holder there); a
    --    downgraded one's row becomes a holder, and its node's marker.
    IF p_changing <> 0 THEN
        FOR v_item IN 1..cardinality(p_keys) LOOP
            IF p_modes[v_item] = 'exclusive' THEN
                UPDATE {schema}.locks l SET token = try_grant_general.token
                 WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner
                   AND l.token = p_changing AND l.mode = 'exclusive';
                CONTINUE WHEN FOUND;
                DELETE FROM {schema}.shared_holders h
                 WHERE h.namespace = p_namespace AND h.key = p_keys[v_item] AND h.token = p_changing
                   AND h.owner = p_owner
                RETURNING h.expires_at, h.transient INTO v_expires_at, v_transient;
                CONTINUE WHEN NOT FOUND;
                INSERT INTO {schema}.locks AS l (namespace, key, owner, token, expires_at, transient, mode)
                VALUES (p_namespace, p_keys[v_item], p_owner, try_grant_general.token, v_expires_at, v_transient,
                        'exclusive')
                ON CONFLICT (namespace, key) DO UPDATE
                   SET owner = excluded.owner, token = excluded.token, expires_at = excluded.expires_at,
                       transient = excluded.transient, mode = 'exclusive';
            ELSE
                UPDATE {schema}.shared_holders h SET token = try_grant_general.token
                 WHERE h.namespace = p_namespace AND h.key = p_keys[v_item] AND h.token = p_changing
                   AND h.owner = p_owner;
                CONTINUE WHEN FOUND;
                DELETE FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner
                   AND l.token = p_changing AND l.mode = 'exclusive'
                RETURNING l.expires_at, l.transient INTO v_expires_at, v_transient;
                CONTINUE WHEN NOT FOUND;
                INSERT INTO {schema}.shared_holders (namespace, key, token, owner, expires_at, transient)
                VALUES (p_namespace, p_keys[v_item], try_grant_general.token, p_owner, v_expires_at, v_transient);
                PERFORM {schema}.mark_holders(p_namespace, p_keys[v_item], v_expires_at, true);
            END IF;
        END LOOP;
        RETURN;
    END IF;

    -- 4. A new grant. Nothing live is in the way of its items: in an
    --    Exclusive item's subtree, what is left has expired, and its
    --    markers have no live holder; in a Shared one's, the Exclusive rows
    --    left have expired. (A stepwise client may have locked a
    --    descendant's key since the check: its key lock does not wait for
    --    this node's; that row is live and stays.) Expired ancestors, and
    --    expired holders under a Shared item, are left to the sweep. A
    --    single-key lock removes its key's row if it expired or is a
    --    marker. An Exclusive item's row is its node's; a Shared item's is
    --    a holder, and its node's row the marker.
    v_expires_at := v_now + p_ttl_ms * interval '1 millisecond';
    FOR v_item IN 1..cardinality(p_keys) LOOP
        IF NOT p_tree THEN
            DELETE FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key = p_keys[v_item]
               AND (l.expires_at - v_now <= interval '0' OR l.mode = 'holders');
        ELSIF p_modes[v_item] = 'exclusive' THEN
            DELETE FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
               AND (l.expires_at - v_now <= interval '0' OR l.mode = 'holders');
        ELSE
            DELETE FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
               AND l.mode = 'exclusive' AND l.expires_at - v_now <= interval '0';
        END IF;
        IF p_modes[v_item] = 'exclusive' THEN
            INSERT INTO {schema}.locks (namespace, key, owner, token, expires_at, transient, mode)
            VALUES (p_namespace, p_keys[v_item], p_owner, try_grant_general.token, v_expires_at, p_transient,
                    'exclusive');
        ELSE
            INSERT INTO {schema}.shared_holders (namespace, key, token, owner, expires_at, transient)
            VALUES (p_namespace, p_keys[v_item], try_grant_general.token, p_owner, v_expires_at, p_transient);
            PERFORM {schema}.mark_holders(p_namespace, p_keys[v_item], v_expires_at, true);
        END IF;
    END LOOP;

    -- A waiter's grant takes its reservation's place. (It refuses the same
    -- requests the reservation refused, so nobody is woken.)
    IF v_writes AND p_queue = 'waiting' THEN
        DELETE FROM {schema}.reservations r
         WHERE r.namespace = p_namespace AND r.ticket = p_ticket AND r.owner = p_owner;
    END IF;

    -- 5. The bounded sweep (see sweep_expired), after one grant in 128 on
    --    average for each of its items.
    IF token % 128 < cardinality(p_keys) THEN
        PERFORM {schema}.sweep_expired(v_now);
    END IF;
END
$fn$;

-- Removes every item of exactly this grant: each its node's row, or, not
-- being there, its Shared holder (each by one lookup of a primary key);
-- true if it was live. A marker left without live holders stays, in
-- nobody's way, until an Exclusive grant over it or the sweep removes it.
-- If a session listens for the namespace, waiters hear of it on the
-- channel (sent at commit); an expired grant is removed silently.
CREATE OR REPLACE FUNCTION {schema}.release_items(p_namespace text, p_keys text[], p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_item integer;
    v_removed boolean;
    v_live boolean := false;
BEGIN
    FOR v_item IN 1..cardinality(p_keys) LOOP
        DELETE FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner AND l.token = p_token
           AND l.mode = 'exclusive'
        RETURNING l.expires_at > v_now INTO v_removed;
        IF NOT FOUND THEN
            DELETE FROM {schema}.shared_holders h
             WHERE h.namespace = p_namespace AND h.key = p_keys[v_item] AND h.token = p_token AND h.owner = p_owner
            RETURNING h.expires_at > v_now INTO v_removed;
        END IF;
        v_live := v_live OR coalesce(v_removed, false);
    END LOOP;
    IF v_live THEN
        -- Held until commit: a session registering as a listener waits for
        -- this release to commit, or this release, looking in a statement
        -- of its own (a snapshot taken after the lock), sees its row.
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('mutextree listeners {schema_name} ' || p_namespace, 1));
        IF EXISTS (SELECT 1 FROM {schema}.listeners r
                    WHERE r.namespace = p_namespace
                      AND EXISTS (SELECT 1 FROM pg_stat_get_activity(r.pid))) THEN
            PERFORM pg_notify('{channel}', p_namespace);
        END IF;
    END IF;
    RETURN v_live;
END
$fn$;

-- Sets the remaining life of every item of exactly this grant, if it is
-- live: its node's row, or its Shared holder, whose marker then lives at
-- least as long (each by one lookup of a primary key).
CREATE OR REPLACE FUNCTION {schema}.refresh_items(
    p_namespace text, p_keys text[], p_owner text, p_token bigint, p_ttl_ms bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_expires_at timestamptz := v_now + p_ttl_ms * interval '1 millisecond';
    v_item integer;
    v_live boolean := false;
BEGIN
    FOR v_item IN 1..cardinality(p_keys) LOOP
        UPDATE {schema}.locks l SET expires_at = v_expires_at
         WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner AND l.token = p_token
           AND l.mode = 'exclusive' AND l.expires_at - v_now > interval '0';
        IF NOT FOUND THEN
            UPDATE {schema}.shared_holders h SET expires_at = v_expires_at
             WHERE h.namespace = p_namespace AND h.key = p_keys[v_item] AND h.token = p_token AND h.owner = p_owner
               AND h.expires_at - v_now > interval '0';
            IF FOUND THEN
                PERFORM {schema}.mark_holders(p_namespace, p_keys[v_item], v_expires_at, false);
            END IF;
        END IF;
        v_live := v_live OR FOUND;
    END LOOP;
    RETURN v_live;
END
$fn$;
