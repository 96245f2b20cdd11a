
-- A tree grant (p_tree) or a single-key lock; see the crate's schema module.
CREATE OR REPLACE FUNCTION {schema}.try_grant(
    p_namespace text, p_key text, p_ancestors text[], p_range_end text,
    p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean,
    OUT granted boolean, OUT token bigint,
    OUT blocker_key text, OUT blocker_owner text, OUT blocker_token bigint,
    OUT blocker_remaining_us bigint, OUT blocker_transient boolean)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_pass integer;
    v_blocked boolean;
    v_ancestor text;
    v_now timestamptz;
    v_blocker {schema}.locks%ROWTYPE;
    v_held {schema}.locks%ROWTYPE;
    v_row {schema}.locks%ROWTYPE;
    v_free boolean;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE every statement would read the
    -- snapshot taken before the advisory locks were granted.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mutextree grants need READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;

    -- 1. The advisory locks, root first, shared on the ancestors and
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
            IF p_tree THEN
                FOREACH v_ancestor IN ARRAY p_ancestors LOOP
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || v_ancestor, 0));
                END LOOP;
            END IF;
            PERFORM pg_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_key, 0));
        END IF;
        v_now := clock_timestamp();

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
                SELECT * INTO v_row FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = v_ancestor AND l.expires_at - v_now > interval '0';
                IF FOUND AND (NOT v_blocked OR NOT v_row.transient) THEN
                    v_blocker := v_row;
                    v_blocked := true;
                    EXIT WHEN NOT v_row.transient;
                END IF;
            END LOOP;
            IF NOT v_blocked OR v_blocker.transient THEN
                SELECT * INTO v_row FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
                   AND l.expires_at - v_now > interval '0'
                 ORDER BY l.key LIMIT 1;
                IF FOUND THEN
                    IF v_row.transient THEN
                        SELECT * INTO v_held FROM {schema}.locks l
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
            SELECT * INTO v_blocker FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key = p_key AND l.expires_at - v_now > interval '0';
            v_blocked := FOUND;
        END IF;
        EXIT WHEN v_blocked;
    END LOOP;
    IF v_blocked THEN
        granted := false;
        blocker_key := v_blocker.key;
        blocker_owner := v_blocker.owner;
        blocker_token := v_blocker.token;
        blocker_remaining_us := (extract(epoch FROM v_blocker.expires_at - v_now) * 1000000)::bigint;
        blocker_transient := v_blocker.transient;
        RETURN;
    END IF;

    -- 3. Nothing live is in the way: what is left in the subtree has expired. A
    --    stepwise client may have locked a descendant's key since the check
    --    (its key lock does not wait for this node's); that row is live and
    --    stays.
    IF p_tree THEN
        -- The subtree only (a range of the primary key, the only index
        -- this statement can use); expired ancestors are left to the sweep.
        DELETE FROM {schema}.locks l
         WHERE l.namespace = p_namespace AND l.key >= p_key AND l.key < p_range_end
           AND l.expires_at - v_now <= interval '0';
        INSERT INTO {schema}.locks AS l VALUES
            (p_namespace, p_key, p_owner, nextval('{schema}.tokens'), v_now + p_ttl_ms * interval '1 millisecond', p_transient)
        RETURNING l.token INTO token;
    ELSE
        INSERT INTO {schema}.locks AS l VALUES
            (p_namespace, p_key, p_owner, nextval('{schema}.tokens'), v_now + p_ttl_ms * interval '1 millisecond', p_transient)
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
        DELETE FROM {schema}.locks l
         USING (SELECT e.namespace, e.key FROM {schema}.locks e WHERE e.expires_at <= v_now
                 ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
         WHERE l.namespace = old.namespace AND l.key = old.key AND l.expires_at <= v_now;
    END IF;
END
$fn$;
