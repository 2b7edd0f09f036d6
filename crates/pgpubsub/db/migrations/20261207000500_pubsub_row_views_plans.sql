-- migrate:up

-- A reader's connection plans no sequential or bitmap scan (a page read,
-- planned once, must walk the (txid, seq) index however the log grows:
-- LogConn::for_reading). Deciding what a role may see runs on that
-- connection too, and evaluates the tables' own policies, whose subqueries
-- are the application's: they plan here as on any other connection.
ALTER FUNCTION pubsub.row_views_classes(text[], jsonb[], jsonb[], text, text[])
    SET enable_seqscan = on SET enable_bitmapscan = on;

-- migrate:down

ALTER FUNCTION pubsub.row_views_classes(text[], jsonb[], jsonb[], text, text[])
    RESET enable_seqscan;
ALTER FUNCTION pubsub.row_views_classes(text[], jsonb[], jsonb[], text, text[])
    RESET enable_bitmapscan;
