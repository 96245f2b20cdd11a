-- Version 9: the grant of one Exclusive item costs the server less again;
-- what it does is unchanged (see "Version 9" in the crate's schema
-- module). PL/pgSQL prepares every expression it
-- evaluates again in every transaction, and every call is a transaction
-- of its own: so the new grant function evaluates fewer on its way to a
-- grant, and leaves what only a refusal needs to it.

-- The schema's queue mark: no reservation of any namespace lives past it
-- (seconds since the epoch, as the sequence's last value; never moved
-- back). The fair grant of one Exclusive item reads it first, with one
-- function call and no statement, and reads its namespace's mark (a
-- lookup of queues) only while it lies ahead. setval is not transactional: the mark moves before
-- the reservation that moves it commits (and stays if that rolls back),
-- so a check that sees the reservation sees the mark. A mark that reads
-- null (a role that may not read the sequence, on servers that answer
-- null rather than refuse) counts as ahead. It starts at the latest
-- namespace mark, and on a schema that had a version before this step's
-- transaction (its row in schema_version), ten minutes ahead if that is
-- later: a refusal of a version 8 function still running writes its
-- namespace's mark only, and its waiter renews the reservation (through
-- keep_reservation below) well within that time, which counts from here,
-- not from the commit.
CREATE SEQUENCE IF NOT EXISTS {schema}.queue_mark AS bigint MINVALUE 0;
SELECT pg_advisory_xact_lock(hashtextextended('mutextree queue mark {schema_name}', 1));
SELECT setval('{schema}.queue_mark',
              greatest(coalesce(pg_sequence_last_value('{schema}.queue_mark'), 0),
                       (SELECT ceil(date_part('epoch', clock_timestamp() + interval '10 minutes'))::bigint
                          FROM {schema}.schema_version),
                       (SELECT ceil(date_part('epoch', max(q.live_until)))::bigint FROM {schema}.queues q),
                       0));

-- A grant function's answer, the columns try_grant_exclusive answers in:
-- a function that returns a named composite type finds its columns in the
-- type cache, where one with OUT parameters builds them at every call.
DO $do$
BEGIN
    CREATE TYPE {schema}.grant_answer AS (
        outcome text, token bigint,
        blocked_items integer[], blocker_keys text[], blocker_modes text[], blocker_owners text[],
        blocker_tokens bigint[], blocker_remaining_us bigint[], blocker_transient boolean[],
        blocker_waiting boolean[], blocker_waited_us bigint[]);
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$do$;

-- keep_reservation as in version 7, and the schema's mark moved too when
-- the reservation would outlive it, under an advisory lock of its own
-- (seed 1, apart from the grants' keys), so that two moves never lower it.
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
    IF NOT coalesce(pg_sequence_last_value('{schema}.queue_mark') >= date_part('epoch', p_now + p_reservation),
                    false) THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('mutextree queue mark {schema_name}', 1));
        PERFORM setval('{schema}.queue_mark',
                       greatest(coalesce(pg_sequence_last_value('{schema}.queue_mark'), 0),
                                ceil(date_part('epoch', p_now + 2 * p_reservation))::bigint));
    END IF;
    RETURN v_ticket;
END
$fn$;

-- For an Exclusive item's check whose plain look found a stepwise
-- client's transient row or a marker first: the check as
-- try_grant_exclusive makes it, each ancestor's key root first until a
-- held lock, then the subtree; a held lock reported rather than a
-- transient one, a marker only with a live holder (first_in_the_way).
-- Null if nothing is in the way.
CREATE OR REPLACE FUNCTION {schema}.exclusive_blocker(
    p_namespace text, p_key text, p_range_end text, p_ancestors text[], p_now timestamptz)
RETURNS {schema}.locks LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_ancestor text;
    v_found boolean := false;
    v_blocker {schema}.locks;
    v_held {schema}.locks;
    v_row {schema}.locks;
BEGIN
    FOREACH v_ancestor IN ARRAY p_ancestors LOOP
        SELECT * INTO v_row FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key = v_ancestor AND l.expires_at - p_now > interval '0';
        IF v_row.key IS NOT NULL THEN
            IF v_row.mode = 'holders' THEN
                v_row := {schema}.first_in_the_way(p_namespace, v_ancestor, NULL, p_now, 0, false);
            END IF;
            IF v_row.key IS NOT NULL AND (NOT v_found OR NOT v_row.transient) THEN
                v_blocker := v_row;
                v_found := true;
                EXIT WHEN NOT v_row.transient;
            END IF;
        END IF;
    END LOOP;
    IF v_found AND NOT v_blocker.transient THEN
        RETURN v_blocker;
    END IF;
    SELECT * INTO v_row FROM {schema}.locks l
     WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
       AND l.expires_at - p_now > interval '0'
     ORDER BY l.key LIMIT 1;
    IF v_row.key IS NOT NULL AND v_row.mode = 'holders' THEN
        v_row := {schema}.first_in_the_way(p_namespace, p_key, p_range_end, p_now, 0, false);
    END IF;
    IF v_row.key IS NOT NULL AND v_row.transient THEN
        SELECT * INTO v_held FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
           AND l.expires_at - p_now > interval '0' AND NOT l.transient
         ORDER BY l.key LIMIT 1;
        IF v_held.mode = 'holders' THEN
            v_held := {schema}.first_in_the_way(p_namespace, p_key, p_range_end, p_now, 0, true);
        END IF;
        IF v_held.key IS NOT NULL THEN
            v_row := v_held;
        END IF;
    END IF;
    IF v_row.key IS NOT NULL AND (NOT v_found OR NOT v_row.transient) THEN
        RETURN v_row;
    END IF;
    RETURN v_blocker;
END
$fn$;

-- try_grant_exclusive's work, answered as a grant_answer, on a shorter
-- way to a grant: the plain look takes the first live row on an
-- ancestor's key or in the subtree as the blocker when it is a held
-- Exclusive row, and asks exclusive_blocker otherwise; no pass loop; the
-- answer's outcome written by the insert that grants.
CREATE OR REPLACE FUNCTION {schema}.grant_exclusive(
    p_namespace text, p_owner text, p_ttl_ms bigint, p_key text, p_range_end text, p_ancestors text[],
    p_queue text, p_ticket bigint, p_reservation_ms bigint)
RETURNS {schema}.grant_answer LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_answer {schema}.grant_answer;
    -- Whether every advisory lock is held: null while each one tried was
    -- free at once (no initial value: each costs an expression).
    v_free boolean;
    v_ancestor text;
    v_now timestamptz;
    -- The blocker: a row of locks, or a reservation's (v_waiting).
    v_row {schema}.locks;
    v_waiting boolean;
    v_before bigint;
    v_live_until timestamptz;
    v_joined_at timestamptz;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE every statement would read the
    -- snapshot taken before the advisory locks were granted.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mutextree grants need READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;

    -- 1. The advisory locks, as in try_grant_exclusive: each only if it is
    --    free at once, root first, the node's last.
    FOREACH v_ancestor IN ARRAY p_ancestors LOOP
        IF NOT pg_try_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0)) THEN
            v_free := false;
            EXIT;
        END IF;
    END LOOP;
    v_free := CASE WHEN v_free IS NULL THEN pg_try_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0))
                   ELSE false END;

    -- Once with every lock held; or, when one was taken, first a look
    -- without them (unless the refusal writes a reservation), then the
    -- locks waited for, each in a statement of its own, and a second look.
    LOOP
        IF v_free OR p_queue NOT IN ('join', 'waiting') THEN
            v_now := clock_timestamp();
            -- 2. The check: each ancestor's key by one lookup of the
            --    primary key, root first, until a live row; then the
            --    subtree by a range of it. A held Exclusive row is the
            --    blocker; a transient row or a marker takes the long way.
            FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                SELECT * INTO v_row FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = v_ancestor AND l.expires_at - v_now > interval '0';
                EXIT WHEN FOUND;
            END LOOP;
            IF v_row.key IS NULL THEN
                SELECT * INTO v_row FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                   AND l.expires_at - v_now > interval '0'
                 ORDER BY l.key LIMIT 1;
            END IF;
            IF v_row.transient OR v_row.mode <> 'exclusive' THEN
                v_row := {schema}.exclusive_blocker(p_namespace, p_key, p_range_end, p_ancestors, v_now);
            END IF;

            -- A waiter ahead, if no grant is in the way and the schema's
            -- queue mark lies ahead (a function call), then the
            -- namespace's (one lookup): a live
            -- reservation with a smaller ticket on an ancestor (the head
            -- of its key's queue) or in the subtree, in either mode.
            IF v_row.key IS NULL AND p_queue <> 'barge'
               AND (pg_sequence_last_value('{schema}.queue_mark') > date_part('epoch', v_now)) IS NOT FALSE THEN
                SELECT q.live_until INTO v_live_until FROM {schema}.queues q WHERE q.namespace = p_namespace;
                IF v_live_until - v_now > interval '0' THEN
                    v_before := CASE WHEN p_queue = 'waiting' THEN p_ticket ELSE 9223372036854775807 END;
                    FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                        SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, false, r.joined_at
                          INTO v_row.key, v_row.mode, v_row.owner, v_row.token, v_row.expires_at, v_row.transient,
                               v_joined_at
                          FROM {schema}.reservations r
                         WHERE r.namespace = p_namespace AND r.key = v_ancestor AND r.ticket < v_before
                           AND r.expires_at - v_now > interval '0'
                         ORDER BY r.ticket LIMIT 1;
                        EXIT WHEN FOUND;
                    END LOOP;
                    IF v_row.key IS NULL THEN
                        SELECT r.key, r.mode, r.owner, r.ticket, r.expires_at, false, r.joined_at
                          INTO v_row.key, v_row.mode, v_row.owner, v_row.token, v_row.expires_at, v_row.transient,
                               v_joined_at
                          FROM {schema}.reservations r
                         WHERE r.namespace = p_namespace AND r.key >= p_key AND r.key < p_range_end
                           AND r.ticket < v_before AND r.expires_at - v_now > interval '0'
                         ORDER BY r.key, r.ticket LIMIT 1;
                    END IF;
                    v_waiting := v_row.key IS NOT NULL;
                END IF;
            END IF;
            EXIT WHEN v_row.key IS NOT NULL OR v_free;
        END IF;
        FOREACH v_ancestor IN ARRAY p_ancestors LOOP
            PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0));
        END LOOP;
        PERFORM pg_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0));
        v_free := true;
    END LOOP;

    IF v_row.key IS NOT NULL THEN
        v_waiting := coalesce(v_waiting, false);
        v_answer.blocked_items := ARRAY[1];
        v_answer.blocker_keys := ARRAY[v_row.key];
        v_answer.blocker_modes := ARRAY[v_row.mode];
        v_answer.blocker_owners := ARRAY[v_row.owner];
        v_answer.blocker_tokens := ARRAY[v_row.token];
        v_answer.blocker_remaining_us := ARRAY[(extract(epoch FROM v_row.expires_at - v_now) * 1000000)::bigint];
        v_answer.blocker_transient := ARRAY[v_row.transient];
        v_answer.blocker_waiting := ARRAY[v_waiting];
        v_answer.blocker_waited_us := ARRAY[CASE WHEN v_waiting
                                                 THEN greatest((extract(epoch FROM v_now - v_joined_at) * 1000000)::bigint, 0)
                                                 ELSE 0 END];
        IF p_queue NOT IN ('join', 'waiting') THEN
            v_answer.outcome := 'blocked';
            RETURN v_answer;
        END IF;
        -- 3. Refused in the queue: the reservation written (or, for a
        --    waiter, renewed, or written again if it lapsed), and the
        --    namespace's mark moved if needed (see keep_reservation).
        IF NOT v_waiting THEN
            SELECT q.live_until INTO v_live_until FROM {schema}.queues q WHERE q.namespace = p_namespace;
        END IF;
        v_answer.outcome := 'queued';
        v_answer.token := {schema}.keep_reservation(p_namespace, p_owner, p_queue, p_ticket, ARRAY[p_key],
                                                    ARRAY['exclusive'], v_now,
                                                    p_reservation_ms * interval '1 millisecond', v_live_until);
        RETURN v_answer;
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
    RETURNING 'granted', locks.token INTO v_answer.outcome, v_answer.token;

    -- A waiter's grant takes its reservation's place; one grant in 128
    -- runs the bounded sweep (see sweep_expired).
    IF p_queue = 'waiting' OR v_answer.token % 128 = 0 THEN
        IF p_queue = 'waiting' THEN
            DELETE FROM {schema}.reservations r
             WHERE r.namespace = p_namespace AND r.ticket = p_ticket AND r.owner = p_owner;
        END IF;
        IF v_answer.token % 128 = 0 THEN
            PERFORM {schema}.sweep_expired(v_now);
        END IF;
    END IF;
    RETURN v_answer;
END
$fn$;
