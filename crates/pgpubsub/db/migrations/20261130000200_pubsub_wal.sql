-- migrate:up

-- Capture from the WAL (logical decoding): writers unhurt under concurrency.
--
-- A trigger that appends to pubsub.events costs every writing transaction a
-- second table, its index and its WAL: 32 concurrent single-row writers on
-- a watched table reach about 0.55x of the same table unwatched, and no
-- cheaper trigger gets past 0.8x (docs/performance.md). A table watched with
-- `pubsub.watch_wal` has no trigger at all: it is added to the publication
-- `pgpubsub`, and pgpubsub reads its changes from a logical replication slot
-- (pgoutput). Writers pay only what wal_level = logical adds to the WAL.
--
-- The trade (docs/delivery.md, "Capture from the WAL"):
-- * needs wal_level = logical, and a reader role with REPLICATION;
-- * a reader's position is its replication slot, not a cursor in the log:
--   a named reader resumes from its slot, and what it has not confirmed is
--   kept (as WAL) until it does;
-- * the slot streams every published table: pgpubsub itself delivers a
--   table's rows only to a reader whose role may SELECT it, and messages
--   only to one that may SELECT pubsub.wal_messages.
--
-- Publishing through the WAL: an INSERT into pubsub.wal_messages (for
-- roles granted INSERT on it), or `pubsub.publish_wal(channel, payload)`
-- (for roles granted EXECUTE; a function call more). The table has no index
-- and is published for inserts only. Its rows are read from the WAL, never
-- from the table: `pubsub.prune_wal_messages` deletes old ones.
--
-- The publications are created here even when wal_level is not logical
-- (PostgreSQL only warns), so the schema is the same on every server.

-- Which channel each WAL-watched table's changes go to. Published too, so a
-- reader learns of a new watch or a changed channel in the WAL's order.
CREATE TABLE pubsub.wal_watches (
    source  oid PRIMARY KEY,
    channel text NOT NULL
);
COMMENT ON TABLE pubsub.wal_watches IS
    'Tables watched through the WAL (pubsub.watch_wal) and their channels; read by WAL readers from the slot';

CREATE TABLE pubsub.wal_messages (
    -- The channel rule of pubsub.check_channel, as a constraint: publishers
    -- may INSERT here directly (a function call costs more than the insert).
    channel text NOT NULL CONSTRAINT wal_messages_channel_name CHECK (channel ~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$'),
    payload text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pubsub.wal_messages IS
    'Messages published through the WAL (pubsub.publish_wal). Read from the WAL, never from here: prune with pubsub.prune_wal_messages';

-- publish_via_partition_root: a watched partitioned table's changes come
-- under its own name, whichever partition holds the row.
CREATE PUBLICATION pgpubsub FOR TABLE pubsub.wal_watches WITH (publish_via_partition_root = true);
CREATE PUBLICATION pgpubsub_messages FOR TABLE pubsub.wal_messages WITH (publish = 'insert');

-- Watches a table through the WAL: no trigger; its changes are events on
-- `p_channel` (default: the table's name) for WAL readers. Replaces a
-- trigger watch of the same table. The caller must own the table and the
-- publication (the role that migrated, usually).
CREATE FUNCTION pubsub.watch_wal(p_table regclass, p_channel text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text;
BEGIN
    SELECT coalesce(p_channel, c.relname) INTO v_channel FROM pg_class c WHERE c.oid = p_table;
    PERFORM pubsub.check_channel(v_channel);
    IF (SELECT relkind FROM pg_class WHERE oid = p_table) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    -- A published table without a replica identity refuses UPDATE and
    -- DELETE: watching it would break its writers.
    IF (SELECT relreplident FROM pg_class WHERE oid = p_table) = 'n'
       OR ((SELECT relreplident FROM pg_class WHERE oid = p_table) = 'd'
           AND NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = p_table AND indisprimary)) THEN
        RAISE EXCEPTION '% has no replica identity: once published, its updates and deletes would fail', p_table
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'give it a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX)';
    END IF;
    PERFORM pubsub.unwatch(p_table);
    INSERT INTO pubsub.wal_watches (source, channel) VALUES (p_table, v_channel);
    EXECUTE format('ALTER PUBLICATION pgpubsub ADD TABLE %s', p_table);
    RETURN v_channel;
END;
$$;

-- Detaches either kind of watch. Returns whether the table was watched.
CREATE OR REPLACE FUNCTION pubsub.unwatch(p_table regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean := false;
    v_name  text;
BEGIN
    FOR v_name IN
        SELECT tgname FROM pg_trigger WHERE tgrelid = p_table
          AND tgname IN ('pubsub_watch', 'pubsub_watch_truncate', 'pubsub_watch_inline', 'pubsub_watch_inline_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_name, p_table);
        v_found := v_found OR NOT v_name LIKE '%truncate';
    END LOOP;
    IF EXISTS (SELECT 1 FROM pubsub.wal_watches WHERE source = p_table) THEN
        DELETE FROM pubsub.wal_watches WHERE source = p_table;
        v_found := true;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
               WHERE p.pubname = 'pgpubsub' AND r.prrelid = p_table) THEN
        EXECUTE format('ALTER PUBLICATION pgpubsub DROP TABLE %s', p_table);
    END IF;
    RETURN v_found;
END;
$$;

-- Publishes a message through the WAL: any text, any size. Returns nothing:
-- the message's place is its transaction's place in the WAL. SECURITY
-- DEFINER: publishers need EXECUTE on this function, nothing on the table.
CREATE FUNCTION pubsub.publish_wal(p_channel text, p_payload text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pubsub.check_channel(p_channel);
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO pubsub.wal_messages (channel, payload) VALUES (p_channel, p_payload);
END;
$$;

-- Deletes WAL messages older than `p_keep` (they were read from the WAL; the
-- table only grows otherwise). Returns how many.
CREATE FUNCTION pubsub.prune_wal_messages(p_keep interval DEFAULT '1 hour') RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (DELETE FROM pubsub.wal_messages WHERE at < now() - p_keep RETURNING 1)
    SELECT count(*) FROM gone;
$$;

-- What is watched, and how.
CREATE OR REPLACE VIEW pubsub.watches AS
SELECT t.tgrelid::regclass AS "table",
       split_part(encode(t.tgargs, 'escape'), '\000', 1) AS channel,
       t.tgname = 'pubsub_watch_inline' AS inline,
       false AS wal
FROM pg_trigger t
WHERE t.tgname IN ('pubsub_watch', 'pubsub_watch_inline')
UNION ALL
SELECT w.source::regclass, w.channel, false, true FROM pubsub.wal_watches w;

-- A WAL reader loads the channels of watched tables when it starts (then
-- follows them in the stream). Which tables are watched is no secret: the
-- triggers of the other mode are in pg_trigger, readable by all. (A reader
-- still needs USAGE on the schema, as every reader of the log does.)
GRANT SELECT ON pubsub.wal_watches TO PUBLIC;

-- As for every function of the schema: granted explicitly (docs/delivery.md).
REVOKE EXECUTE ON FUNCTION pubsub.watch_wal(regclass, text), pubsub.publish_wal(text, text),
    pubsub.prune_wal_messages(interval) FROM PUBLIC;

-- migrate:down

-- Tables watched through the WAL are unwatched (the trigger mode has no
-- equivalent that keeps writers unhurt). Replication slots of pgpubsub's
-- readers (pgpubsub_*) are left to the operator: a slot may be in use, and
-- dropping one loses what it kept. Drop them with pg_drop_replication_slot.

DROP VIEW pubsub.watches;
CREATE VIEW pubsub.watches AS
SELECT t.tgrelid::regclass AS "table",
       split_part(encode(t.tgargs, 'escape'), '\000', 1) AS channel,
       t.tgname = 'pubsub_watch_inline' AS inline
FROM pg_trigger t
WHERE t.tgname IN ('pubsub_watch', 'pubsub_watch_inline');

DROP FUNCTION pubsub.watch_wal(regclass, text);
DROP FUNCTION pubsub.publish_wal(text, text);
DROP FUNCTION pubsub.prune_wal_messages(interval);
DROP PUBLICATION pgpubsub;
DROP PUBLICATION pgpubsub_messages;
DROP TABLE pubsub.wal_watches;
DROP TABLE pubsub.wal_messages;

CREATE OR REPLACE FUNCTION pubsub.unwatch(p_table regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean := false;
    v_name  text;
BEGIN
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
