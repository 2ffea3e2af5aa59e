-- The lead list at 100,000 leads (issue "Performance"): the first page of 50 was a sequential
-- scan of every lead (~100 ms, and as much again for the total), because row-level security
-- lets the planner use an index only for leakproof conditions, and neither the policy's
-- `= ANY (collaborators)` nor a search's ILIKE is one.
--
-- 1. leads_select is written out with the identity read once per statement (InitPlans), the
--    collaborator test as `@>` (the GIN index serves it). Same visibility as app_can_see().
-- 2. Indexes in the list's order (most recently changed first): all, per territory, per owner;
--    trigram indexes for the search over company name and city.
-- 3. lead_list_page(): the list's ids and total, chosen by the schema owner with the caller's
--    visibility written as plain, index-friendly predicates per role (sales: own UNION
--    collaborating), and the total from the lead-count roll-up where that is exact (no search;
--    for a salesperson the roll-up gives their own leads and only the collaborations are
--    counted). The handler then reads
--    the rows by id *under the caller's row-level security*, so a mistake here could only drop a
--    row from a page, never show one the caller may not see.

DROP POLICY leads_select ON leads;
-- The owner (triggers, lead_list_page) reads every lead. `TO <owner> USING (true)` instead of
-- 0002's `app_is_schema_owner()`: a constant the planner folds away, so for the owner no
-- security qualifier stands before the search conditions and they can use indexes.
DROP POLICY leads_triggers_read ON leads;
CREATE POLICY leads_owner_read ON leads FOR SELECT TO CURRENT_USER USING (true);
CREATE POLICY leads_select ON leads FOR SELECT USING (
    (SELECT app_role()) IN ('admin', 'system')
    OR ((SELECT app_role()) IN ('manager', 'viewer') AND territory = (SELECT app_territory()))
    OR ((SELECT app_role()) = 'sales'
        AND (owner_user_id = (SELECT app_user()) OR collaborators @> ARRAY[(SELECT app_user())])));

CREATE INDEX leads_list_idx ON leads (updated_at DESC, id) WHERE status <> 'DELETED';
CREATE INDEX leads_territory_list_idx ON leads (territory, updated_at DESC, id)
    WHERE status <> 'DELETED';
CREATE INDEX leads_owner_list_idx ON leads (owner_user_id, updated_at DESC, id)
    WHERE status <> 'DELETED';

-- pg_trgm is a trusted extension (PostgreSQL ≥ 13): the owner role may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX leads_company_trgm_idx ON leads USING gin (company_name gin_trgm_ops);
CREATE INDEX leads_city_trgm_idx ON leads USING gin (city gin_trgm_ops);

-- One page of the leads the caller sees: (id, total) rows in list order; a single row with a
-- NULL id when the page is empty (it still carries the total); no row without an identity.
-- Filters as the API takes them: status (NULL: every status but DELETED), owner, an ILIKE
-- pattern over company name and city, an email lookup hash.
CREATE FUNCTION lead_list_page(p_status text, p_owner text, p_pattern text, p_email_hash bytea,
                               p_limit integer, p_offset bigint)
    RETURNS TABLE (id uuid, total bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_role      text := app_role();
    v_user      text := app_user();
    v_territory text := app_territory();
    v_from      text := 'leads';
    v_where     text;
    v_total     bigint;
BEGIN
    IF v_role IS NULL
       OR v_role NOT IN ('admin', 'system', 'manager', 'viewer', 'sales')
       OR (v_role = 'sales' AND v_user IS NULL)
       OR (v_role IN ('manager', 'viewer') AND v_territory IS NULL) THEN
        RETURN;
    END IF;
    v_where := CASE WHEN p_status IS NULL THEN 'status <> ''DELETED''' ELSE 'status = $1' END;
    IF p_owner IS NOT NULL THEN
        v_where := v_where || ' AND owner_user_id = $2';
    END IF;
    IF v_role IN ('manager', 'viewer') THEN
        v_where := v_where || ' AND territory = $5';
    END IF;
    IF p_pattern IS NULL AND p_email_hash IS NULL AND v_role <> 'sales' THEN
        EXECUTE 'SELECT coalesce(sum(n), 0)::bigint FROM cockpit_lead_counts WHERE ' || v_where
            INTO v_total USING p_status, p_owner, NULL::text, NULL::bytea, v_territory;
    ELSIF p_pattern IS NULL AND p_email_hash IS NULL THEN
        -- A salesperson: own leads from the roll-up, plus the few they collaborate on.
        EXECUTE 'SELECT (SELECT coalesce(sum(n), 0) FROM cockpit_lead_counts WHERE '
            || v_where || ' AND owner_user_id = $6)::bigint + (SELECT count(*) FROM leads WHERE '
            || v_where || ' AND collaborators @> ARRAY[$6] AND owner_user_id <> $6)'
            INTO v_total USING p_status, p_owner, NULL::text, NULL::bytea, v_territory, v_user;
    END IF;
    IF p_email_hash IS NOT NULL THEN
        v_where := v_where || ' AND email_hash = $4';
    END IF;
    IF v_role = 'sales' THEN
        -- A salesperson: own leads (in list order from leads_owner_list_idx) and, apart, the
        -- leads they collaborate on (GIN); the second branch excludes their own, so UNION ALL
        -- has no duplicates. A search filters these few thousand rows directly.
        v_from := '(SELECT * FROM leads WHERE owner_user_id = $6 '
            || 'UNION ALL SELECT * FROM leads '
            || 'WHERE collaborators @> ARRAY[$6] AND owner_user_id <> $6) leads';
        IF p_pattern IS NOT NULL THEN
            v_where := v_where || ' AND (company_name ILIKE $3 OR city ILIKE $3)';
        END IF;
    ELSIF p_pattern IS NOT NULL THEN
        -- A search over a territory or all: the matches first, through the trigram indexes
        -- (OFFSET 0 keeps the planner from walking the list index instead, hoping to meet 50
        -- matches early).
        v_from := '(SELECT * FROM leads WHERE company_name ILIKE $3 OR city ILIKE $3 OFFSET 0) leads';
    END IF;
    IF v_total IS NULL THEN
        EXECUTE 'SELECT count(*) FROM ' || v_from || ' WHERE ' || v_where
            INTO v_total USING p_status, p_owner, p_pattern, p_email_hash, v_territory, v_user;
    END IF;
    RETURN QUERY EXECUTE 'SELECT id, $7 FROM ' || v_from || ' WHERE ' || v_where
        || ' ORDER BY updated_at DESC, id LIMIT $8 OFFSET $9'
        USING p_status, p_owner, p_pattern, p_email_hash, v_territory, v_user, v_total,
              p_limit, p_offset;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::uuid, v_total;
    END IF;
END
$$;
