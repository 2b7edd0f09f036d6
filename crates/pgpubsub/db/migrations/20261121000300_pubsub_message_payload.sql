-- migrate:up

-- Large published messages are logged with their payload as it was sent, not
-- as an escaped JSON string inside the body.
--
-- Escaping is what a large message used to cost: PostgreSQL escapes a JSON
-- string one character at a time (about 1.4 ms per MB), and `to_json` alone
-- was nearly the whole cost of publishing 1 MB (docs/performance.md). A
-- message whose payload is over `pubsub.ref_threshold` travels by reference,
-- so its JSON only ever exists where it is read back: the listener renders it
-- there, in Rust, byte for byte what PostgreSQL would have produced.
--
-- For such an event, `body` is the envelope without its last member and
-- `payload` the text; the delivered JSON is `body` with `,"payload":` and the
-- payload as a JSON string inserted before its closing brace.
-- `pubsub.event_json(e)` renders it in SQL. Every other event has `payload`
-- NULL and `body` as delivered.

ALTER TABLE pubsub.events ADD COLUMN payload text;

DO $$
BEGIN
    ALTER TABLE pubsub.events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server: pubsub.events.payload keeps the default compression';
END $$;

COMMENT ON TABLE pubsub.events IS
    'Every notified event, by sequence; pubsub.event_json(e) is the exact JSON text delivered';
COMMENT ON COLUMN pubsub.events.body IS
    'The JSON text delivered; when payload is set, that text without its last member ("payload")';
COMMENT ON COLUMN pubsub.events.payload IS
    'A large published message''s payload, unescaped; NULL for every other event';

-- The event's JSON text exactly as it is delivered.
CREATE FUNCTION pubsub.event_json(e pubsub.events) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN e.payload IS NULL THEN e.body
                ELSE left(e.body, -1) || ',"payload":' || to_json(e.payload)::text || '}' END
$$;

-- Publishes a message: any text, any size, byte-identical on arrival.
-- Returns the event's sequence number.
--
-- The reference to a message logged apart carries the bytes stored (body
-- plus payload); the listener checks them before it renders the JSON.
CREATE OR REPLACE FUNCTION pubsub.publish(p_channel text, p_payload text) RETURNS bigint
LANGUAGE plpgsql AS $$
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
    -- octet_length of a large argument reads its header, not its bytes.
    IF octet_length(p_payload) > v_threshold THEN
        INSERT INTO pubsub.events (seq, channel, body, payload) VALUES (v_seq, p_channel, v_head || '}', p_payload);
        PERFORM pg_notify(p_channel, format('~r:%s:%s', v_seq, octet_length(v_head) + 1 + octet_length(p_payload)));
        RETURN v_seq;
    END IF;
    -- to_json(text) escapes the payload as a JSON string; it is never
    -- parsed, so its bytes arrive exactly as sent.
    RETURN pubsub.append(p_channel, v_seq, v_head || ',"payload":' || to_json(p_payload)::text || '}');
END;
$$;

-- migrate:down

-- Every message logged apart gets its JSON back in body, then publish is
-- what it was.
UPDATE pubsub.events e SET body = pubsub.event_json(e), payload = NULL WHERE e.payload IS NOT NULL;

CREATE OR REPLACE FUNCTION pubsub.publish(p_channel text, p_payload text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
BEGIN
    PERFORM pubsub.check_channel(p_channel);
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_seq := nextval('pubsub.events_seq');
    RETURN pubsub.append(p_channel, v_seq,
        '{"seq":' || v_seq || ',"txid":' || pg_current_xact_id()::text
        || ',"kind":"message","channel":"' || p_channel || '","time":' || to_json(clock_timestamp())::text
        || ',"payload":' || to_json(p_payload)::text || '}');
END;
$$;

DROP FUNCTION pubsub.event_json(pubsub.events);
ALTER TABLE pubsub.events DROP COLUMN payload;
COMMENT ON TABLE pubsub.events IS 'Every notified event, by sequence; body is the exact JSON text delivered';
COMMENT ON COLUMN pubsub.events.body IS NULL;
