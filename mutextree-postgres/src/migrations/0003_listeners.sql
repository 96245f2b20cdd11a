
-- The sessions listening for releases, by namespace: the listening
-- connection of a client that waits adds its own row. A row whose session
-- has ended is ignored, and removed when a listening connection opens.
CREATE TABLE {schema}.listeners (
    namespace text COLLATE "C" NOT NULL,
    pid       integer NOT NULL,
    PRIMARY KEY (namespace, pid)
);

-- Removes exactly this grant; true if it was live. If a session listens
-- for the namespace, waiters hear of it on the channel (sent at commit);
-- an expired grant is removed silently.
CREATE OR REPLACE FUNCTION {schema}.release(p_namespace text, p_key text, p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_live boolean;
BEGIN
    DELETE FROM {schema}.locks l
     WHERE l.namespace = p_namespace AND l.key = p_key AND l.owner = p_owner AND l.token = p_token
    RETURNING l.expires_at > clock_timestamp() INTO v_live;
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
