
-- Shared and Exclusive items, several per grant; see "Modes and
-- multi-path grants" in the crate's schema module. Every statement can run
-- again on a schema it already changed.

-- Each row is one item of a grant: the items of one grant share its owner,
-- token and expiry, and several Shared holders may sit on one key.
ALTER TABLE {schema}.locks ADD COLUMN IF NOT EXISTS mode text NOT NULL DEFAULT 'exclusive'
    CONSTRAINT locks_mode CHECK (mode IN ('shared', 'exclusive'));
ALTER TABLE {schema}.locks DROP CONSTRAINT IF EXISTS locks_pkey;
ALTER TABLE {schema}.locks ADD CONSTRAINT locks_pkey PRIMARY KEY (namespace, key, token);

-- The rows a Shared item can be blocked by: its checks read them here, so
-- their cost does not grow with the Shared holders around it.
CREATE INDEX IF NOT EXISTS locks_exclusive ON {schema}.locks (namespace, key) WHERE mode = 'exclusive';

-- A tree grant of the items p_keys in the modes p_modes (p_tree), a
-- single-key lock (not p_tree: one Exclusive item), or, with p_changing
-- the token of a live grant of p_owner, that grant's items changed to
-- p_modes with a new token. For each item: the end of its subtree's key
-- range, and its depth; p_ancestors holds each item's strict ancestors,
-- root first, item after item. p_lock_keys and p_lock_modes are the
-- advisory locks to take, in the order every call takes them (by key).
-- The outcome is 'granted' (token), 'blocked' (a blocker for each blocked
-- item, the item's position in blocked_items) or 'not held' (p_changing is
-- not live). See the crate's schema module.
CREATE OR REPLACE FUNCTION {schema}.try_grant_items(
    p_namespace text, p_owner text, p_ttl_ms bigint, p_tree boolean, p_transient boolean, p_changing bigint,
    p_keys text[], p_modes text[], p_range_ends text[], p_depths integer[], p_ancestors text[],
    p_lock_keys text[], p_lock_modes text[],
    OUT outcome text, OUT token bigint,
    OUT blocked_items integer[], OUT blocker_keys text[], OUT blocker_modes text[], OUT blocker_owners text[],
    OUT blocker_tokens bigint[], OUT blocker_remaining_us bigint[], OUT blocker_transient boolean[])
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_pass integer;
    v_free boolean := true;
    v_lock integer;
    v_item integer;
    v_at integer;
    v_first integer;
    v_found boolean;
    v_exclusive boolean;
    v_now timestamptz;
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
    FOR v_lock IN 1..cardinality(p_lock_keys) LOOP
        IF p_lock_modes[v_lock] = 'exclusive' THEN
            v_free := pg_try_advisory_xact_lock(hashtextextended(p_namespace || ' ' || p_lock_keys[v_lock], 0));
        ELSE
            v_free := pg_try_advisory_xact_lock_shared(hashtextextended(p_namespace || ' ' || p_lock_keys[v_lock], 0));
        END IF;
        EXIT WHEN NOT v_free;
    END LOOP;

    FOR v_pass IN CASE WHEN v_free THEN 2 ELSE 1 END..2 LOOP
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
        -- the whole primary key).
        IF p_changing <> 0 THEN
            v_found := false;
            FOR v_item IN 1..cardinality(p_keys) LOOP
                PERFORM FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner
                   AND l.token = p_changing AND l.expires_at - v_now > interval '0';
                v_found := FOUND;
                EXIT WHEN v_found;
            END LOOP;
            IF NOT v_found THEN
                outcome := 'not held';
                RETURN;
            END IF;
        END IF;

        -- 2. The check, item by item: the node alone, or its ancestors (by
        --    equality) and its subtree (a range of the primary key). Every
        --    live row in the way blocks an Exclusive item; only Exclusive
        --    rows block a Shared one, read through their partial index. The
        --    rows of the grant being changed are not in the way. A held
        --    lock is reported rather than a stepwise client's transient one
        --    when both are there. Expiry is tested as a difference, which
        --    the index on expires_at cannot serve, so these statements leave
        --    the planner no other choice, whatever its statistics say (see
        --    "Plans" in the schema module). The blockers' arrays stay null
        --    until an item is blocked.
        v_first := 1;
        FOR v_item IN 1..cardinality(p_keys) LOOP
            v_found := false;
            v_exclusive := p_modes[v_item] = 'exclusive';
            IF NOT p_tree THEN
                SELECT * INTO v_blocker FROM {schema}.locks l
                 WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.expires_at - v_now > interval '0'
                 LIMIT 1;
                v_found := FOUND;
            ELSE
                -- Each ancestor by one lookup of the whole primary key (or
                -- of the partial index), root first, until a held lock.
                FOR v_at IN v_first..v_first + p_depths[v_item] - 2 LOOP
                    IF v_exclusive THEN
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key = p_ancestors[v_at]
                           AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                         LIMIT 1;
                    ELSE
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key = p_ancestors[v_at] AND l.mode = 'exclusive'
                           AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                         LIMIT 1;
                    END IF;
                    IF FOUND AND (NOT v_found OR NOT v_row.transient) THEN
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
                           AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                         ORDER BY l.key LIMIT 1;
                    ELSE
                        SELECT * INTO v_row FROM {schema}.locks l
                         WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
                           AND l.mode = 'exclusive' AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                         ORDER BY l.key LIMIT 1;
                    END IF;
                    IF FOUND THEN
                        IF v_row.transient THEN
                            IF v_exclusive THEN
                                SELECT * INTO v_held FROM {schema}.locks l
                                 WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item]
                                   AND l.key < p_range_ends[v_item] AND l.expires_at - v_now > interval '0'
                                   AND l.token <> p_changing AND NOT l.transient
                                 ORDER BY l.key LIMIT 1;
                            ELSE
                                SELECT * INTO v_held FROM {schema}.locks l
                                 WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item]
                                   AND l.key < p_range_ends[v_item] AND l.mode = 'exclusive'
                                   AND l.expires_at - v_now > interval '0' AND l.token <> p_changing
                                   AND NOT l.transient
                                 ORDER BY l.key LIMIT 1;
                            END IF;
                            IF FOUND THEN
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
            IF v_found THEN
                blocked_items := blocked_items || v_item;
                blocker_keys := blocker_keys || v_blocker.key;
                blocker_modes := blocker_modes || v_blocker.mode;
                blocker_owners := blocker_owners || v_blocker.owner;
                blocker_tokens := blocker_tokens || v_blocker.token;
                blocker_remaining_us := blocker_remaining_us
                    || (extract(epoch FROM v_blocker.expires_at - v_now) * 1000000)::bigint;
                blocker_transient := blocker_transient || v_blocker.transient;
            END IF;
        END LOOP;
        EXIT WHEN blocked_items IS NOT NULL;
    END LOOP;
    IF blocked_items IS NOT NULL THEN
        outcome := 'blocked';
        RETURN;
    END IF;
    outcome := 'granted';
    token := nextval('{schema}.tokens');

    -- 3. A mode change: the grant's rows get their new mode and the new
    --    token, with the same expiry.
    IF p_changing <> 0 THEN
        FOR v_item IN 1..cardinality(p_keys) LOOP
            UPDATE {schema}.locks l SET mode = p_modes[v_item], token = try_grant_items.token
             WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner
               AND l.token = p_changing;
        END LOOP;
        RETURN;
    END IF;

    -- 3. A new grant. Nothing live is in the way of its items: in an
    --    Exclusive item's subtree, what is left has expired; in a Shared
    --    one's, the Exclusive rows left have. (A stepwise client may have
    --    locked a descendant's key since the check: its key lock does not
    --    wait for this node's; that row is live and stays.) Expired
    --    ancestors, and expired Shared rows under a Shared item, are left
    --    to the sweep. A single-key lock removes the expired rows of its
    --    key.
    FOR v_item IN 1..cardinality(p_keys) LOOP
        IF NOT p_tree THEN
            DELETE FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.expires_at - v_now <= interval '0';
        ELSIF p_modes[v_item] = 'exclusive' THEN
            DELETE FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
               AND l.expires_at - v_now <= interval '0';
        ELSE
            DELETE FROM {schema}.locks l
             WHERE l.namespace = p_namespace AND l.key >= p_keys[v_item] AND l.key < p_range_ends[v_item]
               AND l.mode = 'exclusive' AND l.expires_at - v_now <= interval '0';
        END IF;
        INSERT INTO {schema}.locks (namespace, key, owner, token, expires_at, transient, mode)
        VALUES (p_namespace, p_keys[v_item], p_owner, try_grant_items.token,
                v_now + p_ttl_ms * interval '1 millisecond', p_transient, p_modes[v_item]);
    END LOOP;

    -- 4. The bounded sweep of expired rows anywhere: up to 256 rows, after
    --    one grant in 128 on average for each of its items.
    IF token % 128 < cardinality(p_keys) THEN
        DELETE FROM {schema}.locks l
         USING (SELECT e.namespace, e.key, e.token FROM {schema}.locks e WHERE e.expires_at <= v_now
                 ORDER BY e.expires_at LIMIT 256 FOR UPDATE SKIP LOCKED) old
         WHERE l.namespace = old.namespace AND l.key = old.key AND l.token = old.token AND l.expires_at <= v_now;
    END IF;
END
$fn$;

-- Removes every item of exactly this grant (each by one lookup of the
-- whole primary key); true if it was live. If a session listens for the
-- namespace, waiters hear of it on the channel (sent at commit); an
-- expired grant is removed silently.
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
        RETURNING l.expires_at > v_now INTO v_removed;
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

-- Sets the remaining life of every item of exactly this grant (each by
-- one lookup of the whole primary key), if it is live.
CREATE OR REPLACE FUNCTION {schema}.refresh_items(
    p_namespace text, p_keys text[], p_owner text, p_token bigint, p_ttl_ms bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_item integer;
    v_live boolean := false;
BEGIN
    FOR v_item IN 1..cardinality(p_keys) LOOP
        UPDATE {schema}.locks l SET expires_at = v_now + p_ttl_ms * interval '1 millisecond'
         WHERE l.namespace = p_namespace AND l.key = p_keys[v_item] AND l.owner = p_owner AND l.token = p_token
           AND l.expires_at - v_now > interval '0';
        v_live := v_live OR FOUND;
    END LOOP;
    RETURN v_live;
END
$fn$;
