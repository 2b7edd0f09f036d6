-- migrate:up

-- Row-level authorization: what a role (with its claims) may see of each
-- row change, decided by the table's own policies and column privileges,
-- exactly as its SELECT would (docs/delivery.md, "Row-level authorization").
--
-- The gateway reads the log once, as its own role, and asks this for each
-- class of subscribers (one role and one set of claims) and each page of
-- events: one statement per class per page, whatever the number of
-- subscribers in the class.

-- For each event n (its table's name as `schema.table`, quoted, its new and
-- old rows as JSON; NULL where it has none), as the current role would see
-- it, or as `p_role` with the claims `p_claims` would:
--   readable  the role may SELECT some column of the table;
--   new_seen  it may see the new row (the table's policies pass on it);
--   old_seen  the same for the old row;
--   columns   the columns it may read, NULL when all of them;
--   open      it may read every row and column of the table (no row
--             security for it, every column granted): what it sees of the
--             table needs no asking until that changes.
-- A table the role cannot read, or that no longer exists, shows nothing.
--
-- The policies: the permissive SELECT (or ALL) ones that apply to the role,
-- OR-ed, AND-ed with the restrictive ones, each NULL taken as false; none
-- shows nothing (row security with no policy), and a role for which row
-- security is not active (the owner, BYPASSRLS) sees every row. Their text
-- is the catalog's own (pg_get_expr), written by the table's owner, never
-- anything a subscriber sent.
--
-- `p_role`: becoming it takes what SET ROLE takes (the caller must be a
-- member of it), for this statement's transaction only; a role the caller
-- may not become is refused (42501), never decided with the caller's own
-- rights. `p_claims`: PostgREST's convention, the JSON object of a token's
-- claims in request.jwt.claims, so policies written for PostgREST or
-- Supabase read them unchanged. Nothing after the switch needs the role to
-- have any right on the pubsub schema.
CREATE FUNCTION pubsub.row_views(p_tables text[], p_news jsonb[], p_olds jsonb[],
                                 p_role text DEFAULT NULL, p_claims text DEFAULT NULL)
RETURNS TABLE (n bigint, readable boolean, new_seen boolean, old_seen boolean, columns text[], open boolean)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_table   text;
    v_rel     regclass;
    v_name    name;
    v_columns text[];
    v_all     boolean;
    v_qual    text;
BEGIN
    IF p_role IS NOT NULL THEN
        PERFORM set_config('role', p_role, true);
        PERFORM set_config('request.jwt.claims', coalesce(p_claims, ''), true);
    END IF;
    FOR v_table IN SELECT DISTINCT t FROM unnest(p_tables) t LOOP
        v_rel := to_regclass(v_table);
        IF v_rel IS NULL OR NOT has_any_column_privilege(v_rel, 'SELECT') THEN
            RETURN QUERY SELECT u.pgps_n, false, false, false, NULL::text[], false
                FROM unnest(p_tables) WITH ORDINALITY u(pgps_t, pgps_n) WHERE u.pgps_t = v_table;
            CONTINUE;
        END IF;
        SELECT array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE has_column_privilege(v_rel, a.attnum, 'SELECT')),
               bool_and(has_column_privilege(v_rel, a.attnum, 'SELECT'))
          INTO v_columns, v_all
          FROM pg_attribute a WHERE a.attrelid = v_rel AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_all THEN
            v_columns := NULL;
        END IF;
        IF NOT row_security_active(v_rel) THEN
            RETURN QUERY SELECT u.pgps_n, true, u.pgps_new IS NOT NULL, u.pgps_old IS NOT NULL, v_columns,
                                v_columns IS NULL
                FROM unnest(p_tables, p_news, p_olds) WITH ORDINALITY u(pgps_t, pgps_new, pgps_old, pgps_n)
                WHERE u.pgps_t = v_table;
            CONTINUE;
        END IF;
        WITH applying AS (
            SELECT p.polpermissive AS permissive,
                   'coalesce((' || pg_get_expr(p.polqual, p.polrelid) || '), false)' AS qual
            FROM pg_policy p
            WHERE p.polrelid = v_rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
              AND (0::oid = ANY (p.polroles)
                   OR EXISTS (SELECT 1 FROM unnest(p.polroles) r WHERE r <> 0 AND pg_has_role(current_user, r, 'USAGE')))
        )
        SELECT coalesce('(' || (SELECT string_agg(qual, ' OR ') FROM applying WHERE permissive) || ')', 'false')
            || coalesce(' AND ' || (SELECT string_agg(qual, ' AND ') FROM applying WHERE NOT permissive), '')
          INTO v_qual;
        -- Each row as it was, under the table's own name (a policy may
        -- name it: orders.tenant_id).
        SELECT c.relname INTO v_name FROM pg_class c WHERE c.oid = v_rel;
        RETURN QUERY EXECUTE format(
            'SELECT u.pgps_n, true,
                    u.pgps_new IS NOT NULL AND (SELECT %1$s FROM jsonb_populate_record(NULL::%2$s, u.pgps_new) AS %3$I),
                    u.pgps_old IS NOT NULL AND (SELECT %1$s FROM jsonb_populate_record(NULL::%2$s, u.pgps_old) AS %3$I),
                    $4, false
             FROM unnest($1, $2, $3) WITH ORDINALITY u(pgps_t, pgps_new, pgps_old, pgps_n)
             WHERE u.pgps_t = $5',
            v_qual, v_rel, v_name)
        USING p_tables, p_news, p_olds, v_columns, v_table;
    END LOOP;
END;
$$;

-- Anyone may ask, for itself or a role it may become: it runs with the
-- caller's rights and shows nothing a SELECT would not.
GRANT EXECUTE ON FUNCTION pubsub.row_views(text[], jsonb[], jsonb[], text, text) TO PUBLIC;

-- migrate:down

DROP FUNCTION pubsub.row_views(text[], jsonb[], jsonb[], text, text);
