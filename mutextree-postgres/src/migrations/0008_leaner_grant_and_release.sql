-- Version 8: the grant of one Exclusive item and the release cost the
-- server less; what they do is unchanged (see "Version 8" in the crate's
-- schema module).
--
-- The CHECK constraint on locks.mode goes: PostgreSQL prepares a table's
-- CHECK expressions again for every INSERT statement it runs, which was a
-- third of an Exclusive grant's insert, and only this schema's functions
-- write the table (with the modes 'exclusive' and 'holders').
ALTER TABLE {schema}.locks DROP CONSTRAINT IF EXISTS locks_mode;

-- try_grant_exclusive as in version 7, evaluating fewer PL/pgSQL
-- expressions on its way to a grant (each is prepared again in every
-- transaction): what only a refusal needs is worked out on the refusal,
-- and a lookup that found nothing tests nothing more.
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
    v_waiting boolean;
    v_now timestamptz;
    -- Whether a refusal writes a reservation, and the ticket below which
    -- reservations are ahead of the request: worked out where needed.
    v_writes boolean;
    v_before bigint;
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

    FOR v_pass IN CASE WHEN v_free OR p_queue IN ('join', 'waiting') THEN 2 ELSE 1 END..2 LOOP
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
            IF v_row.key IS NOT NULL THEN
                IF v_row.mode = 'holders' THEN
                    v_row := {schema}.first_in_the_way(p_namespace, v_ancestor, NULL, v_now, 0, false);
                END IF;
                IF v_row.key IS NOT NULL AND (NOT v_found OR NOT v_row.transient) THEN
                    v_blocker := v_row;
                    v_found := true;
                    EXIT WHEN NOT v_row.transient;
                END IF;
            END IF;
        END LOOP;
        IF NOT v_found OR v_blocker.transient THEN
            SELECT * INTO v_row FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
               AND l.expires_at - v_now > interval '0'
             ORDER BY l.key LIMIT 1;
            IF v_row.key IS NOT NULL AND v_row.mode = 'holders' THEN
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
        IF p_queue <> 'barge' AND (NOT v_found OR p_queue IN ('join', 'waiting')) THEN
            SELECT q.live_until INTO v_live_until FROM {schema}.queues q WHERE q.namespace = p_namespace;
        END IF;
        IF NOT v_found AND v_live_until - v_now > interval '0' THEN
            v_before := CASE WHEN p_queue = 'waiting' THEN p_ticket ELSE 9223372036854775807 END;
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
        v_writes := p_queue IN ('join', 'waiting');
        v_waiting := coalesce(v_waiting, false);
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
                                           ARRAY['exclusive'], v_now, p_reservation_ms * interval '1 millisecond',
                                           v_live_until);
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

-- release_items as in version 7, walking its keys with FOREACH and
-- reading the clock per removed row (as version 3's release did), with
-- fewer expressions.
CREATE OR REPLACE FUNCTION {schema}.release_items(p_namespace text, p_keys text[], p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_key text;
    v_removed boolean;
    -- True once a live item was removed; null while none was.
    v_live boolean;
BEGIN
    FOREACH v_key IN ARRAY p_keys LOOP
        DELETE FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key = v_key AND l.owner = p_owner AND l.token = p_token
           AND l.mode = 'exclusive'
        RETURNING l.expires_at > clock_timestamp() INTO v_removed;
        IF NOT FOUND THEN
            DELETE FROM {schema}.shared_holders h
             WHERE h.namespace = p_namespace AND h.key = v_key AND h.token = p_token AND h.owner = p_owner
            RETURNING h.expires_at > clock_timestamp() INTO v_removed;
        END IF;
        v_live := v_live OR v_removed;
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
    RETURN coalesce(v_live, false);
END
$fn$;
