-- Defence in depth: the rules the leads handlers follow also hold for any SQL statement of the
-- application role, whatever identity it set. A bug in a handler (or an injected statement) can
-- no longer hand a lead to a viewer, let a collaborator take a lead, publish events to another
-- territory or write audit rows under someone else's name.
--
-- Runs as the owner role after 0002. Every function here is SECURITY INVOKER (the default): it
-- runs with the writer's privileges and under the writer's row-level security, and reads only
-- `users`, which every identified role may read (users_read). Nothing here is SECURITY DEFINER.
--
-- Privileges that complete this (in `freshplan migrate`, src/db/bootstrap.rs, because they name
-- the application role and the database): no UPDATE or DELETE on `users` and no USAGE or UPDATE
-- on sequences for the application role (identity columns need none; SELECT stays for the
-- doorbell's `last_value`), CONNECT and TEMPORARY on the database revoked from PUBLIC and
-- CONNECT granted to the application role only.

-- ---------------------------------------------------------------------------------------
-- Who may own a lead, who may collaborate on it (the rules of leads/service.rs).

-- A lead's owner is a sales user or a manager of the lead's territory.
CREATE FUNCTION lead_owner_eligible(owner text, lead_territory text)
    RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM users u
                   WHERE u.id = owner AND u.role IN ('sales', 'manager')
                     AND u.territory = lead_territory)
$$;

-- A lead's collaborators are users of the lead's territory (any role, as the handler validates
-- them; a viewer gains nothing from it, row-level security reads collaborators for sales only).
CREATE FUNCTION lead_collaborators_eligible(collaborators text[], lead_territory text)
    RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT NOT EXISTS (SELECT 1 FROM unnest(collaborators) AS c(id)
                       WHERE NOT EXISTS (SELECT 1 FROM users u
                                         WHERE u.id = c.id AND u.territory = lead_territory))
$$;

-- New leads (statement level: the demo seed inserts 500 at a time): owned by a sales user or a
-- manager of the territory, or by their creator, which is what the create handler does (the
-- caller becomes the owner; row-level security already lets sales create only their own leads
-- in their own territory and viewers none, and a caller's own identity is vetted when it logs
-- in). So an admin (or the tests' anonymous publisher) may own what it creates, but nobody
-- creates a lead for a viewer, an admin or a user of another territory.
CREATE FUNCTION leads_check_new_assignments() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.id, n.owner_user_id, n.territory INTO bad
    FROM new_leads n
    WHERE NOT lead_owner_eligible(n.owner_user_id, n.territory)
      AND n.owner_user_id IS DISTINCT FROM app_user()
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'owner % of lead % is not a sales user or manager of territory %',
            bad.owner_user_id, bad.id, bad.territory
            USING ERRCODE = 'check_violation', TABLE = 'leads',
                  CONSTRAINT = 'leads_owner_of_territory';
    END IF;
    SELECT n.id, n.territory INTO bad
    FROM new_leads n
    WHERE NOT lead_collaborators_eligible(n.collaborators, n.territory)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a collaborator of lead % is not a user of territory %', bad.id, bad.territory
            USING ERRCODE = 'check_violation', TABLE = 'leads',
                  CONSTRAINT = 'leads_collaborators_of_territory';
    END IF;
    RETURN NULL;
END $$;
-- AFTER, so that CHECK constraints and row-level security answer first (and name their cause).
CREATE TRIGGER leads_check_new_assignments AFTER INSERT ON leads
    REFERENCING NEW TABLE AS new_leads
    FOR EACH STATEMENT EXECUTE FUNCTION leads_check_new_assignments();

-- Changed owner, collaborators or territory: the same rules for the new values, for everyone
-- (no exception: a lead is never handed to an admin, a viewer or a user of another territory).
CREATE FUNCTION leads_check_assignment() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
    IF (OLD.owner_user_id, OLD.territory) IS DISTINCT FROM (NEW.owner_user_id, NEW.territory)
       AND NOT lead_owner_eligible(NEW.owner_user_id, NEW.territory) THEN
        RAISE EXCEPTION 'owner % of lead % is not a sales user or manager of territory %',
            NEW.owner_user_id, NEW.id, NEW.territory
            USING ERRCODE = 'check_violation', TABLE = 'leads',
                  CONSTRAINT = 'leads_owner_of_territory';
    END IF;
    IF (OLD.collaborators, OLD.territory) IS DISTINCT FROM (NEW.collaborators, NEW.territory)
       AND NOT lead_collaborators_eligible(NEW.collaborators, NEW.territory) THEN
        RAISE EXCEPTION 'a collaborator of lead % is not a user of territory %', NEW.id, NEW.territory
            USING ERRCODE = 'check_violation', TABLE = 'leads',
                  CONSTRAINT = 'leads_collaborators_of_territory';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER leads_check_assignment AFTER UPDATE ON leads
    FOR EACH ROW
    WHEN (OLD.owner_user_id IS DISTINCT FROM NEW.owner_user_id
          OR OLD.collaborators IS DISTINCT FROM NEW.collaborators
          OR OLD.territory IS DISTINCT FROM NEW.territory)
    EXECUTE FUNCTION leads_check_assignment();

-- ---------------------------------------------------------------------------------------
-- Who may change what on a lead. leads_update (0001) lets a collaborator UPDATE the row, because
-- logging an activity moves last_activity_at (repo::touch_activity). The handler lets only the
-- owner, a manager of the territory or an admin (and the system's jobs) change anything else:
-- so a writer who is none of them may move last_activity_at forward and change nothing else —
-- not the owner, not the collaborators, not the status, not a flag. Columns added later are
-- covered without touching this function (the whole row is compared).
CREATE FUNCTION leads_guard_change() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
    IF app_role() IN ('admin', 'system')
       OR (app_role() = 'manager' AND OLD.territory = app_territory())
       OR (app_role() = 'sales' AND OLD.owner_user_id = app_user())
       -- A role exempt from row-level security (a superuser's maintenance): not the
       -- application role, which is never exempt (the start-up check refuses that).
       OR NOT row_security_active(TG_RELID) THEN
        RETURN NEW;
    END IF;
    IF (to_jsonb(NEW) - 'last_activity_at') IS DISTINCT FROM (to_jsonb(OLD) - 'last_activity_at')
       OR (OLD.last_activity_at IS NOT NULL
           AND (NEW.last_activity_at IS NULL OR NEW.last_activity_at < OLD.last_activity_at)) THEN
        RAISE EXCEPTION 'only the owner, a manager of the territory or an admin may change lead %; '
                        'a collaborator only logs activities', OLD.id
            USING ERRCODE = 'insufficient_privilege', TABLE = 'leads';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER leads_guard_change BEFORE UPDATE ON leads
    FOR EACH ROW EXECUTE FUNCTION leads_guard_change();

-- ---------------------------------------------------------------------------------------
-- Outbox: an event only for the writer's own audience. 0001 checked the role only, so a manager
-- of DE could publish into AT's streams. Sales publish only events that name them as owner or
-- collaborator (their create, their activity on a lead they own or collaborate on, their
-- hand-over, whose audience keeps the old owner among the collaborators).
DROP POLICY outbox_insert ON outbox;
CREATE POLICY outbox_insert ON outbox FOR INSERT WITH CHECK (
    app_role() IN ('admin', 'system')
    OR (app_role() = 'manager' AND territory = app_territory())
    OR (app_role() = 'sales' AND territory = app_territory()
        AND (owner_user_id = app_user() OR app_user() = ANY (collaborators))));

-- ---------------------------------------------------------------------------------------
-- Audit: 0001 already requires actor_user_id = app_user() AND actor_role = app_role(); now also
-- the writer's own territory (or none) unless admin or system, so that no manager or salesperson
-- can put rows into another territory's audit view.
DROP POLICY audit_insert ON audit_log;
CREATE POLICY audit_insert ON audit_log FOR INSERT WITH CHECK (
    app_role() IS NOT NULL AND actor_user_id = app_user() AND actor_role = app_role()
    AND (app_role() IN ('admin', 'system') OR territory IS NULL OR territory = app_territory()));

-- ---------------------------------------------------------------------------------------
-- Users: 0001's users_write let the application role, as any admin, rewrite anyone's role and
-- territory (which moves row-level security and the ownership rule above). Now the application
-- role only inserts them, as the system principal (the demo seed, `INSERT … ON CONFLICT DO
-- NOTHING`), and has no UPDATE or DELETE privilege on the table at all (see the top). Operators
-- manage users with `freshplan users …`, which acts as the owner role with an admin identity
-- (app_is_schema_owner(), 0002): that path alone may insert and update. Nobody deletes a user
-- (they are deactivated).
DROP POLICY users_write ON users;
CREATE POLICY users_insert ON users FOR INSERT WITH CHECK (
    app_role() = 'system' OR (app_role() = 'admin' AND app_is_schema_owner()));
CREATE POLICY users_update ON users FOR UPDATE
    USING (app_role() = 'admin' AND app_is_schema_owner())
    WITH CHECK (app_role() = 'admin' AND app_is_schema_owner());
