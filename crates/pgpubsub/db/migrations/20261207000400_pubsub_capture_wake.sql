-- migrate:up

-- The capturer wakes listeners after every append, with `capture:<channel>`
-- as the payload (no channel name has a colon). Before, it woke them only
-- while one held the wake lock, as triggers do; a listener then gave the
-- lock back on every wake-up, read again to find nothing, took the lock and
-- read once more: four statements per append per listener, where one
-- suffices. Triggers keep the lock test: a NOTIFY per writer transaction
-- serialises busy writers' commits; one per batch of the capturer does not.

CREATE OR REPLACE FUNCTION pubsub.capture_append(
    p_slot text, p_lsn pg_lsn[], p_index integer[], p_xid bigint[], p_channel text[], p_source oid[],
    p_body text[], p_payload text[], p_channels jsonb DEFAULT NULL, p_map_lsn pg_lsn DEFAULT NULL,
    p_map_idx integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cur      bigint := pg_current_xact_id()::text::bigint;   -- first: the txid exists before any seq
    v_lsn      pg_lsn;
    v_idx      integer;
    v_last     integer := coalesce(cardinality(p_lsn), 0);
    v_count    bigint := 0;
    v_channels text[];
    v_channel  text;
BEGIN
    INSERT INTO pubsub.capture_state (slot) VALUES (p_slot) ON CONFLICT (slot) DO NOTHING;
    SELECT lsn, idx INTO v_lsn, v_idx FROM pubsub.capture_state WHERE slot = p_slot FOR UPDATE;
    IF v_last > 0 AND (p_lsn[v_last], p_index[v_last]) > (v_lsn, v_idx) THEN
        WITH batch AS (
            -- nextval after the filter and in the batch's order.
            SELECT nextval('pubsub.events_seq') AS seq, u.*,
                   (v_cur - ((v_cur - u.xid) & 4294967295)) AS xid8
            FROM (SELECT * FROM unnest(p_lsn, p_index, p_xid, p_channel, p_source, p_body, p_payload)
                      WITH ORDINALITY AS x(lsn, idx, xid, channel, source, body, payload, n)
                  WHERE (x.lsn, x.idx) > (v_lsn, v_idx)
                  ORDER BY x.n) u
        ), added AS (
            INSERT INTO pubsub.events (seq, channel, body, payload, source, source_xid, source_lsn)
            SELECT b.seq, b.channel, '{"seq":' || b.seq || ',"txid":' || v_cur || ',"source_txid":' || b.xid8 || b.body,
                   b.payload, b.source,
                   b.xid8::text::xid8, b.lsn
            FROM batch b
            RETURNING channel
        )
        SELECT count(*), array_agg(DISTINCT channel) INTO v_count, v_channels FROM added;
        UPDATE pubsub.capture_state
        SET lsn = p_lsn[v_last], idx = p_index[v_last], updated_at = clock_timestamp()
        WHERE slot = p_slot;
        -- Wake listeners after every append, whether one waits or not:
        -- one NOTIFY per channel per batch costs writers nothing (they run
        -- no trigger), and a listener the capturer alone woke may keep the
        -- wake lock, reading once per append (Listener::read).
        IF v_count > 0 THEN
            FOREACH v_channel IN ARRAY v_channels LOOP
                PERFORM pg_notify('pubsub_wake', 'capture:' || v_channel);
            END LOOP;
        END IF;
    END IF;
    IF p_channels IS NOT NULL THEN
        UPDATE pubsub.capture_state
        SET channels = p_channels, map_lsn = p_map_lsn, map_idx = p_map_idx, updated_at = clock_timestamp()
        WHERE slot = p_slot AND (p_map_lsn, p_map_idx) > (map_lsn, map_idx);
    END IF;
    RETURN v_count;
END;
$$;

-- migrate:down

CREATE OR REPLACE FUNCTION pubsub.capture_append(
    p_slot text, p_lsn pg_lsn[], p_index integer[], p_xid bigint[], p_channel text[], p_source oid[],
    p_body text[], p_payload text[], p_channels jsonb DEFAULT NULL, p_map_lsn pg_lsn DEFAULT NULL,
    p_map_idx integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cur      bigint := pg_current_xact_id()::text::bigint;   -- first: the txid exists before any seq
    v_lsn      pg_lsn;
    v_idx      integer;
    v_last     integer := coalesce(cardinality(p_lsn), 0);
    v_count    bigint := 0;
    v_channels text[];
    v_channel  text;
BEGIN
    INSERT INTO pubsub.capture_state (slot) VALUES (p_slot) ON CONFLICT (slot) DO NOTHING;
    SELECT lsn, idx INTO v_lsn, v_idx FROM pubsub.capture_state WHERE slot = p_slot FOR UPDATE;
    IF v_last > 0 AND (p_lsn[v_last], p_index[v_last]) > (v_lsn, v_idx) THEN
        WITH batch AS (
            -- nextval after the filter and in the batch's order.
            SELECT nextval('pubsub.events_seq') AS seq, u.*,
                   (v_cur - ((v_cur - u.xid) & 4294967295)) AS xid8
            FROM (SELECT * FROM unnest(p_lsn, p_index, p_xid, p_channel, p_source, p_body, p_payload)
                      WITH ORDINALITY AS x(lsn, idx, xid, channel, source, body, payload, n)
                  WHERE (x.lsn, x.idx) > (v_lsn, v_idx)
                  ORDER BY x.n) u
        ), added AS (
            INSERT INTO pubsub.events (seq, channel, body, payload, source, source_xid, source_lsn)
            SELECT b.seq, b.channel, '{"seq":' || b.seq || ',"txid":' || v_cur || ',"source_txid":' || b.xid8 || b.body,
                   b.payload, b.source,
                   b.xid8::text::xid8, b.lsn
            FROM batch b
            RETURNING channel
        )
        SELECT count(*), array_agg(DISTINCT channel) INTO v_count, v_channels FROM added;
        UPDATE pubsub.capture_state
        SET lsn = p_lsn[v_last], idx = p_index[v_last], updated_at = clock_timestamp()
        WHERE slot = p_slot;
        -- Wake waiting listeners, as every writer of the log does.
        IF v_count > 0 AND NOT pg_try_advisory_xact_lock_shared(8099566096075549541) THEN
            FOREACH v_channel IN ARRAY v_channels LOOP
                PERFORM pg_notify('pubsub_wake', v_channel);
            END LOOP;
        END IF;
    END IF;
    IF p_channels IS NOT NULL THEN
        UPDATE pubsub.capture_state
        SET channels = p_channels, map_lsn = p_map_lsn, map_idx = p_map_idx, updated_at = clock_timestamp()
        WHERE slot = p_slot AND (p_map_lsn, p_map_idx) > (map_lsn, map_idx);
    END IF;
    RETURN v_count;
END;
$$;
