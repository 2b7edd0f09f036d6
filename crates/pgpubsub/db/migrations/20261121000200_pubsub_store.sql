-- migrate:up

-- The event-sourced store of seed 004: the latest snapshot of every
-- (bucket, id) with its version, and the append-only history that led to it.
-- Snapshots are watched like any table, so every put and delete is an event
-- on the `pubsub_store` channel.

CREATE TABLE pubsub.snapshots (
    bucket  text        NOT NULL,
    id      text        NOT NULL,
    version integer     NOT NULL CHECK (version > 0),
    ts      timestamptz NOT NULL DEFAULT clock_timestamp(),
    val     jsonb       NOT NULL,
    PRIMARY KEY (bucket, id)
);

CREATE TABLE pubsub.history (
    bucket  text        NOT NULL,
    id      text        NOT NULL,
    version integer     NOT NULL,
    type    text        NOT NULL,
    ts      timestamptz NOT NULL DEFAULT clock_timestamp(),
    val     jsonb,
    PRIMARY KEY (bucket, id, version)
);

COMMENT ON TABLE pubsub.snapshots IS 'Latest version of every (bucket, id); written by pubsub.put / pubsub.remove';
COMMENT ON TABLE pubsub.history IS 'Append-only history of every (bucket, id): one row per version';

-- Writes a new version of (bucket, id) and records it in the history.
-- p_expected: when given, the write happens only if the current version is
-- exactly that (0 = must not exist yet); otherwise SQLSTATE PS409 is raised.
-- Returns the new version.
CREATE FUNCTION pubsub.put(p_bucket text, p_id text, p_val jsonb,
                           p_type text DEFAULT 'put', p_expected integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_current integer;
    v_version integer;
BEGIN
    IF p_val IS NULL THEN
        RAISE EXCEPTION 'store value must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- Lock the row (if any) so concurrent puts get consecutive versions.
    SELECT version INTO v_current FROM pubsub.snapshots
    WHERE bucket = p_bucket AND id = p_id FOR UPDATE;
    IF p_expected IS NOT NULL AND coalesce(v_current, 0) <> p_expected THEN
        RAISE EXCEPTION 'version conflict on %/%: expected %, found %',
            p_bucket, p_id, p_expected, coalesce(v_current, 0) USING ERRCODE = 'PS409';
    END IF;
    -- A deleted id continues its numbering from its history.
    IF v_current IS NULL THEN
        SELECT max(version) INTO v_current FROM pubsub.history WHERE bucket = p_bucket AND id = p_id;
    END IF;
    v_version := coalesce(v_current, 0) + 1;
    INSERT INTO pubsub.snapshots (bucket, id, version, val) VALUES (p_bucket, p_id, v_version, p_val)
    ON CONFLICT (bucket, id) DO UPDATE SET version = EXCLUDED.version, ts = EXCLUDED.ts, val = EXCLUDED.val;
    INSERT INTO pubsub.history (bucket, id, version, type, val) VALUES (p_bucket, p_id, v_version, p_type, p_val);
    RETURN v_version;
END;
$$;

-- Deletes (bucket, id): the snapshot goes, a 'delete' entry closes its
-- history. Returns the deleting version, or NULL when there was nothing.
CREATE FUNCTION pubsub.remove(p_bucket text, p_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_version integer;
BEGIN
    DELETE FROM pubsub.snapshots WHERE bucket = p_bucket AND id = p_id RETURNING version INTO v_version;
    IF v_version IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO pubsub.history (bucket, id, version, type, val)
    VALUES (p_bucket, p_id, v_version + 1, 'delete', NULL);
    RETURN v_version + 1;
END;
$$;

SELECT pubsub.watch('pubsub.snapshots', 'pubsub_store');

-- migrate:down

DROP FUNCTION pubsub.remove(text, text);
DROP FUNCTION pubsub.put(text, text, jsonb, text, integer);
DROP TABLE pubsub.history;
DROP TABLE pubsub.snapshots;
