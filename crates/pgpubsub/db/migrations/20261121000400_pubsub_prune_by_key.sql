-- migrate:up

-- Pruning by age walks the primary key from the oldest event and stops at
-- the first one young enough, instead of testing every event's created_at
-- (a scan of the whole log, which `listen --max-age` ran every minute).
--
-- What goes is everything before the first event younger than p_max_age.
-- An old event behind a younger one (a long transaction commits late) waits
-- for a later prune: the log keeps at least what the policy says, never
-- less. With p_keep, all but the newest p_keep go as well.
CREATE OR REPLACE FUNCTION pubsub.prune(p_max_age interval DEFAULT NULL, p_keep bigint DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_cut   bigint;    -- events with seq <= v_cut go
    v_aged  bigint;
    v_count bigint;
    v_txid  xid8;
    v_seq   bigint;
BEGIN
    IF p_keep IS NOT NULL THEN
        SELECT seq INTO v_cut FROM pubsub.events ORDER BY seq DESC OFFSET greatest(p_keep, 0) LIMIT 1;
    END IF;
    IF p_max_age IS NOT NULL THEN
        SELECT seq - 1 INTO v_aged FROM pubsub.events
        WHERE created_at >= clock_timestamp() - p_max_age ORDER BY seq LIMIT 1;
        IF NOT FOUND THEN
            SELECT max(seq) INTO v_aged FROM pubsub.events;
        END IF;
        v_cut := greatest(v_cut, v_aged);
    END IF;
    IF v_cut IS NULL THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM pubsub.events WHERE seq <= v_cut RETURNING txid, seq
    ), top AS (
        SELECT txid, seq FROM gone ORDER BY txid DESC, seq DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM gone), top.txid, top.seq INTO v_count, v_txid, v_seq
    FROM (SELECT 1) one LEFT JOIN top ON true;
    IF v_count > 0 THEN
        UPDATE pubsub.retention
        SET pruned_txid = v_txid, pruned_seq = v_seq, pruned_at = clock_timestamp()
        WHERE (v_txid, v_seq) > (pruned_txid, pruned_seq);
    END IF;
    RETURN v_count;
END;
$$;

-- migrate:down

CREATE OR REPLACE FUNCTION pubsub.prune(p_max_age interval DEFAULT NULL, p_keep bigint DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_cut   bigint;
    v_count bigint;
    v_txid  xid8;
    v_seq   bigint;
BEGIN
    IF p_keep IS NOT NULL THEN
        SELECT seq INTO v_cut FROM pubsub.events ORDER BY seq DESC OFFSET greatest(p_keep, 0) LIMIT 1;
    END IF;
    IF p_max_age IS NULL AND v_cut IS NULL THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM pubsub.events
        WHERE (p_max_age IS NOT NULL AND created_at < clock_timestamp() - p_max_age)
           OR (v_cut IS NOT NULL AND seq <= v_cut)
        RETURNING txid, seq
    ), top AS (
        SELECT txid, seq FROM gone ORDER BY txid DESC, seq DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM gone), top.txid, top.seq INTO v_count, v_txid, v_seq
    FROM (SELECT 1) one LEFT JOIN top ON true;
    IF v_count > 0 THEN
        UPDATE pubsub.retention
        SET pruned_txid = v_txid, pruned_seq = v_seq, pruned_at = clock_timestamp()
        WHERE (v_txid, v_seq) > (pruned_txid, pruned_seq);
    END IF;
    RETURN v_count;
END;
$$;
