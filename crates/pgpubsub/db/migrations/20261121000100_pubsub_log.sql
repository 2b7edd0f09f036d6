-- migrate:up

-- pgpubsub core: the event log, the wire encoder, publish, the generic row
-- trigger and watch/unwatch. Everything lives in the `pubsub` schema; nothing
-- outside it is touched. The wire format produced here is the contract written
-- down in docs/protocol.md: change both together.

CREATE SCHEMA pubsub;

COMMENT ON SCHEMA pubsub IS 'pgpubsub: event log, store and triggers (see docs/protocol.md)';

-- Every event that pgpubsub notifies is first written here. The log is what
-- makes delivery lossless: a listener that missed notifications (disconnect,
-- restart, a chunk that never arrived) reads the same bytes back from here.
--
-- `seq` orders events by allocation, not by commit: sequence values are handed
-- out before commit, so seq 100 can commit after seq 101. `txid` records the
-- writing transaction so a catch-up cursor can avoid skipping such a late
-- commit (see docs/delivery.md).
CREATE TABLE pubsub.events (
    seq        bigint      PRIMARY KEY,
    txid       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    channel    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    body       text        NOT NULL
);

CREATE SEQUENCE pubsub.events_seq AS bigint OWNED BY pubsub.events.seq;

-- Large bodies are compressed when stored (TOAST); lz4 does it about three
-- times faster than the default pglz (measured on 1 MB events:
-- docs/performance.md). Servers built without lz4 keep the default.
DO $$
BEGIN
    ALTER TABLE pubsub.events ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server: pubsub.events keeps the default compression';
END $$;

-- Catch-up reads in (txid, seq) order: see docs/delivery.md.
CREATE INDEX events_txid_seq ON pubsub.events (txid, seq);

COMMENT ON TABLE pubsub.events IS 'Every notified event, by sequence; body is the exact JSON text delivered';

-- Named subscribers' positions (`pgpubsub listen --name`): everything at or
-- below (txid, seq) was delivered to them.
CREATE TABLE pubsub.cursors (
    name       text        PRIMARY KEY,
    txid       xid8        NOT NULL,
    seq        bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- What retention has removed: the highest (txid, seq) pruned. A cursor below
-- it may have missed pruned events, so its subscriber is told to resync.
CREATE TABLE pubsub.retention (
    only_row    boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    pruned_txid xid8        NOT NULL DEFAULT '0',
    pruned_seq  bigint      NOT NULL DEFAULT 0,
    pruned_at   timestamptz
);
INSERT INTO pubsub.retention DEFAULT VALUES;

-- Deletes events older than p_max_age and/or all but the newest p_keep.
-- Returns how many were deleted.
CREATE FUNCTION pubsub.prune(p_max_age interval DEFAULT NULL, p_keep bigint DEFAULT NULL) RETURNS bigint
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

-- Channel names: 1 to 63 bytes (NAMEDATALEN - 1; LISTEN would silently
-- truncate longer names), an identifier: a letter or underscore, then letters,
-- digits or underscores. The Rust side applies the same rule (channel.rs).
CREATE FUNCTION pubsub.check_channel(p_channel text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_channel IS NULL OR p_channel !~ '^[A-Za-z_][A-Za-z0-9_]*$' OR octet_length(p_channel) > 63 THEN
        RAISE EXCEPTION 'invalid channel name %', coalesce(quote_literal(p_channel), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a channel is 1 to 63 bytes: a letter or underscore, then letters, digits or underscores';
    END IF;
    RETURN p_channel;
END;
$$;

-- The wire encoder: emits one event body on a channel.
--
-- * A body under 8000 bytes (pg_notify's hard limit is 7999 payload bytes)
--   goes as itself: a JSON object.
-- * A body above `pubsub.ref_threshold` bytes (a setting, default 262144) goes
--   as a reference `~r:<seq>:<bytes>`; the listener reads the body back from
--   pubsub.events. This keeps huge events out of the shared NOTIFY queue.
-- * Anything in between is split into chunks
--   `~c:<seq>:<index>:<count>:<bytes>:<md5>:<data>`, each under 7,900 bytes.
--   Splits are made on UTF-8 character boundaries, counted in bytes. Every
--   chunk carries seq and index, so no two are identical: Postgres collapses
--   identical notifications sent in one transaction, which would otherwise
--   silently eat a repeated chunk. bytes and md5 let the listener prove the
--   reassembled body is the one that was sent.
--
-- Never raises for a large body, so a watched write never fails on size.
CREATE FUNCTION pubsub.send(p_channel text, p_seq bigint, p_body text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c_chunk_bytes CONSTANT int := 7800;   -- data bytes per chunk; header adds < 100
    v_len       int := octet_length(p_body);
    v_threshold bigint;
    v_raw       bytea;
    v_digest    text;
    v_starts    int[] := '{}';
    v_pos       int := 0;                 -- 0-based byte offset of the next chunk
    v_end       int;
    v_count     int;
    v_header    text;
BEGIN
    IF v_len < 8000 THEN
        PERFORM pg_notify(p_channel, p_body);
        RETURN;
    END IF;

    v_threshold := coalesce(nullif(current_setting('pubsub.ref_threshold', true), '')::bigint, 262144);
    IF v_len > v_threshold THEN
        PERFORM pg_notify(p_channel, format('~r:%s:%s', p_seq, v_len));
        RETURN;
    END IF;

    -- Work on the UTF-8 bytes: substr() on multi-byte text is O(offset) per
    -- call, which would make this quadratic in the body size.
    v_raw := convert_to(p_body, 'UTF8');
    v_len := length(v_raw);
    v_digest := md5(v_raw);

    -- First pass: chunk start offsets, each chunk ending on a character
    -- boundary (never before a UTF-8 continuation byte 10xxxxxx).
    WHILE v_pos < v_len LOOP
        v_starts := v_starts || v_pos;
        v_end := v_pos + c_chunk_bytes;
        IF v_end < v_len THEN
            WHILE (get_byte(v_raw, v_end) & 192) = 128 LOOP
                v_end := v_end - 1;
            END LOOP;
        ELSE
            v_end := v_len;
        END IF;
        v_pos := v_end;
    END LOOP;
    v_count := cardinality(v_starts);

    FOR i IN 1 .. v_count LOOP
        v_header := format('~c:%s:%s:%s:%s:%s:', p_seq, i - 1, v_count, v_len, v_digest);
        v_end := CASE WHEN i < v_count THEN v_starts[i + 1] ELSE v_len END;
        PERFORM pg_notify(p_channel,
            v_header || convert_from(substring(v_raw FROM v_starts[i] + 1 FOR v_end - v_starts[i]), 'UTF8'));
    END LOOP;
END;
$$;

-- Appends one event to the log and notifies it. Callers allocate the seq
-- (it is part of the body) and build the body: one line of JSON, keys in
-- the envelope's order (docs/protocol.md).
CREATE FUNCTION pubsub.append(p_channel text, p_seq bigint, p_body text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pubsub.events (seq, channel, body) VALUES (p_seq, p_channel, p_body);
    -- The common case without the call into the encoder.
    IF octet_length(p_body) < 8000 THEN
        PERFORM pg_notify(p_channel, p_body);
    ELSE
        PERFORM pubsub.send(p_channel, p_seq, p_body);
    END IF;
    RETURN p_seq;
END;
$$;

-- Publishes a message: any text, any size, byte-identical on arrival.
-- Returns the event's sequence number.
CREATE FUNCTION pubsub.publish(p_channel text, p_payload text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
BEGIN
    PERFORM pubsub.check_channel(p_channel);
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_seq := nextval('pubsub.events_seq');
    -- to_json(text) escapes the payload as a JSON string; it is never
    -- parsed, so its bytes arrive exactly as sent.
    RETURN pubsub.append(p_channel, v_seq,
        '{"seq":' || v_seq || ',"txid":' || pg_current_xact_id()::text
        || ',"kind":"message","channel":"' || p_channel || '","time":' || to_json(clock_timestamp())::text
        || ',"payload":' || to_json(p_payload)::text || '}');
END;
$$;

-- The generic row trigger. TG_ARGV[0] is the channel, TG_ARGV[1..] the
-- primary-key columns (resolved once by watch(), not per row).
-- Event: op, schema, table, key, new (INSERT, UPDATE), old (UPDATE, DELETE).
-- Also serves the statement-level TRUNCATE trigger (no row, no key).
CREATE FUNCTION pubsub.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_new  json;
    v_old  json;
    v_row  json;
    v_key  text;
    v_seq  bigint := nextval('pubsub.events_seq');
    v_body text;
BEGIN
    -- Compare TG_OP exactly: the seed's ' INSERT' (with a space) never matched.
    -- row_to_json renders the row straight to JSON text; to_jsonb would build
    -- a binary document first and render it again (measured: the body was
    -- the largest part of this trigger's cost; docs/performance.md).
    IF TG_OP = 'INSERT' OR TG_OP = 'UPDATE' THEN
        v_new := row_to_json(NEW);
    END IF;
    IF TG_OP = 'UPDATE' OR TG_OP = 'DELETE' THEN
        v_old := row_to_json(OLD);
    END IF;
    v_row := coalesce(v_new, v_old);
    IF v_row IS NOT NULL AND TG_NARGS > 1 THEN
        v_key := '';
        FOR i IN 1 .. TG_NARGS - 1 LOOP
            v_key := v_key || CASE WHEN i > 1 THEN ',' ELSE '' END
                || to_json(TG_ARGV[i])::text || ':' || coalesce((v_row -> TG_ARGV[i])::text, 'null');
        END LOOP;
        v_key := '{' || v_key || '}';
    END IF;
    -- Built as text, in the envelope's fixed key order. The channel is a
    -- checked identifier (watch), so it needs no escaping; names do.
    v_body := '{"seq":' || v_seq || ',"txid":' || pg_current_xact_id()::text
        || ',"kind":"change","channel":"' || TG_ARGV[0] || '","time":' || to_json(clock_timestamp())::text
        || ',"op":"' || TG_OP || '","schema":' || to_json(TG_TABLE_SCHEMA::text)::text
        || ',"table":' || to_json(TG_TABLE_NAME::text)::text || ',"key":' || coalesce(v_key, 'null')
        || ',"new":' || coalesce(v_new::text, 'null') || ',"old":' || coalesce(v_old::text, 'null') || '}';
    PERFORM pubsub.append(TG_ARGV[0], v_seq, v_body);
    RETURN NULL;
END;
$$;

-- Attaches the capture trigger to a table: every INSERT, UPDATE, DELETE and
-- TRUNCATE becomes an event on `p_channel` (default: the table's name).
-- Watching an already watched table replaces its channel.
CREATE FUNCTION pubsub.watch(p_table regclass, p_channel text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text;
    v_args    text;
BEGIN
    SELECT coalesce(p_channel, c.relname) INTO v_channel FROM pg_class c WHERE c.oid = p_table;
    PERFORM pubsub.check_channel(v_channel);
    IF (SELECT relkind FROM pg_class WHERE oid = p_table) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;

    SELECT string_agg(quote_literal(a.attname), ', ' ORDER BY k.ord) INTO v_args
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = p_table AND i.indisprimary;
    v_args := quote_literal(v_channel) || coalesce(', ' || v_args, '');

    PERFORM pubsub.unwatch(p_table);
    EXECUTE format('CREATE TRIGGER pubsub_watch AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION pubsub.capture(%s)', p_table, v_args);
    EXECUTE format('CREATE TRIGGER pubsub_watch_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pubsub.capture(%s)', p_table, v_args);
    RETURN v_channel;
END;
$$;

-- Detaches the capture trigger. Returns whether the table was watched.
CREATE FUNCTION pubsub.unwatch(p_table regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean;
BEGIN
    v_found := EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'pubsub_watch');
    -- Checked first rather than DROP ... IF EXISTS, which would print a
    -- NOTICE on every first watch.
    IF v_found THEN
        EXECUTE format('DROP TRIGGER pubsub_watch ON %s', p_table);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'pubsub_watch_truncate') THEN
        EXECUTE format('DROP TRIGGER pubsub_watch_truncate ON %s', p_table);
    END IF;
    RETURN v_found;
END;
$$;

-- What is watched, read from the triggers themselves (no second copy to drift).
CREATE VIEW pubsub.watches AS
SELECT t.tgrelid::regclass AS "table",
       split_part(encode(t.tgargs, 'escape'), '\000', 1) AS channel
FROM pg_trigger t
WHERE t.tgname = 'pubsub_watch';

-- migrate:down

DROP SCHEMA pubsub CASCADE;
