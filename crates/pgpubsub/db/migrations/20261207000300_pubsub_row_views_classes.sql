-- migrate:up

-- Row-level authorization for many classes of one role in one statement
-- (docs/delivery.md, "Row-level authorization", "What it costs").
--
-- pubsub.row_views decides a page of events for one class (a role and its
-- claims); 1,000 tenants then cost 1,000 statements per page, each planning
-- its policy anew. This decides the page for every class of one role at
-- once: p_claims holds each class's claims (class k is p_claims[k]).
--
-- The answer is sparse, as the gateway reads it:
--   k NULL, n          what every class of the role sees of event n:
--                      readable, columns, open; and new_seen/old_seen when
--                      the table has no row security for the role, or its
--                      policies read no claims (then they cannot tell the
--                      classes apart: one answer per event for all);
--   k, n               class k also sees the new row (new_seen) or the
--                      old row (old_seen) of event n (only rows that show);
--   k, n NULL          class k could not be decided (its policy failed on
--                      its claims: a bad claim, say); columns holds the
--                      error's SQLSTATE and message; the others were.
--
-- How a table's policies are evaluated for many classes:
--   - "by join", one query for every class: when the policies read the
--     claims only as current_setting('request.jwt.claims', true) (PostgREST's
--     own spelling) and otherwise call only IMMUTABLE functions, with no
--     subquery, each such call is replaced by the class's claims, and the
--     rows are joined with the classes on the policies (an equality such
--     as tenant_id = (claims ->> 'tenant') becomes a hash join: the cost
--     grows with rows plus classes, not rows times classes);
--   - "per class" otherwise (a function such as auth.uid() may read the
--     claims where we cannot see it, and a subquery may read a table whose
--     own policies read them): for each class, its claims are set and the
--     policies evaluated, as pubsub.row_views does, in one statement still.
-- The replacement is made on the catalog's own text of the policies
-- (pg_get_expr) and checked against their parse tree: as many calls
-- replaced as the tree holds, none left; else "per class".
CREATE FUNCTION pubsub.row_views_classes(p_tables text[], p_news jsonb[], p_olds jsonb[],
                                         p_role text, p_claims text[])
RETURNS TABLE (k bigint, n bigint, readable boolean, new_seen boolean, old_seen boolean, columns text[], open boolean)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c_call    CONSTANT text := 'current_setting(''request.jwt.claims''::text, true)';
    c_claims  CONSTANT text := 'pgps_c.pgps_claims';
    v_table   text;
    v_rel     regclass;
    v_name    name;
    v_columns text[];
    v_all     boolean;
    v_qual    text;
    v_tree    text;
    v_joined  text;
    v_by_join boolean;
    v_calls   bigint;
    v_each    text;
    v_k       bigint;
    v_ks      bigint[];
    v_ns      bigint[];
    v_new     boolean[];
    v_old     boolean[];
BEGIN
    IF p_role IS NOT NULL THEN
        PERFORM set_config('role', p_role, true);
    END IF;
    FOR v_table IN SELECT DISTINCT t FROM unnest(p_tables) t LOOP
        v_rel := to_regclass(v_table);
        IF v_rel IS NULL OR NOT has_any_column_privilege(v_rel, 'SELECT') THEN
            RETURN QUERY SELECT NULL::bigint, u.pgps_n, false, false, false, NULL::text[], false
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
            RETURN QUERY SELECT NULL::bigint, u.pgps_n, true, u.pgps_new IS NOT NULL, u.pgps_old IS NOT NULL, v_columns,
                                v_columns IS NULL
                FROM unnest(p_tables, p_news, p_olds) WITH ORDINALITY u(pgps_t, pgps_new, pgps_old, pgps_n)
                WHERE u.pgps_t = v_table;
            CONTINUE;
        END IF;
        -- The policies that apply to the role, as pubsub.row_views combines
        -- them. In a join's condition a NULL is not true, as in a policy, so
        -- "by join" needs no coalesce (an equality stays a hash key).
        WITH applying AS (
            SELECT p.polpermissive AS permissive, '(' || pg_get_expr(p.polqual, p.polrelid) || ')' AS qual,
                   p.polqual::text AS tree
            FROM pg_policy p
            WHERE p.polrelid = v_rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
              AND (0::oid = ANY (p.polroles)
                   OR EXISTS (SELECT 1 FROM unnest(p.polroles) r WHERE r <> 0 AND pg_has_role(current_user, r, 'USAGE')))
        )
        SELECT '(' || coalesce((SELECT string_agg(qual, ' OR ') FROM applying WHERE permissive), 'false') || ')'
                   || coalesce(' AND ' || (SELECT string_agg(qual, ' AND ') FROM applying WHERE NOT permissive), ''),
               coalesce((SELECT string_agg(tree, ' ') FROM applying), '')
          INTO v_qual, v_tree;
        SELECT c.relname INTO v_name FROM pg_class c WHERE c.oid = v_rel;
        v_joined := replace(v_qual, c_call, c_claims);
        v_calls := (SELECT count(*) FROM regexp_matches(v_tree, ':funcid 3294 ', 'g'));
        -- Only PostgreSQL's own functions, IMMUTABLE (a function of ours,
        -- even one declared IMMUTABLE, may read the claims inside).
        v_by_join := p_role IS NOT NULL
            AND position('current_setting(' IN v_joined) = 0
            AND (length(v_qual) - length(v_joined)) / (length(c_call) - length(c_claims)) = v_calls
            AND v_tree !~ '\{(SUBLINK|ROWCOMPARE|COERCETODOMAIN|SUBPLAN) '
            AND NOT EXISTS (
                SELECT 1 FROM regexp_matches(v_tree, ':(funcid|opfuncid|hashfuncid|negfuncid|aggfnoid|winfnoid) (\d+)', 'g') m
                JOIN pg_proc f ON f.oid = m[2]::oid
                WHERE (f.provolatile <> 'i' AND f.oid <> 3294) OR f.oid >= 16384)
            -- The names this query gives its own columns, unused by the table.
            AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = v_rel AND a.attname LIKE 'pgps\_%');
        -- Whatever a class before left set: nothing may read it now (the
        -- reading role's own class, p_role NULL, keeps the session's).
        IF p_role IS NOT NULL THEN
            PERFORM set_config('request.jwt.claims', '', true);
        END IF;
        -- The policies on each row, as the claims now set decide them.
        v_each := format(
            'SELECT array_agg(pgps_n), array_agg(pgps_new), array_agg(pgps_old) FROM (
                SELECT u.pgps_n,
                       u.pgps_new IS NOT NULL AND (SELECT coalesce(%1$s, false)
                           FROM jsonb_populate_record(NULL::%2$s, u.pgps_new) AS %3$I) AS pgps_new,
                       u.pgps_old IS NOT NULL AND (SELECT coalesce(%1$s, false)
                           FROM jsonb_populate_record(NULL::%2$s, u.pgps_old) AS %3$I) AS pgps_old
                FROM unnest($1, $2, $3) WITH ORDINALITY u(pgps_t, pgps_new, pgps_old, pgps_n)
                WHERE u.pgps_t = $4) pgps_seen',
            v_qual, v_rel, v_name);
        IF v_by_join AND v_calls = 0 THEN
            -- The policies do not read the claims: one answer for every
            -- class, per event (never rows times classes).
            BEGIN
                EXECUTE v_each INTO v_ns, v_new, v_old
                  USING p_tables, p_news, p_olds, v_table;
                RETURN QUERY SELECT NULL::bigint, s.n, true, s.new_seen, s.old_seen, v_columns, false
                    FROM unnest(v_ns, v_new, v_old) s(n, new_seen, old_seen);
                CONTINUE;
            EXCEPTION WHEN OTHERS THEN
                NULL;   -- per class below, where each class fails alone
            END;
        END IF;
        RETURN QUERY SELECT NULL::bigint, u.pgps_n, true, false, false, v_columns, false
            FROM unnest(p_tables) WITH ORDINALITY u(pgps_t, pgps_n) WHERE u.pgps_t = v_table;
        IF v_by_join AND v_calls > 0 THEN
            BEGIN
                -- Into arrays first: a policy that fails on one class's
                -- claims must leave no half answer behind.
                EXECUTE format(
                    'SELECT array_agg(pgps_k), array_agg(pgps_n), array_agg(pgps_new), array_agg(pgps_old) FROM (
                        SELECT pgps_c.pgps_k, pgps_u.pgps_n,
                               bool_or(pgps_u.pgps_side = 1) AS pgps_new, bool_or(pgps_u.pgps_side = 2) AS pgps_old
                        FROM (SELECT v.pgps_n, s.pgps_side, s.pgps_row
                              FROM unnest($1, $2, $3) WITH ORDINALITY v(pgps_t, pgps_new, pgps_old, pgps_n)
                              CROSS JOIN LATERAL (VALUES (1, v.pgps_new), (2, v.pgps_old)) s(pgps_side, pgps_row)
                              WHERE v.pgps_t = $5 AND s.pgps_row IS NOT NULL) pgps_u
                        CROSS JOIN LATERAL jsonb_populate_record(NULL::%2$s, pgps_u.pgps_row) AS %3$I
                        JOIN (SELECT coalesce(x.pgps_claims, '''') AS pgps_claims, x.pgps_k
                              FROM unnest($4::text[]) WITH ORDINALITY x(pgps_claims, pgps_k)) pgps_c ON %1$s
                        GROUP BY 1, 2) pgps_seen',
                    v_joined, v_rel, v_name)
                  INTO v_ks, v_ns, v_new, v_old
                  USING p_tables, p_news, p_olds, p_claims, v_table;
                RETURN QUERY SELECT s.k, s.n, true, s.new_seen, s.old_seen, NULL::text[], false
                    FROM unnest(v_ks, v_ns, v_new, v_old) s(k, n, new_seen, old_seen);
                CONTINUE;
            EXCEPTION WHEN OTHERS THEN
                -- Some class's claims make the policy fail: per class, so
                -- that only that class fails.
                NULL;
            END;
        END IF;
        FOR v_k IN SELECT generate_subscripts(p_claims, 1) LOOP
            BEGIN
                IF p_role IS NOT NULL THEN
                    PERFORM set_config('request.jwt.claims', coalesce(p_claims[v_k], ''), true);
                END IF;
                EXECUTE v_each || ' WHERE pgps_new OR pgps_old' INTO v_ns, v_new, v_old
                  USING p_tables, p_news, p_olds, v_table;
                RETURN QUERY SELECT v_k, s.n, true, s.new_seen, s.old_seen, NULL::text[], false
                    FROM unnest(v_ns, v_new, v_old) s(n, new_seen, old_seen);
            EXCEPTION WHEN OTHERS THEN
                RETURN QUERY SELECT v_k, NULL::bigint, false, false, false, ARRAY[SQLSTATE, SQLERRM], false;
            END;
        END LOOP;
    END LOOP;
END;
$$;

-- Anyone may ask, for itself or a role it may become: it runs with the
-- caller's rights and shows nothing a SELECT would not.
GRANT EXECUTE ON FUNCTION pubsub.row_views_classes(text[], jsonb[], jsonb[], text, text[]) TO PUBLIC;

-- migrate:down

DROP FUNCTION pubsub.row_views_classes(text[], jsonb[], jsonb[], text, text[]);
