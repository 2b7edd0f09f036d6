-- migrate:up

-- The log is the only data path (docs/protocol.md, docs/delivery.md).
--
-- Until this step every event also travelled inside a NOTIFY payload. NOTIFY
-- and LISTEN need no privilege, so any role could read every watched row and
-- forge events; and every notifying transaction takes PostgreSQL's global
-- NOTIFY lock from pre-commit to the end of commit, which serializes
-- concurrent writers. Now:
--
-- * events are only appended to pubsub.events; listeners read them there,
--   with their own privileges (row-level security below);
-- * a writer sends a wake-up only while some listener is idle and waiting:
--   `pg_notify('pubsub_wake', <channel>)`, no row data. A waiting listener
--   holds the advisory lock WAKE_KEY exclusively; a writer that can take it
--   shared (nobody waits) sends nothing and holds it until its transaction
--   ends. So a listener that takes the lock knows every writer that sent no
--   wake-up has finished, and reads the log once more before it sleeps.
--   A busy system sends no NOTIFY at all.
-- * `pubsub.watch(table, channel, inline => true)` keeps the old behaviour
--   for programs that read NOTIFY payloads directly: the event's JSON in the
--   payload (chunked past 8000 bytes). Public to every role that can LISTEN.
--
-- WAKE_KEY is 8099566096075549541 ('pgpswake' as a big-endian bigint); the
-- Rust side has the same constant (event_log.rs).

-- The watched table an event came from (NULL for published messages): the
-- row-level policy below shows a change only to roles that may SELECT it.
ALTER TABLE pubsub.events ADD COLUMN source oid;
COMMENT ON COLUMN pubsub.events.source IS
    'The watched table (pg_class oid) of a row change; NULL for messages. Readers see a change only with SELECT on it';

-- Appends one event and wakes a waiting listener, if any. Callers allocate
-- the seq after the transaction has its txid (so a reader's snapshot covers
-- every seq it has not seen yet: docs/delivery.md) and build the body.
CREATE OR REPLACE FUNCTION pubsub.append(p_channel text, p_seq bigint, p_body text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pubsub.events (seq, channel, body) VALUES (p_seq, p_channel, p_body);
    IF NOT pg_try_advisory_xact_lock_shared(8099566096075549541) THEN
        PERFORM pg_notify('pubsub_wake', p_channel);
    END IF;
    RETURN p_seq;
END;
$$;

-- Publishes a message: any text, any size, byte-identical on arrival.
-- Returns the event's sequence number. Logged only: no payload is notified.
CREATE OR REPLACE FUNCTION pubsub.publish(p_channel text, p_payload text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_txid      xid8 := pg_current_xact_id();   -- first: the txid exists before the seq
    v_seq       bigint;
    v_head      text;
    v_threshold bigint;
BEGIN
    PERFORM pubsub.check_channel(p_channel);
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_seq := nextval('pubsub.events_seq');
    v_head := '{"seq":' || v_seq || ',"txid":' || v_txid::text
        || ',"kind":"message","channel":"' || p_channel || '","time":' || to_json(clock_timestamp())::text;
    v_threshold := coalesce(nullif(current_setting('pubsub.ref_threshold', true), '')::bigint, 262144);
    -- A large payload is stored as sent, unescaped (the listener renders its
    -- JSON); octet_length of a large argument reads its header, not its bytes.
    IF octet_length(p_payload) > v_threshold THEN
        INSERT INTO pubsub.events (seq, channel, body, payload) VALUES (v_seq, p_channel, v_head || '}', p_payload);
        IF NOT pg_try_advisory_xact_lock_shared(8099566096075549541) THEN
            PERFORM pg_notify('pubsub_wake', p_channel);
        END IF;
        RETURN v_seq;
    END IF;
    RETURN pubsub.append(p_channel, v_seq, v_head || ',"payload":' || to_json(p_payload)::text || '}');
END;
$$;

-- The wire encoder of `watch --inline`: emits one event body on a channel.
-- Since the log is the only data path, only inline watches use it, for
-- programs that read the payloads themselves: no references, chunks at any
-- size.
--
-- * A body under 8000 bytes (pg_notify's hard limit is 7999 payload bytes)
--   goes as itself: a JSON object.
-- * Anything larger is split into chunks
--   `~c:<seq>:<index>:<count>:<bytes>:<md5>:<data>`, each under 7,900 bytes.
--   Splits are made on UTF-8 character boundaries, counted in bytes. Every
--   chunk carries seq and index, so no two are identical: Postgres collapses
--   identical notifications sent in one transaction, which would otherwise
--   silently eat a repeated chunk. bytes and md5 let the listener prove the
--   reassembled body is the one that was sent.
--
-- Never raises for a large body, so a watched write never fails on size.
CREATE OR REPLACE FUNCTION pubsub.send(p_channel text, p_seq bigint, p_body text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c_chunk_bytes CONSTANT int := 7800;   -- data bytes per chunk; header adds < 100
    v_len       int := octet_length(p_body);
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

-- The generic row trigger. TG_ARGV[0] is the channel, TG_ARGV[1..] the
-- primary-key columns (resolved once by watch(), not per row). The trigger's
-- name says the mode: `pubsub_watch_inline*` also notifies the event's JSON.
--
-- SECURITY DEFINER: the writer needs no privilege on the pubsub schema, and
-- cannot write the log other than through a real change of a watched table.
-- The fixed search_path keeps a caller's objects out of it.
CREATE OR REPLACE FUNCTION pubsub.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_new  json;
    v_old  json;
    v_row  json;
    v_key  text;
    v_txid xid8 := pg_current_xact_id();
    v_seq  bigint := nextval('pubsub.events_seq');
    v_body text;
BEGIN
    -- Compare TG_OP exactly: the seed's ' INSERT' (with a space) never matched.
    -- row_to_json renders the row straight to JSON text (docs/performance.md).
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
    v_body := '{"seq":' || v_seq || ',"txid":' || v_txid::text
        || ',"kind":"change","channel":"' || TG_ARGV[0] || '","time":' || to_json(clock_timestamp())::text
        || ',"op":"' || TG_OP || '","schema":' || to_json(TG_TABLE_SCHEMA::text)::text
        || ',"table":' || to_json(TG_TABLE_NAME::text)::text || ',"key":' || coalesce(v_key, 'null')
        || ',"new":' || coalesce(v_new::text, 'null') || ',"old":' || coalesce(v_old::text, 'null') || '}';
    INSERT INTO pubsub.events (seq, channel, body, source) VALUES (v_seq, TG_ARGV[0], v_body, TG_RELID);
    IF starts_with(TG_NAME, 'pubsub_watch_inline') THEN
        PERFORM pubsub.send(TG_ARGV[0], v_seq, v_body);
    ELSIF NOT pg_try_advisory_xact_lock_shared(8099566096075549541) THEN
        PERFORM pg_notify('pubsub_wake', TG_ARGV[0]);
    END IF;
    RETURN NULL;
END;
$$;

-- Attaches the capture trigger to a table: every INSERT, UPDATE, DELETE and
-- TRUNCATE becomes an event on `p_channel` (default: the table's name).
-- `p_inline`: also notify each event's JSON (readable by any role that can
-- LISTEN; see docs/protocol.md). Watching an already watched table replaces
-- its channel and mode.
DROP FUNCTION pubsub.watch(regclass, text);
CREATE FUNCTION pubsub.watch(p_table regclass, p_channel text DEFAULT NULL, p_inline boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text;
    v_args    text;
    v_name    text := CASE WHEN p_inline THEN 'pubsub_watch_inline' ELSE 'pubsub_watch' END;
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
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION pubsub.capture(%s)', v_name, p_table, v_args);
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pubsub.capture(%s)', v_name || '_truncate', p_table, v_args);
    RETURN v_channel;
END;
$$;

-- Detaches the capture triggers (either mode). Returns whether the table was
-- watched.
CREATE OR REPLACE FUNCTION pubsub.unwatch(p_table regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean := false;
    v_name  text;
BEGIN
    -- Checked first rather than DROP ... IF EXISTS, which would print a
    -- NOTICE on every first watch.
    FOR v_name IN
        SELECT tgname FROM pg_trigger WHERE tgrelid = p_table
          AND tgname IN ('pubsub_watch', 'pubsub_watch_truncate', 'pubsub_watch_inline', 'pubsub_watch_inline_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_name, p_table);
        v_found := v_found OR NOT v_name LIKE '%truncate';
    END LOOP;
    RETURN v_found;
END;
$$;

-- What is watched, read from the triggers themselves (no second copy to drift).
DROP VIEW pubsub.watches;
CREATE VIEW pubsub.watches AS
SELECT t.tgrelid::regclass AS "table",
       split_part(encode(t.tgargs, 'escape'), '\000', 1) AS channel,
       t.tgname = 'pubsub_watch_inline' AS inline
FROM pg_trigger t
WHERE t.tgname IN ('pubsub_watch', 'pubsub_watch_inline');

-- Who reads what. The owner (who migrated) bypasses these policies; every
-- other role reads the log only where granted (docs/delivery.md, "Who can
-- read and who can forge"): a row change only with SELECT on its table.
ALTER TABLE pubsub.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY events_readable ON pubsub.events FOR SELECT
    USING (source IS NULL OR pg_catalog.has_table_privilege(source, 'SELECT'));

-- A named cursor belongs to the role that stored it: no other role can move
-- it (which would make that subscriber skip events).
ALTER TABLE pubsub.cursors ADD COLUMN owner name NOT NULL DEFAULT current_user;
ALTER TABLE pubsub.cursors ENABLE ROW LEVEL SECURITY;
CREATE POLICY cursors_own ON pubsub.cursors USING (owner = current_user) WITH CHECK (owner = current_user);

-- Nothing of the schema is anyone's by default: the functions that write the
-- log run as their owner and are granted explicitly (see docs/delivery.md
-- for a reader's and a publisher's grants).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pubsub FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pubsub.check_channel(text), pubsub.event_json(pubsub.events) TO PUBLIC;

-- migrate:down

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pubsub TO PUBLIC;
DROP POLICY cursors_own ON pubsub.cursors;
ALTER TABLE pubsub.cursors DISABLE ROW LEVEL SECURITY;
ALTER TABLE pubsub.cursors DROP COLUMN owner;
DROP POLICY events_readable ON pubsub.events;
ALTER TABLE pubsub.events DISABLE ROW LEVEL SECURITY;

-- Inline watches become plain watches again (the previous schema had one mode).
DO $$
DECLARE
    v_table regclass;
    v_channel text;
BEGIN
    FOR v_table, v_channel IN SELECT "table", channel FROM pubsub.watches WHERE inline LOOP
        PERFORM pubsub.unwatch(v_table);
        EXECUTE format('CREATE TRIGGER pubsub_watch AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION pubsub.capture(%L)', v_table, v_channel);
        EXECUTE format('CREATE TRIGGER pubsub_watch_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pubsub.capture(%L)', v_table, v_channel);
    END LOOP;
END $$;

DROP VIEW pubsub.watches;
CREATE VIEW pubsub.watches AS
SELECT t.tgrelid::regclass AS "table",
       split_part(encode(t.tgargs, 'escape'), '\000', 1) AS channel
FROM pg_trigger t
WHERE t.tgname = 'pubsub_watch';

CREATE OR REPLACE FUNCTION pubsub.unwatch(p_table regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean;
BEGIN
    v_found := EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'pubsub_watch');
    IF v_found THEN
        EXECUTE format('DROP TRIGGER pubsub_watch ON %s', p_table);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'pubsub_watch_truncate') THEN
        EXECUTE format('DROP TRIGGER pubsub_watch_truncate ON %s', p_table);
    END IF;
    RETURN v_found;
END;
$$;

DROP FUNCTION pubsub.watch(regclass, text, boolean);
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

CREATE OR REPLACE FUNCTION pubsub.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $$
DECLARE
    v_new  json;
    v_old  json;
    v_row  json;
    v_key  text;
    v_seq  bigint := nextval('pubsub.events_seq');
    v_body text;
BEGIN
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
    v_body := '{"seq":' || v_seq || ',"txid":' || pg_current_xact_id()::text
        || ',"kind":"change","channel":"' || TG_ARGV[0] || '","time":' || to_json(clock_timestamp())::text
        || ',"op":"' || TG_OP || '","schema":' || to_json(TG_TABLE_SCHEMA::text)::text
        || ',"table":' || to_json(TG_TABLE_NAME::text)::text || ',"key":' || coalesce(v_key, 'null')
        || ',"new":' || coalesce(v_new::text, 'null') || ',"old":' || coalesce(v_old::text, 'null') || '}';
    PERFORM pubsub.append(TG_ARGV[0], v_seq, v_body);
    RETURN NULL;
END;
$$;
ALTER FUNCTION pubsub.capture() RESET search_path;

CREATE OR REPLACE FUNCTION pubsub.publish(p_channel text, p_payload text) RETURNS bigint
LANGUAGE plpgsql SECURITY INVOKER AS $$
DECLARE
    v_seq       bigint;
    v_head      text;
    v_threshold bigint;
BEGIN
    PERFORM pubsub.check_channel(p_channel);
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_seq := nextval('pubsub.events_seq');
    v_head := '{"seq":' || v_seq || ',"txid":' || pg_current_xact_id()::text
        || ',"kind":"message","channel":"' || p_channel || '","time":' || to_json(clock_timestamp())::text;
    v_threshold := coalesce(nullif(current_setting('pubsub.ref_threshold', true), '')::bigint, 262144);
    IF octet_length(p_payload) > v_threshold THEN
        INSERT INTO pubsub.events (seq, channel, body, payload) VALUES (v_seq, p_channel, v_head || '}', p_payload);
        PERFORM pg_notify(p_channel, format('~r:%s:%s', v_seq, octet_length(v_head) + 1 + octet_length(p_payload)));
        RETURN v_seq;
    END IF;
    RETURN pubsub.append(p_channel, v_seq, v_head || ',"payload":' || to_json(p_payload)::text || '}');
END;
$$;
ALTER FUNCTION pubsub.publish(text, text) RESET search_path;

CREATE OR REPLACE FUNCTION pubsub.append(p_channel text, p_seq bigint, p_body text) RETURNS bigint
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    INSERT INTO pubsub.events (seq, channel, body) VALUES (p_seq, p_channel, p_body);
    IF octet_length(p_body) < 8000 THEN
        PERFORM pg_notify(p_channel, p_body);
    ELSE
        PERFORM pubsub.send(p_channel, p_seq, p_body);
    END IF;
    RETURN p_seq;
END;
$$;
ALTER FUNCTION pubsub.append(text, bigint, text) RESET search_path;

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
CREATE OR REPLACE FUNCTION pubsub.send(p_channel text, p_seq bigint, p_body text) RETURNS void
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

ALTER TABLE pubsub.events DROP COLUMN source;
