-- migrate:up

-- One data path, two ways in: the capturer (`pgpubsub capture`) reads the
-- tables watched with `pubsub.watch_wal` (and pubsub.wal_messages) from a
-- logical replication slot and appends their events to pubsub.events, so
-- every reader reads the log, whichever way an event came in (docs/delivery.md,
-- "Capture from the WAL").
--
-- Exactly once into the log: each batch is appended by one call of
-- pubsub.capture_append, which, in the same transaction, moves the slot's
-- position here (the place, commit LSN and index, of the last event
-- appended). It locks this row first and drops every event at or before
-- that place, so a batch sent again (after a crash, a cut connection, or by
-- a second capturer taking over the slot) adds nothing twice. The slot is
-- confirmed to the server only after that commit.

CREATE TABLE pubsub.capture_state (
    slot        text        PRIMARY KEY,
    -- The last event appended: its transaction's commit LSN and its index
    -- in that transaction. (0/0, -1): none yet.
    lsn         pg_lsn      NOT NULL DEFAULT '0/0',
    idx         integer     NOT NULL DEFAULT -1,
    -- Watched table (oid, as text) -> channel, as the WAL had it at the change
    -- of pubsub.wal_watches at (map_lsn, map_idx):
    -- a capturer that restarts maps the changes it reads again as they were
    -- mapped when they committed, not as pubsub.wal_watches says today.
    channels    jsonb,
    map_lsn     pg_lsn      NOT NULL DEFAULT '0/0',
    map_idx     integer     NOT NULL DEFAULT -1,
    -- Slot re-creations (the server invalidated the old one): each recorded
    -- a resync in the log.
    resets      integer     NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE pubsub.capture_state IS
    'Where each capturer (replication slot) has appended up to; written only by pubsub.capture_append';

-- Where a captured event came from: its transaction (xid8) and commit LSN.
-- NULL for trigger-captured events and published messages, whose txid is
-- their writing transaction.
ALTER TABLE pubsub.events ADD COLUMN source_xid xid8, ADD COLUMN source_lsn pg_lsn;
COMMENT ON COLUMN pubsub.events.source_xid IS 'For an event captured from the WAL: the transaction that made the change';
COMMENT ON COLUMN pubsub.events.source_lsn IS 'For an event captured from the WAL: its commit LSN';

-- The capturer's state for p_slot (created empty if new).
CREATE FUNCTION pubsub.capture_state(p_slot text) RETURNS pubsub.capture_state
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v pubsub.capture_state;
BEGIN
    INSERT INTO pubsub.capture_state (slot) VALUES (p_slot) ON CONFLICT (slot) DO NOTHING;
    SELECT * INTO v FROM pubsub.capture_state WHERE slot = p_slot;
    RETURN v;
END;
$$;

-- Appends one batch of captured events, in order, exactly once; returns how
-- many were new. The arrays are parallel, one element per event:
--   p_lsn, p_index  its place: commit LSN, index in its transaction;
--   p_xid           its transaction's 32-bit xid (made an xid8 here);
--   p_channel       its channel; p_source its table (NULL: a message);
--   p_body          its JSON after `{"seq":N,"txid":X,"source_txid":Y` (the
--                   capturer builds it; those are only known here). `txid`
--                   is this transaction's, as for every logged event: with
--                   seq, the event's place in the log;
--   p_payload       a large message's payload, kept apart (else NULL).
-- p_channels, p_map_lsn, p_map_idx: the channel map and its place, stored
-- when newer than the one kept.
--
-- The xid8 of a source transaction: it began before this one, within 2^31
-- transactions (wraparound protection sees to that), so it is the newest
-- xid8 at or below ours with those low 32 bits.
CREATE FUNCTION pubsub.capture_append(
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

-- The server invalidated the slot (it fell past max_slot_wal_keep_size) and
-- the capturer made a new one: changes in between were never read. Records
-- a `resync` event on every WAL-watched channel, so readers learn of the gap
-- in the log's order (never a silent one), and starts the slot's state anew.
CREATE FUNCTION pubsub.capture_reset(p_slot text, p_reason text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_txid    xid8 := pg_current_xact_id();
    v_count   bigint := 0;
    v_channel text;
    v_seq     bigint;
BEGIN
    FOR v_channel IN SELECT DISTINCT channel FROM pubsub.wal_watches ORDER BY 1 LOOP
        v_seq := nextval('pubsub.events_seq');
        INSERT INTO pubsub.events (seq, channel, body)
        VALUES (v_seq, v_channel, '{"seq":' || v_seq || ',"txid":' || v_txid::text || ',"kind":"resync","channel":"'
                || v_channel || '","time":' || to_json(clock_timestamp())::text
                || ',"reason":' || to_json(coalesce(p_reason, ''))::text || '}');
        PERFORM pg_notify('pubsub_wake', v_channel);
        v_count := v_count + 1;
    END LOOP;
    INSERT INTO pubsub.capture_state (slot) VALUES (p_slot)
    ON CONFLICT (slot) DO UPDATE
        SET lsn = '0/0', idx = -1, channels = NULL, map_lsn = '0/0', map_idx = -1,
            resets = pubsub.capture_state.resets + 1, updated_at = clock_timestamp();
    RETURN v_count;
END;
$$;

-- Granted explicitly, to the capturer's role (docs/delivery.md): with them a
-- role writes events into the log.
REVOKE EXECUTE ON FUNCTION pubsub.capture_state(text),
    pubsub.capture_append(text, pg_lsn[], integer[], bigint[], text[], oid[], text[], text[], jsonb, pg_lsn, integer),
    pubsub.capture_reset(text, text) FROM PUBLIC;

-- migrate:down

-- The capturers' replication slots (pgpubsub_capture*) are dropped by
-- `pgpubsub migrate down`, which says so, before this runs; dbmate users
-- drop them with pg_drop_replication_slot.

DROP FUNCTION pubsub.capture_reset(text, text);
DROP FUNCTION pubsub.capture_append(text, pg_lsn[], integer[], bigint[], text[], oid[], text[], text[], jsonb, pg_lsn, integer);
DROP FUNCTION pubsub.capture_state(text);
ALTER TABLE pubsub.events DROP COLUMN source_xid, DROP COLUMN source_lsn;
DROP TABLE pubsub.capture_state;
